//! The public HTTP surface: `POST /webhooks/messagebird/{shop}` and
//! `POST /flows/messagebird/{shop}/handover`. Each request is answered 200 only after the
//! broker confirmed its event; every refusal has one status, one JSON body and one metric
//! reason, and is logged without secrets or bodies.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use prost::Message as _;
use shopctrl_amqp::{Outgoing, PublishError};
use shopctrl_domain::{ShardCount, shard_routing_key};
use shopctrl_proto::v1::{EventMeta, HandoverRequest, InboundWebhookEvent, IngressShop};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::{
    keys::{KeyCache, KeyLookupError, ShopLookup},
    metrics::{Kind, Metrics, RouteStatus},
    payload::{PayloadError, parse_handover, parse_webhook},
    replay::ReplayStore,
    signature::{self, SignatureError},
    sink::EventSink,
};

/// Makes the request span a child of the caller's W3C trace context, if any.
fn set_parent(span: &tracing::Span, headers: &HeaderMap) {
    shopctrl_telemetry::set_parent_from_headers(
        span,
        headers
            .iter()
            .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v))),
    );
}

pub const WEBHOOK_TYPE: &str = "shopctrl.messaging.v1.InboundWebhookEvent";
pub const HANDOVER_TYPE: &str = "shopctrl.messaging.v1.HandoverRequest";
const ROUTE_WEBHOOK: &str = "webhook";
const ROUTE_HANDOVER: &str = "handover";

/// The request-independent settings the handlers need.
#[derive(Clone)]
pub struct HttpConfig {
    /// Without a trailing slash.
    pub public_base_url: String,
    pub max_body_bytes: usize,
    pub legacy_enabled: bool,
    pub legacy_window_seconds: i64,
    pub retry_after_seconds: u32,
    pub shards: ShardCount,
    pub inbound_exchange: String,
    pub handover_secret_header: String,
}

/// Unix seconds now (a function so tests can pin the clock).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Everything a handler shares.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<HttpConfig>,
    pub keys: Arc<KeyCache>,
    pub replay: Arc<dyn ReplayStore>,
    pub sink: Arc<dyn EventSink>,
    pub metrics: Metrics,
    pub clock: Clock,
    /// Admission: one permit per request handled at once (`MAX_IN_FLIGHT_REQUESTS`).
    pub admission: Arc<Semaphore>,
}

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| chrono::Utc::now().timestamp())
}

/// The router of the public listener.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/webhooks/messagebird/{shop}",
            post(webhook).fallback(method_not_allowed_webhook),
        )
        .route(
            "/flows/messagebird/{shop}/handover",
            post(handover).fallback(method_not_allowed_handover),
        )
        .with_state(state)
}

/// Why a request was not accepted.
#[derive(Debug)]
enum Refusal {
    MethodNotAllowed,
    UnsupportedMediaType,
    TooLarge,
    BadBody(&'static str),
    NotFound,
    Unauthorized(&'static str),
    Unavailable(&'static str),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadBody(_) => StatusCode::BAD_REQUEST,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::MethodNotAllowed => "method_not_allowed",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::TooLarge => "body_too_large",
            Self::BadBody(reason) | Self::Unauthorized(reason) | Self::Unavailable(reason) => {
                reason
            }
            Self::NotFound => "shop_not_found",
        }
    }

    fn message(&self) -> &'static str {
        match self {
            Self::MethodNotAllowed => "method not allowed; use POST",
            Self::UnsupportedMediaType => "content type must be application/json",
            Self::TooLarge => "body too large",
            Self::BadBody(_) => "malformed body",
            // One body for unknown and disabled shops: nothing to learn from the difference.
            Self::NotFound => "not found",
            Self::Unauthorized(_) => "invalid signature",
            Self::Unavailable(_) => "temporarily unavailable; retry later",
        }
    }
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    // Serializing strings and flat maps cannot fail; an empty object would still be JSON.
    let body = serde_json::to_string(body).unwrap_or_else(|_| "{}".to_owned());
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// A webhook's answer, serialized straight from this (the hot path builds no JSON tree).
#[derive(serde::Serialize)]
struct WebhookAnswer<'a> {
    status: &'static str,
    #[serde(rename = "eventId")]
    event_id: &'a str,
}

fn refuse(state: &AppState, route: &'static str, refusal: Refusal, detail: &str) -> Response {
    let status = refusal.status();
    let reason = refusal.reason();
    state.metrics.refuse(reason);
    state
        .metrics
        .requests
        .get_or_create(&RouteStatus {
            route,
            status: status.as_u16(),
        })
        .inc();
    if reason == "overloaded" {
        // One line per shed request would flood the logs exactly when the service is busiest;
        // the refusal counter shows it.
        tracing::debug!(route, "request shed: too many in flight");
    } else if status.is_server_error() {
        tracing::warn!(
            route,
            status = status.as_u16(),
            reason,
            detail,
            "request not accepted"
        );
    } else {
        tracing::info!(
            route,
            status = status.as_u16(),
            reason,
            detail,
            "request refused"
        );
    }
    let mut response = json_response(
        status,
        &serde_json::json!({ "error": refusal.message(), "reason": reason }),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(state.config.retry_after_seconds),
        );
    }
    response
}

fn accept(state: &AppState, route: &'static str, body: &impl serde::Serialize) -> Response {
    state
        .metrics
        .requests
        .get_or_create(&RouteStatus { route, status: 200 })
        .inc();
    json_response(StatusCode::OK, body)
}

async fn method_not_allowed_webhook(State(state): State<AppState>) -> Response {
    refuse(&state, ROUTE_WEBHOOK, Refusal::MethodNotAllowed, "")
}

async fn method_not_allowed_handover(State(state): State<AppState>) -> Response {
    refuse(&state, ROUTE_HANDOVER, Refusal::MethodNotAllowed, "")
}

/// `application/json`, with parameters, or any `+json` type.
fn is_json(headers: &HeaderMap, allow_missing: bool) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return allow_missing;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

async fn read_body(body: Body, headers: &HeaderMap, max: usize) -> Result<Bytes, Refusal> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(Refusal::TooLarge);
    }
    axum::body::to_bytes(body, max).await.map_err(|error| {
        // A length-limit error and a broken connection look alike from here; both are the
        // client's side, and the limit is by far the likely one once the header passed.
        tracing::debug!(%error, "reading the body failed");
        Refusal::TooLarge
    })
}

async fn lookup_shop(state: &AppState, shop_id: &str) -> Result<Arc<IngressShop>, Refusal> {
    if shop_id.is_empty() || shop_id.len() > 128 {
        return Err(Refusal::NotFound);
    }
    match state.keys.get(shop_id).await {
        Ok(ShopLookup::Enabled(shop)) => Ok(shop),
        Ok(ShopLookup::NotFound) => Err(Refusal::NotFound),
        Err(error) => {
            state.metrics.config_lookup_errors.inc();
            match error {
                KeyLookupError::Unavailable(_) | KeyLookupError::Unauthorized(_) => {
                    tracing::warn!(shop_id, %error, "cannot look up the shop's keys");
                    Err(Refusal::Unavailable("config_unavailable"))
                }
            }
        }
    }
}

fn publish_refusal(error: &PublishError) -> Refusal {
    Refusal::Unavailable(match error {
        PublishError::NotConnected(_) => "broker_unavailable",
        PublishError::Broker(_) => "publish_failed",
        PublishError::Nacked => "publish_nacked",
        PublishError::Unroutable { .. } => "publish_unroutable",
        PublishError::Timeout(_) => "publish_timeout",
    })
}

async fn publish(
    state: &AppState,
    routing_key: &str,
    message_type: &str,
    event_id: &str,
    payload: &[u8],
    shop_id: &str,
) -> Result<(), PublishError> {
    let mut headers = shopctrl_telemetry::inject_current();
    headers.push(("x-shop-id".to_owned(), shop_id.to_owned()));
    let started = Instant::now();
    let result = state
        .sink
        .publish(Outgoing {
            exchange: &state.config.inbound_exchange,
            routing_key,
            message_type,
            message_id: event_id,
            payload,
            headers: &headers,
            mandatory: true,
        })
        .await;
    state
        .metrics
        .publish_seconds
        .observe(started.elapsed().as_secs_f64());
    result
}

fn now_timestamp() -> Option<prost_types::Timestamp> {
    let now = chrono::Utc::now();
    Some(prost_types::Timestamp {
        seconds: now.timestamp(),
        nanos: i32::try_from(now.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

/// Decrements the in-flight gauge however the handler ends (including a dropped future).
struct InFlight(Metrics);

impl InFlight {
    fn start(metrics: &Metrics) -> Self {
        metrics.in_flight.inc();
        Self(metrics.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// The verified result of a webhook's signature check.
struct Verified {
    scheme: &'static str,
    /// Replay-memory key and how long to keep it.
    replay: (String, Duration),
}

fn verify_request(
    state: &AppState,
    shop: &IngressShop,
    shop_id: &str,
    headers: &HeaderMap,
    target: &str,
    body: &[u8],
) -> Result<Verified, SignatureError> {
    let now = (state.clock)();
    let key = shop.signing_key.as_bytes();
    if let Some(token) = headers.get(signature::JWT_HEADER) {
        let token = token.to_str().map_err(|_| SignatureError::Malformed)?;
        let url = format!("{}{}", state.config.public_base_url, target);
        let verified = signature::verify_jwt(token, key, &url, body, now)?;
        // Kept until the token could no longer pass the exp check anyway, plus a margin.
        let ttl = (verified.exp + signature::LEEWAY_SECONDS + 5 - now).max(1);
        return Ok(Verified {
            scheme: "jwt",
            replay: (
                format!("{shop_id}:jti:{}", verified.jti),
                Duration::from_secs(ttl.unsigned_abs()),
            ),
        });
    }
    let legacy_signature = headers.get(signature::LEGACY_SIGNATURE_HEADER);
    let legacy_timestamp = headers.get(signature::LEGACY_TIMESTAMP_HEADER);
    let (Some(sig), Some(ts)) = (legacy_signature, legacy_timestamp) else {
        return Err(SignatureError::Missing);
    };
    if !(state.config.legacy_enabled || shop.legacy_signature_enabled) {
        return Err(SignatureError::LegacyDisabled);
    }
    let sig = sig.to_str().map_err(|_| SignatureError::Malformed)?;
    let ts = ts.to_str().map_err(|_| SignatureError::LegacyTimestamp)?;
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let window = state.config.legacy_window_seconds;
    signature::verify_legacy(sig, ts, query, body, key, now, window)?;
    let ttl = (2 * window + 5).max(1);
    Ok(Verified {
        scheme: "legacy",
        replay: (
            format!("{shop_id}:legacy:{}", sig.trim()),
            Duration::from_secs(ttl.unsigned_abs()),
        ),
    })
}

async fn webhook(
    State(state): State<AppState>,
    Path(shop_id): Path<String>,
    request: Request,
) -> Response {
    let span = tracing::info_span!("webhook", shop_id = %shop_id, event_id = tracing::field::Empty);
    set_parent(&span, request.headers());
    // Over the limit: refused before the body is read, so it costs no memory and no wait.
    let Ok(_admitted) = state.admission.clone().try_acquire_owned() else {
        return refuse(
            &state,
            ROUTE_WEBHOOK,
            Refusal::Unavailable("overloaded"),
            "",
        );
    };
    let _in_flight = InFlight::start(&state.metrics);
    match handle_webhook(&state, &shop_id, request)
        .instrument(span)
        .await
    {
        Ok(response) => response,
        Err((refusal, detail)) => refuse(&state, ROUTE_WEBHOOK, refusal, &detail),
    }
}

async fn handle_webhook(
    state: &AppState,
    shop_id: &str,
    request: Request,
) -> Result<Response, (Refusal, String)> {
    let (parts, body) = request.into_parts();
    if !is_json(&parts.headers, false) {
        return Err((Refusal::UnsupportedMediaType, String::new()));
    }
    let shop = lookup_shop(state, shop_id)
        .await
        .map_err(|r| (r, String::new()))?;
    let body = read_body(body, &parts.headers, state.config.max_body_bytes)
        .await
        .map_err(|r| (r, String::new()))?;
    // The raw request target as received: the URL MessageBird signed.
    let target = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let verified = verify_request(state, &shop, shop_id, &parts.headers, target, &body)
        .map_err(|e| (Refusal::Unauthorized(e.metric_reason()), e.to_string()))?;
    let parsed = parse_webhook(&body).map_err(|e| {
        let reason = match e {
            PayloadError::ForeignFormat => "foreign_format",
            _ => "malformed_body",
        };
        (Refusal::BadBody(reason), e.to_string())
    })?;
    tracing::Span::current().record("event_id", parsed.event_id.as_str());

    let (replay_key, replay_ttl) = &verified.replay;
    match state.replay.seen(replay_key).await {
        Ok(true) => {
            state.metrics.replays.inc();
            tracing::info!(event_id = %parsed.event_id, "replayed token; already published");
            return Ok(accept(
                state,
                ROUTE_WEBHOOK,
                &WebhookAnswer {
                    status: "duplicate",
                    event_id: &parsed.event_id,
                },
            ));
        }
        Ok(false) => {}
        Err(error) => {
            state.metrics.replay_store_errors.inc();
            if state.metrics.replay_warning.allow((state.clock)()) {
                tracing::warn!(%error, "replay memory unavailable; publishing without the check (one line a second; ingress_replay_store_errors_total counts them)");
            }
        }
    }

    let mut event = parsed.event;
    event.meta = Some(EventMeta {
        event_id: parsed.event_id.clone(),
        occurred_at: event
            .message
            .as_ref()
            .and_then(|m| m.updated_at.or(m.created_at)),
        producer: "ingress".to_owned(),
    });
    event.shop_id = shop_id.to_owned();
    event.signature_scheme = verified.scheme.to_owned();
    event.received_at = now_timestamp();
    event.raw_body = body.to_vec();
    let routing_key = shard_routing_key(
        shop_id,
        &event.messagebird_conversation_id,
        state.config.shards,
    );
    let payload = InboundWebhookEvent::encode_to_vec(&event);
    publish(
        state,
        &routing_key,
        WEBHOOK_TYPE,
        &parsed.event_id,
        &payload,
        shop_id,
    )
    .await
    .map_err(|e| (publish_refusal(&e), e.to_string()))?;
    state
        .metrics
        .published
        .get_or_create(&Kind { kind: "webhook" })
        .inc();

    // Not awaited: the event is safe with the broker, so the answer need not wait for Redis.
    if let Err(error) = state.replay.remember_in_background(replay_key, *replay_ttl) {
        state.metrics.replay_store_errors.inc();
        if state.metrics.replay_warning.allow((state.clock)()) {
            tracing::warn!(%error, "cannot remember the token id; a replay would be published again (one line a second; ingress_replay_store_errors_total counts them)");
        }
    }
    Ok(accept(
        state,
        ROUTE_WEBHOOK,
        &WebhookAnswer {
            status: "accepted",
            event_id: &parsed.event_id,
        },
    ))
}

async fn handover(
    State(state): State<AppState>,
    Path(shop_id): Path<String>,
    request: Request,
) -> Response {
    let span =
        tracing::info_span!("handover", shop_id = %shop_id, event_id = tracing::field::Empty);
    set_parent(&span, request.headers());
    // Over the limit: refused before the body is read, so it costs no memory and no wait.
    let Ok(_admitted) = state.admission.clone().try_acquire_owned() else {
        return refuse(
            &state,
            ROUTE_HANDOVER,
            Refusal::Unavailable("overloaded"),
            "",
        );
    };
    let _in_flight = InFlight::start(&state.metrics);
    match handle_handover(&state, &shop_id, request)
        .instrument(span)
        .await
    {
        Ok(response) => response,
        Err((refusal, detail)) => refuse(&state, ROUTE_HANDOVER, refusal, &detail),
    }
}

fn presented_secret<'a>(headers: &'a HeaderMap, header_name: &str) -> Option<&'a str> {
    if let Some(value) = headers.get(header_name).and_then(|v| v.to_str().ok()) {
        return Some(value.trim());
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("Bearer "))
        .map(str::trim)
}

async fn handle_handover(
    state: &AppState,
    shop_id: &str,
    request: Request,
) -> Result<Response, (Refusal, String)> {
    let (parts, body) = request.into_parts();
    // Flow authors may forget "Set Content-Type header"; a missing type is accepted.
    if !is_json(&parts.headers, true) {
        return Err((Refusal::UnsupportedMediaType, String::new()));
    }
    let shop = lookup_shop(state, shop_id)
        .await
        .map_err(|r| (r, String::new()))?;
    let body = read_body(body, &parts.headers, state.config.max_body_bytes)
        .await
        .map_err(|r| (r, String::new()))?;
    let presented = presented_secret(&parts.headers, &state.config.handover_secret_header);
    let authorized = match presented {
        Some(secret) if !shop.handover_secret.is_empty() => {
            signature::constant_time_eq(secret.as_bytes(), shop.handover_secret.as_bytes())
        }
        _ => false,
    };
    if !authorized {
        let reason = if presented.is_none() {
            "handover_secret_missing"
        } else {
            "handover_secret_invalid"
        };
        return Err((Refusal::Unauthorized(reason), String::new()));
    }
    let parsed =
        parse_handover(&body).map_err(|e| (Refusal::BadBody("malformed_body"), e.to_string()))?;
    let event_id = uuid::Uuid::now_v7().to_string();
    tracing::Span::current().record("event_id", event_id.as_str());
    let event = HandoverRequest {
        meta: Some(EventMeta {
            event_id: event_id.clone(),
            occurred_at: now_timestamp(),
            producer: "ingress".to_owned(),
        }),
        shop_id: shop_id.to_owned(),
        messagebird_conversation_id: parsed.conversation_id.clone(),
        msisdn: parsed.msisdn,
        channel_id: parsed.channel_id,
        reason: parsed.reason,
        received_at: now_timestamp(),
    };
    let routing_key = shard_routing_key(shop_id, &parsed.conversation_id, state.config.shards);
    publish(
        state,
        &routing_key,
        HANDOVER_TYPE,
        &event_id,
        &event.encode_to_vec(),
        shop_id,
    )
    .await
    .map_err(|e| (publish_refusal(&e), e.to_string()))?;
    state
        .metrics
        .published
        .get_or_create(&Kind { kind: "handover" })
        .inc();
    // Flat keys: a flow's Fetch-variables step maps top-level keys to variables.
    Ok(accept(
        state,
        ROUTE_HANDOVER,
        &serde_json::json!({
            "status": "accepted",
            "accepted": true,
            "conversationId": parsed.conversation_id,
            "eventId": event_id,
        }),
    ))
}
