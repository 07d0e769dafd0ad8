//! Memory budgets: one pool per node (`node_memory_bytes_max`) that every query's
//! operators reserve from, and a limit per query (`query_memory_bytes_max`) on top.
//! Operators that can spill (sorts, aggregates) spill to disk when refused; the others
//! fail their query with 53200 (DataFusion's ResourcesExhausted).
//!
//! Owns: [`QueryPool`] and the per-query runtime built around it. Must never: let a
//! query's reservations exceed its limit, or lose track of one (every grow is matched
//! by a shrink through the reservation that made it).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use datafusion::execution::memory_pool::{
    FairSpillPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation, UnboundedMemoryPool,
};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::TaskContext;

/// The node's pool: fair among spilling consumers, bounded by `bytes_max` (0 = none).
pub fn node_pool(bytes_max: u64) -> Arc<dyn MemoryPool> {
    if bytes_max == 0 {
        Arc::new(UnboundedMemoryPool::default())
    } else {
        Arc::new(FairSpillPool::new(bytes_max as usize))
    }
}

/// One query's view of the node pool: its own total, at most `limit` bytes.
#[derive(Debug)]
pub struct QueryPool {
    node: Arc<dyn MemoryPool>,
    limit: usize,
    used: AtomicUsize,
}

impl QueryPool {
    pub fn new(node: Arc<dyn MemoryPool>, limit: usize) -> QueryPool {
        QueryPool { node, limit, used: AtomicUsize::new(0) }
    }
}

impl std::fmt::Display for QueryPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "query pool: {} of {} bytes", self.reserved(), self.limit)
    }
}

impl MemoryPool for QueryPool {
    fn name(&self) -> &str {
        "tidemark-query"
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.node.register(consumer)
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.node.unregister(consumer)
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.node.grow(reservation, additional);
        self.used.fetch_add(additional, Ordering::Relaxed);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.node.shrink(reservation, shrink);
        self.used.fetch_sub(shrink, Ordering::Relaxed);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let before = self.used.fetch_add(additional, Ordering::Relaxed);
        if before + additional > self.limit {
            self.used.fetch_sub(additional, Ordering::Relaxed);
            return Err(DataFusionError::ResourcesExhausted(format!(
                "the query needs more than query_memory_bytes_max ({} bytes): {before} in use, {additional} more asked by {}",
                self.limit,
                reservation.consumer().name()
            )));
        }
        if let Err(e) = self.node.try_grow(reservation, additional) {
            self.used.fetch_sub(additional, Ordering::Relaxed);
            return Err(e);
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.limit)
    }
}

/// `base` with `pool` as its memory pool (object stores, disk and caches shared).
pub fn with_pool(base: &RuntimeEnv, pool: Arc<dyn MemoryPool>) -> Arc<RuntimeEnv> {
    Arc::new(RuntimeEnv {
        memory_pool: pool,
        disk_manager: Arc::clone(&base.disk_manager),
        cache_manager: Arc::clone(&base.cache_manager),
        object_store_registry: Arc::clone(&base.object_store_registry),
    })
}

/// `ctx` (its settings and functions) running with `runtime` in place of its own.
pub fn task_context_with(ctx: &TaskContext, runtime: Arc<RuntimeEnv>) -> Arc<TaskContext> {
    Arc::new(TaskContext::new(
        ctx.task_id(),
        ctx.session_id(),
        ctx.session_config().clone(),
        ctx.scalar_functions().clone(),
        ctx.higher_order_functions().clone(),
        ctx.aggregate_functions().clone(),
        ctx.window_functions().clone(),
        runtime,
    ))
}

/// The runtime for one query on a node: the node's runtime with a [`QueryPool`] over
/// its pool when `limit` is set (0 = only the node's bound).
pub fn query_runtime(node: &Arc<RuntimeEnv>, limit: u64) -> Arc<RuntimeEnv> {
    if limit == 0 {
        return Arc::clone(node);
    }
    with_pool(node, Arc::new(QueryPool::new(Arc::clone(&node.memory_pool), limit as usize)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_held_to_its_limit_and_the_node_to_its_own() {
        let node = node_pool(1000);
        let q1: Arc<dyn MemoryPool> = Arc::new(QueryPool::new(Arc::clone(&node), 600));
        let q2: Arc<dyn MemoryPool> = Arc::new(QueryPool::new(Arc::clone(&node), 600));
        let a = MemoryConsumer::new("a").register(&q1);
        a.try_grow(500).unwrap();
        let e = a.try_grow(200).unwrap_err();
        assert!(matches!(e, DataFusionError::ResourcesExhausted(_)), "{e}");
        assert_eq!(q1.reserved(), 500);
        let b = MemoryConsumer::new("b").register(&q2);
        // The node has 500 left: q2 may not take 600 even under its own limit.
        assert!(b.try_grow(600).is_err());
        b.try_grow(400).unwrap();
        assert_eq!(node.reserved(), 900);
        drop(a);
        assert_eq!((q1.reserved(), node.reserved()), (0, 400));
        drop(b);
        assert_eq!(node.reserved(), 0);
    }
}
