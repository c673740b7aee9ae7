//! JWS signature checks for the `jwt` filter: ring for the public-key algorithms, jsonwebtoken
//! for the HMAC ones.
//!
//! jsonwebtoken's RustCrypto backend spends ~180 µs on one ES256 verification in a release
//! build; ring spends ~48 µs (the `http1-jwt-es256` bench row, bench/README.md). ring is
//! already in the process for rustls, so the hot path uses it directly. ring also refuses RSA
//! moduli under 2048 bits, which is what RFC 7518 §3.3 asks of RS/PS keys.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use ring::signature::{
    self, RsaParameters, RsaPublicKeyComponents, UnparsedPublicKey, VerificationAlgorithm,
};

/// The largest signature we decode: RSA-8192 is 1 KiB; anything longer cannot verify.
const MAX_SIG_BYTES: usize = 1024;

/// Whether `sig` (base64url, no padding) signs `message` under `key` with `alg`. A key of
/// another family than `alg` never verifies (no HS256-with-an-RSA-key confusion).
pub fn verify(sig: &str, message: &[u8], key: &DecodingKey, alg: Algorithm) -> bool {
    let (family, ring_alg): (AlgorithmFamily, &'static dyn VerificationAlgorithm) = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            return matches!(
                jsonwebtoken::crypto::verify(sig, message, key, alg),
                Ok(true)
            );
        }
        Algorithm::ES256 => (AlgorithmFamily::Ec, &signature::ECDSA_P256_SHA256_FIXED),
        Algorithm::ES384 => (AlgorithmFamily::Ec, &signature::ECDSA_P384_SHA384_FIXED),
        Algorithm::EdDSA => (AlgorithmFamily::Ed, &signature::ED25519),
        _ => match rsa_params(alg) {
            Some(p) => (AlgorithmFamily::Rsa, p),
            // Algorithms added to jsonwebtoken later are not on any provider's allow-list.
            None => return false,
        },
    };
    if key.family() != family || sig.len() > MAX_SIG_BYTES * 4 / 3 + 4 {
        return false;
    }
    let mut raw = [0u8; MAX_SIG_BYTES];
    let Ok(n) = URL_SAFE_NO_PAD.decode_slice(sig, &mut raw) else {
        return false;
    };
    let raw = &raw[..n];
    match key.kind() {
        DecodingKeyKind::SecretOrDer(bytes) => UnparsedPublicKey::new(ring_alg, bytes)
            .verify(message, raw)
            .is_ok(),
        DecodingKeyKind::RsaModulusExponent { n: modulus, e } => {
            let Some(params) = rsa_params(alg) else {
                return false;
            };
            RsaPublicKeyComponents { n: modulus, e }
                .verify(params, message, raw)
                .is_ok()
        }
    }
}

/// ring's parameters for an RSA `alg` (RS*/PS*), used with DER keys and with JWKS `n`/`e`.
fn rsa_params(alg: Algorithm) -> Option<&'static RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    fn split(token: &str) -> (&str, &str) {
        let dot = token.rfind('.').expect("three parts");
        (&token[..dot], &token[dot + 1..])
    }

    #[test]
    fn es256_verifies_and_refuses_tampering_and_zero_signatures() {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("pair");
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            &serde_json::json!({"sub": "a"}),
            &EncodingKey::from_ec_der(pkcs8.as_ref()),
        )
        .expect("sign");
        let key = DecodingKey::from_ec_der(pair.public_key().as_ref());
        let (msg, sig) = split(&token);
        assert!(verify(sig, msg.as_bytes(), &key, Algorithm::ES256));
        assert!(!verify(sig, b"other", &key, Algorithm::ES256));
        let zero = URL_SAFE_NO_PAD.encode([0u8; 64]);
        assert!(!verify(&zero, msg.as_bytes(), &key, Algorithm::ES256));
        assert!(!verify(sig, msg.as_bytes(), &key, Algorithm::ES384));
        // An EC public key used as an HMAC secret must not verify an HS256 token.
        assert!(!verify(sig, msg.as_bytes(), &key, Algorithm::HS256));
        assert!(!verify("!!", msg.as_bytes(), &key, Algorithm::ES256));
        assert!(!verify(
            &"A".repeat(4000),
            msg.as_bytes(),
            &key,
            Algorithm::ES256
        ));
    }
}
