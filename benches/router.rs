//! Decision-time benchmarks of the pure cores: router v1 and shard-key extraction.
//! Run: `cargo bench --bench router` (targets: routing under 2 µs p50 for 64 pipelines;
//! the shard map of 1,000 pipelines well under a second per epoch).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use datafusion::prelude::{col, lit};
use datafusion::scalar::ScalarValue;
use tidemark::shard_key;
use tidemark::router::{self, LoadSnapshot, PipelineLoad};
use tidemark::shard_map::{shard_of, PipelineId, ShardMap};

fn snapshot(pipes: &[PipelineId]) -> LoadSnapshot {
    LoadSnapshot::new(
        pipes
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut l = PipelineLoad::idle(*p, 4);
                l.in_flight = (i % 5) as u32;
                l.queued = (i % 3) as u32;
                l
            })
            .collect(),
    )
}

fn routing(c: &mut Criterion) {
    // 64 pipelines on 16 nodes, 256 shards, 3 copies each.
    let pipes: Vec<PipelineId> = (0..64).map(|i| PipelineId::new(1 + i / 4, (i % 4) as u32)).collect();
    let map = ShardMap::build(256, 3, &pipes);
    let snap = snapshot(&pipes);
    let key = "acct-000042";
    c.bench_function("route one point query (64 pipelines, 3 replicas)", |b| {
        b.iter(|| {
            let shard = shard_of(black_box(key), 256);
            router::route(shard, map.replicas_of(shard), &snap, &[])
        })
    });
    let shards: Vec<u32> = (0..256).collect();
    c.bench_function("route a fan-out query (256 fragments, 64 pipelines)", |b| {
        b.iter(|| router::route_all(black_box(&shards), &map, &snap))
    });
    let wide = ShardMap::build(64, 64, &pipes);
    c.bench_function("route among 64 replicas", |b| b.iter(|| router::route(7, wide.replicas_of(7), black_box(&snap), &[])));
    c.bench_function("build the epoch-1 shard map (256 shards x 3, 64 pipelines)", |b| {
        b.iter(|| ShardMap::build(256, 3, black_box(&pipes)))
    });
    // The simulation's fleet: 1,000 pipelines on 125 nodes, 4,096 shards, 3 copies.
    let fleet: Vec<PipelineId> = (0..1000).map(|i| PipelineId::new(1 + i / 8, (i % 8) as u32)).collect();
    let mut slow = c.benchmark_group("shard map at 1,000 pipelines");
    slow.sample_size(10);
    slow.bench_function("build the epoch-1 map (4,096 shards x 3)", |b| b.iter(|| ShardMap::build(4096, 3, black_box(&fleet))));
    let big = ShardMap::build(4096, 3, &fleet);
    slow.bench_function("one pipeline leaves", |b| b.iter(|| big.with_pipelines(black_box(&fleet[1..]))));
    let joined: Vec<PipelineId> = fleet.iter().copied().chain([PipelineId::new(200, 0)]).collect();
    slow.bench_function("one pipeline joins", |b| b.iter(|| big.with_pipelines(black_box(&joined))));
    slow.finish();
}

fn extraction(c: &mut Criterion) {
    let ts = |s: i64| lit(ScalarValue::TimestampMicrosecond(Some(s), None));
    let point = vec![
        col("entity_id").eq(lit("acct-000042")),
        col("service").eq(lit("storage")),
        col("event_time").gt_eq(ts(1_768_435_200_000_000)),
        col("event_time").lt(ts(1_768_521_600_000_000)),
    ];
    c.bench_function("extract keys + time from a point query's filters", |b| {
        b.iter(|| {
            let k = shard_key::key_values(black_box(&point), "entity_id");
            let t = shard_key::time_range(black_box(&point), "event_time");
            (k, t)
        })
    });
    let list: Vec<_> = (0..20).map(|i| lit(format!("acct-{i:06}"))).collect();
    let many = vec![col("entity_id").in_list(list, false).or(col("entity_id").eq(lit("acct-999999")))];
    c.bench_function("extract keys from IN (20 values) OR =", |b| {
        b.iter(|| shard_key::key_values(black_box(&many), "entity_id"))
    });
}

criterion_group!(benches, routing, extraction);
criterion_main!(benches);
