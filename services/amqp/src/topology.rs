use lapin::{
    Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
};

/// Why connecting or declaring failed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot connect to RabbitMQ: {0}")]
    Connect(lapin::Error),
    #[error("cannot declare {what} {name}: {source}")]
    Declare {
        what: &'static str,
        name: String,
        source: lapin::Error,
    },
}

/// Connects with a connection name that shows up in the broker's connection list.
pub async fn connect(url: &str, connection_name: &str) -> Result<Connection, TopologyError> {
    let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
    Connection::connect(url, properties)
        .await
        .map_err(TopologyError::Connect)
}

/// Every exchange and queue name of the system, under an optional prefix (tests use a
/// unique prefix each, so they never share names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn name(&self, base: &str) -> String {
        format!("{}{}", self.prefix, base)
    }

    /// Direct exchange for webhooks and handovers, routing key `shard.<n>`.
    pub fn inbound_exchange(&self) -> String {
        self.name("messaging.inbound")
    }
    /// The quorum queue of one routing shard.
    pub fn inbound_shard_queue(&self, shard: u16) -> String {
        self.name(&format!("messaging.inbound.shard.{shard}"))
    }
    /// Direct exchange for flow events (routing key `flow`).
    pub fn flow_exchange(&self) -> String {
        self.name("messaging.flow")
    }
    /// Direct exchange for agent replies (`send`) and their results (`result`).
    pub fn outbound_exchange(&self) -> String {
        self.name("messaging.outbound")
    }
    /// Topic exchange for employee notifications (`employees` for batches of numbered employee
    /// events, `shop.<id>` for shop-wide notices).
    pub fn notify_exchange(&self) -> String {
        self.name("messaging.notify")
    }
    /// Fanout exchange for config-changed events.
    pub fn config_exchange(&self) -> String {
        self.name("messaging.config")
    }
    /// Direct exchange every work queue dead-letters to, routing key = the queue's short name.
    pub fn dead_letter_exchange(&self) -> String {
        self.name("messaging.dlx")
    }
    /// The dead-letter queue for one kind of work.
    pub fn dead_letter_queue(&self, kind: &str) -> String {
        self.name(&format!("messaging.dlq.{kind}"))
    }
    /// Any other name under the prefix.
    pub fn custom(&self, base: &str) -> String {
        self.name(base)
    }
}

/// Declares a durable exchange (idempotent).
pub async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
) -> Result<(), TopologyError> {
    channel
        .exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|source| TopologyError::Declare {
            what: "exchange",
            name: name.to_owned(),
            source,
        })
}

/// What a queue looks like.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub name: String,
    /// Quorum (replicated, durable) or classic. Durable work is always quorum; per-replica
    /// cache-invalidation queues are classic, exclusive and auto-delete.
    pub quorum: bool,
    /// Only one consumer receives at a time; the others stand by (keeps order per shard).
    pub single_active_consumer: bool,
    /// Exclusive auto-delete queue that lives only as long as its connection.
    pub transient: bool,
    /// Dead-letter exchange and routing key for rejected messages.
    pub dead_letter: Option<(String, String)>,
    /// Messages older than this are dead-lettered (delay tiers use it to re-route back).
    pub message_ttl_ms: Option<u32>,
    /// (exchange, routing key) pairs to bind.
    pub bindings: Vec<(String, String)>,
}

impl QueueSpec {
    /// A durable quorum work queue.
    pub fn quorum(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            quorum: true,
            single_active_consumer: false,
            transient: false,
            dead_letter: None,
            message_ttl_ms: None,
            bindings: Vec::new(),
        }
    }

    /// A per-connection queue (for fan-out to every replica).
    pub fn transient(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            quorum: false,
            single_active_consumer: false,
            transient: true,
            dead_letter: None,
            message_ttl_ms: None,
            bindings: Vec::new(),
        }
    }

    pub fn single_active(mut self) -> Self {
        self.single_active_consumer = true;
        self
    }

    pub fn dead_letter_to(mut self, exchange: impl Into<String>, key: impl Into<String>) -> Self {
        self.dead_letter = Some((exchange.into(), key.into()));
        self
    }

    pub fn ttl_ms(mut self, ttl: u32) -> Self {
        self.message_ttl_ms = Some(ttl);
        self
    }

    pub fn bind(mut self, exchange: impl Into<String>, key: impl Into<String>) -> Self {
        self.bindings.push((exchange.into(), key.into()));
        self
    }
}

/// Declares a queue and its bindings (idempotent while the arguments stay the same).
pub async fn declare_queue(channel: &Channel, spec: &QueueSpec) -> Result<(), TopologyError> {
    let mut args = FieldTable::default();
    if spec.quorum {
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("quorum".into()),
        );
    }
    if spec.single_active_consumer {
        args.insert(
            ShortString::from("x-single-active-consumer"),
            AMQPValue::Boolean(true),
        );
    }
    if let Some((exchange, key)) = &spec.dead_letter {
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(exchange.as_str().into()),
        );
        args.insert(
            ShortString::from("x-dead-letter-routing-key"),
            AMQPValue::LongString(key.as_str().into()),
        );
    }
    if let Some(ttl) = spec.message_ttl_ms {
        args.insert(
            ShortString::from("x-message-ttl"),
            AMQPValue::LongInt(i32::try_from(ttl).unwrap_or(i32::MAX)),
        );
    }
    let options = QueueDeclareOptions {
        durable: !spec.transient,
        exclusive: spec.transient,
        auto_delete: spec.transient,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(spec.name.as_str().into(), options, args)
        .await
        .map_err(|source| TopologyError::Declare {
            what: "queue",
            name: spec.name.clone(),
            source,
        })?;
    for (exchange, key) in &spec.bindings {
        channel
            .queue_bind(
                spec.name.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| TopologyError::Declare {
                what: "binding",
                name: format!("{} -> {} ({key})", exchange, spec.name),
                source,
            })?;
    }
    Ok(())
}
