//! What a hostile-but-honest client can send: statements too deep to plan, failures in
//! the middle of a multi-statement query, runaway queries (timeouts, cancel requests,
//! clients that leave), idle sockets, files outside the COPY directories, invalid
//! UTF-8, malformed Binds, too many prepared statements. The server answers each with
//! the right SQLSTATE, stores nothing it should not, and goes on serving.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map(|d| d.code().code().to_string()).unwrap_or_else(|| format!("not a server error: {e}"))
}

async fn count(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM usage", &[]).await.unwrap().get(0)
}

fn insert(id: &str) -> String {
    format!(
        "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) \
         VALUES ('{id}', 'acct-1', 'storage', 'Get', 'Requests', 1, '2026-01-05 10:00:00')"
    )
}

/// Every in-process pipeline idle again (nothing in flight or queued), within a bound.
async fn pipelines_idle(c: &tokio_postgres::Client) {
    let mut last = String::new();
    for _ in 0..100 {
        let rows = c.query("SELECT pipeline, in_flight, queued FROM system.pipelines", &[]).await.unwrap();
        let busy: Vec<String> = rows
            .iter()
            .filter(|r| r.get::<_, i64>(1) != 0 || r.get::<_, i64>(2) != 0)
            .map(|r| format!("{} {}/{}", r.get::<_, String>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)))
            .collect();
        if busy.is_empty() {
            return;
        }
        last = busy.join(", ");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("pipelines still busy: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_and_wide_expressions_are_answered_or_refused() {
    let n = TestNode::start().await;
    let c = n.client().await;
    // Within the limit: answered (a 1,000-term OR counts about 2,000 of the 4,000).
    let sum = format!("SELECT {}", vec!["1"; 300].join("+"));
    let row = c.simple_query(&sum).await.unwrap();
    assert!(matches!(&row[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("300")));
    let or_terms: Vec<String> = (0..1000).map(|i| format!("entity_id = 'acct-{i}'")).collect();
    c.simple_query(&format!("SELECT count(*) FROM usage WHERE {}", or_terms.join(" OR "))).await.unwrap();
    // Beyond it, in every shape that crashed the process before: 54001 (or the
    // parser's own nesting limit, 42601), quickly.
    let long_or: Vec<String> = (0..3000).map(|i| format!("entity_id = 'acct-{i}'")).collect();
    let huge = format!("SELECT {}", vec!["1"; 200_000].join("+"));
    for sql in [
        format!("SELECT {}", vec!["1"; 5000].join("+")),
        format!("SELECT count(*) FROM usage WHERE {}", long_or.join(" OR ")),
        huge,
        format!("SELECT {}1{}", "(".repeat(3000), ")".repeat(3000)),
        format!("SELECT now(){}", " AT TIME ZONE 'UTC'".repeat(5000)),
    ] {
        let e = c.simple_query(&sql).await.unwrap_err();
        assert!(matches!(sqlstate(&e).as_str(), "54001" | "42601"), "{}: {e}", &sql[..60]);
        // Prepared the same.
        let e = c.prepare(&sql).await.unwrap_err();
        assert!(matches!(sqlstate(&e).as_str(), "54001" | "42601"), "{e}");
    }
    // Wide but shallow is fine: a 5,000-value IN list.
    let list: Vec<String> = (0..5000).map(|i| format!("'acct-{i}'")).collect();
    c.simple_query(&format!("SELECT count(*) FROM usage WHERE entity_id IN ({})", list.join(","))).await.unwrap();
    assert_eq!(c.query_one("SELECT 1::bigint", &[]).await.unwrap().get::<_, i64>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_statement_query_is_one_implicit_transaction() {
    let n = TestNode::start().await;
    let c = n.client().await;
    // A failure in the middle: nothing of the message is stored.
    let e = c.batch_execute(&format!("{}; SELECT 1/0; {}", insert("a"), insert("b"))).await.unwrap_err();
    assert_eq!(sqlstate(&e), "22012", "{e}");
    assert_eq!(count(&c).await, 0);
    // A failing last statement too.
    let e = c.batch_execute(&format!("{}; SELECT * FROM no_such_table", insert("a"))).await.unwrap_err();
    assert_eq!(sqlstate(&e), "42P01");
    assert_eq!(count(&c).await, 0);
    // BEGIN ... ROLLBACK in one message: the write is refused, nothing kept.
    let e = c.batch_execute(&format!("BEGIN; {}; ROLLBACK", insert("a"))).await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e}");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(count(&c).await, 0);
    // A read of the table written earlier in the same message is refused, not stale.
    let e = c.batch_execute(&format!("{}; SELECT count(*) FROM usage", insert("a"))).await.unwrap_err();
    assert_eq!(sqlstate(&e), "0A000", "{e}");
    assert_eq!(count(&c).await, 0);
    // All statements succeed: all writes are stored, each tag counts its new rows
    // (a repeated record id once).
    let msgs = c.simple_query(&format!("{}; {}; SELECT 2; {}", insert("a"), insert("b"), insert("a"))).await.unwrap();
    let tags: Vec<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(tags, vec![1, 1, 1, 0]);
    assert_eq!(count(&c).await, 2);
    // One statement alone commits as before.
    c.batch_execute(&insert("c")).await.unwrap();
    assert_eq!(count(&c).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_cancels_and_departed_clients_stop_queries() {
    let n = TestNode::start().await;
    let c = n.client().await;
    let heavy = "SELECT count(*) FROM generate_series(1, 20000000000) a";
    // statement_timeout set in the session.
    c.batch_execute("SET statement_timeout = 300").await.unwrap();
    // (The series would take hours: only the timeout can end it.)
    let e = c.simple_query(heavy).await.unwrap_err();
    assert_eq!(sqlstate(&e), "57014", "{e}");
    c.batch_execute("SET statement_timeout = 0").await.unwrap();

    // A cancel request; meanwhile another connection is answered promptly.
    let token = c.cancel_token();
    let running = tokio::spawn(async move {
        let r = c.simple_query(heavy).await;
        (c, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let other = n.client().await;
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let t = Instant::now();
        other.simple_query("SELECT 1").await.unwrap();
        worst = worst.max(t.elapsed());
    }
    eprintln!("select 1 beside a heavy query: worst of 5 = {worst:?}");
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (c, r) = tokio::time::timeout(Duration::from_secs(20), running).await.expect("cancel took effect").unwrap();
    assert_eq!(sqlstate(&r.unwrap_err()), "57014");
    // The connection is usable after a cancel.
    assert_eq!(c.query_one("SELECT 1::bigint", &[]).await.unwrap().get::<_, i64>(0), 1);

    // Extended protocol with a LIMIT over a cross join, timed out repeatedly: no slot leaks.
    c.batch_execute("SET statement_timeout = 1").await.unwrap();
    for i in 0..10 {
        c.batch_execute(&insert(&format!("x{i}"))).await.ok();
    }
    for _ in 0..10 {
        let _ = c.query("SELECT a.record_id FROM usage a, usage b, usage c ORDER BY 1 LIMIT 5", &[]).await;
        let _ = c.simple_query(heavy).await;
    }
    c.batch_execute("SET statement_timeout = 0").await.unwrap();
    pipelines_idle(&other).await;

    // A client that leaves mid-query: the query is stopped and logged as cancelled.
    let mut gone = Raw::connect(n.server.local_addr).await;
    gone.send(b'Q', b"SELECT count(*) FROM generate_series(1, 20000000001) departed\0").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(gone);
    let mut status = String::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        n.node.query_log().flush().ok();
        let rows = other
            .query("SELECT status FROM system.query_log WHERE query LIKE '%20000000001%' AND query NOT LIKE '%query_log%'", &[])
            .await
            .unwrap();
        if let Some(r) = rows.first() {
            status = r.get(0);
            break;
        }
    }
    assert_eq!(status, "cancelled");
    pipelines_idle(&other).await;
}

/// A raw protocol-3 connection, started up, with helpers to send messages.
struct Raw(tokio::net::TcpStream);

impl Raw {
    async fn connect(addr: std::net::SocketAddr) -> Raw {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let params = b"user\0tidemark\0database\0tidemark\0\0";
        let mut startup = Vec::new();
        startup.extend_from_slice(&((8 + params.len()) as i32).to_be_bytes());
        startup.extend_from_slice(&196608i32.to_be_bytes());
        startup.extend_from_slice(params);
        s.write_all(&startup).await.unwrap();
        let mut r = Raw(s);
        r.until_ready().await;
        r
    }

    async fn send(&mut self, tag: u8, body: &[u8]) {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        self.0.write_all(&m).await.unwrap();
    }

    /// Messages up to ReadyForQuery: (type, body).
    async fn until_ready(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let mut head = [0u8; 5];
            tokio::time::timeout(Duration::from_secs(20), self.0.read_exact(&mut head)).await.expect("answered").unwrap();
            let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
            let mut body = vec![0u8; len];
            self.0.read_exact(&mut body).await.unwrap();
            let done = head[0] == b'Z';
            out.push((head[0], body));
            if done {
                return out;
            }
        }
    }
}

/// The SQLSTATE of the first ErrorResponse among `msgs`.
fn error_code(msgs: &[(u8, Vec<u8>)]) -> Option<String> {
    let (_, body) = msgs.iter().find(|(t, _)| *t == b'E')?;
    body.split(|b| *b == 0).find(|f| f.first() == Some(&b'C')).map(|f| String::from_utf8_lossy(&f[1..]).to_string())
}

impl Raw {
    /// Every message until the server closes the connection.
    async fn until_closed(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let mut head = [0u8; 5];
            match tokio::time::timeout(Duration::from_secs(20), self.0.read_exact(&mut head)).await.expect("closed in time") {
                Ok(_) => {}
                Err(_) => return out,
            }
            let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
            let mut body = vec![0u8; len];
            self.0.read_exact(&mut body).await.unwrap();
            out.push((head[0], body));
        }
    }
}

/// Messages whose fields do not fit their length (pgwire's decoders would panic on
/// them or read the next message's bytes as their fields) get PostgreSQL's answer,
/// FATAL 08P01, and the connection ends; what came before them in the same packet is
/// answered, a write after them is not run, and the server serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_fatal_08p01() {
    let n = TestNode::start().await;
    let frame = |tag: u8, len: i32, body: &[u8]| {
        let mut m = vec![tag];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(body);
        m
    };
    let insert_after = frame(b'Q', (insert("after-bad").len() + 5) as i32, &[insert("after-bad").as_bytes(), b"\0"].concat());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a CopyData shorter than its header", frame(b'd', 2, b"")),
        ("a Bind whose value runs past its end", frame(b'B', 14, b"\0\0\x00\x00\x00\x01\x00\x00\x7f\xff")),
        ("a Bind cut short", frame(b'B', 6, b"\0\0")),
        ("a Query without its terminator", frame(b'Q', 12, b"select 1")),
        ("a Sync with a body", frame(b'S', 5, b"x")),
        ("a Describe of an unknown kind", frame(b'D', 6, b"X\0")),
    ];
    for (what, bad) in cases {
        let mut raw = Raw::connect(n.server.local_addr).await;
        let mut packet = frame(b'Q', 18, b"select 1::int\0");
        packet.extend(&bad);
        packet.extend(&insert_after);
        raw.0.write_all(&packet).await.unwrap();
        let got = raw.until_closed().await;
        assert!(got.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"1")), "{what}: the query before it was not answered: {got:?}");
        let (_, err) = got.iter().rev().find(|(t, _)| *t == b'E').unwrap_or_else(|| panic!("{what}: no error: {got:?}"));
        let fields: Vec<&[u8]> = err.split(|b| *b == 0).collect();
        assert!(fields.contains(&&b"C08P01"[..]) && fields.contains(&&b"SFATAL"[..]), "{what}: {}", String::from_utf8_lossy(err));
    }
    let c = n.client().await;
    assert_eq!(count(&c).await, 0, "a write after a malformed message was run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_conformance() {
    let n = TestNode::start().await;
    let mut raw = Raw::connect(n.server.local_addr).await;
    // Invalid UTF-8 in a simple query: 22021, nothing stored.
    let mut q = format!("{}", insert("bad")).into_bytes();
    let at = q.iter().position(|b| *b == b'a').unwrap();
    q[at] = 0xff;
    q.push(0);
    raw.send(b'Q', &q).await;
    assert_eq!(error_code(&raw.until_ready().await).as_deref(), Some("22021"));
    // ... and in a Parse.
    raw.send(b'P', b"\0select '\xc3('\0\0\0").await;
    raw.send(b'S', b"").await;
    assert_eq!(error_code(&raw.until_ready().await).as_deref(), Some("22021"));
    // A Bind with too few, then too many values: 08P01.
    raw.send(b'P', b"s2\0select $1::bigint + $2::bigint\0\0\0").await;
    raw.send(b'S', b"").await;
    assert_eq!(error_code(&raw.until_ready().await), None);
    let bind = |values: &[&[u8]], formats: &[i16]| {
        let mut b = b"\0s2\0".to_vec();
        b.extend_from_slice(&(formats.len() as i16).to_be_bytes());
        for f in formats {
            b.extend_from_slice(&f.to_be_bytes());
        }
        b.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            b.extend_from_slice(&(v.len() as i32).to_be_bytes());
            b.extend_from_slice(v);
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        b
    };
    for (values, formats, code) in [
        (vec![&b"1"[..]], vec![], "08P01"),
        (vec![&b"1"[..], &b"2"[..], &b"3"[..]], vec![], "08P01"),
        (vec![&b"1"[..], &b"2"[..]], vec![0, 0, 0], "08P01"),
        (vec![&b"1"[..], &b"2"[..]], vec![7], "22023"),
    ] {
        raw.send(b'B', &bind(&values, &formats)).await;
        raw.send(b'E', b"\0\0\0\0\0").await;
        raw.send(b'S', b"").await;
        assert_eq!(error_code(&raw.until_ready().await).as_deref(), Some(code), "{values:?} {formats:?}");
    }
    raw.send(b'B', &bind(&[b"1", b"2"], &[])).await;
    raw.send(b'E', b"\0\0\0\0\0").await;
    raw.send(b'S', b"").await;
    let answer = raw.until_ready().await;
    assert_eq!(error_code(&answer), None);
    assert!(answer.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"3")));

    let c = n.client().await;
    assert_eq!(count(&c).await, 0);
    // As PostgreSQL answers them.
    let e = c.simple_query("SELECT 1.0/0.0").await.unwrap_err();
    assert_eq!(sqlstate(&e), "22012", "{e}");
    let e = c.simple_query("SELECT chr(0)").await.unwrap_err();
    assert_eq!(sqlstate(&e), "54000", "{e}");
    let e = c.simple_query("SELECT 'a' || chr(x::bigint) FROM generate_series(0, 2) t(x)").await.unwrap_err();
    assert_eq!(sqlstate(&e), "54000", "{e}");
    let row = c.simple_query("SELECT 0.1 + 0.2, chr(65)").await.unwrap();
    assert!(matches!(&row[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("0.3") && r.get(1) == Some("A")));
    // A Parse with the protocol's largest number of parameters answers quickly: a
    // select list that wide is refused as PostgreSQL refuses it (54011), and as many
    // parameters in an IN list are planned.
    let params: Vec<String> = (1..=65_535).map(|i| format!("${i}")).collect();
    let e = c.prepare(&format!("SELECT {}", params.join(", "))).await.unwrap_err();
    assert_eq!(sqlstate(&e), "54011");
    let e = c.prepare(&format!("SELECT $65536, {}", params.join(", "))).await.unwrap_err();
    assert_eq!(sqlstate(&e), "54000");
    let s = c.prepare(&format!("SELECT count(*) FROM usage WHERE entity_id IN ({})", params.join(", "))).await.unwrap();
    assert_eq!(s.params().len(), 65_535);
    // ... and run: a Bind carries 65,535 values (its counts are unsigned).
    let values: Vec<String> = (0..65_535).map(|i| format!("acct-{i}")).collect();
    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values.iter().map(|v| v as _).collect();
    assert_eq!(c.query_one(&s, &refs).await.unwrap().get::<_, i64>(0), 0);
    assert_eq!(c.query_one("SELECT 1::bigint", &[]).await.unwrap().get::<_, i64>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_on_connections_statements_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.startup_pending_max = 4;
    cfg.startup_timeout_ms = 60_000;
    cfg.prepared_statements_max = 5;
    cfg.query_log_text_bytes_max = 100;
    let n = TestNode::start_with(dir, cfg).await;
    // 40 sockets that never start up do not keep a real client out.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(tokio::net::TcpStream::connect(n.server.local_addr).await.unwrap());
    }
    let c = tokio::time::timeout(Duration::from_secs(10), n.client()).await.expect("a real client gets in");
    // Named prepared statements are bounded per connection.
    let mut held = Vec::new();
    let mut refused = None;
    for i in 0..10 {
        match c.prepare(&format!("SELECT {i}::bigint")).await {
            Ok(s) => held.push(s),
            Err(e) => {
                refused = Some(sqlstate(&e));
                break;
            }
        }
    }
    assert_eq!(refused.as_deref(), Some("53400"));
    assert_eq!(held.len(), 5);
    // Closing one makes room again.
    held.pop();
    c.simple_query("SELECT 1").await.unwrap(); // lets the Close reach the server
    c.prepare("SELECT 42::bigint").await.unwrap();
    // Server files only inside the COPY directories; nothing echoed.
    for (sql, code) in [
        ("COPY usage FROM '/etc/os-release'", "42501"),
        ("COPY usage FROM '/dev/zero' WITH (FORMAT csv)", "42501"),
        ("COPY usage FROM 'import/../../x'", "42501"),
        ("COPY (SELECT 2) TO '/tmp/tidemark-should-not-exist.csv'", "42501"),
        ("COPY usage FROM 'import/missing.csv'", "58P01"),
    ] {
        let e = c.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e), code, "{sql}: {e}");
        assert!(!e.to_string().contains("PRETTY_NAME"), "{e}");
    }
    assert!(!std::path::Path::new("/tmp/tidemark-should-not-exist.csv").exists());
    std::fs::write(n.dir.path().join("import/bad.csv"), "secret-line-one\nsecret-two\n").unwrap();
    let e = c.simple_query("COPY usage FROM 'import/bad.csv' WITH (FORMAT csv)").await.unwrap_err();
    assert!(!e.to_string().contains("secret"), "{e}");
    c.simple_query("COPY (SELECT 2 AS x) TO 'export/two.csv'").await.unwrap();
    let e = c.simple_query("COPY (SELECT 3 AS x) TO 'export/two.csv'").await.unwrap_err();
    assert_eq!(sqlstate(&e), "58P02");
    // Long statements are kept in the query log cut short.
    let long = format!("SELECT '{}' AS long_text_marker", "x".repeat(10_000));
    c.simple_query(&long).await.unwrap();
    n.node.query_log().flush().unwrap();
    let row = c.query_one("SELECT max(length(query)) FROM system.query_log WHERE query LIKE 'SELECT ''xxx%'", &[]).await.unwrap();
    assert!(row.get::<_, Option<i32>>(0).unwrap() < 200);
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_memory_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.query_memory_bytes_max = 24 << 20;
    let n = TestNode::start_with(dir, cfg).await;
    let c = n.client().await;
    // A hash join's build side cannot spill: over the query's budget it fails with 53200.
    let e = c
        .simple_query("SELECT count(*) FROM generate_series(1, 3000000) a(x) JOIN generate_series(1, 3000000) b(y) ON x = y")
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&e), "53200", "{e}");
    // A sort spills to disk and finishes.
    let rows = c
        .simple_query("SELECT sum(r) FROM (SELECT row_number() OVER (ORDER BY x DESC) AS r FROM generate_series(1, 2000000) t(x)) s")
        .await
        .unwrap();
    assert!(matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("2000001000000")));
    // Small queries are not affected, and the budget is returned after each query.
    for _ in 0..3 {
        c.simple_query("SELECT count(*) FROM generate_series(1, 100000) a(x) JOIN generate_series(1, 100000) b(y) ON x = y").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_buffers_count_against_the_node_memory() {
    use futures::SinkExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.node_memory_bytes_max = 1 << 20;
    let n = TestNode::start_with(dir, cfg).await;
    let c = n.client().await;
    let row = "r,acct-1,storage,Get,Requests,,1,2026-01-05 10:00:00\n";
    let big = row.repeat((2 << 20) / row.len());
    let sink = c.copy_in("COPY usage (record_id, entity_id, service, operation, usage_type, region, quantity, event_time) FROM STDIN WITH (FORMAT csv)").await.unwrap();
    futures::pin_mut!(sink);
    let sent = async {
        for chunk in big.as_bytes().chunks(64 << 10) {
            sink.send(bytes::Bytes::copy_from_slice(chunk)).await?;
        }
        sink.finish().await
    };
    let e = sent.await.unwrap_err();
    assert_eq!(sqlstate(&e), "53200", "{e}");
    assert_eq!(count(&c).await, 0);
    // The memory is returned: a small COPY fits.
    let sink = c.copy_in("COPY usage (record_id, entity_id, service, operation, usage_type, region, quantity, event_time) FROM STDIN WITH (FORMAT csv)").await.unwrap();
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(row)).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1);
}

/// Segment files on disk under the data directory's segment store.
fn segment_files(dir: &std::path::Path) -> usize {
    fn walk(d: &std::path::Path) -> usize {
        std::fs::read_dir(d)
            .map(|rd| rd.flatten().map(|e| if e.path().is_dir() { walk(&e.path()) } else { 1 }).sum())
            .unwrap_or(0)
    }
    walk(&dir.join("segments"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_larger_than_its_memory_budget_streams_and_stays_all_or_nothing() {
    use futures::SinkExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    // 16 MiB per query: rows are written out in 8 MiB chunks, and the input (about
    // 23 MB of CSV, about 40 MB decoded) never fits at once.
    cfg.query_memory_bytes_max = 16 << 20;
    let n = TestNode::start_with(dir, cfg).await;
    let c = n.client().await;
    let rows = 300_000usize;
    let csv = |bad_at: Option<usize>| {
        let mut s = String::with_capacity(rows * 80);
        for i in 0..rows {
            let q = if Some(i) == bad_at { "oops".to_string() } else { "1".to_string() };
            s.push_str(&format!(
                "r{i},acct-{:04},storage,Get,Requests,eu,{q},2026-01-{:02} {:02}:00:00\n",
                i % 977,
                5 + i % 3,
                i % 24
            ));
        }
        s
    };
    let send = |text: String| {
        let c = &c;
        async move {
            let sink = c
                .copy_in("COPY usage (record_id, entity_id, service, operation, usage_type, region, quantity, event_time) FROM STDIN WITH (FORMAT csv)")
                .await?;
            futures::pin_mut!(sink);
            for chunk in text.as_bytes().chunks(256 << 10) {
                sink.send(bytes::Bytes::copy_from_slice(chunk)).await?;
            }
            sink.finish().await
        }
    };
    // A bad value in the last rows, after several chunks went to disk: 22P02 naming
    // the row, nothing stored, no file left behind.
    let before = segment_files(n.dir.path());
    let e = send(csv(Some(rows - 3))).await.unwrap_err();
    assert_eq!(sqlstate(&e), "22P02", "{e}");
    assert!(e.as_db_error().unwrap().message().contains(&format!("row {}", rows - 2)), "{e}");
    assert_eq!(count(&c).await, 0);
    for _ in 0..100 {
        if segment_files(n.dir.path()) == before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(segment_files(n.dir.path()), before, "the failed COPY's files are deleted");
    // The same input without the bad value: stored whole, in several chunks.
    assert_eq!(send(csv(None)).await.unwrap(), rows as u64);
    assert_eq!(count(&c).await, rows as i64);
    // Written in several chunks: some (shard, day) groups have more than one segment.
    let r = c
        .query_one("SELECT count(*), count(DISTINCT (shard, window_start)) FROM system.segments", &[])
        .await
        .unwrap();
    let (segs, groups): (i64, i64) = (r.get(0), r.get(1));
    assert!(segs > groups, "{segs} segments in {groups} groups: the COPY was not written in chunks");
    // Again: every record is present, nothing added.
    assert_eq!(send(csv(None)).await.unwrap(), 0);
    assert_eq!(count(&c).await, rows as i64);
}

/// Date/time parameters sent as text with no type (pgbench `-M prepared`, JDBC) or
/// typed `timestamp`/`timestamptz`/`date` by the client are read as PostgreSQL reads
/// them: a bare date, `T`, fractions, zones, `infinity`; 22007 for text that is not a
/// date/time and 22008 for a field out of range, the connection kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_datetime_parameters_read_as_postgresql_reads_them() {
    let n = TestNode::start().await;
    let c = n.client().await;
    for (id, at) in [("a", "2026-01-05 09:59:59.5"), ("b", "2026-01-05 10:00:00"), ("c", "2026-01-05 12:30:00"), ("d", "2026-01-06 00:00:00")] {
        c.batch_execute(&insert(id).replace("2026-01-05 10:00:00", at)).await.unwrap();
    }
    let mut raw = Raw::connect(n.server.local_addr).await;
    let sql = "SELECT count(*) FROM usage WHERE event_time >= $1 AND event_time < $2";
    // 1114 timestamp, 1184 timestamptz, 1082 date.
    for (name, oids) in [("untyped", vec![0, 0]), ("ts", vec![1114, 1114]), ("tstz", vec![1184, 1184]), ("date", vec![1082, 1082])] {
        raw.send(b'P', &parse_msg(name, sql, &oids)).await;
        raw.send(b'S', b"").await;
        assert_eq!(error_code(&raw.until_ready().await), None, "{name}");
    }
    let cases: Vec<(&str, &str, &str, &str)> = vec![
        ("untyped", "2026-01-05", "2026-01-06", "3"),
        ("untyped", "2026-01-05 10:00", "2026-01-05T12:30:00.000001", "2"),
        ("untyped", "2026-01-05 09:59:59.5", "infinity", "4"),
        ("untyped", "-infinity", "2026-01-05T10:00:00Z", "1"),
        ("untyped", "  2026-01-05 10:00:00+02  ", "2026-01-05 10:00:01", "1"),
        ("ts", "2026-01-05T10:00", "2026-01-06", "2"),
        // With a zone: 12:00+02 is 10:00 UTC.
        ("tstz", "2026-01-05 12:00:00+02", "2026-01-05 12:30:00+00:00", "1"),
        ("date", "2026-01-05", "2026-01-06 23:59", "3"),
        ("untyped", "2026-01-05", "not a time", "22007"),
        ("untyped", "2026/01/05", "2026-01-06", "22007"),
        ("untyped", "2026-13-05", "2026-01-06", "22008"),
        ("ts", "2026-01-05 25:00", "2026-01-06", "22008"),
    ];
    for (name, lo, hi, want) in cases {
        assert_eq!(bound_answer(&mut raw, name, &[lo, hi]).await, want, "{name}: [{lo}, {hi})");
    }
    assert_eq!(count(&c).await, 4);
}

/// A Parse of statement `name` with parameter types `oids` (0: unspecified).
fn parse_msg(name: &str, sql: &str, oids: &[u32]) -> Vec<u8> {
    let mut b = format!("{name}\0{sql}\0").into_bytes();
    b.extend_from_slice(&(oids.len() as i16).to_be_bytes());
    for o in oids {
        b.extend_from_slice(&o.to_be_bytes());
    }
    b
}

/// A Bind of statement `name` to `values`, every one text.
fn bind_msg(name: &str, values: &[&str]) -> Vec<u8> {
    let mut b = format!("\0{name}\0").into_bytes();
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for v in values {
        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
        b.extend_from_slice(v.as_bytes());
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    b
}

/// Binds statement `name` to `values`, executes it and answers its one value, or the
/// SQLSTATE of its error.
async fn bound_answer(raw: &mut Raw, name: &str, values: &[&str]) -> String {
    raw.send(b'B', &bind_msg(name, values)).await;
    raw.send(b'E', b"\0\0\0\0\0").await;
    raw.send(b'S', b"").await;
    let answer = raw.until_ready().await;
    match error_code(&answer) {
        Some(code) => code,
        None => {
            let (_, row) = answer.iter().find(|(t, _)| *t == b'D').expect("a row");
            String::from_utf8_lossy(&row[6..]).to_string()
        }
    }
}

/// Numbers sent as text, untyped or typed, are read as PostgreSQL reads them:
/// surrounding spaces, exponents, more digits than 28, rounding to the column's scale;
/// 22P02 for text that is not a number, 22003 for one out of range, the connection kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_numeric_parameters_read_as_postgresql_reads_them() {
    let n = TestNode::start().await;
    let c = n.client().await;
    for (id, q) in [("a", "0.000001"), ("b", "1.5"), ("c", "1000"), ("d", "12345678901234567890123456789.5")] {
        c.batch_execute(&insert(id).replace("'Requests', 1,", &format!("'Requests', {q},"))).await.unwrap();
    }
    let mut raw = Raw::connect(n.server.local_addr).await;
    // 1700 numeric, 20 bigint.
    let sql = "SELECT count(*) FROM usage WHERE quantity >= $1 AND quantity < $2";
    for (name, oids) in [("untyped", vec![0, 0]), ("numeric", vec![1700, 1700])] {
        raw.send(b'P', &parse_msg(name, sql, &oids)).await;
        raw.send(b'S', b"").await;
        assert_eq!(error_code(&raw.until_ready().await), None, "{name}");
    }
    raw.send(b'P', &parse_msg("limit", "SELECT count(*) FROM usage WHERE quantity < $1 LIMIT $2", &[0, 20])).await;
    raw.send(b'S', b"").await;
    assert_eq!(error_code(&raw.until_ready().await), None);
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("untyped", vec!["0", "2"], "2"),
        ("untyped", vec!["  1.5  ", "1e3"], "1"),
        ("untyped", vec!["1.5e0", "+1.0000000000000000000000000000000000001e30"], "3"),
        ("numeric", vec![".000001", "1.5"], "1"),
        // Rounded to the column's scale (6) as PostgreSQL rounds a value stored there.
        ("numeric", vec!["0.0000005", "1.5000005"], "2"),
        ("untyped", vec!["-Infinity", "1"], "22003"),
        ("untyped", vec!["1e40", "2"], "22003"),
        ("untyped", vec!["1.2.3", "2"], "22P02"),
        ("numeric", vec!["0x10", "2"], "22P02"),
        ("untyped", vec!["NaN", "2"], "0A000"),
        ("limit", vec!["2", " 10 "], "2"),
        ("limit", vec!["2", "9223372036854775808"], "22003"),
        ("limit", vec!["2", "1.0"], "22P02"),
    ];
    for (name, values, want) in cases {
        assert_eq!(bound_answer(&mut raw, name, &values).await, want, "{name}: {values:?}");
    }
    assert_eq!(count(&c).await, 4);
}
