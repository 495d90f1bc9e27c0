-- Why a shop's waiting conversations are not assigned: one row per shop, written after every
-- refused claim. Availability is a property of the shop, so every conversation waiting for an
-- employee shows its shop's row (falling back to its own column until the shop has one).
-- Before this table the reason was copied onto each waiting conversation, which rewrote the
-- whole queue after every refused claim and made each claim cost as much as the queue is long.
create table shop_waiting_reasons (
    shop_id    text primary key,
    reason     text not null check (reason in
                 ('slots_zero','no_permission','all_full','all_away','awaiting_handover')),
    updated_at timestamptz not null default now()
);

insert into shop_waiting_reasons (shop_id, reason)
select distinct on (shop_id) shop_id, unassigned_reason
from conversations
where state = 'waiting_for_employee' and unassigned_reason is not null
order by shop_id, waiting_since desc;
