//! A discrete-event simulation of routing at fleet scale: the same decision code as the
//! server (`router::route_with`, `balancer::weights`), simulated arrivals and service
//! times, at 1,000 pipelines and 1 million entities in seconds.
//!
//! Owns: the simulated fleet (pipelines with slots and FIFO queues), the workload
//! (Zipf-popular entities, a daily cycle compressed into the run, scenario faults) and
//! the comparison of policies. Pure and deterministic: a seed and a configuration give
//! the same table; no clock, no IO.
//!
//! What is simulated and what is not:
//! - each query is one fragment on one shard (a point query), routed among the shard's
//!   replicas, placed by the server's own shard map: `ShardMap::build` for the whole
//!   fleet, `with_pipelines` when the autoscaler changes the fleet (an epoch's
//!   transition, as on a node), `with_hot` for shards whose base load needs more than
//!   their replicas;
//! - service times are exponential with mean `service_ms` (times a scenario's slowdown);
//! - the router's snapshot is exact for in-flight and queued counts (one gateway), and
//!   the balancer's weights are recomputed every `weights_every_ms` of simulated time
//!   from each pipeline's service-time estimates, as `Cluster::load_snapshot` does per
//!   query (per query would cost a sort of 1,000 estimates per decision);
//! - the forecast each pipeline gets is the expected arrival rate of its shards (the
//!   workload's known rates by each shard's share of the Zipf load, announced surges
//!   included, split among each shard's current replicas as balanced routing splits
//!   them, `equilibrium::balanced_rates`), refreshed every
//!   `weights_every_ms`, and trusted: a perfect forecaster of announced load. With `g`
//!   gateways, `(g−1)/g` of it is what a gateway does not see (`PipelineLoad::unseen`);
//!   with one, nothing. Unannounced load (the hot entity) and faults (the
//!   slow pipeline) are not in it;
//! - hot-shard copies (`hot_shards`, when a run asks for them): every 2.5% of the run
//!   the planner sees each shard's arrivals since its last decision and, in predictive
//!   mode, the same perfect forecast per shard with a 10% upper band; a shard's new
//!   copies serve after the warm-up (1% of the run), on the pipelines
//!   `shard_map::extra_replicas` names; dropped copies stop taking new fragments at
//!   once (what they hold finishes).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::balancer::{self, ServiceEstimate};
use crate::router::{self, LoadSnapshot, PipelineLoad, Policy};
use crate::shard_map::{shard_of, PipelineId, ShardMap};

/// One simulated fleet and workload.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub pipelines: usize,
    pub slots: u32,
    pub shards: u32,
    pub replicas: u32,
    pub entities: usize,
    pub zipf_exponent: f64,
    /// Mean service time of one fragment.
    pub service_ms: f64,
    /// Fleet utilization at the daily peak (before surges).
    pub peak_utilization: f64,
    /// Simulated seconds (one compressed day).
    pub duration_s: f64,
    /// Latency objective.
    pub slo_ms: f64,
    pub weights_every_ms: f64,
    /// Gateways the queries arrive at (evenly); each sees only its own requests in
    /// flight at each pipeline, as a Tidemark node sees its peers' pipelines.
    pub gateways: usize,
    /// Whether predictive routing gets the (perfect, announced-load) forecast.
    pub forecast: bool,
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            pipelines: 1000,
            slots: 4,
            shards: 4096,
            replicas: 3,
            entities: 1_000_000,
            zipf_exponent: 1.1,
            service_ms: 20.0,
            peak_utilization: 0.75,
            duration_s: 10.0,
            slo_ms: 100.0,
            weights_every_ms: 50.0,
            gateways: 1,
            forecast: true,
            seed: 42,
        }
    }
}

/// The workload's twist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// (a) The daily cycle with an announced surge: 20 popular entities at 30 times
    /// their load from 45% to 65% of the run (in the forecast).
    AnnouncedSurge,
    /// (b) One entity becomes hot without warning (from 40% to 70% of the run), at 0.8
    /// of its shard's replicas' capacity on its own; not in the forecast.
    HotEntity,
    /// (c) One pipeline runs ten times slower from half-way through the run.
    SlowPipeline,
    /// (d) The daily cycle alone, with the fleet sized by an autoscaler.
    Scaling,
}

impl Scenario {
    pub const ROUTING: [Scenario; 3] = [Scenario::AnnouncedSurge, Scenario::HotEntity, Scenario::SlowPipeline];

    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::AnnouncedSurge => "(a) daily cycle + announced surge",
            Scenario::HotEntity => "(b) unannounced hot entity",
            Scenario::SlowPipeline => "(c) one pipeline 10x slower from mid-run",
            Scenario::Scaling => "(d) scaling over the daily cycle",
        }
    }
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct SimResult {
    pub policy: Policy,
    /// How hot shards got their copies: `static` (the placement alone), or the
    /// hot-shard planner's `reactive` or `predictive` mode.
    pub copies: &'static str,
    pub queries: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Share of queries over the objective.
    pub over_slo: f64,
    /// Fragments per pipeline: max over mean, and coefficient of variation.
    pub spread_max_mean: f64,
    pub spread_cv: f64,
    pub pipeline_seconds: f64,
}

/// The parts of a workload that do not depend on the policy.
pub struct Workload {
    cfg: SimConfig,
    scenario: Scenario,
    /// The whole fleet's shard map: each shard's base copies, plus more for shards
    /// whose base load needs them (as hot-shard replication will place them).
    map: ShardMap,
    /// Each shard's share of the base load.
    shard_share: Vec<f64>,
    ids: Vec<PipelineId>,
    /// Cumulative Zipf weights of the entities (rank order).
    cdf: Vec<f64>,
    entity_shard: Vec<u32>,
    /// Entities of the announced surge (ranks) and the hot entity.
    surge: Vec<usize>,
    hot: usize,
    base_peak_rate: f64,
    hot_rate: f64,
    surge_factor: f64,
}

impl Workload {
    pub fn new(cfg: &SimConfig, scenario: Scenario) -> Workload {
        let ids: Vec<PipelineId> =
            (0..cfg.pipelines).map(|i| PipelineId::new(1 + (i / 8) as u64, (i % 8) as u32)).collect();
        let mut cdf = Vec::with_capacity(cfg.entities);
        let mut acc = 0.0;
        for r in 0..cfg.entities {
            acc += 1.0 / ((r + 1) as f64).powf(cfg.zipf_exponent);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        let entity_shard: Vec<u32> = (0..cfg.entities).map(|r| shard_of(&format!("acct-{r:07}"), cfg.shards)).collect();
        let mut shard_share = vec![0.0; cfg.shards as usize];
        for (r, s) in entity_shard.iter().enumerate() {
            shard_share[*s as usize] += cdf[r] - if r == 0 { 0.0 } else { cdf[r - 1] };
        }
        let map = placement(None, cfg.replicas, &ids, &shard_share, cfg.peak_utilization);
        let capacity = cfg.pipelines as f64 * cfg.slots as f64 / (cfg.service_ms / 1000.0);
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5eed);
        let surge: Vec<usize> = (0..20).map(|_| rng.random_range(10..2000)).collect();
        // An entity of middling popularity (ranks 5,000 to 50,000 of a million).
        let hot = rng.random_range((cfg.entities / 200).max(1)..(cfg.entities / 20).max(2));
        let replica_capacity = cfg.replicas as f64 * cfg.slots as f64 / (cfg.service_ms / 1000.0);
        Workload {
            cfg: cfg.clone(),
            scenario,
            map,
            shard_share,
            ids,
            cdf,
            entity_shard,
            surge,
            hot,
            base_peak_rate: cfg.peak_utilization * capacity,
            hot_rate: 0.8 * replica_capacity,
            surge_factor: 30.0,
        }
    }

    /// The shard map over the first `active` pipelines of the fleet, moved from `prev`.
    fn placement_over(&self, prev: &ShardMap, active: usize) -> ShardMap {
        placement(Some(prev), self.cfg.replicas, &self.ids[..active], &self.shard_share, self.cfg.peak_utilization)
    }

    /// The daily cycle of the data generator (`datagen::HOURLY`, quiet nights and busy
    /// afternoons) compressed into the run and scaled so that its busiest hour is 1,
    /// linearly interpolated between hours.
    fn cycle(&self, t: f64) -> f64 {
        let peak = crate::datagen::HOURLY.iter().copied().fold(0.0, f64::max);
        let h = (t / self.cfg.duration_s).clamp(0.0, 1.0) * 24.0;
        let (i, frac) = ((h.floor() as usize).min(23), h - h.floor());
        let (a, b) = (crate::datagen::HOURLY[i], crate::datagen::HOURLY[(i + 1) % 24]);
        (a + (b - a) * frac) / peak
    }

    fn surge_on(&self, t: f64) -> bool {
        self.scenario == Scenario::AnnouncedSurge && (0.45..0.65).contains(&(t / self.cfg.duration_s))
    }

    fn hot_on(&self, t: f64) -> bool {
        self.scenario == Scenario::HotEntity && (0.40..0.70).contains(&(t / self.cfg.duration_s))
    }

    fn entity_share(&self, rank: usize) -> f64 {
        self.cdf[rank] - if rank == 0 { 0.0 } else { self.cdf[rank - 1] }
    }

    /// Arrivals per second at `t` (base plus announced surge plus hot entity).
    fn rate(&self, t: f64) -> f64 {
        let base = self.base_peak_rate * self.cycle(t);
        let mut r = base;
        if self.surge_on(t) {
            r += base * (self.surge_factor - 1.0) * self.surge.iter().map(|e| self.entity_share(*e)).sum::<f64>();
        }
        if self.hot_on(t) {
            r += self.hot_rate;
        }
        r
    }

    fn max_rate(&self) -> f64 {
        let surge: f64 = self.surge.iter().map(|e| self.entity_share(*e)).sum();
        self.base_peak_rate * (1.0 + (self.surge_factor - 1.0) * surge) + self.hot_rate
    }

    /// The entity of one arrival at `t`.
    fn entity(&self, t: f64, rng: &mut StdRng) -> usize {
        let base = self.base_peak_rate * self.cycle(t);
        let total = self.rate(t);
        let mut u = rng.random::<f64>() * total;
        if self.hot_on(t) {
            if u < self.hot_rate {
                return self.hot;
            }
            u -= self.hot_rate;
        }
        if self.surge_on(t) {
            for e in &self.surge {
                let extra = base * (self.surge_factor - 1.0) * self.entity_share(*e);
                if u < extra {
                    return *e;
                }
                u -= extra;
            }
        }
        let x = (u / base).clamp(0.0, 1.0);
        self.cdf.partition_point(|c| *c < x).min(self.cfg.entities - 1)
    }

    /// The announced arrivals per second of every shard at `t` (base and surge; not
    /// the hot entity).
    fn shard_rates(&self, t: f64) -> Vec<f64> {
        let base = self.base_peak_rate * self.cycle(t);
        let mut shard_rate: Vec<f64> = self.shard_share.iter().map(|s| base * s).collect();
        if self.surge_on(t) {
            for e in &self.surge {
                shard_rate[self.entity_shard[*e] as usize] += base * (self.surge_factor - 1.0) * self.entity_share(*e);
            }
        }
        shard_rate
    }

    /// The forecaster's view at `t`: each pipeline's expected arrivals per second from
    /// the announced workload (base and surge), its shards' rates split among their
    /// current `replicas` as balanced routing splits them (`equilibrium`): what a
    /// forecaster trained on each pipeline's routed history predicts.
    fn forecast(&self, t: f64, replicas: &[Vec<PipelineId>]) -> Vec<f64> {
        let reps: Vec<Vec<usize>> = replicas.iter().map(|r| r.iter().map(index_of).collect()).collect();
        let capacity = vec![self.cfg.slots as f64; self.ids.len()];
        crate::equilibrium::balanced_rates(&self.shard_rates(t), &reps, &capacity, FORECAST_PASSES)
    }
}

/// Sweeps of the balanced split per forecast refresh.
const FORECAST_PASSES: usize = 20;

/// Each shard's replicas over `active` pipelines: the shard map's (`ShardMap::build`, or
/// the transition from `prev` when the fleet changes, as the server moves epochs), plus
/// hot copies (`ShardMap::with_hot`) for a shard whose share of the load needs more
/// than its replicas' slots at half the target utilization, as hot-shard replication
/// will place them: without them one Zipf-hot shard would exceed its pipelines'
/// capacity whatever the router did.
fn placement(prev: Option<&ShardMap>, replicas: u32, active: &[PipelineId], shard_share: &[f64], utilization: f64) -> ShardMap {
    let base = match prev {
        Some(m) => m.with_pipelines(active),
        None => ShardMap::build(shard_share.len() as u32, replicas, active),
    };
    let per_pipeline = utilization / active.len().max(1) as f64;
    let hot: std::collections::BTreeMap<u32, u32> = shard_share
        .iter()
        .enumerate()
        .filter_map(|(s, share)| {
            let need = (((share / per_pipeline) * 2.0).ceil() as usize).min(active.len());
            (need > replicas as usize).then_some((s as u32, need as u32))
        })
        .collect();
    base.with_hot(&hot)
}

fn index_of(p: &PipelineId) -> usize {
    ((p.node - 1) * 8 + p.index as u64) as usize
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrival,
    Done { pipeline: u32, id: u64 },
    Refresh,
    Scale,
    Joined,
    /// A hot-shard decision.
    Hot,
    /// A shard's new copies are warm.
    HotReady { shard: u32 },
}

/// A fragment waiting for or holding a slot: (id, arrival, service, gateway).
type Job = (u64, f64, f64, usize);

/// Runs one policy over `w` with the whole fleet.
pub fn run(w: &Workload, policy: Policy) -> SimResult {
    run_scaled(w, policy, None)
}

/// The hot-shard planner's settings in the simulation: the autoscaler's (capacity,
/// target utilization, warm-up and interval), one shard using at most half of a
/// replica's capacity, as the static placement assumes for base load.
pub fn hot_settings(cfg: &SimConfig) -> crate::hot_shards::HotSettings {
    let s = scale_settings(cfg);
    crate::hot_shards::HotSettings {
        capacity: s.capacity,
        target_utilization: s.target_utilization,
        share: 0.5,
        warmup_us: s.warmup_us,
        interval_us: s.interval_us,
        base: cfg.replicas as usize,
        max: cfg.pipelines,
        down_after: s.down_after,
    }
}

/// Runs one policy over `w` with the whole fleet and hot-shard copies placed by the
/// planner in `hot` mode (predictive or reactive).
pub fn run_hot(w: &Workload, policy: Policy, hot: crate::autoscale::Mode) -> SimResult {
    run_with(w, policy, None, Some(hot))
}

/// The autoscaler's settings in the simulation: a pipeline's capacity from its slots
/// and mean service time, the fleet's peak utilization as the target (the fixed fleet
/// runs at it in its busiest hour), a warm-up of 1% of the run (about 15 minutes of the
/// compressed day) and a decision every 2.5%.
pub fn scale_settings(cfg: &SimConfig) -> crate::autoscale::ScaleSettings {
    crate::autoscale::ScaleSettings {
        capacity: cfg.slots as f64 / (cfg.service_ms / 1000.0),
        target_utilization: cfg.peak_utilization,
        warmup_us: (cfg.duration_s * 0.01 * 1e6) as i64,
        interval_us: (cfg.duration_s * 0.025 * 1e6) as i64,
        min: cfg.replicas as usize,
        max: cfg.pipelines,
        down_after: 3,
    }
}

/// Runs one policy over `w`, the fleet sized by `scaling` (None: the whole fleet).
pub fn run_scaled(w: &Workload, policy: Policy, scaling: Option<crate::autoscale::Mode>) -> SimResult {
    run_with(w, policy, scaling, None)
}

/// Runs one policy over `w`, the fleet sized by `scaling` (None: the whole fleet) and
/// hot shards copied by the planner in `hot` mode (None: the static placement). Not
/// both: a fleet change places every shard afresh.
fn run_with(w: &Workload, policy: Policy, scaling: Option<crate::autoscale::Mode>, hot: Option<crate::autoscale::Mode>) -> SimResult {
    use crate::autoscale::{Autoscaler, ForecastBucket};
    assert!(scaling.is_none() || hot.is_none(), "the simulation scales the fleet or copies hot shards, not both");
    let cfg = &w.cfg;
    let hot_s = hot_settings(cfg);
    let mut planner = hot.map(|m| crate::hot_shards::HotShards::new(hot_s, m));
    // Arrivals per shard since the last hot-shard decision.
    let mut shard_arrivals: Vec<u32> = vec![0; cfg.shards as usize];
    let mut last_hot_t = 0.0;
    let settings = scale_settings(cfg);
    let mut scaler = scaling.map(|m| Autoscaler::new(settings, m));
    let mut active = match scaling {
        None => w.ids.len(),
        Some(crate::autoscale::Mode::Fixed(k)) => k.min(w.ids.len()),
        Some(_) => settings.needed(w.rate(0.0)),
    };
    let mut map = if active == w.ids.len() { w.map.clone() } else { w.placement_over(&w.map, active) };
    let mut replicas = map.replicas.clone();
    let mut warming: Vec<f64> = Vec::new();
    let mut pipeline_seconds = 0.0;
    let mut last_scale_t = 0.0;
    let mut arrivals_since = 0u64;
    let n = w.ids.len();
    let g_count = cfg.gateways.max(1);
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut service_rng = StdRng::seed_from_u64(cfg.seed.wrapping_add(1));
    // Each gateway's view: its own requests in flight and queued at each pipeline, and
    // its own service-time estimates (as each node keeps them).
    let mut snaps: Vec<LoadSnapshot> =
        (0..g_count).map(|_| LoadSnapshot::new(w.ids.iter().map(|p| PipelineLoad::idle(*p, cfg.slots)).collect())).collect();
    let mut est = vec![vec![ServiceEstimate::default(); n]; g_count];
    let mut queues: Vec<VecDeque<Job>> = vec![VecDeque::new(); n];
    let mut running: Vec<Vec<Job>> = vec![Vec::new(); n];
    let mut started: Vec<u64> = vec![0; n];
    let mut heap: BinaryHeap<Reverse<(u64, u64, Ev)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let ns = |t: f64| (t * 1e9) as u64;
    let max_rate = w.max_rate();
    let mut push = |heap: &mut BinaryHeap<Reverse<(u64, u64, Ev)>>, t: f64, e: Ev| {
        seq += 1;
        heap.push(Reverse((ns(t), seq, e)));
    };
    push(&mut heap, 0.0, Ev::Refresh);
    if scaler.is_some() {
        push(&mut heap, 0.0, Ev::Scale);
    }
    if planner.is_some() {
        push(&mut heap, 0.0, Ev::Hot);
    }
    let first = -rng.random::<f64>().max(1e-12).ln() / max_rate;
    push(&mut heap, first, Ev::Arrival);
    let mut latencies: Vec<f32> = Vec::new();
    let slow = |p: usize, t: f64| if w.scenario == Scenario::SlowPipeline && p == 0 && t >= cfg.duration_s / 2.0 { 10.0 } else { 1.0 };
    let mut route_seq = 0u64;
    let mut next_id = 0u64;
    while let Some(Reverse((t_ns, _, ev))) = heap.pop() {
        let t = t_ns as f64 / 1e9;
        match ev {
            Ev::Refresh => {
                if t > cfg.duration_s {
                    continue;
                }
                let f = w.forecast(t, &replicas);
                for (snap, est) in snaps.iter_mut().zip(&est) {
                    let (median, ws) = balancer::weights(est, (t * 1e6) as i64);
                    for (i, l) in snap_loads(snap, &w.ids).enumerate() {
                        l.weight = ws[i];
                        l.service_s = median.unwrap_or(cfg.service_ms * 1000.0) / 1e6;
                        l.forecast_rate = f[i];
                        l.forecast_trust = if cfg.forecast { 1.0 } else { 0.0 };
                        // Each gateway sees its own requests: the others' share of
                        // the forecast is unseen.
                        l.unseen = (g_count - 1) as f64 / g_count as f64;
                    }
                }
                push(&mut heap, t + cfg.weights_every_ms / 1000.0, Ev::Refresh);
            }
            Ev::Arrival => {
                if t > cfg.duration_s {
                    continue;
                }
                let next = t - rng.random::<f64>().max(1e-12).ln() / max_rate;
                push(&mut heap, next, Ev::Arrival);
                // Thinning: accept with probability rate(t) / max_rate.
                if rng.random::<f64>() * max_rate > w.rate(t) {
                    continue;
                }
                let e = w.entity(t, &mut rng);
                let g = rng.random_range(0..g_count);
                let shard = w.entity_shard[e];
                shard_arrivals[shard as usize] += 1;
                route_seq += 1;
                arrivals_since += 1;
                let d = router::route_with(policy, route_seq, shard, &replicas[shard as usize], &snaps[g], &[]);
                let Some(p) = d.choice else { continue };
                let pi = index_of(&p);
                let service = -service_rng.random::<f64>().max(1e-12).ln() * cfg.service_ms / 1000.0 * slow(pi, t);
                started[pi] += 1;
                next_id += 1;
                let view = snaps[g].get_mut(p).expect("a known pipeline");
                if running[pi].len() < cfg.slots as usize {
                    view.in_flight += 1;
                    running[pi].push((next_id, t, service, g));
                    push(&mut heap, t + service, Ev::Done { pipeline: pi as u32, id: next_id });
                } else {
                    view.queued += 1;
                    queues[pi].push_back((next_id, t, service, g));
                }
            }
            Ev::Scale => {
                let Some(sc) = scaler.as_mut() else { continue };
                pipeline_seconds += (active + warming.len()) as f64 * (t - last_scale_t);
                let measured = arrivals_since as f64 / (t - last_scale_t).max(1e-9);
                last_scale_t = t;
                arrivals_since = 0;
                if t > cfg.duration_s {
                    continue;
                }
                // The forecast: the workload's known rate per 1% of the run, with a
                // 10% upper band (an 80% interval's width on a good forecast).
                let step = cfg.duration_s * 0.01;
                let forecast: Vec<ForecastBucket> = (0..10)
                    .map(|i| {
                        let (a, b) = (t + i as f64 * step, t + (i + 1) as f64 * step);
                        ForecastBucket {
                            start_us: (a * 1e6) as i64,
                            end_us: (b * 1e6) as i64,
                            upper_rate: 1.1 * w.rate(a).max(w.rate(b)).max(w.rate((a + b) / 2.0)),
                        }
                    })
                    .collect();
                let d = sc.decide((t * 1e6) as i64, active + warming.len(), &forecast, measured);
                let have = active + warming.len();
                if d.target > have {
                    for _ in have..d.target {
                        warming.push(t + settings.warmup_us as f64 / 1e6);
                    }
                    push(&mut heap, t + settings.warmup_us as f64 / 1e6, Ev::Joined);
                } else if d.target < have {
                    let mut stop = have - d.target;
                    while stop > 0 && !warming.is_empty() {
                        warming.pop();
                        stop -= 1;
                    }
                    if stop > 0 {
                        active -= stop.min(active - 1);
                        map = w.placement_over(&map, active);
                        replicas = map.replicas.clone();
                    }
                }
                push(&mut heap, t + settings.interval_us as f64 / 1e6, Ev::Scale);
            }
            Ev::Hot => {
                let Some(pl) = planner.as_mut() else { continue };
                if t > cfg.duration_s {
                    continue;
                }
                let span = (t - last_hot_t).max(1e-9);
                last_hot_t = t;
                let measured: std::collections::BTreeMap<u32, f64> = shard_arrivals
                    .iter_mut()
                    .enumerate()
                    .filter(|(_, n)| **n > 0)
                    .map(|(s, n)| (s as u32, std::mem::take(n) as f64 / span))
                    .collect();
                // The forecast: the workload's known rate per shard per 1% of the run,
                // with a 10% upper band, for the shards it names above their base need.
                let step = cfg.duration_s * 0.01;
                let mut forecast: std::collections::BTreeMap<u32, Vec<ForecastBucket>> = std::collections::BTreeMap::new();
                if pl.mode == crate::autoscale::Mode::Predictive {
                    for i in 0..10 {
                        let (a, b) = (t + i as f64 * step, t + (i + 1) as f64 * step);
                        let rates: Vec<Vec<f64>> = [a, (a + b) / 2.0, b].iter().map(|x| w.shard_rates(*x)).collect();
                        for s in 0..cfg.shards as usize {
                            let upper = 1.1 * rates.iter().map(|r| r[s]).fold(0.0, f64::max);
                            if hot_s.needed(upper) > hot_s.base {
                                forecast.entry(s as u32).or_default().push(ForecastBucket {
                                    start_us: (a * 1e6) as i64,
                                    end_us: (b * 1e6) as i64,
                                    upper_rate: upper,
                                });
                            }
                        }
                    }
                }
                for c in pl.decide((t * 1e6) as i64, &forecast, &measured) {
                    let s = c.shard as usize;
                    if c.target > c.current {
                        push(&mut heap, t + hot_s.warmup_us as f64 / 1e6, Ev::HotReady { shard: c.shard });
                    } else {
                        let keep = c.target.max(w.map.replicas[s].len());
                        replicas[s].truncate(keep);
                    }
                }
                push(&mut heap, t + hot_s.interval_us as f64 / 1e6, Ev::Hot);
            }
            Ev::HotReady { shard } => {
                let Some(pl) = planner.as_ref() else { continue };
                let s = shard as usize;
                let want = pl.target(shard).unwrap_or(0);
                if want > replicas[s].len() {
                    let extra = crate::shard_map::extra_replicas(shard, &replicas[s], &w.ids, want - replicas[s].len());
                    replicas[s].extend(extra);
                }
            }
            Ev::Joined => {
                let ready = warming.iter().filter(|r| **r <= t + 1e-9).count();
                if ready > 0 {
                    warming.retain(|r| *r > t + 1e-9);
                    active = (active + ready).min(w.ids.len());
                    map = w.placement_over(&map, active);
                    replicas = map.replicas.clone();
                }
            }
            Ev::Done { pipeline, id } => {
                let pi = pipeline as usize;
                let at = running[pi].iter().position(|r| r.0 == id).expect("a running fragment");
                let (_, arrived, service, g) = running[pi].swap_remove(at);
                latencies.push(((t - arrived) * 1000.0) as f32);
                // One gateway sees its own pipelines' service time (slot to end); with
                // several, every pipeline is another node's and the gateway sees the
                // round trip, queueing included (as `RemotePipeline` measures it).
                let seen = if g_count == 1 { service } else { t - arrived };
                est[g][pi].observe(seen * 1e6, (t * 1e6) as i64);
                let p = w.ids[pi];
                snaps[g].get_mut(p).expect("a known pipeline").in_flight -= 1;
                if let Some(job) = queues[pi].pop_front() {
                    let view = snaps[job.3].get_mut(p).expect("a known pipeline");
                    view.queued -= 1;
                    view.in_flight += 1;
                    push(&mut heap, t + job.2, Ev::Done { pipeline, id: job.0 });
                    running[pi].push(job);
                }
            }
        }
    }
    let mut r = summarize(policy, latencies, &started, cfg);
    if let Some(m) = hot {
        r.copies = m.as_str();
    }
    if scaler.is_some() {
        r.pipeline_seconds = pipeline_seconds;
    }
    r
}

/// The snapshot's loads, in the order of the workload's pipeline ids (both sorted).
fn snap_loads<'a>(snap: &'a mut LoadSnapshot, ids: &'a [PipelineId]) -> impl Iterator<Item = &'a mut PipelineLoad> + 'a {
    debug_assert!(snap.loads().iter().map(|l| l.id).eq(ids.iter().copied()));
    snap.loads_mut().iter_mut()
}

fn summarize(policy: Policy, mut lat: Vec<f32>, started: &[u64], cfg: &SimConfig) -> SimResult {
    lat.sort_by(f32::total_cmp);
    let pct = |p: f64| if lat.is_empty() { 0.0 } else { lat[((lat.len() - 1) as f64 * p).round() as usize] as f64 };
    let over = lat.iter().filter(|l| **l as f64 > cfg.slo_ms).count() as f64 / lat.len().max(1) as f64;
    let mean = started.iter().sum::<u64>() as f64 / started.len().max(1) as f64;
    let var = started.iter().map(|s| (*s as f64 - mean).powi(2)).sum::<f64>() / started.len().max(1) as f64;
    SimResult {
        policy,
        copies: "static",
        queries: lat.len() as u64,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        over_slo: over,
        spread_max_mean: started.iter().copied().max().unwrap_or(0) as f64 / mean.max(1e-9),
        spread_cv: var.sqrt() / mean.max(1e-9),
        pipeline_seconds: cfg.pipelines as f64 * cfg.duration_s,
    }
}

/// Every policy over every scenario, as a text table.
pub fn compare(cfg: &SimConfig) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{} pipelines x {} slots, {} shards x {} replicas (more for hot shards), {} entities (Zipf {}), service {} ms (exponential), peak utilization {}, {} s simulated, objective {} ms, {} gateway(s)\n",
        cfg.pipelines, cfg.slots, cfg.shards, cfg.replicas, cfg.entities, cfg.zipf_exponent, cfg.service_ms, cfg.peak_utilization, cfg.duration_s, cfg.slo_ms, cfg.gateways
    ));
    for scenario in Scenario::ROUTING {
        let t0 = std::time::Instant::now();
        let w = Workload::new(cfg, scenario);
        tracing::info!(scenario = scenario.as_str(), secs = t0.elapsed().as_secs_f64(), "workload built");
        out.push_str(&format!("\n{}\n", scenario.as_str()));
        out.push_str("policy + hot-shard copies      queries    p50 ms   p99 ms  p99.9 ms  over objective  load max/mean  load CV  pipeline-s\n");
        use crate::autoscale::Mode;
        let runs: Vec<(Policy, Option<Mode>)> = Policy::ALL
            .iter()
            .map(|p| (*p, None))
            .chain([
                (Policy::LeastInFlight, Some(Mode::Reactive)),
                (Policy::LeastInFlight, Some(Mode::Predictive)),
                (Policy::Predictive, Some(Mode::Predictive)),
            ])
            .collect();
        let results: Vec<SimResult> = par_map(&runs, |(p, hot)| {
            let t0 = std::time::Instant::now();
            let r = run_with(&w, *p, None, *hot);
            tracing::info!(policy = p.as_str(), copies = r.copies, queries = r.queries, secs = t0.elapsed().as_secs_f64(), "simulated");
            r
        });
        for r in &results {
            out.push_str(&format!(
                "{:<29} {:>8} {:>8.1} {:>8.1} {:>9.1} {:>14.3}% {:>14.2} {:>8.3} {:>11.0}\n",
                format!("{} + {}", r.policy.as_str(), r.copies),
                r.queries,
                r.p50_ms,
                r.p99_ms,
                r.p999_ms,
                r.over_slo * 100.0,
                r.spread_max_mean,
                r.spread_cv,
                r.pipeline_seconds
            ));
        }
        let by = |p: Policy, c: &str| results.iter().find(|r| r.policy == p && r.copies == c).expect("every policy ran");
        let (pred, lif, rr) = (by(Policy::Predictive, "static"), by(Policy::LeastInFlight, "static"), by(Policy::RoundRobin, "static"));
        let (full, lif_reactive) = (by(Policy::Predictive, "predictive"), by(Policy::LeastInFlight, "reactive"));
        let change = |a: &SimResult, b: &SimResult| if b.over_slo > 0.0 { format!("{:+.0}%", (a.over_slo / b.over_slo - 1.0) * 100.0) } else { "n/a".into() };
        out.push_str(&format!(
            "over-objective share vs least_in_flight + static: predictive routing {}, predictive routing + predictive copies {} (vs least_in_flight + reactive copies {}); p99 vs round_robin: predictive {:.2}x better, with predictive copies {:.2}x\n",
            change(pred, lif),
            change(full, lif),
            change(full, lif_reactive),
            rr.p99_ms / pred.p99_ms.max(1e-9),
            rr.p99_ms / full.p99_ms.max(1e-9)
        ));
    }
    out.push_str(&scaling_table(cfg));
    out
}

/// `f` over `items` on every core (runs are independent and each is deterministic, so
/// the results, in `items`' order, do not depend on the thread count).
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, items.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<(usize, R)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        mine.push((i, f(item)));
                    }
                    mine
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("a simulation run panicked")).collect()
    });
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// (d): a fixed fleet sized for the peak against reactive and predictive scaling, all
/// routed by least_in_flight.
pub fn scaling_table(cfg: &SimConfig) -> String {
    use crate::autoscale::Mode;
    let w = Workload::new(cfg, Scenario::Scaling);
    let s = scale_settings(cfg);
    let mut out = format!(
        "\n{} (warm-up {} ms, a decision every {} ms, target utilization {}, routed by least_in_flight)\n",
        Scenario::Scaling.as_str(),
        s.warmup_us / 1000,
        s.interval_us / 1000,
        s.target_utilization
    );
    out.push_str("scaling          queries    p50 ms   p99 ms  p99.9 ms  over objective  pipeline-s  of fixed\n");
    let modes = [("fixed (peak)", Mode::Fixed(cfg.pipelines)), ("reactive", Mode::Reactive), ("predictive", Mode::Predictive)];
    let runs: Vec<(&str, SimResult)> = par_map(&modes, |(name, m)| (*name, run_scaled(&w, Policy::LeastInFlight, Some(*m))));
    let fixed = runs[0].1.pipeline_seconds.max(1e-9);
    for (name, r) in &runs {
        out.push_str(&format!(
            "{:<16} {:>8} {:>8.1} {:>8.1} {:>9.1} {:>14.3}% {:>11.0} {:>8.2}\n",
            name,
            r.queries,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.over_slo * 100.0,
            r.pipeline_seconds,
            r.pipeline_seconds / fixed
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SimConfig {
        SimConfig { pipelines: 40, shards: 128, entities: 20_000, duration_s: 4.0, ..SimConfig::default() }
    }

    #[test]
    fn runs_are_deterministic_and_count_every_query() {
        let w = Workload::new(&small(), Scenario::SlowPipeline);
        let a = run(&w, Policy::Predictive);
        let b = run(&w, Policy::Predictive);
        assert_eq!((a.queries, a.p99_ms.to_bits()), (b.queries, b.p99_ms.to_bits()));
        assert!(a.queries > 1000, "{}", a.queries);
        // Every policy sees the same arrivals (the same seed and thinning).
        let rr = run(&w, Policy::RoundRobin);
        assert_eq!(rr.queries, a.queries);
    }

    #[test]
    fn par_map_keeps_the_order() {
        let items: Vec<u64> = (0..100).collect();
        assert_eq!(par_map(&items, |x| x * 2), items.iter().map(|x| x * 2).collect::<Vec<_>>());
        assert!(par_map(&[] as &[u64], |x| *x).is_empty());
    }

    #[test]
    fn the_feedback_finds_a_slow_pipeline() {
        // Round robin keeps sending a third of that pipeline's shards' load to it;
        // predictive learns its weight and sends less, so its tail is shorter.
        let w = Workload::new(&small(), Scenario::SlowPipeline);
        let rr = run(&w, Policy::RoundRobin);
        let pred = run(&w, Policy::Predictive);
        assert!(pred.p999_ms < rr.p999_ms, "predictive p99.9 {} vs round robin {}", pred.p999_ms, rr.p999_ms);
    }

    #[test]
    fn copies_made_ahead_serve_an_announced_surge() {
        use crate::autoscale::Mode;
        // The surge's shards need more replicas than the placement gives them: with
        // the static placement their queues grow; copies made ahead of the surge
        // (predictive) serve it, copies made once it is measured (reactive) serve
        // only its rest.
        // Large enough that the surge's shards outgrow their replicas (at 40 pipelines
        // the static placement's margin absorbs it).
        let cfg = SimConfig { pipelines: 200, shards: 1024, entities: 200_000, duration_s: 4.0, ..SimConfig::default() };
        let w = Workload::new(&cfg, Scenario::AnnouncedSurge);
        let fixed = run(&w, Policy::LeastInFlight);
        let reactive = run_hot(&w, Policy::LeastInFlight, Mode::Reactive);
        let ahead = run_hot(&w, Policy::LeastInFlight, Mode::Predictive);
        assert_eq!((fixed.queries, ahead.queries), (reactive.queries, reactive.queries), "the same arrivals");
        assert_eq!((ahead.copies, reactive.copies, fixed.copies), ("predictive", "reactive", "static"));
        assert!(ahead.over_slo < 0.5 * fixed.over_slo, "ahead {} vs static {}", ahead.over_slo, fixed.over_slo);
        assert!(ahead.over_slo < reactive.over_slo, "ahead {} vs reactive {}", ahead.over_slo, reactive.over_slo);
    }
}

#[cfg(test)]
mod scaling_tests {
    use super::*;
    use crate::autoscale::Mode;

    #[test]
    fn scaling_follows_the_daily_cycle() {
        let cfg = SimConfig { pipelines: 40, shards: 128, entities: 20_000, duration_s: 4.0, ..SimConfig::default() };
        let w = Workload::new(&cfg, Scenario::Scaling);
        let fixed = run_scaled(&w, Policy::LeastInFlight, Some(Mode::Fixed(cfg.pipelines)));
        let pred = run_scaled(&w, Policy::LeastInFlight, Some(Mode::Predictive));
        assert_eq!(fixed.queries, pred.queries, "the same arrivals");
        // Quiet nights need far fewer pipelines than the peak.
        assert!(pred.pipeline_seconds < 0.9 * fixed.pipeline_seconds, "{} vs {}", pred.pipeline_seconds, fixed.pipeline_seconds);
    }
}
