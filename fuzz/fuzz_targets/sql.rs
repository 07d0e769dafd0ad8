//! SQL against a whole node: each input drives the grammar of `fuzz/grammar.rs` (the
//! fuzzer's bytes are its choices) to one to three statements, sent as one simple
//! query to a node served on loopback in this process. The node must answer with
//! rows or an error: a lost connection, no answer within a minute, or a panic anywhere
//! in the process (libFuzzer's panic hook aborts) is a finding. Internal errors
//! (XX000) are printed, not failed: they are answers, if poor ones. `FUZZ_PRINT_SQL=1`
//! prints each input's statements (run the binary on one file to see what it sends).
#![no_main]

#[path = "../grammar.rs"]
mod grammar;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use grammar::Choose;
use libfuzzer_sys::arbitrary::Unstructured;

struct Bytes<'a>(Unstructured<'a>);

impl Choose for Bytes<'_> {
    fn pick(&mut self, n: usize) -> usize {
        self.0.choose_index(n).unwrap_or(0)
    }
}

struct Harness {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
    _dir: tempfile::TempDir,
    _server: tidemark::frontend::Server,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = tidemark::config::Config {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            compaction_interval_ms: 0,
            statement_timeout_ms: 2_000,
            ..tidemark::config::Config::default()
        };
        let (server, client) = rt.block_on(async {
            let node = tidemark::node::Node::open(cfg, tidemark::clock::Clock::real()).await.unwrap();
            let server = tidemark::frontend::Server::start(Arc::clone(&node), "127.0.0.1:0".parse().unwrap()).await.unwrap();
            let url = format!("postgres://fuzz@127.0.0.1:{}/tidemark", server.local_addr.port());
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            client
                .batch_execute(
                    "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) VALUES \
                     ('r1', 'acct-00001', 'storage', 'Get', 'Requests', 1.5, '2026-01-05 10:00:00'), \
                     ('r2', 'acct-00002', 'compute', 'Run', 'Seconds', 30, '2026-01-05 11:00:00')",
                )
                .await
                .unwrap();
            (server, client)
        });
        Harness { rt, client, _dir: dir, _server: server }
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let h = harness();
    let mut r = Bytes(Unstructured::new(data));
    let n = 1 + r.pick(3);
    let sql: Vec<String> = (0..n).map(|_| grammar::statement(&mut r)).collect();
    // A session may not turn its timeout off here: an endless statement would look
    // like a hang. (The seeded test in `tests/fuzz.rs` does generate it.)
    let sql = sql.join("; ").replace("statement_timeout = 0", "statement_timeout = 1500");
    if std::env::var_os("FUZZ_PRINT_SQL").is_some() {
        eprintln!("sql: {sql}");
    }
    let answer = h.rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), h.client.simple_query(&sql)).await });
    match answer {
        Err(_) => panic!("no answer in 60 s:\n{sql}"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => match e.as_db_error() {
            Some(db) if db.code().code() == "XX000" => eprintln!("internal error: {}: {}", &sql[..sql.len().min(200)], db.message()),
            Some(_) => {}
            None => panic!("the connection was lost ({e}):\n{sql}"),
        },
    }
    // Each input starts from a fresh session state: no open transaction block, default settings.
    let _ = h.rt.block_on(h.client.simple_query("ROLLBACK"));
    let _ = h.rt.block_on(h.client.simple_query("DISCARD ALL"));
});
