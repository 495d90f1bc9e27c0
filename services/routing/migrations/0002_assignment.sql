-- Slot claims: the durable side. Redis holds only derived counters and sets (see
-- src/slots/lua/common.lua); after a loss they are rebuilt from these tables plus the open
-- assignments in `conversations`.

-- The fence between Redis data generations. Each rebuild bumps it (row lock: it waits for
-- assignment commits in flight, which read it `for share`), and an assignment commit made
-- with a claim from an older generation is refused, so nothing committed after the rebuild
-- read PostgreSQL can be missing from the rebuilt counters.
create table slot_epoch (
    id    smallint primary key check (id = 1),
    epoch bigint not null
);
insert into slot_epoch (id, epoch) values (1, 0);

-- What the claim script decides on, as routing last wrote it to Redis (filled from
-- ConfigChanged events, GetRoutingShop calls and the agent API's presence).
create table slot_shops (
    shop_id        text primary key,
    slots          integer not null check (slots >= 0),
    -- The version and fetch time of the local config copy this was last synced from.
    synced_version bigint,
    synced_refresh timestamptz,
    updated_at     timestamptz not null default now()
);

-- Employees with the Chat permission at a shop (the shop's candidates).
create table slot_candidates (
    shop_id     text not null,
    employee_id text not null,
    primary key (shop_id, employee_id)
);
create index slot_candidates_employee on slot_candidates (employee_id);

-- How an employee is named in flow events ("assigned to ...").
create table slot_display_names (
    employee_id  text primary key,
    display_name text not null
);

-- Only employees reported away or offline have a row; everyone else is present.
create table slot_away (
    employee_id text primary key,
    since       timestamptz not null default now()
);

-- Stickiness: who last served a customer at a shop.
create table slot_last_served (
    shop_id     text not null,
    customer_id text not null,
    employee_id text not null,
    served_at   timestamptz not null default now(),
    primary key (shop_id, customer_id)
);

-- Every claim and release, with the employee's open conversations across all shops and the
-- shop's slot limit at that moment: the proof that no automatic claim exceeded the limit.
--   auto      claimed on the customer's first message
--   handover  claimed on a flow's handover request
--   queue     a waiting conversation claimed when capacity appeared
--   manual    assigned or transferred through the agent API within the limit
--   forced    the same, over the limit (force = true)
--   released  taken from this employee by a transfer
--   closed    the conversation was closed
--   withdrawn handed back to the queue after the employee lost role or permission
-- open_count is the count just before the claim for claims, just after for releases.
create table assignment_log (
    assignment_id   bigserial primary key,
    conversation_id uuid not null,
    shop_id         text not null,
    employee_id     text not null,
    kind            text not null check (kind in ('auto', 'handover', 'queue', 'manual', 'forced',
                                                   'released', 'closed', 'withdrawn')),
    open_count      integer not null,
    shop_slots      integer not null,
    over_limit      boolean not null default false,
    epoch           bigint not null,
    created_at      timestamptz not null default now()
);
create index assignment_log_conversation on assignment_log (conversation_id, assignment_id);
create index assignment_log_employee on assignment_log (employee_id, assignment_id);
