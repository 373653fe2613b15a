//! Entry points for the fuzz targets (`fuzz/`): arbitrary bytes through the journal's
//! record decoders and through a whole recovery. They panic only if the code breaks its
//! contract.

use super::codec::{decode_checkpoint, decode_record, kind};
use super::Store;
use crate::engine::{Engine, EngineConfig, MasterKey};
use crate::journal::format::{RecordHeader, SegmentHeader, RECORD_HEADER_BYTES};
use crate::journal::{segment, ChainKey, JournalConfig};

/// The master key of the journal [`recovery`] builds around its input; the committed
/// seeds in `fuzz/corpus/journal_recovery` are journals written under it.
pub const MASTER: [u8; 32] = [7u8; 32];

/// Decodes `data` as a record header followed by its payload, and as a checkpoint.
pub fn record(data: &[u8]) {
    let _ = decodes(data);
}

/// Whether `data` is a record header followed by a payload that decodes as its kind
/// (the record decoder or, for a checkpoint, the checkpoint decoder).
pub fn decodes(data: &[u8]) -> bool {
    let checkpoint = decode_checkpoint(data).is_ok();
    let Some(header) = RecordHeader::decode(data) else {
        return checkpoint;
    };
    let payload = &data[RECORD_HEADER_BYTES..];
    let Some(payload) = payload.get(..header.payload_len as usize) else {
        return checkpoint;
    };
    if header.kind == kind::CHECKPOINT {
        return decode_checkpoint(payload).is_ok();
    }
    decode_record(header.kind, header.subject, header.at_unix, payload, |_| {
        Some(indicia_proto::Algorithm::Ed25519)
    })
    .is_ok()
        || checkpoint
}

/// Recovers a journal whose only segment holds `data` after a valid segment header.
/// Whatever the bytes, recovery must finish without panicking and leave a state whose
/// registers balance.
pub fn recovery(data: &[u8]) {
    let _ = recover_segment(data);
}

/// [`recovery`], returning the report and the number of vPSDs recovered; None where
/// the scratch directory could not be written or the journal was refused outright.
pub fn recover_segment(data: &[u8]) -> Option<(super::RecoveryReport, usize)> {
    let dir = tempfile_dir().ok()?;
    let key = ChainKey::derive(&MASTER, 0);
    let header = SegmentHeader {
        shard: 0,
        index: 1,
        first_sequence: 1,
        prev_chain: key.genesis(),
    };
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(data);
    bytes.resize(bytes.len().max(64 << 10), 0);
    let mut outcome = None;
    if std::fs::write(dir.join(segment::file_name(1)), &bytes).is_ok() {
        if let Ok(master_key) = MasterKey::new(&MASTER) {
            let engine = Engine::new(EngineConfig::default(), master_key, [0; 32]);
            let config = JournalConfig {
                segment_bytes: 64 << 10,
            };
            if let Ok((store, report)) = Store::open(&dir, 0, key, config, engine) {
                let mut vpsds = 0;
                for vpsd in store.engine.vpsds() {
                    assert!(
                        vpsd.registers.balanced(),
                        "recovered registers do not balance"
                    );
                    vpsds += 1;
                }
                outcome = Some((report, vpsds));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "indicia-fuzz-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
