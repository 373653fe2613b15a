//! Signing keys kept loaded between sessions, for the vPSDs used most recently.
//!
//! Loading a key (unsealing it, and aws-lc rebuilding the key object with its checks)
//! costs about as much as one ECDSA signature. A session of one indicium, which is what a
//! load spread over many vPSDs makes, would pay it every time. The cache holds at most
//! `[engine] key_cache_keys` loaded keys, least recently used out first; a key leaves when
//! it is evicted, when its vPSD's current key changes (a rotation, a withdrawal), when its
//! vPSD leaves the shard, and with the engine. aws-lc clears a key's memory when it is
//! freed. 0 keys: every session loads its key and drops it at its end (docs/SECURITY.md).

use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

use super::keys::SigningKey;

/// One cached key: the serial and public key it was loaded for, checked at every use.
#[derive(Debug)]
struct Cached {
    serial: u32,
    public: Vec<u8>,
    key: Arc<SigningKey>,
}

#[derive(Debug)]
pub(super) struct KeyCache {
    /// None: no cache.
    keys: Option<LruCache<u64, Cached>>,
}

impl KeyCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            keys: NonZeroUsize::new(capacity).map(LruCache::new),
        }
    }

    /// The loaded key of `vpsd_id`, if it is the one with this serial and public key.
    pub(super) fn get(
        &mut self,
        vpsd_id: u64,
        serial: u32,
        public: &[u8],
    ) -> Option<Arc<SigningKey>> {
        let keys = self.keys.as_mut()?;
        match keys.get(&vpsd_id) {
            Some(cached) if cached.serial == serial && cached.public == public => {
                Some(Arc::clone(&cached.key))
            }
            Some(_) => {
                // Rotated or replaced since: the old key goes now.
                keys.pop(&vpsd_id);
                None
            }
            None => None,
        }
    }

    pub(super) fn put(&mut self, vpsd_id: u64, serial: u32, public: &[u8], key: &Arc<SigningKey>) {
        if let Some(keys) = self.keys.as_mut() {
            keys.put(
                vpsd_id,
                Cached {
                    serial,
                    public: public.to_vec(),
                    key: Arc::clone(key),
                },
            );
        }
    }

    /// Drops `vpsd_id`'s key (its vPSD left the shard, or its key changed).
    pub(super) fn forget(&mut self, vpsd_id: u64) {
        if let Some(keys) = self.keys.as_mut() {
            keys.pop(&vpsd_id);
        }
    }

    /// Keys held now.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.keys.as_ref().map_or(0, LruCache::len)
    }
}
