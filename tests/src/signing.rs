//! Signs webhooks exactly as MessageBird does (PROTOCOL.md §1.1 and §1.2), so tests and load
//! generators send genuine traffic: a `MessageBird-Signature-JWT` header (HS256/384/512 over
//! `iss`, `nbf`, `exp`, `jti`, `url_hash`, and `payload_hash` when the body is non-empty), or
//! the deprecated `MessageBird-Signature` + `MessageBird-Request-Timestamp` pair.

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256, Sha384, Sha512};

/// The JWT algorithms MessageBird uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JwtAlg {
    #[default]
    Hs256,
    Hs384,
    Hs512,
}

impl JwtAlg {
    pub fn name(self) -> &'static str {
        match self {
            Self::Hs256 => "HS256",
            Self::Hs384 => "HS384",
            Self::Hs512 => "HS512",
        }
    }
}

/// What goes into one token. `url` is the absolute URL MessageBird calls, exactly as sent.
#[derive(Debug, Clone)]
pub struct JwtRequest<'a> {
    pub signing_key: &'a str,
    pub url: &'a str,
    pub body: &'a [u8],
    /// Unix seconds the token becomes valid (`nbf`).
    pub issued_at: i64,
    /// `exp - nbf`; MessageBird's vectors all use 60 s.
    pub lifetime_seconds: i64,
    /// `jti`; a fresh UUID when `None`.
    pub jti: Option<String>,
    pub alg: JwtAlg,
}

impl<'a> JwtRequest<'a> {
    /// A 60-second HS256 token issued now with a fresh `jti`.
    pub fn now(signing_key: &'a str, url: &'a str, body: &'a [u8]) -> Self {
        Self {
            signing_key,
            url,
            body,
            issued_at: chrono::Utc::now().timestamp(),
            lifetime_seconds: 60,
            jti: None,
            alg: JwtAlg::Hs256,
        }
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn mac(alg: JwtAlg, key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length, so `new_from_slice` cannot fail here.
    match alg {
        JwtAlg::Hs256 => <Hmac<Sha256> as KeyInit>::new_from_slice(key)
            .map(|mut m| {
                m.update(data);
                m.finalize().into_bytes().to_vec()
            })
            .unwrap_or_default(),
        JwtAlg::Hs384 => <Hmac<Sha384> as KeyInit>::new_from_slice(key)
            .map(|mut m| {
                m.update(data);
                m.finalize().into_bytes().to_vec()
            })
            .unwrap_or_default(),
        JwtAlg::Hs512 => <Hmac<Sha512> as KeyInit>::new_from_slice(key)
            .map(|mut m| {
                m.update(data);
                m.finalize().into_bytes().to_vec()
            })
            .unwrap_or_default(),
    }
}

/// The compact JWS for `MessageBird-Signature-JWT`.
pub fn sign_jwt(request: &JwtRequest<'_>) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = serde_json::json!({ "alg": request.alg.name(), "typ": "JWT" });
    let jti = request
        .jti
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut claims = serde_json::json!({
        "iss": "MessageBird",
        "nbf": request.issued_at,
        "exp": request.issued_at + request.lifetime_seconds,
        "jti": jti,
        "url_hash": sha256_hex(request.url.as_bytes()),
    });
    if !request.body.is_empty()
        && let Some(map) = claims.as_object_mut()
    {
        map.insert(
            "payload_hash".into(),
            serde_json::Value::String(sha256_hex(request.body)),
        );
    }
    let signed = format!(
        "{}.{}",
        engine.encode(header.to_string()),
        engine.encode(claims.to_string())
    );
    let signature = mac(
        request.alg,
        request.signing_key.as_bytes(),
        signed.as_bytes(),
    );
    format!("{signed}.{}", engine.encode(signature))
}

/// The legacy scheme's canonical query (sorted by key, form-encoded as Go/PHP/Python do).
pub fn legacy_canonical_query(raw_query: &str) -> String {
    let mut pairs: Vec<(String, String)> = raw_query
        .split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
            (form_decode(k), form_decode(v))
        })
        .collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let encode = |raw: &str| {
        let mut out = String::new();
        for b in raw.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    out.push(char::from(b))
                }
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
        out
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space).
fn form_decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| char::from(b).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(high), Some(low)) => {
                        // Two hex digits are at most 255.
                        out.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `MessageBird-Signature` for the legacy scheme: base64 HMAC-SHA256 of
/// `timestamp \n canonical_query \n sha256(body)` (raw digest bytes).
pub fn sign_legacy(signing_key: &str, timestamp: i64, raw_query: &str, body: &[u8]) -> String {
    let mut message = Vec::with_capacity(64 + raw_query.len());
    message.extend_from_slice(timestamp.to_string().as_bytes());
    message.push(b'\n');
    message.extend_from_slice(legacy_canonical_query(raw_query).as_bytes());
    message.push(b'\n');
    message.extend_from_slice(Sha256::digest(body).as_slice());
    base64::engine::general_purpose::STANDARD.encode(mac(
        JwtAlg::Hs256,
        signing_key.as_bytes(),
        &message,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared reference vector "Valid JWT with URL parameters and payload - POST": same
    /// claims, same key, must give the same token.
    #[test]
    fn reproduces_a_reference_token() {
        let token = sign_jwt(&JwtRequest {
            signing_key: "36efdd1aace2e26cd490f0d951138253bef2f7c6d34d18981da781555cc4cebb",
            url: "https://example.com/path?bar=1&foo=2",
            body: b"Hello, World!",
            issued_at: 1_625_479_200,
            lifetime_seconds: 60,
            jti: Some("93e55006-a0e8-4526-a190-fa5ff00ea116".into()),
            alg: JwtAlg::Hs256,
        });
        let claims = token.split('.').nth(1).unwrap_or_default();
        let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .unwrap_or_default();
        let value: serde_json::Value = serde_json::from_slice(&decoded).unwrap_or_default();
        assert_eq!(value["url_hash"].as_str().map(str::len), Some(64));
        assert_eq!(
            value["payload_hash"],
            "dffd6021bb2bd5b0af676290809ec3a53191dd81c7f70a4b28688a362182986f"
        );
    }

    /// Legacy vector "DLR query params, empty body" (PHP/Python/Node SDK tests).
    #[test]
    fn reproduces_a_legacy_vector() {
        let query = "recipient=31612345678&reference=FOO&statusDatetime=2019-01-11T09%3A17%3A11%2B00%3A00&id=eef0ab57a9e049be946f3821568c2b2e&status=delivered&mccmnc=20408&ported=1";
        assert_eq!(
            sign_legacy(
                "PlLrKaqvZNRR5zAjm42ZT6q1SQxgbbGd",
                1_547_198_231,
                query,
                b""
            ),
            "KVBdcVdz2lYMwcBLZCRITgxUfA/WkwSi+T3Wxl2HL6w="
        );
        assert_eq!(legacy_canonical_query("b=2&a=x+y"), "a=x+y&b=2");
        assert_eq!(legacy_canonical_query("a=%7e%2a"), "a=~%2A");
    }
}
