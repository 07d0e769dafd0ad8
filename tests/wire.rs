//! Over-the-wire behaviour with real clients: tokio-postgres (extended protocol,
//! parameters, COPY) and psql (\dt, \d, \copy), connection limits, malformed input,
//! and the query log across a restart.

mod common;

use std::io::Write;
use std::time::Duration;

use futures::{SinkExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::{connect, test_config, TestNode};

const CSV: &str = "record_id,entity_id,service,operation,usage_type,region,quantity,event_time
w1,acct-1,storage,GetObject,Requests,eu-west-1,10,2026-01-05 10:15:00
w2,acct-1,storage,GetObject,Requests,,5.5,2026-01-05 10:45:00
w3,acct-2,compute,RunInstance,Instance-Hours,us-east-1,0.25,2026-01-06 00:30:00
";

async fn load_csv(c: &tokio_postgres::Client, csv: &str) -> u64 {
    let sink = c.copy_in("COPY usage FROM STDIN WITH (FORMAT csv, HEADER)").await.unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(csv.to_string())).await.unwrap();
    sink.finish().await.unwrap()
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.code().code().to_string()).unwrap_or_else(|| format!("not a server error: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_with_parameters() {
    let n = TestNode::start().await;
    let c = n.client().await;
    assert_eq!(load_csv(&c, CSV).await, 3);
    let point = c
        .prepare(
            "SELECT sum(quantity)::double precision FROM usage WHERE entity_id = $1 AND service = $2 AND operation = $3 \
             AND event_time >= $4 AND event_time < $5",
        )
        .await
        .unwrap();
    let day = chrono::NaiveDate::from_ymd_opt(2026, 1, 5).unwrap().and_hms_opt(0, 0, 0).unwrap();
    let next = day + chrono::Duration::days(1);
    // The same prepared statement, executed with different parameters.
    let row = c.query_one(&point, &[&"acct-1", &"storage", &"GetObject", &day, &next]).await.unwrap();
    assert_eq!(row.get::<_, Option<f64>>(0), Some(15.5));
    let row = c.query_one(&point, &[&"acct-2", &"storage", &"GetObject", &day, &next]).await.unwrap();
    assert_eq!(row.get::<_, Option<f64>>(0), None);
    let row = c
        .query_one("SELECT count(*) FROM usage WHERE entity_id IN ($1, $2, $3)", &[&"acct-1", &"acct-2", &"zzz"])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 3);
    // An INSERT with parameters.
    let inserted = c
        .execute(
            "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) \
             VALUES ($1, $2, 'queue', 'SendMessage', 'Requests', 1, $3)",
            &[&"w4", &"acct-3", &day],
        )
        .await
        .unwrap();
    assert_eq!(inserted, 1);
    let row = c.query_one("SELECT count(*) FROM usage", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_statements_keep_the_connection() {
    let n = TestNode::start().await;
    let c = n.client().await;
    for (sql, code) in [
        ("SELEC 1", "42601"),
        ("SELECT * FROM nope", "42P01"),
        ("SELECT nope FROM usage", "42703"),
        ("SELECT 1/0", "22012"),
        ("DELETE FROM usage", "0A000"),
    ] {
        let e = c.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), code, "{sql}");
        let e = c.query(sql, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&e), code, "{sql} (extended)");
    }
    let row = c.query_one("SELECT 41 + 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_is_all_or_nothing_and_idempotent() {
    let n = TestNode::start().await;
    let c = n.client().await;
    assert_eq!(load_csv(&c, CSV).await, 3);
    // The same rows again: nothing new is stored.
    assert_eq!(load_csv(&c, CSV).await, 0);
    // A bad value in the last row: nothing of the statement is stored.
    let bad = format!("{CSV}w9,acct-9,storage,GetObject,Requests,,not-a-number,2026-01-05 10:00:00\n").replace("w1,", "x1,");
    let sink = c.copy_in("COPY usage FROM STDIN WITH (FORMAT csv, HEADER)").await.unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(bad)).await.unwrap();
    let e = sink.finish().await.unwrap_err();
    assert_eq!(sqlstate(&e), "22P02");
    let msg = e.as_db_error().unwrap().message().to_string();
    assert!(msg.contains("quantity") && msg.contains("row 4"), "{msg}");
    let row = c.query_one("SELECT count(*) FROM usage", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 3);
    // Parquet through COPY FROM STDIN, as `tidemark ingest` sends it.
    let out = n.dir.path().join("export/export.parquet");
    c.batch_execute(&format!("COPY (SELECT * FROM usage) TO '{}'", out.display())).await.unwrap();
    let sink = c.copy_in("COPY usage FROM STDIN WITH (FORMAT parquet)").await.unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(std::fs::read(&out).unwrap())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 0, "every record is already stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_out_and_file_export() {
    let n = TestNode::start().await;
    let c = n.client().await;
    load_csv(&c, CSV).await;
    let stream = c
        .copy_out("COPY (SELECT record_id, quantity FROM usage ORDER BY record_id) TO STDOUT WITH (FORMAT csv)")
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
    let text: String = chunks.iter().map(|b| String::from_utf8_lossy(b).to_string()).collect();
    assert_eq!(text, "w1,10.000000\nw2,5.500000\nw3,0.250000\n");
    let out = n.dir.path().join("export/out.parquet");
    let rows = c
        .execute(&format!("COPY (SELECT entity_id, sum(quantity) AS q FROM usage GROUP BY 1) TO '{}'", out.display()), &[])
        .await
        .unwrap();
    assert_eq!(rows, 2);
    let batches = tidemark::ingest::read_parquet(bytes::Bytes::from(std::fs::read(&out).unwrap())).unwrap();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_pruned_segments() {
    let n = TestNode::start().await;
    let c = n.client().await;
    load_csv(&c, CSV).await;
    let rows = c
        .simple_query("EXPLAIN SELECT sum(quantity) FROM usage WHERE entity_id = 'acct-1' AND event_time >= '2026-01-05' AND event_time < '2026-01-06'")
        .await
        .unwrap();
    let text: String = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(format!("{}\n", r.get(1).unwrap_or(""))),
            _ => None,
        })
        .collect();
    assert!(text.contains("DataSourceExec"), "{text}");
    // Three segments exist (two shards x days); the predicate leaves exactly one file.
    assert_eq!(text.matches(".parquet").count(), 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refuses_with_53300() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.connections_max = 2;
    cfg.reserved_connections = 1;
    let n = TestNode::start_with(dir, cfg).await;
    let a = n.client().await;
    let b = n.client().await;
    let err = tokio_postgres::connect(&n.url(), tokio_postgres::NoTls).await.map(|_| ()).unwrap_err();
    assert_eq!(sqlstate(&err), "53300");
    drop(a);
    // The slot is released once the first connection is gone.
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if tokio_postgres::connect(&n.url(), tokio_postgres::NoTls).await.is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "a freed connection slot was not reused");
    b.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_do_not_hurt_the_server() {
    let n = TestNode::start().await;
    let addr = n.server.local_addr;
    // Garbage instead of a startup message; a startup message with an absurd length;
    // a valid startup followed by a message of an unknown type.
    let garbage: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0],
        &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f],
    ];
    for g in garbage {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(g).await;
        let mut buf = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    }
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut startup = Vec::new();
    let params = b"user\0tidemark\0database\0tidemark\0\0";
    startup.extend_from_slice(&((8 + params.len()) as i32).to_be_bytes());
    startup.extend_from_slice(&196608i32.to_be_bytes());
    startup.extend_from_slice(params);
    s.write_all(&startup).await.unwrap();
    s.write_all(&[b'!', 0, 0, 0, 4]).await.unwrap();
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
    drop(s);
    // The server still serves.
    let c = n.client().await;
    assert_eq!(c.query_one("SELECT 1::bigint", &[]).await.unwrap().get::<_, i64>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_log_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    {
        let n = TestNode::start_with(dir, test_config(&path)).await;
        let c = n.client().await;
        c.simple_query("SELECT count(*) FROM usage WHERE entity_id = 'before-restart'").await.unwrap();
        let _ = c.simple_query("SELECT * FROM missing_before_restart").await;
        n.server.stop();
        n.node.shutdown();
        std::mem::forget(n.dir);
    }
    let n = TestNode::start_with(tempfile::TempDir::new_in(&path).unwrap(), test_config(&path)).await;
    let c = n.client().await;
    let rows = c
        .query(
            "SELECT status, sqlstate, array_to_string(entity_ids, ',') FROM system.query_log \
             WHERE query LIKE '%before_restart%' OR query LIKE '%before-restart%' ORDER BY query_id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, String, Option<String>)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        got,
        vec![
            ("ok".to_string(), "00000".to_string(), Some("before-restart".to_string())),
            ("error".to_string(), "42P01".to_string(), None),
        ]
    );
    std::fs::remove_dir_all(&path).ok();
}

/// psql itself: \dt, \d usage and \copy. psql is on every machine CI runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_meta_commands_and_copy() {
    let n = TestNode::start().await;
    let csv = n.dir.path().join("in.csv");
    std::fs::File::create(&csv).unwrap().write_all(CSV.as_bytes()).unwrap();
    let out = n.dir.path().join("out.csv");
    let script = format!(
        "\\l\n\\dt\n\\d usage\n\\copy usage FROM '{}' WITH (FORMAT csv, HEADER)\nSELECT count(*) AS n FROM usage;\n\\copy (SELECT record_id FROM usage ORDER BY 1) TO '{}' WITH (FORMAT csv)\n",
        csv.display(),
        out.display()
    );
    let script_file = n.dir.path().join("script.sql");
    std::fs::write(&script_file, script).unwrap();
    let port = n.port();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("psql")
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "tidemark", "tidemark"])
            .arg("-f")
            .arg(script_file)
            .output()
            .expect("psql must be installed (see .ci/run)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "psql failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("List of databases") && stdout.contains("tidemark"), "\\l:\n{stdout}");
    assert!(stdout.contains("usage") && stdout.contains("table"), "\\dt:\n{stdout}");
    for col in ["record_id", "entity_id", "quantity", "event_time", "ingest_time", "not null", "numeric", "timestamp without time zone"] {
        assert!(stdout.contains(col), "\\d usage lacks {col}:\n{stdout}");
    }
    assert!(stdout.contains("COPY 3"), "{stdout}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "w1\nw2\nw3\n");
    let c = connect(&n.url()).await;
    assert_eq!(c.query_one("SELECT count(*) FROM usage", &[]).await.unwrap().get::<_, i64>(0), 3);
}

/// Statements commit on their own: a write inside BEGIN ... COMMIT is refused (it could
/// not be rolled back), reads inside one work, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_inside_a_transaction_block_are_refused() {
    let n = TestNode::start().await;
    let c = n.client().await;
    c.batch_execute("BEGIN").await.unwrap();
    assert_eq!(c.query_one("SELECT count(*) FROM usage", &[]).await.unwrap().get::<_, i64>(0), 0);
    let e = c
        .batch_execute(
            "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) \
             VALUES ('t1', 'acct-1', 'storage', 'GetObject', 'Requests', 1, '2026-01-05 10:00:00')",
        )
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "0A000");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(c.query_one("SELECT count(*) FROM usage", &[]).await.unwrap().get::<_, i64>(0), 0);
    // Outside a block the same INSERT commits.
    c.batch_execute(
        "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) \
         VALUES ('t1', 'acct-1', 'storage', 'GetObject', 'Requests', 1, '2026-01-05 10:00:00')",
    )
    .await
    .unwrap();
    assert_eq!(c.query_one("SELECT count(*) FROM usage", &[]).await.unwrap().get::<_, i64>(0), 1);
}

/// Result columns are named as PostgreSQL names them, in both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_columns_have_postgres_names() {
    let n = TestNode::start().await;
    let c = n.client().await;
    load_csv(&c, CSV).await;
    let sql = "SELECT entity_id, sum(quantity), count(*), date_trunc('hour', event_time), quantity::text, usage.service, \
               1 + 1, max(region) AS \"Last Region\" FROM usage GROUP BY entity_id, 4, 5, usage.service";
    let want = ["entity_id", "sum", "count", "date_trunc", "quantity", "service", "?column?", "Last Region"];
    let stmt = c.prepare(sql).await.unwrap();
    let names: Vec<&str> = stmt.columns().iter().map(|c| c.name()).collect();
    assert_eq!(names, want);
    let rows = c.query(&stmt, &[]).await.unwrap();
    assert_eq!(rows[0].columns().iter().map(|c| c.name()).collect::<Vec<_>>(), want);
    let msgs = c.simple_query(sql).await.unwrap();
    let simple: Vec<String> = msgs
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::RowDescription(d) => Some(d.iter().map(|c| c.name().to_string()).collect()),
            _ => None,
        })
        .unwrap();
    assert_eq!(simple, want);
    // SELECT * keeps the table's names.
    let stmt = c.prepare("SELECT * FROM usage").await.unwrap();
    assert_eq!(stmt.columns()[0].name(), "record_id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_chooses_its_routing_policy() {
    let n = TestNode::start().await;
    let c = n.client().await;
    assert_eq!(load_csv(&c, CSV).await, 3);
    let policy = |rows: Vec<tokio_postgres::SimpleQueryMessage>| {
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
                _ => None,
            })
            .expect("a row")
    };
    assert_eq!(policy(c.simple_query("SHOW tidemark.routing_policy").await.unwrap()), "least_in_flight");
    c.batch_execute("SET tidemark.routing_policy = 'round_robin'").await.unwrap();
    assert_eq!(policy(c.simple_query("SHOW tidemark.routing_policy").await.unwrap()), "round_robin");
    let e = c.batch_execute("SET tidemark.routing_policy = 'fastest'").await.unwrap_err();
    assert_eq!(sqlstate(&e), "22023", "{e}");
    // Queries of this session are routed by its policy, and say so.
    // Both protocols, a reused prepared plan included.
    c.simple_query("SELECT sum(quantity) FROM usage").await.unwrap();
    let prepared = c.prepare("SELECT sum(quantity) FROM usage WHERE event_time >= $1").await.unwrap();
    for _ in 0..3 {
        c.query(&prepared, &[&chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap().and_hms_opt(0, 0, 0).unwrap()]).await.unwrap();
    }
    let rows = c
        .query("SELECT DISTINCT policy FROM system.routing_decisions WHERE reason <> 'only replica' AND shard IS NOT NULL", &[])
        .await
        .unwrap();
    let seen: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(seen, vec!["round_robin".to_string()]);
    // Another connection keeps the node's policy.
    let other = n.client().await;
    assert_eq!(policy(other.simple_query("SHOW tidemark.routing_policy").await.unwrap()), "least_in_flight");
    // Under predictive, EXPLAIN shows each candidate's score with its parts.
    c.batch_execute("SET tidemark.routing_policy = 'predictive'").await.unwrap();
    let plan: Vec<String> = c
        .simple_query("EXPLAIN SELECT sum(quantity) FROM usage")
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some((0..r.len()).filter_map(|i| r.get(i)).collect::<Vec<_>>().join(" ")),
            _ => None,
        })
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("live=") && plan.contains("weight="), "{plan}");
    assert!(plan.contains(" by predictive; candidates"), "EXPLAIN names the policy: {plan}");
    c.batch_execute("SET tidemark.routing_policy TO DEFAULT").await.unwrap();
    assert_eq!(policy(c.simple_query("SHOW tidemark.routing_policy").await.unwrap()), "least_in_flight");
    // system.pipelines shows the balancer's view.
    let r = c.query_one("SELECT min(weight), max(weight) FROM system.pipelines", &[]).await.unwrap();
    let (lo, hi): (f64, f64) = (r.get(0), r.get(1));
    assert!(lo >= 0.25 && hi <= 8.0, "{lo} {hi}");
}

async fn show(c: &tokio_postgres::Client, key: &str) -> String {
    c.simple_query(&format!("SHOW {key}"))
        .await
        .unwrap()
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .expect("a row")
}

/// Read-your-writes tokens over the wire: a write's token names the shards it reached,
/// another connection takes it with `SET tidemark.read_after` (both protocols), a bad
/// token is 22023, the write token cannot be set (55P02), and a token this node's
/// replicas never reach fails the read with 57P03 after `read_wait_ms_max`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_tokens_carry_read_your_writes_across_connections() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::test_config(dir.path());
    cfg.read_wait_ms_max = 300;
    let n = TestNode::start_with(dir, cfg).await;
    let writer = n.client().await;
    assert_eq!(show(&writer, "tidemark.write_token").await, "t1:");
    writer
        .batch_execute(
            "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) VALUES \
             ('rt-1', 'acct-001', 'storage', 'GetObject', 'Requests', 1, '2026-01-05 10:00:00'), \
             ('rt-2', 'acct-777', 'storage', 'GetObject', 'Requests', 1, '2026-01-05 10:00:00')",
        )
        .await
        .unwrap();
    let token = show(&writer, "tidemark.write_token").await;
    let shards: Vec<&str> = token.strip_prefix("t1:").unwrap().split(',').collect();
    assert!(!shards.is_empty() && shards.len() <= 2 && shards.iter().all(|p| p.contains('=')), "{token}");
    // A second write only raises the indexes.
    writer
        .batch_execute(
            "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) VALUES \
             ('rt-3', 'acct-001', 'storage', 'GetObject', 'Requests', 1, '2026-01-05 10:00:00')",
        )
        .await
        .unwrap();
    let later = show(&writer, "tidemark.write_token").await;
    assert_ne!(later, token, "the token did not move after a write");

    let reader = n.client().await;
    reader.batch_execute(&format!("SET tidemark.read_after = '{later}'")).await.unwrap();
    assert_eq!(show(&reader, "tidemark.read_after").await, later);
    let got = reader.query_one("SELECT count(*) FROM usage WHERE record_id LIKE 'rt-%'", &[]).await.unwrap().get::<_, i64>(0);
    assert_eq!(got, 3);
    // The extended protocol takes the setting too.
    let ext = n.client().await;
    ext.execute(format!("SET tidemark.read_after = '{later}'").as_str(), &[]).await.unwrap();
    assert_eq!(ext.query_one("SELECT count(*) FROM usage WHERE record_id LIKE 'rt-%'", &[]).await.unwrap().get::<_, i64>(0), 3);
    let shown: String = ext.query_one("SHOW tidemark.read_after", &[]).await.unwrap().get(0);
    assert_eq!(shown, later, "SHOW over the extended protocol");
    let shown: String = writer.query_one("SHOW tidemark.write_token", &[]).await.unwrap().get(0);
    assert_eq!(shown, later);
    let shown: String = writer.query_one("SHOW tidemark.routing_policy", &[]).await.unwrap().get(0);
    assert_eq!(shown, "least_in_flight");

    let e = reader.batch_execute("SET tidemark.read_after = 'not-a-token'").await.unwrap_err();
    assert_eq!(sqlstate(&e), "22023", "{e}");
    let e = reader.batch_execute("SET tidemark.write_token = 't1:'").await.unwrap_err();
    assert_eq!(sqlstate(&e), "55P02", "{e}");
    let e = reader.batch_execute("SET tidemark.read_after = 't1:0=999999999'; SELECT 1").await;
    assert!(e.is_ok(), "SET and a read without a table: {e:?}");
    let e = reader.query("SELECT count(*) FROM usage", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "57P03", "{e}");
    let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(message.contains("read_wait_ms_max"), "{message}");
    // The connection stays usable, and its token stays (it only grows).
    assert!(show(&reader, "tidemark.read_after").await.contains("0=999999999"));
    // A token from a cluster with more shards cannot be met here: 22023 at the read.
    let other = n.client().await;
    other.batch_execute("SET tidemark.read_after = 't1:99999=1'").await.unwrap();
    let e = other.query("SELECT 1 FROM usage LIMIT 1", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&e), "22023", "{e}");
    // Statements that read no stored rows do not wait.
    other.query_one("SELECT 1", &[]).await.unwrap();
}
