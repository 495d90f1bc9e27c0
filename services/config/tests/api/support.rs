//! A config service started in-process for one test: its own database, its own AMQP name
//! prefix, listeners on port 0, and real tonic clients.

use std::{net::SocketAddr, time::Duration};

use futures::StreamExt as _;
use lapin::{
    Connection, ConnectionProperties,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use prost::Message as _;
use shopctrl_amqp::Names;
use shopctrl_config::{App, Redacted, Settings};
use shopctrl_proto::v1::{
    ConfigChanged, Role, UpsertEmployeeRoleRequest,
    config_internal_service_client::ConfigInternalServiceClient,
    config_service_client::ConfigServiceClient,
};
use shopctrl_testkit::{TestAmqp, TestDatabase};
use tokio::{io::AsyncReadExt as _, io::AsyncWriteExt as _, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{Request, transport::Channel};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub const SHOPCTRL: &str = "test-shopctrl-token-0001";
pub const INGRESS: &str = "test-ingress-token-00001";
pub const ROUTING: &str = "test-routing-token-00001";
pub const FLOW_CALLBACK: &str = "test-flow-callback-token";

/// Two keys: tests seal with `k1` and rotate to `k2`.
pub const KEY_1: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
pub const KEY_2: &str = "k2:Hx4dHBsaGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=";

pub const SHOP: &str = "shop-1";
pub const OWNER: &str = "emp-owner";

pub struct Running {
    pub grpc_addr: SocketAddr,
    pub ops_addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Stops the service the way SIGTERM does and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}

/// One test's service and backends.
pub struct TestService {
    pub db: TestDatabase,
    pub amqp: TestAmqp,
    pub running: Option<Running>,
    channel: Option<Channel>,
}

pub fn settings_for(db: &TestDatabase, amqp: &TestAmqp, keys: &str) -> Settings {
    let mut settings = Settings::defaults();
    settings.database_url = Redacted::new(db.url());
    settings.amqp_url = Redacted::new(amqp.url());
    settings.amqp_prefix = amqp.prefix().to_owned();
    settings.grpc_listen_addr = "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"));
    settings.ops_listen_addr = "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"));
    settings.auth_tokens = Some(Redacted::new(format!(
        "shopctrl={SHOPCTRL},ingress={INGRESS},routing={ROUTING},flow-callback={FLOW_CALLBACK}"
    )));
    settings.secrets_encryption_keys = Some(Redacted::new(keys));
    settings.allow_http_webhook_urls = false;
    settings.ssrf_allow_cidrs = String::new();
    settings.shutdown_grace_seconds = 5;
    settings
}

impl TestService {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        shopctrl_telemetry::init_for_tests();
        let db = TestDatabase::create().await;
        let amqp = TestAmqp::create().await;
        amqp.track_exchange(Names::new(amqp.prefix()).config_exchange());
        let mut settings = settings_for(&db, &amqp, KEY_1);
        adjust(&mut settings);
        let mut service = Self {
            db,
            amqp,
            running: None,
            channel: None,
        };
        service.launch(settings).await;
        service
    }

    /// Starts (again) with these settings, on the same database and prefix.
    pub async fn launch(&mut self, settings: Settings) {
        let app = App::build(settings)
            .await
            .unwrap_or_else(|e| panic!("config service did not build: {e:#}"));
        let grpc_addr = app.grpc_addr();
        let ops_addr = app.ops_addr();
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run(stop.clone()));
        let channel = Channel::from_shared(format!("http://{grpc_addr}"))
            .unwrap_or_else(|e| panic!("{e}"))
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the config service: {e}"));
        self.channel = Some(channel);
        self.running = Some(Running {
            grpc_addr,
            ops_addr,
            stop,
            task,
        });
    }

    /// Stops the running service (graceful) so it can be launched again.
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running
                .stop()
                .await
                .unwrap_or_else(|e| panic!("service did not stop cleanly: {e:#}"));
        }
        self.channel = None;
    }

    pub fn settings(&self, keys: &str) -> Settings {
        settings_for(&self.db, &self.amqp, keys)
    }

    pub fn channel(&self) -> Channel {
        self.channel
            .clone()
            .unwrap_or_else(|| panic!("the service is not running"))
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.running
            .as_ref()
            .map(|r| r.grpc_addr)
            .unwrap_or_else(|| panic!("the service is not running"))
    }

    pub fn ops_addr(&self) -> SocketAddr {
        self.running
            .as_ref()
            .map(|r| r.ops_addr)
            .unwrap_or_else(|| panic!("the service is not running"))
    }

    pub fn admin(&self) -> ConfigServiceClient<Channel> {
        ConfigServiceClient::new(self.channel())
    }

    pub fn internal(&self) -> ConfigInternalServiceClient<Channel> {
        ConfigInternalServiceClient::new(self.channel())
    }

    /// Gives `employee` a role at `shop` (as ShopCtrl reports it).
    pub async fn grant_role(&self, shop: &str, employee: &str, role: Role) {
        self.admin()
            .upsert_employee_role(call(
                UpsertEmployeeRoleRequest {
                    shop_id: shop.into(),
                    employee_id: employee.into(),
                    role: role as i32,
                    display_name: format!("Employee {employee}"),
                },
                SHOPCTRL,
                None,
            ))
            .await
            .unwrap_or_else(|e| panic!("upsert role failed: {e:?}"));
    }

    /// A test queue bound to the config fan-out exchange.
    pub async fn tap(&self) -> EventTap {
        EventTap::bind(
            self.amqp.url(),
            &Names::new(self.amqp.prefix()).config_exchange(),
        )
        .await
    }

    /// `GET path` on the ops server: (status, body).
    pub async fn ops_get(&self, path: &str) -> (u16, String) {
        http_get(self.ops_addr(), path).await
    }
}

impl Drop for TestService {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop.cancel();
        }
    }
}

/// A request with the service token and, optionally, the acting employee.
pub fn call<T>(message: T, token: &str, employee: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    if let Some(employee) = employee
        && let Ok(value) = employee.parse()
    {
        request
            .metadata_mut()
            .insert("x-shopctrl-employee-id", value);
    }
    request
}

/// An admin call by ShopCtrl acting for the shop owner.
pub fn as_owner<T>(message: T) -> Request<T> {
    call(message, SHOPCTRL, Some(OWNER))
}

/// Receives ConfigChanged events from a server-named, exclusive queue on the fan-out.
pub struct EventTap {
    _connection: Connection,
    consumer: lapin::Consumer,
}

impl EventTap {
    pub async fn bind(url: &str, exchange: &str) -> Self {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ unreachable: {e}"));
        let channel = connection
            .create_channel()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "test-tap".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            _connection: connection,
            consumer,
        }
    }

    /// The next event (decoded) with its AMQP type and message id; panics after 20 s.
    pub async fn next(&mut self) -> (ConfigChanged, String, String) {
        let delivery = tokio::time::timeout(Duration::from_secs(20), self.consumer.next())
            .await
            .unwrap_or_else(|_| panic!("no ConfigChanged event within 20 s"))
            .unwrap_or_else(|| panic!("consumer closed"))
            .unwrap_or_else(|e| panic!("delivery failed: {e}"));
        let event = ConfigChanged::decode(delivery.data.as_slice())
            .unwrap_or_else(|e| panic!("not a ConfigChanged: {e}"));
        let kind = delivery
            .properties
            .kind()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        (event, kind, id)
    }

    /// Skips events (for example those of the test's set-up, still being relayed) until one
    /// matches.
    pub async fn next_where(&mut self, wanted: impl Fn(&ConfigChanged) -> bool) -> ConfigChanged {
        loop {
            let (event, _, _) = self.next().await;
            if wanted(&event) {
                return event;
            }
        }
    }

    /// Asserts nothing arrives for `wait`.
    pub async fn assert_quiet(&mut self, wait: Duration) {
        if let Ok(Some(Ok(delivery))) = tokio::time::timeout(wait, self.consumer.next()).await {
            let event = ConfigChanged::decode(delivery.data.as_slice());
            panic!("unexpected event: {event:?}");
        }
    }
}

/// A minimal HTTP/1.0 GET, enough for the ops endpoints.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("ops server unreachable: {e}"));
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
