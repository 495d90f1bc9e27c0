//! Wiring: `App::build` binds the listeners, connects to the broker, declares the inbound
//! exchange and checks the shard queues; `App::run` serves until shutdown, then drains.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use lapin::{ExchangeKind, options::QueueDeclareOptions, types::FieldTable};
use prometheus_client::registry::Registry;
use shopctrl_amqp::{Names, Publisher, declare_exchange};
use shopctrl_domain::ShardCount;
use shopctrl_runtime::{OpsServer, Readiness, wait_with_grace};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config_events::run_config_listener,
    connections::LimitedListener,
    http::{AppState, HttpConfig, router, system_clock},
    keys::{GrpcShopKeys, KeyCache},
    metrics::Metrics,
    replay::{RedisReplay, ReplayDrained},
    settings::Settings,
    sink::EventSink,
};

/// A built ingress: listeners bound, broker connected.
pub struct App {
    settings: Settings,
    listener: TcpListener,
    ops: OpsServer,
    state: AppState,
    publisher: Publisher,
    readiness: Readiness,
    replay_drained: Option<ReplayDrained>,
}

impl App {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let shards = ShardCount::new(settings.routing_shards).context("ROUTING_SHARDS")?;
        let names = Names::new(settings.amqp_prefix.clone());
        if settings.config_service_token == "dev-ingress-token" {
            tracing::warn!("CONFIG_SERVICE_TOKEN is the development default; set a real token");
        }
        let base = settings.public_base_url.trim_end_matches('/').to_owned();
        url::Url::parse(&base).context("PUBLIC_BASE_URL is not an absolute URL")?;

        let publisher =
            Publisher::connect(&settings.amqp_url, "ingress", settings.confirm_timeout())
                .await
                .context("connecting to RabbitMQ")?;
        let channel = publisher.channel().await.context("opening a channel")?;
        declare_exchange(&channel, &names.inbound_exchange(), ExchangeKind::Direct)
            .await
            .context("declaring the inbound exchange")?;
        check_shard_queues(&settings.amqp_url, &names, shards).await;

        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let timeout = Duration::from_millis(settings.config_timeout_ms);
        let source = GrpcShopKeys::new(
            &settings.config_grpc_url,
            &settings.config_service_token,
            timeout,
        )
        .context("config client")?;
        let keys = Arc::new(KeyCache::new(
            Arc::new(source),
            Duration::from_secs(settings.key_cache_ttl_seconds),
            Duration::from_secs(settings.key_cache_negative_ttl_seconds),
        ));
        let mut replay = RedisReplay::start(
            &settings.redis_url,
            &settings.redis_key_prefix,
            Duration::from_millis(settings.redis_timeout_ms),
            metrics.replay_store_errors.clone(),
        )
        .context("REDIS_URL")?;
        let replay_drained = replay.take_drained();
        let state = AppState {
            config: Arc::new(HttpConfig {
                public_base_url: base,
                max_body_bytes: settings.max_body_bytes,
                legacy_enabled: settings.legacy_signature_enabled,
                legacy_window_seconds: i64::from(settings.legacy_replay_window_seconds),
                retry_after_seconds: settings.retry_after_seconds,
                shards,
                inbound_exchange: names.inbound_exchange(),
                handover_secret_header: settings.handover_secret_header.to_ascii_lowercase(),
            }),
            keys,
            replay: Arc::new(replay),
            sink: Arc::new(publisher.clone()),
            metrics,
            clock: system_clock(),
            admission: Arc::new(tokio::sync::Semaphore::new(
                settings.max_in_flight_requests.max(1),
            )),
        };
        let listener = TcpListener::bind(settings.http_listen_addr)
            .await
            .with_context(|| format!("binding {}", settings.http_listen_addr))?;
        let readiness = Readiness::default();
        let ops = OpsServer::bind(
            settings.ops_listen_addr,
            "ingress",
            readiness.clone(),
            Arc::new(registry),
        )
        .await?;
        Ok(Self {
            settings,
            listener,
            ops,
            state,
            publisher,
            readiness,
            replay_drained,
        })
    }

    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn ops_addr(&self) -> std::io::Result<SocketAddr> {
        self.ops.local_addr()
    }

    /// The key cache (tests watch it).
    pub fn key_cache(&self) -> Arc<KeyCache> {
        self.state.keys.clone()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets in-flight requests
    /// finish their publishes (bounded by the grace period) and closes the channel.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            settings,
            listener,
            ops,
            state,
            publisher,
            readiness,
            replay_drained,
        } = self;
        let background = CancellationToken::new();

        let broker_up = readiness.check("broker");
        let sink: Arc<dyn EventSink> = state.sink.clone();
        let broker_task = tokio::spawn({
            let stop = background.clone();
            async move {
                loop {
                    broker_up.store(sink.check().await, Ordering::SeqCst);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
            }
        });
        let config_up = readiness.check("config_events");
        let listener_task = tokio::spawn(run_config_listener(
            settings.amqp_url.clone(),
            Names::new(settings.amqp_prefix.clone()),
            state.keys.clone(),
            state.metrics.clone(),
            config_up,
            background.clone(),
        ));
        let ops_stop = CancellationToken::new();
        let ops_task = tokio::spawn(ops.run(ops_stop.clone()));

        tracing::info!(addr = %listener.local_addr()?, "ingress listening");
        let draining = {
            let shutdown = shutdown.clone();
            let readiness = readiness.clone();
            async move {
                shutdown.cancelled().await;
                readiness.set_draining();
            }
        };
        let listener = LimitedListener::new(
            listener,
            settings.max_connections,
            settings.connection_idle(),
            state.metrics.open_connections.clone(),
        );
        let server = axum::serve(listener, router(state)).with_graceful_shutdown(draining);
        let server = tokio::spawn(async move { server.await });
        shutdown.cancelled().await;
        let grace = Duration::from_secs(settings.shutdown_grace_seconds);
        let drained = wait_with_grace(
            async {
                if let Err(error) = server.await {
                    tracing::warn!(%error, "HTTP server task failed");
                }
            },
            grace,
        )
        .await;
        // The server (and with it the last handle on the replay store) is gone once drained:
        // the token ids still queued are written before the process ends.
        if drained
            && let Some(replay) = replay_drained
            && !replay
                .wait(Duration::from_millis(
                    settings.redis_timeout_ms.saturating_mul(4),
                ))
                .await
        {
            tracing::warn!("token ids still queued for Redis at shutdown were not all written");
        }
        background.cancel();
        let _ = broker_task.await;
        let _ = listener_task.await;
        if let Ok(channel) = publisher.channel().await {
            let _ = channel.close(200, "shutdown".into()).await;
        }
        ops_stop.cancel();
        let _ = ops_task.await;
        tracing::info!(drained, "ingress stopped");
        Ok(())
    }
}

/// Routing declares one queue per shard; a missing one means routing is not deployed yet or
/// uses another ROUTING_SHARDS (publishes to it would be refused as unroutable, so nothing is
/// lost, but the operator should know). Probing for a queue beyond N would log a broker error
/// on every healthy start, so only the expected ones are checked.
async fn check_shard_queues(url: &str, names: &Names, shards: ShardCount) {
    let Ok(connection) = shopctrl_amqp::connect(url, "ingress-shard-check").await else {
        return;
    };
    let mut missing = Vec::new();
    for shard in 0..shards.get() {
        let queue = names.inbound_shard_queue(shard);
        // A passive declare of a missing queue closes its channel: one channel per check.
        let Ok(channel) = connection.create_channel().await else {
            break;
        };
        let exists = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok();
        if exists {
            let _ = channel.close(200, "checked".into()).await;
        }
        if !exists {
            missing.push(queue);
        }
    }
    let _ = connection.close(200, "checked".into()).await;
    if !missing.is_empty() {
        tracing::warn!(
            ?missing,
            "shard queues missing (routing not started yet, or ROUTING_SHARDS differs); webhooks for them get 503 until they exist"
        );
    }
}
