//! Test harness: a routing service on its own database and AMQP prefix, a fake config service
//! (in-process tonic on port 0), a test publisher standing in for ingress, and a gRPC client
//! acting as ShopCtrl.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use prost::Message as _;
use shopctrl_amqp::{Names, Outgoing, Publisher, lapin};
use shopctrl_domain::{ShardCount, shard_routing_key};
use shopctrl_proto::v1::{
    Channel, DeliveryShop, Direction, EmployeeAccess, EventMeta, GetEmployeeAccessRequest,
    GetInternalShopRequest, InboundContact, InboundMessage, InboundWebhookEvent, IngressShop,
    MessageStatus, Role, RoutingEmployee, RoutingShop,
    config_internal_service_server::{ConfigInternalService, ConfigInternalServiceServer},
    conversation_service_client::ConversationServiceClient,
};
use shopctrl_routing::{
    App, Overrides, Settings, consumer::CommitHook, migrate, settings::Redacted,
};
use shopctrl_testkit::{TestAmqp, TestDatabase, TestRedis};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, transport::Channel as GrpcChannel};

pub const SHOP: &str = "shop-1";

/// The fake config service's data.
#[derive(Clone, Default)]
pub struct FakeConfig {
    pub shops: Arc<Mutex<HashMap<String, RoutingShop>>>,
}

impl FakeConfig {
    pub fn put(&self, shop: RoutingShop) {
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
        Err(Status::unimplemented("fake"))
    }
    async fn get_delivery_shop(
        &self,
        _: Request<GetInternalShopRequest>,
    ) -> Result<Response<DeliveryShop>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_routing_shop(
        &self,
        request: Request<GetInternalShopRequest>,
    ) -> Result<Response<RoutingShop>, Status> {
        check_token(&request)?;
        let shops = self.shops.lock().unwrap();
        shops
            .get(&request.get_ref().shop_id)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found("shop"))
    }
    async fn get_employee_access(
        &self,
        request: Request<GetEmployeeAccessRequest>,
    ) -> Result<Response<EmployeeAccess>, Status> {
        check_token(&request)?;
        let request = request.into_inner();
        let shops = self.shops.lock().unwrap();
        let employee = shops.get(&request.shop_id).and_then(|s| {
            s.employees
                .iter()
                .find(|e| e.employee_id == request.employee_id)
        });
        Ok(Response::new(EmployeeAccess {
            shop_id: request.shop_id.clone(),
            employee_id: request.employee_id.clone(),
            role: employee.map(|e| e.role).unwrap_or(0),
            chat_permission: employee.is_some_and(|e| e.chat_permission),
        }))
    }
}

fn check_token<T>(request: &Request<T>) -> Result<(), Status> {
    match request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
    {
        Some("Bearer test-routing-token") => Ok(()),
        _ => Err(Status::unauthenticated("bad token")),
    }
}

/// The default shop: alice may chat, bob has a role without Chat, carol is no member.
pub fn shop(assign_on_first_message: bool, new_conversation_on_closed: bool) -> RoutingShop {
    RoutingShop {
        shop_id: SHOP.into(),
        enabled: true,
        assign_on_first_message,
        new_conversation_on_closed,
        conversation_slots: 3,
        employees: vec![
            RoutingEmployee {
                employee_id: "alice".into(),
                display_name: "Alice".into(),
                role: Role::ShopEmployee as i32,
                chat_permission: true,
            },
            RoutingEmployee {
                employee_id: "bob".into(),
                display_name: "Bob".into(),
                role: Role::ShopEmployee as i32,
                chat_permission: false,
            },
        ],
        version: 1,
    }
}

pub struct Service {
    pub grpc: std::net::SocketAddr,
    pub ops: std::net::SocketAddr,
    pub stop: CancellationToken,
    pub task: JoinHandle<()>,
}

impl Service {
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

pub struct Env {
    pub db: TestDatabase,
    pub amqp: TestAmqp,
    /// The slot keys' prefix, deleted with the Env.
    pub redis: TestRedis,
    pub names: Names,
    pub config: FakeConfig,
    pub config_url: String,
    pub publisher: Publisher,
    pub shards: ShardCount,
    pub pool: sqlx::PgPool,
    pub services: Vec<Service>,
}

impl Env {
    /// A fresh environment with one routing replica running.
    pub async fn start(shop: RoutingShop) -> Self {
        let mut env = Self::prepare(shop, 2).await;
        let service = env.spawn(None, None).await;
        env.services.push(service);
        env
    }

    /// A fresh environment with nothing running yet.
    pub async fn prepare(shop: RoutingShop, shards: u32) -> Self {
        shopctrl_testkit::init_logging();
        let db = TestDatabase::create().await;
        let amqp = TestAmqp::create().await;
        let redis = TestRedis::create().await;
        let names = Names::new(amqp.prefix());
        let config = FakeConfig::default();
        config.put(shop);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config_url = format!("http://{}", listener.local_addr().unwrap());
        {
            let config = config.clone();
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(ConfigInternalServiceServer::new(config))
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
            );
        }
        let shard_count = ShardCount::new(shards).unwrap();
        let (queues, exchanges) = shopctrl_routing::app::declared_names(&names, shard_count.get());
        for name in queues {
            amqp.track_queue(name);
        }
        for name in exchanges {
            amqp.track_exchange(name);
        }
        let publisher = Publisher::connect(amqp.url(), "routing tests", Duration::from_secs(10))
            .await
            .unwrap();
        let settings = Self::settings_for(&db, &amqp, &redis, &config_url, shards, amqp.url());
        migrate(&settings).await.unwrap();
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect_with(db.options().options([("search_path", "routing")]))
            .await
            .unwrap();
        Self {
            db,
            amqp,
            redis,
            names,
            config,
            config_url,
            publisher,
            shards: shard_count,
            pool,
            services: Vec::new(),
        }
    }

    fn settings_for(
        db: &TestDatabase,
        amqp: &TestAmqp,
        redis: &TestRedis,
        config_url: &str,
        shards: u32,
        amqp_url: &str,
    ) -> Settings {
        let mut settings = Settings::defaults();
        settings.database_url = Redacted::new(db.url());
        settings.database_max_connections = shards + shopctrl_routing::app::RESERVED_CONNECTIONS;
        settings.amqp_url = Redacted::new(amqp_url);
        settings.amqp_prefix = amqp.prefix().to_owned();
        settings.routing_shards = shards;
        settings.grpc_listen_addr = "127.0.0.1:0".parse().unwrap();
        settings.ops_listen_addr = "127.0.0.1:0".parse().unwrap();
        settings.config_grpc_url = config_url.to_owned();
        settings.config_service_token = Some(Redacted::new("test-routing-token"));
        settings.auth_tokens = Some(Redacted::new(
            "shopctrl=test-shopctrl-token,ingress=test-ingress-token",
        ));
        settings.shutdown_grace_seconds = 10;
        settings.slots.redis_url = redis.url().to_owned();
        settings.slots.slots_key_prefix = redis.prefix().to_owned();
        settings
    }

    /// Starts one more routing replica (optionally through another AMQP URL, with a hook).
    pub async fn spawn(&self, amqp_url: Option<&str>, after_commit: Option<CommitHook>) -> Service {
        self.spawn_with_database(amqp_url, None, after_commit).await
    }

    /// Like [`Env::spawn`], with the database reached through another URL (a proxy).
    pub async fn spawn_with_database(
        &self,
        amqp_url: Option<&str>,
        database_url: Option<&str>,
        after_commit: Option<CommitHook>,
    ) -> Service {
        let mut settings = Self::settings_for(
            &self.db,
            &self.amqp,
            &self.redis,
            &self.config_url,
            u32::from(self.shards.get()),
            amqp_url.unwrap_or(self.amqp.url()),
        );
        if let Some(url) = database_url {
            settings.database_url = Redacted::new(url);
        }
        let app = App::build(
            settings,
            Overrides {
                config_source: None,
                after_commit,
            },
        )
        .await
        .unwrap();
        let grpc = app.grpc_addr().unwrap();
        let ops = app.ops_addr().unwrap();
        let stop = CancellationToken::new();
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                app.run(stop).await.unwrap();
            })
        };
        Service {
            grpc,
            ops,
            stop,
            task,
        }
    }

    pub async fn client(&self) -> ConversationServiceClient<GrpcChannel> {
        let addr = self.services[0].grpc;
        ConversationServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
    }

    /// Publishes like ingress: to the inbound exchange with the conversation's shard key.
    pub async fn publish(&self, event: &InboundWebhookEvent) {
        self.publish_raw(
            &shard_routing_key(
                &event.shop_id,
                &event.messagebird_conversation_id,
                self.shards,
            ),
            "shopctrl.messaging.v1.InboundWebhookEvent",
            &event.encode_to_vec(),
        )
        .await;
    }

    pub async fn publish_raw(&self, routing_key: &str, message_type: &str, payload: &[u8]) {
        let id = uuid::Uuid::new_v4().to_string();
        self.publisher
            .publish(Outgoing {
                exchange: &self.names.inbound_exchange(),
                routing_key,
                message_type,
                message_id: &id,
                payload,
                headers: &[],
                mandatory: true,
            })
            .await
            .unwrap();
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Messages in the inbound dead-letter queue, with their reason headers (consumes them).
    pub async fn dead_letters(&self) -> Vec<(Vec<u8>, String)> {
        let conn =
            lapin::Connection::connect(self.amqp.url(), lapin::ConnectionProperties::default())
                .await
                .unwrap();
        let channel = conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(message) = channel
            .basic_get(
                self.names.dead_letter_queue("inbound").as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            let reason = shopctrl_amqp::string_header(
                message.delivery.properties.headers().as_ref(),
                "x-dead-letter-reason",
            )
            .unwrap_or_default();
            out.push((message.delivery.data.clone(), reason));
        }
        let _ = conn.close(200, "ok".into()).await;
        out
    }

    pub async fn stop_all(&mut self) {
        for service in self.services.drain(..) {
            service.stop().await;
        }
    }
}

/// ShopCtrl's metadata for an employee.
pub fn as_employee<T>(message: T, employee: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        "Bearer test-shopctrl-token".parse().unwrap(),
    );
    request
        .metadata_mut()
        .insert("x-shopctrl-employee-id", employee.parse().unwrap());
    request
}

/// A realistic `message.created` for a WhatsApp text (or any type).
pub struct Msg {
    pub mb_conversation: String,
    pub mb_message: String,
    pub direction: Direction,
    pub kind: &'static str,
    pub text: String,
    pub msisdn: String,
    pub contact_id: String,
    pub created_at: DateTime<Utc>,
    pub status: &'static str,
    pub webhook_type: &'static str,
}

impl Msg {
    pub fn received(mb_conversation: &str, mb_message: &str, text: &str) -> Self {
        Self {
            mb_conversation: mb_conversation.into(),
            mb_message: mb_message.into(),
            direction: Direction::Received,
            kind: "text",
            text: text.into(),
            msisdn: "+31 6 1234 5678".into(),
            contact_id: "contact-1".into(),
            created_at: Utc::now(),
            status: "received",
            webhook_type: "message.created",
        }
    }

    pub fn sent(mb_conversation: &str, mb_message: &str, text: &str) -> Self {
        Self {
            direction: Direction::Sent,
            status: "sent",
            ..Self::received(mb_conversation, mb_message, text)
        }
    }

    pub fn event(&self) -> InboundWebhookEvent {
        let supported = matches!(self.kind, "text" | "whatsappText" | "interactive");
        let channel = if self.msisdn.is_empty() {
            Channel::WebWidget
        } else {
            Channel::Whatsapp
        };
        InboundWebhookEvent {
            meta: Some(EventMeta {
                event_id: uuid::Uuid::new_v4().to_string(),
                occurred_at: Some(ts(Utc::now())),
                producer: "test".into(),
            }),
            shop_id: SHOP.into(),
            webhook_type: self.webhook_type.into(),
            messagebird_conversation_id: self.mb_conversation.clone(),
            contact: Some(InboundContact {
                messagebird_contact_id: self.contact_id.clone(),
                msisdn: self.msisdn.clone(),
                display_name: "Jane".into(),
            }),
            message: Some(InboundMessage {
                messagebird_message_id: self.mb_message.clone(),
                direction: self.direction as i32,
                channel: channel as i32,
                platform: if self.msisdn.is_empty() {
                    "livechat".into()
                } else {
                    "whatsapp".into()
                },
                channel_id: "channel-1".into(),
                r#type: self.kind.into(),
                text: if supported {
                    self.text.clone()
                } else {
                    String::new()
                },
                supported,
                content_json: if self.kind == "text" {
                    serde_json::json!({ "text": self.text }).to_string()
                } else {
                    serde_json::json!({ self.kind: { "url": "https://example.com/x" } }).to_string()
                },
                raw_status: self.status.into(),
                status: shopctrl_domain::message_status_from_messagebird(self.status) as i32,
                created_at: Some(ts(self.created_at)),
                updated_at: Some(ts(self.created_at)),
                from: "31612345678".into(),
                to: "channel-1".into(),
            }),
            conversation_status: "active".into(),
            signature_scheme: "jwt".into(),
            received_at: Some(ts(Utc::now())),
            raw_body: Vec::new(),
        }
    }
}

pub fn ts(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

pub fn status_name(status: i32) -> MessageStatus {
    MessageStatus::try_from(status).unwrap_or(MessageStatus::Unspecified)
}

/// Polls `check` until it returns Some, or panics after `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
