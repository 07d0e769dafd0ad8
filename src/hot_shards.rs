//! Hot shards: how many replicas each shard needs for its coming load, decided ahead of
//! it.
//!
//! Owns: per shard, the replica count its fragment rate needs, as a pure state machine
//! over explicit inputs (times in microseconds, rates in fragments per second), in the
//! autoscaler's three modes: `predictive` (the forecast's upper bound ahead, and never
//! less than what is measured now), `reactive` (the rate measured over the last
//! interval) and `fixed` (off: every shard keeps the map's replication). No IO, no
//! clock. Which pipelines take a shard's extra copies is the shard map's business
//! ([`crate::shard_map::extra_replicas`]); a thin loop warms them and moves the map to a
//! new epoch; `tidemark simulate` runs it against the static placement.
//!
//! Why: routing can only choose among the pipelines that hold a shard. When one shard's
//! load outgrows what its replicas can serve (an announced campaign on a few popular
//! entities, a customer gone hot), every policy queues on those replicas while the rest
//! of the fleet idles; the fix is more copies of that shard, and a copy helps only once
//! it is warm. So, as P-Store does for the fleet, the copies are made before the
//! predicted load, not after it is measured.
//!
//! # The rule
//! - A shard's replicas also serve their other shards, so one shard may use at most
//!   `share` of a replica's capacity at the target utilization: a shard at rate `r`
//!   needs `ceil(r / (capacity · target_utilization · share))` replicas, at least the
//!   map's `base` replication and at most the fleet (`max`).
//! - Predictive: `r` is the highest forecast upper bound in `[now, now + warm-up +
//!   interval]` (a copy started now is useful after its warm-up; the next decision
//!   comes one interval later), or the measured rate when that is higher: a forecast
//!   that missed a load must not keep its shard under-replicated (the degraded mode is
//!   the reactive rule, never worse).
//! - Reactive: `r` is the rate measured over the last interval.
//! - Hysteresis as in [`crate::autoscale`]: a shard gains copies at once and loses them
//!   only after `down_after` consecutive decisions that wanted fewer.

use std::collections::{BTreeMap, BTreeSet};

use crate::autoscale::{hysteresis, peak_within, ForecastBucket, Mode, ScaleSettings};
use crate::shard_map::ShardId;

/// The planner's fixed inputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HotSettings {
    /// Fragments per second one pipeline serves at full utilization.
    pub capacity: f64,
    pub target_utilization: f64,
    /// Share of a replica's capacity one shard may use.
    pub share: f64,
    pub warmup_us: i64,
    pub interval_us: i64,
    /// The shard map's replication (every shard's floor).
    pub base: usize,
    /// Pipelines in the fleet (every shard's ceiling).
    pub max: usize,
    pub down_after: u32,
}

impl HotSettings {
    /// Replicas a shard at `rate` needs.
    pub fn needed(&self, rate: f64) -> usize {
        ScaleSettings {
            capacity: self.capacity * self.share,
            target_utilization: self.target_utilization,
            warmup_us: self.warmup_us,
            interval_us: self.interval_us,
            min: self.base,
            max: self.max.max(self.base),
            down_after: self.down_after,
        }
        .needed(rate)
    }
}

/// One shard whose replica count a decision changed.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardChange {
    pub shard: ShardId,
    pub current: usize,
    pub target: usize,
    /// The rate the target was sized for.
    pub sized_for_rate: f64,
    pub reason: String,
}

/// The planner's state between decisions: the shards above the base replication.
#[derive(Clone, Debug)]
pub struct HotShards {
    pub settings: HotSettings,
    pub mode: Mode,
    /// Shard -> (replicas, consecutive decisions that wanted fewer). Only shards above
    /// `base`.
    hot: BTreeMap<ShardId, (usize, u32)>,
}

impl HotShards {
    pub fn new(settings: HotSettings, mode: Mode) -> HotShards {
        HotShards { settings, mode, hot: BTreeMap::new() }
    }

    /// Replicas wanted per shard, for the shards above the base replication.
    pub fn targets(&self) -> BTreeMap<ShardId, usize> {
        self.hot.iter().map(|(s, (n, _))| (*s, *n)).collect()
    }

    /// Replicas wanted for `shard`, when it is above the base replication.
    pub fn target(&self, shard: ShardId) -> Option<usize> {
        self.hot.get(&shard).map(|(n, _)| *n)
    }

    /// One decision at `now_us` from each shard's forecast buckets and the rate measured
    /// per shard over the last interval (shards missing from both are at rest). Returns
    /// the shards whose target changed, by shard id.
    pub fn decide(
        &mut self,
        now_us: i64,
        forecast: &BTreeMap<ShardId, Vec<ForecastBucket>>,
        measured: &BTreeMap<ShardId, f64>,
    ) -> Vec<ShardChange> {
        let s = self.settings;
        if matches!(self.mode, Mode::Fixed(_)) {
            let changes = self
                .hot
                .iter()
                .map(|(shard, (n, _))| ShardChange {
                    shard: *shard,
                    current: *n,
                    target: s.base,
                    sized_for_rate: 0.0,
                    reason: "hot-shard replication off".into(),
                })
                .collect();
            self.hot.clear();
            return changes;
        }
        let horizon = now_us + s.warmup_us + s.interval_us;
        let rate_of = |shard: ShardId| -> (f64, String) {
            let now = measured.get(&shard).copied().unwrap_or(0.0);
            if self.mode == Mode::Reactive {
                return (now, format!("measured {now:.0}/s"));
            }
            match forecast.get(&shard).and_then(|f| peak_within(f, now_us, horizon)) {
                Some(p) if p >= now => {
                    (p, format!("forecast upper bound {p:.0}/s within warm-up + interval ({} ms)", (horizon - now_us) / 1000))
                }
                Some(p) => (now, format!("measured {now:.0}/s above the forecast's {p:.0}/s")),
                None => (now, format!("no forecast: measured {now:.0}/s")),
            }
        };
        let mut shards: BTreeSet<ShardId> = self.hot.keys().copied().collect();
        let quick = |r: f64| s.needed(r) > s.base;
        shards.extend(measured.iter().filter(|(_, r)| quick(**r)).map(|(k, _)| *k));
        if self.mode == Mode::Predictive {
            for (shard, buckets) in forecast {
                if buckets.iter().any(|b| b.end_us > now_us && b.start_us < horizon && quick(b.upper_rate)) {
                    shards.insert(*shard);
                }
            }
        }
        let mut changes = Vec::new();
        for shard in shards {
            let (rate, why) = rate_of(shard);
            let needed = s.needed(rate);
            let (current, mut fewer) = self.hot.get(&shard).copied().unwrap_or((s.base, 0));
            let target = hysteresis(needed, current, &mut fewer, s.down_after);
            if target > s.base {
                self.hot.insert(shard, (target, fewer));
            } else {
                self.hot.remove(&shard);
            }
            if target != current {
                let reason = if target > current {
                    format!("{why}: needs {needed} replicas, add {}", target - current)
                } else {
                    format!("{why}: needs {needed} for {} decisions, drop {}", s.down_after, current - target)
                };
                changes.push(ShardChange { shard, current, target, sized_for_rate: rate, reason });
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `testdata/hot_shards.txt`: `settings capacity=C util=U share=S warmup_ms=W
    /// interval_ms=I base=B max=M down_after=D`, `mode predictive|reactive|off`,
    /// `forecast SHARD START_MS-END_MS=RATE ...` (replaces that shard's buckets),
    /// `measured SHARD=RATE ...` (replaces every measured rate), `decide AT_MS =>
    /// SHARD:REPLICAS ...` (every shard above the base after the decision, or `none`).
    #[test]
    fn hot_shards_fixture() {
        let mut planner: Option<HotShards> = None;
        let mut settings = None;
        let mut forecast: BTreeMap<ShardId, Vec<ForecastBucket>> = BTreeMap::new();
        let mut measured: BTreeMap<ShardId, f64> = BTreeMap::new();
        let mut checked = 0;
        for d in crate::fixture::directives("hot_shards.txt") {
            let (n, line, want) = (d.line, d.text.as_str(), d.want.as_deref());
            let w: Vec<&str> = d.words.iter().map(String::as_str).collect();
            let kv = |k: &str| -> f64 {
                w.iter().find_map(|x| x.strip_prefix(&format!("{k}="))).unwrap_or_else(|| panic!("line {n}: {k}")).parse().unwrap()
            };
            match w[0] {
                "settings" => {
                    settings = Some(HotSettings {
                        capacity: kv("capacity"),
                        target_utilization: kv("util"),
                        share: kv("share"),
                        warmup_us: kv("warmup_ms") as i64 * 1000,
                        interval_us: kv("interval_ms") as i64 * 1000,
                        base: kv("base") as usize,
                        max: kv("max") as usize,
                        down_after: kv("down_after") as u32,
                    })
                }
                "mode" => {
                    let mode = match w[1] {
                        "predictive" => Mode::Predictive,
                        "reactive" => Mode::Reactive,
                        "off" => Mode::Fixed(0),
                        other => panic!("line {n}: mode {other}"),
                    };
                    match planner.as_mut() {
                        Some(p) => p.mode = mode,
                        None => planner = Some(HotShards::new(settings.expect("settings first"), mode)),
                    }
                }
                "forecast" => {
                    let buckets = w[2..].iter().map(|b| crate::autoscale::fixture_bucket(b)).collect();
                    forecast.insert(w[1].parse().unwrap(), buckets);
                }
                "measured" => {
                    measured = w[1..]
                        .iter()
                        .map(|x| {
                            let (s, r) = x.split_once('=').unwrap();
                            (s.parse().unwrap(), r.parse().unwrap())
                        })
                        .collect()
                }
                "decide" => {
                    let p = planner.as_mut().expect("mode first");
                    let changes = p.decide(w[1].parse::<i64>().unwrap() * 1000, &forecast, &measured);
                    let got: Vec<String> = p.targets().iter().map(|(s, n)| format!("{s}:{n}")).collect();
                    let got = if got.is_empty() { "none".to_string() } else { got.join(" ") };
                    let reasons: Vec<String> = changes.iter().map(|c| format!("{}: {}", c.shard, c.reason)).collect();
                    assert_eq!(got, want.unwrap(), "line {n}: {line} ({})", reasons.join("; "));
                    for c in &changes {
                        assert_ne!(c.current, c.target, "line {n}: a change changes something");
                    }
                    checked += 1;
                }
                other => panic!("line {n}: unknown directive {other}"),
            }
        }
        assert!(checked >= 8, "{checked} checks");
    }
}
