//! A small SQL grammar for fuzzing: expressions deep and wide, the system tables,
//! COPY to and from paths, INSERT, SET, EXPLAIN, several statements in one message, and
//! mangled texts. One grammar, two sources of choices: the seeded generator in
//! `tests/fuzz.rs` (a random number generator) and the coverage-guided target
//! `fuzz/fuzz_targets/sql.rs` (the fuzzer's bytes).

/// Where the grammar's choices come from.
pub trait Choose {
    /// A number in `0..n` (`n` > 0).
    fn pick(&mut self, n: usize) -> usize;
    /// True with probability about `p`.
    fn coin(&mut self, p: f64) -> bool {
        (self.pick(1000) as f64) < p * 1000.0
    }
    /// A number in `lo..hi`.
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.pick((hi - lo) as usize) as i64
    }
}

pub const COLUMNS: &[&str] = &["record_id", "entity_id", "service", "operation", "usage_type", "region", "quantity", "event_time", "ingest_time"];
pub const TABLES: &[&str] = &["usage", "system.query_log", "system.pipelines", "system.segments", "system.shards", "system.forecasts", "system.forecast_accuracy", "system.routing_decisions", "system.scaling_decisions", "system.events", "generate_series(1, 1000) g(x)"];

pub fn literal(r: &mut dyn Choose) -> String {
    match r.pick(9) {
        0 => r.int(-1000, 1000).to_string(),
        1 => format!("{}.{}", r.int(-100, 100), r.pick(999)),
        2 => format!("'acct-{:05}'", r.pick(100)),
        3 => "NULL".into(),
        4 => "'2026-01-05 10:00:00'::timestamp".into(),
        5 => "interval '1 day'".into(),
        6 => ["true", "false", "0.0", "1e308", "-0", "''", "'\\x00'", "chr(0)"][r.pick(8)].into(),
        7 => format!("'{}'", "x".repeat(r.pick(200))),
        _ => "now()".into(),
    }
}

pub fn expr(r: &mut dyn Choose, depth: usize, cols: &[&str]) -> String {
    if depth == 0 || r.coin(0.3) {
        return if !cols.is_empty() && r.coin(0.6) { cols[r.pick(cols.len())].to_string() } else { literal(r) };
    }
    let a = expr(r, depth - 1, cols);
    let b = expr(r, depth - 1, cols);
    match r.pick(14) {
        0 => format!("({a} + {b})"),
        1 => format!("({a} / {b})"),
        2 => format!("({a} = {b})"),
        3 => format!("({a} AND {b})"),
        4 => format!("({a} OR {b})"),
        5 => format!("NOT ({a})"),
        6 => format!("CAST({a} AS {})", ["bigint", "text", "timestamp", "decimal(38,6)", "double", "date"][r.pick(6)]),
        7 => format!("CASE WHEN {a} THEN {b} ELSE {} END", literal(r)),
        8 => format!("{}({a})", ["sum", "count", "min", "max", "avg", "length", "upper", "abs", "date_trunc('hour', "][r.pick(9)]),
        9 => format!("{a} IN ({}, {}, {})", literal(r), literal(r), literal(r)),
        10 => format!("{a} BETWEEN {b} AND {}", literal(r)),
        11 => format!("coalesce({a}, {b})"),
        12 => format!("({a} || {b})"),
        _ => format!("{a} IS NULL"),
    }
}

/// A long flat chain: the shape that overflowed stacks before.
pub fn chain(r: &mut dyn Choose) -> String {
    let n = [10, 100, 1000, 3000, 20_000][r.pick(5)];
    let op = [" + ", " OR ", " AND ", " || ", "::text::bigint + "][r.pick(5)];
    let terms: Vec<String> = (0..n).map(|_| literal(r)).collect();
    terms.join(op)
}

pub fn statement(r: &mut dyn Choose) -> String {
    let table = TABLES[r.pick(TABLES.len())];
    let cols: &[&str] = match table {
        "usage" => COLUMNS,
        t if t.starts_with("generate_series") => &["x"],
        "system.query_log" => &["query_id", "query", "status", "duration_us", "start_time"],
        "system.pipelines" => &["pipeline", "in_flight", "queued", "slots"],
        _ => &[],
    };
    match r.pick(12) {
        0..=4 => {
            let width = 1 + r.pick(3);
            let items: Vec<String> = (0..width)
                .map(|_| {
                    let d = r.pick(5);
                    expr(r, d, cols)
                })
                .collect();
            let mut s = format!("SELECT {} FROM {table}", items.join(", "));
            if r.coin(0.6) {
                let d = 1 + r.pick(5);
                s += &format!(" WHERE {}", expr(r, d, cols));
            }
            if r.coin(0.3) {
                s += " GROUP BY 1";
            }
            if r.coin(0.3) {
                s += " ORDER BY 1";
            }
            if r.coin(0.3) {
                s += &format!(" LIMIT {}", r.pick(100));
            }
            s
        }
        5 => format!("SELECT {}", chain(r)),
        6 => format!(
            "INSERT INTO usage (record_id, entity_id, service, operation, usage_type, quantity, event_time) VALUES ({}, {}, 'storage', 'Get', 'Requests', {}, {})",
            literal(r),
            literal(r),
            literal(r),
            literal(r)
        ),
        7 => ["COPY usage FROM '/etc/passwd'", "COPY usage FROM 'import/../x'", "COPY (SELECT 1) TO '/tmp/fuzz-out'", "COPY usage FROM 'import/none.parquet'", "COPY (SELECT 1) TO 'export/../../x.csv'"]
            [r.pick(5)]
            .to_string(),
        8 => format!("EXPLAIN SELECT count(*) FROM usage WHERE {}", expr(r, 3, COLUMNS)),
        9 => ["SET statement_timeout = 50", "SET statement_timeout = 0", "SHOW statement_timeout", "BEGIN", "COMMIT", "ROLLBACK", "SET datafusion.execution.batch_size = 1", "DISCARD ALL"][r.pick(8)].to_string(),
        10 => format!("{}; {}", statement(r), statement(r)),
        _ => {
            // Mangled text: random cuts and splices of a valid statement.
            let base = format!("SELECT {} FROM {table} WHERE {}", expr(r, 3, cols), expr(r, 3, cols));
            let cut = r.pick(base.len() + 1);
            let mut s: String = base.chars().take(cut).collect();
            s.push_str([")", "(", "'", "$1", ";", "\"", "--", "/*"][r.pick(8)]);
            s
        }
    }
}
