//! Oracle test: the typical queries of WORKLOAD.md give the same rows through Tidemark
//! (over the wire) as DuckDB over the same generated Parquet file.
//! DuckDB's Python package is installed by `.ci/run` (`pip install duckdb`).

mod common;

use std::sync::Arc;

use tidemark::datagen::{entity_id, GenSpec, Generator};

use common::{duckdb_rows, normalize, TestNode};

/// 2026-01-20 00:00:00 UTC: the generated data ends here, and it stands in for now().
const END_US: i64 = 1_768_867_200_000_000;
const NOW: &str = "TIMESTAMP '2026-01-20 00:00:00'";

fn queries() -> Vec<String> {
    let top = entity_id(0);
    let mid = entity_id(7);
    let small = entity_id(150);
    vec![
        // 1. point total
        format!("SELECT sum(quantity) FROM usage WHERE entity_id = '{top}' AND service = 'storage' AND operation = 'GetObject' AND event_time >= TIMESTAMP '2026-01-12 00:00:00' AND event_time < TIMESTAMP '2026-01-13 00:00:00'"),
        // 2. hourly series
        format!("SELECT date_trunc('hour', event_time) AS hour, operation, sum(quantity) FROM usage WHERE entity_id = '{mid}' AND service = 'network' AND event_time >= TIMESTAMP '2026-01-10 00:00:00' AND event_time < TIMESTAMP '2026-01-12 00:00:00' GROUP BY 1, 2 ORDER BY 1, 2"),
        // 3. month to date
        format!("SELECT service, usage_type, sum(quantity) FROM usage WHERE entity_id = '{top}' AND event_time >= date_trunc('month', {NOW}) GROUP BY 1, 2"),
        // 4. quota check for today
        format!("SELECT sum(quantity) FROM usage WHERE entity_id = '{mid}' AND service = 'network' AND usage_type = 'Bytes-Out' AND event_time >= date_trunc('day', {NOW} - INTERVAL '1 day')"),
        // 5. several entities
        format!("SELECT entity_id, sum(quantity) FROM usage WHERE entity_id IN ('{top}', '{mid}', '{small}') AND event_time >= TIMESTAMP '2026-01-08 00:00:00' GROUP BY 1"),
        // 6. top-N entities of a service
        "SELECT entity_id, sum(quantity) AS q FROM usage WHERE service = 'storage' AND event_time >= TIMESTAMP '2026-01-09 00:00:00' AND event_time < TIMESTAMP '2026-01-16 00:00:00' GROUP BY 1 ORDER BY q DESC, entity_id LIMIT 10".to_string(),
        // 7. top operations of an entity
        format!("SELECT operation, count(*), sum(quantity) FROM usage WHERE entity_id = '{top}' AND event_time >= {NOW} - INTERVAL '1 day' GROUP BY 1 ORDER BY 3 DESC, 1 LIMIT 5"),
        // 8. service-wide hourly totals
        format!("SELECT date_trunc('hour', event_time), sum(quantity) FROM usage WHERE service = 'queue' AND event_time >= {NOW} - INTERVAL '7 days' GROUP BY 1 ORDER BY 1"),
        // 9. distinct regions this month
        format!("SELECT count(DISTINCT region) FROM usage WHERE entity_id = '{small}' AND event_time >= date_trunc('month', {NOW})"),
        // 10. audit
        format!("SELECT record_id, entity_id, service, operation, usage_type, region, quantity, event_time FROM usage WHERE entity_id = '{mid}' AND service = 'database' AND event_time >= TIMESTAMP '2026-01-14 00:00:00' AND event_time < TIMESTAMP '2026-01-16 00:00:00' ORDER BY event_time, record_id LIMIT 100"),
        // Full-table aggregate (the benchmark's query) and plain counts.
        "SELECT service, date_trunc('day', event_time) AS day, sum(quantity), count(*) FROM usage GROUP BY 1, 2 ORDER BY 1, 2".to_string(),
        "SELECT count(*), count(DISTINCT entity_id), count(region), min(event_time), max(event_time) FROM usage".to_string(),
        "SELECT usage_type, avg(quantity)::double precision IS NOT NULL, max(quantity), min(quantity) FROM usage GROUP BY 1 ORDER BY 1".to_string(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typical_queries_match_duckdb() {
    let n = TestNode::start().await;
    let table = n.node.catalog().get("usage").cloned().unwrap();
    let gen = Generator::new(
        GenSpec { rows: 120_000, entities: 300, days: 21, seed: 11, end_us: END_US },
        Arc::clone(&table.schema),
    );
    let parquet = n.dir.path().join("import/oracle.parquet");
    let written = tidemark::datagen::write_parquet(&gen, &parquet, |_| {}).unwrap();
    let c = n.client().await;
    let stored = c.execute(&format!("COPY usage FROM '{}' WITH (FORMAT parquet)", parquet.display()), &[]).await.unwrap();
    assert_eq!(stored, written);

    let qs = queries();
    let expected = duckdb_rows(&parquet, &qs);
    for (q, want) in qs.iter().zip(expected) {
        let msgs = c.simple_query(q).await.unwrap_or_else(|e| panic!("{q}: {e}"));
        let mut got: Vec<Vec<String>> = msgs
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(normalize).unwrap_or_else(|| "NULL".into())).collect())
                }
                _ => None,
            })
            .collect();
        let mut want = want;
        if !q.contains("ORDER BY") {
            got.sort();
            want.sort();
        }
        assert!(!want.is_empty() && !(want.len() == 1 && want[0].iter().all(|v| v == "NULL")), "oracle query selects nothing, fix the test: {q}");
        assert_eq!(got, want, "\n{q}");
    }
}
