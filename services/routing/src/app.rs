//! Building and running the service: `App::build` connects, migrates nothing (see
//! [`migrate`]), declares the topology and binds the listeners (port 0 works, as tests use);
//! `App::run` serves until the shutdown token is cancelled, then drains: readiness goes down,
//! consumers stop taking work and finish and ack their batch in hand, the outbox relays what
//! those batches produced, and the servers stop.

use std::{net::SocketAddr, str::FromStr, sync::Arc, sync::atomic::Ordering, time::Duration};

use shopctrl_amqp::{Names, OutboxRelay, Publisher, connect};
use shopctrl_domain::ShardCount;
use shopctrl_proto::v1::conversation_service_server::ConversationServiceServer;
use shopctrl_runtime::{OpsServer, Readiness, wait_with_grace};
use sqlx::{
    ConnectOptions, Connection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    access::{ConfigSource, Directory, GrpcConfigSource},
    api::Api,
    assign::Assigner,
    auth::{Tokens, agent_interceptor},
    consumer::{self, CommitHook, ShardContext},
    ingest::Ingestor,
    metrics::Metrics,
    notify::{self, Hub},
    sequencer::Sequencer,
    settings::Settings,
    side::{self, SideContext},
    store::Sink,
};

/// The schema routing's tables live in.
pub const SCHEMA: &str = "routing";

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid setting {name}: {reason}")]
    Setting { name: &'static str, reason: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("RabbitMQ topology: {0}")]
    Topology(#[from] shopctrl_amqp::TopologyError),
    #[error("RabbitMQ: {0}")]
    Broker(#[from] shopctrl_amqp::lapin::Error),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("operations server: {0}")]
    Ops(#[from] shopctrl_runtime::OpsError),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Why the service stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

fn connect_options(settings: &Settings) -> Result<PgConnectOptions, StartError> {
    migrate_options(settings)
        // Every statement routing runs is keyed by an index. A plan PostgreSQL caches for a
        // prepared statement while a table is nearly empty (a young database, before its first
        // ANALYZE) scans the whole table, and keeps doing so as the table grows: one end-to-end
        // benchmark run logged about 1,300 such scans of customers and conversations. Without
        // sequential scans the cached plans use the indexes at every size.
        .map(|o| o.options([("enable_seqscan", "off")]))
}

/// The schema only: migrations may rewrite whole tables, where a sequential scan is right.
fn migrate_options(settings: &Settings) -> Result<PgConnectOptions, StartError> {
    PgConnectOptions::from_str(settings.database_url.expose())
        .map(|o| o.options([("search_path", SCHEMA)]))
        .map_err(|e| StartError::Setting {
            name: "DATABASE_URL",
            reason: e.to_string(),
        })
}

/// Creates the schema and runs the embedded migrations (idempotent).
pub async fn migrate(settings: &Settings) -> Result<(), StartError> {
    let options = migrate_options(settings)?;
    let mut conn = options.connect().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "create schema if not exists {SCHEMA}"
    )))
    .execute(&mut conn)
    .await?;
    let mut migrator = sqlx::migrate!("./migrations");
    // During a rolling upgrade the previous release's pods still start (restarts, scaling)
    // after the new release migrated: migrations it does not know are expected then, since
    // each one stays compatible with the release before.
    migrator.set_ignore_missing(true);
    migrator.run(&mut conn).await?;
    let _ = conn.close().await;
    Ok(())
}

/// What tests and embedders may replace.
#[derive(Default, Clone)]
pub struct Overrides {
    /// Instead of the gRPC client for CONFIG_GRPC_URL.
    pub config_source: Option<Arc<dyn ConfigSource>>,
    /// Called after each inbound batch commits, before its ack.
    pub after_commit: Option<CommitHook>,
}

/// The service, built and ready to run.
pub struct App {
    settings: Settings,
    names: Names,
    shards: ShardCount,
    pool: PgPool,
    directory: Directory,
    assigner: Arc<dyn Assigner>,
    metrics: Metrics,
    readiness: Readiness,
    tokens: Tokens,
    grpc_listener: TcpListener,
    ops: OpsServer,
    after_commit: Option<CommitHook>,
}

/// Connections a replica needs besides one per shard consumer: the sequencer and the outbox
/// relay (each with its LISTEN connection), the two side consumers, slot maintenance and the
/// agent API.
pub const RESERVED_CONNECTIONS: u32 = 8;

impl App {
    pub async fn build(settings: Settings, overrides: Overrides) -> Result<Self, StartError> {
        let shards = ShardCount::new(settings.routing_shards).map_err(|e| StartError::Setting {
            name: "ROUTING_SHARDS",
            reason: e.to_string(),
        })?;
        // Each shard consumer holds a connection while it applies a batch; with fewer left over
        // than the other workers need, batches wait for connections until acquiring times out
        // and the whole service crawls (16 shards on 16 connections: 400 webhooks/s instead of
        // 2,200). Refused at start instead.
        let needed = u32::from(shards.get()) + RESERVED_CONNECTIONS;
        if settings.database_max_connections < needed {
            return Err(StartError::Setting {
                name: "DATABASE_MAX_CONNECTIONS",
                reason: format!(
                    "{} is too few for ROUTING_SHARDS={}: at least {needed} (one per shard \
                     consumer plus {RESERVED_CONNECTIONS} for the sequencer, the outbox relay, \
                     the side consumers, slot maintenance and the API)",
                    settings.database_max_connections,
                    shards.get()
                ),
            });
        }
        if settings.routing_batch_size == 0 {
            return Err(StartError::Setting {
                name: "ROUTING_BATCH_SIZE",
                reason: "must be at least 1".into(),
            });
        }
        let tokens =
            crate::auth::tokens_from_setting(settings.auth_tokens.as_ref().map(|t| t.expose()))
                .map_err(|e| StartError::Setting {
                    name: "AUTH_TOKENS",
                    reason: e.to_string(),
                })?;
        let pool = PgPoolOptions::new()
            .max_connections(settings.database_max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(connect_options(&settings)?)
            .await?;
        let config_source: Arc<dyn ConfigSource> = match overrides.config_source {
            Some(source) => source,
            None => {
                let token = match &settings.config_service_token {
                    Some(token) => token.expose().to_owned(),
                    None => {
                        tracing::warn!(
                            "CONFIG_SERVICE_TOKEN is not set; using the development token"
                        );
                        "dev-routing-token".to_owned()
                    }
                };
                Arc::new(
                    GrpcConfigSource::new(&settings.config_grpc_url, &token).map_err(|e| {
                        StartError::Setting {
                            name: "CONFIG_GRPC_URL",
                            reason: e.to_string(),
                        }
                    })?,
                )
            }
        };
        let directory = Directory::new(pool.clone(), config_source, settings.config_refresh());
        let names = Names::new(settings.amqp_prefix.clone());

        // Declared once here so publishers (tests, ingress) can route as soon as build returns;
        // every consumer declares again on each (re)connection.
        let connection = connect(settings.amqp_url.expose(), "routing setup").await?;
        let channel = connection.create_channel().await?;
        consumer::declare_inbound(&channel, &names, shards.get()).await?;
        side::declare_side(&channel, &names).await?;
        let _ = connection.close(200, "setup done".into()).await;

        let assigner: Arc<dyn Assigner> =
            crate::slots::wiring::build(&pool, &settings.slots, names.flow_exchange())
                .await
                .map_err(|e| StartError::Setting {
                    name: "REDIS_URL",
                    reason: e.to_string(),
                })?;
        let metrics = Metrics::new();
        let readiness = Readiness::default();
        let grpc_listener =
            TcpListener::bind(settings.grpc_listen_addr)
                .await
                .map_err(|source| StartError::Bind {
                    what: "gRPC",
                    addr: settings.grpc_listen_addr,
                    source,
                })?;
        let ops = OpsServer::bind(
            settings.ops_listen_addr,
            "routing",
            readiness.clone(),
            metrics.registry(),
        )
        .await?;
        Ok(Self {
            settings,
            names,
            shards,
            pool,
            directory,
            assigner,
            metrics,
            readiness,
            tokens,
            grpc_listener,
            ops,
            after_commit: overrides.after_commit,
        })
    }

    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.grpc_listener.local_addr()
    }

    pub fn ops_addr(&self) -> std::io::Result<SocketAddr> {
        self.ops.local_addr()
    }

    pub fn pool(&self) -> PgPool {
        self.pool.clone()
    }

    pub fn names(&self) -> Names {
        self.names.clone()
    }

    /// Serves until `shutdown`, then drains (bounded by SHUTDOWN_GRACE_SECONDS).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let App {
            settings,
            names,
            shards,
            pool,
            directory,
            assigner,
            metrics,
            readiness,
            tokens,
            grpc_listener,
            ops,
            after_commit,
        } = self;
        let database_ready = readiness.check("database");
        database_ready.store(true, Ordering::SeqCst);
        let broker_ready = readiness.check("broker");
        let sink = Sink {
            names: names.clone(),
        };
        let hub = Hub::default();

        // Consumers stop on `shutdown`; the relay and servers only after the consumers are
        // done, so the last batch's events still go out.
        let mut consumers = JoinSet::new();
        let shard_context = Arc::new(ShardContext {
            amqp_url: settings.amqp_url.expose().to_owned(),
            names: names.clone(),
            shards: shards.get(),
            prefetch: settings.routing_prefetch,
            batch_size: settings.routing_batch_size,
            max_attempts: settings.routing_max_attempts.max(1),
            pool: pool.clone(),
            ingestor: Ingestor {
                directory: directory.clone(),
                sink: sink.clone(),
            },
            assigner: assigner.clone(),
            metrics: metrics.clone(),
            after_commit,
            broker_ready,
        });
        for shard in 0..shards.get() {
            consumers.spawn(consumer::run_shard(
                shard_context.clone(),
                shard,
                shutdown.clone(),
            ));
        }
        let side_context = SideContext {
            amqp_url: settings.amqp_url.expose().to_owned(),
            names: names.clone(),
            pool: pool.clone(),
            sink: sink.clone(),
            assigner: assigner.clone(),
            directory: directory.clone(),
        };
        consumers.spawn(side::run_results(side_context.clone(), shutdown.clone()));
        consumers.spawn(side::run_config(side_context, shutdown.clone()));

        let after_drain = CancellationToken::new();
        let mut background = JoinSet::new();
        background.spawn(notify::run_listener(
            settings.amqp_url.expose().to_owned(),
            names.clone(),
            hub.clone(),
            shutdown.clone(),
        ));
        let publisher = Publisher::lazy(
            settings.amqp_url.expose(),
            "routing outbox",
            Duration::from_secs(10),
        );
        let relay = OutboxRelay::new(pool.clone(), publisher)
            .with_announcement_exchanges(vec![names.notify_exchange()])
            .with_poll_interval(Duration::from_millis(200));
        let sequencer = Sequencer::new(pool.clone(), sink.clone());
        {
            let relay = relay.clone();
            let sequencer = sequencer.clone();
            let outbox_gauge = metrics.outbox_pending.clone();
            let unnumbered_gauge = metrics.employee_events_unnumbered.clone();
            let stop = after_drain.clone();
            background.spawn(async move {
                loop {
                    if let Ok(pending) = relay.pending().await {
                        outbox_gauge.set(pending);
                    }
                    if let Ok(pending) = sequencer.pending().await {
                        unnumbered_gauge.set(pending);
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
            });
        }
        // The sequencer numbers the last events once the consumers and the API are done; the
        // relay announces them after that.
        let after_serving = CancellationToken::new();
        let after_numbering = CancellationToken::new();
        {
            let stop = after_serving.clone();
            let numbered = after_numbering.clone();
            background.spawn(async move {
                sequencer.run(stop).await;
                numbered.cancel();
            });
        }
        background.spawn(relay.run(after_numbering));
        {
            let stop = after_drain.clone();
            background.spawn(async move {
                if let Err(error) = ops.run(stop).await {
                    tracing::error!(%error, "operations server failed");
                }
            });
        }

        let api = Api {
            pool: pool.clone(),
            directory,
            sink,
            names,
            assigner,
            hub,
            shutdown: shutdown.clone(),
        };
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_service_status(
                "shopctrl.messaging.v1.ConversationService",
                tonic_health::ServingStatus::Serving,
            )
            .await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(shopctrl_proto::FILE_DESCRIPTOR_SET)
            .build_v1();
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(shopctrl_proto::FILE_DESCRIPTOR_SET)
            .build_v1alpha();
        let grpc_stop = after_drain.clone();
        let grpc = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_optional_service(reflection_v1.ok())
            .add_optional_service(reflection_v1alpha.ok())
            .add_service(ConversationServiceServer::with_interceptor(
                api,
                agent_interceptor(tokens),
            ))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc_listener),
                async move { grpc_stop.cancelled().await },
            );
        let grpc_task = tokio::spawn(grpc);
        tracing::info!("routing is running");

        shutdown.cancelled().await;
        tracing::info!("draining");
        readiness.set_draining();
        health_reporter
            .set_service_status(
                "shopctrl.messaging.v1.ConversationService",
                tonic_health::ServingStatus::NotServing,
            )
            .await;
        let grace = Duration::from_secs(settings.shutdown_grace_seconds);
        let drained = wait_with_grace(
            async { while consumers.join_next().await.is_some() {} },
            grace,
        )
        .await;
        if !drained {
            consumers.abort_all();
        }
        after_drain.cancel();
        // The API's last calls may still store events: the sequencer's last pass waits for it.
        let result = match tokio::time::timeout(Duration::from_secs(5), grpc_task).await {
            Ok(Ok(result)) => result.map_err(RunError::from),
            _ => Ok(()),
        };
        after_serving.cancel();
        let _ = wait_with_grace(
            async { while background.join_next().await.is_some() {} },
            Duration::from_secs(5),
        )
        .await;
        pool.close().await;
        tracing::info!("routing stopped");
        result
    }
}

/// Every durable queue and exchange routing declares under `names` (what an operator removes
/// when retiring a prefix, and what tests delete afterwards). Per-replica stream queues are
/// exclusive and go away with their connection.
pub fn declared_names(names: &Names, shards: u16) -> (Vec<String>, Vec<String>) {
    let mut queues: Vec<String> = (0..shards).map(|s| names.inbound_shard_queue(s)).collect();
    queues.extend([
        names.dead_letter_queue(consumer::INBOUND_KIND),
        names.dead_letter_queue(side::RESULTS_KIND),
        names.dead_letter_queue(side::CONFIG_KIND),
        side::results_queue(names),
        side::config_queue(names),
    ]);
    let exchanges = vec![
        names.inbound_exchange(),
        names.dead_letter_exchange(),
        names.outbound_exchange(),
        names.config_exchange(),
        names.notify_exchange(),
        names.flow_exchange(),
    ];
    (queues, exchanges)
}
