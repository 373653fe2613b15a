//! Open-loop pacing with coordinated omission corrected: request `n` is *due* at
//! `start + n / rate`, whatever happened to the ones before it, and its latency is measured
//! from when it was due, not from when it could finally be sent. A stall in the appliance
//! therefore shows up in the latency of every request it delayed, as a real user would see
//! it, instead of silently lowering the offered rate.

use std::time::{Duration, Instant};

/// The due times of one sender's requests.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    interval_ns: f64,
}

impl Schedule {
    /// `rate_per_s` requests per second from `start`; a rate of 0 is treated as 1 per hour.
    pub fn new(start: Instant, rate_per_s: f64) -> Self {
        let rate = if rate_per_s > 0.0 {
            rate_per_s
        } else {
            1.0 / 3600.0
        };
        Self {
            start,
            interval_ns: 1e9 / rate,
        }
    }

    /// When request `n` (from 0) is due.
    pub fn due(&self, n: u64) -> Instant {
        // f64 keeps sub-nanosecond intervals exact enough over any run length used here.
        self.start + Duration::from_nanos((n as f64 * self.interval_ns) as u64)
    }

    /// How many requests are due by `now`.
    pub fn due_by(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_nanos() as f64;
        (elapsed / self.interval_ns).floor() as u64 + 1
    }
}

/// Latency as coordinated-omission-corrected: from the due time (open loop) or the send
/// time (closed loop, where `due` is the send time) to the answer.
pub fn latency_us(due: Instant, answered: Instant) -> u64 {
    u64::try_from(answered.saturating_duration_since(due).as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_follow_the_rate_regardless_of_history() {
        let start = Instant::now();
        let schedule = Schedule::new(start, 1000.0);
        assert_eq!(schedule.due(0), start);
        assert_eq!(schedule.due(1), start + Duration::from_millis(1));
        assert_eq!(schedule.due(2500), start + Duration::from_millis(2500));
        assert_eq!(schedule.due_by(start), 1);
        assert_eq!(schedule.due_by(start + Duration::from_micros(999)), 1);
        assert_eq!(schedule.due_by(start + Duration::from_millis(10)), 11);
    }

    #[test]
    fn a_stall_is_charged_to_every_request_it_delayed() {
        let start = Instant::now();
        let schedule = Schedule::new(start, 100.0); // one every 10 ms
                                                    // The appliance stalls for 1 s, then answers everything at once.
        let answered = start + Duration::from_secs(1);
        let latencies: Vec<u64> = (0..100)
            .map(|n| latency_us(schedule.due(n), answered))
            .collect();
        assert_eq!(latencies[0], 1_000_000);
        assert_eq!(latencies[50], 500_000);
        assert_eq!(latencies[99], 10_000);
        // Measured from the send time instead, all hundred would have looked fast.
        assert_eq!(latency_us(answered, answered), 0);
    }

    #[test]
    fn a_zero_rate_does_not_divide_by_zero() {
        let schedule = Schedule::new(Instant::now(), 0.0);
        assert!(schedule.due(1) > schedule.due(0) + Duration::from_secs(3000));
    }
}
