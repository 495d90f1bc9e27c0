//! Parsing of every example payload and of each message type of PROTOCOL.md §2.4.

#![allow(clippy::expect_used, clippy::unwrap_used)] // tests fail loudly

use shopctrl_ingress::payload::{PayloadError, parse_handover, parse_webhook};
use shopctrl_proto::v1::{Channel, Direction, MessageStatus};

fn payload(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/payloads/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn whatsapp_inbound_text() {
    let parsed = parse_webhook(&payload(
        "conversations-whatsapp-inbound-text.message.created.json",
    ))
    .expect("parses");
    let event = &parsed.event;
    assert_eq!(event.webhook_type, "message.created");
    assert_eq!(
        event.messagebird_conversation_id,
        "2e15efafec384e1c82e9842075e87beb"
    );
    assert_eq!(event.conversation_status, "active");
    let contact = event.contact.as_ref().expect("contact");
    assert_eq!(contact.msisdn, "31612345678"); // JSON number
    assert_eq!(contact.display_name, "Jane Doe");
    let message = event.message.as_ref().expect("message");
    assert_eq!(parsed.event_id, "1fb5ad6b7aeb4bc4ba4dd5ffffc1ebad");
    assert_eq!(message.channel, Channel::Whatsapp as i32);
    assert_eq!(message.direction, Direction::Received as i32);
    assert_eq!(message.status, MessageStatus::Received as i32);
    assert!(message.supported);
    assert_eq!(
        message.text,
        "Hi, I would like to talk to a person about my order 4711"
    );
    let created = message.created_at.expect("created");
    assert_eq!(created.nanos, 108_371_655);
    assert_eq!(message.from, "+31612345678");
}

#[test]
fn whatsapp_inbound_image_is_unsupported_but_kept() {
    let parsed = parse_webhook(&payload(
        "conversations-whatsapp-inbound-image.message.created.json",
    ))
    .expect("parses");
    let message = parsed.event.message.expect("message");
    assert_eq!(message.r#type, "image");
    assert!(!message.supported);
    assert!(message.text.is_empty());
    assert!(message.content_json.contains("The parcel arrived damaged"));
}

#[test]
fn livechat_inbound_text() {
    let parsed = parse_webhook(&payload(
        "conversations-livechat-inbound-text.message.created.json",
    ))
    .expect("parses");
    let contact = parsed.event.contact.expect("contact");
    assert_eq!(contact.msisdn, ""); // null for web visitors
    let message = parsed.event.message.expect("message");
    assert_eq!(message.channel, Channel::WebWidget as i32);
    assert_eq!(message.platform, "livechat");
    assert_eq!(message.text, "Hello, is anyone available to help me?");
}

#[test]
fn quickstart_without_contact_or_platform() {
    let parsed =
        parse_webhook(&payload("conversations-quickstart.message.created.json")).expect("parses");
    assert!(parsed.event.contact.is_none());
    let message = parsed.event.message.expect("message");
    assert_eq!(message.platform, "");
    assert_eq!(message.channel, Channel::Unspecified as i32);
    assert_eq!(message.text, "Testing webhook functionality.");
    assert_eq!(message.updated_at.expect("updated").nanos, 888_451_450);
}

#[test]
fn outbound_status_update_has_a_status_specific_event_id() {
    let parsed = parse_webhook(&payload(
        "conversations-whatsapp-outbound-delivered.message.updated.json",
    ))
    .expect("parses");
    assert_eq!(
        parsed.event_id,
        "13a97a5023944648b8e5e61248c40da8:delivered"
    );
    let message = parsed.event.message.expect("message");
    assert_eq!(message.direction, Direction::Sent as i32);
    assert_eq!(message.status, MessageStatus::Delivered as i32);
}

#[test]
fn bird_channels_payload_is_refused_clearly() {
    assert_eq!(
        parse_webhook(&payload("bird-channels-whatsapp.inbound.json")),
        Err(PayloadError::ForeignFormat)
    );
}

fn with_message(kind: &str, content: serde_json::Value) -> Vec<u8> {
    serde_json::json!({
        "type": "message.created",
        "conversation": { "id": "c1" },
        "message": { "id": "m1", "conversationId": "c1", "platform": "whatsapp",
            "direction": "received", "status": "received", "type": kind, "content": content,
            "from": "+31 6 1234 5678", "createdDatetime": "2019-03-01T10:40:02Z" }
    })
    .to_string()
    .into_bytes()
}

#[test]
fn every_message_type_of_the_protocol() {
    // (type, content, expected text when supported)
    let cases: Vec<(&str, serde_json::Value, Option<&str>)> = vec![
        ("text", serde_json::json!({"text": "hello"}), Some("hello")),
        (
            "image",
            serde_json::json!({"image": {"url": "https://x/i.png", "caption": "c"}}),
            None,
        ),
        (
            "video",
            serde_json::json!({"video": {"url": "https://x/v.mp4"}}),
            None,
        ),
        (
            "audio",
            serde_json::json!({"audio": {"url": "https://x/a.ogg"}}),
            None,
        ),
        (
            "file",
            serde_json::json!({"file": {"url": "https://x/f.pdf"}}),
            None,
        ),
        (
            "location",
            serde_json::json!({"location": {"latitude": 52.37, "longitude": 4.9}}),
            None,
        ),
        (
            "location",
            serde_json::json!({"location": {"latitude": "52.37", "longitude": "4.9"}}),
            None,
        ),
        (
            "hsm",
            serde_json::json!({"hsm": {"namespace": "ns", "templateName": "t", "language": {"policy": "deterministic", "code": "en"}, "params": [{"default": "x"}]}}),
            None,
        ),
        (
            "interactive",
            serde_json::json!({"interactive": {"type": "button_reply", "reply": {"id": "b1", "text": "Talk to a human"}}}),
            Some("Talk to a human"),
        ),
        (
            "interactive",
            serde_json::json!({"interactive": {"type": "list_reply", "reply": {"id": "l1", "text": "Returns", "description": "d"}}}),
            Some("Returns"),
        ),
        (
            "interactive",
            serde_json::json!({"interactive": {"type": "button", "body": {"text": "Choose"}, "action": {}}}),
            None,
        ),
        (
            "whatsappSticker",
            serde_json::json!({"whatsappSticker": {"link": "https://x/s.webp"}}),
            None,
        ),
        (
            "whatsappOrder",
            serde_json::json!({"whatsappOrder": {"catalog_id": "c", "product_items": [{"product_retailer_id": "p", "quantity": 1, "item_price": 1.5, "currency": "EUR"}], "text": "t"}}),
            None,
        ),
        (
            "whatsappText",
            serde_json::json!({"whatsappText": {"text": {"body": "is it in stock?"}, "context": {"id": "x", "from": "y", "referred_product": {"catalog_id": "c", "product_retailer_id": "p"}}}}),
            Some("is it in stock?"),
        ),
        (
            "email",
            serde_json::json!({"email": {"subject": "s"}}),
            None,
        ),
        (
            "externalAttachment",
            serde_json::json!({"externalAttachments": [{"url": "https://x", "caption": "c"}]}),
            None,
        ),
        ("event", serde_json::json!({}), None),
        ("rich", serde_json::json!({}), None),
        ("menu", serde_json::json!({}), None),
        ("buttons", serde_json::json!({}), None),
        ("link", serde_json::json!({}), None),
        ("facebookQuickReply", serde_json::json!({}), None),
        (
            "somethingNew",
            serde_json::json!({"somethingNew": {"a": 1}}),
            None,
        ),
    ];
    for (kind, content, text) in cases {
        let parsed = parse_webhook(&with_message(kind, content.clone()))
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        let message = parsed.event.message.expect("message");
        assert_eq!(message.r#type, kind);
        assert_eq!(message.supported, text.is_some(), "{kind} {content}");
        assert_eq!(message.text, text.unwrap_or(""), "{kind}");
        // Without a contact, the WhatsApp sender's number identifies the customer.
        assert_eq!(parsed.event.contact.expect("contact").msisdn, "31612345678");
    }
}

#[test]
fn lenient_fields() {
    let body = serde_json::json!({
        "type": "message.created",
        "contact": { "id": "k", "msisdn": "+31 612345678", "firstName": "A", "lastName": "B", "extra": {"x": 1} },
        "conversation": { "id": "c1", "lastUsedPlatformId": "telegram" },
        "message": { "id": "m1", "type": "text", "content": {"text": "x"},
            "createdDatetime": "0001-01-01T00:00:00Z", "updatedDatetime": "not a time", "unknown": true }
    });
    let parsed = parse_webhook(body.to_string().as_bytes()).expect("parses");
    let contact = parsed.event.contact.expect("contact");
    assert_eq!(contact.msisdn, "31612345678");
    assert_eq!(contact.display_name, "A B");
    let message = parsed.event.message.expect("message");
    assert_eq!(message.platform, "telegram");
    assert_eq!(message.channel, Channel::Other as i32);
    assert!(message.created_at.is_none() && message.updated_at.is_none());
    assert_eq!(message.direction, Direction::Unspecified as i32);
}

#[test]
fn conversation_events_use_a_body_digest() {
    let body = br#"{"type":"conversation.created","conversation":{"id":"c9","status":"active"}}"#;
    let parsed = parse_webhook(body).expect("parses");
    assert!(parsed.event.message.is_none());
    assert!(parsed.event_id.starts_with("sha256:"));
    assert_eq!(parsed.event.conversation_status, "active");
    assert_eq!(
        parse_webhook(body).expect("again").event_id,
        parsed.event_id
    );
}

#[test]
fn malformed_bodies_are_refused() {
    assert!(matches!(
        parse_webhook(b"not json"),
        Err(PayloadError::NotJson(_))
    ));
    assert!(matches!(
        parse_webhook(b"[]"),
        Err(PayloadError::NotJson(_))
    ));
    assert_eq!(parse_webhook(b"{}"), Err(PayloadError::MissingType));
    assert_eq!(
        parse_webhook(br#"{"type":"message.created","message":{"id":"m"}}"#),
        Err(PayloadError::MissingConversation)
    );
    assert_eq!(
        parse_webhook(br#"{"type":"message.created","conversation":{"id":"c"}}"#),
        Err(PayloadError::MissingMessageId)
    );
}

#[test]
fn handover_bodies() {
    let parsed = parse_handover(
        br#"{"conversationId":"c1","msisdn":31612345678,"channelId":"ch","reason":"business hours"}"#,
    )
    .expect("parses");
    assert_eq!(parsed.conversation_id, "c1");
    assert_eq!(parsed.msisdn, "31612345678");
    assert_eq!(parsed.channel_id, "ch");
    assert_eq!(parsed.reason, "business hours");
    let snake =
        parse_handover(br#"{"conversation_id":"c2","contact_msisdn":"+316"}"#).expect("snake");
    assert_eq!(
        (snake.conversation_id.as_str(), snake.msisdn.as_str()),
        ("c2", "316")
    );
    assert_eq!(
        parse_handover(br#"{"msisdn":"1"}"#),
        Err(PayloadError::MissingConversation)
    );
    assert_eq!(
        parse_handover(br#"{"conversationId":""}"#),
        Err(PayloadError::MissingConversation)
    );
    assert!(parse_handover(b"conversationId=c1").is_err());
}
