//! The Prometheus endpoint (`[metrics] listen`): what `stats` reports, in the Prometheus text
//! exposition format (version 0.0.4, encoded by `prometheus-client`), served over HTTP at
//! `/metrics` by a thread of its own, away from the shards. docs/OPERATIONS.md 7.1 lists
//! every metric.
//!
//! Every counter and gauge is per shard (label `shard`); errors are per shard and error code
//! (`code`, the name `stats` uses); the histograms (session size, commit latency, etcd's
//! answer in cluster mode, and request latency per kind, label `kind`) are Prometheus
//! histograms with fixed buckets and the exact sum, per shard.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicia_proto::ErrorCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::metrics::{Metrics, Recorded, ShardHistograms, PROMETHEUS_COUNTERS};

/// The longest request head read (a scraper's GET is a few hundred bytes).
const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// How long one scraper may take to send its request head (in all), and each write of the
/// answer: the endpoint serves one connection at a time.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The exposition's collector: reads the shards' metrics at each scrape. The `cluster_*`
/// metrics are there only in cluster mode (a single appliance never commits through etcd,
/// and a gauge of 0 committing shards would read as a lost lease).
#[derive(Debug)]
struct Exposition {
    metrics: Arc<Metrics>,
    cluster: bool,
}

type Labels = Vec<(&'static str, String)>;

fn shard_label(shard: usize) -> Labels {
    vec![("shard", shard.to_string())]
}

/// A [`Recorded`] histogram as Prometheus buckets (non-cumulative; the encoder sums), its sum
/// divided by `per_unit` (1e6: microseconds to seconds; dividing keeps 50 us at 5e-05), and
/// its count.
fn buckets(recorded: &Recorded, per_unit: f64) -> (f64, u64, Vec<(f64, u64)>) {
    let buckets = recorded
        .bounds
        .iter()
        .zip(&recorded.buckets)
        .map(|(bound, count)| (*bound as f64 / per_unit, *count))
        .collect();
    (recorded.sum as f64 / per_unit, recorded.count(), buckets)
}

impl Exposition {
    fn histogram(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        per_unit: f64,
        series: &[(Labels, &Recorded)],
    ) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(name, help, unit, MetricType::Histogram)?;
        for (labels, recorded) in series {
            let (sum, count, buckets) = buckets(recorded, per_unit);
            metric
                .encode_family(labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let metrics = &self.metrics;
        let mut gauge = encoder.encode_descriptor(
            "uptime",
            "Seconds since the appliance started.",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        gauge.encode_gauge(&(metrics.uptime_s() as i64))?;
        let mut gauge = encoder.encode_descriptor(
            "shards",
            "Shards (executors) of the appliance.",
            None,
            MetricType::Gauge,
        )?;
        gauge.encode_gauge(&(metrics.shards.len() as i64))?;
        for (counter, name, is_gauge, help) in PROMETHEUS_COUNTERS {
            if !self.cluster && name.starts_with("cluster_") {
                continue;
            }
            let kind = if is_gauge {
                MetricType::Gauge
            } else {
                MetricType::Counter
            };
            let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
            for (index, shard) in metrics.shards.iter().enumerate() {
                let labels = shard_label(index);
                let mut family = metric.encode_family(&labels)?;
                let value = shard.get(counter);
                if is_gauge {
                    family.encode_gauge(&i64::try_from(value).unwrap_or(i64::MAX))?;
                } else {
                    family.encode_counter::<NoLabelSet, _, u64>(&value, None)?;
                }
            }
        }
        let histograms: Vec<ShardHistograms> = metrics
            .shards
            .iter()
            .map(|shard| shard.prometheus())
            .collect();
        let mut errors = encoder.encode_descriptor(
            "errors",
            "Error answers and failed batch items, by error code (connection errors included).",
            None,
            MetricType::Counter,
        )?;
        for (index, shard) in histograms.iter().enumerate() {
            for (code, count) in &shard.errors_by_code {
                let labels = vec![
                    ("shard", index.to_string()),
                    ("code", ErrorCode::from_wire(*code).name().to_string()),
                ];
                errors
                    .encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(count, None)?;
            }
        }
        let per_shard = |pick: fn(&ShardHistograms) -> &Recorded| -> Vec<(Labels, &Recorded)> {
            histograms
                .iter()
                .enumerate()
                .map(|(index, shard)| (shard_label(index), pick(shard)))
                .collect()
        };
        Self::histogram(
            &mut encoder,
            "session_size",
            "Indicia per signing session.",
            None,
            1.0,
            &per_shard(|shard| &shard.session_size),
        )?;
        Self::histogram(
            &mut encoder,
            "commit_latency",
            "Group commit of the journal, from its start to durable.",
            Some(&Unit::Seconds),
            1e6,
            &per_shard(|shard| &shard.commit_latency_us),
        )?;
        let replicated = per_shard(|shard| &shard.replica_latency_us);
        if self.cluster {
            Self::histogram(
                &mut encoder,
                "cluster_commit_latency",
                "Cluster mode: how long etcd took to answer a round's writes.",
                Some(&Unit::Seconds),
                1e6,
                &replicated,
            )?;
        }
        let requests: Vec<(Labels, &Recorded)> = histograms
            .iter()
            .enumerate()
            .flat_map(|(index, shard)| {
                shard
                    .request_latency_us
                    .iter()
                    .map(move |(kind, recorded)| {
                        (
                            vec![
                                ("shard", index.to_string()),
                                ("kind", kind.name().to_string()),
                            ],
                            recorded,
                        )
                    })
            })
            .collect();
        Self::histogram(
            &mut encoder,
            "request_latency",
            "From a request's frame read to its answer handed to the socket, by request kind.",
            Some(&Unit::Seconds),
            1e6,
            &requests,
        )?;
        Ok(())
    }
}

/// The exposition of `metrics` as the endpoint serves it (`cluster`: an appliance in
/// cluster mode, with the `cluster_*` metrics).
pub fn exposition(metrics: &Arc<Metrics>, cluster: bool) -> String {
    let mut registry = Registry::with_prefix("indicia");
    registry.register_collector(Box::new(Exposition {
        metrics: Arc::clone(metrics),
        cluster,
    }));
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
    text
}

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint on {addr}: {source}")]
pub struct ExporterError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// The running endpoint: where it listens, and its thread.
#[derive(Debug)]
pub struct Exporter {
    pub addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Exporter {
    /// Binds `listen` and serves `/metrics` on a thread of its own until dropped.
    pub fn start(
        listen: SocketAddr,
        metrics: Arc<Metrics>,
        cluster: bool,
    ) -> Result<Self, ExporterError> {
        let error = |source| ExporterError {
            addr: listen,
            source,
        };
        let listener = TcpListener::bind(listen).map_err(error)?;
        let addr = listener.local_addr().map_err(error)?;
        // Non-blocking accept, polled, so that the thread sees the stop flag.
        listener.set_nonblocking(true).map_err(error)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("indicia-metrics".into())
                .spawn(move || serve(&listener, &metrics, cluster, &stop))
                .map_err(error)?
        };
        Ok(Self {
            addr,
            thread: Some(thread),
            stop,
        })
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(listener: &TcpListener, metrics: &Arc<Metrics>, cluster: bool, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(err) = answer(stream, metrics, cluster) {
                    tracing::debug!("metrics endpoint: {peer}: {err}");
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(err) => {
                tracing::warn!("metrics endpoint: accept: {err}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Reads one HTTP request head and answers it, then closes the connection: `GET /metrics`
/// (or `HEAD`) gets the exposition; anything else a 404, 405 or 400.
fn answer(mut stream: TcpStream, metrics: &Arc<Metrics>, cluster: bool) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        // A client that trickles its request does not hold the endpoint past the limit.
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request head not complete in time",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        if head.len() > REQUEST_HEAD_BYTES_MAX {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"request head too large\n",
                true,
            );
        }
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..read]);
    }
    let line = head.split(|byte| *byte == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    if !matches!(version, Some(v) if v.starts_with("HTTP/1.")) || parts.next().is_some() {
        return respond(
            &mut stream,
            "400 Bad Request",
            "text/plain",
            b"not an HTTP/1 request\n",
            true,
        );
    }
    let path = target
        .unwrap_or_default()
        .split('?')
        .next()
        .unwrap_or_default();
    let with_body = method != Some("HEAD");
    match (method, path) {
        (Some("GET" | "HEAD"), "/metrics") => {
            let text = exposition(metrics, cluster);
            respond(
                &mut stream,
                "200 OK",
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                text.as_bytes(),
                with_body,
            )
        }
        (Some("GET" | "HEAD"), _) => respond(
            &mut stream,
            "404 Not Found",
            "text/plain",
            b"the metrics are at /metrics\n",
            with_body,
        ),
        _ => respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"GET /metrics\n",
            true,
        ),
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    with_body: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if with_body {
        stream.write_all(body)?;
    }
    stream.flush()
}
