//! A small in-process `ConfigInternalService` for tests and the benchmark: it serves
//! `GetIngressShop` from a map, checks the bearer token, and answers `NotFound` for unknown
//! shops. The ingress reaches it through its real gRPC client.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use shopctrl_proto::v1::{
    DeliveryShop, EmployeeAccess, GetEmployeeAccessRequest, GetInternalShopRequest, IngressShop,
    RoutingShop,
    config_internal_service_server::{ConfigInternalService, ConfigInternalServiceServer},
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The shops the fake knows, shared with the test that drives it.
#[derive(Clone, Default)]
pub struct FakeConfig {
    shops: Arc<RwLock<HashMap<String, IngressShop>>>,
    token: Arc<str>,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeConfig {
    pub fn new(token: &str) -> Self {
        Self {
            token: token.into(),
            ..Self::default()
        }
    }

    pub fn upsert(&self, shop: IngressShop) {
        if let Ok(mut shops) = self.shops.write() {
            shops.insert(shop.shop_id.clone(), shop);
        }
    }

    /// GetIngressShop calls served so far.
    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Serves on `addr` (port 0 for any) until `stop`; returns the bound address.
    pub async fn serve(
        self,
        addr: SocketAddr,
        stop: CancellationToken,
    ) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(ConfigInternalServiceServer::new(self))
                .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
                .await;
            if let Err(error) = result {
                tracing::warn!(%error, "fake config server stopped");
            }
        });
        Ok(bound)
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let expected = format!("Bearer {}", self.token);
        match request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
        {
            Some(value) if value == expected => Ok(()),
            _ => Err(Status::unauthenticated("bad service token")),
        }
    }
}

#[tonic::async_trait]
impl ConfigInternalService for FakeConfig {
    async fn get_ingress_shop(
        &self,
        request: Request<GetInternalShopRequest>,
    ) -> Result<Response<IngressShop>, Status> {
        self.authorize(&request)?;
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let shop_id = request.into_inner().shop_id;
        let shop = self
            .shops
            .read()
            .ok()
            .and_then(|shops| shops.get(&shop_id).cloned());
        shop.map(Response::new)
            .ok_or_else(|| Status::not_found("unknown shop"))
    }

    async fn get_delivery_shop(
        &self,
        _request: Request<GetInternalShopRequest>,
    ) -> Result<Response<DeliveryShop>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn get_routing_shop(
        &self,
        _request: Request<GetInternalShopRequest>,
    ) -> Result<Response<RoutingShop>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn get_employee_access(
        &self,
        _request: Request<GetEmployeeAccessRequest>,
    ) -> Result<Response<EmployeeAccess>, Status> {
        Err(Status::unimplemented("fake"))
    }
}
