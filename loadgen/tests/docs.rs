//! docs/BENCHMARKS.md's "How to read the load generator's reports" and the README agree
//! with what the load generator prints: its columns, its JSON fields, its funding bound
//! and the exit status of an invalid run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use indicia_loadgen::funding::VPSD_INDICIA_PER_S_MAX;
use indicia_loadgen::report::{self, Report, Stats};
use indicia_loadgen::run::Tally;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The "How to read" section, up to the next section.
fn how_to_read() -> String {
    let text = read("docs/BENCHMARKS.md");
    let start = text
        .find("## How to read the load generator's reports")
        .unwrap();
    let rest = &text[start + 3..];
    let end = rest.find("\n## ").map_or(rest.len(), |end| end + 3);
    text[start..start + end].to_owned()
}

/// Thousands separated by spaces, as the docs write them.
fn spaced(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(' ');
        }
        out.push(digit);
    }
    out
}

#[test]
fn every_column_of_the_tables_is_described() {
    let doc = how_to_read();
    let header = report::row_header("");
    for column in [
        "client-side",
        "appliance-side",
        "indicia/s",
        "per sess",
        "p50 ms",
        "p99 ms",
        "CPU/indicium",
        "vs raw",
        "errors",
        "point",
    ] {
        assert!(
            header.contains(column),
            "{column} is not a column: {header}"
        );
        // A row of the docs' column table names it, in backticks (or, for the two
        // groups of latency columns, as the row's first word).
        assert!(
            doc.lines().any(|line| line.starts_with("| ")
                && (line.contains(&format!("`{column}`"))
                    || line.starts_with(&format!("| {column} ")))),
            "the docs' column table does not describe {column}"
        );
    }
}

#[test]
fn every_json_field_of_a_load_is_described() {
    let doc = how_to_read();
    let report = Report {
        label: "docs".into(),
        seconds: 1.0,
        tally: Tally::default(),
        expected_errors: Vec::new(),
        request_kind: "sign",
        before: Stats::new(),
        after: Stats::new(),
        appliance_cpu: Some(Duration::from_millis(1)),
        raw_sign_us: 20.0,
        raw_sign_before_after_us: (20.0, 20.0),
    };
    let json = report.to_json();
    for field in [
        "validity",
        "invalid_reasons",
        "errors",
        "expected_errors",
        "transport_failures",
        "unanswered",
        "requests",
        "requests_ok",
        "indicia",
        "latency_us",
    ] {
        assert!(json.get(field).is_some(), "no {field} in {json}");
        assert!(doc.contains(&format!("`{field}`")), "{field} undescribed");
    }
    let appliance = &json["appliance"]["request_latency_us_since_start"];
    for figure in ["kind", "count", "mean", "p50", "p90", "p99", "p999", "max"] {
        assert!(
            appliance.get(figure).is_some(),
            "no {figure} in {appliance}"
        );
        assert!(doc.contains(&format!("`{figure}`")), "{figure} undescribed");
    }
    assert!(doc.contains("`request_latency_us_since_start`"));
    assert!(doc.contains("`request_latency_us.<kind>.p50`"));
}

#[test]
fn the_funding_bound_and_the_exit_status_are_as_documented() {
    let doc = how_to_read();
    assert!(
        doc.contains(&format!(
            "{} indicia per second of one vPSD",
            spaced(VPSD_INDICIA_PER_S_MAX)
        )),
        "the funding bound"
    );
    assert!(doc.contains("2 when any load is invalid"));
    assert!(read("README.md").contains("exits with status 2"));
}
