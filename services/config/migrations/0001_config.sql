-- The config service's tables. They live in the `config` schema: the service creates the
-- schema and runs these migrations with `search_path = config`, so names stay unqualified.

-- One row per shop that has saved settings. Secrets are not here: see shop_secret.
create table shop_settings (
    shop_id                     text primary key,
    workspace_id                text not null default '',
    assign_on_first_message     boolean not null default true,
    event_webhook_url           text not null default '',
    whatsapp_template_name      text not null default '',
    whatsapp_template_namespace text not null default '',
    whatsapp_template_language  text not null default 'en',
    new_conversation_on_closed  boolean not null default false,
    conversation_slots          integer not null default 5
        check (conversation_slots between 0 and 1000),
    legacy_signature_enabled    boolean not null default false,
    -- Optimistic concurrency: every change of the row (or of its secrets) adds one.
    version                     bigint not null default 1 check (version >= 1),
    created_at                  timestamptz not null default now(),
    updated_at                  timestamptz not null default now()
);

-- Secrets, AES-256-GCM encrypted: `ciphertext` is the 12-byte nonce followed by the sealed
-- value and its tag; `key_id` names the key that sealed it, so keys can rotate. The
-- associated data binds each ciphertext to its shop and name, so rows cannot be swapped.
create table shop_secret (
    shop_id     text not null references shop_settings (shop_id) on delete cascade,
    name        text not null
        check (name in ('access_key', 'signing_key', 'handover_secret', 'callback_secret')),
    key_id      text not null,
    ciphertext  bytea not null,
    updated_at  timestamptz not null default now(),
    primary key (shop_id, name)
);

-- An employee's role at a shop, as ShopCtrl reports it (1 shop owner admin, 2 shop admin,
-- 3 any other role). Roles exist independently of settings.
create table employee_role (
    shop_id      text not null,
    employee_id  text not null,
    role         smallint not null check (role in (1, 2, 3)),
    display_name text not null default '',
    updated_at   timestamptz not null default now(),
    primary key (shop_id, employee_id)
);

-- The Chat permission. The foreign key is the rule "only an employee with a role at the shop
-- can chat there": a permission without a role cannot exist, and a role cannot be deleted
-- while its permission remains (withdrawal deletes the permission first, same transaction).
create table chat_permission (
    shop_id     text not null,
    employee_id text not null,
    granted_at  timestamptz not null default now(),
    primary key (shop_id, employee_id),
    foreign key (shop_id, employee_id) references employee_role (shop_id, employee_id)
        on delete restrict
);

-- The transactional outbox relayed to RabbitMQ by shopctrl-amqp's OutboxRelay.
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
