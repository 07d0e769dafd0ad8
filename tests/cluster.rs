//! Several nodes on one machine: a gateway runs fragments on the pipelines of other
//! nodes over Arrow Flight, gets the same answers as DuckDB, and survives a node
//! killed with SIGKILL in the middle of queries.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark::clock::Clock;
use tidemark::config::Config;
use tidemark::datagen::{entity_id, GenSpec, Generator};
use tidemark::node::Node;

use common::{duckdb_rows, free_port, random_query, test_config, try_rows as rows_of, wait_ready, NodeProcess, TestNode};

/// 2026-01-20 00:00:00 UTC: the generated data ends here.
const END_US: i64 = 1_768_867_200_000_000;

/// A worker node's configuration: it reads the gateway's segment store and serves
/// fragments on its internal address.
fn worker_config(dir: &Path, node_id: u64, store: &Path) -> Config {
    let mut cfg = test_config(dir);
    cfg.node_id = node_id;
    cfg.internal_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.pipelines = Some(2);
    cfg.segment_store_read_only = true;
    cfg.object_store_url = Some(format!("file://{}", store.display()));
    cfg
}

fn sorted(mut v: Vec<Vec<String>>) -> Vec<Vec<String>> {
    v.sort();
    v
}

/// Loads generated data through `gateway` and returns the Parquet file.
async fn load(gateway: &TestNode, rows: u64) -> std::path::PathBuf {
    let table = gateway.node.catalog().get("usage").cloned().unwrap();
    let gen = Generator::new(GenSpec { rows, entities: 150, days: 7, seed: 9, end_us: END_US }, Arc::clone(&table.schema));
    let parquet = gateway.dir.path().join("import/data.parquet");
    tidemark::datagen::write_parquet(&gen, &parquet, |_| {}).unwrap();
    let c = gateway.client().await;
    c.execute(&format!("COPY usage FROM '{}' WITH (FORMAT parquet)", parquet.display()), &[]).await.unwrap();
    parquet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_runs_fragments_on_other_nodes() {
    let gw_dir = tempfile::tempdir().unwrap();
    let store = gw_dir.path().join("segments");
    std::fs::create_dir_all(&store).unwrap();
    let (d2, d3) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let n2 = Node::open(worker_config(d2.path(), 2, &store), Clock::real()).await.unwrap();
    let n3 = Node::open(worker_config(d3.path(), 3, &store), Clock::real()).await.unwrap();
    let mut cfg = test_config(gw_dir.path());
    cfg.pipelines = Some(0);
    cfg.peer_pipelines = 2;
    // Small writes wait in the gateway's write buffer; its rows are read in the gateway.
    cfg.write_buffer_rows_max = 50_000;
    cfg.write_buffer_flush_interval_ms = 3_600_000;
    cfg.peers = vec![format!("2={}", n2.internal_addr().unwrap()), format!("3={}", n3.internal_addr().unwrap())];
    // The workers read this node's store; its shards are its own (not replicated).
    cfg.replication_factor = 1;
    let gw = TestNode::start_with(gw_dir, cfg).await;
    let parquet = load(&gw, 20_000).await;
    let c = gw.client().await;

    let e = entity_id(2);
    let qs = vec![
        format!("SELECT sum(quantity), count(*) FROM usage WHERE entity_id = '{e}'"),
        format!("SELECT entity_id, service, sum(quantity) FROM usage WHERE entity_id IN ('{e}', '{}', '{}') GROUP BY 1, 2", entity_id(40), entity_id(90)),
        "SELECT service, date_trunc('day', event_time) AS d, count(*), sum(quantity) FROM usage GROUP BY 1, 2".to_string(),
        "SELECT entity_id, sum(quantity) AS q FROM usage WHERE service = 'storage' GROUP BY 1 ORDER BY q DESC, entity_id LIMIT 5".to_string(),
        format!("SELECT record_id, quantity, event_time FROM usage WHERE entity_id = '{e}' ORDER BY event_time DESC, record_id LIMIT 9"),
        "SELECT count(DISTINCT entity_id), min(event_time), max(event_time) FROM usage".to_string(),
    ];
    // Plus a hundred and fifty random predicates in the typical shapes.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
    let qs: Vec<String> = qs.into_iter().chain((0..150).map(|_| random_query(&mut rng))).collect();
    let want = duckdb_rows(&parquet, &qs);
    for (q, want) in qs.iter().zip(want) {
        let got = rows_of(&c, q).await.unwrap_or_else(|e| panic!("{q}: {e}"));
        if q.contains("ORDER BY") {
            assert_eq!(got, want, "{q}");
        } else {
            assert_eq!(sorted(got), sorted(want), "{q}");
        }
    }
    // Every fragment ran on node 2 or 3 (the gateway has no pipelines), and both served.
    let choices = rows_of(&c, "SELECT DISTINCT substr(choice, 1, 2) FROM system.routing_decisions ORDER BY 1").await.unwrap();
    assert_eq!(choices, vec![vec!["n2".to_string()], vec!["n3".to_string()]]);
    let remote = rows_of(&c, "SELECT count(*), sum(completed) FROM system.pipelines WHERE NOT local").await.unwrap();
    assert_eq!(remote[0][0], "4");
    assert!(remote[0][1].parse::<u64>().unwrap() >= 150, "{remote:?}");
    // The workers' own pipelines counted the same work.
    let worked: u64 = [&n2, &n3]
        .iter()
        .flat_map(|n| n.cluster().local_pipelines())
        .map(|p| p.stats().snapshot().completed)
        .sum();
    assert!(worked >= 150, "workers completed {worked} fragments");
    // A row still in the gateway's write buffer is seen at once (read-your-writes),
    // together with the fragments' rows from the workers.
    let before = rows_of(&c, &qs[0]).await.unwrap();
    c.execute(
        &format!("INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) VALUES ('new-1', '{e}', 'storage', 'GetObject', 'Requests', 2.5, '2026-01-19 10:00:00')"),
        &[],
    )
    .await
    .unwrap();
    assert!(gw.node.storage().view().1.rows == 1, "the row should wait in the write buffer");
    let after = rows_of(&c, &qs[0]).await.unwrap();
    let count = |r: &Vec<Vec<String>>| r[0][1].parse::<i64>().unwrap();
    assert_eq!(count(&after), count(&before) + 1, "{before:?} -> {after:?}");
    // A prepared statement's reused plan: its fragments carry this execution's values
    // to the workers (in the filter above the scan as well as in the scan's predicate).
    let stmt = c.prepare("SELECT count(*), sum(quantity)::text FROM usage WHERE entity_id = $1 AND service <> $2").await.unwrap();
    let reused = || gw.node.plan_counters().reused.load(std::sync::atomic::Ordering::Relaxed);
    let start = reused();
    for (i, skip) in [(2u32, "nosuch"), (40, "storage"), (90, "compute"), (7, "nosuch")] {
        let e = entity_id(i);
        let row = c.query_one(&stmt, &[&e, &skip]).await.unwrap();
        let got = vec![row.get::<_, i64>(0).to_string(), row.get::<_, Option<String>>(1).map(|v| common::normalize(&v)).unwrap_or("NULL".into())];
        let literal = format!("SELECT count(*), sum(quantity)::text FROM usage WHERE entity_id = '{e}' AND service <> '{skip}'");
        let want = rows_of(&c, &literal).await.unwrap();
        assert_eq!(got, want[0], "{literal}");
        assert!(got[0] != "0", "{literal} should match rows");
    }
    assert_eq!(reused() - start, 4, "the statement's plan should run each time");
    // Garbage sent to a worker's internal port is refused with 22023; the worker goes on.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", n2.internal_addr().unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut flight = arrow_flight::flight_service_client::FlightServiceClient::new(channel);
    let garbage: [&[u8]; 4] = [b"", b"TMF1", b"TMF1\x02\x00\x00\x00{}not a plan", b"TMF1\x0b\x00\x00\x00{\"pipeline\":9}"];
    for bad in garbage {
        let Err(err) = flight.do_get(arrow_flight::Ticket { ticket: bytes::Bytes::copy_from_slice(bad) }).await else {
            panic!("{bad:?} was accepted");
        };
        assert!(err.message().starts_with("SQLSTATE 22023"), "{bad:?}: {err}");
    }
    let again = rows_of(&c, &qs[0]).await.unwrap();
    assert_eq!(again.len(), 1);
    // A worker refuses writes: the segment store is not its own.
    let err = n2.storage().append(n2.catalog().get("usage").unwrap(), vec![]).await.unwrap_err();
    assert_eq!(err.sqlstate(), "25006");
}

fn start_worker(dir: &Path, node_id: u64, pg_port: u16, internal: u16, store: &Path) -> NodeProcess {
    NodeProcess::new(
        Command::new(env!("CARGO_BIN_EXE_tidemark"))
            .args(["serve", "--data-dir"])
            .arg(dir)
            .args(["--listen", &format!("127.0.0.1:{pg_port}")])
            .args(["--node-id", &node_id.to_string()])
            .args(["--internal-addr", &format!("127.0.0.1:{internal}")])
            .args(["--pipelines", "1", "--segment-store-read-only"])
            .args(["--object-store-url", &format!("file://{}", store.display())])
            .env("TIDEMARK_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tidemark"),
    )
}

/// Node 2 is killed with SIGKILL while fan-out queries run through the gateway. Every
/// shard has a copy on node 3, so a fragment that had sent nothing is retried there;
/// a query either returns the right rows or fails with 58000, never wrong rows; the
/// gateway keeps serving on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_query_is_retried_elsewhere() {
    let gw_dir = tempfile::tempdir().unwrap();
    let store = gw_dir.path().join("segments");
    std::fs::create_dir_all(&store).unwrap();
    let (d2, d3) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (i2, i3) = (free_port(), free_port());
    let (p2, p3) = (free_port(), free_port());
    let mut w2 = start_worker(d2.path(), 2, p2, i2, &store);
    let _w3 = start_worker(d3.path(), 3, p3, i3, &store);
    wait_ready(p2).await;
    wait_ready(p3).await;

    let mut cfg = test_config(gw_dir.path());
    cfg.pipelines = Some(0);
    cfg.peer_pipelines = 1;
    cfg.shard_replicas = 2;
    cfg.fragment_timeout_ms = 10_000;
    cfg.peers = vec![format!("2=127.0.0.1:{i2}"), format!("3=127.0.0.1:{i3}")];
    cfg.replication_factor = 1;
    let gw = TestNode::start_with(gw_dir, cfg).await;
    let parquet = load(&gw, 40_000).await;
    let q = "SELECT service, operation, count(*), sum(quantity) FROM usage GROUP BY 1, 2".to_string();
    let want = sorted(duckdb_rows(&parquet, std::slice::from_ref(&q)).remove(0));
    let c = gw.client().await;
    assert_eq!(sorted(rows_of(&c, &q).await.unwrap()), want);

    // Queries run back to back on one connection; node 2 dies during them.
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        w2.kill_9();
        w2
    });
    let (mut ok, mut failed, mut after_kill_ok) = (0, 0, 0);
    let started = Instant::now();
    let mut killed_at: Option<u32> = None;
    for i in 0..60u32 {
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
        if killed_at.is_none() && killer.is_finished() {
            killed_at = Some(i);
        }
        match rows_of(&c, &q).await {
            Ok(rows) => {
                assert_eq!(sorted(rows), want, "query {i} returned wrong rows");
                ok += 1;
                after_kill_ok += u32::from(killed_at.is_some());
            }
            Err(e) => {
                let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
                assert_eq!(code, "58000", "query {i}: {:?}", e.as_db_error().map(|d| d.message()));
                failed += 1;
            }
        }
        if killed_at.is_some() && after_kill_ok >= 10 {
            break;
        }
    }
    let _w2 = killer.await.unwrap();
    assert!(killed_at.is_some(), "node 2 was never killed ({ok} ok, {failed} failed)");
    assert!(after_kill_ok >= 10, "the gateway stopped answering after the kill ({ok} ok, {failed} failed)");
    // Retries are recorded as second attempts away from node 2.
    let retried = rows_of(&c, "SELECT count(*) FROM system.routing_decisions WHERE attempt = 2 AND choice LIKE 'n3.%'").await.unwrap();
    let avoided = rows_of(&c, "SELECT count(*) FROM system.pipelines WHERE pipeline = 'n2.p0' AND NOT available").await.unwrap();
    eprintln!("ok={ok} failed={failed} retried={retried:?} n2 marked down={avoided:?}");
    let retried: u64 = retried[0][0].parse().unwrap();
    assert!(retried + failed >= 1, "the kill never reached a fragment; nothing was tested");
}
