//! The keys tokens are checked and minted with, from the configuration: an HS256 secret
//! (given, or created in the data directory at first start), RS256/ES256 public keys and a
//! JWKS file, and optionally a private key to mint with.

use crate::config::AuthArgs;
use anyhow::Context;
use gateway::Verifier;
use gateway::jwt::{Signer, VerifyKey, public_algorithm, random_secret};
use std::path::Path;
use std::time::Duration;

/// The name of the generated secret in the data directory.
pub const SECRET_FILE: &str = "jwt-secret";

/// What the configuration gives.
#[derive(Debug)]
pub struct Keys {
    pub verifier: Verifier,
    /// What this process mints tokens with, if it can.
    pub signer: Option<Signer>,
    /// The secret was created just now (first start).
    pub created_secret: bool,
}

/// `ALG:PATH`.
fn alg_and_path(spec: &str) -> anyhow::Result<(gateway::jwt::Algorithm, &Path)> {
    let (alg, path) = spec
        .split_once(':')
        .with_context(|| format!("{spec:?}: write ALG:PATH, e.g. RS256:/etc/orderwave/key.pem"))?;
    Ok((
        public_algorithm(alg).map_err(anyhow::Error::msg)?,
        Path::new(path),
    ))
}

/// Loads the keys. With `create`, a missing data-directory secret is created (serve);
/// without, it must exist (token).
pub fn load(args: &AuthArgs, data_dir: &Path, create: bool) -> anyhow::Result<Keys> {
    let mut keys = Vec::new();
    let mut signer = None;
    let mut created_secret = false;
    for spec in &args.jwt_public_keys {
        let (alg, path) = alg_and_path(spec)?;
        let pem = std::fs::read(path)
            .with_context(|| format!("reading the JWT public key {}", path.display()))?;
        keys.push(
            VerifyKey::public_pem(alg, &pem)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("the JWT public key {}", path.display()))?,
        );
    }
    if let Some(path) = &args.jwt_jwks {
        let json = std::fs::read_to_string(path)
            .with_context(|| format!("reading the JWKS file {}", path.display()))?;
        keys.extend(
            VerifyKey::jwks(&json)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("the JWKS file {}", path.display()))?,
        );
    }
    if let Some(spec) = &args.jwt_private_key {
        let (alg, path) = alg_and_path(spec)?;
        let pem = std::fs::read(path)
            .with_context(|| format!("reading the JWT private key {}", path.display()))?;
        signer = Some(
            Signer::private_pem(alg, &pem, None, &args.jwt_issuer, &args.jwt_audience)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("the JWT private key {}", path.display()))?,
        );
    }
    let secret = match &args.jwt_secret {
        Some(secret) => Some(secret.clone()),
        // Public keys alone: no shared secret at all.
        None if !keys.is_empty() => None,
        None => {
            let (secret, created) = data_dir_secret(data_dir, create)?;
            created_secret = created;
            Some(secret)
        }
    };
    if let Some(secret) = secret {
        keys.push(
            VerifyKey::hs256(secret.as_bytes())
                .map_err(anyhow::Error::msg)
                .context("the JWT secret")?,
        );
        signer.get_or_insert_with(|| {
            Signer::hs256(secret.as_bytes(), &args.jwt_issuer, &args.jwt_audience)
        });
    }
    Ok(Keys {
        verifier: Verifier::new(
            keys,
            &args.jwt_issuer,
            &args.jwt_audience,
            Duration::from_secs(args.jwt_leeway_secs),
        ),
        signer,
        created_secret,
    })
}

/// The secret in `data_dir`, created (mode 0600) if missing and `create`.
fn data_dir_secret(data_dir: &Path, create: bool) -> anyhow::Result<(String, bool)> {
    let path = data_dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(secret) => return Ok((secret.trim().to_string(), false)),
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(error).with_context(|| format!("reading {}", path.display()));
        }
        Err(_) if !create => anyhow::bail!(
            "no signing secret at {}: start `orderwave serve` once with this --data-dir, or give --jwt-secret",
            path.display()
        ),
        Err(_) => {}
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let secret = random_secret();
    write_private(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
    Ok((secret, true))
}

#[cfg(unix)]
fn write_private(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(secret.as_bytes())?;
    file.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, secret: &str) -> std::io::Result<()> {
    std::fs::write(path, secret)
}
