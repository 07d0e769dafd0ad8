//! The history checker shared by the fault tests (`replication.rs`, processes and
//! containers) and the seeded simulation (`raft_sim.rs`): what clients saw of their
//! writes and reads, checked against what each replica stores.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray};
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftStateMachine};

/// What a client saw of one write statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ok,
    /// An error, a timeout or a lost connection: the rows may or may not be stored.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct WriteOp {
    pub session: usize,
    pub ids: Vec<String>,
    /// Its records all fall in one shard: every replica holds all of them or none.
    pub whole: bool,
    pub outcome: Outcome,
    /// Microseconds since the run started.
    pub start_us: u64,
    pub end_us: u64,
}

/// A read of one session's own records.
#[derive(Debug, Clone)]
pub struct ReadOp {
    pub session: usize,
    pub start_us: u64,
    pub saw: BTreeSet<String>,
}

#[derive(Debug, Default)]
pub struct History {
    pub writes: Vec<WriteOp>,
    pub reads: Vec<ReadOp>,
}

/// Every way a history and the replicas' contents can disagree.
#[derive(Debug, Default, PartialEq)]
pub struct Verdict {
    /// (replica, record): acknowledged, missing.
    pub lost: Vec<(String, String)>,
    /// (replica, record, copies): stored more than once.
    pub duplicated: Vec<(String, String, usize)>,
    /// (replica, record): stored, never written by anyone.
    pub phantom: Vec<(String, String)>,
    /// Replicas whose records differ from the first replica's.
    pub diverged: Vec<String>,
    /// (session, record): a read missed a record its session had acknowledged before it.
    pub stale_reads: Vec<(usize, String)>,
    /// (replica, write, records stored, records written): a one-shard statement stored
    /// in part.
    pub torn: Vec<(String, usize, usize, usize)>,
}

impl Verdict {
    pub fn writes_ok(&self) -> bool {
        self.lost.is_empty() && self.duplicated.is_empty() && self.phantom.is_empty() && self.diverged.is_empty() && self.torn.is_empty()
    }
}

/// Checks `history` against the records each replica stores (with repeats).
pub fn check(history: &History, replicas: &BTreeMap<String, Vec<String>>) -> Verdict {
    let mut v = Verdict::default();
    let attempted: BTreeSet<&str> = history.writes.iter().flat_map(|w| w.ids.iter().map(String::as_str)).collect();
    let acked: BTreeSet<&str> =
        history.writes.iter().filter(|w| w.outcome == Outcome::Ok).flat_map(|w| w.ids.iter().map(String::as_str)).collect();
    let mut first: Option<BTreeSet<&str>> = None;
    for (name, records) in replicas {
        let mut copies: HashMap<&str, usize> = HashMap::new();
        for r in records {
            *copies.entry(r.as_str()).or_default() += 1;
        }
        for id in &acked {
            if !copies.contains_key(id) {
                v.lost.push((name.clone(), id.to_string()));
            }
        }
        let mut dup: Vec<_> = copies.iter().filter(|(_, n)| **n > 1).map(|(id, n)| (name.clone(), id.to_string(), *n)).collect();
        dup.sort();
        v.duplicated.extend(dup);
        let mut ph: Vec<_> = copies.keys().filter(|id| !attempted.contains(*id)).map(|id| (name.clone(), id.to_string())).collect();
        ph.sort();
        v.phantom.extend(ph);
        for (i, w) in history.writes.iter().enumerate().filter(|(_, w)| w.whole) {
            let n = w.ids.iter().filter(|id| copies.contains_key(id.as_str())).count();
            if n != 0 && n != w.ids.len() {
                v.torn.push((name.clone(), i, n, w.ids.len()));
            }
        }
        let set: BTreeSet<&str> = copies.keys().copied().collect();
        match &first {
            None => first = Some(set),
            Some(f) if *f != set => v.diverged.push(name.clone()),
            Some(_) => {}
        }
    }
    for r in &history.reads {
        for w in history.writes.iter().filter(|w| w.session == r.session && w.outcome == Outcome::Ok && w.end_us <= r.start_us) {
            for id in &w.ids {
                if !r.saw.contains(id) {
                    v.stale_reads.push((r.session, id.clone()));
                }
            }
        }
    }
    v
}

/// What replica `dir` holds: its segments, plus the entries of its log that its
/// manifest does not cover yet, applied as a restart would (on a copy). Called after
/// the replicas converged (every node had applied its whole log), so every entry in a
/// log is committed, even where the kill came before the node's record of the committed
/// index reached the disk.
pub async fn audit(dir: &Path) -> Vec<String> {
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir, copy.path());
    let cfg = tidemark::config::Config { data_dir: copy.path().to_path_buf(), ..tidemark::config::Config::default() };
    let catalog = Arc::new(tidemark::catalog::Catalog::load_or_init(&cfg.data_dir).unwrap());
    let storage =
        tidemark::storage::Storage::open_with(&cfg, Arc::clone(&catalog), tidemark::clock::Clock::fixed(0), false).await.unwrap();
    let db = tidemark::raft::log_store::LogDb::open(&copy.path().join("raft").join("log.redb")).unwrap();
    let shards = storage.snapshot().tables.iter().map(|t| t.shard_count).max().unwrap();
    for g in 0..shards {
        let mut sm = tidemark::raft::state_machine::StateMachine::open(Arc::clone(&storage), g).unwrap();
        let mut log = db.group(g);
        let applied = sm.applied_state().await.unwrap().0.map_or(0, |l| l.index + 1);
        let Some(last) = log.get_log_state().await.unwrap().last_log_id else { continue };
        if last.index >= applied {
            let entries = log.try_get_log_entries(applied..=last.index).await.unwrap();
            sm.apply(entries).await.unwrap();
        }
    }
    storage.flush_buffer().await.unwrap();
    let mut ids = Vec::new();
    for seg in storage.snapshot().segments.iter().filter(|s| s.table == "usage") {
        for b in storage.read_segment(seg, Some("record_id")).await.unwrap() {
            let col = b.column(0).as_string::<i32>();
            ids.extend((0..col.len()).map(|i| col.value(i).to_string()));
        }
    }
    ids
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

