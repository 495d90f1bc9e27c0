//! The whole stack as separate processes for end-to-end tests: the real `config`, `ingress`,
//! `routing` and `flow-callback` binaries on free ports, against the real PostgreSQL, Redis and
//! RabbitMQ, isolated per test (own database, Redis key prefix and AMQP name prefix).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::HashMap,
    net::TcpListener,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use shopctrl_testkit::{TestAmqp, TestDatabase, TestRedis};
use tokio::process::{Child, Command};

pub const SHOPCTRL_TOKEN: &str = "e2e-shopctrl-token-0001";
pub const INGRESS_TOKEN: &str = "e2e-ingress-token-00001";
pub const ROUTING_TOKEN: &str = "e2e-routing-token-00001";
pub const FLOW_CALLBACK_TOKEN: &str = "e2e-flowcb-token-000001";
/// 32 zero-free bytes, base64: the test encryption key.
pub const ENCRYPTION_KEYS: &str = "e2e:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// Where cargo put the binaries of this workspace (next to the test executable).
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "binary {} is missing: build the workspace first (`cargo build --workspace --bins` or `make test`)",
        path.display()
    );
    path
}

/// A free port on 127.0.0.1 (the process binds it a moment later).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One running service process; killed when dropped.
pub struct Service {
    pub name: &'static str,
    pub ops: String,
    child: Child,
    pub log: PathBuf,
}

impl Service {
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends SIGTERM and waits for the exit status (graceful shutdown).
    pub async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // Dead before the backends go: a live service would declare its queues again.
        for _ in 0..200 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Everything a stack needs to know about its backends.
pub struct Backends {
    pub db: TestDatabase,
    pub redis: TestRedis,
    pub amqp: TestAmqp,
    pub log_dir: PathBuf,
}

impl Backends {
    pub async fn create() -> Self {
        shopctrl_testkit::init_logging();
        let db = TestDatabase::create().await;
        let redis = TestRedis::create().await;
        let amqp = TestAmqp::create().await;
        let log_dir = std::env::temp_dir().join(format!("shopctrl-e2e-{}", db.name()));
        std::fs::create_dir_all(&log_dir).expect("log directory");
        Self {
            db,
            redis,
            amqp,
            log_dir,
        }
    }

    /// Registers every durable queue and exchange the services declare under this stack's
    /// prefix, so they are deleted when the stack goes away (with the default retry tiers).
    pub fn track_topology(&self, shards: u32) {
        let shards = u16::try_from(shards).expect("shard count fits u16");
        let names = shopctrl_amqp::Names::new(self.amqp.prefix());
        let (queues, exchanges) = shopctrl_routing::app::declared_names(&names, shards);
        let tiers = shopctrl_flow_callback::Settings::defaults()
            .retry_policy()
            .expect("default retry policy")
            .tiers()
            .to_vec();
        let flow_callback = shopctrl_flow_callback::topology::Topology::new(names, &tiers);
        for queue in queues.into_iter().chain(flow_callback.queue_names()) {
            self.amqp.track_queue(queue);
        }
        for exchange in exchanges {
            self.amqp.track_exchange(exchange);
        }
    }

    /// Environment shared by every service of this stack.
    pub fn common_env(&self, shards: u32) -> HashMap<String, String> {
        let mut env = HashMap::new();
        env.insert("DATABASE_URL".into(), self.db.url().to_owned());
        env.insert("AMQP_URL".into(), self.amqp.url().to_owned());
        env.insert("AMQP_PREFIX".into(), self.amqp.prefix().to_owned());
        env.insert("REDIS_URL".into(), self.redis.url().to_owned());
        env.insert("REDIS_KEY_PREFIX".into(), self.redis.prefix().to_owned());
        env.insert("SLOTS_KEY_PREFIX".into(), self.redis.prefix().to_owned());
        env.insert("ROUTING_SHARDS".into(), shards.to_string());
        env.insert("LOG_FORMAT".into(), "json".into());
        env.insert(
            "RUST_LOG".into(),
            std::env::var("E2E_RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        env.insert("SHUTDOWN_GRACE_SECONDS".into(), "5".into());
        env.insert(
            "AUTH_TOKENS".into(),
            format!(
                "shopctrl={SHOPCTRL_TOKEN},ingress={INGRESS_TOKEN},routing={ROUTING_TOKEN},flow-callback={FLOW_CALLBACK_TOKEN}"
            ),
        );
        env
    }

    /// Starts `name` with `args` and `env`, then waits until its `/readyz` answers 200.
    pub async fn spawn(
        &self,
        name: &'static str,
        args: &[&str],
        env: &HashMap<String, String>,
        ops_port: u16,
    ) -> Service {
        let log = self.log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("service log file");
        let child = Command::new(binary(name))
            .args(args)
            .envs(env)
            .env("OPS_LISTEN_ADDR", format!("127.0.0.1:{ops_port}"))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let mut service = Service {
            name,
            ops: format!("http://127.0.0.1:{ops_port}"),
            child,
            log,
        };
        wait_ready(&mut service, Duration::from_secs(60)).await;
        service
    }
}

/// Waits until `/readyz` answers 200; panics with the service's log tail otherwise.
pub async fn wait_ready(service: &mut Service, within: Duration) {
    let client = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = service.child.try_wait() {
            panic!(
                "{} exited with {status} before it was ready; log:\n{}",
                service.name,
                log_tail(&service.log)
            );
        }
        if let Ok(response) = client
            .get(format!("{}/readyz", service.ops))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            && response.status().is_success()
        {
            return;
        }
        if started.elapsed() > within {
            panic!(
                "{} not ready within {within:?}; log:\n{}",
                service.name,
                log_tail(&service.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn log_tail(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Polls `check` until it returns `Some`, for at most `within` (a bound, not a timing claim).
pub async fn eventually<T, F, Fut>(within: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if started.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

use shopctrl_e2e::{conversations_api::ConversationsApi, flow_receiver::FlowReceiver, webhooks};
use shopctrl_proto::v1::{
    self as pb, config_service_client::ConfigServiceClient,
    conversation_service_client::ConversationServiceClient,
};
use tonic::{Request, metadata::MetadataValue, transport::Channel};

/// The four services, the simulator's MessageBird side, and clients for the public doors.
/// Fields drop in order: the services die before their backends are deleted.
pub struct Stack {
    pub config: Service,
    pub routing: Service,
    pub ingress: Service,
    pub flow_callback: Service,
    pub config_grpc: String,
    pub routing_grpc: String,
    pub ingress_url: String,
    pub api: ConversationsApi,
    pub flows: FlowReceiver,
    pub http: reqwest::Client,
    routing_env: HashMap<String, String>,
    routing_ops_port: u16,
    pub backends: Backends,
}

pub fn authed<T>(message: T, employee: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {SHOPCTRL_TOKEN}")).unwrap(),
    );
    request.metadata_mut().insert(
        "x-shopctrl-employee-id",
        MetadataValue::try_from(employee).unwrap(),
    );
    request
}

/// Extra settings for a stack.
#[derive(Debug, Clone, Default)]
pub struct StackOptions {
    /// Added to every service's environment.
    pub env: Vec<(String, String)>,
    /// Added to routing's environment only (e.g. URLs through a TCP proxy).
    pub routing_env: Vec<(String, String)>,
}

/// A shop as the tests set it up.
#[derive(Debug, Clone)]
pub struct TestShop {
    pub id: String,
    pub signing_key: String,
    pub handover_secret: String,
    pub callback_secret: String,
}

pub const OWNER: &str = "owner";

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(StackOptions::default()).await
    }

    pub async fn start_with(options: StackOptions) -> Self {
        let backends = Backends::create().await;
        let api = ConversationsApi::start()
            .await
            .expect("simulated MessageBird API");
        let flows = FlowReceiver::start()
            .await
            .expect("simulated flow receiver");
        let shards = 2;
        backends.track_topology(shards);
        let mut env = backends.common_env(shards);
        env.insert("ALLOW_HTTP_WEBHOOK_URLS".into(), "true".into());
        env.insert("SECRETS_ENCRYPTION_KEYS".into(), ENCRYPTION_KEYS.into());
        env.insert("SSRF_ALLOW_CIDRS".into(), "127.0.0.0/8".into());
        for (k, v) in &options.env {
            env.insert(k.clone(), v.clone());
        }

        let config_port = free_port();
        let config_grpc = format!("http://127.0.0.1:{config_port}");
        let mut config_env = env.clone();
        config_env.insert(
            "GRPC_LISTEN_ADDR".into(),
            format!("127.0.0.1:{config_port}"),
        );
        let config = backends
            .spawn("config", &["serve"], &config_env, free_port())
            .await;

        let routing_port = free_port();
        let routing_grpc = format!("http://127.0.0.1:{routing_port}");
        let mut routing_env = env.clone();
        routing_env.insert(
            "GRPC_LISTEN_ADDR".into(),
            format!("127.0.0.1:{routing_port}"),
        );
        routing_env.insert("CONFIG_GRPC_URL".into(), config_grpc.clone());
        routing_env.insert("CONFIG_SERVICE_TOKEN".into(), ROUTING_TOKEN.into());
        for (k, v) in &options.routing_env {
            routing_env.insert(k.clone(), v.clone());
        }
        let routing_ops_port = free_port();
        let routing = backends
            .spawn("routing", &["serve"], &routing_env, routing_ops_port)
            .await;

        let ingress_port = free_port();
        let ingress_url = format!("http://127.0.0.1:{ingress_port}");
        let mut ingress_env = env.clone();
        ingress_env.insert(
            "HTTP_LISTEN_ADDR".into(),
            format!("127.0.0.1:{ingress_port}"),
        );
        ingress_env.insert("PUBLIC_BASE_URL".into(), ingress_url.clone());
        ingress_env.insert("CONFIG_GRPC_URL".into(), config_grpc.clone());
        ingress_env.insert("CONFIG_SERVICE_TOKEN".into(), INGRESS_TOKEN.into());
        let ingress = backends
            .spawn("ingress", &["serve"], &ingress_env, free_port())
            .await;

        let mut callback_env = env.clone();
        callback_env.insert("CONFIG_GRPC_URL".into(), config_grpc.clone());
        callback_env.insert("CONFIG_SERVICE_TOKEN".into(), FLOW_CALLBACK_TOKEN.into());
        callback_env.insert("MESSAGEBIRD_API_BASE_URL".into(), api.base_url());
        let flow_callback = backends
            .spawn("flow-callback", &["serve"], &callback_env, free_port())
            .await;

        Self {
            backends,
            config,
            routing,
            ingress,
            flow_callback,
            config_grpc,
            routing_grpc,
            ingress_url,
            api,
            flows,
            http: reqwest::Client::new(),
            routing_env,
            routing_ops_port,
        }
    }

    /// Restarts routing (gracefully) with extra environment, e.g. backends behind proxies.
    pub async fn set_routing_env(&mut self, extra: Vec<(String, String)>) {
        for (k, v) in extra {
            self.routing_env.insert(k, v);
        }
        let _ = self.routing.terminate(Duration::from_secs(10)).await;
        self.routing = self
            .backends
            .spawn(
                "routing",
                &["serve"],
                &self.routing_env,
                self.routing_ops_port,
            )
            .await;
    }

    /// Kills routing with SIGKILL and starts it again (same settings).
    pub async fn restart_routing_hard(&mut self) {
        self.routing.kill().await;
        self.routing = self
            .backends
            .spawn(
                "routing",
                &["serve"],
                &self.routing_env,
                self.routing_ops_port,
            )
            .await;
    }

    pub async fn config_client(&self) -> ConfigServiceClient<Channel> {
        ConfigServiceClient::connect(self.config_grpc.clone())
            .await
            .expect("config gRPC")
    }

    pub async fn routing_client(&self) -> ConversationServiceClient<Channel> {
        ConversationServiceClient::connect(self.routing_grpc.clone())
            .await
            .expect("routing gRPC")
    }

    /// Creates a shop with settings, an owner, and secrets; returns what tests need.
    pub async fn create_shop(
        &self,
        shop_id: &str,
        slots: u32,
        assign_on_first_message: bool,
    ) -> TestShop {
        self.create_shop_with(shop_id, slots, assign_on_first_message, true)
            .await
    }

    pub async fn create_shop_with(
        &self,
        shop_id: &str,
        slots: u32,
        assign_on_first_message: bool,
        new_conversation_on_closed: bool,
    ) -> TestShop {
        let mut config = self.config_client().await;
        config
            .upsert_employee_role(authed(
                pb::UpsertEmployeeRoleRequest {
                    shop_id: shop_id.into(),
                    employee_id: OWNER.into(),
                    role: pb::Role::ShopOwnerAdmin as i32,
                    display_name: "Owner".into(),
                },
                OWNER,
            ))
            .await
            .expect("owner role");
        let signing_key = format!("signing-key-{shop_id}-0123456789abcdef");
        config
            .update_shop_settings(authed(
                pb::UpdateShopSettingsRequest {
                    shop_id: shop_id.into(),
                    expected_version: 0,
                    workspace_id: Some("ws1234".into()),
                    access_key: Some(format!("live_access_key_{shop_id}_0123456789")),
                    signing_key: Some(signing_key.clone()),
                    assign_on_first_message: Some(assign_on_first_message),
                    event_webhook_url: Some(self.flows.url(shop_id)),
                    whatsapp_template_name: Some("agent_reply".into()),
                    whatsapp_template_namespace: Some(
                        "20332cd4_f095_b080_d255_35677159aaff".into(),
                    ),
                    whatsapp_template_language: Some("en".into()),
                    new_conversation_on_closed: Some(new_conversation_on_closed),
                    conversation_slots: Some(slots),
                    legacy_signature_enabled: Some(false),
                },
                OWNER,
            ))
            .await
            .expect("shop settings");
        let handover_secret = config
            .rotate_handover_secret(authed(
                pb::RotateSecretRequest {
                    shop_id: shop_id.into(),
                },
                OWNER,
            ))
            .await
            .expect("handover secret")
            .into_inner()
            .secret;
        let callback_secret = config
            .rotate_callback_secret(authed(
                pb::RotateSecretRequest {
                    shop_id: shop_id.into(),
                },
                OWNER,
            ))
            .await
            .expect("callback secret")
            .into_inner()
            .secret;
        TestShop {
            id: shop_id.into(),
            signing_key,
            handover_secret,
            callback_secret,
        }
    }

    /// Gives `employee` a role and the Chat permission at `shop`.
    pub async fn add_agent(&self, shop: &str, employee: &str) {
        let mut config = self.config_client().await;
        config
            .upsert_employee_role(authed(
                pb::UpsertEmployeeRoleRequest {
                    shop_id: shop.into(),
                    employee_id: employee.into(),
                    role: pb::Role::ShopEmployee as i32,
                    display_name: format!("Agent {employee}"),
                },
                OWNER,
            ))
            .await
            .expect("agent role");
        config
            .set_chat_permission(authed(
                pb::SetChatPermissionRequest {
                    shop_id: shop.into(),
                    employee_id: employee.into(),
                    chat_permission: true,
                },
                OWNER,
            ))
            .await
            .expect("chat permission");
    }

    /// Waits until routing has made `employee` a slot candidate of `shop` (config events
    /// travel on their own), for a test whose count of flow events needs the permission applied
    /// before a handover rather than racing it. A precondition read, not a rule checked.
    pub async fn wait_candidate(&self, shop: &str, employee: &str) {
        let pool = self.backends.db.pool().await;
        let applied = eventually(Duration::from_secs(20), || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "select count(*) from routing.slot_candidates
                     where shop_id = $1 and employee_id = $2",
                )
                .bind(shop)
                .bind(employee)
                .fetch_one(&pool)
                .await
                .ok()
                .filter(|n| *n > 0)
            }
        })
        .await;
        pool.close().await;
        assert!(
            applied.is_some(),
            "routing never applied {employee}'s permission at {shop}"
        );
    }

    /// Sends a signed webhook to ingress; returns the status.
    pub async fn send_webhook(&self, shop: &TestShop, body: &serde_json::Value) -> u16 {
        let body = serde_json::to_vec(body).unwrap();
        let signed = webhooks::sign_webhook(
            &self.ingress_url,
            &webhooks::webhook_path(&shop.id),
            &body,
            &shop.signing_key,
        );
        let mut request = self.http.post(&signed.url).body(signed.body.clone());
        for (name, value) in &signed.headers {
            request = request.header(name, value);
        }
        request
            .send()
            .await
            .expect("ingress answers")
            .status()
            .as_u16()
    }

    /// A customer message; returns the MessageBird message id used.
    pub async fn customer_says(
        &self,
        shop: &TestShop,
        conversation: &webhooks::Conversation,
        text: &str,
    ) -> String {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let status = self
            .send_webhook(
                shop,
                &conversation.inbound(&id, &webhooks::Content::Text(text.into())),
            )
            .await;
        assert_eq!(status, 200, "ingress accepts a genuine webhook");
        id
    }

    pub async fn dialogs(
        &self,
        shop: &str,
        viewer: &str,
        filter: pb::DialogFilter,
    ) -> Result<Vec<pb::Conversation>, tonic::Status> {
        let mut routing = self.routing_client().await;
        routing
            .list_dialogs(authed(
                pb::ListDialogsRequest {
                    shop_id: shop.into(),
                    filter: filter as i32,
                    page: Some(pb::PageRequest {
                        page_size: 200,
                        page_token: String::new(),
                    }),
                },
                viewer,
            ))
            .await
            .map(|r| r.into_inner().conversations)
    }

    /// The open conversation for a MessageBird conversation id, once routing recorded it.
    pub async fn wait_conversation(
        &self,
        shop: &str,
        viewer: &str,
        mb_conversation_id: &str,
        predicate: impl Fn(&pb::Conversation) -> bool,
    ) -> pb::Conversation {
        let found = eventually(Duration::from_secs(20), || async {
            self.dialogs(shop, viewer, pb::DialogFilter::All)
                .await
                .ok()?
                .into_iter()
                .find(|c| c.messagebird_conversation_id == mb_conversation_id && predicate(c))
        })
        .await;
        match found {
            Some(conversation) => conversation,
            None => {
                let all = self.dialogs(shop, viewer, pb::DialogFilter::All).await;
                panic!(
                    "conversation {mb_conversation_id} never reached the expected state; dialogs: {all:#?}"
                )
            }
        }
    }
}
