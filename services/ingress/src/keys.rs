//! Each shop's ingress secrets (signing key, handover secret, enabled and legacy flags), looked
//! up from the config service and cached per shop.
//!
//! Cache rules: an entry is dropped when a ConfigChanged event names its shop; entries older
//! than the TTL, and all entries after the change-event subscription was re-established (events
//! may have been missed), are refreshed on next use, but a refresh that fails keeps serving the
//! old entry, so a config outage does not stop ingress for shops it has seen. Unknown shops are
//! cached briefly too, so a flood of requests for made-up shops does not reach config.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use shopctrl_proto::v1::{
    GetInternalShopRequest, IngressShop,
    config_internal_service_client::ConfigInternalServiceClient,
};
use tonic::{Code, service::Interceptor, transport::Channel};

/// Why the config service could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyLookupError {
    #[error("config service unavailable: {0}")]
    Unavailable(String),
    #[error("config service refused our token: {0}")]
    Unauthorized(String),
}

/// Where shop secrets come from. Production: the config service over gRPC.
pub trait ShopKeys: Send + Sync + 'static {
    /// The shop's ingress settings; `None` when config does not know the shop.
    fn fetch<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<IngressShop>, KeyLookupError>>;
}

#[derive(Clone)]
struct BearerToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

type Client = ConfigInternalServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, BearerToken>,
>;

/// `ConfigInternalService.GetIngressShop` with the ingress service token.
#[derive(Clone)]
pub struct GrpcShopKeys {
    client: Client,
    timeout: Duration,
}

impl GrpcShopKeys {
    /// A lazily connecting client: ingress starts even while config is down.
    pub fn new(url: &str, token: &str, timeout: Duration) -> Result<Self, KeyLookupError> {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| KeyLookupError::Unavailable(format!("invalid CONFIG_GRPC_URL: {e}")))?
            .connect_timeout(timeout)
            .timeout(timeout);
        let channel = endpoint.connect_lazy();
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| KeyLookupError::Unauthorized("token is not valid metadata".into()))?;
        Ok(Self {
            client: ConfigInternalServiceClient::with_interceptor(channel, BearerToken(header)),
            timeout,
        })
    }
}

impl ShopKeys for GrpcShopKeys {
    fn fetch<'a>(
        &'a self,
        shop_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<IngressShop>, KeyLookupError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let call = client.get_ingress_shop(GetInternalShopRequest {
                shop_id: shop_id.to_owned(),
            });
            match tokio::time::timeout(self.timeout, call).await {
                Err(_) => Err(KeyLookupError::Unavailable("timed out".into())),
                Ok(Ok(response)) => Ok(Some(response.into_inner())),
                Ok(Err(status)) => match status.code() {
                    Code::NotFound | Code::InvalidArgument => Ok(None),
                    Code::Unauthenticated | Code::PermissionDenied => {
                        Err(KeyLookupError::Unauthorized(status.message().to_owned()))
                    }
                    _ => Err(KeyLookupError::Unavailable(format!(
                        "{:?}: {}",
                        status.code(),
                        status.message()
                    ))),
                },
            }
        })
    }
}

/// What the cache knows of a shop.
#[derive(Clone)]
struct Entry {
    shop: Option<Arc<IngressShop>>,
    fetched: Instant,
    generation: u64,
}

/// The answer for one shop.
#[derive(Debug, Clone)]
pub enum ShopLookup {
    /// Known and enabled.
    Enabled(Arc<IngressShop>),
    /// Unknown or disabled (answered alike: 404 with one body).
    NotFound,
}

/// Per-shop cache in front of a [`ShopKeys`] source.
pub struct KeyCache {
    source: Arc<dyn ShopKeys>,
    ttl: Duration,
    negative_ttl: Duration,
    entries: RwLock<HashMap<String, Entry>>,
    /// Bumped when the subscription restarts: older entries count as stale.
    generation: std::sync::atomic::AtomicU64,
    fetching: tokio::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyCache {
    pub fn new(source: Arc<dyn ShopKeys>, ttl: Duration, negative_ttl: Duration) -> Self {
        Self {
            source,
            ttl,
            negative_ttl,
            entries: RwLock::new(HashMap::new()),
            generation: std::sync::atomic::AtomicU64::new(0),
            fetching: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, shop_id: &str) -> Option<Entry> {
        self.entries.read().ok()?.get(shop_id).cloned()
    }

    fn fresh(&self, entry: &Entry) -> bool {
        let ttl = if entry.shop.is_some() {
            self.ttl
        } else {
            self.negative_ttl
        };
        entry.generation == self.generation.load(std::sync::atomic::Ordering::SeqCst)
            && entry.fetched.elapsed() < ttl
    }

    fn answer(entry: &Entry) -> ShopLookup {
        match &entry.shop {
            Some(shop) if shop.enabled => ShopLookup::Enabled(shop.clone()),
            _ => ShopLookup::NotFound,
        }
    }

    /// The shop's settings: cached, else fetched (one fetch per shop at a time). A failed
    /// refresh serves the stale entry; only a shop never seen fails with the lookup error.
    pub async fn get(&self, shop_id: &str) -> Result<ShopLookup, KeyLookupError> {
        if let Some(entry) = self.cached(shop_id)
            && self.fresh(&entry)
        {
            return Ok(Self::answer(&entry));
        }
        let lock = {
            let mut fetching = self.fetching.lock().await;
            fetching
                .entry(shop_id.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
                .clone()
        };
        let _one_fetch = lock.lock().await;
        let stale = self.cached(shop_id);
        if let Some(entry) = &stale
            && self.fresh(entry)
        {
            return Ok(Self::answer(entry));
        }
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let result = self.source.fetch(shop_id).await;
        let outcome = match result {
            Ok(shop) => {
                let entry = Entry {
                    shop: shop.map(Arc::new),
                    fetched: Instant::now(),
                    generation,
                };
                let answer = Self::answer(&entry);
                if let Ok(mut entries) = self.entries.write() {
                    entries.insert(shop_id.to_owned(), entry);
                }
                Ok(answer)
            }
            Err(error) => match stale {
                Some(entry) => {
                    tracing::warn!(shop_id, %error, "config lookup failed; serving the cached entry");
                    Ok(Self::answer(&entry))
                }
                None => Err(error),
            },
        };
        drop(_one_fetch);
        self.fetching.lock().await.remove(shop_id);
        outcome
    }

    /// Forgets one shop (a ConfigChanged event named it).
    pub fn invalidate(&self, shop_id: &str) {
        if let Ok(mut entries) = self.entries.write() {
            entries.remove(shop_id);
        }
    }

    /// Marks every entry stale (refreshed on next use, served if the refresh fails).
    pub fn mark_all_stale(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Number of cached shops (metrics, tests).
    pub fn len(&self) -> usize {
        self.entries.read().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)] // tests fail loudly
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    struct Scripted {
        calls: AtomicUsize,
        down: AtomicBool,
        key: RwLock<String>,
    }

    impl ShopKeys for Scripted {
        fn fetch<'a>(
            &'a self,
            shop_id: &'a str,
        ) -> BoxFuture<'a, Result<Option<IngressShop>, KeyLookupError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if self.down.load(Ordering::SeqCst) {
                    return Err(KeyLookupError::Unavailable("down".into()));
                }
                Ok((shop_id != "unknown").then(|| IngressShop {
                    shop_id: shop_id.to_owned(),
                    enabled: shop_id != "disabled",
                    signing_key: self.key.read().map(|k| k.clone()).unwrap_or_default(),
                    ..IngressShop::default()
                }))
            })
        }
    }

    #[tokio::test]
    async fn caches_invalidates_and_serves_stale_during_outage() {
        let source = Arc::new(Scripted {
            calls: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            key: RwLock::new("k1".into()),
        });
        let cache = KeyCache::new(
            source.clone(),
            Duration::from_secs(60),
            Duration::from_secs(5),
        );
        let key = |lookup: ShopLookup| match lookup {
            ShopLookup::Enabled(shop) => shop.signing_key.clone(),
            ShopLookup::NotFound => "404".into(),
        };
        assert_eq!(key(cache.get("s").await.expect("lookup")), "k1");
        assert_eq!(key(cache.get("s").await.expect("lookup")), "k1");
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        assert_eq!(key(cache.get("unknown").await.expect("lookup")), "404");
        assert_eq!(key(cache.get("disabled").await.expect("lookup")), "404");

        *source.key.write().expect("lock") = "k2".into();
        cache.invalidate("s");
        assert_eq!(key(cache.get("s").await.expect("lookup")), "k2");

        source.down.store(true, Ordering::SeqCst);
        cache.mark_all_stale();
        assert_eq!(key(cache.get("s").await.expect("stale served")), "k2");
        assert!(cache.get("never-seen").await.is_err());
    }
}
