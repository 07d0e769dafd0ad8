//! The `system` schema: read-only tables that show Tidemark's own state.
//!
//! Owns: one TableProvider per system table; each builds its rows from a snapshot
//! when scanned. Must never: hold locks across a scan or let a query change state,
//! except `system.events`, which takes INSERT and DELETE (see `events`).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray, UInt32Array,
    UInt64Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{SchemaProvider, Session};
use datafusion::common::Result as DfResult;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::{TableProvider, TableType};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::ExecutionPlan;

use crate::error::Error;
use crate::forecaster::Forecaster;
use crate::pipeline::Cluster;
use crate::query_log::{self, QueryLog};
use crate::raft::groups::Groups;
use crate::storage::Storage;

pub mod events;

pub const SCHEMA: &str = "system";

/// The `system` schema provider.
#[derive(Debug)]
pub struct SystemSchema {
    tables: BTreeMap<&'static str, Arc<dyn TableProvider>>,
}

impl SystemSchema {
    pub fn new(
        storage: Arc<Storage>,
        groups: Option<std::sync::Weak<Groups>>,
        log: Arc<QueryLog>,
        cluster: Arc<Cluster>,
        forecaster: Arc<Forecaster>,
        clock: crate::clock::Clock,
    ) -> SystemSchema {
        let mut tables: BTreeMap<&'static str, Arc<dyn TableProvider>> = BTreeMap::new();
        tables.insert("query_log", Arc::new(QueryLogTable { log }));
        let s = Arc::clone(&storage);
        tables.insert("segments", Arc::new(SnapshotTable { schema: segments_schema(), rows: Box::new(move || segments_batch(&s)) }));
        let s = Arc::clone(&storage);
        let groups_for_replicas = groups.clone();
        tables.insert(
            "replicas",
            Arc::new(SnapshotTable { schema: replicas_schema(), rows: Box::new(move || {
                // Weak: the shard groups (and their log file) go with the node, not
                // with a context a task may still hold.
                let g = groups_for_replicas.as_ref().and_then(|w| w.upgrade());
                replicas_batch(g.as_deref(), &s)
            }) }),
        );
        let g = groups.clone();
        tables.insert(
            "nodes",
            Arc::new(SnapshotTable { schema: nodes_schema(), rows: Box::new(move || nodes_batch(g.as_ref().and_then(|w| w.upgrade()).as_deref())) }),
        );
        let s = storage;
        tables.insert("shards", Arc::new(SnapshotTable { schema: shards_schema(), rows: Box::new(move || shards_batch(&s)) }));
        let c = Arc::clone(&cluster);
        tables.insert("pipelines", Arc::new(SnapshotTable { schema: pipelines_schema(), rows: Box::new(move || pipelines_batch(&c)) }));
        tables.insert("events", Arc::new(events::EventsTable::new(Arc::clone(&forecaster), clock)));
        let f = Arc::clone(&forecaster);
        tables.insert("forecasts", Arc::new(SnapshotTable { schema: forecasts_schema(), rows: Box::new(move || forecasts_batch(&f)) }));
        let f = Arc::clone(&forecaster);
        tables.insert(
            "forecast_accuracy",
            Arc::new(SnapshotTable { schema: accuracy_schema(), rows: Box::new(move || accuracy_batch(&f)) }),
        );
        let f = forecaster;
        tables.insert(
            "query_patterns",
            Arc::new(SnapshotTable { schema: patterns_schema(), rows: Box::new(move || patterns_batch(&f)) }),
        );
        let c = Arc::clone(&cluster);
        tables.insert(
            "scaling_decisions",
            Arc::new(SnapshotTable { schema: scaling_schema(), rows: Box::new(move || scaling_batch(&c)) }),
        );
        let c = cluster;
        tables.insert(
            "routing_decisions",
            Arc::new(SnapshotTable { schema: routing_schema(), rows: Box::new(move || routing_batch(&c)) }),
        );
        SystemSchema { tables }
    }
}

#[async_trait]
impl SchemaProvider for SystemSchema {
    fn table_names(&self) -> Vec<String> {
        self.tables.keys().map(|k| k.to_string()).collect()
    }
    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        Ok(self.tables.get(name).cloned())
    }
    fn table_exist(&self, name: &str) -> bool {
        self.tables.contains_key(name)
    }
    fn register_table(&self, name: String, _table: Arc<dyn TableProvider>) -> DfResult<Option<Arc<dyn TableProvider>>> {
        Err(Error::ReadOnly(format!("cannot create system.{name}: the system schema is read-only")).into())
    }
    fn deregister_table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        Err(Error::ReadOnly(format!("cannot drop system.{name}: the system schema is read-only")).into())
    }
}

type RowsFn = Box<dyn Fn() -> crate::error::Result<RecordBatch> + Send + Sync>;

/// A system table whose rows are computed from in-memory state at scan time.
struct SnapshotTable {
    schema: SchemaRef,
    rows: RowsFn,
}

impl std::fmt::Debug for SnapshotTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotTable").field("schema", &self.schema).finish()
    }
}

#[async_trait]
impl TableProvider for SnapshotTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
    fn table_type(&self) -> TableType {
        TableType::View
    }
    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let batch = (self.rows)()?;
        Ok(MemorySourceConfig::try_new_exec(&[vec![batch]], Arc::clone(&self.schema), projection.cloned())?)
    }
}

/// `system.query_log`: persisted Parquet files plus the entries not yet flushed.
#[derive(Debug)]
struct QueryLogTable {
    log: Arc<QueryLog>,
}

#[async_trait]
impl TableProvider for QueryLogTable {
    fn schema(&self) -> SchemaRef {
        query_log::schema()
    }
    fn table_type(&self) -> TableType {
        TableType::View
    }
    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let schema = query_log::schema();
        let (buffered, files) = self.log.snapshot()?;
        let buffered = query_log::to_batch(&buffered)?;
        let memory = MemorySourceConfig::try_new_exec(&[vec![buffered]], Arc::clone(&schema), projection.cloned())?;
        if files.is_empty() {
            return Ok(memory);
        }
        let parts = files
            .into_iter()
            .map(|(path, len)| {
                let p = object_store::path::Path::from_absolute_path(&path)
                    .map_err(|e| Error::Internal(format!("query log path {}: {e}", path.display())))?;
                Ok(PartitionedFile::new(p.as_ref().to_string(), len))
            })
            .collect::<crate::error::Result<Vec<_>>>()?;
        let config = FileScanConfigBuilder::new(
            ObjectStoreUrl::local_filesystem(),
            Arc::new(ParquetSource::new(Arc::clone(&schema))),
        )
        .with_file_groups(vec![FileGroup::new(parts)])
        .with_projection_indices(projection.cloned())?
        .build();
        let persisted = ParquetFormat::new().create_physical_plan(state, config).await?;
        UnionExec::try_new(vec![persisted, memory])
    }
}

fn segments_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, None);
    Arc::new(Schema::new(vec![
        Field::new("segment_id", DataType::UInt64, false),
        Field::new("table_name", DataType::Utf8, false),
        Field::new("shard", DataType::UInt32, false),
        Field::new("window_start", ts.clone(), false),
        Field::new("window_end", ts.clone(), false),
        Field::new("min_time", ts.clone(), false),
        Field::new("max_time", ts.clone(), false),
        Field::new("rows", DataType::UInt64, false),
        Field::new("bytes", DataType::UInt64, false),
        Field::new("level", DataType::UInt32, false),
        Field::new("created_at", ts, false),
        Field::new("path", DataType::Utf8, false),
    ]))
}

fn segments_batch(storage: &Storage) -> crate::error::Result<RecordBatch> {
    let m = storage.snapshot();
    let s = &m.segments;
    let ts = |f: &dyn Fn(&crate::storage::manifest::SegmentMeta) -> i64| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from(s.iter().map(f).collect::<Vec<_>>()))
    };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from(s.iter().map(|x| x.id).collect::<Vec<_>>())),
        Arc::new(StringArray::from(s.iter().map(|x| x.table.as_str()).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(s.iter().map(|x| x.shard).collect::<Vec<_>>())),
        ts(&|x| x.window_start_us),
        ts(&|x| x.window_end_us),
        ts(&|x| x.min_time_us),
        ts(&|x| x.max_time_us),
        Arc::new(UInt64Array::from(s.iter().map(|x| x.rows).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(s.iter().map(|x| x.bytes).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(s.iter().map(|x| x.level).collect::<Vec<_>>())),
        ts(&|x| x.created_at_us),
        Arc::new(StringArray::from(s.iter().map(|x| x.path.as_str()).collect::<Vec<_>>())),
    ];
    Ok(RecordBatch::try_new(segments_schema(), cols)?)
}

fn nodes_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("node_id", DataType::UInt64, false),
        Field::new("internal_addr", DataType::Utf8, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("last_answer_ms", DataType::UInt64, true),
        Field::new("shards_led", DataType::UInt32, false),
        Field::new("voter_of", DataType::UInt32, false),
    ]))
}

/// One row per node of the shard groups' voters, as this node sees it: whether it
/// answers (this node's calls to it), and how many shards it leads.
fn nodes_batch(groups: Option<&Groups>) -> crate::error::Result<RecordBatch> {
    let nodes = groups.map(|g| g.nodes()).unwrap_or_default();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from(nodes.iter().map(|n| n.id).collect::<Vec<_>>())),
        Arc::new(StringArray::from(nodes.iter().map(|n| n.internal_addr.as_str()).collect::<Vec<_>>())),
        Arc::new(StringArray::from(nodes.iter().map(|n| n.state).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(nodes.iter().map(|n| n.last_answer_ms).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(nodes.iter().map(|n| n.shards_led).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(nodes.iter().map(|n| n.voter_of).collect::<Vec<_>>())),
    ];
    Ok(RecordBatch::try_new(nodes_schema(), cols)?)
}

fn replicas_schema() -> SchemaRef {
    let opt_u64 = |name: &str| Field::new(name, DataType::UInt64, true);
    Arc::new(Schema::new(vec![
        Field::new("shard", DataType::UInt32, false),
        Field::new("node_id", DataType::UInt64, false),
        Field::new("role", DataType::Utf8, false),
        Field::new("term", DataType::UInt64, false),
        opt_u64("leader"),
        Field::new("voters", DataType::Utf8, false),
        opt_u64("last_log_index"),
        opt_u64("applied_index"),
        opt_u64("flushed_index"),
        opt_u64("snapshot_index"),
        opt_u64("purged_index"),
        Field::new("lag_entries", DataType::UInt64, false),
        Field::new("vote_fence", DataType::Utf8, false),
        opt_u64("leader_contact_ms"),
    ]))
}

/// One row per shard group on this node, from openraft's metrics and the manifest
/// (`flushed_index`: the entry up to which the group's rows are in segments; entries
/// after it are re-applied from the log after a restart).
fn replicas_batch(groups: Option<&Groups>, storage: &Storage) -> crate::error::Result<RecordBatch> {
    let metrics: Vec<(u32, openraft::RaftMetrics<u64, openraft::BasicNode>)> = match groups {
        Some(g) => (0..g.shard_count()).filter_map(|s| g.raft(s).map(|r| (s, r.metrics().borrow().clone()))).collect(),
        None => Vec::new(),
    };
    let flushed = |s: u32| {
        storage
            .group_state(s)
            .and_then(|v| serde_json::from_value::<crate::raft::state_machine::GroupState>(v).ok())
            .and_then(|g| g.applied)
            .map(|l| l.index)
    };
    let role = |st: openraft::ServerState| match st {
        openraft::ServerState::Leader => "leader",
        openraft::ServerState::Follower => "follower",
        openraft::ServerState::Candidate => "candidate",
        openraft::ServerState::Learner => "learner",
        openraft::ServerState::Shutdown => "shutdown",
    };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from(metrics.iter().map(|(s, _)| *s).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(metrics.iter().map(|(_, m)| m.id).collect::<Vec<_>>())),
        Arc::new(StringArray::from(metrics.iter().map(|(_, m)| role(m.state)).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(metrics.iter().map(|(_, m)| m.current_term).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(metrics.iter().map(|(_, m)| m.current_leader).collect::<Vec<_>>())),
        Arc::new(StringArray::from(
            metrics
                .iter()
                .map(|(_, m)| m.membership_config.membership().voter_ids().map(|v| v.to_string()).collect::<Vec<_>>().join(","))
                .collect::<Vec<_>>(),
        )),
        Arc::new(UInt64Array::from(metrics.iter().map(|(_, m)| m.last_log_index).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(metrics.iter().map(|(_, m)| m.last_applied.map(|l| l.index)).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(metrics.iter().map(|(s, _)| flushed(*s)).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(metrics.iter().map(|(_, m)| m.snapshot.map(|l| l.index)).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(metrics.iter().map(|(_, m)| m.purged.map(|l| l.index)).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(
            metrics
                .iter()
                .map(|(_, m)| m.last_log_index.unwrap_or(0).saturating_sub(m.last_applied.map_or(0, |l| l.index)))
                .collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            metrics
                .iter()
                .map(|(s, _)| match groups.map(|g| g.fence(*s)) {
                    None | Some(crate::raft::groups::Fence::Open) => "open",
                    Some(crate::raft::groups::Fence::Deciding) => "deciding",
                    Some(crate::raft::groups::Fence::CatchingUp { .. }) => "catching up",
                })
                .collect::<Vec<_>>(),
        )),
        // A follower: how long ago its leader's last append (heartbeats included)
        // arrived, the bound on how stale a read without a token is here.
        Arc::new(UInt64Array::from(
            metrics
                .iter()
                .map(|(s, m)| match m.state {
                    openraft::ServerState::Leader => None,
                    _ => groups.and_then(|g| g.since_leader_contact(*s)).map(|d| d.as_millis() as u64),
                })
                .collect::<Vec<_>>(),
        )),
    ];
    Ok(RecordBatch::try_new(replicas_schema(), cols)?)
}

fn shards_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, None);
    Arc::new(Schema::new(vec![
        Field::new("table_name", DataType::Utf8, false),
        Field::new("shard", DataType::UInt32, false),
        Field::new("shard_count", DataType::UInt32, false),
        Field::new("segments", DataType::UInt64, false),
        Field::new("rows", DataType::UInt64, false),
        Field::new("bytes", DataType::UInt64, false),
        Field::new("min_time", ts.clone(), true),
        Field::new("max_time", ts, true),
        Field::new("manifest_version", DataType::Int64, false),
    ]))
}

fn shards_batch(storage: &Storage) -> crate::error::Result<RecordBatch> {
    let m = storage.snapshot();
    #[derive(Default)]
    struct Acc {
        segments: u64,
        rows: u64,
        bytes: u64,
        min: Option<i64>,
        max: Option<i64>,
    }
    let mut acc: BTreeMap<(String, u32), Acc> = BTreeMap::new();
    for t in &m.tables {
        for shard in 0..t.shard_count {
            acc.insert((t.name.clone(), shard), Acc::default());
        }
    }
    for s in &m.segments {
        let a = acc.entry((s.table.clone(), s.shard)).or_default();
        a.segments += 1;
        a.rows += s.rows;
        a.bytes += s.bytes;
        a.min = Some(a.min.map_or(s.min_time_us, |m| m.min(s.min_time_us)));
        a.max = Some(a.max.map_or(s.max_time_us, |m| m.max(s.max_time_us)));
    }
    let count_of = |t: &str| m.layout(t).map(|l| l.shard_count).unwrap_or(0);
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(acc.keys().map(|k| k.0.as_str()).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(acc.keys().map(|k| k.1).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(acc.keys().map(|k| count_of(&k.0)).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(acc.values().map(|a| a.segments).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(acc.values().map(|a| a.rows).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(acc.values().map(|a| a.bytes).collect::<Vec<_>>())),
        Arc::new(TimestampMicrosecondArray::from(acc.values().map(|a| a.min).collect::<Vec<_>>())),
        Arc::new(TimestampMicrosecondArray::from(acc.values().map(|a| a.max).collect::<Vec<_>>())),
        Arc::new(Int64Array::from(vec![m.version as i64; acc.len()])),
    ];
    Ok(RecordBatch::try_new(shards_schema(), cols)?)
}

fn pipelines_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("pipeline", DataType::Utf8, false),
        Field::new("node", DataType::UInt64, false),
        Field::new("local", DataType::Boolean, false),
        Field::new("available", DataType::Boolean, false),
        Field::new("slots", DataType::UInt32, false),
        Field::new("in_flight", DataType::UInt32, false),
        Field::new("queued", DataType::UInt32, false),
        Field::new("completed", DataType::UInt64, false),
        Field::new("failed", DataType::UInt64, false),
        Field::new("latency_p50_us", DataType::UInt64, true),
        Field::new("latency_p95_us", DataType::UInt64, true),
        Field::new("latency_p99_us", DataType::UInt64, true),
        Field::new("shard_replicas", DataType::UInt32, false),
        Field::new("cache_bytes", DataType::UInt64, true),
        Field::new("cache_bytes_max", DataType::UInt64, true),
        Field::new("cache_hit_rate", DataType::Float64, true),
        Field::new("hot_bytes", DataType::UInt64, true),
        Field::new("hot_bytes_max", DataType::UInt64, true),
        Field::new("hot_hit_rate", DataType::Float64, true),
        Field::new("epoch", DataType::UInt64, false),
        Field::new("weight", DataType::Float64, false),
        Field::new("service_us", DataType::Float64, true),
        Field::new("forecast_rate", DataType::Float64, false),
        Field::new("forecast_trusted", DataType::Boolean, false),
        Field::new("predicted_score", DataType::Float64, false),
    ]))
}

fn pipelines_batch(cluster: &Cluster) -> crate::error::Result<RecordBatch> {
    let map = cluster.shard_map();
    let loads = map.loads();
    let ps = cluster.pipelines();
    let stats: Vec<_> = ps.iter().map(|p| p.stats().snapshot()).collect();
    let caches: Vec<_> = ps.iter().map(|p| p.cache()).collect();
    let hots: Vec<_> = ps.iter().map(|p| p.hot()).collect();
    let snapshot = cluster.load_snapshot();
    let loads_now: Vec<Option<crate::router::PipelineLoad>> = ps.iter().map(|p| snapshot.get(p.id()).copied()).collect();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(ps.iter().map(|p| p.id().to_string()).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(ps.iter().map(|p| p.id().node).collect::<Vec<_>>())),
        Arc::new(BooleanArray::from(ps.iter().map(|p| p.is_local()).collect::<Vec<_>>())),
        Arc::new(BooleanArray::from(ps.iter().map(|p| p.available()).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(ps.iter().map(|p| p.slots()).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(stats.iter().map(|s| s.in_flight).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(stats.iter().map(|s| s.queued).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(stats.iter().map(|s| s.completed).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(stats.iter().map(|s| s.failed).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(stats.iter().map(|s| s.p50_us).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(stats.iter().map(|s| s.p95_us).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(stats.iter().map(|s| s.p99_us).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(ps.iter().map(|p| loads.get(&p.id()).copied().unwrap_or(0) as u32).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(caches.iter().map(|c| c.map(|c| c.bytes)).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(caches.iter().map(|c| c.map(|c| c.bytes_max)).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(caches.iter().map(|c| c.and_then(|c| c.hit_rate())).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(hots.iter().map(|c| c.map(|c| c.bytes)).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(hots.iter().map(|c| c.map(|c| c.bytes_max)).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(hots.iter().map(|c| c.and_then(|c| c.hit_rate())).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(vec![map.epoch; ps.len()])),
        Arc::new(Float64Array::from(loads_now.iter().map(|l| l.map_or(1.0, |l| l.weight)).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(
            ps.iter().map(|p| p.stats().service()).map(|e| (e.samples > 0).then_some(e.mean_us)).collect::<Vec<_>>(),
        )),
        Arc::new(Float64Array::from(loads_now.iter().map(|l| l.map_or(0.0, |l| l.forecast_rate)).collect::<Vec<_>>())),
        Arc::new(BooleanArray::from(loads_now.iter().map(|l| l.is_some_and(|l| l.forecast_trust > 0.0)).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(loads_now.iter().map(|l| l.map_or(0.0, |l| l.predicted_score())).collect::<Vec<_>>())),
    ];
    Ok(RecordBatch::try_new(pipelines_schema(), cols)?)
}

fn routing_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("query_id", DataType::UInt64, false),
        Field::new("time", DataType::Timestamp(TimeUnit::Microsecond, None), false),
        Field::new("epoch", DataType::UInt64, false),
        Field::new("shard", DataType::UInt32, true),
        Field::new("policy", DataType::Utf8, false),
        Field::new("candidates", DataType::Utf8, false),
        Field::new("choice", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("attempt", DataType::UInt32, false),
    ]))
}

fn routing_batch(cluster: &Cluster) -> crate::error::Result<RecordBatch> {
    let r = cluster.routing_log();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from(r.iter().map(|x| x.query_id).collect::<Vec<_>>())),
        Arc::new(TimestampMicrosecondArray::from(r.iter().map(|x| x.time_us).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(r.iter().map(|x| x.epoch).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(r.iter().map(|x| x.shard).collect::<Vec<_>>())),
        Arc::new(StringArray::from(r.iter().map(|x| x.policy).collect::<Vec<_>>())),
        Arc::new(StringArray::from(r.iter().map(|x| x.candidates.as_str()).collect::<Vec<_>>())),
        Arc::new(StringArray::from(r.iter().map(|x| x.choice.as_deref()).collect::<Vec<_>>())),
        Arc::new(StringArray::from(r.iter().map(|x| x.reason.as_str()).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(r.iter().map(|x| x.attempt).collect::<Vec<_>>())),
    ];
    Ok(RecordBatch::try_new(routing_schema(), cols)?)
}

fn scaling_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("time", DataType::Timestamp(TimeUnit::Microsecond, None), false),
        Field::new("mode", DataType::Utf8, false),
        Field::new("shard", DataType::UInt32, true),
        Field::new("current", DataType::UInt32, false),
        Field::new("target", DataType::UInt32, false),
        Field::new("sized_for_rate", DataType::Float64, false),
        Field::new("pipeline_capacity", DataType::Float64, false),
        Field::new("warmup_ms", DataType::Float64, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("action", DataType::Utf8, false),
        Field::new("epoch", DataType::UInt64, false),
    ]))
}

fn scaling_batch(cluster: &Cluster) -> crate::error::Result<RecordBatch> {
    let r = cluster.scaling_log();
    let cols: Vec<ArrayRef> = vec![
        Arc::new(TimestampMicrosecondArray::from(r.iter().map(|x| x.time_us).collect::<Vec<_>>())),
        Arc::new(StringArray::from(r.iter().map(|x| x.mode).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(r.iter().map(|x| x.shard).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(r.iter().map(|x| x.current).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(r.iter().map(|x| x.target).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(r.iter().map(|x| x.sized_for_rate).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(r.iter().map(|x| x.capacity).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(r.iter().map(|x| x.warmup_ms).collect::<Vec<_>>())),
        Arc::new(StringArray::from(r.iter().map(|x| x.reason.as_str()).collect::<Vec<_>>())),
        Arc::new(StringArray::from(r.iter().map(|x| x.action.as_str()).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(r.iter().map(|x| x.epoch).collect::<Vec<_>>())),
    ];
    Ok(RecordBatch::try_new(scaling_schema(), cols)?)
}

fn forecasts_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, None);
    Arc::new(Schema::new(vec![
        Field::new("scope", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("bucket_start", ts.clone(), false),
        Field::new("predicted", DataType::Float64, false),
        Field::new("lower", DataType::Float64, false),
        Field::new("upper", DataType::Float64, false),
        Field::new("lower_80", DataType::Float64, false),
        Field::new("upper_80", DataType::Float64, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("fitted_at", ts, false),
    ]))
}

/// `lower`/`upper` are the 95% interval; `lower_80`/`upper_80` the 80% one.
fn forecasts_batch(f: &Forecaster) -> crate::error::Result<RecordBatch> {
    let latest = f.adjusted();
    let r = &latest.rows;
    let f64s = |g: &dyn Fn(&crate::forecaster::ForecastRow) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from(r.iter().map(g).collect::<Vec<_>>()))
    };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(r.iter().map(|x| x.scope).collect::<Vec<_>>())),
        Arc::new(StringArray::from(r.iter().map(|x| x.key.as_str()).collect::<Vec<_>>())),
        Arc::new(TimestampMicrosecondArray::from(r.iter().map(|x| x.bucket_start_us).collect::<Vec<_>>())),
        f64s(&|x| x.predicted),
        f64s(&|x| x.lower95),
        f64s(&|x| x.upper95),
        f64s(&|x| x.lower80),
        f64s(&|x| x.upper80),
        Arc::new(StringArray::from(r.iter().map(|x| x.model.as_str()).collect::<Vec<_>>())),
        Arc::new(TimestampMicrosecondArray::from(r.iter().map(|x| x.fitted_at_us).collect::<Vec<_>>())),
    ];
    Ok(RecordBatch::try_new(forecasts_schema(), cols)?)
}

fn patterns_schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, None);
    Arc::new(Schema::new(vec![
        Field::new("entity_id", DataType::Utf8, false),
        Field::new("service", DataType::Utf8, true),
        Field::new("operation", DataType::Utf8, true),
        Field::new("interval_start", ts.clone(), false),
        Field::new("interval_end", ts, false),
        Field::new("probability", DataType::Float64, false),
        Field::new("expected_queries", DataType::Float64, false),
    ]))
}

fn patterns_batch(f: &Forecaster) -> crate::error::Result<RecordBatch> {
    let latest = f.adjusted();
    let p = &latest.patterns;
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(p.iter().map(|x| x.entity_id.as_str()).collect::<Vec<_>>())),
        Arc::new(StringArray::from(p.iter().map(|x| x.service.as_deref()).collect::<Vec<_>>())),
        Arc::new(StringArray::from(p.iter().map(|x| x.operation.as_deref()).collect::<Vec<_>>())),
        Arc::new(TimestampMicrosecondArray::from(p.iter().map(|x| x.interval_start_us).collect::<Vec<_>>())),
        Arc::new(TimestampMicrosecondArray::from(p.iter().map(|x| x.interval_end_us).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(p.iter().map(|x| x.probability).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(p.iter().map(|x| x.expected_queries).collect::<Vec<_>>())),
    ];
    Ok(RecordBatch::try_new(patterns_schema(), cols)?)
}

fn accuracy_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("scope", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("horizon_buckets", DataType::UInt32, false),
        Field::new("points", DataType::UInt64, false),
        Field::new("mase", DataType::Float64, true),
        Field::new("wape", DataType::Float64, true),
        Field::new("coverage_80", DataType::Float64, false),
        Field::new("coverage_95", DataType::Float64, false),
        Field::new("replaced_by_naive", DataType::Boolean, false),
    ]))
}

fn accuracy_batch(f: &Forecaster) -> crate::error::Result<RecordBatch> {
    let latest = f.latest();
    let a = &latest.accuracy;
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(a.iter().map(|x| x.scope).collect::<Vec<_>>())),
        Arc::new(StringArray::from(a.iter().map(|x| x.key.as_str()).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(a.iter().map(|x| x.horizon_buckets).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(a.iter().map(|x| x.points).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(a.iter().map(|x| x.mase).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(a.iter().map(|x| x.wape).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(a.iter().map(|x| x.coverage_80).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(a.iter().map(|x| x.coverage_95).collect::<Vec<_>>())),
        Arc::new(BooleanArray::from(a.iter().map(|x| x.replaced_by_naive).collect::<Vec<_>>())),
    ];
    Ok(RecordBatch::try_new(accuracy_schema(), cols)?)
}
