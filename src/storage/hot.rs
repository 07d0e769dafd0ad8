//! Hot segments: the decoded columns of recently read segments, kept in memory by each
//! pipeline, and the scan that reads them.
//!
//! Owns: which decoded columns are in memory (least recently used evicted first,
//! within `hot_cache_bytes_max`), and [`HotScanExec`], which a pipeline puts in place
//! of a fragment's Parquet scan of segments before running it. Must never: answer
//! differently from the Parquet scan it replaces. It applies the same predicate and
//! projection to the same files in the same order; it narrows a segment to the rows
//! of the queried shard keys by binary search only after checking, once per cached
//! column, that the segment is sorted on that key, and a file it cannot serve (too
//! large for the cache, an unexpected schema) is read by the Parquet scan as before.
//!
//! Why: a point query reads a few rows of one segment. Through Parquet that means, per
//! query, reading the footer and page index, building pruning predicates, creating a
//! decompressor per column chunk and decoding whole pages; with the segment's columns
//! decoded once, it is a binary search and a filter over a handful of rows.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{new_null_array, Array, ArrayRef, AsArray, BooleanArray, RecordBatch, RecordBatchOptions};
use datafusion::arrow::compute::{concat, filter_record_batch};
use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::common::{Result as DfResult, ScalarValue};
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig, FileScanConfigBuilder, FileSource, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::expressions::{BinaryExpr, Column, InListExpr, Literal};
use datafusion::physical_expr::utils::{collect_columns, split_conjunction};
use datafusion::physical_expr::projection::Projector;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use datafusion::datasource::listing::PartitionedFile;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parking_lot::Mutex;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::error::Error;
use crate::storage::cache::CacheStats;

/// How much of the cache one segment's columns may take; a larger segment is read
/// through Parquet, so one big scan cannot empty the cache.
const ENTRY_SHARE: u64 = 4;

struct Column_ {
    array: ArrayRef,
    bytes: u64,
    tick: u64,
    /// Rows ascend on this column (checked when it was cached).
    sorted: bool,
}

#[derive(Default)]
struct Columns {
    map: HashMap<(Path, usize), Column_>,
    bytes: u64,
    tick: u64,
}

/// Decoded segment columns of one pipeline.
pub struct HotCache {
    columns: Mutex<Columns>,
    bytes_max: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Table name -> the column its segments are sorted by first.
    leading_sort_column: HashMap<String, String>,
}

impl fmt::Debug for HotCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HotCache").field("bytes", &self.columns.lock().bytes).field("bytes_max", &self.bytes_max).finish()
    }
}

impl HotCache {
    pub fn new(bytes_max: u64, leading_sort_column: HashMap<String, String>) -> HotCache {
        HotCache {
            columns: Mutex::default(),
            bytes_max,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            leading_sort_column,
        }
    }

    /// Bytes held and segment reads served without decoding (hits) or with (misses).
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            bytes: self.columns.lock().bytes,
            bytes_max: self.bytes_max,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    fn get(&self, path: &Path, col: usize) -> Option<(ArrayRef, bool)> {
        let mut c = self.columns.lock();
        c.tick += 1;
        let tick = c.tick;
        c.map.get_mut(&(path.clone(), col)).map(|e| {
            e.tick = tick;
            (Arc::clone(&e.array), e.sorted)
        })
    }

    fn insert(&self, path: &Path, col: usize, array: ArrayRef, sorted: bool) {
        let bytes = array.get_array_memory_size() as u64;
        let mut c = self.columns.lock();
        c.tick += 1;
        let tick = c.tick;
        if let Some(old) = c.map.insert((path.clone(), col), Column_ { array, bytes, tick, sorted }) {
            c.bytes -= old.bytes;
        }
        c.bytes += bytes;
        while c.bytes > self.bytes_max {
            let Some(victim) = c.map.iter().min_by_key(|(_, e)| e.tick).map(|(k, _)| k.clone()) else { break };
            if let Some(e) = c.map.remove(&victim) {
                c.bytes -= e.bytes;
            }
        }
    }

    /// Puts [`HotScanExec`] in place of every Parquet scan of segments in `plan`.
    pub fn rewrite(self: &Arc<Self>, plan: Arc<dyn ExecutionPlan>, store: &Arc<dyn ObjectStore>) -> DfResult<Arc<dyn ExecutionPlan>> {
        if self.bytes_max == 0 {
            return Ok(plan);
        }
        self.replace_scans(&plan, store)
    }

    /// `plan` with its Parquet scans of segments replaced by [`HotScanExec`]s, which keep
    /// the replaced scans' properties, so the nodes above keep theirs.
    fn replace_scans(self: &Arc<Self>, plan: &Arc<dyn ExecutionPlan>, store: &Arc<dyn ObjectStore>) -> DfResult<Arc<dyn ExecutionPlan>> {
        if let Some(exec) = self.hot_scan(plan, store)? {
            return Ok(exec);
        }
        let children = plan.children();
        if children.is_empty() {
            return Ok(Arc::clone(plan));
        }
        let mut changed = false;
        let mut new = Vec::with_capacity(children.len());
        for c in children {
            let n = self.replace_scans(c, store)?;
            changed |= !Arc::ptr_eq(&n, c);
            new.push(n);
        }
        if !changed {
            return Ok(Arc::clone(plan));
        }
        Arc::clone(plan).replace_children(new, ReplaceChildrenOptions::new(ChildrenPropertiesMode::Keep))
    }

    fn hot_scan(self: &Arc<Self>, node: &Arc<dyn ExecutionPlan>, store: &Arc<dyn ObjectStore>) -> DfResult<Option<Arc<dyn ExecutionPlan>>> {
        let config = match (node.downcast_ref::<DataSourceExec>(), node.downcast_ref::<crate::storage::provider::SegmentFilesExec>()) {
            (Some(ds), _) => match ds.data_source().downcast_ref::<FileScanConfig>() {
                Some(c) => c,
                None => return Ok(None),
            },
            (None, Some(files)) => files.config(),
            (None, None) => return Ok(None),
        };
        let Some(source) = config.file_source().downcast_ref::<ParquetSource>() else { return Ok(None) };
        if !config.table_partition_cols().is_empty() {
            return Ok(None);
        }
        let table = config.file_groups.iter().flat_map(|g| g.iter()).next().and_then(|f| {
            f.object_meta.location.parts().next().map(|p| p.as_ref().to_string())
        });
        let key = table.and_then(|t| self.leading_sort_column.get(&t)).and_then(|k| config.file_schema().index_of(k).ok());
        let exec = HotScanExec::new(Arc::clone(node), config.clone(), source.filter(), key, Arc::clone(self), Arc::clone(store))?;
        Ok(Some(Arc::new(exec)))
    }
}

/// Reads segments from a pipeline's [`HotCache`], decoding what is missing.
pub struct HotScanExec {
    scan: Arc<HotScan>,
}

struct HotScan {
    /// The Parquet scan it replaces: its properties, and the way to read a file the
    /// cache cannot hold.
    original: Arc<dyn ExecutionPlan>,
    config: FileScanConfig,
    predicate: Option<Arc<dyn PhysicalExpr>>,
    /// Table-schema columns the predicate and projection read.
    needed: Vec<usize>,
    /// The leading sort column and the values the predicate pins it to.
    key: Option<(usize, Vec<String>)>,
    /// The table schema with every column nullable: columns the scan does not read are
    /// filled with nulls before the predicate and projection see the rows.
    loose: SchemaRef,
    projector: Option<Projector>,
    cache: Arc<HotCache>,
    store: Arc<dyn ObjectStore>,
}

impl fmt::Debug for HotScanExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HotScanExec").field("needed", &self.scan.needed).field("key", &self.scan.key).finish()
    }
}

impl HotScanExec {
    fn new(
        original: Arc<dyn ExecutionPlan>,
        config: FileScanConfig,
        predicate: Option<Arc<dyn PhysicalExpr>>,
        key_column: Option<usize>,
        cache: Arc<HotCache>,
        store: Arc<dyn ObjectStore>,
    ) -> DfResult<HotScanExec> {
        let schema = config.file_schema();
        let mut needed: BTreeSet<usize> = BTreeSet::new();
        if let Some(p) = &predicate {
            needed.extend(collect_columns(p).iter().map(|c| c.index()));
        }
        match config.file_source().projection() {
            Some(proj) => needed.extend(proj.column_indices()),
            None => needed.extend(0..schema.fields().len()),
        }
        let key = key_column.and_then(|k| {
            let name = schema.field(k).name();
            predicate.as_ref().and_then(|p| pinned_values(p, name)).map(|v| (k, v))
        });
        if let Some((k, _)) = &key {
            needed.insert(*k);
        }
        // `count(*)` reads no column, but still needs the number of rows.
        if needed.is_empty() {
            needed.insert(key_column.unwrap_or(0));
        }
        let loose: SchemaRef = Arc::new(Schema::new(
            schema.fields().iter().map(|f| Field::new(f.name(), f.data_type().clone(), true)).collect::<Vec<_>>(),
        ));
        let projector = config.file_source().projection().map(|p| p.make_projector(&loose)).transpose()?;
        let needed = needed.into_iter().collect();
        let scan = HotScan { original, config, predicate, needed, key, loose, projector, cache, store };
        Ok(HotScanExec { scan: Arc::new(scan) })
    }
}

impl HotScan {

    /// One file's rows, filtered and projected; None when the cache cannot hold it.
    async fn read_file(&self, file: &PartitionedFile) -> DfResult<Option<Vec<RecordBatch>>> {
        // A byte range is a share of the file's row groups that another partition
        // complements; the Parquet scan knows which.
        if file.range.is_some() {
            return Ok(None);
        }
        let path = &file.object_meta.location;
        let mut arrays: HashMap<usize, (ArrayRef, bool)> = HashMap::new();
        let mut missing = Vec::new();
        for &c in &self.needed {
            match self.cache.get(path, c) {
                Some(a) => {
                    arrays.insert(c, a);
                }
                None => missing.push(c),
            }
        }
        if missing.is_empty() {
            self.cache.hits.fetch_add(1, Ordering::Relaxed);
        } else {
            self.cache.misses.fetch_add(1, Ordering::Relaxed);
            let bytes = self.store.get(path).await.map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?.bytes().await
                .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
            let Some(decoded) = decode_columns(bytes, &missing, self.config.file_schema(), self.cache.bytes_max / ENTRY_SHARE)? else {
                return Ok(None);
            };
            for (c, a) in decoded {
                let sorted = matches!(&self.key, Some((k, _)) if *k == c) && ascending(&a);
                self.cache.insert(path, c, Arc::clone(&a), sorted);
                arrays.insert(c, (a, sorted));
            }
        }
        let rows = arrays.values().next().map(|(a, _)| a.len()).unwrap_or(0);
        if arrays.values().any(|(a, _)| a.len() != rows) {
            return Ok(None);
        }
        // The rows of the pinned keys, by binary search when the segment is sorted on them.
        let ranges: Vec<(usize, usize)> = match &self.key {
            Some((k, values)) => match arrays.get(k) {
                Some((a, true)) => match a.as_string_opt::<i32>() {
                    Some(s) => key_ranges(s, values),
                    None => vec![(0, rows)],
                },
                _ => vec![(0, rows)],
            },
            None => vec![(0, rows)],
        };
        let schema = self.config.file_schema();
        let out_schema = self.original.schema();
        let mut out = Vec::new();
        for (lo, hi) in ranges {
            if hi <= lo {
                continue;
            }
            let columns: Vec<ArrayRef> = schema
                .fields()
                .iter()
                .enumerate()
                .map(|(i, f)| match arrays.get(&i) {
                    Some((a, _)) => a.slice(lo, hi - lo),
                    None => new_null_array(f.data_type(), hi - lo),
                })
                .collect();
            let batch = RecordBatch::try_new_with_options(Arc::clone(&self.loose), columns, &RecordBatchOptions::new().with_row_count(Some(hi - lo)))?;
            let batch = match &self.predicate {
                Some(p) => {
                    let mask = p.evaluate(&batch)?.into_array(batch.num_rows())?;
                    let mask: &BooleanArray = mask.as_boolean_opt().ok_or_else(|| Error::Internal("predicate is not boolean".into()))?;
                    filter_record_batch(&batch, mask)?
                }
                None => batch,
            };
            if batch.num_rows() == 0 {
                continue;
            }
            let projected = match &self.projector {
                Some(p) => p.project_batch(&batch)?,
                None => batch,
            };
            out.push(RecordBatch::try_new_with_options(
                Arc::clone(&out_schema),
                projected.columns().to_vec(),
                &RecordBatchOptions::new().with_row_count(Some(projected.num_rows())),
            )?);
        }
        Ok(Some(out))
    }

    /// The Parquet scan of one file, as the original plan would read it.
    fn parquet_file(&self, file: PartitionedFile, ctx: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let config = FileScanConfigBuilder::from(self.config.clone()).with_file_groups(vec![FileGroup::new(vec![file])]).build();
        DataSourceExec::from_data_source(config).execute(0, ctx)
    }
}

impl DisplayAs for HotScanExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HotScanExec: ")?;
        self.scan.original.fmt_as(t, f)
    }
}

impl ExecutionPlan for HotScanExec {
    fn name(&self) -> &str {
        "HotScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.scan.original.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn with_new_children(self: Arc<Self>, _children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<datafusion::common::tree_node::TreeNodeRecursion>,
    ) -> DfResult<datafusion::common::tree_node::TreeNodeRecursion> {
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    }

    fn execute(&self, partition: usize, ctx: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let this = Arc::clone(&self.scan);
        let files: Vec<PartitionedFile> = this.config.file_groups.get(partition).map(|g| g.iter().cloned().collect()).unwrap_or_default();
        let limit = this.config.limit;
        let schema = this.original.schema();
        let stream = futures::stream::iter(files)
            .then(move |file| {
                let this = Arc::clone(&this);
                let ctx = Arc::clone(&ctx);
                async move {
                    match this.read_file(&file).await? {
                        Some(batches) => Ok::<_, datafusion::error::DataFusionError>(futures::stream::iter(batches.into_iter().map(Ok)).boxed()),
                        None => Ok(this.parquet_file(file, ctx)?.boxed()),
                    }
                }
            })
            .try_flatten();
        let stream: futures::stream::BoxStream<'static, DfResult<RecordBatch>> = match limit {
            None => stream.boxed(),
            Some(n) => {
                let mut left = n;
                stream
                    .try_take_while(move |_| futures::future::ready(Ok(left > 0)))
                    .map_ok(move |b| {
                        let take = b.num_rows().min(left);
                        left -= take;
                        b.slice(0, take)
                    })
                    .boxed()
            }
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

/// Decodes `columns` of a whole Parquet file, each as one array; None when they would
/// take more than `max_bytes` decoded (estimated from the file's metadata).
fn decode_columns(bytes: Bytes, columns: &[usize], schema: &SchemaRef, max_bytes: u64) -> DfResult<Option<Vec<(usize, ArrayRef)>>> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let file_schema = Arc::clone(builder.schema());
    // Only files written with the table's columns in the table's order.
    if file_schema.fields().len() != schema.fields().len()
        || file_schema.fields().iter().zip(schema.fields()).any(|(a, b)| a.name() != b.name() || a.data_type() != b.data_type())
    {
        return Ok(None);
    }
    let meta = builder.metadata();
    let rows = meta.file_metadata().num_rows().max(0) as usize;
    let estimate: i64 = meta
        .row_groups()
        .iter()
        .flat_map(|rg| columns.iter().filter_map(move |&c| rg.columns().get(c)).map(|cc| cc.uncompressed_size()))
        .sum();
    if estimate.max(0) as u64 > max_bytes {
        return Ok(None);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), columns.iter().copied());
    let reader = builder.with_projection(mask).with_batch_size(rows.max(1)).build()?;
    let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(columns.len());
    for (j, &c) in columns.iter().enumerate() {
        let parts: Vec<&dyn Array> = batches.iter().map(|b| b.column(j).as_ref()).collect();
        let array = match parts.len() {
            0 => new_null_array(schema.field(c).data_type(), 0),
            1 => Arc::clone(batches[0].column(j)),
            _ => concat(&parts)?,
        };
        out.push((c, array));
    }
    Ok(Some(out))
}

/// True when a string column's values never decrease (and it has no nulls).
fn ascending(a: &ArrayRef) -> bool {
    let Some(s) = a.as_string_opt::<i32>() else { return false };
    s.null_count() == 0 && (1..s.len()).all(|i| s.value(i - 1) <= s.value(i))
}

/// The row ranges holding each of `values` in a column sorted ascending.
fn key_ranges(s: &datafusion::arrow::array::StringArray, values: &[String]) -> Vec<(usize, usize)> {
    // The first row whose value is not `below` the key (rows ascend).
    let first = |below: &dyn Fn(&str) -> bool| {
        let (mut lo, mut hi) = (0, s.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if below(s.value(mid)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    };
    // Values sorted and distinct, so the ranges come out in row order.
    let values: BTreeSet<&str> = values.iter().map(|v| v.as_str()).collect();
    values.into_iter().map(|v| (first(&|x| x < v), first(&|x| x <= v))).filter(|(lo, hi)| hi > lo).collect()
}

/// The values a conjunct of `predicate` pins column `name` to (`name = 'x'` or
/// `name IN ('x', 'y')`), if any; the first such conjunct is enough, since the
/// predicate itself is still applied to every row.
fn pinned_values(predicate: &Arc<dyn PhysicalExpr>, name: &str) -> Option<Vec<String>> {
    let is_col = |e: &Arc<dyn PhysicalExpr>| e.downcast_ref::<Column>().is_some_and(|c| c.name() == name);
    let text = |e: &Arc<dyn PhysicalExpr>| match e.downcast_ref::<Literal>().map(|l| l.value()) {
        Some(ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s))) => Some(s.clone()),
        _ => None,
    };
    for c in split_conjunction(predicate) {
        if let Some(b) = c.downcast_ref::<BinaryExpr>() {
            if *b.op() == Operator::Eq {
                if is_col(b.left()) {
                    if let Some(v) = text(b.right()) {
                        return Some(vec![v]);
                    }
                } else if is_col(b.right()) {
                    if let Some(v) = text(b.left()) {
                        return Some(vec![v]);
                    }
                }
            }
        } else if let Some(i) = c.downcast_ref::<InListExpr>() {
            if !i.negated() && is_col(i.expr()) {
                let vs: Option<Vec<String>> = i.list().iter().map(text).collect();
                if let Some(vs) = vs {
                    return Some(vs);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::StringArray;

    #[test]
    fn ranges_by_binary_search() {
        let s = StringArray::from(vec!["a", "b", "b", "b", "d", "e", "e"]);
        assert_eq!(key_ranges(&s, &["b".into()]), vec![(1, 4)]);
        assert_eq!(key_ranges(&s, &["e".into(), "a".into(), "c".into()]), vec![(0, 1), (5, 7)]);
        assert_eq!(key_ranges(&s, &["z".into()]), vec![]);
        assert!(ascending(&(Arc::new(s) as ArrayRef)));
        assert!(!ascending(&(Arc::new(StringArray::from(vec!["b", "a"])) as ArrayRef)));
    }

    #[test]
    fn pinned_values_from_conjuncts() {
        use datafusion::arrow::datatypes::DataType;
        use datafusion::physical_expr::expressions::{binary, col, in_list, lit};
        let schema = Schema::new(vec![Field::new("entity_id", DataType::Utf8, false), Field::new("n", DataType::Int64, false)]);
        let e = col("entity_id", &schema).unwrap();
        let n = col("n", &schema).unwrap();
        let eq = binary(Arc::clone(&e), Operator::Eq, lit("x"), &schema).unwrap();
        let gt = binary(n, Operator::Gt, lit(3i64), &schema).unwrap();
        let both = binary(gt.clone(), Operator::And, eq, &schema).unwrap();
        assert_eq!(pinned_values(&both, "entity_id"), Some(vec!["x".to_string()]));
        assert_eq!(pinned_values(&gt, "entity_id"), None);
        let inl = in_list(Arc::clone(&e), vec![lit("p"), lit("q")], &false, &schema).unwrap();
        assert_eq!(pinned_values(&inl, "entity_id"), Some(vec!["p".to_string(), "q".to_string()]));
        let not_in = in_list(e, vec![lit("p")], &true, &schema).unwrap();
        assert_eq!(pinned_values(&not_in, "entity_id"), None);
    }
}
