//! What one inbound event does to the record. Runs inside the consumer's transaction; returns
//! the follow-ups that must happen after commit (the assigner calls). The rules (DESIGN.md §2):
//! duplicates never create a second message and statuses only move forward; only a message the
//! customer sent creates or reopens a conversation and moves the 24-hour window; a customer
//! is found by MSISDN per shop, or by MessageBird contact id for visitors without a phone;
//! unsupported types notify the assignee, or the shop's chatters when nobody is assigned.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, SubsecRound as _, Utc};
use prost::Message as _;
use shopctrl_domain::{message_status_from_messagebird, normalize_msisdn, status_update_allowed};
use shopctrl_proto::v1::{
    Direction, HandoverRequest, InboundContact, InboundMessage, InboundWebhookEvent, Message,
    MessageStatus, NewMessageEvent, UnsupportedMessageEvent, employee_event,
};
use sqlx::{
    Arguments as _, PgConnection, Postgres, Row,
    postgres::{PgArguments, PgRow},
};
use uuid::Uuid;

use crate::{
    access::{self, AccessError, Directory, ShopSettings},
    store::{self, PendingEvents, Sink, StoreError},
};

/// One decoded inbound event.
#[derive(Debug, Clone)]
pub enum Inbound {
    // Boxed: both are large and batches hold many.
    Webhook(Box<InboundWebhookEvent>),
    Handover(Box<HandoverRequest>),
}

impl Inbound {
    /// Decodes by the AMQP `type` property; an undecodable body is poison.
    pub fn decode(message_type: Option<&str>, data: &[u8]) -> Result<Self, String> {
        let webhook = store::proto_type("InboundWebhookEvent");
        let handover = store::proto_type("HandoverRequest");
        match message_type {
            Some(t) if t == webhook => InboundWebhookEvent::decode(data)
                .map(|event| Inbound::Webhook(Box::new(event)))
                .map_err(|e| format!("undecodable InboundWebhookEvent: {e}")),
            Some(t) if t == handover => HandoverRequest::decode(data)
                .map(|request| Inbound::Handover(Box::new(request)))
                .map_err(|e| format!("undecodable HandoverRequest: {e}")),
            Some(other) => Err(format!("unexpected message type {other:?}")),
            None => Err("message without a type property".to_owned()),
        }
    }

    pub fn shop_id(&self) -> &str {
        match self {
            Inbound::Webhook(e) => &e.shop_id,
            Inbound::Handover(h) => &h.shop_id,
        }
    }
}

/// Why an event could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Infrastructure: pause the shard and retry the same events.
    #[error("infrastructure error: {0}")]
    Transient(String),
    /// The event violates a rule: retried a bounded number of times, then dead-lettered.
    #[error("{0}")]
    Failed(String),
}

impl From<StoreError> for IngestError {
    fn from(error: StoreError) -> Self {
        if error.is_transient() {
            IngestError::Transient(error.to_string())
        } else {
            IngestError::Failed(error.to_string())
        }
    }
}

impl From<sqlx::Error> for IngestError {
    fn from(error: sqlx::Error) -> Self {
        StoreError::from(error).into()
    }
}

impl From<AccessError> for IngestError {
    fn from(error: AccessError) -> Self {
        if error.is_transient() {
            IngestError::Transient(error.to_string())
        } else {
            IngestError::Failed(error.to_string())
        }
    }
}

/// What must happen after the transaction committed.
#[derive(Debug, Default, Clone)]
pub struct FollowUps {
    /// The event's shop.
    pub shop_id: String,
    /// Conversations that wait for an employee (assigner.conversations_waiting).
    pub waiting: Vec<Uuid>,
    /// Of those, the ones this event started (created or reopened): the batch claims for
    /// them before its commit. The others are asked again after it, as a repair.
    pub started: Vec<Uuid>,
    /// The event was delivered before (set by the consumer): what it finds waiting may be
    /// what it started the first time, before a crash kept its claim from being made, so
    /// none of it counts as a mere repeat.
    pub redelivered: bool,
    pub handovers: Vec<HandoverRequest>,
}

/// Applies inbound events.
#[derive(Clone)]
pub struct Ingestor {
    pub directory: Directory,
    pub sink: Sink,
}

/// What one batch transaction gathers besides its SQL.
#[derive(Debug, Default)]
pub struct BatchState {
    /// Shop settings, so a batch reads each shop once.
    shops: HashMap<String, ShopSettings>,
    /// Employee events, stored just before the batch commits ([`Sink::store_pending`]).
    pub events: PendingEvents,
    /// What the batch's messages are matched against, read for all of them at once.
    lookups: Lookups,
    /// Writes made together by [`Ingestor::flush`].
    deferred: Deferred,
}

impl BatchState {
    /// Forgets writes gathered but not flushed (the event that gathered them was rolled back).
    pub fn discard_deferred(&mut self) {
        self.deferred = Deferred::default();
    }
}

/// Writes gathered while a batch is applied, made in a few set-based statements by
/// [`Ingestor::flush`] instead of one round trip per event. Later events of the batch see them
/// through `written` (a message's status), `started` (a conversation started earlier in the
/// batch) and the message rows themselves (attaching bot messages to a conversation created
/// further on).
#[derive(Debug, Default)]
struct Deferred {
    inserts: MessageRows,
    /// Every message this batch stored or moved, by (shop, MessageBird message id).
    written: HashMap<(String, String), Written>,
    /// Status moves of messages stored before this batch, by message id.
    statuses: BTreeMap<Uuid, (i16, String)>,
    /// Per open conversation: the latest message time and the last message's preview.
    activity: BTreeMap<Uuid, (DateTime<Utc>, String)>,
    /// Conversations created by this batch, for bot messages stored before it:
    /// (shop, MessageBird conversation id, conversation id).
    attach: Vec<(String, String, Uuid)>,
    /// Conversations this batch starts, by (shop, MessageBird conversation id): inserted by
    /// the flush (one statement for the batch, with their activity already folded in, instead
    /// of an insert each and an update of the same rows). Later events of the batch take the
    /// conversation from here.
    started: HashMap<(String, String), StartedConversation>,
    /// The 24-hour window clock per (shop, channel id, customer key): the latest customer
    /// message, as (channel, received at, MessageBird message id).
    windows: BTreeMap<WindowKey, WindowMove>,
    /// New-message and unsupported-type events, built once the writes are made.
    notices: Vec<Notice>,
}

impl Deferred {
    fn is_empty(&self) -> bool {
        self.inserts.message_id.is_empty()
            && self.statuses.is_empty()
            && self.activity.is_empty()
            && self.attach.is_empty()
            && self.started.is_empty()
            && self.windows.is_empty()
            && self.notices.is_empty()
    }
}

/// Whose 24-hour window a customer message moves.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct WindowKey {
    shop_id: String,
    channel_id: String,
    customer_key: String,
}

/// The window's new start: the customer's latest message.
#[derive(Debug, Clone)]
struct WindowMove {
    channel: i16,
    received_at: DateTime<Utc>,
    mb_message_id: String,
}

/// A message this batch wrote: its id, its status now, and its row in `inserts` when it is
/// new.
#[derive(Debug, Clone, Copy)]
struct Written {
    message_id: Uuid,
    status: MessageStatus,
    row: Option<usize>,
}

/// New messages, one vector per column (the `unnest` of the insert).
#[derive(Debug, Default)]
struct MessageRows {
    message_id: Vec<Uuid>,
    shop_id: Vec<String>,
    conversation_id: Vec<Option<Uuid>>,
    mb_conversation_id: Vec<String>,
    mb_message_id: Vec<String>,
    direction: Vec<i16>,
    channel: Vec<i16>,
    platform: Vec<String>,
    kind: Vec<String>,
    text: Vec<String>,
    supported: Vec<bool>,
    content_json: Vec<String>,
    status: Vec<i16>,
    raw_status: Vec<String>,
    created_at: Vec<DateTime<Utc>>,
}

/// Who hears of a stored message, decided when it was applied; the event carries the
/// conversation as the batch left it.
#[derive(Debug)]
struct Notice {
    shop_id: String,
    conversation_id: Uuid,
    /// The assignee, or None for the shop's chatters.
    assignee: Option<String>,
    stored: Message,
    supported: bool,
    kind: String,
}

/// The batch's lookups ([`Ingestor::prefetch`]) and the keys an earlier event of the batch
/// changed: a message whose conversation (reopened) or customer (created) was touched is
/// looked up again on its own, so it sees what the earlier events wrote. (A message the batch
/// already wrote is answered from [`Deferred`]'s `written`, a conversation it started from
/// its `started`.)
#[derive(Debug, Default)]
struct Lookups {
    /// By (shop, MessageBird message id).
    rows: HashMap<(String, String), PgRow>,
    /// (shop, MessageBird conversation id) whose conversation this batch reopened.
    conversations: HashSet<(String, String)>,
    /// (shop, customer key) created by this batch.
    customers: HashSet<(String, String)>,
}

/// One message to match: the columns of the lookup's `unnest`.
struct LookupKey<'a> {
    shop_id: &'a str,
    mb_message_id: &'a str,
    mb_conversation_id: &'a str,
    msisdn: Option<&'a str>,
    contact_id: Option<&'a str>,
    received: bool,
}

/// The batch lookup. PostgreSQL plans it anew per batch while batches are small, but switches
/// to its cached generic plan when that looks cheaper (large batches: the generic plan is
/// costed for 10 keys), and that plan may have been made while the tables were empty. So
/// every part of it is written to have one possible index:
/// - the conversation laterals: the open one through `conversations_one_open`, the latest
///   through `conversations_by_mb`'s order. (Written as "a closed one exists" and "open, else
///   latest", a plan made on empty tables served them through `conversations_activity`, i.e.
///   by scanning the shop's every conversation per key.) Without an open one, any
///   conversation there is a closed one.
/// - the non-locking laterals are fenced (`offset 0`) so each stays one index lookup per key
///   instead of entering the join search (it halves the planning).
///
/// Each row also carries its shop's local settings and whether they are older than `$7`
/// seconds, so a batch does not read them in a statement of its own.
pub const LOOKUP: &str = "\
    select k.ord, e.message_id as e_message_id, e.status as e_status,
           e.conversation_id as e_conversation_id, e.state as e_state,
           coalesce(cm.customer_id, cc.customer_id) as customer_id,
           case when k.received then o.conversation_id
                else coalesce(so.conversation_id, la.conversation_id) end as t_conversation_id,
           case when k.received then o.state else coalesce(so.state, la.state) end as t_state,
           case when k.received then o.assignee_employee_id
                else coalesce(so.assignee_employee_id, la.assignee_employee_id) end as t_assignee,
           (k.received and o.conversation_id is null and la.conversation_id is not null)
               as t_has_closed,
           ss.shop_id, ss.enabled, ss.assign_on_first_message, ss.new_conversation_on_closed,
           ss.conversation_slots, ss.version, ss.stale
    from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[])
         with ordinality as k(shop_id, mb_message_id, mb_conversation_id, msisdn,
                              contact_id, received, ord)
    left join lateral (
       select m.message_id, m.status, m.conversation_id, c.state
       from messages m left join conversations c on c.conversation_id = m.conversation_id
       where m.shop_id = k.shop_id and m.messagebird_message_id = k.mb_message_id
       for update of m) e on true
    left join lateral (
       select customer_id from customers
       where shop_id = k.shop_id and msisdn = k.msisdn offset 0) cm on true
    left join lateral (
       select customer_id from customers
       where shop_id = k.shop_id and messagebird_contact_id = k.contact_id
         and msisdn is null and k.msisdn is null offset 0) cc on true
    left join lateral (
       select conversation_id, state, assignee_employee_id from conversations
       where shop_id = k.shop_id and messagebird_conversation_id = k.mb_conversation_id
         and state <> 'closed' and k.received
       for update) o on true
    left join lateral (
       select conversation_id, state, assignee_employee_id from conversations
       where shop_id = k.shop_id and messagebird_conversation_id = k.mb_conversation_id
         and state <> 'closed' and not k.received offset 0) so on true
    left join lateral (
       select conversation_id, state, assignee_employee_id from conversations
       where shop_id = k.shop_id and messagebird_conversation_id = k.mb_conversation_id
         and o.conversation_id is null and so.conversation_id is null
       order by created_at desc limit 1) la on true
    left join lateral (
       select shop_id, enabled, assign_on_first_message, new_conversation_on_closed,
              conversation_slots, version,
              refreshed_at < now() - make_interval(secs => $7) as stale
       from shop_settings where shop_id = k.shop_id offset 0) ss on true
    order by k.ord";

/// Reads, for each key, the stored copy of the message, the customer and, for a customer's
/// message, the open conversation (locked), for anyone else's the open or else latest one.
/// Rows come back in the keys' order.
async fn lookup(
    conn: &mut PgConnection,
    keys: &[LookupKey<'_>],
    refresh: std::time::Duration,
) -> Result<Vec<PgRow>, sqlx::Error> {
    let mut shops = Vec::with_capacity(keys.len());
    let mut message_ids = Vec::with_capacity(keys.len());
    let mut conversation_ids = Vec::with_capacity(keys.len());
    let mut msisdns = Vec::with_capacity(keys.len());
    let mut contact_ids = Vec::with_capacity(keys.len());
    let mut received = Vec::with_capacity(keys.len());
    for key in keys {
        shops.push(key.shop_id);
        message_ids.push(key.mb_message_id);
        conversation_ids.push(key.mb_conversation_id);
        msisdns.push(key.msisdn);
        contact_ids.push(key.contact_id);
        received.push(key.received);
    }
    sqlx::query(LOOKUP)
        .bind(&shops)
        .bind(&message_ids)
        .bind(&conversation_ids)
        .bind(&msisdns)
        .bind(&contact_ids)
        .bind(&received)
        .bind(refresh.as_secs_f64())
        .fetch_all(&mut *conn)
        .await
}

/// The shop's settings a lookup row carries, unless the local copy is missing or due for a
/// refresh (then [`Directory::shop`] reads and refreshes them).
fn fresh_settings(row: &PgRow) -> Result<Option<ShopSettings>, sqlx::Error> {
    match row.try_get::<Option<bool>, _>("stale")? {
        Some(false) => access::settings_from_row(row).map(Some),
        _ => Ok(None),
    }
}

/// The lookup key of a webhook's message, or None when it has none (the event then fails on
/// its own, with its reason, when applied).
fn lookup_key<'a>(
    event: &'a InboundWebhookEvent,
    customer: &'a Option<Result<CustomerKey, String>>,
) -> Option<LookupKey<'a>> {
    let message = event.message.as_ref()?;
    let mb_message_id = message.messagebird_message_id.trim();
    let mb_conversation_id = event.messagebird_conversation_id.trim();
    if mb_message_id.is_empty() || mb_conversation_id.is_empty() {
        return None;
    }
    let (msisdn, contact_id) = customer_columns(customer);
    Some(LookupKey {
        shop_id: &event.shop_id,
        mb_message_id,
        mb_conversation_id,
        msisdn,
        contact_id,
        received: store::direction_of(message.direction) == Direction::Received,
    })
}

/// The lookup's (msisdn, contact id) columns for a customer key; both empty for a message no
/// customer sent or one without a valid key.
fn customer_columns(
    customer: &Option<Result<CustomerKey, String>>,
) -> (Option<&str>, Option<&str>) {
    match customer {
        Some(Ok(CustomerKey::Msisdn(msisdn))) => (Some(msisdn.as_str()), None),
        Some(Ok(CustomerKey::Contact(contact_id))) => (None, Some(contact_id.as_str())),
        _ => (None, None),
    }
}

/// The customer key of a webhook's message when a customer sent it.
fn customer_key_of(event: &InboundWebhookEvent) -> Option<Result<CustomerKey, String>> {
    let message = event.message.as_ref()?;
    (store::direction_of(message.direction) == Direction::Received)
        .then(|| customer_key(&event.contact.clone().unwrap_or_default()))
}

impl Ingestor {
    /// Reads what every message of the batch is matched against in one statement, before the
    /// batch is applied event by event (which then takes each event's rows from here).
    pub async fn prefetch(
        &self,
        conn: &mut PgConnection,
        batch: &mut BatchState,
        events: &[&Inbound],
    ) -> Result<(), IngestError> {
        let webhooks: Vec<&InboundWebhookEvent> = events
            .iter()
            .filter_map(|inbound| match inbound {
                Inbound::Webhook(event) => Some(event.as_ref()),
                Inbound::Handover(_) => None,
            })
            .collect();
        let customers: Vec<_> = webhooks.iter().map(|e| customer_key_of(e)).collect();
        let keys: Vec<LookupKey<'_>> = webhooks
            .iter()
            .zip(&customers)
            .filter_map(|(event, customer)| lookup_key(event, customer))
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let rows = lookup(conn, &keys, self.directory.refresh()).await?;
        for (key, row) in keys.iter().zip(rows) {
            if !batch.shops.contains_key(key.shop_id)
                && let Some(settings) = fresh_settings(&row)?
            {
                batch.shops.insert(key.shop_id.to_owned(), settings);
            }
            batch
                .lookups
                .rows
                .entry((key.shop_id.to_owned(), key.mb_message_id.to_owned()))
                .or_insert(row);
        }
        Ok(())
    }

    pub async fn apply(
        &self,
        conn: &mut PgConnection,
        batch: &mut BatchState,
        inbound: &Inbound,
    ) -> Result<FollowUps, IngestError> {
        let shop_id = inbound.shop_id();
        if shopctrl_domain::ShopId::parse(shop_id).is_err() {
            return Err(IngestError::Failed(format!("invalid shop id {shop_id:?}")));
        }
        match inbound {
            Inbound::Handover(request) => {
                if request.messagebird_conversation_id.is_empty() {
                    return Err(IngestError::Failed(
                        "handover without a MessageBird conversation id".into(),
                    ));
                }
                Ok(FollowUps {
                    handovers: vec![request.as_ref().clone()],
                    ..FollowUps::default()
                })
            }
            Inbound::Webhook(event) => {
                let Some(message) = &event.message else {
                    if event.webhook_type.starts_with("message.") {
                        return Err(IngestError::Failed(format!(
                            "{} without a message",
                            event.webhook_type
                        )));
                    }
                    // conversation.* events carry nothing routing keeps.
                    return Ok(FollowUps::default());
                };
                let shop = self.shop(&mut batch.shops, shop_id).await?;
                self.message(
                    conn,
                    &mut batch.deferred,
                    &mut batch.lookups,
                    &shop,
                    event,
                    message,
                )
                .await
            }
        }
    }

    async fn shop(
        &self,
        memo: &mut HashMap<String, ShopSettings>,
        shop_id: &str,
    ) -> Result<ShopSettings, IngestError> {
        if let Some(shop) = memo.get(shop_id) {
            return Ok(shop.clone());
        }
        let shop =
            self.directory.shop(shop_id).await?.ok_or_else(|| {
                IngestError::Failed(format!("shop {shop_id} is unknown to config"))
            })?;
        memo.insert(shop_id.to_owned(), shop.clone());
        Ok(shop)
    }

    async fn message(
        &self,
        conn: &mut PgConnection,
        deferred: &mut Deferred,
        lookups: &mut Lookups,
        shop: &ShopSettings,
        event: &InboundWebhookEvent,
        message: &InboundMessage,
    ) -> Result<FollowUps, IngestError> {
        let mb_message_id = message.messagebird_message_id.trim();
        if mb_message_id.is_empty() {
            return Err(IngestError::Failed(
                "message without a MessageBird id".into(),
            ));
        }
        let mb_conversation_id = event.messagebird_conversation_id.trim();
        if mb_conversation_id.is_empty() {
            return Err(IngestError::Failed(
                "message without a MessageBird conversation id".into(),
            ));
        }
        let direction = store::direction_of(message.direction);
        let status = match store::status_of(message.status) {
            MessageStatus::Unspecified => message_status_from_messagebird(&message.raw_status),
            status => status,
        };
        let created_at = store::from_timestamp(message.created_at.as_ref())
            .or_else(|| store::from_timestamp(event.received_at.as_ref()))
            .unwrap_or_else(Utc::now);
        let mut follow_ups = FollowUps {
            shop_id: shop.shop_id.clone(),
            ..FollowUps::default()
        };

        let received = direction == Direction::Received;
        let contact = event.contact.clone().unwrap_or_default();
        // The customer's key, checked before anything is read; an invalid MSISDN fails only a
        // message we do not have yet (a duplicate of a stored one still moves its status).
        let customer_key = customer_key_of(event);
        let (msisdn, contact_id) = customer_columns(&customer_key);
        let message_key = (shop.shop_id.clone(), mb_message_id.to_owned());
        // A message an earlier event of this batch stored or moved: only the status may move,
        // and only forward. (That event already asked the assigner when it had to.)
        if let Some(written) = deferred.written.get_mut(&message_key) {
            if status_update_allowed(written.status, status) {
                written.status = status;
                match written.row {
                    Some(row) => {
                        deferred.inserts.status[row] = status as i16;
                        deferred.inserts.raw_status[row] = message.raw_status.clone();
                    }
                    None => {
                        deferred.statuses.insert(
                            written.message_id,
                            (status as i16, message.raw_status.clone()),
                        );
                    }
                }
            }
            return Ok(follow_ups);
        }
        // The batch's lookup, unless an earlier event of the batch changed what it read.
        let conversation_key = (shop.shop_id.clone(), mb_conversation_id.to_owned());
        let customer_touched = msisdn.or(contact_id).is_some_and(|k| {
            lookups
                .customers
                .contains(&(shop.shop_id.clone(), k.to_owned()))
        });
        let prefetched = lookups
            .rows
            .remove(&message_key)
            .filter(|_| !lookups.conversations.contains(&conversation_key) && !customer_touched);
        let lookup = match prefetched {
            Some(row) => row,
            None => lookup(
                conn,
                &[LookupKey {
                    shop_id: &shop.shop_id,
                    mb_message_id,
                    mb_conversation_id,
                    msisdn,
                    contact_id,
                    received,
                }],
                self.directory.refresh(),
            )
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| IngestError::Failed("the lookup returned no row".into()))?,
        };

        // A message we already have (redelivery, MessageBird retry, or message.updated): only
        // the status may move, and only forward.
        if let Some(existing_id) = lookup.try_get::<Option<Uuid>, _>("e_message_id")? {
            let current = store::status_of(i32::from(lookup.try_get::<i16, _>("e_status")?));
            let allowed = status_update_allowed(current, status);
            // Repairs a crash between commit and the assigner call: the redelivery asks again
            // (the assigner is idempotent).
            let state: Option<String> = lookup.try_get("e_state")?;
            if received
                && state.as_deref() == Some("waiting_for_employee")
                && let Some(id) = lookup.try_get::<Option<Uuid>, _>("e_conversation_id")?
            {
                follow_ups.waiting.push(id);
            }
            if allowed {
                deferred
                    .statuses
                    .insert(existing_id, (status as i16, message.raw_status.clone()));
            }
            deferred.written.insert(
                message_key,
                Written {
                    message_id: existing_id,
                    status: if allowed { status } else { current },
                    row: None,
                },
            );
            return Ok(follow_ups);
        }

        // A conversation an earlier event of this batch started is not in the table before
        // the flush: it is taken from the batch (the lookup is current for everything else).
        let found = match deferred.started.get(&conversation_key) {
            Some(started) => Some(started.target()),
            None => lookup
                .try_get::<Option<Uuid>, _>("t_conversation_id")?
                .map(|conversation_id| -> Result<Target, sqlx::Error> {
                    Ok(Target {
                        conversation_id,
                        state: lookup.try_get("t_state")?,
                        assignee: lookup.try_get("t_assignee")?,
                        fresh: false,
                    })
                })
                .transpose()?,
        };
        let mut started = false;
        let conversation = match customer_key {
            Some(key) => {
                let key = key.map_err(|e| IngestError::Failed(e.to_string()))?;
                let customer_id = match lookup.try_get::<Option<Uuid>, _>("customer_id")? {
                    Some(id) => id,
                    None => {
                        lookups
                            .customers
                            .insert((shop.shop_id.clone(), key.as_str().to_owned()));
                        self.new_customer(conn, &shop.shop_id, &key, &contact)
                            .await?
                    }
                };
                started = found.is_none();
                Some(match found {
                    Some(open) => open,
                    None => {
                        // Read with the lookup, which is current for this event (a key an
                        // earlier event of the batch touched is looked up again).
                        let has_closed = lookup
                            .try_get::<Option<bool>, _>("t_has_closed")?
                            .unwrap_or(false);
                        let target = self
                            .start_conversation(
                                conn,
                                deferred,
                                shop,
                                NewConversation {
                                    mb_conversation_id,
                                    customer_id,
                                    has_closed,
                                },
                                message,
                            )
                            .await?;
                        // A reopened conversation changed in the table: later events of the
                        // batch look it up again. A new one is answered from the batch.
                        if !target.fresh {
                            lookups.conversations.insert(conversation_key);
                        }
                        target
                    }
                })
            }
            // Bot and agent messages are history: the open conversation, else the latest one,
            // else none yet (attached when the customer's first message creates it).
            None => found,
        };

        // Everything the message moves, made by the flush: the conversation's activity (unless
        // closed), bot messages that arrived before the customer's first one (attached to the
        // conversation this message created) and the 24-hour window clock (customer messages
        // only).
        if let Some(target) = conversation.as_ref() {
            if target.state != "closed" {
                let preview = store::preview(&message.text, &message.r#type, message.supported);
                deferred
                    .activity
                    .entry(target.conversation_id)
                    .and_modify(|(at, last)| {
                        *at = (*at).max(created_at);
                        last.clone_from(&preview);
                    })
                    .or_insert((created_at, preview));
            }
            if received && target.fresh {
                deferred.attach(&shop.shop_id, mb_conversation_id, target.conversation_id);
            }
            if received {
                let window_key = match normalize_msisdn(&contact.msisdn) {
                    Ok(msisdn) => msisdn,
                    Err(_) => format!("contact:{}", contact.messagebird_contact_id.trim()),
                };
                let moved = WindowMove {
                    channel: i16::try_from(message.channel).unwrap_or(0),
                    received_at: created_at,
                    mb_message_id: mb_message_id.to_owned(),
                };
                deferred
                    .windows
                    .entry(WindowKey {
                        shop_id: shop.shop_id.clone(),
                        channel_id: message.channel_id.clone(),
                        customer_key: window_key,
                    })
                    .and_modify(|window| {
                        // The latest wins; on a tie the first, as the upsert keeps it.
                        if window.received_at < moved.received_at {
                            *window = moved.clone();
                        }
                    })
                    .or_insert(moved);
            }
        }

        let message_id = Uuid::now_v7();
        // The message as stored: the row the flush inserts, and the copy an event carries.
        let stored = Message {
            message_id: message_id.to_string(),
            conversation_id: conversation
                .as_ref()
                .map(|c| c.conversation_id.to_string())
                .unwrap_or_default(),
            messagebird_message_id: mb_message_id.to_owned(),
            direction: i32::from(i16::try_from(message.direction).unwrap_or(0)),
            channel: i32::from(i16::try_from(message.channel).unwrap_or(0)),
            r#type: message.r#type.clone(),
            text: message.text.clone(),
            supported: message.supported,
            content_json: if message.content_json.is_empty() {
                "{}".to_owned()
            } else {
                message.content_json.clone()
            },
            status: i32::from(status as i16),
            raw_status: message.raw_status.clone(),
            sent_by_employee_id: String::new(),
            // PostgreSQL keeps microseconds.
            created_at: Some(store::to_timestamp(created_at.trunc_subsecs(6))),
            failure: String::new(),
        };
        let row = deferred.inserts.push(MessageRow {
            message_id,
            shop_id: &shop.shop_id,
            conversation_id: conversation.as_ref().map(|c| c.conversation_id),
            mb_conversation_id,
            platform: &message.platform,
            created_at,
            stored: &stored,
        });
        deferred.written.insert(
            message_key,
            Written {
                message_id,
                status,
                row: Some(row),
            },
        );

        let Some(target) = conversation else {
            return Ok(follow_ups);
        };
        if !received {
            return Ok(follow_ups);
        }
        // Every customer message of a waiting conversation asks again (the claim is idempotent
        // and answers at once when nobody has room): it heals a claim that a fault cut short,
        // e.g. a pending claim rolled back after this conversation was refused. The assigner
        // may skip such repeats for a moment after the shop refused everyone.
        if target.state == "waiting_for_employee" {
            follow_ups.waiting.push(target.conversation_id);
            if started {
                follow_ups.started.push(target.conversation_id);
            }
        }
        // New-message events go to the assignee; unsupported types to the assignee or, when
        // nobody is assigned, the shop's chatters.
        let assignee = target
            .assignee
            .clone()
            .filter(|_| target.state == "assigned");
        if !message.supported || assignee.is_some() {
            deferred.notices.push(Notice {
                shop_id: shop.shop_id.clone(),
                conversation_id: target.conversation_id,
                assignee,
                stored,
                supported: message.supported,
                kind: message.r#type.clone(),
            });
        }
        Ok(follow_ups)
    }

    /// Creates the customer the lookup did not find (or takes the one a concurrent insert
    /// just made).
    async fn new_customer(
        &self,
        conn: &mut PgConnection,
        shop_id: &str,
        key: &CustomerKey,
        contact: &InboundContact,
    ) -> Result<Uuid, IngestError> {
        let (msisdn, contact_id, lookup, conflict) = match key {
            CustomerKey::Msisdn(msisdn) => (
                Some(msisdn.as_str()),
                Some(contact.messagebird_contact_id.trim()).filter(|c| !c.is_empty()),
                "select customer_id from customers where shop_id = $1 and msisdn = $2",
                "(shop_id, msisdn) where msisdn is not null",
            ),
            CustomerKey::Contact(contact_id) => (
                None,
                Some(contact_id.as_str()),
                "select customer_id from customers
                 where shop_id = $1 and messagebird_contact_id = $2 and msisdn is null",
                "(shop_id, messagebird_contact_id) where msisdn is null",
            ),
        };
        let insert = format!(
            "insert into customers (customer_id, shop_id, msisdn, messagebird_contact_id, display_name)
             values ($1, $2, $3, $4, $5) on conflict {conflict} do nothing returning customer_id"
        );
        if let Some(id) = sqlx::query_scalar::<_, Uuid>(sqlx::AssertSqlSafe(insert))
            .bind(Uuid::now_v7())
            .bind(shop_id)
            .bind(msisdn)
            .bind(contact_id)
            .bind(contact.display_name.trim())
            .fetch_optional(&mut *conn)
            .await?
        {
            return Ok(id);
        }
        // Inserted by someone else between the lookup and the insert.
        sqlx::query_scalar::<_, Uuid>(lookup)
            .bind(shop_id)
            .bind(key.as_str())
            .fetch_one(&mut *conn)
            .await
            .map_err(Into::into)
    }

    /// No conversation is open: reopen the latest closed one or start a new one, per the
    /// shop's closed-conversation setting.
    async fn start_conversation(
        &self,
        conn: &mut PgConnection,
        deferred: &mut Deferred,
        shop: &ShopSettings,
        new: NewConversation<'_>,
        message: &InboundMessage,
    ) -> Result<Target, IngestError> {
        let NewConversation {
            mb_conversation_id,
            customer_id,
            has_closed,
        } = new;
        let (state, reason) = if shop.assign_on_first_message {
            ("waiting_for_employee", None)
        } else {
            ("waiting_for_handover", Some("awaiting_handover"))
        };
        // Most new conversations have no closed one to reopen: the lookup said so, and the
        // round trip is skipped.
        if has_closed && !shop.new_conversation_on_closed {
            let reopened: Option<Uuid> = sqlx::query_scalar(
                "update conversations set state = $3, unassigned_reason = $4, waiting_since = now(),
                        closed_at = null, closed_by_employee_id = null, via_handover = false,
                        customer_id = $5
                 where conversation_id = (
                    select conversation_id from conversations
                    where shop_id = $1 and messagebird_conversation_id = $2 and state = 'closed'
                    order by created_at desc limit 1)
                 returning conversation_id",
            )
            .bind(&shop.shop_id)
            .bind(mb_conversation_id)
            .bind(state)
            .bind(reason)
            .bind(customer_id)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(conversation_id) = reopened {
                return Ok(Target {
                    conversation_id,
                    state: state.to_owned(),
                    assignee: None,
                    fresh: false,
                });
            }
        }
        let started = StartedConversation {
            conversation_id: Uuid::now_v7(),
            customer_id,
            channel: i16::try_from(message.channel).unwrap_or(0),
            channel_id: message.channel_id.clone(),
            platform: message.platform.clone(),
            state,
            reason,
        };
        let target = started.target();
        deferred.started.insert(
            (shop.shop_id.clone(), mb_conversation_id.to_owned()),
            started,
        );
        Ok(Target {
            fresh: true,
            ..target
        })
    }

    /// Makes the batch's gathered writes: new conversations, new messages, status moves,
    /// conversation activity and 24-hour windows in one statement, bot messages attached to
    /// new conversations in another (the same row may not be updated twice in one statement),
    /// then the employee events of the stored messages, with their conversations read in one
    /// statement.
    pub async fn flush(
        &self,
        conn: &mut PgConnection,
        batch: &mut BatchState,
    ) -> Result<(), IngestError> {
        let deferred = std::mem::take(&mut batch.deferred);
        if deferred.is_empty() {
            return Ok(());
        }
        // Only the parts this batch needs are written: PostgreSQL plans the statement anew for
        // each batch (a custom plan, since small batches make the generic one look dearer), and
        // every part costs planning even when its arrays are empty.
        let mut writes = Writes::default();
        let mut activity = deferred.activity;
        let new = NewConversationRows::of(&mut activity, deferred.started);
        // The messages may belong to the conversations inserted beside them: foreign keys are
        // checked at the end of the statement, once every part of it has run.
        if !new.conversation_id.is_empty() {
            let mut from = writes.unnest();
            from.column(new.conversation_id, "uuid")?;
            from.column(new.shop_id, "text")?;
            from.column(new.mb_conversation_id, "text")?;
            from.column(new.customer_id, "uuid")?;
            from.column(new.channel, "int2")?;
            from.column(new.channel_id, "text")?;
            from.column(new.platform, "text")?;
            from.column(new.state, "text")?;
            from.column(new.reason, "text")?;
            from.column(new.last_activity_at, "timestamptz")?;
            from.column(new.preview, "text")?;
            let from = from.finish();
            writes.part(format!(
                "started as (
                    insert into conversations (conversation_id, shop_id,
                        messagebird_conversation_id, customer_id, channel, channel_id, platform,
                        state, unassigned_reason, waiting_since, last_activity_at,
                        last_message_preview)
                    select conversation_id, shop_id, mb_conversation_id, customer_id, channel,
                           channel_id, platform, state, reason, now(), coalesce(at, now()),
                           preview
                    from {from}
                         as n(conversation_id, shop_id, mb_conversation_id, customer_id, channel,
                              channel_id, platform, state, reason, at, preview)
                 )"
            ));
        }
        let rows = deferred.inserts;
        if !rows.message_id.is_empty() {
            let mut from = writes.unnest();
            from.column(rows.message_id, "uuid")?;
            from.column(rows.shop_id, "text")?;
            from.column(rows.conversation_id, "uuid")?;
            from.column(rows.mb_conversation_id, "text")?;
            from.column(rows.mb_message_id, "text")?;
            from.column(rows.direction, "int2")?;
            from.column(rows.channel, "int2")?;
            from.column(rows.platform, "text")?;
            from.column(rows.kind, "text")?;
            from.column(rows.text, "text")?;
            from.column(rows.supported, "bool")?;
            from.column(rows.content_json, "text")?;
            from.column(rows.status, "int2")?;
            from.column(rows.raw_status, "text")?;
            from.column(rows.created_at, "timestamptz")?;
            let from = from.finish();
            writes.part(format!(
                "inserted as (
                    insert into messages (message_id, shop_id, conversation_id,
                        messagebird_conversation_id, messagebird_message_id, direction, channel,
                        platform, type, text, supported, content_json, status, raw_status,
                        created_at)
                    select message_id, shop_id, conversation_id, mb_conversation_id,
                           mb_message_id, direction, channel, platform, type, text, supported,
                           content_json, status, raw_status, created_at
                    from {from}
                         with ordinality as m(message_id, shop_id, conversation_id,
                            mb_conversation_id, mb_message_id, direction, channel, platform,
                            type, text, supported, content_json, status, raw_status, created_at,
                            ord)
                    order by ord
                 )"
            ));
        }
        if !deferred.statuses.is_empty() {
            let (ids, (values, raw)): (Vec<Uuid>, (Vec<i16>, Vec<String>)) =
                deferred.statuses.into_iter().unzip();
            let mut from = writes.unnest();
            from.column(ids, "uuid")?;
            from.column(values, "int2")?;
            from.column(raw, "text")?;
            let from = from.finish();
            writes.part(format!(
                "statuses as (
                    update messages m set status = s.status, raw_status = s.raw_status
                    from {from} as s(message_id, status, raw_status)
                    where m.message_id = s.message_id
                 )"
            ));
        }
        if !activity.is_empty() {
            let mut ids = Vec::with_capacity(activity.len());
            let mut at = Vec::with_capacity(activity.len());
            let mut previews = Vec::with_capacity(activity.len());
            for (conversation_id, (last, preview)) in activity {
                ids.push(conversation_id);
                at.push(last);
                previews.push(preview);
            }
            let mut from = writes.unnest();
            from.column(ids, "uuid")?;
            from.column(at, "timestamptz")?;
            from.column(previews, "text")?;
            let from = from.finish();
            writes.part(format!(
                "activity as (
                    update conversations c
                       set last_activity_at = greatest(c.last_activity_at, a.at),
                           last_message_preview = a.preview
                    from {from} as a(conversation_id, at, preview)
                    where c.conversation_id = a.conversation_id
                 )"
            ));
        }
        if !deferred.windows.is_empty() {
            let n = deferred.windows.len();
            let (mut shops, mut channel_ids, mut keys) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            let (mut channels, mut at, mut messages) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for (key, moved) in deferred.windows {
                shops.push(key.shop_id);
                channel_ids.push(key.channel_id);
                keys.push(key.customer_key);
                channels.push(moved.channel);
                at.push(moved.received_at);
                messages.push(moved.mb_message_id);
            }
            let mut from = writes.unnest();
            from.column(shops, "text")?;
            from.column(channel_ids, "text")?;
            from.column(keys, "text")?;
            from.column(channels, "int2")?;
            from.column(at, "timestamptz")?;
            from.column(messages, "text")?;
            let from = from.finish();
            writes.part(format!(
                "window_moved as (
                    insert into last_received (shop_id, channel_id, customer_key, channel,
                                               received_at, messagebird_message_id)
                    select * from {from}
                    on conflict (shop_id, channel_id, customer_key) do update
                       set received_at = excluded.received_at,
                           messagebird_message_id = excluded.messagebird_message_id,
                           channel = excluded.channel
                       where last_received.received_at < excluded.received_at
                 )"
            ));
        }
        writes.execute(conn).await?;
        if !deferred.attach.is_empty() {
            let (shops, (mb_conversation_ids, conversation_ids)): (
                Vec<String>,
                (Vec<String>, Vec<Uuid>),
            ) = deferred
                .attach
                .into_iter()
                .map(|(shop, mb, id)| (shop, (mb, id)))
                .unzip();
            // Each conversation's orphans are read through `messages_orphans` by its key
            // (`offset 0` keeps the subquery apart): joined as a whole, PostgreSQL read every
            // orphan of every shop into a hash, about a millisecond once a few hundred waited.
            sqlx::query(
                "update messages m set conversation_id = a.conversation_id
                 from unnest($1::text[], $2::text[], $3::uuid[])
                      as a(shop_id, mb_conversation_id, conversation_id)
                 cross join lateral (
                    select o.message_id from messages o
                    where o.shop_id = a.shop_id
                      and o.messagebird_conversation_id = a.mb_conversation_id
                      and o.conversation_id is null
                    offset 0) o
                 where m.message_id = o.message_id and m.conversation_id is null",
            )
            .bind(&shops)
            .bind(&mb_conversation_ids)
            .bind(&conversation_ids)
            .execute(&mut *conn)
            .await?;
        }
        self.notify(conn, &mut batch.events, deferred.notices).await
    }

    /// New-message and unsupported-type events for whoever should hear them, in the order the
    /// messages arrived.
    async fn notify(
        &self,
        conn: &mut PgConnection,
        events: &mut PendingEvents,
        notices: Vec<Notice>,
    ) -> Result<(), IngestError> {
        if notices.is_empty() {
            return Ok(());
        }
        let mut ids: Vec<Uuid> = notices.iter().map(|n| n.conversation_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let conversations = store::load_conversations(conn, &ids).await?;
        let mut chatters: HashMap<String, Vec<String>> = HashMap::new();
        for notice in notices {
            let conversation = conversations.get(&notice.conversation_id).cloned();
            let stored = Some(notice.stored);
            let event = if notice.supported {
                employee_event::Event::NewMessage(NewMessageEvent {
                    conversation,
                    message: stored,
                })
            } else {
                employee_event::Event::UnsupportedMessage(UnsupportedMessageEvent {
                    conversation,
                    message: stored,
                    r#type: notice.kind,
                })
            };
            match notice.assignee {
                Some(employee_id) => events.push(&employee_id, &notice.shop_id, event),
                None => {
                    // The shop: every employee who may chat there gets it in their own
                    // numbered stream (so a reconnect replays it), plus one shop-wide notice.
                    if !chatters.contains_key(&notice.shop_id) {
                        let members = store::chat_members(conn, &notice.shop_id).await?;
                        chatters.insert(notice.shop_id.clone(), members);
                    }
                    for employee_id in chatters.get(&notice.shop_id).into_iter().flatten() {
                        events.push(employee_id, &notice.shop_id, event.clone());
                    }
                    self.sink.shop_notice(conn, &notice.shop_id, event).await?;
                }
            }
        }
        Ok(())
    }
}

impl Deferred {
    /// A conversation created by this batch takes the bot messages stored before it: those
    /// still to be inserted here, and (by the flush) those stored earlier.
    fn attach(&mut self, shop_id: &str, mb_conversation_id: &str, conversation_id: Uuid) {
        let rows = &mut self.inserts;
        for row in 0..rows.message_id.len() {
            if rows.conversation_id[row].is_none()
                && rows.shop_id[row] == shop_id
                && rows.mb_conversation_id[row] == mb_conversation_id
            {
                rows.conversation_id[row] = Some(conversation_id);
            }
        }
        self.attach.push((
            shop_id.to_owned(),
            mb_conversation_id.to_owned(),
            conversation_id,
        ));
    }
}

impl MessageRows {
    /// Adds a new message's row; returns its index.
    fn push(&mut self, row: MessageRow<'_>) -> usize {
        let stored = row.stored;
        self.message_id.push(row.message_id);
        self.shop_id.push(row.shop_id.to_owned());
        self.conversation_id.push(row.conversation_id);
        self.mb_conversation_id
            .push(row.mb_conversation_id.to_owned());
        self.mb_message_id
            .push(stored.messagebird_message_id.clone());
        self.direction
            .push(i16::try_from(stored.direction).unwrap_or(0));
        self.channel
            .push(i16::try_from(stored.channel).unwrap_or(0));
        self.platform.push(row.platform.to_owned());
        self.kind.push(stored.r#type.clone());
        self.text.push(stored.text.clone());
        self.supported.push(stored.supported);
        self.content_json.push(stored.content_json.clone());
        self.status.push(i16::try_from(stored.status).unwrap_or(0));
        self.raw_status.push(stored.raw_status.clone());
        self.created_at.push(row.created_at);
        self.message_id.len() - 1
    }
}

/// One statement made of the data-modifying parts a flush needs, and their arguments.
#[derive(Default)]
struct Writes {
    parts: Vec<String>,
    arguments: PgArguments,
    bound: usize,
}

impl Writes {
    /// An `unnest(...)` of arrays bound as arguments, each with its cast beside it.
    fn unnest(&mut self) -> Unnest<'_> {
        Unnest {
            writes: self,
            columns: Vec::new(),
        }
    }

    /// Adds a part: `name as (statement)`.
    fn part(&mut self, part: String) {
        self.parts.push(part);
    }

    async fn execute(self, conn: &mut PgConnection) -> Result<(), IngestError> {
        if self.parts.is_empty() {
            return Ok(());
        }
        let sql = format!("with {} select 1", self.parts.join(", "));
        sqlx::query_with(sqlx::AssertSqlSafe(sql), self.arguments)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// The columns of one `unnest`, bound as they are added.
struct Unnest<'w> {
    writes: &'w mut Writes,
    columns: Vec<String>,
}

impl Unnest<'_> {
    /// Binds one column's values as an array of `sql_type`.
    fn column<'t, T>(&mut self, values: Vec<T>, sql_type: &str) -> Result<(), IngestError>
    where
        Vec<T>: sqlx::Encode<'t, Postgres> + sqlx::Type<Postgres>,
    {
        self.writes
            .arguments
            .add(values)
            .map_err(|e| IngestError::Failed(format!("encoding the batch's writes: {e}")))?;
        self.writes.bound += 1;
        self.columns
            .push(format!("${}::{sql_type}[]", self.writes.bound));
        Ok(())
    }

    fn finish(self) -> String {
        format!("unnest({})", self.columns.join(", "))
    }
}

/// The conversations a batch starts, one vector per column (the `unnest` of the insert).
#[derive(Debug, Default)]
struct NewConversationRows {
    conversation_id: Vec<Uuid>,
    shop_id: Vec<String>,
    mb_conversation_id: Vec<String>,
    customer_id: Vec<Uuid>,
    channel: Vec<i16>,
    channel_id: Vec<String>,
    platform: Vec<String>,
    state: Vec<&'static str>,
    reason: Vec<Option<&'static str>>,
    last_activity_at: Vec<Option<DateTime<Utc>>>,
    preview: Vec<String>,
}

impl NewConversationRows {
    /// The rows of `started`, in id order (the order they were started in), each with its
    /// activity taken out of `activity`: a new row is written once, with its last activity.
    fn of(
        activity: &mut BTreeMap<Uuid, (DateTime<Utc>, String)>,
        started: HashMap<(String, String), StartedConversation>,
    ) -> Self {
        let mut started: Vec<_> = started.into_iter().collect();
        started.sort_by_key(|(_, c)| c.conversation_id);
        let mut rows = Self::default();
        for ((shop_id, mb_conversation_id), c) in started {
            let (at, preview) = match activity.remove(&c.conversation_id) {
                Some((at, preview)) => (Some(at), preview),
                None => (None, String::new()),
            };
            rows.conversation_id.push(c.conversation_id);
            rows.shop_id.push(shop_id);
            rows.mb_conversation_id.push(mb_conversation_id);
            rows.customer_id.push(c.customer_id);
            rows.channel.push(c.channel);
            rows.channel_id.push(c.channel_id);
            rows.platform.push(c.platform);
            rows.state.push(c.state);
            rows.reason.push(c.reason);
            rows.last_activity_at.push(at);
            rows.preview.push(preview);
        }
        rows
    }
}

/// One new message's columns: the stored copy plus what only the table keeps.
struct MessageRow<'a> {
    message_id: Uuid,
    shop_id: &'a str,
    conversation_id: Option<Uuid>,
    mb_conversation_id: &'a str,
    platform: &'a str,
    created_at: DateTime<Utc>,
    stored: &'a Message,
}

/// How a customer is recognised: normalized MSISDN per shop, else MessageBird contact id.
#[derive(Debug, Clone)]
enum CustomerKey {
    Msisdn(String),
    Contact(String),
}

impl CustomerKey {
    fn as_str(&self) -> &str {
        match self {
            Self::Msisdn(key) | Self::Contact(key) => key,
        }
    }
}

/// The customer key of a customer's message, or why it has none.
fn customer_key(contact: &InboundContact) -> Result<CustomerKey, String> {
    if !contact.msisdn.trim().is_empty() {
        return normalize_msisdn(&contact.msisdn)
            .map(CustomerKey::Msisdn)
            .map_err(|e| format!("contact msisdn {:?}: {e}", contact.msisdn));
    }
    let contact_id = contact.messagebird_contact_id.trim();
    if contact_id.is_empty() {
        return Err("customer message without MSISDN or contact id".into());
    }
    Ok(CustomerKey::Contact(contact_id.to_owned()))
}

/// A customer's message with no open conversation: what starting (or reopening) one needs.
struct NewConversation<'a> {
    mb_conversation_id: &'a str,
    customer_id: Uuid,
    /// The lookup found a closed conversation for this MessageBird conversation.
    has_closed: bool,
}

/// A conversation the batch starts, as the flush inserts it.
#[derive(Debug)]
struct StartedConversation {
    conversation_id: Uuid,
    customer_id: Uuid,
    channel: i16,
    channel_id: String,
    platform: String,
    state: &'static str,
    reason: Option<&'static str>,
}

impl StartedConversation {
    /// The conversation as a later event of the batch finds it.
    fn target(&self) -> Target {
        Target {
            conversation_id: self.conversation_id,
            state: self.state.to_owned(),
            assignee: None,
            fresh: false,
        }
    }
}

/// The conversation a message lands in.
#[derive(Debug, Clone)]
struct Target {
    conversation_id: Uuid,
    state: String,
    assignee: Option<String>,
    /// Created by this message.
    fresh: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_column_is_bound_in_order_beside_its_cast() -> Result<(), IngestError> {
        let mut writes = Writes::default();
        let mut first = writes.unnest();
        first.column(vec![Uuid::nil()], "uuid")?;
        first.column(vec!["a"], "text")?;
        assert_eq!(first.finish(), "unnest($1::uuid[], $2::text[])");
        let mut second = writes.unnest();
        second.column(vec![1_i16], "int2")?;
        assert_eq!(second.finish(), "unnest($3::int2[])");
        assert_eq!(writes.bound, 3);
        Ok(())
    }

    #[test]
    fn a_new_conversation_takes_its_activity_into_its_row() {
        let at = Utc::now();
        let (started, other) = (Uuid::now_v7(), Uuid::now_v7());
        let mut activity = BTreeMap::from([
            (started, (at, "latest".to_owned())),
            (other, (at, "elsewhere".to_owned())),
        ]);
        let rows = NewConversationRows::of(
            &mut activity,
            HashMap::from([(
                ("shop-a".to_owned(), "mb-1".to_owned()),
                StartedConversation {
                    conversation_id: started,
                    customer_id: Uuid::now_v7(),
                    channel: 1,
                    channel_id: "wa".into(),
                    platform: "whatsapp".into(),
                    state: "waiting_for_employee",
                    reason: None,
                },
            )]),
        );
        assert_eq!(rows.conversation_id, [started]);
        assert_eq!(rows.last_activity_at, [Some(at)]);
        assert_eq!(rows.preview, ["latest"]);
        // Only the existing conversation is left for the activity update.
        assert_eq!(activity.keys().copied().collect::<Vec<_>>(), [other]);
    }
}
