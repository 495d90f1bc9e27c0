-- The queue's whole order (oldest first, ties by id) in one index: a queue position is then
-- counted, and a shop's queue ranked, from the index alone, where `conversations_waiting`
-- (shop, waiting_since) sent every entry ahead to the table to compare ids (about 1 ms for
-- a position behind 3,000 waiting conversations). It serves everything the old one did.
--
-- Not built `concurrently`: that waits for every transaction holding a snapshot, including
-- another service's migrator waiting for the migration lock this one holds, a deadlock. A
-- plain build holds writes to `conversations` back while it runs (it reads the table once and
-- indexes only the waiting conversations), and it is one transaction with the drop, so it
-- either happens whole or not at all.
create index conversations_queue
    on conversations (shop_id, waiting_since, conversation_id)
    where state = 'waiting_for_employee';
drop index conversations_waiting;
