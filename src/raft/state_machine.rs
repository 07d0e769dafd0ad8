//! A shard group's state machine: applies [`Command`]s in log order and keeps the
//! decision of which rows are new, so that every replica of the shard stores the same
//! rows whatever was re-sent.
//!
//! Owns: the shard's applied state (last applied log id, membership, the record ids
//! stored, the accepted batches) and its snapshots: the whole state as JSON, written
//! durably (`snapshot.json`, temp file + rename + fsync) when built or installed.
//! After a crash the state is the last snapshot's, and openraft re-applies the
//! committed entries after it from the log (the log store keeps the committed id).
//! Must never: decide a record's fate other than by log order (the first entry that
//! carries a record id stores it; later ones count it as a duplicate).
//!
//! Not yet: applying into the node's write buffer and segments (then the state becomes
//! the segment manifest, and a snapshot the manifest plus its files, sent in chunks).
//! Until then the accepted batches live here, in memory and in snapshots.

use std::collections::BTreeSet;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogId, StoredMembership};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{io_error, Applied, Command, ShardGroup, StorageError};

/// One accepted Append: its rows as sent, and which of them were stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBatch {
    pub index: u64,
    pub rows: Vec<u8>,
    pub stored: Vec<bool>,
}

/// The applied state of a shard group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardState {
    pub applied: Option<LogId<u64>>,
    pub membership: StoredMembership<u64, BasicNode>,
    pub record_ids: BTreeSet<String>,
    pub batches: Vec<StoredBatch>,
}

impl ShardState {
    /// Applies one command at `index`.
    fn apply(&mut self, index: u64, cmd: &Command) -> Applied {
        match cmd {
            Command::Append { record_ids, rows } => {
                let stored: Vec<bool> = record_ids.iter().map(|id| self.record_ids.insert(id.clone())).collect();
                let n = stored.iter().filter(|s| **s).count() as u64;
                let out = Applied { stored: n, duplicates: stored.len() as u64 - n };
                if n > 0 {
                    self.batches.push(StoredBatch { index, rows: rows.clone(), stored });
                }
                out
            }
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<u64, BasicNode>,
    state: ShardState,
}

struct Inner {
    state: ShardState,
    dir: PathBuf,
    current: Option<(SnapshotMeta<u64, BasicNode>, Vec<u8>)>,
    built: u64,
}

/// The state machine of one shard group. Clones share it (the snapshot builder is one).
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<Inner>>,
}

fn sm_read(e: impl std::error::Error + 'static) -> StorageError {
    io_error(ErrorSubject::StateMachine, ErrorVerb::Read, e)
}

fn snapshot_write(e: impl std::error::Error + 'static) -> StorageError {
    io_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, e)
}

impl StateMachine {
    /// Opens the state machine kept in `dir`: the state of its last snapshot, if any.
    pub fn open(dir: &Path) -> Result<StateMachine, StorageError> {
        std::fs::create_dir_all(dir).map_err(snapshot_write)?;
        let path = dir.join("snapshot.json");
        let (state, current) = match std::fs::read(&path) {
            Ok(bytes) => {
                let f: SnapshotFile = serde_json::from_slice(&bytes).map_err(sm_read)?;
                let data = serde_json::to_vec(&f.state).map_err(sm_read)?;
                (f.state, Some((f.meta, data)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (ShardState::default(), None),
            Err(e) => return Err(sm_read(e)),
        };
        Ok(StateMachine { inner: Arc::new(Mutex::new(Inner { state, dir: dir.to_path_buf(), current, built: 0 })) })
    }

    /// A copy of the applied state.
    pub fn state(&self) -> ShardState {
        self.inner.lock().state.clone()
    }

    /// Makes `state` under `meta` the current snapshot, durably.
    fn keep(inner: &mut Inner, meta: SnapshotMeta<u64, BasicNode>, state: &ShardState) -> Result<Vec<u8>, StorageError> {
        let file = SnapshotFile { meta: meta.clone(), state: state.clone() };
        let bytes = serde_json::to_vec(&file).map_err(snapshot_write)?;
        crate::fsutil::write_file_durably(&inner.dir.join("snapshot.json"), &bytes).map_err(snapshot_write)?;
        let data = serde_json::to_vec(state).map_err(snapshot_write)?;
        inner.current = Some((meta, data.clone()));
        Ok(data)
    }
}

impl RaftSnapshotBuilder<ShardGroup> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<ShardGroup>, StorageError> {
        let mut inner = self.inner.lock();
        inner.built += 1;
        let state = inner.state.clone();
        let id = match state.applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, inner.built),
            None => format!("none-{}", inner.built),
        };
        let meta = SnapshotMeta { last_log_id: state.applied, last_membership: state.membership.clone(), snapshot_id: id };
        let data = Self::keep(&mut inner, meta.clone(), &state)?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<ShardGroup> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError> {
        let inner = self.inner.lock();
        Ok((inner.state.applied, inner.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry<ShardGroup>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.inner.lock();
        let mut out = Vec::new();
        for e in entries {
            let id = *e.get_log_id();
            inner.state.applied = Some(id);
            out.push(match &e.payload {
                EntryPayload::Blank => Applied::default(),
                EntryPayload::Normal(cmd) => inner.state.apply(id.index, cmd),
                EntryPayload::Membership(m) => {
                    inner.state.membership = StoredMembership::new(Some(id), m.clone());
                    Applied::default()
                }
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<u64, BasicNode>, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), StorageError> {
        let sig = Some(meta.signature());
        let mut state: ShardState = serde_json::from_slice(snapshot.get_ref())
            .map_err(|e| io_error(ErrorSubject::Snapshot(sig), ErrorVerb::Read, e))?;
        state.applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        let mut inner = self.inner.lock();
        Self::keep(&mut inner, meta.clone(), &state)?;
        inner.state = state;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<ShardGroup>>, StorageError> {
        let inner = self.inner.lock();
        Ok(inner.current.as_ref().map(|(meta, data)| Snapshot { meta: meta.clone(), snapshot: Box::new(Cursor::new(data.clone())) }))
    }
}
