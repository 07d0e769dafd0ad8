//! Generic plans for prepared statements: the logical plan optimized once, with its
//! parameters left as placeholders typed like the values bound to them, so that each
//! Execute only binds values, simplifies expressions and plans physically.
//!
//! Owns: whether a prepared statement may reuse its optimized plan, and that plan.
//! Must never: change an answer. So a plan is reused only when
//! - it is a query (no DML, DDL, EXPLAIN, COPY or session statement),
//! - every function in it is immutable (`now()`, `random()`, ... would be folded into
//!   constants by the optimizer, and a reused plan would keep the first Execute's value),
//! - the bound values have the types the plan was optimized with (else it is optimized
//!   again for the new types).
//!
//! The physical plan is reused too when it can be ([`GenericPlan::reuse`]): it is built
//! once with each `$n` as a [`ParamUdf`] call that reads the value bound for the current
//! execution, and with its segment scans deferred ([`DeferredScanExec`]): which shards,
//! segments and buffered rows an execution reads, and where its fragments run, depend on
//! the values and on the data of that moment, so they are chosen when it runs, as
//! PostgreSQL prunes partitions at executor start-up for a generic plan. A physical plan
//! is reused only if every node in it is one whose state [`reset_plan_states`] renews
//! (fresh metrics and operator state per execution), its only sources are deferred scans
//! of segments or constant rows (a system table's rows are read at planning), and dynamic
//! filters are off (they live in the plan between executions). Each execution uses a
//! copy of its own (the values live in it), built when no idle copy exists, at most
//! [`COPIES_MAX`] of them; an execution beyond that is planned the other way. A
//! statement text is prepared once per node, whatever the connections that prepare it
//! ([`super::shared`]), so its copies serve them all.
//!
//! [`DeferredScanExec`]: crate::storage::provider::DeferredScanExec

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::ParamValues;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::expr::{Placeholder, ScalarFunction};
use datafusion::logical_expr::{Expr, LogicalPlan, ScalarUDF, Volatility};
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::optimizer::eliminate_filter::EliminateFilter;
use datafusion::optimizer::eliminate_limit::EliminateLimit;
use datafusion::optimizer::propagate_empty_relation::PropagateEmptyRelation;
use datafusion::optimizer::push_down_limit::PushDownLimit;
use datafusion::optimizer::simplify_expressions::SimplifyExpressions;
use datafusion::optimizer::{Optimizer, OptimizerContext, OptimizerRule};
use parking_lot::Mutex;

use crate::error::Result;
use crate::param_udf::{ParamSlot, ParamUdf};
use crate::planner::fragment::DistributeExec;
use crate::storage::provider::{DeferScans, DeferredScanExec};

#[derive(Debug, Default)]
enum State {
    #[default]
    Untried,
    /// Not a plan that may be reused (see the module documentation).
    Unusable,
    Ready {
        types: Vec<DataType>,
        plan: Arc<LogicalPlan>,
    },
}

/// How the Executes of prepared statements were planned, per node (PostgreSQL counts
/// generic and custom plans per statement in `pg_prepared_statements`).
#[derive(Debug, Default)]
pub struct PlanCounters {
    /// The statement's physical plan ran again.
    pub reused: std::sync::atomic::AtomicU64,
    /// The optimized logical plan was bound and planned physically.
    pub bound: std::sync::atomic::AtomicU64,
    /// Planned from the start, like a new statement.
    pub planned: std::sync::atomic::AtomicU64,
}

/// The reusable physical plans of a statement, for one set of parameter types.
#[derive(Debug, Default)]
enum Physical {
    #[default]
    Untried,
    /// Not reusable for these types (see the module documentation).
    Unusable(Vec<DataType>),
    /// Copies of the plan for these types: those ready for the next execution, and how
    /// many executions hold (or are building) one. Each execution has a copy to itself
    /// (the values live in it); a statement shared by several connections
    /// ([`super::shared`]) has at most [`COPIES_MAX`] copies.
    Pool { types: Vec<DataType>, idle: Vec<Reusable>, out: usize },
}

/// Copies of one statement's physical plan at most: one per execution running at
/// once. An execution that finds them all taken is planned the other way.
pub const COPIES_MAX: usize = 32;

#[derive(Debug)]
struct Reusable {
    plan: Arc<dyn ExecutionPlan>,
    values: Arc<ParamSlot>,
}

/// What [`GenericPlan::checkout`] found.
enum Checkout {
    Ready(Reusable),
    /// Every copy is running (and no more may be built now), or not reusable for
    /// these types.
    Refused,
    /// The caller builds a copy (counted as out meanwhile; see [`Building`]).
    Build,
}

/// A copy being built: counted as out until it is built (then the execution holds it)
/// or the build ends without one (an error, or the statement stopped mid-way).
struct Building<'a> {
    owner: &'a GenericPlan,
    types: &'a [DataType],
    done: bool,
}

impl Drop for Building<'_> {
    fn drop(&mut self) {
        if !self.done {
            if let Physical::Pool { types, out, .. } = &mut *self.owner.physical.lock() {
                if types.as_slice() == self.types {
                    *out = out.saturating_sub(1);
                }
            }
        }
    }
}

fn types_of(values: &[datafusion::common::metadata::ScalarAndMetadata]) -> Vec<DataType> {
    values.iter().map(|v| v.value.data_type()).collect()
}

/// One prepared statement's generic plan, filled at its first Execute.
#[derive(Debug, Default)]
pub struct GenericPlan {
    state: Mutex<State>,
    physical: Mutex<Physical>,
}

/// A reused physical plan, ready to execute with this execution's values. Dropping it
/// (with the stream that runs it) hands the plan back to its statement.
pub struct Reused {
    pub plan: Arc<dyn ExecutionPlan>,
    owner: Arc<GenericPlan>,
    held: Option<(Vec<DataType>, Reusable)>,
}

impl Drop for Reused {
    fn drop(&mut self) {
        let Some((held_types, r)) = self.held.take() else { return };
        if let Physical::Pool { types, idle, out } = &mut *self.owner.physical.lock() {
            if *types == held_types {
                *out = out.saturating_sub(1);
                idle.push(r);
            }
        }
    }
}

impl GenericPlan {
    /// The statement's plan bound to `params` and ready for physical planning, or
    /// None when the statement must be planned the ordinary way.
    pub fn bind(&self, unoptimized: &LogicalPlan, params: &ParamValues, state: &SessionState) -> Result<Option<LogicalPlan>> {
        let ParamValues::List(values) = params else { return Ok(None) };
        let types = types_of(values);
        let Some(optimized) = self.optimized(unoptimized, &types, state) else { return Ok(None) };
        let bound = optimized.as_ref().clone().replace_params_with_values(params)?;
        // The rules whose work depends on values: folding (`'acct-' || lpad($1, 5,
        // '0')`, which pruning needs), and what a value can make empty (`LIMIT 0`,
        // `WHERE false`), which the physical operators do not all accept (TopK panics on
        // a fetch of 0).
        let rules: Vec<Arc<dyn OptimizerRule + Send + Sync>> = vec![
            Arc::new(SimplifyExpressions::new()),
            Arc::new(EliminateFilter::new()),
            Arc::new(EliminateLimit::new()),
            Arc::new(PropagateEmptyRelation::new()),
            Arc::new(PushDownLimit::new()),
        ];
        // One pass: the plan was optimized to a fixed point already, and the rules above
        // only fold what the values made constant.
        // (No start time: a reusable plan has no time-dependent function to fold.)
        let config = OptimizerContext::new_with_config_options(Arc::clone(state.config().options()))
            .without_query_execution_start_time()
            .with_skip_failing_rules(false)
            .with_max_passes(1);
        Ok(Some(Optimizer::with_rules(rules).optimize(bound, &config, |_, _| {})?))
    }

    /// The statement's physical plan with `params` bound, built at the first call and
    /// reused afterwards; None when it cannot be reused (then [`GenericPlan::bind`]).
    pub async fn reuse(
        self: &Arc<Self>,
        unoptimized: &LogicalPlan,
        params: &ParamValues,
        state: &SessionState,
    ) -> Result<Option<Reused>> {
        let ParamValues::List(values) = params else { return Ok(None) };
        let types = types_of(values);
        let reusable = match self.checkout(&types, true) {
            Checkout::Ready(r) => r,
            Checkout::Refused => return Ok(None),
            Checkout::Build => {
                let mut building = Building { owner: self, types: &types, done: false };
                let built = match self.optimized(unoptimized, &types, state) {
                    Some(optimized) => build_reusable(&optimized, &types, state).await,
                    None => None,
                };
                // Not cancelled: the count stays out, with the copy or as unusable.
                building.done = true;
                drop(building);
                let Some(r) = built else {
                    *self.physical.lock() = Physical::Unusable(types);
                    return Ok(None);
                };
                r
            }
        };
        self.start(types, reusable, values)
    }

    /// The statement's physical plan with `params` bound if it is built and free: no
    /// planning and no planning state needed. None otherwise (then [`GenericPlan::reuse`]).
    pub fn ready(self: &Arc<Self>, params: &ParamValues) -> Result<Option<Reused>> {
        let ParamValues::List(values) = params else { return Ok(None) };
        let types = types_of(values);
        match self.checkout(&types, false) {
            Checkout::Ready(r) => self.start(types, r, values),
            Checkout::Refused | Checkout::Build => Ok(None),
        }
    }

    /// Takes an idle copy of the plan for `types`. Otherwise, when `may_build` and the
    /// plan is not known unusable for these types and fewer than [`COPIES_MAX`]
    /// copies are out, counts one more out for the caller to build.
    fn checkout(&self, types: &[DataType], may_build: bool) -> Checkout {
        let mut slot = self.physical.lock();
        match &mut *slot {
            Physical::Pool { types: t, idle, out } if t.as_slice() == types => {
                if let Some(r) = idle.pop() {
                    *out += 1;
                    Checkout::Ready(r)
                } else if may_build && *out < COPIES_MAX {
                    *out += 1;
                    Checkout::Build
                } else {
                    Checkout::Refused
                }
            }
            Physical::Unusable(t) if t.as_slice() == types => Checkout::Refused,
            _ if may_build => {
                // Untried, or built for other types: copies of the old types still out
                // are dropped when their executions end.
                *slot = Physical::Pool { types: types.to_vec(), idle: Vec::new(), out: 1 };
                Checkout::Build
            }
            _ => Checkout::Refused,
        }
    }

    /// Binds `values` into the checked-out plan and hands it out.
    fn start(
        self: &Arc<Self>,
        types: Vec<DataType>,
        reusable: Reusable,
        values: &[datafusion::common::metadata::ScalarAndMetadata],
    ) -> Result<Option<Reused>> {
        reusable.values.set(values.iter().map(|v| v.value.clone()).collect());
        // Fresh operator state and metrics for this execution; same expressions.
        let plan = match reset_plan_states(Arc::clone(&reusable.plan)) {
            Ok(p) => p,
            Err(e) => {
                *self.physical.lock() = Physical::Unusable(types);
                return Err(e.into());
            }
        };
        Ok(Some(Reused { plan, owner: Arc::clone(self), held: Some((types, reusable)) }))
    }

    fn optimized(&self, unoptimized: &LogicalPlan, types: &[DataType], state: &SessionState) -> Option<Arc<LogicalPlan>> {
        let mut slot = self.state.lock();
        match &*slot {
            State::Unusable => return None,
            State::Ready { types: t, plan } if t == types => return Some(Arc::clone(plan)),
            _ => {}
        }
        // A plan the optimizer cannot take with placeholders is planned the ordinary
        // way from now on; an error then shows there, with the values.
        let built = reusable(unoptimized)
            .then(|| typed_placeholders(unoptimized, types).and_then(|p| Ok(state.optimize(&p)?)))
            .and_then(|r| r.map_err(|e| tracing::debug!(error = %e, "prepared statement keeps per-Execute planning")).ok())
            .map(Arc::new);
        *slot = match &built {
            Some(plan) => State::Ready { types: types.to_vec(), plan: Arc::clone(plan) },
            None => State::Unusable,
        };
        built
    }
}

/// A query whose functions are all immutable.
pub(crate) fn reusable(plan: &LogicalPlan) -> bool {
    if !matches!(
        plan,
        LogicalPlan::Projection(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Aggregate(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::Distinct(_)
            | LogicalPlan::Window(_)
            | LogicalPlan::Join(_)
            | LogicalPlan::Union(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::TableScan(_)
    ) {
        return false;
    }
    let mut ok = true;
    let _ = plan.apply_with_subqueries(|p| {
        if matches!(p, LogicalPlan::Dml(_) | LogicalPlan::Ddl(_) | LogicalPlan::Copy(_) | LogicalPlan::Extension(_)) {
            ok = false;
            return Ok(TreeNodeRecursion::Stop);
        }
        p.apply_expressions(|e| {
            e.apply(|e| {
                let volatility = match e {
                    Expr::ScalarFunction(f) => Some(f.func.signature().volatility),
                    Expr::AggregateFunction(f) => Some(f.func.signature().volatility),
                    Expr::WindowFunction(_) | Expr::ScalarVariable(_, _) => Some(Volatility::Volatile),
                    _ => None,
                };
                if matches!(volatility, Some(v) if v != Volatility::Immutable) {
                    ok = false;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    ok
}

/// `plan` with `$n` typed as `types[n - 1]`, its schemas recomputed.
fn typed_placeholders(plan: &LogicalPlan, types: &[DataType]) -> Result<LogicalPlan> {
    let typed = plan.clone().transform_up_with_subqueries(|p| {
        p.map_expressions(|e| {
            e.transform_up(|e| match e {
                Expr::Placeholder(Placeholder { id, field }) => {
                    let t = id.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()).and_then(|n| types.get(n.wrapping_sub(1)));
                    match t {
                        Some(t) => {
                            let f = Field::new(&id, t.clone(), true);
                            Ok(Transformed::yes(Expr::Placeholder(Placeholder { id, field: Some(Arc::new(f)) })))
                        }
                        None => Ok(Transformed::no(Expr::Placeholder(Placeholder { id, field }))),
                    }
                }
                other => Ok(Transformed::no(other)),
            })
        })?
        .map_data(|p| p.recompute_schema())
    })?;
    Ok(typed.data)
}

/// Builds the physical plan of `optimized` (placeholders typed as `types`) for reuse, or
/// None when it may not be reused.
async fn build_reusable(optimized: &LogicalPlan, types: &[DataType], state: &SessionState) -> Option<Reusable> {
    let values = Arc::new(ParamSlot::default());
    let plan = match with_param_functions(optimized, types, &values) {
        Ok(Some(p)) => p,
        Ok(None) => return None,
        Err(e) => {
            tracing::debug!(error = %e, "prepared statement keeps per-Execute physical planning");
            return None;
        }
    };
    let mut planning = state.clone();
    planning.config_mut().set_extension(Arc::new(DeferScans));
    {
        let o = &mut planning.config_mut().options_mut().optimizer;
        o.enable_dynamic_filter_pushdown = false;
        o.enable_topk_dynamic_filter_pushdown = false;
        o.enable_join_dynamic_filter_pushdown = false;
        o.enable_aggregate_dynamic_filter_pushdown = false;
    }
    let physical = match planning.query_planner().create_physical_plan(&plan, &planning).await {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "prepared statement keeps per-Execute physical planning");
            return None;
        }
    };
    reusable_physical(&physical).then_some(Reusable { plan: physical, values })
}

/// True when `plan` may run again and again: known nodes only, whose state
/// `reset_plan_states` renews, and sources that are read at execution time.
fn reusable_physical(plan: &Arc<dyn ExecutionPlan>) -> bool {
    use datafusion::physical_plan::aggregates::AggregateExec;
    use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
    use datafusion::physical_plan::coop::CooperativeExec;
    use datafusion::physical_plan::empty::EmptyExec;
    use datafusion::physical_plan::filter::FilterExec;
    use datafusion::physical_plan::limit::{GlobalLimitExec, LocalLimitExec};
    use datafusion::physical_plan::placeholder_row::PlaceholderRowExec;
    use datafusion::physical_plan::projection::ProjectionExec;
    use datafusion::physical_plan::repartition::RepartitionExec;
    use datafusion::physical_plan::sorts::sort::SortExec;
    use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
    use datafusion::physical_plan::union::UnionExec;
    if let Some(d) = plan.downcast_ref::<DistributeExec>() {
        // Its template's only sources must be deferred scans (checked when it was built).
        return d.is_deferred();
    }
    #[allow(deprecated)]
    let known = plan.is::<ProjectionExec>()
        || plan.is::<FilterExec>()
        || plan.is::<AggregateExec>()
        || plan.is::<SortExec>()
        || plan.is::<SortPreservingMergeExec>()
        || plan.is::<GlobalLimitExec>()
        || plan.is::<LocalLimitExec>()
        || plan.is::<CoalescePartitionsExec>()
        || plan.is::<datafusion::physical_plan::coalesce_batches::CoalesceBatchesExec>()
        || plan.is::<CooperativeExec>()
        || plan.is::<UnionExec>()
        || plan.is::<RepartitionExec>()
        || plan.is::<PlaceholderRowExec>()
        || plan.is::<EmptyExec>();
    known && !plan.is::<DeferredScanExec>() && plan.children().into_iter().all(reusable_physical)
}

/// An IN list with more parameters than this is planned per execution with the values
/// as constants: DataFusion then builds one hash set of them, where a list of
/// [`ParamUdf`] calls is evaluated item by item for every batch (measured in debug, on
/// 2,000 rows: 4,000 parameters took 11 s per execution, 1,000 took 2.7 s).
const IN_LIST_PARAMS_MAX: usize = 32;

/// `plan` with each `$n` replaced by a call to a [`ParamUdf`] reading `values`; None
/// when a parameter sits where the physical planner needs a constant (LIMIT, OFFSET)
/// or in an IN list longer than [`IN_LIST_PARAMS_MAX`].
fn with_param_functions(plan: &LogicalPlan, types: &[DataType], values: &Arc<ParamSlot>) -> Result<Option<LogicalPlan>> {
    let mut constant_needed = false;
    let _ = plan.apply_with_subqueries(|p| {
        if let LogicalPlan::Limit(l) = p {
            if [&l.skip, &l.fetch].into_iter().flatten().any(|e| !matches!(e.as_ref(), Expr::Literal(..))) {
                constant_needed = true;
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        let _ = p.apply_expressions(|e| {
            e.apply(|e| {
                if let Expr::InList(l) = e {
                    if l.list.iter().filter(|i| matches!(i, Expr::Placeholder(_))).count() > IN_LIST_PARAMS_MAX {
                        constant_needed = true;
                        return Ok(TreeNodeRecursion::Stop);
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            })
        });
        Ok(if constant_needed { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
    });
    if constant_needed {
        return Ok(None);
    }
    let mut missing = false;
    let replaced = plan.clone().transform_up_with_subqueries(|p| {
        p.map_expressions(|e| {
            e.transform_up(|e| match e {
                Expr::Placeholder(Placeholder { id, field }) => {
                    let index = id.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()).and_then(|n| n.checked_sub(1));
                    match index.and_then(|i| types.get(i).map(|t| (i, t))) {
                        Some((i, t)) => {
                            let udf = ScalarUDF::new_from_impl(ParamUdf::new(i, t.clone(), Arc::clone(values)));
                            Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(Arc::new(udf), vec![]))))
                        }
                        None => {
                            missing = true;
                            Ok(Transformed::no(Expr::Placeholder(Placeholder { id, field })))
                        }
                    }
                }
                other => Ok(Transformed::no(other)),
            })
        })
    })?;
    Ok((!missing).then_some(replaced.data))
}

