//! The node's shard groups and the write path over them.
//!
//! Owns: one openraft `Raft` per shard (all logs in the node's [`LogDb`]), their start
//! (a new group is initialized with this node as its only voter; an existing one
//! re-applies its log and elects itself), and [`Replicator`] for storage: a statement's
//! rows are split by shard and each part is committed through its shard's group before
//! the statement succeeds.
//!
//! - Small statements (at most `write_buffer_statement_rows_max` rows): each shard's
//!   rows go into the log as one `Rows` entry (Arrow IPC); applying it decides, in log
//!   order, which rows are new and puts them in the write buffer.
//! - Large statements (and a bulk COPY's commit): the leader deduplicates, writes the
//!   segment files (named by no manifest yet) and proposes one `Adopt` entry per shard
//!   that names them and carries their rows' index keys: the log stays small, and with a
//!   shared segment store the followers adopt the leader's files instead of writing
//!   their own. An `Adopt` whose records an earlier entry stored meanwhile is refused by
//!   every replica alike; the statement then fails with 40001 (a retry skips what was
//!   stored) and its files of that shard are deleted.
//!
//! A statement that spans shards is all-or-nothing per shard, not across shards: after
//! an error or a crash some shards' parts may be stored and others not; the client did
//! not get success, and a retry stores exactly the rest (record ids). A snapshot of each
//! group is taken once its flushed state is `SNAPSHOT_AFTER_LOGS` entries past the last
//! one, so logs are purged behind the flushed segments.
//!
//! Must never: acknowledge a part before its entry is committed and applied; delete
//! files an entry that may still commit names.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{AsArray, RecordBatch, UInt32Array};
use datafusion::arrow::compute::{concat_batches, take_record_batch};
use datafusion::arrow::ipc::writer::StreamWriter;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Raft, SnapshotPolicy};

use super::log_store::LogDb;
use super::network::LocalOnly;
use super::state_machine::{GroupState, StateMachine};
use super::{encode_ids, Applied, Command, ShardGroup};
use crate::catalog::TableDef;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::shard_map::{shard_of, ShardId};
use crate::storage::manifest::SegmentMeta;
use crate::storage::{AppendOutcome, Replicator, ShardIds, Storage};

/// How long a write waits for its shard to have a leader.
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// How long start-up waits for every group to elect itself and re-apply its log.
const START_WAIT: Duration = Duration::from_secs(60);
/// A group takes a snapshot (and purges its log behind it) once its flushed state is
/// this many entries past its last snapshot.
const SNAPSHOT_AFTER_LOGS: u64 = 64;
/// Entries kept behind a snapshot, for a peer that lags a little.
const LOGS_KEPT: u64 = 64;

fn raft_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{what}: {e}"))
}

/// The node's shard groups.
pub struct Groups {
    node_id: u64,
    storage: Arc<Storage>,
    rafts: Vec<Raft<ShardGroup>>,
    /// Statements with more rows than this are written as segments by the leader.
    statement_rows_max: usize,
}

impl Groups {
    /// Starts a group per shard (creating those that do not exist), waits until each
    /// has elected this node and re-applied its log, removes segment files that no
    /// manifest names, and installs the groups as `storage`'s write path.
    pub async fn open(cfg: &Config, storage: Arc<Storage>) -> Result<Arc<Groups>> {
        let db = LogDb::open(&cfg.data_dir.join("raft").join("log.redb")).map_err(|e| raft_error("raft log", e))?;
        let shard_count = storage.snapshot().tables.iter().map(|t| t.shard_count).max().unwrap_or(cfg.shard_count);
        let config = openraft::Config {
            cluster_name: "tidemark".into(),
            heartbeat_interval: 100,
            election_timeout_min: 200,
            election_timeout_max: 400,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(1000),
            max_in_snapshot_log_to_keep: LOGS_KEPT,
            ..Default::default()
        }
        .validate()
        .map_err(|e| raft_error("raft configuration", e))?;
        let config = Arc::new(config);
        let me = BasicNode::new(cfg.internal_addr.map(|a| a.to_string()).unwrap_or_default());
        let mut rafts = Vec::with_capacity(shard_count as usize);
        for g in 0..shard_count {
            let sm = StateMachine::open(Arc::clone(&storage), g).map_err(|e| raft_error("shard state", e))?;
            let raft = Raft::new(cfg.node_id, Arc::clone(&config), LocalOnly, db.group(g), sm)
                .await
                .map_err(|e| raft_error("raft start", e))?;
            if !raft.is_initialized().await.map_err(|e| raft_error("raft start", e))? {
                raft.initialize(BTreeMap::from([(cfg.node_id, me.clone())]))
                    .await
                    .map_err(|e| raft_error("raft initialize", e))?;
            }
            rafts.push(raft);
        }
        let node_id = cfg.node_id;
        for (g, raft) in rafts.iter().enumerate() {
            raft.wait(Some(START_WAIT))
                .metrics(
                    |m| m.current_leader == Some(node_id) && m.last_applied.map(|l| l.index) == m.last_log_index,
                    "leader and caught up",
                )
                .await
                .map_err(|e| Error::ShardUnavailable { shard: g as u32, reason: format!("did not start: {e}") })?;
        }
        // Every committed entry is applied now, so a file that no manifest names is
        // named by no entry either (nothing else writes before the node serves).
        storage.remove_unnamed_files().await?;
        let groups = Arc::new(Groups {
            node_id,
            storage: Arc::clone(&storage),
            rafts,
            statement_rows_max: cfg.write_buffer_statement_rows_max.min(cfg.write_buffer_rows_max),
        });
        let weak: Weak<dyn Replicator> = Arc::downgrade(&(Arc::clone(&groups) as Arc<dyn Replicator>));
        storage.set_replicator(weak);
        Ok(groups)
    }

    /// The Raft group of a shard.
    pub fn raft(&self, shard: ShardId) -> Option<&Raft<ShardGroup>> {
        self.rafts.get(shard as usize)
    }

    pub fn shard_count(&self) -> u32 {
        self.rafts.len() as u32
    }

    /// Snapshots the groups whose flushed state moved `SNAPSHOT_AFTER_LOGS` entries past
    /// their last snapshot (the log behind a snapshot is then purged). Returns how many
    /// snapshots were asked for.
    pub async fn snapshot_flushed(&self) -> usize {
        let mut asked = 0;
        for (g, raft) in self.rafts.iter().enumerate() {
            let flushed = self
                .storage
                .group_state(g as ShardId)
                .and_then(|v| serde_json::from_value::<GroupState>(v).ok())
                .and_then(|s| s.applied)
                .map(|l| l.index);
            let last = raft.metrics().borrow().snapshot.map(|l| l.index);
            if let Some(f) = flushed {
                if f >= last.map_or(0, |l| l + 1) + SNAPSHOT_AFTER_LOGS - 1 && raft.trigger().snapshot().await.is_ok() {
                    asked += 1;
                }
            }
        }
        asked
    }

    /// Checks every second for groups to snapshot.
    pub fn spawn_snapshotter(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let groups = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(g) = groups.upgrade() else { return };
                g.snapshot_flushed().await;
            }
        })
    }

    /// Stops every group's Raft tasks.
    pub async fn shutdown(&self) {
        for raft in &self.rafts {
            let _ = raft.shutdown().await;
        }
    }

    /// Commits `cmd` through shard `shard`'s group and returns what applying it did.
    async fn propose(&self, shard: ShardId, cmd: Command) -> Result<Applied> {
        let raft = self.raft(shard).ok_or_else(|| Error::Internal(format!("shard {shard} has no Raft group")))?;
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            match raft.client_write(cmd.clone()).await {
                Ok(r) => return Ok(r.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    if let Some(l) = f.leader_id.filter(|l| *l != self.node_id) {
                        return Err(Error::ShardUnavailable {
                            shard,
                            reason: format!("its leader is node {l}, and writes are not forwarded yet; nothing of this shard was stored"),
                        });
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::ShardUnavailable {
                            shard,
                            reason: format!("no leader elected within {} s; nothing of this shard was stored", LEADER_WAIT.as_secs()),
                        });
                    }
                    let me = self.node_id;
                    let _ = raft.wait(Some(left.min(Duration::from_millis(200)))).metrics(|m| m.current_leader == Some(me), "leader").await;
                }
                Err(e) => {
                    return Err(Error::ShardUnavailable { shard, reason: format!("{e}; whether this shard's part was stored is unknown") })
                }
            }
        }
    }
}

/// Rows of `batch` by shard (in row order within each).
fn split_by_shard(table: &TableDef, shard_count: u32, batch: &RecordBatch) -> Result<Vec<(ShardId, RecordBatch)>> {
    let keys = batch.column(table.column_index(&table.shard_key)?).as_string::<i32>();
    let mut rows: BTreeMap<ShardId, Vec<u32>> = BTreeMap::new();
    for i in 0..batch.num_rows() {
        rows.entry(shard_of(keys.value(i), shard_count)).or_default().push(i as u32);
    }
    if rows.len() == 1 {
        let shard = *rows.keys().next().expect("one");
        return Ok(vec![(shard, batch.clone())]);
    }
    rows.into_iter().map(|(s, r)| Ok((s, take_record_batch(batch, &UInt32Array::from(r))?))).collect()
}

fn ipc(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut w = StreamWriter::try_new(&mut out, &batch.schema())?;
        w.write(batch)?;
        w.finish()?;
    }
    Ok(out)
}

#[async_trait::async_trait]
impl Replicator for Groups {
    async fn append(&self, table: &TableDef, batches: Vec<RecordBatch>) -> Result<AppendOutcome> {
        let all = concat_batches(&table.schema, &batches)?;
        if all.num_rows() == 0 {
            return Ok(AppendOutcome::default());
        }
        let layout = self.storage.layout(&table.name)?;
        if all.num_rows() > self.statement_rows_max {
            let (kept, ids, present) = self.storage.dedupe(table, &[all])?;
            let kept = concat_batches(&table.schema, &kept)?;
            if kept.num_rows() == 0 {
                return Ok(AppendOutcome { present, ..Default::default() });
            }
            // Provisional ids: applying the entry numbers the files in the manifest.
            let mut provisional = 0;
            let segments = self.storage.write_segments(table, &layout, &kept, &mut provisional).await?;
            return self.adopt(table, segments, ids, present).await;
        }
        let parts = split_by_shard(table, layout.shard_count, &all)?;
        let proposals = parts.into_iter().map(|(shard, rows)| async move {
            let cmd = Command::Rows { table: table.name.clone(), rows: ipc(&rows)? };
            self.propose(shard, cmd).await
        });
        let mut outcome = AppendOutcome::default();
        let mut first_error = None;
        for r in futures::future::join_all(proposals).await {
            match r {
                Ok(a) => {
                    outcome.added += a.stored;
                    outcome.present += a.duplicates;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(outcome),
        }
    }

    async fn adopt(&self, table: &TableDef, segments: Vec<SegmentMeta>, mut ids: ShardIds, present: u64) -> Result<AppendOutcome> {
        let mut by_shard: BTreeMap<ShardId, Vec<SegmentMeta>> = BTreeMap::new();
        for s in segments {
            by_shard.entry(s.shard).or_default().push(s);
        }
        let proposals = by_shard.into_iter().map(|(shard, segs)| {
            let keys = encode_ids(ids.remove(&shard).unwrap_or_default());
            async move {
                let n = segs.len() as u64;
                let paths: Vec<String> = segs.iter().map(|s| s.path.clone()).collect();
                let cmd = Command::Adopt { table: table.name.clone(), segments: segs, ids: keys };
                (shard, n, paths, self.propose(shard, cmd).await)
            }
        });
        let mut outcome = AppendOutcome { present, ..Default::default() };
        let mut refused: HashMap<ShardId, Vec<String>> = HashMap::new();
        let mut first_error = None;
        for (shard, n, paths, r) in futures::future::join_all(proposals).await {
            match r {
                Ok(a) if a.refused => {
                    refused.insert(shard, paths);
                }
                Ok(a) => {
                    outcome.added += a.stored;
                    outcome.segments += n;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if !refused.is_empty() {
            let paths: Vec<String> = refused.values().flatten().cloned().collect();
            self.storage.delete_quietly(&paths).await;
            let mut shards: Vec<ShardId> = refused.into_keys().collect();
            shards.sort_unstable();
            return Err(Error::SerializationFailure(format!(
                "a concurrent statement stored some of this statement's records in shard(s) {shards:?}, so those parts were not stored; retry it (stored records are skipped)"
            )));
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(outcome),
        }
    }
}
