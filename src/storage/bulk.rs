//! A large statement's rows stored as they arrive (COPY of a big file or stream), so
//! that a statement of any size needs a bounded amount of memory and is still stored
//! all-or-nothing.
//!
//! Owns: one statement's rows between its first batch and its commit. Rows are
//! deduplicated as they arrive (against the stored index and against the statement's
//! earlier rows); once `chunk_bytes` of them are pending they are sorted, encoded and
//! written as segment files that no manifest names yet, and the memory is given back.
//! The commit names every file in one manifest commit. A statement that never reached
//! `chunk_bytes` takes the ordinary [`Storage::append`] path (the write buffer for
//! small ones), exactly as if it had been appended at once.
//!
//! Must never: make a file visible before the commit, leave an aborted statement's
//! files behind (they are deleted on abort or drop, and a crash leaves them as orphans
//! that [`Storage::open`] removes), or store a record id twice: ids are checked again
//! under the commit lock, and if a concurrent statement stored one of them meanwhile,
//! the commit is refused with 40001 (retrying is safe: the retry skips what is stored).

use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;

use super::manifest::SegmentMeta;
use super::{AppendOutcome, ShardIds, Storage};
use crate::catalog::TableDef;
use crate::error::{Error, Result};

/// One statement's rows on their way into storage.
pub struct BulkAppend {
    storage: Arc<Storage>,
    table: Arc<TableDef>,
    chunk_bytes: usize,
    pending: Vec<RecordBatch>,
    pending_bytes: usize,
    /// Ids of the rows kept so far (pending and written).
    seen: ShardIds,
    present: u64,
    /// Files written but not committed.
    written: Vec<SegmentMeta>,
}

impl BulkAppend {
    /// Starts a statement for `table`; pending rows are written out once they hold
    /// `chunk_bytes` of memory.
    pub fn new(storage: Arc<Storage>, table: Arc<TableDef>, chunk_bytes: usize) -> Result<BulkAppend> {
        storage.check_writable()?;
        Ok(BulkAppend {
            storage,
            table,
            chunk_bytes: chunk_bytes.max(1),
            pending: Vec::new(),
            pending_bytes: 0,
            seen: ShardIds::default(),
            present: 0,
            written: Vec::new(),
        })
    }

    /// Memory held by rows not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Segment files written so far (not visible before the commit).
    pub fn files_written(&self) -> usize {
        self.written.len()
    }

    /// Adds validated rows (in the table's schema); writes the pending rows out when
    /// they reach the chunk size.
    pub async fn push(&mut self, batches: Vec<RecordBatch>) -> Result<()> {
        let (kept, present) = self.storage.dedupe_into(&self.table, &batches, &mut self.seen)?;
        self.present += present;
        for b in kept {
            if b.num_rows() > 0 {
                self.pending_bytes += b.get_array_memory_size();
                self.pending.push(b);
            }
        }
        if self.pending_bytes >= self.chunk_bytes {
            self.spill().await?;
        }
        Ok(())
    }

    async fn spill(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let all = concat_batches(&self.table.schema, &std::mem::take(&mut self.pending))?;
        self.pending_bytes = 0;
        let layout = self.storage.layout(&self.table.name)?;
        // Provisional ids: the commit numbers the files from the manifest it extends.
        let mut next_id = 0u64;
        let segs = self.storage.write_segments(&self.table, &layout, &all, &mut next_id).await?;
        self.written.extend(segs);
        Ok(())
    }

    /// Stores everything pushed, all or nothing.
    pub async fn finish(mut self) -> Result<AppendOutcome> {
        if self.written.is_empty() {
            // Never spilled: one ordinary append (write buffer or segments).
            let pending = std::mem::take(&mut self.pending);
            let mut outcome = self.storage.append(&self.table, pending).await?;
            outcome.present += self.present;
            return Ok(outcome);
        }
        let result = self.commit().await;
        if result.is_err() {
            self.delete_written().await;
        }
        result
    }

    async fn commit(&mut self) -> Result<AppendOutcome> {
        self.spill().await?;
        let storage = Arc::clone(&self.storage);
        if let Some(r) = storage.replicator()? {
            // Through the shards' logs: from here on the files belong to the log entries
            // that name them (an entry may commit even if this statement is dropped), so
            // they are no longer this statement's to delete, except on a refusal.
            let written = std::mem::take(&mut self.written);
            let seen = std::mem::take(&mut self.seen);
            return r.adopt(&self.table, written, seen, self.present).await;
        }
        let _commit = storage.commit_lock.lock().await;
        if self.table.idempotency_key.is_some() {
            let ids = storage.ids.lock();
            if let Some(stored) = ids.get(&self.table.name) {
                if let Some(n) = Some(self.seen.values().flatten().filter(|h| stored.contains(h)).count()).filter(|n| *n > 0) {
                    return Err(Error::SerializationFailure(format!(
                        "{n} of this statement's records were stored by a concurrent statement; retry it (stored records are skipped)"
                    )));
                }
            }
        }
        let base = storage.snapshot();
        let mut next = (*base).clone();
        next.version += 1;
        let mut outcome = AppendOutcome { present: self.present, ..Default::default() };
        for seg in &self.written {
            let mut seg = seg.clone();
            seg.id = next.next_segment_id;
            next.next_segment_id += 1;
            outcome.added += seg.rows;
            outcome.segments += 1;
            next.segments.push(seg);
        }
        storage.commit(next)?;
        self.written.clear();
        if self.table.idempotency_key.is_some() {
            storage.ids.lock().entry(self.table.name.clone()).or_default().extend(std::mem::take(&mut self.seen).into_values().flatten());
        }
        Ok(outcome)
    }

    /// Abandons the statement: deletes the files it wrote.
    pub async fn abort(mut self) {
        self.delete_written().await;
    }

    async fn delete_written(&mut self) {
        let paths: Vec<String> = self.written.drain(..).map(|s| s.path).collect();
        self.storage.delete_quietly(&paths).await;
    }
}

impl Drop for BulkAppend {
    fn drop(&mut self) {
        // Dropped without finish or abort (the client went away mid-COPY): delete the
        // uncommitted files in the background; a crash instead leaves them as orphans
        // that the next start removes.
        if self.written.is_empty() {
            return;
        }
        let paths: Vec<String> = self.written.drain(..).map(|s| s.path).collect();
        let storage = Arc::clone(&self.storage);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { storage.delete_quietly(&paths).await });
        } else {
            tracing::warn!(files = paths.len(), "uncommitted segment files left for the next start to remove");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::clock::Clock;
    use crate::config::Config;
    use datafusion::arrow::array::{Decimal128Array, StringArray, TimestampMicrosecondArray};

    fn batch(table: &TableDef, ids: std::ops::Range<usize>) -> RecordBatch {
        let n = ids.len();
        let s = |f: &dyn Fn(usize) -> String| Arc::new(StringArray::from(ids.clone().map(f).collect::<Vec<_>>())) as _;
        let day = 1_767_571_200_000_000i64; // 2026-01-05
        RecordBatch::try_new(
            Arc::clone(&table.schema),
            vec![
                s(&|i| format!("r{i}")),
                s(&|i| format!("acct-{:03}", i % 37)),
                s(&|_| "storage".into()),
                s(&|_| "GetObject".into()),
                s(&|_| "Requests".into()),
                s(&|_| "eu".into()),
                Arc::new(Decimal128Array::from(vec![1_000_000i128; n]).with_precision_and_scale(38, 6).unwrap()),
                Arc::new(TimestampMicrosecondArray::from(ids.clone().map(|i| day + i as i64 * 1_000_000).collect::<Vec<_>>())),
                Arc::new(TimestampMicrosecondArray::from(vec![day; n])),
            ],
        )
        .unwrap()
    }

    async fn open(dir: &std::path::Path) -> (Arc<Storage>, Arc<TableDef>) {
        let cfg = Config { data_dir: dir.to_path_buf(), ..Config::default() };
        let catalog = Arc::new(Catalog::load_or_init(&cfg.data_dir).unwrap());
        let table = catalog.get("usage").cloned().unwrap();
        (Storage::open(&cfg, catalog, Clock::fixed(0)).await.unwrap(), table)
    }

    #[tokio::test]
    async fn spilled_rows_are_invisible_until_the_commit_and_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, table) = open(dir.path()).await;
        let before = storage.snapshot().segments.len();
        // A tiny chunk: every push writes files.
        let mut bulk = BulkAppend::new(Arc::clone(&storage), Arc::clone(&table), 1).unwrap();
        bulk.push(vec![batch(&table, 0..500)]).await.unwrap();
        // Repeats inside the statement and across chunks are dropped.
        bulk.push(vec![batch(&table, 400..1000)]).await.unwrap();
        assert!(bulk.files_written() > 0);
        assert_eq!(storage.snapshot().segments.len(), before, "nothing visible before the commit");
        let out = bulk.finish().await.unwrap();
        assert_eq!((out.added, out.present), (1000, 100));
        let rows: u64 = storage.snapshot().segments.iter().map(|s| s.rows).sum();
        assert_eq!(rows, 1000);
        // The same rows again: all present, nothing added.
        let mut again = BulkAppend::new(Arc::clone(&storage), Arc::clone(&table), 1).unwrap();
        again.push(vec![batch(&table, 0..1000)]).await.unwrap();
        let out = again.finish().await.unwrap();
        assert_eq!((out.added, out.present), (0, 1000));
        // Ids are unique in the manifest.
        let ids: std::collections::HashSet<u64> = storage.snapshot().segments.iter().map(|s| s.id).collect();
        assert_eq!(ids.len(), storage.snapshot().segments.len());
    }

    #[tokio::test]
    async fn an_aborted_statement_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, table) = open(dir.path()).await;
        let files = || walk(&dir.path().join("segments"));
        let before = files();
        let mut bulk = BulkAppend::new(Arc::clone(&storage), Arc::clone(&table), 1).unwrap();
        bulk.push(vec![batch(&table, 0..300)]).await.unwrap();
        assert!(files() > before);
        bulk.abort().await;
        assert_eq!(files(), before);
        assert_eq!(storage.snapshot().segments.len(), 0);
    }

    #[tokio::test]
    async fn a_concurrent_store_of_the_same_ids_is_a_serialization_failure() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, table) = open(dir.path()).await;
        let mut bulk = BulkAppend::new(Arc::clone(&storage), Arc::clone(&table), 1).unwrap();
        bulk.push(vec![batch(&table, 0..300)]).await.unwrap();
        storage.append(&table, vec![batch(&table, 250..260)]).await.unwrap();
        let e = bulk.finish().await.unwrap_err();
        assert_eq!(e.sqlstate(), "40001", "{e}");
        // Only the concurrent statement's rows are stored.
        let view = storage.view();
        let stored: u64 = view.0.segments.iter().map(|s| s.rows).sum::<u64>() + view.1.rows as u64;
        assert_eq!(stored, 10);
    }

    fn walk(dir: &std::path::Path) -> usize {
        let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
        rd.flatten()
            .map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 })
            .sum()
    }
}
