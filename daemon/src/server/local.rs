//! Two small single-thread primitives the shard's tasks share: a level-triggered wake-up
//! for one waiting task, and a connection's outbox. Both live on one executor (no `Send`).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Wakes one waiting task. A `notify` before the wait is not lost: the next `wait`
/// returns at once.
#[derive(Default)]
pub struct Signal {
    set: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl std::fmt::Debug for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signal")
            .field("set", &self.set.get())
            .finish()
    }
}

impl Signal {
    pub fn notify(&self) {
        self.set.set(true);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.set.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await;
    }
}

/// Frames waiting to be written to one connection, in the order they were made.
#[derive(Debug)]
pub struct Outbox<T> {
    items: RefCell<VecDeque<T>>,
    closed: Cell<bool>,
    signal: Signal,
}

impl<T> Default for Outbox<T> {
    fn default() -> Self {
        Self {
            items: RefCell::new(VecDeque::new()),
            closed: Cell::new(false),
            signal: Signal::default(),
        }
    }
}

impl<T> Outbox<T> {
    pub fn push(&self, item: T) {
        self.items.borrow_mut().push_back(item);
        self.signal.notify();
    }

    /// No more items will come: the writer ends once it has written what is queued.
    pub fn close(&self) {
        self.closed.set(true);
        self.signal.notify();
    }

    /// Waits for at least one item and takes everything queued; None once closed and
    /// empty.
    pub async fn take(&self) -> Option<VecDeque<T>> {
        loop {
            {
                let mut items = self.items.borrow_mut();
                if !items.is_empty() {
                    return Some(std::mem::take(&mut *items));
                }
            }
            if self.closed.get() {
                return None;
            }
            self.signal.wait().await;
        }
    }
}
