//! Shop delivery settings (access key, event webhook URL, callback secret, template) from the
//! config service, cached per replica. A config-changed event for a shop drops its entry, so a
//! new URL or secret takes effect on the next delivery without a restart; a TTL bounds how long
//! a missed event could leave an entry stale.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use shopctrl_proto::v1::{
    DeliveryShop, GetInternalShopRequest,
    config_internal_service_client::ConfigInternalServiceClient,
};
use tonic::{Code, transport::Channel};

/// Why the settings could not be read. Either way the message is not at fault: the consumer
/// pauses and tries again.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ShopLookupError {
    #[error("the config service is unavailable: {0}")]
    Unavailable(String),
    #[error("the config service refused the call: {0}")]
    Refused(String),
}

/// The boxed future a [`ShopSource`] returns.
pub type ShopFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<DeliveryShop>, ShopLookupError>> + Send + 'a>>;

/// Where delivery settings come from (`None`: no such shop). Behind a trait so tests can serve
/// their own.
pub trait ShopSource: Send + Sync + 'static {
    fn delivery_shop<'a>(&'a self, shop_id: &'a str) -> ShopFuture<'a>;
}

/// `ConfigInternalService.GetDeliveryShop` over gRPC, as caller `flow-callback`.
#[derive(Clone)]
pub struct GrpcShopSource {
    client: ConfigInternalServiceClient<Channel>,
    authorization: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl GrpcShopSource {
    /// Connects lazily: the service starts while config is still coming up.
    pub fn new(url: &str, token: &str, timeout: Duration) -> Result<Self, ShopLookupError> {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| ShopLookupError::Refused(format!("CONFIG_GRPC_URL: {e}")))?
            .timeout(timeout)
            .connect_timeout(timeout);
        let authorization = format!("Bearer {token}")
            .parse()
            .map_err(|_| ShopLookupError::Refused("CONFIG_SERVICE_TOKEN is not ASCII".into()))?;
        Ok(Self {
            client: ConfigInternalServiceClient::new(endpoint.connect_lazy()),
            authorization,
        })
    }
}

impl ShopSource for GrpcShopSource {
    fn delivery_shop<'a>(&'a self, shop_id: &'a str) -> ShopFuture<'a> {
        Box::pin(async move {
            let mut request = tonic::Request::new(GetInternalShopRequest {
                shop_id: shop_id.to_owned(),
            });
            request
                .metadata_mut()
                .insert("authorization", self.authorization.clone());
            let mut client = self.client.clone();
            match client.get_delivery_shop(request).await {
                Ok(response) => Ok(Some(response.into_inner())),
                Err(status) if status.code() == Code::NotFound => Ok(None),
                Err(status)
                    if matches!(
                        status.code(),
                        Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument
                    ) =>
                {
                    Err(ShopLookupError::Refused(format!(
                        "{:?}: {}",
                        status.code(),
                        status.message()
                    )))
                }
                Err(status) => Err(ShopLookupError::Unavailable(format!(
                    "{:?}: {}",
                    status.code(),
                    status.message()
                ))),
            }
        })
    }
}

struct Entry {
    shop: Option<Arc<DeliveryShop>>,
    fetched: Instant,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<String, Entry>,
    /// Bumped on every invalidation, so a lookup that was in flight while the shop changed
    /// does not store what it read before the change.
    generation: u64,
}

/// A per-replica cache in front of a [`ShopSource`].
#[derive(Clone)]
pub struct ShopCache {
    source: Arc<dyn ShopSource>,
    ttl: Duration,
    state: Arc<RwLock<CacheState>>,
}

impl ShopCache {
    pub fn new(source: Arc<dyn ShopSource>, ttl: Duration) -> Self {
        Self {
            source,
            ttl,
            state: Arc::new(RwLock::new(CacheState::default())),
        }
    }

    /// The shop's settings (`None`: unknown shop), from the cache when fresh.
    pub async fn get(&self, shop_id: &str) -> Result<Option<Arc<DeliveryShop>>, ShopLookupError> {
        let generation = match self.state.read() {
            Ok(state) => {
                if let Some(entry) = state.entries.get(shop_id)
                    && entry.fetched.elapsed() < self.ttl
                {
                    return Ok(entry.shop.clone());
                }
                state.generation
            }
            Err(_) => 0,
        };
        let shop = self.source.delivery_shop(shop_id).await?.map(Arc::new);
        if let Ok(mut state) = self.state.write()
            && state.generation == generation
        {
            state.entries.insert(
                shop_id.to_owned(),
                Entry {
                    shop: shop.clone(),
                    fetched: Instant::now(),
                },
            );
        }
        Ok(shop)
    }

    /// Drops one shop's entry (a config-changed event for it arrived).
    pub fn invalidate(&self, shop_id: &str) {
        if let Ok(mut state) = self.state.write() {
            state.generation += 1;
            state.entries.remove(shop_id);
        }
    }

    /// Drops everything (the config-changed feed was reconnected, so events may be missed).
    pub fn clear(&self) {
        if let Ok(mut state) = self.state.write() {
            state.generation += 1;
            state.entries.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    struct Counting(AtomicU32);

    impl ShopSource for Counting {
        fn delivery_shop<'a>(&'a self, shop_id: &'a str) -> ShopFuture<'a> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                Ok((shop_id == "known").then(|| DeliveryShop {
                    shop_id: shop_id.to_owned(),
                    version: u64::from(n),
                    ..DeliveryShop::default()
                }))
            })
        }
    }

    #[tokio::test]
    async fn caches_until_invalidated() -> Result<(), ShopLookupError> {
        let source = Arc::new(Counting(AtomicU32::new(0)));
        let cache = ShopCache::new(source.clone(), Duration::from_secs(60));
        assert_eq!(cache.get("known").await?.map(|s| s.version), Some(0));
        assert_eq!(cache.get("known").await?.map(|s| s.version), Some(0));
        assert!(cache.get("unknown").await?.is_none());
        cache.invalidate("known");
        assert_eq!(cache.get("known").await?.map(|s| s.version), Some(2));
        cache.clear();
        assert_eq!(cache.get("known").await?.map(|s| s.version), Some(3));
        assert_eq!(source.0.load(Ordering::SeqCst), 4);
        Ok(())
    }
}
