-- Employee events wait here, unnumbered, from the transaction that caused them until the
-- sequencer numbers them. Numbering them inside that transaction held the employee's counter
-- row locked until commit (the WAL flush included), so every shard that had an event for the
-- same employee queued behind the others; one sequencer numbers many events per transaction.
create table employee_events_unnumbered (
    id            bigserial primary key,
    employee_id   text not null,
    shop_id       text not null,
    event         bytea not null,             -- the EmployeeEvent, serialized, sequence 0
    trace_headers jsonb not null default '[]' -- the trace context of the work that caused it
);
