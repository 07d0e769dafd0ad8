//! The clock every time-based part of Tidemark reads.
//!
//! Owns: "what time is it" for ingest times, query-log timestamps, routing records and
//! background loops, and how long a loop sleeps for a span of clock time. Must never:
//! be bypassed by reading the system clock elsewhere.
//!
//! Three kinds: real time; a fixed instant (tests); and an accelerated clock for demos,
//! tests and replays, where one real second is `scale` clock seconds, starting at a
//! chosen instant so that a replayed trace's timestamps line up with it.

use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Clock {
    inner: Arc<ClockKind>,
}

#[derive(Debug)]
enum ClockKind {
    Real,
    /// Fixed instant, for tests.
    Fixed(i64),
    /// `start_us` at `origin`, then `scale` clock microseconds per real microsecond.
    Accelerated { start_us: i64, origin: Instant, scale: f64 },
}

fn system_now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Clock {
    pub fn real() -> Clock {
        Clock { inner: Arc::new(ClockKind::Real) }
    }

    pub fn fixed(now_us: i64) -> Clock {
        Clock { inner: Arc::new(ClockKind::Fixed(now_us)) }
    }

    /// A clock that runs `scale` times faster than real time from `start_us` (now, if
    /// None). `scale` must be positive and finite.
    pub fn accelerated(start_us: Option<i64>, scale: f64) -> crate::Result<Clock> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(crate::Error::Config(format!("time scale must be a positive number, got {scale}")));
        }
        let start_us = start_us.unwrap_or_else(system_now_us);
        Ok(Clock { inner: Arc::new(ClockKind::Accelerated { start_us, origin: Instant::now(), scale }) })
    }

    /// From the `--time-scale` / `--clock-start` settings: real time when the scale is 1
    /// and no start is given.
    pub fn from_settings(scale: f64, start_us: Option<i64>) -> crate::Result<Clock> {
        if scale == 1.0 && start_us.is_none() {
            return Ok(Clock::real());
        }
        Clock::accelerated(start_us, scale)
    }

    /// Microseconds since the Unix epoch, UTC.
    pub fn now_us(&self) -> i64 {
        match *self.inner {
            ClockKind::Real => system_now_us(),
            ClockKind::Fixed(t) => t,
            ClockKind::Accelerated { start_us, origin, scale } => {
                start_us + (origin.elapsed().as_micros() as f64 * scale) as i64
            }
        }
    }

    /// Clock microseconds per real microsecond (1 for real time).
    pub fn scale(&self) -> f64 {
        match *self.inner {
            ClockKind::Accelerated { scale, .. } => scale,
            _ => 1.0,
        }
    }

    /// The real time that `clock_span` of this clock's time takes (at least 1 ms, so a
    /// loop at a very high scale still yields).
    pub fn real_duration(&self, clock_span: Duration) -> Duration {
        match *self.inner {
            ClockKind::Fixed(_) => clock_span,
            _ => clock_span.div_f64(self.scale()).max(Duration::from_millis(1)),
        }
    }

    /// Sleeps for `clock_span` of this clock's time.
    pub async fn sleep(&self, clock_span: Duration) {
        tokio::time::sleep(self.real_duration(clock_span)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accelerated_clock_starts_where_asked_and_runs_fast() {
        let start = 1_767_571_200_000_000; // 2026-01-05T00:00:00Z
        let c = Clock::accelerated(Some(start), 3600.0).unwrap();
        let t0 = c.now_us();
        assert!(t0 >= start && t0 < start + 3_600_000_000, "{t0}");
        std::thread::sleep(Duration::from_millis(20));
        // 20 ms of real time is at least 72 s of clock time at 3600x.
        assert!(c.now_us() - t0 >= 72_000_000);
        assert_eq!(c.real_duration(Duration::from_secs(3600)), Duration::from_secs(1));
        assert_eq!(c.real_duration(Duration::from_micros(1)), Duration::from_millis(1));
    }

    #[test]
    fn bad_scales_are_refused() {
        for s in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Clock::accelerated(None, s).is_err(), "{s}");
        }
        assert_eq!(Clock::from_settings(1.0, None).unwrap().scale(), 1.0);
    }
}
