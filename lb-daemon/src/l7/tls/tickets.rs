//! TLS 1.3 session tickets: the process's own rotating keys, or keys from a file shared by
//! several lbd nodes so that a client resumes on any of them.
//!
//! A shared ticket is `key name (16) | nonce (12) | AES-256-GCM(session state) | tag (16)`,
//! with the key name as associated data. The first key of the file seals new tickets; every
//! key of the file opens them, so operators rotate by adding a new key at the top on every
//! node, then (a ticket lifetime later) dropping the last one.
use std::sync::{Arc, OnceLock};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

use crate::config::tls::TicketKeys;

/// What clients are told a ticket is good for (the keys in a file live as long as the
/// operator keeps them; this is the hint, as rustls's own ticketer gives).
const LIFETIME_SECS: u32 = 12 * 60 * 60;

/// Key name + nonce in front of the sealed state, tag after it.
const OVERHEAD: usize = 16 + NONCE_LEN + 16;

/// Largest ticket accepted for decryption (rustls's own state is a few hundred bytes; a
/// client certificate chain can make it a few KiB).
const MAX_TICKET: usize = 16 * 1024;

/// The process-wide rotating ticketer for listeners without a key file. Shared by every
/// listener and every reload, so a reload does not invalidate the tickets clients hold.
pub fn process_ticketer() -> Option<Arc<dyn ProducesTickets>> {
    static T: OnceLock<Option<Arc<dyn ProducesTickets>>> = OnceLock::new();
    T.get_or_init(|| match rustls::crypto::ring::Ticketer::new() {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(error = %e, "no TLS session tickets: the random generator failed");
            None
        }
    })
    .clone()
}

/// Seals and opens tickets with keys from `ticket_key_file`.
pub struct SharedTicketer {
    keys: Vec<([u8; 16], LessSafeKey)>,
    rng: SystemRandom,
}

impl std::fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTicketer")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl SharedTicketer {
    /// A ticketer for the validated keys of a file.
    pub fn new(keys: &TicketKeys) -> Option<SharedTicketer> {
        let keys = keys
            .keys
            .iter()
            .map(|(name, k)| {
                UnboundKey::new(&AES_256_GCM, k)
                    .ok()
                    .map(|u| (*name, LessSafeKey::new(u)))
            })
            .collect::<Option<Vec<_>>>()?;
        (!keys.is_empty()).then(|| SharedTicketer {
            keys,
            rng: SystemRandom::new(),
        })
    }
}

impl ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME_SECS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let (name, key) = self.keys.first()?;
        // A random nonce: a counter would need coordination between nodes sharing the key.
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(plain.len() + OVERHEAD);
        out.extend_from_slice(name);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name),
                &mut out[16 + NONCE_LEN..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < OVERHEAD || cipher.len() > MAX_TICKET {
            return None;
        }
        let (name, rest) = cipher.split_at(16);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let (_, key) = self.keys.iter().find(|(n, _)| n[..] == *name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(name), &mut buf)
            .ok()?
            .len();
        buf.truncate(plain);
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(lines: &str) -> TicketKeys {
        TicketKeys {
            path: "t".into(),
            keys: crate::config::tls::parse_ticket_keys(lines).expect("keys"),
        }
    }

    #[test]
    fn tickets_open_with_any_listed_key_and_nothing_else() {
        let k1 = "01".repeat(48);
        let k2 = "02".repeat(48);
        let old = SharedTicketer::new(&keys(&k1)).expect("old");
        let rotated =
            SharedTicketer::new(&keys(&format!("# new first\n{k2}\n\n{k1}\n"))).expect("new");
        let other = SharedTicketer::new(&keys(&"03".repeat(48))).expect("other");
        let t = old.encrypt(b"state").expect("seal");
        assert_eq!(t.len(), 5 + OVERHEAD);
        assert_eq!(rotated.decrypt(&t).as_deref(), Some(&b"state"[..]));
        assert!(other.decrypt(&t).is_none());
        let t2 = rotated.encrypt(b"state2").expect("seal");
        assert_eq!(&t2[..16], &[2u8; 16]);
        assert!(old.decrypt(&t2).is_none(), "sealed with the new key");
        let mut bad = t.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(rotated.decrypt(&bad).is_none());
        assert!(rotated.decrypt(&t[..10]).is_none());
        assert!(crate::config::tls::parse_ticket_keys("abcd").is_err());
        assert!(crate::config::tls::parse_ticket_keys(&format!("{k1}\n{k1}")).is_err());
    }
}
