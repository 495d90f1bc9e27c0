//! A MessageBird flow, as far as ShopCtrl Messaging meets one: its webhook trigger receives
//! our availability events, and its HTTP Request step calls ingress's handover endpoint.
//!
//! The receiver records every call, verifies our signature independently of the sender's code
//! (the scheme as documented: `X-ShopCtrl-Signature: v1=<hex HMAC-SHA256(callback secret,
//! "<event id>.<timestamp>.<raw body>")>`, with `X-ShopCtrl-Event-Id` and
//! `X-ShopCtrl-Timestamp`), and answers what a test scripted (a status with `Retry-After`, or a
//! hang past the sender's timeout) before falling back to `204 No Content`, as the legacy
//! `/invoke` trigger does.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};

/// Receivers accept timestamps this far from their clock.
pub const SIGNATURE_TOLERANCE: Duration = Duration::from_secs(300);

/// Why a signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("header {0} missing")]
    Missing(&'static str),
    #[error("timestamp is not a number")]
    BadTimestamp,
    #[error("timestamp is outside the tolerance")]
    Expired,
    #[error("signature does not match")]
    Mismatch,
}

/// Verifies an availability event's signature over the raw body (the receiver's side of the
/// documented scheme).
pub fn verify_signature(
    secret: &str,
    headers: &BTreeMap<String, String>,
    body: &[u8],
    now_unix: i64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let get = |name: &'static str| headers.get(name).ok_or(SignatureError::Missing(name));
    let event_id = get("x-shopctrl-event-id")?;
    let timestamp: i64 = get("x-shopctrl-timestamp")?
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    let signature = get("x-shopctrl-signature")?;
    if now_unix.abs_diff(timestamp) > tolerance.as_secs() {
        return Err(SignatureError::Expired);
    }
    let expected_hex = signature
        .strip_prefix("v1=")
        .ok_or(SignatureError::Mismatch)?;
    let expected = hex::decode(expected_hex).map_err(|_| SignatureError::Mismatch)?;
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .map_err(|_| SignatureError::Mismatch)?;
    mac.update(format!("{event_id}.{timestamp}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&expected)
        .map_err(|_| SignatureError::Mismatch)
}

/// One call the receiver got.
#[derive(Debug, Clone)]
pub struct FlowCall {
    pub path: String,
    /// Lower-case header names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    pub json: Option<Value>,
    /// `None` when no secret was configured to check with.
    pub signature: Option<Result<(), SignatureError>>,
    /// When the call arrived (before any scripted hang).
    pub at: Instant,
    pub status: u16,
}

impl FlowCall {
    /// A top-level JSON field as a string (numbers and booleans rendered).
    pub fn field(&self, name: &str) -> Option<String> {
        let value = self.json.as_ref()?.get(name)?;
        Some(match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }
}

/// A scripted answer for the next call.
#[derive(Debug, Clone)]
pub enum FlowReply {
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    /// Waits this long, then answers 204.
    Hang(Duration),
}

#[derive(Default)]
struct ReceiverState {
    secret: Mutex<Option<String>>,
    calls: Mutex<Vec<FlowCall>>,
    script: Mutex<VecDeque<FlowReply>>,
    arrived: Notify,
}

/// A running flow webhook receiver.
pub struct FlowReceiver {
    addr: SocketAddr,
    state: Arc<ReceiverState>,
    task: JoinHandle<()>,
}

impl FlowReceiver {
    /// Serves on 127.0.0.1 with a free port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ReceiverState::default());
        let router = Router::new().fallback(receive).with_state(state.clone());
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                tracing::warn!(%error, "flow receiver stopped");
            }
        });
        Ok(Self { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A webhook-trigger URL on this receiver, in MessageBird's shape.
    pub fn url(&self, flow: &str) -> String {
        format!("http://{}/flows/invocations/webhooks/{flow}", self.addr)
    }

    /// The callback secret signatures are checked with.
    pub fn set_secret(&self, secret: &str) {
        if let Ok(mut s) = self.state.secret.lock() {
            *s = Some(secret.to_owned());
        }
    }

    /// Queues answers for the next calls; after them every call gets 204.
    pub fn script(&self, replies: impl IntoIterator<Item = FlowReply>) {
        if let Ok(mut script) = self.state.script.lock() {
            script.extend(replies);
        }
    }

    pub fn calls(&self) -> Vec<FlowCall> {
        self.state
            .calls
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// Waits until at least `n` calls arrived (or `timeout` passed) and returns them all.
    pub async fn wait_for_calls(&self, n: usize, timeout: Duration) -> Vec<FlowCall> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.state.arrived.notified();
            let calls = self.calls();
            if calls.len() >= n {
                return calls;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.calls();
            }
        }
    }
}

impl Drop for FlowReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrived_at = Instant::now();
    let scripted = state.script.lock().ok().and_then(|mut s| s.pop_front());
    let mut hang = None;
    let response = match scripted {
        Some(FlowReply::Status {
            status,
            retry_after,
        }) => {
            let mut response = StatusCode::from_u16(status)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                .into_response();
            if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
        }
        Some(FlowReply::Hang(pause)) => {
            hang = Some(pause);
            StatusCode::NO_CONTENT.into_response()
        }
        None => StatusCode::NO_CONTENT.into_response(),
    };
    let headers: BTreeMap<String, String> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let secret = state.secret.lock().ok().and_then(|s| s.clone());
    let signature = secret.map(|secret| {
        verify_signature(
            &secret,
            &headers,
            &body,
            chrono::Utc::now().timestamp(),
            SIGNATURE_TOLERANCE,
        )
    });
    let call = FlowCall {
        path: uri.path().to_owned(),
        json: serde_json::from_slice(&body).ok(),
        headers,
        body: body.to_vec(),
        signature,
        at: arrived_at,
        status: response.status().as_u16(),
    };
    if let Ok(mut calls) = state.calls.lock() {
        calls.push(call);
    }
    state.arrived.notify_waiters();
    // Recorded before hanging: the sender's timeout drops this future mid-sleep.
    if let Some(pause) = hang {
        tokio::time::sleep(pause).await;
    }
    response
}

/// The header a flow's HTTP Request step sends the shop's handover secret in.
pub const HANDOVER_SECRET_HEADER: &str = "x-handover-secret";

/// What a flow's handover step posts (the flow author's template; these are the keys ingress
/// reads).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Handover {
    pub conversation_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub msisdn: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub channel_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// Calls ingress's handover endpoint like a flow's HTTP Request step:
/// `POST {ingress}/flows/messagebird/{shop}/handover` with the secret in
/// [`HANDOVER_SECRET_HEADER`]. Returns the status and the JSON answer (`Null` when none).
pub async fn call_handover(
    client: &reqwest::Client,
    ingress_base_url: &str,
    shop_id: &str,
    handover_secret: &str,
    handover: &Handover,
) -> Result<(u16, Value), reqwest::Error> {
    let url = format!(
        "{}/flows/messagebird/{shop_id}/handover",
        ingress_base_url.trim_end_matches('/')
    );
    let response = client
        .post(url)
        .header(HANDOVER_SECRET_HEADER, handover_secret)
        .json(handover)
        .send()
        .await?;
    let status = response.status().as_u16();
    let bytes = response.bytes().await?;
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn headers(id: &str, ts: i64, sig: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("x-shopctrl-event-id".to_owned(), id.to_owned()),
            ("x-shopctrl-timestamp".to_owned(), ts.to_string()),
            ("x-shopctrl-signature".to_owned(), sig.to_owned()),
        ])
    }

    fn sign(secret: &str, id: &str, ts: i64, body: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).expect("key");
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(body);
        format!("v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn verifies_the_documented_scheme() {
        let sig = sign("s", "e1", 1000, b"{}");
        let tol = SIGNATURE_TOLERANCE;
        assert_eq!(
            verify_signature("s", &headers("e1", 1000, &sig), b"{}", 1000, tol),
            Ok(())
        );
        assert_eq!(
            verify_signature("x", &headers("e1", 1000, &sig), b"{}", 1000, tol),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature("s", &headers("e1", 1000, &sig), b"{}", 2000, tol),
            Err(SignatureError::Expired)
        );
        assert_eq!(
            verify_signature("s", &BTreeMap::new(), b"{}", 1000, tol),
            Err(SignatureError::Missing("x-shopctrl-event-id"))
        );
    }

    #[tokio::test]
    async fn records_and_scripts() -> Result<(), Box<dyn std::error::Error>> {
        let receiver = FlowReceiver::start().await?;
        receiver.set_secret("s");
        receiver.script([FlowReply::Status {
            status: 503,
            retry_after: Some("1".into()),
        }]);
        let client = reqwest::Client::new();
        let ts = chrono::Utc::now().timestamp();
        let body = br#"{"event":"employee_assigned"}"#;
        let sig = sign("s", "e1", ts, body);
        let send = || {
            client
                .post(receiver.url("f1"))
                .header("x-shopctrl-event-id", "e1")
                .header("x-shopctrl-timestamp", ts.to_string())
                .header("x-shopctrl-signature", sig.clone())
                .body(body.to_vec())
                .send()
        };
        assert_eq!(send().await?.status(), 503);
        assert_eq!(send().await?.status(), 204);
        let calls = receiver.wait_for_calls(2, Duration::from_secs(1)).await;
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].signature, Some(Ok(())));
        assert_eq!(
            calls[1].field("event").as_deref(),
            Some("employee_assigned")
        );
        assert_eq!(calls[1].path, "/flows/invocations/webhooks/f1");
        Ok(())
    }
}
