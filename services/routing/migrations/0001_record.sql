-- The durable record of routing: customers, conversations, messages and links; the 24-hour
-- window clock; employee events with per-employee sequences; the dedupe inbox; the outbox;
-- and routing's local copy of the config service's data (settings, members, presence).
-- Runs with search_path = routing (the service creates the schema first).

-- Customers are recognised per shop by MSISDN (digits only); web-widget visitors without a
-- phone are recognised by their MessageBird contact id instead.
create table customers (
    customer_id            uuid primary key,
    shop_id                text not null,
    msisdn                 text,
    messagebird_contact_id text,
    display_name           text not null default '',
    created_at             timestamptz not null default now(),
    check (msisdn is not null or messagebird_contact_id is not null)
);
create unique index customers_by_msisdn on customers (shop_id, msisdn) where msisdn is not null;
-- Only visitors are keyed by contact id: a phone customer may show up under several contacts.
create unique index customers_by_contact on customers (shop_id, messagebird_contact_id)
    where msisdn is null;

create table conversations (
    conversation_id             uuid primary key,
    shop_id                     text not null,
    messagebird_conversation_id text not null,
    customer_id                 uuid not null references customers,
    channel                     smallint not null,
    channel_id                  text not null default '',
    platform                    text not null default '',
    state                       text not null check (state in
                                  ('waiting_for_handover','waiting_for_employee','assigned','closed')),
    assignee_employee_id        text,              -- set iff state = 'assigned'
    unassigned_reason           text,              -- slots_zero|no_permission|all_full|all_away|awaiting_handover
    waiting_since               timestamptz,       -- queue order (oldest first); kept when handed back
    via_handover                boolean not null default false,
    created_at                  timestamptz not null default now(),
    last_activity_at            timestamptz not null default now(),
    closed_at                   timestamptz,
    closed_by_employee_id       text,
    last_message_preview        text not null default '',
    check ((state = 'assigned') = (assignee_employee_id is not null))
);
create unique index conversations_one_open on conversations (shop_id, messagebird_conversation_id)
    where state <> 'closed';
create index conversations_waiting on conversations (shop_id, waiting_since)
    where state = 'waiting_for_employee';
create index conversations_by_mb on conversations (shop_id, messagebird_conversation_id, created_at desc);
create index conversations_activity on conversations (shop_id, last_activity_at desc, conversation_id desc);
create index conversations_assignee on conversations (assignee_employee_id, last_activity_at desc)
    where state = 'assigned';
create index conversations_customer on conversations (customer_id, last_activity_at desc);

-- Orders and tickets a conversation is linked to (customers are linked by customer_id).
create table conversation_links (
    conversation_id uuid not null references conversations,
    kind            text not null check (kind in ('order', 'ticket')),
    target_id       text not null,
    created_at      timestamptz not null default now(),
    primary key (conversation_id, kind, target_id)
);
create index conversation_links_target on conversation_links (kind, target_id);

-- Every message, whoever sent it. A bot message for a MessageBird conversation we have no
-- ShopCtrl conversation for yet waits with conversation_id null and is attached when the
-- customer's first message creates one.
create table messages (
    message_id                  uuid primary key,
    seq                         bigserial not null,   -- arrival order, the tie-breaker for paging
    shop_id                     text not null,
    conversation_id             uuid references conversations,
    messagebird_conversation_id text not null default '',
    messagebird_message_id      text,
    direction                   smallint not null,
    channel                     smallint not null,
    platform                    text not null default '',
    type                        text not null,
    text                        text not null default '',
    supported                   boolean not null,
    content_json                text not null default '{}',
    status                      smallint not null,
    raw_status                  text not null default '',
    sent_by_employee_id         text,
    client_message_id           text,
    failure                     text,
    created_at                  timestamptz not null,       -- MessageBird's createdDatetime, or ours for replies
    stored_at                   timestamptz not null default now()
);
-- Idempotency: a redelivered or duplicated webhook never creates a second message.
create unique index messages_by_mb_id on messages (shop_id, messagebird_message_id)
    where messagebird_message_id is not null;
-- A retried Reply call with the same client id stores one message.
create unique index messages_by_client_id on messages (conversation_id, client_message_id)
    where client_message_id is not null;
create index messages_by_conversation on messages (conversation_id, created_at desc, seq desc);
create index messages_orphans on messages (shop_id, messagebird_conversation_id)
    where conversation_id is null;

-- The customer's last received message per shop, MessageBird channel and MSISDN (or contact
-- id for visitors without a phone): the WhatsApp 24-hour window starts from it.
create table last_received (
    shop_id                text not null,
    channel_id             text not null,
    customer_key           text not null,
    channel                smallint not null,
    received_at            timestamptz not null,   -- MessageBird's createdDatetime
    messagebird_message_id text not null,
    primary key (shop_id, channel_id, customer_key)
);

-- Per-employee event numbering; events are kept so a reconnecting agent can replay.
create table employee_sequences (
    employee_id   text primary key,
    last_sequence bigint not null
);
create table employee_events (
    employee_id text not null,
    sequence    bigint not null,
    shop_id     text not null,
    event       bytea not null,             -- the EmployeeEvent, serialized
    occurred_at timestamptz not null default now(),
    primary key (employee_id, sequence)
);

-- Events (by event id) whose effect is committed; redeliveries of them are acked unchanged.
create table processed_events (
    event_id     text primary key,
    processed_at timestamptz not null default now()
);

-- The transactional outbox (shopctrl-amqp relays it).
create table outbox (
    outbox_id    bigserial primary key,
    event_id     uuid not null unique,
    exchange     text not null,
    routing_key  text not null,
    message_type text not null,
    payload      bytea not null,
    headers      jsonb not null default '[]',
    created_at   timestamptz not null default now()
);

-- Routing's local copy of the config service's data, filled from GetRoutingShop calls and
-- ConfigChanged events; read on every API call and inbound event.
create table shop_settings (
    shop_id                    text primary key,
    enabled                    boolean not null,
    assign_on_first_message    boolean not null,
    new_conversation_on_closed boolean not null,
    conversation_slots         integer not null check (conversation_slots >= 0),
    version                    bigint not null,
    refreshed_at               timestamptz not null default now()
);
create table shop_members (
    shop_id         text not null,
    employee_id     text not null,
    role            smallint not null,
    chat_permission boolean not null,
    display_name    text not null default '',
    primary key (shop_id, employee_id)
);
create index shop_members_by_employee on shop_members (employee_id);
-- What ShopCtrl reported; no row means online.
create table presence (
    employee_id text primary key,
    presence    smallint not null,
    updated_at  timestamptz not null default now()
);
