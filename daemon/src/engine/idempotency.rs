//! The idempotency window: the answers to the most recent charging requests, keyed by
//! (client, request id), so that a retry gets the original answer and is charged once.
//!
//! Only requests that changed something are remembered (a sign or batch with at least one
//! indicium, a refill or contact); a request refused as a whole charged nothing and is
//! simply evaluated again. The window is bounded by the number of remembered indicia (a
//! refill counts as one) and forgets the oldest first. It is rebuilt from the journal at
//! recovery, because entries are only ever added by [`Engine::apply`](super::Engine::apply).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::record::{ClientTag, Fingerprint, ItemOutcome};

/// What a remembered request answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RememberedAnswer {
    /// One outcome per requested item, in request order.
    Items(Arc<[ItemOutcome]>),
    /// A provider authorization that was applied (its registers are in the record).
    Provider,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    pub vpsd_id: u64,
    pub fingerprint: Fingerprint,
    pub answer: RememberedAnswer,
}

impl Remembered {
    fn weight(&self) -> usize {
        match &self.answer {
            RememberedAnswer::Items(items) => items.len().max(1),
            RememberedAnswer::Provider => 1,
        }
    }
}

type Key = (ClientTag, u64);

#[derive(Debug)]
pub struct IdempotencyWindow {
    entries: HashMap<Key, Remembered>,
    order: VecDeque<Key>,
    weight: usize,
    weight_max: usize,
}

impl IdempotencyWindow {
    pub fn new(weight_max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            weight: 0,
            weight_max: weight_max.max(1),
        }
    }

    pub fn get(&self, client: ClientTag, request_id: u64) -> Option<&Remembered> {
        self.entries.get(&(client, request_id))
    }

    /// Every remembered answer, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = (ClientTag, u64, Remembered)> + '_ {
        self.order.iter().filter_map(|key| {
            self.entries
                .get(key)
                .map(|remembered| (key.0, key.1, remembered.clone()))
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Remembers an answer, forgetting the oldest entries beyond the bound. A key already
    /// present keeps its first answer (a retry never replaces what was charged).
    pub fn insert(&mut self, client: ClientTag, request_id: u64, remembered: Remembered) {
        let key = (client, request_id);
        let weight = remembered.weight();
        match self.entries.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => return,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(remembered);
            }
        }
        self.weight += weight;
        self.order.push_back(key);
        while self.weight > self.weight_max {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.entries.remove(&oldest) {
                self.weight -= gone.weight();
            }
        }
        debug_assert_eq!(self.entries.len(), self.order.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicia_proto::ErrorCode;

    fn items(n: usize) -> Remembered {
        Remembered {
            vpsd_id: 1,
            fingerprint: [0; 16],
            answer: RememberedAnswer::Items(vec![ItemOutcome::Failed(ErrorCode::Busy); n].into()),
        }
    }

    #[test]
    fn forgets_oldest_beyond_the_bound() {
        let mut window = IdempotencyWindow::new(5);
        let client = ClientTag(9);
        window.insert(client, 1, items(2));
        window.insert(client, 2, items(2));
        assert!(window.get(client, 1).is_some());
        window.insert(client, 3, items(2));
        assert!(window.get(client, 1).is_none(), "oldest forgotten");
        assert!(window.get(client, 2).is_some());
        assert!(window.get(client, 3).is_some());
        assert_eq!(window.len(), 2);
    }

    #[test]
    fn first_answer_wins() {
        let mut window = IdempotencyWindow::new(10);
        window.insert(ClientTag(1), 1, items(1));
        window.insert(ClientTag(1), 1, items(3));
        assert_eq!(window.get(ClientTag(1), 1), Some(&items(1)));
        assert!(window.get(ClientTag(2), 1).is_none(), "keyed per client");
    }
}
