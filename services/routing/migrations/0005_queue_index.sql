-- no-transaction
-- The queue's whole order (oldest first, ties by id) in one index: a queue position is then
-- counted, and a shop's queue ranked, from the index alone, where `conversations_waiting`
-- (shop, waiting_since) sent every entry ahead to the table to compare ids (about 1 ms for
-- a position behind 3,000 waiting conversations). Built concurrently, so a large table keeps
-- taking writes meanwhile; it replaces `conversations_waiting` (next migration). No `if not
-- exists`: a build that was interrupted leaves an invalid index behind, and the next attempt
-- must fail on it (the operations guide says to drop it) instead of carrying on without it.
create index concurrently conversations_queue
    on conversations (shop_id, waiting_since, conversation_id)
    where state = 'waiting_for_employee';
