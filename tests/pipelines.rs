//! Pipelines, fragments and routing: EXPLAIN shows the routing, the system tables
//! record it, and results do not depend on how many pipelines run the fragments.

mod common;

use std::sync::Arc;

use tidemark::config::Config;
use tidemark::datagen::{entity_id, GenSpec, Generator};

use common::{duckdb_rows, random_query, test_config, try_rows, TestNode};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// 2026-01-20 00:00:00 UTC: the generated data ends here.
const END_US: i64 = 1_768_867_200_000_000;

fn spec() -> GenSpec {
    GenSpec { rows: 30_000, entities: 200, days: 10, seed: 5, end_us: END_US }
}

/// Starts a node with `tweak` applied to the test configuration and loads the
/// generated data into it; returns the node and the Parquet file it loaded.
async fn loaded(tweak: impl FnOnce(&mut Config)) -> (TestNode, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    tweak(&mut cfg);
    let n = TestNode::start_with(dir, cfg).await;
    let table = n.node.catalog().get("usage").cloned().unwrap();
    let gen = Generator::new(spec(), Arc::clone(&table.schema));
    let parquet = n.dir.path().join("import/data.parquet");
    tidemark::datagen::write_parquet(&gen, &parquet, |_| {}).unwrap();
    let c = n.client().await;
    c.execute(&format!("COPY usage FROM '{}' WITH (FORMAT parquet)", parquet.display()), &[]).await.unwrap();
    (n, parquet)
}

async fn text_of(c: &tokio_postgres::Client, sql: &str) -> String {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).unwrap_or("NULL").to_string()).collect::<Vec<_>>().join(" | ") + "\n")
            }
            _ => None,
        })
        .collect()
}


async fn rows_of(c: &tokio_postgres::Client, sql: &str) -> Vec<Vec<String>> {
    try_rows(c, sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_shards_candidates_and_choice() {
    let (n, _) = loaded(|c| c.pipelines = Some(3)).await;
    let c = n.client().await;
    let e = entity_id(3);

    let point = text_of(&c, &format!("EXPLAIN SELECT sum(quantity) FROM usage WHERE entity_id = '{e}' AND event_time >= '2026-01-15' AND event_time < '2026-01-16'")).await;
    assert!(point.contains(&format!("shard_keys=[{e}]")), "{point}");
    assert!(point.contains("time=[2026-01-15T00:00:00Z, 2026-01-16T00:00:00Z)"), "{point}");
    assert!(point.contains("shards=1 of 8, segments=1 of 80"), "{point}");
    assert!(point.contains("candidates n1.p"), "{point}");
    // One shard: one fragment, and no merge between it and the final aggregate.
    assert!(!point.contains("CoalescePartitionsExec") && !point.contains("SortPreservingMergeExec"), "{point}");
    let shard = tidemark::shard_map::shard_of(&e, 8);
    assert!(point.contains(&format!("fragments=[shard {shard} (1 segments) -> n1.p")), "{point}");

    // A fan-out aggregate: one fragment per shard, partial aggregates in the fragments.
    let all = text_of(&c, "EXPLAIN SELECT service, count(*) FROM usage GROUP BY 1 ORDER BY 2 DESC LIMIT 3").await;
    assert!(all.contains("shard_keys=all") && all.contains("shards=8 of 8, segments=80 of 80"), "{all}");
    let distribute = all.lines().position(|l| l.contains("DistributeExec")).expect("DistributeExec");
    let partial = all.lines().position(|l| l.contains("AggregateExec: mode=Partial")).expect("partial aggregate");
    assert!(partial > distribute, "the partial aggregate runs in the fragments:\n{all}");

    // TopK goes into the fragments; the gateway merges with the same fetch.
    let topk = text_of(&c, &format!("EXPLAIN SELECT record_id, event_time FROM usage WHERE entity_id IN ('{e}', '{}') ORDER BY event_time DESC, record_id LIMIT 4", entity_id(4))).await;
    let d = topk.lines().position(|l| l.contains("DistributeExec")).expect("DistributeExec");
    let sort = topk.lines().position(|l| l.contains("SortExec: TopK(fetch=4)")).expect("TopK");
    assert!(sort > d, "{topk}");
    assert!(topk.lines().take(d).any(|l| l.contains("SortPreservingMergeExec") && l.contains("fetch=4")), "{topk}");

    // EXPLAIN ANALYZE says where each fragment ran.
    let analyze = text_of(&c, &format!("EXPLAIN ANALYZE SELECT count(*) FROM usage WHERE entity_id IN ('{e}', '{}')", entity_id(4))).await;
    assert!(analyze.contains("ran on n1.p") && analyze.contains("attempts=1"), "{analyze}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_tables_show_pipelines_and_routing() {
    let (n, _) = loaded(|c| c.pipelines = Some(2)).await;
    let c = n.client().await;
    let e = entity_id(9);
    let q = format!("SELECT count(*) FROM usage WHERE entity_id = '{e}'");
    let rows = rows_of(&c, &q).await;
    assert_eq!(rows.len(), 1);
    let qid = rows_of(&c, &format!("SELECT max(query_id) FROM system.query_log WHERE query = '{}'", q.replace('\'', "''"))).await;
    let qid = &qid[0][0];
    let shard = tidemark::shard_map::shard_of(&e, 8);
    let routed = rows_of(&c, &format!("SELECT shard, choice, reason, attempt, candidates FROM system.routing_decisions WHERE query_id = {qid}")).await;
    assert_eq!(routed.len(), 1, "{routed:?}");
    assert_eq!(routed[0][0], shard.to_string());
    assert!(routed[0][1].starts_with("n1.p"), "{routed:?}");
    assert_eq!(routed[0][3], "1");
    assert!(routed[0][4].contains(&routed[0][1]), "the choice is among the candidates: {routed:?}");

    let p = rows_of(&c, "SELECT pipeline, local, slots, sum(completed) OVER (), cache_bytes_max, shard_replicas FROM system.pipelines ORDER BY pipeline").await;
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(p[0][0], "n1.p0");
    assert_eq!(p[0][1], "t");
    assert_eq!(p[0][2], "2");
    assert!(p[0][3].parse::<u64>().unwrap() >= 1, "{p:?}");
    // 8 shards x 2 copies over 2 pipelines.
    assert_eq!(p[0][5], "8");
    assert_eq!(p[1][5], "8");
}

/// The same few hundred queries give the same rows with one pipeline, with several
/// (one slot each, two copies per shard), and in DuckDB over the same file (which
/// prunes nothing): pruning and fragmenting never change an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_do_not_depend_on_pipelines() {
    // One node reads segments through Parquet only, the other through hot segments.
    let (one, parquet) = loaded(|c| {
        c.pipelines = Some(1);
        c.shard_replicas = 1;
        c.hot_cache_bytes_max = 0;
    })
    .await;
    let (many, _) = loaded(|c| {
        c.pipelines = Some(5);
        c.pipeline_slots = 1;
        c.shard_replicas = 2;
    })
    .await;
    let mut rng = StdRng::seed_from_u64(42);
    let qs: Vec<String> = (0..300).map(|_| random_query(&mut rng)).collect();
    let expected = duckdb_rows(&parquet, &qs);
    let (c1, c2) = (one.client().await, many.client().await);
    let mut nonempty = 0;
    for (q, mut want) in qs.iter().zip(expected) {
        let mut a = rows_of(&c1, q).await;
        let mut b = rows_of(&c2, q).await;
        if !q.contains("ORDER BY") {
            a.sort();
            b.sort();
            want.sort();
        }
        assert_eq!(a, b, "1 pipeline (Parquet) vs 5 pipelines (hot segments):\n{q}");
        assert_eq!(a, want, "Tidemark vs DuckDB:\n{q}");
        nonempty += usize::from(!a.is_empty() && a[0].iter().any(|v| v != "NULL" && v != "0"));
    }
    assert!(nonempty > 100, "too few queries select anything ({nonempty}); the generator needs fixing");
}

/// `$n` parameters are bound before routing: a prepared point query touches one shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_are_bound_before_routing() {
    let (n, _) = loaded(|c| c.pipelines = Some(2)).await;
    let c = n.client().await;
    let stmt = c.prepare("SELECT count(*) FROM usage WHERE entity_id = $1 AND event_time >= $2").await.unwrap();
    let since = chrono::NaiveDate::from_ymd_opt(2026, 1, 12).unwrap().and_hms_opt(0, 0, 0).unwrap();
    for i in [5u32, 6, 7] {
        let e = entity_id(i);
        let row = c.query_one(&stmt, &[&e, &since]).await.unwrap();
        assert!(row.get::<_, i64>(0) > 0);
    }
    let routed = rows_of(&c, "SELECT query_id, count(*), min(shard) FROM system.routing_decisions GROUP BY 1 ORDER BY 1").await;
    let last3: Vec<_> = routed.iter().rev().take(3).rev().collect();
    for (r, i) in last3.iter().zip([5u32, 6, 7]) {
        assert_eq!(r[1], "1", "one fragment per execution: {routed:?}");
        assert_eq!(r[2], tidemark::shard_map::shard_of(&entity_id(i), 8).to_string());
    }
}

/// A value bound to a prepared statement's `$n`, and the same value as SQL text.
#[derive(Clone, Debug)]
enum Param {
    Text(String),
    Ts(chrono::NaiveDateTime),
    Int(i64),
    Num(rust_decimal::Decimal),
}

impl Param {
    fn sql(&self) -> String {
        match self {
            Param::Text(s) => format!("'{s}'"),
            Param::Ts(t) => format!("TIMESTAMP '{}'", t.format("%Y-%m-%d %H:%M:%S")),
            Param::Int(i) => i.to_string(),
            Param::Num(d) => d.to_string(),
        }
    }

    fn as_sql_param(&self) -> &(dyn tokio_postgres::types::ToSql + Sync) {
        match self {
            Param::Text(s) => s,
            Param::Ts(t) => t,
            Param::Int(i) => i,
            Param::Num(d) => d,
        }
    }
}

/// Prepared statements reuse an optimized plan across Executes (the generic plan);
/// their answers must equal those of the same statements with the values written in,
/// planned from scratch, for many values of each parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_answer_like_fresh_plans() {
    use rand::Rng;
    let (n, _) = loaded(|c| c.pipelines = Some(2)).await;
    let c = n.client().await;
    // A long IN list of parameters is planned per execution with the values as
    // constants (one hash set, not one parameter read per item and batch).
    let wide = format!("SELECT count(*), sum(quantity) FROM usage WHERE entity_id IN ({})", (1..=40).map(|i| format!("${i}")).collect::<Vec<_>>().join(", "));
    let templates = [
        "SELECT sum(quantity) FROM usage WHERE entity_id = $1 AND service = $2 AND event_time >= $3 AND event_time < $4",
        "SELECT service, operation, sum(quantity), count(*) FROM usage WHERE entity_id = $1 AND event_time >= $2 GROUP BY 1, 2 ORDER BY 1, 2",
        "SELECT count(*), min(event_time), max(quantity) FROM usage WHERE entity_id IN ($1, $2) AND quantity > $3",
        "SELECT record_id, quantity FROM usage WHERE entity_id = $1 ORDER BY event_time DESC, record_id LIMIT $2",
        "SELECT date_trunc('hour', event_time) AS h, count(*) FROM usage WHERE entity_id = $1 AND service <> $2 GROUP BY 1 ORDER BY 1",
        "SELECT entity_id, count(*) FROM usage WHERE (entity_id = $1 OR entity_id = $2) AND event_time < $3 GROUP BY 1 ORDER BY 1",
        "SELECT count(*) FROM usage WHERE service = $1 AND event_time >= $2 AND event_time < $3",
        &wide,
    ];
    let mut rng = StdRng::seed_from_u64(7);
    let day = |rng: &mut StdRng| {
        chrono::NaiveDate::from_ymd_opt(2026, 1, rng.random_range(8..20)).unwrap().and_hms_opt(rng.random_range(0..24), 0, 0).unwrap()
    };
    let services = ["storage", "compute", "database", "network", "nosuch"];
    let mut compared = 0;
    let mut nonempty = 0;
    let counters = n.node.plan_counters();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let (reused0, bound0) = (load(&counters.reused), load(&counters.bound));
    for t in templates {
        let stmt = c.prepare(t).await.unwrap_or_else(|e| panic!("{t}: {e}"));
        for _ in 0..25 {
            let params: Vec<Param> = stmt
                .params()
                .iter()
                .enumerate()
                .map(|(i, ty)| match *ty {
                    tokio_postgres::types::Type::TIMESTAMP => Param::Ts(day(&mut rng)),
                    tokio_postgres::types::Type::INT8 => Param::Int(rng.random_range(0..40)),
                    tokio_postgres::types::Type::NUMERIC => Param::Num(rust_decimal::Decimal::new(rng.random_range(0..400), 1)),
                    _ if t.contains(&format!("service = ${}", i + 1)) || t.contains(&format!("service <> ${}", i + 1)) => {
                        Param::Text(services[rng.random_range(0..services.len())].to_string())
                    }
                    _ => Param::Text(entity_id(rng.random_range(0..220))),
                })
                .collect();
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params.iter().map(|p| p.as_sql_param()).collect();
            let got: Vec<Vec<String>> = c
                .query(&stmt, &refs)
                .await
                .unwrap_or_else(|e| panic!("{t} {params:?}: {e}"))
                .iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| {
                            let ty = r.columns()[i].type_();
                            let v = match *ty {
                                tokio_postgres::types::Type::INT8 => r.get::<_, Option<i64>>(i).map(|v| v.to_string()),
                                tokio_postgres::types::Type::TIMESTAMP => {
                                    r.get::<_, Option<chrono::NaiveDateTime>>(i).map(|v| v.format("%Y-%m-%d %H:%M:%S%.f").to_string())
                                }
                                tokio_postgres::types::Type::NUMERIC => r.get::<_, Option<rust_decimal::Decimal>>(i).map(|v| v.normalize().to_string()),
                                _ => r.get::<_, Option<String>>(i),
                            };
                            v.map(|v| common::normalize(&v)).unwrap_or_else(|| "NULL".into())
                        })
                        .collect()
                })
                .collect();
            let mut literal = t.to_string();
            for (i, p) in params.iter().enumerate().rev() {
                literal = literal.replace(&format!("${}", i + 1), &p.sql());
            }
            let want = rows_of(&c, &literal).await;
            assert_eq!(got, want, "prepared {t} with {params:?} vs\n{literal}");
            compared += 1;
            nonempty += usize::from(!want.is_empty() && want[0].iter().any(|v| v != "NULL" && v != "0"));
        }
    }
    assert_eq!(compared, templates.len() * 25);
    // All but the LIMIT $2 statement (a LIMIT must be a constant when the physical plan
    // is built) and the long IN list ran their one physical plan every time.
    assert_eq!((load(&counters.reused) - reused0, load(&counters.bound) - bound0), (6 * 25, 2 * 25));
    assert!(nonempty > 60, "too few parameter sets select anything ({nonempty})");
}

/// A prepared statement's physical plan is built once and run again for each Execute;
/// the segments and write-buffer rows it reads, and the pipelines its fragments run on,
/// are chosen when it runs. So it sees rows written after it was built: in the write
/// buffer, then in new segments after a flush, in shards it had never read; and its
/// executions are logged with their own entity and shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_plans_read_your_writes() {
    let (n, _) = loaded(|c| {
        c.pipelines = Some(2);
        c.write_buffer_rows_max = 100_000;
        c.write_buffer_statement_rows_max = 10_000;
        c.write_buffer_flush_interval_ms = 3_600_000;
    })
    .await;
    let c = n.client().await;
    let counters = n.node.plan_counters();
    let reused = || counters.reused.load(std::sync::atomic::Ordering::Relaxed);
    let stmt = c
        .prepare("SELECT count(*), sum(quantity)::text FROM usage WHERE entity_id = $1 AND event_time >= $2")
        .await
        .unwrap();
    let since = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap().and_hms_opt(0, 0, 0).unwrap();
    let count = |row: tokio_postgres::Row| (row.get::<_, i64>(0), row.get::<_, Option<String>>(1));
    let literal = |e: &str| format!("SELECT count(*), sum(quantity)::text FROM usage WHERE entity_id = '{e}' AND event_time >= '2026-01-01'");
    let start = reused();
    for i in [3u32, 4, 5] {
        let e = entity_id(i);
        let got = count(c.query_one(&stmt, &[&e, &since]).await.unwrap());
        let want = rows_of(&c, &literal(&e)).await;
        assert!(got.0 > 0);
        assert_eq!(vec![got.0.to_string(), got.1.clone().unwrap()], want[0], "{e}");
    }
    assert_eq!(reused() - start, 3, "every Execute of this statement runs its one physical plan");
    // New entities, unknown when the plan was built, in several shards.
    let fresh: Vec<String> = (0..6).map(|i| format!("fresh-{i}")).collect();
    let shards: std::collections::BTreeSet<u32> = fresh.iter().map(|e| tidemark::shard_map::shard_of(e, 8)).collect();
    assert!(shards.len() >= 3, "the fresh entities should spread over shards: {shards:?}");
    for e in &fresh {
        assert_eq!(count(c.query_one(&stmt, &[e, &since]).await.unwrap()), (0, None));
        c.batch_execute(&format!(
            "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) VALUES \
             ('{e}-a', '{e}', 'storage', 'GetObject', 'Requests', 2, '2026-01-10 01:00:00'), \
             ('{e}-b', '{e}', 'storage', 'PutObject', 'Requests', 3, '2026-01-11 01:00:00')"
        ))
        .await
        .unwrap();
        // In the write buffer: seen at once.
        assert_eq!(count(c.query_one(&stmt, &[e, &since]).await.unwrap()), (2, Some("5.000000".into())), "{e} buffered");
    }
    assert_eq!(n.node.storage().flush_buffer().await.unwrap(), 12);
    for e in &fresh {
        // In new segments now.
        assert_eq!(count(c.query_one(&stmt, &[e, &since]).await.unwrap()), (2, Some("5.000000".into())), "{e} flushed");
    }
    assert_eq!(reused() - start, 3 + 3 * fresh.len() as u64);
    // Each execution is logged with its own entity and the one shard it read.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let logged = rows_of(
        &c,
        "SELECT array_to_string(entity_ids, ','), array_to_string(shards, ','), rows FROM system.query_log \
         WHERE query LIKE 'SELECT count(*), sum(quantity)::text FROM usage WHERE entity_id = $1%' ORDER BY query_id",
    )
    .await;
    assert_eq!(logged.len(), 3 + 3 * fresh.len(), "{logged:?}");
    let last = &logged[logged.len() - 1];
    let e = &fresh[fresh.len() - 1];
    assert_eq!(last[0], *e);
    assert_eq!(last[1], tidemark::shard_map::shard_of(e, 8).to_string());
    assert_eq!(last[2], "1");
}

/// One execution at a time holds a statement's reused plan (its values live in it): a
/// second Execute while the first one's rows are still being read is planned the other
/// way, and both answer right; afterwards the plan is reused again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_reused_plan_is_not_shared_a_concurrent_execute_gets_a_copy_of_its_own() {
    use futures::StreamExt;
    use tidemark::session::{Outcome, Session, SessionInfo};
    let (n, _) = loaded(|c| c.pipelines = Some(2)).await;
    let session = Session::new(
        Arc::clone(&n.node),
        SessionInfo { session_id: 1, user: "t".into(), application_name: "t".into(), statement_timeout: None, routing_policy: None },
    );
    let sql = "SELECT count(*) FROM usage WHERE entity_id = $1";
    let stmt = session.parse(sql).unwrap().remove(0);
    let plan = session.plan(&stmt).await.unwrap().unwrap();
    let generic = Arc::new(tidemark::planner::generic::GenericPlan::default());
    let params = |e: &str| {
        datafusion::common::ParamValues::List(vec![datafusion::common::ScalarValue::Utf8(Some(e.to_string())).into()])
    };
    let run = |e: String| {
        let (session, stmt, plan, generic) = (&session, &stmt, &plan, &generic);
        async move {
            match session.execute(sql, stmt, Some(plan), Some(params(&e)), Some(generic)).await.unwrap() {
                Outcome::Rows { stream, .. } => stream,
                _ => panic!("rows expected"),
            }
        }
    };
    let count_of = |b: datafusion::arrow::record_batch::RecordBatch| {
        b.column(0).as_any().downcast_ref::<datafusion::arrow::array::Int64Array>().unwrap().value(0)
    };
    let c = n.client().await;
    let want = |e: String| {
        let c = &c;
        async move { rows_of(c, &format!("SELECT count(*) FROM usage WHERE entity_id = '{e}'")).await[0][0].parse::<i64>().unwrap() }
    };
    let counters = n.node.plan_counters();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let (r0, b0) = (load(&counters.reused), load(&counters.bound));
    let mut first = run(entity_id(1)).await;
    let second = run(entity_id(2)).await;
    assert_eq!(
        (load(&counters.reused) - r0, load(&counters.bound) - b0),
        (2, 0),
        "the second Execute runs a copy of its own, not the busy one"
    );
    let got2 = count_of(second.collect::<Vec<_>>().await.remove(0).unwrap());
    let got1 = count_of(first.next().await.unwrap().unwrap());
    drop(first);
    assert_eq!(got1, want(entity_id(1)).await);
    assert_eq!(got2, want(entity_id(2)).await);
    assert!(got1 != got2 || got1 > 0);
    let third = run(entity_id(3)).await;
    assert_eq!(load(&counters.reused) - r0, 3, "a copy handed back is reused");
    assert_eq!(count_of(third.collect::<Vec<_>>().await.remove(0).unwrap()), want(entity_id(3)).await);

    // At most COPIES_MAX executions hold a copy at once; one more is planned the other way.
    let (r1, b1) = (load(&counters.reused), load(&counters.bound));
    let mut held = Vec::new();
    for i in 0..tidemark::planner::generic::COPIES_MAX as u32 {
        held.push((i, run(entity_id(i)).await));
    }
    let beyond = run(entity_id(7)).await;
    assert_eq!(
        (load(&counters.reused) - r1, load(&counters.bound) - b1),
        (tidemark::planner::generic::COPIES_MAX as u64, 1),
        "copies are bounded"
    );
    assert_eq!(count_of(beyond.collect::<Vec<_>>().await.remove(0).unwrap()), want(entity_id(7)).await);
    for (i, s) in held.into_iter().rev() {
        assert_eq!(count_of(s.collect::<Vec<_>>().await.remove(0).unwrap()), want(entity_id(i)).await, "entity {i}");
    }
}

/// Connections that prepare the same text share one prepared statement
/// (`planner::shared`): planned once per node, each concurrent Execute on a copy of
/// its own physical plan, and every connection gets its own values' answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_preparing_one_text_share_its_plan_and_keep_their_own_answers() {
    let (n, _) = loaded(|c| c.pipelines = Some(2)).await;
    let sql = "SELECT count(*), sum(quantity) FROM usage WHERE entity_id = $1 AND event_time >= $2";
    let since = chrono::NaiveDate::from_ymd_opt(2026, 1, 10).unwrap().and_hms_opt(0, 0, 0).unwrap();
    let c = n.client().await;
    let mut want = std::collections::HashMap::new();
    for e in 0..40u32 {
        let r = rows_of(&c, &format!("SELECT count(*), sum(quantity) FROM usage WHERE entity_id = '{}' AND event_time >= '{since}'", entity_id(e))).await;
        want.insert(e, r[0].clone());
    }
    assert!(want.values().filter(|r| r[0] != "0").count() >= 10, "too few entities with rows to tell answers apart");
    let (shared0, hits0) = (n.node.shared_statements().len(), n.node.shared_statements().hits());
    let counters = n.node.plan_counters();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let (reused0, bound0, planned0) = (load(&counters.reused), load(&counters.bound), load(&counters.planned));
    let (clients, rounds) = (6u32, 30u32);
    let mut tasks = Vec::new();
    for k in 0..clients {
        let client = n.client().await;
        // Prepared one connection after another (the executions run concurrently).
        let stmt = client.prepare(sql).await.unwrap();
        let want = want.clone();
        tasks.push(tokio::spawn(async move {
            for r in 0..rounds {
                let e = (k * 7 + r * 3) % 40;
                let row = client.query_one(&stmt, &[&entity_id(e), &since]).await.unwrap();
                let count: i64 = row.get(0);
                let sum: Option<rust_decimal::Decimal> = row.get(1);
                let got = vec![count.to_string(), sum.map(|d| d.normalize().to_string()).unwrap_or_default()];
                let w = &want[&e];
                let w = vec![w[0].clone(), if w[1].is_empty() { String::new() } else { w[1].parse::<rust_decimal::Decimal>().unwrap().normalize().to_string() }];
                assert_eq!(got, w, "client {k}, round {r}, entity {e}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(n.node.shared_statements().len(), shared0 + 1, "one text, one shared statement");
    // Every connection after the first found the statement the first one prepared.
    assert_eq!(n.node.shared_statements().hits() - hits0, u64::from(clients) - 1, "prepares answered from the shared statement");
    let executes = u64::from(clients * rounds);
    assert_eq!(
        (load(&counters.reused) - reused0, load(&counters.bound) - bound0, load(&counters.planned) - planned0),
        (executes, 0, 0),
        "every Execute ran a copy of the shared physical plan"
    );
}

/// The read-your-writes barrier waits only for the shards a statement may read: those
/// its shard-key filters name, every shard when they name none, none when it reads no
/// segment table (subqueries included; a statement's values count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_barrier_names_the_shards_a_statement_reads() {
    use std::collections::BTreeSet;
    use tidemark::storage::provider::shards_read;
    let n = TestNode::start().await;
    let session = n.session();
    let shard = |e: &str| tidemark::shard_map::shard_of(e, 8);
    let read = |sql: &'static str| {
        let session = &session;
        async move {
            let stmt = session.parse(sql).unwrap().remove(0);
            shards_read(&session.plan(&stmt).await.unwrap().unwrap())
        }
    };
    let one = |e: &str| Some(Some(BTreeSet::from([shard(e)])));
    assert_eq!(read("SELECT count(*) FROM usage WHERE entity_id = 'acct-001'").await, one("acct-001"));
    assert_eq!(read("SELECT sum(quantity) FROM usage u WHERE u.entity_id = 'acct-002' AND quantity > 1").await, one("acct-002"));
    assert_eq!(
        read("SELECT count(*) FROM usage WHERE entity_id IN ('acct-001', 'acct-003')").await,
        Some(Some(BTreeSet::from([shard("acct-001"), shard("acct-003")])))
    );
    assert_eq!(read("SELECT (SELECT count(*) FROM usage WHERE entity_id = 'acct-004')").await, one("acct-004"));
    assert_eq!(read("SELECT count(*) FROM usage").await, Some(None));
    assert_eq!(read("SELECT count(*) FROM usage WHERE entity_id = 'acct-001' OR service = 'storage'").await, Some(None));
    // A filter above a join is not read (yet): every shard.
    assert_eq!(
        read("SELECT count(*) FROM usage a JOIN usage b ON a.record_id = b.record_id WHERE a.entity_id = 'acct-001'").await,
        Some(None)
    );
    assert_eq!(read("SELECT 1").await, None);
    assert_eq!(read("SELECT count(*) FROM system.pipelines").await, None);
    // A prepared statement's values name its shard once bound.
    let stmt = session.parse("SELECT count(*) FROM usage WHERE entity_id = $1").unwrap().remove(0);
    let plan = session.plan(&stmt).await.unwrap().unwrap();
    assert_eq!(shards_read(&plan), Some(None));
    let params = datafusion::common::ParamValues::List(vec![datafusion::common::ScalarValue::Utf8(Some("acct-005".into())).into()]);
    assert_eq!(shards_read(&plan.replace_params_with_values(&params).unwrap()), one("acct-005"));
}
