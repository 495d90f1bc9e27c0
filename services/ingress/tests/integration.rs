//! The real server against the real RabbitMQ and Redis, with an in-process fake of the config
//! service reached through ingress's real gRPC client: exactly-once arrival with the right
//! properties and headers, 503 (and nothing published) when the broker is cut or the exchange
//! is missing or nothing is bound, key changes through ConfigChanged without restart, cached
//! keys during a config outage, readiness and graceful shutdown; connections beyond the limit
//! wait, and idle ones are closed.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests fail loudly

use std::{sync::OnceLock, time::Duration};

use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{BasicGetOptions, BasicPublishOptions, ExchangeDeleteOptions},
};
use prost::Message as _;
use shopctrl_amqp::{Names, QueueSpec, declare_exchange, declare_queue};
use shopctrl_ingress::{
    App, Settings,
    fake_config::FakeConfig,
    signature::{sha256_hex, sign_jwt_hs256},
};
use shopctrl_proto::v1::{ConfigChanged, InboundWebhookEvent, IngressShop};
use shopctrl_testkit::{TcpProxy, TestAmqp, TestRedis};
use tokio_util::sync::CancellationToken;

const BASE: &str = "https://hooks.example.test";
const TOKEN: &str = "test-ingress-token";
const SHARDS: u32 = 4;

/// Spans get real trace ids (no exporter), so trace-context propagation is observable.
fn tracing_with_otel() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let tracer = provider.tracer("ingress-test");
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("info"))
            .with(tracing_opentelemetry::layer().with_tracer(tracer));
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

struct Stack {
    amqp: TestAmqp,
    _redis: TestRedis,
    config: FakeConfig,
    config_stop: CancellationToken,
    names: Names,
    http: String,
    ops: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    broker: Connection,
}

impl Stack {
    /// Starts ingress; `amqp_url` lets a test put a proxy between ingress and the broker.
    async fn start(amqp_url: Option<String>, bind_queue: bool) -> Self {
        Self::start_with(amqp_url, bind_queue, |_| {}).await
    }

    /// Like [`Stack::start`], with settings adjusted by `adjust`.
    async fn start_with(
        amqp_url: Option<String>,
        bind_queue: bool,
        adjust: impl FnOnce(&mut Settings),
    ) -> Self {
        tracing_with_otel();
        let amqp = TestAmqp::create().await;
        let redis = TestRedis::create().await;
        let names = Names::new(amqp.prefix());
        let broker = Connection::connect(amqp.url(), ConnectionProperties::default())
            .await
            .expect("broker");
        let channel = broker.create_channel().await.expect("channel");
        declare_exchange(&channel, &names.inbound_exchange(), ExchangeKind::Direct)
            .await
            .expect("exchange");
        amqp.track_exchange(names.inbound_exchange());
        amqp.track_exchange(names.config_exchange());
        if bind_queue {
            bind_test_queue(&amqp, &channel, &names).await;
        }

        let config = FakeConfig::new(TOKEN);
        config.upsert(shop("s1", "key-one"));
        let config_stop = CancellationToken::new();
        let config_addr = config
            .clone()
            .serve("127.0.0.1:0".parse().expect("addr"), config_stop.clone())
            .await
            .expect("fake config");

        let mut settings = Settings::for_tests();
        settings.amqp_url = amqp_url.unwrap_or_else(|| amqp.url().to_owned());
        settings.amqp_prefix = amqp.prefix().to_owned();
        settings.redis_url = redis.url().to_owned();
        settings.redis_key_prefix = redis.prefix().to_owned();
        settings.config_grpc_url = format!("http://{config_addr}");
        settings.config_service_token = TOKEN.into();
        settings.public_base_url = BASE.into();
        settings.routing_shards = SHARDS;
        settings.publish_confirm_timeout_ms = 2_000;
        settings.shutdown_grace_seconds = 5;
        adjust(&mut settings);
        let app = App::build(settings).await.expect("ingress builds");
        let http = format!("http://{}", app.http_addr().expect("addr"));
        let ops = format!("http://{}", app.ops_addr().expect("addr"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run(stop.clone()));
        let stack = Self {
            amqp,
            _redis: redis,
            config,
            config_stop,
            names,
            http,
            ops,
            stop,
            task,
            broker,
        };
        stack.wait_ready().await;
        stack
    }

    async fn wait_ready(&self) {
        for _ in 0..100 {
            if let Ok(r) = reqwest::get(format!("{}/readyz", self.ops)).await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("ingress never became ready");
    }

    fn queue(&self) -> String {
        self.names.custom("test.inbound")
    }

    async fn get(&self) -> Option<lapin::message::BasicGetMessage> {
        let channel = self.broker.create_channel().await.expect("channel");
        let message = channel
            .basic_get(
                self.queue().as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic_get");
        let _ = channel.close(200, "ok".into()).await;
        message
    }

    async fn stop(self) {
        self.stop.cancel();
        let result = tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("graceful shutdown in time")
            .expect("join");
        result.expect("run ends cleanly");
        self.config_stop.cancel();
    }
}

async fn bind_test_queue(amqp: &TestAmqp, channel: &Channel, names: &Names) {
    let mut spec = QueueSpec::quorum(names.custom("test.inbound"));
    for shard in 0..SHARDS {
        spec = spec.bind(names.inbound_exchange(), format!("shard.{shard}"));
    }
    declare_queue(channel, &spec).await.expect("queue");
    amqp.track_queue(names.custom("test.inbound"));
}

fn shop(id: &str, key: &str) -> IngressShop {
    IngressShop {
        shop_id: id.into(),
        enabled: true,
        signing_key: key.into(),
        handover_secret: "hs".into(),
        legacy_signature_enabled: false,
        version: 1,
    }
}

fn inbound_body(message_id: &str) -> String {
    serde_json::json!({
        "type": "message.created",
        "contact": { "id": "c", "msisdn": 31612345678u64, "displayName": "Jane" },
        "conversation": { "id": "conv-1", "status": "active" },
        "message": { "id": message_id, "conversationId": "conv-1", "platform": "whatsapp",
            "direction": "received", "status": "received", "type": "text",
            "content": { "text": "hello" }, "createdDatetime": "2024-01-01T10:00:00.123456789Z" }
    })
    .to_string()
}

async fn post_signed(
    stack: &Stack,
    shop: &str,
    key: &str,
    body: &str,
    jti: &str,
    traceparent: Option<&str>,
) -> (u16, Option<String>, String) {
    let path = format!("/webhooks/messagebird/{shop}");
    let now = chrono::Utc::now().timestamp();
    let token = sign_jwt_hs256(
        key.as_bytes(),
        &serde_json::json!({
            "iss": "MessageBird", "nbf": now, "exp": now + 60, "jti": jti,
            "url_hash": sha256_hex(format!("{BASE}{path}").as_bytes()),
            "payload_hash": sha256_hex(body.as_bytes()),
        }),
    );
    let mut request = reqwest::Client::new()
        .post(format!("{}{path}", stack.http))
        .header("content-type", "application/json")
        .header("messagebird-signature-jwt", token)
        .body(body.to_owned());
    if let Some(tp) = traceparent {
        request = request.header("traceparent", tp);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, retry, response.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhook_arrives_exactly_once_with_the_right_properties() {
    let stack = Stack::start(None, true).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{trace_id}-b7ad6b7169203331-01");
    let body = inbound_body("msg-1");
    let (status, _, text) =
        post_signed(&stack, "s1", "key-one", &body, "jti-1", Some(&traceparent)).await;
    assert_eq!(status, 200, "{text}");

    let message = stack.get().await.expect("one message on the queue");
    let props = &message.delivery.properties;
    assert_eq!(
        props.message_id().as_ref().map(|s| s.as_str()),
        Some("msg-1")
    );
    assert_eq!(
        props.kind().as_ref().map(|s| s.as_str()),
        Some("shopctrl.messaging.v1.InboundWebhookEvent")
    );
    assert_eq!(*props.delivery_mode(), Some(2));
    let headers = shopctrl_amqp::headers_to_pairs(props.headers().as_ref());
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("x-shop-id").as_deref(), Some("s1"));
    let published_tp = header("traceparent").expect("trace context in headers");
    assert!(published_tp.contains(trace_id), "{published_tp}");
    let expected_key = shopctrl_domain::shard_routing_key(
        "s1",
        "conv-1",
        shopctrl_domain::ShardCount::new(SHARDS).expect("n"),
    );
    assert_eq!(message.delivery.routing_key.as_str(), expected_key);
    let event = InboundWebhookEvent::decode(message.delivery.data.as_slice()).expect("protobuf");
    assert_eq!(event.shop_id, "s1");
    assert_eq!(event.signature_scheme, "jwt");
    assert_eq!(event.raw_body, body.as_bytes());
    assert_eq!(event.meta.expect("meta").event_id, "msg-1");
    assert_eq!(
        event
            .message
            .expect("message")
            .created_at
            .expect("ts")
            .nanos,
        123_456_789
    );

    // MessageBird retries with the same token: 200, nothing new on the queue.
    let (status, _, text) = post_signed(&stack, "s1", "key-one", &body, "jti-1", None).await;
    assert_eq!(status, 200);
    assert!(text.contains("duplicate"), "{text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        stack.get().await.is_none(),
        "a replay must not be published again"
    );

    let metrics = reqwest::get(format!("{}/metrics", stack.ops))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("ingress_requests_total{route=\"webhook\",status=\"200\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("ingress_replays_total 1"), "{metrics}");
    assert!(
        metrics.contains("ingress_publish_seconds_bucket"),
        "{metrics}"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_cut_answers_503_and_publishes_nothing() {
    let proxy = TcpProxy::start("127.0.0.1:5672").await;
    let via_proxy = {
        let direct = shopctrl_testkit::amqp_url();
        direct.replace("127.0.0.1:5672", &proxy.addr().to_string())
    };
    let stack = Stack::start(Some(via_proxy), true).await;
    proxy.cut();
    let body = inbound_body("msg-cut");
    let (status, retry, text) = post_signed(&stack, "s1", "key-one", &body, "jti-cut", None).await;
    assert_eq!(status, 503, "{text}");
    assert_eq!(retry.as_deref(), Some("5"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        stack.get().await.is_none(),
        "nothing may be published while cut"
    );

    // The broker comes back: MessageBird's retry (same token) is accepted, exactly once.
    proxy.restore();
    let mut accepted = false;
    for _ in 0..50 {
        let (status, _, _) = post_signed(&stack, "s1", "key-one", &body, "jti-cut", None).await;
        if status == 200 {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(accepted, "publishing resumes after the outage");
    assert!(stack.get().await.is_some());
    assert!(stack.get().await.is_none());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_or_missing_exchange_answers_503() {
    // No queue bound yet: the mandatory publish comes back unroutable.
    let stack = Stack::start(None, false).await;
    let body = inbound_body("msg-x");
    let (status, retry, text) = post_signed(&stack, "s1", "key-one", &body, "jti-x1", None).await;
    assert_eq!((status, retry.as_deref()), (503, Some("5")), "{text}");
    assert!(text.contains("publish_unroutable"), "{text}");

    // The exchange disappears: 503 again, and nothing reaches the queue bound afterwards.
    let channel = stack.broker.create_channel().await.expect("channel");
    bind_test_queue(&stack.amqp, &channel, &stack.names).await;
    channel
        .exchange_delete(
            stack.names.inbound_exchange().as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .expect("delete exchange");
    let (status, retry, text) = post_signed(&stack, "s1", "key-one", &body, "jti-x2", None).await;
    assert_eq!((status, retry.as_deref()), (503, Some("5")), "{text}");
    assert!(stack.get().await.is_none());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_change_takes_effect_through_config_changed_and_outage_serves_cache() {
    let stack = Stack::start(None, true).await;
    let (status, _, _) =
        post_signed(&stack, "s1", "key-one", &inbound_body("m1"), "k1", None).await;
    assert_eq!(status, 200);
    let calls_before = stack.config.calls();

    // The key is rotated in config; the cache still holds the old one until told.
    stack.config.upsert(shop("s1", "key-two"));
    let (status, _, _) =
        post_signed(&stack, "s1", "key-two", &inbound_body("m2"), "k2", None).await;
    assert_eq!(status, 401);
    assert_eq!(stack.config.calls(), calls_before, "served from cache");

    let channel = stack.broker.create_channel().await.expect("channel");
    let event = ConfigChanged {
        shop_id: "s1".into(),
        version: 2,
        ..ConfigChanged::default()
    };
    channel
        .basic_publish(
            stack.names.config_exchange().as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &event.encode_to_vec(),
            BasicProperties::default(),
        )
        .await
        .expect("publish config change");
    let mut switched = false;
    for i in 0..50 {
        let (status, _, _) = post_signed(
            &stack,
            "s1",
            "key-two",
            &inbound_body(&format!("m3-{i}")),
            &format!("k3-{i}"),
            None,
        )
        .await;
        if status == 200 {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(switched, "the new key is used without a restart");
    let (status, _, _) =
        post_signed(&stack, "s1", "key-one", &inbound_body("m4"), "k4", None).await;
    assert_eq!(status, 401, "the old key no longer works");

    // Config goes away: the cached shop keeps working, an unknown one gets 503.
    stack.config_stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, _) =
        post_signed(&stack, "s1", "key-two", &inbound_body("m5"), "k5", None).await;
    assert_eq!(status, 200);
    let (status, retry, _) = post_signed(&stack, "s2", "x", &inbound_body("m6"), "k6", None).await;
    assert_eq!((status, retry.as_deref()), (503, Some("5")));
    let ready = reqwest::get(format!("{}/readyz", stack.ops))
        .await
        .expect("readyz");
    assert_eq!(
        ready.status(),
        200,
        "a config outage alone does not make ingress unready"
    );
    stack.stop().await;
}

/// Sends a request ingress answers without the broker (415: wrong content type) on `stream`.
async fn send_refused_request(stream: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt as _;
    stream
        .write_all(
            b"POST /webhooks/messagebird/s1 HTTP/1.1\r\nHost: ingress\r\n\
              Content-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi",
        )
        .await
        .expect("request sent");
}

/// Reads until the connection yields something (an answer's first bytes) or ends (empty).
async fn read_some(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
        .await
        .expect("an answer or the end of the connection (hang guard)")
        .unwrap_or(0);
    buf.truncate(n);
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_and_idle_ones_are_closed() {
    let stack = Stack::start_with(None, true, |settings| {
        settings.max_connections = 2;
        // The idle limit is never below the longest a request may wait: short waits here.
        settings.config_timeout_ms = 500;
        settings.redis_timeout_ms = 250;
        settings.publish_confirm_timeout_ms = 1_000;
        settings.connection_idle_seconds = 3;
    })
    .await;
    let addr = stack.http.trim_start_matches("http://").to_owned();
    // Two connections, one answered request each, then idle: they hold both places.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        send_refused_request(&mut stream).await;
        let answer = read_some(&mut stream).await;
        assert!(answer.starts_with(b"HTTP/1.1 415"), "{answer:?}");
        idle.push(stream);
    }
    // A third is taken into the kernel's backlog, but not served while both places are held.
    let mut third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    send_refused_request(&mut third).await;
    let mut early = [0u8; 64];
    let waited = tokio::time::timeout(Duration::from_millis(300), third.peek(&mut early)).await;
    assert!(
        waited.is_err(),
        "answered while both places were held by idle connections"
    );
    // The idle connections are closed after 3 s without a byte; the third is then served.
    for stream in &mut idle {
        assert!(
            read_some(stream).await.is_empty(),
            "an idle connection stays open"
        );
    }
    let answer = read_some(&mut third).await;
    assert!(answer.starts_with(b"HTTP/1.1 415"), "{answer:?}");
    let metrics = reqwest::get(format!("{}/metrics", stack.ops))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let open: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("ingress_open_connections "))
        .expect("the open-connections gauge")
        .trim()
        .parse()
        .unwrap();
    assert!((1.0..=2.0).contains(&open), "open connections: {open}");
    stack.stop().await;
}
