-- no-transaction
-- `conversations_queue` serves everything this one did.
drop index concurrently if exists conversations_waiting;
