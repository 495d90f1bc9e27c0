-- no-transaction
-- The queue's whole order (oldest first, ties by id) in one index: a queue position is then
-- counted, and a shop's queue ranked, from the index alone, where `conversations_waiting`
-- (shop, waiting_since) sent every entry ahead to the table to compare ids (about 3 ms for
-- a position behind 3,000 waiting conversations). Built concurrently, so a large table keeps
-- taking writes meanwhile; it replaces `conversations_waiting` (next migration).
create index concurrently if not exists conversations_queue
    on conversations (shop_id, waiting_since, conversation_id)
    where state = 'waiting_for_employee';
