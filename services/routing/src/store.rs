//! The durable record in PostgreSQL: customers, conversations, messages, links, the 24-hour
//! window clock and employee events, plus the conversions from rows to the API's messages.
//! Every function takes the caller's connection or transaction, so one inbound event or API
//! call is one transaction together with the outbox rows it produces.

use std::collections::HashMap;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use prost::Message as _;
use shopctrl_amqp::{Names, OutboxMessage, outbox_enqueue};
use shopctrl_proto::v1::{
    Channel, Conversation, ConversationState, Customer, Direction, EmployeeEvent, EmployeeRef,
    Message, MessageStatus, Notification, NotificationBatch, UnassignedReason, employee_event,
};
use sqlx::{PgConnection, Row, postgres::PgRow};
use uuid::Uuid;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("outbox error: {0}")]
    Outbox(#[from] shopctrl_amqp::OutboxError),
    #[error("stored employee event: {0}")]
    Event(String),
}

impl StoreError {
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(error) => is_transient(error),
            StoreError::Outbox(shopctrl_amqp::OutboxError::Database(error)) => is_transient(error),
            StoreError::Outbox(_) | StoreError::Event(_) => false,
        }
    }
}

/// Whether a database error is infrastructure trouble (retry later) rather than something the
/// statement or data did wrong.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exception; 40001/40P01: serialization failure, deadlock;
            // 53: insufficient resources; 57P0x: the server is shutting down or restarting.
            code.starts_with("08")
                || code == "40001"
                || code == "40P01"
                || code.starts_with("53")
                || code.starts_with("57P")
        }),
        _ => false,
    }
}

pub fn to_timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub fn from_timestamp(ts: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let ts = ts?;
    if ts.seconds <= 0 && ts.nanos <= 0 {
        return None;
    }
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).unwrap_or(0))
}

pub fn state_from_str(state: &str) -> ConversationState {
    match state {
        "waiting_for_handover" => ConversationState::WaitingForHandover,
        "waiting_for_employee" => ConversationState::WaitingForEmployee,
        "assigned" => ConversationState::Assigned,
        "closed" => ConversationState::Closed,
        _ => ConversationState::Unspecified,
    }
}

pub fn reason_from_str(reason: Option<&str>) -> UnassignedReason {
    match reason {
        Some("slots_zero") => UnassignedReason::SlotsZero,
        Some("no_permission") => UnassignedReason::NoPermission,
        Some("all_full") => UnassignedReason::AllFull,
        Some("all_away") => UnassignedReason::AllAway,
        Some("awaiting_handover") => UnassignedReason::AwaitingHandover,
        _ => UnassignedReason::Unspecified,
    }
}

/// The preview shown in dialog lists.
pub fn preview(text: &str, kind: &str, supported: bool) -> String {
    let source = if supported && !text.is_empty() {
        text.to_owned()
    } else {
        format!("[{kind}]")
    };
    source.chars().take(120).collect()
}

// ---------------------------------------------------------------------------------------------
// Paging

/// A position in a list ordered by (time, tie-breaker) descending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub at: DateTime<Utc>,
    pub tie: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}|{}", self.at.timestamp_micros(), self.tie))
    }

    pub fn decode(token: &str) -> Option<Self> {
        let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (micros, tie) = raw.split_once('|')?;
        Some(Self {
            at: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            tie: tie.to_owned(),
        })
    }
}

/// 1..=200, default 50.
pub fn page_size(requested: u32) -> i64 {
    match requested {
        0 => 50,
        n => i64::from(n.min(200)),
    }
}

// ---------------------------------------------------------------------------------------------
// Conversations as the API shows them

/// The reason a conversation `c` is unassigned: for one waiting for an employee, its shop's
/// current reason (`shop_waiting_reasons`, written after each refused claim); otherwise, or
/// before the shop has a row, the conversation's own column.
macro_rules! unassigned_reason_sql {
    () => {
        "case when c.state = 'waiting_for_employee' then
            coalesce((select r.reason from shop_waiting_reasons r where r.shop_id = c.shop_id),
                     c.unassigned_reason)
        else c.unassigned_reason end"
    };
}
pub(crate) use unassigned_reason_sql;
pub const UNASSIGNED_REASON_SQL: &str = unassigned_reason_sql!();

const CONVERSATION_COLUMNS: &str = concat!(
    "
    c.conversation_id, c.shop_id, c.messagebird_conversation_id, c.channel, c.channel_id,
    c.state, c.assignee_employee_id, ",
    unassigned_reason_sql!(),
    " as unassigned_reason, c.waiting_since, c.created_at,
    c.last_activity_at, c.closed_at, c.last_message_preview,
    cu.customer_id, cu.msisdn, cu.messagebird_contact_id, cu.display_name as customer_name,
    am.display_name as assignee_name,
    coalesce((select array_agg(l.target_id order by l.target_id) from conversation_links l
              where l.conversation_id = c.conversation_id and l.kind = 'order'), '{}') as order_ids,
    coalesce((select array_agg(l.target_id order by l.target_id) from conversation_links l
              where l.conversation_id = c.conversation_id and l.kind = 'ticket'), '{}') as ticket_ids"
);

const CONVERSATION_FROM: &str = "
    from conversations c
    join customers cu on cu.customer_id = c.customer_id
    left join shop_members am on am.shop_id = c.shop_id and am.employee_id = c.assignee_employee_id";

fn conversation_from_row(row: &PgRow) -> Result<Conversation, sqlx::Error> {
    let state: String = row.try_get("state")?;
    let reason: Option<String> = row.try_get("unassigned_reason")?;
    let assignee: Option<String> = row.try_get("assignee_employee_id")?;
    let assignee_name: Option<String> = row.try_get("assignee_name")?;
    let state = state_from_str(&state);
    let conversation_id: Uuid = row.try_get("conversation_id")?;
    let customer_id: Uuid = row.try_get("customer_id")?;
    let shop_id: String = row.try_get("shop_id")?;
    Ok(Conversation {
        conversation_id: conversation_id.to_string(),
        shop_id: shop_id.clone(),
        messagebird_conversation_id: row.try_get("messagebird_conversation_id")?,
        channel: i32::from(row.try_get::<i16, _>("channel")?),
        channel_id: row.try_get("channel_id")?,
        customer: Some(Customer {
            customer_id: customer_id.to_string(),
            shop_id,
            msisdn: row
                .try_get::<Option<String>, _>("msisdn")?
                .unwrap_or_default(),
            messagebird_contact_id: row
                .try_get::<Option<String>, _>("messagebird_contact_id")?
                .unwrap_or_default(),
            display_name: row.try_get("customer_name")?,
        }),
        state: state as i32,
        assignee: assignee.map(|employee_id| EmployeeRef {
            employee_id,
            display_name: assignee_name.unwrap_or_default(),
        }),
        unassigned_reason: if matches!(
            state,
            ConversationState::WaitingForEmployee | ConversationState::WaitingForHandover
        ) {
            reason_from_str(reason.as_deref()) as i32
        } else {
            UnassignedReason::Unspecified as i32
        },
        waiting_since: row
            .try_get::<Option<DateTime<Utc>>, _>("waiting_since")?
            .map(to_timestamp),
        created_at: Some(to_timestamp(row.try_get("created_at")?)),
        last_activity_at: Some(to_timestamp(row.try_get("last_activity_at")?)),
        closed_at: row
            .try_get::<Option<DateTime<Utc>>, _>("closed_at")?
            .map(to_timestamp),
        order_ids: row.try_get("order_ids")?,
        ticket_ids: row.try_get("ticket_ids")?,
        last_message_preview: row.try_get("last_message_preview")?,
        // Filled in by `conversations_from_rows`.
        queue_position: 0,
    })
}

/// Conversations from their rows, with the queue positions of the waiting ones.
async fn conversations_from_rows(
    conn: &mut PgConnection,
    rows: &[PgRow],
) -> Result<Vec<Conversation>, sqlx::Error> {
    let mut conversations = Vec::with_capacity(rows.len());
    let mut waiting = Vec::new();
    for row in rows {
        let conversation = conversation_from_row(row)?;
        if conversation.state == ConversationState::WaitingForEmployee as i32
            && let Some(since) = row.try_get::<Option<DateTime<Utc>>, _>("waiting_since")?
        {
            waiting.push(Waiting {
                index: conversations.len(),
                shop_id: conversation.shop_id.clone(),
                since,
                conversation_id: row.try_get("conversation_id")?,
            });
        }
        conversations.push(conversation);
    }
    if !waiting.is_empty() {
        let positions = queue_positions(conn, &waiting).await?;
        for w in &waiting {
            conversations[w.index].queue_position =
                positions.get(&w.conversation_id).copied().unwrap_or(0);
        }
    }
    Ok(conversations)
}

/// 1-based position of a waiting conversation in its shop's queue (oldest first; 0 when it is
/// not waiting), counted in `conversations_queue` without visiting the other conversations.
pub async fn queue_position(conn: &mut PgConnection, id: Uuid) -> Result<u32, sqlx::Error> {
    let position: i64 = sqlx::query_scalar(
        "select count(*) from conversations c, conversations w
         where c.conversation_id = $1 and w.shop_id = c.shop_id
           and w.state = 'waiting_for_employee'
           and (w.waiting_since, w.conversation_id) <= (c.waiting_since, c.conversation_id)",
    )
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    Ok(u32::try_from(position).unwrap_or(u32::MAX))
}

/// A waiting conversation among those loaded.
struct Waiting {
    index: usize,
    shop_id: String,
    since: DateTime<Utc>,
    conversation_id: Uuid,
}

/// 1-based positions in their shops' queues (oldest first), counted in `conversations_queue`
/// (the queue's order) without visiting the table. One conversation: the entries ahead of it
/// are counted. Several: each shop's queue is ranked once, up to the last of them, since
/// counting ahead of each one would read a long queue again for every conversation of a page.
async fn queue_positions(
    conn: &mut PgConnection,
    waiting: &[Waiting],
) -> Result<HashMap<Uuid, u32>, sqlx::Error> {
    if let [one] = waiting {
        let position = queue_position(conn, one.conversation_id).await?;
        return Ok(HashMap::from([(one.conversation_id, position)]));
    }
    let mut last: HashMap<&str, (DateTime<Utc>, Uuid)> = HashMap::new();
    for w in waiting {
        let key = (w.since, w.conversation_id);
        last.entry(w.shop_id.as_str())
            .and_modify(|bound| *bound = (*bound).max(key))
            .or_insert(key);
    }
    let (shops, bounds): (Vec<&str>, Vec<(DateTime<Utc>, Uuid)>) = last.into_iter().unzip();
    let (since, ids): (Vec<DateTime<Utc>>, Vec<Uuid>) = bounds.into_iter().unzip();
    let wanted: Vec<Uuid> = waiting.iter().map(|w| w.conversation_id).collect();
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "select q.conversation_id, q.position
         from unnest($1::text[], $2::timestamptz[], $3::uuid[]) as b(shop_id, since, last_id)
         cross join lateral (
            select w.conversation_id,
                   row_number() over (order by w.waiting_since, w.conversation_id) as position
            from conversations w
            where w.shop_id = b.shop_id and w.state = 'waiting_for_employee'
              and (w.waiting_since, w.conversation_id) <= (b.since, b.last_id)) q
         where q.conversation_id = any($4)",
    )
    .bind(&shops)
    .bind(&since)
    .bind(&ids)
    .bind(&wanted)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, position)| (id, u32::try_from(position).unwrap_or(u32::MAX)))
        .collect())
}

/// One conversation as the API shows it.
pub async fn load_conversation(
    conn: &mut PgConnection,
    conversation_id: Uuid,
) -> Result<Option<Conversation>, sqlx::Error> {
    let sql =
        format!("select {CONVERSATION_COLUMNS} {CONVERSATION_FROM} where c.conversation_id = $1");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(conversation_id)
        .fetch_all(&mut *conn)
        .await?;
    Ok(conversations_from_rows(conn, &rows)
        .await?
        .into_iter()
        .next())
}

/// Several conversations as the API shows them, by id (missing ids are left out).
pub async fn load_conversations(
    conn: &mut PgConnection,
    conversation_ids: &[Uuid],
) -> Result<HashMap<Uuid, Conversation>, sqlx::Error> {
    let sql = format!(
        "select {CONVERSATION_COLUMNS} {CONVERSATION_FROM} where c.conversation_id = any($1)"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(conversation_ids)
        .fetch_all(&mut *conn)
        .await?;
    let conversations = conversations_from_rows(conn, &rows).await?;
    rows.iter()
        .zip(conversations)
        .map(|(row, conversation)| Ok((row.try_get("conversation_id")?, conversation)))
        .collect()
}

/// Which conversations a dialog list shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialogScope<'a> {
    Mine(&'a str),
    Unassigned,
    All,
}

/// A page of a shop's conversations, newest activity first.
pub async fn list_dialogs(
    conn: &mut PgConnection,
    shop_id: &str,
    scope: DialogScope<'_>,
    cursor: Option<&Cursor>,
    limit: i64,
) -> Result<(Vec<Conversation>, Option<Cursor>), sqlx::Error> {
    let filter = match scope {
        DialogScope::Mine(_) => "and c.state = 'assigned' and c.assignee_employee_id = $4",
        DialogScope::Unassigned => {
            "and c.state in ('waiting_for_handover', 'waiting_for_employee') and $4::text is null"
        }
        DialogScope::All => "and $4::text is null",
    };
    let sql = format!(
        "select {CONVERSATION_COLUMNS} {CONVERSATION_FROM}
         where c.shop_id = $1 {filter}
           and ($2::timestamptz is null or (c.last_activity_at, c.conversation_id) < ($2, $3::uuid))
         order by c.last_activity_at desc, c.conversation_id desc
         limit $5"
    );
    let (at, tie) = split_cursor(cursor);
    let employee = match scope {
        DialogScope::Mine(employee) => Some(employee.to_owned()),
        _ => None,
    };
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(shop_id)
        .bind(at)
        .bind(tie.and_then(|t| Uuid::parse_str(&t).ok()))
        .bind(employee)
        .bind(limit + 1)
        .fetch_all(&mut *conn)
        .await?;
    page_of_conversations(conn, rows, limit).await
}

fn split_cursor(cursor: Option<&Cursor>) -> (Option<DateTime<Utc>>, Option<String>) {
    match cursor {
        Some(c) => (Some(c.at), Some(c.tie.clone())),
        None => (None, None),
    }
}

async fn page_of_conversations(
    conn: &mut PgConnection,
    mut rows: Vec<PgRow>,
    limit: i64,
) -> Result<(Vec<Conversation>, Option<Cursor>), sqlx::Error> {
    let has_more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    let conversations = conversations_from_rows(conn, &rows).await?;
    let mut last = None;
    for row in &rows {
        last = Some(Cursor {
            at: row.try_get("last_activity_at")?,
            tie: row.try_get::<Uuid, _>("conversation_id")?.to_string(),
        });
    }
    Ok((conversations, if has_more { last } else { None }))
}

/// What linked history is looked up by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkTarget {
    Customer(Uuid),
    Order(String),
    Ticket(String),
}

/// A page of a shop's conversations linked to a customer, order or ticket, newest first.
pub async fn linked_conversations(
    conn: &mut PgConnection,
    shop_id: &str,
    target: &LinkTarget,
    cursor: Option<&Cursor>,
    limit: i64,
) -> Result<(Vec<Conversation>, Option<Cursor>), sqlx::Error> {
    let (filter, kind, value) = match target {
        LinkTarget::Customer(id) => (
            "c.customer_id = $4::uuid and $5::text is null",
            None,
            id.to_string(),
        ),
        LinkTarget::Order(id) => (
            "exists (select 1 from conversation_links l where l.conversation_id = c.conversation_id
                     and l.target_id = $4 and l.kind = $5)",
            Some("order"),
            id.clone(),
        ),
        LinkTarget::Ticket(id) => (
            "exists (select 1 from conversation_links l where l.conversation_id = c.conversation_id
                     and l.target_id = $4 and l.kind = $5)",
            Some("ticket"),
            id.clone(),
        ),
    };
    let sql = format!(
        "select {CONVERSATION_COLUMNS} {CONVERSATION_FROM}
         where c.shop_id = $1 and {filter}
           and ($2::timestamptz is null or (c.last_activity_at, c.conversation_id) < ($2, $3::uuid))
         order by c.last_activity_at desc, c.conversation_id desc
         limit $6"
    );
    let (at, tie) = split_cursor(cursor);
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(shop_id)
        .bind(at)
        .bind(tie.and_then(|t| Uuid::parse_str(&t).ok()))
        .bind(value)
        .bind(kind)
        .bind(limit + 1)
        .fetch_all(&mut *conn)
        .await?;
    page_of_conversations(conn, rows, limit).await
}

// ---------------------------------------------------------------------------------------------
// Messages as the API shows them

const MESSAGE_COLUMNS: &str = "message_id, seq, conversation_id, messagebird_message_id, direction,
    channel, type, text, supported, content_json, status, raw_status, sent_by_employee_id,
    created_at, failure";

fn message_from_row(row: &PgRow) -> Result<Message, sqlx::Error> {
    Ok(Message {
        message_id: row.try_get::<Uuid, _>("message_id")?.to_string(),
        conversation_id: row
            .try_get::<Option<Uuid>, _>("conversation_id")?
            .map(|id| id.to_string())
            .unwrap_or_default(),
        messagebird_message_id: row
            .try_get::<Option<String>, _>("messagebird_message_id")?
            .unwrap_or_default(),
        direction: i32::from(row.try_get::<i16, _>("direction")?),
        channel: i32::from(row.try_get::<i16, _>("channel")?),
        r#type: row.try_get("type")?,
        text: row.try_get("text")?,
        supported: row.try_get("supported")?,
        content_json: row.try_get("content_json")?,
        status: i32::from(row.try_get::<i16, _>("status")?),
        raw_status: row.try_get("raw_status")?,
        sent_by_employee_id: row
            .try_get::<Option<String>, _>("sent_by_employee_id")?
            .unwrap_or_default(),
        created_at: Some(to_timestamp(row.try_get("created_at")?)),
        failure: row
            .try_get::<Option<String>, _>("failure")?
            .unwrap_or_default(),
    })
}

pub async fn load_message(
    conn: &mut PgConnection,
    message_id: Uuid,
) -> Result<Option<Message>, sqlx::Error> {
    let sql = format!("select {MESSAGE_COLUMNS} from messages where message_id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(message_id)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(message_from_row).transpose()
}

/// A page of a conversation's messages: the newest `limit` before the cursor, returned
/// oldest first; the next page goes further back in time.
pub async fn list_messages(
    conn: &mut PgConnection,
    conversation_id: Uuid,
    cursor: Option<&Cursor>,
    limit: i64,
) -> Result<(Vec<Message>, Option<Cursor>), sqlx::Error> {
    let sql = format!(
        "select {MESSAGE_COLUMNS} from messages
         where conversation_id = $1
           and ($2::timestamptz is null or (created_at, seq) < ($2, $3::bigint))
         order by created_at desc, seq desc
         limit $4"
    );
    let (at, tie) = split_cursor(cursor);
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(conversation_id)
        .bind(at)
        .bind(tie.and_then(|t| t.parse::<i64>().ok()))
        .bind(limit + 1)
        .fetch_all(&mut *conn)
        .await?;
    let has_more = rows.len() as i64 > limit;
    let mut messages = Vec::with_capacity(rows.len());
    let mut last = None;
    for row in rows.iter().take(usize::try_from(limit).unwrap_or(0)) {
        messages.push(message_from_row(row)?);
        last = Some(Cursor {
            at: row.try_get("created_at")?,
            tie: row.try_get::<i64, _>("seq")?.to_string(),
        });
    }
    messages.reverse();
    Ok((messages, if has_more { last } else { None }))
}

// ---------------------------------------------------------------------------------------------
// Employee events and outbox

/// Employee events gathered by a batch transaction, stored by [`Sink::store_pending`] just
/// before it commits (and numbered by the sequencer after).
#[derive(Debug, Default)]
pub struct PendingEvents {
    events: Vec<PendingEvent>,
}

#[derive(Debug)]
struct PendingEvent {
    employee_id: String,
    shop_id: String,
    occurred_at: prost_types::Timestamp,
    event: employee_event::Event,
}

impl PendingEvents {
    pub fn push(&mut self, employee_id: &str, shop_id: &str, event: employee_event::Event) {
        self.events.push(PendingEvent {
            employee_id: employee_id.to_owned(),
            shop_id: shop_id.to_owned(),
            occurred_at: to_timestamp(Utc::now()),
            event,
        });
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Forgets what was gathered after the first `len` events (a rolled-back savepoint).
    pub fn truncate(&mut self, len: usize) {
        self.events.truncate(len);
    }
}

/// Where events go.
#[derive(Debug, Clone)]
pub struct Sink {
    pub names: Names,
}

impl Sink {
    /// Stores an event for one employee, numbered (and announced) by the sequencer once the
    /// caller's transaction committed.
    pub async fn employee_event(
        &self,
        conn: &mut PgConnection,
        employee_id: &str,
        shop_id: &str,
        event: employee_event::Event,
    ) -> Result<(), StoreError> {
        let mut pending = PendingEvents::default();
        pending.push(employee_id, shop_id, event);
        self.store_pending(conn, &mut pending).await
    }

    /// Stores the events a batch gathered, unnumbered, in one statement, and empties
    /// `pending`. The sequencer ([`crate::sequencer`]) numbers them after commit, woken by
    /// the notification this statement sends (delivered on commit only). Nothing here locks
    /// an employee's counter, so shards with events for the same employee do not wait for
    /// each other.
    pub async fn store_pending(
        &self,
        conn: &mut PgConnection,
        pending: &mut PendingEvents,
    ) -> Result<(), StoreError> {
        let events = std::mem::take(&mut pending.events);
        if events.is_empty() {
            return Ok(());
        }
        let mut employee_ids = Vec::with_capacity(events.len());
        let mut shop_ids = Vec::with_capacity(events.len());
        let mut stored = Vec::with_capacity(events.len());
        for event in events {
            stored.push(
                EmployeeEvent {
                    sequence: 0,
                    employee_id: event.employee_id.clone(),
                    occurred_at: Some(event.occurred_at),
                    event: Some(event.event),
                }
                .encode_to_vec(),
            );
            employee_ids.push(event.employee_id);
            shop_ids.push(event.shop_id);
        }
        sqlx::query(
            "with stored as (
                insert into employee_events_unnumbered (employee_id, shop_id, event)
                select employee_id, shop_id, event
                from unnest($1::text[], $2::text[], $3::bytea[])
                     with ordinality as e(employee_id, shop_id, event, ord)
                order by ord
             )
             select pg_notify($4, '')",
        )
        .bind(employee_ids)
        .bind(shop_ids)
        .bind(stored)
        .bind(crate::sequencer::WAKE_CHANNEL)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// A shop-wide notice (routing key `shop.<id>`, sequence 0) for listeners of the shop.
    pub async fn shop_notice(
        &self,
        conn: &mut PgConnection,
        shop_id: &str,
        event: employee_event::Event,
    ) -> Result<(), StoreError> {
        let bytes = EmployeeEvent {
            sequence: 0,
            employee_id: String::new(),
            occurred_at: Some(to_timestamp(Utc::now())),
            event: Some(event),
        }
        .encode_to_vec();
        let event_id = Uuid::now_v7();
        let notification = Notification {
            meta: Some(meta(event_id)),
            shop_id: shop_id.to_owned(),
            employee_id: String::new(),
            sequence: 0,
            employee_event: bytes,
        };
        let message = OutboxMessage {
            event_id,
            exchange: self.names.notify_exchange(),
            routing_key: format!("shop.{shop_id}"),
            message_type: proto_type("Notification"),
            payload: notification.encode_to_vec(),
            headers: Vec::new(),
        };
        outbox_enqueue(conn, &message).await?;
        Ok(())
    }

    /// The outbox row announcing numbered employee events, in the order given (see
    /// `NotificationBatch` in the protocol). The events of a batch come from many requests,
    /// so the message carries no single trace context.
    pub(crate) fn notification_batch_message(
        &self,
        notifications: Vec<Notification>,
    ) -> OutboxMessage {
        let event_id = Uuid::now_v7();
        let batch = NotificationBatch {
            meta: Some(meta(event_id)),
            notifications,
        };
        OutboxMessage {
            event_id,
            exchange: self.names.notify_exchange(),
            routing_key: crate::notify::EMPLOYEE_EVENTS_ROUTING_KEY.to_owned(),
            message_type: proto_type("NotificationBatch"),
            payload: batch.encode_to_vec(),
            headers: Vec::new(),
        }
    }

    /// Queues any event for publishing after commit.
    pub async fn publish<M: prost::Message>(
        &self,
        conn: &mut PgConnection,
        event_id: Uuid,
        exchange: String,
        routing_key: &str,
        message_type: &str,
        message: &M,
    ) -> Result<(), StoreError> {
        outbox_enqueue(
            conn,
            &OutboxMessage {
                event_id,
                exchange,
                routing_key: routing_key.to_owned(),
                message_type: proto_type(message_type),
                payload: message.encode_to_vec(),
                headers: Vec::new(),
            },
        )
        .await?;
        Ok(())
    }
}

/// The AMQP `type` of one of our protobuf messages: its full proto name.
pub fn proto_type(short_name: &str) -> String {
    format!("shopctrl.messaging.v1.{short_name}")
}

pub fn meta(event_id: Uuid) -> shopctrl_proto::v1::EventMeta {
    shopctrl_proto::v1::EventMeta {
        event_id: event_id.to_string(),
        occurred_at: Some(to_timestamp(Utc::now())),
        producer: "routing".to_owned(),
    }
}

/// Employees with the Chat permission at a shop (who hear shop-wide notices).
pub async fn chat_members(
    conn: &mut PgConnection,
    shop_id: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "select employee_id from shop_members where shop_id = $1 and chat_permission order by employee_id",
    )
    .bind(shop_id)
    .fetch_all(&mut *conn)
    .await
}

/// Marks an event id as processed; false when it already was (a redelivery).
pub async fn first_time(conn: &mut PgConnection, event_id: &str) -> Result<bool, sqlx::Error> {
    let inserted =
        sqlx::query("insert into processed_events (event_id) values ($1) on conflict do nothing")
            .bind(event_id)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    Ok(inserted == 1)
}

pub fn channel_of(value: i32) -> Channel {
    Channel::try_from(value).unwrap_or(Channel::Unspecified)
}

pub fn direction_of(value: i32) -> Direction {
    Direction::try_from(value).unwrap_or(Direction::Unspecified)
}

pub fn status_of(value: i32) -> MessageStatus {
    MessageStatus::try_from(value).unwrap_or(MessageStatus::Unspecified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let cursor = Cursor {
            at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap_or_default(),
            tie: "42".into(),
        };
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
        assert_eq!(Cursor::decode("garbage!"), None);
        assert_eq!(page_size(0), 50);
        assert_eq!(page_size(1000), 200);
    }

    #[test]
    fn previews_name_unsupported_types() {
        assert_eq!(preview("hi", "text", true), "hi");
        assert_eq!(preview("", "image", false), "[image]");
    }
}
