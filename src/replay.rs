//! Replaying a query-arrival trace against a running Tidemark: the harness that later
//! work compares routing and scaling policies with.
//!
//! Owns: reading traces (CSV or Parquet: `timestamp`, `entity_id`, optionally
//! `service`, `operation`, `template` 1-10 of WORKLOAD.md), turning a trace row into
//! SQL, and sending the queries at the trace's pace divided by a time scale over a
//! bounded number of connections, with latency percentiles at the end. Must never:
//! queue without bound (at most `clients` queries are in flight; a late query waits
//! for a connection and the lag is reported), or report an unknown outcome as a
//! failure (a query whose connection broke is counted as unknown).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type, TimeUnit, TimestampMicrosecondType};
use datafusion::arrow::record_batch::RecordBatch;

use crate::error::{Error, Result};

/// One query arrival.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival {
    pub time_us: i64,
    pub entity_id: String,
    pub service: Option<String>,
    pub operation: Option<String>,
    pub template: Option<u8>,
}

fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros());
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc().timestamp_micros());
        }
    }
    None
}

/// Reads a trace, sorted by time. A row with a bad timestamp, an empty entity or a
/// template outside 1-10 is an error naming the row.
pub fn read_trace(path: &Path) -> Result<Vec<Arrival>> {
    let bytes = std::fs::read(path).map_err(|e| Error::UndefinedFile(format!("{}: {e}", path.display())))?;
    let mut out = if bytes.starts_with(b"PAR1") { read_parquet(bytes.into())? } else { read_csv(&String::from_utf8_lossy(&bytes))? };
    out.sort_by_key(|a| a.time_us);
    Ok(out)
}

fn check(a: Arrival, row: usize) -> Result<Arrival> {
    if a.entity_id.is_empty() {
        return Err(Error::BadCopyFormat(format!("trace row {row}: entity_id is empty")));
    }
    if a.template.is_some_and(|t| !(1..=10).contains(&t)) {
        return Err(Error::BadCopyFormat(format!("trace row {row}: template must be 1-10")));
    }
    Ok(a)
}

fn read_csv(text: &str) -> Result<Vec<Arrival>> {
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap_or("").split(',').map(|h| h.trim().to_ascii_lowercase()).collect();
    let col = |name: &str| header.iter().position(|h| h == name);
    let (ts, ent) = match (col("timestamp"), col("entity_id")) {
        (Some(t), Some(e)) => (t, e),
        _ => return Err(Error::BadCopyFormat("a trace needs timestamp and entity_id columns".into())),
    };
    let (svc, op, tpl) = (col("service"), col("operation"), col("template"));
    let mut out = Vec::new();
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row = i + 1;
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let get = |c: Option<usize>| c.and_then(|c| f.get(c)).filter(|v| !v.is_empty()).map(|v| v.to_string());
        let time_us = f
            .get(ts)
            .and_then(|v| parse_time(v))
            .ok_or_else(|| Error::BadCopyFormat(format!("trace row {row}: bad timestamp {:?}", f.get(ts))))?;
        let template = match get(tpl) {
            Some(t) => Some(t.parse::<u8>().map_err(|_| Error::BadCopyFormat(format!("trace row {row}: bad template {t:?}")))?),
            None => None,
        };
        out.push(check(Arrival { time_us, entity_id: get(Some(ent)).unwrap_or_default(), service: get(svc), operation: get(op), template }, row)?);
    }
    Ok(out)
}

fn read_parquet(bytes: bytes::Bytes) -> Result<Vec<Arrival>> {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
    let mut out = Vec::new();
    for b in reader {
        let b: RecordBatch = b?;
        let col = |n: &str| b.schema().index_of(n).ok().map(|i| b.column(i).clone());
        let ts = col("timestamp").ok_or_else(|| Error::BadCopyFormat("a trace needs a timestamp column".into()))?;
        let ts = cast(&ts, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
        let ts = ts.as_primitive::<TimestampMicrosecondType>();
        let text = |n: &str| -> Result<Option<datafusion::arrow::array::StringArray>> {
            Ok(match col(n) {
                Some(c) => Some(cast(&c, &DataType::Utf8)?.as_string::<i32>().clone()),
                None => None,
            })
        };
        let ent = text("entity_id")?.ok_or_else(|| Error::BadCopyFormat("a trace needs an entity_id column".into()))?;
        let (svc, op) = (text("service")?, text("operation")?);
        let tpl = match col("template") {
            Some(c) => Some(cast(&c, &DataType::Int64)?.as_primitive::<Int64Type>().clone()),
            None => None,
        };
        for r in 0..b.num_rows() {
            let row = out.len() + 1;
            let s = |a: &Option<datafusion::arrow::array::StringArray>| a.as_ref().filter(|a| a.is_valid(r)).map(|a| a.value(r).to_string());
            if ts.is_null(r) {
                return Err(Error::BadCopyFormat(format!("trace row {row}: timestamp is NULL")));
            }
            let template = tpl.as_ref().filter(|a| a.is_valid(r)).map(|a| a.value(r).clamp(0, 255) as u8);
            out.push(check(
                Arrival { time_us: ts.value(r), entity_id: s(&Some(ent.clone())).unwrap_or_default(), service: s(&svc), operation: s(&op), template },
                row,
            )?);
        }
    }
    Ok(out)
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn ts(us: i64) -> String {
    let t = chrono::DateTime::from_timestamp_micros(us).unwrap_or_default();
    format!("TIMESTAMP '{}'", t.format("%Y-%m-%d %H:%M:%S%.6f"))
}

/// The SQL for one arrival: its template (or 1 when service and operation are given,
/// 7 otherwise), with the arrival's entity, service and operation, and time windows
/// around the arrival's instant.
pub fn sql_for(a: &Arrival) -> String {
    let e = quote(&a.entity_id);
    let svc = quote(a.service.as_deref().unwrap_or("storage"));
    let op = quote(a.operation.as_deref().unwrap_or("GetObject"));
    let day = a.time_us.div_euclid(86_400_000_000) * 86_400_000_000;
    let (d0, d1) = (ts(day), ts(day + 86_400_000_000));
    let now = ts(a.time_us);
    let template = a.template.unwrap_or(if a.service.is_some() && a.operation.is_some() { 1 } else { 7 });
    match template {
        1 => format!("SELECT sum(quantity) FROM usage WHERE entity_id = {e} AND service = {svc} AND operation = {op} AND event_time >= {d0} AND event_time < {d1}"),
        2 => format!("SELECT date_trunc('hour', event_time) AS hour, operation, sum(quantity) FROM usage WHERE entity_id = {e} AND service = {svc} AND event_time >= {d0} AND event_time < {d1} GROUP BY 1, 2 ORDER BY 1, 2"),
        3 => format!("SELECT service, usage_type, sum(quantity) FROM usage WHERE entity_id = {e} AND event_time >= date_trunc('month', {now}) GROUP BY 1, 2"),
        4 => format!("SELECT sum(quantity) FROM usage WHERE entity_id = {e} AND service = {svc} AND usage_type = 'Requests' AND event_time >= date_trunc('day', {now})"),
        5 => format!("SELECT entity_id, sum(quantity) FROM usage WHERE entity_id IN ({e}) AND event_time >= {d0} GROUP BY 1"),
        6 => format!("SELECT entity_id, sum(quantity) AS q FROM usage WHERE service = {svc} AND event_time >= {d0} AND event_time < {d1} GROUP BY 1 ORDER BY q DESC LIMIT 10"),
        7 => format!("SELECT operation, count(*), sum(quantity) FROM usage WHERE entity_id = {e} AND event_time >= {now} - INTERVAL '1 day' GROUP BY 1 ORDER BY 3 DESC LIMIT 5"),
        8 => format!("SELECT date_trunc('hour', event_time), sum(quantity) FROM usage WHERE service = {svc} AND event_time >= {now} - INTERVAL '7 days' GROUP BY 1 ORDER BY 1"),
        9 => format!("SELECT count(DISTINCT region) FROM usage WHERE entity_id = {e} AND event_time >= date_trunc('month', {now})"),
        _ => format!("SELECT * FROM usage WHERE entity_id = {e} AND service = {svc} AND event_time >= {d0} AND event_time < {d1} ORDER BY event_time LIMIT 100"),
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    /// The connection broke: the query may or may not have run.
    pub unknown: u64,
    pub latency_us: Vec<u64>,
    /// How late the latest query started against its schedule.
    pub lag_max: Duration,
}

impl Summary {
    pub fn percentile_us(&self, p: f64) -> Option<u64> {
        let mut l = self.latency_us.clone();
        l.sort_unstable();
        (!l.is_empty()).then(|| l[((l.len() - 1) as f64 * p).round() as usize])
    }
}

/// Sends `trace` to the node at `url`, query i at `(t_i - t_0) / scale` after the
/// start, over `clients` connections; `progress` is called after each query. `setup`
/// (for example a `SET tidemark.routing_policy`) runs once on each connection first.
pub async fn run(
    url: &str,
    trace: &[Arrival],
    scale: f64,
    clients: usize,
    setup: Option<&str>,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<Summary> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::Config(format!("time scale must be positive, got {scale}")));
    }
    let Some(first) = trace.first() else { return Ok(Summary::default()) };
    let t0 = first.time_us;
    let mut conns = Vec::new();
    for _ in 0..clients.max(1) {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| Error::Config(format!("cannot connect to {url}: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        if let Some(sql) = setup {
            c.batch_execute(sql).await.map_err(|e| Error::Config(format!("{sql}: {e}")))?;
        }
        conns.push(Arc::new(c));
    }
    let (tx, rx) = async_channel(clients.max(1));
    let summary = Arc::new(parking_lot::Mutex::new(Summary::default()));
    let progress = Arc::new(progress);
    let mut workers = Vec::new();
    for c in conns {
        let (rx, summary, progress) = (rx.clone(), Arc::clone(&summary), Arc::clone(&progress));
        workers.push(tokio::spawn(async move {
            while let Ok((sql, due)) = rx.recv().await {
                let lag = Instant::now().saturating_duration_since(due);
                let started = Instant::now();
                let r = c.simple_query(&sql).await;
                let mut s = summary.lock();
                s.sent += 1;
                s.lag_max = s.lag_max.max(lag);
                match r {
                    Ok(_) => {
                        s.ok += 1;
                        s.latency_us.push(started.elapsed().as_micros() as u64);
                    }
                    Err(e) if e.is_closed() || e.as_db_error().is_none() => s.unknown += 1,
                    Err(_) => s.failed += 1,
                }
                let n = s.sent;
                drop(s);
                progress(n);
            }
        }));
    }
    let start = Instant::now();
    for a in trace {
        let due = start + Duration::from_micros(((a.time_us - t0).max(0) as f64 / scale) as u64);
        tokio::time::sleep_until(due.into()).await;
        if tx.send((sql_for(a), due)).await.is_err() {
            break;
        }
    }
    drop(tx);
    for w in workers {
        let _ = w.await;
    }
    let s = summary.lock().clone();
    Ok(s)
}

type Job = (String, Instant);

/// A bounded multi-consumer channel (tokio's mpsc has one consumer).
fn async_channel(cap: usize) -> (Sender, Receiver) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Job>(cap);
    (Sender(tx), Receiver(Arc::new(tokio::sync::Mutex::new(rx))))
}

struct Sender(tokio::sync::mpsc::Sender<Job>);
impl Sender {
    async fn send(&self, j: Job) -> std::result::Result<(), ()> {
        self.0.send(j).await.map_err(|_| ())
    }
}

#[derive(Clone)]
struct Receiver(Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Job>>>);
impl Receiver {
    async fn recv(&self) -> std::result::Result<Job, ()> {
        self.0.lock().await.recv().await.ok_or(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_traces_are_deterministic_and_read_back() {
        let spec = TraceSpec { duration_s: 20.0, days: 1, peak_rate: 100.0, entities: 5000, scenario: "surge".into(), start_us: 1_767_571_200_000_000, seed: 7 };
        let a = generate_trace(&spec).unwrap();
        assert_eq!(a.len(), generate_trace(&spec).unwrap().len());
        assert!(a.len() > 500, "{}", a.len());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        assert_eq!(write_trace(&path, &spec).unwrap(), a.len());
        let back = read_trace(&path).unwrap();
        assert_eq!(back.len(), a.len());
        assert_eq!((back[3].entity_id.as_str(), back[3].template), (a[3].entity_id.as_str(), a[3].template));
        // The surge window is busier per second than the same hours without it.
        let calm = generate_trace(&TraceSpec { scenario: "none".into(), ..spec.clone() }).unwrap();
        let window = |v: &[Arrival]| {
            v.iter().filter(|x| (0.45..0.65).contains(&(((x.time_us - spec.start_us) as f64 / 1e6) / spec.duration_s))).count()
        };
        assert!(window(&a) as f64 > 1.1 * window(&calm) as f64, "{} vs {}", window(&a), window(&calm));
        assert!(generate_trace(&TraceSpec { scenario: "bogus".into(), ..spec.clone() }).is_err());
        assert!(generate_trace(&TraceSpec { days: 0, ..spec.clone() }).is_err());
        // Several days: the cycle repeats, the surge is on the last day only (a busier
        // trace than above, so that the surge stands well out of the Poisson noise).
        let busy = TraceSpec { days: 3, peak_rate: 1000.0, ..spec.clone() };
        let three = generate_trace(&busy).unwrap();
        let day = |v: &[Arrival], d: f64| {
            v.iter()
                .filter(|x| {
                    let t = (x.time_us - spec.start_us) as f64 / 1e6 / spec.duration_s - d;
                    (0.45..0.65).contains(&t)
                })
                .count() as f64
        };
        let (first, second, last) = (day(&three, 0.0), day(&three, 1.0), day(&three, 2.0));
        assert!(last > 1.08 * first.max(second), "surge window of the last day {last} vs the first two {first}, {second}");
        assert!((first - second).abs() < 0.05 * first, "calm days alike: {first} vs {second}");
        assert!(three.windows(2).all(|w| w[0].time_us <= w[1].time_us));
        assert!(three.last().unwrap().time_us < spec.start_us + (3.0 * spec.duration_s * 1e6) as i64);
    }

    use super::*;

    #[test]
    fn csv_traces_parse_and_bad_rows_are_named() {
        let t = read_csv("timestamp,entity_id,service,operation,template\n2026-01-05T10:00:00Z,a,storage,GetObject,\n2026-01-05 09:00:00,b,,,6\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].template, Some(6));
        assert!(sql_for(&t[0]).starts_with("SELECT sum(quantity) FROM usage WHERE entity_id = 'a' AND service = 'storage'"));
        assert!(sql_for(&t[1]).contains("ORDER BY q DESC LIMIT 10"));
        assert!(sql_for(&Arrival { entity_id: "o'brien".into(), ..t[0].clone() }).contains("'o''brien'"));
        for bad in ["entity_id\na\n", "timestamp,entity_id\nyesterday,a\n", "timestamp,entity_id\n2026-01-05T10:00:00Z,\n", "timestamp,entity_id,template\n2026-01-05T10:00:00Z,a,11\n"] {
            assert_eq!(read_csv(bad).unwrap_err().sqlstate(), "22P04", "{bad}");
        }
    }
}

/// A generated query-arrival trace (`tidemark gen-trace`).
#[derive(Debug, Clone)]
pub struct TraceSpec {
    /// Trace seconds of one day of the generator's hourly cycle, compressed.
    pub duration_s: f64,
    /// Days in the trace (at least 1): the cycle repeats, the scenario is on the last
    /// day only (the earlier days are history for the forecaster to learn from).
    pub days: u32,
    /// Queries per second in the busiest hour.
    pub peak_rate: f64,
    pub entities: u32,
    /// `none`, `surge` or `hot`.
    pub scenario: String,
    pub start_us: i64,
    pub seed: u64,
}

/// The arrivals of `spec`: a Poisson process whose rate follows the data generator's
/// hourly cycle (`datagen::HOURLY`) compressed into each day of the trace (`days` of
/// `duration_s` each; the scenario's windows below are those of the last day), entities drawn with the
/// generator's Zipf exponent, templates 1 (80%), 2 and 7 (10% each); `surge` makes 20
/// popular entities (ranks 10 to 2,000) 30 times as busy from 45% to 65% of the trace
/// (the announced campaign), `hot` adds one entity (rank 1,000 to 5,000) at a tenth of
/// the peak rate from 40% to 70% (unannounced). Deterministic from the seed.
pub fn generate_trace(spec: &TraceSpec) -> Result<Vec<Arrival>> {
    use rand::{Rng, SeedableRng};
    if !(spec.duration_s > 0.0 && spec.peak_rate > 0.0 && spec.entities > 0 && spec.days > 0) {
        return Err(Error::InvalidParameter("duration, days, peak rate and entities must be positive".into()));
    }
    let last_day_s = spec.duration_s * (spec.days - 1) as f64;
    let surge = spec.scenario == "surge";
    let hot_on = spec.scenario == "hot";
    if !(surge || hot_on || spec.scenario == "none") {
        return Err(Error::InvalidParameter(format!("unknown scenario {:?} (none, surge, hot)", spec.scenario)));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let n = spec.entities as usize;
    let mut cdf = Vec::with_capacity(n);
    let mut acc = 0.0;
    for r in 0..n {
        acc += 1.0 / ((r + 1) as f64).powf(crate::datagen::ZIPF_EXPONENT);
        cdf.push(acc);
    }
    let share = |r: usize| (cdf[r] - if r == 0 { 0.0 } else { cdf[r - 1] }) / acc;
    let campaign: Vec<usize> = (0..20).map(|_| rng.random_range(10..2000.min(n).max(11))).map(|r| r.min(n - 1)).collect();
    let hot = rng.random_range(1000.min(n - 1)..5000.min(n).max(1000.min(n - 1) + 1)).min(n - 1);
    let peak = crate::datagen::HOURLY.iter().copied().fold(0.0, f64::max);
    let cycle = |t: f64| {
        let h = ((t % spec.duration_s) / spec.duration_s).clamp(0.0, 1.0) * 24.0;
        let (i, f) = ((h.floor() as usize).min(23), h - h.floor());
        let (a, b) = (crate::datagen::HOURLY[i], crate::datagen::HOURLY[(i + 1) % 24]);
        (a + (b - a) * f) / peak
    };
    let surge_share: f64 = campaign.iter().map(|r| share(*r)).sum();
    let max_rate = spec.peak_rate * (1.0 + 29.0 * surge_share) + spec.peak_rate * 0.1;
    let mut out = Vec::new();
    let mut t = 0.0;
    loop {
        t += -rng.random::<f64>().max(1e-12).ln() / max_rate;
        if t >= spec.duration_s * spec.days as f64 {
            break;
        }
        // The scenario's window, on the last day.
        let frac = if t >= last_day_s { (t - last_day_s) / spec.duration_s } else { -1.0 };
        let base = spec.peak_rate * cycle(t);
        let surge_extra = if surge && (0.45..0.65).contains(&frac) { base * 29.0 * surge_share } else { 0.0 };
        let hot_extra = if hot_on && (0.40..0.70).contains(&frac) { spec.peak_rate * 0.1 } else { 0.0 };
        let total = base + surge_extra + hot_extra;
        let u = rng.random::<f64>() * max_rate;
        if u > total {
            continue;
        }
        let rank = if u < hot_extra {
            hot
        } else if u < hot_extra + surge_extra {
            let mut v = (u - hot_extra) / (29.0 * base);
            let mut pick = campaign[0];
            for r in &campaign {
                if v < share(*r) {
                    pick = *r;
                    break;
                }
                v -= share(*r);
            }
            pick
        } else {
            let x = rng.random::<f64>() * acc;
            cdf.partition_point(|c| *c < x).min(n - 1)
        };
        let template = match rng.random_range(0..10) {
            0 => 2,
            1 => 7,
            _ => 1,
        };
        out.push(Arrival {
            time_us: spec.start_us + (t * 1e6) as i64,
            entity_id: crate::datagen::entity_id(rank as u32),
            service: Some("storage".into()),
            operation: Some("GetObject".into()),
            template: Some(template),
        });
    }
    Ok(out)
}

/// Writes the trace of `spec` as CSV; returns the number of arrivals.
pub fn write_trace(path: &Path, spec: &TraceSpec) -> Result<usize> {
    use std::io::Write;
    let arrivals = generate_trace(spec)?;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(w, "timestamp,entity_id,service,operation,template")?;
    for a in &arrivals {
        let t = chrono::DateTime::from_timestamp_micros(a.time_us)
            .ok_or_else(|| Error::InvalidParameter("trace time out of range".into()))?
            .format("%Y-%m-%dT%H:%M:%S%.6fZ");
        writeln!(
            w,
            "{t},{},{},{},{}",
            a.entity_id,
            a.service.as_deref().unwrap_or(""),
            a.operation.as_deref().unwrap_or(""),
            a.template.map(|t| t.to_string()).unwrap_or_default()
        )?;
    }
    w.flush()?;
    Ok(arrivals.len())
}
