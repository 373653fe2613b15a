//! A copy of a live journal up to a durable sequence, for hot backups (docs/JOURNAL.md,
//! "Copies"). Bytes only, like the rest of the journal.
//!
//! Records up to the shard's durable sequence are on disk and never change (writing is
//! append-only; only recovery, at start, zeroes a torn tail after the last durable record),
//! and segments are never deleted. So segment files copied while the shard appends hold
//! every record up to that sequence exactly, followed by whatever was being written. The
//! copy is then cut right after the durable record: the rest of its segment zeroed, later
//! segments removed, and a `CLOSED` marker written with that record's sequence and chain
//! value, as a clean stop at that point would have left it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::format::{record_len, CHAIN_BYTES, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use super::history::{inspect, Damage, GoodRecord, Visitor};
use super::segment::{self, sync_dir};
use super::{marker, scan, ChainKey, JournalError};

/// What a copy holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// The last record in the copy.
    pub sequence: u64,
    /// Segment files in the copy.
    pub segments: u32,
    /// Their bytes.
    pub bytes: u64,
}

/// Where the last record up to the durable sequence lies in the copy.
#[derive(Debug, Default)]
struct Last {
    /// Segment, offset, payload length and sequence of the last good record seen.
    record: Option<(u64, usize, usize, u64)>,
    /// The first damage found at or before the durable sequence.
    damage: Option<String>,
    until: u64,
}

impl Visitor for Last {
    fn accepts_checkpoint(&mut self, _payload: &[u8]) -> Option<u64> {
        Some(0)
    }

    fn record(&mut self, record: GoodRecord<'_>) {
        if record.header.sequence <= self.until {
            self.record = Some((
                record.segment,
                record.offset,
                record.payload.len(),
                record.header.sequence,
            ));
        }
    }

    fn damage(&mut self, damage: Damage) {
        self.damage.get_or_insert_with(|| format!("{damage:?}"));
    }
}

fn incomplete(dst: &Path, what: String) -> JournalError {
    JournalError::CopyIncomplete {
        dir: dst.to_owned(),
        what,
    }
}

/// Copies the journal in `src` (live or not) into `dst`, a directory that must not exist,
/// up to record `durable`, which must be durable in `src`; `key` is the shard's chain key.
pub fn copy_durable(
    src: &Path,
    dst: &Path,
    key: &ChainKey,
    durable: u64,
) -> Result<Copied, JournalError> {
    std::fs::create_dir(dst)?;
    for (index, path) in scan::list(src)? {
        std::fs::copy(&path, dst.join(segment::file_name(index)))?;
    }
    let files = scan::list(dst)?;
    let (cut_segment, cut_offset, chain) = if durable == 0 {
        let first = files.first().map_or(1, |(index, _)| *index);
        (first, SEGMENT_HEADER_BYTES, key.genesis())
    } else {
        let mut last = Last {
            until: durable,
            ..Last::default()
        };
        inspect(dst, key, None, Some(durable), &mut last)?;
        if let Some(damage) = last.damage {
            return Err(incomplete(dst, damage));
        }
        let Some((segment, offset, payload_len, sequence)) = last.record else {
            return Err(incomplete(dst, format!("no record up to {durable}")));
        };
        if sequence != durable {
            return Err(incomplete(
                dst,
                format!("it ends at record {sequence}, not {durable}"),
            ));
        }
        let path = dst.join(segment::file_name(segment));
        let mut chain = [0u8; CHAIN_BYTES];
        let mut file = File::open(&path)?;
        file.seek(SeekFrom::Start(
            (offset + RECORD_HEADER_BYTES + payload_len + CHAIN_BYTES) as u64,
        ))?;
        file.read_exact(&mut chain)?;
        (segment, offset + record_len(payload_len), chain)
    };
    let mut segments = 0u32;
    let mut bytes = 0u64;
    for (index, path) in files {
        if index > cut_segment {
            std::fs::remove_file(&path)?;
            continue;
        }
        let mut file = OpenOptions::new().write(true).open(&path)?;
        let len = file.metadata()?.len();
        if index == cut_segment {
            zero_from(&mut file, cut_offset as u64, len)?;
        }
        file.sync_all()?;
        segments += 1;
        bytes += len;
    }
    sync_dir(dst)?;
    marker::close(dst, durable, &chain)?;
    Ok(Copied {
        sequence: durable,
        segments,
        bytes,
    })
}

/// Zeroes `file` from `from` to `len` (what followed the cut: records being written).
fn zero_from(file: &mut File, from: u64, len: u64) -> std::io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK];
    file.seek(SeekFrom::Start(from))?;
    let mut left = len.saturating_sub(from);
    while left > 0 {
        let now = usize::try_from(left).map_or(CHUNK, |left| left.min(CHUNK));
        file.write_all(&zeros[..now])?;
        left -= now as u64;
    }
    Ok(())
}
