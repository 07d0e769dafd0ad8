//! The balancer's feedback: what each pipeline's fragments actually took, turned into
//! the service-time weight the router's predictive score multiplies by.
//!
//! Owns: one [`ServiceEstimate`] per pipeline and the rule that turns the fleet's
//! estimates into weights ([`weights`]). Pure: no IO, no clock (times are inputs, in
//! microseconds of a monotonic clock), deterministic.
//!
//! # The rule
//! - After each fragment, its observed service time `x` (from the moment it got a slot
//!   to the end of its stream; for a remote pipeline, the whole round trip, queueing at
//!   the other node included) updates the pipeline's estimate `e ← e + α (x − e)` with
//!   `α = 0.05` (the first sample sets it): an exponentially weighted mean over about
//!   the last twenty fragments. A pipeline that became ten times slower is weighted
//!   three times after five fragments and about seven times after twenty, which at the
//!   rates a pipeline serves is well under a second. (With `α = 0.2` the estimate's own
//!   noise on exponential service times, about a third, made predictive routing lose
//!   to least-in-flight in `tidemark simulate`; see the README.)
//! - Its weight is `e` over the median estimate of the fleet (pipelines observed in the
//!   last [`STALE_US`]), taken as 1 within [`DEAD_BAND`] of the median (noise, not a
//!   difference between pipelines), and clamped to [[`WEIGHT_MIN`], [`WEIGHT_MAX`]]:
//!   relative, so a workload that is slow everywhere (larger queries) changes no
//!   choice, and bounded, so one pipeline can neither attract everything nor be shut
//!   out by an outlier.
//! - Probing, as Prequal does so that a penalised pipeline is not starved forever: a
//!   weight relaxes towards 1 with a half-life of [`FORGET_HALF_LIFE_US`] while its
//!   pipeline gets no fragment. A pipeline that was slow is therefore chosen again after
//!   a few seconds; the fragment it then runs is the probe: if it is still slow, its
//!   estimate (which did not relax) keeps it penalised, and if it recovered, fast
//!   samples bring its weight back to 1 within about thirty fragments.

/// Smoothing of the service-time estimate (per fragment).
pub const ALPHA: f64 = 0.05;
/// Bounds of a weight.
pub const WEIGHT_MIN: f64 = 0.25;
pub const WEIGHT_MAX: f64 = 8.0;
/// Half-life of a weight's return towards 1 while its pipeline gets no fragment.
pub const FORGET_HALF_LIFE_US: i64 = 2_000_000;
/// Ratios to the median within [1/DEAD_BAND, DEAD_BAND] count as 1.
pub const DEAD_BAND: f64 = 1.5;
/// Estimates older than this do not count in the fleet's median.
pub const STALE_US: i64 = 60_000_000;

/// What one pipeline's fragments took recently.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ServiceEstimate {
    /// Smoothed service time of one fragment, in microseconds.
    pub mean_us: f64,
    pub samples: u64,
    /// When the last sample came (monotonic microseconds).
    pub last_us: i64,
}

impl ServiceEstimate {
    /// One fragment took `service_us`, ending at `now_us`.
    pub fn observe(&mut self, service_us: f64, now_us: i64) {
        let x = service_us.max(1.0);
        self.mean_us = if self.samples == 0 { x } else { self.mean_us + ALPHA * (x - self.mean_us) };
        self.samples += 1;
        self.last_us = now_us;
    }
}

/// The fleet's median service time (µs; `None` before any sample) and each pipeline's
/// weight at `now_us`, in the order of `estimates`.
pub fn weights(estimates: &[ServiceEstimate], now_us: i64) -> (Option<f64>, Vec<f64>) {
    let mut fresh: Vec<f64> = estimates
        .iter()
        .filter(|e| e.samples > 0 && now_us - e.last_us <= STALE_US)
        .map(|e| e.mean_us)
        .collect();
    if fresh.is_empty() {
        return (None, vec![1.0; estimates.len()]);
    }
    fresh.sort_by(f64::total_cmp);
    let median = if fresh.len() % 2 == 1 {
        fresh[fresh.len() / 2]
    } else {
        (fresh[fresh.len() / 2 - 1] + fresh[fresh.len() / 2]) / 2.0
    };
    let ws = estimates
        .iter()
        .map(|e| {
            if e.samples == 0 {
                return 1.0;
            }
            let raw = (e.mean_us / median).clamp(WEIGHT_MIN, WEIGHT_MAX);
            // Noise of the estimate itself (about a third on exponential service times)
            // is not a difference between pipelines.
            let raw = if (1.0 / DEAD_BAND..=DEAD_BAND).contains(&raw) { 1.0 } else { raw };
            let idle = (now_us - e.last_us).max(0) as f64;
            let keep = 0.5f64.powf(idle / FORGET_HALF_LIFE_US as f64);
            1.0 + (raw - 1.0) * keep
        })
        .collect();
    (Some(median), ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `testdata/balancer.txt`: `observe P US AT` feeds a sample; `weights AT => P=W ...`
    /// checks every weight (to 2 decimals); `median AT => US`.
    #[test]
    fn balancer_fixture() {
        let mut est: Vec<ServiceEstimate> = Vec::new();
        let mut checked = 0;
        for d in crate::fixture::directives("balancer.txt") {
            let (n, line, want) = (d.line - 1, d.text.as_str(), d.want.as_deref());
            let w: Vec<&str> = d.words.iter().map(String::as_str).collect();
            match w[0] {
                "pipelines" => est = vec![ServiceEstimate::default(); w[1].parse().unwrap()],
                "observe" => {
                    let (p, us, at): (usize, f64, i64) = (w[1].parse().unwrap(), w[2].parse().unwrap(), w[3].parse().unwrap());
                    let times: usize = w.get(4).map(|t| t.trim_start_matches('x').parse().unwrap()).unwrap_or(1);
                    for _ in 0..times {
                        est[p].observe(us, at);
                    }
                }
                "weights" => {
                    let (_, ws) = weights(&est, w[1].parse().unwrap());
                    let got: Vec<String> = ws.iter().enumerate().map(|(i, w)| format!("{i}={w:.2}")).collect();
                    assert_eq!(got.join(" "), want.unwrap(), "line {}: {line}", n + 1);
                    checked += 1;
                }
                "median" => {
                    let (m, _) = weights(&est, w[1].parse().unwrap());
                    let got = m.map(|m| format!("{m:.0}")).unwrap_or_else(|| "none".into());
                    assert_eq!(got, want.unwrap(), "line {}: {line}", n + 1);
                    checked += 1;
                }
                other => panic!("line {}: unknown directive {other}", n + 1),
            }
        }
        assert!(checked >= 5, "{checked} checks");
    }
}
