//! What a query's filters say about one column: the set of shard-key values it can
//! match, and the time interval it can match.
//!
//! Owns: conservative predicate analysis. Pure: no IO, no async.
//! Must never: claim a narrower set than the predicate allows. Whenever the analysis
//! is unsure (a function it does not know, a cast that could change values, NOT, a
//! comparison with another column), the answer is "all values" / "unbounded".
//! Pruning with a wider answer only costs time; a narrower one would lose rows.

use std::collections::BTreeSet;

use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator};
use datafusion::scalar::ScalarValue;

/// The values of a text column that a predicate can match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySet {
    /// Any value (the analysis could not narrow it down).
    All,
    /// Only these values. An empty set means the predicate matches no row.
    Values(BTreeSet<String>),
}

impl KeySet {
    fn and(self, other: KeySet) -> KeySet {
        match (self, other) {
            (KeySet::All, x) | (x, KeySet::All) => x,
            (KeySet::Values(a), KeySet::Values(b)) => KeySet::Values(a.intersection(&b).cloned().collect()),
        }
    }
    fn or(self, other: KeySet) -> KeySet {
        match (self, other) {
            (KeySet::Values(mut a), KeySet::Values(b)) => {
                a.extend(b);
                KeySet::Values(a)
            }
            _ => KeySet::All,
        }
    }
    pub fn values(&self) -> Option<&BTreeSet<String>> {
        match self {
            KeySet::All => None,
            KeySet::Values(v) => Some(v),
        }
    }
}

/// A half-open interval of instants in nanoseconds since the Unix epoch (UTC):
/// `lo <= t < hi`; `None` is unbounded on that side. Nanoseconds keep strict bounds
/// (`t > x`) exact for any literal precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    pub lo: Option<i128>,
    pub hi: Option<i128>,
}

impl TimeRange {
    pub const ALL: TimeRange = TimeRange { lo: None, hi: None };

    pub fn is_empty(&self) -> bool {
        matches!((self.lo, self.hi), (Some(l), Some(h)) if l >= h)
    }

    fn and(self, o: TimeRange) -> TimeRange {
        TimeRange {
            lo: match (self.lo, o.lo) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
            hi: match (self.hi, o.hi) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }

    /// The smallest interval covering both (a union may only widen).
    fn or(self, o: TimeRange) -> TimeRange {
        if self.is_empty() {
            return o;
        }
        if o.is_empty() {
            return self;
        }
        TimeRange {
            lo: match (self.lo, o.lo) {
                (Some(a), Some(b)) => Some(a.min(b)),
                _ => None,
            },
            hi: match (self.hi, o.hi) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            },
        }
    }

    /// Whether rows with times in `[lo_us, hi_us)` (microseconds) can match.
    pub fn overlaps_us(&self, lo_us: i64, hi_us: i64) -> bool {
        let (lo, hi) = (lo_us as i128 * 1000, hi_us as i128 * 1000);
        self.lo.is_none_or(|l| l < hi) && self.hi.is_none_or(|h| h > lo) && !self.is_empty()
    }

    /// Lower bound in whole microseconds (inclusive).
    pub fn lo_us(&self) -> Option<i64> {
        self.lo.map(|l| ceil_div(l, 1000) as i64)
    }
    /// Upper bound in whole microseconds (exclusive).
    pub fn hi_us(&self) -> Option<i64> {
        self.hi.map(|h| ceil_div(h, 1000) as i64)
    }
}

impl std::fmt::Display for TimeRange {
    /// `[2026-01-05T00:00:00Z, 2026-01-06T00:00:00Z)`, `-inf` / `+inf` when unbounded.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |us: Option<i64>, inf: &str| match us.and_then(chrono::DateTime::from_timestamp_micros) {
            Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.fZ").to_string(),
            None => inf.to_string(),
        };
        write!(f, "[{}, {})", show(self.lo_us(), "-inf"), show(self.hi_us(), "+inf"))
    }
}

fn ceil_div(a: i128, b: i128) -> i128 {
    -((-a).div_euclid(b))
}

/// The values of text column `column` that the conjunction `filters` can match.
pub fn key_values(filters: &[Expr], column: &str) -> KeySet {
    filters.iter().fold(KeySet::All, |acc, f| acc.and(key_expr(f, column)))
}

/// The instants of timestamp column `column` that the conjunction `filters` can match.
pub fn time_range(filters: &[Expr], column: &str) -> TimeRange {
    filters.iter().fold(TimeRange::ALL, |acc, f| acc.and(time_expr(f, column)))
}

fn key_expr(e: &Expr, column: &str) -> KeySet {
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::And => key_expr(left, column).and(key_expr(right, column)),
            Operator::Or => key_expr(left, column).or(key_expr(right, column)),
            Operator::Eq => match (is_text_column(left, column), is_text_column(right, column)) {
                (true, false) => text_literal(right).map(single).unwrap_or(KeySet::All),
                (false, true) => text_literal(left).map(single).unwrap_or(KeySet::All),
                _ => KeySet::All,
            },
            _ => KeySet::All,
        },
        Expr::InList(l) if !l.negated && is_text_column(&l.expr, column) => {
            let mut set = BTreeSet::new();
            for item in &l.list {
                match text_literal(item) {
                    Some(s) => {
                        set.insert(s);
                    }
                    None => return KeySet::All,
                }
            }
            KeySet::Values(set)
        }
        _ => KeySet::All,
    }
}

fn single(s: String) -> KeySet {
    KeySet::Values(BTreeSet::from([s]))
}

/// `column`, possibly under casts between string types (which do not change values).
fn is_text_column(e: &Expr, column: &str) -> bool {
    match e {
        Expr::Column(c) => c.name == column,
        Expr::Cast(c) => is_string_type(c.field.data_type()) && is_text_column(&c.expr, column),
        Expr::TryCast(c) => is_string_type(c.field.data_type()) && is_text_column(&c.expr, column),
        _ => false,
    }
}

fn is_string_type(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn text_literal(e: &Expr) -> Option<String> {
    match e {
        Expr::Literal(v, _) => match v {
            ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => {
                Some(s.clone())
            }
            _ => None,
        },
        Expr::Cast(c) if is_string_type(c.field.data_type()) => text_literal(&c.expr),
        _ => None,
    }
}

/// How the column appears in a comparison.
#[derive(Debug, Clone, Copy)]
enum TimeView {
    /// The instant itself (possibly cast to another timestamp precision in UTC).
    Instant,
    /// Truncated to a fixed-width unit, in nanoseconds (`CAST(.. AS DATE)` = one day,
    /// `date_trunc('hour', ..)` = one hour).
    Truncated(i128),
}

fn time_view(e: &Expr, column: &str) -> Option<TimeView> {
    match e {
        Expr::Column(c) if c.name == column => Some(TimeView::Instant),
        Expr::Cast(c) => match c.field.data_type() {
            DataType::Timestamp(_, tz) if utc_like(tz.as_deref()) => match time_view(&c.expr, column)? {
                TimeView::Instant => Some(TimeView::Instant),
                // A cast after truncation keeps the truncation.
                t => Some(t),
            },
            DataType::Date32 | DataType::Date64 => match time_view(&c.expr, column)? {
                TimeView::Instant => Some(TimeView::Truncated(DAY_NS)),
                TimeView::Truncated(u) if DAY_NS % u == 0 => Some(TimeView::Truncated(DAY_NS)),
                TimeView::Truncated(_) => None,
            },
            _ => None,
        },
        Expr::ScalarFunction(f) if f.name() == "date_trunc" && f.args.len() == 2 => {
            let unit = match &f.args[0] {
                Expr::Literal(ScalarValue::Utf8(Some(u)), _) | Expr::Literal(ScalarValue::Utf8View(Some(u)), _) => {
                    u.to_ascii_lowercase()
                }
                _ => return None,
            };
            let unit_ns = match unit.as_str() {
                "second" => 1_000_000_000,
                "minute" => 60 * 1_000_000_000,
                "hour" => 3_600 * 1_000_000_000,
                "day" => DAY_NS,
                _ => return None,
            };
            match time_view(&f.args[1], column)? {
                TimeView::Instant => Some(TimeView::Truncated(unit_ns)),
                TimeView::Truncated(u) if unit_ns % u == 0 => Some(TimeView::Truncated(unit_ns)),
                TimeView::Truncated(_) => None,
            }
        }
        _ => None,
    }
}

const DAY_NS: i128 = 86_400 * 1_000_000_000;

fn utc_like(tz: Option<&str>) -> bool {
    matches!(tz, None | Some("UTC") | Some("+00:00") | Some("Z") | Some("utc") | Some("+00"))
}

/// A literal instant in nanoseconds since the epoch (UTC).
fn time_literal(e: &Expr) -> Option<i128> {
    let v = match e {
        Expr::Literal(v, _) => v,
        _ => return None,
    };
    Some(match v {
        ScalarValue::TimestampSecond(Some(x), tz) if utc_like(tz.as_deref()) || tz.is_some() => *x as i128 * 1_000_000_000,
        ScalarValue::TimestampMillisecond(Some(x), _) => *x as i128 * 1_000_000,
        ScalarValue::TimestampMicrosecond(Some(x), _) => *x as i128 * 1_000,
        ScalarValue::TimestampNanosecond(Some(x), _) => *x as i128,
        ScalarValue::Date32(Some(d)) => *d as i128 * DAY_NS,
        ScalarValue::Date64(Some(ms)) => *ms as i128 * 1_000_000,
        _ => return None,
    })
}

fn floor_to(x: i128, u: i128) -> i128 {
    x.div_euclid(u) * u
}
fn ceil_to(x: i128, u: i128) -> i128 {
    -floor_to(-x, u)
}

/// The range of the column's instants for which `view(col) op lit` can hold.
fn compare(view: TimeView, op: Operator, lit: i128) -> Option<TimeRange> {
    let r = |lo: Option<i128>, hi: Option<i128>| Some(TimeRange { lo, hi });
    match view {
        TimeView::Instant => match op {
            Operator::Eq => r(Some(lit), Some(lit + 1)),
            Operator::Gt => r(Some(lit + 1), None),
            Operator::GtEq => r(Some(lit), None),
            Operator::Lt => r(None, Some(lit)),
            Operator::LtEq => r(None, Some(lit + 1)),
            _ => None,
        },
        // trunc(t) is a multiple of u with trunc(t) <= t < trunc(t) + u.
        TimeView::Truncated(u) => match op {
            Operator::Eq => r(Some(lit), Some(lit + u)),
            Operator::GtEq => r(Some(ceil_to(lit, u)), None),
            Operator::Gt => r(Some(floor_to(lit, u) + u), None),
            Operator::Lt => r(None, Some(ceil_to(lit, u))),
            Operator::LtEq => r(None, Some(floor_to(lit, u) + u)),
            _ => None,
        },
    }
}

fn flip(op: Operator) -> Option<Operator> {
    Some(match op {
        Operator::Eq => Operator::Eq,
        Operator::Lt => Operator::Gt,
        Operator::LtEq => Operator::GtEq,
        Operator::Gt => Operator::Lt,
        Operator::GtEq => Operator::LtEq,
        _ => return None,
    })
}

fn time_expr(e: &Expr, column: &str) -> TimeRange {
    match e {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
            Operator::And => time_expr(left, column).and(time_expr(right, column)),
            Operator::Or => time_expr(left, column).or(time_expr(right, column)),
            _ => {
                let found = if let (Some(v), Some(l)) = (time_view(left, column), time_literal(right)) {
                    compare(v, *op, l)
                } else if let (Some(v), Some(l), Some(op)) = (time_view(right, column), time_literal(left), flip(*op)) {
                    compare(v, op, l)
                } else {
                    None
                };
                found.unwrap_or(TimeRange::ALL)
            }
        },
        Expr::Between(b) if !b.negated => match (time_view(&b.expr, column), time_literal(&b.low), time_literal(&b.high)) {
            (Some(v), Some(lo), Some(hi)) => {
                let a = compare(v, Operator::GtEq, lo).unwrap_or(TimeRange::ALL);
                let z = compare(v, Operator::LtEq, hi).unwrap_or(TimeRange::ALL);
                a.and(z)
            }
            _ => TimeRange::ALL,
        },
        _ => TimeRange::ALL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::common::tree_node::TreeNode;
    use datafusion::prelude::SessionContext;

    /// Plans `SELECT * FROM t WHERE <pred>` against a usage-like schema and returns the
    /// optimized filter conjuncts, as a table scan would receive them.
    fn filters(pred: &str) -> Vec<Expr> {
        use datafusion::logical_expr::LogicalPlan;
        let schema = std::sync::Arc::new(Schema::new(vec![
            Field::new("entity_id", DataType::Utf8, false),
            Field::new("service", DataType::Utf8, false),
            Field::new("event_time", DataType::Timestamp(TimeUnit::Microsecond, None), false),
        ]));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let ctx = SessionContext::new();
            let table = datafusion::datasource::MemTable::try_new(schema, vec![vec![]]).unwrap();
            ctx.register_table("t", std::sync::Arc::new(table)).unwrap();
            let plan = ctx.sql(&format!("SELECT * FROM t WHERE {pred}")).await.unwrap().into_optimized_plan().unwrap();
            let mut out = Vec::new();
            plan.apply(|node| {
                match node {
                    LogicalPlan::Filter(f) => out.extend(datafusion::logical_expr::utils::split_conjunction(&f.predicate).into_iter().cloned()),
                    LogicalPlan::TableScan(s) => out.extend(s.filters.iter().cloned()),
                    _ => {}
                }
                Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
            })
            .unwrap();
            out
        })
    }

    #[test]
    fn fixtures() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/shard_key.txt")).unwrap();
        let mut n = 0;
        for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
            let lines: Vec<&str> = block.lines().filter(|l| !l.starts_with('#')).collect();
            if lines.is_empty() {
                continue;
            }
            let pred = lines[0].trim();
            let f = filters(pred);
            for want in &lines[1..] {
                let (what, expected) = want.split_once(':').unwrap();
                let got = match what.trim() {
                    "keys" => format!("{:?}", key_values(&f, "entity_id").values()),
                    "service" => format!("{:?}", key_values(&f, "service").values()),
                    "time_us" => {
                        let r = time_range(&f, "event_time");
                        format!("{:?}..{:?}", r.lo_us(), r.hi_us())
                    }
                    other => panic!("unknown fixture field {other}"),
                };
                assert_eq!(got, expected.trim(), "predicate: {pred}\nfilters: {f:?}");
                n += 1;
            }
        }
        assert!(n >= 20, "only {n} fixture checks ran");
    }
}
