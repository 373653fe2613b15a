//! Requests in flight on one connection, bounded per connection and counted per shard:
//! the reader takes one per frame, the writer gives it back when the answer is written.

use std::cell::Cell;
use std::rc::Rc;

use crate::server::local::Signal;

/// Requests in flight on one connection: the reader takes one per frame, the writer gives
/// it back when the answer is written (or, the client gone, given up).
pub(super) struct Inflight {
    count: Cell<usize>,
    max: usize,
    changed: Signal,
    /// The shard's count over all its connections.
    shard_total: Rc<Cell<usize>>,
}

impl Inflight {
    pub(super) fn new(max: usize, shard_total: Rc<Cell<usize>>) -> Self {
        Self {
            count: Cell::new(0),
            max,
            changed: Signal::default(),
            shard_total,
        }
    }

    pub(super) async fn acquire(&self) {
        while self.count.get() >= self.max {
            self.changed.wait().await;
        }
        self.count.set(self.count.get() + 1);
        self.shard_total.set(self.shard_total.get() + 1);
    }

    /// `n` answers were written or given up. Each answers one request taken with
    /// [`Inflight::acquire`]: more would be an answer without a request.
    pub(super) fn release(&self, n: usize) {
        let count = self.count.get();
        let total = self.shard_total.get();
        assert!(
            n <= count,
            "{n} answers released on a connection with {count} requests in flight"
        );
        assert!(
            n <= total,
            "{n} answers released on a shard with {total} requests in flight"
        );
        self.count.set(count - n);
        self.shard_total.set(total - n);
        self.changed.notify();
    }

    /// Whether requests of this connection are unanswered.
    pub(super) fn any(&self) -> bool {
        self.count.get() > 0
    }

    pub(super) fn is_full(&self) -> bool {
        self.count.get() >= self.max
    }

    pub(super) async fn drained(&self) {
        while self.count.get() > 0 {
            self.changed.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{block_on, poll_once};

    #[test]
    fn requests_in_flight_are_bounded_per_connection_and_counted_per_shard() {
        let shard_total = Rc::new(Cell::new(0));
        let one = Inflight::new(2, Rc::clone(&shard_total));
        let other = Inflight::new(2, Rc::clone(&shard_total));
        block_on(async {
            one.acquire().await;
            one.acquire().await;
            other.acquire().await;
        });
        assert!(one.is_full() && one.any());
        assert!(!other.is_full());
        assert_eq!(shard_total.get(), 3);
        // A full connection waits for an answer to be written.
        let mut waiting = Box::pin(one.acquire());
        assert!(block_on(poll_once(&mut waiting)).is_none());
        one.release(1);
        assert!(block_on(poll_once(&mut waiting)).is_some());
        drop(waiting);
        one.release(2);
        assert!(!one.any());
        assert_eq!(shard_total.get(), 1);
        block_on(one.drained());
    }

    #[test]
    #[should_panic(expected = "2 answers released on a connection with 1 requests in flight")]
    fn more_answers_than_requests_is_a_bug_that_stops() {
        let inflight = Inflight::new(4, Rc::new(Cell::new(0)));
        block_on(inflight.acquire());
        inflight.release(2);
    }

    #[test]
    #[should_panic(expected = "1 answers released on a shard with 0 requests in flight")]
    fn a_shard_count_out_of_step_is_a_bug_that_stops() {
        let shard_total = Rc::new(Cell::new(0));
        let inflight = Inflight::new(4, Rc::clone(&shard_total));
        block_on(inflight.acquire());
        shard_total.set(0);
        inflight.release(1);
    }
}
