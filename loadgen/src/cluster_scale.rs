//! `indicia-loadgen cluster-scale` (feature `cluster`): what step 3 of the cluster costs and
//! gives, in one run, against 3 etcd members and 3 appliances (one shard each) in a
//! temporary directory:
//!
//! 1. **Forwarding**: the same closed-loop load sent to a1 for vPSDs a1 owns (direct) and
//!    for vPSDs a2 owns (every request forwarded a1 -> a2), alternately: the appliances'
//!    CPU per indicium (all three together) and the clients' latency.
//! 2. **Scaling**: 1, 2, then 3 appliances loaded at once, each with its own vPSDs, sent
//!    straight to their owner: indicia/s in all and per appliance, the appliances' CPU per
//!    indicium and etcd's.
//! 3. **A planned move under load**: one vPSD signed in a tight loop through a1 while it is
//!    moved from a1 to a2: the time from the command to the handover and to the first
//!    indicium signed by a2, and the latency the client saw meanwhile.
//!
//! vPSDs are placed by pins (`[cluster] rebalance = false`), so that each load knows its
//! owner. A load with any error the experiment did not provoke is marked INVALID.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use indicia_client::{Client, Credential};
use indicia_proto::{Algorithm, PinSubject, Request, Response};
use indiciad::cluster::local::LocalEtcd;
use serde_json::{json, Value};

use crate::appliance::Appliance;
use crate::report::{self, Report};
use crate::run::{ClientKind, LoadError, Mode, RunConfig};
use crate::tally::Validity;
use crate::workload::{Distribution, VpsdPicker};

/// The first vPSD of appliance `n`'s range (n = 1, 2, 3).
fn first_vpsd(n: u64) -> u64 {
    8_000_000 + n * 1_000 + 1
}

/// What the experiment found: its text, whether every load was valid, and its JSON.
#[derive(Debug)]
pub struct ScaleOutcome {
    pub text: String,
    pub invalid: Vec<String>,
    pub json: Value,
}

struct Cluster {
    etcd: LocalEtcd,
    appliances: Vec<Appliance>,
    credential: Credential,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn cpu(&self) -> Option<Duration> {
        self.appliances
            .iter()
            .map(|appliance| report::process_cpu(appliance.pid()))
            .sum()
    }

    fn etcd_cpu(&self) -> Option<Duration> {
        self.etcd.pids().into_iter().map(report::process_cpu).sum()
    }

    fn stop(self) -> Result<(), LoadError> {
        for appliance in self.appliances {
            appliance.stop()?;
        }
        Ok(())
    }
}

fn start(vpsds: u64) -> Result<Cluster, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let etcd = LocalEtcd::start(&dir.path().join("etcd"), 3, Duration::from_secs(60))?;
    let exe = std::env::current_exe()?;
    let mut appliances: Vec<Appliance> = Vec::new();
    for n in 1..=3u64 {
        let id = format!("a{n}");
        let listen: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let config = dir.path().join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"{listen}\"\nshards = 1\n\n[cluster]\netcd = {:?}\n\
                 appliance = \"{id}\"\nadvertise = \"{listen}\"\nrebalance = false\n",
                etcd.endpoints()
            ),
        )?;
        let data = dir.path().join(&id);
        if let Some(seed) = appliances.first() {
            crate::cluster_demo::seed_member(&seed.data_dir, &data)?;
        }
        appliances.push(Appliance::spawn_on(
            &exe,
            &data,
            Some(&config),
            &listen.to_string(),
        )?);
    }
    let credential = appliances[0].admin_credential()?;
    let mut admin = Client::connect(appliances[0].addr, &credential)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin.placement(&[])?.appliances.len() < 3 {
        if Instant::now() > deadline {
            return Err("the three appliances did not all join within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for n in 1..=3u64 {
        let ids = first_vpsd(n)..first_vpsd(n) + vpsds;
        for vpsd in ids.clone() {
            admin.cluster_pin(PinSubject::Vpsd(vpsd), Some(&format!("a{n}")))?;
        }
        // Provisioned through a1: placement (the pins) puts each on its appliance.
        crate::prepare_vpsds(
            &mut admin,
            ids,
            Algorithm::EcdsaP256,
            0,
            &appliances[0].provider_key(),
        )?;
    }
    Ok(Cluster {
        etcd,
        appliances,
        credential,
        _dir: dir,
    })
}

/// A closed-loop load on `entry` for appliance `owner`'s vPSDs.
fn config(
    cluster: &Cluster,
    entry: usize,
    owner: u64,
    vpsds: u64,
    in_flight: usize,
    duration: f64,
) -> RunConfig {
    let connections = in_flight.clamp(1, 4);
    RunConfig {
        addr: cluster.appliances[entry].addr,
        credential: cluster.credential.clone(),
        tls: None,
        connections,
        mode: Mode::Closed {
            window: in_flight.div_ceil(connections),
        },
        duration: Duration::from_secs_f64(duration),
        picker: VpsdPicker::new(first_vpsd(owner), vpsds, Distribution::Uniform),
        batch: 1,
        frames_per_write: 16,
        postage_mills: 730,
        verify_every: 100,
        seed: owner,
        expected_errors: Vec::new(),
        client: ClientKind::Raw,
    }
}

/// Loads run at once: their reports, the seconds they took, and the appliances' and etcd's
/// CPU time over the whole.
type Together = (Vec<Report>, f64, Option<Duration>, Option<Duration>);

/// Runs loads at once (one thread each).
fn measure_together(
    cluster: &Cluster,
    loads: Vec<(String, RunConfig)>,
) -> Result<Together, Box<dyn std::error::Error>> {
    let mut admin = Client::connect(cluster.appliances[0].addr, &cluster.credential)?;
    for (_, config) in &loads {
        crate::fund(
            &mut admin,
            config,
            Algorithm::EcdsaP256,
            &cluster.appliances[0].provider_key(),
        )?;
    }
    let cpu_before = cluster.cpu();
    let etcd_before = cluster.etcd_cpu();
    let started = Instant::now();
    let threads: Vec<_> = loads
        .into_iter()
        .map(|(label, config)| {
            let credential = cluster.credential.clone();
            std::thread::spawn(move || {
                crate::measure(&label, &config, &credential, Algorithm::EcdsaP256, None)
            })
        })
        .collect();
    let mut reports = Vec::new();
    for thread in threads {
        reports.push(thread.join().map_err(|_| LoadError::Thread)??);
    }
    let seconds = started.elapsed().as_secs_f64();
    let used = |before: Option<Duration>, after: Option<Duration>| {
        before
            .zip(after)
            .map(|(before, after)| after.saturating_sub(before))
    };
    Ok((
        reports,
        seconds,
        used(cpu_before, cluster.cpu()),
        used(etcd_before, cluster.etcd_cpu()),
    ))
}

fn per_indicium_us(cpu: Option<Duration>, indicia: u64) -> Option<f64> {
    cpu.filter(|_| indicia > 0)
        .map(|cpu| cpu.as_secs_f64() * 1e6 / indicia as f64)
}

fn us(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".into(), |value| format!("{value:.0}"))
}

fn check(report: &Report, invalid: &mut Vec<String>) -> &'static str {
    match report.validity() {
        Validity::Valid => "",
        Validity::Invalid(reasons) => {
            invalid.push(format!("INVALID {}: {reasons:?}", report.label));
            " INVALID"
        }
    }
}

/// The move of one vPSD under a client signing it in a tight loop through a1.
fn move_under_load(
    cluster: &Cluster,
    text: &mut String,
) -> Result<Value, Box<dyn std::error::Error>> {
    let vpsd = first_vpsd(1);
    let mut admin = Client::connect(cluster.appliances[0].addr, &cluster.credential)?;
    let probe_config = config(cluster, 0, 1, 1, 1, 6.0);
    crate::fund(
        &mut admin,
        &probe_config,
        Algorithm::EcdsaP256,
        &cluster.appliances[0].provider_key(),
    )?;
    let addr = cluster.appliances[0].addr;
    let credential = cluster.credential.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe_stop = std::sync::Arc::clone(&stop);
    // (sent, answered, signed) of every request.
    let probe = std::thread::spawn(
        move || -> Result<Vec<(Instant, Instant, bool)>, LoadError> {
            let mut client = Client::connect(addr, &credential)?;
            let mut seen = Vec::new();
            while !probe_stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sent = Instant::now();
                let answer = client.call(&Request::Sign {
                    vpsd_id: vpsd,
                    item: crate::cluster_demo::item(),
                })?;
                seen.push((
                    sent,
                    Instant::now(),
                    matches!(answer, Response::Signed { .. }),
                ));
            }
            Ok(seen)
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let ordered = Instant::now();
    admin.cluster_move(vpsd, "a2")?;
    let handed_over = ordered.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = probe.join().map_err(|_| LoadError::Thread)??;
    let failed = seen.iter().filter(|(_, _, signed)| !signed).count();
    // The first indicium whose request was sent after the handover: signed by a2.
    let first_at_a2 = seen
        .iter()
        .find(|(sent, _, signed)| *signed && *sent >= ordered + handed_over)
        .map(|(_, answered, _)| answered.saturating_duration_since(ordered));
    let before: Vec<f64> = seen
        .iter()
        .filter(|(sent, _, _)| *sent < ordered)
        .map(|(sent, answered, _)| answered.saturating_duration_since(*sent).as_secs_f64() * 1e3)
        .collect();
    let during = seen
        .iter()
        .filter(|(sent, answered, _)| *answered >= ordered && *sent <= ordered + handed_over)
        .map(|(sent, answered, _)| answered.saturating_duration_since(*sent).as_secs_f64() * 1e3)
        .fold(0.0f64, f64::max);
    let mut sorted = before.clone();
    sorted.sort_by(f64::total_cmp);
    let p50_before = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let after: Vec<f64> = seen
        .iter()
        .filter(|(sent, _, _)| *sent > ordered + handed_over)
        .map(|(sent, answered, _)| answered.saturating_duration_since(*sent).as_secs_f64() * 1e3)
        .collect();
    let mut sorted_after = after.clone();
    sorted_after.sort_by(f64::total_cmp);
    let p50_after = sorted_after
        .get(sorted_after.len() / 2)
        .copied()
        .unwrap_or(0.0);
    text.push_str(&format!(
        "\nplanned move of vPSD {vpsd} a1 -> a2 under a client signing it through a1:\n  \
         handed over {:.1} ms after the command; first indicium signed by a2 {} after it\n  \
         client latency: p50 {p50_before:.2} ms before (a1 signs), worst {during:.2} ms for a \
         request across the move, p50 {p50_after:.2} ms after (a1 forwards to a2); {} \
         requests, {failed} not signed\n",
        handed_over.as_secs_f64() * 1e3,
        first_at_a2.map_or_else(
            || "NEVER".into(),
            |at| format!("{:.1} ms", at.as_secs_f64() * 1e3)
        ),
        seen.len()
    ));
    Ok(json!({
        "vpsd": vpsd,
        "handed_over_ms": handed_over.as_secs_f64() * 1e3,
        "first_signature_at_new_owner_ms": first_at_a2.map(|at| at.as_secs_f64() * 1e3),
        "latency_p50_before_ms": p50_before,
        "latency_worst_across_move_ms": during,
        "latency_p50_after_ms": p50_after,
        "requests": seen.len(),
        "not_signed": failed,
    }))
}

/// Runs the experiment: `rounds` of the forwarding comparison, one scaling series, one
/// move.
pub fn cluster_scale(
    duration: f64,
    in_flight: usize,
    rounds: usize,
    vpsds: u64,
) -> Result<ScaleOutcome, Box<dyn std::error::Error>> {
    let cluster = start(vpsds)?;
    let mut text = format!(
        "3 etcd members, 3 appliances (1 shard each), {vpsds} ECDSA P-256 vPSDs pinned to each; \
         {in_flight} requests in flight per load, single-indicium signs, {duration} s per load\n\n\
         forwarding: the same load sent to a1, for a1's vPSDs (direct) and a2's (forwarded)\n\
         {:>5} {:>10} {:>12} {:>9} {:>9} {:>16} {:>14}\n",
        "round", "path", "indicia/s", "p50 ms", "p99 ms", "appliances us/ind", "etcd us/ind"
    );
    let mut invalid = Vec::new();
    let mut forwarding = Vec::new();
    for round in 1..=rounds {
        for (path, owner) in [("direct", 1u64), ("forwarded", 2u64)] {
            let label = format!("{path}, round {round}");
            let load = config(&cluster, 0, owner, vpsds, in_flight, duration);
            let (reports, seconds, cpu, etcd) = measure_together(&cluster, vec![(label, load)])?;
            let report = &reports[0];
            let indicia = report.tally.indicia;
            let ms =
                |quantile: f64| report.tally.latency_us.value_at_quantile(quantile) as f64 / 1000.0;
            let (p50, p99) = (format!("{:.2}", ms(0.5)), format!("{:.2}", ms(0.99)));
            let mark = check(report, &mut invalid);
            text.push_str(&format!(
                "{round:>5} {path:>10} {:>12.0} {p50:>9} {p99:>9} {:>16} {:>14}{mark}\n",
                indicia as f64 / seconds,
                us(per_indicium_us(cpu, indicia)),
                us(per_indicium_us(etcd, indicia)),
            ));
            forwarding.push(json!({
                "round": round,
                "path": path,
                "indicia": indicia,
                "seconds": seconds,
                "appliances_cpu_us_per_indicium": per_indicium_us(cpu, indicia),
                "etcd_cpu_us_per_indicium": per_indicium_us(etcd, indicia),
                "load": report.to_json(),
                "valid": mark.is_empty(),
            }));
        }
    }

    text.push_str(&format!(
        "\nscaling: 1, 2, 3 appliances loaded at once, each for its own vPSDs, sent straight \
         to it\n{:>10} {:>12} {:>16} {:>16} {:>14}\n",
        "appliances", "indicia/s", "per appliance", "appliances us/ind", "etcd us/ind"
    ));
    let mut scaling = Vec::new();
    for serving in 1..=3usize {
        let loads = (1..=serving as u64)
            .map(|n| {
                let label = format!("a{n} of {serving}");
                (
                    label,
                    config(&cluster, (n - 1) as usize, n, vpsds, in_flight, duration),
                )
            })
            .collect();
        let (reports, seconds, cpu, etcd) = measure_together(&cluster, loads)?;
        let indicia: u64 = reports.iter().map(|report| report.tally.indicia).sum();
        let marks: String = reports
            .iter()
            .map(|report| check(report, &mut invalid))
            .collect();
        let rate = indicia as f64 / seconds;
        text.push_str(&format!(
            "{serving:>10} {rate:>12.0} {:>16.0} {:>16} {:>14}{}\n",
            rate / serving as f64,
            us(per_indicium_us(cpu, indicia)),
            us(per_indicium_us(etcd, indicia)),
            if marks.is_empty() { "" } else { " INVALID" }
        ));
        scaling.push(json!({
            "appliances": serving,
            "indicia": indicia,
            "seconds": seconds,
            "indicia_per_s": rate,
            "appliances_cpu_us_per_indicium": per_indicium_us(cpu, indicia),
            "etcd_cpu_us_per_indicium": per_indicium_us(etcd, indicia),
            "valid": marks.is_empty(),
        }));
    }
    let moved = move_under_load(&cluster, &mut text)?;
    cluster.stop()?;
    Ok(ScaleOutcome {
        text,
        invalid,
        json: json!({
            "forwarding": forwarding,
            "scaling": scaling,
            "move": moved,
            "cores": std::thread::available_parallelism().map_or(0, usize::from),
        }),
    })
}
