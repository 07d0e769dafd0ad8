//! Generated usage data with the shape of WORKLOAD.md: Zipf-like entity popularity,
//! a few services with their operations and usage types, daily and weekly cycles, slow
//! growth and a few bursts. Deterministic from a seed and an end instant.
//!
//! Owns: the synthetic workload used by the demo, the tests and the benchmarks.
//! Must never: read the clock or any global randomness (the caller passes the end
//! instant and the seed, so every consumer can regenerate the same rows).

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Decimal128Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder};
use datafusion::arrow::datatypes::SchemaRef;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::Result;

pub const SERVICES: &[(&str, &[(&str, &[&str])])] = &[
    ("storage", &[
        ("GetObject", &["Requests", "Bytes-Out"]),
        ("PutObject", &["Requests", "Bytes-In"]),
        ("ListBucket", &["Requests"]),
        ("DeleteObject", &["Requests"]),
        ("HeadObject", &["Requests"]),
        ("StoredBytes", &["GB-Hours"]),
    ]),
    ("compute", &[
        ("RunInstance", &["Instance-Hours", "vCPU-Hours", "GB-Hours"]),
        ("StartInstance", &["Requests"]),
        ("StopInstance", &["Requests"]),
        ("AttachVolume", &["Requests", "GB-Hours"]),
    ]),
    ("network", &[
        ("DataTransfer", &["Bytes-Out", "Bytes-In"]),
        ("LoadBalancer", &["LCU-Hours", "Requests"]),
        ("NatGateway", &["Bytes-Out", "Hours"]),
    ]),
    ("database", &[
        ("Query", &["Requests", "Read-Units"]),
        ("Write", &["Requests", "Write-Units"]),
        ("Backup", &["GB-Hours"]),
        ("Replicate", &["Bytes-Out"]),
        ("Scan", &["Read-Units"]),
    ]),
    ("queue", &[
        ("SendMessage", &["Requests", "Bytes-In"]),
        ("ReceiveMessage", &["Requests", "Bytes-Out"]),
        ("DeleteMessage", &["Requests"]),
    ]),
];

pub const REGIONS: &[&str] = &["us-east-1", "us-west-2", "eu-west-1", "eu-central-1", "ap-southeast-2", "sa-east-1"];

/// Relative activity per hour of day (UTC): quiet nights, busy afternoons.
pub const HOURLY: [f64; 24] = [
    0.35, 0.3, 0.28, 0.27, 0.3, 0.4, 0.55, 0.75, 0.95, 1.1, 1.2, 1.3, 1.35, 1.45, 1.55, 1.6, 1.55, 1.45, 1.3, 1.1,
    0.9, 0.7, 0.55, 0.45,
];

/// Zipf exponent: with 10,000 entities the top 1% produce about a third of the rows.
pub const ZIPF_EXPONENT: f64 = 0.82;

#[derive(Debug, Clone)]
pub struct GenSpec {
    pub rows: u64,
    pub entities: u32,
    pub days: u32,
    pub seed: u64,
    /// Exclusive end of the generated interval, microseconds since the epoch; it is
    /// rounded down to a whole hour.
    pub end_us: i64,
}

impl GenSpec {
    pub fn start_us(&self) -> i64 {
        self.end_hour_us() - self.days as i64 * 86_400_000_000
    }
    fn end_hour_us(&self) -> i64 {
        self.end_us.div_euclid(3_600_000_000) * 3_600_000_000
    }
}

/// A burst: one entity's load multiplied for some hours.
#[derive(Debug, Clone, Copy)]
pub struct Burst {
    pub entity: u32,
    pub start_hour: u32,
    pub hours: u32,
    pub multiplier: f64,
}

pub fn entity_id(i: u32) -> String {
    format!("acct-{i:05}")
}

/// The generator; call [`Generator::hour_batch`] for each hour (or [`Generator::batches`]).
pub struct Generator {
    spec: GenSpec,
    schema: SchemaRef,
    cumulative: Vec<f64>,
    hour_rows: Vec<u64>,
    pub bursts: Vec<Burst>,
    entity_regions: Vec<Option<&'static str>>,
}

impl Generator {
    pub fn new(spec: GenSpec, schema: SchemaRef) -> Generator {
        let n = spec.entities.max(1) as usize;
        let mut cumulative = Vec::with_capacity(n);
        let mut acc = 0.0;
        for i in 0..n {
            acc += 1.0 / ((i + 1) as f64).powf(ZIPF_EXPONENT);
            cumulative.push(acc);
        }
        let mut rng = StdRng::seed_from_u64(spec.seed ^ 0xB0B5);
        let hours = spec.days as usize * 24;
        let bursts: Vec<Burst> = (0..(spec.days / 7 + 2))
            .map(|_| Burst {
                entity: rng.random_range(0..n as u32),
                start_hour: rng.random_range(0..hours.max(1) as u32),
                hours: rng.random_range(2..8),
                multiplier: rng.random_range(5.0..20.0),
            })
            .collect();
        let entity_regions = (0..n)
            .map(|_| if rng.random_bool(0.05) { None } else { Some(REGIONS[rng.random_range(0..REGIONS.len())]) })
            .collect();
        // Weight of each hour: daily cycle x weekly cycle x growth.
        let start = spec.start_us();
        let weights: Vec<f64> = (0..hours)
            .map(|h| {
                let t = start + h as i64 * 3_600_000_000;
                let secs = t.div_euclid(1_000_000);
                let hour_of_day = (secs.div_euclid(3600)).rem_euclid(24) as usize;
                // 1970-01-01 was a Thursday; day 0 = Monday here.
                let weekday = (secs.div_euclid(86_400) + 3).rem_euclid(7);
                let weekly = if weekday >= 5 { 0.6 } else { 1.0 };
                let growth = 1.0 + 0.3 * h as f64 / hours.max(1) as f64;
                HOURLY[hour_of_day] * weekly * growth
            })
            .collect();
        let total: f64 = weights.iter().sum();
        let mut hour_rows: Vec<u64> = weights.iter().map(|w| (spec.rows as f64 * w / total).floor() as u64).collect();
        let assigned: u64 = hour_rows.iter().sum();
        // Spread the rounding remainder over the busiest hours.
        let mut order: Vec<usize> = (0..hours).collect();
        order.sort_by(|a, b| weights[*b].total_cmp(&weights[*a]));
        for i in 0..(spec.rows.saturating_sub(assigned) as usize) {
            if let Some(h) = order.get(i % hours.max(1)) {
                hour_rows[*h] += 1;
            }
        }
        Generator { spec, schema, cumulative, hour_rows, bursts, entity_regions }
    }

    pub fn hours(&self) -> usize {
        self.hour_rows.len()
    }

    pub fn spec(&self) -> &GenSpec {
        &self.spec
    }

    /// Rows of hour `h` (0-based from the start), plus burst rows.
    pub fn hour_batch(&self, h: usize) -> Result<RecordBatch> {
        let mut rng = StdRng::seed_from_u64(self.spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(h as u64));
        let base = self.hour_rows[h];
        let mut extra: Vec<(u32, u64)> = Vec::new();
        for b in &self.bursts {
            if (b.start_hour as usize..(b.start_hour + b.hours) as usize).contains(&h) {
                let share = 1.0 / ((b.entity + 1) as f64).powf(ZIPF_EXPONENT) / self.cumulative.last().copied().unwrap_or(1.0);
                extra.push((b.entity, (base as f64 * share * (b.multiplier - 1.0)).ceil() as u64));
            }
        }
        let n = base + extra.iter().map(|e| e.1).sum::<u64>();
        let hour_start = self.spec.start_us() + h as i64 * 3_600_000_000;
        let mut record_id = StringBuilder::with_capacity(n as usize, n as usize * 20);
        let mut entity = StringBuilder::with_capacity(n as usize, n as usize * 10);
        let mut service = StringBuilder::with_capacity(n as usize, n as usize * 8);
        let mut operation = StringBuilder::with_capacity(n as usize, n as usize * 12);
        let mut usage_type = StringBuilder::with_capacity(n as usize, n as usize * 10);
        let mut region = StringBuilder::with_capacity(n as usize, n as usize * 10);
        let mut quantity = Decimal128Builder::with_capacity(n as usize).with_precision_and_scale(38, 6)?;
        let mut event_time = TimestampMicrosecondBuilder::with_capacity(n as usize);
        let mut ingest_time = TimestampMicrosecondBuilder::with_capacity(n as usize);
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let mut bursts = extra.iter().flat_map(|(e, k)| std::iter::repeat_n(*e, *k as usize));
        for i in 0..n {
            let e = if i < base {
                let u = rng.random::<f64>() * total;
                self.cumulative.partition_point(|c| *c < u).min(self.cumulative.len() - 1) as u32
            } else {
                bursts.next().unwrap_or(0)
            };
            // Each entity uses a few services; popular ones use more.
            let (svc, ops) = SERVICES[(e as usize + rng.random_range(0..3usize)) % SERVICES.len()];
            let (op, types) = ops[rng.random_range(0..ops.len())];
            let ut = types[rng.random_range(0..types.len())];
            let q: i128 = match ut {
                "Requests" => rng.random_range(1..200) * 1_000_000,
                t if t.starts_with("Bytes") => rng.random_range(1_000..50_000_000) * 1_000_000,
                _ => rng.random_range(1..10_000_000),
            };
            let t = hour_start + rng.random_range(0..3_600_000_000i64);
            record_id.append_value(format!("{:x}-{h}-{i}", self.spec.seed));
            entity.append_value(entity_id(e));
            service.append_value(svc);
            operation.append_value(op);
            usage_type.append_value(ut);
            region.append_option(self.entity_regions[e as usize]);
            quantity.append_value(q);
            event_time.append_value(t);
            ingest_time.append_value(t);
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(record_id.finish()),
            Arc::new(entity.finish()),
            Arc::new(service.finish()),
            Arc::new(operation.finish()),
            Arc::new(usage_type.finish()),
            Arc::new(region.finish()),
            Arc::new(quantity.finish()),
            Arc::new(event_time.finish()),
            Arc::new(ingest_time.finish()),
        ];
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), cols)?)
    }

    /// All rows, one batch per UTC calendar day (the first and last may be partial), so
    /// that each batch fills exactly one segment window per shard.
    pub fn day_batches(&self) -> impl Iterator<Item = Result<RecordBatch>> + '_ {
        let start = self.spec.start_us();
        let day_of = move |h: usize| (start + h as i64 * 3_600_000_000).div_euclid(86_400_000_000);
        let hours = self.hours();
        let mut h = 0;
        std::iter::from_fn(move || {
            if h >= hours {
                return None;
            }
            let day = day_of(h);
            let first = h;
            while h < hours && day_of(h) == day {
                h += 1;
            }
            let batch = (first..h)
                .map(|i| self.hour_batch(i))
                .collect::<Result<Vec<_>>>()
                .and_then(|b| Ok(datafusion::arrow::compute::concat_batches(&self.schema, &b)?));
            Some(batch)
        })
    }
}

/// Writes generated rows to a Parquet file (for `tidemark gen`, benchmarks and tests).
pub fn write_parquet(gen: &Generator, path: &std::path::Path, mut progress: impl FnMut(u64)) -> Result<u64> {
    let file = std::fs::File::create(path)?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(parquet::basic::ZstdLevel::try_new(1).expect("valid level")))
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, Arc::clone(&gen.schema), Some(props))?;
    let mut rows = 0;
    for b in gen.day_batches() {
        let b = b?;
        rows += b.num_rows() as u64;
        w.write(&b)?;
        progress(b.num_rows() as u64);
    }
    w.close()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, DEFAULT_CATALOG};

    fn gen(rows: u64) -> Generator {
        let t = Catalog::parse(DEFAULT_CATALOG[0].1).unwrap().remove(0);
        Generator::new(GenSpec { rows, entities: 1000, days: 14, seed: 7, end_us: 1_767_571_200_000_000 }, t.schema)
    }

    #[test]
    fn deterministic_and_sized() {
        let a = gen(20_000);
        let b = gen(20_000);
        let ra: Vec<RecordBatch> = a.day_batches().collect::<Result<_>>().unwrap();
        let rb: Vec<RecordBatch> = b.day_batches().collect::<Result<_>>().unwrap();
        assert_eq!(ra, rb);
        let n: usize = ra.iter().map(|b| b.num_rows()).sum();
        // Bursts add rows on top of the requested count.
        assert!((20_000..24_000).contains(&n), "{n}");
    }

    #[test]
    fn skewed_and_cyclic() {
        let g = gen(50_000);
        let batches: Vec<RecordBatch> = g.day_batches().collect::<Result<_>>().unwrap();
        let mut per_entity = std::collections::HashMap::<String, usize>::new();
        let mut per_hour = [0usize; 24];
        for b in &batches {
            let ids = b.column(1).as_any().downcast_ref::<datafusion::arrow::array::StringArray>().unwrap();
            let ts = b.column(7).as_any().downcast_ref::<datafusion::arrow::array::TimestampMicrosecondArray>().unwrap();
            for i in 0..b.num_rows() {
                *per_entity.entry(ids.value(i).to_string()).or_default() += 1;
                per_hour[(ts.value(i) / 3_600_000_000).rem_euclid(24) as usize] += 1;
            }
        }
        let mut counts: Vec<usize> = per_entity.values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let total: usize = counts.iter().sum();
        let top: usize = counts.iter().take(10).sum(); // top 1% of 1000 entities
        assert!(top * 100 / total >= 15, "top 1% share {}%", top * 100 / total);
        // Afternoons are busier than nights.
        assert!(per_hour[15] > 3 * per_hour[3], "{per_hour:?}");
    }
}
