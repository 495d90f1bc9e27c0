//! Agent replies to the MessageBird Conversations API: which form a reply takes (free-form
//! text or the shop's WhatsApp template), the request, and what the answer means.
//!
//! The WhatsApp customer-service window is open until MessageBird's `createdDatetime` of the
//! customer's last received message (per channel and MSISDN) plus 24 hours; we stop 60
//! seconds earlier so a message in flight never lands just outside it. It is checked at each
//! attempt, because a retry can cross the boundary. Outside the window the reply goes out as
//! the shop's default template, with the agent's text as the template's first (and only)
//! body parameter: the default template must therefore have exactly one body variable
//! (`{{1}}`). The web widget has no window: always free-form.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use shopctrl_proto::v1::{Channel, OutboundSend};

use crate::retry::parse_retry_after;

/// How long the window stays open after the customer's last message.
pub const WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Safety margin before the window closes.
pub const WINDOW_MARGIN: Duration = Duration::from_secs(60);

/// The form a reply is sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Text,
    Template,
}

impl Form {
    /// The `sent_as` value of the result.
    pub fn as_str(self) -> &'static str {
        match self {
            Form::Text => "text",
            Form::Template => "template",
        }
    }
}

/// The shop's default WhatsApp template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub namespace: String,
    pub name: String,
    pub language: String,
}

/// Whether the reply must be a template at `now`.
pub fn choose_form(send: &OutboundSend, now: DateTime<Utc>) -> Form {
    if send.channel != Channel::Whatsapp as i32 {
        return Form::Text;
    }
    let Some(last) = send
        .customer_last_received_at
        .as_ref()
        .and_then(|ts| DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).unwrap_or(0)))
    else {
        // The customer never wrote: no window was ever opened.
        return Form::Template;
    };
    let open_until = last + chrono::Duration::from_std(WINDOW - WINDOW_MARGIN).unwrap_or_default();
    if now < open_until {
        Form::Text
    } else {
        Form::Template
    }
}

/// Why no request could be built (reported to the agent as a failed send).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error(
        "the customer-service window is closed and the shop has no WhatsApp template configured (name and namespace)"
    )]
    NoTemplate,
    #[error("the reply names neither a MessageBird conversation nor a channel and MSISDN")]
    NoDestination,
}

/// The path (relative to the API base) and JSON body of the request.
pub fn request(
    send: &OutboundSend,
    form: Form,
    template: Option<&Template>,
) -> Result<(String, Value), BuildError> {
    let (kind, content) = match form {
        Form::Text => ("text", json!({ "text": send.text })),
        Form::Template => {
            let template = template.ok_or(BuildError::NoTemplate)?;
            let language = if template.language.is_empty() {
                "en"
            } else {
                template.language.as_str()
            };
            (
                "hsm",
                json!({ "hsm": {
                    "namespace": template.namespace,
                    "templateName": template.name,
                    "language": { "policy": "deterministic", "code": language },
                    "components": [
                        { "type": "body", "parameters": [ { "type": "text", "text": send.text } ] }
                    ]
                }}),
            )
        }
    };
    if !send.messagebird_conversation_id.is_empty() {
        // Replying in the conversation works for every channel (and opens a new conversation
        // when MessageBird archived the old one).
        let mut body = json!({ "type": kind, "content": content });
        if !send.channel_id.is_empty() {
            body["channelId"] = json!(send.channel_id);
        }
        Ok((
            format!(
                "v1/conversations/{}/messages",
                urlencode(&send.messagebird_conversation_id)
            ),
            body,
        ))
    } else if !send.channel_id.is_empty() && !send.msisdn.is_empty() {
        Ok((
            "v1/send".to_owned(),
            json!({ "to": format!("+{}", send.msisdn), "from": send.channel_id, "type": kind, "content": content }),
        ))
    } else {
        Err(BuildError::NoDestination)
    }
}

fn urlencode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

/// What MessageBird's answer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiOutcome {
    /// 2xx: MessageBird took it.
    Accepted { messagebird_message_id: String },
    /// A 4xx other than 429: it will not work by trying again.
    Rejected { code: i32, description: String },
    /// 429 or 5xx: try again later.
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
}

/// Classifies an answer.
pub fn classify(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    now: DateTime<Utc>,
) -> ApiOutcome {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if (200..300).contains(&status) {
        let id = json
            .as_ref()
            .and_then(|v| {
                v.get("id")
                    .or_else(|| v.get("message").and_then(|m| m.get("id")))
            })
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        return ApiOutcome::Accepted {
            messagebird_message_id: id,
        };
    }
    let first_error = json
        .as_ref()
        .and_then(|v| v.get("errors"))
        .and_then(Value::as_array)
        .and_then(|errors| errors.first())
        .map(|e| {
            let code = e
                .get("code")
                .and_then(Value::as_i64)
                .and_then(|c| i32::try_from(c).ok())
                .unwrap_or(0);
            let mut description = e
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            if let Some(parameter) = e.get("parameter").and_then(Value::as_str) {
                description = format!("{description} (parameter {parameter})");
            }
            (code, description)
        });
    if status == 429 || status >= 500 || status == 408 {
        let detail = first_error
            .map(|(code, d)| format!(": {code} {d}"))
            .unwrap_or_default();
        return ApiOutcome::Retry {
            error: format!("MessageBird answered HTTP {status}{detail}"),
            retry_after: retry_after.and_then(|v| parse_retry_after(v, now)),
        };
    }
    match first_error {
        Some((code, description)) => ApiOutcome::Rejected { code, description },
        None => ApiOutcome::Rejected {
            code: 0,
            description: format!("MessageBird answered HTTP {status} without an error object"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(channel: Channel, last: Option<DateTime<Utc>>) -> OutboundSend {
        OutboundSend {
            channel: channel as i32,
            channel_id: "ch1".into(),
            msisdn: "31612345678".into(),
            messagebird_conversation_id: "conv1".into(),
            text: "Hello".into(),
            customer_last_received_at: last.map(|t| prost_types::Timestamp {
                seconds: t.timestamp(),
                nanos: 0,
            }),
            ..OutboundSend::default()
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
    }

    #[test]
    fn window_with_margin() {
        let inside = now() - chrono::Duration::hours(23);
        let edge = now() - chrono::Duration::seconds(24 * 3600 - 59);
        let outside = now() - chrono::Duration::hours(25);
        assert_eq!(
            choose_form(&send(Channel::Whatsapp, Some(inside)), now()),
            Form::Text
        );
        assert_eq!(
            choose_form(&send(Channel::Whatsapp, Some(edge)), now()),
            Form::Template
        );
        assert_eq!(
            choose_form(&send(Channel::Whatsapp, Some(outside)), now()),
            Form::Template
        );
        assert_eq!(
            choose_form(&send(Channel::Whatsapp, None), now()),
            Form::Template
        );
        assert_eq!(
            choose_form(&send(Channel::WebWidget, None), now()),
            Form::Text
        );
        assert_eq!(
            choose_form(&send(Channel::WebWidget, Some(outside)), now()),
            Form::Text
        );
    }

    #[test]
    fn template_request_carries_the_text_as_first_body_parameter() -> Result<(), BuildError> {
        let t = Template {
            namespace: "ns".into(),
            name: "agent_reply".into(),
            language: String::new(),
        };
        let (path, body) = request(&send(Channel::Whatsapp, None), Form::Template, Some(&t))?;
        assert_eq!(path, "v1/conversations/conv1/messages");
        assert_eq!(body["type"], "hsm");
        assert_eq!(body["channelId"], "ch1");
        assert_eq!(body["content"]["hsm"]["templateName"], "agent_reply");
        assert_eq!(body["content"]["hsm"]["language"]["code"], "en");
        assert_eq!(
            body["content"]["hsm"]["components"][0]["parameters"][0]["text"],
            "Hello"
        );
        assert_eq!(
            request(&send(Channel::Whatsapp, None), Form::Template, None),
            Err(BuildError::NoTemplate)
        );
        Ok(())
    }

    #[test]
    fn text_request_without_conversation_uses_send() -> Result<(), BuildError> {
        let mut s = send(Channel::Whatsapp, Some(now()));
        s.messagebird_conversation_id.clear();
        let (path, body) = request(&s, Form::Text, None)?;
        assert_eq!(path, "v1/send");
        assert_eq!(body["to"], "+31612345678");
        assert_eq!(body["from"], "ch1");
        assert_eq!(body["content"]["text"], "Hello");
        s.channel_id.clear();
        assert_eq!(
            request(&s, Form::Text, None),
            Err(BuildError::NoDestination)
        );
        Ok(())
    }

    #[test]
    fn classifies_answers() {
        assert_eq!(
            classify(201, None, br#"{"id":"m1","status":"pending"}"#, now()),
            ApiOutcome::Accepted {
                messagebird_message_id: "m1".into()
            }
        );
        assert_eq!(
            classify(202, None, b"", now()),
            ApiOutcome::Accepted {
                messagebird_message_id: String::new()
            }
        );
        assert_eq!(
            classify(
                422,
                None,
                br#"{"errors":[{"code":1001,"description":"invalid credential","parameter":null}]}"#,
                now()
            ),
            ApiOutcome::Rejected { code: 1001, description: "invalid credential".into() }
        );
        assert!(matches!(
            classify(404, None, b"nope", now()),
            ApiOutcome::Rejected { code: 0, .. }
        ));
        assert_eq!(
            classify(429, Some("7"), b"", now()),
            ApiOutcome::Retry {
                error: "MessageBird answered HTTP 429".into(),
                retry_after: Some(Duration::from_secs(7))
            }
        );
        assert!(matches!(
            classify(503, None, b"", now()),
            ApiOutcome::Retry { .. }
        ));
    }
}
