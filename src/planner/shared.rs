//! Prepared statements shared by the connections of a node.
//!
//! Owns: the node's bounded map from a query's text to what preparing it produced (its
//! parsed statement, its logical plan with placeholders, its parameter types and its
//! [`GenericPlan`]), so that a statement text is parsed, planned and optimized once per
//! node rather than once per connection, and its physical plan's copies serve every
//! connection (a pool of 16 connections preparing the same 100 statements planned
//! 1,600 times; a fifth of a 5-second point-query run went to it).
//!
//! Must never: share what depends on the connection or on the moment it was planned.
//! Only what planning makes of the text alone is kept: queries (`SELECT`, no DML, DDL
//! or session statement) whose functions are all immutable, as [`GenericPlan`] accepts
//! them, and that read only segment tables (a system table's or the PostgreSQL
//! catalog's provider may hold the rows it found at planning; a segment table's scan
//! reads the data of the moment it runs). Planning reads only the
//! node's state (its catalog and options), not a connection's settings: a session's
//! routing policy and write token reach the plan when it runs, not when it is planned.
//! Texts longer than [`TEXT_BYTES_MAX`] are not kept; at most [`ENTRIES_MAX`] texts are
//! (the least recently prepared goes first).

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::Statement;
use parking_lot::Mutex;

use super::generic::GenericPlan;

/// Statement texts kept at most.
pub const ENTRIES_MAX: usize = 1024;
/// Longer texts are prepared per connection.
pub const TEXT_BYTES_MAX: usize = 16 * 1024;

/// What preparing one query text produced.
#[derive(Debug)]
pub struct SharedStatement {
    pub stmt: Arc<Statement>,
    pub plan: Arc<LogicalPlan>,
    /// `$1, $2, ...` in order.
    pub param_types: Vec<Option<DataType>>,
    pub generic: Arc<GenericPlan>,
}

#[derive(Debug, Default)]
pub struct SharedStatements {
    inner: Mutex<Inner>,
    /// Prepares answered from the map.
    hits: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, (u64, Arc<SharedStatement>)>,
    /// Incremented by every look-up and insert; an entry's stamp is its last use.
    clock: u64,
}

impl SharedStatements {
    /// The statement prepared from `sql` before, if it is kept.
    pub fn get(&self, sql: &str) -> Option<Arc<SharedStatement>> {
        let mut inner = self.inner.lock();
        inner.clock += 1;
        let now = inner.clock;
        let found = inner.map.get_mut(sql).map(|(stamp, s)| {
            *stamp = now;
            Arc::clone(s)
        });
        if found.is_some() {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        found
    }

    /// How many prepares were answered from the map.
    pub fn hits(&self) -> u64 {
        self.hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Keeps what preparing `sql` produced, if it may be shared (see the module
    /// documentation), and returns the entry kept for `sql` (an earlier one if another
    /// connection prepared it meanwhile).
    pub fn insert(&self, sql: &str, statement: SharedStatement) -> Option<Arc<SharedStatement>> {
        if sql.len() > TEXT_BYTES_MAX
            || !matches!(*statement.stmt, Statement::Query(_))
            || !super::generic::reusable(&statement.plan)
            || !crate::storage::provider::reads_only_segment_tables(&statement.plan)
        {
            return None;
        }
        let mut inner = self.inner.lock();
        inner.clock += 1;
        let now = inner.clock;
        if let Some((stamp, s)) = inner.map.get_mut(sql) {
            *stamp = now;
            return Some(Arc::clone(s));
        }
        if inner.map.len() >= ENTRIES_MAX {
            if let Some(oldest) = inner.map.iter().min_by_key(|(_, (stamp, _))| *stamp).map(|(k, _)| k.clone()) {
                inner.map.remove(&oldest);
            }
        }
        let s = Arc::new(statement);
        inner.map.insert(sql.to_string(), (now, Arc::clone(&s)));
        Some(s)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    async fn prepared(ctx: &SessionContext, sql: &str) -> SharedStatement {
        let dialect = datafusion::sql::sqlparser::dialect::PostgreSqlDialect {};
        let stmt = datafusion::sql::sqlparser::parser::Parser::parse_sql(&dialect, sql).unwrap().remove(0);
        let plan = ctx.state().statement_to_plan(datafusion::sql::parser::Statement::Statement(Box::new(stmt.clone()))).await.unwrap();
        SharedStatement { stmt: Arc::new(stmt), plan: Arc::new(plan), param_types: vec![], generic: Arc::default() }
    }

    #[tokio::test]
    async fn keeps_immutable_queries_once_per_text_and_forgets_the_least_recent() {
        let ctx = SessionContext::new();
        ctx.sql("CREATE TABLE t (a INT, b TEXT) AS VALUES (1, 'x')").await.unwrap();
        let shared = SharedStatements::default();
        let q = "SELECT abs(-5) + 1";
        let first = shared.insert(q, prepared(&ctx, q).await).expect("an immutable query is kept");
        let again = shared.insert(q, prepared(&ctx, q).await).expect("kept");
        assert!(Arc::ptr_eq(&first, &again), "a second connection's statement is the first one's");
        assert!(Arc::ptr_eq(&shared.get(q).unwrap(), &first));
        assert_eq!(shared.hits(), 1);
        assert!(shared.get("SELECT 2").is_none());
        // Volatile functions: each execution must see its own value, and a plan is not
        // reused for them; they are not shared either.
        let v = "SELECT random() < 0.5";
        assert!(shared.insert(v, prepared(&ctx, v).await).is_none());
        // A table that is not a segment table (here an in-memory one; on a node, a
        // system table) may hold the rows it had when the plan was made.
        let m = "SELECT sum(a) FROM t WHERE b = 'x'";
        assert!(shared.insert(m, prepared(&ctx, m).await).is_none(), "only segment tables' plans are shared");
        let long = format!("SELECT '{}'", "y".repeat(TEXT_BYTES_MAX));
        assert!(shared.insert(&long, prepared(&ctx, &long).await).is_none(), "long texts are not kept");
        assert_eq!(shared.len(), 1);

        for i in 0..ENTRIES_MAX {
            let sql = format!("SELECT {i} + 1");
            shared.insert(&sql, prepared(&ctx, &sql).await).unwrap();
            if i == 10 {
                shared.get(q).unwrap(); // recently used: survives
            }
        }
        assert_eq!(shared.len(), ENTRIES_MAX);
        assert!(shared.get(q).is_some(), "the recently used text stays");
        assert!(shared.get("SELECT 0 + 1").is_none(), "the least recently used went");
    }
}
