//! Shared helpers for integration tests: a node on a temporary directory, served on
//! port 0, and clients for it.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use tidemark::clock::Clock;
use tidemark::config::Config;
use tidemark::frontend::Server;
use tidemark::node::Node;
use tidemark::session::{Session, SessionInfo};

pub struct TestNode {
    pub dir: tempfile::TempDir,
    pub node: Arc<Node>,
    pub server: Server,
}

pub fn test_config(dir: &std::path::Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        // Compaction runs only when a test asks for it.
        compaction_interval_ms: 0,
        // Statements write segments directly, so tests can reason about segments;
        // the write buffer has tests of its own.
        write_buffer_rows_max: 0,
        query_log_flush_interval_ms: 200,
        ..Config::default()
    }
}

impl TestNode {
    pub async fn start() -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let cfg = test_config(dir.path());
        Self::start_with(dir, cfg).await
    }

    pub async fn start_with(dir: tempfile::TempDir, cfg: Config) -> TestNode {
        let node = Node::open(cfg, Clock::real()).await.unwrap();
        let server = Server::start(Arc::clone(&node), "127.0.0.1:0".parse().unwrap()).await.unwrap();
        TestNode { dir, node, server }
    }

    pub fn port(&self) -> u16 {
        self.server.local_addr.port()
    }

    pub fn url(&self) -> String {
        format!("postgres://tidemark@127.0.0.1:{}/tidemark", self.port())
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url()).await
    }

    pub fn session(&self) -> Session {
        Session::new(
            Arc::clone(&self.node),
            SessionInfo { session_id: 0, user: "test".into(), application_name: "in-process".into(), statement_timeout: None, routing_policy: None },
        )
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// The same text for a timestamp whichever path produced it: `YYYY-MM-DD HH:MM:SS[.fff]`
/// with trailing fractional zeros removed.
pub fn normalize_value(v: &str) -> String {
    let b = v.as_bytes();
    let looks_like_ts = b.len() >= 19
        && b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b'T' || b[10] == b' ')
        && b[13] == b':'
        && b[16] == b':'
        && b[..4].iter().all(|c| c.is_ascii_digit());
    if !looks_like_ts {
        return v.to_string();
    }
    let mut s = v.replacen('T', " ", 1);
    if let Some(dot) = s.find('.') {
        let trimmed = s[dot..].trim_end_matches('0').to_string();
        s.truncate(dot);
        if trimmed != "." {
            s.push_str(&trimmed);
        }
    }
    s
}

/// A value as text, normalized so that Tidemark's and DuckDB's spellings compare equal.
pub fn normalize(v: &str) -> String {
    if let Ok(d) = v.parse::<rust_decimal::Decimal>() {
        return d.normalize().to_string();
    }
    match v {
        "True" | "true" => "t".into(),
        "False" | "false" => "f".into(),
        _ => normalize_value(v),
    }
}

pub fn duckdb_rows(parquet: &std::path::Path, queries: &[String]) -> Vec<Vec<Vec<String>>> {
    let script = r#"
import json, sys
try:
    import duckdb
except ImportError:
    sys.exit("the oracle test needs DuckDB's Python package: python3 -m pip install duckdb (see .ci/run)")
path, qfile = sys.argv[1], sys.argv[2]
con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
con.execute(f"CREATE VIEW usage AS SELECT * FROM read_parquet('{path}')")
out = []
for q in json.load(open(qfile)):
    rows = con.execute(q).fetchall()
    out.append([[None if v is None else str(v) for v in r] for r in rows])
print(json.dumps(out))
"#;
    let qfile = parquet.with_extension("queries.json");
    std::fs::write(&qfile, serde_json::to_string(queries).unwrap()).unwrap();
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(parquet)
        .arg(&qfile)
        .output()
        .expect("python3");
    assert!(out.status.success(), "DuckDB failed: {}", String::from_utf8_lossy(&out.stderr));
    let parsed: Vec<Vec<Vec<Option<String>>>> = serde_json::from_slice(&out.stdout).unwrap();
    parsed
        .into_iter()
        .map(|rows| {
            rows.into_iter()
                .map(|r| r.into_iter().map(|v| v.map(|s| normalize(&s)).unwrap_or_else(|| "NULL".into())).collect())
                .collect()
        })
        .collect()
}


/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A node process that is killed (SIGKILL) when dropped, so a failing assertion does
/// not leave it running.
pub struct NodeProcess(std::process::Child);

impl NodeProcess {
    pub fn new(child: std::process::Child) -> NodeProcess {
        NodeProcess(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn kill_9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// Waits (at most 60 s) until a node answers on `port` and returns a client.
pub async fn wait_ready(port: u16) -> tokio_postgres::Client {
    let url = format!("postgres://tidemark@127.0.0.1:{port}/tidemark");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            return c;
        }
        assert!(Instant::now() < deadline, "node did not start within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}


/// A random predicate over the generated data's columns: shard-key equalities, IN
/// lists, ORs, negations, service/operation filters and time ranges in several spellings.
pub fn predicate(rng: &mut rand::rngs::StdRng, depth: u32) -> String {
    let e = |rng: &mut rand::rngs::StdRng| tidemark::datagen::entity_id(rng.random_range(0..220));
    let day = |rng: &mut rand::rngs::StdRng| format!("2026-01-{:02}", rng.random_range(8..21));
    if depth > 0 && rng.random_bool(0.35) {
        let a = predicate(rng, depth - 1);
        let b = predicate(rng, depth - 1);
        let op = if rng.random_bool(0.5) { "AND" } else { "OR" };
        return format!("({a} {op} {b})");
    }
    match rng.random_range(0..12) {
        0 | 1 => format!("entity_id = '{}'", e(rng)),
        2 => {
            let n = rng.random_range(1..5);
            let list: Vec<String> = (0..n).map(|_| format!("'{}'", e(rng))).collect();
            format!("entity_id IN ({})", list.join(", "))
        }
        3 => format!("(entity_id = '{}' OR entity_id = '{}')", e(rng), e(rng)),
        4 => format!("NOT (entity_id = '{}')", e(rng)),
        5 => format!("service = '{}'", ["storage", "compute", "network", "database", "queue"][rng.random_range(0..5)]),
        6 => format!("event_time >= TIMESTAMP '{} 00:00:00'", day(rng)),
        7 => format!("event_time < TIMESTAMP '{} 12:00:00'", day(rng)),
        8 => format!("event_time BETWEEN TIMESTAMP '{} 06:00:00' AND TIMESTAMP '{} 18:30:00'", day(rng), day(rng)),
        9 => format!("date_trunc('day', event_time) = TIMESTAMP '{} 00:00:00'", day(rng)),
        10 => format!("quantity > {}", rng.random_range(0..50)),
        _ => format!("CAST(entity_id AS VARCHAR) = '{}'", e(rng)),
    }
}

pub fn random_query(rng: &mut rand::rngs::StdRng) -> String {
    let p = predicate(rng, 2);
    match rng.random_range(0..6) {
        0 => format!("SELECT count(*), sum(quantity), min(event_time), max(event_time) FROM usage WHERE {p}"),
        1 => format!("SELECT entity_id, service, count(*), sum(quantity) FROM usage WHERE {p} GROUP BY 1, 2 ORDER BY 1, 2"),
        2 => format!("SELECT record_id, quantity FROM usage WHERE {p} ORDER BY event_time DESC, record_id LIMIT 7"),
        3 => format!("SELECT date_trunc('hour', event_time) AS h, sum(quantity) FROM usage WHERE {p} GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 5"),
        4 => format!("SELECT count(DISTINCT entity_id), count(region) FROM usage WHERE {p}"),
        _ => format!("SELECT service, operation, usage_type, sum(quantity) FROM usage WHERE {p} GROUP BY 1, 2, 3"),
    }
}


/// A simple-protocol query's rows, each value normalized (NULL as "NULL").
pub async fn try_rows(c: &tokio_postgres::Client, sql: &str) -> Result<Vec<Vec<String>>, tokio_postgres::Error> {
    Ok(c.simple_query(sql)
        .await?
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(normalize).unwrap_or_else(|| "NULL".into())).collect())
            }
            _ => None,
        })
        .collect())
}
