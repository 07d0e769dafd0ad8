//! Fragmenting: splits a physical plan at the point where per-shard work ends, and
//! runs that part once per shard on the pipeline the router picks.
//!
//! Owns: the [`Fragmenter`] (the last physical optimizer rule) and [`DistributeExec`]
//! (the plan node that runs fragments and streams their output to the gateway's part
//! of the plan). Must never: change a query's answer. A subtree is split only when
//! every operator in it works partition by partition (scan, filter, projection,
//! partial aggregate, per-partition sort / TopK, local limit, union), so running it
//! on a subset of the files and combining the outputs is the same as running it on
//! all of them; whatever needs all rows (final aggregate, global sort, limit, joins)
//! stays above, in the gateway.
//!
//! Shape: `DistributeExec` has one output partition per fragment (one per shard the
//! scan kept, plus one for rows still in the write buffer, which always runs on this
//! node). When the gateway's part expects one partition, a merge is put on top: a
//! sort-preserving merge (with the TopK's fetch) when the fragments are sorted, else a
//! plain coalesce. A query that touches one shard runs one fragment and gets no merge.
//! The template (the subtree before splitting) is the node's child, so EXPLAIN shows
//! the fragment plan under the routing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::Result as DfResult;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig, FileScanConfigBuilder};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::execution_plan::{Boundedness, ChildrenPropertiesMode, EmissionType, ReplaceChildrenOptions};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::limit::LocalLimitExec;
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, ExecutionPlanProperties, Partitioning, PlanProperties,
};
use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;

use crate::error::Error;
use crate::pipeline::{Cluster, Fragment, RoutingRecord};
use crate::router::{self, Decision, Policy};
use crate::shard_map::{PipelineId, ShardId};
use crate::storage::provider::{BufferExec, DeferredScanExec, ResolvedScan, ScanReport, SegmentFilesExec, SegmentRef};
use crate::storage::replica_scan::ReplicaScanExec;
use crate::storage::Storage;

datafusion::common::extensions_options! {
    /// Tidemark's session options (`SET tidemark.routing_policy = 'predictive'`).
    pub struct TidemarkOptions {
        /// The session's routing policy; empty = the node's `routing_policy`.
        pub routing_policy: String, default = String::new()
    }
}

impl datafusion::common::config::ConfigExtension for TidemarkOptions {
    const PREFIX: &'static str = "tidemark";
}

impl TidemarkOptions {
    /// Sets the routing policy that statements planned or run with `options` use.
    pub fn set_routing_policy(options: &mut ConfigOptions, policy: Policy) {
        if let Some(o) = options.extensions.get_mut::<TidemarkOptions>() {
            o.routing_policy = policy.as_str().to_string();
        }
    }
}

/// The routing policy a statement runs under: its session's, else the node's.
pub fn routing_policy(config: &ConfigOptions, cluster: &Cluster) -> Policy {
    config
        .extensions
        .get::<TidemarkOptions>()
        .and_then(|o| Policy::parse(&o.routing_policy))
        .unwrap_or_else(|| cluster.policy())
}

/// The physical optimizer rule that distributes scans of segment tables.
#[derive(Debug)]
pub struct Fragmenter {
    cluster: Arc<Cluster>,
}

impl Fragmenter {
    pub fn new(cluster: Arc<Cluster>) -> Fragmenter {
        Fragmenter { cluster }
    }

    fn rewrite(&self, node: Arc<dyn ExecutionPlan>, policy: Policy) -> DfResult<Arc<dyn ExecutionPlan>> {
        let node = split_single_aggregate(node)?;
        let required = node.input_distribution_requirements().into_per_child();
        let mut changed = false;
        let mut children = Vec::new();
        for (i, child) in node.children().into_iter().enumerate() {
            if fragmentable(child) {
                let single = matches!(required.get(i), Some(Distribution::SinglePartition));
                children.push(self.distribute(child, single, policy));
                changed = true;
            } else {
                let new = self.rewrite(Arc::clone(child), policy)?;
                changed |= !Arc::ptr_eq(&new, child);
                children.push(new);
            }
        }
        if !changed {
            return Ok(node);
        }
        node.replace_children(children, ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute))
    }

    /// Replaces `template` by a [`DistributeExec`], merged into one partition when the
    /// consumer needs one (or when the template had one, for a consumer that relies on it).
    fn distribute(&self, template: &Arc<dyn ExecutionPlan>, consumer_needs_one: bool, policy: Policy) -> Arc<dyn ExecutionPlan> {
        let mut deferred = false;
        visit_leaves(template, &mut |leaf| deferred |= leaf.is::<DeferredScanExec>());
        if deferred {
            // Shards, segments and routes are chosen per execution; the fragments'
            // outputs are merged inside, so the node has one partition.
            return Arc::new(DistributeExec::new_deferred(Arc::clone(template), Arc::clone(&self.cluster)));
        }
        let mut shards: BTreeMap<ShardId, usize> = BTreeMap::new();
        let mut has_buffer = false;
        let mut scan: Option<Arc<crate::storage::provider::ScanInfo>> = None;
        visit_leaves(template, &mut |leaf| {
            if let Some(files) = segment_files(leaf) {
                for f in files {
                    if let Some(r) = f.extensions.get::<SegmentRef>() {
                        *shards.entry(r.shard).or_default() += 1;
                        scan.get_or_insert_with(|| Arc::clone(&r.scan));
                    }
                }
            } else if leaf.is::<BufferExec>() {
                has_buffer = true;
            }
        });
        let map = self.cluster.shard_map();
        let snapshot = self.cluster.load_snapshot();
        let shard_list: Vec<ShardId> = shards.keys().copied().collect();
        let seq = self.cluster.next_route_seq(shard_list.len());
        let mut fragments: Vec<FragmentSpec> = router::route_all_with(policy, seq, &shard_list, &map, &snapshot)
            .into_iter()
            .map(|d| FragmentSpec { shard: Some(d.shard), segments: shards[&d.shard], decision: d, plan: None, remote_leaf: None })
            .collect();
        if has_buffer {
            fragments.push(FragmentSpec { shard: None, segments: 0, decision: route_buffer(&self.cluster, &snapshot), plan: None, remote_leaf: None });
        }
        let exec: Arc<dyn ExecutionPlan> = Arc::new(DistributeExec::new(
            Arc::clone(template),
            fragments,
            map.epoch,
            scan,
            Arc::clone(&self.cluster),
        ));
        let was_one = template.output_partitioning().partition_count() == 1;
        if exec.output_partitioning().partition_count() == 1 || !(consumer_needs_one || was_one) {
            return exec;
        }
        merge(exec, template)
    }
}

impl PhysicalOptimizerRule for Fragmenter {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, config: &ConfigOptions) -> DfResult<Arc<dyn ExecutionPlan>> {
        let policy = routing_policy(config, &self.cluster);
        if fragmentable(&plan) {
            return Ok(self.distribute(&plan, true, policy));
        }
        self.rewrite(plan, policy)
    }

    fn name(&self) -> &str {
        "tidemark_fragmenter"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Merges `exec`'s partitions into one, keeping the template's order (and its TopK
/// fetch) when it has one.
fn merge(exec: Arc<dyn ExecutionPlan>, template: &Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    match template.output_ordering() {
        Some(ordering) => {
            let fetch = template.downcast_ref::<SortExec>().and_then(|s| s.fetch());
            Arc::new(SortPreservingMergeExec::new(ordering.clone(), exec).with_fetch(fetch))
        }
        None => Arc::new(CoalescePartitionsExec::new(exec)),
    }
}

/// An aggregate in `Single` mode over a splittable input becomes `Partial` (which goes
/// into the fragments) under `Final` (which stays in the gateway).
fn split_single_aggregate(node: Arc<dyn ExecutionPlan>) -> DfResult<Arc<dyn ExecutionPlan>> {
    let Some(agg) = node.downcast_ref::<AggregateExec>() else { return Ok(node) };
    if !matches!(agg.mode(), AggregateMode::Single) || !fragmentable(agg.input()) {
        return Ok(node);
    }
    let partial = Arc::new(AggregateExec::try_new(
        AggregateMode::Partial,
        agg.group_expr().clone(),
        agg.aggr_expr().to_vec(),
        agg.filter_expr().to_vec(),
        Arc::clone(agg.input()),
        agg.input_schema(),
    )?);
    let final_group = partial.group_expr().as_final();
    let fin = AggregateExec::try_new(
        AggregateMode::Final,
        final_group,
        agg.aggr_expr().to_vec(),
        agg.filter_expr().to_vec(),
        partial,
        agg.input_schema(),
    )?
    .with_limit_options(agg.limit_options());
    Ok(Arc::new(fin))
}

/// The segment files a leaf scans, if it is a scan of segments.
fn segment_files(plan: &Arc<dyn ExecutionPlan>) -> Option<Vec<datafusion::datasource::listing::PartitionedFile>> {
    let ds = plan.downcast_ref::<DataSourceExec>()?;
    let config = ds.data_source().downcast_ref::<FileScanConfig>()?;
    if config.object_store_url != Storage::object_store_url() {
        return None;
    }
    let files: Vec<_> = config.file_groups.iter().flat_map(|g| g.files().iter().cloned()).collect();
    files.iter().all(|f| f.extensions.get::<SegmentRef>().is_some()).then_some(files)
}

fn visit_leaves(plan: &Arc<dyn ExecutionPlan>, f: &mut dyn FnMut(&Arc<dyn ExecutionPlan>)) {
    let children = plan.children();
    if children.is_empty() {
        f(plan);
    }
    for c in children {
        visit_leaves(c, f);
    }
}

/// True when every operator of `plan` works partition by partition and its leaves
/// are segment scans, the write buffer or empty, with at least one real source.
pub fn fragmentable(plan: &Arc<dyn ExecutionPlan>) -> bool {
    fn walk(p: &Arc<dyn ExecutionPlan>, sources: &mut usize) -> bool {
        if segment_files(p).is_some() || p.is::<BufferExec>() || p.is::<DeferredScanExec>() {
            *sources += 1;
            return true;
        }
        if p.is::<EmptyExec>() {
            return true;
        }
        let per_partition = p.is::<FilterExec>()
            || p.is::<ProjectionExec>()
            || p.is::<LocalLimitExec>()
            || p.is::<UnionExec>()
            || p.is::<CooperativeExec>()
            || p.downcast_ref::<AggregateExec>().is_some_and(|a| matches!(a.mode(), AggregateMode::Partial))
            || p.downcast_ref::<SortExec>().is_some_and(|s| {
                s.preserve_partitioning() || s.input().output_partitioning().partition_count() == 1
            });
        per_partition && p.children().into_iter().all(|c| walk(c, sources))
    }
    let mut sources = 0;
    walk(plan, &mut sources) && sources > 0
}

/// What one fragment reads of the template (see [`restrict`]).
#[derive(Debug, Clone, Copy)]
pub enum Cut<'a> {
    /// One shard's segments. `buffer`: with that shard's buffered rows too (a
    /// replicated cluster, where a shard's rows are read from one replica's view);
    /// `remote`: as a [`ReplicaScanExec`], for a peer to read from its own replica.
    Shard { shard: ShardId, buffer: bool, remote: bool },
    /// The write buffer's rows, except those of shards in `except` (whose fragments
    /// read them).
    Buffer { except: &'a BTreeSet<ShardId> },
}

/// The template cut down to one fragment: segment scans keep only the shard's files
/// (in one file group), buffered rows stay as `cut` says, and branches left without
/// input disappear. The result has one output partition.
pub fn restrict(template: &Arc<dyn ExecutionPlan>, cut: Cut<'_>) -> DfResult<Arc<dyn ExecutionPlan>> {
    let plan = match restrict_inner(template, cut)? {
        Some(p) => p,
        None => Arc::new(EmptyExec::new(template.schema())),
    };
    Ok(if plan.output_partitioning().partition_count() > 1 { merge(plan, template) } else { plan })
}

fn restrict_inner(plan: &Arc<dyn ExecutionPlan>, cut: Cut<'_>) -> DfResult<Option<Arc<dyn ExecutionPlan>>> {
    if let Some(files) = segment_files(plan) {
        let Cut::Shard { shard, remote, .. } = cut else { return Ok(None) };
        let mine: Vec<_> =
            files.into_iter().filter(|f| f.extensions.get::<SegmentRef>().is_some_and(|r| r.shard == shard)).collect();
        let Some(info) = mine.first().and_then(|f| f.extensions.get::<SegmentRef>()).map(|r| Arc::clone(&r.scan)) else {
            return Ok(None);
        };
        let ds = plan.downcast_ref::<DataSourceExec>().expect("segment_files checked");
        let config = ds.data_source().downcast_ref::<FileScanConfig>().expect("segment_files checked");
        let config = FileScanConfigBuilder::from(config.clone()).with_file_groups(vec![FileGroup::new(mine)]).build();
        let scan = DataSourceExec::from_data_source(config);
        if remote {
            return Ok(Some(Arc::new(ReplicaScanExec::new(info.table.clone(), shard, info.time, scan)?)));
        }
        return Ok(Some(scan));
    }
    if let Some(b) = plan.downcast_ref::<BufferExec>() {
        return Ok(match cut {
            Cut::Shard { shard, buffer: true, remote: false } => b.restricted(&|s| s == Some(shard)),
            Cut::Shard { .. } => None,
            Cut::Buffer { except } => b.restricted(&|s| s.is_none_or(|s| !except.contains(&s))),
        });
    }
    if plan.is::<EmptyExec>() {
        return Ok(None);
    }
    let mut kept = Vec::new();
    for c in plan.children() {
        if let Some(c) = restrict_inner(c, cut)? {
            kept.push(c);
        }
    }
    if plan.is::<UnionExec>() {
        return Ok(match kept.len() {
            0 => None,
            1 => kept.pop(),
            _ => Some(UnionExec::try_new(kept)?),
        });
    }
    if kept.len() != plan.children().len() {
        return Ok(None);
    }
    Ok(Some(Arc::clone(plan).replace_children(kept, ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute))?))
}

/// A deferred scan's part of one shard (a [`SegmentFilesExec`]) as a peer reads it
/// from its own replica.
fn replica_leaf(scan: &Arc<dyn ExecutionPlan>, shard: ShardId) -> DfResult<Arc<dyn ExecutionPlan>> {
    let files = scan
        .downcast_ref::<SegmentFilesExec>()
        .ok_or_else(|| Error::Internal("a deferred shard part that is not a scan of segment files".into()))?;
    let info = files
        .config()
        .file_groups
        .iter()
        .flat_map(|g| g.iter())
        .find_map(|f| f.extensions.get::<SegmentRef>())
        .map(|r| Arc::clone(&r.scan))
        .ok_or_else(|| Error::Internal("segment files without their scan".into()))?;
    let ds = crate::storage::provider::materialize_segment_files(Arc::clone(scan))?;
    Ok(Arc::new(ReplicaScanExec::new(info.table.clone(), shard, info.time, ds)?))
}

/// The plans one fragment may run, by where it runs: on this node (its segments and,
/// in a replicated cluster, its buffered rows) or on a peer of a replicated cluster
/// (read from the peer's replica).
#[derive(Clone)]
struct FragmentPlans {
    template: Arc<dyn ExecutionPlan>,
    shard: Option<ShardId>,
    /// Built already (a deferred distribution): the local plan, and the shard's part to
    /// turn into a replica scan when a peer runs it.
    built: Option<Arc<dyn ExecutionPlan>>,
    remote_leaf: Option<Arc<dyn ExecutionPlan>>,
    replicated: bool,
    /// The shards that have fragments (their buffered rows are theirs, in a
    /// replicated cluster).
    fragment_shards: Arc<BTreeSet<ShardId>>,
}

impl FragmentPlans {
    fn plan(&self, remote: bool) -> DfResult<Arc<dyn ExecutionPlan>> {
        let remote = remote && self.replicated && self.shard.is_some();
        match (&self.built, remote) {
            (Some(p), false) => return Ok(Arc::clone(p)),
            (Some(_), true) => {
                let (Some(leaf), Some(shard)) = (&self.remote_leaf, self.shard) else {
                    return Err(Error::Internal("a fragment of a replicated shard without its remote form".into()).into());
                };
                return with_leaf(&self.template, replica_leaf(leaf, shard)?);
            }
            (None, _) => {}
        }
        let none = BTreeSet::new();
        let cut = match self.shard {
            Some(shard) => Cut::Shard { shard, buffer: self.replicated, remote },
            None => Cut::Buffer { except: if self.replicated { &self.fragment_shards } else { &none } },
        };
        restrict(&self.template, cut)
    }
}

/// One fragment as planned: the shard it reads and where the router sent it.
#[derive(Debug, Clone)]
pub struct FragmentSpec {
    /// None = the write buffer.
    pub shard: Option<ShardId>,
    pub segments: usize,
    pub decision: Decision,
    /// The fragment's plan when it was built already (a deferred distribution);
    /// otherwise it is cut from the template when it runs.
    pub plan: Option<Arc<dyn ExecutionPlan>>,
    /// With `plan`, in a replicated cluster: the shard's part of the resolved scan, which
    /// becomes a replica scan if a peer runs the fragment.
    pub remote_leaf: Option<Arc<dyn ExecutionPlan>>,
}

/// Where the write buffer's fragment runs: the buffer lives in this process, so one of
/// its pipelines reads it (or the gateway itself, on a node without pipelines).
fn route_buffer(cluster: &Cluster, snapshot: &router::LoadSnapshot) -> Decision {
    let local: Vec<PipelineId> = cluster.local_pipelines().iter().map(|p| p.id()).collect();
    router::route(0, &local, snapshot, &[])
}

/// `template` with its one deferred scan replaced by `leaf` (one partition, the same
/// schema). The nodes keep the properties they were planned with over the deferred
/// scan, which promised nothing about order or partitioning beyond one partition.
fn with_leaf(template: &Arc<dyn ExecutionPlan>, leaf: Arc<dyn ExecutionPlan>) -> DfResult<Arc<dyn ExecutionPlan>> {
    if template.is::<DeferredScanExec>() {
        return Ok(leaf);
    }
    let children = template.children().into_iter().map(|c| with_leaf(c, Arc::clone(&leaf))).collect::<DfResult<Vec<_>>>()?;
    Arc::clone(template).replace_children(children, ReplaceChildrenOptions::new(ChildrenPropertiesMode::Keep))
}

/// What happened when a fragment ran (for EXPLAIN ANALYZE).
#[derive(Debug, Clone, Default)]
struct FragmentRun {
    pipeline: Option<PipelineId>,
    attempts: u32,
    rows: u64,
}

/// Runs the template once per fragment on the chosen pipelines; output partition i
/// is fragment i's output.
#[derive(Debug)]
pub struct DistributeExec {
    template: Arc<dyn ExecutionPlan>,
    fragments: Vec<FragmentSpec>,
    epoch: u64,
    scan: Option<Arc<crate::storage::provider::ScanInfo>>,
    cluster: Arc<Cluster>,
    props: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
    runs: Arc<Mutex<Vec<FragmentRun>>>,
    /// The template's scans are [`DeferredScanExec`]s: shards, segments and routes are
    /// chosen at each execution, and the fragments' outputs merged into one partition.
    deferred: bool,
    /// The shards of `fragments`.
    fragment_shards: Arc<BTreeSet<ShardId>>,
}

impl DistributeExec {
    fn new(
        template: Arc<dyn ExecutionPlan>,
        fragments: Vec<FragmentSpec>,
        epoch: u64,
        scan: Option<Arc<crate::storage::provider::ScanInfo>>,
        cluster: Arc<Cluster>,
    ) -> DistributeExec {
        let props = PlanProperties::new(
            template.equivalence_properties().clone(),
            Partitioning::UnknownPartitioning(fragments.len().max(1)),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        let runs = Arc::new(Mutex::new(vec![FragmentRun::default(); fragments.len()]));
        let fragment_shards = Arc::new(fragments.iter().filter_map(|f| f.shard).collect());
        DistributeExec {
            fragment_shards,
            template,
            fragments,
            epoch,
            scan,
            cluster,
            props: Arc::new(props),
            metrics: ExecutionPlanMetricsSet::new(),
            runs,
            deferred: false,
        }
    }

    fn new_deferred(template: Arc<dyn ExecutionPlan>, cluster: Arc<Cluster>) -> DistributeExec {
        let mut d = DistributeExec::new(template, vec![], 0, None, cluster);
        d.deferred = true;
        d
    }

    /// Routes the parts of a resolved scan and builds each fragment as the template over
    /// its part; one partition (merged as the Fragmenter would merge).
    fn distribute_resolved(
        &self,
        resolved: ResolvedScan,
        leaf_schema: datafusion::arrow::datatypes::SchemaRef,
        policy: Policy,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let map = self.cluster.shard_map();
        let snapshot = self.cluster.load_snapshot();
        let shard_list: Vec<ShardId> = resolved.shards.iter().map(|(s, _, _)| *s).collect();
        let mut parts: BTreeMap<ShardId, (usize, Arc<dyn ExecutionPlan>)> =
            resolved.shards.into_iter().map(|(s, n, p)| (s, (n, p))).collect();
        let mut fragments = Vec::new();
        let seq = self.cluster.next_route_seq(shard_list.len());
        let replicated = self.cluster.replicated_reads();
        let buffer = resolved.buffer;
        let buffered = buffer.as_ref().and_then(|b| b.downcast_ref::<BufferExec>());
        for d in router::route_all_with(policy, seq, &shard_list, &map, &snapshot) {
            let Some((segments, scan)) = parts.remove(&d.shard) else { continue };
            if !replicated {
                fragments.push(FragmentSpec { shard: Some(d.shard), segments, plan: Some(with_leaf(&self.template, scan)?), decision: d, remote_leaf: None });
                continue;
            }
            // A replicated shard's fragment reads its buffered rows with its segments.
            let leaf = match buffered.and_then(|b| b.restricted(&|s| s == Some(d.shard))) {
                Some(rows) => Arc::new(CoalescePartitionsExec::new(UnionExec::try_new(vec![Arc::clone(&scan), rows])?)) as Arc<dyn ExecutionPlan>,
                None => Arc::clone(&scan),
            };
            fragments.push(FragmentSpec { shard: Some(d.shard), segments, plan: Some(with_leaf(&self.template, leaf)?), decision: d, remote_leaf: Some(scan) });
        }
        let rest = match (replicated, buffered) {
            (true, Some(b)) => {
                let with_fragments: BTreeSet<ShardId> = fragments.iter().filter_map(|f| f.shard).collect();
                b.restricted(&|s| s.is_none_or(|s| !with_fragments.contains(&s)))
            }
            _ => buffer,
        };
        if let Some(rest) = rest {
            let decision = route_buffer(&self.cluster, &snapshot);
            fragments.push(FragmentSpec { shard: None, segments: 0, plan: Some(with_leaf(&self.template, rest)?), decision, remote_leaf: None });
        }
        if fragments.is_empty() {
            return with_leaf(&self.template, Arc::new(EmptyExec::new(leaf_schema)));
        }
        let exec: Arc<dyn ExecutionPlan> =
            Arc::new(DistributeExec::new(Arc::clone(&self.template), fragments, map.epoch, None, Arc::clone(&self.cluster)));
        Ok(if exec.output_partitioning().partition_count() == 1 { exec } else { merge(exec, &self.template) })
    }

    /// True when shards and routes are chosen at execution (a reused plan).
    pub fn is_deferred(&self) -> bool {
        self.deferred
    }

    /// A deferred distribution: resolves the template's scans with this execution's
    /// values and data, distributes the result as the [`Fragmenter`] would have, and
    /// runs it as one partition.
    fn execute_deferred(&self, ctx: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        use datafusion::common::tree_node::{Transformed, TreeNode};
        let report = ctx.session_config().get_extension::<ScanReport>();
        let mut leaves = Vec::new();
        visit_leaves(&self.template, &mut |l| {
            if l.is::<DeferredScanExec>() {
                leaves.push(Arc::clone(l));
            }
        });
        let plan = match leaves.as_slice() {
            [leaf] => {
                // One scan: its per-shard parts go straight under copies of the template.
                let leaf = leaf.downcast_ref::<DeferredScanExec>().expect("checked above");
                let policy = routing_policy(ctx.session_config().options(), &self.cluster);
                self.distribute_resolved(leaf.resolve_by_shard(report.as_deref())?, leaf.schema(), policy)?
            }
            _ => {
                let concrete = Arc::clone(&self.template)
                    .transform_up(|node| match node.downcast_ref::<DeferredScanExec>() {
                        Some(d) => Ok(Transformed::yes(d.resolve(report.as_deref())?)),
                        None => Ok(Transformed::no(node)),
                    })?
                    .data;
                if fragmentable(&concrete) {
                    let policy = routing_policy(ctx.session_config().options(), &self.cluster);
                    Fragmenter::new(Arc::clone(&self.cluster)).distribute(&concrete, true, policy)
                } else {
                    concrete
                }
            }
        };
        let plan: Arc<dyn ExecutionPlan> = if plan.output_partitioning().partition_count() > 1 {
            Arc::new(CoalescePartitionsExec::new(plan))
        } else {
            plan
        };
        let metrics = BaselineMetrics::new(&self.metrics, 0);
        let stream = plan.execute(0, ctx)?;
        Ok(Box::pin(RecordBatchStreamAdapter::new(self.schema(), stream.inspect_ok(move |b| metrics.record_output(b.num_rows())))))
    }
}

impl DisplayAs for DistributeExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.deferred {
            return write!(f, "DistributeExec: deferred (shards, segments and pipelines chosen per execution)");
        }
        write!(f, "DistributeExec: epoch={}", self.epoch)?;
        if let Some(s) = &self.scan {
            match &s.keys {
                Some(k) => write!(f, ", shard_keys=[{}]", k.join(", "))?,
                None => write!(f, ", shard_keys=all")?,
            }
            write!(f, ", time={}", s.time)?;
            let shards: BTreeSet<_> = self.fragments.iter().filter_map(|x| x.shard).collect();
            let segments: usize = self.fragments.iter().map(|x| x.segments).sum();
            write!(f, ", shards={} of {}, segments={} of {}", shards.len(), s.shard_count, segments, s.segments_total)?;
        }
        let runs = self.runs.lock();
        write!(f, ", fragments=[")?;
        for (i, x) in self.fragments.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            match x.shard {
                Some(s) => write!(f, "shard {s} ({} segments)", x.segments)?,
                None => write!(f, "write buffer")?,
            }
            match x.decision.choice {
                Some(c) => write!(
                    f,
                    " -> {c} ({} by {}; candidates {})",
                    x.decision.reason.as_str(),
                    x.decision.policy.as_str(),
                    x.decision.candidates_text()
                )?,
                None if x.shard.is_none() => write!(f, " -> gateway")?,
                None => write!(f, " -> none ({})", x.decision.reason.as_str())?,
            }
            if let Some(r) = runs.get(i).filter(|r| r.attempts > 0) {
                let on = r.pipeline.map(|p| p.to_string()).unwrap_or_else(|| "gateway".into());
                write!(f, " ran on {on}, attempts={}, rows={}", r.attempts, r.rows)?;
            }
        }
        write!(f, "]")
    }
}

impl ExecutionPlan for DistributeExec {
    fn name(&self) -> &str {
        "DistributeExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.props
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.template]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        options: ReplaceChildrenOptions,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        match options.children_properties {
            // Same properties (a reused plan renewed for its next execution): keep them,
            // so the nodes above keep theirs too; fresh metrics and runs.
            ChildrenPropertiesMode::Keep => {
                let template = children.into_iter().next().ok_or_else(|| DataFusionError::Internal("DistributeExec needs its template".into()))?;
                Ok(Arc::new(DistributeExec {
                    template,
                    fragments: self.fragments.clone(),
                    epoch: self.epoch,
                    scan: self.scan.clone(),
                    cluster: Arc::clone(&self.cluster),
                    props: Arc::clone(&self.props),
                    metrics: ExecutionPlanMetricsSet::new(),
                    runs: Arc::new(Mutex::new(vec![FragmentRun::default(); self.fragments.len()])),
                    deferred: self.deferred,
                    fragment_shards: Arc::clone(&self.fragment_shards),
                }))
            }
            #[allow(deprecated)]
            ChildrenPropertiesMode::Recompute => self.with_new_children(children),
        }
    }

    #[allow(deprecated)]
    fn with_new_children(self: Arc<Self>, children: Vec<Arc<dyn ExecutionPlan>>) -> DfResult<Arc<dyn ExecutionPlan>> {
        let template = children.into_iter().next().ok_or_else(|| DataFusionError::Internal("DistributeExec needs its template".into()))?;
        let mut d = DistributeExec::new(template, self.fragments.clone(), self.epoch, self.scan.clone(), Arc::clone(&self.cluster));
        d.deferred = self.deferred;
        Ok(Arc::new(d))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(&self, partition: usize, ctx: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        if self.deferred {
            if partition != 0 {
                return Err(DataFusionError::Internal(format!("a deferred DistributeExec has one partition, not {partition}")));
            }
            return self.execute_deferred(ctx);
        }
        let spec = self
            .fragments
            .get(partition)
            .cloned()
            .ok_or_else(|| DataFusionError::Internal(format!("DistributeExec has no partition {partition}")))?;
        let plans = FragmentPlans {
            template: Arc::clone(&self.template),
            shard: spec.shard,
            built: spec.plan.clone(),
            remote_leaf: spec.remote_leaf.clone(),
            replicated: self.cluster.replicated_reads(),
            fragment_shards: Arc::clone(&self.fragment_shards),
        };
        let report = ctx.session_config().get_extension::<ScanReport>();
        let query_id = report.as_ref().map(|r| r.query_id).unwrap_or(0);
        let read_after = spec.shard.zip(report.as_ref()).and_then(|(s, r)| r.read_after(s));
        let fragment = Fragment { query_id, shard: spec.shard, plan: Arc::new(EmptyExec::new(self.template.schema())), alone: self.fragments.len() == 1, read_after };
        let cluster = Arc::clone(&self.cluster);
        let runs = Arc::clone(&self.runs);
        let metrics = BaselineMetrics::new(&self.metrics, partition);
        let epoch = self.epoch;
        let schema = self.schema();
        let open = async move {
            let stream = open_fragment(&cluster, epoch, spec, &plans, fragment, ctx, &runs, partition).await?;
            let runs = Arc::clone(&runs);
            Ok::<_, DataFusionError>(stream.inspect_ok(move |b| {
                metrics.record_output(b.num_rows());
                if let Some(r) = runs.lock().get_mut(partition) {
                    r.rows += b.num_rows() as u64;
                }
            }))
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, futures::stream::once(open).try_flatten())))
    }
}

fn record(cluster: &Cluster, epoch: u64, query_id: u64, d: &Decision, attempt: u32) {
    cluster.record_route(RoutingRecord {
        query_id,
        time_us: cluster.now_us(),
        epoch,
        shard: Some(d.shard),
        policy: d.policy.as_str(),
        candidates: d.candidates_text(),
        choice: d.choice.map(|c| c.to_string()),
        reason: d.reason.as_str().to_string(),
        attempt,
    });
}

fn is_retryable(e: &Error) -> bool {
    matches!(e, Error::PipelineUnavailable { .. })
}

/// Starts a fragment on its chosen pipeline; when that pipeline is unavailable before
/// the fragment produced anything, routes it once more, away from that pipeline. The
/// fragment's plan is chosen for where it runs (`plans`).
#[allow(clippy::too_many_arguments)]
async fn open_fragment(
    cluster: &Arc<Cluster>,
    epoch: u64,
    spec: FragmentSpec,
    plans: &FragmentPlans,
    mut fragment: Fragment,
    ctx: Arc<TaskContext>,
    runs: &Mutex<Vec<FragmentRun>>,
    partition: usize,
) -> DfResult<SendableRecordBatchStream> {
    let mut decision = spec.decision.clone();
    let mut excluded: Vec<PipelineId> = Vec::new();
    // In a replicated cluster this node holds every shard: when none of a shard's
    // pipelines can take it, this node's own pipelines read its replica.
    let local_fallback = |decision: &Decision, excluded: &[PipelineId]| {
        let local: Vec<PipelineId> = cluster.local_pipelines().iter().map(|p| p.id()).collect();
        router::route_with(decision.policy, cluster.next_route_seq(1), decision.shard, &local, &cluster.load_snapshot(), excluded)
    };
    if plans.replicated && spec.shard.is_some() && decision.choice.is_none() {
        decision = local_fallback(&decision, &excluded);
    }
    for attempt in 1..=2u32 {
        if spec.shard.is_some() {
            record(cluster, epoch, fragment.query_id, &decision, attempt);
        }
        if let Some(r) = runs.lock().get_mut(partition) {
            r.attempts = attempt;
            r.pipeline = decision.choice;
        }
        let Some(choice) = decision.choice else {
            if spec.shard.is_none() {
                // No local pipeline: the gateway reads its own write buffer.
                return plans.plan(false)?.execute(0, ctx);
            }
            return Err(Error::PipelineUnavailable {
                pipeline: format!("for shard {}", decision.shard),
                reason: format!("{} (tried {})", decision.reason.as_str(), list(&excluded)),
            }
            .into());
        };
        let pipeline = cluster
            .pipeline(choice)
            .ok_or_else(|| Error::Internal(format!("routed to unknown pipeline {choice}")))?;
        fragment.plan = plans.plan(!pipeline.is_local())?;
        let err: Error = match pipeline.run(fragment.clone(), Arc::clone(&ctx)).await {
            Ok(mut stream) => match stream.next().await {
                Some(Err(e)) => Error::from(e),
                first => return Ok(prepend(first, stream)),
            },
            Err(e) => e,
        };
        if attempt == 2 || !is_retryable(&err) || spec.shard.is_none() {
            return Err(err.into());
        }
        tracing::warn!(pipeline = %choice, shard = decision.shard, error = %err, "fragment failed before sending rows; retrying on another replica");
        excluded.push(choice);
        if plans.replicated {
            decision = local_fallback(&decision, &excluded);
            continue;
        }
        let map = cluster.shard_map();
        decision = router::route_with(
            decision.policy,
            cluster.next_route_seq(1),
            decision.shard,
            map.replicas_of(decision.shard),
            &cluster.load_snapshot(),
            &excluded,
        );
    }
    unreachable!("the loop returns on its second attempt")
}

fn list(ids: &[PipelineId]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    ids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
}

/// `first` (already taken from `rest`) followed by the rest of the stream.
fn prepend(
    first: Option<DfResult<datafusion::arrow::record_batch::RecordBatch>>,
    rest: SendableRecordBatchStream,
) -> SendableRecordBatchStream {
    let schema = rest.schema();
    let head = futures::stream::iter(first);
    Box::pin(RecordBatchStreamAdapter::new(schema, head.chain(rest)))
}
