//! The DataFusion table over a catalog table's segments: scans read through the
//! committed manifest, pruned by shard and time window; INSERT appends through storage.
//!
//! Owns: turning a scan's filters into the list of segment files to read, and the
//! INSERT sink. Must never: skip a segment that could hold a matching row (pruning uses
//! `planner::shard_key`, which answers "all" when unsure), or read a manifest twice in
//! one scan (one snapshot per scan keeps a query's view consistent).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::common::Result as DfResult;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::datasource::{TableProvider, TableType};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan};
use datafusion::datasource::listing::PartitionedFile;
use futures::TryStreamExt;
use parking_lot::Mutex;

use super::Storage;
use crate::catalog::TableDef;
use crate::clock::Clock;
use crate::error::Error;
use crate::ingest;
use crate::planner::shard_key::{self, KeySet, TimeRange};
use crate::shard_map::{shard_of, ShardId};

/// What the scans of one statement touched; put into the session config by the caller
/// and filled by [`SegmentTable::scan`], so the query log can say which shards and
/// segments a statement read.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// The statement's query id (fragments and routing decisions carry it).
    pub query_id: u64,
    inner: Mutex<ScanReportInner>,
}

#[derive(Debug, Default, Clone)]
pub struct ScanReportInner {
    pub tables: BTreeSet<String>,
    /// Shard-key values the predicates allow (None = all).
    pub keys: Option<BTreeSet<String>>,
    pub keys_all: bool,
    pub time: Option<TimeRange>,
    pub shards: BTreeSet<ShardId>,
    pub segments: u64,
    pub segments_total: u64,
    pub filters: Vec<Expr>,
}

impl ScanReport {
    pub fn for_query(query_id: u64) -> ScanReport {
        ScanReport { query_id, inner: Mutex::default() }
    }

    pub fn snapshot(&self) -> ScanReportInner {
        self.inner.lock().clone()
    }
}

/// What a scan's predicates said, shared by all its segment files (EXPLAIN shows it).
#[derive(Debug)]
pub struct ScanInfo {
    pub table: String,
    /// Shard-key values the predicates allow (None = all).
    pub keys: Option<Vec<String>>,
    pub time: TimeRange,
    pub shard_count: u32,
    pub segments_total: usize,
}

/// Attached to each segment file of a scan: the fragmenter groups files by shard.
#[derive(Debug, Clone)]
pub struct SegmentRef {
    pub shard: ShardId,
    pub scan: Arc<ScanInfo>,
}

/// Which segments of `table` a scan with `filters` must read.
pub struct Pruned {
    pub keys: KeySet,
    pub time: TimeRange,
    pub shards: Option<BTreeSet<ShardId>>,
    pub segments: Vec<super::manifest::SegmentMeta>,
    pub segments_total: usize,
}

pub fn prune(table: &TableDef, shard_count: u32, manifest: &super::manifest::Manifest, filters: &[Expr]) -> Pruned {
    let keys = shard_key::key_values(filters, &table.shard_key);
    let time = shard_key::time_range(filters, &table.time_column);
    let shards: Option<BTreeSet<ShardId>> = keys.values().map(|v| v.iter().map(|k| shard_of(k, shard_count)).collect());
    let mut total = 0;
    let segments = manifest
        .segments_of(&table.name)
        .inspect(|_| total += 1)
        .filter(|s| shards.as_ref().is_none_or(|set| set.contains(&s.shard)))
        .filter(|s| time.overlaps_us(s.min_time_us, s.max_time_us + 1))
        .cloned()
        .collect();
    Pruned { keys, time, shards, segments, segments_total: total }
}

#[derive(Debug)]
pub struct SegmentTable {
    def: Arc<TableDef>,
    storage: Arc<Storage>,
    clock: Clock,
    /// `DEFAULT` of the ingest-time column for INSERTs that leave it out.
    ingest_default: Option<(String, Expr)>,
}

impl SegmentTable {
    pub fn new(def: Arc<TableDef>, storage: Arc<Storage>, clock: Clock) -> SegmentTable {
        let ingest_default = def
            .ingest_time_column
            .clone()
            .map(|c| (c, datafusion::functions::datetime::expr_fn::now()));
        SegmentTable { def, storage, clock, ingest_default }
    }
}

#[async_trait]
impl TableProvider for SegmentTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.def.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn get_table_definition(&self) -> Option<&str> {
        Some(&self.def.sql)
    }

    fn get_column_default(&self, column: &str) -> Option<&Expr> {
        self.ingest_default.as_ref().filter(|(c, _)| c == column).map(|(_, e)| e)
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        // Pruning and Parquet statistics may keep extra rows, so DataFusion re-checks.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let (manifest, buffered) = self.storage.view();
        let layout = manifest
            .layout(&self.def.name)
            .ok_or_else(|| Error::UndefinedTable(self.def.name.clone()))?;
        let pruned = prune(&self.def, layout.shard_count, &manifest, filters);
        if let Some(report) = state.config().get_extension::<ScanReport>() {
            let mut r = report.inner.lock();
            r.tables.insert(self.def.name.clone());
            match pruned.keys.values() {
                Some(v) if !r.keys_all => r.keys.get_or_insert_with(BTreeSet::new).extend(v.iter().cloned()),
                Some(_) => {}
                None => {
                    r.keys_all = true;
                    r.keys = None;
                }
            }
            r.time = Some(match r.time {
                None => pruned.time,
                Some(prev) => TimeRange {
                    lo: prev.lo.zip(pruned.time.lo).map(|(a, b)| a.min(b)),
                    hi: prev.hi.zip(pruned.time.hi).map(|(a, b)| a.max(b)),
                },
            });
            r.shards.extend(pruned.segments.iter().map(|s| s.shard));
            r.segments += pruned.segments.len() as u64;
            r.segments_total += pruned.segments_total as u64;
            r.filters.extend(filters.iter().cloned());
        }
        let projected = match projection {
            Some(p) => Arc::new(self.def.schema.project(p)?),
            None => Arc::clone(&self.def.schema),
        };
        // Rows still in the write buffer: filtered and projected here, unioned below.
        let mut memory = Vec::new();
        if let Some(batches) = buffered.tables.get(&self.def.name) {
            let df_schema = datafusion::common::DFSchema::try_from(self.def.schema.as_ref().clone())?;
            let predicate = datafusion::logical_expr::utils::conjunction(filters.to_vec())
                .map(|p| state.create_physical_expr(p, &df_schema))
                .transpose()?;
            for b in batches {
                let b = match &predicate {
                    Some(p) => {
                        let mask = p.evaluate(b)?.into_array(b.num_rows())?;
                        let mask = datafusion::common::cast::as_boolean_array(&mask)?;
                        datafusion::arrow::compute::filter_record_batch(b, mask)?
                    }
                    None => b.clone(),
                };
                if b.num_rows() > 0 {
                    memory.push(match projection {
                        Some(p) => b.project(p)?,
                        None => b,
                    });
                }
            }
        }
        let memory_plan: Option<Arc<dyn ExecutionPlan>> =
            (!memory.is_empty()).then(|| Arc::new(BufferExec::new(Arc::clone(&projected), memory)) as _);
        if pruned.segments.is_empty() {
            return Ok(match memory_plan {
                Some(m) => m,
                None => Arc::new(EmptyExec::new(projected)),
            });
        }
        let info = Arc::new(ScanInfo {
            table: self.def.name.clone(),
            keys: pruned.keys.values().map(|v| v.iter().cloned().collect()),
            time: pruned.time,
            shard_count: layout.shard_count,
            segments_total: pruned.segments_total,
        });
        let groups_n = state.config().target_partitions().max(1).min(pruned.segments.len());
        let mut groups: Vec<Vec<PartitionedFile>> = vec![Vec::new(); groups_n];
        // Largest first, each to the least filled group, so partitions finish together.
        let mut segs = pruned.segments;
        segs.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.id.cmp(&b.id)));
        let mut sizes = vec![0u64; groups_n];
        for s in segs {
            let i = (0..groups_n).min_by_key(|&i| (sizes[i], i)).unwrap_or(0);
            sizes[i] += s.bytes;
            groups[i].push(
                PartitionedFile::new(s.path.clone(), s.bytes).with_extension(SegmentRef { shard: s.shard, scan: Arc::clone(&info) }),
            );
        }
        let source = ParquetSource::new(Arc::clone(&self.def.schema));
        let config = FileScanConfigBuilder::new(Storage::object_store_url(), Arc::new(source))
            .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        let format = ParquetFormat::new().with_options(state.table_options().parquet.clone());
        let files = format.create_physical_plan(state, config).await?;
        match memory_plan {
            Some(m) => datafusion::physical_plan::union::UnionExec::try_new(vec![files, m]),
            None => Ok(files),
        }
    }

    async fn insert_into(
        &self,
        _state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        op: InsertOp,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if op != InsertOp::Append {
            return Err(Error::NotSupported(format!("{op} into {}; only INSERT INTO is supported", self.def.name)).into());
        }
        // The sink declares every column nullable so that DataFusion does not run its
        // own NOT NULL check (which names neither the table column nor the row);
        // `ingest::conform` checks NOT NULL with both.
        let nullable = Arc::new(datafusion::arrow::datatypes::Schema::new(
            self.def.schema.fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect::<Vec<_>>(),
        ));
        let sink = SegmentSink { def: Arc::clone(&self.def), storage: Arc::clone(&self.storage), clock: self.clock.clone(), input_schema: nullable };
        Ok(Arc::new(DataSinkExec::new(input, Arc::new(sink), None)))
    }
}

/// INSERT target: collects the whole statement's rows, validates them, appends once.
#[derive(Debug)]
struct SegmentSink {
    def: Arc<TableDef>,
    storage: Arc<Storage>,
    clock: Clock,
    input_schema: SchemaRef,
}

impl DisplayAs for SegmentSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SegmentSink: table={}", self.def.name)
    }
}

#[async_trait]
impl DataSink for SegmentSink {
    fn schema(&self) -> &SchemaRef {
        &self.input_schema
    }

    async fn write_all(&self, data: SendableRecordBatchStream, _ctx: &Arc<TaskContext>) -> DfResult<u64> {
        let batches: Vec<_> = data.try_collect().await?;
        let rows = ingest::conform_all(&self.def, &batches, self.clock.now_us())?;
        let outcome = self.storage.append(&self.def, rows).await?;
        Ok(outcome.added)
    }
}

/// Rows of the write buffer that a scan matched (already filtered and projected).
/// Runs only in the process that holds the buffer: it is never sent to another node.
#[derive(Debug)]
pub struct BufferExec {
    batches: Vec<datafusion::arrow::record_batch::RecordBatch>,
    props: Arc<datafusion::physical_plan::PlanProperties>,
}

impl BufferExec {
    pub fn new(schema: SchemaRef, batches: Vec<datafusion::arrow::record_batch::RecordBatch>) -> BufferExec {
        use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
        let props = datafusion::physical_plan::PlanProperties::new(
            datafusion::physical_expr::EquivalenceProperties::new(schema),
            datafusion::physical_plan::Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        BufferExec { batches, props: Arc::new(props) }
    }
}

impl DisplayAs for BufferExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: usize = self.batches.iter().map(|b| b.num_rows()).sum();
        write!(f, "BufferExec: rows={rows}")
    }
}

impl ExecutionPlan for BufferExec {
    fn name(&self) -> &str {
        "BufferExec"
    }

    fn properties(&self) -> &Arc<datafusion::physical_plan::PlanProperties> {
        &self.props
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn datafusion::physical_expr::PhysicalExpr>) -> DfResult<datafusion::common::tree_node::TreeNodeRecursion>,
    ) -> DfResult<datafusion::common::tree_node::TreeNodeRecursion> {
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    }

    #[allow(deprecated)]
    fn with_new_children(self: Arc<Self>, _children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, partition: usize, _ctx: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(datafusion::error::DataFusionError::Internal(format!("BufferExec has one partition, not {partition}")));
        }
        Ok(Box::pin(datafusion::physical_plan::memory::MemoryStream::try_new(self.batches.clone(), self.schema(), None)?))
    }
}
