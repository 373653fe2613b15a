//! Interleaved measurement of the engine's cost per indicium against the raw aws-lc-rs
//! signing cost: rounds alternate between 64 raw signatures and one session of 64, so
//! drift on a shared machine hits both alike. Prints medians and the ratio per session
//! size. `cargo run --release -p indicia-benches --example session_ratio`

use std::time::Instant;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use indicia_benches::{funded_engine, jobs, run_session};
use indicia_proto::Algorithm;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds = 200;
    let rng = SystemRandom::new();
    let ecdsa = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)?;
    let ed25519 = Ed25519KeyPair::generate()?;
    let message = [0x5au8; 125 - 64];
    println!("algorithm   session  raw us/sig  session us/indicium  ratio");
    for algorithm in [Algorithm::EcdsaP256, Algorithm::Ed25519] {
        for size in [1usize, 4, 16, 64, 256] {
            let mut engine = funded_engine(algorithm, size)?;
            let mut next_request_id = 1_000;
            let mut raw = Vec::with_capacity(rounds);
            let mut session = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let start = Instant::now();
                for _ in 0..size {
                    match algorithm {
                        Algorithm::EcdsaP256 => drop(ecdsa.sign(&rng, &message)?),
                        Algorithm::Ed25519 => drop(ed25519.sign(&message)),
                    }
                }
                raw.push(start.elapsed().as_secs_f64() * 1e6 / size as f64);
                let jobs = jobs(size, &mut next_request_id);
                let start = Instant::now();
                let signed = run_session(&mut engine, &jobs);
                session.push(start.elapsed().as_secs_f64() * 1e6 / size as f64);
                assert_eq!(signed, size);
            }
            let (raw, session) = (median(raw), median(session));
            println!(
                "{:<11} {size:>7}  {raw:>10.2}  {session:>19.2}  {:>5.3}",
                algorithm.name(),
                session / raw
            );
        }
    }
    Ok(())
}
