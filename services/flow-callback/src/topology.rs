//! The queues flow-callback owns: one quorum work queue per kind of work, its delay-tier
//! queues, and its dead-letter queue.
//!
//! ```text
//! messaging.flow (direct) --flow--> messaging.flow-callback.flow ----------+
//! messaging.outbound (direct) --send--> messaging.flow-callback.send ------+--> consumers
//!   consumer, after a failed attempt --> messaging.flow-callback.<kind>.delay.<ttl>ms
//!     (x-message-ttl = ttl, dead-letters through the default exchange back to the work queue)
//!   consumer, giving up --> messaging.dlx --flow-callback.<kind>--> messaging.dlq.flow-callback.<kind>
//! ```
//!
//! Delay tiers are durable classic queues with a queue-wide TTL that dead-letter back to the work
//! queue: the long-standing RabbitMQ delay pattern. Quorum tiers with at-least-once
//! dead-lettering were tried and wedged RabbitMQ 3.10 under parallel test load (the node stopped
//! answering and hung again while recovering those queues), so they are not used. A tier's name carries its
//! TTL, so changing `RETRY_DELAY_TIERS` declares new queues instead of clashing with the old
//! ones' arguments.

use std::time::Duration;

use lapin::{
    Channel, ExchangeKind,
    options::QueueDeclareOptions,
    types::{AMQPValue, FieldTable, ShortString},
};
use shopctrl_amqp::{Names, QueueSpec, TopologyError, declare_exchange, declare_queue};

/// The two kinds of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Availability events to a flow's webhook.
    Flow,
    /// Agent replies to the Conversations API.
    Send,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Flow, Kind::Send];

    /// The metrics label and queue-name part.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Flow => "flow",
            Kind::Send => "send",
        }
    }

    /// The dead-letter kind (`Names::dead_letter_queue`) and its routing key on the DLX.
    pub fn dead_letter_kind(self) -> &'static str {
        match self {
            Kind::Flow => "flow-callback.flow",
            Kind::Send => "flow-callback.send",
        }
    }
}

/// Names and declaration of everything flow-callback consumes from.
#[derive(Debug, Clone)]
pub struct Topology {
    names: Names,
    tiers: Vec<Duration>,
}

impl Topology {
    pub fn new(names: Names, tiers: &[Duration]) -> Self {
        Self {
            names,
            tiers: tiers.to_vec(),
        }
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Where the kind's messages are published by their producers: (exchange, routing key).
    pub fn source(&self, kind: Kind) -> (String, &'static str) {
        match kind {
            Kind::Flow => (self.names.flow_exchange(), "flow"),
            Kind::Send => (self.names.outbound_exchange(), "send"),
        }
    }

    pub fn work_queue(&self, kind: Kind) -> String {
        self.names
            .custom(&format!("messaging.flow-callback.{}", kind.label()))
    }

    pub fn tier_queue(&self, kind: Kind, tier: Duration) -> String {
        self.names.custom(&format!(
            "messaging.flow-callback.{}.delay.{}ms",
            kind.label(),
            tier.as_millis()
        ))
    }

    pub fn dead_letter_queue(&self, kind: Kind) -> String {
        self.names.dead_letter_queue(kind.dead_letter_kind())
    }

    /// Every queue [`Topology::declare`] creates (tests delete them afterwards).
    pub fn queue_names(&self) -> Vec<String> {
        let mut all = Vec::new();
        for kind in Kind::ALL {
            all.push(self.work_queue(kind));
            all.push(self.dead_letter_queue(kind));
            for tier in &self.tiers {
                all.push(self.tier_queue(kind, *tier));
            }
        }
        all
    }

    /// Declares the exchanges (idempotently, as their producers do), the work queues, the
    /// delay tiers and the dead-letter queues.
    pub async fn declare(&self, channel: &Channel) -> Result<(), TopologyError> {
        declare_exchange(channel, &self.names.flow_exchange(), ExchangeKind::Direct).await?;
        declare_exchange(
            channel,
            &self.names.outbound_exchange(),
            ExchangeKind::Direct,
        )
        .await?;
        declare_exchange(
            channel,
            &self.names.dead_letter_exchange(),
            ExchangeKind::Direct,
        )
        .await?;
        for kind in Kind::ALL {
            let (exchange, key) = self.source(kind);
            declare_queue(
                channel,
                &QueueSpec::quorum(self.work_queue(kind)).bind(exchange, key),
            )
            .await?;
            declare_queue(
                channel,
                &QueueSpec::quorum(self.dead_letter_queue(kind))
                    .bind(self.names.dead_letter_exchange(), kind.dead_letter_kind()),
            )
            .await?;
            for tier in &self.tiers {
                self.declare_tier(channel, kind, *tier).await?;
            }
        }
        Ok(())
    }

    async fn declare_tier(
        &self,
        channel: &Channel,
        kind: Kind,
        tier: Duration,
    ) -> Result<(), TopologyError> {
        let name = self.tier_queue(kind, tier);
        let work_queue = self.work_queue(kind);
        let ttl = i32::try_from(tier.as_millis()).unwrap_or(i32::MAX);
        let entries = [
            ("x-queue-type", AMQPValue::LongString("classic".into())),
            ("x-message-ttl", AMQPValue::LongInt(ttl)),
            // The default exchange routes by queue name: back to this kind's work queue.
            ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString(work_queue.as_str().into()),
            ),
        ];
        let mut args = FieldTable::default();
        for (key, value) in entries {
            args.insert(ShortString::from(key), value);
        }
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .map(|_| ())
            .map_err(|source| TopologyError::Declare {
                what: "queue",
                name,
                source,
            })
    }
}
