//! The idempotency window: the answers to the most recent charging requests, keyed by
//! (client, vPSD, request id), so that a retry gets the original answer and is charged
//! once.
//!
//! The vPSD is part of the key: a request id names one request *for one vPSD*. So the rule
//! holds whatever shard owns the vPSD, for any shard count, and each vPSD's entries can
//! leave with it when it moves (every entry carries its vPSD; [`IdempotencyWindow::of_vpsd`]).
//!
//! Only requests that changed something are remembered (a sign or batch with at least one
//! indicium, a refill or contact); a request refused as a whole charged nothing and is
//! simply evaluated again. The window is bounded by the number of remembered indicia (a
//! refill counts as one) and forgets the oldest generation first. Generations close only
//! between records ([`IdempotencyWindow::end_record`]), so the window is a function of the
//! records since its previous generation began: recovery rebuilds it by entering the
//! answers of those records again, in order, from an empty window (checkpoints do not
//! carry it; docs/JOURNAL.md).
//!
//! Two rules for whoever answers from it (the server):
//! - An entry exists as soon as its record is *applied*, which is before it is durable. A
//!   retry answered from the window must therefore wait, like the original, until the
//!   journal is durable up to the point where the retry arrived.
//! - The window is bounded by count, not time. With the default bound a shard remembers at
//!   least the last 131 072 charged indicia; at 50 000 indicia/s that is under 3 s, so a
//!   client that retries later than that is charged again (docs/PROTOCOL.md section 5
//!   tells clients to retry promptly). Since checkpoints no longer restate the window, a
//!   larger bound costs memory and recovery time, not journal bytes.

use std::collections::HashMap;
use std::sync::Arc;

use super::record::{ClientTag, Fingerprint, ItemOutcome};

/// What a remembered request answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RememberedAnswer {
    /// One outcome per requested item, in request order.
    Items(Arc<[ItemOutcome]>),
    /// A provider authorization that was applied (its registers are in the record).
    Provider,
    /// A sign remembered by the cluster without its indicia (a vPSD taken over): the
    /// retry's items give the same payloads again, to be signed again.
    Resign {
        key_serial: u32,
        before: crate::engine::Registers,
        outcomes: Arc<[Option<indicia_proto::ErrorCode>]>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    pub vpsd_id: u64,
    /// The vPSD version of the record that made the answer (a reset that voids the records
    /// after some version forgets their answers too).
    pub version: u64,
    pub fingerprint: Fingerprint,
    pub answer: RememberedAnswer,
}

impl Remembered {
    fn weight(&self) -> usize {
        match &self.answer {
            RememberedAnswer::Items(items) => items.len().max(1),
            RememberedAnswer::Resign { outcomes, .. } => outcomes.len().max(1),
            RememberedAnswer::Provider => 1,
        }
    }
}

/// (client, vPSD, request id).
type Key = (ClientTag, u64, u64);

/// Two generations of remembered answers. New answers go into the current generation;
/// at the end of a record that brought it to half the bound or more, it becomes the
/// previous one and the old previous one is forgotten whole. So the window always remembers
/// at least the last half of its bound, never more than the bound plus one record's
/// answers per generation, and never deletes single entries: a hash map that loses one
/// entry per insert fills with tombstones and its lookups of absent keys slow down to a
/// crawl (measured: it made the window the top entry of the journal benchmark's profile).
#[derive(Debug)]
pub struct IdempotencyWindow {
    current: HashMap<Key, Remembered>,
    current_weight: usize,
    previous: HashMap<Key, Remembered>,
    generation_weight_max: usize,
    /// Generations closed so far.
    generations: u64,
    /// Answers entered so far (a key already present is not entered again).
    entered: u64,
}

/// The window's contents, each generation sorted by key (for checkpoints).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WindowSnapshot {
    pub previous: Vec<(ClientTag, u64, Remembered)>,
    pub current: Vec<(ClientTag, u64, Remembered)>,
}

fn sorted(map: &HashMap<Key, Remembered>) -> Vec<(ClientTag, u64, Remembered)> {
    let mut out: Vec<(ClientTag, u64, Remembered)> = map
        .iter()
        .map(|(key, remembered)| (key.0, key.2, remembered.clone()))
        .collect();
    out.sort_by_key(|(client, request_id, remembered)| (*client, remembered.vpsd_id, *request_id));
    out
}

impl IdempotencyWindow {
    /// A window that remembers answers worth at most `weight_max` indicia.
    pub fn new(weight_max: usize) -> Self {
        Self {
            current: HashMap::new(),
            current_weight: 0,
            previous: HashMap::new(),
            generation_weight_max: (weight_max / 2).max(1),
            generations: 0,
            entered: 0,
        }
    }

    /// How many answers were entered so far.
    pub fn entered(&self) -> u64 {
        self.entered
    }

    /// How many generations have closed so far.
    pub fn generations(&self) -> u64 {
        self.generations
    }

    /// Whether the current generation holds nothing.
    pub fn current_is_empty(&self) -> bool {
        self.current.is_empty()
    }

    pub fn get(&self, client: ClientTag, vpsd_id: u64, request_id: u64) -> Option<&Remembered> {
        let key = (client, vpsd_id, request_id);
        self.current.get(&key).or_else(|| self.previous.get(&key))
    }

    /// The entries of one vPSD, oldest generation first (what travels with the vPSD).
    pub fn of_vpsd(&self, vpsd_id: u64) -> Vec<(ClientTag, u64, Remembered)> {
        let mut out = Vec::new();
        for generation in [&self.previous, &self.current] {
            let mut entries: Vec<(ClientTag, u64, Remembered)> = generation
                .iter()
                .filter(|((_, id, _), _)| *id == vpsd_id)
                .map(|(key, remembered)| (key.0, key.2, remembered.clone()))
                .collect();
            entries.sort_by_key(|(client, request_id, _)| (*client, *request_id));
            out.extend(entries);
        }
        out
    }

    pub fn snapshot(&self) -> WindowSnapshot {
        WindowSnapshot {
            previous: sorted(&self.previous),
            current: sorted(&self.current),
        }
    }

    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.current.is_empty() && self.previous.is_empty()
    }

    /// Remembers an answer (for `remembered.vpsd_id`). A key already present keeps its
    /// first answer (a retry never replaces what was charged). Call
    /// [`IdempotencyWindow::end_record`] after the last answer of a record.
    pub fn insert(&mut self, client: ClientTag, request_id: u64, remembered: Remembered) {
        let key = (client, remembered.vpsd_id, request_id);
        if self.previous.contains_key(&key) {
            return;
        }
        let weight = remembered.weight();
        match self.current.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => return,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(remembered);
            }
        }
        self.current_weight += weight;
        self.entered += 1;
    }

    /// Forgets the answers of `vpsd_id`'s records after `version` (they were voided: their
    /// vPSD was reset to an earlier state). Rare, so a scan of the window is fine.
    pub fn forget_after(&mut self, vpsd_id: u64, version: u64) {
        let voided =
            |key: &Key, remembered: &Remembered| key.1 == vpsd_id && remembered.version > version;
        let mut dropped_weight = 0;
        self.current.retain(|key, remembered| {
            let drop = voided(key, remembered);
            if drop {
                dropped_weight += remembered.weight();
            }
            !drop
        });
        self.current_weight = self.current_weight.saturating_sub(dropped_weight);
        self.previous
            .retain(|key, remembered| !voided(key, remembered));
    }

    /// The answers of one record are in: the current generation closes if it holds half
    /// the bound or more (so it may pass half the bound by one record's answers).
    pub fn end_record(&mut self) {
        if self.current_weight >= self.generation_weight_max {
            self.previous = std::mem::take(&mut self.current);
            self.current_weight = 0;
            self.generations += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicia_proto::ErrorCode;

    fn items(n: usize) -> Remembered {
        Remembered {
            vpsd_id: 1,
            version: 1,
            fingerprint: [0; 16],
            answer: RememberedAnswer::Items(vec![ItemOutcome::Failed(ErrorCode::Busy); n].into()),
        }
    }

    /// One record with one answer.
    fn record(window: &mut IdempotencyWindow, request_id: u64, remembered: Remembered) {
        window.insert(ClientTag(9), request_id, remembered);
        window.end_record();
    }

    #[test]
    fn forgets_whole_old_generations_and_keeps_at_least_half() {
        // Generations of weight 4 (a bound of 8).
        let mut window = IdempotencyWindow::new(8);
        let client = ClientTag(9);
        record(&mut window, 1, items(2));
        record(&mut window, 2, items(2)); // generation full: becomes the previous one
        record(&mut window, 3, items(2));
        assert!(window.get(client, 1, 1).is_some() && window.get(client, 1, 3).is_some());
        record(&mut window, 4, items(2)); // second generation full: the first is forgotten
        assert!(window.get(client, 1, 1).is_none(), "oldest forgotten");
        assert!(window.get(client, 1, 2).is_none());
        assert!(window.get(client, 1, 3).is_some() && window.get(client, 1, 4).is_some());
        record(&mut window, 5, items(1));
        assert_eq!(window.len(), 3);
        assert_eq!(window.generations(), 2);
    }

    #[test]
    fn generations_close_between_records_only() {
        let mut window = IdempotencyWindow::new(4);
        for request_id in 0..5 {
            window.insert(ClientTag(9), request_id, items(1));
        }
        assert_eq!(
            window.generations(),
            0,
            "one record's answers stay together"
        );
        window.end_record();
        assert_eq!(window.generations(), 1);
        assert!(window.current_is_empty());
        assert_eq!(window.len(), 5);
    }

    #[test]
    fn a_reset_forgets_the_answers_of_the_records_it_voids() {
        let mut window = IdempotencyWindow::new(100);
        for version in 1..=4u64 {
            let mut answer = items(1);
            answer.version = version;
            window.insert(ClientTag(1), version, answer);
            window.end_record();
        }
        let mut other = items(1);
        other.vpsd_id = 2;
        other.version = 9;
        window.insert(ClientTag(1), 9, other);
        window.forget_after(1, 2);
        assert!(window.get(ClientTag(1), 1, 2).is_some());
        assert!(window.get(ClientTag(1), 1, 3).is_none());
        assert!(window.get(ClientTag(1), 1, 4).is_none());
        assert!(
            window.get(ClientTag(1), 2, 9).is_some(),
            "other vPSDs keep theirs"
        );
    }

    #[test]
    fn first_answer_wins() {
        let mut window = IdempotencyWindow::new(10);
        window.insert(ClientTag(1), 1, items(1));
        window.insert(ClientTag(1), 1, items(3));
        assert_eq!(window.get(ClientTag(1), 1, 1), Some(&items(1)));
        assert!(window.get(ClientTag(2), 1, 1).is_none(), "keyed per client");
        assert!(window.get(ClientTag(1), 2, 1).is_none(), "keyed per vPSD");
    }

    #[test]
    fn the_same_request_id_for_two_vpsds_is_two_requests_and_each_travels_with_its_vpsd() {
        let mut window = IdempotencyWindow::new(100);
        let mut other = items(2);
        other.vpsd_id = 2;
        window.insert(ClientTag(1), 7, items(1));
        window.insert(ClientTag(1), 7, other.clone());
        assert_eq!(window.get(ClientTag(1), 1, 7), Some(&items(1)));
        assert_eq!(window.get(ClientTag(1), 2, 7), Some(&other));
        assert_eq!(window.of_vpsd(2), vec![(ClientTag(1), 7, other)]);
    }
}
