use std::num::NonZeroU16;

/// The number of routing shards N, shared by ingress (which publishes) and routing (which
/// declares one queue per shard). Both check it at start-up against the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardCount(NonZeroU16);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shard count must be between 1 and 1024, got {0}")]
pub struct ShardCountError(pub u32);

impl ShardCount {
    pub fn new(n: u32) -> Result<Self, ShardCountError> {
        u16::try_from(n)
            .ok()
            .filter(|n| *n <= 1024)
            .and_then(NonZeroU16::new)
            .map(Self)
            .ok_or(ShardCountError(n))
    }

    pub fn get(self) -> u16 {
        self.0.get()
    }
}

/// FNV-1a, 64 bit: stable across processes, versions and platforms (unlike `DefaultHasher`),
/// which is what keeps one conversation on one shard forever.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator so ("ab","c") and ("a","bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The shard of a (shop, MessageBird conversation id) pair.
pub fn shard_for(shop_id: &str, messagebird_conversation_id: &str, shards: ShardCount) -> u16 {
    let hash = fnv1a(&[shop_id.as_bytes(), messagebird_conversation_id.as_bytes()]);
    // The remainder is below `shards`, which fits in u16.
    (hash % u64::from(shards.get())) as u16
}

/// The AMQP routing key `shard.<n>` of a (shop, MessageBird conversation id) pair.
pub fn shard_routing_key(
    shop_id: &str,
    messagebird_conversation_id: &str,
    shards: ShardCount,
) -> String {
    format!(
        "shard.{}",
        shard_for(shop_id, messagebird_conversation_id, shards)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_is_stable_and_in_range() -> Result<(), ShardCountError> {
        let n = ShardCount::new(8)?;
        // Pinned values: changing the hash would move live conversations between shards.
        // Cross-checked with an independent implementation of the same hash.
        assert_eq!(fnv1a(&[b"a"]), 0x089b_c907_b544_c769);
        assert_eq!(shard_for("shop-1", "conv-1", n), 5);
        for i in 0..1000 {
            assert!(shard_for("s", &format!("c{i}"), n) < 8);
        }
        assert_eq!(shard_routing_key("s", "c", ShardCount::new(1)?), "shard.0");
        assert!(ShardCount::new(0).is_err());
        assert!(ShardCount::new(1025).is_err());
        Ok(())
    }

    #[test]
    fn shards_spread_conversations() -> Result<(), ShardCountError> {
        let n = ShardCount::new(4)?;
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            counts[usize::from(shard_for("shop", &format!("{i:032x}"), n))] += 1;
        }
        assert!(counts.iter().all(|c| *c > 800), "{counts:?}");
        Ok(())
    }
}
