//! Storage: segments in an object store, the manifest that commits them, the
//! record-id index that makes ingestion idempotent, and background compaction.
//!
//! Owns: every byte under the segment store and the manifest. Invariants:
//! - a segment is visible to readers exactly when the committed manifest names it;
//!   files are written (and fsynced on a local disk) before the manifest names them, so
//!   a crash at any point leaves the last committed state, and files no manifest names
//!   are deleted at the next start;
//! - a record id is stored at most once per table (the index is rebuilt from the
//!   segments at start, so it cannot disagree with them);
//! - appends and compactions commit one at a time (the commit lock), so ids and the
//!   index stay consistent;
//! - a small append is acknowledged after its write-ahead-log record is fsynced; it is
//!   visible from the write buffer until a flush turns it into segments, and the flush
//!   swaps manifest and buffer in one step, so no reader sees it twice or not at all.
//!
//! Must never: make part of an append visible, or delete a file that a committed
//! manifest still names.

pub mod bulk;
pub mod cache;
pub mod hot;
pub mod manifest;
pub mod provider;
pub mod replica_scan;
pub mod segment;
pub mod wal;
pub mod write_stage;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, AsArray, RecordBatch, TimestampMicrosecondArray, UInt32Array};
use datafusion::arrow::compute::{concat_batches, filter_record_batch, take_record_batch};
use datafusion::arrow::array::BooleanArray;
use datafusion::execution::object_store::ObjectStoreUrl;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parking_lot::{Mutex, RwLock};
// ParquetObjectReader is deprecated in parquet 59 in favour of hand-written readers;
// it is still the shortest correct way to read a whole segment.
#[allow(deprecated)]
use parquet::arrow::async_reader::ParquetObjectReader;
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};

use crate::catalog::{Catalog, TableDef};
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::shard_map::{shard_of, ShardId};
use manifest::{Manifest, ManifestFile, SegmentMeta, TableLayout};

/// The URL under which the segment store is registered with DataFusion.
pub const SEGMENT_STORE_URL: &str = "tidemark://segments";

/// Record-id hashes are already uniformly distributed, so the set uses them directly.
#[derive(Default)]
pub struct IdHasher(u64);
impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}
pub type IdSet = HashSet<u128, BuildHasherDefault<IdHasher>>;

/// Index keys of new rows, by the shard they belong to.
pub type ShardIds = BTreeMap<ShardId, IdSet>;

/// The index key of a record id in a shard: 128-bit XXH3 of the id, seeded with the
/// shard. Collisions are negligible (about 1e-20 for 1e9 ids), 16 bytes per record keep
/// the index in memory, and idempotency is decided per shard: a shard's replicas decide
/// from that shard's log alone, so the same record id under two shard keys is two
/// records.
pub fn id_key(shard: ShardId, id: &str) -> u128 {
    twox_hash::XxHash3_128::oneshot_with_seed(shard as u64, id.as_bytes())
}

/// The write path above storage (the node's Raft groups, `raft::groups`): when one is
/// installed, [`Storage::append`] and a bulk statement's commit hand their rows to it,
/// and they come back in log order as [`Storage::apply_rows`] and [`Storage::adopt`].
/// The trait lives here so that storage does not import the layer above it.
#[async_trait::async_trait]
pub trait Replicator: Send + Sync {
    /// Stores a validated statement's rows (in the table's schema).
    async fn append(&self, table: &TableDef, batches: Vec<RecordBatch>) -> Result<AppendOutcome>;
    /// Commits segment files that a large statement wrote (named by no manifest yet),
    /// with the index keys of their rows by shard; `present` rows were dropped as
    /// duplicates before the files were written.
    async fn adopt(&self, table: &TableDef, segments: Vec<SegmentMeta>, ids: ShardIds, present: u64) -> Result<AppendOutcome>;
}

/// What an append did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Rows stored by this append.
    pub added: u64,
    /// Rows skipped because their record id was already stored (or repeated in the batch).
    pub present: u64,
    /// Segments written.
    pub segments: u64,
    /// Per shard, the log index the append reached (read-your-writes).
    pub token: crate::write_token::WriteToken,
}

pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// The local directory behind `store`, when it is a local disk (for fsync).
    local_root: Option<PathBuf>,
    manifest_file: ManifestFile,
    current: RwLock<Arc<Manifest>>,
    commit_lock: tokio::sync::Mutex<()>,
    /// Per table, the [`id_key`]s of the stored rows.
    ids: Mutex<HashMap<String, IdSet>>,
    replicator: std::sync::OnceLock<std::sync::Weak<dyn Replicator>>,
    catalog: Arc<Catalog>,
    row_group_rows: usize,
    compaction_segments_min: usize,
    clock: Clock,
    /// Files replaced by compaction, deleted once queries that started before the
    /// replacement have had time to finish.
    pending_deletes: Mutex<Vec<(Instant, String)>>,
    /// Rows acknowledged but not yet in segments. Lock order: `current`, then `buffer`.
    buffer: RwLock<Arc<Buffered>>,
    /// `None` when the write buffer is off.
    wal: Mutex<Option<wal::Wal>>,
    /// Set on nodes that share another node's segment store: no writes, compaction
    /// or orphan removal here.
    read_only: bool,
    buffer_rows_max: usize,
    buffer_statement_rows_max: usize,
    flush_wanted: tokio::sync::Notify,
    /// The node's data directory (local files of the storage's users: Raft snapshots).
    data_dir: std::path::PathBuf,
}

/// The write buffer's content.
#[derive(Debug, Default)]
pub struct Buffered {
    pub tables: HashMap<String, Vec<BufferedBatch>>,
    pub rows: usize,
    /// When the oldest buffered row arrived.
    pub since: Option<Instant>,
    /// The applied state of each Raft group whose entries changed the buffer (opaque
    /// here), written into the manifest by the flush that stores those rows.
    pub groups: BTreeMap<ShardId, serde_json::Value>,
}

/// Rows of one table in the write buffer, with the shard they belong to when one
/// shard group's entry put them there (`None`: rows of several shards, from the
/// write-ahead log of a node without shard groups). A replicated cluster's fragment of
/// one shard reads that shard's buffered rows with its segments, from one replica.
#[derive(Debug, Clone)]
pub struct BufferedBatch {
    pub shard: Option<ShardId>,
    pub batch: RecordBatch,
}

/// Segment files written at once by one append.
const PUTS_IN_FLIGHT_MAX: usize = 8;

/// How long a replaced segment file stays readable.
const DELETE_GRACE: Duration = Duration::from_secs(60);

impl Storage {
    /// Opens the store: loads the manifest, records new tables' layouts, removes files
    /// that no manifest names, and rebuilds the record-id index.
    pub async fn open(cfg: &Config, catalog: Arc<Catalog>, clock: Clock) -> Result<Arc<Storage>> {
        Self::open_with(cfg, catalog, clock, true).await
    }

    /// [`Storage::open`]; with `remove_orphans` false, files no manifest names are left
    /// for [`Storage::remove_unnamed_files`] (the Raft groups' start, after they re-applied
    /// their logs: a committed entry may name files its apply had not yet committed).
    pub async fn open_with(cfg: &Config, catalog: Arc<Catalog>, clock: Clock, remove_orphans: bool) -> Result<Arc<Storage>> {
        // Reads of segments for queries go through the pipelines' own caches
        // (`pipeline::local`); storage itself writes, compacts and lists uncached.
        let (store, local_root) = open_object_store(cfg)?;
        let manifest_file = ManifestFile::new(&cfg.data_dir);
        let mut manifest = (*manifest_file.load()?).clone();
        let mut changed = false;
        for t in catalog.tables() {
            if manifest.layout(&t.name).is_none() {
                manifest.tables.push(TableLayout {
                    name: t.name.clone(),
                    shard_count: cfg.shard_count,
                    window_secs: cfg.segment_window_secs,
                });
                changed = true;
            }
        }
        if changed {
            manifest.version += 1;
            manifest_file.commit(&manifest)?;
        }
        let storage = Arc::new(Storage {
            data_dir: cfg.data_dir.clone(),
            store,
            local_root,
            manifest_file,
            current: RwLock::new(Arc::new(manifest)),
            commit_lock: tokio::sync::Mutex::new(()),
            ids: Mutex::new(HashMap::new()),
            replicator: std::sync::OnceLock::new(),
            catalog,
            row_group_rows: cfg.segment_row_group_rows,
            compaction_segments_min: cfg.compaction_segments_min.max(2),
            clock,
            pending_deletes: Mutex::new(Vec::new()),
            buffer: RwLock::new(Arc::default()),
            wal: Mutex::new(None),
            buffer_rows_max: cfg.write_buffer_rows_max,
            buffer_statement_rows_max: cfg.write_buffer_statement_rows_max.min(cfg.write_buffer_rows_max),
            flush_wanted: tokio::sync::Notify::new(),
            read_only: cfg.segment_store_read_only,
        });
        if storage.read_only {
            // The store belongs to another node: its files are not ours to judge.
            return Ok(storage);
        }
        if remove_orphans {
            storage.remove_orphans().await?;
        }
        storage.rebuild_index().await?;
        storage.recover_wal(&cfg.data_dir.join("meta").join("wal")).await?;
        Ok(storage)
    }

    /// Stores what the write-ahead logs of an earlier run hold (rows already in segments
    /// are skipped by the record-id index), then starts a new log if buffering is on.
    async fn recover_wal(&self, dir: &std::path::Path) -> Result<()> {
        let files = wal::Wal::existing(dir)?;
        let mut last = 0;
        for (seq, path) in &files {
            last = *seq;
            let (records, torn) = wal::Wal::read(path)?;
            if torn {
                tracing::warn!(path = %path.display(), "write-ahead log ends with a torn record (never acknowledged); ignoring it");
            }
            for (table, batch) in records {
                let tdef = self.catalog.get(&table).cloned().ok_or_else(|| {
                    Error::Corrupt(format!("write-ahead log {} names unknown table {table}", path.display()))
                })?;
                self.append_to_segments(&tdef, vec![batch]).await?;
            }
        }
        for (_, path) in &files {
            std::fs::remove_file(path)?;
        }
        if self.buffer_rows_max > 0 {
            *self.wal.lock() = Some(wal::Wal::create(dir, last + 1)?);
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(
                "this node only reads a shared segment store (segment_store_read_only); write through the node that owns it"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The committed manifest and the write buffer, as one consistent view.
    pub fn view(&self) -> (Arc<Manifest>, Arc<Buffered>) {
        let m = self.current.read();
        let b = self.buffer.read();
        (Arc::clone(&m), Arc::clone(&b))
    }

    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.store)
    }

    pub fn object_store_url() -> ObjectStoreUrl {
        ObjectStoreUrl::parse(SEGMENT_STORE_URL).expect("static url")
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The committed manifest; readers pin one value for a whole query.
    pub fn snapshot(&self) -> Arc<Manifest> {
        Arc::clone(&self.current.read())
    }

    pub fn layout(&self, table: &str) -> Result<TableLayout> {
        self.snapshot().layout(table).cloned().ok_or_else(|| Error::UndefinedTable(table.to_string()))
    }

    async fn remove_orphans(&self) -> Result<()> {
        let m = self.snapshot();
        let known: HashSet<&str> = m.segments.iter().map(|s| s.path.as_str()).collect();
        if let Some(root) = &self.local_root {
            // Walk the directory itself: object_store's listing hides its own staging
            // files (`name#N`), which a crash in the middle of a put leaves behind.
            let mut stack = vec![root.clone()];
            while let Some(dir) = stack.pop() {
                for entry in std::fs::read_dir(&dir)? {
                    let path = entry?.path();
                    if path.is_dir() {
                        stack.push(path);
                        continue;
                    }
                    let rel = path.strip_prefix(root).map(|p| p.to_string_lossy().to_string()).unwrap_or_default();
                    if !known.contains(rel.as_str()) {
                        tracing::info!(path = %rel, "removing segment file that no manifest names");
                        std::fs::remove_file(&path)?;
                    }
                }
            }
            return Ok(());
        }
        let listed: Vec<_> = self.store.list(None).try_collect().await?;
        for obj in listed {
            if !known.contains(obj.location.as_ref()) {
                tracing::info!(path = %obj.location, "removing segment file that no manifest names");
                self.store.delete(&obj.location).await?;
            }
        }
        Ok(())
    }

    async fn rebuild_index(&self) -> Result<()> {
        let m = self.snapshot();
        let mut ids: HashMap<String, IdSet> = HashMap::new();
        for t in self.catalog.tables() {
            let Some(key) = &t.idempotency_key else { continue };
            let set = ids.entry(t.name.clone()).or_default();
            let segs: Vec<&SegmentMeta> = m.segments_of(&t.name).collect();
            set.reserve(segs.iter().map(|s| s.rows as usize).sum());
            let mut reads = futures::stream::iter(
                segs.into_iter().map(|s| async move { (s, self.read_segment(s, Some(key.as_str())).await) }),
            )
            .buffer_unordered(8);
            while let Some((seg, batches)) = reads.next().await {
                match batches {
                    Ok(batches) => {
                        for b in batches {
                            let col = b.column(0).as_string::<i32>();
                            for i in 0..col.len() {
                                set.insert(id_key(seg.shard, col.value(i)));
                            }
                        }
                    }
                    // A damaged segment must not keep the node down: queries that
                    // touch it fail with XX001 and name it; its record ids are missing
                    // from the index until it is repaired (re-ingesting its rows would
                    // store them again).
                    Err(e) => tracing::error!(segment = seg.id, path = %seg.path, error = %e, "segment is unreadable"),
                }
            }
        }
        *self.ids.lock() = ids;
        Ok(())
    }

    /// The bytes of a segment file (a snapshot sent to a replica carries them).
    pub async fn segment_bytes(&self, seg: &SegmentMeta) -> Result<bytes::Bytes> {
        Ok(self.store.get(&ObjectPath::from(seg.path.as_str())).await?.bytes().await?)
    }

    /// Writes a segment file received in a snapshot, durably, before a manifest names
    /// it (`install_group`); a file of that name and size already there is kept.
    pub async fn put_segment_bytes(&self, seg: &SegmentMeta, bytes: Vec<u8>) -> Result<()> {
        self.check_writable()?;
        if let Ok(meta) = self.store.head(&ObjectPath::from(seg.path.as_str())).await {
            if meta.size == seg.bytes {
                return Ok(());
            }
        }
        self.put_durably(&seg.path, bytes).await
    }

    /// Reads a whole segment (optionally one column).
    #[allow(deprecated)]
    pub async fn read_segment(&self, seg: &SegmentMeta, column: Option<&str>) -> Result<Vec<RecordBatch>> {
        let reader = ParquetObjectReader::new(Arc::clone(&self.store), ObjectPath::from(seg.path.as_str()))
            .with_file_size(seg.bytes);
        let builder = ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .map_err(|e| Error::Corrupt(format!("segment {} ({}): {e}", seg.id, seg.path)))?;
        let builder = match column {
            Some(c) => {
                let idx = builder
                    .schema()
                    .index_of(c)
                    .map_err(|_| Error::Corrupt(format!("segment {} has no column {c}", seg.path)))?;
                let mask = ProjectionMask::roots(builder.parquet_schema(), [idx]);
                builder.with_projection(mask)
            }
            None => builder,
        };
        let stream = builder.build().map_err(|e| Error::Corrupt(format!("segment {}: {e}", seg.path)))?;
        stream.try_collect().await.map_err(|e| Error::Corrupt(format!("segment {}: {e}", seg.path)))
    }

    /// Stores `batches` (already validated, in the table's schema) atomically: after a
    /// crash either all of their new rows are visible or none. Small statements go to
    /// the write buffer (one fsynced log record); large ones straight to segments.
    pub async fn append(&self, table: &TableDef, batches: Vec<RecordBatch>) -> Result<AppendOutcome> {
        self.check_writable()?;
        if let Some(r) = self.replicator()? {
            return r.append(table, batches).await;
        }
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        if rows > self.buffer_statement_rows_max || self.buffer_rows_max == 0 {
            return self.append_to_segments(table, batches).await;
        }
        let _commit = self.commit_lock.lock().await;
        let (kept, new_ids, present) = self.dedupe(table, &batches)?;
        let mut outcome = AppendOutcome { present, ..Default::default() };
        let all = concat_batches(&table.schema, &kept)?;
        if all.num_rows() == 0 {
            return Ok(outcome);
        }
        let new_ids = new_ids.into_values().flatten();
        {
            let mut wal = self.wal.lock();
            let w = wal.as_mut().ok_or_else(|| Error::Internal("write buffer without a log".into()))?;
            w.append(&table.name, &all)?;
        }
        outcome.added = all.num_rows() as u64;
        let full = {
            let mut b = self.buffer.write();
            let mut next = Buffered {
                tables: b.tables.clone(),
                rows: b.rows + all.num_rows(),
                since: b.since.or_else(|| Some(Instant::now())),
                groups: b.groups.clone(),
            };
            push_buffered(next.tables.entry(table.name.clone()).or_default(), None, all)?;
            let full = next.rows >= self.buffer_rows_max;
            *b = Arc::new(next);
            full
        };
        self.ids.lock().entry(table.name.clone()).or_default().extend(new_ids);
        if full {
            self.flush_wanted.notify_one();
        }
        Ok(outcome)
    }

    /// Moves the write buffer into segments. Returns the rows flushed.
    pub async fn flush_buffer(&self) -> Result<usize> {
        let _commit = self.commit_lock.lock().await;
        self.flush_locked().await
    }

    /// [`Storage::flush_buffer`] under the commit lock; also writes the applied state
    /// of the Raft groups whose entries the buffer holds.
    async fn flush_locked(&self) -> Result<usize> {
        let buffered = Arc::clone(&self.buffer.read());
        if buffered.rows == 0 && buffered.groups.is_empty() {
            return Ok(0);
        }
        let base = self.snapshot();
        let mut next_id = base.next_segment_id;
        let mut new_segments = Vec::new();
        for (name, batches) in &buffered.tables {
            let tdef = self.catalog.get(name).cloned().ok_or_else(|| Error::UndefinedTable(name.clone()))?;
            let layout = self.layout(name)?;
            let all = concat_batches(&tdef.schema, batches.iter().map(|b| &b.batch))?;
            match self.write_segments(&tdef, &layout, &all, &mut next_id).await {
                Ok(segs) => new_segments.extend(segs),
                Err(e) => {
                    let paths: Vec<String> = new_segments.iter().map(|s: &SegmentMeta| s.path.clone()).collect();
                    self.delete_quietly(&paths).await;
                    return Err(e);
                }
            }
        }
        let mut next = (*base).clone();
        next.version += 1;
        next.next_segment_id = next_id;
        next.segments.extend(new_segments.iter().cloned());
        next.groups.extend(buffered.groups.iter().map(|(g, s)| (*g, s.clone())));
        // Manifest and buffer change in one step for readers.
        let committed = {
            let mut cur = self.current.write();
            let mut buf = self.buffer.write();
            match self.manifest_file.commit(&next) {
                Ok(()) => {
                    *cur = Arc::new(next);
                    *buf = Arc::default();
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        if let Err(e) = committed {
            let paths: Vec<String> = new_segments.iter().map(|s| s.path.clone()).collect();
            self.delete_quietly(&paths).await;
            return Err(e);
        }
        // The rows are in segments now; the log that held them can go.
        let old = self.wal.lock().as_mut().map(|w| w.rotate()).transpose()?;
        if let Some(old) = old {
            std::fs::remove_file(old)?;
        }
        Ok(buffered.rows)
    }

    /// Stores rows as new segments and commits them (the path of large statements and
    /// of write-ahead-log recovery).
    pub async fn append_to_segments(&self, table: &TableDef, batches: Vec<RecordBatch>) -> Result<AppendOutcome> {
        self.check_writable()?;
        let _commit = self.commit_lock.lock().await;
        let layout = self.layout(&table.name)?;
        let total: usize = batches.iter().map(|b| b.num_rows()).sum();
        if total == 0 {
            return Ok(AppendOutcome::default());
        }
        let (kept, new_ids, present) = self.dedupe(table, &batches)?;
        let mut outcome = AppendOutcome { present, ..Default::default() };
        if kept.iter().all(|b| b.num_rows() == 0) {
            return Ok(outcome);
        }
        let all = concat_batches(&table.schema, &kept)?;
        let base = self.snapshot();
        let mut next_id = base.next_segment_id;
        let new_segments = self.write_segments(table, &layout, &all, &mut next_id).await?;
        let written: Vec<String> = new_segments.iter().map(|s| s.path.clone()).collect();
        let mut next = (*base).clone();
        next.version += 1;
        next.next_segment_id = next_id;
        outcome.added = new_segments.iter().map(|s| s.rows).sum();
        outcome.segments = new_segments.len() as u64;
        next.segments.extend(new_segments);
        if let Err(e) = self.commit(next) {
            self.delete_quietly(&written).await;
            return Err(e);
        }
        if !new_ids.is_empty() {
            self.ids.lock().entry(table.name.clone()).or_default().extend(new_ids.into_values().flatten());
        }
        Ok(outcome)
    }

    /// Splits rows by (shard, window), sorts and encodes each group off the async
    /// runtime, and writes the files (not yet visible). On error, nothing is left behind.
    pub(crate) async fn write_segments(
        &self,
        table: &TableDef,
        layout: &TableLayout,
        all: &RecordBatch,
        next_id: &mut u64,
    ) -> Result<Vec<SegmentMeta>> {
        let groups = split_groups(table, layout, all)?;
        let now_us = self.clock.now_us();
        let parallel = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let row_group_rows = self.row_group_rows;
        let encoded: Vec<(GroupKey, RecordBatch, Vec<u8>)> = futures::stream::iter(groups.into_iter().map(|(key, rows)| {
            let tdef = self.catalog.get(&table.name).cloned();
            async move {
                let tdef = tdef.ok_or_else(|| Error::Internal("table vanished from the catalog".into()))?;
                tokio::task::spawn_blocking(move || -> Result<(GroupKey, RecordBatch, Vec<u8>)> {
                    let sorted = segment::sort_rows(&tdef, &rows)?;
                    let meta = [("shard", key.shard.to_string()), ("window_start_us", key.window_start_us.to_string())];
                    let bytes = segment::encode(&tdef, &sorted, row_group_rows, &meta)?;
                    Ok((key, sorted, bytes))
                })
                .await
                .map_err(|e| Error::Internal(format!("segment encoder panicked: {e}")))?
            }
        }))
        .buffer_unordered(parallel)
        .try_collect()
        .await?;
        let mut planned = Vec::with_capacity(encoded.len());
        for (key, sorted, bytes) in encoded {
            let (min_t, max_t) = time_bounds(table, &sorted)?;
            planned.push((
                SegmentMeta {
                    id: *next_id,
                    table: table.name.clone(),
                    shard: key.shard,
                    window_start_us: key.window_start_us,
                    window_end_us: key.window_start_us + layout.window_secs as i64 * 1_000_000,
                    path: segment_path(&table.name, key.shard, key.window_start_us, &uuid::Uuid::new_v4().to_string()),
                    rows: sorted.num_rows() as u64,
                    bytes: bytes.len() as u64,
                    min_time_us: min_t,
                    max_time_us: max_t,
                    created_at_us: now_us,
                    level: 0,
                },
                bytes,
            ));
            *next_id += 1;
        }
        let written: Vec<String> = planned.iter().map(|(m, _)| m.path.clone()).collect();
        let metas: Vec<SegmentMeta> = planned.iter().map(|(m, _)| m.clone()).collect();
        // Several files at once: each put ends with an fsync.
        let result: Result<Vec<()>> = futures::stream::iter(
            planned.into_iter().map(|(m, bytes)| async move { self.put_durably(&m.path, bytes).await }),
        )
        .buffer_unordered(PUTS_IN_FLIGHT_MAX)
        .try_collect()
        .await;
        if let Err(e) = result {
            self.delete_quietly(&written).await;
            return Err(e);
        }
        Ok(metas)
    }

    /// Installs the write path above storage (once; later calls are ignored).
    pub fn set_replicator(&self, r: std::sync::Weak<dyn Replicator>) {
        let _ = self.replicator.set(r);
    }

    /// The installed write path, if any; an error once it has shut down.
    pub(crate) fn replicator(&self) -> Result<Option<Arc<dyn Replicator>>> {
        match self.replicator.get() {
            None => Ok(None),
            Some(w) => w.upgrade().map(Some).ok_or_else(|| Error::ShardUnavailable {
                shard: 0,
                reason: "the node's Raft groups have shut down".into(),
            }),
        }
    }

    /// The applied state that the committed manifest holds for Raft group `group`.
    pub fn group_state(&self, group: ShardId) -> Option<serde_json::Value> {
        self.snapshot().groups.get(&group).cloned()
    }

    /// Applies one log entry of shard `group`: its rows (validated, in the table's
    /// schema, all of this shard) are deduplicated against the shard's stored ids and
    /// the new ones go to the write buffer (or, with the buffer off, to segments), with
    /// `state` (the group's applied state after this entry) kept beside them, so that
    /// the manifest commit that stores them also records how far the group got.
    /// Returns (rows stored, rows that were duplicates).
    pub async fn apply_rows(&self, group: ShardId, state: serde_json::Value, table: &TableDef, batch: RecordBatch) -> Result<(u64, u64)> {
        let _commit = self.commit_lock.lock().await;
        let (kept, new_ids, present) = self.dedupe(table, &[batch])?;
        let all = concat_batches(&table.schema, &kept)?;
        let n = all.num_rows();
        if self.buffer_rows_max == 0 && n > 0 {
            let layout = self.layout(&table.name)?;
            let base = self.snapshot();
            let mut next_id = base.next_segment_id;
            let segs = self.write_segments(table, &layout, &all, &mut next_id).await?;
            let written: Vec<String> = segs.iter().map(|s| s.path.clone()).collect();
            let mut next = (*base).clone();
            next.version += 1;
            next.next_segment_id = next_id;
            next.segments.extend(segs);
            next.groups.insert(group, state);
            if let Err(e) = self.commit(next) {
                self.delete_quietly(&written).await;
                return Err(e);
            }
        } else {
            let full = {
                let mut b = self.buffer.write();
                let mut next = Buffered {
                    tables: b.tables.clone(),
                    rows: b.rows + n,
                    since: if n > 0 { b.since.or_else(|| Some(Instant::now())) } else { b.since },
                    groups: b.groups.clone(),
                };
                if n > 0 {
                    push_buffered(next.tables.entry(table.name.clone()).or_default(), Some(group), all)?;
                }
                next.groups.insert(group, state);
                let full = next.rows >= self.buffer_rows_max.max(1);
                *b = Arc::new(next);
                full
            };
            if full {
                self.flush_wanted.notify_one();
            }
        }
        if n > 0 {
            self.ids.lock().entry(table.name.clone()).or_default().extend(new_ids.into_values().flatten());
        }
        Ok((n as u64, present))
    }

    /// Records the applied state of group `group` after an entry that stores nothing
    /// (a leader's blank entry, a membership change).
    pub async fn note_group(&self, group: ShardId, state: serde_json::Value) {
        let _commit = self.commit_lock.lock().await;
        let mut b = self.buffer.write();
        let mut next = Buffered { tables: b.tables.clone(), rows: b.rows, since: b.since, groups: b.groups.clone() };
        next.groups.insert(group, state);
        *b = Arc::new(next);
    }

    /// Applies a log entry of shard `group` that names segment files a large statement
    /// wrote (`ids`: the index keys of their rows). If any of those records was stored
    /// meanwhile by an earlier entry, the entry stores nothing and `None` is returned
    /// (the same on every replica: it is decided by log order); the writer then deletes
    /// its files. Otherwise the buffer is flushed first (so that the group's state in
    /// the manifest covers every earlier entry) and one manifest commit names the files
    /// and records `state`. Returns the rows stored.
    pub async fn adopt(
        &self,
        group: ShardId,
        state: serde_json::Value,
        table: &TableDef,
        segments: &[SegmentMeta],
        ids: &[u128],
    ) -> Result<Option<u64>> {
        let _commit = self.commit_lock.lock().await;
        let conflict = {
            let stored = self.ids.lock();
            stored.get(&table.name).is_some_and(|s| ids.iter().any(|h| s.contains(h)))
        };
        if conflict {
            drop(_commit);
            self.note_group(group, state).await;
            return Ok(None);
        }
        self.flush_locked().await?;
        let base = self.snapshot();
        let mut next = (*base).clone();
        next.version += 1;
        let mut rows = 0;
        for seg in segments {
            let mut seg = seg.clone();
            seg.id = next.next_segment_id;
            next.next_segment_id += 1;
            rows += seg.rows;
            next.segments.push(seg);
        }
        next.groups.insert(group, state);
        self.commit(next)?;
        if table.idempotency_key.is_some() {
            self.ids.lock().entry(table.name.clone()).or_default().extend(ids.iter().copied());
        }
        Ok(Some(rows))
    }

    /// Replaces shard `group`'s segments by those of a snapshot (files already in the
    /// shared segment store) and records `state`: how a lagging replica catches up.
    /// The shard's buffered rows are flushed first and then replaced with the rest; the
    /// index gains the snapshot's ids (a snapshot is a later state of the same log, so
    /// the ids it drops are none).
    pub async fn install_group(&self, group: ShardId, state: serde_json::Value, segments: Vec<SegmentMeta>) -> Result<()> {
        let _commit = self.commit_lock.lock().await;
        self.flush_locked().await?;
        let mut ids: HashMap<String, Vec<u128>> = HashMap::new();
        for seg in &segments {
            let Some(key) = self.catalog.get(&seg.table).and_then(|t| t.idempotency_key.clone()) else { continue };
            for b in self.read_segment(seg, Some(key.as_str())).await? {
                let col = b.column(0).as_string::<i32>();
                ids.entry(seg.table.clone()).or_default().extend((0..col.len()).map(|i| id_key(group, col.value(i))));
            }
        }
        let base = self.snapshot();
        let mut next = (*base).clone();
        next.version += 1;
        let replaced: Vec<String> = next.segments.iter().filter(|s| s.shard == group).map(|s| s.path.clone()).collect();
        next.segments.retain(|s| s.shard != group);
        let kept: HashSet<String> = segments.iter().map(|s| s.path.clone()).collect();
        for mut seg in segments {
            seg.id = next.next_segment_id;
            next.next_segment_id += 1;
            next.segments.push(seg);
        }
        next.groups.insert(group, state);
        self.commit(next)?;
        let mut stored = self.ids.lock();
        for (t, keys) in ids {
            stored.entry(t).or_default().extend(keys);
        }
        let at = Instant::now();
        self.pending_deletes.lock().extend(replaced.into_iter().filter(|p| !kept.contains(p)).map(|p| (at, p)));
        Ok(())
    }

    /// The committed segments of shard `group` (all tables): a snapshot's content.
    pub fn group_segments(&self, group: ShardId) -> Vec<SegmentMeta> {
        self.snapshot().segments.iter().filter(|s| s.shard == group).cloned().collect()
    }

    /// Flushes the buffer and returns the manifest that holds everything applied so
    /// far: what a Raft snapshot is built from.
    pub async fn flush_for_snapshot(&self) -> Result<Arc<Manifest>> {
        let _commit = self.commit_lock.lock().await;
        self.flush_locked().await?;
        Ok(self.snapshot())
    }

    /// Removes segment files that no manifest names (see [`Storage::open`]); the Raft
    /// groups call it again once they have re-applied their logs, since a committed
    /// entry may name files that its apply had not yet committed when the node stopped.
    pub async fn remove_unnamed_files(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _commit = self.commit_lock.lock().await;
        self.remove_orphans().await
    }

    /// What appending `batches` now would do (rows added / already present), storing
    /// nothing: for writes staged until the end of a multi-statement query.
    pub fn preview_append(&self, table: &TableDef, batches: &[RecordBatch]) -> Result<AppendOutcome> {
        let (kept, _, present) = self.dedupe(table, batches)?;
        Ok(AppendOutcome { added: kept.iter().map(|b| b.num_rows() as u64).sum(), present, ..Default::default() })
    }

    /// The rows of `batches` that are new (not stored, not repeated earlier in the
    /// batches), their index keys by shard, and how many rows were dropped.
    pub(crate) fn dedupe(&self, table: &TableDef, batches: &[RecordBatch]) -> Result<(Vec<RecordBatch>, ShardIds, u64)> {
        let mut seen = ShardIds::default();
        let (kept, present) = self.dedupe_into(table, batches, &mut seen)?;
        Ok((kept, seen, present))
    }

    /// Drops rows whose record id is stored already or is in `seen` (rows kept earlier
    /// in the same statement), adding the kept ids to `seen`. Returns the kept rows and
    /// how many were dropped.
    fn dedupe_into(&self, table: &TableDef, batches: &[RecordBatch], seen: &mut ShardIds) -> Result<(Vec<RecordBatch>, u64)> {
        let Some(key) = &table.idempotency_key else {
            return Ok((batches.to_vec(), 0));
        };
        let idx = table.column_index(key)?;
        let shard_idx = table.column_index(&table.shard_key)?;
        let shard_count = self.layout(&table.name)?.shard_count;
        let ids = self.ids.lock();
        let stored = ids.get(&table.name);
        let mut present = 0u64;
        let mut kept = Vec::with_capacity(batches.len());
        for b in batches {
            let col = b.column(idx).as_string::<i32>();
            let keys = b.column(shard_idx).as_string::<i32>();
            let mask: BooleanArray = (0..col.len())
                .map(|i| {
                    let shard = shard_of(keys.value(i), shard_count);
                    let h = id_key(shard, col.value(i));
                    let fresh = !stored.is_some_and(|s| s.contains(&h)) && seen.entry(shard).or_default().insert(h);
                    if !fresh {
                        present += 1;
                    }
                    Some(fresh)
                })
                .collect();
            kept.push(filter_record_batch(b, &mask)?);
        }
        Ok((kept, present))
    }

    fn commit(&self, next: Manifest) -> Result<()> {
        self.manifest_file.commit(&next)?;
        *self.current.write() = Arc::new(next);
        Ok(())
    }

    async fn put_durably(&self, path: &str, bytes: Vec<u8>) -> Result<()> {
        let location = ObjectPath::from(path);
        self.store.put(&location, PutPayload::from(bytes)).await?;
        if let Some(root) = &self.local_root {
            let file = root.join(path);
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                fsutil::sync_file(&file)?;
                match file.parent() {
                    Some(dir) => fsutil::sync_dir(dir),
                    None => Ok(()),
                }
            })
            .await
            .map_err(|e| Error::Internal(format!("fsync task panicked: {e}")))??;
        }
        Ok(())
    }

    pub(crate) async fn delete_quietly(&self, paths: &[String]) {
        for p in paths {
            if let Err(e) = self.store.delete(&ObjectPath::from(p.as_str())).await {
                tracing::warn!(path = %p, error = %e, "could not delete segment file");
            }
        }
    }

    /// One compaction pass: every (table, shard, window) with at least
    /// `compaction_segments_min` segments is rewritten as one segment. Returns how many
    /// groups were compacted.
    pub async fn compact_once(&self, groups_max: usize) -> Result<usize> {
        if self.read_only {
            return Ok(0);
        }
        self.delete_expired().await;
        let m = self.snapshot();
        let mut groups: BTreeMap<(String, ShardId, i64), Vec<SegmentMeta>> = BTreeMap::new();
        for s in &m.segments {
            groups.entry((s.table.clone(), s.shard, s.window_start_us)).or_default().push(s.clone());
        }
        let mut done = 0;
        for ((table, _, _), segs) in groups {
            if done >= groups_max {
                break;
            }
            if segs.len() < self.compaction_segments_min {
                continue;
            }
            let tdef = self.catalog.get(&table).cloned().ok_or_else(|| Error::UndefinedTable(table.clone()))?;
            let layout = self.layout(&table)?;
            let mut batches = Vec::new();
            for s in &segs {
                batches.extend(self.read_segment(s, None).await?);
            }
            let all = concat_batches(&tdef.schema, &batches)?;
            // The inputs share one shard and window, so this writes one segment; its id
            // and level are set at the commit below.
            let mut ids_unused = 0;
            let outputs = self.write_segments(&tdef, &layout, &all, &mut ids_unused).await?;
            let paths: Vec<String> = outputs.iter().map(|s| s.path.clone()).collect();
            let _commit = self.commit_lock.lock().await;
            let base = self.snapshot();
            let inputs: HashSet<u64> = segs.iter().map(|s| s.id).collect();
            if base.segments.iter().filter(|s| inputs.contains(&s.id)).count() != inputs.len() {
                // Someone else replaced an input meanwhile; drop our output.
                self.delete_quietly(&paths).await;
                continue;
            }
            let level = segs.iter().map(|s| s.level).max().unwrap_or(0) + 1;
            let mut next = (*base).clone();
            next.segments.retain(|s| !inputs.contains(&s.id));
            for mut out in outputs {
                out.id = next.next_segment_id;
                out.level = level;
                next.next_segment_id += 1;
                next.segments.push(out);
            }
            next.version += 1;
            if let Err(e) = self.commit(next) {
                self.delete_quietly(&paths).await;
                return Err(e);
            }
            let at = Instant::now();
            self.pending_deletes.lock().extend(segs.iter().map(|s| (at, s.path.clone())));
            done += 1;
        }
        Ok(done)
    }

    async fn delete_expired(&self) {
        let expired: Vec<String> = {
            let mut pending = self.pending_deletes.lock();
            let now = Instant::now();
            let (old, keep): (Vec<_>, Vec<_>) = pending.drain(..).partition(|(at, _)| now.duration_since(*at) >= DELETE_GRACE);
            *pending = keep;
            old.into_iter().map(|(_, p)| p).collect()
        };
        self.delete_quietly(&expired).await;
    }
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage").field("manifest_version", &self.snapshot().version).finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct GroupKey {
    shard: ShardId,
    window_start_us: i64,
}

fn split_groups(table: &TableDef, layout: &TableLayout, batch: &RecordBatch) -> Result<Vec<(GroupKey, RecordBatch)>> {
    let keys = batch.column(table.column_index(&table.shard_key)?).as_string::<i32>();
    let times = batch
        .column(table.column_index(&table.time_column)?)
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .ok_or_else(|| Error::Internal("time column is not timestamp(us)".into()))?;
    let window_us = layout.window_secs as i64 * 1_000_000;
    let mut groups: BTreeMap<GroupKey, Vec<u32>> = BTreeMap::new();
    for i in 0..batch.num_rows() {
        let key = GroupKey {
            shard: shard_of(keys.value(i), layout.shard_count),
            window_start_us: times.value(i).div_euclid(window_us) * window_us,
        };
        groups.entry(key).or_default().push(i as u32);
    }
    groups
        .into_iter()
        .map(|(k, rows)| Ok((k, take_record_batch(batch, &UInt32Array::from(rows))?)))
        .collect()
}

fn time_bounds(table: &TableDef, batch: &RecordBatch) -> Result<(i64, i64)> {
    let times = batch
        .column(table.column_index(&table.time_column)?)
        .as_any()
        .downcast_ref::<TimestampMicrosecondArray>()
        .ok_or_else(|| Error::Internal("time column is not timestamp(us)".into()))?;
    let min = datafusion::arrow::compute::min(times).unwrap_or(0);
    let max = datafusion::arrow::compute::max(times).unwrap_or(0);
    Ok((min, max))
}

/// Buffered batches smaller than this absorb the next one: many small statements
/// make a few batches of useful size (cheaper to copy on each write, and to scan).
const BUFFER_BATCH_MERGE_ROWS: usize = 4096;
/// How many of the latest buffered batches a new part may be merged into.
const BUFFER_MERGE_LOOKBACK: usize = 64;

/// Adds `batch` to a table's buffered batches, merged into the last one while that
/// is small.
fn push_buffered(batches: &mut Vec<BufferedBatch>, shard: Option<ShardId>, batch: RecordBatch) -> Result<()> {
    // Merged into the latest small batch of the same shard (looking back a few
    // batches: parts of many shards interleave), so that scans see few batches.
    let recent = batches.len().saturating_sub(BUFFER_MERGE_LOOKBACK);
    match batches[recent..].iter_mut().rev().find(|b| b.shard == shard) {
        Some(last) if last.batch.num_rows() < BUFFER_BATCH_MERGE_ROWS => {
            last.batch = concat_batches(&batch.schema(), [&last.batch, &batch])?;
        }
        _ => batches.push(BufferedBatch { shard, batch }),
    }
    Ok(())
}

fn segment_path(table: &str, shard: ShardId, window_start_us: i64, unique: &str) -> String {
    let day = chrono::DateTime::from_timestamp_micros(window_start_us)
        .map(|t| t.format("%Y-%m-%dT%H").to_string())
        .unwrap_or_else(|| window_start_us.to_string());
    format!("{table}/shard-{shard:05}/{day}/{unique}.parquet")
}

/// The segment store from configuration: a local directory by default, or a URL.
fn open_object_store(cfg: &Config) -> Result<(Arc<dyn ObjectStore>, Option<PathBuf>)> {
    let local = |dir: PathBuf| -> Result<(Arc<dyn ObjectStore>, Option<PathBuf>)> {
        std::fs::create_dir_all(&dir)?;
        let dir = dir.canonicalize()?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)?;
        Ok((Arc::new(store), Some(dir)))
    };
    match &cfg.object_store_url {
        None => local(cfg.data_dir.join("segments")),
        Some(url) => {
            let parsed = url::Url::parse(url).map_err(|e| Error::Config(format!("object_store_url {url:?}: {e}")))?;
            match parsed.scheme() {
                "file" => local(PathBuf::from(parsed.path())),
                "s3" | "s3a" => {
                    let store = object_store::aws::AmazonS3Builder::from_env().with_url(url.as_str()).build()?;
                    let prefix = parsed.path().trim_matches('/');
                    if prefix.is_empty() {
                        Ok((Arc::new(store), None))
                    } else {
                        Ok((Arc::new(object_store::prefix::PrefixStore::new(store, prefix)), None))
                    }
                }
                other => Err(Error::Config(format!("object_store_url: unsupported scheme {other:?} (use file:// or s3://)"))),
            }
        }
    }
}

/// Flushes the write buffer when it is full or its oldest row is `interval` old.
pub fn spawn_buffer_flusher(storage: Arc<Storage>, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tick = (interval / 4).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = storage.flush_wanted.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
            let due = {
                let b = storage.buffer.read();
                b.rows >= storage.buffer_rows_max.max(1) || b.since.is_some_and(|t| t.elapsed() >= interval)
            };
            if due {
                if let Err(e) = storage.flush_buffer().await {
                    tracing::warn!(error = %e, "write buffer flush failed; will retry");
                }
            }
        }
    })
}

/// Keeps compacting in the background until the returned handle is dropped.
pub fn spawn_compactor(storage: Arc<Storage>, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match storage.compact_once(4).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(groups = n, "compacted segments"),
                Err(e) => tracing::warn!(error = %e, "compaction failed; will retry"),
            }
        }
    })
}
