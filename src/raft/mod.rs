//! Replication with openraft (0.9, storage v2): the type configuration of a shard's Raft
//! group, its durable log store ([`log_store`]) and its state machine
//! ([`state_machine`]).
//!
//! Step 1 of replication (issue 12): one shard group's storage, passing openraft's
//! storage test suite and surviving a reopen. Not yet wired: the Raft nodes themselves,
//! their network over the internal Flight endpoint, the metadata group, and applying
//! into the write buffer and segments (the state machine keeps its accepted batches
//! itself for now, see [`state_machine`]).
//!
//! Owns: what a shard group's log entries carry ([`Command`]) and answer ([`Applied`]).

pub mod log_store;
pub mod state_machine;

use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// The type configuration of a shard's Raft group.
    pub ShardGroup:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// One entry of a shard's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// The rows of one statement that fall in this shard: their record ids, in row
    /// order, and the rows as an Arrow IPC stream. Which of them are new is decided
    /// when the entry is applied, in log order, so every replica decides alike.
    Append { record_ids: Vec<String>, rows: Vec<u8> },
}

/// What applying an entry did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Rows stored by this entry.
    pub stored: u64,
    /// Rows whose record id an earlier entry had stored (idempotent re-sends).
    pub duplicates: u64,
}

pub type StorageError = openraft::StorageError<u64>;

fn io_error(subject: openraft::ErrorSubject<u64>, verb: openraft::ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageError::IO { source: openraft::StorageIOError::new(subject, verb, openraft::AnyError::new(&e)) }
}

#[cfg(test)]
mod tests {
    use super::log_store::LogStore;
    use super::state_machine::StateMachine;
    use super::*;
    use openraft::testing::{StoreBuilder, Suite};

    struct OnDisk;

    impl StoreBuilder<ShardGroup, LogStore, StateMachine, tempfile::TempDir> for OnDisk {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
            let dir = tempfile::tempdir().unwrap();
            let log = LogStore::open(&dir.path().join("log.redb"))?;
            let sm = StateMachine::open(&dir.path().join("sm"))?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's own test suite for log stores and state machines.
    #[test]
    fn the_log_store_and_state_machine_pass_openraft_storage_suite() {
        Suite::test_all(OnDisk).unwrap();
    }

    fn append(index: u64, ids: &[&str]) -> openraft::Entry<ShardGroup> {
        openraft::Entry {
            log_id: openraft::testing::log_id(1, 0, index),
            payload: openraft::EntryPayload::Normal(Command::Append {
                record_ids: ids.iter().map(|s| s.to_string()).collect(),
                rows: format!("rows of {index}").into_bytes(),
            }),
        }
    }

    #[tokio::test]
    async fn log_vote_and_committed_survive_a_reopen() {
        use openraft::storage::{RaftLogReader, RaftLogStorage};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        {
            let mut log = LogStore::open(&path).unwrap();
            log.write_entries((1..=10).map(|i| append(i, &["x"]))).unwrap();
            log.save_vote(&openraft::Vote::new_committed(1, 0)).await.unwrap();
            log.save_committed(Some(openraft::testing::log_id(1, 0, 7))).await.unwrap();
            log.purge(openraft::testing::log_id(1, 0, 3)).await.unwrap();
            log.truncate(openraft::testing::log_id(1, 0, 9)).await.unwrap();
        }
        let mut log = LogStore::open(&path).unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(openraft::testing::log_id(1, 0, 3)));
        assert_eq!(state.last_log_id, Some(openraft::testing::log_id(1, 0, 8)));
        let entries = log.try_get_log_entries(0..100).await.unwrap();
        assert_eq!(entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), (4..=8).collect::<Vec<_>>());
        assert_eq!(entries[0], append(4, &["x"]));
        assert_eq!(log.read_vote().await.unwrap(), Some(openraft::Vote::new_committed(1, 0)));
        assert_eq!(log.read_committed().await.unwrap(), Some(openraft::testing::log_id(1, 0, 7)));
    }

    /// Replicas that apply the same log store the same rows: the first entry carrying
    /// a record id stores it, later ones count it as a duplicate; a snapshot restores
    /// the state after a reopen.
    #[tokio::test]
    async fn replicas_decide_duplicates_by_log_order_alike() {
        use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
        let log = vec![append(1, &["a", "b"]), append(2, &["b", "c"]), append(3, &["a"]), append(4, &["d", "d"])];
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let mut answers = Vec::new();
        let mut states = Vec::new();
        for d in &dirs {
            let mut sm = StateMachine::open(d.path()).unwrap();
            // One replica applies entry by entry, the other in one call.
            let mut a = Vec::new();
            if answers.is_empty() {
                for e in &log {
                    a.extend(sm.apply([e.clone()]).await.unwrap());
                }
            } else {
                a = sm.apply(log.clone()).await.unwrap();
            }
            answers.push(a);
            states.push(sm.state());
            sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        }
        assert_eq!(answers[0], answers[1]);
        assert_eq!(states[0], states[1]);
        let counts: Vec<(u64, u64)> = answers[0].iter().map(|a| (a.stored, a.duplicates)).collect();
        assert_eq!(counts, vec![(2, 0), (1, 1), (0, 1), (1, 1)]);
        assert_eq!(states[0].record_ids.iter().cloned().collect::<Vec<_>>(), ["a", "b", "c", "d"]);
        assert_eq!(states[0].batches.iter().map(|b| b.index).collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!(states[0].applied, Some(openraft::testing::log_id(1, 0, 4)));
        let reopened = StateMachine::open(dirs[0].path()).unwrap();
        assert_eq!(reopened.state(), states[0]);
    }

    const KILL_CHILD: &str = "TIDEMARK_RAFT_KILL_CHILD";

    /// kill -9 of a process in the middle of appends: after a reopen every entry whose
    /// append had returned is there, the log has no gap and every entry decodes.
    #[tokio::test]
    async fn a_log_killed_mid_append_keeps_every_acknowledged_entry() {
        use openraft::storage::{RaftLogReader, RaftLogStorage};
        use std::io::BufRead;
        if let Ok(path) = std::env::var(KILL_CHILD) {
            // The child: append batches of entries until killed (bounded all the same).
            let log = LogStore::open(std::path::Path::new(&path)).unwrap();
            let mut next = 1;
            for _ in 0..100_000 {
                let n = 1 + next % 7;
                log.write_entries((next..next + n).map(|i| append(i, &["r"]))).unwrap();
                next += n;
                println!("acked {}", next - 1);
            }
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["raft::tests::a_log_killed_mid_append_keeps_every_acknowledged_entry", "--exact", "--nocapture", "--test-threads=1"])
            .env(KILL_CHILD, &path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut acked = 0u64;
        let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines {
            if let Some(n) = line.unwrap().strip_prefix("acked ") {
                acked = n.trim().parse().unwrap();
                if acked >= 300 {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(acked >= 300, "the child stopped early at {acked}");
        let mut log = LogStore::open(&path).unwrap();
        let last = log.get_log_state().await.unwrap().last_log_id.unwrap().index;
        assert!(last >= acked, "acknowledged {acked}, found {last}");
        let entries = log.try_get_log_entries(0..=last).await.unwrap();
        assert_eq!(entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), (1..=last).collect::<Vec<_>>());
    }
}
