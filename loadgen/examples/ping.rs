//! Sequential round trips with the plain client, one request in flight: the latency of a
//! `status` (no journal write) and of a `sign` (a session and a durable commit each).
//! `cargo run --release -p indicia-loadgen --example ping -- ADDR CREDENTIAL VPSD N`
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use indicia_client::{Client, Credential};
use indicia_proto::{MailingDate, Request, SignItem};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let credential = Credential::load(std::path::Path::new(&args[2])).unwrap();
    let vpsd_id: u64 = args[3].parse().unwrap();
    let n: usize = args[4].parse().unwrap();
    let mut client = Client::connect(args[1].as_str(), &credential).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let item = SignItem {
        postage_mills: 1,
        mailing_date: MailingDate::from_unix_seconds(now).unwrap(),
        rate_category: 1,
        destination_zip: None,
        data_digest: None,
    };
    for (name, request) in [
        ("status", Request::Status { vpsd_id }),
        ("sign", Request::Sign { vpsd_id, item }),
    ] {
        let mut samples = Vec::new();
        for _ in 0..n {
            let started = Instant::now();
            client.call(&request).unwrap();
            samples.push(started.elapsed().as_micros());
        }
        samples.sort_unstable();
        println!(
            "{name}: p50 {} us, p90 {} us, max {} us",
            samples[n / 2],
            samples[n * 9 / 10],
            samples[n - 1]
        );
    }
}
