//! The report of a run: what the load generator saw, what the appliance says about itself
//! (its statistics and its CPU time), and the raw signing cost measured in the same run,
//! so the appliance's cost per indicium can be stated as a ratio of it.

use std::collections::HashMap;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use indicia_proto::{Algorithm, ErrorCode, StatEntry};
use serde_json::{json, Value};

use crate::tally::{describe_counts, Tally, Validity};

/// The appliance's counters before and after, by name.
pub type Stats = HashMap<String, u64>;

/// The appliance's `stats` answer by name.
pub fn stats_from(entries: Vec<StatEntry>) -> Stats {
    entries
        .into_iter()
        .map(|entry| (entry.name, entry.value))
        .collect()
}

/// The appliance's own latency of one request kind, from its statistics
/// (`request_latency_us.<kind>.count`, `.mean`, `.p50`, `.p90`, `.p99`, `.p999`, `.max`):
/// from the request's frame complete to its answer handed to the socket, since the
/// appliance started. Against the client-side figures it tells the appliance's time from
/// the network's and the load generator's. A figure is None when the appliance does not
/// report it: an appliance without these statistics, or none of the kind yet (the
/// percentiles are absent while the count is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplianceLatency {
    /// The request kind, as the appliance names it: `sign`, `sign_batch`.
    pub kind: &'static str,
    pub count: Option<u64>,
    pub mean_us: Option<u64>,
    pub p50_us: Option<u64>,
    pub p90_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub p999_us: Option<u64>,
    pub max_us: Option<u64>,
}

/// Milliseconds with two decimals, or `n/a`.
fn ms_or_na(us: Option<u64>) -> String {
    us.map_or("n/a".to_owned(), |us| format!("{:.2}", us as f64 / 1000.0))
}

impl ApplianceLatency {
    pub fn from_stats(stats: &Stats, kind: &'static str) -> Self {
        let get = |figure: &str| {
            stats
                .get(&format!("request_latency_us.{kind}.{figure}"))
                .copied()
        };
        Self {
            kind,
            count: get("count"),
            mean_us: get("mean"),
            p50_us: get("p50"),
            p90_us: get("p90"),
            p99_us: get("p99"),
            p999_us: get("p999"),
            max_us: get("max"),
        }
    }

    /// The report's line: the figures in ms, `n/a` where absent.
    pub fn describe(&self) -> String {
        let figures = match self.count {
            None => "n/a (the appliance does not report it)".to_owned(),
            Some(count) => format!(
                "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {}, {count} requests)",
                ms_or_na(self.p50_us),
                ms_or_na(self.p90_us),
                ms_or_na(self.p99_us),
                ms_or_na(self.p999_us),
                ms_or_na(self.max_us),
                ms_or_na(self.mean_us),
            ),
        };
        format!(
            "  latency ms, appliance-side `{}` (frame in to answer out, since it started): \
             {figures}\n",
            self.kind
        )
    }

    /// p50 and p99 in ms for a table's columns, `n/a` where absent.
    pub fn p50_p99_ms(&self) -> (String, String) {
        (ms_or_na(self.p50_us), ms_or_na(self.p99_us))
    }

    pub fn to_json(&self) -> Value {
        json!({
            "kind": self.kind,
            "count": self.count,
            "mean": self.mean_us,
            "p50": self.p50_us,
            "p90": self.p90_us,
            "p99": self.p99_us,
            "p999": self.p999_us,
            "max": self.max_us,
        })
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    cpu_of(&format!("/proc/{pid}/stat"))
}

/// CPU seconds (user + system) the threads of a process whose name starts with `name`
/// have used, from /proc (for example the appliance's etcd thread, `indicia-etcd`).
pub fn threads_cpu(pid: u32, name: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(name) {
            total += cpu_of(&path.join("stat").to_string_lossy())?;
        }
    }
    Some(total)
}

fn cpu_of(stat_path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the parenthesized command name: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|hz| u64::try_from(hz).ok())
        .filter(|hz| *hz > 0)
        .unwrap_or(100);
    Some(Duration::from_micros(ticks * 1_000_000 / per_second))
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_or(Duration::ZERO, Duration::from)
}

/// The raw cost of one signature on one thread, in microseconds of that thread's CPU time
/// (the same clock as the appliance's CPU per indicium): median of five rounds of 400.
pub fn raw_sign_us(algorithm: Algorithm) -> Result<f64, aws_lc_rs::error::Unspecified> {
    let rng = SystemRandom::new();
    let message = [0x5A_u8; 61];
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let started;
        let count = 400u32;
        match algorithm {
            Algorithm::EcdsaP256 => {
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)?;
                let pair =
                    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
                        .map_err(|_| aws_lc_rs::error::Unspecified)?;
                started = thread_cpu();
                for _ in 0..count {
                    std::hint::black_box(pair.sign(&rng, &message)?);
                }
            }
            Algorithm::Ed25519 => {
                let pair = Ed25519KeyPair::from_seed_unchecked(&[7; 32])
                    .map_err(|_| aws_lc_rs::error::Unspecified)?;
                started = thread_cpu();
                for _ in 0..count {
                    std::hint::black_box(pair.sign(&message));
                }
            }
        }
        rounds.push((thread_cpu() - started).as_secs_f64() * 1e6 / f64::from(count));
    }
    rounds.sort_by(f64::total_cmp);
    Ok(rounds[rounds.len() / 2])
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub label: String,
    pub seconds: f64,
    pub tally: Tally,
    /// The error codes the run provoked on purpose (see [`Tally::validity`]).
    pub expected_errors: Vec<ErrorCode>,
    /// The kind of request the run sent, as the appliance's statistics name it.
    pub request_kind: &'static str,
    pub before: Stats,
    pub after: Stats,
    /// CPU time the appliance's process used during the run, if its pid was given.
    pub appliance_cpu: Option<Duration>,
    /// One raw signature on one thread, in microseconds of CPU time: the mean of
    /// [`Report::raw_sign_before_after_us`].
    pub raw_sign_us: f64,
    /// The raw signature measured just before and just after the load (the machine's
    /// speed drifts by ±15 % over a few seconds here).
    pub raw_sign_before_after_us: (f64, f64),
}

impl Report {
    pub fn delta(&self, name: &str) -> u64 {
        self.after
            .get(name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(self.before.get(name).copied().unwrap_or(0))
    }

    /// Indicia signed per second: refusals are not throughput.
    pub fn indicia_per_s(&self) -> f64 {
        self.tally.indicia as f64 / self.seconds.max(1e-9)
    }

    /// Whether the run measured what it meant to; if not, why.
    pub fn validity(&self) -> Validity {
        self.tally.validity(&self.expected_errors)
    }

    /// Indicia per session on the appliance during the run.
    pub fn session_size_mean(&self) -> f64 {
        self.delta("indicia") as f64 / self.delta("sessions").max(1) as f64
    }

    /// The appliance's CPU time per indicium this run had signed, in microseconds (the CPU
    /// spent refusing requests is in the numerator; the refusals are not in the count).
    pub fn cpu_per_indicium_us(&self) -> Option<f64> {
        let indicia = self.tally.indicia;
        self.appliance_cpu
            .filter(|_| indicia > 0)
            .map(|cpu| cpu.as_secs_f64() * 1e6 / indicia as f64)
    }

    /// The appliance's own latency of the run's request kind, since it started. Through
    /// the client library the appliance gets `sign` and `sign-batch` frames (single calls
    /// and calls batched together): the kind it got more of.
    pub fn appliance_latency(&self) -> ApplianceLatency {
        let kind = match self.tally.library {
            Some(_) => {
                let count = |kind: &str| {
                    self.after
                        .get(&format!("request_latency_us.{kind}.count"))
                        .copied()
                        .unwrap_or(0)
                };
                if count("sign_batch") > count("sign") {
                    "sign_batch"
                } else {
                    "sign"
                }
            }
            None => self.request_kind,
        };
        ApplianceLatency::from_stats(&self.after, kind)
    }

    pub fn latency(&self, quantile: f64) -> u64 {
        self.tally.latency_us.value_at_quantile(quantile)
    }

    pub fn to_json(&self) -> Value {
        let cpu = self.cpu_per_indicium_us();
        let validity = self.validity();
        json!({
            "label": self.label,
            "validity": if validity.is_valid() { "valid" } else { "invalid" },
            "invalid_reasons": match &validity {
                Validity::Valid => Default::default(),
                Validity::Invalid(reasons) => reasons.clone(),
            },
            "seconds": self.seconds,
            "requests": self.tally.requests,
            "requests_ok": self.tally.requests_ok,
            "indicia": self.tally.indicia,
            "indicia_per_s": self.indicia_per_s(),
            "errors": self.tally.errors,
            "expected_errors": self
                .expected_errors
                .iter()
                .map(|code| code.name())
                .collect::<Vec<_>>(),
            "transport_failures": self.tally.transport_failures,
            "unanswered": self.tally.unanswered,
            "verified": self.tally.verified,
            "verify_failed": self.tally.verify_failed,
            // Successful requests only.
            "latency_us": {
                "p50": self.latency(0.5),
                "p90": self.latency(0.9),
                "p99": self.latency(0.99),
                "p999": self.latency(0.999),
                "max": self.tally.latency_us.max(),
                "count": self.tally.latency_us.len(),
            },
            "appliance": {
                "sessions": self.delta("sessions"),
                "indicia": self.delta("indicia"),
                "session_size_mean": self.session_size_mean(),
                "session_size_p99_since_start": self.after.get("session_size.p99"),
                "commit_latency_us_p50_since_start": self.after.get("commit_latency_us.p50"),
                "commit_latency_us_p99_since_start": self.after.get("commit_latency_us.p99"),
                "cpu_s": self.appliance_cpu.map(|cpu| cpu.as_secs_f64()),
                "cpu_per_indicium_us": cpu,
                "request_latency_us_since_start": self.appliance_latency().to_json(),
            },
            "client_library": self.tally.library.map(|pool| json!({
                "calls": pool.calls,
                "frames_sent": pool.frames_sent,
                "batches": pool.batches,
                "batched_calls": pool.batched_calls,
                "resends": pool.resends,
                "connections": pool.connections,
                "busy": pool.busy,
                "reroutes": pool.reroutes,
            })),
            "raw_sign_us": self.raw_sign_us,
            "raw_sign_us_before": self.raw_sign_before_after_us.0,
            "raw_sign_us_after": self.raw_sign_before_after_us.1,
            "cpu_per_indicium_vs_raw_sign": cpu.map(|cpu| cpu / self.raw_sign_us),
        })
    }

    /// One table row, for the experiments that report many loads (the sweep, tls-cost):
    /// throughput, session size, client-side latency of the successful requests,
    /// appliance-side latency, CPU per indicium, the number of failures, and whether the
    /// load is valid (if not, why).
    pub fn to_row(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        let cpu = self.cpu_per_indicium_us();
        let (appliance_p50, appliance_p99) = self.appliance_latency().p50_p99_ms();
        format!(
            "{:>11.0} {:>9.1} {:>9.2} {:>9.2} {appliance_p50:>9} {appliance_p99:>9} {:>13} {:>8} {:>7}  {}",
            self.indicia_per_s(),
            self.session_size_mean(),
            ms(self.latency(0.5)),
            ms(self.latency(0.99)),
            cpu.map_or("n/a".to_owned(), |cpu| format!("{cpu:.1} us")),
            cpu.map_or("n/a".to_owned(), |cpu| format!(
                "{:.2}x",
                cpu / self.raw_sign_us
            )),
            self.tally.failures(),
            self.validity().describe(),
        )
    }

    pub fn to_table(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        let validity = self.validity();
        let mut out = String::new();
        if !validity.is_valid() {
            out.push_str(&format!("{}\n", invalid_banner(&self.label, &validity)));
        }
        out.push_str(&format!(
            "{}: {:.1} s, {} requests ({} successful), {} indicia signed: {:.0} indicia/s\n",
            self.label,
            self.seconds,
            self.tally.requests,
            self.tally.requests_ok,
            self.tally.indicia,
            self.indicia_per_s()
        ));
        out.push_str(&format!(
            "  latency ms, client-side, successful requests: p50 {:.2}  p90 {:.2}  p99 {:.2}  \
             p99.9 {:.2}  max {:.2}\n",
            ms(self.latency(0.5)),
            ms(self.latency(0.9)),
            ms(self.latency(0.99)),
            ms(self.latency(0.999)),
            ms(self.tally.latency_us.max()),
        ));
        out.push_str(&self.appliance_latency().describe());
        if let Some(pool) = &self.tally.library {
            out.push_str(&format!(
                "  client library: {} calls in {} frames ({:.1} calls per frame; {} sign-batch \
                 frames made of calls), {} connections, {} sent again, {} busy\n",
                pool.calls,
                pool.frames_sent,
                pool.calls as f64 / pool.frames_sent.max(1) as f64,
                pool.batches,
                pool.connections,
                pool.resends,
                pool.busy,
            ));
        }
        out.push_str(&format!(
            "  appliance: {} sessions, {:.1} indicia/session; commit p50 {} us, p99 {} us (since start)\n",
            self.delta("sessions"),
            self.session_size_mean(),
            self.after.get("commit_latency_us.p50").copied().unwrap_or(0),
            self.after.get("commit_latency_us.p99").copied().unwrap_or(0),
        ));
        match self.cpu_per_indicium_us() {
            Some(cpu) => out.push_str(&format!(
                "  appliance CPU per indicium {cpu:.1} us = {:.2}x the raw signature ({:.1} us of one \
                 thread's CPU, {:.1} before and {:.1} after this run)\n",
                cpu / self.raw_sign_us,
                self.raw_sign_us,
                self.raw_sign_before_after_us.0,
                self.raw_sign_before_after_us.1,
            )),
            None => out.push_str(&format!(
                "  raw signature {:.1} us (give --appliance-pid for the appliance's CPU per indicium)\n",
                self.raw_sign_us
            )),
        }
        out.push_str(&format!(
            "  errors by code: {}",
            describe_counts(&self.tally.errors)
        ));
        if !self.expected_errors.is_empty() {
            let expected: Vec<String> = self.expected_errors.iter().map(|c| c.name()).collect();
            out.push_str(&format!(" (expected: {})", expected.join(", ")));
        }
        out.push_str(&format!(
            "; failed connections: {}",
            describe_counts(&self.tally.transport_failures)
        ));
        if self.tally.unanswered > 0 {
            out.push_str(&format!(", {} requests unanswered", self.tally.unanswered));
        }
        out.push('\n');
        out.push_str(&format!(
            "  verified {} indicia offline, {} failed\n",
            self.tally.verified, self.tally.verify_failed
        ));
        out.push_str(&format!("  this run is {}\n", validity.describe()));
        out
    }
}

/// The two header lines of a table of [`Report::to_row`]s, after the table's own
/// columns, headed `prefix`.
pub fn row_header(prefix: &str) -> String {
    format!(
        "{:width$} {:>19} {:>19}\n{prefix} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>13} {:>8} {:>7}  {}\n",
        "",
        "client-side",
        "appliance-side",
        "indicia/s",
        "per sess",
        "p50 ms",
        "p99 ms",
        "p50 ms",
        "p99 ms",
        "CPU/indicium",
        "vs raw",
        "errors",
        "point",
        width = prefix.len() + 22,
    )
}

/// The line that heads an invalid run's report, and the demo's and the sweep's summaries.
pub fn invalid_banner(label: &str, validity: &Validity) -> String {
    format!(
        "*** {label}: {} (failures the experiment did not intend: its figures count only what \
         succeeded, and do not describe the load it meant to measure) ***",
        validity.describe()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut tally = Tally::default();
        for us in [1_000, 2_000, 3_000, 4_000] {
            tally.latency_us.record(us).unwrap_or_default();
        }
        tally.requests = 4;
        tally.requests_ok = 4;
        tally.indicia = 400;
        tally.verified = 4;
        let stats = |sessions: u64, indicia: u64| -> Stats {
            [
                ("sessions".to_owned(), sessions),
                ("indicia".to_owned(), indicia),
            ]
            .into_iter()
            .collect()
        };
        Report {
            label: "closed".into(),
            seconds: 2.0,
            tally,
            expected_errors: Vec::new(),
            request_kind: "sign",
            before: stats(10, 1_000),
            after: stats(20, 1_400),
            appliance_cpu: Some(Duration::from_millis(20)),
            raw_sign_us: 25.0,
            raw_sign_before_after_us: (24.0, 26.0),
        }
    }

    #[test]
    fn the_report_derives_rates_and_ratios_from_deltas() {
        let report = report();
        assert_eq!(report.indicia_per_s(), 200.0);
        assert_eq!(report.session_size_mean(), 40.0);
        assert_eq!(report.cpu_per_indicium_us(), Some(50.0));
        let json = report.to_json();
        assert_eq!(json["appliance"]["sessions"], 10);
        assert_eq!(json["cpu_per_indicium_vs_raw_sign"], 2.0);
        // HDR histograms report the top of the value's bucket (3 significant digits).
        let max = json["latency_us"]["max"].as_u64().unwrap_or_default();
        assert!((4_000..=4_004).contains(&max), "{max}");
        let table = report.to_table();
        assert!(table.contains("200 indicia/s"), "{table}");
        assert!(table.contains("40.0 indicia/session"), "{table}");
        assert!(table.contains("2.00x the raw signature"), "{table}");
        assert!(table.contains("errors by code: none"), "{table}");
        assert!(table.contains("this run is valid"), "{table}");
        assert!(!table.contains("INVALID"), "{table}");
        assert_eq!(json["validity"], "valid");
        assert_eq!(json["invalid_reasons"], json!({}));
        let row = report.to_row();
        assert!(row.ends_with("       0  valid"), "{row}");
        assert!(row.contains("50.0 us    2.00x"), "{row}");
    }

    #[test]
    fn an_invalid_report_says_so_with_its_reasons_and_counts_only_successes() {
        let mut report = report();
        for _ in 0..7 {
            report.tally.error(ErrorCode::InsufficientFunds);
        }
        report.tally.requests += 7;
        // Refusals change neither the throughput nor the CPU per indicium.
        assert_eq!(report.indicia_per_s(), 200.0);
        assert_eq!(report.cpu_per_indicium_us(), Some(50.0));
        let json = report.to_json();
        assert_eq!(json["validity"], "invalid");
        assert_eq!(json["invalid_reasons"]["insufficient-funds"], 7);
        assert_eq!(json["errors"]["insufficient-funds"], 7);
        assert_eq!(json["latency_us"]["count"], 4);
        let table = report.to_table();
        assert!(
            table.starts_with("*** closed: INVALID: insufficient-funds 7"),
            "{table}"
        );
        assert!(table.contains("11 requests (4 successful)"), "{table}");
        assert!(
            table.contains("errors by code: insufficient-funds 7"),
            "{table}"
        );
        // Declared as expected, the same errors leave the run valid, and still reported.
        report.expected_errors = vec![ErrorCode::InsufficientFunds];
        let table = report.to_table();
        assert!(table.contains("this run is valid"), "{table}");
        assert!(table.contains("(expected: insufficient-funds)"), "{table}");
    }

    #[test]
    fn appliance_side_latency_is_read_by_name_and_absent_figures_are_na() {
        let entry = |name: &str, value: u64| StatEntry {
            name: name.to_owned(),
            value,
        };
        let mut report = report();
        report.after = stats_from(vec![
            entry("sessions", 20),
            entry("indicia", 1_400),
            entry("request_latency_us.sign.count", 4),
            entry("request_latency_us.sign.mean", 850),
            entry("request_latency_us.sign.p50", 700),
            entry("request_latency_us.sign.p90", 1_200),
            entry("request_latency_us.sign.p99", 2_500),
            entry("request_latency_us.sign.p999", 2_600),
            entry("request_latency_us.sign.max", 2_610),
            // Another kind, with nothing yet: a count and no percentiles.
            entry("request_latency_us.sign_batch.count", 0),
        ]);
        let table = report.to_table();
        assert!(
            table.contains(
                "  latency ms, appliance-side `sign` (frame in to answer out, since it started): \
                 p50 0.70  p90 1.20  p99 2.50  p99.9 2.60  max 2.61  (mean 0.85, 4 requests)\n"
            ),
            "{table}"
        );
        let row = report.to_row();
        assert!(row.contains("      0.70      2.50"), "{row}");
        let json = report.to_json();
        let appliance = &json["appliance"]["request_latency_us_since_start"];
        assert_eq!(appliance["kind"], "sign");
        assert_eq!(appliance["count"], 4);
        assert_eq!(appliance["p99"], 2_500);

        report.request_kind = "sign_batch";
        let table = report.to_table();
        assert!(
            table.contains(
                "appliance-side `sign_batch` (frame in to answer out, since it started): \
                 p50 n/a  p90 n/a  p99 n/a  p99.9 n/a  max n/a  (mean n/a, 0 requests)"
            ),
            "{table}"
        );
        assert_eq!(
            report.appliance_latency().p50_p99_ms(),
            ("n/a".to_owned(), "n/a".to_owned())
        );

        // An appliance without these statistics.
        report.after = stats_from(vec![entry("sessions", 20), entry("indicia", 1_400)]);
        report.request_kind = "sign";
        let table = report.to_table();
        assert!(
            table.contains("appliance-side `sign` (frame in to answer out, since it started): n/a"),
            "{table}"
        );
        let row = report.to_row();
        assert!(row.contains("       n/a       n/a"), "{row}");
        let json = report.to_json();
        assert_eq!(
            json["appliance"]["request_latency_us_since_start"]["p50"],
            Value::Null
        );
    }

    #[test]
    fn the_cpu_of_this_process_can_be_read() {
        let pid = std::process::id();
        let before = process_cpu(pid).unwrap();
        let thread_before = thread_cpu();
        let mut x = 0u64;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(process_cpu(pid).unwrap() >= before);
        assert!(thread_cpu() > thread_before);
        assert!(process_cpu(u32::MAX).is_none());
    }
}
