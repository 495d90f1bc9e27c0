//! Listens for ConfigChanged events on the config fanout exchange through a transient queue of
//! this replica's own, and drops the named shop from the key cache. Reconnects forever; each
//! (re)subscription marks the whole cache stale because events may have been missed meanwhile.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use lapin::{ExchangeKind, options::BasicConsumeOptions, types::FieldTable};
use prost::Message as _;
use shopctrl_amqp::{Names, QueueSpec, declare_exchange, declare_queue};
use shopctrl_proto::v1::ConfigChanged;
use tokio_util::sync::CancellationToken;

use crate::{keys::KeyCache, metrics::Metrics};

/// Runs until `shutdown`; `subscribed` is up while the queue is consumed.
pub async fn run_config_listener(
    url: String,
    names: Names,
    cache: Arc<KeyCache>,
    metrics: Metrics,
    subscribed: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let queue = names.custom(&format!(
        "messaging.config.ingress.{}",
        uuid::Uuid::new_v4().simple()
    ));
    let mut backoff = Duration::from_millis(500);
    loop {
        match listen_once(
            &url,
            &names,
            &queue,
            &cache,
            &metrics,
            &subscribed,
            &shutdown,
        )
        .await
        {
            Ok(()) => return,
            Err(error) => {
                subscribed.store(false, Ordering::SeqCst);
                tracing::warn!(%error, ?backoff, "config-change subscription lost; retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn listen_once(
    url: &str,
    names: &Names,
    queue: &str,
    cache: &KeyCache,
    metrics: &Metrics,
    subscribed: &AtomicBool,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let connection = shopctrl_amqp::connect(url, "ingress-config-events")
        .await
        .map_err(|e| e.to_string())?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    let exchange = names.config_exchange();
    declare_exchange(&channel, &exchange, ExchangeKind::Fanout)
        .await
        .map_err(|e| e.to_string())?;
    declare_queue(&channel, &QueueSpec::transient(queue).bind(&exchange, ""))
        .await
        .map_err(|e| e.to_string())?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "ingress-config-events".into(),
            // Dropping a cache entry is idempotent and the queue dies with us: no acks needed.
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    cache.mark_all_stale();
    subscribed.store(true, Ordering::SeqCst);
    tracing::info!(queue, "subscribed to config changes");
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = connection.close(200, "shutdown".into()).await;
                return Ok(());
            }
            delivery = consumer.next() => delivery,
        };
        let delivery = match delivery {
            None => return Err("consumer cancelled".into()),
            Some(Err(error)) => return Err(error.to_string()),
            Some(Ok(delivery)) => delivery,
        };
        metrics.config_events.inc();
        match ConfigChanged::decode(delivery.data.as_slice()) {
            Ok(event) if !event.shop_id.is_empty() => {
                tracing::info!(shop_id = %event.shop_id, version = event.version, "config changed; dropping cached keys");
                cache.invalidate(&event.shop_id);
            }
            Ok(_) => cache.mark_all_stale(),
            Err(error) => {
                // Unknown content: safest is to refresh everything.
                tracing::warn!(%error, "undecodable config event; marking every shop stale");
                cache.mark_all_stale();
            }
        }
    }
}
