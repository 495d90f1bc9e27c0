//! Realistic MessageBird Conversations API webhooks (PROTOCOL.md §2), for WhatsApp and the web
//! widget, every message type of §2.4, `message.created` / `message.updated` /
//! `conversation.created` / `conversation.updated`, and signed requests ready to send to
//! ingress's `POST /webhooks/messagebird/{shop}`.

use serde_json::{Value, json};

use crate::signing::{JwtRequest, sign_jwt, sign_legacy};

/// The channel a conversation runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    WhatsApp,
    WebWidget,
}

impl Channel {
    /// MessageBird's `platform` (the web widget's id is unconfirmed; `livechat` is our guess).
    pub fn platform(self) -> &'static str {
        match self {
            Self::WhatsApp => "whatsapp",
            Self::WebWidget => "livechat",
        }
    }
}

/// A message's `type` and `content`.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(String),
    Image {
        url: String,
        caption: String,
    },
    Video {
        url: String,
    },
    Audio {
        url: String,
    },
    File {
        url: String,
        caption: String,
    },
    Location {
        latitude: f64,
        longitude: f64,
    },
    Hsm {
        namespace: String,
        template: String,
    },
    InteractiveButtonReply {
        id: String,
        text: String,
    },
    InteractiveListReply {
        id: String,
        text: String,
        description: String,
    },
    WhatsappSticker {
        link: String,
    },
    WhatsappOrder {
        catalog_id: String,
    },
    WhatsappText {
        body: String,
    },
    Email {
        subject: String,
    },
    ExternalAttachment {
        url: String,
    },
    /// Anything else, passed through.
    Other {
        kind: String,
        content: Value,
    },
}

impl Content {
    /// `(type, content)` as MessageBird sends them.
    pub fn to_json(&self) -> (String, Value) {
        let (kind, content) = match self {
            Self::Text(text) => ("text", json!({ "text": text })),
            Self::Image { url, caption } => (
                "image",
                json!({ "image": { "url": url, "caption": caption } }),
            ),
            Self::Video { url } => ("video", json!({ "video": { "url": url } })),
            Self::Audio { url } => ("audio", json!({ "audio": { "url": url } })),
            Self::File { url, caption } => (
                "file",
                json!({ "file": { "url": url, "caption": caption } }),
            ),
            Self::Location {
                latitude,
                longitude,
            } => (
                "location",
                json!({ "location": { "latitude": latitude, "longitude": longitude } }),
            ),
            Self::Hsm {
                namespace,
                template,
            } => (
                "hsm",
                json!({ "hsm": { "namespace": namespace, "templateName": template,
                    "language": { "policy": "deterministic", "code": "en" },
                    "components": [{ "type": "body", "parameters": [{ "type": "text", "text": "Jane" }] }] } }),
            ),
            Self::InteractiveButtonReply { id, text } => (
                "interactive",
                json!({ "interactive": { "type": "button_reply", "reply": { "id": id, "text": text } } }),
            ),
            Self::InteractiveListReply {
                id,
                text,
                description,
            } => (
                "interactive",
                json!({ "interactive": { "type": "list_reply",
                    "reply": { "id": id, "text": text, "description": description } } }),
            ),
            Self::WhatsappSticker { link } => (
                "whatsappSticker",
                json!({ "whatsappSticker": { "link": link } }),
            ),
            Self::WhatsappOrder { catalog_id } => (
                "whatsappOrder",
                json!({ "whatsappOrder": { "catalog_id": catalog_id, "text": "my order",
                    "product_items": [{ "product_retailer_id": "sku-1", "quantity": 2,
                        "item_price": 9.99, "currency": "EUR" }] } }),
            ),
            Self::WhatsappText { body } => (
                "whatsappText",
                json!({ "whatsappText": { "text": { "body": body },
                    "context": { "id": "wamid.ctx", "from": "31970102030",
                        "referred_product": { "catalog_id": "cat-1", "product_retailer_id": "sku-1" } } } }),
            ),
            Self::Email { subject } => (
                "email",
                json!({ "email": { "subject": subject, "content": { "text": "hello" } } }),
            ),
            Self::ExternalAttachment { url } => (
                "externalAttachment",
                json!({ "externalAttachments": [{ "url": url, "caption": "attachment" }] }),
            ),
            Self::Other { kind, content } => return (kind.clone(), content.clone()),
        };
        (kind.to_owned(), content)
    }

    /// The text a receiver should extract, for the types that carry text.
    pub fn expected_text(&self) -> Option<&str> {
        match self {
            Self::Text(t) | Self::WhatsappText { body: t } => Some(t),
            Self::InteractiveButtonReply { text, .. } | Self::InteractiveListReply { text, .. } => {
                Some(text)
            }
            _ => None,
        }
    }

    /// One sample of every message type of PROTOCOL.md §2.4 (plus an unknown one).
    pub fn samples() -> Vec<Content> {
        let media = "https://media.messagebird.com/v1/media/0c7e3a52-6d7b-4f0e-9d0e-3b1f6c2a9e11";
        vec![
            Self::Text("Hi, I would like to talk to a person".into()),
            Self::Image {
                url: media.into(),
                caption: "damaged parcel".into(),
            },
            Self::Video { url: media.into() },
            Self::Audio { url: media.into() },
            Self::File {
                url: media.into(),
                caption: "invoice.pdf".into(),
            },
            Self::Location {
                latitude: 52.37,
                longitude: 4.90,
            },
            Self::Hsm {
                namespace: "20332cd4_f095_b080_d255_35677159aaff".into(),
                template: "order_update".into(),
            },
            Self::InteractiveButtonReply {
                id: "talk_to_agent".into(),
                text: "Talk to an agent".into(),
            },
            Self::InteractiveListReply {
                id: "opt-2".into(),
                text: "Returns".into(),
                description: "Return an item".into(),
            },
            Self::WhatsappSticker {
                link: "https://media.example/sticker.webp".into(),
            },
            Self::WhatsappOrder {
                catalog_id: "cat-1".into(),
            },
            Self::WhatsappText {
                body: "Is this still available?".into(),
            },
            Self::Email {
                subject: "Order 4711".into(),
            },
            Self::ExternalAttachment { url: media.into() },
            Self::Other {
                kind: "carousel".into(),
                content: json!({ "carousel": { "cards": [] } }),
            },
        ]
    }
}

/// One customer and one conversation, from which webhooks are made.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub channel: Channel,
    pub conversation_id: String,
    pub contact_id: String,
    pub channel_id: String,
    /// Digits only; ignored for the web widget (visitors have none).
    pub msisdn: String,
    pub display_name: String,
    /// The business number (WhatsApp `to` of inbound messages).
    pub business_number: String,
}

fn hex_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn rfc3339_nanos(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

impl Conversation {
    /// A new conversation with random 32-hex ids, as generation A uses.
    pub fn new(channel: Channel, msisdn: &str) -> Self {
        Self {
            channel,
            conversation_id: hex_id(),
            contact_id: hex_id(),
            channel_id: hex_id(),
            msisdn: msisdn.to_owned(),
            display_name: "Jane Doe".into(),
            business_number: "31970102030".into(),
        }
    }

    fn contact(&self) -> Value {
        let msisdn = match self.channel {
            // MessageBird sends a JSON number for phone contacts.
            Channel::WhatsApp => self
                .msisdn
                .parse::<u64>()
                .map(Value::from)
                .unwrap_or(Value::Null),
            Channel::WebWidget => Value::Null,
        };
        json!({
            "id": self.contact_id,
            "href": format!("https://contacts.messagebird.com/v2/contacts/{}", self.contact_id),
            "msisdn": msisdn,
            "displayName": self.display_name,
            "firstName": "Jane", "lastName": "Doe",
            "customDetails": {}, "attributes": {},
            "createdDatetime": "2023-05-02T09:10:11Z",
            "updatedDatetime": "2023-05-02T09:14:03Z"
        })
    }

    fn conversation(&self, status: &str, now: &str) -> Value {
        json!({
            "id": self.conversation_id,
            "contactId": self.contact_id,
            "status": status,
            "createdDatetime": "2023-05-02T09:10:11Z",
            "updatedDatetime": now,
            "lastReceivedDatetime": now,
            "lastUsedChannelId": self.channel_id,
            "lastUsedPlatformId": self.channel.platform(),
            "messages": { "totalCount": 1,
                "href": format!("https://conversations.messagebird.com/v1/conversations/{}/messages", self.conversation_id) }
        })
    }

    fn parties(&self, inbound: bool) -> (String, String) {
        match (self.channel, inbound) {
            (Channel::WhatsApp, true) => (
                format!("+{}", self.msisdn),
                format!("+{}", self.business_number),
            ),
            (Channel::WhatsApp, false) => (
                format!("+{}", self.business_number),
                format!("+{}", self.msisdn),
            ),
            (Channel::WebWidget, true) => (self.contact_id.clone(), self.channel_id.clone()),
            (Channel::WebWidget, false) => (self.channel_id.clone(), self.contact_id.clone()),
        }
    }

    fn message(
        &self,
        id: &str,
        content: &Content,
        inbound: bool,
        status: &str,
        now: &str,
    ) -> Value {
        let (kind, content) = content.to_json();
        let (from, to) = self.parties(inbound);
        json!({
            "id": id,
            "conversationId": self.conversation_id,
            "platform": self.channel.platform(),
            "to": to, "from": from,
            "channelId": self.channel_id,
            "type": kind,
            "content": content,
            "direction": if inbound { "received" } else { "sent" },
            "status": status,
            "createdDatetime": now,
            "updatedDatetime": now
        })
    }

    /// `message.created` for a message the customer sent.
    pub fn inbound(&self, message_id: &str, content: &Content) -> Value {
        let now = rfc3339_nanos(chrono::Utc::now());
        json!({
            "contact": self.contact(),
            "conversation": self.conversation("active", &now),
            "message": self.message(message_id, content, true, "received", &now),
            "type": "message.created"
        })
    }

    /// `message.updated` for a message we (or the bot) sent, with a new delivery status.
    pub fn outbound_status(&self, message_id: &str, text: &str, status: &str) -> Value {
        let now = rfc3339_nanos(chrono::Utc::now());
        json!({
            "contact": self.contact(),
            "conversation": self.conversation("active", &now),
            "message": self.message(message_id, &Content::Text(text.into()), false, status, &now),
            "type": "message.updated"
        })
    }

    /// `conversation.created` or `conversation.updated` (no message).
    pub fn conversation_event(&self, kind: &str, status: &str) -> Value {
        let now = rfc3339_nanos(chrono::Utc::now());
        json!({
            "contact": self.contact(),
            "conversation": self.conversation(status, &now),
            "type": kind
        })
    }
}

/// A request ready to send.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    /// The absolute URL (the signed one).
    pub url: String,
    /// Path and query, for a client that talks to another address than the public one.
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The webhook path of a shop.
pub fn webhook_path(shop_id: &str) -> String {
    format!("/webhooks/messagebird/{shop_id}")
}

/// Signs `body` for `POST {public_base}{path_and_query}` with a fresh 60 s HS256 JWT.
pub fn sign_webhook(
    public_base: &str,
    path_and_query: &str,
    body: &[u8],
    signing_key: &str,
) -> SignedRequest {
    let url = format!("{}{}", public_base.trim_end_matches('/'), path_and_query);
    let token = sign_jwt(&JwtRequest::now(signing_key, &url, body));
    SignedRequest {
        path_and_query: path_and_query.to_owned(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("messagebird-signature-jwt".into(), token),
        ],
        url,
        body: body.to_vec(),
    }
}

/// Signs with the deprecated legacy scheme at `timestamp`.
pub fn sign_webhook_legacy(
    public_base: &str,
    path_and_query: &str,
    body: &[u8],
    signing_key: &str,
    timestamp: i64,
) -> SignedRequest {
    let query = path_and_query.split_once('?').map(|(_, q)| q).unwrap_or("");
    SignedRequest {
        url: format!("{}{}", public_base.trim_end_matches('/'), path_and_query),
        path_and_query: path_and_query.to_owned(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            (
                "messagebird-request-timestamp".into(),
                timestamp.to_string(),
            ),
            (
                "messagebird-signature".into(),
                sign_legacy(signing_key, timestamp, query, body),
            ),
        ],
        body: body.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_every_shape() {
        for channel in [Channel::WhatsApp, Channel::WebWidget] {
            let conversation = Conversation::new(channel, "31612345678");
            for content in Content::samples() {
                let body = conversation.inbound("m1", &content);
                assert_eq!(body["type"], "message.created");
                let (kind, _) = content.to_json();
                assert_eq!(body["message"]["type"], kind.as_str());
            }
            assert_eq!(
                conversation.outbound_status("m2", "hi", "delivered")["type"],
                "message.updated"
            );
            assert!(
                conversation.conversation_event("conversation.created", "active")["message"]
                    .is_null()
            );
        }
        let signed = sign_webhook(
            "https://hooks.example.com/",
            "/webhooks/messagebird/s1",
            b"{}",
            "key",
        );
        assert_eq!(
            signed.url,
            "https://hooks.example.com/webhooks/messagebird/s1"
        );
        assert_eq!(signed.headers.len(), 2);
    }
}
