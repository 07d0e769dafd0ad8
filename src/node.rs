//! A node: one Tidemark process's catalog, storage, query log and DataFusion context,
//! plus its background tasks. A single node is a complete one-node cluster.
//!
//! Owns: start-up order (catalog, storage, query log, SQL context) and shutdown
//! (background tasks stopped, query log flushed). Must never: hold per-connection state.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::DataType;
use datafusion::execution::context::SessionState;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::{create_udf, ColumnarValue, Volatility};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::scalar::ScalarValue;
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use parking_lot::Mutex;

use crate::catalog::Catalog;
use crate::forecaster::{ForecastSettings, Forecaster};
use crate::pipeline::flight::{FlightServer, FragmentService};
use crate::pipeline::local::LocalPipeline;
use crate::pipeline::remote::RemotePipeline;
use crate::pipeline::{Cluster, Pipeline};
use crate::planner::fragment::Fragmenter;
use crate::shard_map::PipelineId;
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::query_log::QueryLog;
use crate::storage::hot::HotCache;
use crate::storage::provider::SegmentTable;
use crate::storage::{self, Storage, SEGMENT_STORE_URL};
use crate::system::{SystemSchema, SCHEMA as SYSTEM_SCHEMA};

/// The database name clients connect to.
pub const DATABASE: &str = "tidemark";

/// Matches the `server_version` pgwire reports at start-up, so clients see one version.
pub const SERVER_VERSION: &str = "16.6";

pub struct Node {
    config: Config,
    forecaster: Arc<Forecaster>,
    /// The internal Flight service, when `internal_addr` is set.
    flight: Mutex<Option<FlightServer>>,
    cluster: Arc<Cluster>,
    catalog: Arc<Catalog>,
    storage: Arc<Storage>,
    /// The shard groups, the write path into `storage` (none on a read-only node).
    groups: Option<Arc<crate::raft::groups::Groups>>,
    query_log: Arc<QueryLog>,
    ctx: SessionContext,
    parser: PostgresCompatibilityParser,
    clock: Clock,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    plans: crate::planner::generic::PlanCounters,
    /// Prepared statements shared by the connections (by query text).
    statements: crate::planner::shared::SharedStatements,
    copy_paths: crate::export::CopyPaths,
    exec: ExecRuntime,
}

/// Stack of each thread that parses, plans and runs statements. Planning recurses once
/// per expression level (DataFusion's own passes grow their stack on the heap; the
/// parser's rewrites, ours and the tree's destructor do not), and statements are
/// refused beyond `expression_depth_max` levels, so this bounds every statement's
/// stack with a wide margin. It is address space, not memory, until touched.
pub const EXEC_STACK_BYTES: usize = 256 << 20;

/// The runtime that parses, plans and executes statements, apart from the one that
/// serves connections: a CPU-heavy query then cannot keep another connection's
/// `select 1`, a cancel request or a new login waiting behind it.
struct ExecRuntime(Option<tokio::runtime::Runtime>);

impl ExecRuntime {
    fn start() -> Result<ExecRuntime> {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .max_blocking_threads(64)
            .thread_stack_size(EXEC_STACK_BYTES)
            .thread_name("tidemark-exec")
            .enable_all()
            .build()?;
        Ok(ExecRuntime(Some(rt)))
    }
}

impl Drop for ExecRuntime {
    fn drop(&mut self) {
        // Dropping a runtime waits for its tasks; a node may be dropped inside another
        // runtime (tests), where waiting is not allowed.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Node {
    /// Opens (or creates) the node's data directory and starts its background tasks.
    pub async fn open(config: Config, clock: Clock) -> Result<Arc<Node>> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| Error::Config(format!("cannot create data directory {}: {e}", config.data_dir.display())))?;
        let catalog = Arc::new(Catalog::load_or_init(&config.data_dir)?);
        let copy_paths = crate::export::CopyPaths::open(&config.data_dir, &config.copy_dirs(), config.copy_overwrite, config.copy_bytes_max)?;
        crate::copy_in::clear_spool_dir(&crate::copy_in::spool_dir(&config.data_dir));
        // Orphaned files are removed once the shard groups have re-applied their logs
        // (an entry may name files its apply had not yet committed).
        let replicated = !config.segment_store_read_only;
        let storage = Storage::open_with(&config, Arc::clone(&catalog), clock.clone(), !replicated).await?;
        // Every write goes through the shards' Raft groups (one node: this node is each
        // group's only voter), except on a node that only reads a shared store.
        let groups = if replicated { Some(crate::raft::groups::Groups::start(&config, Arc::clone(&storage)).await?) } else { None };
        let query_log = QueryLog::open(&config.data_dir, config.query_log_memory_rows_max, config.query_log_disk_bytes_max)?;
        let (cluster, pipeline_factory) = build_cluster(&config, &catalog, &storage, &clock)?;
        let forecaster = Arc::new(
            Forecaster::new(ForecastSettings {
            bucket_secs: config.forecast_bucket_secs,
            history_days: config.forecast_history_days,
            horizon_hours: config.forecast_horizon_hours,
            patterns_max: config.forecast_patterns_max,
            pattern_keys_per_bucket_max: config.pattern_keys_per_bucket_max,
            series_per_cycle_max: config.forecast_series_per_cycle_max,
            })
            .with_events_file(config.data_dir.join("system").join("events.json"))?,
        );
        {
            // The persisted query log is the patterns' history after a restart.
            let since = clock.now_us() - (config.forecast_history_days as i64) * 86_400_000_000;
            let restored = query_log.read_persisted(since, |e| forecaster.observe_entry(e))?;
            tracing::info!(entries = restored, "query patterns rebuilt from the persisted query log");
            let f = Arc::clone(&forecaster);
            query_log.set_observer(Arc::new(move |e| f.observe_entry(e)));
            let f = Arc::clone(&forecaster);
            cluster.set_route_observer(Arc::new(move |r| {
                if let Some(p) = &r.choice {
                    f.observe_fragment(r.time_us, p);
                }
            }));
        }
        let ctx = build_context(&catalog, &storage, groups.as_ref(), &query_log, &clock, &cluster, &forecaster, config.node_memory_bytes_max)?;
        let exec = ExecRuntime::start()?;
        let exec_handle = exec.0.as_ref().expect("just started").handle().clone();
        let flight = match config.internal_addr {
            Some(addr) => {
                let service = FragmentService::new(ctx.clone(), Arc::clone(&cluster), config.query_memory_bytes_max, exec_handle);
                if let Some(g) = &groups {
                    service.set_replica_reader(Arc::new(OwnReplicas {
                        groups: Arc::downgrade(g),
                        storage: Arc::clone(&storage),
                        wait_max: Duration::from_millis(config.read_wait_ms_max.min(REPLICA_WAIT_MS_MAX)),
                        node_id: config.node_id,
                    }));
                    // The groups' messages arrive over the same service.
                    let handler: std::sync::Weak<dyn crate::pipeline::flight::ActionHandler> =
                        Arc::downgrade(&(Arc::clone(g) as Arc<dyn crate::pipeline::flight::ActionHandler>));
                    let _ = service.action_slot().set(handler);
                }
                Some(FlightServer::start(addr, service).await?)
            }
            None => None,
        };
        if let Some(g) = &groups {
            g.ready(flight.as_ref().map(|f| f.local_addr)).await?;
        }
        let node = Arc::new(Node {
            forecaster,
            flight: Mutex::new(flight),
            cluster,
            background: Mutex::new(Vec::new()),
            plans: Default::default(),
            statements: Default::default(),
            copy_paths,
            exec,
            parser: PostgresCompatibilityParser::new(),
            config,
            catalog,
            storage,
            groups,
            query_log,
            ctx,
            clock,
        });
        {
            let mut bg = node.background.lock();
            bg.push(crate::query_log::spawn_flusher(
                Arc::clone(&node.query_log),
                Duration::from_millis(node.config.query_log_flush_interval_ms.max(10)),
            ));
            if node.config.write_buffer_rows_max > 0 {
                bg.push(storage::spawn_buffer_flusher(
                    Arc::clone(&node.storage),
                    Duration::from_millis(node.config.write_buffer_flush_interval_ms.max(10)),
                ));
            }
            if node.config.forecast_interval_secs > 0 {
                bg.push(crate::forecaster::spawn(
                    Arc::clone(&node.forecaster),
                    node.clock.clone(),
                    Duration::from_secs(node.config.forecast_interval_secs),
                ));
                // The router reads each pipeline's forecast for the current bucket:
                // republished every second (buckets change in clock time, which may run
                // faster than real time in a replay).
                let (forecaster, cluster, clock) = (Arc::clone(&node.forecaster), Arc::clone(&node.cluster), node.clock.clone());
                let bucket_secs = node.config.forecast_bucket_secs.max(1);
                bg.push(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        tick.tick().await;
                        let f = forecaster.adjusted();
                        cluster.set_pipeline_forecasts(pipeline_forecasts(&f, clock.now_us(), bucket_secs));
                    }
                }));
            }
            if let Some(scaler) = crate::scaler::Scaler::new(
                &node.config,
                Arc::clone(&node.cluster),
                Arc::clone(&node.forecaster),
                Arc::clone(&node.storage),
                node.clock.clone(),
                pipeline_factory.clone(),
            )? {
                bg.push(scaler.spawn());
            }
            if let Some(g) = &node.groups {
                bg.push(g.spawn_snapshotter());
            }
            if node.config.compaction_interval_ms > 0 {
                bg.push(storage::spawn_compactor(
                    Arc::clone(&node.storage),
                    Duration::from_millis(node.config.compaction_interval_ms),
                ));
            }
        }
        Ok(node)
    }

    /// Stops background work and flushes the query log.
    pub fn shutdown(&self) {
        self.flight.lock().take();
        for h in self.background.lock().drain(..) {
            h.abort();
        }
        if let Err(e) = self.query_log.flush() {
            tracing::warn!(error = %e, "could not flush the query log at shutdown");
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }
    /// The shard groups (none on a node that only reads a shared store).
    pub fn groups(&self) -> Option<&Arc<crate::raft::groups::Groups>> {
        self.groups.as_ref()
    }
    /// The bound address of the internal Flight service.
    pub fn internal_addr(&self) -> Option<std::net::SocketAddr> {
        self.flight.lock().as_ref().map(|f| f.local_addr)
    }
    pub fn forecaster(&self) -> &Arc<Forecaster> {
        &self.forecaster
    }
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }
    pub fn query_log(&self) -> &Arc<QueryLog> {
        &self.query_log
    }
    pub fn clock(&self) -> &Clock {
        &self.clock
    }
    /// The runtime statements run on (see [`EXEC_STACK_BYTES`]).
    pub fn exec(&self) -> tokio::runtime::Handle {
        self.exec.0.as_ref().expect("the runtime lives as long as the node").handle().clone()
    }

    /// Where server-side COPY may read and write.
    pub fn copy_paths(&self) -> &crate::export::CopyPaths {
        &self.copy_paths
    }
    pub fn parser(&self) -> &PostgresCompatibilityParser {
        &self.parser
    }
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// A fresh copy of the SQL state for one statement.
    pub fn state(&self) -> SessionState {
        self.ctx.state()
    }

    /// A task context for running a plan built already (a reused plan): the node's
    /// settings plus `extension`, its runtime, and no function registry (a built plan
    /// holds its functions), so that nothing big is copied per execution.
    pub fn task_context<T: Send + Sync + 'static>(
        &self,
        extension: Arc<T>,
        routing_policy: Option<crate::router::Policy>,
    ) -> Arc<datafusion::execution::TaskContext> {
        let mut config = self.ctx.copied_config();
        config.set_extension(extension);
        if let Some(policy) = routing_policy {
            crate::planner::fragment::TidemarkOptions::set_routing_policy(config.options_mut(), policy);
        }
        Arc::new(datafusion::execution::TaskContext::new(
            None,
            self.ctx.session_id(),
            config,
            Default::default(),
            Default::default(),
            Default::default(),
            Default::default(),
            self.query_runtime(),
        ))
    }

    /// The runtime one query executes with: the node's, with the query's own memory
    /// limit (`query_memory_bytes_max`) over the node's pool.
    pub fn query_runtime(&self) -> Arc<datafusion::execution::runtime_env::RuntimeEnv> {
        crate::memory::query_runtime(&self.ctx.runtime_env(), self.config.query_memory_bytes_max)
    }

    /// A task context to execute a statement planned with `state`, with the query's
    /// memory limit.
    pub fn statement_task_context(&self, state: &SessionState) -> Arc<datafusion::execution::TaskContext> {
        crate::memory::task_context_with(&state.task_ctx(), self.query_runtime())
    }

    /// How prepared statements' Executes were planned on this node.
    pub fn plan_counters(&self) -> &crate::planner::generic::PlanCounters {
        &self.plans
    }

    /// Prepared statements shared by this node's connections.
    pub fn shared_statements(&self) -> &crate::planner::shared::SharedStatements {
        &self.statements
    }

    pub fn statement_timeout(&self) -> Option<Duration> {
        (self.config.statement_timeout_ms > 0).then(|| Duration::from_millis(self.config.statement_timeout_ms))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for h in self.background.lock().drain(..) {
            h.abort();
        }
    }
}

/// This node's pipelines and its view of the others, with the epoch-1 shard map.
/// Builds this node's in-process pipelines, alike (at start and when the autoscaler
/// adds one): each with its share of the segment and hot caches.
#[derive(Clone)]
pub struct LocalPipelineFactory {
    pub node_id: u64,
    pub slots: u32,
    pub queue_max: u32,
    pub store: Arc<dyn object_store::ObjectStore>,
    pub cache_bytes_max: u64,
    pub hot_bytes_max: u64,
    pub leading_sort_column: std::collections::HashMap<String, String>,
    /// `fault_fragment_ms`: every fragment of every pipeline built holds its slot this
    /// much longer (None = off).
    pub fragment_delay: Option<Duration>,
}

impl LocalPipelineFactory {
    pub fn build(&self, index: u32) -> Result<LocalPipeline> {
        let p = LocalPipeline::new(
            PipelineId::new(self.node_id, index),
            self.slots,
            self.queue_max,
            Arc::clone(&self.store),
            self.cache_bytes_max,
            Arc::new(HotCache::new(self.hot_bytes_max, self.leading_sort_column.clone())),
        )?;
        Ok(match self.fragment_delay {
            Some(delay) => p.with_slowdown(crate::pipeline::local::Slowdown { delay, from: std::time::Instant::now() }),
            None => p,
        })
    }
}

/// How long a peer's fragment waits at most for this node's replica to apply what the
/// session wrote before it answers unavailable (and the gateway tries another replica).
const REPLICA_WAIT_MS_MAX: u64 = 1_000;

/// Reads a replicated cluster's fragments from this node's replicas.
struct OwnReplicas {
    groups: std::sync::Weak<crate::raft::groups::Groups>,
    storage: Arc<Storage>,
    wait_max: Duration,
    node_id: u64,
}

#[async_trait::async_trait]
impl crate::pipeline::flight::ReplicaReader for OwnReplicas {
    async fn read(
        &self,
        shard: crate::shard_map::ShardId,
        read_after: Option<u64>,
        plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
    ) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        let unavailable = |reason: String| Error::PipelineUnavailable { pipeline: format!("node {}", self.node_id), reason };
        if let Some(index) = read_after {
            let groups = self.groups.upgrade().ok_or_else(|| unavailable("the node is stopping".into()))?;
            let mut token = crate::write_token::WriteToken::default();
            token.note(shard, index);
            match groups.wait_applied(&token, self.wait_max).await {
                Ok(()) => {}
                Err(e @ Error::ReplicaBehind { .. }) => return Err(unavailable(e.message())),
                Err(e) => return Err(e),
            }
        }
        Ok(crate::storage::replica_scan::resolve(&self.storage, plan)?)
    }
}

fn build_cluster(config: &Config, catalog: &Catalog, storage: &Storage, clock: &Clock) -> Result<(Arc<Cluster>, LocalPipelineFactory)> {
    let local = config.local_pipelines();
    let cache_each = config.segment_cache_bytes_max / u64::from(local.max(1));
    let hot_each = config.hot_cache_bytes_max / u64::from(local.max(1));
    let leading_sort_column: std::collections::HashMap<String, String> =
        catalog.tables().filter_map(|t| t.sort_key.first().map(|k| (t.name.clone(), k.clone()))).collect();
    let mut pipelines: Vec<Arc<dyn Pipeline>> = Vec::new();
    // Peers' pipelines: in a shared store they read the gateway's files; with
    // replicated shards a fragment sent to a peer reads the peer's own replica
    // (`storage::replica_scan`), since each replica writes its own files.
    let peers = config.parsed_peers()?;
    for (node, addr) in peers {
        for i in 0..config.peer_pipeline_count() {
            pipelines.push(Arc::new(RemotePipeline::new(
                PipelineId::new(node, i),
                addr,
                config.pipeline_slots,
                Duration::from_millis(config.fragment_timeout_ms.max(1)),
            )?));
        }
    }
    let factory = LocalPipelineFactory {
        node_id: config.node_id,
        slots: config.pipeline_slots,
        queue_max: config.pipeline_queue_max,
        store: storage.object_store(),
        cache_bytes_max: cache_each,
        hot_bytes_max: hot_each,
        leading_sort_column,
        fragment_delay: (config.fault_fragment_ms > 0).then(|| Duration::from_millis(config.fault_fragment_ms)),
    };
    let slow: Option<PipelineId> = config.fault_slow_pipeline.as_deref().map(|s| {
        s.parse::<PipelineId>().map_err(|_| Error::Config(format!("fault_slow_pipeline: not a pipeline id: {s:?}")))
    }).transpose()?;
    for i in 0..local {
        let mut p = factory.build(i)?;
        if slow == Some(p.id()) && config.fault_slow_ms > 0 {
            p = p.with_slowdown(crate::pipeline::local::Slowdown {
                delay: Duration::from_millis(config.fault_slow_ms),
                from: std::time::Instant::now() + Duration::from_secs(config.fault_slow_after_secs),
            });
            tracing::warn!(pipeline = %p.id(), ms = config.fault_slow_ms, after_secs = config.fault_slow_after_secs, "fault injection: slow pipeline");
        }
        pipelines.push(Arc::new(p));
    }
    // Every table is split into the same number of shards in practice; the map covers
    // the largest so that any table's shard has a placement.
    let manifest = storage.snapshot();
    let shard_count = catalog
        .tables()
        .filter_map(|t| manifest.layout(&t.name).map(|l| l.shard_count))
        .max()
        .unwrap_or(config.shard_count);
    let mut cluster = Cluster::new(config.node_id, clock.clone(), shard_count, config.shard_replicas, pipelines, config.routing_log_rows_max);
    if config.replicas_span_nodes() {
        cluster = cluster.with_replicated_reads();
    }
    cluster.set_policy(crate::router::Policy::parse(&config.routing_policy).unwrap_or_default());
    Ok((Arc::new(cluster), factory))
}

/// Each pipeline's forecast for the bucket holding `now_us`, as fragments per second,
/// and whether the router may trust it: its next-bucket forecasts beat weekly seasonal
/// naive (MASE below 1 over at least 12 judged points) and were not replaced by it.
pub fn pipeline_forecasts(
    f: &crate::forecaster::Forecasts,
    now_us: i64,
    bucket_secs: u64,
) -> std::collections::BTreeMap<crate::shard_map::PipelineId, crate::pipeline::PipelineForecast> {
    let bucket_us = bucket_secs as i64 * 1_000_000;
    let trusted: std::collections::BTreeSet<&str> = f
        .accuracy
        .iter()
        .filter(|a| a.scope == "pipeline" && a.horizon_buckets == 1 && a.points >= 12 && !a.replaced_by_naive)
        .filter(|a| a.mase.is_some_and(|m| m < 1.0))
        .map(|a| a.key.as_str())
        .collect();
    f.rows
        .iter()
        .filter(|r| r.scope == "pipeline" && r.bucket_start_us <= now_us && now_us < r.bucket_start_us + bucket_us)
        .filter_map(|r| {
            let id = r.key.parse::<crate::shard_map::PipelineId>().ok()?;
            let rate = r.predicted.max(0.0) / bucket_secs as f64;
            Some((id, crate::pipeline::PipelineForecast { rate, trusted: trusted.contains(r.key.as_str()) }))
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn build_context(
    catalog: &Arc<Catalog>,
    storage: &Arc<Storage>,
    groups: Option<&Arc<crate::raft::groups::Groups>>,
    log: &Arc<QueryLog>,
    clock: &Clock,
    cluster: &Arc<Cluster>,
    forecaster: &Arc<Forecaster>,
    node_memory_bytes_max: u64,
) -> Result<SessionContext> {
    let mut config = SessionConfig::new()
        .with_default_catalog_and_schema(DATABASE, "public")
        .with_information_schema(true)
        .with_option_extension(crate::planner::fragment::TidemarkOptions::default())
        .with_target_partitions(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
    {
        let o = config.options_mut();
        // Evaluate filters inside the Parquet reader, using page indexes and bloom
        // filters, so a point query decodes only the pages it needs.
        o.execution.parquet.pushdown_filters = true;
        o.execution.parquet.reorder_filters = true;
        o.execution.parquet.enable_page_index = true;
        // Rows in a segment are sorted by the shard key, so page statistics (the page
        // index) already find an entity's pages; reading the bloom filter on every
        // query costs more (an extra read) than it saves. It is still written, for
        // readers that do not sort.
        o.execution.parquet.bloom_filter_on_read = false;
        o.execution.time_zone = Some("+00:00".into());
        // Segments are small and a scan already spreads them over file groups; a
        // round-robin repartition on top only adds a task hand-off to point queries.
        o.optimizer.enable_round_robin_repartition = false;
        // As in PostgreSQL, `1.5` is an exact numeric, not a double: `0.1 + 0.2` is
        // 0.3, and `1.0 / 0.0` is a division by zero (22012), not infinity.
        o.sql_parser.parse_float_as_decimal = true;
    }
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_pool(crate::memory::node_pool(node_memory_bytes_max))
        .build_arc()?;
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        // After DataFusion's own rules: joins spend the task's cooperative budget, so
        // that a stopped query stops (planner::yield_points).
        .with_physical_optimizer_rule(Arc::new(crate::planner::yield_points::YieldPoints))
        // Last: split per-shard work into fragments.
        .with_physical_optimizer_rule(Arc::new(Fragmenter::new(Arc::clone(cluster))))
        .build();
    let ctx = SessionContext::new_with_state(state);
    let url = url::Url::parse(SEGMENT_STORE_URL).map_err(|e| Error::Internal(e.to_string()))?;
    ctx.register_object_store(&url, storage.object_store());
    for t in catalog.tables() {
        ctx.register_table(t.name.as_str(), Arc::new(SegmentTable::new(Arc::clone(t), Arc::clone(storage), clock.clone())))?;
    }
    let db = ctx
        .catalog(DATABASE)
        .ok_or_else(|| Error::Internal("default catalog missing".into()))?;
    db.register_schema(
        SYSTEM_SCHEMA,
        Arc::new(SystemSchema::new(
            Arc::clone(storage),
            groups.map(Arc::downgrade),
            Arc::clone(log),
            Arc::clone(cluster),
            Arc::clone(forecaster),
            clock.clone(),
        )),
    )?;
    datafusion_pg_catalog::pg_catalog::setup_pg_catalog(&ctx, DATABASE, EmptyContextProvider)
        .map_err(|e| Error::from(*e))?;
    let version = format!("PostgreSQL {SERVER_VERSION} (Tidemark {})", env!("CARGO_PKG_VERSION"));
    ctx.register_udf(create_udf(
        "version",
        vec![],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(move |_| Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(version.clone()))))),
    ));
    ctx.register_udf(crate::pg_functions::Chr::udf());
    Ok(ctx)
}
