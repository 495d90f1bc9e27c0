//! flow-callback against the real RabbitMQ (a name prefix of its own per test), the
//! MessageBird simulator's flow receiver and Conversations API on free ports, and a fake
//! config service over real gRPC.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use futures::StreamExt;
use lapin::{
    Channel, Connection, ConnectionProperties,
    options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions},
    types::FieldTable,
};
use prost::Message;
use shopctrl_amqp::{
    Names, Outgoing, Publisher, QueueSpec, declare_exchange, declare_queue, headers_to_pairs,
};
use shopctrl_e2e::{
    conversations_api::{ApiReply, ConversationsApi},
    flow_receiver::{FlowReceiver, FlowReply},
};
use shopctrl_flow_callback::{
    App, Deps, Settings,
    metrics::Metrics,
    shops::ShopCache,
    ssrf::{LookupFuture, Resolver},
    topology::{Kind, Topology},
};
use shopctrl_proto::v1::{
    Channel as MbChannel, ConfigChanged, DeliveryShop, EmployeeAccess, EventMeta,
    FlowEmployeeAssigned, FlowEvent, FlowNoEmployeeAvailable, GetEmployeeAccessRequest,
    GetInternalShopRequest, InboundContact, IngressShop, OutboundSend, OutboundSendResult,
    RoutingShop, UnassignedReason,
    config_internal_service_server::{ConfigInternalService, ConfigInternalServiceServer},
    flow_event::Outcome,
};
use shopctrl_testkit::TestAmqp;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

const TOKEN: &str = "test-flow-callback-token";
const SECRET: &str = "callback-secret-123";

// ---------------------------------------------------------------- fake config service

#[derive(Clone, Default)]
struct FakeConfig {
    shops: Arc<Mutex<HashMap<String, DeliveryShop>>>,
}

impl FakeConfig {
    fn put(&self, shop: DeliveryShop) {
        self.shops
            .lock()
            .unwrap()
            .insert(shop.shop_id.clone(), shop);
    }
}

#[tonic::async_trait]
impl ConfigInternalService for FakeConfig {
    async fn get_ingress_shop(
        &self,
        _: Request<GetInternalShopRequest>,
    ) -> Result<Response<IngressShop>, Status> {
        Err(Status::unimplemented("not for flow-callback"))
    }

    async fn get_delivery_shop(
        &self,
        request: Request<GetInternalShopRequest>,
    ) -> Result<Response<DeliveryShop>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {TOKEN}")) {
            return Err(Status::unauthenticated("bad token"));
        }
        let shop_id = request.into_inner().shop_id;
        match self.shops.lock().unwrap().get(&shop_id) {
            Some(shop) => Ok(Response::new(shop.clone())),
            None => Err(Status::not_found("no such shop")),
        }
    }

    async fn get_routing_shop(
        &self,
        _: Request<GetInternalShopRequest>,
    ) -> Result<Response<RoutingShop>, Status> {
        Err(Status::unimplemented("not for flow-callback"))
    }

    async fn get_employee_access(
        &self,
        _: Request<GetEmployeeAccessRequest>,
    ) -> Result<Response<EmployeeAccess>, Status> {
        Err(Status::unimplemented("not for flow-callback"))
    }
}

async fn start_config(fake: FakeConfig, stop: CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(ConfigInternalServiceServer::new(fake))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async move { stop.cancelled().await },
            )
            .await
            .unwrap();
    });
    addr
}

// ---------------------------------------------------------------- fake resolver

/// Resolves a few made-up names; everything else is unknown.
struct FakeResolver(HashMap<&'static str, IpAddr>);

impl Resolver for FakeResolver {
    fn lookup(&self, host: &str) -> LookupFuture {
        let found = self.0.get(host).copied();
        let host = host.to_owned();
        Box::pin(async move {
            found.map(|ip| vec![ip]).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, format!("unknown host {host}"))
            })
        })
    }
}

// ---------------------------------------------------------------- harness

struct Harness {
    amqp: TestAmqp,
    names: Names,
    topology: Topology,
    metrics: Metrics,
    shops: ShopCache,
    publisher: Publisher,
    channel: Channel,
    _connection: Connection,
    results_queue: String,
    config: FakeConfig,
    receiver: FlowReceiver,
    api: ConversationsApi,
    stop: CancellationToken,
    app: tokio::task::JoinHandle<Result<(), shopctrl_flow_callback::AppError>>,
    ops: SocketAddr,
}

fn test_settings(amqp: &TestAmqp) -> Settings {
    let mut s = Settings::defaults();
    s.amqp_url = amqp.url().to_owned();
    s.amqp_prefix = amqp.prefix().to_owned();
    s.ops_listen_addr = "127.0.0.1:0".parse().unwrap();
    s.config_service_token = TOKEN.into();
    s.allow_http_webhook_urls = true;
    s.ssrf_allow_cidrs = "127.0.0.0/8".into();
    s.http_timeout_ms = 500;
    s.http_connect_timeout_ms = 500;
    s.retry_schedule = "300ms,600ms,300ms".into();
    s.retry_delay_tiers = "200ms,500ms".into();
    s.retry_jitter_percent = 0;
    s.retry_after_max_seconds = 2;
    s.delivery_concurrency = 2;
    s.shutdown_grace_seconds = 5;
    s
}

impl Harness {
    async fn start(tweak: impl FnOnce(&mut Settings)) -> Self {
        shopctrl_telemetry::init_for_tests();
        let amqp = TestAmqp::create().await;
        let names = Names::new(amqp.prefix());
        let stop = CancellationToken::new();
        let config = FakeConfig::default();
        let config_addr = start_config(config.clone(), stop.clone()).await;
        let receiver = FlowReceiver::start().await.unwrap();
        receiver.set_secret(SECRET);
        let api = ConversationsApi::start().await.unwrap();

        let mut settings = test_settings(&amqp);
        settings.config_grpc_url = format!("http://{config_addr}");
        settings.messagebird_api_base_url = api.base_url();
        tweak(&mut settings);
        let resolver = FakeResolver(HashMap::from([
            ("flows.example.test", "127.0.0.1".parse().unwrap()),
            ("internal.example.test", "10.0.0.7".parse().unwrap()),
            ("metadata.example.test", "169.254.169.254".parse().unwrap()),
        ]));
        let app = App::build(
            settings,
            Deps {
                shops: None,
                resolver: Some(Arc::new(resolver)),
            },
        )
        .await
        .expect("app builds");
        let topology = app.topology().clone();
        for queue in topology.queue_names() {
            amqp.track_queue(queue);
        }
        amqp.track_queue(app.config_queue().to_owned());
        for exchange in [
            names.flow_exchange(),
            names.outbound_exchange(),
            names.dead_letter_exchange(),
            names.config_exchange(),
        ] {
            amqp.track_exchange(exchange);
        }
        let metrics = app.metrics();
        let shops = app.shops();
        let ops = app.ops_addr().unwrap();
        let app = tokio::spawn(app.run(stop.clone()));

        // Routing's side: a queue for the results, and a publisher for events.
        let connection = Connection::connect(amqp.url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let results_queue = names.custom("test.results");
        amqp.track_queue(results_queue.clone());
        declare_exchange(
            &channel,
            &names.config_exchange(),
            lapin::ExchangeKind::Fanout,
        )
        .await
        .unwrap();
        declare_queue(
            &channel,
            &QueueSpec::quorum(&results_queue).bind(names.outbound_exchange(), "result"),
        )
        .await
        .unwrap();
        let publisher = Publisher::connect(amqp.url(), "test", Duration::from_secs(5))
            .await
            .unwrap();
        let harness = Self {
            amqp,
            names,
            topology,
            metrics,
            shops,
            publisher,
            channel,
            _connection: connection,
            results_queue,
            config,
            receiver,
            api,
            stop,
            app,
            ops,
        };
        harness.wait_ready().await;
        harness
    }

    async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        for _ in 0..100 {
            if let Ok(r) = client
                .get(format!("http://{}/readyz", self.ops))
                .send()
                .await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("flow-callback never became ready");
    }

    fn shop(&self, shop_id: &str, url: &str) -> DeliveryShop {
        let shop = DeliveryShop {
            shop_id: shop_id.into(),
            enabled: true,
            access_key: format!("live_{shop_id}"),
            event_webhook_url: url.into(),
            callback_secret: SECRET.into(),
            whatsapp_template_name: "agent_reply".into(),
            whatsapp_template_namespace: "ns-1".into(),
            whatsapp_template_language: "nl".into(),
            version: 1,
        };
        self.config.put(shop.clone());
        shop
    }

    async fn publish_flow(&self, event: &FlowEvent) {
        let id = event.meta.as_ref().unwrap().event_id.clone();
        self.publisher
            .publish(Outgoing {
                exchange: &self.names.flow_exchange(),
                routing_key: "flow",
                message_type: "shopctrl.messaging.v1.FlowEvent",
                message_id: &id,
                payload: &event.encode_to_vec(),
                headers: &[],
                mandatory: true,
            })
            .await
            .unwrap();
    }

    async fn publish_send(&self, send: &OutboundSend) {
        let id = send.meta.as_ref().unwrap().event_id.clone();
        self.publisher
            .publish(Outgoing {
                exchange: &self.names.outbound_exchange(),
                routing_key: "send",
                message_type: "shopctrl.messaging.v1.OutboundSend",
                message_id: &id,
                payload: &send.encode_to_vec(),
                headers: &[],
                mandatory: true,
            })
            .await
            .unwrap();
    }

    /// The next `n` results routing would receive.
    async fn results(&self, n: usize) -> Vec<OutboundSendResult> {
        let mut consumer = self
            .channel
            .basic_consume(
                self.results_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut out = Vec::new();
        while out.len() < n {
            let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("a result in time")
                .expect("stream open")
                .expect("delivery");
            assert_eq!(
                delivery.properties.kind().as_ref().map(|s| s.as_str()),
                Some("shopctrl.messaging.v1.OutboundSendResult")
            );
            out.push(OutboundSendResult::decode(delivery.data.as_slice()).unwrap());
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        let _ = self
            .channel
            .basic_cancel(consumer.tag(), Default::default())
            .await;
        out
    }

    /// Waits for a dead letter of `kind`; returns its reason header and body.
    async fn dead_letter(&self, kind: Kind) -> (String, Vec<u8>) {
        let queue = self.topology.dead_letter_queue(kind);
        for _ in 0..200 {
            if let Some(message) = self
                .channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                let headers = headers_to_pairs(message.delivery.properties.headers().as_ref());
                let reason = headers
                    .into_iter()
                    .find(|(k, _)| k == "x-dead-letter-reason")
                    .map(|(_, v)| v)
                    .unwrap_or_default();
                return (reason, message.delivery.data.clone());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no dead letter in {queue}");
    }

    async fn stop(self) {
        self.stop.cancel();
        let result = tokio::time::timeout(Duration::from_secs(10), self.app)
            .await
            .expect("stops within the grace period")
            .expect("task");
        result.expect("clean stop");
        drop(self.amqp);
    }
}

fn meta(id: &str, occurred: chrono::DateTime<Utc>) -> Option<EventMeta> {
    Some(EventMeta {
        event_id: id.into(),
        occurred_at: Some(prost_types::Timestamp {
            seconds: occurred.timestamp(),
            nanos: 0,
        }),
        producer: "routing".into(),
    })
}

fn assigned(shop: &str, id: &str) -> FlowEvent {
    FlowEvent {
        meta: meta(id, Utc::now()),
        shop_id: shop.into(),
        conversation_id: "conv-1".into(),
        messagebird_conversation_id: "mbconv-1".into(),
        contact: Some(InboundContact {
            messagebird_contact_id: "contact-1".into(),
            msisdn: "31612345678".into(),
            display_name: "Jane".into(),
        }),
        outcome: Some(Outcome::Assigned(FlowEmployeeAssigned {
            employee_id: "emp-1".into(),
            display_name: "Ann Agent".into(),
            from_queue: false,
        })),
    }
}

/// Metrics are counted after the response, so a test may look before the worker did.
async fn wait_count(metrics: &Metrics, kind: &'static str, outcome: &'static str, n: u64) -> u64 {
    for _ in 0..100 {
        if metrics.count(kind, outcome) >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    metrics.count(kind, outcome)
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

// ---------------------------------------------------------------- availability events

#[tokio::test]
async fn delivers_on_first_try_with_a_verifiable_signature() {
    let h = Harness::start(|_| {}).await;
    let url = h.receiver.url("flow-a");
    h.shop("shop-a", &url);
    let id = new_id();
    h.publish_flow(&assigned("shop-a", &id)).await;
    let mut waiting = assigned("shop-a", &new_id());
    waiting.outcome = Some(Outcome::Waiting(FlowNoEmployeeAvailable {
        queue_position: 2,
        reason: UnassignedReason::AllFull as i32,
    }));
    h.publish_flow(&waiting).await;

    let calls = h.receiver.wait_for_calls(2, Duration::from_secs(10)).await;
    assert_eq!(calls.len(), 2, "both events delivered");
    let call = calls
        .iter()
        .find(|c| c.field("event_id").as_deref() == Some(id.as_str()))
        .expect("assigned event");
    assert_eq!(call.signature, Some(Ok(())), "signature verifies");
    assert_eq!(call.headers.get("idempotency-key"), Some(&id));
    assert_eq!(call.path, "/flows/invocations/webhooks/flow-a");
    assert_eq!(call.field("event").as_deref(), Some("employee_assigned"));
    assert_eq!(call.field("available").as_deref(), Some("true"));
    assert_eq!(call.field("employee_name").as_deref(), Some("Ann Agent"));
    assert_eq!(call.field("identifier").as_deref(), Some("31612345678"));
    let other = calls
        .iter()
        .find(|c| c.field("event_id") != Some(id.clone()))
        .unwrap();
    assert_eq!(other.signature, Some(Ok(())));
    assert_eq!(
        other.field("event").as_deref(),
        Some("no_employee_available")
    );
    assert_eq!(other.field("queue_position").as_deref(), Some("2"));
    assert_eq!(other.field("reason").as_deref(), Some("all_full"));

    // A signature made with another secret does not verify.
    let body = &call.body;
    let ts: i64 = call.headers["x-shopctrl-timestamp"].parse().unwrap();
    assert!(
        shopctrl_e2e::flow_receiver::verify_signature(
            "wrong-secret",
            &call.headers,
            body,
            ts,
            Duration::from_secs(300)
        )
        .is_err()
    );
    assert_eq!(wait_count(&h.metrics, "flow", "delivered", 2).await, 2);
    h.stop().await;
}

#[tokio::test]
async fn retries_5xx_and_timeouts_on_the_schedule() {
    let h = Harness::start(|_| {}).await;
    h.shop("shop-r", &h.receiver.url("flow-r"));
    // 503, then a hang past the 500 ms timeout, then 204.
    h.receiver.script([
        FlowReply::Status {
            status: 503,
            retry_after: None,
        },
        FlowReply::Hang(Duration::from_millis(1500)),
    ]);
    let id = new_id();
    h.publish_flow(&assigned("shop-r", &id)).await;
    let calls = h.receiver.wait_for_calls(3, Duration::from_secs(15)).await;
    assert_eq!(calls.len(), 3);
    assert!(
        calls
            .iter()
            .all(|c| c.field("event_id") == Some(id.clone()))
    );
    assert!(
        calls
            .iter()
            .all(|c| c.headers.get("idempotency-key") == Some(&id))
    );
    let first_gap = calls[1].at - calls[0].at;
    let second_gap = calls[2].at - calls[1].at;
    // Schedule 300 ms then 600 ms, no jitter; the second attempt also waited out its 500 ms
    // timeout. The tier granularity (200 ms) bounds the overshoot.
    assert!(
        first_gap >= Duration::from_millis(300) && first_gap < Duration::from_millis(1300),
        "first gap {first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(1100) && second_gap < Duration::from_millis(2300),
        "second gap {second_gap:?}"
    );
    assert_eq!(wait_count(&h.metrics, "flow", "delivered", 1).await, 1);
    assert_eq!(h.metrics.count("flow", "retried"), 2);
    h.stop().await;
}

#[tokio::test]
async fn honours_retry_after_within_bounds() {
    let h = Harness::start(|_| {}).await;
    h.shop("shop-ra", &h.receiver.url("flow-ra"));
    h.receiver.script([FlowReply::Status {
        status: 429,
        retry_after: Some("1".into()),
    }]);
    h.publish_flow(&assigned("shop-ra", &new_id())).await;
    let calls = h.receiver.wait_for_calls(2, Duration::from_secs(10)).await;
    assert_eq!(calls.len(), 2);
    let gap = calls[1].at - calls[0].at;
    assert!(
        gap >= Duration::from_millis(1000) && gap < Duration::from_millis(2000),
        "Retry-After 1 s honoured, gap {gap:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn gives_up_to_the_dead_letter_queue_with_the_last_error() {
    let h = Harness::start(|s| {
        s.retry_schedule = "200ms,200ms".into();
        s.retry_delay_tiers = "200ms".into();
    })
    .await;
    h.shop("shop-g", &h.receiver.url("flow-g"));
    h.receiver.script((0..3).map(|_| FlowReply::Status {
        status: 500,
        retry_after: None,
    }));
    let event = assigned("shop-g", &new_id());
    h.publish_flow(&event).await;
    let (reason, body) = h.dead_letter(Kind::Flow).await;
    assert!(reason.contains("gave up after 3 attempts"), "{reason}");
    assert!(reason.contains("HTTP 500"), "{reason}");
    assert_eq!(FlowEvent::decode(body.as_slice()).unwrap(), event);
    assert_eq!(h.receiver.calls().len(), 3);
    assert_eq!(wait_count(&h.metrics, "flow", "gave_up", 1).await, 1);
    h.stop().await;
}

#[tokio::test]
async fn stale_events_are_dropped_and_counted() {
    let h = Harness::start(|_| {}).await;
    h.shop("shop-s", &h.receiver.url("flow-s"));
    let mut stale = assigned("shop-s", &new_id());
    stale.meta = meta(&new_id(), Utc::now() - chrono::Duration::minutes(11));
    h.publish_flow(&stale).await;
    let fresh_id = new_id();
    h.publish_flow(&assigned("shop-s", &fresh_id)).await;
    let calls = h.receiver.wait_for_calls(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls_after = h.receiver.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls_after.len(), 1, "the stale event was not delivered");
    assert_eq!(calls[0].field("event_id"), Some(fresh_id));
    assert_eq!(wait_count(&h.metrics, "flow", "stale", 1).await, 1);
    h.stop().await;
}

#[tokio::test]
async fn ssrf_attempts_are_refused() {
    // Production policy: https only, no allow-list.
    let h = Harness::start(|s| {
        s.allow_http_webhook_urls = false;
        s.ssrf_allow_cidrs = String::new();
    })
    .await;
    let port = h.receiver.addr().port();
    let targets = [
        format!("http://flows.example.test:{port}/flows/x"),
        format!("https://127.0.0.1:{port}/flows/x"),
        "https://10.1.2.3/flows/x".to_owned(),
        "https://169.254.169.254/latest/meta-data/".to_owned(),
        "https://internal.example.test/flows/x".to_owned(),
        "https://metadata.example.test/flows/x".to_owned(),
        "https://[::1]/flows/x".to_owned(),
    ];
    for (i, url) in targets.iter().enumerate() {
        let shop = format!("shop-x{i}");
        h.shop(&shop, url);
        h.publish_flow(&assigned(&shop, &new_id())).await;
    }
    let mut reasons = Vec::new();
    for _ in &targets {
        let (reason, _) = h.dead_letter(Kind::Flow).await;
        reasons.push(reason);
    }
    for reason in &reasons {
        assert!(reason.contains("refused by the SSRF guard"), "{reason}");
    }
    assert!(reasons.iter().any(|r| r.contains("scheme http")));
    assert!(
        reasons.iter().any(|r| r.contains("10.0.0.7")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("169.254.169.254")));
    assert!(
        h.receiver.calls().is_empty(),
        "nothing reached the receiver"
    );
    let n = targets.len() as u64;
    assert_eq!(wait_count(&h.metrics, "flow", "refused", n).await, n);
    h.stop().await;
}

#[tokio::test]
async fn a_changed_url_takes_effect_on_config_changed() {
    let h = Harness::start(|_| {}).await;
    h.shop("shop-c", &h.receiver.url("old"));
    h.publish_flow(&assigned("shop-c", &new_id())).await;
    assert_eq!(
        h.receiver
            .wait_for_calls(1, Duration::from_secs(10))
            .await
            .len(),
        1
    );
    h.shop("shop-c", &h.receiver.url("new"));
    let change = ConfigChanged {
        meta: meta(&new_id(), Utc::now()),
        shop_id: "shop-c".into(),
        version: 2,
        change: None,
    };
    h.publisher
        .publish(Outgoing {
            exchange: &h.names.config_exchange(),
            routing_key: "",
            message_type: "shopctrl.messaging.v1.ConfigChanged",
            message_id: "c",
            payload: &change.encode_to_vec(),
            headers: &[],
            mandatory: true,
        })
        .await
        .unwrap();
    // The cache refetches once the event dropped the entry.
    let mut seen_new = false;
    for _ in 0..100 {
        let shop = h.shops.get("shop-c").await.unwrap().unwrap();
        if shop.event_webhook_url.ends_with("/new") {
            seen_new = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen_new, "config-changed dropped the cached URL");
    h.publish_flow(&assigned("shop-c", &new_id())).await;
    let calls = h.receiver.wait_for_calls(2, Duration::from_secs(10)).await;
    assert_eq!(calls[1].path, "/flows/invocations/webhooks/new");
    h.stop().await;
}

// ---------------------------------------------------------------- agent replies

fn reply(
    shop: &str,
    channel: MbChannel,
    last_received: Option<chrono::DateTime<Utc>>,
) -> OutboundSend {
    OutboundSend {
        meta: meta(&new_id(), Utc::now()),
        shop_id: shop.into(),
        conversation_id: "conv-9".into(),
        message_id: new_id(),
        messagebird_conversation_id: "mbconv-9".into(),
        channel: channel as i32,
        channel_id: "channel-wa".into(),
        msisdn: "31612345678".into(),
        text: "Your order ships today".into(),
        employee_id: "emp-1".into(),
        customer_last_received_at: last_received.map(|t| prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: 0,
        }),
    }
}

#[tokio::test]
async fn replies_inside_and_outside_the_window_go_as_text_and_template() {
    let h = Harness::start(|_| {}).await;
    h.shop("shop-w", "");
    let inside = reply(
        "shop-w",
        MbChannel::Whatsapp,
        Some(Utc::now() - chrono::Duration::hours(1)),
    );
    let outside = reply(
        "shop-w",
        MbChannel::Whatsapp,
        Some(Utc::now() - chrono::Duration::hours(25)),
    );
    let widget = reply("shop-w", MbChannel::WebWidget, None);
    for send in [&inside, &outside, &widget] {
        h.publish_send(send).await;
    }
    let results = h.results(3).await;
    let requests = h.api.wait_for_requests(3, Duration::from_secs(5)).await;
    assert_eq!(requests.len(), 3);
    for request in &requests {
        assert_eq!(request.access_key.as_deref(), Some("live_shop-w"));
        assert_eq!(request.path, "/v1/conversations/mbconv-9/messages");
        assert_eq!(request.body["channelId"], "channel-wa");
    }
    let by_id = |id: &str| results.iter().find(|r| r.message_id == id).expect("result");
    assert!(by_id(&inside.message_id).accepted);
    assert_eq!(by_id(&inside.message_id).sent_as, "text");
    assert_eq!(by_id(&outside.message_id).sent_as, "template");
    assert_eq!(by_id(&widget.message_id).sent_as, "text");
    assert!(
        results
            .iter()
            .all(|r| r.accepted && !r.messagebird_message_id.is_empty())
    );
    let template = requests
        .iter()
        .find(|r| r.body["type"] == "hsm")
        .expect("one template");
    let hsm = &template.body["content"]["hsm"];
    assert_eq!(hsm["templateName"], "agent_reply");
    assert_eq!(hsm["namespace"], "ns-1");
    assert_eq!(hsm["language"]["code"], "nl");
    assert_eq!(
        hsm["components"][0]["parameters"][0]["text"],
        "Your order ships today"
    );
    assert_eq!(
        requests.iter().filter(|r| r.body["type"] == "text").count(),
        2
    );
    h.stop().await;
}

#[tokio::test]
async fn messagebird_errors_come_back_as_failed_results() {
    let h = Harness::start(|_| {}).await;
    h.shop("shop-e", "");
    // 1: refused by MessageBird with its error object.
    h.api.script([ApiReply::Errors {
        status: 422,
        code: 470,
        description: "Message failed to send because more than 24 hours have passed".into(),
    }]);
    let refused = reply("shop-e", MbChannel::Whatsapp, Some(Utc::now()));
    h.publish_send(&refused).await;
    let result = h.results(1).await.remove(0);
    assert_eq!(result.message_id, refused.message_id);
    assert!(!result.accepted);
    assert_eq!(result.error_code, 470);
    assert!(result.error_description.contains("more than 24 hours"));

    // 2: 429 with Retry-After, then 503, then accepted.
    h.api.script([
        ApiReply::Status {
            status: 429,
            retry_after: Some("1".into()),
        },
        ApiReply::Status {
            status: 503,
            retry_after: None,
        },
    ]);
    let throttled = reply("shop-e", MbChannel::Whatsapp, Some(Utc::now()));
    h.publish_send(&throttled).await;
    let result = h.results(1).await.remove(0);
    assert_eq!(result.message_id, throttled.message_id);
    assert!(result.accepted, "{result:?}");
    let requests = h.api.requests();
    let tries: Vec<_> = requests.iter().skip(1).collect();
    assert_eq!(tries.len(), 3);
    assert!(
        tries[1].at - tries[0].at >= Duration::from_millis(1000),
        "Retry-After honoured"
    );

    // 3: outside the window with no template configured: a clear failure, nothing sent.
    let mut shop = h.shop("shop-nt", "");
    shop.whatsapp_template_name.clear();
    h.config.put(shop);
    let no_template = reply("shop-nt", MbChannel::Whatsapp, None);
    h.publish_send(&no_template).await;
    let result = h.results(1).await.remove(0);
    assert!(!result.accepted);
    assert_eq!(result.error_code, 0);
    assert!(
        result.error_description.contains("no WhatsApp template"),
        "{}",
        result.error_description
    );
    assert_eq!(h.api.requests().len(), 4, "nothing was sent");
    h.stop().await;
}

#[tokio::test]
async fn replies_that_keep_failing_end_in_the_dead_letter_queue_and_a_failed_result() {
    let h = Harness::start(|s| {
        s.retry_schedule = "200ms".into();
        s.retry_delay_tiers = "200ms".into();
    })
    .await;
    h.shop("shop-d", "");
    h.api.script((0..2).map(|_| ApiReply::Status {
        status: 502,
        retry_after: None,
    }));
    let send = reply("shop-d", MbChannel::WebWidget, None);
    h.publish_send(&send).await;
    let result = h.results(1).await.remove(0);
    assert!(!result.accepted);
    assert!(
        result
            .error_description
            .contains("gave up after 2 attempts"),
        "{}",
        result.error_description
    );
    let (reason, _) = h.dead_letter(Kind::Send).await;
    assert!(reason.contains("HTTP 502"), "{reason}");
    h.stop().await;
}

// ---------------------------------------------------------------- timing

#[tokio::test]
async fn availability_events_reach_the_flow_within_a_second() {
    let h = Harness::start(|s| s.delivery_concurrency = 8).await;
    h.shop("shop-l", &h.receiver.url("flow-l"));
    let n = 300;
    let started = std::time::Instant::now();
    let mut sent_at = HashMap::new();
    for _ in 0..n {
        let id = new_id();
        sent_at.insert(id.clone(), std::time::Instant::now());
        h.publish_flow(&assigned("shop-l", &id)).await;
    }
    let calls = h.receiver.wait_for_calls(n, Duration::from_secs(60)).await;
    let elapsed = started.elapsed();
    assert_eq!(calls.len(), n);
    let mut latencies: Vec<Duration> = calls
        .iter()
        .map(|c| c.at - sent_at[&c.field("event_id").unwrap()])
        .collect();
    latencies.sort();
    let p50 = latencies[n / 2];
    let p99 = latencies[n * 99 / 100];
    let max = latencies[n - 1];
    eprintln!(
        "flow events: {n} in {elapsed:?} ({:.0}/s), publish-to-receiver p50 {p50:?} p99 {p99:?} max {max:?}",
        n as f64 / elapsed.as_secs_f64()
    );
    assert!(calls.iter().all(|c| c.signature == Some(Ok(()))));
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    h.stop().await;
}
