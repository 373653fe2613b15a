//! Splits one durable session commit into its parts: journal append (encode, MAC, write
//! through the map) and flush (fdatasync), for sessions of 1 and 64 indicia, on the disk
//! under the system temp dir. `cargo run --release -p indicia-benches --example commit_probe`

use std::time::Instant;

use indicia_benches::{funded_store, synthetic_session, NOW};
use indiciad::engine::Record;

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() - 1) as f64 * p) as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>12}",
        "indicia", "commit p50", "flush p50", "flush p99", "total p50"
    );
    for size in [1usize, 64, 256] {
        let dir = tempfile::tempdir()?;
        let mut store = funded_store(dir.path(), 1 << 30)?;
        let mut next_request_id = 1_000;
        let (mut commit, mut flush, mut total) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..600 {
            let record =
                Record::Session(synthetic_session(&store.engine, size, &mut next_request_id));
            let start = Instant::now();
            store.commit(record, NOW)?;
            let committed = Instant::now();
            store.flush()?;
            let flushed = Instant::now();
            commit.push((committed - start).as_secs_f64() * 1e6);
            flush.push((flushed - committed).as_secs_f64() * 1e6);
            total.push((flushed - start).as_secs_f64() * 1e6);
        }
        println!(
            "{size:<10} {:>10.0}us {:>10.0}us {:>10.0}us {:>10.0}us",
            percentile(&mut commit, 0.5),
            percentile(&mut flush, 0.5),
            percentile(&mut flush, 0.99),
            percentile(&mut total, 0.5)
        );
    }
    Ok(())
}
