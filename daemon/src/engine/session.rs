//! Signing sessions: many requests for one vPSD served by one load of its key, one
//! register change and one record. All or nothing: if the session itself fails (the key
//! does not unseal, a signature cannot be made) every request gets that error and no
//! record is produced. A request that fails its own checks (funds, postage, date) gets
//! its own error and does not stop the others.

use std::collections::HashMap;
use std::sync::Arc;

use aws_lc_rs::rand::SystemRandom;
use indicia_proto::{ErrorBody, Indicium, IndiciumPayload, MailingDate, SignItem};

use super::idempotency::IdempotencyWindow;
use super::keys::{MasterKey, SigningKey};
use super::record::{ClientTag, Fingerprint, ItemOutcome, JobRecord, SessionRecord};
use super::registers::{RegisterError, Registers};
use super::vpsd::Vpsd;
use super::{refusal, EngineConfig, EngineError, RememberedAnswer};

/// What a session uses of the engine besides its vPSD, lent for one session: the policy,
/// the master key that unseals the signing key, the random source, and the idempotency
/// window (read only: the record's answers enter it when the record is installed).
#[derive(Debug)]
pub(super) struct SessionContext<'a> {
    pub config: &'a EngineConfig,
    pub master: &'a MasterKey,
    pub rng: &'a SystemRandom,
    pub window: &'a IdempotencyWindow,
    /// Keys kept loaded between sessions.
    pub keys: &'a std::cell::RefCell<super::keycache::KeyCache>,
    /// The watchdog's limit on the time since the last provider contact.
    pub contact_seconds_max: u64,
}

/// One client request for one vPSD: a single sign (one item) or a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignJob {
    pub client: ClientTag,
    pub request_id: u64,
    pub items: Vec<SignItem>,
}

/// The answer for one item: its indicium, or why it was refused.
pub type ItemAnswer = Result<Indicium, ErrorBody>;
/// The answer for one job: one answer per item, or a refusal of the whole job.
pub type JobAnswer = Result<Vec<ItemAnswer>, EngineError>;

/// What a session would do: the record to journal and apply (None if nothing was signed)
/// and one answer per job, in job order. Answers must not be sent before the record is
/// durable.
#[derive(Debug)]
pub struct PreparedSession {
    pub record: Option<SessionRecord>,
    pub answers: Vec<JobAnswer>,
}

impl PreparedSession {
    pub(super) fn refuse_all(jobs: &[SignJob], err: &EngineError) -> Self {
        Self {
            record: None,
            answers: jobs.iter().map(|_| Err(err.clone())).collect(),
        }
    }
}

/// Fingerprint of a sign job: XXH3-128 over the vPSD and every item field, in order.
///
/// Not a cryptographic hash, on purpose: it only tells a retry (same content) from a
/// reused request id (other content) under one client's own key, so a collision could only
/// hand a client its own earlier answer. It is persisted, and XXH3 is a fixed
/// specification, so it is stable across builds. (SHA-256 here cost ~5k instructions per
/// single-item request, half the engine's overhead per indicium.)
pub fn job_fingerprint(vpsd_id: u64, items: &[SignItem]) -> Fingerprint {
    const ITEM_BYTES: usize = 8 + 2 + 2 + 1 + 4 + 1 + 32;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&vpsd_id.to_le_bytes());
    for item in items {
        let mut out = [0u8; ITEM_BYTES];
        out[0..8].copy_from_slice(&item.postage_mills.to_le_bytes());
        out[8..10].copy_from_slice(&item.mailing_date.days_since_2000().to_le_bytes());
        out[10..12].copy_from_slice(&item.rate_category.to_le_bytes());
        out[12] = u8::from(item.destination_zip.is_some());
        out[13..17].copy_from_slice(
            &item
                .destination_zip
                .map_or(0, |zip| zip.wire())
                .to_le_bytes(),
        );
        out[17] = u8::from(item.data_digest.is_some());
        out[18..50].copy_from_slice(item.data_digest.as_ref().unwrap_or(&[0; 32]));
        hasher.update(&out);
    }
    hasher.digest128().to_le_bytes()
}

fn remembered_answer(outcomes: &[ItemOutcome]) -> Vec<ItemAnswer> {
    outcomes
        .iter()
        .map(|outcome| match outcome {
            ItemOutcome::Signed(indicium) => Ok(*indicium),
            ItemOutcome::Failed(code) => Err(ErrorBody::new(*code, "refused when first requested")),
        })
        .collect()
}

fn mailing_window(config: &EngineConfig, now_unix: u64) -> Option<(MailingDate, MailingDate)> {
    let today = u64::from(MailingDate::from_unix_seconds(now_unix)?.days_since_2000());
    let earliest = today.saturating_sub(u64::from(config.mailing_days_back));
    let latest = today
        .saturating_add(u64::from(config.mailing_days_ahead))
        .min(u64::from(u16::MAX));
    // Both are within u16 by the clamps above.
    Some((
        MailingDate::from_days_since_2000(u16::try_from(earliest).ok()?),
        MailingDate::from_days_since_2000(u16::try_from(latest).ok()?),
    ))
}

/// Checks one item against the policy and the registers as they stand in the session.
fn check_item(
    config: &EngineConfig,
    now_unix: u64,
    item: &SignItem,
    registers: &Registers,
    window: Option<(MailingDate, MailingDate)>,
) -> Result<Registers, EngineError> {
    if item.postage_mills == 0 || item.postage_mills > config.postage_mills_max {
        return Err(EngineError::PostageOutOfRange {
            postage_mills: item.postage_mills,
            postage_mills_max: config.postage_mills_max,
        });
    }
    let Some((earliest, latest)) = window else {
        return Err(EngineError::Clock { now_unix });
    };
    if item.mailing_date < earliest || item.mailing_date > latest {
        return Err(EngineError::MailingDateOutOfWindow {
            date: item.mailing_date,
            earliest,
            latest,
        });
    }
    registers
        .debit(item.postage_mills)
        .map_err(|err| match err {
            RegisterError::InsufficientFunds {
                postage_mills,
                descending_mills,
            } => EngineError::InsufficientFunds {
                postage_mills,
                descending_mills,
            },
            RegisterError::Overflow => EngineError::RegisterOverflow,
        })
}

fn build_payload(
    config: &EngineConfig,
    vpsd: &Vpsd,
    key_serial: u32,
    item: &SignItem,
    after: &Registers,
) -> IndiciumPayload {
    IndiciumPayload {
        algorithm: vpsd.algorithm,
        key_serial,
        vpsd_id: vpsd.id,
        piece_number: after.piece_count,
        postage_mills: item.postage_mills,
        ascending_mills: after.ascending_mills,
        descending_mills: after.descending_mills,
        mailing_date: item.mailing_date,
        origin_zip: vpsd.origin_zip,
        destination_zip: item.destination_zip,
        rate_category: item.rate_category,
        software_id: config.software_id,
        data_digest: item.data_digest,
    }
}

/// The vPSD's current signing key: the one the session loaded already, or unsealed now.
fn current_key(
    context: &SessionContext<'_>,
    vpsd: &Vpsd,
    loaded: &mut Option<Arc<SigningKey>>,
) -> Result<Arc<SigningKey>, EngineError> {
    if let Some(key) = loaded.take() {
        return Ok(key);
    }
    let current = vpsd.current_key();
    let Some(sealed) = &current.sealed else {
        return Err(EngineError::Integrity(format!(
            "vPSD {} has no sealed key",
            vpsd.id
        )));
    };
    let mut keys = context.keys.borrow_mut();
    if let Some(key) = keys.get(vpsd.id, current.serial, &current.public.bytes) {
        return Ok(key);
    }
    let key = Arc::new(
        context
            .master
            .load(vpsd.key_binding(current), sealed, &current.public)?,
    );
    keys.put(vpsd.id, current.serial, &current.public.bytes, &key);
    Ok(key)
}

/// What the cluster remembers of a sign: see [`RememberedAnswer::Resign`].
struct Resign<'a> {
    key_serial: u32,
    before: Registers,
    outcomes: &'a [Option<indicia_proto::ErrorCode>],
}

/// The answer to the retry of a sign the cluster remembers without its indicia (the vPSD
/// was taken over): the same payloads, from the registers before it and the retry's own
/// items (the fingerprint matched), signed again. Ed25519 gives the very same bytes; an
/// ECDSA signature is randomized, so only the signature differs. Nothing is charged.
fn resign(
    context: &SessionContext<'_>,
    vpsd: &Vpsd,
    job: &SignJob,
    remembered: Resign<'_>,
    loaded: &mut Option<Arc<SigningKey>>,
) -> JobAnswer {
    if remembered.outcomes.len() != job.items.len() {
        return Err(EngineError::RequestIdReused {
            request_id: job.request_id,
        });
    }
    if vpsd.current_key().sealed.is_none() {
        // Withdrawn since: its key is gone, and so are its indicia.
        return Err(EngineError::Withdrawn { vpsd_id: vpsd.id });
    }
    if remembered.key_serial != vpsd.current_key().serial {
        return Err(EngineError::InvalidArgument(format!(
            "request {} was signed with key {} of vPSD {}, rotated since: its indicia cannot \
             be issued again",
            job.request_id, remembered.key_serial, vpsd.id
        )));
    }
    let key = current_key(context, vpsd, loaded)?;
    let mut registers = remembered.before;
    let mut answers = Vec::with_capacity(job.items.len());
    let mut failure = None;
    for (item, outcome) in job.items.iter().zip(remembered.outcomes) {
        if let Some(code) = outcome {
            answers.push(Err(ErrorBody::new(*code, "refused when first requested")));
            continue;
        }
        let Ok(after) = registers.debit(item.postage_mills) else {
            failure = Some(EngineError::InvalidArgument(format!(
                "request {} as the cluster remembers it does not reconcile",
                job.request_id
            )));
            break;
        };
        let payload = build_payload(context.config, vpsd, remembered.key_serial, item, &after);
        match key.sign(context.rng, payload.signed_bytes().as_ref()) {
            Ok(signature) => answers.push(Ok(Indicium { payload, signature })),
            Err(err) => {
                failure = Some(EngineError::from(err));
                break;
            }
        }
        registers = after;
    }
    *loaded = Some(key);
    match failure {
        Some(err) => Err(err),
        None => Ok(answers),
    }
}

/// Prepares one signing session for `vpsd` over `jobs`, changing nothing. The key is taken
/// once, only if something is to be signed: from the engine's loaded keys, or unsealed
/// and then kept there ([`super::keycache`]; with no room for keys it is dropped, zeroized,
/// on return).
pub(super) fn prepare(
    context: &SessionContext<'_>,
    now_unix: u64,
    vpsd: &Vpsd,
    jobs: &[SignJob],
) -> PreparedSession {
    let vpsd_id = vpsd.id;
    let refused = refusal(
        &vpsd.effective_state(now_unix, context.contact_seconds_max),
        vpsd_id,
    );
    let window = mailing_window(context.config, now_unix);
    let current = vpsd.current_key();
    let mut signing_key = None;
    let mut registers = vpsd.registers;
    let mut seen: HashMap<(ClientTag, u64), (Fingerprint, usize)> = HashMap::new();
    let mut duplicates = Vec::new();
    let mut records = Vec::new();
    let mut answers: Vec<JobAnswer> = Vec::with_capacity(jobs.len());

    for (index, job) in jobs.iter().enumerate() {
        if job.items.is_empty() {
            answers.push(Err(EngineError::InvalidArgument(
                "a request must hold at least one item".into(),
            )));
            continue;
        }
        let fingerprint = job_fingerprint(vpsd_id, &job.items);
        if let Some(remembered) = context.window.get(job.client, vpsd_id, job.request_id) {
            answers.push(match &remembered.answer {
                RememberedAnswer::Items(outcomes) if remembered.fingerprint == fingerprint => {
                    Ok(remembered_answer(outcomes))
                }
                RememberedAnswer::Resign {
                    key_serial,
                    before,
                    outcomes,
                } if remembered.fingerprint == fingerprint => resign(
                    context,
                    vpsd,
                    job,
                    Resign {
                        key_serial: *key_serial,
                        before: *before,
                        outcomes,
                    },
                    &mut signing_key,
                ),
                _ => Err(EngineError::RequestIdReused {
                    request_id: job.request_id,
                }),
            });
            continue;
        }
        if let Some((first_fingerprint, first)) = seen.get(&(job.client, job.request_id)) {
            if *first_fingerprint == fingerprint {
                duplicates.push((index, *first));
                // Placeholder, replaced by a copy of the first answer below.
                answers.push(Ok(Vec::new()));
            } else {
                answers.push(Err(EngineError::RequestIdReused {
                    request_id: job.request_id,
                }));
            }
            continue;
        }
        seen.insert((job.client, job.request_id), (fingerprint, index));
        if let Some(err) = &refused {
            answers.push(Err(err.clone()));
            continue;
        }
        let mut outcomes = Vec::with_capacity(job.items.len());
        let mut item_answers = Vec::with_capacity(job.items.len());
        for item in &job.items {
            let after = match check_item(context.config, now_unix, item, &registers, window) {
                Ok(after) => after,
                Err(err) => {
                    outcomes.push(ItemOutcome::Failed(err.code()));
                    item_answers.push(Err(err.to_body()));
                    continue;
                }
            };
            // Loaded at the first item to sign, kept for the rest of the session.
            let key = match current_key(context, vpsd, &mut signing_key) {
                Ok(key) => key,
                Err(err) => return PreparedSession::refuse_all(jobs, &err),
            };
            let payload = build_payload(context.config, vpsd, current.serial, item, &after);
            let signature = match key.sign(context.rng, payload.signed_bytes().as_ref()) {
                Ok(signature) => signature,
                Err(err) => return PreparedSession::refuse_all(jobs, &EngineError::from(err)),
            };
            signing_key = Some(key);
            let indicium = Indicium { payload, signature };
            registers = after;
            outcomes.push(ItemOutcome::Signed(indicium));
            item_answers.push(Ok(indicium));
        }
        if outcomes
            .iter()
            .any(|outcome| matches!(outcome, ItemOutcome::Signed(_)))
        {
            records.push(JobRecord {
                client: job.client,
                request_id: job.request_id,
                fingerprint,
                outcomes,
            });
        }
        answers.push(Ok(item_answers));
    }
    for (index, first) in duplicates {
        answers[index] = answers[first].clone();
    }
    // The session's hold on the key ends here, before anything is journaled or answered.
    drop(signing_key);
    let record = (!records.is_empty()).then(|| {
        let record = SessionRecord {
            vpsd_id,
            version: vpsd.version + 1,
            key_serial: current.serial,
            before: vpsd.registers,
            after: registers,
            jobs: records,
        };
        // Not checked here: `Engine::successor` runs `check_session` on every record
        // before it is journaled or applied, so walking it twice would only cost time.
        record
    });
    PreparedSession { record, answers }
}

/// Why a session record does not follow its vPSD's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionMismatch {
    #[error("session registers before {found:?} differ from the current {current:?}")]
    RegistersBefore {
        found: Registers,
        current: Registers,
    },
    #[error("session signed with key serial {found}, current is {current}")]
    KeySerial { found: u32, current: u32 },
    #[error("request id {request_id} twice in one session")]
    RequestIdTwice { request_id: u64 },
    #[error("indicium piece {piece} names another vPSD, key or algorithm")]
    Foreign { piece: u64 },
    #[error("piece number {piece} where {due} was due")]
    Piece { piece: u64, due: u64 },
    #[error("piece {piece}: {source}")]
    Registers { piece: u64, source: RegisterError },
    #[error("piece {piece} states registers that do not add up")]
    StatedRegisters { piece: u64 },
    #[error("postage sum overflows")]
    PostageOverflow,
    #[error("session record without an indicium")]
    Empty,
    #[error("registers after {found:?} differ from the indicia's {computed:?}")]
    RegistersAfter {
        found: Registers,
        computed: Registers,
    },
    #[error("sum of postage differs from the ascending register's change")]
    PostageSum,
    #[error("registers go backwards")]
    Backwards,
}

/// Checks that a session record follows the vPSD's state: same registers before, current
/// key, contiguous piece numbers from the piece count, each indicium's registers the
/// running totals, the postage sum equal to the AR delta, and the registers after.
pub(crate) fn check_session(vpsd: &Vpsd, session: &SessionRecord) -> Result<(), SessionMismatch> {
    if session.before != vpsd.registers {
        return Err(SessionMismatch::RegistersBefore {
            found: session.before,
            current: vpsd.registers,
        });
    }
    if session.key_serial != vpsd.current_key().serial {
        return Err(SessionMismatch::KeySerial {
            found: session.key_serial,
            current: vpsd.current_key().serial,
        });
    }
    let mut registers = session.before;
    let mut postage_sum: u64 = 0;
    let mut keys = std::collections::HashSet::new();
    for job in &session.jobs {
        if !keys.insert((job.client, job.request_id)) {
            return Err(SessionMismatch::RequestIdTwice {
                request_id: job.request_id,
            });
        }
    }
    for indicium in session.indicia() {
        let payload = &indicium.payload;
        let piece = payload.piece_number;
        let due = registers.piece_count + 1;
        if payload.vpsd_id != vpsd.id
            || payload.key_serial != session.key_serial
            || payload.algorithm != vpsd.algorithm
        {
            return Err(SessionMismatch::Foreign { piece });
        }
        if piece != due {
            return Err(SessionMismatch::Piece { piece, due });
        }
        registers = registers
            .debit(payload.postage_mills)
            .map_err(|source| SessionMismatch::Registers { piece, source })?;
        if payload.ascending_mills != registers.ascending_mills
            || payload.descending_mills != registers.descending_mills
        {
            return Err(SessionMismatch::StatedRegisters { piece });
        }
        postage_sum = postage_sum
            .checked_add(payload.postage_mills)
            .ok_or(SessionMismatch::PostageOverflow)?;
    }
    if registers.piece_count == session.before.piece_count {
        return Err(SessionMismatch::Empty);
    }
    if registers != session.after {
        return Err(SessionMismatch::RegistersAfter {
            found: session.after,
            computed: registers,
        });
    }
    if Some(postage_sum)
        != session
            .after
            .ascending_mills
            .checked_sub(session.before.ascending_mills)
    {
        return Err(SessionMismatch::PostageSum);
    }
    if !session.before.may_advance_to(&session.after) {
        return Err(SessionMismatch::Backwards);
    }
    Ok(())
}
