//! The retry schedule and the delay tiers.
//!
//! A failed attempt is parked in one of a fixed set of delay-tier queues: each tier queue has
//! its own `x-message-ttl` and dead-letters back to the work queue, so the broker keeps the
//! message while it waits and no consumer ever sleeps. Every message in a tier has the same
//! TTL, so the head always expires first (a per-message TTL would let a long delay block the
//! short ones behind it). A wanted pause that is no tier's exact TTL is composed: the message
//! carries its due time (`x-not-before`) and, when it comes back early, is parked again in the
//! largest tier that still fits.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// Why a schedule or tier list is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RetryPolicyError {
    #[error("invalid duration {0:?} (use e.g. 250ms, 5s, 2m, 1h)")]
    Duration(String),
    #[error("RETRY_DELAY_TIERS needs at least one tier")]
    NoTiers,
    #[error("a delay tier must be between 1 ms and 24 h, got {0:?}")]
    TierRange(Duration),
}

/// Parses `250ms`, `5s`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(raw: &str) -> Result<Duration, RetryPolicyError> {
    let raw = raw.trim();
    let bad = || RetryPolicyError::Duration(raw.to_owned());
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let value: u64 = digits.parse().map_err(|_| bad())?;
    let millis = match unit {
        "ms" => Some(value),
        "" | "s" => value.checked_mul(1000),
        "m" => value.checked_mul(60_000),
        "h" => value.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(bad)?;
    Ok(Duration::from_millis(millis))
}

/// Parses a comma-separated list of durations; an empty string is an empty list.
pub fn parse_duration_list(raw: &str) -> Result<Vec<Duration>, RetryPolicyError> {
    raw.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(parse_duration)
        .collect()
}

/// Parses a `Retry-After` value: delta seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// When to try again, and through which queues to wait.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    schedule: Vec<Duration>,
    tiers: Vec<Duration>,
    jitter: f64,
    retry_after_max: Duration,
}

impl RetryPolicy {
    /// `schedule[i]` is the pause after the (i+1)-th failed attempt; `jitter` is the spread
    /// (0.2 = ±20 %); a receiver's `Retry-After` is honoured up to `retry_after_max`.
    pub fn new(
        schedule: Vec<Duration>,
        mut tiers: Vec<Duration>,
        jitter: f64,
        retry_after_max: Duration,
    ) -> Result<Self, RetryPolicyError> {
        if tiers.is_empty() {
            return Err(RetryPolicyError::NoTiers);
        }
        for tier in &tiers {
            // x-message-ttl is an int32 of milliseconds; a zero TTL would spin.
            if tier.is_zero() || *tier > Duration::from_secs(24 * 3600) {
                return Err(RetryPolicyError::TierRange(*tier));
            }
        }
        tiers.sort();
        tiers.dedup();
        Ok(Self {
            schedule,
            tiers,
            jitter: jitter.clamp(0.0, 1.0),
            retry_after_max,
        })
    }

    /// Attempts in all, the first included.
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.schedule.len())
            .unwrap_or(u32::MAX - 1)
            .saturating_add(1)
    }

    /// The tier TTLs, shortest first.
    pub fn tiers(&self) -> &[Duration] {
        &self.tiers
    }

    /// The pause after failed attempt number `attempt` (1-based), or `None` when that was the
    /// last one. `unit` is a random number in [0, 1) that spreads the pause by the jitter;
    /// `retry_after` (already parsed) lengthens it, bounded by the configured maximum.
    pub fn delay_after(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Option<Duration> {
        let index = usize::try_from(attempt.checked_sub(1)?).ok()?;
        let base = *self.schedule.get(index)?;
        let factor = 1.0 + self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        let jittered = base.mul_f64(factor.max(0.0));
        let wanted = match retry_after {
            Some(after) => jittered.max(after.min(self.retry_after_max)),
            None => jittered,
        };
        Some(wanted)
    }

    /// The tier to park a message in that still has `remaining` to wait: the largest tier
    /// that does not overshoot, or the smallest one.
    pub fn tier_for(&self, remaining: Duration) -> Duration {
        self.tiers
            .iter()
            .rev()
            .find(|tier| **tier <= remaining)
            .or_else(|| self.tiers.first())
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }

    /// Whether a message that still has `remaining` to wait should be tried now. Never
    /// early (a `Retry-After` is a promise); the price is overshooting by at most the
    /// smallest tier.
    pub fn is_due(&self, remaining: Duration) -> bool {
        remaining.is_zero()
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::new(
            vec![ms(1000), ms(5000), ms(30_000)],
            vec![ms(30_000), ms(1000), ms(5000)],
            0.2,
            Duration::from_secs(60),
        )
        .expect("valid")
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("250ms"), Ok(ms(250)));
        assert_eq!(parse_duration("5s"), Ok(ms(5000)));
        assert_eq!(parse_duration("2m"), Ok(ms(120_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("7"), Ok(ms(7000)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(
            parse_duration_list(" 1s, 2s ,"),
            Ok(vec![ms(1000), ms(2000)])
        );
    }

    #[test]
    fn schedule_ends_after_its_last_entry() {
        let p = policy();
        assert_eq!(p.max_attempts(), 4);
        assert_eq!(p.delay_after(1, None, 0.5), Some(ms(1000)));
        assert_eq!(p.delay_after(3, None, 0.5), Some(ms(30_000)));
        assert_eq!(p.delay_after(4, None, 0.5), None);
        assert_eq!(p.delay_after(0, None, 0.5), None);
    }

    #[test]
    fn jitter_stays_within_its_spread() {
        let p = policy();
        assert_eq!(p.delay_after(2, None, 0.0), Some(ms(4000)));
        let high = p.delay_after(2, None, 0.999_999).expect("retry");
        assert!(high > ms(5990) && high <= ms(6000), "{high:?}");
    }

    #[test]
    fn retry_after_lengthens_within_bounds() {
        let p = policy();
        assert_eq!(p.delay_after(1, Some(ms(10_000)), 0.5), Some(ms(10_000)));
        // A shorter Retry-After never shortens the schedule.
        assert_eq!(p.delay_after(2, Some(ms(10)), 0.5), Some(ms(5000)));
        // Bounded by the maximum.
        assert_eq!(
            p.delay_after(1, Some(Duration::from_secs(3600)), 0.5),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn picks_the_largest_fitting_tier() {
        let p = policy();
        assert_eq!(p.tiers(), &[ms(1000), ms(5000), ms(30_000)]);
        assert_eq!(p.tier_for(ms(200)), ms(1000));
        assert_eq!(p.tier_for(ms(4999)), ms(1000));
        assert_eq!(p.tier_for(ms(7000)), ms(5000));
        assert_eq!(p.tier_for(ms(600_000)), ms(30_000));
        assert!(p.is_due(ms(0)));
        assert!(!p.is_due(ms(1)));
    }

    #[test]
    fn parses_retry_after_forms() {
        let now = DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
            .expect("date")
            .with_timezone(&Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Tue, 24 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Tue, 24 Nov 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn refuses_bad_tiers() {
        assert_eq!(
            RetryPolicy::new(vec![], vec![], 0.1, ms(1)).err(),
            Some(RetryPolicyError::NoTiers)
        );
        assert!(RetryPolicy::new(vec![], vec![ms(0)], 0.1, ms(1)).is_err());
    }
}
