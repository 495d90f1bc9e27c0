//! Integration tests of the config service against the real PostgreSQL and RabbitMQ. Each
//! test starts its own service in-process (own database, own AMQP name prefix, port 0) and
//! calls it through real tonic clients. One test binary, so it links once.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod access;
mod events;
mod ops;
mod secrets;
mod settings;
mod support;
