//! Secrets: encrypted in the table (raw rows hold no plaintext), masked in every admin
//! response, returned whole only to the internal caller that needs them, generated and
//! rotatable, and readable across an encryption-key rotation.

use prost::Message as _;
use shopctrl_proto::v1::{
    GetInternalShopRequest, GetShopSettingsRequest, Role, RotateSecretRequest,
    UpdateShopSettingsRequest,
};
use sqlx::Row as _;
use tonic::Code;

use crate::support::{
    FLOW_CALLBACK, INGRESS, KEY_1, KEY_2, ROUTING, SHOP, TestResult, TestService, as_owner, call,
};

const ACCESS_KEY: &str = "live_SecretAccessKeyValueWXYZ";
const SIGNING_KEY: &str = "SigningKeyPlaintextValue-9876";

async fn configure(service: &TestService) -> (String, String) {
    service
        .grant_role(SHOP, crate::support::OWNER, Role::ShopAdmin)
        .await;
    service
        .admin()
        .update_shop_settings(as_owner(UpdateShopSettingsRequest {
            shop_id: SHOP.into(),
            expected_version: 0,
            workspace_id: Some("2d7f8a3e-5c1b-4a9e-8f00-1a2b3c4d5e6f".into()),
            access_key: Some(ACCESS_KEY.into()),
            signing_key: Some(SIGNING_KEY.into()),
            event_webhook_url: Some("https://flows.example.com/hook".into()),
            whatsapp_template_name: Some("agent_reply".into()),
            whatsapp_template_namespace: Some("ns_1234".into()),
            ..Default::default()
        }))
        .await
        .expect("create settings");
    let handover = service
        .admin()
        .rotate_handover_secret(as_owner(RotateSecretRequest {
            shop_id: SHOP.into(),
        }))
        .await
        .expect("rotate handover")
        .into_inner();
    let callback = service
        .admin()
        .rotate_callback_secret(as_owner(RotateSecretRequest {
            shop_id: SHOP.into(),
        }))
        .await
        .expect("rotate callback")
        .into_inner();
    assert_eq!(handover.version, 2);
    assert_eq!(callback.version, 3);
    (handover.secret, callback.secret)
}

/// Every secret row as stored: (name, key_id, ciphertext).
async fn raw_secrets(service: &TestService) -> Vec<(String, String, Vec<u8>)> {
    let mut conn = service.db.connection().await;
    sqlx::query("select name, key_id, ciphertext from config.shop_secret order by name")
        .fetch_all(&mut conn)
        .await
        .expect("read shop_secret")
        .into_iter()
        .map(|row| {
            (
                row.get::<String, _>("name"),
                row.get::<String, _>("key_id"),
                row.get::<Vec<u8>, _>("ciphertext"),
            )
        })
        .collect()
}

/// Every byte the config schema stores, as text: settings, secrets, roles, outbox.
async fn whole_schema_dump(service: &TestService) -> Vec<u8> {
    let mut conn = service.db.connection().await;
    let mut dump = Vec::new();
    for table in ["shop_settings", "shop_secret", "employee_role", "outbox"] {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select row_to_json(t)::text from config.{table} t"
        )))
        .fetch_all(&mut conn)
        .await
        .expect("dump");
        for row in rows {
            dump.extend_from_slice(row.as_bytes());
        }
    }
    for table in ["shop_secret", "outbox"] {
        let column = if table == "outbox" {
            "payload"
        } else {
            "ciphertext"
        };
        let blobs: Vec<Vec<u8>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select {column} from config.{table}"
        )))
        .fetch_all(&mut conn)
        .await
        .expect("dump blobs");
        for blob in blobs {
            dump.extend_from_slice(&blob);
        }
    }
    dump
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// No 8-character piece of the plaintext appears (not even base64- or hex-free leaks).
fn leaks_any_piece(haystack: &[u8], secret: &str) -> bool {
    secret
        .as_bytes()
        .windows(8)
        .any(|piece| haystack.windows(8).any(|w| w == piece))
}

#[tokio::test]
async fn secrets_are_encrypted_at_rest_and_masked_in_responses() -> TestResult {
    let service = TestService::start().await;
    let mut tap = service.tap().await;
    let (handover, callback) = configure(&service).await;
    assert!(
        handover.starts_with("shh_") && handover.len() > 40,
        "{handover}"
    );
    assert!(callback.starts_with("shc_") && callback.len() > 40);

    let rows = raw_secrets(&service).await;
    let names: Vec<&str> = rows.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "access_key",
            "callback_secret",
            "handover_secret",
            "signing_key"
        ]
    );
    let dump = whole_schema_dump(&service).await;
    for secret in [
        ACCESS_KEY,
        SIGNING_KEY,
        handover.as_str(),
        callback.as_str(),
    ] {
        assert!(
            !leaks_any_piece(&dump, secret),
            "plaintext of a secret is stored"
        );
    }
    for (_, key_id, ciphertext) in &rows {
        assert_eq!(key_id, "k1");
        // nonce (12) + at least the tag (16)
        assert!(ciphertext.len() > 28);
    }

    // The admin API shows is_set and the last 4 characters, never more.
    let read = service
        .admin()
        .get_shop_settings(as_owner(GetShopSettingsRequest {
            shop_id: SHOP.into(),
        }))
        .await?
        .into_inner();
    let encoded = read.encode_to_vec();
    for secret in [
        ACCESS_KEY,
        SIGNING_KEY,
        handover.as_str(),
        callback.as_str(),
    ] {
        assert!(
            !leaks_any_piece(&encoded, secret),
            "a secret leaked in GetShopSettings"
        );
    }
    let info = |s: &Option<shopctrl_proto::v1::SecretInfo>| s.clone().unwrap_or_default();
    assert_eq!(info(&read.access_key).last4, "WXYZ");
    assert_eq!(info(&read.signing_key).last4, "9876");
    assert_eq!(
        info(&read.handover_secret).last4,
        handover[handover.len() - 4..]
    );
    assert_eq!(
        info(&read.callback_secret).last4,
        callback[callback.len() - 4..]
    );
    assert!(info(&read.handover_secret).is_set && info(&read.callback_secret).is_set);

    // Events never carry secrets either.
    for _ in 0..3 {
        let (event, _, _) = tap.next().await;
        let bytes = event.encode_to_vec();
        for secret in [
            ACCESS_KEY,
            SIGNING_KEY,
            handover.as_str(),
            callback.as_str(),
        ] {
            assert!(!contains(&bytes, secret));
        }
    }

    // Internal callers get exactly the secrets they need.
    let ingress = service
        .internal()
        .get_ingress_shop(call(
            GetInternalShopRequest {
                shop_id: SHOP.into(),
            },
            INGRESS,
            None,
        ))
        .await?
        .into_inner();
    assert_eq!(ingress.signing_key, SIGNING_KEY);
    assert_eq!(ingress.handover_secret, handover);
    assert!(ingress.enabled);
    assert_eq!(ingress.version, 3);
    let delivery = service
        .internal()
        .get_delivery_shop(call(
            GetInternalShopRequest {
                shop_id: SHOP.into(),
            },
            FLOW_CALLBACK,
            None,
        ))
        .await?
        .into_inner();
    assert_eq!(delivery.access_key, ACCESS_KEY);
    assert_eq!(delivery.callback_secret, callback);
    assert_eq!(delivery.event_webhook_url, "https://flows.example.com/hook");
    assert_eq!(delivery.whatsapp_template_name, "agent_reply");
    assert_eq!(delivery.whatsapp_template_namespace, "ns_1234");
    assert_eq!(delivery.whatsapp_template_language, "en");
    let routing = service
        .internal()
        .get_routing_shop(call(
            GetInternalShopRequest {
                shop_id: SHOP.into(),
            },
            ROUTING,
            None,
        ))
        .await?
        .into_inner();
    let routing_bytes = routing.encode_to_vec();
    for secret in [
        ACCESS_KEY,
        SIGNING_KEY,
        handover.as_str(),
        callback.as_str(),
    ] {
        assert!(!contains(&routing_bytes, secret), "routing got a secret");
    }
    Ok(())
}

#[tokio::test]
async fn generated_secrets_rotate_and_are_shown_once() -> TestResult {
    let service = TestService::start().await;
    let (first, _) = configure(&service).await;
    let second = service
        .admin()
        .rotate_handover_secret(as_owner(RotateSecretRequest {
            shop_id: SHOP.into(),
        }))
        .await?
        .into_inner();
    assert_ne!(first, second.secret);
    assert_eq!(second.version, 4);
    let ingress = service
        .internal()
        .get_ingress_shop(call(
            GetInternalShopRequest {
                shop_id: SHOP.into(),
            },
            INGRESS,
            None,
        ))
        .await?
        .into_inner();
    assert_eq!(
        ingress.handover_secret, second.secret,
        "the old secret is gone"
    );
    Ok(())
}

#[tokio::test]
async fn encryption_keys_rotate_without_losing_secrets() -> TestResult {
    let mut service = TestService::start().await;
    let (handover, callback) = configure(&service).await;
    service.stop().await;

    // New active key, the old one still configured: everything still opens.
    service
        .launch(service.settings(&format!("{KEY_2},{KEY_1}")))
        .await;
    let read_ingress = |service: &TestService| {
        let mut client = service.internal();
        async move {
            client
                .get_ingress_shop(call(
                    GetInternalShopRequest {
                        shop_id: SHOP.into(),
                    },
                    INGRESS,
                    None,
                ))
                .await
        }
    };
    let ingress = read_ingress(&service).await?.into_inner();
    assert_eq!(ingress.signing_key, SIGNING_KEY);
    assert_eq!(ingress.handover_secret, handover);

    // New writes use the new key.
    service
        .admin()
        .update_shop_settings(as_owner(UpdateShopSettingsRequest {
            shop_id: SHOP.into(),
            expected_version: 3,
            signing_key: Some("SigningKeyRotatedValue-5555".into()),
            ..Default::default()
        }))
        .await?;
    let keys: Vec<(String, String)> = raw_secrets(&service)
        .await
        .into_iter()
        .map(|(n, k, _)| (n, k))
        .collect();
    assert!(
        keys.contains(&("signing_key".into(), "k2".into())),
        "{keys:?}"
    );
    assert!(
        keys.contains(&("access_key".into(), "k1".into())),
        "{keys:?}"
    );
    service.stop().await;

    // Without the old key the old secrets cannot be read, and the error says nothing secret.
    service.launch(service.settings(KEY_2)).await;
    let status = read_ingress(&service).await.expect_err("old key missing");
    assert_eq!(status.code(), Code::Internal);
    assert!(!status.message().contains(&handover));
    service.stop().await;

    // Re-encrypting with both keys configured moves everything to the active key.
    let rewritten =
        shopctrl_config::reencrypt_secrets(&service.settings(&format!("{KEY_2},{KEY_1}"))).await?;
    assert_eq!(rewritten, 3);
    assert!(
        raw_secrets(&service)
            .await
            .iter()
            .all(|(_, k, _)| k == "k2")
    );
    service.launch(service.settings(KEY_2)).await;
    let delivery = service
        .internal()
        .get_delivery_shop(call(
            GetInternalShopRequest {
                shop_id: SHOP.into(),
            },
            FLOW_CALLBACK,
            None,
        ))
        .await?
        .into_inner();
    assert_eq!(delivery.callback_secret, callback);
    assert_eq!(delivery.access_key, ACCESS_KEY);
    Ok(())
}
