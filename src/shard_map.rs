//! Which shard a row belongs to: a consistent hash of its shard key.
//!
//! Owns: the key -> shard function. It is part of the on-disk format (segments are
//! stored per shard), so it must never change for an existing table.
//!
//! The function is `jump(xxh3_64(key, seed 0), shard_count)`: XXH3 (64-bit, seed 0) is
//! a specified hash with the same output on every platform and version; jump consistent
//! hashing (Lamping & Veach, 2014) maps it onto `0..shard_count` uniformly, and when the
//! shard count grows from n to n+1 only about 1/(n+1) of the keys move, all of them
//! to the new shard. Placement of shards onto pipelines is a separate, later layer.

use twox_hash::XxHash3_64;

pub type ShardId = u32;

/// Stable 64-bit hash of a shard key.
pub fn key_hash(key: &str) -> u64 {
    XxHash3_64::oneshot(key.as_bytes())
}

/// Jump consistent hash: a bucket in `0..buckets` for `key`.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    assert!(buckets > 0, "jump_hash needs at least one bucket");
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// The shard of a row whose shard key is `key`.
pub fn shard_of(key: &str, shard_count: u32) -> ShardId {
    jump_hash(key_hash(key), shard_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_values_never_change() {
        // These values are part of the storage format: if this test fails, existing
        // data directories would be read with the wrong shard pruning.
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/shard_of.txt")).unwrap();
        let mut checked = 0;
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let (key, count, want): (&str, u32, u32) = (parts[0], parts[1].parse().unwrap(), parts[2].parse().unwrap());
            assert_eq!(shard_of(key, count), want, "shard_of({key}, {count})");
            checked += 1;
        }
        assert!(checked >= 10);
    }

    #[test]
    fn growing_moves_few_keys_and_only_to_the_new_shard() {
        let keys: Vec<String> = (0..20_000).map(|i| format!("e{i:06}")).collect();
        for n in [1u32, 4, 8, 15] {
            let moved = keys
                .iter()
                .filter(|k| {
                    let (a, b) = (shard_of(k, n), shard_of(k, n + 1));
                    if a != b {
                        assert_eq!(b, n, "a key moved to an old shard");
                    }
                    a != b
                })
                .count();
            let expected = keys.len() as f64 / (n + 1) as f64;
            assert!((moved as f64) < expected * 1.1, "n={n}: moved {moved}, expected about {expected}");
        }
    }

    #[test]
    fn spread_is_even() {
        let mut counts = [0usize; 8];
        for i in 0..80_000 {
            counts[shard_of(&format!("entity-{i}"), 8) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
    }
}
