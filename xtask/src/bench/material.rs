//! Key material generated at bench time: TLS certificates (ECDSA P-256 through rcgen, RSA-2048
//! from `openssl genpkey`, since ring cannot generate RSA keys) and an ES256 JWT with its JWKS.
//! Nothing is committed; every run makes its own.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

/// The name every bench certificate is issued for (clients send it as SNI).
pub const SERVER_NAME: &str = "bench.test";
/// The issuer and audience of the bench JWT.
pub const JWT_ISSUER: &str = "https://bench.test";
/// The audience of the bench JWT.
pub const JWT_AUDIENCE: &str = "bench";

/// The server key type of a TLS scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA P-256 with SHA-256 (the default, as issue #13 asks).
    EcdsaP256,
    /// RSA-2048 (where OpenSSL's assembly is strongest).
    Rsa2048,
}

/// A self-signed certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8).
    pub key: PathBuf,
    /// Certificate then key in one file (HAProxy's `crt`).
    pub combined: PathBuf,
}

/// Writes a fresh certificate of `kind` for [`SERVER_NAME`] into `dir`.
pub fn certificate(dir: &Path, kind: KeyKind) -> Result<CertFiles> {
    let tag = match kind {
        KeyKind::EcdsaP256 => "ecdsa-p256",
        KeyKind::Rsa2048 => "rsa-2048",
    };
    let key = match kind {
        KeyKind::EcdsaP256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        KeyKind::Rsa2048 => {
            let out = Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ])
                .output()
                .context("running openssl genpkey (apt-get install openssl)")?;
            if !out.status.success() {
                bail!(
                    "openssl genpkey failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            rcgen::KeyPair::from_pem(&String::from_utf8_lossy(&out.stdout))
                .context("reading the RSA key openssl wrote")?
        }
    };
    let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])?.self_signed(&key)?;
    let files = CertFiles {
        cert: dir.join(format!("{tag}.crt")),
        key: dir.join(format!("{tag}.key")),
        combined: dir.join(format!("{tag}.pem")),
    };
    std::fs::write(&files.cert, cert.pem())?;
    std::fs::write(&files.key, key.serialize_pem())?;
    std::fs::write(
        &files.combined,
        format!("{}{}", cert.pem(), key.serialize_pem()),
    )?;
    Ok(files)
}

/// An ES256 token and the files its verifiers read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtFiles {
    /// The compact token (valid for a week).
    pub token: String,
    /// JWKS with the public key (kid `bench`).
    pub jwks: PathBuf,
    /// The public key as PEM (SubjectPublicKeyInfo), for HAProxy's `jwt_verify`.
    pub public_pem: PathBuf,
}

/// Writes a fresh P-256 key's JWKS and public PEM into `dir` and signs a token with it.
pub fn jwt(dir: &Path) -> Result<JwtFiles> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    // Uncompressed point: 0x04 || x || y.
    let raw = key.public_key_raw();
    if raw.len() != 65 {
        bail!("unexpected P-256 public key length {}", raw.len());
    }
    let jwks = format!(
        r#"{{"keys":[{{"kty":"EC","crv":"P-256","alg":"ES256","use":"sig","kid":"bench","x":"{}","y":"{}"}}]}}"#,
        b64url(&raw[1..33]),
        b64url(&raw[33..65])
    );
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let header = b64url(br#"{"alg":"ES256","typ":"JWT","kid":"bench"}"#);
    let claims = b64url(
        format!(
            r#"{{"iss":"{JWT_ISSUER}","aud":"{JWT_AUDIENCE}","sub":"bench-user","iat":{now},"exp":{}}}"#,
            now + 7 * 86400
        )
        .as_bytes(),
    );
    let signing_input = format!("{header}.{claims}");
    let rng = ring::rand::SystemRandom::new();
    let signer = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &key.serialize_der(),
        &rng,
    )
    .map_err(|e| anyhow::anyhow!("loading the JWT key: {e}"))?;
    let sig = signer
        .sign(&rng, signing_input.as_bytes())
        .map_err(|e| anyhow::anyhow!("signing the JWT: {e}"))?;
    let files = JwtFiles {
        token: format!("{signing_input}.{}", b64url(sig.as_ref())),
        jwks: dir.join("jwks.json"),
        public_pem: dir.join("jwt-public.pem"),
    };
    std::fs::write(&files.jwks, jwks)?;
    std::fs::write(&files.public_pem, key.public_key_pem())?;
    Ok(files)
}

/// Base64url without padding (RFC 7515 §2).
fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(A[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::b64url;

    #[test]
    fn base64url_matches_rfc4648_vectors() {
        assert_eq!(b64url(b""), "");
        assert_eq!(b64url(b"f"), "Zg");
        assert_eq!(b64url(b"fo"), "Zm8");
        assert_eq!(b64url(b"foo"), "Zm9v");
        assert_eq!(b64url(b"foob"), "Zm9vYg");
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
    }
}
