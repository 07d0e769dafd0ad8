//! A shard read from the replica of the node that runs the fragment: the leaf that a
//! replicated cluster's fragment carries when it runs on another node than its gateway.
//!
//! Owns: [`ReplicaScanExec`] (what the gateway sends in place of its scan of one
//! shard's segments) and [`resolve`] (what the receiving node reads instead).
//!
//! Why: with replicated shards every replica writes its own segments from the log, so
//! their files and names differ between nodes, and so do the rows each still holds in
//! its write buffer (replicas flush at different moments). A fragment therefore cannot
//! name the gateway's files on a peer. It names the table, the shard and the time
//! interval; the peer, once its replica has applied what the session wrote to that
//! shard (the caller's read barrier), reads its own segments of that shard in that
//! interval and its own buffered rows of that shard, from one view of its manifest and
//! buffer, with the gateway's projection and predicate. Each shard's rows then come
//! from one replica's consistent view: a fragment neither misses nor counts twice the
//! rows that one replica flushed and another still buffers (which is also why, in a
//! replicated cluster, the gateway's own fragment of a shard reads that shard's
//! buffered rows beside its segments: see `planner::fragment`).
//!
//! Must never: run unresolved (it fails), or read rows of another shard.

use std::fmt;
use std::sync::Arc;

use datafusion::common::Result as DfResult;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig, FileScanConfigBuilder, FileSource, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};

use super::provider::{buffered_rows, BufferExec};
use super::Storage;
use crate::error::Error;
use crate::shard_key::TimeRange;
use crate::shard_map::ShardId;

/// What travels in the ticket besides the gateway's scan (`TMR1` + this, as JSON).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Wire {
    table: String,
    shard: ShardId,
    /// `lo <= t < hi` in nanoseconds (as [`TimeRange`]), as decimal text.
    lo: Option<String>,
    hi: Option<String>,
}

const TAG: &[u8] = b"TMR1";

/// One shard's segment scan, to be read from the executing node's own replica.
#[derive(Debug)]
pub struct ReplicaScanExec {
    table: String,
    shard: ShardId,
    time: TimeRange,
    /// The gateway's Parquet scan of the shard: its projection, predicate and options
    /// are used; its files (the gateway's) are not.
    input: Arc<dyn ExecutionPlan>,
    props: Arc<PlanProperties>,
}

impl ReplicaScanExec {
    /// `input` must be a `DataSourceExec` over Parquet segment files with one partition.
    pub fn new(table: String, shard: ShardId, time: TimeRange, input: Arc<dyn ExecutionPlan>) -> DfResult<ReplicaScanExec> {
        scan_config(&input)?;
        let props = Arc::new(PlanProperties::new(
            datafusion::physical_expr::EquivalenceProperties::new(input.schema()),
            datafusion::physical_plan::Partitioning::UnknownPartitioning(1),
            datafusion::physical_plan::execution_plan::EmissionType::Incremental,
            datafusion::physical_plan::execution_plan::Boundedness::Bounded,
        ));
        Ok(ReplicaScanExec { table, shard, time, input, props })
    }

    pub fn shard(&self) -> ShardId {
        self.shard
    }

    /// The extension bytes of this node (its input travels as the node's child).
    pub fn encode(&self, buf: &mut Vec<u8>) -> DfResult<()> {
        let wire = Wire {
            table: self.table.clone(),
            shard: self.shard,
            lo: self.time.lo.map(|v| v.to_string()),
            hi: self.time.hi.map(|v| v.to_string()),
        };
        buf.extend_from_slice(TAG);
        serde_json::to_writer(buf, &wire).map_err(|e| Error::Internal(format!("replica scan: {e}")))?;
        Ok(())
    }

    /// The node from its extension bytes and decoded child; None if `buf` is not one.
    pub fn decode(buf: &[u8], inputs: &[Arc<dyn ExecutionPlan>]) -> Option<DfResult<Arc<dyn ExecutionPlan>>> {
        let body = buf.strip_prefix(TAG)?;
        let bad = |why: String| Error::InvalidParameter(format!("malformed replica scan in a fragment: {why}"));
        Some((|| {
            let wire: Wire = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
            let bound = |v: &Option<String>| v.as_deref().map(|t| t.parse::<i128>().map_err(|e| bad(e.to_string()))).transpose();
            let time = TimeRange { lo: bound(&wire.lo)?, hi: bound(&wire.hi)? };
            let [input] = inputs else { return Err(bad(format!("{} inputs, not 1", inputs.len())).into()) };
            Ok(Arc::new(ReplicaScanExec::new(wire.table, wire.shard, time, Arc::clone(input))?) as Arc<dyn ExecutionPlan>)
        })())
    }

    /// This node's rows of the shard: its segments of the shard in the time interval
    /// and its buffered rows of the shard, from one view (`manifest`, `buffered`).
    fn own_scan(&self, manifest: &super::manifest::Manifest, buffered: &super::Buffered) -> DfResult<Arc<dyn ExecutionPlan>> {
        let config = scan_config(&self.input)?;
        let source = config.file_source().downcast_ref::<ParquetSource>().expect("scan_config checked");
        let files: Vec<PartitionedFile> = manifest
            .segments_of(&self.table)
            .filter(|s| s.shard == self.shard && self.time.overlaps_us(s.min_time_us, s.max_time_us + 1))
            .map(|s| PartitionedFile::new(s.path.clone(), s.bytes))
            .collect();
        let files: Option<Arc<dyn ExecutionPlan>> = (!files.is_empty()).then(|| {
            let config = FileScanConfigBuilder::from(config.clone()).with_file_groups(vec![FileGroup::new(files)]).build();
            DataSourceExec::from_data_source(config) as Arc<dyn ExecutionPlan>
        });
        let predicate: Option<Arc<dyn PhysicalExpr>> = source.filter();
        // The scan's projection (columns or expressions over the table schema), applied
        // to the buffered rows as the Parquet scan applies it to the files' rows.
        let projector = source.projection().map(|p| p.make_projector(config.file_schema())).transpose()?;
        let mut rows = match buffered.tables.get(&self.table) {
            Some(batches) => buffered_rows(batches, &|s| s == Some(self.shard), predicate.as_ref(), None)?,
            None => Vec::new(),
        };
        for b in rows.iter_mut() {
            let projected = match &projector {
                Some(p) => p.project_batch(&b.batch)?,
                None => b.batch.clone(),
            };
            b.batch = datafusion::arrow::record_batch::RecordBatch::try_new_with_options(
                self.schema(),
                projected.columns().to_vec(),
                &datafusion::arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(projected.num_rows())),
            )?;
        }
        let buffer: Option<Arc<dyn ExecutionPlan>> =
            (!rows.is_empty()).then(|| Arc::new(BufferExec::new(self.schema(), rows)) as Arc<dyn ExecutionPlan>);
        Ok(match (files, buffer) {
            (Some(f), Some(b)) => Arc::new(CoalescePartitionsExec::new(UnionExec::try_new(vec![f, b])?)),
            (Some(f), None) => f,
            (None, Some(b)) => b,
            (None, None) => Arc::new(EmptyExec::new(self.schema())),
        })
    }
}

fn scan_config(input: &Arc<dyn ExecutionPlan>) -> DfResult<&FileScanConfig> {
    let config = input
        .downcast_ref::<DataSourceExec>()
        .and_then(|ds| ds.data_source().downcast_ref::<FileScanConfig>())
        .filter(|c| c.file_source().downcast_ref::<ParquetSource>().is_some())
        .ok_or_else(|| Error::InvalidParameter("a replica scan's input is not a Parquet scan of segments".into()))?;
    Ok(config)
}

/// The shards `plan`'s replica scans read (none: it has no replica scan).
pub fn shards(plan: &Arc<dyn ExecutionPlan>) -> std::collections::BTreeSet<ShardId> {
    let mut out = std::collections::BTreeSet::new();
    fn walk(p: &Arc<dyn ExecutionPlan>, out: &mut std::collections::BTreeSet<ShardId>) {
        if let Some(r) = p.downcast_ref::<ReplicaScanExec>() {
            out.insert(r.shard);
        }
        for c in p.children() {
            walk(c, out);
        }
    }
    walk(plan, &mut out);
    out
}

/// `plan` with every [`ReplicaScanExec`] replaced by this node's rows of its shard, all
/// from one view of `storage`'s manifest and write buffer. Call it after the read
/// barrier of those shards.
pub fn resolve(storage: &Storage, plan: Arc<dyn ExecutionPlan>) -> DfResult<Arc<dyn ExecutionPlan>> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    let (manifest, buffered) = storage.view();
    plan.transform_up(|node| match node.downcast_ref::<ReplicaScanExec>() {
        Some(r) => Ok(Transformed::yes(r.own_scan(&manifest, &buffered)?)),
        None => Ok(Transformed::no(node)),
    })
    .map(|t| t.data)
}

impl DisplayAs for ReplicaScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplicaScanExec: table={}, shard={}, time={} (read from the executing node's replica)", self.table, self.shard, self.time)
    }
}

impl ExecutionPlan for ReplicaScanExec {
    fn name(&self) -> &str {
        "ReplicaScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.props
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<datafusion::common::tree_node::TreeNodeRecursion>,
    ) -> DfResult<datafusion::common::tree_node::TreeNodeRecursion> {
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    }

    #[allow(deprecated)]
    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        let [input] = <[_; 1]>::try_from(children).map_err(|_| Error::Internal("ReplicaScanExec has one child".into()))?;
        Ok(Arc::new(ReplicaScanExec::new(self.table.clone(), self.shard, self.time, input)?))
    }

    fn execute(&self, _partition: usize, _ctx: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        Err(Error::Internal(format!("the replica scan of shard {} ran unresolved", self.shard)).into())
    }
}
