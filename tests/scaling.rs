//! The autoscaler on one node: in-process pipelines started and stopped while queries
//! run, the shard map moving to a new epoch each time, no query failing, and every
//! decision in system.scaling_decisions.

mod common;

use std::time::Duration;

use common::*;

async fn rows(c: &tokio_postgres::Client, sql: &str) -> Vec<tokio_postgres::Row> {
    c.query(sql, &[]).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_follow_the_load_and_no_query_fails() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.pipelines = Some(1);
    cfg.autoscale = "reactive".into();
    cfg.autoscale_interval_ms = 200;
    cfg.autoscale_pipelines_max = 3;
    // Any load at all needs the most pipelines; none needs the fewest.
    cfg.autoscale_target_utilization = 1e-6;
    let n = TestNode::start_with(dir, cfg).await;
    let c = n.client().await;
    let values: Vec<String> = (0..200)
        .map(|i| format!("('s{i}', 'acct-{:03}', 'storage', 'Get', 'Requests', 1, '2026-01-05 10:00:00')", i % 40))
        .collect();
    c.batch_execute(&format!(
        "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) VALUES {}",
        values.join(", ")
    ))
    .await
    .unwrap();
    let epoch0: i64 = rows(&c, "SELECT max(epoch)::bigint FROM system.pipelines").await[0].get::<_, i64>(0);
    // Load from three connections until three pipelines are placed (bounded).
    let url = n.url();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (url, stop) = (url.clone(), std::sync::Arc::clone(&stop));
        load.push(tokio::spawn(async move {
            let c = connect(&url).await;
            let mut done = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && done < 20_000 {
                let r = c.query_one("SELECT sum(quantity)::text FROM usage", &[]).await.expect("no query fails while pipelines change");
                assert_eq!(r.get::<_, String>(0), "200.000000");
                done += 1;
            }
            done
        }));
    }
    let mut grew = false;
    for _ in 0..150 {
        let started = rows(&c, "SELECT count(*) FROM system.scaling_decisions WHERE action LIKE 'started%'").await[0].get::<_, i64>(0);
        let placed = rows(&c, "SELECT count(*) FROM system.pipelines").await[0].get::<_, i64>(0);
        if started > 0 && placed >= 3 {
            grew = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(grew, "the fleet did not grow: {:?}", decisions(&c).await);
    // The load stops: after three quiet decisions the fleet shrinks to one.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        assert!(l.await.unwrap() > 0);
    }
    let mut shrank = false;
    for _ in 0..150 {
        let retired = rows(&c, "SELECT count(*) FROM system.scaling_decisions WHERE action LIKE 'retired%'").await[0].get::<_, i64>(0);
        if retired > 0 {
            shrank = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(shrank, "the fleet did not shrink: {:?}", decisions(&c).await);
    // Every change was a new epoch, and queries still answer.
    let epoch: i64 = rows(&c, "SELECT max(epoch)::bigint FROM system.pipelines").await[0].get::<_, i64>(0);
    assert!(epoch >= epoch0 + 3, "epoch {epoch0} -> {epoch}");
    let r = c.query_one("SELECT sum(quantity)::text FROM usage", &[]).await.unwrap();
    assert_eq!(r.get::<_, String>(0), "200.000000");
    // Each decision says why, with the measured warm-up and capacity.
    let r = rows(&c, "SELECT warmup_ms, pipeline_capacity, reason FROM system.scaling_decisions WHERE action LIKE 'started%' LIMIT 1").await;
    let (warmup, capacity, reason): (f64, f64, String) = (r[0].get(0), r[0].get(1), r[0].get(2));
    assert!(warmup >= 0.0 && capacity > 0.0 && reason.contains("measured"), "{warmup} {capacity} {reason}");
}

async fn decisions(c: &tokio_postgres::Client) -> Vec<String> {
    rows(c, "SELECT current::bigint, target::bigint, reason, action FROM system.scaling_decisions")
        .await
        .iter()
        .map(|r| format!("{}->{} {} / {}", r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, String>(2), r.get::<_, String>(3)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_shard_gets_copies_while_hot_and_loses_them_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = test_config(dir.path());
    cfg.pipelines = Some(4);
    cfg.shard_replicas = 2;
    cfg.hot_shards = "reactive".into();
    cfg.autoscale_interval_ms = 200;
    // Any load at all on a shard needs a copy on every pipeline.
    cfg.autoscale_target_utilization = 1e-6;
    let shard = tidemark::shard_map::shard_of("acct-hot", cfg.shard_count) as i64;
    let n = TestNode::start_with(dir, cfg).await;
    let c = n.client().await;
    let values: Vec<String> =
        (0..100).map(|i| format!("('h{i}', 'acct-hot', 'storage', 'Get', 'Requests', 1, '2026-01-05 10:00:00')")).collect();
    c.batch_execute(&format!(
        "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) VALUES {}",
        values.join(", ")
    ))
    .await
    .unwrap();
    let copies_of = |rows: &[tokio_postgres::Row]| rows.first().map(|r| r.get::<_, String>(0).matches("n1.p").count()).unwrap_or(0);
    let sql = format!("SELECT candidates FROM system.routing_decisions WHERE shard = {shard} ORDER BY time DESC LIMIT 1");
    c.query_one("SELECT sum(quantity)::text FROM usage WHERE entity_id = 'acct-hot'", &[]).await.unwrap();
    let before = copies_of(&rows(&c, &sql).await);
    let url = n.url();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..2 {
        let (url, stop) = (url.clone(), std::sync::Arc::clone(&stop));
        load.push(tokio::spawn(async move {
            let c = connect(&url).await;
            let mut done = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && done < 20_000 {
                let r = c
                    .query_one("SELECT sum(quantity)::text FROM usage WHERE entity_id = 'acct-hot'", &[])
                    .await
                    .expect("no query fails while copies change");
                assert_eq!(r.get::<_, String>(0), "100.000000");
                done += 1;
            }
            done
        }));
    }
    let mut copied = None;
    for _ in 0..150 {
        let r = rows(&c, &format!("SELECT target::bigint, action FROM system.scaling_decisions WHERE shard = {shard} AND action LIKE 'copied%'")).await;
        let now = copies_of(&rows(&c, &sql).await);
        if !r.is_empty() && now == 4 {
            copied = Some(r[0].get::<_, i64>(0));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(before, 2, "the map's replication before the shard is hot");
    assert_eq!(copied, Some(4), "the hot shard was not copied to every pipeline: {:?}", decisions(&c).await);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        assert!(l.await.unwrap() > 0);
    }
    // Quiet: after three decisions that wanted fewer, the copies go and the shard is
    // routed among its base replicas again.
    let mut dropped = false;
    for _ in 0..150 {
        let r = rows(&c, &format!("SELECT count(*) FROM system.scaling_decisions WHERE shard = {shard} AND action LIKE 'dropped%'")).await;
        if r[0].get::<_, i64>(0) > 0 {
            dropped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dropped, "the copies were not dropped: {:?}", decisions(&c).await);
    let r = c.query_one("SELECT sum(quantity)::text FROM usage WHERE entity_id = 'acct-hot'", &[]).await.unwrap();
    assert_eq!(r.get::<_, String>(0), "100.000000");
    assert_eq!(copies_of(&rows(&c, &sql).await), 2);
}
