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

/// What an open-loop run at a fixed rate measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RateReport {
    pub offered_per_s: u32,
    pub seconds: u64,
    pub sent: usize,
    pub ok: usize,
    pub non_2xx: usize,
    pub errors: usize,
    /// From each request's scheduled send time (not its actual one, so a stalled generator or
    /// server cannot hide its own delay) to the response.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Requests that could not start on schedule because `max_in_flight` were outstanding.
    pub late_starts: usize,
}

/// Sends the pre-signed requests of `dir` (as [`write_load_files`] wrote them) to `url` at
/// `rate` per second for `seconds`, open loop: each request starts on its schedule whether or
/// not earlier ones were answered (up to `max_in_flight`), so the offered rate is the stated
/// one and queueing in the server shows in the latencies.
pub async fn fixed_rate(
    url: &str,
    dir: &std::path::Path,
    rate: u32,
    seconds: u64,
    max_in_flight: usize,
) -> anyhow::Result<RateReport> {
    let bodies: Vec<String> = std::fs::read_to_string(dir.join("bodies.txt"))?
        .lines()
        .map(str::to_owned)
        .collect();
    let mut requests = Vec::new();
    for line in std::fs::read_to_string(dir.join("tokens.txt"))?.lines() {
        let (index, token) = line
            .split_once('\t')
            .ok_or_else(|| anyhow::anyhow!("tokens.txt: no tab in {line:?}"))?;
        let index: usize = index.parse()?;
        let body = bodies
            .get(index.saturating_sub(1))
            .ok_or_else(|| anyhow::anyhow!("tokens.txt: no body {index}"))?;
        requests.push((body.clone(), token.to_owned()));
    }
    let total = usize::try_from(u64::from(rate) * seconds)?;
    anyhow::ensure!(
        requests.len() >= total,
        "{} pre-signed requests for {total} to send: write more (a reused token is a replay)",
        requests.len()
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(max_in_flight)
        .build()?;
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let start = tokio::time::Instant::now();
    let interval = std::time::Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut late_starts = 0;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (body, token)) in requests.into_iter().take(total).enumerate() {
        let scheduled = start + interval * u32::try_from(i)?;
        tokio::time::sleep_until(scheduled).await;
        let permit = match in_flight.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                late_starts += 1;
                in_flight.clone().acquire_owned().await?
            }
        };
        let (http, url) = (http.clone(), url.to_owned());
        tasks.spawn(async move {
            let answer = http
                .post(&url)
                .header("content-type", "application/json")
                .header("MessageBird-Signature-JWT", token)
                .body(body)
                .send()
                .await;
            drop(permit);
            let status = answer.map(|r| r.status().as_u16()).ok();
            (status, scheduled.elapsed().as_secs_f64() * 1000.0)
        });
    }
    let (mut ok, mut non_2xx, mut errors) = (0, 0, 0);
    let mut latencies = Vec::with_capacity(total);
    while let Some(done) = tasks.join_next().await {
        let (status, ms) = done?;
        match status {
            Some(200..=299) => ok += 1,
            Some(_) => non_2xx += 1,
            None => errors += 1,
        }
        latencies.push(ms);
    }
    latencies.sort_by(f64::total_cmp);
    let at = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(RateReport {
        offered_per_s: rate,
        seconds,
        sent: total,
        ok,
        non_2xx,
        errors,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: at(1.0),
        late_starts,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sends_every_presigned_request_once_and_counts_the_answers() {
        // Answers 200 to a token seen for the first time, 409 to a repeat: a resent token
        // would show up as non-2xx.
        let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let router = axum::Router::new().route(
            "/webhooks/messagebird/s1",
            axum::routing::post(move |headers: axum::http::HeaderMap| {
                let seen = seen.clone();
                async move {
                    let token = headers
                        .get("MessageBird-Signature-JWT")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let first = seen.lock().map(|mut s| s.insert(token)).unwrap_or(false);
                    if first {
                        axum::http::StatusCode::OK
                    } else {
                        axum::http::StatusCode::CONFLICT
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        let dir = std::env::temp_dir().join(format!("rate-test-{}", uuid::Uuid::new_v4()));
        write_load_files(
            &LoadSpec {
                public_base: format!("http://{addr}"),
                shop_id: "s1".into(),
                signing_key: "k".into(),
                count: 150,
                bodies: 4,
                lifetime_seconds: 60,
            },
            &dir,
        )
        .unwrap();
        let url = format!("http://{addr}/webhooks/messagebird/s1");
        let report = fixed_rate(&url, &dir, 150, 1, 50).await.unwrap();
        assert_eq!(report.sent, 150);
        assert_eq!(report.ok, 150, "{report:?}");
        assert_eq!(report.non_2xx + report.errors, 0);
        assert!(report.p50_ms > 0.0 && report.p99_ms >= report.p50_ms);
        // More than the files hold is refused before anything is sent.
        assert!(fixed_rate(&url, &dir, 200, 1, 50).await.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
