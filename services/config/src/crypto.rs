//! Secrets at rest: AES-256-GCM with a random 96-bit nonce per value, keys named by an id so
//! they can rotate (the first key seals, every configured key opens), and associated data
//! that binds each ciphertext to its shop and secret name. Also the generator of the secrets
//! we hand out (handover and callback secrets).

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};
use base64::Engine as _;

/// A public key for development only: anyone can read secrets sealed with it.
const DEV_KEY_ID: &str = "dev";
const DEV_KEY_B64: &str = "c2hvcGN0cmwtZGV2LWtleS1ub3QtZm9yLXByb2R1Y3Q=";

/// Why the key ring could not be built or a value could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("SECRETS_ENCRYPTION_KEYS entry {0} is not `keyid:base64key`")]
    Malformed(usize),
    #[error("SECRETS_ENCRYPTION_KEYS key id {0:?} may contain only letters, digits, '-', '_', '.'")]
    BadKeyId(String),
    #[error("SECRETS_ENCRYPTION_KEYS key {0:?} is not base64 of exactly 32 bytes")]
    BadKey(String),
    #[error("SECRETS_ENCRYPTION_KEYS names key id {0:?} twice")]
    DuplicateKeyId(String),
    #[error("SECRETS_ENCRYPTION_KEYS is empty")]
    Empty,
    #[error("a secret is sealed with key id {0:?}, which is not configured")]
    UnknownKey(String),
    #[error("a stored secret failed authentication (wrong key, or tampered)")]
    Open,
    #[error("sealing a secret failed")]
    Seal,
    #[error("the system random generator failed")]
    Random,
}

struct NamedKey {
    id: String,
    key: RandomizedNonceKey,
}

/// The configured encryption keys; the first is active.
pub struct KeyRing {
    keys: Vec<NamedKey>,
    is_dev: bool,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("KeyRing").field("key_ids", &ids).finish()
    }
}

/// A sealed value as stored: the key id and `nonce || ciphertext || tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub ciphertext: Vec<u8>,
}

impl KeyRing {
    /// Parses `keyid:base64key,...`.
    pub fn parse(spec: &str) -> Result<Self, CryptoError> {
        let mut keys: Vec<NamedKey> = Vec::new();
        for (index, entry) in spec
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let (id, b64) = entry
                .split_once(':')
                .ok_or(CryptoError::Malformed(index + 1))?;
            let id = id.trim();
            if id.is_empty()
                || id.len() > 32
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                return Err(CryptoError::BadKeyId(id.to_owned()));
            }
            if keys.iter().any(|k| k.id == id) {
                return Err(CryptoError::DuplicateKeyId(id.to_owned()));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| CryptoError::BadKey(id.to_owned()))?;
            if bytes.len() != 32 {
                return Err(CryptoError::BadKey(id.to_owned()));
            }
            let key = RandomizedNonceKey::new(&AES_256_GCM, &bytes)
                .map_err(|_| CryptoError::BadKey(id.to_owned()))?;
            keys.push(NamedKey {
                id: id.to_owned(),
                key,
            });
        }
        if keys.is_empty() {
            return Err(CryptoError::Empty);
        }
        Ok(Self {
            keys,
            is_dev: false,
        })
    }

    /// The public development key (the caller warns loudly).
    pub fn development() -> Result<Self, CryptoError> {
        let mut ring = Self::parse(&format!("{DEV_KEY_ID}:{DEV_KEY_B64}"))?;
        ring.is_dev = true;
        Ok(ring)
    }

    pub fn is_development(&self) -> bool {
        self.is_dev
    }

    /// The id of the key that seals new values.
    pub fn active_key_id(&self) -> &str {
        // parse() refuses an empty ring, so there is always a first key.
        self.keys.first().map(|k| k.id.as_str()).unwrap_or("")
    }

    /// Encrypts `plaintext` with the active key, bound to `context` (shop and secret name).
    pub fn seal(&self, context: &str, plaintext: &str) -> Result<Sealed, CryptoError> {
        let active = self.keys.first().ok_or(CryptoError::Empty)?;
        let mut in_out = plaintext.as_bytes().to_vec();
        let nonce = active
            .key
            .seal_in_place_append_tag(Aad::from(context.as_bytes()), &mut in_out)
            .map_err(|_| CryptoError::Seal)?;
        let mut ciphertext = Vec::with_capacity(NONCE_LEN + in_out.len());
        let nonce_bytes: &[u8; NONCE_LEN] = nonce.as_ref();
        ciphertext.extend_from_slice(nonce_bytes);
        ciphertext.extend_from_slice(&in_out);
        Ok(Sealed {
            key_id: active.id.clone(),
            ciphertext,
        })
    }

    /// Decrypts a stored value with the key it names.
    pub fn open(&self, context: &str, sealed: &Sealed) -> Result<String, CryptoError> {
        let named = self
            .keys
            .iter()
            .find(|k| k.id == sealed.key_id)
            .ok_or_else(|| CryptoError::UnknownKey(sealed.key_id.clone()))?;
        if sealed.ciphertext.len() < NONCE_LEN {
            return Err(CryptoError::Open);
        }
        let (nonce, body) = sealed.ciphertext.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Open)?;
        let mut in_out = body.to_vec();
        let plain = named
            .key
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut in_out)
            .map_err(|_| CryptoError::Open)?;
        String::from_utf8(plain.to_vec()).map_err(|_| CryptoError::Open)
    }
}

/// The associated data of one secret: ciphertexts only open for the row they were made for.
pub fn secret_context(shop_id: &str, name: &str) -> String {
    format!("shopctrl-config/v1/{shop_id}/{name}")
}

/// A new random secret: `prefix` followed by 256 bits, base64url without padding.
pub fn generate_secret(prefix: &str) -> Result<String, CryptoError> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| CryptoError::Random)?;
    Ok(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "a:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const KEY_B: &str = "b:Hx4dHBsaGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";

    #[test]
    fn seals_and_opens_with_rotation() -> Result<(), CryptoError> {
        let old = KeyRing::parse(KEY_A)?;
        let sealed = old.seal("shop/x", "live_secret_value")?;
        assert_eq!(sealed.key_id, "a");
        assert!(
            !sealed
                .ciphertext
                .windows(6)
                .any(|w| w == b"secret".as_slice())
        );
        let rotated = KeyRing::parse(&format!("{KEY_B},{KEY_A}"))?;
        assert_eq!(rotated.open("shop/x", &sealed)?, "live_secret_value");
        assert_eq!(rotated.seal("shop/x", "v")?.key_id, "b");
        Ok(())
    }

    #[test]
    fn refuses_wrong_context_unknown_key_and_bad_specs() -> Result<(), CryptoError> {
        let ring = KeyRing::parse(KEY_A)?;
        let sealed = ring.seal("shop/x", "value")?;
        assert!(matches!(
            ring.open("shop/y", &sealed),
            Err(CryptoError::Open)
        ));
        let other = KeyRing::parse(KEY_B)?;
        assert!(matches!(
            other.open("shop/x", &sealed),
            Err(CryptoError::UnknownKey(_))
        ));
        assert!(KeyRing::parse("").is_err());
        assert!(KeyRing::parse("nokey").is_err());
        assert!(KeyRing::parse("a:c2hvcnQ=").is_err());
        assert!(KeyRing::parse(&format!("{KEY_A},{KEY_A}")).is_err());
        assert!(KeyRing::development()?.is_development());
        Ok(())
    }

    #[test]
    fn generated_secrets_are_long_and_distinct() -> Result<(), CryptoError> {
        let a = generate_secret("hs_")?;
        let b = generate_secret("hs_")?;
        assert_ne!(a, b);
        assert_eq!(a.len(), 3 + 43);
        Ok(())
    }
}
