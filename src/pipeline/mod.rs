//! Pipelines: the workers that run plan fragments, and the cluster view that the
//! planner routes over.
//!
//! Owns: the [`Pipeline`] interface and its two implementations, in-process
//! ([`local::LocalPipeline`]: fixed slots, bounded queue, its own segment cache) and
//! remote ([`remote::RemotePipeline`]: another node's pipeline over Arrow Flight);
//! per-pipeline counters; the [`Cluster`] (this node's shard map, the pipelines it can
//! reach, their load, and the bounded log of routing decisions).
//! Must never: let a fragment wait in an unbounded queue, or count a pipeline's
//! request as finished before its stream ends.

pub mod codec;
pub mod flight;
pub mod local;
pub mod remote;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::Result as DfResult;
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::ExecutionPlan;
use futures::Stream;
use parking_lot::{Mutex, RwLock};

use crate::clock::Clock;
use crate::error::Result;
use crate::balancer::ServiceEstimate;
use crate::router::{LoadSnapshot, PipelineLoad, Policy};
use crate::shard_map::{PipelineId, ShardId, ShardMap};
use crate::storage::cache::CacheStats;

/// One fragment of a query, ready to run: a physical plan whose output is one partition.
#[derive(Debug, Clone)]
pub struct Fragment {
    pub query_id: u64,
    /// The shard it reads, or None for the write buffer.
    pub shard: Option<ShardId>,
    pub plan: Arc<dyn ExecutionPlan>,
    /// The query's only fragment: nothing runs beside it, so an in-process pipeline
    /// drives it on the consumer's task instead of spawning one (no hand-off between
    /// threads for a point query).
    pub alone: bool,
    /// For a fragment of a replicated cluster run by a peer: the log index of its shard
    /// that the session's writes reached, which the peer's replica applies first.
    pub read_after: Option<u64>,
}

/// A worker that runs fragments.
#[async_trait]
pub trait Pipeline: Send + Sync + fmt::Debug {
    fn id(&self) -> PipelineId;
    /// Fragments it runs at once.
    fn slots(&self) -> u32;
    /// Counters kept on this node (for a remote pipeline: this node's requests to it).
    fn stats(&self) -> &Arc<PipelineStats>;
    /// Its segment cache, when it runs in this process.
    fn cache(&self) -> Option<CacheStats>;
    /// Its hot-segment cache (decoded columns), when it runs in this process.
    fn hot(&self) -> Option<CacheStats> {
        None
    }
    fn is_local(&self) -> bool;
    /// False while the pipeline is known to be unreachable.
    fn available(&self) -> bool {
        true
    }
    /// Reads `paths` (segment files) through its caches before it takes the shards
    /// they belong to: its warm-up. Returns the bytes read (0 where nothing is cached
    /// on this node's behalf, as for a remote pipeline).
    async fn warm(&self, _paths: &[String]) -> Result<u64> {
        Ok(0)
    }
    /// Starts `fragment` and returns its output. Waits for a slot (in a bounded
    /// queue: a full queue is an error, never a longer wait).
    async fn run(&self, fragment: Fragment, ctx: Arc<TaskContext>) -> Result<SendableRecordBatchStream>;
}

/// Latencies kept per pipeline for percentiles.
const LATENCY_SAMPLES_MAX: usize = 1024;

/// A pipeline's counters.
#[derive(Debug, Default)]
pub struct PipelineStats {
    pub in_flight: AtomicU32,
    pub queued: AtomicU32,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    /// Latencies and the service estimate, updated together once per fragment.
    samples: Mutex<Samples>,
}

#[derive(Debug, Default)]
struct Samples {
    /// The most recent fragment latencies in microseconds (bounded).
    latencies_us: VecDeque<u64>,
    /// The balancer's estimate of one fragment's service time here.
    service: ServiceEstimate,
}

/// Microseconds of a monotonic clock, for the balancer's estimates.
pub fn monotonic_us() -> i64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as i64
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StatsSnapshot {
    pub in_flight: u32,
    pub queued: u32,
    pub completed: u64,
    pub failed: u64,
    pub p50_us: Option<u64>,
    pub p95_us: Option<u64>,
    pub p99_us: Option<u64>,
}

impl PipelineStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut l: Vec<u64> = self.samples.lock().latencies_us.iter().copied().collect();
        l.sort_unstable();
        let pct = |p: f64| (!l.is_empty()).then(|| l[((l.len() - 1) as f64 * p).round() as usize]);
        StatsSnapshot {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            p50_us: pct(0.50),
            p95_us: pct(0.95),
            p99_us: pct(0.99),
        }
    }

    /// The balancer's estimate of one fragment's service time here.
    pub fn service(&self) -> ServiceEstimate {
        self.samples.lock().service
    }

    fn finish(&self, started: Instant, ok: bool) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let took_us = started.elapsed().as_micros() as u64;
        if ok {
            self.completed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        let mut s = self.samples.lock();
        if ok {
            // Failed fragments say nothing about service time (they may end at once).
            s.service.observe(took_us as f64, monotonic_us());
        }
        if s.latencies_us.len() == LATENCY_SAMPLES_MAX {
            s.latencies_us.pop_front();
        }
        s.latencies_us.push_back(took_us);
    }
}

/// Counts one request as in flight from creation until it is dropped; records its
/// latency and outcome then.
pub struct InFlight {
    stats: Arc<PipelineStats>,
    started: Instant,
    failed: bool,
}

impl InFlight {
    pub fn start(stats: &Arc<PipelineStats>) -> InFlight {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { stats: Arc::clone(stats), started: Instant::now(), failed: false }
    }

    pub fn fail(&mut self) {
        self.failed = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.finish(self.started, !self.failed);
    }
}

/// A fragment's output stream that holds its [`InFlight`] (and any slot permit) until
/// it ends or is dropped.
pub struct TrackedStream<G> {
    inner: SendableRecordBatchStream,
    flight: Option<InFlight>,
    _guard: G,
}

impl<G> TrackedStream<G> {
    pub fn new(inner: SendableRecordBatchStream, flight: InFlight, guard: G) -> TrackedStream<G> {
        TrackedStream { inner, flight: Some(flight), _guard: guard }
    }
}

impl<G: Unpin> Stream for TrackedStream<G> {
    type Item = DfResult<RecordBatch>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let r = self.inner.as_mut().poll_next(cx);
        match &r {
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut f) = self.flight.take() {
                    f.fail();
                }
            }
            Poll::Ready(None) => {
                self.flight.take();
            }
            _ => {}
        }
        r
    }
}

impl<G: Unpin> RecordBatchStream for TrackedStream<G> {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
}

/// One routing decision, as `system.routing_decisions` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingRecord {
    pub query_id: u64,
    pub time_us: i64,
    pub epoch: u64,
    /// None for the write-buffer fragment.
    pub shard: Option<ShardId>,
    /// The routing policy that decided.
    pub policy: &'static str,
    /// `pipeline=score` pairs in shard-map preference order (with the parts of a
    /// predictive score).
    pub candidates: String,
    pub choice: Option<String>,
    pub reason: String,
    /// 1 for the first try, 2 for the retry on another replica.
    pub attempt: u32,
}

/// This node's view of the cluster: the shard map at the current epoch and every
/// pipeline it can send fragments to.
pub struct Cluster {
    node_id: u64,
    clock: Clock,
    map: RwLock<Arc<ShardMap>>,
    pipelines: RwLock<BTreeMap<PipelineId, Arc<dyn Pipeline>>>,
    routing_log: Mutex<VecDeque<RoutingRecord>>,
    routing_log_max: usize,
    routing_dropped: AtomicU64,
    /// Sees every routing decision (the forecaster counts fragments per pipeline).
    route_observer: RwLock<Option<RouteObserver>>,
    /// The node's routing policy (`routing_policy`); a session may choose another.
    policy: RwLock<Policy>,
    /// Sequence numbers for round robin and the power-of-two draw.
    route_seq: AtomicU64,
    /// The forecaster's view of each pipeline now: predicted fragments per second and
    /// whether its forecasts beat seasonal naive (published after each forecast cycle).
    forecasts: RwLock<Arc<BTreeMap<PipelineId, PipelineForecast>>>,
    /// Pipelines taken out of the shard map but still reachable, since a query that
    /// pinned an earlier epoch may still send them a fragment: (when, id).
    retiring: Mutex<Vec<(Instant, PipelineId)>>,
    /// The autoscaler's decisions (bounded like the routing log).
    scaling_log: Mutex<VecDeque<ScalingRecord>>,
    /// Fragments completed by in-process pipelines that have since been removed, so
    /// that a node's total does not drop when one goes.
    reaped_completed: AtomicU64,
    /// Fragments routed per shard (first tries) since the hot-shard planner last took
    /// them; at most one entry per shard.
    shard_fragments: Mutex<BTreeMap<ShardId, u64>>,
    /// Every node holds its own replica of every shard (a replicated cluster): a
    /// fragment of a shard reads that shard's buffered rows beside its segments, and
    /// one sent to a peer reads the peer's replica ([`crate::storage::replica_scan`]).
    replicated_reads: bool,
}

/// One autoscaler decision, as `system.scaling_decisions` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingRecord {
    pub time_us: i64,
    pub mode: &'static str,
    /// The shard of a hot-shard decision (`current`/`target` count its replicas);
    /// None for the fleet (`current`/`target` count pipelines).
    pub shard: Option<ShardId>,
    pub current: u32,
    pub target: u32,
    /// The rate (fragments per second) the target was sized for.
    pub sized_for_rate: f64,
    /// One pipeline's capacity (fragments per second) and warm-up, as measured.
    pub capacity: f64,
    pub warmup_ms: f64,
    pub reason: String,
    /// What was done: pipelines started or stopped, a command run, or nothing.
    pub action: String,
    pub epoch: u64,
}

/// How long a retired pipeline stays reachable for queries of earlier epochs.
pub const RETIRE_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// What the forecaster expects of one pipeline now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PipelineForecast {
    /// Predicted fragments per second (of clock time) in the current bucket.
    pub rate: f64,
    /// Its next-bucket forecasts beat weekly seasonal naive (`system.forecast_accuracy`).
    pub trusted: bool,
}

/// A callback that sees each routing decision; it must be cheap.
pub type RouteObserver = Arc<dyn Fn(&RoutingRecord) + Send + Sync>;

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster").field("node_id", &self.node_id).field("map", &self.map).finish_non_exhaustive()
    }
}

impl Cluster {
    /// A cluster of `pipelines` with `shard_count` shards of `replicas` copies each.
    pub fn new(
        node_id: u64,
        clock: Clock,
        shard_count: u32,
        replicas: u32,
        pipelines: Vec<Arc<dyn Pipeline>>,
        routing_log_max: usize,
    ) -> Cluster {
        let ids: Vec<PipelineId> = pipelines.iter().map(|p| p.id()).collect();
        let map = ShardMap::build(shard_count, replicas, &ids);
        Cluster {
            node_id,
            clock,
            map: RwLock::new(Arc::new(map)),
            pipelines: RwLock::new(pipelines.into_iter().map(|p| (p.id(), p)).collect()),
            routing_log: Mutex::new(VecDeque::new()),
            routing_log_max: routing_log_max.max(1),
            routing_dropped: AtomicU64::new(0),
            route_observer: RwLock::new(None),
            policy: RwLock::new(Policy::default()),
            route_seq: AtomicU64::new(0),
            forecasts: RwLock::new(Arc::default()),
            retiring: Mutex::new(Vec::new()),
            scaling_log: Mutex::new(VecDeque::new()),
            reaped_completed: AtomicU64::new(0),
            shard_fragments: Mutex::new(BTreeMap::new()),
            replicated_reads: false,
        }
    }

    /// Marks the cluster as replicated: each node reads its own replica of a shard.
    pub fn with_replicated_reads(mut self) -> Cluster {
        self.replicated_reads = true;
        self
    }

    pub fn replicated_reads(&self) -> bool {
        self.replicated_reads
    }

    /// Adds a pipeline and places shards on it: the shard map moves to the next epoch
    /// (the fewest copies move; see `shard_map`). Queries that pinned the previous
    /// epoch keep routing by it. Returns the new epoch.
    pub fn add_pipeline(&self, p: Arc<dyn Pipeline>) -> u64 {
        let mut pipelines = self.pipelines.write();
        let id = p.id();
        pipelines.insert(id, p);
        self.retiring.lock().retain(|(_, r)| *r != id);
        self.remap(&pipelines)
    }

    /// Takes a pipeline out of the shard map (next epoch): no new query routes to it,
    /// while queries of earlier epochs may still reach it until [`Cluster::reap`]
    /// removes it, once idle and past [`RETIRE_GRACE`]. Returns the new epoch.
    pub fn retire_pipeline(&self, id: PipelineId) -> u64 {
        // Lock order: pipelines, then retiring, then the map.
        let pipelines = self.pipelines.read();
        {
            let mut retiring = self.retiring.lock();
            if !retiring.iter().any(|(_, r)| *r == id) {
                retiring.push((Instant::now(), id));
            }
        }
        self.remap(&pipelines)
    }

    /// Removes retired pipelines that are idle and past the grace period; returns them.
    pub fn reap(&self) -> Vec<PipelineId> {
        let mut pipelines = self.pipelines.write();
        let mut retiring = self.retiring.lock();
        let mut gone = Vec::new();
        retiring.retain(|(since, id)| {
            let idle = pipelines.get(id).is_none_or(|p| {
                let s = p.stats();
                s.in_flight.load(Ordering::Relaxed) + s.queued.load(Ordering::Relaxed) == 0
            });
            if idle && since.elapsed() >= RETIRE_GRACE {
                if let Some(p) = pipelines.remove(id).filter(|p| p.is_local()) {
                    self.reaped_completed.fetch_add(p.stats().completed.load(Ordering::Relaxed), Ordering::Relaxed);
                }
                gone.push(*id);
                false
            } else {
                true
            }
        });
        gone
    }

    /// Fragments completed by this process's pipelines since start, removed ones included.
    pub fn local_completed(&self) -> u64 {
        let live: u64 = self
            .pipelines
            .read()
            .values()
            .filter(|p| p.is_local())
            .map(|p| p.stats().completed.load(Ordering::Relaxed))
            .sum();
        live + self.reaped_completed.load(Ordering::Relaxed)
    }

    /// Pipelines in the shard map (not retiring).
    pub fn placed_pipelines(&self) -> Vec<PipelineId> {
        let pipelines = self.pipelines.read();
        let retiring: Vec<PipelineId> = self.retiring.lock().iter().map(|(_, id)| *id).collect();
        pipelines.keys().copied().filter(|id| !retiring.contains(id)).collect()
    }

    fn remap(&self, pipelines: &BTreeMap<PipelineId, Arc<dyn Pipeline>>) -> u64 {
        let retiring: Vec<PipelineId> = self.retiring.lock().iter().map(|(_, id)| *id).collect();
        let placed: Vec<PipelineId> = pipelines.keys().copied().filter(|id| !retiring.contains(id)).collect();
        let mut map = self.map.write();
        let next = map.with_pipelines(&placed);
        let epoch = next.epoch;
        *map = Arc::new(next);
        epoch
    }

    /// Gives the shards in `hot` that many replicas in all (the others only their base
    /// copies): the shard map moves to the next epoch (`ShardMap::with_hot`). Queries
    /// that pinned the previous epoch keep routing by it. Returns the new epoch.
    pub fn set_hot(&self, hot: &BTreeMap<ShardId, u32>) -> u64 {
        let mut map = self.map.write();
        let next = map.with_hot(hot);
        let epoch = next.epoch;
        *map = Arc::new(next);
        epoch
    }

    /// Fragments routed per shard since the last call (first tries only).
    pub fn take_shard_fragments(&self) -> BTreeMap<ShardId, u64> {
        std::mem::take(&mut *self.shard_fragments.lock())
    }

    /// The node's routing policy.
    pub fn policy(&self) -> Policy {
        *self.policy.read()
    }

    pub fn set_policy(&self, p: Policy) {
        *self.policy.write() = p;
    }

    /// `n` consecutive sequence numbers for one query's routing.
    pub fn next_route_seq(&self, n: usize) -> u64 {
        self.route_seq.fetch_add(n.max(1) as u64, Ordering::Relaxed)
    }

    /// Publishes the forecaster's view of each pipeline.
    pub fn set_pipeline_forecasts(&self, f: BTreeMap<PipelineId, PipelineForecast>) {
        *self.forecasts.write() = Arc::new(f);
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    pub fn now_us(&self) -> i64 {
        self.clock.now_us()
    }

    /// The shard map a query pins from routing to completion.
    pub fn shard_map(&self) -> Arc<ShardMap> {
        Arc::clone(&self.map.read())
    }

    pub fn pipeline(&self, id: PipelineId) -> Option<Arc<dyn Pipeline>> {
        self.pipelines.read().get(&id).cloned()
    }

    pub fn pipelines(&self) -> Vec<Arc<dyn Pipeline>> {
        self.pipelines.read().values().cloned().collect()
    }

    /// This process's pipelines.
    pub fn local_pipelines(&self) -> Vec<Arc<dyn Pipeline>> {
        self.pipelines.read().values().filter(|p| p.is_local()).cloned().collect()
    }

    /// Every pipeline's load now: live counters, the balancer's weights and the
    /// forecaster's rates.
    pub fn load_snapshot(&self) -> LoadSnapshot {
        let pipelines = self.pipelines.read();
        let estimates: Vec<ServiceEstimate> = pipelines.values().map(|p| p.stats().service()).collect();
        let (median_us, weights) = crate::balancer::weights(&estimates, monotonic_us());
        let forecasts = Arc::clone(&self.forecasts.read());
        let peers = pipelines.keys().map(|id| id.node).filter(|n| *n != self.node_id).collect::<std::collections::BTreeSet<_>>().len();
        LoadSnapshot::new(
            pipelines
                .values()
                .zip(weights)
                .map(|(p, weight)| {
                    let s = p.stats();
                    let mut l = PipelineLoad::idle(p.id(), p.slots());
                    l.in_flight = s.in_flight.load(Ordering::Relaxed);
                    l.queued = s.queued.load(Ordering::Relaxed);
                    l.available = p.available();
                    l.weight = weight;
                    l.service_s = median_us.unwrap_or(0.0) / 1e6;
                    if let Some(f) = forecasts.get(&p.id()) {
                        l.forecast_rate = f.rate;
                        l.forecast_trust = if f.trusted { 1.0 } else { 0.0 };
                        // This node's forecast counts its own fragments; a peer's
                        // pipeline also gets the other nodes' (assumed alike), which
                        // its counters here do not show. A local pipeline's counters
                        // show every node's fragments.
                        l.unseen = if p.is_local() { 0.0 } else { peers as f64 };
                    }
                    l
                })
                .collect(),
        )
    }

    pub fn set_route_observer(&self, o: RouteObserver) {
        *self.route_observer.write() = Some(o);
    }

    pub fn record_route(&self, r: RoutingRecord) {
        if let Some(o) = self.route_observer.read().as_ref() {
            o(&r);
        }
        if let (Some(shard), 1) = (r.shard, r.attempt) {
            *self.shard_fragments.lock().entry(shard).or_default() += 1;
        }
        let mut log = self.routing_log.lock();
        if log.len() >= self.routing_log_max {
            log.pop_front();
            self.routing_dropped.fetch_add(1, Ordering::Relaxed);
        }
        log.push_back(r);
    }

    pub fn record_scaling(&self, r: ScalingRecord) {
        let mut log = self.scaling_log.lock();
        if log.len() >= self.routing_log_max {
            log.pop_front();
        }
        log.push_back(r);
    }

    pub fn scaling_log(&self) -> Vec<ScalingRecord> {
        self.scaling_log.lock().iter().cloned().collect()
    }

    pub fn routing_log(&self) -> Vec<RoutingRecord> {
        self.routing_log.lock().iter().cloned().collect()
    }
}
