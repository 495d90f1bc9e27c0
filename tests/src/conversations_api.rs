//! The MessageBird Conversations API, as much as flow-callback uses of it: `POST /v1/send`,
//! `POST /v1/conversations/{id}/messages` and `POST /v1/conversations/start`. It checks the
//! `Authorization: AccessKey …` header and the shape of text and template (`hsm`) content,
//! records every request, and answers what a test scripted (429 or 5xx with `Retry-After`,
//! 4xx with MessageBird's `errors[]`, a hang past the caller's timeout) before falling back to
//! success. Error bodies follow MessageBird's error object
//! (`{"errors":[{"code","description","parameter"}]}`).

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::Notify, task::JoinHandle};

/// One request the API received.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub path: String,
    /// The key after `AccessKey `, when the header had that form.
    pub access_key: Option<String>,
    pub body: Value,
    pub headers: Vec<(String, String)>,
    /// When the request arrived (before any scripted hang).
    pub at: Instant,
    /// The status it was answered with.
    pub status: u16,
}

/// A scripted answer for the next request.
#[derive(Debug, Clone)]
pub enum ApiReply {
    /// The normal success answer.
    Accept,
    /// A bare status (e.g. 429 or 503), with an optional `Retry-After`.
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    /// MessageBird's error object with this status, code and description.
    Errors {
        status: u16,
        code: i64,
        description: String,
    },
    /// Waits this long before the normal success answer (a caller's timeout fires first).
    Hang(Duration),
}

#[derive(Default)]
struct ApiState {
    requests: Mutex<Vec<ApiRequest>>,
    script: Mutex<VecDeque<ApiReply>>,
    /// When set, only these access keys are accepted.
    keys: Mutex<Option<Vec<String>>>,
    arrived: Notify,
}

/// A running simulated Conversations API.
pub struct ConversationsApi {
    addr: SocketAddr,
    state: Arc<ApiState>,
    task: JoinHandle<()>,
}

impl ConversationsApi {
    /// Serves on 127.0.0.1 with a free port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Serves on `addr` (the simulator binary uses a fixed port).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ApiState::default());
        let router = router(state.clone());
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                tracing::warn!(%error, "simulated Conversations API stopped");
            }
        });
        Ok(Self { addr, state, task })
    }

    /// The base URL to give flow-callback as `MESSAGEBIRD_API_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Accept only these access keys (401 with MessageBird's error otherwise).
    pub fn require_access_keys(&self, keys: &[&str]) {
        if let Ok(mut k) = self.state.keys.lock() {
            *k = Some(keys.iter().map(|s| (*s).to_owned()).collect());
        }
    }

    /// Queues answers for the next requests, in order; after them every request succeeds.
    pub fn script(&self, replies: impl IntoIterator<Item = ApiReply>) {
        if let Ok(mut script) = self.state.script.lock() {
            script.extend(replies);
        }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.state
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Waits until at least `n` requests arrived (or `timeout` passed) and returns them all.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<ApiRequest> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.state.arrived.notified();
            let requests = self.requests();
            if requests.len() >= n {
                return requests;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.requests();
            }
        }
    }
}

impl Drop for ConversationsApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/send", post(send))
        .route("/v1/conversations/start", post(start_conversation))
        .route("/v1/conversations/{id}/messages", post(reply))
        .with_state(state)
}

fn error_body(
    status: StatusCode,
    code: i64,
    description: &str,
    parameter: Option<&str>,
) -> Response {
    (
        status,
        Json(json!({ "errors": [ { "code": code, "description": description, "parameter": parameter } ] })),
    )
        .into_response()
}

/// Checks `type` and `content` the way MessageBird would refuse them.
fn content_problem(body: &Value) -> Option<&'static str> {
    let content = body.get("content")?;
    match body.get("type").and_then(Value::as_str) {
        Some("text") => content
            .get("text")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map_or(Some("content.text"), |_| None),
        Some("hsm") => {
            let hsm = content.get("hsm")?;
            for field in ["namespace", "templateName"] {
                if hsm
                    .get(field)
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    return Some("content.hsm");
                }
            }
            hsm.get("language")
                .and_then(|l| l.get("code"))
                .and_then(Value::as_str)
                .map_or(Some("content.hsm.language"), |_| None)
        }
        _ => Some("type"),
    }
}

async fn handle(
    state: Arc<ApiState>,
    path: String,
    headers: HeaderMap,
    body: Value,
    success: impl FnOnce(&Value) -> (StatusCode, Value),
) -> Response {
    let arrived_at = Instant::now();
    let access_key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("AccessKey "))
        .map(str::to_owned);
    let allowed = match (&access_key, state.keys.lock().ok().and_then(|k| k.clone())) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(key), Some(keys)) => keys.contains(key),
    };
    let scripted = state.script.lock().ok().and_then(|mut s| s.pop_front());
    let mut hang = None;
    let response = if !allowed {
        error_body(
            StatusCode::UNAUTHORIZED,
            2,
            "Request not allowed (incorrect access_key)",
            None,
        )
    } else {
        match scripted.unwrap_or(ApiReply::Accept) {
            ApiReply::Status {
                status,
                retry_after,
            } => {
                let mut response = StatusCode::from_u16(status)
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                    .into_response();
                if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
                response
            }
            ApiReply::Errors {
                status,
                code,
                description,
            } => error_body(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                code,
                &description,
                None,
            ),
            ApiReply::Hang(pause) => {
                hang = Some(pause);
                accept(&body, success)
            }
            ApiReply::Accept => accept(&body, success),
        }
    };
    let record = ApiRequest {
        path,
        access_key,
        body,
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        at: arrived_at,
        status: response.status().as_u16(),
    };
    if let Ok(mut requests) = state.requests.lock() {
        requests.push(record);
    }
    state.arrived.notify_waiters();
    // Recorded before hanging: the caller's timeout drops this future mid-sleep.
    if let Some(pause) = hang {
        tokio::time::sleep(pause).await;
    }
    response
}

fn accept(body: &Value, success: impl FnOnce(&Value) -> (StatusCode, Value)) -> Response {
    match content_problem(body) {
        Some(parameter) => error_body(StatusCode::BAD_REQUEST, 21, "Bad request", Some(parameter)),
        None => {
            let (status, json) = success(body);
            (status, Json(json)).into_response()
        }
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn message(conversation_id: &str, body: &Value) -> Value {
    let now = chrono::Utc::now().to_rfc3339();
    json!({
        "id": new_id(),
        "conversationId": conversation_id,
        "channelId": body.get("channelId").or_else(|| body.get("from")).cloned().unwrap_or(Value::Null),
        "platform": "whatsapp",
        "status": "pending",
        "direction": "sent",
        "type": body.get("type").cloned().unwrap_or(Value::Null),
        "content": body.get("content").cloned().unwrap_or(Value::Null),
        "createdDatetime": now,
        "updatedDatetime": now,
    })
}

async fn send(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    handle(state, "/v1/send".into(), headers, body, |_| {
        (
            StatusCode::ACCEPTED,
            json!({ "id": new_id(), "status": "accepted" }),
        )
    })
    .await
}

async fn start_conversation(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    handle(state, "/v1/conversations/start".into(), headers, body, |body| {
        let conversation = new_id();
        (
            StatusCode::CREATED,
            json!({ "id": conversation, "status": "active", "lastUsedChannelId": body.get("channelId"),
                    "messages": { "lastMessageId": new_id(), "totalCount": 1 } }),
        )
    })
    .await
}

async fn reply(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let path = format!("/v1/conversations/{id}/messages");
    handle(state, path, headers, body, move |body| {
        (StatusCode::CREATED, message(&id, body))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scripted_answers_then_success() -> Result<(), Box<dyn std::error::Error>> {
        let api = ConversationsApi::start().await?;
        api.script([
            ApiReply::Status {
                status: 429,
                retry_after: Some("3".into()),
            },
            ApiReply::Errors {
                status: 422,
                code: 470,
                description: "outside window".into(),
            },
        ]);
        let client = reqwest::Client::new();
        let url = format!("{}/v1/conversations/c1/messages", api.base_url());
        let body = json!({ "type": "text", "content": { "text": "hi" } });
        let first = client
            .post(&url)
            .header("Authorization", "AccessKey k")
            .json(&body)
            .send()
            .await?;
        assert_eq!(first.status(), 429);
        assert_eq!(first.headers()["retry-after"], "3");
        let second = client
            .post(&url)
            .header("Authorization", "AccessKey k")
            .json(&body)
            .send()
            .await?;
        assert_eq!(second.status(), 422);
        let error: Value = second.json().await?;
        assert_eq!(error["errors"][0]["code"], 470);
        let third = client
            .post(&url)
            .header("Authorization", "AccessKey k")
            .json(&body)
            .send()
            .await?;
        assert_eq!(third.status(), 201);
        let message: Value = third.json().await?;
        assert_eq!(message["conversationId"], "c1");
        let unauthorized = client.post(&url).json(&body).send().await?;
        assert_eq!(unauthorized.status(), 401);
        let bad = client
            .post(&url)
            .header("Authorization", "AccessKey k")
            .json(&json!({ "type": "hsm", "content": { "hsm": {} } }))
            .send()
            .await?;
        assert_eq!(bad.status(), 400);
        let requests = api.wait_for_requests(5, Duration::from_secs(1)).await;
        assert_eq!(requests.len(), 5);
        assert_eq!(requests[0].access_key.as_deref(), Some("k"));
        Ok(())
    }
}
