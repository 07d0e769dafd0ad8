//! The in-process pipeline: runs fragments on this node's runtime with a fixed number
//! of slots, a bounded queue and its own segment cache.
//!
//! Owns: admission (slot or queue or 53000), the segment cache it reads through, and
//! driving a fragment on its own task so that fragments run in parallel whatever the
//! consumer does. Must never: hold a slot after the fragment's stream is gone.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder;
use futures::StreamExt;
use object_store::ObjectStore;
use tokio::sync::Semaphore;

use super::{Fragment, InFlight, Pipeline, PipelineStats, TrackedStream};
use crate::error::{Error, Result};
use crate::shard_map::PipelineId;
use crate::storage::cache::{CacheStats, CachedStore};
use crate::storage::SEGMENT_STORE_URL;

/// Batches a running fragment may produce ahead of its consumer.
const FRAGMENT_CHANNEL_BATCHES: usize = 4;

#[derive(Debug)]
pub struct LocalPipeline {
    id: PipelineId,
    slots: u32,
    queue_max: u32,
    permits: Arc<Semaphore>,
    stats: Arc<PipelineStats>,
    runtime: Arc<RuntimeEnv>,
    cache: Option<Arc<CachedStore>>,
}

impl LocalPipeline {
    /// A pipeline reading segments from `store` through a cache of `cache_bytes_max`
    /// bytes (0 = no cache).
    pub fn new(id: PipelineId, slots: u32, queue_max: u32, store: Arc<dyn ObjectStore>, cache_bytes_max: u64) -> Result<LocalPipeline> {
        let (store, cache): (Arc<dyn ObjectStore>, _) = if cache_bytes_max > 0 {
            let c = Arc::new(CachedStore::new(store, cache_bytes_max));
            (Arc::clone(&c) as Arc<dyn ObjectStore>, Some(c))
        } else {
            (store, None)
        };
        let runtime = RuntimeEnvBuilder::new().build_arc()?;
        let url = url::Url::parse(SEGMENT_STORE_URL).map_err(|e| Error::Internal(e.to_string()))?;
        runtime.register_object_store(&url, store);
        Ok(LocalPipeline {
            id,
            slots: slots.max(1),
            queue_max,
            permits: Arc::new(Semaphore::new(slots.max(1) as usize)),
            stats: Arc::default(),
            runtime,
            cache,
        })
    }

    /// `ctx` with this pipeline's runtime (object stores, memory pool) in place of the
    /// caller's, keeping the caller's session settings and functions.
    fn task_context(&self, ctx: &TaskContext) -> Arc<TaskContext> {
        Arc::new(TaskContext::new(
            ctx.task_id(),
            ctx.session_id(),
            ctx.session_config().clone(),
            ctx.scalar_functions().clone(),
            ctx.higher_order_functions().clone(),
            ctx.aggregate_functions().clone(),
            ctx.window_functions().clone(),
            Arc::clone(&self.runtime),
        ))
    }
}

/// Decrements the queue count when a waiter leaves (admitted or cancelled).
struct Waiting<'a>(&'a PipelineStats);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl Pipeline for LocalPipeline {
    fn id(&self) -> PipelineId {
        self.id
    }

    fn slots(&self) -> u32 {
        self.slots
    }

    fn stats(&self) -> &Arc<PipelineStats> {
        &self.stats
    }

    fn cache(&self) -> Option<CacheStats> {
        self.cache.as_ref().map(|c| c.stats())
    }

    fn is_local(&self) -> bool {
        true
    }

    async fn run(&self, fragment: Fragment, ctx: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let waiting = self.stats.queued.fetch_add(1, Ordering::Relaxed) + 1;
                let _w = Waiting(&self.stats);
                if waiting > self.queue_max {
                    return Err(Error::QueueFull { what: "pipeline queue", limit: self.queue_max as u64, unit: "fragments" });
                }
                Arc::clone(&self.permits)
                    .acquire_owned()
                    .await
                    .map_err(|_| Error::Internal("pipeline semaphore closed".into()))?
            }
        };
        let flight = InFlight::start(&self.stats);
        let plan = fragment.plan;
        let schema = plan.schema();
        let partitions = plan.properties().partitioning.partition_count();
        if partitions != 1 {
            return Err(Error::Internal(format!("a fragment must have one output partition, got {partitions}")));
        }
        let mut inner = plan.execute(0, self.task_context(&ctx))?;
        let mut builder = RecordBatchReceiverStreamBuilder::new(schema, FRAGMENT_CHANNEL_BATCHES);
        let tx = builder.tx();
        builder.spawn(async move {
            while let Some(batch) = inner.next().await {
                if tx.send(batch).await.is_err() {
                    break; // the consumer went away
                }
            }
            Ok(())
        });
        Ok(Box::pin(TrackedStream::new(builder.build(), flight, permit)))
    }
}
