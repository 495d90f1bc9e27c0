//! How an availability event is signed, so a receiver can tell it came from us.
//!
//! Headers on every POST to an event webhook URL:
//! - `Idempotency-Key` and `X-ShopCtrl-Event-Id`: the event id (the same on every retry).
//! - `X-ShopCtrl-Timestamp`: Unix seconds when this attempt was signed.
//! - `X-ShopCtrl-Signature`: `v1=` followed by the lowercase hex HMAC-SHA256, keyed with the
//!   shop's callback secret (its UTF-8 bytes), of `<event id>.<timestamp>.<raw body>`.
//!
//! A receiver recomputes the HMAC over the exact bytes it received, compares in constant time,
//! and rejects timestamps too far from its clock (five minutes is a good window) to stop
//! replays; it deduplicates on the event id.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

pub const HEADER_EVENT_ID: &str = "x-shopctrl-event-id";
pub const HEADER_TIMESTAMP: &str = "x-shopctrl-timestamp";
pub const HEADER_SIGNATURE: &str = "x-shopctrl-signature";
pub const HEADER_IDEMPOTENCY_KEY: &str = "idempotency-key";

fn mac(secret: &str, event_id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this cannot fail; an empty key is refused earlier.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new(&Default::default()));
    mac.update(event_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `X-ShopCtrl-Signature` value.
pub fn sign(secret: &str, event_id: &str, timestamp: i64, body: &[u8]) -> String {
    let digest = mac(secret, event_id, timestamp, body)
        .finalize()
        .into_bytes();
    format!("v1={}", hex::encode(digest))
}

/// Checks a signature header in constant time (the reference for receivers).
pub fn verify(secret: &str, event_id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.trim().strip_prefix("v1=") else {
        return false;
    };
    let Ok(raw) = hex::decode(hex_sig) else {
        return false;
    };
    mac(secret, event_id, timestamp, body)
        .verify_slice(&raw)
        .is_ok()
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn signs_and_verifies() {
        let sig = sign("s3cret", "evt-1", 1_700_000_000, b"{\"a\":1}");
        assert!(sig.starts_with("v1="));
        assert_eq!(sig.len(), 3 + 64);
        assert!(verify("s3cret", "evt-1", 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(!verify("other", "evt-1", 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(!verify(
            "s3cret",
            "evt-2",
            1_700_000_000,
            b"{\"a\":1}",
            &sig
        ));
        assert!(!verify(
            "s3cret",
            "evt-1",
            1_700_000_001,
            b"{\"a\":1}",
            &sig
        ));
        assert!(!verify(
            "s3cret",
            "evt-1",
            1_700_000_000,
            b"{\"a\":2}",
            &sig
        ));
        assert!(!verify(
            "s3cret",
            "evt-1",
            1_700_000_000,
            b"{\"a\":1}",
            "v1=zz"
        ));
    }

    #[test]
    fn matches_a_known_vector() {
        // Computed independently: HMAC-SHA256("key", "id.1.body").
        let expected = {
            let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(b"key").expect("key");
            m.update(b"id.1.body");
            format!("v1={}", hex::encode(m.finalize().into_bytes()))
        };
        assert_eq!(sign("key", "id", 1, b"body"), expected);
    }
}
