//! Replication with openraft (0.9, storage v2): every shard is a Raft group whose log
//! carries the shard's writes; its state machine applies them into storage (the write
//! buffer, then segments), so every replica of a shard stores the same rows.
//!
//! - [`log_store`]: the node's groups' logs in one redb file, with group commit;
//! - [`state_machine`]: one group's apply, its durable state in the segment manifest,
//!   and its snapshots (the shard's segment list);
//! - [`network`]: how a group reaches its peers (the internal Flight endpoint,
//!   multiplexed by group id; [`heartbeats`]: the groups' heartbeats to one peer
//!   batched into one message), and [`service`]: how it answers them;
//! - [`groups`]: the node's groups, and the write path over them ([`groups::Groups`]
//!   is the storage's `Replicator`; a write to a shard led elsewhere is forwarded).
//!
//! Steps of issue 12 done: storage passing openraft's suite (1); the one-node cluster
//! of the same code as the default (2); groups spanning nodes, each replica with its
//! own store (3, first part: every shard on every node, the voters fixed by
//! `peers`); read-your-writes (4: each `Applied` carries its log index, a write's
//! outcome its per-shard positions, and [`groups::Groups::wait_applied`] is the read
//! barrier); parts of several entries stored whole ([`parts`]); fault tests in
//! processes, containers and a seeded in-process simulation (`tests/raft_sim.rs`, through
//! [`network::Transport`]). Not yet: membership changes (`--join`, removal, replication below the
//! node count), the metadata group, containers.
//!
//! Owns: what a shard group's log entries carry ([`Command`]) and answer ([`Applied`]).

pub mod groups;
pub mod heartbeats;
pub mod log_store;
pub mod network;
pub mod parts;
pub mod service;
pub mod state_machine;

use serde::{Deserialize, Serialize};

use crate::storage::manifest::SegmentMeta;

openraft::declare_raft_types!(
    /// The type configuration of a shard's Raft group.
    pub ShardGroup:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = tokio::fs::File,
);

/// One entry of a shard's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// The rows of one statement that fall in this shard, validated and in the table's
    /// schema, as an Arrow IPC stream. Which of them are new (by record id) is decided
    /// when the entry is applied, in log order, so every replica decides alike.
    /// A part with more rows than one entry holds is several entries (`part`), stored
    /// together when its last one is applied ([`parts`]).
    Rows {
        table: String,
        #[serde(with = "serde_bytes")]
        rows: Vec<u8>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        part: Option<parts::Part>,
    },
    /// Drops an unfinished part (its writer stopped sending): the leader proposes it
    /// for a part idle for `parts::IDLE_MS_MAX`.
    Abort { part: u64 },
    /// Segment files of this shard that the leader wrote for a large statement (named by
    /// no manifest until this entry is applied), and the index keys of their rows
    /// (16 bytes each, little-endian): applied whole, or refused whole if an earlier
    /// entry stored one of those records.
    Adopt {
        table: String,
        segments: Vec<SegmentMeta>,
        #[serde(with = "serde_bytes")]
        ids: Vec<u8>,
    },
}

/// What applying an entry did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Rows stored by this entry.
    pub stored: u64,
    /// Rows whose record id an earlier entry had stored (idempotent re-sends).
    pub duplicates: u64,
    /// An `Adopt` refused because an earlier entry stored some of its records.
    pub refused: bool,
    /// The entry's log index (a replica that applied it holds what it stored).
    #[serde(default)]
    pub index: u64,
    /// An entry of a part that cannot complete (out of sequence, or the part was
    /// dropped): nothing of the part is stored.
    #[serde(default)]
    pub aborted: bool,
}

pub type StorageError = openraft::StorageError<u64>;

fn io_error(subject: openraft::ErrorSubject<u64>, verb: openraft::ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageError::IO { source: openraft::StorageIOError::new(subject, verb, openraft::AnyError::new(&e)) }
}

/// Index keys as an `Adopt` entry carries them.
pub fn encode_ids(ids: impl IntoIterator<Item = u128>) -> Vec<u8> {
    ids.into_iter().flat_map(|h| h.to_le_bytes()).collect()
}

pub fn decode_ids(bytes: &[u8]) -> Vec<u128> {
    bytes.chunks_exact(16).map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes"))).collect()
}

#[cfg(test)]
mod tests {
    use super::log_store::LogStore;
    use super::state_machine::StateMachine;
    use super::*;
    use crate::catalog::{Catalog, TableDef};
    use crate::clock::Clock;
    use crate::config::Config;
    use crate::storage::Storage;
    use datafusion::arrow::array::{Decimal128Array, RecordBatch, StringArray, TimestampMicrosecondArray};
    use openraft::testing::{StoreBuilder, Suite};
    use std::sync::Arc;

    async fn open_storage(dir: &std::path::Path) -> (Arc<Storage>, Arc<TableDef>) {
        let cfg = Config { data_dir: dir.to_path_buf(), ..Config::default() };
        let catalog = Arc::new(Catalog::load_or_init(&cfg.data_dir).unwrap());
        let table = catalog.get("usage").cloned().unwrap();
        (Storage::open(&cfg, catalog, Clock::fixed(0)).await.unwrap(), table)
    }

    /// Rows of one entity (so one shard) with the given record ids.
    fn rows(table: &TableDef, ids: &[&str]) -> RecordBatch {
        let n = ids.len();
        let s = |v: Vec<String>| Arc::new(StringArray::from(v)) as _;
        let day = 1_767_571_200_000_000i64; // 2026-01-05
        RecordBatch::try_new(
            Arc::clone(&table.schema),
            vec![
                s(ids.iter().map(|i| i.to_string()).collect()),
                s(vec!["acct-001".into(); n]),
                s(vec!["storage".into(); n]),
                s(vec!["GetObject".into(); n]),
                s(vec!["Requests".into(); n]),
                s(vec!["eu".into(); n]),
                Arc::new(Decimal128Array::from(vec![1_000_000i128; n]).with_precision_and_scale(38, 6).unwrap()),
                Arc::new(TimestampMicrosecondArray::from((0..n).map(|i| day + i as i64 * 1_000_000).collect::<Vec<_>>())),
                Arc::new(TimestampMicrosecondArray::from(vec![day; n])),
            ],
        )
        .unwrap()
    }

    fn ipc(batch: &RecordBatch) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, &batch.schema()).unwrap();
        w.write(batch).unwrap();
        w.finish().unwrap();
        drop(w);
        out
    }

    fn entry(index: u64, table: &TableDef, ids: &[&str]) -> openraft::Entry<ShardGroup> {
        openraft::Entry {
            log_id: openraft::testing::log_id(1, 0, index),
            payload: openraft::EntryPayload::Normal(Command::Rows { table: table.name.clone(), rows: ipc(&rows(table, ids)), part: None }),
        }
    }

    fn shard() -> crate::shard_map::ShardId {
        crate::shard_map::shard_of("acct-001", Config::default().shard_count)
    }

    struct OnDisk;

    impl StoreBuilder<ShardGroup, LogStore, StateMachine, tempfile::TempDir> for OnDisk {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
            let dir = tempfile::tempdir().unwrap();
            let log = LogStore::open(&dir.path().join("raft/log.redb"))?;
            // Opened on a thread of its own: the suite wants a future that is Send for
            // every lifetime, which storage's start-up future is not.
            let path = dir.path().to_path_buf();
            let storage = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(open_storage(&path)).0
            })
            .join()
            .unwrap();
            let sm = StateMachine::open(storage, 0)?;
            Ok((dir, log, sm))
        }
    }

    /// openraft's own test suite for log stores and state machines.
    #[test]
    fn the_log_store_and_state_machine_pass_openraft_storage_suite() {
        Suite::test_all(OnDisk).unwrap();
    }

    #[tokio::test]
    async fn log_vote_and_committed_survive_a_reopen() {
        use openraft::storage::{RaftLogReader, RaftLogStorage};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.redb");
        let (_, table) = open_storage(dir.path()).await;
        {
            let mut log = LogStore::open(&path).unwrap();
            log.write_entries((1..=10).map(|i| entry(i, &table, &["x"]))).await.unwrap();
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
        assert_eq!(entries[0], entry(4, &table, &["x"]));
        assert_eq!(log.read_vote().await.unwrap(), Some(openraft::Vote::new_committed(1, 0)));
        assert_eq!(log.read_committed().await.unwrap(), Some(openraft::testing::log_id(1, 0, 7)));
    }

    /// Groups share one database: each sees only its own entries, and concurrent
    /// appends of many groups all land.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn groups_share_one_log_database() {
        use openraft::storage::{RaftLogReader, RaftLogStorage};
        let dir = tempfile::tempdir().unwrap();
        let (_, table) = open_storage(dir.path()).await;
        let db = super::log_store::LogDb::open(&dir.path().join("log.redb")).unwrap();
        let tasks: Vec<_> = (0..8u32)
            .map(|g| {
                let log = db.group(g);
                let table = Arc::clone(&table);
                tokio::spawn(async move {
                    for i in 1..=(5 + g as u64) {
                        log.write_entries([entry(i, &table, &["y"])]).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        for g in 0..8u32 {
            let mut log = db.group(g);
            let last = log.get_log_state().await.unwrap().last_log_id.map(|l| l.index);
            assert_eq!(last, Some(5 + g as u64));
            assert_eq!(log.try_get_log_entries(..).await.unwrap().len(), 5 + g as usize);
        }
        db.group(3).truncate(openraft::testing::log_id(1, 0, 2)).await.unwrap();
        assert_eq!(db.group(3).try_get_log_entries(..).await.unwrap().len(), 1);
        assert_eq!(db.group(4).try_get_log_entries(..).await.unwrap().len(), 9);
    }

    /// Replicas that apply the same log store the same rows: the first entry carrying
    /// a record id stores it, later ones count it as a duplicate; the applied state
    /// reaches the manifest with the flush that stores the rows, and a reopened state
    /// machine starts from there.
    #[tokio::test]
    async fn replicas_decide_duplicates_by_log_order_alike() {
        use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let mut answers = Vec::new();
        let mut stored = Vec::new();
        for (k, d) in dirs.iter().enumerate() {
            let (storage, table) = open_storage(d.path()).await;
            let log = vec![
                entry(1, &table, &["a", "b"]),
                entry(2, &table, &["b", "c"]),
                entry(3, &table, &["a"]),
                entry(4, &table, &["d", "d"]),
            ];
            let mut sm = StateMachine::open(Arc::clone(&storage), shard()).unwrap();
            // One replica applies entry by entry, the other in one call.
            let mut a = Vec::new();
            if k == 0 {
                for e in &log {
                    a.extend(sm.apply([e.clone()]).await.unwrap());
                }
            } else {
                a = sm.apply(log.clone()).await.unwrap();
            }
            answers.push(a);
            assert_eq!(storage.view().1.rows, 4, "applied rows wait in the write buffer");
            assert_eq!(storage.group_state(shard()), None, "nothing durable before a flush");
            let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
            assert_eq!(snap.meta.last_log_id, Some(openraft::testing::log_id(1, 0, 4)));
            stored.push(stored_ids(&storage).await);
            let reopened = StateMachine::open(Arc::clone(&storage), shard()).unwrap();
            assert_eq!(reopened.state().applied, Some(openraft::testing::log_id(1, 0, 4)));
        }
        assert_eq!(answers[0], answers[1]);
        assert_eq!(stored[0], stored[1]);
        let counts: Vec<(u64, u64)> = answers[0].iter().map(|a| (a.stored, a.duplicates)).collect();
        assert_eq!(counts, vec![(2, 0), (1, 1), (0, 1), (1, 1)]);
        assert_eq!(stored[0], ["a", "b", "c", "d"]);
        // After a restart of the storage the index still refuses the stored ids.
        let (storage, table) = open_storage(dirs[0].path()).await;
        let mut sm = StateMachine::open(Arc::clone(&storage), shard()).unwrap();
        let again = sm.apply([entry(5, &table, &["c", "e"])]).await.unwrap();
        assert_eq!((again[0].stored, again[0].duplicates), (1, 1));
    }

    /// An `Adopt` whose records an earlier entry stored is refused whole, and names no
    /// file; one that is new names its files in one commit.
    #[tokio::test]
    async fn an_adopt_of_stored_records_is_refused_whole() {
        use openraft::storage::RaftStateMachine;
        let dir = tempfile::tempdir().unwrap();
        let (storage, table) = open_storage(dir.path()).await;
        let mut sm = StateMachine::open(Arc::clone(&storage), shard()).unwrap();
        sm.apply([entry(1, &table, &["a"])]).await.unwrap();
        let write = |ids: &'static [&'static str]| {
            let (storage, table) = (Arc::clone(&storage), Arc::clone(&table));
            async move {
                let batch = rows(&table, ids);
                let layout = storage.layout(&table.name).unwrap();
                let mut n = 0;
                let segs = storage.write_segments(&table, &layout, &batch, &mut n).await.unwrap();
                let keys = encode_ids(ids.iter().map(|i| crate::storage::id_key(shard(), i)));
                Command::Adopt { table: table.name.clone(), segments: segs, ids: keys }
            }
        };
        let refused = write(&["a", "z"]).await;
        let fresh = write(&["x", "y"]).await;
        let e = |i, c| openraft::Entry { log_id: openraft::testing::log_id(1, 0, i), payload: openraft::EntryPayload::Normal(c) };
        let out = sm.apply([e(2, refused), e(3, fresh)]).await.unwrap();
        assert!(out[0].refused && out[0].stored == 0, "{:?}", out[0]);
        assert_eq!((out[1].refused, out[1].stored), (false, 2));
        // The buffered row of entry 1 was flushed before the adopted files were named,
        // so the manifest's state for the group covers every entry up to 3.
        let m = storage.snapshot();
        assert_eq!(m.segments.iter().map(|s| s.rows).sum::<u64>(), 3);
        assert_eq!(StateMachine::open(Arc::clone(&storage), shard()).unwrap().state().applied.map(|l| l.index), Some(3));
    }

    fn part_entry(term: u64, index: u64, table: &TableDef, ids: &[&str], id: u64, seq: u32, last: bool) -> openraft::Entry<ShardGroup> {
        let part = Some(parts::Part { id, seq, last });
        openraft::Entry {
            log_id: openraft::testing::log_id(term, 0, index),
            payload: openraft::EntryPayload::Normal(Command::Rows { table: table.name.clone(), rows: ipc(&rows(table, ids)), part }),
        }
    }

    async fn stored_ids(storage: &Storage) -> Vec<String> {
        storage.flush_for_snapshot().await.unwrap();
        let mut ids: Vec<String> = Vec::new();
        for seg in storage.group_segments(shard()) {
            for b in storage.read_segment(&seg, Some("record_id")).await.unwrap() {
                let col = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
                ids.extend(col.iter().map(|v| v.unwrap().to_string()));
            }
        }
        ids.sort();
        ids
    }

    /// A part of several entries is stored when its last entry is applied, not before;
    /// a crash in the middle (the manifest flushed with the part half applied) restarts
    /// the group from before the part, and the replica ends with the same rows as one
    /// that applied the log straight through.
    #[tokio::test]
    async fn a_part_of_several_entries_is_stored_whole_after_a_crash_in_its_middle() {
        use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let (_, table) = open_storage(dirs[0].path()).await;
        let log = vec![
            entry(1, &table, &["a"]),
            part_entry(1, 2, &table, &["p1", "p2"], 9, 0, false),
            entry(3, &table, &["b", "p3"]),
            part_entry(1, 4, &table, &["p3", "p4"], 9, 1, false),
            part_entry(1, 5, &table, &["p5"], 9, 2, true),
            entry(6, &table, &["c"]),
        ];
        // Straight through.
        let (storage, _) = open_storage(dirs[0].path()).await;
        let mut sm = StateMachine::open(Arc::clone(&storage), shard()).unwrap();
        let mut answers = Vec::new();
        for e in &log[..4] {
            answers.extend(sm.apply([e.clone()]).await.unwrap());
        }
        assert_eq!(storage.view().1.rows, 3, "the part's rows wait for its last entry");
        assert_eq!(sm.staged(), (1, 2));
        answers.extend(sm.apply(log[4..].to_vec()).await.unwrap());
        assert_eq!(sm.staged(), (0, 0));
        let counts: Vec<(u64, u64, bool)> = answers.iter().map(|a| (a.stored, a.duplicates, a.aborted)).collect();
        assert_eq!(counts, [(1, 0, false), (0, 0, false), (2, 0, false), (0, 0, false), (4, 1, false), (1, 0, false)]);
        let straight = stored_ids(&storage).await;
        assert_eq!(straight, ["a", "b", "c", "p1", "p2", "p3", "p4", "p5"]);

        // Crashed with the part open: what the manifest records is from before it.
        let (storage, _) = open_storage(dirs[1].path()).await;
        let mut sm = StateMachine::open(Arc::clone(&storage), shard()).unwrap();
        sm.apply(log[..4].to_vec()).await.unwrap();
        let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(1), "a snapshot in a part's middle is of the state before it");
        drop(sm);
        drop(storage);
        let (storage, _) = open_storage(dirs[1].path()).await;
        let mut sm = StateMachine::open(Arc::clone(&storage), shard()).unwrap();
        let from = sm.state().applied.map_or(0, |l| l.index) as usize;
        assert_eq!(from, 1);
        // openraft re-applies the committed entries after the recorded state.
        let again = sm.apply(log[from..].to_vec()).await.unwrap();
        assert!(again.iter().all(|a| !a.aborted), "{again:?}");
        assert_eq!(stored_ids(&storage).await, straight);
        assert_eq!(sm.state().applied.map(|l| l.index), Some(6));
    }

    /// A part whose leader changed before its last entry stores nothing, on every
    /// replica alike; so does one that an `Abort` entry dropped.
    #[tokio::test]
    async fn a_part_broken_by_a_new_term_or_an_abort_stores_nothing() {
        use openraft::storage::RaftStateMachine;
        let dir = tempfile::tempdir().unwrap();
        let (storage, table) = open_storage(dir.path()).await;
        let mut sm = StateMachine::open(Arc::clone(&storage), shard()).unwrap();
        let blank = openraft::Entry { log_id: openraft::testing::log_id(2, 0, 2), payload: openraft::EntryPayload::Blank };
        let abort = openraft::Entry {
            log_id: openraft::testing::log_id(2, 0, 5),
            payload: openraft::EntryPayload::Normal(Command::Abort { part: 8 }),
        };
        let out = sm
            .apply([
                part_entry(1, 1, &table, &["x1"], 7, 0, false),
                blank,
                part_entry(2, 3, &table, &["x2"], 7, 1, true),
                part_entry(2, 4, &table, &["y1"], 8, 0, false),
                abort,
                part_entry(2, 6, &table, &["y2"], 8, 1, true),
            ])
            .await
            .unwrap();
        let aborted: Vec<bool> = out.iter().map(|a| a.aborted).collect();
        assert_eq!(aborted, [false, false, true, false, false, true]);
        assert_eq!(out.iter().map(|a| a.stored).sum::<u64>(), 0);
        assert_eq!(sm.staged(), (0, 0));
        assert!(stored_ids(&storage).await.is_empty());
        assert_eq!(sm.state().applied.map(|l| l.index), Some(6));
    }

    /// A snapshot carries a shard's segment files, from a file, in chunks, to a replica
    /// with a store of its own, which then holds the same rows; a truncated one is
    /// refused and installs nothing.
    #[tokio::test]
    async fn a_snapshot_file_carries_the_segments_to_another_replica() {
        use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let (from, table) = open_storage(dirs[0].path()).await;
        let mut leader = StateMachine::open(Arc::clone(&from), shard()).unwrap().carrying_files(true);
        leader.apply([entry(1, &table, &["a", "b"]), entry(2, &table, &["c"])]).await.unwrap();
        let mut snap = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let mut bytes = Vec::new();
        snap.snapshot.read_to_end(&mut bytes).await.unwrap();
        assert!(std::fs::read_dir(dirs[0].path().join("raft/snapshots")).unwrap().count() == 1);
        let current = leader.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snap.meta);

        // Received in chunks, as openraft writes them.
        let (to, _) = open_storage(dirs[1].path()).await;
        let mut follower = StateMachine::open(Arc::clone(&to), shard()).unwrap().carrying_files(true);
        let mut recv = follower.begin_receiving_snapshot().await.unwrap();
        for chunk in bytes.chunks(7) {
            recv.write_all(chunk).await.unwrap();
        }
        recv.flush().await.unwrap();
        follower.install_snapshot(&snap.meta, recv).await.unwrap();
        assert_eq!(stored_ids(&to).await, ["a", "b", "c"]);
        assert_eq!(follower.state().applied.map(|l| l.index), Some(2));
        assert_eq!(follower.get_current_snapshot().await.unwrap().unwrap().meta, snap.meta);

        let (other, _) = open_storage(dirs[2].path()).await;
        let mut third = StateMachine::open(Arc::clone(&other), shard()).unwrap().carrying_files(true);
        let mut recv = third.begin_receiving_snapshot().await.unwrap();
        recv.write_all(&bytes[..bytes.len() - 10]).await.unwrap();
        recv.flush().await.unwrap();
        assert!(third.install_snapshot(&snap.meta, recv).await.is_err());
        assert!(stored_ids(&other).await.is_empty());
        assert_eq!(third.state().applied, None);
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
            let tdir = tempfile::tempdir().unwrap();
            let (_, table) = open_storage(tdir.path()).await;
            let log = LogStore::open(std::path::Path::new(&path)).unwrap();
            let mut next = 1;
            for _ in 0..100_000 {
                let n = 1 + next % 7;
                log.write_entries((next..next + n).map(|i| entry(i, &table, &["r"]))).await.unwrap();
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
