//! The forecast loop: query-log entries are counted into patterns as they are logged;
//! on a schedule (in clock time) the busiest series are refitted and their forecasts
//! replace the previous ones, for `system.forecasts` and `system.query_patterns`.
//!
//! Owns: the pattern counter of this node, the latest forecasts, and the loop. Must
//! never: fit on the query path (fits run on the blocking pool, off any statement),
//! or fit more than `series_per_cycle_max` series in one cycle.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::clock::Clock;
use crate::forecast;
use crate::patterns::{Observation, PatternCounter, Scope};
use crate::query_log::QueryLogEntry;

/// Settings of the forecast loop.
#[derive(Debug, Clone)]
pub struct ForecastSettings {
    pub bucket_secs: u64,
    pub history_days: u64,
    pub horizon_hours: u64,
    /// Patterns (entity, service, operation) forecast individually per cycle.
    pub patterns_max: usize,
    /// Distinct patterns counted per bucket before the rest are aggregated.
    pub pattern_keys_per_bucket_max: usize,
    /// Series fitted per cycle at most (total, shards, then the busiest patterns).
    pub series_per_cycle_max: usize,
}

impl Default for ForecastSettings {
    fn default() -> Self {
        ForecastSettings {
            bucket_secs: 300,
            history_days: 28,
            horizon_hours: 24,
            patterns_max: 20,
            pattern_keys_per_bucket_max: 1000,
            series_per_cycle_max: 64,
        }
    }
}

/// One forecast value, as `system.forecasts` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ForecastRow {
    pub scope: &'static str,
    pub key: String,
    pub bucket_start_us: i64,
    pub predicted: f64,
    pub lower80: f64,
    pub upper80: f64,
    pub lower95: f64,
    pub upper95: f64,
    pub model: String,
    pub fitted_at_us: i64,
}

/// One coming interval of a query pattern, as `system.query_patterns` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PatternRow {
    pub entity_id: String,
    pub service: Option<String>,
    pub operation: Option<String>,
    pub interval_start_us: i64,
    pub interval_end_us: i64,
    /// The pattern's share of the predicted total load in the interval.
    pub probability: f64,
    pub expected_queries: f64,
}

/// How well one scope's forecasts at one horizon did, as `system.forecast_accuracy`
/// shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct AccuracyRow {
    pub scope: &'static str,
    pub key: String,
    /// Buckets ahead of the forecast's origin (1 = the next bucket).
    pub horizon_buckets: u32,
    pub points: u64,
    /// Mean absolute error over that of the weekly seasonal naive forecast on the same
    /// buckets (below 1 beats it).
    pub mase: Option<f64>,
    pub wape: Option<f64>,
    pub coverage_80: f64,
    pub coverage_95: f64,
    /// The scope's forecasts are now the weekly seasonal naive forecast, because the
    /// model's next-bucket MASE was above 1.
    pub replaced_by_naive: bool,
}

#[derive(Debug, Default)]
pub struct Forecasts {
    pub rows: Vec<ForecastRow>,
    pub patterns: Vec<PatternRow>,
    pub accuracy: Vec<AccuracyRow>,
}

/// A forecast value waiting for its bucket to complete.
#[derive(Debug, Clone)]
struct Pending {
    scope: Scope,
    horizon_buckets: u32,
    bucket_start_us: i64,
    predicted: f64,
    band80: (f64, f64),
    band95: (f64, f64),
}

#[derive(Debug, Default, Clone)]
struct Acc {
    points: u64,
    abs_err: f64,
    abs_naive: f64,
    abs_actual: f64,
    in80: u64,
    in95: u64,
}

/// Forecast values waiting for their actuals, at most (older ones are dropped).
const PENDING_MAX: usize = 200_000;
/// Next-bucket points a scope needs before its model can be judged worse than naive.
const JUDGE_POINTS_MIN: u64 = 12;

#[derive(Debug, Default)]
struct Tracking {
    pending: std::collections::VecDeque<Pending>,
    acc: std::collections::BTreeMap<(Scope, u32), Acc>,
    replaced: std::collections::BTreeSet<Scope>,
}

/// A known future event (a campaign) that scales the forecast of one scope in a window.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub name: String,
    /// `total`, `shard` or `pattern`.
    pub scope: String,
    /// Empty for `total`; the shard number; or `entity/service/operation` (`*` = any)
    /// for a pattern, as `system.forecasts` spells keys.
    pub key: String,
    pub starts_at_us: i64,
    pub ends_at_us: i64,
    pub multiplier: f64,
    pub created_at_us: i64,
}

/// Events kept at most.
pub const EVENTS_MAX: usize = 10_000;

impl Event {
    /// Checks an event before it is stored: a known scope with a well-formed key, a
    /// window that ends after `now_us` and after it starts, a finite non-negative
    /// multiplier.
    pub fn validate(&self, now_us: i64) -> crate::Result<()> {
        let bad = |m: String| Err(crate::Error::InvalidParameter(format!("event {:?}: {m}", self.name)));
        match self.scope.as_str() {
            "total" if !self.key.is_empty() => return bad("scope total takes no key".into()),
            "total" => {}
            "shard" if self.key.parse::<u32>().is_err() => return bad(format!("shard key must be a shard number, got {:?}", self.key)),
            "shard" => {}
            "pattern" if self.key.split('/').count() != 3 => {
                return bad(format!("pattern key must be entity/service/operation (* for any), got {:?}", self.key))
            }
            "pattern" => {}
            "pipeline" if self.key.parse::<crate::shard_map::PipelineId>().is_err() => {
                return bad(format!("pipeline key must be like n1.p0, got {:?}", self.key))
            }
            "pipeline" => {}
            other => return bad(format!("unknown scope {other:?} (use total, shard, pipeline or pattern)")),
        }
        if self.ends_at_us <= self.starts_at_us {
            return bad("ends_at must be after starts_at".into());
        }
        if self.ends_at_us <= now_us {
            return bad("the event is in the past".into());
        }
        if !self.multiplier.is_finite() || self.multiplier < 0.0 {
            return bad(format!("multiplier must be a non-negative number, got {}", self.multiplier));
        }
        if self.name.trim().is_empty() {
            return bad("name must not be empty".into());
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Forecaster {
    settings: ForecastSettings,
    counter: Mutex<PatternCounter>,
    latest: RwLock<Arc<Forecasts>>,
    tracking: Mutex<Tracking>,
    events: RwLock<Vec<Event>>,
    /// Where events are persisted (None in tests that do not need it).
    events_file: Option<std::path::PathBuf>,
}

impl Forecaster {
    pub fn new(settings: ForecastSettings) -> Forecaster {
        let buckets = (settings.history_days * 86_400 / settings.bucket_secs.max(1)) as usize + 1;
        let counter = PatternCounter::new(settings.bucket_secs, buckets, settings.pattern_keys_per_bucket_max);
        Forecaster {
            settings,
            counter: Mutex::new(counter),
            latest: RwLock::default(),
            tracking: Mutex::default(),
            events: RwLock::default(),
            events_file: None,
        }
    }

    /// Keeps events in `path` (JSON, replaced atomically) and loads those already there.
    pub fn with_events_file(mut self, path: std::path::PathBuf) -> crate::Result<Forecaster> {
        if path.exists() {
            let text = std::fs::read(&path)?;
            let events: Vec<Event> = serde_json::from_slice(&text)
                .map_err(|e| crate::Error::Corrupt(format!("{}: {e}", path.display())))?;
            *self.events.write() = events;
        }
        self.events_file = Some(path);
        Ok(self)
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.read().clone()
    }

    fn persist(&self, events: &[Event]) -> crate::Result<()> {
        if let Some(path) = &self.events_file {
            let bytes = serde_json::to_vec_pretty(events).map_err(|e| crate::Error::Internal(e.to_string()))?;
            crate::fsutil::write_file_durably(path, &bytes)?;
        }
        Ok(())
    }

    /// Adds events after validating all of them (all or nothing).
    pub fn add_events(&self, new: Vec<Event>, now_us: i64) -> crate::Result<u64> {
        for e in &new {
            e.validate(now_us)?;
        }
        let mut events = self.events.write();
        if events.len() + new.len() > EVENTS_MAX {
            return Err(crate::Error::QueueFull { what: "system.events", limit: EVENTS_MAX as u64, unit: "events" });
        }
        let mut next = events.clone();
        next.extend(new.iter().cloned());
        self.persist(&next)?;
        *events = next;
        Ok(new.len() as u64)
    }

    /// Removes the events `doomed` says to remove; returns how many.
    pub fn remove_events(&self, doomed: impl Fn(usize, &Event) -> bool) -> crate::Result<u64> {
        let mut events = self.events.write();
        let next: Vec<Event> = events.iter().enumerate().filter(|(i, e)| !doomed(*i, e)).map(|(_, e)| e.clone()).collect();
        let removed = (events.len() - next.len()) as u64;
        if removed > 0 {
            self.persist(&next)?;
            *events = next;
        }
        Ok(removed)
    }

    /// The latest forecasts with the known events applied: a value in an event's
    /// window for its scope and key is multiplied by the event's multiplier (several
    /// events multiply). Pattern rows scale their expected queries the same way.
    pub fn adjusted(&self) -> Arc<Forecasts> {
        let latest = self.latest();
        let events = self.events.read();
        if events.is_empty() {
            return latest;
        }
        let factor = |scope: &str, key: &str, t: i64| -> f64 {
            events
                .iter()
                .filter(|e| e.scope == scope && e.key == key && t >= e.starts_at_us && t < e.ends_at_us)
                .map(|e| e.multiplier)
                .product()
        };
        let rows = latest
            .rows
            .iter()
            .map(|r| {
                let f = factor(r.scope, &r.key, r.bucket_start_us);
                ForecastRow {
                    predicted: r.predicted * f,
                    lower80: r.lower80 * f,
                    upper80: r.upper80 * f,
                    lower95: r.lower95 * f,
                    upper95: r.upper95 * f,
                    ..r.clone()
                }
            })
            .collect();
        let patterns = latest
            .patterns
            .iter()
            .map(|p| {
                let key = format!("{}/{}/{}", p.entity_id, p.service.as_deref().unwrap_or("*"), p.operation.as_deref().unwrap_or("*"));
                let f = factor("pattern", &key, p.interval_start_us);
                PatternRow { expected_queries: p.expected_queries * f, ..p.clone() }
            })
            .collect();
        Arc::new(Forecasts { rows, patterns, accuracy: latest.accuracy.clone() })
    }

    pub fn observe(&self, o: &Observation<'_>) {
        self.counter.lock().observe(o);
    }

    /// Counts a fragment routed to `pipeline` at `t_us` (the pipeline scope).
    pub fn observe_fragment(&self, t_us: i64, pipeline: &str) {
        self.counter.lock().observe_fragment(t_us, pipeline);
    }

    /// Counts a logged statement that read a table (others put no load on shards).
    pub fn observe_entry(&self, e: &QueryLogEntry) {
        if e.tables.is_empty() {
            return;
        }
        let entity = match &e.entity_ids {
            Some(v) if v.len() == 1 => Some(v[0].as_str()),
            _ => None,
        };
        self.observe(&Observation {
            start_us: e.start_time_us,
            shards: &e.shards,
            entity,
            service: e.service.as_deref(),
            operation: e.operation.as_deref(),
            busy_us: e.duration_us,
            rows: e.rows,
        });
    }

    pub fn latest(&self) -> Arc<Forecasts> {
        Arc::clone(&self.latest.read())
    }

    /// Refits the busiest series with history up to the last whole bucket before
    /// `now_us` and publishes their forecasts; returns how many series were fitted.
    pub fn run_once(&self, now_us: i64) -> usize {
        let s = &self.settings;
        let (bucket_us, last, scopes, histories, replaced) = {
            let c = self.counter.lock();
            let bucket_us = c.bucket_us();
            let last = c.bucket_start(now_us) - bucket_us;
            if c.newest().is_none() {
                return 0;
            }
            let history_max = (s.history_days * 86_400 / s.bucket_secs.max(1)) as usize;
            let since = last - (history_max as i64 - 1) * bucket_us;
            let mut scopes = c.scopes(since, s.patterns_max);
            scopes.truncate(s.series_per_cycle_max);
            // Every series starts where the node's history starts (the first bucket
            // with any query), so a quiet scope keeps its zeros but not the weeks
            // before the node existed.
            let total_first = c.series(&Scope::Total, last, history_max).iter().position(|v| *v > 0.0).unwrap_or(history_max);
            let histories: Vec<Vec<f64>> = scopes.iter().map(|scope| c.series(scope, last, history_max)[total_first..].to_vec()).collect();
            // Actuals for forecasts whose buckets are complete (up to `last`).
            let mut t = self.tracking.lock();
            let week = 7 * 86_400_000_000 / bucket_us;
            let mut keep = std::collections::VecDeque::new();
            for p in t.pending.drain(..).collect::<Vec<_>>() {
                if p.bucket_start_us > last {
                    keep.push_back(p);
                    continue;
                }
                let actual = c.series(&p.scope, p.bucket_start_us, 1)[0];
                let naive = c.series(&p.scope, p.bucket_start_us - week * bucket_us, 1)[0];
                let a = t.acc.entry((p.scope.clone(), p.horizon_buckets)).or_default();
                a.points += 1;
                a.abs_err += (actual - p.predicted).abs();
                a.abs_naive += (actual - naive).abs();
                a.abs_actual += actual.abs();
                a.in80 += u64::from(actual >= p.band80.0 && actual <= p.band80.1);
                a.in95 += u64::from(actual >= p.band95.0 && actual <= p.band95.1);
            }
            t.pending = keep;
            let judged: Vec<Scope> = t
                .acc
                .iter()
                .filter(|((_, h), a)| *h == 1 && a.points >= JUDGE_POINTS_MIN && a.abs_err > a.abs_naive)
                .map(|((scope, _), _)| scope.clone())
                .collect();
            t.replaced.extend(judged);
            let replaced = t.replaced.clone();
            drop(t);
            (bucket_us, last, scopes, histories, replaced)
        };
        let horizon = (s.horizon_hours * 3600 / s.bucket_secs.max(1)) as usize;
        let mut rows = Vec::new();
        let mut totals: Vec<f64> = Vec::new();
        let mut pattern_preds: Vec<(crate::patterns::PatternKey, forecast::Prediction)> = Vec::new();
        let (_, week_buckets) = forecast::periods(s.bucket_secs);
        let step_hour = ((3600 / s.bucket_secs.max(1)) as usize).max(1);
        let track_at: Vec<usize> = {
            let mut v = vec![1, step_hour, horizon];
            v.retain(|h| *h >= 1 && *h <= horizon);
            v.sort_unstable();
            v.dedup();
            v
        };
        let mut new_pending = Vec::new();
        for (scope, history) in scopes.iter().zip(&histories) {
            let mut p = forecast::predict(history, s.bucket_secs, horizon);
            if replaced.contains(scope) && history.len() >= week_buckets {
                let was = p.model.name();
                p = forecast::seasonal_naive_prediction(history, week_buckets, horizon);
                tracing::debug!(?scope, replaced = %was, "forecast replaced by weekly seasonal naive");
            }
            for h in &track_at {
                new_pending.push(Pending {
                    scope: scope.clone(),
                    horizon_buckets: *h as u32,
                    bucket_start_us: last + *h as i64 * bucket_us,
                    predicted: p.point[h - 1],
                    band80: (p.lower80[h - 1], p.upper80[h - 1]),
                    band95: (p.lower95[h - 1], p.upper95[h - 1]),
                });
            }
            let (scope_name, key) = scope_label(scope);
            for h in 0..horizon {
                rows.push(ForecastRow {
                    scope: scope_name,
                    key: key.clone(),
                    bucket_start_us: last + (h as i64 + 1) * bucket_us,
                    predicted: p.point[h],
                    lower80: p.lower80[h],
                    upper80: p.upper80[h],
                    lower95: p.lower95[h],
                    upper95: p.upper95[h],
                    model: p.model.name(),
                    fitted_at_us: now_us,
                });
            }
            match scope {
                Scope::Total => totals = p.point.clone(),
                Scope::Pattern(k) => pattern_preds.push((k.clone(), p)),
                Scope::Shard(_) | Scope::Pipeline(_) => {}
            }
        }
        let mut patterns = Vec::new();
        for ((entity, service, operation), p) in pattern_preds {
            for h in 0..horizon {
                let total = totals.get(h).copied().unwrap_or(0.0);
                let expected = p.point[h];
                let start = last + (h as i64 + 1) * bucket_us;
                patterns.push(PatternRow {
                    entity_id: entity.clone(),
                    service: service.clone(),
                    operation: operation.clone(),
                    interval_start_us: start,
                    interval_end_us: start + bucket_us,
                    probability: if total > 0.0 { (expected / total).min(1.0) } else { 0.0 },
                    expected_queries: expected,
                });
            }
        }
        let accuracy = {
            let mut t = self.tracking.lock();
            t.pending.extend(new_pending);
            while t.pending.len() > PENDING_MAX {
                t.pending.pop_front();
            }
            let replaced = t.replaced.clone();
            t.acc
                .iter()
                .map(|((scope, h), a)| {
                    let (scope_name, key) = scope_label(scope);
                    AccuracyRow {
                        scope: scope_name,
                        key,
                        horizon_buckets: *h,
                        points: a.points,
                        mase: match (a.abs_naive > 0.0, a.abs_err > 0.0) {
                            (true, _) => Some(a.abs_err / a.abs_naive),
                            (false, true) => Some(f64::INFINITY),
                            (false, false) => None,
                        },
                        wape: (a.abs_actual > 0.0).then(|| a.abs_err / a.abs_actual),
                        coverage_80: a.in80 as f64 / a.points.max(1) as f64,
                        coverage_95: a.in95 as f64 / a.points.max(1) as f64,
                        replaced_by_naive: replaced.contains(scope),
                    }
                })
                .collect()
        };
        let fitted = scopes.len();
        *self.latest.write() = Arc::new(Forecasts { rows, patterns, accuracy });
        fitted
    }
}

/// The scope's name and key as the system tables show them.
fn scope_label(scope: &Scope) -> (&'static str, String) {
    match scope {
        Scope::Total => ("total", String::new()),
        Scope::Shard(n) => ("shard", n.to_string()),
        Scope::Pipeline(p) => ("pipeline", p.clone()),
        Scope::Pattern((e, sv, op)) => {
            ("pattern", format!("{e}/{}/{}", sv.as_deref().unwrap_or("*"), op.as_deref().unwrap_or("*")))
        }
    }
}

/// Runs [`Forecaster::run_once`] every `interval` of clock time, on the blocking pool.
pub fn spawn(forecaster: Arc<Forecaster>, clock: Clock, interval: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            clock.sleep(interval).await;
            let f = Arc::clone(&forecaster);
            let now = clock.now_us();
            let started = std::time::Instant::now();
            match tokio::task::spawn_blocking(move || f.run_once(now)).await {
                Ok(n) => tracing::debug!(series = n, ms = started.elapsed().as_millis() as u64, "forecasts refitted"),
                Err(e) => tracing::warn!(error = %e, "forecast cycle failed"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three weeks of hourly traffic peaking at 14:00 UTC; the forecast's peak hour
    /// for tomorrow is 14:00, and the busy entity's pattern has most of the load.
    #[test]
    fn forecast_peaks_where_the_history_peaks() {
        let settings = ForecastSettings { bucket_secs: 3600, history_days: 28, horizon_hours: 24, ..Default::default() };
        let f = Forecaster::new(settings);
        let day0 = 1_767_571_200_000_000i64; // 2026-01-05T00:00:00Z
        for h in 0..(21 * 24) {
            let hour = h % 24;
            let n = 5 + if (12..=16).contains(&hour) { 30 - 6 * (hour as i64 - 14).abs() } else { 0 };
            for q in 0..n {
                f.observe(&Observation {
                    start_us: day0 + h as i64 * 3_600_000_000 + q * 1000,
                    shards: &[q as u32 % 4],
                    entity: Some(if q % 5 == 0 { "small" } else { "busy" }),
                    service: Some("storage"),
                    operation: None,
                    busy_us: 500,
                    rows: 1,
                });
            }
        }
        let now = day0 + 21 * 86_400_000_000 + 60_000_000;
        assert!(f.run_once(now) >= 1 + 4 + 2);
        let latest = f.latest();
        let total: Vec<&ForecastRow> = latest.rows.iter().filter(|r| r.scope == "total").collect();
        assert_eq!(total.len(), 24);
        assert!(total[0].model.starts_with("mstl"), "{}", total[0].model);
        let peak = total.iter().max_by(|a, b| a.predicted.total_cmp(&b.predicted)).unwrap();
        assert_eq!((peak.bucket_start_us / 3_600_000_000) % 24, 14, "{peak:?}");
        let busy: f64 = latest.patterns.iter().filter(|p| p.entity_id == "busy").map(|p| p.probability).sum::<f64>() / 24.0;
        assert!((0.7..0.9).contains(&busy), "busy's share {busy}");
        assert!(latest.rows.iter().any(|r| r.scope == "shard" && r.key == "3"));
    }

    /// Twelve days of history (no weekly model yet) that are busy on weekdays and quiet
    /// at weekends: the daily-only model overshoots the weekend, the weekly seasonal
    /// naive forecast does not, so after a dozen hours the scope is replaced by it.
    #[test]
    fn a_forecast_worse_than_seasonal_naive_is_replaced() {
        let settings = ForecastSettings { bucket_secs: 3600, horizon_hours: 24, ..Default::default() };
        let f = Forecaster::new(settings);
        let day0 = 1_767_571_200_000_000i64; // Monday 2026-01-05
        let hour = 3_600_000_000i64;
        let load = |h: i64| if (h / 24) % 7 >= 5 { 2 + (h / 168) % 2 } else { 20 };
        let observe = |h: i64| {
            for q in 0..load(h) {
                f.observe(&Observation { start_us: day0 + h * hour + q, shards: &[0], entity: Some("e"), ..Default::default() });
            }
        };
        for h in 0..12 * 24 {
            observe(h);
        }
        for h in 12 * 24..14 * 24 {
            f.run_once(day0 + h * hour + 1);
            observe(h);
        }
        f.run_once(day0 + 14 * 24 * hour + 1);
        let latest = f.latest();
        let total = latest.accuracy.iter().find(|a| a.scope == "total" && a.horizon_buckets == 1).expect("accuracy row");
        assert!(total.points >= 24, "{total:?}");
        assert!(total.mase.unwrap() > 1.0, "{total:?}");
        assert!(total.replaced_by_naive, "{total:?}");
        let models: std::collections::BTreeSet<&str> =
            latest.rows.iter().filter(|r| r.scope == "total").map(|r| r.model.as_str()).collect();
        assert_eq!(models.into_iter().collect::<Vec<_>>(), vec!["seasonal_naive[168]"]);
        // Horizons tracked: next bucket, next hour (the same here) and a day ahead.
        assert!(latest.accuracy.iter().any(|a| a.horizon_buckets == 24));
    }

    #[test]
    fn nothing_to_fit_is_not_an_error() {
        let f = Forecaster::new(ForecastSettings::default());
        assert_eq!(f.run_once(1_767_571_200_000_000), 0);
        assert!(f.latest().rows.is_empty());
    }
}
