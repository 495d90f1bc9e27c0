//! Wiring: [`App::build`] validates the settings, connects, declares the topology and binds
//! the operations listener; [`App::run`] consumes until the shutdown token is cancelled, then
//! finishes in-flight deliveries within the grace period.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lapin::{Channel, ExchangeKind};
use prometheus_client::registry::Registry;
use prost::Message;
use shopctrl_amqp::{
    ConsumerConfig, Handled, Names, PublishError, Publisher, QueueSpec, TopologyError,
    declare_exchange, declare_queue, run_consumer,
};
use shopctrl_proto::v1::ConfigChanged;
use shopctrl_runtime::{OpsError, OpsServer, Readiness, wait_with_grace};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::Metrics,
    settings::{Settings, SettingsError},
    shops::{GrpcShopSource, ShopCache, ShopLookupError, ShopSource},
    ssrf::{GuardedResolver, Resolver, SystemResolver},
    topology::{Kind, Topology},
    worker::Worker,
};

/// Why the service could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("invalid settings: {0}")]
    Settings(#[from] SettingsError),
    #[error("RabbitMQ: {0}")]
    Broker(#[from] PublishError),
    #[error("RabbitMQ topology: {0}")]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("config client: {0}")]
    Config(#[from] ShopLookupError),
}

/// What tests (or another embedding) may replace.
#[derive(Default, Clone)]
pub struct Deps {
    /// Shop settings; default: the config service over gRPC.
    pub shops: Option<Arc<dyn ShopSource>>,
    /// Host name resolution for event webhooks; default: the system resolver.
    pub resolver: Option<Arc<dyn Resolver>>,
}

/// The service, built and ready to run.
pub struct App {
    settings: Settings,
    worker: Arc<Worker>,
    shops: ShopCache,
    topology: Topology,
    config_queue: String,
    ops: OpsServer,
    readiness: Readiness,
    metrics: Metrics,
    shutdown: CancellationToken,
}

type DeclareFuture<'a> = Pin<Box<dyn Future<Output = Result<(), TopologyError>> + Send + 'a>>;

fn work_declarer(
    topology: Topology,
    ready: Arc<AtomicBool>,
) -> impl for<'a> Fn(&'a Channel) -> DeclareFuture<'a> {
    move |channel| {
        let topology = topology.clone();
        let ready = ready.clone();
        Box::pin(async move {
            topology.declare(channel).await?;
            ready.store(true, Ordering::SeqCst);
            Ok(())
        })
    }
}

fn config_declarer(
    names: Names,
    queue: String,
    shops: ShopCache,
) -> impl for<'a> Fn(&'a Channel) -> DeclareFuture<'a> {
    move |channel| {
        let exchange = names.config_exchange();
        let queue = queue.clone();
        let shops = shops.clone();
        Box::pin(async move {
            declare_exchange(channel, &exchange, ExchangeKind::Fanout).await?;
            declare_queue(channel, &QueueSpec::transient(queue).bind(exchange, "")).await?;
            // Events may have been missed while disconnected: start from a clean cache.
            shops.clear();
            Ok(())
        })
    }
}

impl App {
    /// Validates, connects to RabbitMQ (failing fast when it is unreachable), declares the
    /// topology and binds the operations listener.
    pub async fn build(settings: Settings, deps: Deps) -> Result<Self, AppError> {
        let policy = settings.retry_policy()?;
        let ssrf = settings.ssrf_policy()?;
        let mut api_base = settings.api_base()?;
        if !api_base.path().ends_with('/') {
            // So joining `v1/...` keeps a base path instead of replacing its last segment.
            let path = format!("{}/", api_base.path());
            api_base.set_path(&path);
        }
        if settings.delivery_concurrency == 0 {
            return Err(SettingsError::Concurrency.into());
        }
        let names = Names::new(settings.amqp_prefix.clone());
        let topology = Topology::new(names.clone(), policy.tiers());

        let publisher = Publisher::connect(
            &settings.amqp_url,
            "flow-callback publisher",
            Duration::from_millis(settings.amqp_confirm_timeout_ms),
        )
        .await?;
        let channel = publisher.channel().await?;
        topology.declare(&channel).await?;

        let shops_source: Arc<dyn ShopSource> = match deps.shops {
            Some(source) => source,
            None => Arc::new(GrpcShopSource::new(
                &settings.config_grpc_url,
                &settings.config_service_token,
                Duration::from_millis(settings.config_timeout_ms),
            )?),
        };
        let shops = ShopCache::new(
            shops_source,
            Duration::from_secs(settings.shop_cache_ttl_seconds),
        );
        let resolver = deps
            .resolver
            .unwrap_or_else(|| Arc::new(SystemResolver) as Arc<dyn Resolver>);
        let http_timeout = Duration::from_millis(settings.http_timeout_ms);
        let connect_timeout = Duration::from_millis(settings.http_connect_timeout_ms);
        let user_agent = concat!(
            "ShopCtrl-Messaging-flow-callback/",
            env!("CARGO_PKG_VERSION")
        );
        let webhook_client = reqwest::Client::builder()
            .dns_resolver(GuardedResolver::new(resolver, ssrf.clone()))
            .https_only(!ssrf.allow_http)
            // A redirect could point anywhere (including inside); a proxy would connect for
            // us to addresses the guard never saw.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(http_timeout)
            .connect_timeout(connect_timeout)
            .user_agent(user_agent)
            .build()?;
        let api_client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(http_timeout)
            .connect_timeout(connect_timeout)
            .user_agent(user_agent)
            .build()?;

        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let readiness = Readiness::default();
        let ops = OpsServer::bind(
            settings.ops_listen_addr,
            "flow-callback",
            readiness.clone(),
            Arc::new(registry),
        )
        .await?;
        let shutdown = CancellationToken::new();
        let worker = Arc::new(Worker::new(
            topology.clone(),
            policy,
            publisher,
            shops.clone(),
            webhook_client,
            api_client,
            api_base,
            ssrf,
            settings.flow_event_max_age(),
            http_timeout,
            metrics.clone(),
            shutdown.clone(),
        ));
        let config_queue = names.custom(&format!(
            "messaging.config.flow-callback.{}",
            uuid::Uuid::new_v4().simple()
        ));
        Ok(Self {
            settings,
            worker,
            shops,
            topology,
            config_queue,
            ops,
            readiness,
            metrics,
            shutdown,
        })
    }

    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub fn ops_addr(&self) -> std::io::Result<SocketAddr> {
        self.ops.local_addr()
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// The shop settings cache (tests check invalidation).
    pub fn shops(&self) -> ShopCache {
        self.shops.clone()
    }

    /// This replica's config-changed queue.
    pub fn config_queue(&self) -> &str {
        &self.config_queue
    }

    /// Consumes until `shutdown` is cancelled, then stops taking work, lets in-flight
    /// deliveries finish (bounded by `SHUTDOWN_GRACE_SECONDS`) and stops the ops server.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AppError> {
        let App {
            settings,
            worker,
            shops,
            topology,
            config_queue,
            ops,
            readiness,
            metrics: _,
            shutdown: worker_shutdown,
        } = self;
        let consumers_stop = shutdown.child_token();
        let ops_stop = CancellationToken::new();
        let ops_task = tokio::spawn(ops.run(ops_stop.clone()));
        let broker_ready = readiness.check("broker");
        let mut tasks = Vec::new();

        // One connection per queue, handling `delivery_concurrency` deliveries at a time: the
        // AMQP client runs an I/O thread per connection, and a connection per parallel
        // delivery cost a thread (and its allocator arena) each.
        for kind in Kind::ALL {
            let config = ConsumerConfig {
                url: settings.amqp_url.clone(),
                connection_name: format!("flow-callback {}", kind.label()),
                queue: topology.work_queue(kind),
                consumer_tag: format!("flow-callback-{}", kind.label()),
                prefetch: settings.delivery_concurrency,
                concurrency: settings.delivery_concurrency,
                // Attempts are counted in the message's headers; the consumer's own retry
                // (which would sleep) is never used.
                max_attempts: 1,
                dead_letter: (
                    topology.names().dead_letter_exchange(),
                    kind.dead_letter_kind().to_owned(),
                ),
                max_backoff: Duration::from_secs(5),
            };
            let worker = worker.clone();
            let handler = move |incoming| {
                let worker = worker.clone();
                async move { worker.handle(kind, incoming).await }
            };
            tasks.push(tokio::spawn(run_consumer(
                config,
                work_declarer(topology.clone(), broker_ready.clone()),
                handler,
                consumers_stop.clone(),
            )));
        }

        let config = ConsumerConfig {
            url: settings.amqp_url.clone(),
            connection_name: "flow-callback config-changes".into(),
            queue: config_queue.clone(),
            consumer_tag: "flow-callback-config".into(),
            prefetch: 50,
            concurrency: 1,
            max_attempts: 1,
            dead_letter: (
                topology.names().dead_letter_exchange(),
                "flow-callback.config".into(),
            ),
            max_backoff: Duration::from_secs(5),
        };
        let cache = shops.clone();
        let handler = move |incoming: shopctrl_amqp::Incoming| {
            let cache = cache.clone();
            async move {
                match ConfigChanged::decode(incoming.data.as_slice()) {
                    Ok(change) => {
                        tracing::debug!(shop_id = %change.shop_id, "config changed; dropping cached settings");
                        cache.invalidate(&change.shop_id);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "undecodable config-changed event; dropping every cached shop");
                        cache.clear();
                    }
                }
                Handled::Ack
            }
        };
        tasks.push(tokio::spawn(run_consumer(
            config,
            config_declarer(topology.names().clone(), config_queue, shops),
            handler,
            consumers_stop.clone(),
        )));

        // Readiness follows the broker: the publisher reconnects here too, so parking and
        // result publishing find a live channel after an outage.
        let watch_publisher = worker.publisher.clone();
        let watch_ready = broker_ready.clone();
        let watch_stop = consumers_stop.clone();
        let watcher = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tokio::select! {
                    _ = watch_stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let up = watch_publisher.is_connected() || watch_publisher.channel().await.is_ok();
                watch_ready.store(up, Ordering::SeqCst);
            }
        });
        tasks.push(watcher);

        tracing::info!(
            concurrency = settings.delivery_concurrency,
            ops = %settings.ops_listen_addr,
            "flow-callback running"
        );
        shutdown.cancelled().await;
        readiness.set_draining();
        let drained = wait_with_grace(
            async {
                for task in tasks {
                    let _ = task.await;
                }
            },
            Duration::from_secs(settings.shutdown_grace_seconds),
        )
        .await;
        // Stops result publishing retries that would otherwise outlive the grace period.
        worker_shutdown.cancel();
        if !drained {
            tracing::warn!(
                "some deliveries were still running at the end of the grace period; their messages return to the queue"
            );
        }
        ops_stop.cancel();
        match ops_task.await {
            Ok(result) => result?,
            Err(error) => tracing::warn!(%error, "ops server task failed"),
        }
        tracing::info!("flow-callback stopped");
        Ok(())
    }
}
