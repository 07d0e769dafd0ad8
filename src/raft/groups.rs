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
//! not get success, and a retry stores exactly the rest (record ids). Where groups span
//! nodes, a shard's part of more than `ENTRY_ROWS_MAX` rows is several `Rows` entries
//! (a bulk COPY's too) that every replica stages and stores together with the last
//! one ([`super::parts`]), so it is all-or-nothing too; a part whose leader changed
//! before its last entry stores nothing, and the statement fails with 57P03. A
//! leader proposes an `Abort` for a part idle for `parts::IDLE_MS_MAX` (its writer is
//! gone), so a crashed writer holds no replica's memory for long. A snapshot of each
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
use super::network::{envelope, from_cbor, Network, Peers};
use super::state_machine::{GroupState, StateMachine};
use super::{encode_ids, Applied, Command, ShardGroup};
use crate::catalog::TableDef;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::shard_map::{shard_of, ShardId};
use crate::storage::manifest::SegmentMeta;
use crate::storage::{AppendOutcome, Replicator, ShardIds, Storage};
use crate::write_token::WriteToken;

/// How long a new group waits for its initializer before another voter initializes it.
const INIT_GRACE: Duration = Duration::from_secs(3);
/// How long a write waits for its shard to have a leader.
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// How long start-up waits for every group to elect itself and re-apply its log.
const START_WAIT: Duration = Duration::from_secs(60);
/// How long start-up waits for groups that span nodes to have a leader (the node
/// serves after it either way: a shard with no leader refuses writes with 57P03).
const START_WAIT_SPANNING: Duration = Duration::from_secs(30);
/// Rows in one `Rows` entry of a group that spans nodes (a larger statement is several
/// entries): bounds a message, with `max_payload_entries`, below the Flight limit.
const ENTRY_ROWS_MAX: usize = 8192;
/// How a write's error ends when its part may or may not be stored, and when it is not.
const UNKNOWN: &str = "; whether this shard's part was stored is unknown";
const NOTHING: &str = "; nothing of this shard's part was stored";
/// A forwarded write waits this long for the leader's answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);
/// A forwarded write that is safe to re-send waits this long for one leader's answer,
/// then asks the next leader (a leader cut off from its peers cannot commit, and
/// is replaced within an election timeout or two).
const FORWARD_ATTEMPT: Duration = Duration::from_secs(3);
/// Action type of a write forwarded to a shard's leader.
pub const FORWARD: &str = "raft.write";
/// Action type of "do you hold this group?" (answer: CBOR bool).
pub const STATE: &str = "raft.state";
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
    /// Each group's state machine (a handle on the one its Raft applies to).
    machines: Vec<StateMachine>,
    /// Statements with more rows than this are written as segments by the leader.
    statement_rows_max: usize,
    /// Every group's voters: this node alone, or this node and its peers.
    voters: BTreeMap<u64, BasicNode>,
    peers: Peers,
    /// Per group: whether this replica may vote (see [`Fence`]).
    fences: Vec<parking_lot::Mutex<Fence>>,
    /// Per group: when a leader's append (a heartbeat included) last reached it.
    contact: Vec<parking_lot::Mutex<Option<Instant>>>,
}

/// Whether a replica may vote in its group's elections. A replica that has no state
/// of a group its peers hold and have committed entries in (its data directory was
/// lost, or it never caught up) must not vote until it has caught up: its empty log
/// would let a candidate that lacks an entry this replica had acknowledged win, and
/// that committed entry would be lost. It refuses votes until it has applied the
/// commit index of the first append it received from a leader (every entry committed
/// before it lost its state is at or below it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// Votes freely.
    Open,
    /// No state here; not yet known whether peers hold the group (start-up).
    Deciding,
    /// Peers hold the group: waits for a leader's append (its commit index, once seen).
    CatchingUp { target: Option<u64> },
}

/// One node of the cluster as this node sees it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub id: u64,
    pub internal_addr: String,
    /// `this node`, `up` (answered within 3 s), `unreachable`, or `unknown` (never asked).
    pub state: &'static str,
    /// Milliseconds since it last answered this node (heartbeats answer every 100 ms
    /// while one of them leads a shared group).
    pub last_answer_ms: Option<u64>,
    /// Shards whose leader it is, as this node knows.
    pub shards_led: u32,
    /// Shard groups it is a voter of.
    pub voter_of: u32,
}

/// What a peer says of one of its groups (the answer to [`STATE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerGroupState {
    /// It holds state of the group (a vote or a log).
    pub held: bool,
    /// The last index it applied (the group has committed entries).
    pub applied: Option<u64>,
    /// The last index in its log (0: only the initial membership).
    #[serde(default)]
    pub last_log: Option<u64>,
}

/// What the peers say of a group this node has no state of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerView {
    /// A peer has log entries past the initial membership (a leader existed): this node
    /// lost (or never had) its replica of a group with data.
    HasData,
    /// A majority of the voters (this node included) have no data in it; `uninitialized`:
    /// a majority hold nothing of it at all (so its initializer may initialize it).
    NoData { uninitialized: bool },
    /// Too few answers before the deadline.
    Unknown,
}

/// A write forwarded to the node that leads its shard.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ForwardedWrite {
    pub command: Command,
}

/// The leader's answer to a forwarded write.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum ForwardAnswer {
    /// Committed and applied.
    Applied(Applied),
    /// The receiver does not lead the shard (nothing was proposed).
    NotLeader { leader: Option<u64> },
    /// Proposed, but whether it was committed is unknown.
    Unknown(String),
}

/// The node that initializes group `g` of a new cluster (and so, at first, leads it):
/// the groups' first leaders are spread over the voters.
pub fn initializer(voters: &BTreeMap<u64, BasicNode>, g: ShardId) -> u64 {
    *voters.keys().nth(g as usize % voters.len().max(1)).expect("at least one voter")
}

/// The voters of every group on a node with `cfg`: this node alone, or every node when
/// groups span the cluster (`replication_factor` > 1 and peers).
pub fn voters(cfg: &Config) -> Result<BTreeMap<u64, BasicNode>> {
    let me = BasicNode::new(cfg.internal_addr.map(|a| a.to_string()).unwrap_or_default());
    let mut voters = BTreeMap::from([(cfg.node_id, me)]);
    if cfg.replication_factor > 1 {
        for (id, addr) in cfg.parsed_peers()? {
            voters.insert(id, BasicNode::new(addr.to_string()));
        }
    }
    Ok(voters)
}

impl Groups {
    /// Starts a group per shard. The groups elect (and re-apply their logs) in
    /// [`Groups::ready`], once the internal service that carries their messages runs.
    pub async fn start(cfg: &Config, storage: Arc<Storage>) -> Result<Arc<Groups>> {
        Groups::start_with(cfg, storage, Peers::default()).await
    }

    /// [`Groups::start`], reaching the peers through `peers` (the simulation's
    /// transport).
    pub async fn start_with(cfg: &Config, storage: Arc<Storage>, peers: Peers) -> Result<Arc<Groups>> {
        let voters = voters(cfg)?;
        let spanning = voters.len() > 1;
        if spanning {
            // Entries of spanning groups carry rows, never file names, so a file that
            // no manifest names now is named by nothing (and no snapshot is arriving).
            storage.remove_unnamed_files().await?;
        }
        let db = LogDb::open(&cfg.data_dir.join("raft").join("log.redb")).map_err(|e| raft_error("raft log", e))?;
        let shard_count = storage.snapshot().tables.iter().map(|t| t.shard_count).max().unwrap_or(cfg.shard_count);
        let config = openraft::Config {
            cluster_name: "tidemark".into(),
            heartbeat_interval: 100,
            // Peers answer over loopback or a LAN; one-node groups elect at start only.
            election_timeout_min: if spanning { 300 } else { 200 },
            election_timeout_max: if spanning { 600 } else { 400 },
            // With `ENTRY_ROWS_MAX` rows an entry (about 1 MiB of usage rows), an append
            // of a bulk load is about 8 MiB: far below the Flight message limit, and
            // taken in by a peer well within an election timeout (32 entries, some 40
            // MiB, were not on a busy 2-core machine). Small statements' entries still
            // go 8 to an append.
            max_payload_entries: 8,
            install_snapshot_timeout: 10_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(1000),
            max_in_snapshot_log_to_keep: LOGS_KEPT,
            ..Default::default()
        }
        .validate()
        .map_err(|e| raft_error("raft configuration", e))?;
        let config = Arc::new(config);
        let heartbeats = super::heartbeats::Coalescer::new(peers.clone());
        let mut rafts = Vec::with_capacity(shard_count as usize);
        let mut machines = Vec::with_capacity(shard_count as usize);
        super::state_machine::remove_snapshot_files(&storage);
        let mut fences = Vec::with_capacity(shard_count as usize);
        for g in 0..shard_count {
            let sm = StateMachine::open(Arc::clone(&storage), g).map_err(|e| raft_error("shard state", e))?.carrying_files(spanning);
            let network = Network { group: g, peers: peers.clone(), heartbeats: heartbeats.clone() };
            machines.push(sm.clone());
            let raft = Raft::new(cfg.node_id, Arc::clone(&config), network, db.group(g), sm)
                .await
                .map_err(|e| raft_error("raft start", e))?;
            let held = raft.is_initialized().await.map_err(|e| raft_error("raft start", e))?;
            // Until `ready` asked the peers, a replica with no state does not vote.
            fences.push(parking_lot::Mutex::new(if spanning && !held { Fence::Deciding } else { Fence::Open }));
            rafts.push(raft);
        }
        Ok(Arc::new(Groups {
            node_id: cfg.node_id,
            storage,
            rafts,
            machines,
            statement_rows_max: cfg.write_buffer_statement_rows_max.min(cfg.write_buffer_rows_max),
            voters,
            peers,
            contact: (0..fences.len()).map(|_| parking_lot::Mutex::new(None)).collect(),
            fences,
        }))
    }

    /// Makes the groups serve: a group that was never initialized is, by its
    /// [`initializer`] (`self_addr`: this node's internal address as bound), once a
    /// majority of the voters answered that they do not hold it; then waits until each has a leader (a one-node group: this node, with
    /// its log re-applied), removes segment files that no manifest names, and installs
    /// the groups as storage's write path.
    pub async fn ready(self: &Arc<Self>, self_addr: Option<std::net::SocketAddr>) -> Result<()> {
        let mut voters = self.voters.clone();
        if let (Some(addr), Some(me)) = (self_addr, voters.get_mut(&self.node_id)) {
            me.addr = addr.to_string();
        }
        let spanning = self.spans_nodes();
        let deadline = Instant::now() + START_WAIT_SPANNING;
        // New groups whose initializer is another node: initialized here too if that
        // node has not reached us within `INIT_GRACE` (it may be down). Initializing
        // with the same voters on several nodes is safe: the entry is the same.
        let mut others = Vec::new();
        for (g, raft) in self.rafts.iter().enumerate() {
            let g = g as ShardId;
            // A group that had no state at start stays `Deciding` (no votes) until its
            // peers are asked, even if a leader's append reached it meanwhile.
            let held = raft.is_initialized().await.map_err(|e| raft_error("raft start", e))?;
            if held && self.fence(g) != Fence::Deciding {
                continue;
            }
            let view = if spanning { self.peer_view(&voters, g, deadline).await } else { PeerView::NoData { uninitialized: true } };
            let fence = match view {
                PeerView::HasData => {
                    tracing::info!(shard = g, "peers hold this shard's group: catching up from its leader before voting");
                    Fence::CatchingUp { target: None }
                }
                PeerView::Unknown => {
                    tracing::warn!(shard = g, "too few peers answered; this replica votes without knowing whether it lost its state");
                    Fence::Open
                }
                PeerView::NoData { .. } => Fence::Open,
            };
            self.set_fence(g, fence);
            if !held && view == (PeerView::NoData { uninitialized: true }) {
                if initializer(&voters, g) == self.node_id {
                    raft.initialize(voters.clone()).await.map_err(|e| raft_error("raft initialize", e))?;
                } else {
                    others.push(g);
                }
            }
        }
        if !others.is_empty() {
            tokio::time::sleep(INIT_GRACE).await;
            for g in others {
                let Some(raft) = self.raft(g) else { continue };
                if !raft.is_initialized().await.unwrap_or(true) {
                    tracing::info!(shard = g, "this shard's initializer did not reach this node: initializing it here");
                    if let Err(e) = raft.initialize(voters.clone()).await {
                        tracing::debug!(shard = g, error = %e, "initialize");
                    }
                }
            }
        }
        let node_id = self.node_id;
        for (g, raft) in self.rafts.iter().enumerate() {
            if spanning {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                let r = raft.wait(Some(left)).metrics(|m| m.current_leader.is_some(), "a leader").await;
                if let Err(e) = r {
                    tracing::warn!(shard = g, error = %e, "shard group has no leader yet; serving anyway (its writes wait for one)");
                }
                continue;
            }
            raft.wait(Some(START_WAIT))
                .metrics(
                    |m| m.current_leader == Some(node_id) && m.last_applied.map(|l| l.index) == m.last_log_index,
                    "leader and caught up",
                )
                .await
                .map_err(|e| Error::ShardUnavailable { shard: g as u32, reason: format!("did not start: {e}") })?;
        }
        if !spanning {
            // Every committed entry is applied now, so a file that no manifest names is
            // named by no entry either (nothing else writes before the node serves).
            self.storage.remove_unnamed_files().await?;
        }
        let weak: Weak<dyn Replicator> = Arc::downgrade(&(Arc::clone(self) as Arc<dyn Replicator>));
        self.storage.set_replicator(weak);
        Ok(())
    }

    /// What the other voters say of group `g`, which this node holds nothing of: asks
    /// until `deadline`. A peer with data settles it at once. Sound for one fault at a
    /// time: if this node lost its disk, the peers are up, and an entry it had
    /// acknowledged is in the log of another node of that majority.
    async fn peer_view(&self, voters: &BTreeMap<u64, BasicNode>, g: ShardId, deadline: Instant) -> PeerView {
        let majority = voters.len() / 2 + 1;
        loop {
            // This node first (it has nothing), then the peers that answered so.
            let (mut no_data, mut nothing) = (1, 1);
            for (id, node) in voters.iter().filter(|(id, _)| **id != self.node_id) {
                let Ok(body) = envelope(g, &()) else { return PeerView::Unknown };
                let answer = self.peers.call(&node.addr, STATE, body, Duration::from_secs(1)).await.ok();
                match answer.and_then(|b| from_cbor::<PeerGroupState>(&b).ok()) {
                    Some(p) if p.applied.is_some() || p.last_log.is_some_and(|l| l >= 1) => {
                        tracing::info!(shard = g, peer = id, "peer has data in this shard's group");
                        return PeerView::HasData;
                    }
                    Some(p) => {
                        no_data += 1;
                        nothing += usize::from(!p.held);
                    }
                    None => {}
                }
            }
            if no_data >= majority {
                return PeerView::NoData { uninitialized: nothing >= majority };
            }
            if Instant::now() >= deadline {
                return PeerView::Unknown;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// What this node holds of group `g` (the answer to a peer's [`STATE`]).
    pub async fn group_state(&self, g: ShardId) -> PeerGroupState {
        match self.raft(g) {
            Some(r) => {
                let (applied, last_log) = {
                    let m = r.metrics();
                    let m = m.borrow();
                    (m.last_applied.map(|l| l.index), m.last_log_index)
                };
                PeerGroupState { held: r.is_initialized().await.unwrap_or(false), applied, last_log }
            }
            None => PeerGroupState { held: false, applied: None, last_log: None },
        }
    }

    fn set_fence(&self, g: ShardId, f: Fence) {
        if let Some(m) = self.fences.get(g as usize) {
            *m.lock() = f;
        }
    }

    /// The fence of group `g` now (a replica that caught up opens here too, not only
    /// when a vote request arrives).
    pub fn fence(&self, g: ShardId) -> Fence {
        self.may_vote(g);
        self.fences.get(g as usize).map_or(Fence::Open, |m| *m.lock())
    }

    /// A leader's append for group `g` arrived, committed up to `leader_commit`: a
    /// replica catching up takes the first such index as what it must apply before it
    /// votes.
    pub fn note_append(&self, g: ShardId, leader_commit: Option<u64>) {
        if let Some(t) = self.contact.get(g as usize) {
            *t.lock() = Some(Instant::now());
        }
        if let (Some(m), Some(c)) = (self.fences.get(g as usize), leader_commit) {
            let mut f = m.lock();
            if *f == (Fence::CatchingUp { target: None }) {
                *f = Fence::CatchingUp { target: Some(c) };
            }
        }
    }

    /// How long ago a leader's append last reached group `g` here (None: never, or
    /// this node has not heard from one since it started). A follower's rows are at
    /// most this old, plus the leader's own commit time, when the leader is alive.
    pub fn since_leader_contact(&self, g: ShardId) -> Option<Duration> {
        self.contact.get(g as usize).and_then(|t| t.lock().map(|i| i.elapsed()))
    }

    /// Whether group `g`'s replica here may grant votes now (see [`Fence`]).
    pub fn may_vote(&self, g: ShardId) -> bool {
        let Some(m) = self.fences.get(g as usize) else { return true };
        let mut f = m.lock();
        match *f {
            Fence::Open => true,
            Fence::Deciding | Fence::CatchingUp { target: None } => false,
            Fence::CatchingUp { target: Some(t) } => {
                let applied = self.raft(g).and_then(|r| r.metrics().borrow().last_applied.map(|l| l.index));
                let caught_up = applied.is_some_and(|a| a >= t);
                if caught_up {
                    tracing::info!(shard = g, applied = t, "replica caught up with its leader's commit index: it votes again");
                    *f = Fence::Open;
                }
                caught_up
            }
        }
    }

    /// The cluster's nodes as this node sees them (`system.nodes`).
    pub fn nodes(&self) -> Vec<NodeView> {
        let mut led: BTreeMap<u64, u32> = BTreeMap::new();
        for r in &self.rafts {
            if let Some(l) = r.metrics().borrow().current_leader {
                *led.entry(l).or_default() += 1;
            }
        }
        self.voters
            .iter()
            .map(|(id, node)| {
                let me = *id == self.node_id;
                let last = if me { None } else { self.peers.last_answer(&node.addr) };
                let state = match (me, last) {
                    (true, _) => "this node",
                    (false, Some(t)) if t < Duration::from_secs(3) => "up",
                    (false, Some(_)) => "unreachable",
                    (false, None) => "unknown",
                };
                NodeView {
                    id: *id,
                    internal_addr: node.addr.clone(),
                    state,
                    last_answer_ms: last.map(|t| t.as_millis() as u64),
                    shards_led: led.get(id).copied().unwrap_or(0),
                    voter_of: self.rafts.len() as u32,
                }
            })
            .collect()
    }

    /// Whether the groups have voters on other nodes.
    pub fn spans_nodes(&self) -> bool {
        self.voters.len() > 1
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

    /// Checks every second for groups to snapshot, and for parts to abort.
    pub fn spawn_snapshotter(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let groups = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(g) = groups.upgrade() else { return };
                g.snapshot_flushed().await;
                g.abort_idle_parts(super::parts::IDLE_MS_MAX).await;
            }
        })
    }

    /// Proposes an `Abort` for every part of a group this node leads whose latest entry
    /// it applied more than `max_ms` ago (its writer stopped: crashed, or gave up);
    /// returns how many were proposed and committed.
    pub async fn abort_idle_parts(&self, max_ms: u64) -> usize {
        let mut aborted = 0;
        for (raft, sm) in self.rafts.iter().zip(&self.machines) {
            if raft.metrics().borrow().current_leader != Some(self.node_id) {
                continue;
            }
            for part in sm.idle_parts(max_ms) {
                match raft.client_write(Command::Abort { part }).await {
                    Ok(_) => aborted += 1,
                    Err(e) => tracing::debug!(part, error = %e, "abort of an idle part"),
                }
            }
        }
        aborted
    }

    /// Read-your-writes: waits until this node's replica of every shard in `token` has
    /// applied the token's index, at most `within` in all. A replica that applied index
    /// `i` of a group holds every write acknowledged at or before `i` (Raft commits one
    /// entry per index, and every replica applies them in order).
    pub async fn wait_applied(&self, token: &WriteToken, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        for (shard, want) in token.iter() {
            let Some(raft) = self.raft(shard) else {
                return Err(Error::InvalidParameter(format!(
                    "the write token names shard {shard}, and this cluster has {} shards: it comes from another cluster",
                    self.rafts.len()
                )));
            };
            let applied = || raft.metrics().borrow().last_applied.map(|l| l.index);
            if applied().is_some_and(|a| a >= want) {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if raft.wait(Some(left)).applied_index_at_least(Some(want), "read-your-writes").await.is_err() {
                let have = applied().map_or("nothing".to_string(), |a| format!("index {a}"));
                return Err(Error::ReplicaBehind {
                    shard,
                    reason: format!(
                        "this node's replica has applied {have} and the session's writes reached index {want}; it did not catch up \
                         within read_wait_ms_max ({} ms): retry, or read through another node",
                        within.as_millis()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Stops every group's Raft tasks.
    pub async fn shutdown(&self) {
        for raft in &self.rafts {
            let _ = raft.shutdown().await;
        }
    }

    /// Commits `cmd` through shard `shard`'s group and returns what applying it did:
    /// here if this node leads the shard, else forwarded to its leader. `retry_safe`:
    /// whether re-sending `cmd` after an unknown outcome is harmless (rows with record
    /// ids: a second copy is counted as a duplicate).
    async fn propose(&self, shard: ShardId, cmd: Command, retry_safe: bool) -> Result<Applied> {
        self.propose_resent(shard, cmd, retry_safe).await.map(|(a, _)| a)
    }

    /// [`Groups::propose`], saying whether `cmd` was sent more than once (so the answer
    /// may be the second copy's: a duplicate, or a broken part, while the first copy
    /// stored it).
    async fn propose_resent(&self, shard: ShardId, cmd: Command, retry_safe: bool) -> Result<(Applied, bool)> {
        let raft = self.raft(shard).ok_or_else(|| Error::Internal(format!("shard {shard} has no Raft group")))?;
        let deadline = Instant::now() + LEADER_WAIT;
        let unknown = |why: String| Error::ShardUnavailable { shard, reason: format!("{why}{UNKNOWN}") };
        // Whether an earlier attempt may have reached a leader.
        let mut maybe_sent = false;
        loop {
            let was_leader = raft.metrics().borrow().current_leader == Some(self.node_id);
            let leader = match raft.client_write(cmd.clone()).await {
                Ok(r) => return Ok((r.data, maybe_sent)),
                // A leader that stepped down while the entry was in flight: the next
                // leader may still commit it.
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) if was_leader && !retry_safe => {
                    return Err(unknown("this node stopped leading the shard meanwhile".into()))
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    // Led here when proposed: the entry may be in the next leader's log.
                    maybe_sent |= was_leader;
                    f.leader_id.filter(|l| *l != self.node_id).map(|l| (l, f.leader_node.map(|n| n.addr).unwrap_or_default()))
                }
                Err(e) => return Err(unknown(e.to_string())),
            };
            if let Some((leader, addr)) = &leader {
                let leader = *leader;
                let body = envelope(shard, &ForwardedWrite { command: cmd.clone() }).map_err(|e| Error::Internal(e.to_string()))?;
                // A re-sendable write asks the next leader rather than wait out one
                // that may be cut off; a second copy is counted as a duplicate.
                let wait = if retry_safe {
                    FORWARD_ATTEMPT.min(deadline.saturating_duration_since(Instant::now())).max(Duration::from_millis(100))
                } else {
                    FORWARD_TIMEOUT
                };
                match self.peers.call(addr, FORWARD, body, wait).await {
                    Ok(bytes) => match from_cbor::<ForwardAnswer>(&bytes) {
                        Ok(ForwardAnswer::Applied(a)) => return Ok((a, maybe_sent)),
                        Ok(ForwardAnswer::NotLeader { .. }) => {}
                        Ok(ForwardAnswer::Unknown(why)) if retry_safe => {
                            maybe_sent = true;
                            tracing::debug!(shard, leader, why, "forwarded write's outcome unknown; re-sending through the next leader")
                        }
                        Ok(ForwardAnswer::Unknown(why)) => return Err(unknown(format!("leader node {leader}: {why}"))),
                        Err(e) => return Err(unknown(format!("leader node {leader} answered {e}"))),
                    },
                    // The leader is gone, not serving, or did not answer in time: wait
                    // for the next one.
                    Err((_, e)) if retry_safe => {
                        maybe_sent = true;
                        tracing::debug!(shard, leader, error = %e, "forward failed; waiting for a leader")
                    }
                    Err((_, e)) => return Err(unknown(format!("forwarding to leader node {leader}: {e}"))),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = format!("no reachable leader within {} s", LEADER_WAIT.as_secs());
                return Err(if maybe_sent {
                    unknown(why)
                } else {
                    Error::ShardUnavailable { shard, reason: format!("{why}{NOTHING}") }
                });
            }
            // Wait for a (new) leader, at most a little, then try again.
            let stale = leader.map(|(l, _)| l);
            let _ = raft
                .wait(Some(left.min(Duration::from_millis(200))))
                .metrics(move |m| m.current_leader.is_some() && m.current_leader != stale, "a new leader")
                .await;
        }
    }

    /// Answers a write forwarded by another node: proposes it here once, if this node
    /// leads the shard.
    pub async fn forwarded(&self, shard: ShardId, w: ForwardedWrite) -> ForwardAnswer {
        let Some(raft) = self.raft(shard) else {
            return ForwardAnswer::Unknown(format!("no group for shard {shard}"));
        };
        let was_leader = raft.metrics().borrow().current_leader == Some(self.node_id);
        match raft.client_write(w.command).await {
            Ok(r) => ForwardAnswer::Applied(r.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) if was_leader => {
                ForwardAnswer::Unknown("the leader stepped down while the entry was in flight".into())
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => ForwardAnswer::NotLeader { leader: f.leader_id },
            Err(e) => ForwardAnswer::Unknown(e.to_string()),
        }
    }

    /// Stores one shard's rows: one `Rows` entry, or, with more than `chunk` rows, a
    /// part of several entries of at most `chunk` rows each, proposed in order and
    /// stored together when the last one is applied (all-or-nothing: see [`super::parts`]).
    async fn append_rows(&self, table: &TableDef, shard: ShardId, rows: RecordBatch, chunk: usize) -> Result<Applied> {
        let retry_safe = table.idempotency_key.is_some();
        if rows.num_rows() <= chunk {
            let cmd = Command::Rows { table: table.name.clone(), rows: ipc(&rows)?, part: None };
            return self.propose(shard, cmd, retry_safe).await;
        }
        let id: u64 = rand::random();
        let entries = rows.num_rows().div_ceil(chunk);
        let nothing = |why: &str| Error::ShardUnavailable { shard, reason: format!("{why}{NOTHING}") };
        for seq in 0..entries {
            let at = seq * chunk;
            let n = chunk.min(rows.num_rows() - at);
            let last = seq + 1 == entries;
            let part = super::parts::Part { id, seq: seq as u32, last };
            let cmd = Command::Rows { table: table.name.clone(), rows: ipc(&rows.slice(at, n))?, part: Some(part) };
            // Before the last entry nothing of the part is stored, whatever happened to
            // the entries sent so far.
            let (a, resent) = match self.propose_resent(shard, cmd, retry_safe).await {
                Ok(a) => a,
                Err(Error::ShardUnavailable { reason, .. }) if !last => {
                    let why = reason.trim_end_matches(UNKNOWN).trim_end_matches(NOTHING);
                    return Err(nothing(&format!("entry {} of the part's {entries}: {why}", seq + 1)));
                }
                Err(e) => return Err(e),
            };
            if a.aborted && last && resent {
                // The first copy of the last entry may have completed the part.
                return Err(Error::ShardUnavailable {
                    shard,
                    reason: format!("the last of the part's {entries} log entries was re-sent after a lost answer{UNKNOWN}"),
                });
            }
            if a.aborted {
                return Err(nothing(&format!(
                    "the shard's leader changed while its part of {} rows ({entries} log entries) was being written",
                    rows.num_rows()
                )));
            }
            if last {
                return Ok(a);
            }
        }
        unreachable!("a part has a last entry")
    }

    /// Stores `all` as `Rows` entries of each shard's group, the shards at once.
    async fn append_by_shard(&self, table: &TableDef, shard_count: u32, all: &RecordBatch, chunk: usize) -> Result<AppendOutcome> {
        let parts = split_by_shard(table, shard_count, all)?;
        let proposals = parts.into_iter().map(|(shard, rows)| async move { self.append_rows(table, shard, rows, chunk).await.map(|a| (shard, a)) });
        let mut outcome = AppendOutcome::default();
        first_error(futures::future::join_all(proposals).await, |(shard, a)| {
            outcome.added += a.stored;
            outcome.present += a.duplicates;
            outcome.token.note(shard, a.index);
        })?;
        Ok(outcome)
    }
}

/// Hands every success to `ok` (all of them, so that nothing stored goes uncounted)
/// and returns the first error, if any.
fn first_error<T>(results: impl IntoIterator<Item = Result<T>>, mut ok: impl FnMut(T)) -> Result<()> {
    let mut first = None;
    for r in results {
        match r {
            Ok(v) => ok(v),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(()), Err)
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
        if self.spans_nodes() {
            // Each replica writes its own segments from the rows in the log.
            return self.append_by_shard(table, layout.shard_count, &all, ENTRY_ROWS_MAX).await;
        }
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
        self.append_by_shard(table, layout.shard_count, &all, usize::MAX).await
    }

    async fn adopt(&self, table: &TableDef, segments: Vec<SegmentMeta>, mut ids: ShardIds, present: u64) -> Result<AppendOutcome> {
        if self.spans_nodes() {
            // Replicas have their own stores: the files' rows travel in the log (a bulk
            // COPY costs a re-read of what it wrote here), then the files go.
            let paths: Vec<String> = segments.iter().map(|s| s.path.clone()).collect();
            let mut batches = Vec::new();
            for seg in &segments {
                let read = self.storage.read_segment(seg, None).await.and_then(|bs| {
                    bs.into_iter().map(|b| Ok(RecordBatch::try_new(Arc::clone(&table.schema), b.columns().to_vec())?)).collect::<Result<Vec<_>>>()
                });
                match read {
                    Ok(b) => batches.extend(b),
                    Err(e) => {
                        self.storage.delete_quietly(&paths).await;
                        return Err(e);
                    }
                }
            }
            self.storage.delete_quietly(&paths).await;
            let mut outcome = self.append(table, batches).await?;
            outcome.present += present;
            return Ok(outcome);
        }
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
                (shard, n, paths, self.propose(shard, cmd, false).await)
            }
        });
        let mut outcome = AppendOutcome { present, ..Default::default() };
        let mut refused: HashMap<ShardId, Vec<String>> = HashMap::new();
        let proposed = futures::future::join_all(proposals).await.into_iter().map(|(shard, n, paths, r)| r.map(|a| (shard, n, paths, a)));
        let result = first_error(proposed, |(shard, n, paths, a)| {
            if a.refused {
                refused.insert(shard, paths);
            } else {
                outcome.added += a.stored;
                outcome.segments += n;
                outcome.token.note(shard, a.index);
            }
        });
        if !refused.is_empty() {
            let paths: Vec<String> = refused.values().flatten().cloned().collect();
            self.storage.delete_quietly(&paths).await;
            let mut shards: Vec<ShardId> = refused.into_keys().collect();
            shards.sort_unstable();
            return Err(Error::SerializationFailure(format!(
                "a concurrent statement stored some of this statement's records in shard(s) {shards:?}, so those parts were not stored; retry it (stored records are skipped)"
            )));
        }
        result.map(|()| outcome)
    }
}
