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
//! Physical planning still happens per Execute: segment pruning and routing depend on
//! the values (which shard an entity is on), and they are cheap next to the logical
//! optimizer, which rewrites the whole plan with about thirty rules.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::ParamValues;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::expr::Placeholder;
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};
use datafusion::optimizer::eliminate_filter::EliminateFilter;
use datafusion::optimizer::eliminate_limit::EliminateLimit;
use datafusion::optimizer::propagate_empty_relation::PropagateEmptyRelation;
use datafusion::optimizer::push_down_limit::PushDownLimit;
use datafusion::optimizer::simplify_expressions::SimplifyExpressions;
use datafusion::optimizer::{Optimizer, OptimizerContext, OptimizerRule};
use parking_lot::Mutex;

use crate::error::Result;

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

/// One prepared statement's generic plan, filled at its first Execute.
#[derive(Debug, Default)]
pub struct GenericPlan {
    state: Mutex<State>,
}

impl GenericPlan {
    /// The statement's plan bound to `params` and ready for physical planning, or
    /// None when the statement must be planned the ordinary way.
    pub fn bind(&self, unoptimized: &LogicalPlan, params: &ParamValues, state: &SessionState) -> Result<Option<LogicalPlan>> {
        let ParamValues::List(values) = params else { return Ok(None) };
        let types: Vec<DataType> = values.iter().map(|v| v.value.data_type()).collect();
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
fn reusable(plan: &LogicalPlan) -> bool {
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
