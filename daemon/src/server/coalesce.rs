//! Natural batching, sans-io: per-vPSD queues of sign requests on the owning shard. A
//! session starts for a vPSD when none is running for it and takes everything queued, up to
//! `session_indicia_max` indicia (whole requests only; a request larger than the cap runs
//! alone). Requests that arrive while it runs wait for the next session, so light load
//! gives small sessions and low latency and heavy load gives big sessions. No timer. The
//! shard decides when a session has ended ([`Coalescer::finish`]): when its record is
//! durable.
//!
//! The queue is bounded: past `queued_indicia_max` a request is refused at once (the
//! server answers `busy`) instead of growing memory without limit.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::engine::SignJob;

/// A queued request and whatever the server needs to answer it (`R`).
#[derive(Debug)]
pub struct Pending<R> {
    pub job: SignJob,
    pub reply: R,
}

/// Refused: the shard's queue is full. Carries the reply handle back.
#[derive(Debug)]
pub struct Busy<R>(pub R);

#[derive(Debug)]
pub struct Coalescer<R> {
    queues: HashMap<u64, VecDeque<Pending<R>>>,
    /// vPSDs with queued work and no running session, in the order they became ready.
    ready: VecDeque<u64>,
    running: HashSet<u64>,
    queued_indicia: usize,
    queued_indicia_max: usize,
    session_indicia_max: usize,
}

impl<R> Coalescer<R> {
    pub fn new(session_indicia_max: usize, queued_indicia_max: usize) -> Self {
        Self {
            queues: HashMap::new(),
            ready: VecDeque::new(),
            running: HashSet::new(),
            queued_indicia: 0,
            queued_indicia_max,
            session_indicia_max: session_indicia_max.max(1),
        }
    }

    /// Indicia waiting (not yet taken by a session).
    pub fn queued_indicia(&self) -> usize {
        self.queued_indicia
    }

    /// vPSDs that could start a session now.
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Queues a request for `vpsd_id`, or refuses it when the shard's queue is full.
    pub fn push(&mut self, vpsd_id: u64, job: SignJob, reply: R) -> Result<(), Busy<R>> {
        let items = job.items.len();
        if self.queued_indicia + items > self.queued_indicia_max {
            return Err(Busy(reply));
        }
        self.queued_indicia += items;
        let queue = self.queues.entry(vpsd_id).or_default();
        let was_idle = queue.is_empty();
        queue.push_back(Pending { job, reply });
        if was_idle && !self.running.contains(&vpsd_id) {
            self.ready.push_back(vpsd_id);
        }
        Ok(())
    }

    /// The next session to run: a vPSD and the requests it takes. The vPSD counts as
    /// running until [`Coalescer::finish`].
    pub fn next_session(&mut self) -> Option<(u64, Vec<Pending<R>>)> {
        // Every ready vPSD has a non-empty queue; skipping any that would not keeps one
        // stale entry from hiding the rest.
        let (vpsd_id, queue) = loop {
            let vpsd_id = self.ready.pop_front()?;
            if let Some(queue) = self.queues.get_mut(&vpsd_id) {
                break (vpsd_id, queue);
            }
        };
        let mut taken = Vec::new();
        let mut indicia = 0;
        while let Some(front) = queue.front() {
            let items = front.job.items.len();
            if !taken.is_empty() && indicia + items > self.session_indicia_max {
                break;
            }
            indicia += items;
            if let Some(pending) = queue.pop_front() {
                taken.push(pending);
            }
        }
        if queue.is_empty() {
            self.queues.remove(&vpsd_id);
        }
        self.queued_indicia -= indicia;
        self.running.insert(vpsd_id);
        Some((vpsd_id, taken))
    }

    /// Takes every queued request out (sessions that run stay running): for a shard that
    /// must refuse them all.
    pub fn take_queued(&mut self) -> Vec<Pending<R>> {
        self.ready.clear();
        self.queued_indicia = 0;
        self.queues.drain().flat_map(|(_, queue)| queue).collect()
    }

    /// Whether the vPSD has neither queued work nor a running session.
    pub fn is_idle(&self, vpsd_id: u64) -> bool {
        !self.running.contains(&vpsd_id)
            && self
                .queues
                .get(&vpsd_id)
                .is_none_or(|queue| queue.is_empty())
    }

    /// Marks the session for `vpsd_id` done; what queued meanwhile becomes ready.
    pub fn finish(&mut self, vpsd_id: u64) {
        self.running.remove(&vpsd_id);
        if self
            .queues
            .get(&vpsd_id)
            .is_some_and(|queue| !queue.is_empty())
        {
            self.ready.push_back(vpsd_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ClientTag;
    use indicia_proto::{MailingDate, SignItem};

    fn job(request_id: u64, items: usize) -> SignJob {
        let item = SignItem {
            postage_mills: 1,
            mailing_date: MailingDate::from_days_since_2000(0),
            rate_category: 0,
            destination_zip: None,
            data_digest: None,
        };
        SignJob {
            client: ClientTag(1),
            request_id,
            items: vec![item; items],
        }
    }

    fn ids(taken: &[Pending<u64>]) -> Vec<u64> {
        taken.iter().map(|pending| pending.reply).collect()
    }

    #[test]
    fn a_session_takes_whole_requests_up_to_the_cap() {
        let mut coalescer = Coalescer::new(4, 100);
        for (id, items) in [(1, 1), (2, 2), (3, 2), (4, 1)] {
            coalescer.push(7, job(id, items), id).unwrap();
        }
        let (vpsd, taken) = coalescer.next_session().unwrap();
        assert_eq!(
            (vpsd, ids(&taken)),
            (7, vec![1, 2]),
            "3 would exceed the cap of 4"
        );
        assert!(coalescer.next_session().is_none(), "vPSD 7 is running");
        coalescer.finish(7);
        let (_, taken) = coalescer.next_session().unwrap();
        assert_eq!(ids(&taken), vec![3, 4]);
        coalescer.finish(7);
        assert!(coalescer.next_session().is_none());
        assert_eq!(coalescer.queued_indicia(), 0);
    }

    #[test]
    fn a_request_larger_than_the_cap_runs_alone() {
        let mut coalescer = Coalescer::new(1, 100);
        coalescer.push(7, job(1, 5), 1).unwrap();
        coalescer.push(7, job(2, 1), 2).unwrap();
        let (_, taken) = coalescer.next_session().unwrap();
        assert_eq!(ids(&taken), vec![1]);
    }

    #[test]
    fn requests_arriving_during_a_session_form_the_next_one() {
        let mut coalescer = Coalescer::new(64, 1_000);
        coalescer.push(7, job(1, 1), 1).unwrap();
        let (_, first) = coalescer.next_session().unwrap();
        assert_eq!(ids(&first), vec![1], "light load: a session of one");
        for id in 2..=40 {
            coalescer.push(7, job(id, 1), id).unwrap();
        }
        assert!(coalescer.next_session().is_none());
        coalescer.finish(7);
        let (_, second) = coalescer.next_session().unwrap();
        assert_eq!(
            second.len(),
            39,
            "heavy load: everything that queued meanwhile"
        );
    }

    #[test]
    fn vpsds_take_turns_in_arrival_order() {
        let mut coalescer = Coalescer::new(64, 1_000);
        coalescer.push(1, job(1, 1), 1).unwrap();
        coalescer.push(2, job(2, 1), 2).unwrap();
        coalescer.push(1, job(3, 1), 3).unwrap();
        assert_eq!(coalescer.next_session().unwrap().0, 1);
        assert_eq!(coalescer.next_session().unwrap().0, 2);
        assert!(coalescer.next_session().is_none());
    }

    #[test]
    fn a_full_queue_refuses_instead_of_growing() {
        let mut coalescer = Coalescer::new(64, 3);
        coalescer.push(1, job(1, 2), 1).unwrap();
        let Err(Busy(reply)) = coalescer.push(2, job(2, 2), 2) else {
            panic!("queue of 3 indicia took 4");
        };
        assert_eq!(reply, 2, "the reply handle comes back to answer busy");
        coalescer.push(2, job(3, 1), 3).unwrap();
        let (_, taken) = coalescer.next_session().unwrap();
        assert_eq!(ids(&taken), vec![1]);
        assert_eq!(coalescer.queued_indicia(), 1);
        coalescer.push(1, job(4, 2), 4).unwrap();
    }
}
