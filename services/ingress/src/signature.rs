//! MessageBird webhook signatures: the `MessageBird-Signature-JWT` scheme (PROTOCOL.md §1.1)
//! and the deprecated `MessageBird-Signature` + `MessageBird-Request-Timestamp` HMAC scheme
//! (§1.2). Written on `hmac` + `sha2` directly so every check, and its order, is visible here;
//! the server and the reference-vector tests call exactly these functions.

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256, Sha384, Sha512};

/// Allowed clock skew on `nbf` and `exp`, as every MessageBird SDK but Node uses.
pub const LEEWAY_SECONDS: i64 = 1;

/// The JWT header name (HTTP header names are case-insensitive).
pub const JWT_HEADER: &str = "messagebird-signature-jwt";
/// Legacy scheme: base64 HMAC-SHA256.
pub const LEGACY_SIGNATURE_HEADER: &str = "messagebird-signature";
/// Legacy scheme: unix seconds the signature covers.
pub const LEGACY_TIMESTAMP_HEADER: &str = "messagebird-request-timestamp";

/// Why a signature was refused. The `Display` texts of the JWT checks are the reasons the
/// MessageBird reference vectors carry (after their `invalid jwt: ` prefix), so the tests can
/// prove each forged vector fails for the documented reason and not by accident.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("signature header is missing")]
    Missing,
    #[error("token is malformed")]
    Malformed,
    #[error("signing method {0} is invalid")]
    Algorithm(String),
    #[error("signature is invalid")]
    BadSignature,
    #[error("claim iss has wrong value")]
    Issuer,
    #[error("claim {0} is missing")]
    MissingClaim(&'static str),
    #[error("claim nbf is in the future")]
    NotYetValid,
    #[error("claim exp is in the past")]
    Expired,
    #[error("claim url_hash is invalid")]
    UrlHash,
    #[error("claim payload_hash is set but actual payload is missing")]
    PayloadHashWithoutPayload,
    #[error("claim payload_hash is not set but payload is present")]
    PayloadWithoutPayloadHash,
    #[error("claim payload_hash is invalid")]
    PayloadHash,
    #[error("request timestamp is malformed")]
    LegacyTimestamp,
    #[error("request timestamp is outside the replay window")]
    LegacyWindow,
    #[error("legacy signatures are not enabled for this shop")]
    LegacyDisabled,
}

impl SignatureError {
    /// A short label for the `ingress_refusals_total{reason}` metric (bounded set).
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Self::Missing => "signature_missing",
            Self::Malformed => "signature_malformed",
            Self::Algorithm(_) => "signature_algorithm",
            Self::BadSignature => "signature_invalid",
            Self::Issuer => "claim_iss",
            Self::MissingClaim(_) => "claim_missing",
            Self::NotYetValid => "claim_nbf",
            Self::Expired => "claim_exp",
            Self::UrlHash => "claim_url_hash",
            Self::PayloadHashWithoutPayload
            | Self::PayloadWithoutPayloadHash
            | Self::PayloadHash => "claim_payload_hash",
            Self::LegacyTimestamp | Self::LegacyWindow => "legacy_timestamp",
            Self::LegacyDisabled => "legacy_disabled",
        }
    }
}

/// The verified claims a caller still needs (replay memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub jti: String,
    pub exp: i64,
}

#[derive(Debug, Clone, Copy)]
enum Alg {
    Hs256,
    Hs384,
    Hs512,
}

fn b64url(input: &str) -> Result<Vec<u8>, SignatureError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(input)
        .map_err(|_| SignatureError::Malformed)
}

/// Constant-time equality (the length is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn hmac_verify(alg: Alg, key: &[u8], signed: &[u8], signature: &[u8]) -> bool {
    // `verify_slice` compares in constant time.
    match alg {
        Alg::Hs256 => <Hmac<Sha256> as KeyInit>::new_from_slice(key).is_ok_and(|mut mac| {
            mac.update(signed);
            mac.verify_slice(signature).is_ok()
        }),
        Alg::Hs384 => <Hmac<Sha384> as KeyInit>::new_from_slice(key).is_ok_and(|mut mac| {
            mac.update(signed);
            mac.verify_slice(signature).is_ok()
        }),
        Alg::Hs512 => <Hmac<Sha512> as KeyInit>::new_from_slice(key).is_ok_and(|mut mac| {
            mac.update(signed);
            mac.verify_slice(signature).is_ok()
        }),
    }
}

/// Whether a hex SHA-256 claim matches `data`, compared on the digest bytes in constant time.
fn hash_claim_matches(claim: &str, data: &[u8]) -> bool {
    let Ok(claimed) = hex::decode(claim) else {
        return false;
    };
    constant_time_eq(&claimed, Sha256::digest(data).as_slice())
}

fn int_claim(
    claims: &serde_json::Map<String, serde_json::Value>,
    name: &'static str,
) -> Option<i64> {
    match claims.get(name)? {
        serde_json::Value::Number(n) => n
            .as_i64()
            // NumericDate may carry a fraction; whole seconds are what the checks need.
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64)),
        _ => None,
    }
}

/// Verifies a `MessageBird-Signature-JWT` token for a request.
///
/// `url` is the public URL MessageBird called, exactly as sent (configured base + raw request
/// target), `body` the raw body bytes, `now` unix seconds. Checks, in this order: JOSE
/// `alg` ∈ HS256/384/512; the HMAC over `header.claims` with the signing key's UTF-8 bytes;
/// `iss == "MessageBird"`; `nbf` and `exp` present and within a 1 s leeway; `jti` present;
/// `url_hash`; `payload_hash` present exactly when the body is non-empty.
pub fn verify_jwt(
    token: &str,
    signing_key: &[u8],
    url: &str,
    body: &[u8],
    now: i64,
) -> Result<VerifiedToken, SignatureError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(SignatureError::Missing);
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SignatureError::Malformed);
    };
    let header: serde_json::Value =
        serde_json::from_slice(&b64url(header_b64)?).map_err(|_| SignatureError::Malformed)?;
    let alg = match header.get("alg").and_then(|a| a.as_str()) {
        Some("HS256") => Alg::Hs256,
        Some("HS384") => Alg::Hs384,
        Some("HS512") => Alg::Hs512,
        Some(other) => {
            // Bounded so a hostile header cannot put megabytes into logs.
            let shown: String = other.chars().take(16).collect();
            return Err(SignatureError::Algorithm(shown));
        }
        None => return Err(SignatureError::Malformed),
    };
    let signature = b64url(signature_b64)?;
    // An empty key would make every forger's job trivial.
    if signing_key.is_empty() {
        return Err(SignatureError::BadSignature);
    }
    let signed_len = header_b64.len() + 1 + claims_b64.len();
    if !hmac_verify(
        alg,
        signing_key,
        &token.as_bytes()[..signed_len],
        &signature,
    ) {
        return Err(SignatureError::BadSignature);
    }
    let claims: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&b64url(claims_b64)?).map_err(|_| SignatureError::Malformed)?;
    if claims.get("iss").and_then(|v| v.as_str()) != Some("MessageBird") {
        return Err(SignatureError::Issuer);
    }
    let nbf = int_claim(&claims, "nbf").ok_or(SignatureError::MissingClaim("nbf"))?;
    let exp = int_claim(&claims, "exp").ok_or(SignatureError::MissingClaim("exp"))?;
    if now < nbf.saturating_sub(LEEWAY_SECONDS) {
        return Err(SignatureError::NotYetValid);
    }
    if now > exp.saturating_add(LEEWAY_SECONDS) {
        return Err(SignatureError::Expired);
    }
    let jti = claims
        .get("jti")
        .and_then(|v| v.as_str())
        .filter(|j| !j.is_empty())
        .ok_or(SignatureError::MissingClaim("jti"))?;
    let url_hash = claims
        .get("url_hash")
        .and_then(|v| v.as_str())
        .ok_or(SignatureError::UrlHash)?;
    if !hash_claim_matches(url_hash, url.as_bytes()) {
        return Err(SignatureError::UrlHash);
    }
    let payload_hash = claims.get("payload_hash").and_then(|v| v.as_str());
    match (payload_hash, body.is_empty()) {
        (Some(_), true) => return Err(SignatureError::PayloadHashWithoutPayload),
        (None, false) => return Err(SignatureError::PayloadWithoutPayloadHash),
        (Some(hash), false) if !hash_claim_matches(hash, body) => {
            return Err(SignatureError::PayloadHash);
        }
        _ => {}
    }
    Ok(VerifiedToken {
        jti: jti.to_owned(),
        exp,
    })
}

/// Signs claims as MessageBird does (HS256). Used by tests and the benchmark's request
/// generator; the simulator in `tests/` carries its own independent implementation.
pub fn sign_jwt_hs256(signing_key: &[u8], claims: &serde_json::Value) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = engine.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = engine.encode(claims.to_string());
    let signed = format!("{header}.{claims}");
    let signature = match <Hmac<Sha256> as KeyInit>::new_from_slice(signing_key) {
        Ok(mut mac) => {
            mac.update(signed.as_bytes());
            engine.encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    };
    format!("{signed}.{signature}")
}

/// Lowercase hex SHA-256, as `url_hash` and `payload_hash` carry it.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The legacy scheme's canonical query: parameters decoded, sorted by key (stable, so repeated
/// keys keep their order, as Go's `url.Values.Encode` does), then form-encoded the way Go,
/// PHP and Python do (unreserved `A-Za-z0-9-_.~` kept, space as `+`, the rest `%XX`).
pub fn legacy_canonical_query(raw_query: &str) -> String {
    let mut pairs: Vec<(String, String)> = url::form_urlencoded::parse(raw_query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::with_capacity(raw_query.len() + 16);
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        form_encode(k, &mut out);
        out.push('=');
        form_encode(v, &mut out);
    }
    out
}

fn form_encode(raw: &str, out: &mut String) {
    for byte in raw.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(byte));
            }
            b' ' => out.push('+'),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX[usize::from(byte >> 4)]));
                out.push(char::from(HEX[usize::from(byte & 0x0f)]));
            }
        }
    }
}

fn legacy_mac(
    signing_key: &[u8],
    timestamp: &str,
    canonical_query: &str,
    body: &[u8],
) -> Option<Hmac<Sha256>> {
    // HMAC accepts keys of any length; `None` is unreachable in practice.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(signing_key).ok()?;
    mac.update(timestamp.as_bytes());
    mac.update(b"\n");
    mac.update(canonical_query.as_bytes());
    mac.update(b"\n");
    mac.update(Sha256::digest(body).as_slice());
    Some(mac)
}

/// Verifies only the legacy signature bytes (no clock): what the legacy vectors test.
pub fn verify_legacy_signature(
    signature_b64: &str,
    timestamp: &str,
    raw_query: &str,
    body: &[u8],
    signing_key: &[u8],
) -> Result<(), SignatureError> {
    if signing_key.is_empty() {
        return Err(SignatureError::BadSignature);
    }
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature_b64.trim())
        .map_err(|_| SignatureError::Malformed)?;
    let canonical = legacy_canonical_query(raw_query);
    let mac = legacy_mac(signing_key, timestamp.trim(), &canonical, body)
        .ok_or(SignatureError::BadSignature)?;
    mac.verify_slice(&signature)
        .map_err(|_| SignatureError::BadSignature)
}

/// Verifies a legacy request: the signature, then the timestamp within `window` seconds of
/// `now` either way. Returns the timestamp (the replay memory keeps the signature that long).
pub fn verify_legacy(
    signature_b64: &str,
    timestamp: &str,
    raw_query: &str,
    body: &[u8],
    signing_key: &[u8],
    now: i64,
    window_seconds: i64,
) -> Result<i64, SignatureError> {
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::LegacyTimestamp)?;
    verify_legacy_signature(signature_b64, timestamp, raw_query, body, signing_key)?;
    if (now - ts).abs() > window_seconds {
        return Err(SignatureError::LegacyWindow);
    }
    Ok(ts)
}

/// Signs a legacy request (tests and the simulator's cross-check).
pub fn sign_legacy(signing_key: &[u8], timestamp: &str, raw_query: &str, body: &[u8]) -> String {
    let canonical = legacy_canonical_query(raw_query);
    legacy_mac(signing_key, timestamp, &canonical, body)
        .map(|mac| base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)] // tests fail loudly
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn round_trips_and_refuses_each_claim() {
        let key = b"k3y";
        let url = "https://hooks.example.com/webhooks/messagebird/s1";
        let body = br#"{"type":"message.created"}"#;
        let base = serde_json::json!({
            "iss": "MessageBird", "nbf": 1000, "exp": 1060, "jti": "j1",
            "url_hash": sha256_hex(url.as_bytes()), "payload_hash": sha256_hex(body),
        });
        let ok = sign_jwt_hs256(key, &base);
        assert_eq!(
            verify_jwt(&ok, key, url, body, 1000),
            Ok(VerifiedToken {
                jti: "j1".into(),
                exp: 1060
            })
        );
        assert_eq!(
            verify_jwt(&ok, key, url, body, 998),
            Err(SignatureError::NotYetValid)
        );
        assert_eq!(
            verify_jwt(&ok, key, url, body, 1062),
            Err(SignatureError::Expired)
        );
        assert!(verify_jwt(&ok, key, url, body, 1061).is_ok());
        assert_eq!(
            verify_jwt(&ok, b"other", url, body, 1000),
            Err(SignatureError::BadSignature)
        );
        assert_eq!(
            verify_jwt(&ok, b"", url, body, 1000),
            Err(SignatureError::BadSignature)
        );
        for (claim, err) in [
            ("iss", SignatureError::Issuer),
            ("nbf", SignatureError::MissingClaim("nbf")),
            ("exp", SignatureError::MissingClaim("exp")),
            ("jti", SignatureError::MissingClaim("jti")),
            ("url_hash", SignatureError::UrlHash),
            ("payload_hash", SignatureError::PayloadWithoutPayloadHash),
        ] {
            let mut claims = base.clone();
            if let Some(map) = claims.as_object_mut() {
                map.remove(claim);
            }
            let token = sign_jwt_hs256(key, &claims);
            assert_eq!(
                verify_jwt(&token, key, url, body, 1000),
                Err(err),
                "{claim}"
            );
        }
        assert_eq!(
            verify_jwt("", key, url, body, 1000),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify_jwt("a.b", key, url, body, 1000),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify_jwt("a.b.c.d", key, url, body, 1000),
            Err(SignatureError::Malformed)
        );
        // Tampered claims keep the old signature.
        let mut pieces: Vec<&str> = ok.split('.').collect();
        let forged_claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"iss":"MessageBird","nbf":1000,"exp":9999999999,"jti":"x"}"#);
        pieces[1] = &forged_claims;
        assert_eq!(
            verify_jwt(&pieces.join("."), key, url, body, 1000),
            Err(SignatureError::BadSignature)
        );
    }

    #[test]
    fn hs384_and_hs512_are_accepted_and_others_refused() {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let key = b"secret";
        let url = "https://x.test/";
        let claims = engine.encode(
            serde_json::json!({"iss":"MessageBird","nbf":1,"exp":100,"jti":"a","url_hash":sha256_hex(url.as_bytes())})
                .to_string(),
        );
        for alg in ["HS384", "HS512"] {
            let header = engine.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
            let signed = format!("{header}.{claims}");
            let sig = if alg == "HS384" {
                let mut mac = <Hmac<Sha384> as KeyInit>::new_from_slice(key).expect("key");
                mac.update(signed.as_bytes());
                mac.finalize().into_bytes().to_vec()
            } else {
                let mut mac = <Hmac<Sha512> as KeyInit>::new_from_slice(key).expect("key");
                mac.update(signed.as_bytes());
                mac.finalize().into_bytes().to_vec()
            };
            let token = format!("{signed}.{}", engine.encode(sig));
            assert!(verify_jwt(&token, key, url, b"", 50).is_ok(), "{alg}");
        }
        for alg in ["none", "RS256", "HS1"] {
            let header = engine.encode(format!(r#"{{"alg":"{alg}"}}"#));
            let token = format!("{header}.{claims}.");
            assert_eq!(
                verify_jwt(&token, key, url, b"", 50),
                Err(SignatureError::Algorithm(alg.to_owned()))
            );
        }
    }

    #[test]
    fn legacy_round_trip_and_window() {
        let sig = sign_legacy(b"key", "1000", "b=2&a=1", b"{}");
        assert_eq!(
            verify_legacy(&sig, "1000", "a=1&b=2", b"{}", b"key", 1010, 30),
            Ok(1000)
        );
        assert_eq!(
            verify_legacy(&sig, "1000", "a=1&b=2", b"{}", b"key", 1031, 30),
            Err(SignatureError::LegacyWindow)
        );
        assert_eq!(
            verify_legacy(&sig, "1000", "a=1&b=3", b"{}", b"key", 1000, 30),
            Err(SignatureError::BadSignature)
        );
        assert_eq!(
            verify_legacy(&sig, "x", "", b"{}", b"key", 1000, 30),
            Err(SignatureError::LegacyTimestamp)
        );
        assert_eq!(legacy_canonical_query("q=a b&p=1:2+3"), "p=1%3A2+3&q=a+b");
    }
}
