//! Three real Tidemark nodes, every shard's Raft group spanning them, as processes on
//! 127.0.0.1-3 and as containers from `docker/` on a private Docker network: writers
//! send small INSERTs through every node (and read their own records back, carrying
//! their write token across reconnects) while, one after the other, the node that leads
//! the most shards is killed (SIGKILL / `docker kill`) and restarted, partitioned away
//! and healed (containers), paused past the election timeout and resumed, and has its
//! data directory wiped before a restart; then each replica's data directory is
//! audited on its own (its segments plus its committed log, re-applied as a restart
//! would) and the client history is checked against it: every acknowledged record on
//! every replica exactly once, no record that was never written, the replicas alike, no
//! read that missed a write its session had acknowledged. The checker itself is tested
//! on histories known to be bad. The container test says why it is skipped where no
//! Docker engine runs.

mod common;
#[path = "common/history.rs"]
mod history;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, NodeProcess};
use history::{audit, check, History, Outcome, ReadOp, Verdict, WriteOp};
use parking_lot::Mutex;

// ---------------------------------------------------------------------------------
// The history checker, on histories known to be good and bad.

fn w(session: usize, ids: &[&str], outcome: Outcome, end_us: u64) -> WriteOp {
    WriteOp { session, ids: ids.iter().map(|s| s.to_string()).collect(), whole: false, outcome, start_us: 0, end_us }
}

fn replicas(sets: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    sets.iter().map(|(n, ids)| (n.to_string(), ids.iter().map(|s| s.to_string()).collect())).collect()
}

#[test]
fn the_checker_passes_a_good_history() {
    let h = History {
        writes: vec![w(0, &["a", "b"], Outcome::Ok, 10), w(1, &["c"], Outcome::Unknown, 20), w(1, &["d"], Outcome::Unknown, 30)],
        reads: vec![ReadOp { session: 0, start_us: 15, saw: ["a", "b"].iter().map(|s| s.to_string()).collect() }],
    };
    // An unknown write may be stored (c) or not (d).
    let v = check(&h, &replicas(&[("n1", &["a", "b", "c"]), ("n2", &["c", "a", "b"])]));
    assert_eq!(v, Verdict::default());
}

#[test]
fn the_checker_flags_a_lost_ack_a_duplicate_a_phantom_a_divergence_and_a_stale_read() {
    let h = History {
        writes: vec![w(0, &["a", "b"], Outcome::Ok, 10), w(1, &["c"], Outcome::Unknown, 20)],
        reads: vec![
            ReadOp { session: 0, start_us: 5, saw: BTreeSet::new() },
            ReadOp { session: 0, start_us: 11, saw: ["a"].iter().map(|s| s.to_string()).collect() },
        ],
    };
    let v = check(&h, &replicas(&[("n1", &["a", "b", "c", "c"]), ("n2", &["a", "zz", "b"])]));
    assert_eq!(v.lost, vec![]);
    assert_eq!(v.duplicated, vec![("n1".to_string(), "c".to_string(), 2)]);
    assert_eq!(v.phantom, vec![("n2".to_string(), "zz".to_string())]);
    assert_eq!(v.diverged, vec!["n2".to_string()]);
    // The read before the ack may miss it; the one after may not.
    assert_eq!(v.stale_reads, vec![(0, "b".to_string())]);
    let v = check(&h, &replicas(&[("n1", &["a"])]));
    assert_eq!(v.lost, vec![("n1".to_string(), "b".to_string())]);
    assert!(!v.writes_ok());
}

#[test]
fn the_checker_flags_a_one_shard_statement_stored_in_part() {
    let whole = |ids: &[&str], outcome| WriteOp { whole: true, ..w(0, ids, outcome, 10) };
    let h = History { writes: vec![whole(&["a", "b", "c"], Outcome::Unknown), whole(&["d", "e"], Outcome::Unknown)], reads: vec![] };
    // An unknown statement may be stored whole or not at all, not in part.
    assert_eq!(check(&h, &replicas(&[("n1", &["a", "b", "c"]), ("n2", &["a", "b", "c"])])), Verdict::default());
    let v = check(&h, &replicas(&[("n1", &["a", "b", "c", "d"])]));
    assert_eq!(v.torn, vec![("n1".to_string(), 1, 1, 2)]);
    assert!(!v.writes_ok());
}

// ---------------------------------------------------------------------------------
// The cluster.

struct Member {
    id: u64,
    host: String,
    pg: u16,
    internal: u16,
    dir: PathBuf,
    /// A TOML file of settings (`--config`), if any.
    config: Option<PathBuf>,
}

impl Member {
    fn url(&self) -> String {
        format!("postgres://tidemark@{}:{}/tidemark", self.host, self.pg)
    }
}

fn start(m: &Member, all: &[Member]) -> NodeProcess {
    // TIDEMARK_TEST_NODE_LOGS=DIR keeps each node's log (appended across restarts).
    let logs = std::env::var_os("TIDEMARK_TEST_NODE_LOGS").map(|d| {
        std::fs::OpenOptions::new().create(true).append(true).open(Path::new(&d).join(format!("node{}.log", m.id))).expect("node log")
    });
    let peers: Vec<String> = all.iter().filter(|o| o.id != m.id).map(|o| format!("{}={}:{}", o.id, o.host, o.internal)).collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidemark"));
    cmd.arg("serve");
    if let Some(c) = &m.config {
        cmd.arg("--config").arg(c);
    }
    NodeProcess::new(
        cmd.arg("--data-dir")
            .arg(&m.dir)
            .args(["--listen", &format!("{}:{}", m.host, m.pg)])
            .args(["--node-id", &m.id.to_string()])
            .args(["--internal-addr", &format!("{}:{}", m.host, m.internal)])
            .args(["--peers", &peers.join(",")])
            .args(["--pipelines", "1", "--peer-pipelines", "1"])
            .env("TIDEMARK_LOG", if logs.is_some() { "info" } else { "warn" })
            .stdout(Stdio::null())
            .stderr(logs.map_or_else(Stdio::null, Stdio::from))
            .spawn()
            .expect("start tidemark"),
    )
}

async fn try_connect(url: &str) -> Option<tokio_postgres::Client> {
    let (c, conn) = tokio::time::timeout(Duration::from_secs(2), tokio_postgres::connect(url, tokio_postgres::NoTls)).await.ok()?.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(c)
}

async fn wait_connect(url: &str, within: Duration) -> tokio_postgres::Client {
    let deadline = Instant::now() + within;
    loop {
        if let Some(c) = try_connect(url).await {
            return c;
        }
        assert!(Instant::now() < deadline, "{url} did not answer within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows per statement, over random entities (so over most shards).
const ROWS_PER_STATEMENT: usize = 8;

fn insert_sql(session: usize, i: usize, rng: &mut rand::rngs::StdRng) -> (String, Vec<String>) {
    let mut ids = Vec::new();
    let mut values = Vec::new();
    for j in 0..ROWS_PER_STATEMENT {
        let id = format!("s{session}-{i}-{j}");
        let e = rand::Rng::random_range(rng, 0..200);
        values.push(format!("('{id}', 'acct-{e:03}', 'storage', 'GetObject', 'Requests', 1, '2026-01-05 10:{:02}:00')", j));
        ids.push(id);
    }
    (
        format!(
            "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) VALUES {}",
            values.join(", ")
        ),
        ids,
    )
}

/// One client writing through node `url` until `stop`: each statement's outcome goes
/// into the history (an error or a timeout is unknown); after an error it reconnects
/// (to the same node, which may be down for a while). Every fifth statement it also
/// reads its own records back. It carries its write token across connections as a
/// dashboard would: `SHOW tidemark.write_token` after each acknowledged write, `SET
/// tidemark.read_after` on each new connection; so each read must see every write it
/// acknowledged before. If the token could not be read after an acknowledged write, the
/// chain is broken and the writer's next writes and reads form a new session of the
/// history (`writer * 100 + epoch`).
async fn writer(writer: usize, url: String, stop: Arc<AtomicBool>, history: Arc<Mutex<History>>, t0: Instant) {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(writer as u64);
    let mut token = String::new();
    let mut epoch = 0;
    let mut client = connect_after(&url, &token).await;
    for i in 0..2_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Some(c) = &client else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            client = connect_after(&url, &token).await;
            continue;
        };
        let session = writer * 100 + epoch;
        let (sql, ids) = insert_sql(writer, i, &mut rng);
        let start_us = t0.elapsed().as_micros() as u64;
        let r = tokio::time::timeout(Duration::from_secs(15), c.batch_execute(&sql)).await;
        let outcome = match r {
            Ok(Ok(())) => Outcome::Ok,
            _ => Outcome::Unknown,
        };
        let failed = outcome != Outcome::Ok;
        history.lock().writes.push(WriteOp { session, ids, whole: false, outcome, start_us, end_us: t0.elapsed().as_micros() as u64 });
        if failed {
            client = None;
            continue;
        }
        match tokio::time::timeout(Duration::from_secs(5), c.query_one("SHOW tidemark.write_token", &[])).await {
            Ok(Ok(row)) => token = row.get(0),
            _ => {
                epoch += 1;
                client = None;
                continue;
            }
        }
        if i % 5 == 4 {
            let start_us = t0.elapsed().as_micros() as u64;
            let q = format!("SELECT record_id FROM usage WHERE record_id LIKE 's{writer}-%'");
            // A read that fails (57P03: the replica is behind past read_wait_ms_max)
            // saw nothing and is not a read of the history.
            match tokio::time::timeout(Duration::from_secs(15), c.query(q.as_str(), &[])).await {
                Ok(Ok(rows)) => {
                    let saw = rows.iter().map(|r| r.get::<_, String>(0)).collect();
                    history.lock().reads.push(ReadOp { session, start_us, saw });
                }
                Ok(Err(e)) => println!("writer {writer}: a read failed after {} ms: {e:?}", (t0.elapsed().as_micros() as u64 - start_us) / 1000),
                Err(_) => println!("writer {writer}: a read gave no answer within 15 s"),
            }
        }
    }
}

/// Rows per bulk statement: all of one entity, so one shard's part of more rows than
/// one log entry holds (8,192), written as several entries and stored together.
const BULK_ROWS: usize = 10_000;
/// The history's session of the bulk writer.
const BULK_SESSION: usize = 9_999;

/// One client sending bulk COPY statements (each one shard's part of two log entries)
/// through the nodes in turn until `stop`; each is stored whole or not at all.
async fn bulk_writer(urls: Vec<String>, stop: Arc<AtomicBool>, history: Arc<Mutex<History>>, t0: Instant) {
    let mut client = None;
    for i in 0..30 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let url = &urls[i % urls.len()];
        if client.is_none() {
            client = try_connect(url).await;
        }
        let Some(c) = &client else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let ids: Vec<String> = (0..BULK_ROWS).map(|j| format!("bulk-{i}-{j}")).collect();
        let mut csv = String::from("record_id,entity_id,service,operation,usage_type,quantity,event_time\n");
        for (j, id) in ids.iter().enumerate() {
            csv.push_str(&format!("{id},acct-bulk-{},storage,PutObject,Requests,1,2026-01-06 {:02}:{:02}:00\n", i % 4, j / 60 % 24, j % 60));
        }
        let start_us = t0.elapsed().as_micros() as u64;
        let copy = async {
            let sink = c.copy_in("COPY usage FROM STDIN WITH (FORMAT csv, HEADER)").await?;
            futures::pin_mut!(sink);
            futures::SinkExt::send(&mut sink, bytes::Bytes::from(csv)).await?;
            sink.finish().await
        };
        let outcome = match tokio::time::timeout(Duration::from_secs(20), copy).await {
            Ok(Ok(n)) if n as usize == BULK_ROWS => Outcome::Ok,
            _ => Outcome::Unknown,
        };
        if outcome != Outcome::Ok {
            client = None;
        }
        let end_us = t0.elapsed().as_micros() as u64;
        history.lock().writes.push(WriteOp { session: BULK_SESSION, ids, whole: true, outcome, start_us, end_us });
        // Bulk statements are few: the small writers and their reads are the history.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
    }
}

/// A connection whose reads wait for `token`'s writes.
async fn connect_after(url: &str, token: &str) -> Option<tokio_postgres::Client> {
    let c = try_connect(url).await?;
    let set = format!("SET tidemark.read_after = '{token}'");
    tokio::time::timeout(Duration::from_secs(5), c.batch_execute(&set)).await.ok()?.ok()?;
    Some(c)
}

/// The node that leads the most shards, as node 1..3 see it (the first that answers).
async fn busiest_leader(urls: &[String]) -> u64 {
    for url in urls {
        if let Some(c) = try_connect(url).await {
            let q = "SELECT leader::bigint, count(*) FROM system.replicas WHERE leader IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 1";
            if let Ok(row) = c.query_one(q, &[]).await {
                return row.get::<_, i64>(0) as u64;
            }
        }
    }
    panic!("no node reports its shards' leaders");
}

/// Per shard, the applied index each node reports (bounded wait until all agree).
async fn wait_converged(urls: &[String], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let mut views = Vec::new();
        for url in urls {
            let Some(c) = try_connect(url).await else { break };
            let q = "SELECT shard::bigint, applied_index::bigint, last_log_index::bigint FROM system.replicas ORDER BY 1";
            match c.query(q, &[]).await {
                Ok(rows) => views.push(rows.iter().map(|r| (r.get::<_, i64>(0), r.get::<_, Option<i64>>(1), r.get::<_, Option<i64>>(2))).collect::<Vec<_>>()),
                Err(_) => break,
            }
        }
        if views.len() == urls.len()
            && views.windows(2).all(|w| w.iter().all(|v| v.iter().map(|(s, a, _)| (*s, *a)).eq(w[0].iter().map(|(s, a, _)| (*s, *a)))))
            && views.iter().all(|v| v.iter().all(|(_, a, l)| a == l))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// A fault done to one node while the writers run.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL, then a restart on the same data directory.
    Kill,
    /// SIGSTOP for well past the election timeout, then SIGCONT.
    Pause,
    /// SIGKILL, the data directory deleted, then a restart on an empty one: the node
    /// must come back from its peers (a snapshot with the segment files, then the log).
    LoseDisk,
    /// Cut off from the other nodes (and its clients) for well past the election
    /// timeout, then healed: `docker network disconnect` / `connect`.
    Partition,
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} {pid}");
}

/// Three nodes a test can fault, one at a time.
trait Nodes {
    fn urls(&self) -> Vec<String>;
    /// Each node's data directory, readable here once the nodes are stopped.
    fn dirs(&self) -> Vec<PathBuf>;
    /// Does `fault` to node `victim` (0-based) and undoes it (restart, resume, heal).
    async fn fault(&mut self, fault: Fault, victim: usize);
    /// Stops every node at once (SIGKILL).
    fn kill_all(&mut self);
}

struct Processes {
    members: Vec<Member>,
    procs: Vec<Option<NodeProcess>>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Processes {
    fn start() -> Processes {
        Processes::start_with(&[None, None, None])
    }

    /// Three nodes, node i with the settings `settings[i]` (TOML text).
    fn start_with(settings: &[Option<&str>; 3]) -> Processes {
        let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let members: Vec<Member> = (0..3)
            .map(|i| Member {
                id: i as u64 + 1,
                host: format!("127.0.0.{}", i + 1),
                pg: free_port(),
                internal: free_port(),
                dir: dirs[i].path().join("data"),
                config: settings[i].map(|text| {
                    let path = dirs[i].path().join("settings.toml");
                    std::fs::write(&path, text).unwrap();
                    path
                }),
            })
            .collect();
        let procs = members.iter().map(|m| Some(start(m, &members))).collect();
        Processes { members, procs, _dirs: dirs }
    }
}

impl Nodes for Processes {
    fn urls(&self) -> Vec<String> {
        self.members.iter().map(Member::url).collect()
    }

    fn dirs(&self) -> Vec<PathBuf> {
        self.members.iter().map(|m| m.dir.clone()).collect()
    }

    async fn fault(&mut self, fault: Fault, victim: usize) {
        match fault {
            Fault::Kill | Fault::LoseDisk => {
                self.procs[victim].take().unwrap().kill_9();
                if matches!(fault, Fault::LoseDisk) {
                    std::fs::remove_dir_all(&self.members[victim].dir).unwrap();
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                self.procs[victim] = Some(start(&self.members[victim], &self.members));
                wait_connect(&self.members[victim].url(), Duration::from_secs(60)).await;
            }
            Fault::Pause => {
                let pid = self.procs[victim].as_ref().unwrap().pid();
                signal(pid, "-STOP");
                tokio::time::sleep(Duration::from_secs(2)).await;
                signal(pid, "-CONT");
            }
            Fault::Partition => panic!("processes on loopback are not partitioned (the container test does it)"),
        }
    }

    fn kill_all(&mut self) {
        for p in self.procs.iter_mut() {
            if let Some(mut p) = p.take() {
                p.kill_9();
            }
        }
    }
}

/// Runs writers through every node while `faults` are done one after the other to
/// the node that leads the most shards, then checks the history against every
/// replica's data directory, audited offline.
async fn exercise<N: Nodes>(nodes: &mut N, faults: &[Fault]) {
    let urls = nodes.urls();
    for (i, url) in urls.iter().enumerate() {
        let c = wait_connect(url, Duration::from_secs(60)).await;
        // Every node sees a leader for every shard, and three voters.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let row = c
                .query_one("SELECT count(*), count(*) FILTER (WHERE leader IS NOT NULL AND voters = '1,2,3') FROM system.replicas", &[])
                .await
                .unwrap();
            if row.get::<_, i64>(0) == row.get::<_, i64>(1) {
                break;
            }
            assert!(Instant::now() < deadline, "node {}: groups without a leader or not spanning 1,2,3", i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The groups' first leaders are spread over the nodes.
    let c = wait_connect(&urls[0], Duration::from_secs(5)).await;
    let spread = c.query_one("SELECT count(DISTINCT leader) FROM system.replicas", &[]).await.unwrap().get::<_, i64>(0);
    assert_eq!(spread, 3, "leaders not spread over the three nodes");
    // system.nodes: the three nodes answer, and the shards they lead add up.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c
            .query_one(
                "SELECT count(*) FILTER (WHERE state IN ('this node', 'up')), sum(shards_led)::bigint, \
                 (SELECT count(*) FROM system.replicas) AS shards, \
                 (SELECT count(*) FROM system.replicas WHERE role = 'follower' AND leader_contact_ms IS NULL) AS unheard FROM system.nodes",
                &[],
            )
            .await
            .unwrap();
        let (answering, led, shards, unheard): (i64, i64, i64, i64) = (r.get(0), r.get(1), r.get(2), r.get(3));
        if answering == 3 && led == shards && unheard == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "system.nodes: {answering} of 3 nodes answering, {led} shards led of {shards}; {unheard} followers never heard from a leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let t0 = Instant::now();
    let history = Arc::new(Mutex::new(History::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers: Vec<_> =
        urls.iter().enumerate().map(|(s, url)| tokio::spawn(writer(s, url.clone(), Arc::clone(&stop), Arc::clone(&history), t0))).collect();
    writers.push(tokio::spawn(bulk_writer(urls.clone(), Arc::clone(&stop), Arc::clone(&history), t0)));

    let mut done = Vec::new();
    for fault in faults {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let victim = busiest_leader(&urls).await as usize - 1;
        let at_us = t0.elapsed().as_micros() as u64;
        nodes.fault(*fault, victim).await;
        done.push((*fault, victim + 1, at_us));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        tokio::time::timeout(Duration::from_secs(30), w).await.expect("a writer did not stop").unwrap();
    }
    assert!(wait_converged(&urls, Duration::from_secs(60)).await, "replicas did not converge within 60 s");
    let c = wait_connect(&urls[0], Duration::from_secs(5)).await;
    let purged = c.query_one("SELECT count(*) FILTER (WHERE purged_index IS NOT NULL) FROM system.replicas", &[]).await.unwrap().get::<_, i64>(0);
    nodes.kill_all();

    let history = std::mem::take(&mut *history.lock());
    let mut contents = BTreeMap::new();
    for (i, dir) in nodes.dirs().iter().enumerate() {
        contents.insert(format!("node {}", i + 1), audit(dir).await);
    }
    let (bulk, small): (Vec<&WriteOp>, Vec<&WriteOp>) = history.writes.iter().partition(|w| w.session == BULK_SESSION);
    let acked = small.iter().filter(|w| w.outcome == Outcome::Ok).count();
    let unknown = small.len() - acked;
    let bulk_acked = bulk.iter().filter(|w| w.outcome == Outcome::Ok).count();
    let verdict = check(&history, &contents);
    let first: std::collections::HashSet<&str> = contents.values().next().map(|c| c.iter().map(String::as_str).collect()).unwrap_or_default();
    println!(
        "{} statements of {ROWS_PER_STATEMENT} rows, {acked} acknowledged, {unknown} unknown; {} bulk COPYs of {BULK_ROWS} rows \
         (one shard each), {bulk_acked} acknowledged, {} unknown, {} stored whole, none in part; {} reads, {} stale; groups with a \
         purged log on node 1: {purged}",
        small.len(),
        bulk.len(),
        bulk.len() - bulk_acked,
        bulk.iter().filter(|w| first.contains(w.ids[0].as_str())).count(),
        history.reads.len(),
        verdict.stale_reads.len()
    );
    for (fault, node, at_us) in &done {
        let next = history.writes.iter().filter(|w| w.outcome == Outcome::Ok && w.end_us > *at_us).map(|w| w.end_us).min();
        // The stall: the slowest acknowledged write among those in flight at the fault
        // or begun within a second after it (its shards' leaders had to be re-elected).
        let stall = history
            .writes
            .iter()
            .filter(|w| w.outcome == Outcome::Ok && w.end_us > *at_us && w.start_us < at_us + 1_000_000)
            .map(|w| w.end_us - w.start_us.max(*at_us))
            .max();
        println!(
            "{fault:?} node {node}: first acknowledged write {} ms after the fault; slowest acknowledged write around it {} ms",
            next.map_or("never".to_string(), |t| ((t - at_us) / 1000).to_string()),
            stall.map_or("-".to_string(), |t| (t / 1000).to_string())
        );
        assert!(next.is_some(), "no write was acknowledged after {fault:?} of node {node}");
    }
    assert!(acked > 20, "too few acknowledged writes to mean anything: {acked}");
    assert!(verdict.writes_ok(), "{verdict:?}");
    assert!(verdict.stale_reads.is_empty(), "reads missed their session's acknowledged writes: {:?}", verdict.stale_reads);
    assert!(history.reads.len() >= 3, "too few reads to check read-your-writes: {}", history.reads.len());
    assert!(bulk_acked > 0, "no bulk statement was acknowledged");
    let stored = contents.values().next().unwrap().len();
    let acked_rows: usize = history.writes.iter().filter(|w| w.outcome == Outcome::Ok).map(|w| w.ids.len()).sum();
    assert!(stored >= acked_rows, "{stored} rows stored for {acked_rows} acknowledged rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_replicate_through_a_kill_a_pause_and_a_lost_disk() {
    let mut nodes = Processes::start();
    exercise(&mut nodes, &[Fault::Kill, Fault::Pause, Fault::LoseDisk]).await;
}

/// Waits until every node sees a leader for each shard.
async fn wait_leaders(urls: &[String]) {
    for (i, url) in urls.iter().enumerate() {
        let c = wait_connect(url, Duration::from_secs(60)).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let row = c.query_one("SELECT count(*), count(*) FILTER (WHERE leader IS NOT NULL) FROM system.replicas", &[]).await.unwrap();
            if row.get::<_, i64>(0) > 0 && row.get::<_, i64>(0) == row.get::<_, i64>(1) {
                break;
            }
            assert!(Instant::now() < deadline, "node {}: groups without a leader", i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A replicated cluster's fragments run on every node's pipelines, each read from the
/// replica of the node that runs it (its own segments and write buffer, which differ
/// between replicas): the answers are the same through every node, under every
/// routing, over rows in segments and rows still buffered, through plans made per
/// statement and reused prepared plans; and a session reads its own writes through
/// fragments its gateway sends to peers, whose replicas may not have applied them yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_run_each_others_fragments_from_their_own_replicas() {
    // Replicas that hold the same rows differently: node 1 flushes its write buffer only
    // when it holds 12,000 rows (the COPY below), so it keeps the small writes that
    // follow in its buffer for the whole test, while nodes 2 and 3 write every applied
    // entry straight into segments. A fragment must read a shard's rows from one
    // replica's view.
    let nodes = Processes::start_with(&[
        Some("write_buffer_flush_interval_ms = 600000\nwrite_buffer_rows_max = 12000\n"),
        Some("write_buffer_rows_max = 0\n"),
        Some("write_buffer_rows_max = 0\n"),
    ]);
    let urls = nodes.urls();
    wait_leaders(&urls).await;
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    // Rows in segments: one COPY of more rows than a buffered statement holds.
    let c1 = wait_connect(&urls[0], Duration::from_secs(10)).await;
    let mut csv = String::from("record_id,entity_id,service,operation,usage_type,quantity,event_time\n");
    for j in 0..12_000 {
        let (e, q) = (format!("acct-{:02}", j % 40), j % 7 + 1);
        csv.push_str(&format!("bulk-{j},{e},storage,GetObject,Requests,{q},2026-01-06 {:02}:{:02}:00\n", j / 60 % 24, j % 60));
        let x = expected.entry(e).or_default();
        x.0 += 1;
        x.1 += q;
    }
    let sink = c1.copy_in("COPY usage FROM STDIN WITH (FORMAT csv, HEADER)").await.unwrap();
    futures::pin_mut!(sink);
    futures::SinkExt::send(&mut sink, bytes::Bytes::from(csv)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 12_000);
    // Rows in write buffers: small INSERTs through every node.
    for i in 0..30 {
        let c = wait_connect(&urls[i % 3], Duration::from_secs(10)).await;
        let mut values = Vec::new();
        for j in 0..10 {
            let e = format!("acct-{:02}", (i * 10 + j) % 40);
            values.push(format!("('small-{i}-{j}', '{e}', 'compute', 'Run', 'Seconds', 2, '2026-01-07 08:{j:02}:00')"));
            let x = expected.entry(e).or_default();
            x.0 += 1;
            x.1 += 2;
        }
        let sql = format!("INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) VALUES {}", values.join(", "));
        c.execute(&sql, &[]).await.unwrap();
    }
    assert!(wait_converged(&urls, Duration::from_secs(30)).await, "the replicas did not converge");
    let total = expected.values().fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
    for (n, url) in urls.iter().enumerate() {
        let c = wait_connect(url, Duration::from_secs(10)).await;
        for policy in ["round_robin", "least_in_flight", "power_of_two"] {
            c.batch_execute(&format!("SET tidemark.routing_policy = '{policy}'")).await.unwrap();
            for _ in 0..3 {
                // The simple protocol: planned for this statement.
                let rows = c.simple_query("SELECT count(*)::bigint, CAST(sum(quantity) AS bigint) FROM usage").await.unwrap();
                let got = rows.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some((r.get(0).unwrap().parse::<i64>().unwrap(), r.get(1).unwrap().parse::<i64>().unwrap()))
                    }
                    _ => None,
                });
                assert_eq!(got, Some(total), "node {}: the whole table under {policy}", n + 1);
            }
            // A prepared statement's plan is reused: its shards are resolved and routed per execution.
            let one = c.prepare("SELECT count(*)::bigint, CAST(sum(quantity) AS bigint) FROM usage WHERE entity_id = $1").await.unwrap();
            for (e, want) in expected.iter().take(12) {
                for _ in 0..2 {
                    let r = c.query_one(&one, &[e]).await.unwrap();
                    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), *want, "node {}: {e} under {policy}", n + 1);
                }
            }
        }
        // Some of this node's fragments ran on the other nodes' pipelines.
        let remote = c
            .query_one(&format!("SELECT count(*) FROM system.routing_decisions WHERE choice NOT LIKE 'n{}.%'", n + 1), &[])
            .await
            .unwrap()
            .get::<_, i64>(0);
        if remote == 0 {
            let rows = c.simple_query("SELECT choice, reason, candidates, count(*) FROM system.routing_decisions GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 10").await.unwrap();
            for r in rows {
                if let tokio_postgres::SimpleQueryMessage::Row(r) = r {
                    eprintln!("{:?} {:?} {:?} {:?}", r.get(0), r.get(1), r.get(2), r.get(3));
                }
            }
        }
        assert!(remote > 0, "node {}: no fragment ran on another node", n + 1);
    }
    // Read-your-writes through peers: each read follows its own write at once, its
    // fragment routed round robin over the shard's pipelines on every node.
    let c = wait_connect(&urls[0], Duration::from_secs(10)).await;
    c.batch_execute("SET tidemark.routing_policy = 'round_robin'").await.unwrap();
    let one = c.prepare("SELECT count(*)::bigint FROM usage WHERE entity_id = $1").await.unwrap();
    for k in 0..30 {
        let e = format!("ryw-{k}");
        c.execute(
            &format!("INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) VALUES ('ryw-{k}', '{e}', 'storage', 'GetObject', 'Requests', 1, '2026-01-08 00:00:00')"),
            &[],
        )
        .await
        .unwrap();
        let seen: i64 = if k % 2 == 0 {
            c.query_one(&one, &[&e]).await.unwrap().get(0)
        } else {
            c.query_one(&format!("SELECT count(*)::bigint FROM usage WHERE entity_id = '{e}'"), &[]).await.unwrap().get(0)
        };
        assert_eq!(seen, 1, "a read right after its own write missed it ({e})");
    }
    drop(nodes);
}

// ---------------------------------------------------------------------------------
// The same in containers from docker/ on a private Docker network.

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker").args(args).output().expect("run docker")
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(out.status.success(), "docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `docker_ok` of a command on container `name`; a failure also says what became of
/// the container (its state and the end of its log).
fn docker_on(name: &str, args: &[&str]) -> String {
    let out = docker(args);
    if !out.status.success() {
        let state = docker(&["inspect", "-f", "{{.State.Status}} exit {{.State.ExitCode}} {{.State.Error}}", name]);
        let logs = docker(&["logs", "--tail", "40", name]);
        panic!(
            "docker {}: {}\ncontainer {name}: {}\nits log:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&state.stdout).trim(),
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Three containers of an image made by `docker/image.sh` from the binary under test,
/// on a network of their own; removed (with the network and the image) when dropped.
struct Containers {
    image: String,
    network: String,
    names: Vec<String>,
    ips: Vec<String>,
    ports: Vec<u16>,
    dirs: Vec<tempfile::TempDir>,
}

impl Containers {
    /// None (with the reason) when this machine has no usable Docker engine.
    fn start() -> Result<Containers, String> {
        match Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => return Err(format!("docker info failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => return Err(format!("no docker command: {e}")),
        }
        let id = std::process::id();
        let image = format!("tidemark-test:{id}");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/docker/image.sh");
        let built = Command::new("bash").args([script, env!("CARGO_BIN_EXE_tidemark"), &image]).output().expect("run docker/image.sh");
        assert!(built.status.success(), "docker/image.sh: {}", String::from_utf8_lossy(&built.stderr));
        let network = format!("tidemark-test-{id}");
        // A private subnet no other network of this engine uses.
        let mut subnet = None;
        for k in 0..20u32 {
            let third = 16 + (id + k) % 200;
            let net = format!("172.29.{third}");
            if docker(&["network", "create", "--driver", "bridge", "--subnet", &format!("{net}.0/24"), &network]).status.success() {
                subnet = Some(net);
                break;
            }
        }
        let subnet = subnet.expect("no free subnet for the test network");
        let mut c = Containers {
            image,
            network,
            names: (1..=3).map(|i| format!("tidemark-test-{id}-{i}")).collect(),
            ips: (1..=3).map(|i| format!("{subnet}.{}", 10 + i)).collect(),
            ports: (0..3).map(|_| free_port()).collect(),
            dirs: Vec::new(),
        };
        c.dirs = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        for i in 0..3 {
            c.run(i);
        }
        Ok(c)
    }

    fn run(&self, i: usize) {
        let peers: Vec<String> = (0..3).filter(|j| *j != i).map(|j| format!("{}={}:7000", j + 1, self.ips[j])).collect();
        let data = format!("{}:/data", self.dirs[i].path().display());
        let port = format!("127.0.0.1:{}:5433", self.ports[i]);
        let internal = format!("{}:7000", self.ips[i]);
        let node_id = (i + 1).to_string();
        docker_ok(&[
            "run", "-d", "--name", &self.names[i], "--network", &self.network, "--ip", &self.ips[i], "-p", &port, "-v", &data,
            "-e", "TIDEMARK_LOG=warn", &self.image, "serve", "--data-dir", "/data", "--listen", "0.0.0.0:5433", "--node-id", &node_id,
            "--internal-addr", &internal, "--peers", &peers.join(","), "--pipelines", "1", "--peer-pipelines", "1",
        ]);
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = docker(&["rm", "-f", n]);
        }
        let _ = docker(&["network", "rm", &self.network]);
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

impl Nodes for Containers {
    fn urls(&self) -> Vec<String> {
        self.ports.iter().map(|p| format!("postgres://tidemark@127.0.0.1:{p}/tidemark")).collect()
    }

    fn dirs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.path().to_path_buf()).collect()
    }

    async fn fault(&mut self, fault: Fault, victim: usize) {
        let name = self.names[victim].clone();
        match fault {
            Fault::Kill | Fault::LoseDisk => {
                docker_on(&name, &["kill", &name]);
                if matches!(fault, Fault::LoseDisk) {
                    for e in std::fs::read_dir(self.dirs[victim].path()).unwrap() {
                        let p = e.unwrap().path();
                        if p.is_dir() {
                            std::fs::remove_dir_all(&p).unwrap();
                        } else {
                            std::fs::remove_file(&p).unwrap();
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                docker_on(&name, &["start", &name]);
                wait_connect(&self.urls()[victim], Duration::from_secs(60)).await;
            }
            Fault::Pause => {
                docker_on(&name, &["pause", &name]);
                tokio::time::sleep(Duration::from_secs(2)).await;
                docker_on(&name, &["unpause", &name]);
            }
            Fault::Partition => {
                docker_on(&name, &["network", "disconnect", &self.network, &name]);
                tokio::time::sleep(Duration::from_secs(3)).await;
                docker_on(&name, &["network", "connect", "--ip", &self.ips[victim], &self.network, &name]);
                wait_connect(&self.urls()[victim], Duration::from_secs(60)).await;
            }
        }
    }

    fn kill_all(&mut self) {
        for n in &self.names {
            let _ = docker(&["kill", n]);
        }
    }
}

/// The cluster of `docker/` (an image from this build, three containers on a private
/// network): a leader killed with `docker kill` and restarted, a node partitioned away
/// and healed, a node paused past the election timeout, a node's data lost. Skipped,
/// saying why, where no Docker engine runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_containers_replicate_through_a_kill_a_partition_a_pause_and_a_lost_disk() {
    let mut nodes = match Containers::start() {
        Ok(c) => c,
        Err(why) => {
            println!("SKIPPED three_containers_replicate_...: {why}");
            return;
        }
    };
    exercise(&mut nodes, &[Fault::Kill, Fault::Partition, Fault::Pause, Fault::LoseDisk]).await;
}
