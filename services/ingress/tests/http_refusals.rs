//! Every refusal path of the public endpoints, driven through the real router with an
//! in-memory sink (so "nothing was published" is checked exactly), plus property tests:
//! arbitrary bodies and headers never panic and never publish.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests fail loudly

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Body,
    http::{Request, StatusCode},
};
use futures::future::BoxFuture;
use http_body_util_lite::collect;
use prometheus_client::registry::Registry;
use shopctrl_amqp::{Outgoing, PublishError};
use shopctrl_domain::ShardCount;
use shopctrl_ingress::{
    http::{AppState, HttpConfig, router},
    keys::{KeyCache, KeyLookupError, ShopKeys},
    metrics::Metrics,
    replay::MemoryReplay,
    signature::{sha256_hex, sign_jwt_hs256, sign_legacy},
    sink::EventSink,
};
use shopctrl_proto::v1::IngressShop;
use tower::ServiceExt;

mod http_body_util_lite {
    use axum::body::Body;

    pub async fn collect(body: Body) -> Vec<u8> {
        axum::body::to_bytes(body, usize::MAX)
            .await
            .map(|b| b.to_vec())
            .unwrap_or_default()
    }
}

const BASE: &str = "https://hooks.example.com";
const NOW: i64 = 1_700_000_000;
const KEY: &str = "shop-signing-key";

#[derive(Default)]
struct Shops(HashMap<String, IngressShop>);

impl ShopKeys for Shops {
    fn fetch<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<IngressShop>, KeyLookupError>> {
        Box::pin(async move {
            if shop_id == "config-down" {
                return Err(KeyLookupError::Unavailable("down".into()));
            }
            Ok(self.0.get(shop_id).cloned())
        })
    }
}

#[derive(Default)]
struct RecordingSink {
    published: Mutex<Vec<(String, String, Vec<u8>)>>,
    fail_with: Mutex<Option<fn() -> PublishError>>,
    /// When set, each publish waits for a permit: the confirm is late.
    gate: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
}

impl EventSink for RecordingSink {
    fn publish<'a>(&'a self, message: Outgoing<'a>) -> BoxFuture<'a, Result<(), PublishError>> {
        Box::pin(async move {
            let gate = self.gate.lock().expect("lock").clone();
            if let Some(gate) = gate {
                gate.acquire().await.expect("gate open").forget();
            }
            if let Some(fail) = *self.fail_with.lock().expect("lock") {
                return Err(fail());
            }
            self.published.lock().expect("lock").push((
                message.routing_key.to_owned(),
                message.message_id.to_owned(),
                message.payload.to_vec(),
            ));
            Ok(())
        })
    }

    fn check(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}

struct Harness {
    state: AppState,
    sink: Arc<RecordingSink>,
    registry: Registry,
}

fn harness(legacy_enabled: bool) -> Harness {
    let mut shops = Shops::default();
    shops.0.insert(
        "s1".into(),
        IngressShop {
            shop_id: "s1".into(),
            enabled: true,
            signing_key: KEY.into(),
            handover_secret: "hand-over-secret".into(),
            legacy_signature_enabled: false,
            version: 1,
        },
    );
    shops.0.insert(
        "legacy".into(),
        IngressShop {
            shop_id: "legacy".into(),
            enabled: true,
            signing_key: KEY.into(),
            legacy_signature_enabled: true,
            ..IngressShop::default()
        },
    );
    shops.0.insert(
        "off".into(),
        IngressShop {
            shop_id: "off".into(),
            enabled: false,
            signing_key: KEY.into(),
            ..IngressShop::default()
        },
    );
    let sink = Arc::new(RecordingSink::default());
    let mut registry = Registry::default();
    let state = AppState {
        config: Arc::new(HttpConfig {
            public_base_url: BASE.into(),
            max_body_bytes: 4096,
            legacy_enabled,
            legacy_window_seconds: 30,
            retry_after_seconds: 7,
            shards: ShardCount::new(4).expect("shards"),
            inbound_exchange: "messaging.inbound".into(),
            handover_secret_header: "x-handover-secret".into(),
        }),
        keys: Arc::new(KeyCache::new(
            Arc::new(shops),
            Duration::from_secs(60),
            Duration::from_secs(60),
        )),
        replay: Arc::new(MemoryReplay::default()),
        sink: sink.clone(),
        metrics: Metrics::new(&mut registry),
        clock: Arc::new(|| NOW),
        admission: Arc::new(tokio::sync::Semaphore::new(64)),
    };
    Harness {
        state,
        sink,
        registry,
    }
}

fn body() -> Vec<u8> {
    let path = format!(
        "{}/tests/payloads/conversations-whatsapp-inbound-text.message.created.json",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(path).expect("payload")
}

fn token(target: &str, body: &[u8], jti: &str) -> String {
    let mut claims = serde_json::json!({
        "iss": "MessageBird", "nbf": NOW, "exp": NOW + 60, "jti": jti,
        "url_hash": sha256_hex(format!("{BASE}{target}").as_bytes()),
    });
    if !body.is_empty() {
        claims["payload_hash"] = sha256_hex(body).into();
    }
    sign_jwt_hs256(KEY.as_bytes(), &claims)
}

async fn send(
    h: &Harness,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (StatusCode, serde_json::Value, Option<String>) {
    let mut request = Request::builder().method(method).uri(target);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = router(h.state.clone())
        .oneshot(request.body(Body::from(body)).expect("request"))
        .await
        .expect("infallible");
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = collect(response.into_body()).await;
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json, retry_after)
}

fn published(h: &Harness) -> usize {
    h.sink.published.lock().expect("lock").len()
}

const TARGET: &str = "/webhooks/messagebird/s1";

#[tokio::test]
async fn genuine_webhook_is_published_once_and_replay_is_not() {
    let h = harness(false);
    let body = body();
    let jwt = token(TARGET, &body, "jti-1");
    let headers = [
        ("content-type", "application/json"),
        ("messagebird-signature-jwt", jwt.as_str()),
    ];
    let (status, json, _) = send(&h, "POST", TARGET, &headers, body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["status"], "accepted");
    assert_eq!(published(&h), 1);
    let (routing_key, message_id, _) = h.sink.published.lock().expect("lock")[0].clone();
    assert_eq!(message_id, "1fb5ad6b7aeb4bc4ba4dd5ffffc1ebad");
    assert_eq!(
        routing_key,
        shopctrl_domain::shard_routing_key(
            "s1",
            "2e15efafec384e1c82e9842075e87beb",
            ShardCount::new(4).expect("n")
        )
    );
    // The same token again: 200, not published again.
    let (status, json, _) = send(&h, "POST", TARGET, &headers, body).await;
    assert_eq!(
        (status, json["status"].as_str()),
        (StatusCode::OK, Some("duplicate"))
    );
    assert_eq!(published(&h), 1);
}

#[tokio::test]
async fn refusals() {
    let h = harness(false);
    let body = body();
    let good = token(TARGET, &body, "j");
    let json_ct = ("content-type", "application/json");

    // 405 wrong method.
    let (status, _, _) = send(&h, "GET", TARGET, &[], vec![]).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _, _) = send(&h, "PUT", "/flows/messagebird/s1/handover", &[], vec![]).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    // 415 wrong or missing content type.
    let (status, _, _) = send(
        &h,
        "POST",
        TARGET,
        &[
            ("content-type", "text/plain"),
            ("messagebird-signature-jwt", &good),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (status, _, _) = send(
        &h,
        "POST",
        TARGET,
        &[("messagebird-signature-jwt", &good)],
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // 404 unknown and disabled shop, same body.
    let (s1, unknown, _) = send(
        &h,
        "POST",
        "/webhooks/messagebird/nope",
        &[json_ct],
        body.clone(),
    )
    .await;
    let (s2, disabled, _) = send(
        &h,
        "POST",
        "/webhooks/messagebird/off",
        &[json_ct],
        body.clone(),
    )
    .await;
    assert_eq!((s1, s2), (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND));
    assert_eq!(unknown, disabled);
    // 413 over the limit (declared and actual).
    let big = vec![b' '; 5000];
    let (status, _, _) = send(
        &h,
        "POST",
        TARGET,
        &[json_ct, ("messagebird-signature-jwt", &good)],
        big,
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // 401: missing, malformed, wrong key, wrong URL, tampered body, expired.
    let (status, json, _) = send(&h, "POST", TARGET, &[json_ct], body.clone()).await;
    assert_eq!(
        (status, json["reason"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("signature_missing"))
    );
    let (status, _, _) = send(
        &h,
        "POST",
        TARGET,
        &[json_ct, ("messagebird-signature-jwt", "garbage")],
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let other_key = sign_jwt_hs256(
        b"other",
        &serde_json::json!({"iss":"MessageBird","nbf":NOW,"exp":NOW+60,"jti":"x"}),
    );
    let (status, json, _) = send(
        &h,
        "POST",
        TARGET,
        &[json_ct, ("messagebird-signature-jwt", &other_key)],
        body.clone(),
    )
    .await;
    assert_eq!(
        (status, json["reason"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("signature_invalid"))
    );
    let wrong_url = token("/webhooks/messagebird/s1?x=1", &body, "j2");
    let (status, json, _) = send(
        &h,
        "POST",
        TARGET,
        &[json_ct, ("messagebird-signature-jwt", &wrong_url)],
        body.clone(),
    )
    .await;
    assert_eq!(
        (status, json["reason"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("claim_url_hash"))
    );
    let mut tampered = body.clone();
    tampered[10] ^= 1;
    let (status, json, _) = send(
        &h,
        "POST",
        TARGET,
        &[json_ct, ("messagebird-signature-jwt", &good)],
        tampered,
    )
    .await;
    assert_eq!(
        (status, json["reason"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("claim_payload_hash"))
    );
    let expired = sign_jwt_hs256(
        KEY.as_bytes(),
        &serde_json::json!({"iss":"MessageBird","nbf":NOW-200,"exp":NOW-100,"jti":"x",
        "url_hash": sha256_hex(format!("{BASE}{TARGET}").as_bytes()), "payload_hash": sha256_hex(&body)}),
    );
    let (status, json, _) = send(
        &h,
        "POST",
        TARGET,
        &[json_ct, ("messagebird-signature-jwt", &expired)],
        body.clone(),
    )
    .await;
    assert_eq!(
        (status, json["reason"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("claim_exp"))
    );
    // Legacy headers on a shop without legacy: 401.
    let ts = NOW.to_string();
    let legacy_sig = sign_legacy(KEY.as_bytes(), &ts, "", &body);
    let legacy = [
        json_ct,
        ("messagebird-signature", legacy_sig.as_str()),
        ("messagebird-request-timestamp", ts.as_str()),
    ];
    let (status, json, _) = send(&h, "POST", TARGET, &legacy, body.clone()).await;
    assert_eq!(
        (status, json["reason"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("legacy_disabled"))
    );
    // 400: verified but malformed / foreign body.
    for bad in [
        b"{}".to_vec(),
        b"[1,2]".to_vec(),
        b"{\"type\":\"message.created\"}".to_vec(),
    ] {
        let jwt = token(TARGET, &bad, "j3");
        let (status, _, _) = send(
            &h,
            "POST",
            TARGET,
            &[json_ct, ("messagebird-signature-jwt", &jwt)],
            bad,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
    // 503 with Retry-After when config is down for a shop never seen.
    let (status, _, retry) = send(
        &h,
        "POST",
        "/webhooks/messagebird/config-down",
        &[json_ct],
        body.clone(),
    )
    .await;
    assert_eq!(
        (status, retry.as_deref()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("7"))
    );
    assert_eq!(published(&h), 0, "no refusal may publish");
}

#[tokio::test]
async fn legacy_scheme_when_enabled_by_shop_or_deployment() {
    let body = body();
    let ts = NOW.to_string();
    let sig = sign_legacy(KEY.as_bytes(), &ts, "b=2&a=1", &body);
    let headers = [
        ("content-type", "application/json"),
        ("messagebird-signature", sig.as_str()),
        ("messagebird-request-timestamp", ts.as_str()),
    ];
    let h = harness(false);
    let (status, _, _) = send(
        &h,
        "POST",
        "/webhooks/messagebird/legacy?a=1&b=2",
        &headers,
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, json, _) = send(
        &h,
        "POST",
        "/webhooks/messagebird/legacy?a=1&b=2",
        &headers,
        body.clone(),
    )
    .await;
    assert_eq!(
        (status, json["status"].as_str()),
        (StatusCode::OK, Some("duplicate"))
    );
    assert_eq!(published(&h), 1);
    let h = harness(true);
    let (status, _, _) = send(
        &h,
        "POST",
        "/webhooks/messagebird/s1?a=1&b=2",
        &headers,
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let old = (NOW - 31).to_string();
    let sig = sign_legacy(KEY.as_bytes(), &old, "", &body);
    let stale = [
        ("content-type", "application/json"),
        ("messagebird-signature", sig.as_str()),
        ("messagebird-request-timestamp", old.as_str()),
    ];
    let (status, json, _) = send(&h, "POST", TARGET, &stale, body).await;
    assert_eq!(
        (status, json["reason"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("legacy_timestamp"))
    );
}

#[tokio::test]
async fn broker_failures_answer_503_with_retry_after() {
    let h = harness(false);
    let body = body();
    let failures: [fn() -> PublishError; 4] = [
        || PublishError::NotConnected("down".into()),
        || PublishError::Nacked,
        || PublishError::Timeout(Duration::from_secs(1)),
        || PublishError::Unroutable {
            exchange: "x".into(),
            routing_key: "shard.0".into(),
        },
    ];
    for (i, fail) in failures.into_iter().enumerate() {
        *h.sink.fail_with.lock().expect("lock") = Some(fail);
        let jwt = token(TARGET, &body, &format!("f{i}"));
        let (status, _, retry) = send(
            &h,
            "POST",
            TARGET,
            &[
                ("content-type", "application/json"),
                ("messagebird-signature-jwt", &jwt),
            ],
            body.clone(),
        )
        .await;
        assert_eq!(
            (status, retry.as_deref()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("7"))
        );
    }
    // The token was not remembered: MessageBird's retry goes through once the broker is back.
    *h.sink.fail_with.lock().expect("lock") = None;
    let jwt = token(TARGET, &body, "f0");
    let (status, json, _) = send(
        &h,
        "POST",
        TARGET,
        &[
            ("content-type", "application/json"),
            ("messagebird-signature-jwt", &jwt),
        ],
        body,
    )
    .await;
    assert_eq!(
        (status, json["status"].as_str()),
        (StatusCode::OK, Some("accepted"))
    );
    assert_eq!(published(&h), 1);
}

#[tokio::test]
async fn handover() {
    let h = harness(false);
    let target = "/flows/messagebird/s1/handover";
    let body = br#"{"conversationId":"2e15efafec384e1c82e9842075e87beb","msisdn":"+31612345678","reason":"after hours"}"#.to_vec();
    let (status, json, _) = send(
        &h,
        "POST",
        target,
        &[
            ("x-handover-secret", "hand-over-secret"),
            ("content-type", "application/json"),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["accepted"], true);
    assert_eq!(json["conversationId"], "2e15efafec384e1c82e9842075e87beb");
    // Bearer form and a missing content type are fine.
    let (status, _, _) = send(
        &h,
        "POST",
        target,
        &[("authorization", "Bearer hand-over-secret")],
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(published(&h), 2);
    let (routing_key, _, _) = h.sink.published.lock().expect("lock")[0].clone();
    assert_eq!(
        routing_key,
        shopctrl_domain::shard_routing_key(
            "s1",
            "2e15efafec384e1c82e9842075e87beb",
            ShardCount::new(4).expect("n")
        ),
        "handover travels through the conversation's shard"
    );
    for (headers, expected) in [
        (
            vec![("x-handover-secret", "wrong")],
            StatusCode::UNAUTHORIZED,
        ),
        (vec![], StatusCode::UNAUTHORIZED),
        (
            vec![
                ("x-handover-secret", "hand-over-secret"),
                ("content-type", "text/plain"),
            ],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
    ] {
        let (status, _, _) = send(&h, "POST", target, &headers, body.clone()).await;
        assert_eq!(status, expected);
    }
    let (status, _, _) = send(
        &h,
        "POST",
        target,
        &[("x-handover-secret", "hand-over-secret")],
        b"{\"msisdn\":1}".to_vec(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = send(
        &h,
        "POST",
        "/flows/messagebird/off/handover",
        &[("x-handover-secret", "hand-over-secret")],
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A shop without a handover secret refuses every caller.
    let (status, _, _) = send(
        &h,
        "POST",
        "/flows/messagebird/legacy/handover",
        &[("x-handover-secret", "")],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(published(&h), 2);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_requests_never_panic_or_publish(
        body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
        jwt in "[ -~]{0,300}",
        content_type in proptest::prop_oneof!["application/json", "[ -~]{0,40}"],
        shop in proptest::prop_oneof!["s1", "legacy", "off", "[a-z0-9]{1,8}"],
        legacy_sig in "[A-Za-z0-9+/=]{0,60}",
        legacy_ts in "[0-9]{0,12}",
        handover in proptest::prelude::any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let h = harness(true);
            let target = if handover { format!("/flows/messagebird/{shop}/handover") } else { format!("/webhooks/messagebird/{shop}") };
            let headers = [
                ("content-type", content_type.as_str()),
                ("messagebird-signature-jwt", jwt.as_str()),
                ("messagebird-signature", legacy_sig.as_str()),
                ("messagebird-request-timestamp", legacy_ts.as_str()),
                ("x-handover-secret", jwt.as_str()),
            ];
            let (status, _, _) = send(&h, "POST", &target, &headers, body).await;
            proptest::prop_assert!(status != StatusCode::OK && !status.is_server_error(), "{status}");
            proptest::prop_assert_eq!(published(&h), 0);
            Ok(())
        })?;
    }
}

/// More requests than MAX_IN_FLIGHT_REQUESTS at once: the extra one is refused at once with
/// 503 and Retry-After, counted, and not published; once a slot frees, the same webhook is
/// accepted.
#[tokio::test]
async fn requests_over_the_in_flight_limit_are_shed_with_503() {
    let mut h = harness(false);
    h.state.admission = Arc::new(tokio::sync::Semaphore::new(1));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *h.sink.gate.lock().expect("lock") = Some(gate.clone());
    let body = body();
    let first_jwt = token(TARGET, &body, "jti-first");
    let second_jwt = token(TARGET, &body, "jti-second");
    let h = Arc::new(h);
    let first = {
        let (h, body) = (h.clone(), body.clone());
        tokio::spawn(async move {
            let headers = [
                ("content-type", "application/json"),
                ("messagebird-signature-jwt", first_jwt.as_str()),
            ];
            send(&h, "POST", TARGET, &headers, body).await
        })
    };
    // The first request holds the only permit while its confirm is late.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.state.admission.available_permits() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "first request never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let headers = [
        ("content-type", "application/json"),
        ("messagebird-signature-jwt", second_jwt.as_str()),
    ];
    let (status, json, retry_after) = send(&h, "POST", TARGET, &headers, body.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(json["reason"], "overloaded");
    assert_eq!(retry_after.as_deref(), Some("7"));
    assert_eq!(published(&h), 0);
    let (status, _, retry_after) = send(
        &h,
        "POST",
        "/flows/messagebird/s1/handover",
        &[("content-type", "application/json")],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(
        (status, retry_after.as_deref()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("7")),
        "the handover endpoint shares the limit"
    );
    // The confirm arrives: the first is accepted, and MessageBird's retry of the second too.
    gate.add_permits(2);
    let (status, _, _) = first.await.expect("first request");
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = send(&h, "POST", TARGET, &headers, body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(published(&h), 2);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &h.registry).expect("encode");
    assert!(
        text.lines()
            .any(|l| l.starts_with("ingress_refusals_total{reason=\"overloaded\"} 2")),
        "{text}"
    );
}
