//! Where the idempotency window begins in the journal.
//!
//! Checkpoints do not carry the window (it holds whole answers, indicia included, and
//! restating it in every checkpoint made the journal grow with the window instead of with
//! the work). A checkpoint says instead from which record on the window's answers lie:
//! the first record that entered an answer into the window's previous generation (or, if
//! none has closed, into its current one). Because generations close only between
//! records, entering the answers of every record from there on, in order, into an empty
//! window yields the very same window, which is what recovery does.

use crate::engine::IdempotencyWindow;

/// Tracks, record by record, where the window's generations began.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowOrigin {
    /// The first record with an answer in the previous generation.
    previous_from: Option<u64>,
    /// The first record with an answer in the current generation.
    current_from: Option<u64>,
    /// The window's count of closed generations when last seen.
    generations: u64,
}

impl WindowOrigin {
    /// Record `sequence` was installed (or remembered); `entered_before` is the window's
    /// count of entered answers before it.
    pub fn note(&mut self, sequence: u64, entered_before: u64, window: &IdempotencyWindow) {
        if window.entered() > entered_before && self.current_from.is_none() {
            self.current_from = Some(sequence);
        }
        if window.generations() != self.generations {
            // `end_record` closes at most one generation per record.
            assert_eq!(
                window.generations(),
                self.generations + 1,
                "the idempotency window closed more than one generation in one record"
            );
            self.generations = window.generations();
            self.previous_from = self.current_from;
            self.current_from = None;
        }
    }

    /// The sequence from which recovery must enter answers again (0: the window is empty).
    pub fn from(&self) -> u64 {
        self.previous_from.or(self.current_from).unwrap_or(0)
    }
}
