//! Autoscale: how many pipelines the coming load needs, decided ahead of it.
//!
//! Owns: the decision core for three modes, as pure state machines over explicit
//! inputs (times in microseconds, rates in fragments per second): `predictive` (from the
//! forecast's upper bound), `reactive` (from the load measured in the last interval)
//! and `fixed` (a fleet sized once). No IO, no clock; a thin loop (not yet in the node:
//! see the README) feeds it and acts on its [`Decision`]s, and `tidemark simulate`
//! runs it against the other modes.
//!
//! # The predictive rule (after P-Store, SIGMOD'18: reconfigure before the predicted
//! peak, not after it)
//! - A pipeline serves `capacity` fragments per second (its slots over its measured
//!   service time); the fleet should run at most `target_utilization` of that, so a
//!   rate `r` needs `ceil(r / (capacity · target_utilization))` pipelines.
//! - A pipeline started now is useful only after its warm-up (`warmup_us`, measured on
//!   the node: start, shard copies, cache prefetch), and the next decision comes one
//!   `interval_us` later. So at each decision the fleet is sized for the highest
//!   forecast upper bound in `[now, now + warmup + interval]`: pipelines start early
//!   enough to be warm when the load arrives.
//! - Hysteresis: the fleet grows at once, but shrinks only after `down_after`
//!   consecutive decisions that wanted fewer, and only to what the same look-ahead
//!   window needs, so a dip between two peaks does not stop pipelines that are needed
//!   again before a new one could warm up.
//!
//! The reactive rule sizes the fleet for the rate measured over the last interval with
//! the same utilization target and hysteresis: it can only start pipelines after the
//! load arrived, and they serve only after their warm-up.

/// The scaler's fixed inputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleSettings {
    /// Fragments per second one pipeline serves at full utilization.
    pub capacity: f64,
    pub target_utilization: f64,
    pub warmup_us: i64,
    pub interval_us: i64,
    pub min: usize,
    pub max: usize,
    /// Consecutive decisions wanting fewer pipelines before the fleet shrinks.
    pub down_after: u32,
}

impl ScaleSettings {
    /// Pipelines that serve `rate` at the target utilization.
    pub fn needed(&self, rate: f64) -> usize {
        let per = (self.capacity * self.target_utilization).max(1e-9);
        ((rate.max(0.0) / per).ceil() as usize).clamp(self.min.max(1), self.max.max(1))
    }
}

/// One forecast bucket: `[start_us, end_us)` with the upper bound of its rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ForecastBucket {
    pub start_us: i64,
    pub end_us: i64,
    /// Upper bound (for example the 80% interval's) of fragments per second.
    pub upper_rate: f64,
}

/// The highest upper bound among `forecast`'s buckets that overlap `[from_us, to_us)`,
/// or None when none does.
pub fn peak_within(forecast: &[ForecastBucket], from_us: i64, to_us: i64) -> Option<f64> {
    forecast
        .iter()
        .filter(|b| b.end_us > from_us && b.start_us < to_us)
        .map(|b| b.upper_rate)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))))
}

/// Grow at once, shrink only after `down_after` consecutive decisions that wanted
/// fewer: the target for `needed` when `current` runs, with `wanted_fewer` the count of
/// such decisions so far (updated).
pub fn hysteresis(needed: usize, current: usize, wanted_fewer: &mut u32, down_after: u32) -> usize {
    if needed >= current {
        *wanted_fewer = 0;
        return needed;
    }
    *wanted_fewer += 1;
    if *wanted_fewer >= down_after {
        *wanted_fewer = 0;
        needed
    } else {
        current
    }
}

/// How the fleet is sized.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Predictive,
    Reactive,
    Fixed(usize),
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Predictive => "predictive",
            Mode::Reactive => "reactive",
            Mode::Fixed(_) => "fixed",
        }
    }
}

/// What one decision said, as `system.scaling_decisions` would show it.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub at_us: i64,
    pub mode: &'static str,
    pub current: usize,
    pub target: usize,
    /// The rate the target was sized for.
    pub sized_for_rate: f64,
    pub reason: String,
}

/// The scaler's state between decisions.
#[derive(Clone, Debug)]
pub struct Autoscaler {
    pub settings: ScaleSettings,
    pub mode: Mode,
    wanted_fewer: u32,
}

impl Autoscaler {
    pub fn new(settings: ScaleSettings, mode: Mode) -> Autoscaler {
        Autoscaler { settings, mode, wanted_fewer: 0 }
    }

    /// One decision at `now_us` for a fleet of `current` pipelines, from the forecast
    /// (predictive) or the rate measured over the last interval (reactive).
    pub fn decide(&mut self, now_us: i64, current: usize, forecast: &[ForecastBucket], measured_rate: f64) -> Decision {
        let s = self.settings;
        let (rate, why) = match self.mode {
            Mode::Fixed(n) => {
                return Decision {
                    at_us: now_us,
                    mode: "fixed",
                    current,
                    target: n,
                    sized_for_rate: 0.0,
                    reason: format!("fixed fleet of {n}"),
                };
            }
            Mode::Predictive => {
                let horizon = now_us + s.warmup_us + s.interval_us;
                match peak_within(forecast, now_us, horizon) {
                    Some(r) => (r, format!("forecast upper bound {r:.0}/s within warm-up + interval ({} ms)", (horizon - now_us) / 1000)),
                    // No forecast for the window: hold what runs, as a reactive
                    // scaler would with no signal.
                    None => (measured_rate, format!("no forecast for the next {} ms: measured {measured_rate:.0}/s", (horizon - now_us) / 1000)),
                }
            }
            Mode::Reactive => (measured_rate, format!("measured {measured_rate:.0}/s over the last interval")),
        };
        let needed = s.needed(rate);
        let target = hysteresis(needed, current, &mut self.wanted_fewer, s.down_after);
        let reason = match target.cmp(&current) {
            std::cmp::Ordering::Greater => format!("{why}: needs {needed}, start {}", target - current),
            std::cmp::Ordering::Less => format!("{why}: needs {needed} for {} decisions, stop {}", s.down_after, current - target),
            std::cmp::Ordering::Equal if needed < current => format!("{why}: needs {needed}, holding ({}/{} decisions)", self.wanted_fewer, s.down_after),
            std::cmp::Ordering::Equal => format!("{why}: needs {needed}"),
        };
        Decision { at_us: now_us, mode: self.mode.as_str(), current, target, sized_for_rate: rate, reason }
    }
}

/// `START_MS-END_MS=RATE`, as the fixtures write a forecast bucket.
#[cfg(test)]
pub(crate) fn fixture_bucket(text: &str) -> ForecastBucket {
    let (span, rate) = text.split_once('=').expect("START_MS-END_MS=RATE");
    let (a, z) = span.split_once('-').expect("START_MS-END_MS");
    ForecastBucket { start_us: a.parse::<i64>().unwrap() * 1000, end_us: z.parse::<i64>().unwrap() * 1000, upper_rate: rate.parse().unwrap() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `testdata/autoscale.txt`: `settings capacity=C util=U warmup_ms=W interval_ms=I
    /// min=A max=B down_after=D`, `mode predictive|reactive|fixed N`, `forecast
    /// START_MS-END_MS=RATE ...`, `decide AT_MS CURRENT MEASURED => TARGET`.
    #[test]
    fn autoscale_fixture() {
        let mut scaler: Option<Autoscaler> = None;
        let mut settings = None;
        let mut forecast = Vec::new();
        let mut checked = 0;
        for d in crate::fixture::directives("autoscale.txt") {
            let (n, line, want) = (d.line - 1, d.text.as_str(), d.want.as_deref());
            let w: Vec<&str> = d.words.iter().map(String::as_str).collect();
            let kv = |k: &str| -> f64 {
                w.iter().find_map(|x| x.strip_prefix(&format!("{k}="))).unwrap_or_else(|| panic!("line {}: {k}", n + 1)).parse().unwrap()
            };
            match w[0] {
                "settings" => {
                    settings = Some(ScaleSettings {
                        capacity: kv("capacity"),
                        target_utilization: kv("util"),
                        warmup_us: kv("warmup_ms") as i64 * 1000,
                        interval_us: kv("interval_ms") as i64 * 1000,
                        min: kv("min") as usize,
                        max: kv("max") as usize,
                        down_after: kv("down_after") as u32,
                    })
                }
                "mode" => {
                    let mode = match w[1] {
                        "predictive" => Mode::Predictive,
                        "reactive" => Mode::Reactive,
                        "fixed" => Mode::Fixed(w[2].parse().unwrap()),
                        other => panic!("line {}: mode {other}", n + 1),
                    };
                    scaler = Some(Autoscaler::new(settings.expect("settings first"), mode));
                }
                "forecast" => forecast = w[1..].iter().map(|b| fixture_bucket(b)).collect(),
                "decide" => {
                    let d = scaler.as_mut().expect("mode first").decide(
                        w[1].parse::<i64>().unwrap() * 1000,
                        w[2].parse().unwrap(),
                        &forecast,
                        w[3].parse().unwrap(),
                    );
                    assert_eq!(d.target.to_string(), want.unwrap(), "line {}: {line} ({})", n + 1, d.reason);
                    checked += 1;
                }
                other => panic!("line {}: unknown directive {other}", n + 1),
            }
        }
        assert!(checked >= 8, "{checked} checks");
    }
}
