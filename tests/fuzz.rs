//! Seeded fuzzing against a live node: SQL statements generated from a small grammar
//! (expressions deep and wide, system tables, COPY, INSERT, SET, EXPLAIN) and random or
//! mutated protocol messages (start-up and after it). The node must answer every input
//! with a result or an error and go on serving: a crash or a hang fails the run.
//!
//! Bounded in CI (`FUZZ_SQL_CASES`, `FUZZ_WIRE_CASES`, defaults below); longer runs on
//! demand, with `FUZZ_SEED` to pick the sequence:
//!     FUZZ_SQL_CASES=100000 FUZZ_WIRE_CASES=100000 cargo test --release --test fuzz -- --nocapture
//! Inputs that ever broke the node are kept in `testdata/fuzz_regressions.txt` and
//! replayed first on every run. (COPY TO STDOUT is not generated: tokio-postgres's
//! simple_query cannot read a COPY answer.) Known and left to pgwire: some malformed
//! messages make its decoder panic; that ends the connection's task only (the panic
//! is printed), and the node serves on, which the wire test checks.

mod common;

use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

const COLUMNS: &[&str] = &["record_id", "entity_id", "service", "operation", "usage_type", "region", "quantity", "event_time", "ingest_time"];
const TABLES: &[&str] = &["usage", "system.query_log", "system.pipelines", "system.segments", "system.shards", "system.forecasts", "generate_series(1, 1000) g(x)"];

fn literal(r: &mut StdRng) -> String {
    match r.random_range(0..9) {
        0 => r.random_range(-1000i64..1000).to_string(),
        1 => format!("{}.{}", r.random_range(-100..100), r.random_range(0..999)),
        2 => format!("'acct-{:05}'", r.random_range(0..100)),
        3 => "NULL".into(),
        4 => "'2026-01-05 10:00:00'::timestamp".into(),
        5 => "interval '1 day'".into(),
        6 => ["true", "false", "0.0", "1e308", "-0", "''", "'\\x00'", "chr(0)"][r.random_range(0..8)].into(),
        7 => format!("'{}'", "x".repeat(r.random_range(0..200))),
        _ => "now()".into(),
    }
}

fn expr(r: &mut StdRng, depth: u32, cols: &[&str]) -> String {
    if depth == 0 || r.random_bool(0.3) {
        return if !cols.is_empty() && r.random_bool(0.6) { cols[r.random_range(0..cols.len())].to_string() } else { literal(r) };
    }
    let a = expr(r, depth - 1, cols);
    let b = expr(r, depth - 1, cols);
    match r.random_range(0..14) {
        0 => format!("({a} + {b})"),
        1 => format!("({a} / {b})"),
        2 => format!("({a} = {b})"),
        3 => format!("({a} AND {b})"),
        4 => format!("({a} OR {b})"),
        5 => format!("NOT ({a})"),
        6 => format!("CAST({a} AS {})", ["bigint", "text", "timestamp", "decimal(38,6)", "double", "date"][r.random_range(0..6)]),
        7 => format!("CASE WHEN {a} THEN {b} ELSE {} END", literal(r)),
        8 => format!("{}({a})", ["sum", "count", "min", "max", "avg", "length", "upper", "abs", "date_trunc('hour', "][r.random_range(0..8)]),
        9 => format!("{a} IN ({}, {}, {})", literal(r), literal(r), literal(r)),
        10 => format!("{a} BETWEEN {b} AND {}", literal(r)),
        11 => format!("coalesce({a}, {b})"),
        12 => format!("({a} || {b})"),
        _ => format!("{a} IS NULL"),
    }
}

/// A long flat chain: the shape that overflowed stacks before.
fn chain(r: &mut StdRng) -> String {
    let n = [10, 100, 1000, 3000, 20_000][r.random_range(0..5)];
    let op = [" + ", " OR ", " AND ", " || ", "::text::bigint + "][r.random_range(0..5)];
    let terms: Vec<String> = (0..n).map(|_| literal(r)).collect();
    terms.join(op)
}

fn statement(r: &mut StdRng) -> String {
    let table = TABLES[r.random_range(0..TABLES.len())];
    let cols: &[&str] = match table {
        "usage" => COLUMNS,
        t if t.starts_with("generate_series") => &["x"],
        "system.query_log" => &["query_id", "query", "status", "duration_us", "start_time"],
        "system.pipelines" => &["pipeline", "in_flight", "queued", "slots"],
        _ => &[],
    };
    match r.random_range(0..12) {
        0..=4 => {
            let width = r.random_range(1..4);
            let items: Vec<String> = (0..width)
                .map(|_| {
                    let d = r.random_range(0..5);
                    expr(r, d, cols)
                })
                .collect();
            let mut s = format!("SELECT {} FROM {table}", items.join(", "));
            if r.random_bool(0.6) {
                let d = r.random_range(1..6);
                s += &format!(" WHERE {}", expr(r, d, cols));
            }
            if r.random_bool(0.3) {
                s += " GROUP BY 1";
            }
            if r.random_bool(0.3) {
                s += " ORDER BY 1";
            }
            if r.random_bool(0.3) {
                s += &format!(" LIMIT {}", r.random_range(0..100));
            }
            s
        }
        5 => format!("SELECT {}", chain(r)),
        6 => format!(
            "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) VALUES ({}, {}, 'storage', 'Get', 'Requests', {}, {})",
            literal(r),
            literal(r),
            literal(r),
            literal(r)
        ),
        7 => ["COPY usage FROM '/etc/passwd'", "COPY usage FROM 'import/../x'", "COPY (SELECT 1) TO '/tmp/fuzz-out'", "COPY usage FROM 'import/none.parquet'", "COPY (SELECT 1) TO 'export/../../x.csv'"]
            [r.random_range(0..5)]
            .to_string(),
        8 => format!("EXPLAIN SELECT count(*) FROM usage WHERE {}", expr(r, 3, COLUMNS)),
        9 => ["SET statement_timeout = 50", "SET statement_timeout = 0", "SHOW statement_timeout", "BEGIN", "COMMIT", "ROLLBACK", "SET datafusion.execution.batch_size = 1", "DISCARD ALL"][r.random_range(0..8)].to_string(),
        10 => format!("{}; {}", statement(r), statement(r)),
        _ => {
            // Mangled text: random cuts and splices of a valid statement.
            let base = format!("SELECT {} FROM {table} WHERE {}", expr(r, 3, cols), expr(r, 3, cols));
            let cut = r.random_range(0..=base.len());
            let mut s: String = base.chars().take(cut).collect();
            s.push_str([")", "(", "'", "$1", ";", "\"", "--", "/*"][r.random_range(0..8)]);
            s
        }
    }
}

async fn alive(n: &TestNode) {
    let c = tokio::time::timeout(Duration::from_secs(30), n.client()).await.expect("the node still accepts clients");
    let v = tokio::time::timeout(Duration::from_secs(30), c.query_one("SELECT 1::bigint", &[])).await.expect("the node still answers");
    assert_eq!(v.unwrap().get::<_, i64>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_statements_never_break_the_node() {
    let seed = env_usize("FUZZ_SEED", 20261130) as u64;
    let cases = env_usize("FUZZ_SQL_CASES", 400);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    // Generated statements may be endless (a cross join, a huge series).
    cfg.statement_timeout_ms = 5_000;
    let n = TestNode::start_with(dir, cfg).await;
    let mut r = StdRng::seed_from_u64(seed);
    let regressions = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/fuzz_regressions.txt")).unwrap();
    let kept: Vec<String> = regressions.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).map(String::from).collect();
    let mut c = n.client().await;
    let (mut ok, mut failed, mut internal) = (0usize, 0usize, 0usize);
    let generated: Vec<String> = (0..cases).map(|_| statement(&mut r)).collect();
    for (i, sql) in kept.iter().chain(generated.iter()).enumerate() {
        match tokio::time::timeout(Duration::from_secs(60), c.simple_query(sql)).await {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(e)) => match e.as_db_error() {
                Some(db) => {
                    failed += 1;
                    if db.code().code() == "XX000" {
                        internal += 1;
                        eprintln!("internal error for case {i}: {}: {}", &sql[..sql.len().min(200)], db.message());
                    }
                }
                None => panic!("case {i} lost the connection: {e}\n{}", &sql[..sql.len().min(2000)]),
            },
            Err(_) => panic!("case {i} got no answer in 60 s:\n{}", &sql[..sql.len().min(2000)]),
        }
        if c.is_closed() {
            panic!("case {i} closed the connection:\n{}", &sql[..sql.len().min(2000)]);
        }
        if i % 50 == 0 {
            // A fresh connection now and then (a failed BEGIN block, settings).
            c = n.client().await;
        }
    }
    eprintln!("sql fuzz: seed {seed}, {} cases run ({} kept), {ok} answered, {failed} errors ({internal} internal)", kept.len() + cases, kept.len());
    alive(&n).await;
}

fn message(r: &mut StdRng) -> Vec<u8> {
    let tags = b"QPBEDSHCXFdcfpx!";
    let tag = tags[r.random_range(0..tags.len())];
    let body: Vec<u8> = match r.random_range(0..4) {
        0 => (0..r.random_range(0..64)).map(|_| r.random()).collect(),
        1 => b"select 1\0".to_vec(),
        2 => {
            let mut b = b"\0select $1\0".to_vec();
            b.extend_from_slice(&r.random::<i16>().to_be_bytes());
            b
        }
        _ => vec![0; r.random_range(0..8)],
    };
    // Sometimes a length that does not match the body.
    let len = if r.random_bool(0.1) { r.random::<i32>() } else { (body.len() + 4) as i32 };
    let mut m = vec![tag];
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(&body);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_protocol_messages_never_break_the_node() {
    let seed = env_usize("FUZZ_SEED", 20261130) as u64;
    let cases = env_usize("FUZZ_WIRE_CASES", 300);
    let n = TestNode::start().await;
    let addr = n.server.local_addr;
    let mut r = StdRng::seed_from_u64(seed);
    for i in 0..cases {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        if r.random_bool(0.3) {
            // A random start-up packet.
            let junk: Vec<u8> = (0..r.random_range(0..40)).map(|_| r.random()).collect();
            let _ = s.write_all(&junk).await;
        } else {
            let params = b"user\0tidemark\0database\0tidemark\0\0";
            let mut startup = Vec::new();
            startup.extend_from_slice(&((8 + params.len()) as i32).to_be_bytes());
            startup.extend_from_slice(&196608i32.to_be_bytes());
            startup.extend_from_slice(params);
            let _ = s.write_all(&startup).await;
            for _ in 0..r.random_range(1..6) {
                let _ = s.write_all(&message(&mut r)).await;
            }
        }
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
        if i % 100 == 0 {
            alive(&n).await;
        }
    }
    eprintln!("wire fuzz: seed {seed}, {cases} connections of random messages");
    alive(&n).await;
}
