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
//!   replicas in the shard map built by `shard_map::ShardMap::build`;
//! - service times are exponential with mean `service_ms` (times a scenario's slowdown);
//! - the router's snapshot is exact for in-flight and queued counts (one gateway), and
//!   the balancer's weights are recomputed every `weights_every_ms` of simulated time
//!   from each pipeline's service-time estimates, as `Cluster::load_snapshot` does per
//!   query (per query would cost a sort of 1,000 estimates per decision);
//! - the forecast each pipeline gets is the expected arrival rate of its shards (the
//!   workload's known rates, announced surges included, split evenly among each
//!   shard's replicas), refreshed every simulated second, and trusted: a perfect
//!   forecaster of announced load. Unannounced load (the hot entity) and faults (the
//!   slow pipeline) are not in it.

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
}

impl Scenario {
    pub const ALL: [Scenario; 3] = [Scenario::AnnouncedSurge, Scenario::HotEntity, Scenario::SlowPipeline];

    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::AnnouncedSurge => "(a) daily cycle + announced surge",
            Scenario::HotEntity => "(b) unannounced hot entity",
            Scenario::SlowPipeline => "(c) one pipeline 10x slower from mid-run",
        }
    }
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct SimResult {
    pub policy: Policy,
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
    /// Each shard's replicas: the shard map's, plus more for shards whose base load
    /// needs them (as hot-shard replication will place them).
    replicas: Vec<Vec<PipelineId>>,
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
        let map = ShardMap::build(cfg.shards, cfg.replicas, &ids);
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
        // A shard whose share of the peak load needs more than its replicas' slots at
        // half utilization gets more replicas (the next pipelines by rendezvous rank):
        // without them one Zipf-hot shard would exceed its pipelines' capacity whatever
        // the router did.
        let mut shard_share = vec![0.0; cfg.shards as usize];
        for (r, s) in entity_shard.iter().enumerate() {
            shard_share[*s as usize] += cdf[r] - if r == 0 { 0.0 } else { cdf[r - 1] };
        }
        let per_pipeline = cfg.peak_utilization / cfg.pipelines as f64;
        let replicas: Vec<Vec<PipelineId>> = (0..cfg.shards)
            .map(|s| {
                let mut reps = map.replicas_of(s).to_vec();
                let need = ((shard_share[s as usize] / per_pipeline) * 2.0).ceil() as usize;
                if need > reps.len() {
                    let mut ranked: Vec<(u64, PipelineId)> = ids
                        .iter()
                        .filter(|p| !reps.contains(p))
                        .map(|p| (crate::shard_map::key_hash(&format!("{s}/{p}")), *p))
                        .collect();
                    ranked.sort_unstable();
                    reps.extend(ranked.into_iter().take(need.min(ids.len()) - reps.len()).map(|(_, p)| p));
                }
                reps
            })
            .collect();
        let capacity = cfg.pipelines as f64 * cfg.slots as f64 / (cfg.service_ms / 1000.0);
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5eed);
        let surge: Vec<usize> = (0..20).map(|_| rng.random_range(10..2000)).collect();
        let hot = rng.random_range(5000..50_000);
        let replica_capacity = cfg.replicas as f64 * cfg.slots as f64 / (cfg.service_ms / 1000.0);
        Workload {
            cfg: cfg.clone(),
            scenario,
            replicas,
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

    /// The daily cycle: half the peak at night, the peak at mid-run.
    fn cycle(&self, t: f64) -> f64 {
        let x = (std::f64::consts::PI * t / self.cfg.duration_s).sin();
        0.5 + 0.5 * x * x
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

    /// The forecaster's view at `t`: each pipeline's expected arrivals per second from
    /// the announced workload (base and surge), its shards' rates split evenly among
    /// their replicas.
    fn forecast(&self, t: f64) -> Vec<f64> {
        let base = self.base_peak_rate * self.cycle(t);
        let mut shard_rate = vec![base / self.cfg.shards as f64; self.cfg.shards as usize];
        if self.surge_on(t) {
            for e in &self.surge {
                shard_rate[self.entity_shard[*e] as usize] += base * (self.surge_factor - 1.0) * self.entity_share(*e);
            }
        }
        let mut per = vec![0.0; self.ids.len()];
        for (s, r) in shard_rate.iter().enumerate() {
            let reps = &self.replicas[s];
            for p in reps {
                per[index_of(p)] += r / reps.len() as f64;
            }
        }
        per
    }
}

fn index_of(p: &PipelineId) -> usize {
    ((p.node - 1) * 8 + p.index as u64) as usize
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrival,
    Done { pipeline: u32, id: u64 },
    Refresh,
}

/// A fragment waiting for or holding a slot: (id, arrival, service, gateway).
type Job = (u64, f64, f64, usize);

/// Runs one policy over `w`.
pub fn run(w: &Workload, policy: Policy) -> SimResult {
    let cfg = &w.cfg;
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
                let f = w.forecast(t);
                for (snap, est) in snaps.iter_mut().zip(&est) {
                    let (median, ws) = balancer::weights(est, (t * 1e6) as i64);
                    for (i, l) in snap_loads(snap, &w.ids).enumerate() {
                        l.weight = ws[i];
                        l.service_s = median.unwrap_or(cfg.service_ms * 1000.0) / 1e6;
                        l.forecast_rate = f[i];
                        l.forecast_trust = if cfg.forecast { 1.0 } else { 0.0 };
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
                route_seq += 1;
                let d = router::route_with(policy, route_seq, shard, &w.replicas[shard as usize], &snaps[g], &[]);
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
    summarize(policy, latencies, &started, cfg)
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
    for scenario in Scenario::ALL {
        let w = Workload::new(cfg, scenario);
        out.push_str(&format!("\n{}\n", scenario.as_str()));
        out.push_str("policy           queries    p50 ms   p99 ms  p99.9 ms  over objective  load max/mean  load CV  pipeline-s\n");
        let results: Vec<SimResult> = Policy::ALL.iter().map(|p| run(&w, *p)).collect();
        for r in &results {
            out.push_str(&format!(
                "{:<16} {:>8} {:>8.1} {:>8.1} {:>9.1} {:>14.3}% {:>14.2} {:>8.3} {:>11.0}\n",
                r.policy.as_str(),
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
        let by = |p: Policy| results.iter().find(|r| r.policy == p).expect("every policy ran");
        let (pred, lif, rr) = (by(Policy::Predictive), by(Policy::LeastInFlight), by(Policy::RoundRobin));
        out.push_str(&format!(
            "predictive vs least_in_flight: over-objective share {:+.0}%; p99 vs round_robin: {:.2}x better\n",
            if lif.over_slo > 0.0 { (pred.over_slo / lif.over_slo - 1.0) * 100.0 } else { 0.0 },
            rr.p99_ms / pred.p99_ms.max(1e-9)
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
    fn the_feedback_finds_a_slow_pipeline() {
        // Round robin keeps sending a third of that pipeline's shards' load to it;
        // predictive learns its weight and sends less, so its tail is shorter.
        let w = Workload::new(&small(), Scenario::SlowPipeline);
        let rr = run(&w, Policy::RoundRobin);
        let pred = run(&w, Policy::Predictive);
        assert!(pred.p999_ms < rr.p999_ms, "predictive p99.9 {} vs round robin {}", pred.p999_ms, rr.p999_ms);
    }
}
