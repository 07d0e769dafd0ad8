//! Crash and corruption: kill -9 during ingestion (and background compaction), then
//! restart and check that every batch's part in each shard is whole or absent (a
//! statement is all-or-nothing per shard, each shard's part committed through its Raft
//! group), that acknowledged batches are all there, and that the manifest and the
//! segment files agree. Damaged segment files
//! give a clear error, not a panic or a dead node.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::SinkExt;
use rand::{Rng, SeedableRng};

use common::{connect, free_port, test_config, wait_ready, NodeProcess, TestNode};

const BATCH_ROWS: usize = 300;

/// `compact_ms` 0 turns compaction off (for a verifying start whose files must not move).
fn start_node(dir: &Path, port: u16, compact_ms: u32) -> NodeProcess {
    NodeProcess::new(Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("TIDEMARK_COMPACTION_INTERVAL_MS", compact_ms.to_string())
        .env("TIDEMARK_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tidemark"))
}

fn entity(i: usize) -> String {
    format!("acct-{}", i % 37)
}

/// Rows of one batch in each shard.
fn rows_per_shard() -> BTreeMap<u32, i64> {
    let shards = tidemark::config::Config::default().shard_count;
    let mut out = BTreeMap::new();
    for i in 0..BATCH_ROWS {
        *out.entry(tidemark::shard_map::shard_of(&entity(i), shards)).or_default() += 1;
    }
    out
}

fn batch_csv(batch: u32) -> String {
    let mut s = String::from("record_id,entity_id,service,operation,usage_type,quantity,event_time\n");
    for i in 0..BATCH_ROWS {
        // Spread over entities (shards) and three days (segments per batch).
        s.push_str(&format!(
            "b{batch}-{i},{},storage,GetObject,Requests,1,2026-01-0{} {:02}:00:00\n",
            entity(i),
            5 + i % 3,
            i % 24
        ));
    }
    s
}

async fn copy_batch(c: &tokio_postgres::Client, batch: u32) -> Result<u64, tokio_postgres::Error> {
    let sink = c.copy_in("COPY usage FROM STDIN WITH (FORMAT csv, HEADER)").await?;
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(batch_csv(batch))).await?;
    sink.finish().await
}

fn files_under(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_ingestion_keeps_whole_batches() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut acked: BTreeSet<u32> = BTreeSet::new();
    let mut unknown: BTreeSet<u32> = BTreeSet::new();
    let mut next_batch = 0u32;
    for cycle in 0..4 {
        let port = free_port();
        // Compact often, so that kills also land in the middle of compactions.
        let mut child = start_node(dir.path(), port, 100);
        let c = wait_ready(port).await;
        // Ingest until the kill; the kill lands at a random moment.
        let kill_after = Duration::from_millis(rng.random_range(150..900));
        let started = Instant::now();
        let writer = {
            let first = next_batch;
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                let mut b = first;
                while b < first + 200 {
                    let r = copy_batch(&c, b).await;
                    let failed = r.is_err();
                    outcomes.push((b, r.map_err(|e| e.to_string())));
                    b += 1;
                    if failed {
                        break;
                    }
                }
                outcomes
            })
        };
        tokio::time::sleep(kill_after.saturating_sub(started.elapsed())).await;
        child.kill_9();
        let outcomes = writer.await.unwrap();
        for (b, r) in &outcomes {
            match r {
                Ok(n) => {
                    assert_eq!(*n as usize, BATCH_ROWS, "batch {b} reported {n} rows");
                    acked.insert(*b);
                }
                // The connection died with the node: the outcome is unknown, not failed.
                Err(_) => {
                    unknown.insert(*b);
                }
            }
            next_batch = next_batch.max(b + 1);
        }
        // Restart (without compaction, so files stay put while we look) and check.
        let port = free_port();
        let mut child = start_node(dir.path(), port, 0);
        let c = wait_ready(port).await;
        let rows = c
            .query("SELECT split_part(record_id, '-', 1) AS b, entity_id, count(*) FROM usage GROUP BY 1, 2", &[])
            .await
            .unwrap();
        let shards = tidemark::config::Config::default().shard_count;
        let mut present: BTreeMap<u32, BTreeMap<u32, i64>> = BTreeMap::new();
        for r in &rows {
            let b: u32 = r.get::<_, String>(0).trim_start_matches('b').parse().unwrap();
            let shard = tidemark::shard_map::shard_of(&r.get::<_, String>(1), shards);
            *present.entry(b).or_default().entry(shard).or_default() += r.get::<_, i64>(2);
        }
        let whole = rows_per_shard();
        for (b, parts) in &present {
            for (shard, n) in parts {
                assert_eq!(Some(n), whole.get(shard), "cycle {cycle}: batch {b}'s part in shard {shard} is partial ({n} rows)");
            }
            assert!(acked.contains(b) || unknown.contains(b), "cycle {cycle}: batch {b} was never sent");
        }
        for b in &acked {
            assert_eq!(present.get(b), Some(&whole), "cycle {cycle}: acknowledged batch {b} was lost or partly lost");
        }
        // An unknown batch that is wholly present is now known to have committed (one
        // present in some shards only stays unknown: its statement failed midway).
        for (b, parts) in &present {
            if parts == &whole && unknown.remove(b) {
                acked.insert(*b);
            }
        }
        // Manifest and files agree (orphans are removed at start).
        let listed: BTreeSet<String> = c
            .query("SELECT path FROM system.segments", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        let on_disk = files_under(&dir.path().join("segments"));
        let missing: Vec<_> = listed.difference(&on_disk).collect();
        let unlisted: Vec<_> = on_disk.difference(&listed).collect();
        assert!(
            missing.is_empty() && unlisted.is_empty(),
            "cycle {cycle}: manifest and segment files disagree: named but missing {missing:?}; present but not named {unlisted:?}"
        );
        child.kill_9();
    }
    assert!(acked.len() >= 4, "too few batches were acknowledged to mean anything: {acked:?}");
}

fn one_segment_path(dir: &Path) -> PathBuf {
    let files = files_under(&dir.join("segments"));
    dir.join("segments").join(files.iter().next().expect("a segment file"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_segment_files_give_clear_errors() {
    for damage in ["truncate", "garbage"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        {
            let n = TestNode::start_with(tempfile::TempDir::new_in(&path).unwrap(), test_config(&path)).await;
            let c = n.client().await;
            c.batch_execute(
                "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) VALUES \
                 ('d1', 'acct-1', 'storage', 'GetObject', 'Requests', 1, '2026-01-05 10:00:00')",
            )
            .await
            .unwrap();
            n.server.stop();
            n.node.shutdown();
        }
        let seg = one_segment_path(&path);
        let bytes = std::fs::read(&seg).unwrap();
        match damage {
            "truncate" => std::fs::write(&seg, &bytes[..bytes.len() / 2]).unwrap(),
            _ => std::fs::write(&seg, vec![0x5a; bytes.len()]).unwrap(),
        }
        // The node still starts, reports the segment and keeps serving.
        let n = TestNode::start_with(tempfile::TempDir::new_in(&path).unwrap(), test_config(&path)).await;
        let c = connect(&n.url()).await;
        let e = c.query("SELECT * FROM usage", &[]).await.unwrap_err();
        let db = e.as_db_error().unwrap_or_else(|| panic!("{damage}: not a server error: {e}"));
        assert_eq!(db.code().code(), "XX001", "{damage}: {}", db.message());
        assert_eq!(c.query_one("SELECT 1::bigint", &[]).await.unwrap().get::<_, i64>(0), 1);
        // Segments of other shards stay readable.
        c.batch_execute(
            "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) VALUES \
             ('d2', 'acct-other', 'storage', 'GetObject', 'Requests', 1, '2026-02-05 10:00:00')",
        )
        .await
        .unwrap();
        let row = c
            .query_one("SELECT count(*) FROM usage WHERE event_time >= '2026-02-01'", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 1);
    }
}

/// Many small appends, then compaction: one segment per (shard, window), the same rows,
/// and the record-id index still rejects re-ingestion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_merges_small_segments_without_changing_rows() {
    let n = TestNode::start().await;
    let c = n.client().await;
    for b in 0..6 {
        let sink = c.copy_in("COPY usage FROM STDIN WITH (FORMAT csv, HEADER)").await.unwrap();
        futures::pin_mut!(sink);
        sink.send(bytes::Bytes::from(batch_csv(b))).await.unwrap();
        sink.finish().await.unwrap();
    }
    let summary = "SELECT count(*), sum(quantity), count(DISTINCT record_id), min(event_time), max(event_time) FROM usage";
    let before: Vec<String> = c.simple_query(summary).await.unwrap().iter().filter_map(row_text).collect();
    let groups = |sql: &'static str| {
        let c = &c;
        async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    let segments_before = groups("SELECT count(*) FROM system.segments").await;
    let windows = groups("SELECT count(*) FROM (SELECT DISTINCT shard, window_start FROM system.segments)").await;
    assert!(segments_before >= 4 * windows, "{segments_before} segments for {windows} windows");
    while n.node.storage().compact_once(64).await.unwrap() > 0 {}
    assert_eq!(groups("SELECT count(*) FROM system.segments").await, windows);
    assert_eq!(groups("SELECT count(*) FROM system.segments WHERE level = 0").await, 0);
    let after: Vec<String> = c.simple_query(summary).await.unwrap().iter().filter_map(row_text).collect();
    assert_eq!(before, after);
    // Re-sending a batch stores nothing new.
    let sink = c.copy_in("COPY usage FROM STDIN WITH (FORMAT csv, HEADER)").await.unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(batch_csv(3))).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 0);
}

fn row_text(m: &tokio_postgres::SimpleQueryMessage) -> Option<String> {
    match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some((0..r.len()).map(|i| r.get(i).unwrap_or("NULL").to_string()).collect::<Vec<_>>().join("|")),
        _ => None,
    }
}

fn buffered_config(dir: &Path) -> tidemark::config::Config {
    tidemark::config::Config {
        write_buffer_rows_max: 100_000,
        write_buffer_statement_rows_max: 10_000,
        // Flushes happen only when the test asks.
        write_buffer_flush_interval_ms: 3_600_000,
        ..test_config(dir)
    }
}

/// Small statements go to the write buffer: visible at once, in no segment until a
/// flush, the same rows after the flush, and still deduplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_buffer_rows_are_visible_then_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let n = TestNode::start_with(dir, buffered_config(&path)).await;
    let c = n.client().await;
    // One large statement (segments) and several small ones (buffer).
    let big: String = (0..12_000).fold(String::from("record_id,entity_id,service,operation,usage_type,quantity,event_time\n"), |mut s, i| {
        s.push_str(&format!("big-{i},acct-{},storage,GetObject,Requests,2,2026-01-05 {:02}:00:00\n", i % 50, i % 24));
        s
    });
    let sink = c.copy_in("COPY usage FROM STDIN WITH (FORMAT csv, HEADER)").await.unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(big)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 12_000);
    let segments_before = c.query_one("SELECT count(*) FROM system.segments", &[]).await.unwrap().get::<_, i64>(0);
    for b in 0..3 {
        assert_eq!(copy_batch(&c, b).await.unwrap() as usize, BATCH_ROWS);
    }
    let segments_mid = c.query_one("SELECT count(*) FROM system.segments", &[]).await.unwrap().get::<_, i64>(0);
    assert_eq!(segments_mid, segments_before, "small statements must not write segments");
    let queries = [
        "SELECT count(*), sum(quantity) FROM usage",
        "SELECT count(*) FROM usage WHERE entity_id = 'acct-3'",
        "SELECT entity_id, count(*) FROM usage WHERE entity_id IN ('acct-1', 'acct-36') AND event_time >= '2026-01-06' GROUP BY 1 ORDER BY 1",
        "SELECT record_id FROM usage WHERE record_id LIKE 'b1-%' AND event_time < '2026-01-06 03:00:00' ORDER BY 1",
    ];
    let mut before = Vec::new();
    for q in queries {
        before.push(c.simple_query(q).await.unwrap().iter().filter_map(row_text).collect::<Vec<_>>());
    }
    assert_eq!(before[0], vec![format!("{}|{}.000000", 12_000 + 3 * BATCH_ROWS, 24_000 + 3 * BATCH_ROWS)]);
    assert!(!before[3].is_empty());
    // Re-sending a buffered batch stores nothing.
    assert_eq!(copy_batch(&c, 1).await.unwrap(), 0);
    assert_eq!(n.node.storage().flush_buffer().await.unwrap(), 3 * BATCH_ROWS);
    let segments_after = c.query_one("SELECT count(*) FROM system.segments", &[]).await.unwrap().get::<_, i64>(0);
    assert!(segments_after > segments_before);
    for (q, want) in queries.iter().zip(&before) {
        let got: Vec<String> = c.simple_query(q).await.unwrap().iter().filter_map(row_text).collect();
        assert_eq!(&got, want, "{q}");
    }
    assert_eq!(copy_batch(&c, 2).await.unwrap(), 0);
}

/// Buffered rows survive a crash: the shards' Raft logs are re-applied at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_buffer_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    {
        let n = TestNode::start_with(tempfile::TempDir::new_in(&path).unwrap(), buffered_config(&path)).await;
        let c = n.client().await;
        for b in 0..2 {
            copy_batch(&c, b).await.unwrap();
        }
        assert_eq!(c.query_one("SELECT count(*) FROM system.segments", &[]).await.unwrap().get::<_, i64>(0), 0);
        // No flush, no shutdown: the process "dies" here.
        n.server.stop();
    }
    let n = TestNode::start_with(tempfile::TempDir::new_in(&path).unwrap(), buffered_config(&path)).await;
    let c = n.client().await;
    let row = c.query_one("SELECT count(*), count(DISTINCT record_id) FROM usage", &[]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (2 * BATCH_ROWS as i64, 2 * BATCH_ROWS as i64));
    // Re-applied into the write buffer, still deduplicated, then flushed as usual.
    assert_eq!(copy_batch(&c, 0).await.unwrap(), 0);
    assert_eq!(n.node.storage().flush_buffer().await.unwrap(), 2 * BATCH_ROWS);
    assert!(c.query_one("SELECT count(*) FROM system.segments", &[]).await.unwrap().get::<_, i64>(0) > 0);
    assert_eq!(copy_batch(&c, 1).await.unwrap(), 0);
}

/// A crash in the middle of a put leaves object_store's staging file (`name#N`) and,
/// between the put and the manifest commit, whole files no manifest names: both are
/// removed at the next start, and files the manifest names are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_no_manifest_names_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    {
        let n = TestNode::start_with(tempfile::TempDir::new_in(&path).unwrap(), test_config(&path)).await;
        copy_batch(&n.client().await, 0).await.unwrap();
        n.server.stop();
        n.node.shutdown();
    }
    let before = files_under(&path.join("segments"));
    let shard_dir = path.join("segments/usage/shard-00000/2026-01-05T00");
    std::fs::create_dir_all(&shard_dir).unwrap();
    std::fs::write(shard_dir.join("half-written.parquet#3"), b"PAR1 partial").unwrap();
    std::fs::write(shard_dir.join("never-committed.parquet"), b"PAR1 whole but unnamed").unwrap();
    let n = TestNode::start_with(tempfile::TempDir::new_in(&path).unwrap(), test_config(&path)).await;
    assert_eq!(files_under(&path.join("segments")), before);
    let c = n.client().await;
    assert_eq!(c.query_one("SELECT count(*) FROM usage", &[]).await.unwrap().get::<_, i64>(0), BATCH_ROWS as i64);
}

/// Every shard is a Raft group with this node as its only voter: `system.replicas`
/// shows each group leading and caught up; the applied state reaches the manifest with
/// the flush (`flushed_index`), and then a snapshot lets the log be purged behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_groups_lead_apply_flush_and_purge_their_logs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let n = TestNode::start_with(dir, buffered_config(&path)).await;
    let c = n.client().await;
    let shards = n.node.config().shard_count as i64;
    let row = c
        .query_one("SELECT count(*), count(*) FILTER (WHERE role = 'leader' AND leader = node_id AND voters = '1') FROM system.replicas", &[])
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (shards, shards));
    let fenced = c.query_one("SELECT count(*) FROM system.replicas WHERE vote_fence <> 'open'", &[]).await.unwrap().get::<_, i64>(0);
    assert_eq!(fenced, 0, "a one-node group never waits to vote");
    let node = c.query_one("SELECT node_id::bigint, state, shards_led::bigint, last_answer_ms IS NULL FROM system.nodes", &[]).await.unwrap();
    assert_eq!((node.get::<_, i64>(0), node.get::<_, &str>(1), node.get::<_, i64>(2), node.get::<_, bool>(3)), (1, "this node", shards, true));
    // One entity, so one shard: 100 statements are 100 entries of its group.
    for i in 0..100 {
        c.batch_execute(&format!(
            "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) \
             VALUES ('p{i}', 'acct-7', 'storage', 'GetObject', 'Requests', 1, '2026-01-05 10:00:00')"
        ))
        .await
        .unwrap();
    }
    let shard = tidemark::shard_map::shard_of("acct-7", shards as u32) as i64;
    let q = format!("SELECT applied_index::bigint, lag_entries::bigint, flushed_index::bigint, purged_index::bigint FROM system.replicas WHERE shard = {shard}");
    let r = c.query_one(q.as_str(), &[]).await.unwrap();
    let applied = r.get::<_, Option<i64>>(0).unwrap();
    assert!(applied >= 100, "applied {applied}");
    assert_eq!(r.get::<_, i64>(1), 0);
    assert_eq!(r.get::<_, Option<i64>>(2), None, "nothing flushed yet");
    assert_eq!(n.node.storage().flush_buffer().await.unwrap(), 100);
    let r = c.query_one(q.as_str(), &[]).await.unwrap();
    assert_eq!(r.get::<_, Option<i64>>(2), Some(applied));
    // The snapshot the flushed state allows, then the purge behind it (bounded wait).
    let groups = n.node.groups().unwrap();
    assert!(groups.snapshot_flushed().await >= 1);
    let mut purged = None;
    for _ in 0..100 {
        purged = c.query_one(q.as_str(), &[]).await.unwrap().get::<_, Option<i64>>(3);
        if purged.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let purged = purged.expect("the log was not purged after the snapshot");
    assert!(purged + 64 >= applied && purged < applied, "purged {purged}, applied {applied}");
    assert_eq!(c.query_one("SELECT count(*) FROM usage WHERE entity_id = 'acct-7'", &[]).await.unwrap().get::<_, i64>(0), 100);
}
