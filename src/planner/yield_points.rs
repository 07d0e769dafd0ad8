//! Yield points above joins, so that a running query can be stopped.
//!
//! DataFusion's tasks yield to the scheduler only when a leaf (a scan) runs out of its
//! cooperative budget. A join can emit a great many batches per input batch (a cross
//! join emits one per build-side row), and the operators above it take them in a loop,
//! so a task may run for seconds without yielding: it then cannot be aborted (a
//! statement timeout or a cancel request would answer the client while the work went
//! on) and holds a worker thread that other statements wait for. Wrapping each join in
//! DataFusion's `CooperativeExec` makes its output spend the task's budget too.
//!
//! Owns: the rule. Must never: change an answer (CooperativeExec passes batches through
//! unchanged).

use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::ExecutionPlan;

/// Operators whose output can be far larger than their input.
const JOINS: &[&str] = &["CrossJoinExec", "NestedLoopJoinExec", "HashJoinExec", "SortMergeJoinExec", "SymmetricHashJoinExec"];

#[derive(Debug, Default)]
pub struct YieldPoints;

impl PhysicalOptimizerRule for YieldPoints {
    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _config: &ConfigOptions) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            if JOINS.contains(&node.name()) {
                Ok(Transformed::yes(Arc::new(CooperativeExec::new(node)) as Arc<dyn ExecutionPlan>))
            } else {
                Ok(Transformed::no(node))
            }
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "YieldPoints"
    }

    fn schema_check(&self) -> bool {
        true
    }
}
