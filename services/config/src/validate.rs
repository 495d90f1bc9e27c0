//! The rules every setting must satisfy. Each rule names its field; a request collects every
//! violation (not just the first) so the admin UI can mark all bad fields at once.
//!
//! The Event webhook URL check looks at the URL as written: the scheme, literal IP addresses
//! and `localhost`. A host name that *resolves* to a private address can only be caught when
//! connecting (DNS can change after we validated), which is flow-callback's job: it checks
//! every resolved address at connect time.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use url::{Host, Url};

/// What an Event webhook URL may point at, from `ALLOW_HTTP_WEBHOOK_URLS` and
/// `SSRF_ALLOW_CIDRS` (the same variables flow-callback reads, so both agree).
#[derive(Debug, Clone, Default)]
pub struct UrlPolicy {
    pub allow_http: bool,
    /// Networks exempt from the private-address rule (development stacks on 127.0.0.1).
    pub allow: Vec<IpNet>,
}

/// Why `SSRF_ALLOW_CIDRS` was refused.
#[derive(Debug, thiserror::Error)]
#[error("SSRF_ALLOW_CIDRS entry {0:?} is not a CIDR or an address")]
pub struct CidrError(String);

impl UrlPolicy {
    /// From the comma-separated list; a bare address is a single-host network.
    pub fn parse(allow_http: bool, cidrs: &str) -> Result<Self, CidrError> {
        let mut allow = Vec::new();
        for part in cidrs.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net = part
                .parse::<IpNet>()
                .or_else(|_| part.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| CidrError(part.to_owned()))?;
            allow.push(net);
        }
        Ok(Self { allow_http, allow })
    }
}

/// The largest number of conversation slots per employee we accept.
pub const MAX_CONVERSATION_SLOTS: u32 = 1000;
const MAX_URL_LEN: usize = 2048;

/// One bad field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

/// Violations collected over a whole request.
#[derive(Debug, Default)]
pub struct Violations(Vec<Violation>);

impl Violations {
    pub fn add(&mut self, field: &str, description: impl Into<String>) {
        self.0.push(Violation {
            field: field.to_owned(),
            description: description.into(),
        });
    }

    /// Records the outcome of one rule.
    pub fn check(&mut self, field: &str, outcome: Result<(), String>) {
        if let Err(description) = outcome {
            self.add(field, description);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_vec(self) -> Vec<Violation> {
        self.0
    }
}

/// MessageBird workspace ids: Bird's are UUIDs, older ones shorter tokens; both fit
/// letters, digits, '-' and '_' (at most 64), which keeps them safe in URLs and logs.
pub fn workspace_id(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(()); // clears it (messaging is then disabled)
    }
    if value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        Ok(())
    } else {
        Err(
            "must be a MessageBird workspace id: letters, digits, '-' or '_' (at most 64), \
             e.g. 2d7f8a3e-5c1b-4a9e-8f00-1a2b3c4d5e6f"
                .into(),
        )
    }
}

fn key_shaped(value: &str, what: &str) -> Result<(), String> {
    if !(16..=256).contains(&value.len()) {
        return Err(format!("{what} must be 16 to 256 characters long"));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{what} may contain only printable characters without spaces"
        ));
    }
    Ok(())
}

/// A MessageBird access key: must be a LIVE key; test keys (`test_...`) are refused.
pub fn access_key(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(()); // clears it
    }
    if value.trim().to_ascii_lowercase().starts_with("test_") {
        return Err("must be a LIVE access key; test keys (test_...) are refused".into());
    }
    key_shaped(value, "the access key")
}

/// The webhook signing key.
pub fn signing_key(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    key_shaped(value, "the signing key")
}

/// WhatsApp template names: lowercase letters, digits and underscores, at most 512.
pub fn template_name(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    if value.len() <= 512
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Ok(())
    } else {
        Err("must be lowercase letters, digits and '_' (at most 512), as WhatsApp requires".into())
    }
}

/// WhatsApp template namespaces look like `cdb2df51_9816_c754_c5a4_64cdabdcad3e`.
pub fn template_namespace(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    if value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        Ok(())
    } else {
        Err("must be letters, digits, '_' or '-' (at most 64), e.g. cdb2df51_9816_c754_c5a4_64cdabdcad3e".into())
    }
}

/// WhatsApp language codes: `en`, `pt_BR`, `zh_HK`, `fil`.
pub fn template_language(value: &str) -> Result<(), String> {
    let (lang, region) = match value.split_once('_') {
        Some((lang, region)) => (lang, Some(region)),
        None => (value, None),
    };
    let lang_ok = (2..=3).contains(&lang.len()) && lang.bytes().all(|b| b.is_ascii_lowercase());
    let region_ok =
        region.is_none_or(|r| r.len() == 2 && r.bytes().all(|b| b.is_ascii_uppercase()));
    if lang_ok && region_ok {
        Ok(())
    } else {
        Err("must be a WhatsApp language code such as en, en_US or pt_BR".into())
    }
}

pub fn conversation_slots(value: u32) -> Result<(), String> {
    if value <= MAX_CONVERSATION_SLOTS {
        Ok(())
    } else {
        Err(format!(
            "must be between 0 and {MAX_CONVERSATION_SLOTS} (0 means never auto-assign)"
        ))
    }
}

/// The Event webhook URL: https (http only when the policy allows it), a host that is not a
/// private, loopback, link-local or metadata address (unless the policy lists its network), no
/// credentials in the URL.
pub fn event_webhook_url(value: &str, policy: &UrlPolicy) -> Result<(), String> {
    let allow_http = policy.allow_http;
    if value.is_empty() {
        return Ok(()); // clears it: no availability events are posted
    }
    if value.len() > MAX_URL_LEN {
        return Err(format!("must be at most {MAX_URL_LEN} characters"));
    }
    let url = Url::parse(value).map_err(|e| format!("is not a valid URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_http => {}
        "http" => {
            return Err(
                "must use https (http is accepted only when ALLOW_HTTP_WEBHOOK_URLS is on)".into(),
            );
        }
        other => return Err(format!("must use https, not {other}")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain credentials".into());
    }
    match url.host() {
        None => Err("must name a host".into()),
        Some(Host::Ipv4(ip)) => public_ip(IpAddr::V4(ip), &policy.allow),
        Some(Host::Ipv6(ip)) => public_ip(IpAddr::V6(ip), &policy.allow),
        Some(Host::Domain(domain)) => {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            if domain == "localhost" || domain.ends_with(".localhost") {
                Err("must not point at localhost".into())
            } else if domain == "metadata.google.internal" || domain == "metadata" {
                Err("must not point at a cloud metadata service".into())
            } else {
                Ok(())
            }
        }
    }
}

/// Networks a webhook must never reach: loopback, private, link-local (cloud metadata lives at
/// 169.254.169.254 and fd00:ec2::254), carrier-grade NAT, multicast, reserved and the like.
fn forbidden_networks() -> Vec<IpNet> {
    let v4: &[(Ipv4Addr, u8)] = &[
        (Ipv4Addr::new(0, 0, 0, 0), 8),
        (Ipv4Addr::new(10, 0, 0, 0), 8),
        (Ipv4Addr::new(100, 64, 0, 0), 10),
        (Ipv4Addr::new(127, 0, 0, 0), 8),
        (Ipv4Addr::new(169, 254, 0, 0), 16),
        (Ipv4Addr::new(172, 16, 0, 0), 12),
        (Ipv4Addr::new(192, 0, 0, 0), 24),
        (Ipv4Addr::new(192, 0, 2, 0), 24),
        (Ipv4Addr::new(192, 168, 0, 0), 16),
        (Ipv4Addr::new(198, 18, 0, 0), 15),
        (Ipv4Addr::new(198, 51, 100, 0), 24),
        (Ipv4Addr::new(203, 0, 113, 0), 24),
        (Ipv4Addr::new(224, 0, 0, 0), 4),
        (Ipv4Addr::new(240, 0, 0, 0), 4),
    ];
    let v6: &[(Ipv6Addr, u8)] = &[
        (Ipv6Addr::UNSPECIFIED, 128),
        (Ipv6Addr::LOCALHOST, 128),
        (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64),
        (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32),
        (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
        (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
        (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10),
        (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
    ];
    let mut nets = Vec::with_capacity(v4.len() + v6.len());
    for (addr, len) in v4 {
        if let Ok(net) = Ipv4Net::new(*addr, *len) {
            nets.push(IpNet::V4(net));
        }
    }
    for (addr, len) in v6 {
        if let Ok(net) = Ipv6Net::new(*addr, *len) {
            nets.push(IpNet::V6(net));
        }
    }
    nets
}

fn public_ip(ip: IpAddr, allow: &[IpNet]) -> Result<(), String> {
    if allow.iter().any(|net| net.contains(&ip)) {
        return Ok(());
    }
    // IPv4 written as IPv6 (::ffff:10.0.0.1, ::10.0.0.1, 64:ff9b::10.0.0.1) reaches the IPv4
    // address: judge that one.
    let ip = match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                let nat64 = s[0] == 0x64 && s[1] == 0xff9b && s[2..6].iter().all(|x| *x == 0);
                let compat = s[..6].iter().all(|x| *x == 0) && (s[6] != 0 || s[7] > 1);
                if nat64 || compat {
                    let [a, b] = s[6].to_be_bytes();
                    let [c, d] = s[7].to_be_bytes();
                    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
                } else {
                    ip
                }
            }
        },
        IpAddr::V4(_) => ip,
    };
    if forbidden_networks().iter().any(|net| net.contains(&ip)) {
        Err(format!(
            "must not point at a private, loopback, link-local or reserved address ({ip})"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls() {
        let strict = UrlPolicy::default();
        let ok = [
            "https://flows.messagebird.com/flows/abc/invoke",
            "https://8.8.8.8/hook",
            "https://[2606:4700::1111]/x",
        ];
        for url in ok {
            assert_eq!(event_webhook_url(url, &strict), Ok(()), "{url}");
        }
        let bad = [
            "http://example.com/x",
            "ftp://example.com/x",
            "https://127.0.0.1/x",
            "https://2130706433/x",
            "https://0x7f.1/x",
            "https://10.1.2.3/x",
            "https://172.16.0.1/x",
            "https://192.168.1.1/x",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/x",
            "https://0.0.0.0/x",
            "https://[::1]/x",
            "https://[fe80::1]/x",
            "https://[fd00:ec2::254]/x",
            "https://[::ffff:10.0.0.1]/x",
            "https://[64:ff9b::a00:1]/x",
            "https://localhost/x",
            "https://api.localhost./x",
            "https://metadata.google.internal/x",
            "https://user:pw@example.com/x",
            "not a url",
        ];
        for url in bad {
            assert!(event_webhook_url(url, &strict).is_err(), "{url}");
        }
        let dev = UrlPolicy::parse(true, "").unwrap_or_default();
        assert_eq!(event_webhook_url("http://example.com/x", &dev), Ok(()));
        assert!(event_webhook_url("http://127.0.0.1/x", &dev).is_err());
        let local = UrlPolicy::parse(true, "127.0.0.0/8, ::1").unwrap_or_default();
        assert_eq!(event_webhook_url("http://127.0.0.1:8080/x", &local), Ok(()));
        assert_eq!(event_webhook_url("http://[::1]/x", &local), Ok(()));
        assert!(event_webhook_url("http://10.0.0.1/x", &local).is_err());
        assert!(UrlPolicy::parse(false, "nonsense").is_err());
    }

    #[test]
    fn formats() {
        assert!(workspace_id("2d7f8a3e-5c1b-4a9e-8f00-1a2b3c4d5e6f").is_ok());
        assert!(workspace_id("ws1234").is_ok());
        assert!(workspace_id("ws 1").is_err());
        assert!(workspace_id("ws/1").is_err());
        assert!(workspace_id(&"w".repeat(65)).is_err());
        assert!(access_key("test_abcdefghijklmnopqrstuv").is_err());
        assert!(access_key("TEST_abcdefghijklmnopqrstuv").is_err());
        assert!(access_key("live_abcdefghijklmnopqrstuv").is_ok());
        assert!(access_key("short").is_err());
        assert!(signing_key("with space in the key....").is_err());
        assert!(template_name("order_update_2").is_ok());
        assert!(template_name("Order Update").is_err());
        assert!(template_namespace("cdb2df51_9816_c754_c5a4_64cdabdcad3e").is_ok());
        assert!(template_namespace("bad/namespace").is_err());
        for ok in ["en", "en_US", "pt_BR", "fil"] {
            assert!(template_language(ok).is_ok(), "{ok}");
        }
        for bad in ["", "EN", "en-US", "en_us", "english"] {
            assert!(template_language(bad).is_err(), "{bad}");
        }
        assert!(conversation_slots(0).is_ok());
        assert!(conversation_slots(1000).is_ok());
        assert!(conversation_slots(1001).is_err());
    }
}
