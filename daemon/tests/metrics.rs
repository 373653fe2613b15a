//! The Prometheus endpoint (docs/OPERATIONS.md 7.1) with real tools: the appliance's
//! exposition against its own `stats`, `promtool check metrics` on it, a real `prometheus`
//! server scraping it and answering a query for the indicia counter while it evaluates the
//! shipped alerting rules, and the shipped rules and dashboard checked (`promtool check
//! rules`, `promtool test rules`) and naming only metrics the appliance exports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use indicia_client::ClientError;
use indicia_proto::Algorithm;
use support::{item, Daemon, Reaped};

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// One HTTP/1.0 exchange (so that no server answers chunked): status code and body.
fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    (status, body.to_owned())
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, &format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n"))
}

/// The sample lines of an exposition: series (name and labels) -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

/// The sum of every sample of metric `name` whose labels contain all of `labels`.
fn sum(samples: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let metric = series.split('{').next().unwrap();
            metric == name && labels.iter().all(|label| series.contains(label))
        })
        .map(|(_, value)| value)
        .sum()
}

fn promtool(args: &[&str], stdin: Option<&str>, dir: &Path) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) runs");
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    drop(input);
    let output = child.wait_with_output().unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_endpoint_serves_the_stats_in_prometheus_format_and_a_real_prometheus_scrapes_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::write_config(dir.path(), "[metrics]\nlisten = \"127.0.0.1:0\"\n", &[]);
    let daemon = Daemon::start(dir.path(), Some(&config));
    let log = daemon.log_text();
    let endpoint: SocketAddr = log
        .split("Prometheus endpoint on http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no metrics endpoint in the log:\n{log}"));

    // Some work: 25 indicia on two vPSDs, and errors of a known code.
    daemon.provision_funded(1, Algorithm::EcdsaP256, 10_000);
    daemon.provision_funded(2, Algorithm::Ed25519, 10_000);
    let mut admin = daemon.admin();
    for n in 0..25 {
        admin.sign(1 + n % 2, item(10)).unwrap();
    }
    for _ in 0..3 {
        let err = admin.sign(404, item(10)).unwrap_err();
        assert!(matches!(err, ClientError::Refused(_)), "{err}");
    }

    let (status, text) = get(endpoint, "/metrics");
    assert_eq!(status, 200, "{text}");
    let (clean, lint) = promtool(&["check", "metrics"], Some(&text), dir.path());
    assert!(clean, "promtool check metrics:\n{lint}\n{text}");
    let samples = samples(&text);
    let stats: BTreeMap<String, u64> = admin
        .stats()
        .unwrap()
        .into_iter()
        .map(|entry| (entry.name, entry.value))
        .collect();
    // The same counts as `stats`, summed over the shards.
    for (stat, metric, labels) in [
        ("indicia", "indicia_indicia_signed_total", vec![]),
        ("sessions", "indicia_sessions_total", vec![]),
        ("busy", "indicia_busy_total", vec![]),
        ("session_size.count", "indicia_session_size_count", vec![]),
        (
            "commit_latency_us.count",
            "indicia_commit_latency_seconds_count",
            vec![],
        ),
        (
            "request_latency_us.sign.count",
            "indicia_request_latency_seconds_count",
            vec!["kind=\"sign\""],
        ),
    ] {
        assert_eq!(
            sum(&samples, metric, &labels) as u64,
            stats[stat],
            "{metric} against stats {stat}"
        );
    }
    assert_eq!(stats["indicia"], 25);
    let mut error_codes = 0;
    for (name, value) in &stats {
        if let Some(code) = name.strip_prefix("errors.") {
            error_codes += 1;
            let label = format!("code=\"{code}\"");
            assert_eq!(
                sum(&samples, "indicia_errors_total", &[&label]) as u64,
                *value,
                "{name}"
            );
        }
    }
    assert!(error_codes > 0, "the refused signs show: {stats:?}");
    // A histogram as Prometheus reads it: cumulative buckets, +Inf equal to the count.
    let inf = sum(
        &samples,
        "indicia_request_latency_seconds_bucket",
        &["kind=\"sign\"", "le=\"+Inf\""],
    );
    assert_eq!(inf as u64, stats["request_latency_us.sign.count"]);
    assert!(
        sum(
            &samples,
            "indicia_request_latency_seconds_sum",
            &["kind=\"sign\""]
        ) > 0.0
    );
    assert!(
        !text.contains("indicia_cluster_"),
        "a single appliance has no cluster metrics"
    );
    assert_eq!(samples["indicia_shards"], 2.0);

    // Anything but GET /metrics is refused, and the endpoint keeps serving.
    assert_eq!(get(endpoint, "/").0, 404);
    assert_eq!(http(endpoint, "POST /metrics HTTP/1.0\r\n\r\n").0, 405);
    assert_eq!(http(endpoint, "nonsense\r\n\r\n").0, 400);
    assert_eq!(get(endpoint, "/metrics").0, 200);

    // A real Prometheus server scrapes it (every 500 ms) and evaluates the shipped rules.
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let prometheus_yml = dir.path().join("prometheus.yml");
    std::fs::write(
        &prometheus_yml,
        format!(
            "global:\n  scrape_interval: 500ms\n  evaluation_interval: 500ms\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: indicia\n    static_configs:\n      - targets: ['{endpoint}']\n",
            deploy("prometheus/indicia-rules.yml").display()
        ),
    )
    .unwrap();
    let server = Command::new("prometheus")
        .arg(format!("--config.file={}", prometheus_yml.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package prometheus) runs");
    let _server = Reaped(server);
    let deadline = Instant::now() + Duration::from_secs(90);
    let query = "/api/v1/query?query=sum(indicia_indicia_signed_total)";
    let answered = loop {
        assert!(
            Instant::now() < deadline,
            "prometheus did not answer 25 for {query}"
        );
        std::thread::sleep(Duration::from_millis(250));
        if TcpStream::connect(web).is_err() {
            continue;
        }
        let (status, body) = get(web, query);
        if status != 200 {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        if let Some(sample) = value["data"]["result"][0]["value"][1].as_str() {
            if sample == "25" {
                break value;
            }
        }
    };
    assert_eq!(answered["status"], "success");
    // The rules loaded and evaluate without errors, and none fires on a healthy appliance.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = get(web, "/api/v1/rules");
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rules = value["data"]["groups"][0]["rules"].as_array().cloned();
        let evaluated = rules.as_ref().is_some_and(|rules| {
            rules.len() == 6
                && rules.iter().all(|rule| {
                    rule["health"] == "ok" && rule["lastEvaluation"] != "0001-01-01T00:00:00Z"
                })
        });
        if evaluated {
            let firing: Vec<_> = rules
                .unwrap()
                .iter()
                .filter(|rule| rule["state"] != "inactive")
                .map(|rule| rule["name"].clone())
                .collect();
            assert!(
                firing.is_empty(),
                "alerts on a healthy appliance: {firing:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rules did not evaluate: {body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_shipped_rules_and_dashboard_check_and_name_only_exported_metrics() {
    let rules_dir = deploy("prometheus");
    let (ok, out) = promtool(&["check", "rules", "indicia-rules.yml"], None, &rules_dir);
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = promtool(
        &["test", "rules", "indicia-rules.test.yml"],
        None,
        &rules_dir,
    );
    assert!(ok, "promtool test rules:\n{out}");
    let (ok, out) = promtool(&["check", "config", "prometheus.yml"], None, &rules_dir);
    // The example names /etc/prometheus/indicia-rules.yml, absent here: only its syntax.
    assert!(
        ok || out.contains("indicia-rules.yml"),
        "promtool check config:\n{out}"
    );

    // Every series name the appliance can export, in cluster mode (a superset).
    let metrics = indiciad::server::metrics::Metrics::new(2);
    let text = indiciad::server::exporter::exposition(&metrics, true);
    let mut exported = BTreeSet::from(["up".to_owned()]);
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                exported.insert(format!("{name}{suffix}"));
            }
        } else {
            exported.insert(name.to_owned());
        }
    }
    let named = |text: &str| -> BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("indicia_"))
            .map(str::to_owned)
            .collect()
    };
    let rules = std::fs::read_to_string(rules_dir.join("indicia-rules.yml")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/indicia-dashboard.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap().clone())
        .map(|target| target["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut used = named(&rules);
    assert!(used.len() >= 6, "{used:?}");
    for expr in &exprs {
        used.extend(named(expr));
    }
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(unknown.is_empty(), "not exported: {unknown:?}\n{text}");
    // And the rules cover what an operator must hear of.
    for metric in [
        "indicia_commit_latency_seconds_bucket",
        "indicia_busy_total",
        "indicia_cluster_fenced_total",
        "indicia_cluster_committing",
        "indicia_integrity_locks_total",
    ] {
        assert!(rules.contains(metric), "no rule on {metric}");
    }
}
