//! Pre-signed request sets for HTTP load tools: every request carries a valid JWT with its own
//! `jti` (so replay protection never short-circuits a request), over a pool of realistic
//! bodies. Written as two files a wrk Lua script reads: `bodies.txt` (one compact JSON body per
//! line) and `tokens.txt` (`<body index>\t<token>` per line).

use std::io::Write;

use crate::{
    signing::{JwtRequest, sign_jwt},
    webhooks::{Channel, Content, Conversation, webhook_path},
};

/// What to generate.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub public_base: String,
    pub shop_id: String,
    pub signing_key: String,
    /// Number of signed requests (tokens).
    pub count: usize,
    /// Number of distinct bodies (conversations spread over the shards).
    pub bodies: usize,
    /// Token lifetime; long enough to cover generation plus the run.
    pub lifetime_seconds: i64,
}

/// Writes `bodies.txt` and `tokens.txt` into `dir`.
pub fn write_load_files(spec: &LoadSpec, dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = webhook_path(&spec.shop_id);
    let url = format!("{}{}", spec.public_base.trim_end_matches('/'), path);
    let mut bodies = Vec::with_capacity(spec.bodies);
    for i in 0..spec.bodies.max(1) {
        let channel = if i % 4 == 3 {
            Channel::WebWidget
        } else {
            Channel::WhatsApp
        };
        let conversation = Conversation::new(channel, &format!("3161234{i:04}"));
        let body = conversation.inbound(
            &uuid::Uuid::new_v4().simple().to_string(),
            &Content::Text(format!("Hello, I have a question about order {i}")),
        );
        bodies.push(body.to_string());
    }
    let mut out = std::io::BufWriter::new(std::fs::File::create(dir.join("bodies.txt"))?);
    for body in &bodies {
        writeln!(out, "{body}")?;
    }
    out.flush()?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(dir.join("tokens.txt"))?);
    let now = chrono::Utc::now().timestamp();
    for i in 0..spec.count {
        let index = i % bodies.len();
        let token = sign_jwt(&JwtRequest {
            signing_key: &spec.signing_key,
            url: &url,
            body: bodies[index].as_bytes(),
            issued_at: now - 1,
            lifetime_seconds: spec.lifetime_seconds,
            jti: None,
            alg: Default::default(),
        });
        writeln!(out, "{}\t{token}", index + 1)?;
    }
    out.flush()
}
