//! The clock every time-based part of Tidemark reads.
//!
//! Owns: "what time is it" for ingest times, query-log timestamps and background loops.
//! Must never: be bypassed by reading the system clock elsewhere; the accelerated clock
//! for replays (a later issue) plugs in here.

use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct Clock {
    inner: Arc<ClockKind>,
}

#[derive(Debug)]
enum ClockKind {
    Real,
    /// Fixed instant, for tests.
    Fixed(i64),
}

impl Clock {
    pub fn real() -> Clock {
        Clock { inner: Arc::new(ClockKind::Real) }
    }

    pub fn fixed(now_us: i64) -> Clock {
        Clock { inner: Arc::new(ClockKind::Fixed(now_us)) }
    }

    /// Microseconds since the Unix epoch, UTC.
    pub fn now_us(&self) -> i64 {
        match *self.inner {
            ClockKind::Real => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or(0),
            ClockKind::Fixed(t) => t,
        }
    }
}
