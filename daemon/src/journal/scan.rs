//! Reading one segment's bytes into entries: records whose header checksum, body checksum
//! and chain MAC hold, damaged or altered records, and unreadable stretches, with the
//! search for the next readable header after damage.

use std::path::Path;

use super::format::{
    body_checksum, record_len, RecordHeader, CHAIN_BYTES, PAYLOAD_BYTES_MAX, RECORD_ALIGN,
    RECORD_HEADER_BYTES,
};
use super::segment;
use super::{ChainKey, JournalError};

pub(super) enum Entry {
    Good {
        offset: usize,
        end: usize,
        header: RecordHeader,
        payload: std::ops::Range<usize>,
        prev_chain: [u8; CHAIN_BYTES],
        chain: [u8; CHAIN_BYTES],
    },
    /// Checksum failed, header readable: random damage in a known record.
    Damaged { offset: usize, header: RecordHeader },
    /// Checksums hold but the MAC does not: altered, its header cannot be trusted.
    Forged { offset: usize, sequence: u64 },
    /// Bytes that are not a readable record, up to the next readable header (or the end).
    Unreadable { offset: usize, end: usize },
}

fn array32(bytes: &[u8]) -> [u8; CHAIN_BYTES] {
    let mut out = [0u8; CHAIN_BYTES];
    out.copy_from_slice(&bytes[..CHAIN_BYTES]);
    out
}

/// A header at `offset` that parses and whose record fits in the segment.
fn header_at(bytes: &[u8], offset: usize) -> Option<RecordHeader> {
    let header = RecordHeader::decode(bytes.get(offset..)?)?;
    let len = header.payload_len as usize;
    (len <= PAYLOAD_BYTES_MAX && offset + record_len(len) <= bytes.len()).then_some(header)
}

/// How far past a blank header recovery looks for the garbage of torn writes.
pub const TAIL_PROBE_BYTES: usize = 8 << 20;

/// Reads the records of one segment, from `start`, at most `limit` entries, stopping after
/// a good record of sequence `until` or later (the live audit: what comes after the durable
/// sequence is being written, and may be seen half-written). Returns them and the offset up
/// to which anything was found (the extent to zero if it is cut).
pub(super) fn scan(
    bytes: &[u8],
    start: usize,
    key: &ChainKey,
    limit: usize,
    until: u64,
) -> (Vec<Entry>, usize) {
    let mut entries = Vec::new();
    let mut offset = start;
    while offset + RECORD_HEADER_BYTES <= bytes.len() && entries.len() < limit {
        let Some(header) = header_at(bytes, offset) else {
            let blank = bytes[offset..offset + RECORD_HEADER_BYTES]
                .iter()
                .all(|b| *b == 0);
            // A blank header is normally the end of what was written. A torn write leaves
            // bytes beyond it only within what was appended after the last flush, so only
            // a bounded stretch is searched; damage (a non-blank bad header) is searched to
            // the end of the segment.
            let search_end = if blank {
                (offset + TAIL_PROBE_BYTES).min(bytes.len())
            } else {
                bytes.len()
            };
            let Some(last) = bytes[offset..search_end].iter().rposition(|b| *b != 0) else {
                // Nothing but zeros: the clean end of what was written.
                break;
            };
            // Every byte offset, not just aligned ones: bytes cut out of the middle shift
            // the records after them off the 8-byte grid.
            // Nothing can start past the last non-zero byte.
            let resync = (offset + 1..(offset + last + 1).saturating_sub(RECORD_HEADER_BYTES - 1))
                .find(|at| header_at(bytes, *at).is_some());
            if let Some(next) = resync {
                entries.push(Entry::Unreadable { offset, end: next });
                offset = next;
                continue;
            }
            let end = (offset + last + 1)
                .next_multiple_of(RECORD_ALIGN)
                .min(bytes.len());
            entries.push(Entry::Unreadable { offset, end });
            offset = end;
            break;
        };
        let payload_len = header.payload_len as usize;
        let end = offset + record_len(payload_len);
        let payload = offset + RECORD_HEADER_BYTES..offset + RECORD_HEADER_BYTES + payload_len;
        let trailer = &bytes[payload.end..];
        let prev_chain = array32(trailer);
        let chain = array32(&trailer[CHAIN_BYTES..]);
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&trailer[2 * CHAIN_BYTES..2 * CHAIN_BYTES + 4]);
        let padding_clean = trailer[2 * CHAIN_BYTES + 4..end - payload.end]
            .iter()
            .all(|b| *b == 0);
        if body_checksum(&bytes[payload.clone()], &prev_chain, &chain) != u32::from_le_bytes(crc)
            || !padding_clean
        {
            entries.push(Entry::Damaged { offset, header });
            // Its length cannot be trusted either (bytes may have been cut out of it): go
            // on at the next readable header, wherever it is.
            // (Searched up to the last non-zero byte only: nothing starts in zeros.)
            let written_end = bytes[offset..]
                .iter()
                .rposition(|b| *b != 0)
                .map_or(offset, |last| offset + last + 1);
            offset = (offset + 1..written_end.saturating_sub(RECORD_HEADER_BYTES - 1))
                .find(|at| header_at(bytes, *at).is_some())
                .unwrap_or(end);
            continue;
        } else if key.chain(
            &prev_chain,
            &bytes[offset..offset + RECORD_HEADER_BYTES],
            &bytes[payload.clone()],
        ) != chain
        {
            entries.push(Entry::Forged {
                offset,
                sequence: header.sequence,
            });
        } else {
            let sequence = header.sequence;
            entries.push(Entry::Good {
                offset,
                end,
                header,
                payload,
                prev_chain,
                chain,
            });
            if sequence >= until {
                offset = end;
                break;
            }
        }
        offset = end;
    }
    (entries, offset)
}

/// The segment files in `dir`, by index.
pub(super) fn list(dir: &Path) -> Result<Vec<(u64, std::path::PathBuf)>, JournalError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(index) = entry
            .file_name()
            .to_str()
            .and_then(segment::parse_file_name)
        {
            out.push((index, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}
