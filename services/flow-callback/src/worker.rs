//! One delivery attempt per message taken from a work queue, and what happens after it:
//! done (ack), parked in a delay tier for a later attempt (publish with confirm, then ack),
//! or given up (dead-letter queue, with the last error as the reason).

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use prost::Message;
use shopctrl_amqp::{Handled, Incoming, Outgoing, PublishError, Publisher};
use shopctrl_proto::v1::{DeliveryShop, EventMeta, FlowEvent, OutboundSend, OutboundSendResult};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::{
    flow,
    messagebird::{self, ApiOutcome, Template},
    metrics::Metrics,
    retry::{RetryPolicy, parse_retry_after},
    shops::ShopCache,
    signing,
    ssrf::{SsrfPolicy, refusal_in},
    topology::{Kind, Topology},
};

/// The AMQP `type` of a send result.
const RESULT_TYPE: &str = "shopctrl.messaging.v1.OutboundSendResult";

/// Header: delivery attempts made so far.
pub const HEADER_ATTEMPTS: &str = "x-flowcb-attempts";
/// Header: Unix milliseconds before which the next attempt must not run.
pub const HEADER_NOT_BEFORE: &str = "x-flowcb-not-before-ms";
/// Header: the error of the last attempt.
pub const HEADER_LAST_ERROR: &str = "x-flowcb-last-error";

/// Headers the broker adds on dead-lettering; not carried into the next hop.
fn is_broker_header(name: &str) -> bool {
    name.starts_with("x-death")
        || name.starts_with("x-first-death")
        || name.starts_with("x-last-death")
}

/// Where a message stands in its retry schedule, from its headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryState {
    pub attempts: u32,
    pub not_before_ms: Option<i64>,
    pub last_error: Option<String>,
}

impl RetryState {
    pub fn from_headers(headers: &[(String, String)]) -> Self {
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        Self {
            attempts: get(HEADER_ATTEMPTS)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            not_before_ms: get(HEADER_NOT_BEFORE).and_then(|v| v.parse().ok()),
            last_error: get(HEADER_LAST_ERROR).map(str::to_owned),
        }
    }

    fn apply(&self, headers: &[(String, String)]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = headers
            .iter()
            .filter(|(k, _)| {
                !is_broker_header(k)
                    && !k.eq_ignore_ascii_case(HEADER_ATTEMPTS)
                    && !k.eq_ignore_ascii_case(HEADER_NOT_BEFORE)
                    && !k.eq_ignore_ascii_case(HEADER_LAST_ERROR)
            })
            .cloned()
            .collect();
        out.push((HEADER_ATTEMPTS.into(), self.attempts.to_string()));
        if let Some(at) = self.not_before_ms {
            out.push((HEADER_NOT_BEFORE.into(), at.to_string()));
        }
        if let Some(error) = &self.last_error {
            out.push((HEADER_LAST_ERROR.into(), error.clone()));
        }
        out
    }
}

/// What one attempt came to.
enum Attempt {
    /// Delivered, or finished for good without needing the dead-letter queue.
    Done,
    /// Failed in a way that may work later.
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Can never work: dead-letter now with this reason.
    Refuse(String),
    /// Infrastructure trouble on our side: pause, keep the message.
    Pause(String),
}

/// The event ids finished recently, so a redelivery to this replica is not sent twice.
struct RecentIds {
    set: HashSet<String>,
    order: VecDeque<String>,
    capacity: usize,
}

impl RecentIds {
    fn new(capacity: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    fn insert(&mut self, id: &str) {
        if id.is_empty() || !self.set.insert(id.to_owned()) {
            return;
        }
        self.order.push_back(id.to_owned());
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// Everything an attempt needs.
pub struct Worker {
    pub(crate) topology: Topology,
    pub(crate) policy: RetryPolicy,
    pub(crate) publisher: Publisher,
    pub(crate) shops: ShopCache,
    pub(crate) webhook_client: reqwest::Client,
    pub(crate) api_client: reqwest::Client,
    pub(crate) api_base: Url,
    pub(crate) ssrf: Arc<SsrfPolicy>,
    pub(crate) flow_max_age: Duration,
    pub(crate) http_timeout: Duration,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: CancellationToken,
    recent: Mutex<RecentIds>,
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(cause) = current {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        current = cause.source();
    }
    text
}

fn now_ms(now: DateTime<Utc>) -> i64 {
    now.timestamp_millis()
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        topology: Topology,
        policy: RetryPolicy,
        publisher: Publisher,
        shops: ShopCache,
        webhook_client: reqwest::Client,
        api_client: reqwest::Client,
        api_base: Url,
        ssrf: Arc<SsrfPolicy>,
        flow_max_age: Duration,
        http_timeout: Duration,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            topology,
            policy,
            publisher,
            shops,
            webhook_client,
            api_client,
            api_base,
            ssrf,
            flow_max_age,
            http_timeout,
            metrics,
            shutdown,
            recent: Mutex::new(RecentIds::new(10_000)),
        }
    }

    fn seen(&self, id: &str) -> bool {
        self.recent.lock().is_ok_and(|r| r.set.contains(id))
    }

    fn remember(&self, id: &str) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.insert(id);
        }
    }

    /// Handles one message of `kind` from its work queue.
    pub async fn handle(&self, kind: Kind, incoming: Incoming) -> Handled {
        let state = RetryState::from_headers(&incoming.headers);
        let now = Utc::now();
        if let Some(not_before) = state.not_before_ms {
            let remaining =
                Duration::from_millis(u64::try_from(not_before - now_ms(now)).unwrap_or(0));
            if !self.policy.is_due(remaining) {
                // Back from a tier early (the wanted pause is no tier's TTL): wait some more.
                return self.park(kind, &incoming, &state, remaining).await;
            }
        }
        match kind {
            Kind::Flow => self.handle_flow(incoming, state).await,
            Kind::Send => self.handle_send(incoming, state).await,
        }
    }

    /// Publishes the message (with its retry state) to the tier that fits `wait`.
    async fn park(
        &self,
        kind: Kind,
        incoming: &Incoming,
        state: &RetryState,
        wait: Duration,
    ) -> Handled {
        let tier = self.policy.tier_for(wait);
        let queue = self.topology.tier_queue(kind, tier);
        let headers = state.apply(&incoming.headers);
        let message_type = incoming.message_type.clone().unwrap_or_default();
        let message_id = incoming.message_id.clone().unwrap_or_default();
        let published = self
            .publisher
            .publish(Outgoing {
                exchange: "",
                routing_key: &queue,
                message_type: &message_type,
                message_id: &message_id,
                payload: &incoming.data,
                headers: &headers,
                mandatory: true,
            })
            .await;
        match published {
            Ok(()) => {
                tracing::debug!(%queue, ?wait, attempts = state.attempts, "parked for a later attempt");
                Handled::Ack
            }
            Err(error) => {
                Handled::Transient(format!("cannot park the message in {queue}: {error}"))
            }
        }
    }

    /// After a failed attempt: park for the next one, or give up.
    async fn after_failure(
        &self,
        kind: Kind,
        incoming: &Incoming,
        state: &RetryState,
        error: String,
        retry_after: Option<Duration>,
    ) -> Result<Handled, String> {
        let attempts = state.attempts.saturating_add(1);
        match self
            .policy
            .delay_after(attempts, retry_after, rand::random::<f64>())
        {
            Some(delay) => {
                let next = RetryState {
                    attempts,
                    not_before_ms: Some(
                        now_ms(Utc::now())
                            .saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
                    ),
                    last_error: Some(error.clone()),
                };
                tracing::warn!(kind = kind.label(), attempts, ?delay, %error, "delivery failed; retrying later");
                let handled = self.park(kind, incoming, &next, delay).await;
                if handled == Handled::Ack {
                    self.metrics.outcome(kind.label(), "retried");
                }
                Ok(handled)
            }
            None => Err(format!("gave up after {attempts} attempts: {error}")),
        }
    }

    fn give_up(&self, kind: Kind, reason: String, outcome: &'static str) -> Handled {
        tracing::error!(kind = kind.label(), %reason, "dead-lettering");
        self.metrics.outcome(kind.label(), outcome);
        self.metrics.dead_lettered(kind.label());
        Handled::Poison(reason)
    }

    async fn handle_flow(&self, incoming: Incoming, state: RetryState) -> Handled {
        let kind = Kind::Flow;
        let event = match FlowEvent::decode(incoming.data.as_slice()) {
            Ok(event) => event,
            Err(error) => {
                return self.give_up(kind, format!("cannot decode FlowEvent: {error}"), "refused");
            }
        };
        let event_id = event
            .meta
            .as_ref()
            .map(|m| m.event_id.clone())
            .unwrap_or_default();
        if self.seen(&event_id) {
            self.metrics.outcome(kind.label(), "duplicate");
            return Handled::Ack;
        }
        match self.attempt_flow(&event, &event_id).await {
            Attempt::Done => {
                self.remember(&event_id);
                Handled::Ack
            }
            Attempt::Pause(error) => Handled::Transient(error),
            Attempt::Refuse(reason) => self.give_up(kind, reason, "refused"),
            Attempt::Retry { error, retry_after } => {
                match self
                    .after_failure(kind, &incoming, &state, error, retry_after)
                    .await
                {
                    Ok(handled) => handled,
                    Err(reason) => self.give_up(kind, reason, "gave_up"),
                }
            }
        }
    }

    async fn attempt_flow(&self, event: &FlowEvent, event_id: &str) -> Attempt {
        let kind = Kind::Flow.label();
        let now = Utc::now();
        if let Some(at) = flow::occurred_at(event)
            && (now - at).to_std().is_ok_and(|age| age > self.flow_max_age)
        {
            tracing::info!(%event_id, occurred_at = %at, "availability event too old; dropped");
            self.metrics.outcome(kind, "stale");
            return Attempt::Done;
        }
        let payload = match flow::payload(event) {
            Ok(payload) => payload,
            Err(error) => return Attempt::Refuse(error.to_string()),
        };
        let shop = match self.shops.get(&event.shop_id).await {
            Ok(Some(shop)) => shop,
            Ok(None) => return Attempt::Refuse(format!("unknown shop {}", event.shop_id)),
            Err(error) => return Attempt::Pause(error.to_string()),
        };
        if !shop.enabled || shop.event_webhook_url.trim().is_empty() {
            // No flow listens: nothing to deliver, and nothing wrong with the event.
            self.metrics.outcome(kind, "skipped");
            return Attempt::Done;
        }
        if shop.callback_secret.is_empty() {
            return Attempt::Refuse("the shop has no callback secret to sign with".into());
        }
        let url = match self.ssrf.check_url(shop.event_webhook_url.trim()) {
            Ok(url) => url,
            Err(error) => return Attempt::Refuse(format!("refused by the SSRF guard: {error}")),
        };
        let body = match serde_json::to_vec(&payload) {
            Ok(body) => body,
            Err(error) => return Attempt::Refuse(format!("cannot encode the payload: {error}")),
        };
        let timestamp = now.timestamp();
        let signature = signing::sign(&shop.callback_secret, event_id, timestamp, &body);
        let mut request = self
            .webhook_client
            .post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(signing::HEADER_IDEMPOTENCY_KEY, event_id)
            .header(signing::HEADER_EVENT_ID, event_id)
            .header(signing::HEADER_TIMESTAMP, timestamp.to_string())
            .header(signing::HEADER_SIGNATURE, signature)
            .body(body);
        for (name, value) in shopctrl_telemetry::inject_current() {
            request = request.header(name, value);
        }
        let started = Instant::now();
        let result = request.send().await;
        self.metrics.attempt(kind, started.elapsed().as_secs_f64());
        match result {
            Ok(response) if response.status().is_success() => {
                tracing::info!(%event_id, status = response.status().as_u16(), "availability event delivered");
                self.metrics.outcome(kind, "delivered");
                Attempt::Done
            }
            Ok(response) => Attempt::Retry {
                error: format!(
                    "the event webhook answered HTTP {}",
                    response.status().as_u16()
                ),
                retry_after: retry_after_of(&response, now),
            },
            Err(error) => self.transport_failure(&error),
        }
    }

    fn transport_failure(&self, error: &reqwest::Error) -> Attempt {
        if let Some(refusal) = refusal_in(error) {
            return Attempt::Refuse(format!("refused by the SSRF guard: {refusal}"));
        }
        let error_text = if error.is_timeout() {
            format!("no answer within {:?}", self.http_timeout)
        } else {
            error_chain(error)
        };
        Attempt::Retry {
            error: error_text,
            retry_after: None,
        }
    }

    async fn handle_send(&self, incoming: Incoming, state: RetryState) -> Handled {
        let kind = Kind::Send;
        let send = match OutboundSend::decode(incoming.data.as_slice()) {
            Ok(send) => send,
            Err(error) => {
                return self.give_up(
                    kind,
                    format!("cannot decode OutboundSend: {error}"),
                    "refused",
                );
            }
        };
        let event_id = send
            .meta
            .as_ref()
            .map(|m| m.event_id.clone())
            .filter(|id| !id.is_empty())
            .or_else(|| incoming.message_id.clone())
            .unwrap_or_default();
        if self.seen(&event_id) {
            self.metrics.outcome(kind.label(), "duplicate");
            return Handled::Ack;
        }
        let outcome = self.attempt_send(&send).await;
        let result = match outcome {
            SendOutcome::Pause(error) => return Handled::Transient(error),
            SendOutcome::Finished(result) => result,
            SendOutcome::Retry { error, retry_after } => {
                match self
                    .after_failure(kind, &incoming, &state, error, retry_after)
                    .await
                {
                    Ok(handled) => return handled,
                    Err(reason) => {
                        // The agent learns about it before the message goes to the DLQ.
                        let result = failed_result(&send, "", 0, &reason);
                        if let Err(handled) = self.publish_result(&result).await {
                            return handled;
                        }
                        self.remember(&event_id);
                        return self.give_up(kind, reason, "gave_up");
                    }
                }
            }
        };
        if let Err(handled) = self.publish_result(&result).await {
            return handled;
        }
        self.metrics.outcome(
            kind.label(),
            if result.accepted {
                "delivered"
            } else {
                "failed"
            },
        );
        self.remember(&event_id);
        Handled::Ack
    }

    async fn attempt_send(&self, send: &OutboundSend) -> SendOutcome {
        let shop = match self.shops.get(&send.shop_id).await {
            Ok(Some(shop)) => shop,
            Ok(None) => {
                return SendOutcome::Finished(failed_result(
                    send,
                    "",
                    0,
                    &format!("unknown shop {}", send.shop_id),
                ));
            }
            Err(error) => return SendOutcome::Pause(error.to_string()),
        };
        if !shop.enabled {
            return SendOutcome::Finished(failed_result(
                send,
                "",
                0,
                "messaging is disabled for this shop",
            ));
        }
        if shop.access_key.is_empty() {
            return SendOutcome::Finished(failed_result(
                send,
                "",
                0,
                "the shop has no MessageBird access key",
            ));
        }
        let now = Utc::now();
        let form = messagebird::choose_form(send, now);
        let template = template_of(&shop);
        let (path, body) = match messagebird::request(send, form, template.as_ref()) {
            Ok(built) => built,
            Err(error) => {
                return SendOutcome::Finished(failed_result(
                    send,
                    form.as_str(),
                    0,
                    &error.to_string(),
                ));
            }
        };
        let url = match self.api_base.join(&path) {
            Ok(url) => url,
            Err(error) => {
                return SendOutcome::Finished(failed_result(
                    send,
                    form.as_str(),
                    0,
                    &format!("cannot build the API URL: {error}"),
                ));
            }
        };
        let mut request = self
            .api_client
            .post(url)
            .header(
                http::header::AUTHORIZATION,
                format!("AccessKey {}", shop.access_key),
            )
            .header(http::header::ACCEPT, "application/json")
            .json(&body);
        for (name, value) in shopctrl_telemetry::inject_current() {
            request = request.header(name, value);
        }
        let started = Instant::now();
        let response = request.send().await;
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                self.metrics
                    .attempt(Kind::Send.label(), started.elapsed().as_secs_f64());
                return match self.transport_failure(&error) {
                    Attempt::Retry { error, retry_after } => {
                        SendOutcome::Retry { error, retry_after }
                    }
                    _ => SendOutcome::Retry {
                        error: error_chain(&error),
                        retry_after: None,
                    },
                };
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = match response.bytes().await {
            Ok(bytes) => bytes,
            Err(error) => {
                self.metrics
                    .attempt(Kind::Send.label(), started.elapsed().as_secs_f64());
                return SendOutcome::Retry {
                    error: format!("reading MessageBird's answer: {}", error_chain(&error)),
                    retry_after: None,
                };
            }
        };
        self.metrics
            .attempt(Kind::Send.label(), started.elapsed().as_secs_f64());
        match messagebird::classify(status, retry_after.as_deref(), &bytes, now) {
            ApiOutcome::Accepted {
                messagebird_message_id,
            } => {
                tracing::info!(message_id = %send.message_id, sent_as = form.as_str(), "reply accepted by MessageBird");
                SendOutcome::Finished(OutboundSendResult {
                    meta: Some(meta()),
                    shop_id: send.shop_id.clone(),
                    conversation_id: send.conversation_id.clone(),
                    message_id: send.message_id.clone(),
                    accepted: true,
                    messagebird_message_id,
                    sent_as: form.as_str().to_owned(),
                    error_code: 0,
                    error_description: String::new(),
                })
            }
            ApiOutcome::Rejected { code, description } => {
                tracing::warn!(message_id = %send.message_id, code, %description, "reply refused by MessageBird");
                SendOutcome::Finished(failed_result(send, form.as_str(), code, &description))
            }
            ApiOutcome::Retry { error, retry_after } => SendOutcome::Retry { error, retry_after },
        }
    }

    /// Publishes a result with confirm, pausing and trying again (never re-sending the reply)
    /// until the broker confirms; on shutdown the send message is given back.
    async fn publish_result(&self, result: &OutboundSendResult) -> Result<(), Handled> {
        let payload = result.encode_to_vec();
        let message_type = RESULT_TYPE;
        let event_id = result
            .meta
            .as_ref()
            .map(|m| m.event_id.clone())
            .unwrap_or_default();
        let exchange = self.topology.names().outbound_exchange();
        let mut backoff = Duration::from_millis(100);
        loop {
            let headers = shopctrl_telemetry::inject_current();
            let published: Result<(), PublishError> = self
                .publisher
                .publish(Outgoing {
                    exchange: &exchange,
                    routing_key: "result",
                    message_type,
                    message_id: &event_id,
                    payload: &payload,
                    headers: &headers,
                    mandatory: true,
                })
                .await;
            match published {
                Ok(()) => return Ok(()),
                Err(error) => {
                    tracing::warn!(%error, ?backoff, "cannot publish the send result; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => {
                            return Err(Handled::Transient(format!("result not published: {error}")));
                        }
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

enum SendOutcome {
    Finished(OutboundSendResult),
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    Pause(String),
}

fn retry_after_of(response: &reqwest::Response, now: DateTime<Utc>) -> Option<Duration> {
    response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now))
}

fn template_of(shop: &DeliveryShop) -> Option<Template> {
    (!shop.whatsapp_template_name.is_empty() && !shop.whatsapp_template_namespace.is_empty()).then(
        || Template {
            namespace: shop.whatsapp_template_namespace.clone(),
            name: shop.whatsapp_template_name.clone(),
            language: shop.whatsapp_template_language.clone(),
        },
    )
}

fn meta() -> EventMeta {
    let now = Utc::now();
    EventMeta {
        event_id: uuid::Uuid::now_v7().to_string(),
        occurred_at: Some(prost_types::Timestamp {
            seconds: now.timestamp(),
            nanos: i32::try_from(now.timestamp_subsec_nanos()).unwrap_or(0),
        }),
        producer: "flow-callback".into(),
    }
}

fn failed_result(
    send: &OutboundSend,
    sent_as: &str,
    code: i32,
    description: &str,
) -> OutboundSendResult {
    OutboundSendResult {
        meta: Some(meta()),
        shop_id: send.shop_id.clone(),
        conversation_id: send.conversation_id.clone(),
        message_id: send.message_id.clone(),
        accepted: false,
        messagebird_message_id: String::new(),
        sent_as: sent_as.to_owned(),
        error_code: code,
        error_description: description.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_state_round_trips_through_headers() {
        let state = RetryState {
            attempts: 3,
            not_before_ms: Some(1234),
            last_error: Some("HTTP 503".into()),
        };
        let headers = state.apply(&[
            ("traceparent".into(), "00-abc".into()),
            (HEADER_ATTEMPTS.into(), "2".into()),
            ("x-first-death-queue".into(), "q".into()),
        ]);
        assert_eq!(RetryState::from_headers(&headers), state);
        assert!(headers.iter().any(|(k, _)| k == "traceparent"));
        assert!(!headers.iter().any(|(k, _)| k == "x-first-death-queue"));
        assert_eq!(RetryState::from_headers(&[]), RetryState::default());
    }

    #[test]
    fn recent_ids_are_bounded() {
        let mut recent = RecentIds::new(2);
        recent.insert("a");
        recent.insert("b");
        recent.insert("c");
        assert!(!recent.set.contains("a"));
        assert!(recent.set.contains("c"));
        assert_eq!(recent.order.len(), 2);
    }
}
