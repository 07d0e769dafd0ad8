//! Query patterns: the query log counted into time buckets, per shard and per
//! (entity, service, operation), so that load can be forecast.
//!
//! Owns: [`PatternCounter`], the bounded in-memory counts. Pure: no IO, no clock (the
//! caller passes each query's start time). Must never: grow without bound. The bounds:
//! at most `buckets_max` buckets are kept (the oldest go first); within a bucket at
//! most `patterns_max` (entity, service, operation) keys (plus the aggregate) are kept: when a new key
//! arrives at a full bucket, the least loaded key so far is folded into one aggregate
//! key whose entity is [`OTHER`] (so the individually counted keys are the heaviest,
//! as in space-saving heavy-hitter counting, and no query is lost from the total). Per-shard counts are bounded by the shard count.
//! Memory is therefore O(buckets_max x (shards + patterns_max)).
//!
//! A query counts once for its pattern and once for every shard it touched (a fan-out
//! query loads every shard); a pipeline counts the fragments routed to it. Queries that name no single entity count under entity
//! [`ALL`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The entity of queries that did not name exactly one entity.
pub const ALL: &str = "*";
/// The entity of patterns beyond the per-bucket bound.
pub const OTHER: &str = "*other*";

/// (entity, service, operation); `None` service/operation = any.
pub type PatternKey = (String, Option<String>, Option<String>);

/// What one query contributes.
#[derive(Debug, Clone, Default)]
pub struct Observation<'a> {
    pub start_us: i64,
    pub shards: &'a [u32],
    pub entity: Option<&'a str>,
    pub service: Option<&'a str>,
    pub operation: Option<&'a str>,
    /// Busy time in microseconds (duration of the statement).
    pub busy_us: i64,
    pub rows: u64,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Cost {
    pub queries: f64,
    pub busy_us: f64,
    pub rows: f64,
}

impl Cost {
    fn add(&mut self, o: &Observation<'_>) {
        self.queries += 1.0;
        self.busy_us += o.busy_us.max(0) as f64;
        self.rows += o.rows as f64;
    }
}

#[derive(Debug, Default, Clone)]
struct Bucket {
    start_us: i64,
    total: Cost,
    shards: BTreeMap<u32, Cost>,
    /// Fragments run per pipeline (from routing decisions).
    pipelines: BTreeMap<String, Cost>,
    patterns: BTreeMap<PatternKey, Cost>,
    /// The individually counted patterns (not *other*), least loaded first and, among
    /// equals, largest key first: the next one to fold into *other* when the bucket
    /// is full. Kept beside `patterns` so that a full bucket costs a few tree
    /// operations per query, not a scan of every pattern.
    by_load: BTreeSet<(u64, Reverse<PatternKey>)>,
}

/// The scopes a series can be read for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Total,
    Shard(u32),
    Pipeline(String),
    Pattern(PatternKey),
}

#[derive(Debug)]
pub struct PatternCounter {
    bucket_us: i64,
    buckets_max: usize,
    patterns_max: usize,
    buckets: VecDeque<Bucket>,
}

impl PatternCounter {
    pub fn new(bucket_secs: u64, buckets_max: usize, patterns_max: usize) -> PatternCounter {
        PatternCounter {
            bucket_us: (bucket_secs.max(1) as i64) * 1_000_000,
            buckets_max: buckets_max.max(1),
            patterns_max,
            buckets: VecDeque::new(),
        }
    }

    pub fn bucket_us(&self) -> i64 {
        self.bucket_us
    }

    /// The start of the bucket holding `t_us`.
    pub fn bucket_start(&self, t_us: i64) -> i64 {
        t_us.div_euclid(self.bucket_us) * self.bucket_us
    }

    /// The bucket holding `t_us`, created if needed; None when it is older than
    /// everything kept while the window is full.
    fn bucket_mut(&mut self, t_us: i64) -> Option<&mut Bucket> {
        let start = self.bucket_start(t_us);
        let idx = match self.buckets.binary_search_by_key(&start, |b| b.start_us) {
            Ok(i) => i,
            Err(i) => {
                // Too old to keep: older than everything while the window is full.
                if i == 0 && self.buckets.len() >= self.buckets_max {
                    return None;
                }
                self.buckets.insert(i, Bucket { start_us: start, ..Default::default() });
                let mut i = i;
                while self.buckets.len() > self.buckets_max {
                    self.buckets.pop_front();
                    i = i.saturating_sub(1);
                }
                i
            }
        };
        Some(&mut self.buckets[idx])
    }

    /// Counts one fragment run by `pipeline` at `t_us`.
    pub fn observe_fragment(&mut self, t_us: i64, pipeline: &str) {
        if let Some(b) = self.bucket_mut(t_us) {
            let c = b.pipelines.entry(pipeline.to_string()).or_default();
            c.queries += 1.0;
        }
    }

    pub fn observe(&mut self, o: &Observation<'_>) {
        let patterns_max = self.patterns_max;
        let Some(b) = self.bucket_mut(o.start_us) else { return };
        b.total.add(o);
        for s in o.shards {
            b.shards.entry(*s).or_default().add(o);
        }
        let key: PatternKey = (
            o.entity.unwrap_or(ALL).to_string(),
            o.service.map(str::to_string),
            o.operation.map(str::to_string),
        );
        let other: PatternKey = (OTHER.to_string(), None, None);
        let is_new = !b.patterns.contains_key(&key);
        if is_new && b.patterns.len() >= patterns_max.max(1) {
            // Full: the least loaded key so far is folded into *other*, so the keys
            // counted individually are the ones carrying the most load.
            match b.by_load.pop_first() {
                Some((_, Reverse(v))) => {
                    let cost = b.patterns.remove(&v).unwrap_or_default();
                    let o = b.patterns.entry(other.clone()).or_default();
                    o.queries += cost.queries;
                    o.busy_us += cost.busy_us;
                    o.rows += cost.rows;
                }
                None => {
                    b.patterns.entry(other).or_default().add(o);
                    return;
                }
            }
        }
        let c = b.patterns.entry(key.clone()).or_default();
        let before = c.queries as u64;
        c.add(o);
        let after = c.queries as u64;
        if key != other {
            if !is_new {
                b.by_load.remove(&(before, Reverse(key.clone())));
            }
            b.by_load.insert((after, Reverse(key)));
        }
    }

    /// Query counts of `scope` for the `n` buckets ending with (and including) the
    /// bucket that starts at `last_start_us`; zeros where nothing was counted.
    pub fn series(&self, scope: &Scope, last_start_us: i64, n: usize) -> Vec<f64> {
        let first = last_start_us - (n as i64 - 1) * self.bucket_us;
        let mut out = vec![0.0; n];
        for b in self.buckets.iter().filter(|b| b.start_us >= first && b.start_us <= last_start_us) {
            let i = ((b.start_us - first) / self.bucket_us) as usize;
            out[i] = match scope {
                Scope::Total => b.total.queries,
                Scope::Shard(s) => b.shards.get(s).map_or(0.0, |c| c.queries),
                Scope::Pipeline(p) => b.pipelines.get(p).map_or(0.0, |c| c.queries),
                Scope::Pattern(k) => b.patterns.get(k).map_or(0.0, |c| c.queries),
            };
        }
        out
    }

    /// Every scope seen in the buckets from `since_us` on: the total, all shards, all
    /// pipelines, then at most `patterns_limit` patterns, busiest first.
    pub fn scopes(&self, since_us: i64, patterns_limit: usize) -> Vec<Scope> {
        let mut shards: BTreeMap<u32, f64> = BTreeMap::new();
        let mut pipelines: BTreeMap<String, f64> = BTreeMap::new();
        let mut patterns: BTreeMap<PatternKey, f64> = BTreeMap::new();
        for b in self.buckets.iter().filter(|b| b.start_us >= since_us) {
            for (p, c) in &b.pipelines {
                *pipelines.entry(p.clone()).or_default() += c.queries;
            }
            for (s, c) in &b.shards {
                *shards.entry(*s).or_default() += c.queries;
            }
            for (k, c) in &b.patterns {
                *patterns.entry(k.clone()).or_default() += c.queries;
            }
        }
        let mut p: Vec<(PatternKey, f64)> = patterns.into_iter().collect();
        p.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut out = vec![Scope::Total];
        out.extend(shards.into_keys().map(Scope::Shard));
        out.extend(pipelines.into_keys().map(Scope::Pipeline));
        out.extend(p.into_iter().take(patterns_limit).map(|(k, _)| Scope::Pattern(k)));
        out
    }

    /// Start of the newest bucket, if any.
    pub fn newest(&self) -> Option<i64> {
        self.buckets.back().map(|b| b.start_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(t: i64, shards: &[u32], entity: Option<&'static str>) -> Observation<'static> {
        let shards: &'static [u32] = Box::leak(shards.to_vec().into_boxed_slice());
        Observation { start_us: t, shards, entity, service: Some("storage"), operation: None, busy_us: 100, rows: 1 }
    }

    #[test]
    fn counts_per_bucket_scope_and_pattern() {
        let mut c = PatternCounter::new(300, 100, 10);
        let m = 300_000_000; // one bucket in µs
        c.observe(&obs(10, &[1], Some("a")));
        c.observe(&obs(20, &[1], Some("a")));
        c.observe(&obs(m + 5, &[0, 1, 2], None));
        assert_eq!(c.series(&Scope::Total, m, 2), vec![2.0, 1.0]);
        assert_eq!(c.series(&Scope::Shard(1), m, 2), vec![2.0, 1.0]);
        assert_eq!(c.series(&Scope::Shard(2), m, 3), vec![0.0, 0.0, 1.0]);
        let a: PatternKey = ("a".into(), Some("storage".into()), None);
        assert_eq!(c.series(&Scope::Pattern(a.clone()), m, 2), vec![2.0, 0.0]);
        let all: PatternKey = (ALL.into(), Some("storage".into()), None);
        assert_eq!(c.series(&Scope::Pattern(all), m, 2), vec![0.0, 1.0]);
        let scopes = c.scopes(0, 1);
        assert_eq!(scopes[0], Scope::Total);
        assert_eq!(scopes.last(), Some(&Scope::Pattern(a)));
        assert_eq!(scopes.len(), 1 + 3 + 1);
        c.observe_fragment(m + 7, "n1.p0");
        c.observe_fragment(m + 8, "n1.p0");
        assert_eq!(c.series(&Scope::Pipeline("n1.p0".into()), m, 2), vec![0.0, 2.0]);
        assert!(c.scopes(0, 0).contains(&Scope::Pipeline("n1.p0".into())));
    }

    #[test]
    fn bounded_buckets_and_patterns() {
        let mut c = PatternCounter::new(60, 3, 2);
        for b in 0..5 {
            c.observe(&obs(b * 60_000_000, &[0], Some("x")));
        }
        // Only the newest 3 buckets are kept; an observation older than all is dropped.
        assert_eq!(c.series(&Scope::Total, 4 * 60_000_000, 5), vec![0.0, 0.0, 1.0, 1.0, 1.0]);
        c.observe(&obs(0, &[0], Some("x")));
        assert_eq!(c.series(&Scope::Total, 4 * 60_000_000, 5), vec![0.0, 0.0, 1.0, 1.0, 1.0]);
        // Two keys per bucket plus *other*: the heavy key stays, light ones fold
        // into *other*, and the total never loses a query.
        let t = 4 * 60_000_000 + 1;
        for _ in 0..3 {
            c.observe(&obs(t, &[0], Some("x")));
        }
        for e in ["p", "q", "r", "s"] {
            c.observe(&Observation { entity: Some(e), ..obs(t, &[0], None) });
        }
        let x: PatternKey = ("x".into(), Some("storage".into()), None);
        let other: PatternKey = (OTHER.into(), None, None);
        let s: PatternKey = ("s".into(), Some("storage".into()), None);
        let at = 4 * 60_000_000;
        assert_eq!(c.series(&Scope::Pattern(x), at, 1), vec![4.0]);
        assert_eq!(c.series(&Scope::Pattern(other.clone()), at, 1)[0] + c.series(&Scope::Pattern(s), at, 1)[0], 4.0);
        assert_eq!(c.series(&Scope::Total, at, 1), vec![8.0]);
    }
}
