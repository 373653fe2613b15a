//! The peer comparison: the same signing work (ECDSA P-256 over SHA-256 of an indicium
//! payload) done by SoftHSM2 through PKCS#11, against aws-lc-rs directly, in signatures per
//! CPU-second of the calling thread. SoftHSM2 does no accounting and no durable commit;
//! the appliance does both, and its figure comes from a load run in the same process.
//!
//! Opt in with the cargo feature `softhsm`; it needs the Debian package softhsm2.

use std::path::Path;
use std::time::{Duration, Instant};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

type Error = Box<dyn std::error::Error>;

/// The payload signed: the size of an indicium's signed bytes.
const MESSAGE: [u8; 61] = [0x5A; 61];

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut spec = nix::libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed value.
    #[allow(unsafe_code)]
    let rc = unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_THREAD_CPUTIME_ID, &mut spec) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(spec.tv_sec).unwrap_or(0),
        u32::try_from(spec.tv_nsec).unwrap_or(0),
    )
}

/// Signs for about `seconds` of wall time; returns signatures per CPU-second.
fn rate(seconds: f64, mut sign: impl FnMut() -> Result<(), Error>) -> Result<f64, Error> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let cpu_before = thread_cpu();
    let mut count = 0u64;
    while Instant::now() < deadline {
        for _ in 0..50 {
            sign()?;
        }
        count += 50;
    }
    let cpu = (thread_cpu() - cpu_before).as_secs_f64();
    Ok(count as f64 / cpu.max(1e-9))
}

/// aws-lc-rs ECDSA P-256 signatures per CPU-second.
pub fn aws_lc_rate(seconds: f64) -> Result<f64, Error> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
        .map_err(|err| err.to_string())?;
    rate(seconds, || {
        std::hint::black_box(pair.sign(&rng, &MESSAGE)?);
        Ok(())
    })
}

/// The user PIN of the tokens [`temporary_token`] makes.
const USER_PIN: &str = "indicia-user-pin";

/// A SoftHSM2 token labelled `label` with the user PIN [`USER_PIN`], in a temporary
/// directory (kept while the returned handle lives), and the module initialized.
fn temporary_token(
    module: &Path,
    label: &str,
) -> Result<(tempfile::TempDir, Pkcs11, cryptoki::slot::Slot), Error> {
    let dir = tempfile::tempdir()?;
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens)?;
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )?;
    // Read by SoftHSM2 when it initializes, below; nothing else in this process uses it.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let pkcs11 = Pkcs11::new(module)?;
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    let slot = *pkcs11
        .get_slots_with_token()?
        .first()
        .ok_or("SoftHSM2 offers no slot")?;
    let so_pin = AuthPin::new("indicia-so-pin".into());
    pkcs11.init_token(slot, &so_pin, label)?;
    let session = pkcs11.open_rw_session(slot)?;
    session.login(UserType::So, Some(&so_pin))?;
    session.init_pin(&AuthPin::new(USER_PIN.into()))?;
    Ok((dir, pkcs11, slot))
}

/// SoftHSM2 ECDSA P-256 (SHA-256 here, then CKM_ECDSA) signatures per CPU-second, with a token made in
/// a temporary directory.
pub fn softhsm_rate(module: &Path, seconds: f64) -> Result<f64, Error> {
    let (_dir, pkcs11, slot) = temporary_token(module, "indicia-peer")?;
    let user_pin = AuthPin::new(USER_PIN.into());
    let session = pkcs11.open_rw_session(slot)?;
    session.login(UserType::User, Some(&user_pin))?;
    let secp256r1: Vec<u8> = vec![0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
    let public_template = vec![
        Attribute::Token(false),
        Attribute::KeyType(KeyType::EC),
        Attribute::Verify(true),
        Attribute::EcParams(secp256r1),
    ];
    let private_template = vec![
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Sign(true),
    ];
    let (_public, private) = session.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &public_template,
        &private_template,
    )?;
    // SoftHSM2 2.6 has no CKM_ECDSA_SHA256: hash here (part of the measured work, as
    // aws-lc-rs hashes inside its sign), then CKM_ECDSA.
    let sign = || -> Result<Vec<u8>, Error> {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &MESSAGE);
        Ok(session.sign(&Mechanism::Ecdsa, private, digest.as_ref())?)
    };
    let signature = sign()?;
    if signature.len() != 64 {
        return Err(format!("SoftHSM2 signature of {} bytes", signature.len()).into());
    }
    rate(seconds, || {
        std::hint::black_box(sign()?);
        Ok(())
    })
}

/// What each place of the master key's hierarchy costs (`hsm-cost`): the HSM (SoftHSM2
/// here) opening a 32-byte key sealed by its AES key (CKM_AES_GCM), as a per-session
/// hierarchy would for every vPSD key it loads; the same opening in memory (aws-lc-rs
/// AES-256-GCM); a whole vPSD key load as the engine does it (open and build the key pair);
/// one ECDSA P-256 signature; and the start-up cost of the hierarchy chosen (load the module,
/// log in, find the key, open the master key once), in milliseconds of wall time.
#[derive(Debug)]
pub struct HsmCosts {
    /// Microseconds of this thread's CPU per operation.
    pub hsm_unseal_us: f64,
    pub memory_unseal_us: f64,
    pub key_load_us: f64,
    pub sign_us: f64,
    /// Wall milliseconds of each start-up open (5 of them, in order).
    pub start_ms: Vec<f64>,
}

/// Measures [`HsmCosts`] against a token made in a temporary directory.
pub fn hsm_costs(module: &Path, seconds: f64) -> Result<HsmCosts, Error> {
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    use indicia_proto::Algorithm;
    use indiciad::engine::{KeyBinding, MasterKey};
    use indiciad::hsm::Hsm;
    use indiciad::hsm::HsmConfig;

    let (_dir, _pkcs11, _slot) = temporary_token(module, "indicia-cost")?;
    let pin = indiciad::hsm::Pin {
        secret: zeroize::Zeroizing::new(String::from(USER_PIN)),
        source: "hsm-cost".into(),
    };
    let config = HsmConfig {
        module: module.to_owned(),
        token: "indicia-cost".into(),
        key_label: "indicia-master".into(),
        pin_credential: "hsm-pin".into(),
    };
    Hsm::generate_key(&config, &pin)?;

    let mut master = [0u8; 32];
    aws_lc_rs::rand::SecureRandom::fill(&SystemRandom::new(), &mut master)
        .map_err(|_| "random number generator failed")?;
    let mut start_ms = Vec::new();
    let mut sealed = None;
    for _ in 0..5 {
        let started = Instant::now();
        let hsm = Hsm::open(&config, &pin)?;
        let sealed_key = match &sealed {
            Some(sealed) => sealed,
            None => sealed.insert(hsm.seal(&master)?),
        };
        let opened = hsm.unseal(sealed_key, Path::new("master.key.hsm"))?;
        drop(hsm);
        start_ms.push(started.elapsed().as_secs_f64() * 1e3);
        if *opened != master {
            return Err("the HSM opened another key".into());
        }
    }
    let sealed = sealed.ok_or("nothing sealed")?;

    let hsm = Hsm::open(&config, &pin)?;
    let per_op = |rate: f64| 1e6 / rate;
    let hsm_unseal_us = per_op(rate(seconds, || {
        std::hint::black_box(hsm.unseal(&sealed, Path::new("master.key.hsm"))?);
        Ok(())
    })?);

    let memory = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &master)?);
    let nonce = [7u8; 12];
    let mut sealed_in_memory = master.to_vec();
    memory.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(b"indicia vpsd key v1"),
        &mut sealed_in_memory,
    )?;
    let memory_unseal_us = per_op(rate(seconds, || {
        let mut buf = sealed_in_memory.clone();
        std::hint::black_box(memory.open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(b"indicia vpsd key v1"),
            &mut buf,
        )?);
        Ok(())
    })?);

    let engine_key = MasterKey::new(&master)?;
    let binding = KeyBinding {
        vpsd_id: 1,
        key_serial: 1,
        sealed_version: 1,
    };
    let (vpsd_sealed, public) = engine_key.generate(Algorithm::EcdsaP256, binding)?;
    let key_load_us = per_op(rate(seconds, || {
        std::hint::black_box(engine_key.load(binding, &vpsd_sealed, &public)?);
        Ok(())
    })?);
    let sign_us = per_op(aws_lc_rate(seconds)?);
    Ok(HsmCosts {
        hsm_unseal_us,
        memory_unseal_us,
        key_load_us,
        sign_us,
        start_ms,
    })
}
