//! Where the time of one point query goes, phase by phase, in-process (no network).
//! Run against a data directory filled by `tidemark demo` or `benches/compare.sh`:
//!
//!   cargo bench --bench point_phases -- /tmp/tidemark-bench/tm
//!
//! Prints the median time of each phase over a few hundred runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::physical_plan::collect;
use datafusion::sql::parser::Statement as DfStatement;
use tidemark::clock::Clock;
use tidemark::config::Config;
use tidemark::node::Node;
use tidemark::session::{Outcome, Session, SessionInfo};

const SQL: &str = "SELECT sum(quantity) FROM usage WHERE entity_id = 'acct-00042' AND service = 'storage' \
AND operation = 'GetObject' AND event_time >= '2026-01-20 00:00:00' AND event_time < '2026-01-21 00:00:00'";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = std::env::args().nth(1).filter(|a| !a.starts_with('-')).unwrap_or_else(|| "/tmp/tidemark-bench/tm".into());
    let cfg = Config { data_dir: dir.into(), compaction_interval_ms: 0, ..Config::default() };
    let node = Node::open(cfg, Clock::real()).await.expect("open the data directory");
    let session = Session::new(
        Arc::clone(&node),
        SessionInfo { session_id: 1, user: "bench".into(), application_name: "bench".into(), statement_timeout: None },
    );
    let runs = 300;
    let mut phases: Vec<(&str, Vec<Duration>)> = ["parse", "state clone", "sql to logical plan", "optimize", "physical plan", "execute", "whole Session::execute", "SELECT 1 via Session::execute"]
        .iter()
        .map(|n| (*n, Vec::with_capacity(runs)))
        .collect();
    for i in 0..runs + 20 {
        let t = Instant::now();
        let stmt = session.parse(SQL).unwrap().remove(0);
        let parse = t.elapsed();
        let t = Instant::now();
        let state = node.state();
        let clone = t.elapsed();
        let t = Instant::now();
        let plan = state.statement_to_plan(DfStatement::Statement(Box::new(stmt.clone()))).await.unwrap();
        let to_plan = t.elapsed();
        let t = Instant::now();
        let optimized = state.optimize(&plan).unwrap();
        let optimize = t.elapsed();
        let t = Instant::now();
        let physical = state.query_planner().create_physical_plan(&optimized, &state).await.unwrap();
        let physical_t = t.elapsed();
        let t = Instant::now();
        let _ = collect(physical, state.task_ctx()).await.unwrap();
        let exec = t.elapsed();
        let t = Instant::now();
        if let Outcome::Rows { stream, .. } = session.execute(SQL, &stmt, None, None).await.unwrap() {
            let _: Vec<_> = futures::TryStreamExt::try_collect(stream).await.unwrap();
        }
        let whole = t.elapsed();
        let one = session.parse("SELECT 1").unwrap().remove(0);
        let t = Instant::now();
        if let Outcome::Rows { stream, .. } = session.execute("SELECT 1", &one, None, None).await.unwrap() {
            let _: Vec<_> = futures::TryStreamExt::try_collect(stream).await.unwrap();
        }
        let select1 = t.elapsed();
        if i >= 20 {
            for (slot, d) in phases.iter_mut().zip([parse, clone, to_plan, optimize, physical_t, exec, whole, select1]) {
                slot.1.push(d);
            }
        }
    }
    println!("median of {runs} runs, in-process, release build:");
    for (name, v) in phases {
        println!("  {name:<32} {:>9.1} µs", median(v).as_secs_f64() * 1e6);
    }
    node.shutdown();
}
