//! Wiring: [`App::build`] connects to PostgreSQL (schema + migrations) and RabbitMQ (declares
//! the config fan-out exchange) and binds both listeners; [`App::run`] serves gRPC, relays the
//! outbox, watches readiness and drains on shutdown.

use std::{
    net::SocketAddr,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use shopctrl_amqp::{Names, OutboxRelay, Publisher, declare_exchange, lapin::ExchangeKind};
use shopctrl_proto::v1::{
    config_internal_service_server::ConfigInternalServiceServer,
    config_service_server::ConfigServiceServer,
};
use shopctrl_runtime::{OpsServer, Readiness, wait_with_grace};
use sqlx::{
    ConnectOptions, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{Authenticator, Tokens},
    crypto::KeyRing,
    metrics::Metrics,
    service::Handlers,
    settings::Settings,
    store::Store,
    validate::UrlPolicy,
};

/// Every gRPC service this server answers, as reflection lists them.
const SERVED: [&str; 5] = [
    "shopctrl.messaging.v1.ConfigService",
    "shopctrl.messaging.v1.ConfigInternalService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The PostgreSQL schema the service owns.
pub const SCHEMA: &str = "config";

/// Creates the `config` schema when missing, runs the embedded migrations, and returns a pool
/// whose connections use the schema.
pub async fn connect_and_migrate(settings: &Settings) -> anyhow::Result<PgPool> {
    let base = PgConnectOptions::from_str(settings.database_url.expose())
        .context("DATABASE_URL is not a valid PostgreSQL URL")?;
    {
        let mut conn = base
            .connect()
            .await
            .context("cannot connect to PostgreSQL (DATABASE_URL)")?;
        // `if not exists` still races when replicas start together; the loser's error is
        // harmless as long as the schema exists afterwards.
        let created = sqlx::query(sqlx::AssertSqlSafe(format!(
            "create schema if not exists {SCHEMA}"
        )))
        .execute(&mut conn)
        .await;
        if let Err(error) = created {
            let exists: bool =
                sqlx::query_scalar("select exists (select 1 from pg_namespace where nspname = $1)")
                    .bind(SCHEMA)
                    .fetch_one(&mut conn)
                    .await
                    .context("cannot check the config schema")?;
            if !exists {
                return Err(error).context("cannot create the config schema");
            }
        }
        let _ = sqlx::Connection::close(conn).await;
    }
    let pool = PgPoolOptions::new()
        .max_connections(settings.database_max_connections.max(2))
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(base.options([("search_path", SCHEMA)]))
        .await
        .context("cannot open the PostgreSQL pool")?;
    let mut migrator = sqlx::migrate!("./migrations");
    // During a rolling upgrade the previous release's pods still start (restarts, scaling)
    // after the new release migrated: migrations it does not know are expected then, since
    // each one stays compatible with the release before.
    migrator.set_ignore_missing(true);
    migrator
        .run(&pool)
        .await
        .context("running the config migrations failed")?;
    Ok(pool)
}

/// Loads the encryption keys: the variable, else the file, else the development key.
pub fn load_key_ring(settings: &Settings) -> anyhow::Result<KeyRing> {
    if let Some(spec) = &settings.secrets_encryption_keys {
        return KeyRing::parse(spec.expose()).context("SECRETS_ENCRYPTION_KEYS is invalid");
    }
    if let Some(path) = &settings.secrets_encryption_keys_file {
        let spec = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read SECRETS_ENCRYPTION_KEYS_FILE {}",
                path.display()
            )
        })?;
        return KeyRing::parse(&spec).context("SECRETS_ENCRYPTION_KEYS_FILE is invalid");
    }
    tracing::warn!(
        "!!! SECRETS_ENCRYPTION_KEYS is not set: secrets are encrypted with the PUBLIC \
         DEVELOPMENT KEY. Anyone can decrypt them. Never run like this in production. !!!"
    );
    Ok(KeyRing::development()?)
}

fn load_tokens(settings: &Settings) -> anyhow::Result<Tokens> {
    match &settings.auth_tokens {
        Some(spec) => Tokens::parse(spec.expose()).context("AUTH_TOKENS is invalid"),
        None => {
            tracing::warn!(
                "AUTH_TOKENS is not set: accepting the development tokens dev-<caller>-token; \
                 set AUTH_TOKENS in any shared environment"
            );
            Ok(Tokens::development())
        }
    }
}

/// A built service: connected, migrated, listeners bound. Call [`App::run`].
pub struct App {
    settings: Settings,
    pool: PgPool,
    publisher: Publisher,
    handlers: Handlers,
    tokens: Tokens,
    metrics: Metrics,
    readiness: Readiness,
    db_ready: Arc<AtomicBool>,
    broker_ready: Arc<AtomicBool>,
    grpc_listener: TcpListener,
    grpc_addr: SocketAddr,
    ops: OpsServer,
    ops_addr: SocketAddr,
}

impl App {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let tokens = load_tokens(&settings)?;
        let keys = Arc::new(load_key_ring(&settings)?);
        tracing::info!(
            active_key = keys.active_key_id(),
            "secret encryption keys loaded"
        );
        let pool = connect_and_migrate(&settings).await?;

        let names = Names::new(settings.amqp_prefix.clone());
        // A broker that accepts TCP but never completes the handshake would otherwise hang the
        // start forever; failing lets Kubernetes restart the pod and report it.
        let broker_timeout = Duration::from_secs(30);
        let publisher = tokio::time::timeout(
            broker_timeout,
            Publisher::connect(
                settings.amqp_url.expose(),
                "shopctrl-config",
                Duration::from_secs(10),
            ),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!("RabbitMQ (AMQP_URL) did not answer within {broker_timeout:?}")
        })?
        .context("cannot connect to RabbitMQ (AMQP_URL)")?;
        tokio::time::timeout(broker_timeout, async {
            let channel = publisher.channel().await?;
            declare_exchange(&channel, &names.config_exchange(), ExchangeKind::Fanout)
                .await
                .context("cannot declare the config exchange")
        })
        .await
        .map_err(|_| {
            anyhow::anyhow!("declaring the config exchange took over {broker_timeout:?}")
        })??;

        let metrics = Metrics::new();
        let store = Store::new(pool.clone(), keys, names.config_exchange());
        let url_policy =
            UrlPolicy::parse(settings.allow_http_webhook_urls, &settings.ssrf_allow_cidrs)?;
        if url_policy.allow_http {
            tracing::warn!(
                "ALLOW_HTTP_WEBHOOK_URLS is on: http:// Event webhook URLs are accepted"
            );
        }
        if !url_policy.allow.is_empty() {
            tracing::warn!(
                allowed = ?url_policy.allow,
                "SSRF_ALLOW_CIDRS exempts these networks from the private-address rule"
            );
        }
        let handlers = Handlers::new(store, metrics.clone(), url_policy);

        let readiness = Readiness::default();
        let db_ready = readiness.check("database");
        let broker_ready = readiness.check("broker");
        db_ready.store(true, Ordering::SeqCst);
        broker_ready.store(publisher.is_connected(), Ordering::SeqCst);

        let grpc_listener = TcpListener::bind(settings.grpc_listen_addr)
            .await
            .with_context(|| {
                format!("cannot bind GRPC_LISTEN_ADDR {}", settings.grpc_listen_addr)
            })?;
        let grpc_addr = grpc_listener.local_addr()?;
        let ops = OpsServer::bind(
            settings.ops_listen_addr,
            "config",
            readiness.clone(),
            metrics.registry(),
        )
        .await?;
        let ops_addr = ops.local_addr()?;
        Ok(Self {
            settings,
            pool,
            publisher,
            handlers,
            tokens,
            metrics,
            readiness,
            db_ready,
            broker_ready,
            grpc_listener,
            grpc_addr,
            ops,
            ops_addr,
        })
    }

    /// The bound gRPC address (the real port when 0 was asked for).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The bound address of /healthz, /readyz and /metrics.
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// The pool (schema `config`), for tests that read rows as stored.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Serves until `shutdown` is cancelled, then drains within SHUTDOWN_GRACE_SECONDS:
    /// readiness goes down, gRPC stops accepting and finishes in-flight calls, the outbox relay
    /// publishes what is left, and the ops server stops last.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            settings,
            pool,
            publisher,
            handlers,
            tokens,
            metrics,
            readiness,
            db_ready,
            broker_ready,
            grpc_listener,
            grpc_addr,
            ops,
            ops_addr,
        } = self;

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<ConfigServiceServer<Handlers>>()
            .await;
        health_reporter
            .set_serving::<ConfigInternalServiceServer<Handlers>>()
            .await;
        // Each builder registers its own reflection protocol's descriptors; add the other one's
        // and list exactly what this server serves (the descriptor set also holds routing's API).
        let reflection = || {
            let mut builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(shopctrl_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // google.rpc.BadRequest and friends, so clients can decode the error details.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET);
            for name in SERVED {
                builder = builder.with_service_name(name);
            }
            builder
        };
        let reflection_v1 = reflection()
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .build_v1()?;
        // grpcurl builds before 1.8.8 only speak the v1alpha reflection protocol.
        let reflection_v1alpha = reflection()
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let auth = Authenticator::new(tokens, metrics.clone());

        let ops_stop = CancellationToken::new();
        let relay_stop = CancellationToken::new();
        let ops_task: JoinHandle<()> = {
            let stop = ops_stop.clone();
            tokio::spawn(async move {
                if let Err(error) = ops.run(stop).await {
                    tracing::error!(%error, "operations server stopped");
                }
            })
        };
        let relay = OutboxRelay::new(pool.clone(), publisher.clone()).with_mandatory(false);
        let mut relay_task = tokio::spawn(relay.clone().run(relay_stop.clone()));
        let monitor_task = tokio::spawn(monitor(
            pool.clone(),
            publisher,
            relay,
            metrics,
            db_ready,
            broker_ready,
            ops_stop.clone(),
        ));

        let draining = {
            let shutdown = shutdown.clone();
            let readiness = readiness.clone();
            let health_reporter = health_reporter.clone();
            async move {
                shutdown.cancelled().await;
                readiness.set_draining();
                health_reporter
                    .set_not_serving::<ConfigServiceServer<Handlers>>()
                    .await;
                health_reporter
                    .set_not_serving::<ConfigInternalServiceServer<Handlers>>()
                    .await;
                tracing::info!("draining: no new gRPC connections, finishing in-flight calls");
            }
        };
        let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener);
        let server = tonic::transport::Server::builder()
            .timeout(Duration::from_secs(30))
            .trace_fn(|request| tracing::info_span!("grpc", path = %request.uri().path()))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(ConfigServiceServer::with_interceptor(
                handlers.clone(),
                auth.clone(),
            ))
            .add_service(ConfigInternalServiceServer::with_interceptor(
                handlers, auth,
            ))
            .serve_with_incoming_shutdown(incoming, draining);
        let mut server_task = tokio::spawn(server);
        tracing::info!(%grpc_addr, %ops_addr, "config service started");

        // Either the server fails on its own, or shutdown begins.
        tokio::select! {
            result = &mut server_task => {
                relay_stop.cancel();
                ops_stop.cancel();
                let _ = relay_task.await;
                let _ = ops_task.await;
                let _ = monitor_task.await;
                return match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(error).context("gRPC server failed"),
                    Err(error) => Err(error).context("gRPC server task panicked"),
                };
            }
            _ = shutdown.cancelled() => {}
        }

        let grace = Duration::from_secs(settings.shutdown_grace_seconds);
        let drained = wait_with_grace(
            async {
                match (&mut server_task).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::error!(%error, "gRPC server failed while draining"),
                    Err(error) => tracing::error!(%error, "gRPC server task panicked"),
                }
                // The relay publishes what the last calls committed before it returns.
                relay_stop.cancel();
                let _ = (&mut relay_task).await;
            },
            grace,
        )
        .await;
        if !drained {
            server_task.abort();
            relay_stop.cancel();
            relay_task.abort();
        }
        ops_stop.cancel();
        let _ = ops_task.await;
        let _ = monitor_task.await;
        pool.close().await;
        tracing::info!(drained, "config service stopped");
        Ok(())
    }
}

/// Keeps readiness (database reachable, broker connected) and the outbox gauge current.
async fn monitor(
    pool: PgPool,
    publisher: Publisher,
    relay: OutboxRelay,
    metrics: Metrics,
    db_ready: Arc<AtomicBool>,
    broker_ready: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let probe_timeout = Duration::from_secs(2);
    loop {
        let db_ok = matches!(
            tokio::time::timeout(probe_timeout, sqlx::query("select 1").execute(&pool)).await,
            Ok(Ok(_))
        );
        db_ready.store(db_ok, Ordering::SeqCst);
        // Reconnects when the broker came back, so readiness recovers without a publish.
        let broker_ok = publisher.is_connected()
            || matches!(
                tokio::time::timeout(probe_timeout, publisher.channel()).await,
                Ok(Ok(_))
            );
        broker_ready.store(broker_ok, Ordering::SeqCst);
        if db_ok && let Ok(Ok(pending)) = tokio::time::timeout(probe_timeout, relay.pending()).await
        {
            metrics.set_outbox_pending(pending);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
