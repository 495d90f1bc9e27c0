//! gRPC health and reflection (v1 and v1alpha), the ops endpoints, graceful shutdown, start-up
//! during a rolling upgrade.

use std::time::Duration;

use shopctrl_proto::v1::{GetShopSettingsRequest, Role};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};

use crate::support::{OWNER, SHOP, TestResult, TestService, as_owner};

const EXPECTED_SERVICES: [&str; 5] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "shopctrl.messaging.v1.ConfigInternalService",
    "shopctrl.messaging.v1.ConfigService",
];

#[tokio::test]
async fn health_and_reflection_answer() -> TestResult {
    let service = TestService::start().await;

    let mut health = HealthClient::new(service.channel());
    for name in [
        "",
        "shopctrl.messaging.v1.ConfigService",
        "shopctrl.messaging.v1.ConfigInternalService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: name.into(),
            })
            .await?
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{name:?}");
    }

    let mut reflection =
        v1::server_reflection_client::ServerReflectionClient::new(service.channel());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await?
        .into_inner();
    let response = responses.message().await?.expect("a v1 reflection answer");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected v1 reflection answer");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(names, EXPECTED_SERVICES);

    // The error-detail types resolve too, so grpcurl prints BadRequest violations decoded.
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "google.rpc.BadRequest".into(),
            ),
        ),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await?
        .into_inner();
    let response = responses.message().await?.expect("a v1 reflection answer");
    assert!(
        matches!(
            response.message_response,
            Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "{:?}",
        response.message_response
    );

    let mut alpha =
        v1alpha::server_reflection_client::ServerReflectionClient::new(service.channel());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "shopctrl.messaging.v1.ConfigService".into(),
            ),
        ),
    };
    let mut responses = alpha
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await?
        .into_inner();
    let response = responses
        .message()
        .await?
        .expect("a v1alpha reflection answer");
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        response.message_response
    else {
        panic!(
            "unexpected v1alpha reflection answer: {:?}",
            response.message_response
        );
    };
    assert!(!files.file_descriptor_proto.is_empty());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = alpha
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await?
        .into_inner();
    let response = responses.message().await?.expect("a v1alpha list");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected v1alpha list answer");
    };
    assert_eq!(list.service.len(), EXPECTED_SERVICES.len());
    Ok(())
}

#[tokio::test]
async fn ops_endpoints_and_graceful_shutdown() -> TestResult {
    let mut service = TestService::start().await;
    service.grant_role(SHOP, OWNER, Role::ShopOwnerAdmin).await;
    service
        .admin()
        .get_shop_settings(as_owner(GetShopSettingsRequest {
            shop_id: SHOP.into(),
        }))
        .await?;

    let (status, body) = service.ops_get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = service.ops_get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("database") && body.contains("broker"),
        "{body}"
    );
    let (status, metrics) = service.ops_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"config_grpc_requests_total{method="GetShopSettings",code="Ok"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"config_grpc_requests_total{method="UpsertEmployeeRole",code="Ok"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("outbox_pending"), "{metrics}");

    let grpc_addr = service.grpc_addr();
    let ops_addr = service.ops_addr();
    let started = std::time::Instant::now();
    service.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(tokio::net::TcpStream::connect(grpc_addr).await.is_err());
    let refused = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(ops_addr),
    )
    .await;
    assert!(!matches!(refused, Ok(Ok(_))), "ops server still up");
    Ok(())
}

/// During a rolling upgrade the previous release still starts after the new one migrated: a
/// migration it does not know is no reason to refuse.
#[tokio::test]
async fn migrations_of_a_newer_release_do_not_stop_the_previous_one() {
    let db = shopctrl_testkit::TestDatabase::create().await;
    let mut settings = shopctrl_config::Settings::defaults();
    settings.database_url = shopctrl_config::Redacted::new(db.url());
    let pool = shopctrl_config::connect_and_migrate(&settings)
        .await
        .unwrap();
    sqlx::query(
        "insert into config._sqlx_migrations
             (version, description, success, checksum, execution_time)
         values (99999999, 'from a newer release', true, '\\x00', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let pool = shopctrl_config::connect_and_migrate(&settings)
        .await
        .expect("the previous release starts");
    pool.close().await;
}
