//! A shard group's Raft log, its vote and its committed id, durable in one redb file.
//!
//! Owns: the file `log.redb` of a group: table `log` (index -> entry as JSON) and table
//! `meta` (vote, committed, last purged). Must never: report an append, a vote or a
//! truncation done before redb's commit made it durable (every write is one redb
//! transaction, committed with fsync before openraft is told). Reads do not block
//! writers (redb's MVCC), so a cloned store serves as the log reader.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogId, Vote};
use redb::{Database, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{io_error, ShardGroup, StorageError};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// The log store of one shard group. Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

fn logs_read(e: impl std::error::Error + 'static) -> StorageError {
    io_error(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn logs_write(e: impl std::error::Error + 'static) -> StorageError {
    io_error(ErrorSubject::Logs, ErrorVerb::Write, e)
}

impl LogStore {
    /// Opens (or creates) the log at `path`.
    pub fn open(path: &Path) -> Result<LogStore, StorageError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(logs_write)?;
        }
        let db = Database::create(path).map_err(logs_write)?;
        // Create both tables, so that readers find them.
        let w = db.begin_write().map_err(logs_write)?;
        w.open_table(LOG).map_err(logs_write)?;
        w.open_table(META).map_err(logs_write)?;
        w.commit().map_err(logs_write)?;
        Ok(LogStore { db: Arc::new(db) })
    }

    /// Writes `entries` in one transaction; returns once it is durable.
    pub fn write_entries(&self, entries: impl IntoIterator<Item = Entry<ShardGroup>>) -> Result<(), StorageError> {
        let w = self.db.begin_write().map_err(logs_write)?;
        {
            let mut t = w.open_table(LOG).map_err(logs_write)?;
            for e in entries {
                let bytes = serde_json::to_vec(&e).map_err(logs_write)?;
                t.insert(e.get_log_id().index, bytes.as_slice()).map_err(logs_write)?;
            }
        }
        w.commit().map_err(logs_write)
    }

    fn meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let r = self.db.begin_read().map_err(logs_read)?;
        let t = r.open_table(META).map_err(logs_read)?;
        match t.get(key).map_err(logs_read)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(logs_read)?)),
            None => Ok(None),
        }
    }

    fn set_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(logs_write)?;
        let w = self.db.begin_write().map_err(logs_write)?;
        w.open_table(META).map_err(logs_write)?.insert(key, bytes.as_slice()).map_err(logs_write)?;
        w.commit().map_err(logs_write)
    }
}

impl RaftLogReader<ShardGroup> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<ShardGroup>>, StorageError> {
        let r = self.db.begin_read().map_err(logs_read)?;
        let t = r.open_table(LOG).map_err(logs_read)?;
        let mut out = Vec::new();
        for item in t.range(range).map_err(logs_read)? {
            let (_, v) = item.map_err(logs_read)?;
            out.push(serde_json::from_slice(v.value()).map_err(logs_read)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<ShardGroup> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<ShardGroup>, StorageError> {
        let last_purged_log_id: Option<LogId<u64>> = self.meta(LAST_PURGED)?;
        let r = self.db.begin_read().map_err(logs_read)?;
        let t = r.open_table(LOG).map_err(logs_read)?;
        let last = match t.last().map_err(logs_read)? {
            Some((_, v)) => {
                let e: Entry<ShardGroup> = serde_json::from_slice(v.value()).map_err(logs_read)?;
                Some(*e.get_log_id())
            }
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.set_meta(VOTE, vote).map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.meta(VOTE).map_err(|e| io_error(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> Result<(), StorageError> {
        self.set_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError> {
        Ok(self.meta::<Option<LogId<u64>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<ShardGroup>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<ShardGroup>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Durable (redb commits with fsync) before openraft hears of it.
        self.write_entries(entries)?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let w = self.db.begin_write().map_err(logs_write)?;
        w.open_table(LOG).map_err(logs_write)?.retain_in(log_id.index.., |_, _| false).map_err(logs_write)?;
        w.commit().map_err(logs_write)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(&log_id).map_err(logs_write)?;
        let w = self.db.begin_write().map_err(logs_write)?;
        w.open_table(META).map_err(logs_write)?.insert(LAST_PURGED, bytes.as_slice()).map_err(logs_write)?;
        w.open_table(LOG).map_err(logs_write)?.retain_in(..=log_id.index, |_, _| false).map_err(logs_write)?;
        w.commit().map_err(logs_write)
    }
}
