//! Measures what one durable append costs on this disk, per way of making it durable:
//! fdatasync or msync after writing through a shared map, into a file preallocated with
//! fallocate (unwritten extents) or with zeros (written extents). Prints medians and p99.
//! Then how the cost of one small durable append grows with how much of the segment has
//! already been written through the map, and the same with pwrite for comparison.
//! `cargo run --release -p indicia-benches --example flush_probe [DIR]`

use std::fs::OpenOptions;
use std::io::Write;
use std::time::Instant;

#[allow(unsafe_code)]
fn map(file: &std::fs::File) -> std::io::Result<memmap2::MmapMut> {
    // SAFETY: a private temporary file nobody else opens or truncates.
    unsafe { memmap2::MmapMut::map_mut(file) }
}

/// A new, empty file for one measurement.
fn new_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() - 1) as f64 * p) as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = match std::env::args().nth(1) {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    let len = 64usize << 20;
    let rounds = 400;
    println!(
        "{:<34} {:>10} {:>10}",
        "method (record bytes)", "p50 us", "p99 us"
    );
    for record in [200usize, 11_600] {
        for (prealloc, sync) in [
            ("fallocate", "fdatasync"),
            ("zeros", "fdatasync"),
            ("fallocate", "msync"),
            ("zeros", "msync"),
        ] {
            let path = dir.path().join(format!("{prealloc}-{sync}-{record}"));
            let file = new_file(&path)?;
            if prealloc == "fallocate" {
                nix::fcntl::posix_fallocate(&file, 0, len as i64)?;
            } else {
                let zeros = vec![0u8; 1 << 20];
                let mut writer = &file;
                for _ in 0..len >> 20 {
                    writer.write_all(&zeros)?;
                }
            }
            file.sync_all()?;
            let mut map = map(&file)?;
            let mut samples = Vec::with_capacity(rounds);
            let mut offset = 4096;
            for round in 0..rounds {
                let start = Instant::now();
                map[offset..offset + record].fill((round % 250) as u8 + 1);
                if sync == "msync" {
                    map.flush_range(offset, record)?;
                } else {
                    file.sync_data()?;
                }
                samples.push(start.elapsed().as_secs_f64() * 1e6);
                offset += record;
            }
            let p50 = percentile(&mut samples, 0.5);
            let p99 = percentile(&mut samples, 0.99);
            println!(
                "{:<34} {p50:>10.0} {p99:>10.0}",
                format!("{prealloc} + {sync} ({record} B)")
            );
        }
    }
    println!(
        "\n{:<34} {:>10} {:>10}",
        "200 B append after N MiB written", "p50 us", "p99 us"
    );
    for through_map in [true, false] {
        for written_mib in [0usize, 4, 8, 16, 32, 60] {
            let path = dir.path().join(format!("grow-{through_map}-{written_mib}"));
            let file = new_file(&path)?;
            nix::fcntl::posix_fallocate(&file, 0, len as i64)?;
            let mut map = map(&file)?;
            // Written the way a journal fills a segment: appends, made durable as it goes.
            let mib = vec![0x5Au8; 1 << 20];
            for n in 0..written_mib {
                if through_map {
                    map[n << 20..(n + 1) << 20].copy_from_slice(&mib);
                } else {
                    std::os::unix::fs::FileExt::write_all_at(&file, &mib, (n << 20) as u64)?;
                }
                file.sync_data()?;
            }
            let mut samples = Vec::with_capacity(200);
            let mut offset = written_mib << 20;
            for round in 0..200 {
                let record = [(round % 250) as u8 + 1; 200];
                let start = Instant::now();
                if through_map {
                    map[offset..offset + 200].copy_from_slice(&record);
                } else {
                    std::os::unix::fs::FileExt::write_all_at(&file, &record, offset as u64)?;
                }
                file.sync_data()?;
                samples.push(start.elapsed().as_secs_f64() * 1e6);
                offset += 200;
            }
            let p50 = percentile(&mut samples, 0.5);
            let p99 = percentile(&mut samples, 0.99);
            println!(
                "{:<34} {p50:>10.0} {p99:>10.0}",
                format!(
                    "{} after {written_mib} MiB",
                    if through_map {
                        "map + fdatasync"
                    } else {
                        "pwrite + fdatasync"
                    }
                )
            );
        }
    }
    Ok(())
}
