//! The Raft logs of a node's shard groups, their votes and committed ids, durable in
//! one redb file with group commit.
//!
//! Owns: the file `raft/log.redb`: table `log` ((group, index) -> entry, CBOR) and table
//! `meta` ((group, name) -> JSON: vote, committed, last purged). Every write goes to one
//! writer thread, which takes all the writes waiting at that moment (of every group)
//! into one redb transaction and one fsync: many groups appending at once cost one
//! disk flush, not one each. A group's call returns once its transaction committed, so
//! an entry is readable and durable when `append` returns.
//!
//! Must never: report an append, a vote or a truncation done before redb's commit made
//! it durable. Only a `committed` id may ride in a non-durable commit (it is a lower
//! bound that the next durable commit persists; losing it only means re-applying a
//! little more of the log after a crash). Reads do not block writers (redb's MVCC).

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogId, Vote};
use redb::{Database, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{io_error, ShardGroup, StorageError};

const LOG: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("log");
const META: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// Writes waiting for the writer thread, at most (then callers wait to enqueue).
const WRITES_QUEUED_MAX: usize = 1024;
/// Bytes of entries taken into one transaction, at most (more wait for the next).
const TXN_BYTES_MAX: usize = 64 << 20;
/// How long opening waits for another instance in this process to close the file.
const OPEN_WAIT: Duration = Duration::from_secs(10);

enum Op {
    Entries(Vec<(u64, Vec<u8>)>),
    Meta(&'static str, Vec<u8>),
    /// Deletes entries from this index on.
    Truncate(u64),
    /// Deletes entries up to this index and records the purged id.
    Purge(u64, Vec<u8>),
}

struct Write {
    group: u32,
    op: Op,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

impl Write {
    fn bytes(&self) -> usize {
        match &self.op {
            Op::Entries(e) => e.iter().map(|(_, b)| b.len()).sum(),
            Op::Meta(_, b) | Op::Purge(_, b) => b.len(),
            Op::Truncate(_) => 0,
        }
    }
    fn needs_fsync(&self) -> bool {
        !matches!(self.op, Op::Meta(COMMITTED, _))
    }
}

/// A node's Raft log database. Cheap to clone.
#[derive(Clone)]
pub struct LogDb {
    db: Arc<Database>,
    writes: std::sync::mpsc::SyncSender<Write>,
}

fn logs_read(e: impl std::error::Error + 'static) -> StorageError {
    io_error(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn logs_write(e: impl std::error::Error + 'static) -> StorageError {
    io_error(ErrorSubject::Logs, ErrorVerb::Write, e)
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

/// An entry's bytes in the log (and on the wire): CBOR, with rows as byte strings.
pub fn encode_entry(e: &Entry<ShardGroup>) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::new();
    ciborium::into_writer(e, &mut out).map_err(|e| logs_write(Failed(e.to_string())))?;
    Ok(out)
}

pub fn decode_entry(bytes: &[u8]) -> Result<Entry<ShardGroup>, StorageError> {
    ciborium::from_reader(bytes).map_err(|e| logs_read(Failed(e.to_string())))
}

impl LogDb {
    /// Opens (or creates) the log database at `path` and starts its writer thread.
    pub fn open(path: &Path) -> Result<LogDb, StorageError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(logs_write)?;
        }
        // A node of this process that is shutting down may still hold the file for a
        // moment (its Raft tasks end asynchronously); another process holds it for good.
        let started = Instant::now();
        let db = loop {
            match Database::create(path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if started.elapsed() < OPEN_WAIT => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(logs_write(Failed(format!(
                        "{} is in use by another process (is another tidemark running on this data directory?)",
                        path.display()
                    ))))
                }
                Err(e) => return Err(logs_write(e)),
            }
        };
        // Create both tables, so that readers find them.
        let w = db.begin_write().map_err(logs_write)?;
        w.open_table(LOG).map_err(logs_write)?;
        w.open_table(META).map_err(logs_write)?;
        w.commit().map_err(logs_write)?;
        let db = Arc::new(db);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Write>(WRITES_QUEUED_MAX);
        let writer_db = Arc::clone(&db);
        std::thread::Builder::new()
            .name("tidemark-raft-log".into())
            .spawn(move || writer(&writer_db, rx))
            .map_err(logs_write)?;
        Ok(LogDb { db, writes: tx })
    }

    /// The log store of group `group` in this database.
    pub fn group(&self, group: u32) -> LogStore {
        LogStore { db: self.clone(), group }
    }

    async fn submit(&self, group: u32, op: Op) -> Result<(), StorageError> {
        let (done, wait) = tokio::sync::oneshot::channel();
        let tx = self.writes.clone();
        let w = Write { group, op, done };
        // The queue is bounded: enqueueing may wait, off the async threads.
        match tx.try_send(w) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(w)) => {
                tokio::task::spawn_blocking(move || tx.send(w))
                    .await
                    .map_err(|e| logs_write(Failed(e.to_string())))?
                    .map_err(|_| logs_write(Failed("the log writer has stopped".into())))?;
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                return Err(logs_write(Failed("the log writer has stopped".into())))
            }
        }
        wait.await
            .map_err(|_| logs_write(Failed("the log writer has stopped".into())))?
            .map_err(|e| logs_write(Failed(e)))
    }
}

/// The writer thread: one transaction for everything waiting, then every waiter told.
fn writer(db: &Database, rx: std::sync::mpsc::Receiver<Write>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let mut bytes = batch[0].bytes();
        while bytes < TXN_BYTES_MAX {
            match rx.try_recv() {
                Ok(w) => {
                    bytes += w.bytes();
                    batch.push(w);
                }
                Err(_) => break,
            }
        }
        let fsync = batch.iter().any(Write::needs_fsync);
        let result = write_batch(db, &batch, fsync).map_err(|e| e.to_string());
        for w in batch {
            let _ = w.done.send(result.clone());
        }
    }
}

fn write_batch(db: &Database, batch: &[Write], fsync: bool) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    if !fsync {
        txn.set_durability(redb::Durability::None);
    }
    {
        let mut log = txn.open_table(LOG)?;
        let mut meta = txn.open_table(META)?;
        for w in batch {
            let g = w.group;
            match &w.op {
                Op::Entries(entries) => {
                    for (index, bytes) in entries {
                        log.insert((g, *index), bytes.as_slice())?;
                    }
                }
                Op::Meta(key, bytes) => {
                    meta.insert((g, *key), bytes.as_slice())?;
                }
                Op::Truncate(from) => {
                    log.retain_in((g, *from)..=(g, u64::MAX), |_, _| false)?;
                }
                Op::Purge(upto, bytes) => {
                    meta.insert((g, LAST_PURGED), bytes.as_slice())?;
                    log.retain_in((g, 0)..=(g, *upto), |_, _| false)?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

/// The log store of one shard group: a view of the node's [`LogDb`]. Cheap to clone.
#[derive(Clone)]
pub struct LogStore {
    db: LogDb,
    group: u32,
}

impl LogStore {
    /// Opens a database of its own at `path` holding group 0 (tests).
    pub fn open(path: &Path) -> Result<LogStore, StorageError> {
        Ok(LogDb::open(path)?.group(0))
    }

    /// Writes `entries`; returns once they are durable.
    pub async fn write_entries(&self, entries: impl IntoIterator<Item = Entry<ShardGroup>>) -> Result<(), StorageError> {
        let mut encoded = Vec::new();
        for e in entries {
            encoded.push((e.get_log_id().index, encode_entry(&e)?));
        }
        if encoded.is_empty() {
            return Ok(());
        }
        self.db.submit(self.group, Op::Entries(encoded)).await
    }

    fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let r = self.db.db.begin_read().map_err(logs_read)?;
        let t = r.open_table(META).map_err(logs_read)?;
        match t.get((self.group, key)).map_err(logs_read)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(logs_read)?)),
            None => Ok(None),
        }
    }

    async fn set_meta<T: Serialize>(&self, key: &'static str, value: &T) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(logs_write)?;
        self.db.submit(self.group, Op::Meta(key, bytes)).await
    }
}

fn bound(b: Bound<&u64>, group: u32, unbounded: u64) -> Bound<(u32, u64)> {
    match b {
        Bound::Included(i) => Bound::Included((group, *i)),
        Bound::Excluded(i) => Bound::Excluded((group, *i)),
        Bound::Unbounded => Bound::Included((group, unbounded)),
    }
}

impl RaftLogReader<ShardGroup> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<ShardGroup>>, StorageError> {
        let r = self.db.db.begin_read().map_err(logs_read)?;
        let t = r.open_table(LOG).map_err(logs_read)?;
        let lo = bound(range.start_bound(), self.group, 0);
        let hi = bound(range.end_bound(), self.group, u64::MAX);
        let mut out = Vec::new();
        for item in t.range::<(u32, u64)>((lo, hi)).map_err(logs_read)? {
            let (_, v) = item.map_err(logs_read)?;
            out.push(decode_entry(v.value())?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<ShardGroup> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<ShardGroup>, StorageError> {
        let last_purged_log_id: Option<LogId<u64>> = self.meta(LAST_PURGED)?;
        let r = self.db.db.begin_read().map_err(logs_read)?;
        let t = r.open_table(LOG).map_err(logs_read)?;
        let last = match t.range((self.group, 0)..=(self.group, u64::MAX)).map_err(logs_read)?.next_back() {
            Some(item) => {
                let (_, v) = item.map_err(logs_read)?;
                Some(*decode_entry(v.value())?.get_log_id())
            }
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.set_meta(VOTE, vote).await.map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.meta(VOTE).map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), StorageError> {
        self.set_meta(COMMITTED, &committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError> {
        Ok(self.meta::<Option<LogId<u64>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<ShardGroup>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<ShardGroup>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Readable and durable (redb commits with fsync) before openraft hears of it;
        // other groups' appends waiting at the same moment share the fsync.
        let r = self.write_entries(entries).await;
        match &r {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        r
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        self.db.submit(self.group, Op::Truncate(log_id.index)).await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(&log_id).map_err(logs_write)?;
        self.db.submit(self.group, Op::Purge(log_id.index, bytes)).await
    }
}
