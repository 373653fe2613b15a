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

/// SoftHSM2 ECDSA P-256 (SHA-256 here, then CKM_ECDSA) signatures per CPU-second, with a token made in
/// a temporary directory.
pub fn softhsm_rate(module: &Path, seconds: f64) -> Result<f64, Error> {
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
    let user_pin = AuthPin::new("indicia-user-pin".into());
    pkcs11.init_token(slot, &so_pin, "indicia-peer")?;
    {
        let session = pkcs11.open_rw_session(slot)?;
        session.login(UserType::So, Some(&so_pin))?;
        session.init_pin(&user_pin)?;
    }
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
