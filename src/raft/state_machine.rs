//! A shard group's state machine: applies [`Command`]s in log order into storage, so
//! that every replica of the shard stores the same rows whatever was re-sent.
//!
//! Owns: the group's applied state (last applied log id and membership) and its
//! snapshots. The applied state travels with the rows: each apply hands it to storage
//! beside the rows it stored (`Storage::apply_rows`, `adopt`, `note_group`), and the
//! manifest commit that makes those rows durable (a flush, an adopted file) records it
//! too. So after a crash the group's state is the manifest's, the write buffer it had
//! is gone, and openraft re-applies the committed entries after it from the log, which
//! rebuilds the buffer: the log is the write-ahead log. While a part of several
//! entries is open ([`super::parts`]), the state handed to storage is the one from
//! before the part began, so that a restart re-applies the log from there and stages
//! the part again; the entries re-applied after it find their records stored and
//! count them as duplicates, alike on every replica.
//!
//! A snapshot is the shard's committed segment list at a flush (taken so that it holds
//! everything applied), with the state it reflects, and — when replicas have their own
//! segment stores — the files' bytes; installing one writes the files it carries and
//! then adopts them in one manifest commit. openraft sends it to a peer in chunks of
//! `snapshot_max_chunk_size`. A snapshot is a file under `raft/snapshots/` (written and
//! read a segment at a time, so its size is bounded by the disk, not by memory); the
//! files of an earlier run are removed at start, and openraft builds a new one when a
//! peer needs it.
//!
//! Must never: decide a record's fate other than by log order (the first entry that
//! carries a record id stores it; later ones count it as a duplicate), or record an
//! applied state in the manifest ahead of the rows it covers or inside an open part.

use std::io::{Cursor, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::ipc::reader::StreamReader;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogId, StoredMembership};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use serde::{Deserialize, Serialize};

use super::parts::{Staged, Staging};
use super::{decode_ids, io_error, Applied, Command, ShardGroup, StorageError};
use crate::shard_map::ShardId;
use crate::storage::manifest::SegmentMeta;
use crate::storage::Storage;

/// The applied state of a shard group, as the manifest keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    pub applied: Option<LogId<u64>>,
    pub membership: StoredMembership<u64, BasicNode>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

fn sm_error(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    io_error(ErrorSubject::StateMachine, verb, Failed(e.to_string()))
}

/// A snapshot file: `TMS1`, the header's length (u64, little-endian), the header
/// (CBOR), then, if the header says so, the segments' bytes one after the other.
const SNAPSHOT_MAGIC: &[u8; 4] = b"TMS1";
/// A header longer than this is not a header (a segment list of millions of files).
const SNAPSHOT_HEADER_BYTES_MAX: u64 = 256 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotHeader {
    state: GroupState,
    segments: Vec<SegmentMeta>,
    /// The segments' bytes follow (replicas do not share the segment store).
    files: bool,
}

fn snapshot_dir(storage: &Storage) -> PathBuf {
    storage.data_dir().join("raft").join("snapshots")
}

/// Removes the snapshot files of an earlier run (at start, before any group opens: a
/// new snapshot is built when a peer needs one).
pub fn remove_snapshot_files(storage: &Storage) {
    let _ = std::fs::remove_dir_all(snapshot_dir(storage));
}

async fn create_file(path: &Path) -> std::io::Result<tokio::fs::File> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    tokio::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).await
}

/// The state machine of one shard group. Clones share it (the snapshot builder is one).
#[derive(Clone)]
pub struct StateMachine {
    storage: Arc<Storage>,
    group: ShardId,
    state: Arc<Mutex<GroupState>>,
    /// The latest snapshot built or installed, and its file.
    current: Arc<Mutex<Option<(SnapshotMeta<u64, BasicNode>, PathBuf)>>>,
    /// The file a snapshot from the leader is being received into.
    receiving: Arc<Mutex<Option<PathBuf>>>,
    built: Arc<std::sync::atomic::AtomicU64>,
    /// Snapshots carry the segment files (replicas have their own stores).
    carry_files: bool,
    /// Parts of several entries not complete yet.
    staging: Arc<Mutex<Staging<RecordBatch, GroupState>>>,
    /// The clock of `staging` (milliseconds since this started; local to this replica).
    epoch: std::time::Instant,
}

impl StateMachine {
    /// The state machine of shard `group`, at the state the committed manifest records.
    pub fn open(storage: Arc<Storage>, group: ShardId) -> Result<StateMachine, StorageError> {
        let state = match storage.group_state(group) {
            Some(v) => serde_json::from_value(v).map_err(|e| sm_error(ErrorVerb::Read, e))?,
            None => GroupState::default(),
        };
        Ok(StateMachine {
            storage,
            group,
            state: Arc::new(Mutex::new(state)),
            current: Arc::new(Mutex::new(None)),
            receiving: Arc::default(),
            built: Arc::default(),
            carry_files: false,
            staging: Arc::default(),
            epoch: std::time::Instant::now(),
        })
    }

    /// Makes snapshots carry the segment files, for replicas that do not share the
    /// segment store.
    pub fn carrying_files(mut self, carry: bool) -> StateMachine {
        self.carry_files = carry;
        self
    }

    /// A copy of the applied state.
    pub fn state(&self) -> GroupState {
        self.state.lock().clone()
    }

    /// Makes `path` the current snapshot's file (and removes the one before it: a peer
    /// still reading it keeps its open handle).
    async fn keep_current(&self, meta: SnapshotMeta<u64, BasicNode>, path: PathBuf) {
        let old = self.current.lock().replace((meta, path.clone()));
        if let Some((_, old)) = old.filter(|(_, p)| *p != path) {
            let _ = tokio::fs::remove_file(old).await;
        }
    }

    /// Parts (open, entries held) waiting for their last entry.
    pub fn staged(&self) -> (usize, usize) {
        self.staging.lock().held()
    }

    /// Parts whose latest entry this replica applied more than `max_ms` ago.
    pub fn idle_parts(&self, max_ms: u64) -> Vec<u64> {
        self.staging.lock().idle(self.now_ms(), max_ms)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn table(&self, name: &str) -> Result<Arc<crate::catalog::TableDef>, StorageError> {
        self.storage.catalog().get(name).cloned().ok_or_else(|| sm_error(ErrorVerb::Read, format!("log entry names unknown table {name}")))
    }

    fn decode_rows(&self, table: &str, rows: &[u8]) -> Result<(Arc<crate::catalog::TableDef>, RecordBatch), StorageError> {
        let tdef = self.table(table)?;
        let reader = StreamReader::try_new(Cursor::new(rows), None).map_err(|e| sm_error(ErrorVerb::Read, e))?;
        let batches = reader.collect::<Result<Vec<_>, _>>().map_err(|e| sm_error(ErrorVerb::Read, e))?;
        let batch = concat_batches(&tdef.schema, &batches).map_err(|e| sm_error(ErrorVerb::Read, e))?;
        Ok((tdef, batch))
    }

    /// Applies an entry of a part of several entries: held until its last entry, which
    /// stores the whole part (`state`: the group's state before this entry, `next`:
    /// after it).
    async fn apply_part(&self, id: LogId<u64>, cmd: &Command, state: &GroupState, next: &GroupState) -> Result<Applied, StorageError> {
        let Command::Rows { table, rows, part: Some(part) } = cmd else { unreachable!("apply_part takes parts") };
        let (tdef, batch) = self.decode_rows(table, rows)?;
        let staged = self.staging.lock().stage(*part, id.leader_id.term, id.index, state, batch, self.now_ms());
        match staged {
            Staged::Held => Ok(Applied::default()),
            Staged::Complete(batches) => {
                let all = concat_batches(&tdef.schema, &batches).map_err(|e| sm_error(ErrorVerb::Read, e))?;
                let value = self.durable_state(next)?;
                let (stored, duplicates) =
                    self.storage.apply_rows(self.group, value, &tdef, all).await.map_err(|e| sm_error(ErrorVerb::Write, e))?;
                Ok(Applied { stored, duplicates, ..Default::default() })
            }
            Staged::Broken => {
                self.storage.note_group(self.group, self.durable_state(next)?).await;
                Ok(Applied { aborted: true, ..Default::default() })
            }
        }
    }

    /// The state to record with what an entry stores: `next`, or, while parts are
    /// open, the state from before the earliest of them (so that a restart re-applies
    /// the log from there and stages them again).
    fn durable_state(&self, next: &GroupState) -> Result<serde_json::Value, StorageError> {
        let staging = self.staging.lock();
        serde_json::to_value(staging.safe().unwrap_or(next)).map_err(|e| sm_error(ErrorVerb::Write, e))
    }

    async fn apply_command(&self, cmd: &Command, state: serde_json::Value) -> Result<Applied, StorageError> {
        let write = |e: crate::error::Error| sm_error(ErrorVerb::Write, e);
        match cmd {
            Command::Rows { table, rows, .. } => {
                let (tdef, batch) = self.decode_rows(table, rows)?;
                let (stored, duplicates) = self.storage.apply_rows(self.group, state, &tdef, batch).await.map_err(write)?;
                Ok(Applied { stored, duplicates, ..Default::default() })
            }
            Command::Abort { .. } => {
                self.storage.note_group(self.group, state).await;
                Ok(Applied::default())
            }
            Command::Adopt { table, segments, ids } => {
                let tdef = self.table(table)?;
                match self.storage.adopt(self.group, state, &tdef, segments, &decode_ids(ids)).await.map_err(write)? {
                    Some(stored) => Ok(Applied { stored, ..Default::default() }),
                    None => Ok(Applied { refused: true, ..Default::default() }),
                }
            }
        }
    }
}

impl RaftSnapshotBuilder<ShardGroup> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<ShardGroup>, StorageError> {
        // The flush makes everything applied so far durable; the manifest it commits
        // holds the group's state and segments as of that moment.
        let manifest = self.storage.flush_for_snapshot().await.map_err(|e| sm_error(ErrorVerb::Write, e))?;
        let state: GroupState = match manifest.groups.get(&self.group) {
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| sm_error(ErrorVerb::Read, e))?,
            None => GroupState::default(),
        };
        let segments: Vec<SegmentMeta> = manifest.segments.iter().filter(|s| s.shard == self.group).cloned().collect();
        let n = self.built.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let id = match state.applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, n),
            None => format!("none-{n}"),
        };
        let meta = SnapshotMeta { last_log_id: state.applied, last_membership: state.membership.clone(), snapshot_id: id.clone() };
        // Written to a file, a segment at a time: a snapshot's size is bounded by the
        // disk, not by memory; openraft sends it to a peer in chunks read from it.
        let write = |e: std::io::Error| sm_error(ErrorVerb::Write, e);
        let path = snapshot_dir(&self.storage).join(format!("g{}-{id}.snap", self.group));
        let mut f = create_file(&path).await.map_err(write)?;
        let header = SnapshotHeader { state, segments, files: self.carry_files };
        let bytes = super::network::to_cbor(&header).map_err(|e| sm_error(ErrorVerb::Write, e))?;
        f.write_all(SNAPSHOT_MAGIC).await.map_err(write)?;
        f.write_all(&(bytes.len() as u64).to_le_bytes()).await.map_err(write)?;
        f.write_all(&bytes).await.map_err(write)?;
        if header.files {
            for seg in &header.segments {
                let b = self.storage.segment_bytes(seg).await.map_err(|e| sm_error(ErrorVerb::Read, e))?;
                if b.len() as u64 != seg.bytes {
                    return Err(sm_error(ErrorVerb::Read, format!("segment {} has {} bytes, its manifest says {}", seg.path, b.len(), seg.bytes)));
                }
                f.write_all(&b).await.map_err(write)?;
            }
        }
        f.flush().await.map_err(write)?;
        f.seek(SeekFrom::Start(0)).await.map_err(write)?;
        self.keep_current(meta.clone(), path).await;
        Ok(Snapshot { meta, snapshot: Box::new(f) })
    }
}

impl RaftStateMachine<ShardGroup> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError> {
        let s = self.state.lock();
        Ok((s.applied, s.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry<ShardGroup>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        for e in entries {
            let id = *e.get_log_id();
            self.staging.lock().before_entry(id.leader_id.term, id.index);
            let before = self.state.lock().clone();
            let next = {
                let mut s = before.clone();
                s.applied = Some(id);
                if let EntryPayload::Membership(m) = &e.payload {
                    s.membership = StoredMembership::new(Some(id), m.clone());
                }
                s
            };
            let mut applied = match &e.payload {
                EntryPayload::Normal(cmd @ Command::Rows { part: Some(_), .. }) => self.apply_part(id, cmd, &before, &next).await?,
                EntryPayload::Normal(cmd) => {
                    if let Command::Abort { part } = cmd {
                        self.staging.lock().abort(*part);
                    }
                    self.apply_command(cmd, self.durable_state(&next)?).await?
                }
                EntryPayload::Blank | EntryPayload::Membership(_) => {
                    self.storage.note_group(self.group, self.durable_state(&next)?).await;
                    Applied::default()
                }
            };
            *self.state.lock() = next;
            applied.index = id.index;
            out.push(applied);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let n = self.built.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let path = snapshot_dir(&self.storage).join(format!("g{}-recv-{n}.part", self.group));
        let f = create_file(&path).await.map_err(|e| io_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        // A receive that never finished leaves its file: only the latest is kept.
        if let Some(old) = self.receiving.lock().replace(path) {
            let _ = std::fs::remove_file(old);
        }
        Ok(Box::new(f))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<u64, BasicNode>, snapshot: Box<tokio::fs::File>) -> Result<(), StorageError> {
        let sig = Some(meta.signature());
        let bad = |why: String| io_error(ErrorSubject::Snapshot(sig.clone()), ErrorVerb::Read, Failed(why));
        let mut f = *snapshot;
        f.seek(SeekFrom::Start(0)).await.map_err(|e| bad(e.to_string()))?;
        let mut magic = [0u8; 4];
        let mut len = [0u8; 8];
        f.read_exact(&mut magic).await.map_err(|e| bad(format!("snapshot header: {e}")))?;
        f.read_exact(&mut len).await.map_err(|e| bad(format!("snapshot header: {e}")))?;
        let len = u64::from_le_bytes(len);
        if &magic != SNAPSHOT_MAGIC || len > SNAPSHOT_HEADER_BYTES_MAX {
            return Err(bad("not a snapshot of a shard group".into()));
        }
        let mut bytes = vec![0u8; len as usize];
        f.read_exact(&mut bytes).await.map_err(|e| bad(format!("snapshot header: {e}")))?;
        let header: SnapshotHeader = super::network::from_cbor(&bytes).map_err(|e| bad(e.to_string()))?;
        if header.files {
            // The header's sizes are checked against the file before anything is
            // allocated or written: a truncated or lying snapshot installs nothing.
            let size = f.metadata().await.map_err(|e| bad(e.to_string()))?.len();
            let declared = header.segments.iter().try_fold(0u64, |a, s| a.checked_add(s.bytes));
            if declared.is_none_or(|d| 12 + len + d != size) {
                return Err(bad(format!("snapshot file holds {size} bytes, not what its header declares")));
            }
            // One segment in memory at a time.
            for seg in &header.segments {
                let mut b = vec![0u8; seg.bytes as usize];
                f.read_exact(&mut b).await.map_err(|_| bad(format!("snapshot file {} is truncated", seg.path)))?;
                self.storage
                    .put_segment_bytes(seg, b)
                    .await
                    .map_err(|e| io_error(ErrorSubject::Snapshot(sig.clone()), ErrorVerb::Write, Failed(e.to_string())))?;
            }
        }
        let state = GroupState { applied: meta.last_log_id, membership: meta.last_membership.clone() };
        let value = serde_json::to_value(&state).map_err(|e| sm_error(ErrorVerb::Write, e))?;
        self.storage
            .install_group(self.group, value, header.segments)
            .await
            .map_err(|e| io_error(ErrorSubject::Snapshot(sig.clone()), ErrorVerb::Write, Failed(e.to_string())))?;
        *self.state.lock() = state;
        // The entries after the snapshot are applied again from its state on.
        self.staging.lock().clear();
        // The received file is this replica's current snapshot now.
        let kept = snapshot_dir(&self.storage).join(format!("g{}-{}.snap", self.group, meta.snapshot_id));
        let received = self.receiving.lock().take();
        let kept_ok = match received {
            Some(from) => tokio::fs::rename(&from, &kept).await.is_ok(),
            None => {
                // Not received here (handed in whole): copied.
                let copied = async {
                    f.seek(SeekFrom::Start(0)).await?;
                    let mut to = create_file(&kept).await?;
                    tokio::io::copy(&mut f, &mut to).await?;
                    to.flush().await
                };
                copied.await.is_ok()
            }
        };
        if kept_ok {
            self.keep_current(meta.clone(), kept).await;
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<ShardGroup>>, StorageError> {
        let cur = self.current.lock().clone();
        let Some((meta, path)) = cur else { return Ok(None) };
        // Each reader its own handle (two peers may be sent it at once).
        match tokio::fs::File::open(&path).await {
            Ok(f) => Ok(Some(Snapshot { meta, snapshot: Box::new(f) })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Read, e)),
        }
    }

}
