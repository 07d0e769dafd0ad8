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
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_expr::PhysicalExpr;
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
use crate::shard_key::{self, KeySet, TimeRange};
use crate::shard_map::{shard_of, ShardId};

/// What the scans of one statement touched; put into the session config by the caller
/// and filled by [`SegmentTable::scan`], so the query log can say which shards and
/// segments a statement read.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// The statement's query id (fragments and routing decisions carry it).
    pub query_id: u64,
    inner: Mutex<ScanReportInner>,
    /// The session's write token as the statement started: a replica of another node
    /// that runs one of its fragments first applies the token's index for that shard.
    read_after: Mutex<crate::write_token::WriteToken>,
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
        ScanReport { query_id, inner: Mutex::default(), read_after: Mutex::default() }
    }

    pub fn set_read_after(&self, token: crate::write_token::WriteToken) {
        *self.read_after.lock() = token;
    }

    /// The log index of `shard` the session's writes reached, if it wrote there.
    pub fn read_after(&self, shard: ShardId) -> Option<u64> {
        self.read_after.lock().index_of(shard)
    }

    pub fn snapshot(&self) -> ScanReportInner {
        self.inner.lock().clone()
    }
}

/// The properties of a leaf that yields one partition and promises nothing about order.
fn one_partition(schema: SchemaRef) -> Arc<datafusion::physical_plan::PlanProperties> {
    use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
    Arc::new(datafusion::physical_plan::PlanProperties::new(
        datafusion::physical_expr::EquivalenceProperties::new(schema),
        datafusion::physical_plan::Partitioning::UnknownPartitioning(1),
        EmissionType::Incremental,
        Boundedness::Bounded,
    ))
}

/// The `ExecutionPlan` methods of a leaf node without expressions of its own.
macro_rules! leaf_plan_methods {
    () => {
        fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
            vec![]
        }

        fn apply_expressions(
            &self,
            _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<datafusion::common::tree_node::TreeNodeRecursion>,
        ) -> DfResult<datafusion::common::tree_node::TreeNodeRecursion> {
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        }

        #[allow(deprecated)]
        fn with_new_children(self: Arc<Self>, _children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
            Ok(self)
        }
    };
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

/// Marks a planning state whose segment scans are to be chosen at execution time
/// ([`DeferredScanExec`]): set while a reusable plan of a prepared statement is built.
#[derive(Debug, Default)]
pub struct DeferScans;

/// A scan planned from one manifest snapshot and the write buffer: the kept segment
/// files (grouped, each tagged with its shard) and the matching buffered rows.
struct PlannedScan {
    projected: SchemaRef,
    files: Option<Vec<FileGroup>>,
    memory: Option<Arc<dyn ExecutionPlan>>,
}

impl PlannedScan {
    /// The scan's plan, given the Parquet scan of `self.files` (if any).
    fn combine(self, files: Option<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        match (files, self.memory) {
            (Some(f), Some(m)) => datafusion::physical_plan::union::UnionExec::try_new(vec![f, m]),
            (Some(f), None) => Ok(f),
            (None, Some(m)) => Ok(m),
            (None, None) => Ok(Arc::new(EmptyExec::new(self.projected))),
        }
    }
}

/// How a scan's kept files are grouped into partitions.
#[derive(Debug, Clone, Copy)]
enum Grouping {
    /// At most this many groups of about equal bytes.
    Balanced(usize),
    /// One group per shard, in shard order.
    ByShard,
}

/// Prunes `def`'s segments with `filters` (values already bound), records what the scan
/// touches in `report`, filters the write buffer's rows with `predicate` (the filters
/// as one physical expression, asked for only when the buffer holds rows of the table),
/// and groups the kept files.
#[allow(clippy::too_many_arguments)]
fn plan_scan(
    def: &TableDef,
    storage: &Storage,
    filters: &[Expr],
    projection: Option<&Vec<usize>>,
    projected: SchemaRef,
    report: Option<&ScanReport>,
    grouping: Grouping,
    predicate: &dyn Fn() -> DfResult<Option<Arc<dyn PhysicalExpr>>>,
) -> DfResult<PlannedScan> {
    let (manifest, buffered) = storage.view();
    let layout = manifest.layout(&def.name).ok_or_else(|| Error::UndefinedTable(def.name.clone()))?;
    let pruned = prune(def, layout.shard_count, &manifest, filters);
    if let Some(report) = report {
        let mut r = report.inner.lock();
        r.tables.insert(def.name.clone());
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
    // Rows still in the write buffer: filtered and projected here, unioned below.
    let memory = match buffered.tables.get(&def.name) {
        Some(batches) => buffered_rows(batches, &|_| true, predicate()?.as_ref(), projection)?,
        None => Vec::new(),
    };
    let memory: Option<Arc<dyn ExecutionPlan>> =
        (!memory.is_empty()).then(|| Arc::new(BufferExec::new(Arc::clone(&projected), memory)) as _);
    if pruned.segments.is_empty() {
        return Ok(PlannedScan { projected, files: None, memory });
    }
    let info = Arc::new(ScanInfo {
        table: def.name.clone(),
        keys: pruned.keys.values().map(|v| v.iter().cloned().collect()),
        time: pruned.time,
        shard_count: layout.shard_count,
        segments_total: pruned.segments_total,
    });
    let mut segs = pruned.segments;
    segs.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.id.cmp(&b.id)));
    let file = |s: &super::manifest::SegmentMeta| {
        PartitionedFile::new(s.path.clone(), s.bytes).with_extension(SegmentRef { shard: s.shard, scan: Arc::clone(&info) })
    };
    let groups: Vec<Vec<PartitionedFile>> = match grouping {
        Grouping::Balanced(groups_max) => {
            let groups_n = groups_max.max(1).min(segs.len());
            let mut groups = vec![Vec::new(); groups_n];
            // Largest first, each to the least filled group, so partitions finish together.
            let mut sizes = vec![0u64; groups_n];
            for s in &segs {
                let i = (0..groups_n).min_by_key(|&i| (sizes[i], i)).unwrap_or(0);
                sizes[i] += s.bytes;
                groups[i].push(file(s));
            }
            groups
        }
        Grouping::ByShard => {
            let mut by_shard: std::collections::BTreeMap<ShardId, Vec<PartitionedFile>> = Default::default();
            for s in &segs {
                by_shard.entry(s.shard).or_default().push(file(s));
            }
            by_shard.into_values().collect()
        }
    };
    Ok(PlannedScan { projected, files: Some(groups.into_iter().map(FileGroup::new).collect()), memory })
}

/// The scan of a reused plan: its filters hold parameters (`$n`), bound per execution,
/// so the segments to read, the write buffer's matching rows and the Parquet predicate
/// are chosen when it runs ([`DeferredScanExec::resolve`]), from the manifest and buffer
/// of that moment. Never executed itself: the `DistributeExec` (planner::fragment)
/// above it resolves it and runs the result.
#[derive(Debug)]
pub struct DeferredScanExec {
    def: Arc<TableDef>,
    storage: Arc<Storage>,
    projection: Option<Vec<usize>>,
    filters: Vec<Expr>,
    /// The Parquet scan as the table's format plans it, without files or predicate.
    proto: FileScanConfig,
    groups_max: usize,
    props: Arc<datafusion::physical_plan::PlanProperties>,
    /// The table schema for planning the filters.
    df_schema: datafusion::common::DFSchemaRef,
    /// The filters with each largest column-free expression that holds a parameter
    /// (`$1`, `'acct-' || lpad($1, 5, '0')`, `CAST($2 AS timestamp)`) replaced by the
    /// placeholder `fold<k>`, and `folds[k]`, that expression planned once: evaluated
    /// per execution, it gives the literal pruning and the Parquet predicate need,
    /// without simplifying the filters again.
    templates: Vec<Expr>,
    folds: Vec<Arc<dyn PhysicalExpr>>,
}

impl DeferredScanExec {
    fn new(
        def: Arc<TableDef>,
        storage: Arc<Storage>,
        projected: SchemaRef,
        projection: Option<Vec<usize>>,
        filters: Vec<Expr>,
        proto: FileScanConfig,
        groups_max: usize,
    ) -> DfResult<DeferredScanExec> {
        let props = one_partition(projected);
        let df_schema = Arc::new(
            datafusion::common::DFSchema::try_from(def.schema.as_ref().clone()).expect("a table schema is a valid DataFusion schema"),
        );
        let (templates, folds) = fold_templates(&filters)?;
        Ok(DeferredScanExec { def, storage, projection, filters, proto, groups_max, props, df_schema, templates, folds })
    }

    /// The filters with this execution's values, as literals (so that `'acct-' || $1`
    /// is a shard key), and the same as one physical predicate.
    fn bound_filters(&self) -> DfResult<(Vec<Expr>, Option<Arc<dyn PhysicalExpr>>)> {
        use datafusion::common::tree_node::{Transformed, TreeNode};
        let one_row = datafusion::arrow::record_batch::RecordBatch::try_new_with_options(
            Arc::new(datafusion::arrow::datatypes::Schema::empty()),
            vec![],
            &datafusion::arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(1)),
        )?;
        let values = self
            .folds
            .iter()
            .map(|f| match f.evaluate(&one_row)? {
                datafusion::logical_expr::ColumnarValue::Scalar(v) => Ok(v),
                datafusion::logical_expr::ColumnarValue::Array(a) => datafusion::common::ScalarValue::try_from_array(&a, 0),
            })
            .collect::<DfResult<Vec<_>>>()?;
        let filters = self
            .templates
            .iter()
            .map(|t| {
                if values.is_empty() {
                    return Ok(t.clone());
                }
                t.clone()
                    .transform_up(|e| match &e {
                        Expr::Placeholder(p) => match p.id.strip_prefix(FOLD_PREFIX).and_then(|k| k.parse::<usize>().ok()) {
                            Some(k) => Ok(Transformed::yes(Expr::Literal(values[k].clone(), None))),
                            None => Ok(Transformed::no(e)),
                        },
                        _ => Ok(Transformed::no(e)),
                    })
                    .map(|t| t.data)
            })
            .collect::<DfResult<Vec<_>>>()?;
        let predicate = datafusion::logical_expr::utils::conjunction(filters.clone()).map(|p| self.to_physical(p)).transpose()?;
        Ok((filters, predicate))
    }

    fn to_physical(&self, e: Expr) -> DfResult<Arc<dyn PhysicalExpr>> {
        let props = datafusion::execution::context::ExecutionProps::new();
        datafusion::physical_expr::create_physical_expr(&e, &self.df_schema, &props, &Default::default())
    }

    fn plan(&self, report: Option<&ScanReport>, grouping: Grouping) -> DfResult<(PlannedScan, Option<ParquetSource>)> {
        let (filters, predicate) = self.bound_filters()?;
        let planned =
            plan_scan(&self.def, &self.storage, &filters, self.projection.as_ref(), self.schema(), report, grouping, &|| Ok(predicate.clone()))?;
        let source = match &planned.files {
            Some(_) => {
                let source = self
                    .proto
                    .file_source()
                    .downcast_ref::<ParquetSource>()
                    .cloned()
                    .ok_or_else(|| Error::Internal("deferred scan without a Parquet source".into()))?;
                Some(match predicate {
                    Some(p) => source.with_predicate(p),
                    None => source,
                })
            }
            None => None,
        };
        Ok((planned, source))
    }

    fn config(&self, source: &ParquetSource, groups: Vec<FileGroup>) -> FileScanConfig {
        FileScanConfigBuilder::from(self.proto.clone()).with_source(Arc::new(source.clone())).with_file_groups(groups).build()
    }

    fn files_exec(&self, source: &ParquetSource, groups: Vec<FileGroup>) -> Arc<dyn ExecutionPlan> {
        DataSourceExec::from_data_source(self.config(source, groups))
    }

    /// The scan for this execution, as [`SegmentTable::scan`] would plan it with the
    /// filters' values of this execution, recorded in `report`.
    pub fn resolve(&self, report: Option<&ScanReport>) -> DfResult<Arc<dyn ExecutionPlan>> {
        let (mut planned, source) = self.plan(report, Grouping::Balanced(self.groups_max))?;
        let files = match (planned.files.take(), &source) {
            (Some(groups), Some(source)) => Some(self.files_exec(source, groups)),
            _ => None,
        };
        planned.combine(files)
    }

    /// The scan for this execution split by where its rows are: one single-partition
    /// Parquet scan per shard (with the number of its segments), and the write buffer's
    /// matching rows; recorded in `report`.
    pub fn resolve_by_shard(&self, report: Option<&ScanReport>) -> DfResult<ResolvedScan> {
        let (planned, source) = self.plan(report, Grouping::ByShard)?;
        let mut shards = Vec::new();
        if let (Some(groups), Some(source)) = (planned.files, &source) {
            for g in groups {
                let Some(shard) = g.files().first().and_then(|f| f.extensions.get::<SegmentRef>()).map(|r| r.shard) else { continue };
                let n = g.len();
                let files = SegmentFilesExec { config: self.config(source, vec![g]), props: Arc::clone(&self.props) };
                shards.push((shard, n, Arc::new(files) as Arc<dyn ExecutionPlan>));
            }
        }
        Ok(ResolvedScan { shards, buffer: planned.memory })
    }
}

/// One partition of a resolved deferred scan: a Parquet scan of segment files whose
/// `DataSourceExec` is built only if it runs as one. A pipeline with hot segments reads
/// the files itself ([`crate::storage::hot`]), and building a `DataSourceExec` derives
/// its equivalence properties from the predicate's values, a cost paid per execution
/// for nothing; this node has the deferred scan's properties (one partition, nothing
/// promised about order). Before a fragment goes to another node it becomes a
/// `DataSourceExec` ([`materialize_segment_files`]).
#[derive(Debug)]
pub struct SegmentFilesExec {
    config: FileScanConfig,
    props: Arc<datafusion::physical_plan::PlanProperties>,
}

impl SegmentFilesExec {
    pub fn config(&self) -> &FileScanConfig {
        &self.config
    }

    fn materialize(&self) -> Arc<dyn ExecutionPlan> {
        DataSourceExec::from_data_source(self.config.clone())
    }
}

/// `plan` with its [`SegmentFilesExec`]s turned into `DataSourceExec`s (for plans that
/// leave the process).
pub fn materialize_segment_files(plan: Arc<dyn ExecutionPlan>) -> DfResult<Arc<dyn ExecutionPlan>> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    plan.transform_up(|node| match node.downcast_ref::<SegmentFilesExec>() {
        Some(f) => Ok(Transformed::yes(f.materialize())),
        None => Ok(Transformed::no(node)),
    })
    .map(|t| t.data)
}

impl DisplayAs for SegmentFilesExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SegmentFilesExec: ")?;
        self.config.fmt_as(t, f)
    }
}

impl ExecutionPlan for SegmentFilesExec {
    fn name(&self) -> &str {
        "SegmentFilesExec"
    }

    fn properties(&self) -> &Arc<datafusion::physical_plan::PlanProperties> {
        &self.props
    }

    leaf_plan_methods!();

    fn execute(&self, partition: usize, ctx: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        self.materialize().execute(partition, ctx)
    }
}

/// A deferred scan resolved for one execution, by shard.
pub struct ResolvedScan {
    /// (shard, segments kept, single-partition scan of them)
    pub shards: Vec<(ShardId, usize, Arc<dyn ExecutionPlan>)>,
    /// The write buffer's matching rows (one partition), if any.
    pub buffer: Option<Arc<dyn ExecutionPlan>>,
}

const FOLD_PREFIX: &str = "tidemark_fold";

/// Splits `filters` into templates and the parameter expressions folded per execution
/// (see [`DeferredScanExec`]'s `templates`).
fn fold_templates(filters: &[Expr]) -> DfResult<(Vec<Expr>, Vec<Arc<dyn PhysicalExpr>>)> {
    use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::expr::Placeholder;
    let is_param = |e: &Expr| matches!(e, Expr::ScalarFunction(f) if f.func.inner().is::<crate::param_udf::ParamUdf>());
    let empty = datafusion::common::DFSchema::empty();
    let props = datafusion::execution::context::ExecutionProps::new();
    let mut folds = Vec::new();
    let mut templates = Vec::with_capacity(filters.len());
    for f in filters {
        let t = f.clone().transform_down(|e| {
            if e.column_refs().is_empty() && e.exists(|x| Ok(is_param(x)))? {
                let k = folds.len();
                folds.push(datafusion::physical_expr::create_physical_expr(&e, &empty, &props, &Default::default())?);
                let placeholder = Expr::Placeholder(Placeholder::new_with_field(format!("{FOLD_PREFIX}{k}"), None));
                return Ok(Transformed::new(placeholder, true, TreeNodeRecursion::Jump));
            }
            Ok(Transformed::no(e))
        })?;
        templates.push(t.data);
    }
    Ok((templates, folds))
}

impl DisplayAs for DeferredScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let filters: Vec<String> = self.filters.iter().map(|e| e.to_string()).collect();
        write!(f, "DeferredScanExec: table={}, filters=[{}] (segments chosen per execution)", self.def.name, filters.join(", "))
    }
}

impl ExecutionPlan for DeferredScanExec {
    fn name(&self) -> &str {
        "DeferredScanExec"
    }

    fn properties(&self) -> &Arc<datafusion::physical_plan::PlanProperties> {
        &self.props
    }

    leaf_plan_methods!();

    fn execute(&self, _partition: usize, _ctx: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        Err(Error::Internal("a deferred scan runs only through the DistributeExec above it".into()).into())
    }
}

/// Whether every table `plan` reads (subqueries included) is a segment table, whose
/// scan reads the data of the moment it runs. Other providers (system tables, the
/// PostgreSQL catalog) may hold what they found when the plan was made.
pub fn reads_only_segment_tables(plan: &datafusion::logical_expr::LogicalPlan) -> bool {
    use datafusion::common::tree_node::TreeNodeRecursion;
    use datafusion::logical_expr::LogicalPlan;
    let mut only = true;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(ts) = node {
            let segment = datafusion::datasource::source_as_provider(&ts.source).ok().is_some_and(|p| p.downcast_ref::<SegmentTable>().is_some());
            if !segment {
                only = false;
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    only
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

/// Which shards the segment scans of `plan` (subqueries included) may read: `None`
/// when it scans no segment table, `Some(None)` when a scan may read any shard (no
/// shard key in its filters), else `Some(Some(shards))`. Read off the filters on each
/// scan and a `Filter` right above it (the planner has not pushed them down yet), as
/// `prune` derives them: an over-approximation, so a read barrier on these shards
/// covers every row the plan can read.
pub fn shards_read(plan: &datafusion::logical_expr::LogicalPlan) -> Option<Option<BTreeSet<ShardId>>> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    use datafusion::logical_expr::LogicalPlan;
    let mut above: std::collections::HashMap<*const LogicalPlan, Vec<Expr>> = std::collections::HashMap::new();
    let mut any = false;
    let mut all = false;
    let mut shards = BTreeSet::new();
    let _ = plan.apply_with_subqueries(|node| {
        match node {
            LogicalPlan::Filter(f) => {
                let mut input = f.input.as_ref();
                while let LogicalPlan::SubqueryAlias(a) = input {
                    input = a.input.as_ref();
                }
                if matches!(input, LogicalPlan::TableScan(_)) {
                    let conj = datafusion::logical_expr::utils::split_conjunction(&f.predicate).into_iter().cloned();
                    above.entry(input as *const LogicalPlan).or_default().extend(conj);
                }
            }
            LogicalPlan::TableScan(ts) => {
                let table = datafusion::datasource::source_as_provider(&ts.source).ok();
                if let Some(t) = table.as_ref().and_then(|p| p.downcast_ref::<SegmentTable>()) {
                    any = true;
                    let mut filters = ts.filters.clone();
                    filters.extend(above.get(&(node as *const LogicalPlan)).cloned().unwrap_or_default());
                    match (shard_key::key_values(&filters, &t.def.shard_key).values(), t.storage.layout(&t.def.name)) {
                        (Some(keys), Ok(layout)) => shards.extend(keys.iter().map(|k| shard_of(k, layout.shard_count))),
                        _ => all = true,
                    }
                }
            }
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    });
    any.then(|| (!all).then_some(shards))
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
        let projected = match projection {
            Some(p) => Arc::new(self.def.schema.project(p)?),
            None => Arc::clone(&self.def.schema),
        };
        if let Some(stage) = state.config().get_extension::<crate::storage::write_stage::WriteStage>() {
            stage.check_read(&self.def.name)?;
        }
        let format = ParquetFormat::new().with_options(state.table_options().parquet.clone());
        let groups_max = state.config().target_partitions().max(1);
        if state.config().get_extension::<DeferScans>().is_some() {
            // A plan reused across executions: which segments and buffered rows it
            // reads is decided each time it runs, with that execution's values.
            let proto = FileScanConfigBuilder::new(Storage::object_store_url(), Arc::new(ParquetSource::new(Arc::clone(&self.def.schema))))
                .with_projection_indices(projection.cloned())?
                .with_limit(limit)
                .build();
            let proto = format.create_physical_plan(state, proto).await?;
            let proto = proto
                .downcast_ref::<DataSourceExec>()
                .and_then(|d| d.data_source().downcast_ref::<FileScanConfig>())
                .cloned()
                .ok_or_else(|| Error::Internal("Parquet format did not plan a file scan".into()))?;
            return Ok(Arc::new(DeferredScanExec::new(
                Arc::clone(&self.def),
                Arc::clone(&self.storage),
                projected,
                projection.cloned(),
                filters.to_vec(),
                proto,
                groups_max,
            )?));
        }
        let report = state.config().get_extension::<ScanReport>();
        // The filters as one predicate, for the write buffer's rows (built only if any).
        let predicate = || -> DfResult<Option<Arc<dyn PhysicalExpr>>> {
            let df_schema = datafusion::common::DFSchema::try_from(self.def.schema.as_ref().clone())?;
            datafusion::logical_expr::utils::conjunction(filters.to_vec()).map(|p| state.create_physical_expr(p, &df_schema)).transpose()
        };
        let mut planned =
            plan_scan(&self.def, &self.storage, filters, projection, projected, report.as_deref(), Grouping::Balanced(groups_max), &predicate)?;
        let files = match planned.files.take() {
            Some(groups) => {
                let config = FileScanConfigBuilder::new(Storage::object_store_url(), Arc::new(ParquetSource::new(Arc::clone(&self.def.schema))))
                    .with_file_groups(groups)
                    .with_projection_indices(projection.cloned())?
                    .with_limit(limit)
                    .build();
                Some(format.create_physical_plan(state, config).await?)
            }
            None => None,
        };
        planned.combine(files)
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

    async fn write_all(&self, data: SendableRecordBatchStream, ctx: &Arc<TaskContext>) -> DfResult<u64> {
        let batches: Vec<_> = data.try_collect().await?;
        let rows = ingest::conform_all(&self.def, &batches, self.clock.now_us())?;
        // Inside a multi-statement query the rows wait for its end (implicit transaction).
        let outcome = match ctx.session_config().get_extension::<crate::storage::write_stage::WriteStage>() {
            Some(stage) => stage.stage(&self.storage, &self.def, rows)?,
            None => {
                let o = self.storage.append(&self.def, rows).await?;
                if let Some(tokens) = ctx.session_config().get_extension::<crate::write_token::TokenCell>() {
                    tokens.merge(&o.token);
                }
                o
            }
        };
        Ok(outcome.added)
    }
}

/// The rows of `batches` (a table's buffered rows) of the shards `keep` accepts that
/// match `predicate` (over the table schema), projected with `projection`.
pub(crate) fn buffered_rows(
    batches: &[super::BufferedBatch],
    keep: &dyn Fn(Option<ShardId>) -> bool,
    predicate: Option<&Arc<dyn PhysicalExpr>>,
    projection: Option<&Vec<usize>>,
) -> DfResult<Vec<super::BufferedBatch>> {
    let mut out = Vec::new();
    for b in batches.iter().filter(|b| keep(b.shard)) {
        let batch = match predicate {
            Some(p) => {
                let mask = p.evaluate(&b.batch)?.into_array(b.batch.num_rows())?;
                let mask = datafusion::common::cast::as_boolean_array(&mask)?;
                datafusion::arrow::compute::filter_record_batch(&b.batch, mask)?
            }
            None => b.batch.clone(),
        };
        if batch.num_rows() > 0 {
            let batch = match projection {
                Some(p) => batch.project(p)?,
                None => batch,
            };
            out.push(super::BufferedBatch { shard: b.shard, batch });
        }
    }
    Ok(out)
}

/// Rows of the write buffer that a scan matched (already filtered and projected), each
/// batch with its shard. Runs only in the process that holds the buffer: it is never
/// sent to another node.
#[derive(Debug)]
pub struct BufferExec {
    batches: Vec<super::BufferedBatch>,
    props: Arc<datafusion::physical_plan::PlanProperties>,
}

impl BufferExec {
    pub fn new(schema: SchemaRef, batches: Vec<super::BufferedBatch>) -> BufferExec {
        BufferExec { batches, props: one_partition(schema) }
    }

    /// The rows of the shards `keep` accepts; None when there are none.
    pub fn restricted(&self, keep: &dyn Fn(Option<ShardId>) -> bool) -> Option<Arc<dyn ExecutionPlan>> {
        let batches: Vec<_> = self.batches.iter().filter(|b| keep(b.shard)).cloned().collect();
        if batches.is_empty() {
            return None;
        }
        Some(Arc::new(BufferExec { batches, props: Arc::clone(&self.props) }))
    }
}

impl DisplayAs for BufferExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: usize = self.batches.iter().map(|b| b.batch.num_rows()).sum();
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

    leaf_plan_methods!();

    fn execute(&self, partition: usize, _ctx: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(datafusion::error::DataFusionError::Internal(format!("BufferExec has one partition, not {partition}")));
        }
        let batches = self.batches.iter().map(|b| b.batch.clone()).collect();
        Ok(Box::pin(datafusion::physical_plan::memory::MemoryStream::try_new(batches, self.schema(), None)?))
    }
}
