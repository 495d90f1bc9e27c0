//! The SSRF guard for event webhook URLs, which shop admins type in.
//!
//! Two checks, both needed: the URL itself (https only unless development allows http; an IP
//! literal host is checked right away because the HTTP client never resolves it), and every
//! address a host name resolves to, checked inside the resolver the HTTP client connects
//! with. The second check is what stops DNS rebinding: the addresses that are checked are the
//! very ones the connection is made to. Private, loopback, link-local (cloud metadata at
//! 169.254.169.254 included), unspecified, shared (CGNAT), multicast and reserved ranges are
//! refused unless `SSRF_ALLOW_CIDRS` lists them. The client follows no redirects and uses no
//! proxy, so neither can lead it elsewhere.

use std::{
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
};

use ipnet::IpNet;
use url::{Host, Url};

/// Why an invalid allow-list was configured.
#[derive(Debug, thiserror::Error)]
pub enum SsrfPolicyError {
    #[error("SSRF_ALLOW_CIDRS entry {0:?} is not a CIDR")]
    Cidr(String),
}

/// Why a destination is refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SsrfError {
    #[error("the event webhook URL is not a valid URL")]
    InvalidUrl,
    #[error("scheme {0} is not allowed (https only)")]
    Scheme(String),
    #[error("the event webhook URL has no host")]
    NoHost,
    #[error("{host} resolves to {ip}, a private, loopback, link-local or reserved address")]
    Forbidden { host: String, ip: IpAddr },
    #[error("{0} resolves to no address")]
    NoAddress(String),
}

/// What outbound webhooks may reach.
#[derive(Debug, Clone, Default)]
pub struct SsrfPolicy {
    pub allow_http: bool,
    pub allow: Vec<IpNet>,
}

impl SsrfPolicy {
    /// From `ALLOW_HTTP_WEBHOOK_URLS` and the comma-separated `SSRF_ALLOW_CIDRS` (a bare
    /// address counts as a single-host network).
    pub fn parse(allow_http: bool, cidrs: &str) -> Result<Self, SsrfPolicyError> {
        let mut allow = Vec::new();
        for part in cidrs.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net = part
                .parse::<IpNet>()
                .or_else(|_| part.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| SsrfPolicyError::Cidr(part.to_owned()))?;
            allow.push(net);
        }
        Ok(Self { allow_http, allow })
    }

    /// Checks scheme and host of a URL before anything is sent.
    pub fn check_url(&self, raw: &str) -> Result<Url, SsrfError> {
        let url = Url::parse(raw).map_err(|_| SsrfError::InvalidUrl)?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            other => return Err(SsrfError::Scheme(other.to_owned())),
        }
        match url.host() {
            None => return Err(SsrfError::NoHost),
            Some(Host::Ipv4(ip)) => self.check_ip(raw_host(&url), IpAddr::V4(ip))?,
            Some(Host::Ipv6(ip)) => self.check_ip(raw_host(&url), IpAddr::V6(ip))?,
            Some(Host::Domain(_)) => {}
        }
        Ok(url)
    }

    /// Refuses an address outside the public internet unless the allow-list has it.
    pub fn check_ip(&self, host: &str, ip: IpAddr) -> Result<(), SsrfError> {
        if self.allow.iter().any(|net| net.contains(&ip)) || !is_internal(ip) {
            Ok(())
        } else {
            Err(SsrfError::Forbidden {
                host: host.to_owned(),
                ip,
            })
        }
    }
}

fn raw_host(url: &Url) -> &str {
    url.host_str().unwrap_or_default()
}

/// Whether an address is anything but a public unicast address.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            // Addresses that embed an IPv4 address are judged by it.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal_v4(v4);
            }
            let segments = v6.segments();
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = segments[6].to_be_bytes();
                let [c, d] = segments[7].to_be_bytes();
                return is_internal_v4(Ipv4Addr::new(a, b, c, d));
            }
            is_internal_v6(v6)
        }
    }
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        // shared address space (CGNAT; some clouds put metadata there)
        || (a == 100 && (64..128).contains(&b))
        // IETF protocol assignments
        || (a == 192 && b == 0 && c == 0)
        // benchmarking
        || (a == 198 && (b == 18 || b == 19))
        // reserved
        || a >= 240
}

fn is_internal_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // unique local (fc00::/7, AWS metadata fd00:ec2::254 included)
        || (first & 0xfe00) == 0xfc00
        // link-local and the old site-local
        || (first & 0xffc0) == 0xfe80
        || (first & 0xffc0) == 0xfec0
        // documentation
        || first == 0x2001 && ip.segments()[1] == 0x0db8
        // IPv4-compatible (deprecated) addresses
        || ip.segments()[..6] == [0, 0, 0, 0, 0, 0]
}

/// The boxed future a [`Resolver`] returns.
pub type LookupFuture = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>>;

/// Turns a host name into addresses. Injectable so tests can make a name resolve to a
/// private address.
pub trait Resolver: Send + Sync + 'static {
    fn lookup(&self, host: &str) -> LookupFuture;
}

/// The operating system's resolver.
#[derive(Debug, Clone, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup(&self, host: &str) -> LookupFuture {
        let host = host.to_owned();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// The resolver the webhook client connects with: it resolves, then keeps only addresses the
/// policy allows, and fails with [`SsrfError`] when none is left.
pub struct GuardedResolver {
    inner: Arc<dyn Resolver>,
    policy: Arc<SsrfPolicy>,
}

impl GuardedResolver {
    pub fn new(inner: Arc<dyn Resolver>, policy: Arc<SsrfPolicy>) -> Self {
        Self { inner, policy }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let lookup = self.inner.lookup(&host);
        let policy = self.policy.clone();
        Box::pin(async move {
            let ips = lookup.await?;
            let mut allowed = Vec::new();
            let mut refused = None;
            for ip in ips {
                match policy.check_ip(&host, ip) {
                    Ok(()) => allowed.push(SocketAddr::new(ip, 0)),
                    Err(error) => refused = Some(error),
                }
            }
            if allowed.is_empty() {
                let error = refused.unwrap_or(SsrfError::NoAddress(host));
                return Err(Box::new(error) as Box<dyn std::error::Error + Send + Sync>);
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// The guard's refusal somewhere in an HTTP client error's cause chain, if that is what
/// stopped the request.
pub fn refusal_in(error: &(dyn std::error::Error + 'static)) -> Option<SsrfError> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(refusal) = e.downcast_ref::<SsrfError>() {
            return Some(refusal.clone());
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn internal_ranges_are_refused() {
        for s in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.100.100.200",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(is_internal(ip(s)), "{s} must be internal");
        }
        for s in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(!is_internal(ip(s)), "{s} must be public");
        }
    }

    #[test]
    fn url_checks_scheme_and_literal_hosts() {
        let strict = SsrfPolicy::default();
        assert!(strict.check_url("https://flows.example.com/x").is_ok());
        assert_eq!(
            strict.check_url("http://flows.example.com/x"),
            Err(SsrfError::Scheme("http".into()))
        );
        assert!(matches!(
            strict.check_url("https://127.0.0.1/x"),
            Err(SsrfError::Forbidden { .. })
        ));
        assert!(matches!(
            strict.check_url("https://[::1]:8443/x"),
            Err(SsrfError::Forbidden { .. })
        ));
        assert!(matches!(
            strict.check_url("https://169.254.169.254/latest/meta-data"),
            Err(SsrfError::Forbidden { .. })
        ));
        assert_eq!(strict.check_url("not a url"), Err(SsrfError::InvalidUrl));
        assert!(matches!(
            strict.check_url("ftp://example.com/"),
            Err(SsrfError::Scheme(_))
        ));
    }

    #[test]
    fn allow_list_opens_ranges() -> Result<(), SsrfPolicyError> {
        let dev = SsrfPolicy::parse(true, "127.0.0.0/8, 10.9.9.9")?;
        assert!(dev.check_url("http://127.0.0.1:8080/x").is_ok());
        assert!(dev.check_ip("h", ip("10.9.9.9")).is_ok());
        assert!(dev.check_ip("h", ip("10.9.9.8")).is_err());
        assert!(SsrfPolicy::parse(false, "nope").is_err());
        Ok(())
    }
}
