//! What a run saw, and whether it measured what it meant to.
//!
//! Only successful requests count: the latency histogram holds the requests answered with
//! every indicium signed, and `indicia` the indicia signed. A refusal is answered much
//! faster than a signature (an `insufficient-funds` in ~0.2 ms against ~2 ms for a signed
//! indicium under the same load), so mixing them in would make an appliance that ran dry
//! look fast. Refusals are tallied by error code, and failed connections by what failed,
//! apart from the successes.
//!
//! A run is **valid** only when nothing failed that the experiment did not intend: no
//! error code it did not declare as expected (the standard experiments declare none, so
//! `busy` counts too), no failed connection, no request left unanswered and no indicium
//! that failed offline verification. Its figures are reported either way, with the
//! reasons beside them; an invalid run is never used to derive another experiment's
//! parameters.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use indicia_proto::ErrorCode;

/// The latency histogram's range: 1 us to one minute, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable!("constant bounds"))
}

/// What a run (or one connection of it) saw.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Latency of the successful requests only (every item signed).
    pub latency_us: Histogram<u64>,
    /// Requests answered, successful or not.
    pub requests: u64,
    /// Requests answered with every item signed: the latency histogram's count.
    pub requests_ok: u64,
    /// Indicia signed (in successful requests and in partly refused batches).
    pub indicia: u64,
    /// Refused requests and refused items of batches, by error code name.
    pub errors: BTreeMap<String, u64>,
    /// Connections that failed during the run, by what failed (the connection itself,
    /// not an answer: closed, reset, no answer, an answer that does not parse).
    pub transport_failures: BTreeMap<String, u64>,
    /// Requests sent on a connection that failed, and never answered.
    pub unanswered: u64,
    pub verified: u64,
    pub verify_failed: u64,
    /// Through the client library: what the pool did (calls, frames, batches).
    pub library: Option<indicia_client::PoolStats>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            latency_us: latency_histogram(),
            requests: 0,
            requests_ok: 0,
            indicia: 0,
            errors: BTreeMap::new(),
            transport_failures: BTreeMap::new(),
            unanswered: 0,
            verified: 0,
            library: None,
            verify_failed: 0,
        }
    }
}

/// Whether a run measured what it meant to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validity {
    Valid,
    /// The reasons, each with its count: an error code name, `transport <what failed>`,
    /// `unanswered` or `verify-failed`. Never empty.
    Invalid(BTreeMap<String, u64>),
}

impl Validity {
    pub fn is_valid(&self) -> bool {
        matches!(self, Self::Valid)
    }

    /// `valid`, or `invalid` and the reasons with their counts, for a table.
    pub fn describe(&self) -> String {
        match self {
            Self::Valid => "valid".to_owned(),
            Self::Invalid(reasons) => format!("INVALID: {}", describe_counts(reasons)),
        }
    }
}

/// `name count, name count`, or `none`.
pub fn describe_counts(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return "none".to_owned();
    }
    counts
        .iter()
        .map(|(name, count)| format!("{name} {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Tally {
    pub fn merge(&mut self, other: &Tally) {
        // Both use latency_histogram()'s bounds: adding cannot fail.
        let _ = self.latency_us.add(&other.latency_us);
        self.requests += other.requests;
        self.requests_ok += other.requests_ok;
        self.indicia += other.indicia;
        for (code, count) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += count;
        }
        for (what, count) in &other.transport_failures {
            *self.transport_failures.entry(what.clone()).or_default() += count;
        }
        self.unanswered += other.unanswered;
        self.verified += other.verified;
        self.verify_failed += other.verify_failed;
        if let Some(theirs) = other.library {
            let ours = self.library.get_or_insert_with(Default::default);
            ours.calls += theirs.calls;
            ours.frames_sent += theirs.frames_sent;
            ours.batches += theirs.batches;
            ours.batched_calls += theirs.batched_calls;
            ours.resends += theirs.resends;
            ours.connections += theirs.connections;
            ours.busy += theirs.busy;
            ours.reroutes += theirs.reroutes;
        }
    }

    /// One refused request or refused item.
    pub fn error(&mut self, code: ErrorCode) {
        *self.errors.entry(code.name()).or_default() += 1;
    }

    /// A connection failed with `unanswered` of its requests in flight.
    pub fn transport_failure(&mut self, what: String, unanswered: u64) {
        *self.transport_failures.entry(what).or_default() += 1;
        self.unanswered += unanswered;
    }

    /// Every error answer, item refusal and failed connection.
    pub fn failures(&self) -> u64 {
        self.errors.values().sum::<u64>() + self.transport_failures.values().sum::<u64>()
    }

    /// Valid when nothing failed but the error codes in `expected`.
    pub fn validity(&self, expected: &[ErrorCode]) -> Validity {
        let expected: Vec<String> = expected.iter().map(|code| code.name()).collect();
        let mut reasons: BTreeMap<String, u64> = self
            .errors
            .iter()
            .filter(|(code, _)| !expected.contains(code))
            .map(|(code, count)| (code.clone(), *count))
            .collect();
        for (what, count) in &self.transport_failures {
            reasons.insert(format!("transport {what}"), *count);
        }
        if self.unanswered > 0 {
            reasons.insert("unanswered".into(), self.unanswered);
        }
        if self.verify_failed > 0 {
            reasons.insert("verify-failed".into(), self.verify_failed);
        }
        if reasons.is_empty() {
            Validity::Valid
        } else {
            Validity::Invalid(reasons)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_merge_counts_errors_and_histograms() {
        let mut a = Tally {
            requests: 4,
            requests_ok: 1,
            indicia: 5,
            ..Tally::default()
        };
        a.latency_us.record(100).unwrap();
        a.error(ErrorCode::Busy);
        let mut b = Tally {
            requests: 4,
            requests_ok: 2,
            indicia: 2,
            verified: 1,
            ..Tally::default()
        };
        b.latency_us.record(300).unwrap();
        b.latency_us.record(200).unwrap();
        b.error(ErrorCode::Busy);
        b.error(ErrorCode::InsufficientFunds);
        b.transport_failure("connection-closed".into(), 3);
        a.merge(&b);
        assert_eq!((a.requests, a.requests_ok, a.indicia), (8, 3, 7));
        assert_eq!((a.verified, a.unanswered), (1, 3));
        assert_eq!(a.latency_us.len(), 3);
        assert_eq!(a.latency_us.max(), 300);
        assert_eq!(a.latency_us.value_at_quantile(0.5), 200);
        assert_eq!(a.errors["busy"], 2);
        assert_eq!(a.errors["insufficient-funds"], 1);
        assert_eq!(a.transport_failures["connection-closed"], 1);
        assert_eq!(a.failures(), 4);
    }

    #[test]
    fn a_tally_without_failures_is_valid() {
        let mut tally = Tally {
            requests: 2,
            requests_ok: 2,
            indicia: 2,
            verified: 1,
            ..Tally::default()
        };
        tally.latency_us.record(1_000).unwrap();
        tally.latency_us.record(2_000).unwrap();
        assert_eq!(tally.validity(&[]), Validity::Valid);
        assert!(tally.validity(&[]).is_valid());
        assert_eq!(tally.validity(&[]).describe(), "valid");
    }

    #[test]
    fn a_tally_with_errors_is_invalid_with_the_reasons_and_counts() {
        let mut tally = Tally {
            requests: 5,
            requests_ok: 1,
            indicia: 1,
            ..Tally::default()
        };
        for _ in 0..3 {
            tally.error(ErrorCode::InsufficientFunds);
        }
        tally.error(ErrorCode::Busy);
        let validity = tally.validity(&[]);
        let Validity::Invalid(reasons) = &validity else {
            panic!("{validity:?}");
        };
        assert_eq!(reasons["insufficient-funds"], 3);
        assert_eq!(reasons["busy"], 1, "busy is an error like any other");
        assert_eq!(validity.describe(), "INVALID: busy 1, insufficient-funds 3");
        // An error the experiment declares is not a reason; the others still are.
        let validity = tally.validity(&[ErrorCode::Busy]);
        assert_eq!(
            validity,
            Validity::Invalid([("insufficient-funds".to_owned(), 3)].into())
        );
        assert!(tally
            .validity(&[ErrorCode::Busy, ErrorCode::InsufficientFunds])
            .is_valid());
    }

    #[test]
    fn failed_connections_and_failed_verifications_make_a_tally_invalid() {
        let mut tally = Tally::default();
        tally.transport_failure("connection-closed".into(), 8);
        assert_eq!(
            tally.validity(&[ErrorCode::Busy]),
            Validity::Invalid(
                [
                    ("transport connection-closed".to_owned(), 1),
                    ("unanswered".to_owned(), 8)
                ]
                .into()
            )
        );
        let tally = Tally {
            verify_failed: 1,
            ..Tally::default()
        };
        assert_eq!(
            tally.validity(&[]),
            Validity::Invalid([("verify-failed".to_owned(), 1)].into())
        );
    }
}
