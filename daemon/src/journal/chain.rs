//! The MAC chain: each record's chain value is an HMAC over the previous one, its header
//! and its payload, under a key derived from the master key per shard, so that an edited,
//! deleted, inserted or reordered record is found (docs/JOURNAL.md, "The chain").

use aws_lc_rs::hmac;

use super::format::CHAIN_BYTES;

/// The chain MAC key of one shard: HMAC-SHA256 keyed with HMAC-SHA256(master key,
/// "indicia journal chain v1" || shard as u16 LE).
#[derive(Debug, Clone)]
pub struct ChainKey {
    key: hmac::Key,
    genesis: [u8; CHAIN_BYTES],
}

impl ChainKey {
    pub fn derive(master_key: &[u8; 32], shard: u16) -> Self {
        let kdf = hmac::Key::new(hmac::HMAC_SHA256, master_key);
        let mut context = hmac::Context::with_key(&kdf);
        context.update(b"indicia journal chain v1");
        context.update(&shard.to_le_bytes());
        let derived = context.sign();
        let key = hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref());
        let mut genesis = [0u8; CHAIN_BYTES];
        genesis.copy_from_slice(hmac::sign(&key, b"indicia journal genesis").as_ref());
        Self { key, genesis }
    }

    /// The chain value before the first record of the shard.
    pub fn genesis(&self) -> [u8; CHAIN_BYTES] {
        self.genesis
    }

    /// chain = HMAC(prev_chain || header || payload).
    pub fn chain(
        &self,
        prev_chain: &[u8; CHAIN_BYTES],
        header: &[u8],
        payload: &[u8],
    ) -> [u8; CHAIN_BYTES] {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(prev_chain);
        context.update(header);
        context.update(payload);
        let mut out = [0u8; CHAIN_BYTES];
        out.copy_from_slice(context.sign().as_ref());
        out
    }
}
