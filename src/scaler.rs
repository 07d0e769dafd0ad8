//! The autoscale loop: the IO shell around [`crate::autoscale::Autoscaler`] (how many
//! pipelines) and [`crate::hot_shards::HotShards`] (how many replicas each hot shard).
//!
//! Owns: every `autoscale_interval_ms`, reading the inputs (the forecast's upper bound
//! of fragments per bucket summed over this node's pipelines, the fragments completed
//! since the last decision, one pipeline's capacity from its slots and the balancer's
//! median service time, and the warm-up time measured on this node), asking the core
//! for a target, acting on it, and recording the decision in
//! `system.scaling_decisions`. On a node without peers it starts and stops in-process
//! pipelines: a new pipeline first reads the segments of the shards it will hold
//! through its segment cache (that read is its warm-up, timed: the core starts
//! pipelines that much ahead of the load), then joins the shard map at the next epoch;
//! a stopped one leaves the map at once and is removed when idle (queries that pinned
//! an earlier epoch may still reach it meanwhile, so none fails). On a node with peers
//! it runs `scale_up_command` / `scale_down_command` instead.
//!
//! Hot shards (`hot_shards = predictive / reactive`), in the same loop: the inputs are
//! the fragments routed per shard since the last decision and the forecast's upper
//! bound per shard (the `shard` scope); a shard that gains copies first has its
//! segments read by each pipeline that takes it (timed: that is a copy's warm-up),
//! then the shard map moves to an epoch with the copies (`ShardMap::with_hot`);
//! dropped copies leave at once (queries that pinned an earlier epoch still reach
//! them, and the pipelines stay). Every change is a row of `system.scaling_decisions`
//! with its shard.
//!
//! Units: rates are per real second (the measured rate, a pipeline's capacity, and the
//! forecast converted from counts per bucket of clock time); times are the node's
//! clock (`now`, the forecast's buckets, and the warm-up and interval converted from
//! real time), so an accelerated clock (`--time-scale`, replays) scales consistently.
//!
//! Must never: decide on a guessed capacity (without a measured service time it holds
//! and says so), remove a pipeline a running query may still reach, or run a command
//! without a time limit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use crate::autoscale::{Autoscaler, ForecastBucket, Mode, ScaleSettings};
use crate::hot_shards::{HotSettings, HotShards};
use crate::clock::Clock;
use crate::config::Config;
use crate::error::Result;
use crate::forecaster::Forecaster;
use crate::node::LocalPipelineFactory;
use crate::pipeline::{Cluster, Pipeline, ScalingRecord};
use crate::shard_map::{PipelineId, ShardId};
use crate::storage::Storage;

/// A scale command may run this long.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Decisions that want fewer pipelines (or copies) before the fleet (or shard) shrinks.
const DOWN_AFTER: u32 = 3;
/// Share of a replica's capacity one hot shard may use (its replicas serve other
/// shards too).
const HOT_SHARE: f64 = 0.5;

pub struct Scaler {
    cluster: Arc<Cluster>,
    forecaster: Arc<Forecaster>,
    storage: Arc<Storage>,
    clock: Clock,
    factory: LocalPipelineFactory,
    /// The fleet's size, when `autoscale` is on.
    core: Option<Autoscaler>,
    /// Hot shards' copies, when `hot_shards` is on.
    hot: Option<HotShards>,
    /// Measured warm-up of one shard's new copy (smoothed), in milliseconds.
    copy_warmup_ms: Option<f64>,
    interval: Duration,
    bucket_secs: u64,
    has_peers: bool,
    up_command: Option<String>,
    down_command: Option<String>,
    /// Measured warm-up of a new pipeline (smoothed), in milliseconds.
    warmup_ms: Option<f64>,
    completed_before: u64,
    last: Instant,
}

impl Scaler {
    pub fn new(
        config: &Config,
        cluster: Arc<Cluster>,
        forecaster: Arc<Forecaster>,
        storage: Arc<Storage>,
        clock: Clock,
        factory: LocalPipelineFactory,
    ) -> Result<Option<Scaler>> {
        let parse = |m: &str| match m {
            "predictive" => Some(Mode::Predictive),
            "reactive" => Some(Mode::Reactive),
            _ => None,
        };
        let (mode, hot_mode) = (parse(&config.autoscale), parse(&config.hot_shards));
        if mode.is_none() && hot_mode.is_none() {
            return Ok(None);
        }
        let local = config.local_pipelines() as usize;
        let max = match config.autoscale_pipelines_max {
            0 => (2 * local).max(1),
            m => m as usize,
        };
        let min = (config.autoscale_pipelines_min as usize).clamp(1, max);
        let interval = Duration::from_millis(config.autoscale_interval_ms.max(10));
        let settings = ScaleSettings {
            capacity: 0.0,
            target_utilization: config.autoscale_target_utilization,
            warmup_us: 0,
            interval_us: interval.as_micros() as i64,
            min,
            max,
            down_after: DOWN_AFTER,
        };
        let hot = hot_mode.map(|m| {
            HotShards::new(
                HotSettings {
                    capacity: 0.0,
                    target_utilization: config.autoscale_target_utilization,
                    share: HOT_SHARE,
                    warmup_us: 0,
                    interval_us: interval.as_micros() as i64,
                    base: 1,
                    max: 1,
                    down_after: DOWN_AFTER,
                },
                m,
            )
        });
        let completed_before = cluster.local_completed();
        Ok(Some(Scaler {
            cluster,
            forecaster,
            storage,
            clock,
            factory,
            core: mode.map(|m| Autoscaler::new(settings, m)),
            hot,
            copy_warmup_ms: None,
            interval,
            bucket_secs: config.forecast_bucket_secs.max(1),
            has_peers: !config.parsed_peers()?.is_empty(),
            up_command: config.scale_up_command.clone(),
            down_command: config.scale_down_command.clone(),
            warmup_ms: None,
            completed_before,
            last: Instant::now(),
        }))
    }

    /// Runs forever, one decision per interval.
    pub fn spawn(mut self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = self.tick().await {
                    tracing::warn!(error = %e, "autoscale decision failed");
                }
            }
        })
    }

    /// One round of decisions (the fleet's, then the hot shards'), acted on and
    /// recorded; returns what was recorded.
    pub async fn tick(&mut self) -> Result<Vec<ScalingRecord>> {
        for id in self.cluster.reap() {
            tracing::info!(pipeline = %id, "retired pipeline removed");
        }
        let now_us = self.clock.now_us();
        let elapsed = self.last.elapsed().as_secs_f64().max(1e-3);
        self.last = Instant::now();
        let completed = self.cluster.local_completed();
        let measured = completed.saturating_sub(self.completed_before) as f64 / elapsed;
        self.completed_before = completed;
        let placed = self.placed_local();
        let current = placed.len();
        let snapshot = self.cluster.load_snapshot();
        let service_s = snapshot.loads().iter().map(|l| l.service_s).fold(0.0, f64::max);
        let capacity = if service_s > 0.0 { self.factory.slots as f64 / service_s } else { 0.0 };
        if self.warmup_ms.is_none() {
            self.warmup_ms = Some(self.measure_warmup().await?);
        }
        let warmup_ms = self.warmup_ms.unwrap_or(0.0);
        let mut out = Vec::new();
        if self.core.is_some() {
            out.push(self.fleet(now_us, current, &placed, measured, capacity, warmup_ms).await?);
        }
        if self.hot.is_some() {
            out.extend(self.hot_shards(now_us, elapsed, capacity, warmup_ms).await?);
        }
        Ok(out)
    }

    /// The fleet's decision.
    async fn fleet(&mut self, now_us: i64, current: usize, placed: &[PipelineId], measured: f64, capacity: f64, warmup_ms: f64) -> Result<ScalingRecord> {
        let (warmup_us, interval_us) = (self.clock_us(warmup_ms * 1000.0), self.clock_us(self.interval.as_micros() as f64));
        let core = self.core.as_mut().expect("autoscale is on");
        let mut record = ScalingRecord {
            time_us: now_us,
            mode: core.mode.as_str(),
            shard: None,
            current: current as u32,
            target: current as u32,
            sized_for_rate: measured,
            capacity,
            warmup_ms,
            reason: String::new(),
            action: "none".into(),
            epoch: self.cluster.shard_map().epoch,
        };
        if capacity <= 0.0 {
            record.reason = "no fragment has run yet: capacity unknown, holding".into();
            self.cluster.record_scaling(record.clone());
            return Ok(record);
        }
        core.settings.capacity = capacity;
        core.settings.warmup_us = warmup_us;
        core.settings.interval_us = interval_us;
        let forecast = self.forecast_buckets();
        let core = self.core.as_mut().expect("autoscale is on");
        let d = core.decide(now_us, current, &forecast, measured);
        let target = d.target.clamp(core.settings.min, core.settings.max);
        record.target = target as u32;
        record.sized_for_rate = d.sized_for_rate;
        record.reason = d.reason;
        if target != current {
            record.action = if self.has_peers {
                self.run_command(target, current).await
            } else if target > current {
                self.start(target - current, placed).await?
            } else {
                self.stop(current - target, placed)
            };
        }
        record.epoch = self.cluster.shard_map().epoch;
        self.cluster.record_scaling(record.clone());
        Ok(record)
    }

    /// The hot shards' decisions: shards that gain copies are warmed on the pipelines
    /// that take them, then the map moves to the next epoch.
    async fn hot_shards(&mut self, now_us: i64, span_s: f64, capacity: f64, fleet_warmup_ms: f64) -> Result<Vec<ScalingRecord>> {
        let measured: BTreeMap<ShardId, f64> =
            self.cluster.take_shard_fragments().into_iter().map(|(s, n)| (s, n as f64 / span_s)).collect();
        if capacity <= 0.0 {
            return Ok(Vec::new());
        }
        let map = self.cluster.shard_map();
        let forecast = self.shard_forecast_buckets();
        // Until a copy's warm-up has been measured, the fleet's (a whole pipeline's
        // shards) bounds it from above: copies start early rather than late.
        let warmup_ms = self.copy_warmup_ms.unwrap_or(fleet_warmup_ms);
        let (warmup_us, interval_us) = (self.clock_us(warmup_ms * 1000.0), self.clock_us(self.interval.as_micros() as f64));
        let hot = self.hot.as_mut().expect("hot_shards is on");
        hot.settings.capacity = capacity;
        hot.settings.warmup_us = warmup_us;
        hot.settings.interval_us = interval_us;
        hot.settings.base = map.base_copies().max(1);
        hot.settings.max = map.pipelines.len().max(1);
        let mode = hot.mode.as_str();
        let changes = hot.decide(now_us, &forecast, &measured);
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let targets: BTreeMap<ShardId, u32> = hot.targets().into_iter().map(|(s, n)| (s, n as u32)).collect();
        let next = map.with_hot(&targets);
        let mut records = Vec::new();
        for c in &changes {
            let before = map.replicas_of(c.shard);
            let after = next.replicas_of(c.shard);
            let mut warm_ms = 0.0;
            if after.len() > before.len() {
                let t0 = Instant::now();
                let paths = self.segment_paths(&[c.shard]);
                for p in after.iter().filter(|p| !before.contains(p)) {
                    if let Some(pipeline) = self.cluster.pipeline(*p) {
                        pipeline.warm(&paths).await?;
                    }
                }
                warm_ms = t0.elapsed().as_secs_f64() * 1000.0;
                self.copy_warmup_ms = Some(self.copy_warmup_ms.map_or(warm_ms, |w| 0.7 * w + 0.3 * warm_ms));
            }
            let added: Vec<String> = after.iter().filter(|p| !before.contains(p)).map(|p| p.to_string()).collect();
            let dropped: Vec<String> = before.iter().filter(|p| !after.contains(p)).map(|p| p.to_string()).collect();
            let action = match (added.is_empty(), dropped.is_empty()) {
                (false, _) => format!("copied to {} (warmed in {warm_ms:.1} ms)", added.join(", ")),
                (true, false) => format!("dropped copies on {}", dropped.join(", ")),
                (true, true) => "none (no pipeline left to take a copy)".into(),
            };
            records.push(ScalingRecord {
                time_us: now_us,
                mode,
                shard: Some(c.shard),
                current: before.len() as u32,
                target: c.target as u32,
                sized_for_rate: c.sized_for_rate,
                capacity,
                warmup_ms: if added.is_empty() { warmup_ms } else { warm_ms },
                reason: c.reason.clone(),
                action,
                epoch: 0,
            });
        }
        let epoch = self.cluster.set_hot(&targets);
        for r in &mut records {
            r.epoch = epoch;
            tracing::info!(shard = r.shard, current = r.current, target = r.target, epoch, reason = %r.reason, action = %r.action, "hot shard");
            self.cluster.record_scaling(r.clone());
        }
        Ok(records)
    }

    /// The forecast's upper bound of fragments per second per coming bucket, per shard.
    fn shard_forecast_buckets(&self) -> BTreeMap<ShardId, Vec<ForecastBucket>> {
        let f = self.forecaster.adjusted();
        let bucket_us = self.bucket_secs as i64 * 1_000_000;
        let mut out: BTreeMap<ShardId, Vec<ForecastBucket>> = BTreeMap::new();
        for r in f.rows.iter().filter(|r| r.scope == "shard") {
            if let Ok(shard) = r.key.parse::<ShardId>() {
                out.entry(shard).or_default().push(ForecastBucket {
                    start_us: r.bucket_start_us,
                    end_us: r.bucket_start_us + bucket_us,
                    upper_rate: self.real_rate(r.upper80.max(0.0)),
                });
            }
        }
        out
    }

    /// Real microseconds (a measured warm-up, the decision interval) as microseconds of
    /// the node's clock, which the forecast's buckets and `now` are in: the same under
    /// a real clock, `scale` times as many under an accelerated one (`--time-scale`).
    fn clock_us(&self, real_us: f64) -> i64 {
        (real_us * self.clock.scale()) as i64
    }

    /// A bucket's forecast count as a rate per real second, the unit of the measured
    /// rate and of a pipeline's capacity (a bucket of `bucket_secs` of clock time lasts
    /// `bucket_secs / scale` real seconds).
    fn real_rate(&self, per_bucket: f64) -> f64 {
        per_bucket * self.clock.scale() / self.bucket_secs as f64
    }

    /// This node's pipelines in the shard map, by id.
    fn placed_local(&self) -> Vec<PipelineId> {
        self.cluster.placed_pipelines().into_iter().filter(|id| id.node == self.factory.node_id).collect()
    }

    /// The forecast's upper bound of fragments per second per coming bucket, summed over
    /// this node's pipelines.
    fn forecast_buckets(&self) -> Vec<ForecastBucket> {
        let f = self.forecaster.adjusted();
        let bucket_us = self.bucket_secs as i64 * 1_000_000;
        let mut by_bucket: std::collections::BTreeMap<i64, f64> = std::collections::BTreeMap::new();
        for r in f.rows.iter().filter(|r| r.scope == "pipeline") {
            if r.key.parse::<PipelineId>().is_ok_and(|p| p.node == self.factory.node_id) {
                *by_bucket.entry(r.bucket_start_us).or_default() += r.upper80.max(0.0);
            }
        }
        by_bucket
            .into_iter()
            .map(|(start, upper)| ForecastBucket { start_us: start, end_us: start + bucket_us, upper_rate: self.real_rate(upper) })
            .collect()
    }

    /// The warm-up of one new pipeline, measured: build one (not placed) and read the
    /// segments of as many shards as one pipeline holds through its cache.
    async fn measure_warmup(&self) -> Result<f64> {
        let started = Instant::now();
        let probe = self.factory.build(u32::MAX)?;
        let map = self.cluster.shard_map();
        let per_pipeline = map.loads().values().copied().max().unwrap_or(0);
        let shards: Vec<u32> = (0..per_pipeline as u32).collect();
        probe.prefetch(&self.segment_paths(&shards)).await?;
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    }

    fn segment_paths(&self, shards: &[u32]) -> Vec<String> {
        self.storage.snapshot().segments.iter().filter(|s| shards.contains(&s.shard)).map(|s| s.path.clone()).collect()
    }

    /// Starts `n` in-process pipelines: each reads the segments of the shards it will
    /// hold (its warm-up, timed), then joins the shard map.
    async fn start(&mut self, n: usize, placed: &[PipelineId]) -> Result<String> {
        let mut started = Vec::new();
        let mut all: Vec<PipelineId> = self.cluster.placed_pipelines();
        for _ in 0..n {
            let index = (0..u32::MAX - 1)
                .find(|i| !placed.contains(&PipelineId::new(self.factory.node_id, *i)) && !started.contains(i))
                .unwrap_or(0);
            let t0 = Instant::now();
            let pipeline = self.factory.build(index)?;
            let id = pipeline.id();
            all.push(id);
            let next = self.cluster.shard_map().with_pipelines(&all);
            let shards: Vec<u32> = (0..next.shard_count).filter(|s| next.replicas_of(*s).contains(&id)).collect();
            let bytes = pipeline.prefetch(&self.segment_paths(&shards)).await?;
            let took = t0.elapsed().as_secs_f64() * 1000.0;
            self.warmup_ms = Some(self.warmup_ms.map_or(took, |w| 0.7 * w + 0.3 * took));
            let epoch = self.cluster.add_pipeline(Arc::new(pipeline) as Arc<dyn Pipeline>);
            tracing::info!(pipeline = %id, epoch, warmup_ms = took, bytes, "pipeline started");
            started.push(index);
        }
        Ok(format!("started {n} in-process pipeline(s)"))
    }

    /// Takes the `n` highest-numbered in-process pipelines out of the shard map.
    fn stop(&mut self, n: usize, placed: &[PipelineId]) -> String {
        let mut ids = placed.to_vec();
        ids.sort();
        let doomed: Vec<PipelineId> = ids.into_iter().rev().take(n).collect();
        for id in &doomed {
            let epoch = self.cluster.retire_pipeline(*id);
            tracing::info!(pipeline = %id, epoch, "pipeline retired");
        }
        format!("retired {}", doomed.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", "))
    }

    async fn run_command(&self, target: usize, current: usize) -> String {
        let Some(cmd) = (if target > current { &self.up_command } else { &self.down_command }) else {
            return "recorded (no scale command configured)".into();
        };
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .env("TIDEMARK_SCALE_TARGET", target.to_string())
            .env("TIDEMARK_SCALE_CURRENT", current.to_string())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(COMMAND_TIMEOUT, child).await {
            Ok(Ok(out)) if out.status.success() => "ran scale command: ok".into(),
            Ok(Ok(out)) => format!("ran scale command: exit {}", out.status),
            Ok(Err(e)) => format!("scale command failed to start: {e}"),
            Err(_) => format!("scale command timed out after {} s", COMMAND_TIMEOUT.as_secs()),
        }
    }
}
