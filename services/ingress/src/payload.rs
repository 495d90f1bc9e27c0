//! Lenient parsing of MessageBird Conversations webhook bodies (PROTOCOL.md §2, §5.4) into the
//! protobuf inbound event. Lenient means: `msisdn` as number, string or null; `contact`
//! optional; unknown message types and platforms passed through as sent; RFC 3339 timestamps
//! with 0–9 fractional digits; unknown fields ignored. Strict only where routing cannot work
//! without it: an event type, a conversation id, and a message id for `message.*` events.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use shopctrl_proto::v1::{Channel, Direction, InboundContact, InboundMessage, InboundWebhookEvent};

/// Why a body is not a usable webhook (answered 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("body is not a JSON object: {0}")]
    NotJson(String),
    #[error(
        "this is a Bird Channels API payload ({{service, event, payload}}); only Conversations API webhooks are accepted"
    )]
    ForeignFormat,
    #[error("field `type` is missing")]
    MissingType,
    #[error("no conversation id (conversation.id or message.conversationId)")]
    MissingConversation,
    #[error("message event without message.id")]
    MissingMessageId,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Body {
    #[serde(rename = "type")]
    kind: Option<String>,
    contact: Option<Contact>,
    conversation: Option<Conversation>,
    message: Option<Message>,
    // Markers of the Bird Channels format.
    service: Option<serde_json::Value>,
    event: Option<serde_json::Value>,
    payload: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Contact {
    id: Option<String>,
    msisdn: Option<Msisdn>,
    display_name: Option<String>,
    first_name: Option<String>,
    last_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Msisdn {
    Number(u64),
    Text(String),
    // Floats, objects: not a phone number; ignored rather than refused.
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Conversation {
    id: Option<String>,
    status: Option<String>,
    last_used_platform_id: Option<String>,
    last_used_channel_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Message {
    id: Option<String>,
    conversation_id: Option<String>,
    platform: Option<String>,
    channel_id: Option<String>,
    to: Option<String>,
    from: Option<String>,
    direction: Option<String>,
    status: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    content: Option<serde_json::Value>,
    created_datetime: Option<String>,
    updated_datetime: Option<String>,
}

/// A parsed webhook: the event (without meta, shop, scheme, received time and raw body, which
/// the server fills in) and what the server needs to publish it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedWebhook {
    pub event: InboundWebhookEvent,
    /// The AMQP message id and event id: the MessageBird message id for `message.created`,
    /// message id + `:` + status for `message.updated` (so status progressions are not taken
    /// for duplicates), otherwise `sha256:` + digest of the body.
    pub event_id: String,
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

/// MessageBird's RFC 3339 timestamps; `0001-01-01T00:00:00Z` (unset) and garbage give `None`.
pub fn parse_timestamp(raw: Option<&str>) -> Option<prost_types::Timestamp> {
    let parsed = chrono::DateTime::parse_from_rfc3339(raw?.trim()).ok()?;
    let seconds = parsed.timestamp();
    if seconds <= -62_135_596_800 {
        return None;
    }
    Some(prost_types::Timestamp {
        seconds,
        nanos: i32::try_from(parsed.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

/// Digits-only MSISDN or empty.
fn msisdn_digits(raw: Option<Msisdn>) -> String {
    let text = match raw {
        Some(Msisdn::Number(n)) => n.to_string(),
        Some(Msisdn::Text(s)) => s,
        Some(Msisdn::Other(_)) | None => return String::new(),
    };
    shopctrl_domain::normalize_msisdn(&text).unwrap_or_default()
}

/// Our channel for MessageBird's platform name.
pub fn channel_for_platform(platform: &str) -> Channel {
    match platform.to_ascii_lowercase().as_str() {
        "" => Channel::Unspecified,
        "whatsapp" | "whatsapp_sandbox" => Channel::Whatsapp,
        // MessageBird's web widget platform id is unconfirmed; these are the candidates.
        "livechat" | "live_chat" | "web" | "webchat" | "widget" | "omnichannel_widget" => {
            Channel::WebWidget
        }
        _ => Channel::Other,
    }
}

/// The text of the message types that carry text, and whether the type is supported.
pub fn extract_text(kind: &str, content: Option<&serde_json::Value>) -> (String, bool) {
    let str_at = |path: &[&str]| -> Option<String> {
        let mut node = content?;
        for key in path {
            node = node.get(key)?;
        }
        node.as_str().map(str::to_owned)
    };
    let text = match kind {
        "text" => str_at(&["text"]),
        "whatsappText" => str_at(&["whatsappText", "text", "body"]),
        "interactive" => str_at(&["interactive", "reply", "text"])
            .or_else(|| str_at(&["interactive", "button_reply", "title"]))
            .or_else(|| str_at(&["interactive", "list_reply", "title"])),
        _ => None,
    };
    match text {
        Some(text) => (text, true),
        None => (String::new(), false),
    }
}

fn body_digest(body: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(body)))
}

/// Parses a Conversations API webhook body.
pub fn parse_webhook(body: &[u8]) -> Result<ParsedWebhook, PayloadError> {
    // serde would also read a struct from a JSON array; a webhook is always an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(PayloadError::NotJson("expected a JSON object".into()));
    }
    let parsed: Body = serde_json::from_slice(body).map_err(|e| {
        // serde's message names a position, never the content.
        PayloadError::NotJson(e.to_string())
    })?;
    if parsed.kind.is_none()
        && parsed.service.is_some()
        && parsed.event.is_some()
        && parsed.payload.is_some()
    {
        return Err(PayloadError::ForeignFormat);
    }
    let webhook_type = non_empty(parsed.kind).ok_or(PayloadError::MissingType)?;
    let conversation = parsed.conversation.unwrap_or_default();
    let message = parsed.message;

    let conversation_id = non_empty(conversation.id)
        .or_else(|| {
            message
                .as_ref()
                .and_then(|m| non_empty(m.conversation_id.clone()))
        })
        .ok_or(PayloadError::MissingConversation)?;

    let contact_display;
    let mut contact = match parsed.contact {
        Some(c) => {
            contact_display = non_empty(c.display_name).unwrap_or_else(|| {
                let full = format!(
                    "{} {}",
                    c.first_name.unwrap_or_default().trim(),
                    c.last_name.unwrap_or_default().trim()
                );
                full.trim().to_owned()
            });
            Some(InboundContact {
                messagebird_contact_id: c.id.unwrap_or_default(),
                msisdn: msisdn_digits(c.msisdn),
                display_name: contact_display,
            })
        }
        None => None,
    };

    let inbound_message = match message {
        Some(m) => {
            let id = non_empty(m.id).ok_or(PayloadError::MissingMessageId)?;
            let platform = non_empty(m.platform)
                .or_else(|| non_empty(conversation.last_used_platform_id.clone()))
                .unwrap_or_default();
            let kind = m.kind.unwrap_or_default();
            let (text, supported) = extract_text(&kind, m.content.as_ref());
            let direction = match m.direction.as_deref() {
                Some("received") => Direction::Received,
                Some("sent") => Direction::Sent,
                _ => Direction::Unspecified,
            };
            let raw_status = m.status.unwrap_or_default();
            let from = m.from.unwrap_or_default();
            // Without a contact object, a customer's WhatsApp number is the sender.
            if direction == Direction::Received
                && contact.as_ref().is_none_or(|c| c.msisdn.is_empty())
                && channel_for_platform(&platform) == Channel::Whatsapp
                && let Ok(digits) = shopctrl_domain::normalize_msisdn(&from)
            {
                contact.get_or_insert_with(InboundContact::default).msisdn = digits;
            }
            Some(InboundMessage {
                messagebird_message_id: id,
                direction: direction as i32,
                channel: channel_for_platform(&platform) as i32,
                platform,
                channel_id: non_empty(m.channel_id)
                    .or_else(|| non_empty(conversation.last_used_channel_id.clone()))
                    .unwrap_or_default(),
                r#type: kind,
                text,
                supported,
                content_json: m.content.map(|c| c.to_string()).unwrap_or_default(),
                status: shopctrl_domain::message_status_from_messagebird(&raw_status) as i32,
                raw_status,
                created_at: parse_timestamp(m.created_datetime.as_deref()),
                updated_at: parse_timestamp(m.updated_datetime.as_deref()),
                from,
                to: m.to.unwrap_or_default(),
            })
        }
        None if webhook_type.starts_with("message.") => {
            return Err(PayloadError::MissingMessageId);
        }
        None => None,
    };

    let event_id = match (&inbound_message, webhook_type.as_str()) {
        (Some(m), "message.created") => m.messagebird_message_id.clone(),
        (Some(m), _) => format!("{}:{}", m.messagebird_message_id, m.raw_status),
        (None, _) => body_digest(body),
    };

    Ok(ParsedWebhook {
        event: InboundWebhookEvent {
            webhook_type,
            messagebird_conversation_id: conversation_id,
            contact,
            message: inbound_message,
            conversation_status: conversation.status.unwrap_or_default(),
            ..InboundWebhookEvent::default()
        },
        event_id,
    })
}

/// A flow's handover request body, parsed leniently: flow authors template it freely.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HandoverBody {
    pub conversation_id: String,
    pub msisdn: String,
    pub channel_id: String,
    pub reason: String,
}

fn first_string(object: &serde_json::Map<String, serde_json::Value>, keys: &[&str]) -> String {
    for key in keys {
        match object.get(*key) {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => {
                return s.trim().to_owned();
            }
            Some(serde_json::Value::Number(n)) => return n.to_string(),
            _ => {}
        }
    }
    String::new()
}

/// Parses a handover body: a JSON object with the MessageBird conversation id (required) and
/// optional msisdn, channel id and reason, under camelCase or snake_case names.
pub fn parse_handover(body: &[u8]) -> Result<HandoverBody, PayloadError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| PayloadError::NotJson(e.to_string()))?;
    let Some(object) = value.as_object() else {
        return Err(PayloadError::NotJson("expected a JSON object".into()));
    };
    let conversation_id = first_string(
        object,
        &[
            "conversationId",
            "conversation_id",
            "messagebirdConversationId",
            "messagebird_conversation_id",
        ],
    );
    if conversation_id.is_empty() {
        return Err(PayloadError::MissingConversation);
    }
    let raw_msisdn = first_string(
        object,
        &["msisdn", "contactMsisdn", "contact_msisdn", "phone"],
    );
    let reason: String = first_string(object, &["reason"])
        .chars()
        .take(500)
        .collect();
    Ok(HandoverBody {
        conversation_id,
        msisdn: shopctrl_domain::normalize_msisdn(&raw_msisdn).unwrap_or_default(),
        channel_id: first_string(object, &["channelId", "channel_id"]),
        reason,
    })
}
