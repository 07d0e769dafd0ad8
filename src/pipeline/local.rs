//! The in-process pipeline: runs fragments on this node's runtime with a fixed number
//! of slots, a bounded queue and its own segment cache.
//!
//! Owns: admission (slot or queue or 53000), the segment cache it reads through, and
//! driving a fragment on its own task so that fragments run in parallel whatever the
//! consumer does (a query's only fragment runs on the consumer's task: nothing to run
//! beside it). Must never: hold a slot after the fragment's stream is gone.

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
use crate::storage::hot::HotCache;
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
    /// Decoded columns of hot segments; fragments' segment scans read through it.
    hot: Arc<HotCache>,
    store: Arc<dyn ObjectStore>,
    /// A fault for experiments (`fault_slow_pipeline`): each fragment holds its slot
    /// this much longer, from `from` on.
    slowdown: Option<Slowdown>,
}

/// An injected delay per fragment, active from an instant on.
#[derive(Debug, Clone, Copy)]
pub struct Slowdown {
    pub delay: std::time::Duration,
    pub from: std::time::Instant,
}

impl LocalPipeline {
    /// A pipeline reading segments from `store` through a cache of `cache_bytes_max`
    /// bytes (0 = no cache).
    pub fn new(
        id: PipelineId,
        slots: u32,
        queue_max: u32,
        store: Arc<dyn ObjectStore>,
        cache_bytes_max: u64,
        hot: Arc<HotCache>,
    ) -> Result<LocalPipeline> {
        let (store, cache): (Arc<dyn ObjectStore>, _) = if cache_bytes_max > 0 {
            let c = Arc::new(CachedStore::new(store, cache_bytes_max));
            (Arc::clone(&c) as Arc<dyn ObjectStore>, Some(c))
        } else {
            (store, None)
        };
        let runtime = RuntimeEnvBuilder::new().build_arc()?;
        let url = url::Url::parse(SEGMENT_STORE_URL).map_err(|e| Error::Internal(e.to_string()))?;
        runtime.register_object_store(&url, Arc::clone(&store));
        Ok(LocalPipeline {
            id,
            slots: slots.max(1),
            queue_max,
            permits: Arc::new(Semaphore::new(slots.max(1) as usize)),
            stats: Arc::default(),
            runtime,
            cache,
            hot,
            store,
            slowdown: None,
        })
    }

    /// This pipeline with an injected delay per fragment (a fault for experiments).
    pub fn with_slowdown(mut self, s: Slowdown) -> LocalPipeline {
        self.slowdown = Some(s);
        self
    }

    /// Reads `paths` (segment files) through this pipeline's segment cache, until the
    /// cache is full: the warm-up of a pipeline that is about to hold their shards.
    /// Returns the bytes read.
    pub async fn prefetch(&self, paths: &[String]) -> Result<u64> {
        use object_store::ObjectStoreExt;
        let Some(cache) = &self.cache else { return Ok(0) };
        let budget = cache.stats().bytes_max;
        let mut read = 0u64;
        for p in paths {
            if read >= budget {
                break;
            }
            let got = self.store.get(&object_store::path::Path::from(p.as_str())).await?;
            read += got.bytes().await?.len() as u64;
        }
        Ok(read)
    }

    /// `ctx` with this pipeline's runtime (object stores, segment cache) in place of
    /// the caller's, keeping the caller's session settings, functions and memory pool
    /// (the query's budget).
    fn task_context(&self, ctx: &TaskContext) -> Arc<TaskContext> {
        crate::memory::task_context_with(ctx, crate::memory::with_pool(&self.runtime, Arc::clone(ctx.memory_pool())))
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

    async fn warm(&self, paths: &[String]) -> Result<u64> {
        self.prefetch(paths).await
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

    fn hot(&self) -> Option<CacheStats> {
        Some(self.hot.stats())
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
        if let Some(s) = self.slowdown.filter(|s| s.from.elapsed() > std::time::Duration::ZERO) {
            // Holding the slot, as a pipeline on a slow disk or a busy host would.
            tokio::time::sleep(s.delay).await;
        }
        let plan = self.hot.rewrite(fragment.plan, &self.store)?;
        let schema = plan.schema();
        let partitions = plan.properties().partitioning.partition_count();
        if partitions != 1 {
            return Err(Error::Internal(format!("a fragment must have one output partition, got {partitions}")));
        }
        let mut inner = plan.execute(0, self.task_context(&ctx))?;
        if fragment.alone {
            return Ok(Box::pin(TrackedStream::new(inner, flight, permit)));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::physical_plan::ExecutionPlan;
    use futures::StreamExt;

    fn fragment(rows: i64) -> Fragment {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(Int64Array::from_iter_values(0..rows))]).unwrap();
        let plan: Arc<dyn ExecutionPlan> =
            datafusion::datasource::memory::MemorySourceConfig::try_new_exec(&[vec![batch]], schema, None).unwrap();
        Fragment { query_id: 1, shard: Some(0), plan, alone: false, read_after: None }
    }

    #[tokio::test]
    async fn slots_queue_and_counters() {
        let store = Arc::new(object_store::memory::InMemory::new());
        let p = LocalPipeline::new(PipelineId::new(1, 0), 1, 0, store, 0, Arc::new(HotCache::new(0, Default::default()))).unwrap();
        let ctx = Arc::new(TaskContext::default());
        let held = p.run(fragment(3), Arc::clone(&ctx)).await.unwrap();
        assert_eq!(p.stats().snapshot().in_flight, 1);
        // One slot, taken; a queue of 0: the next fragment is refused, not parked.
        let err = p.run(fragment(3), Arc::clone(&ctx)).await.err().expect("refused");
        assert_eq!(err.sqlstate(), "53000", "{err}");
        assert_eq!(p.stats().snapshot().queued, 0);
        // Reading the stream to its end frees the slot and counts a completion.
        let rows: usize = held.map(|b| b.unwrap().num_rows()).collect::<Vec<_>>().await.into_iter().sum();
        assert_eq!(rows, 3);
        let s = p.stats().snapshot();
        assert_eq!((s.in_flight, s.completed), (0, 1));
        assert!(s.p50_us.is_some());
        // A dropped stream frees its slot too.
        drop(p.run(fragment(5), Arc::clone(&ctx)).await.unwrap());
        let again = p.run(fragment(2), ctx).await.unwrap();
        assert_eq!(again.map(|b| b.unwrap().num_rows()).collect::<Vec<_>>().await.into_iter().sum::<usize>(), 2);
    }

    #[tokio::test]
    async fn waiters_queue_up_to_the_limit() {
        let store = Arc::new(object_store::memory::InMemory::new());
        let p = Arc::new(LocalPipeline::new(PipelineId::new(1, 0), 1, 1, store, 0, Arc::new(HotCache::new(0, Default::default()))).unwrap());
        let ctx = Arc::new(TaskContext::default());
        let held = p.run(fragment(1), Arc::clone(&ctx)).await.unwrap();
        let (p2, c2) = (Arc::clone(&p), Arc::clone(&ctx));
        let waiter = tokio::spawn(async move { p2.run(fragment(1), c2).await.map(|_| ()) });
        for _ in 0..100 {
            if p.stats().snapshot().queued == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(p.stats().snapshot().queued, 1);
        assert_eq!(p.run(fragment(1), Arc::clone(&ctx)).await.err().expect("refused").sqlstate(), "53000");
        drop(held);
        waiter.await.unwrap().unwrap();
        assert_eq!(p.stats().snapshot().queued, 0);
    }
}
