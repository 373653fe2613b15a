//! What a run can spend, so that its vPSDs are funded for all of it before it starts.
//!
//! A run is funded up front, from its duration and an upper bound of its rate, not
//! refilled as it goes. A refill is a provider-authorized change of the vPSD: a durable
//! commit of its own, on the shard that signs for that vPSD. Made during the load, refills
//! would be measured as part of it (the appliance's CPU, its sessions, the latency of the
//! requests queued behind them), and one that came a few milliseconds late would let the
//! vPSD run dry, which is what it is there to prevent. Up front, it is one refill per vPSD
//! before the clock starts.
//!
//! The bound: an open-loop run sends at most `rate x duration` requests, plus one per
//! connection (each connection's first request is due at the start). A closed-loop run has
//! no rate of its own; it is bounded by what one vPSD can sign. A vPSD lives on one shard,
//! one thread, and each indicium is one signature: at least ~10 us of a current core
//! (Ed25519, the faster algorithm, takes 14 us on the development machine), so under
//! 100 000 a second. [`VPSD_INDICIA_PER_S_MAX`] is ten times that. Every vPSD is funded
//! for the whole run, since the picker may send it every request. Should a run exceed the
//! bound all the same, its `insufficient-funds` refusals make it invalid (see
//! [`crate::tally`]): the bound sizes the funding, it does not decide what is reported.

use crate::run::{Mode, RunConfig};

/// Indicia one vPSD can sign per second, at most: ten times what one core can sign.
pub const VPSD_INDICIA_PER_S_MAX: u64 = 1_000_000;

/// The most indicia one vPSD of `config`'s run can be asked to sign.
pub fn indicia_max(config: &RunConfig) -> u64 {
    let seconds = config.duration.as_secs_f64();
    // f64 to u64 saturates, so an absurd duration or rate gives u64::MAX, not a wrap.
    let signable = (seconds * VPSD_INDICIA_PER_S_MAX as f64).ceil() as u64;
    match config.mode {
        Mode::Closed { .. } => signable,
        Mode::Open { rate_per_s } => {
            let requests = ((seconds * rate_per_s.max(0.0)).ceil() as u64)
                .saturating_add(config.connections.max(1) as u64);
            requests
                .saturating_mul(config.batch.max(1) as u64)
                .min(signable)
        }
    }
}

/// The funds each vPSD of `config`'s run needs available, in mills; None if that does not
/// fit a register.
pub fn funds_mills(config: &RunConfig) -> Option<u64> {
    indicia_max(config).checked_mul(config.postage_mills)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Distribution, VpsdPicker};
    use indicia_client::Credential;
    use std::time::Duration;

    fn config(mode: Mode, seconds: f64, batch: usize) -> RunConfig {
        RunConfig {
            addr: "127.0.0.1:1".parse().unwrap(),
            credential: Credential::new("loadgen", [7; 32]),
            tls: None,
            connections: 8,
            mode,
            duration: Duration::from_secs_f64(seconds),
            picker: VpsdPicker::new(1, 4, Distribution::Uniform),
            batch,
            frames_per_write: 64,
            postage_mills: 730,
            verify_every: 0,
            seed: 1,
            expected_errors: Vec::new(),
            client: crate::run::ClientKind::Raw,
        }
    }

    #[test]
    fn a_closed_loop_is_funded_for_what_one_vpsd_can_sign() {
        let config = config(Mode::Closed { window: 8 }, 5.0, 1);
        assert_eq!(indicia_max(&config), 5_000_000);
        // The sweep point that ran dry: 5 s at cap 256 wanted more than 136 986 indicia.
        assert!(funds_mills(&config).unwrap() > 100_000_000);
        assert_eq!(funds_mills(&config), Some(3_650_000_000));
    }

    #[test]
    fn an_open_loop_is_funded_for_its_schedule() {
        // 2 s at 1 000/s, one extra request per connection, 4 indicia per request.
        let open = config(Mode::Open { rate_per_s: 1000.0 }, 2.0, 4);
        assert_eq!(indicia_max(&open), (2_000 + 8) * 4);
        // A rate above what a vPSD can sign is bounded by that.
        let fast = config(Mode::Open { rate_per_s: 5e9 }, 2.0, 1);
        assert_eq!(indicia_max(&fast), 2_000_000);
        // No rate: each connection's first request, at the start.
        assert_eq!(
            indicia_max(&config(Mode::Open { rate_per_s: 0.0 }, 2.0, 1)),
            8
        );
    }

    #[test]
    fn funds_that_do_not_fit_a_register_are_refused() {
        let mut config = config(Mode::Closed { window: 8 }, 1e14, 1);
        assert_eq!(indicia_max(&config), u64::MAX);
        assert_eq!(funds_mills(&config), None);
        config.postage_mills = 1;
        assert_eq!(funds_mills(&config), Some(u64::MAX));
    }
}
