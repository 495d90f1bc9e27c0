//! The side consumers: results of agent replies from flow-callback (`OutboundSendResult`) and
//! config changes (`ConfigChanged`, on routing's shared queue where exactly one replica acts).
//! Both run on shopctrl-amqp's per-message consumer: their volume is small.

use std::{sync::Arc, time::Duration};

use lapin::ExchangeKind;
use prost::Message as _;
use shopctrl_amqp::{
    ConsumerConfig, Handled, Incoming, Names, QueueSpec, declare_exchange, declare_queue,
    run_consumer,
};
use shopctrl_domain::status_update_allowed;
use shopctrl_proto::v1::{
    ConfigChanged, MessageStatus, OutboundSendResult, SendFailedEvent, config_changed::Change,
    employee_event,
};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    access::{AccessChange, AccessError, Directory, apply_config_changed},
    assign::Assigner,
    store::{self, Sink, StoreError},
};

pub const RESULTS_KIND: &str = "outbound-result";
pub const CONFIG_KIND: &str = "config-routing";

pub fn results_queue(names: &Names) -> String {
    names.custom("messaging.outbound.result")
}

pub fn config_queue(names: &Names) -> String {
    names.custom("messaging.config.routing")
}

/// Declares the exchanges routing publishes to or reads from, and its side queues.
pub async fn declare_side(
    channel: &lapin::Channel,
    names: &Names,
) -> Result<(), shopctrl_amqp::TopologyError> {
    declare_exchange(channel, &names.outbound_exchange(), ExchangeKind::Direct).await?;
    declare_exchange(channel, &names.config_exchange(), ExchangeKind::Fanout).await?;
    declare_exchange(channel, &names.dead_letter_exchange(), ExchangeKind::Direct).await?;
    for kind in [RESULTS_KIND, CONFIG_KIND] {
        declare_queue(
            channel,
            &QueueSpec::quorum(names.dead_letter_queue(kind))
                .bind(names.dead_letter_exchange(), kind),
        )
        .await?;
    }
    declare_queue(
        channel,
        &QueueSpec::quorum(results_queue(names))
            .dead_letter_to(names.dead_letter_exchange(), RESULTS_KIND)
            .bind(names.outbound_exchange(), "result"),
    )
    .await?;
    declare_queue(
        channel,
        &QueueSpec::quorum(config_queue(names))
            .single_active()
            .dead_letter_to(names.dead_letter_exchange(), CONFIG_KIND)
            .bind(names.config_exchange(), ""),
    )
    .await?;
    crate::notify::declare_notify(channel, names).await
}

/// What the side consumers share.
#[derive(Clone)]
pub struct SideContext {
    pub amqp_url: String,
    pub names: Names,
    pub pool: PgPool,
    pub sink: Sink,
    pub assigner: Arc<dyn Assigner>,
    /// Member events are re-read through it.
    pub directory: Directory,
}

fn consumer_config(context: &SideContext, queue: String, kind: &str) -> ConsumerConfig {
    ConsumerConfig {
        url: context.amqp_url.clone(),
        connection_name: format!("routing {kind}"),
        consumer_tag: format!("routing-{kind}-{}", Uuid::new_v4().simple()),
        queue,
        prefetch: 32,
        concurrency: 1,
        max_attempts: 5,
        dead_letter: (context.names.dead_letter_exchange(), kind.to_owned()),
        max_backoff: Duration::from_secs(10),
    }
}

/// Consumes reply results until `shutdown`.
pub async fn run_results(context: SideContext, shutdown: CancellationToken) {
    let names = context.names.clone();
    let config = consumer_config(&context, results_queue(&names), RESULTS_KIND);
    run_consumer(
        config,
        move |channel| {
            let names = names.clone();
            Box::pin(async move { declare_side(channel, &names).await })
        },
        |incoming| {
            let context = context.clone();
            async move { handle_result(&context, incoming).await }
        },
        shutdown,
    )
    .await;
}

/// Consumes config changes until `shutdown`.
pub async fn run_config(context: SideContext, shutdown: CancellationToken) {
    let names = context.names.clone();
    let config = consumer_config(&context, config_queue(&names), CONFIG_KIND);
    run_consumer(
        config,
        move |channel| {
            let names = names.clone();
            Box::pin(async move { declare_side(channel, &names).await })
        },
        |incoming| {
            let context = context.clone();
            async move { handle_config(&context, incoming).await }
        },
        shutdown,
    )
    .await;
}

fn store_outcome(error: StoreError) -> Handled {
    if error.is_transient() {
        Handled::Transient(error.to_string())
    } else {
        Handled::Failed(error.to_string())
    }
}

async fn handle_result(context: &SideContext, incoming: Incoming) -> Handled {
    let result = match OutboundSendResult::decode(incoming.data.as_slice()) {
        Ok(result) => result,
        Err(error) => return Handled::Poison(format!("undecodable OutboundSendResult: {error}")),
    };
    let Ok(message_id) = Uuid::parse_str(&result.message_id) else {
        return Handled::Poison(format!(
            "result for a bad message id {:?}",
            result.message_id
        ));
    };
    match apply_result(context, &incoming, &result, message_id).await {
        Ok(()) => Handled::Ack,
        Err(error) => store_outcome(error),
    }
}

/// Marks the reply sent (with MessageBird's id) or failed (and tells the agent who wrote it).
async fn apply_result(
    context: &SideContext,
    incoming: &Incoming,
    result: &OutboundSendResult,
    message_id: Uuid,
) -> Result<(), StoreError> {
    let event_id = result
        .meta
        .as_ref()
        .map(|m| m.event_id.clone())
        .or_else(|| incoming.message_id.clone())
        .unwrap_or_default();
    let mut tx = context.pool.begin().await?;
    if !event_id.is_empty() && !store::first_time(&mut tx, &format!("result:{event_id}")).await? {
        return Ok(());
    }
    let Some(row) = sqlx::query(
        "select shop_id, conversation_id, status, sent_by_employee_id from messages
         where message_id = $1 for update",
    )
    .bind(message_id)
    .fetch_optional(&mut *tx)
    .await?
    else {
        tracing::warn!(%message_id, "result for an unknown message ignored");
        tx.commit().await?;
        return Ok(());
    };
    let shop_id: String = row.try_get("shop_id")?;
    let conversation_id: Option<Uuid> = row.try_get("conversation_id")?;
    let mut current = store::status_of(i32::from(row.try_get::<i16, _>("status")?));
    if result.accepted {
        let mb_id = result.messagebird_message_id.trim();
        if !mb_id.is_empty() {
            // MessageBird's webhook for our own message may have overtaken this result and
            // been stored as a bot message; fold it into the reply.
            let copies: Vec<i16> = sqlx::query_scalar(
                "delete from messages where shop_id = $1 and messagebird_message_id = $2
                 and message_id <> $3 returning status",
            )
            .bind(&shop_id)
            .bind(mb_id)
            .bind(message_id)
            .fetch_all(&mut *tx)
            .await?;
            for status in copies {
                let status = store::status_of(i32::from(status));
                if status_update_allowed(current, status) {
                    current = status;
                }
            }
        }
        let next = if status_update_allowed(current, MessageStatus::Sent) {
            MessageStatus::Sent
        } else {
            current
        };
        sqlx::query(
            "update messages set messagebird_message_id = nullif($2, ''), status = $3,
                    raw_status = case when $3 = 2 then 'sent' else raw_status end,
                    type = case when $4 = 'template' then 'hsm' else type end
             where message_id = $1",
        )
        .bind(message_id)
        .bind(mb_id)
        .bind(next as i16)
        .bind(&result.sent_as)
        .execute(&mut *tx)
        .await?;
    } else {
        let failure = if result.error_code != 0 {
            format!("{}: {}", result.error_code, result.error_description)
        } else {
            result.error_description.clone()
        };
        sqlx::query(
            "update messages set status = $2, raw_status = 'failed', failure = $3 where message_id = $1",
        )
        .bind(message_id)
        .bind(MessageStatus::Failed as i16)
        .bind(&failure)
        .execute(&mut *tx)
        .await?;
        let employee: Option<String> = row.try_get("sent_by_employee_id")?;
        if let Some(employee_id) = employee {
            let conversation = match conversation_id {
                Some(id) => store::load_conversation(&mut tx, id).await?,
                None => None,
            };
            let message = store::load_message(&mut tx, message_id).await?;
            context
                .sink
                .employee_event(
                    &mut tx,
                    &employee_id,
                    &shop_id,
                    employee_event::Event::SendFailed(SendFailedEvent {
                        conversation,
                        message,
                        code: result.error_code,
                        description: result.error_description.clone(),
                    }),
                )
                .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

async fn handle_config(context: &SideContext, incoming: Incoming) -> Handled {
    let event = match ConfigChanged::decode(incoming.data.as_slice()) {
        Ok(event) => event,
        Err(error) => return Handled::Poison(format!("undecodable ConfigChanged: {error}")),
    };
    let event_id = event
        .meta
        .as_ref()
        .map(|m| m.event_id.clone())
        .or_else(|| incoming.message_id.clone())
        .unwrap_or_default();
    let member_event = matches!(
        event.change,
        Some(Change::Role(_)) | Some(Change::Permission(_))
    );
    let change = if member_event {
        // Re-read from the config service: idempotent, so no deduplication is needed.
        match context.directory.member_changed(&event).await {
            Ok(change) => Ok(change),
            Err(AccessError::Database(error)) => Err(error),
            Err(error @ AccessError::Source(_)) => {
                return Handled::Failed(error.to_string());
            }
        }
    } else {
        settings_changed(context, &event, &event_id).await
    };
    let change = match change {
        Ok(change) => change,
        Err(error) => return store_outcome(error.into()),
    };
    let outcome = match &change {
        AccessChange::Nothing => Ok(()),
        AccessChange::CapacityChanged {
            shop_id,
            employee_id,
        } => {
            context
                .assigner
                .capacity_changed(shop_id, employee_id.as_deref())
                .await
        }
        AccessChange::Withdrawn {
            shop_id,
            employee_id,
        } => context.assigner.role_withdrawn(shop_id, employee_id).await,
    };
    match outcome {
        Ok(()) => Handled::Ack,
        // The change is committed and marked processed, so a redelivery would not repeat
        // this call; the assigner's own repair of waiting work (part 2) covers a failure.
        Err(error) => {
            tracing::warn!(%error, ?change, "assigner call after a config change failed");
            Handled::Ack
        }
    }
}

/// Settings and secret events: applied once (deduplicated by event id), version-guarded.
async fn settings_changed(
    context: &SideContext,
    event: &ConfigChanged,
    event_id: &str,
) -> Result<AccessChange, sqlx::Error> {
    let mut tx = context.pool.begin().await?;
    if !event_id.is_empty() && !store::first_time(&mut tx, &format!("config:{event_id}")).await? {
        return Ok(AccessChange::Nothing);
    }
    let change = apply_config_changed(&mut tx, event).await?;
    tx.commit().await?;
    Ok(change)
}
