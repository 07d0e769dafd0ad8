//! A client session: turns one SQL statement into an outcome (rows, a command tag, or
//! a COPY exchange), and records it in the query log whether it succeeds or fails.
//!
//! Owns: statement classification (query, INSERT, COPY in/out, refused DDL), per
//! statement DataFusion state, statement timeouts and query-log entries.
//! Must never: know about the wire protocol (that is `frontend`), or store rows other
//! than through `storage::Storage::append`.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::ParamValues;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::execute_stream;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Statement,
};
use futures::{FutureExt, Stream, StreamExt, TryStreamExt};

use crate::catalog::TableDef;
use crate::error::{Error, Result};
use crate::ingest::{self, CsvOptions};
use crate::node::Node;
use crate::planner::generic::GenericPlan;
use crate::shard_key;
use crate::query_log::{self, QueryLogEntry};
use crate::storage::provider::ScanReport;
use crate::storage::AppendOutcome;
use crate::storage::write_stage::WriteStage;
use crate::write_token::TokenCell;
use crate::copy_in::{CopyContext, CopySink};

/// Who is running statements.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub session_id: i32,
    pub user: String,
    pub application_name: String,
    /// Per-session `SET statement_timeout`, overriding the node's default.
    pub statement_timeout: Option<std::time::Duration>,
    /// Per-session `SET tidemark.routing_policy`, overriding the node's.
    pub routing_policy: Option<crate::router::Policy>,
}

/// What a statement produced.
pub enum Outcome {
    /// A result set, streamed; the query-log entry is written when the stream ends.
    Rows { schema: SchemaRef, stream: SendableRecordBatchStream },
    /// A command with a tag such as `INSERT 0 5` (`rows` set for tags that carry a count).
    Command { tag: &'static str, rows: Option<u64>, notice: Option<String> },
    /// COPY ... FROM STDIN: the caller collects the data and calls [`Session::finish_copy_in`].
    CopyIn(CopyIn),
    /// COPY ... TO STDOUT: encoded rows, streamed.
    CopyOut { columns: usize, csv: bool, stream: futures::stream::BoxStream<'static, Result<Bytes>> },
}

/// A COPY FROM STDIN waiting for its data.
pub struct CopyIn {
    pub table: Arc<TableDef>,
    pub format: CopyFormat,
    pub columns: usize,
    tracker: Tracker,
}

#[derive(Debug, Clone)]
pub enum CopyFormat {
    Csv(CsvOptions),
    Parquet,
}

#[derive(Clone)]
pub struct Session {
    node: Arc<Node>,
    pub info: SessionInfo,
    /// Writes held until the end of the current multi-statement query, if any.
    stage: Option<Arc<WriteStage>>,
    /// The connection's write token: its writes merge into it, its reads wait for it.
    tokens: Arc<TokenCell>,
}

/// Statement kinds that Tidemark refuses, with the reason given to the user.
/// `DELETE FROM system.events ...`: the one DELETE Tidemark takes.
fn deletes_from_events(d: &datafusion::sql::sqlparser::ast::Delete) -> bool {
    use datafusion::sql::sqlparser::ast::{FromTable, TableFactor};
    let tables = match &d.from {
        FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
    };
    d.tables.is_empty()
        && d.using.is_none()
        && tables.len() == 1
        && tables[0].joins.is_empty()
        && matches!(&tables[0].relation, TableFactor::Table { name, .. } if name.to_string().eq_ignore_ascii_case("system.events"))
}

fn refused(stmt: &Statement) -> Option<&'static str> {
    Some(match stmt {
        Statement::CreateTable { .. } | Statement::AlterTable { .. } | Statement::Drop { .. } => {
            "tables are declared in catalog/*.sql; DDL over SQL is not supported"
        }
        Statement::CreateView { .. } | Statement::CreateSchema { .. } | Statement::CreateDatabase { .. } => {
            "CREATE is not supported; Tidemark's schema is declared in catalog/*.sql"
        }
        Statement::Delete(d) if deletes_from_events(d) => return None,
        Statement::Delete(_) | Statement::Update { .. } | Statement::Truncate { .. } | Statement::Merge { .. } => {
            "usage records are immutable: DELETE, UPDATE, TRUNCATE and MERGE are not supported"
        }
        _ => return None,
    })
}

/// The column names PostgreSQL would give a SELECT's result: an alias as written, a
/// column's own name, a function call's name (`sum`, `count`, `date_trunc`), a cast's
/// inner name, `?column?` otherwise. DataFusion names columns after whole expressions
/// (`sum(usage.quantity)`), which drivers and BI tools do not expect. Statements other
/// than a plain SELECT with one output column per item keep DataFusion's names.
pub fn pg_column_names(stmt: &Statement, schema: &datafusion::arrow::datatypes::Schema) -> Option<Vec<String>> {
    use datafusion::sql::sqlparser::ast::{Expr, SelectItem, SetExpr};
    fn expr_name(e: &Expr) -> Option<String> {
        match e {
            Expr::Identifier(id) => Some(id.value.clone()),
            Expr::CompoundIdentifier(parts) => parts.last().map(|p| p.value.clone()),
            Expr::Function(f) => f.name.0.last().map(|p| p.to_string().to_ascii_lowercase()),
            Expr::Cast { expr, .. } | Expr::Nested(expr) => expr_name(expr),
            _ => None,
        }
    }
    let Statement::Query(q) = stmt else { return None };
    let SetExpr::Select(select) = q.body.as_ref() else { return None };
    if select.projection.len() != schema.fields().len() {
        return None;
    }
    select
        .projection
        .iter()
        .map(|item| match item {
            SelectItem::ExprWithAlias { alias, .. } => Some(alias.value.clone()),
            SelectItem::UnnamedExpr(e) => Some(expr_name(e).unwrap_or_else(|| "?column?".to_string())),
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) | SelectItem::ExprWithAliases { .. } => None,
        })
        .collect()
}

/// `schema` with PostgreSQL's column names (see [`pg_column_names`]).
pub fn pg_schema(stmt: &Statement, schema: SchemaRef) -> SchemaRef {
    match pg_column_names(stmt, &schema) {
        Some(names) => Arc::new(datafusion::arrow::datatypes::Schema::new_with_metadata(
            schema.fields().iter().zip(names).map(|(f, n)| f.as_ref().clone().with_name(n)).collect::<Vec<_>>(),
            schema.metadata().clone(),
        )),
        None => schema,
    }
}

pub fn statement_kind(stmt: &Statement) -> String {
    // The common kinds without printing the statement (this runs for every statement).
    let kind = match stmt {
        Statement::Query(_) => "SELECT",
        Statement::Insert(_) => "INSERT",
        Statement::Copy { .. } => "COPY",
        Statement::Explain { .. } => "EXPLAIN",
        Statement::Set(_) => "SET",
        Statement::StartTransaction { .. } => "BEGIN",
        Statement::Commit { .. } => "COMMIT",
        Statement::Rollback { .. } => "ROLLBACK",
        _ => "",
    };
    if !kind.is_empty() {
        return kind.to_string();
    }
    let text = stmt.to_string();
    let mut words = text.split_whitespace();
    let first = words.next().unwrap_or("").to_ascii_uppercase();
    match first.as_str() {
        "WITH" | "VALUES" | "(" => "SELECT".into(),
        _ => first,
    }
}

impl Session {
    pub fn new(node: Arc<Node>, info: SessionInfo) -> Session {
        Session { node, info, stage: None, tokens: Arc::default() }
    }

    /// The same session with a statement timeout for the next statement.
    pub fn with_timeout(&self, timeout: Option<std::time::Duration>) -> Session {
        let mut info = self.info.clone();
        info.statement_timeout = timeout;
        Session { node: Arc::clone(&self.node), info, stage: self.stage.clone(), tokens: Arc::clone(&self.tokens) }
    }

    /// The same session with the routing policy its client chose (None = the node's).
    pub fn with_routing(mut self, policy: Option<crate::router::Policy>) -> Session {
        self.info.routing_policy = policy;
        self
    }

    /// The same session keeping its write token in `tokens` (the connection's).
    pub fn with_tokens(mut self, tokens: Arc<TokenCell>) -> Session {
        self.tokens = tokens;
        self
    }

    /// The connection's write token.
    pub fn tokens(&self) -> &Arc<TokenCell> {
        &self.tokens
    }

    /// Read-your-writes: before a statement reads stored rows (`reads`: the shards its
    /// plan's segment scans may read, `None` if none, `Some(None)` for any; see
    /// `provider::shards_read`), waits at most `read_wait_ms_max` until this node's
    /// replicas of those shards have applied the session's writes to them. The scan's
    /// manifest snapshot and write-buffer rows are taken after this.
    async fn read_barrier(&self, reads: impl FnOnce() -> Option<Option<std::collections::BTreeSet<crate::shard_map::ShardId>>>) -> Result<()> {
        let Some(groups) = self.node.groups() else { return Ok(()) };
        let token = self.tokens.get();
        // A session that wrote nothing (most reads) pays no more than this.
        if token.is_empty() {
            return Ok(());
        }
        let token = match reads() {
            None => return Ok(()),
            Some(None) => token,
            Some(Some(shards)) => token.only(&shards),
        };
        groups.wait_applied(&token, std::time::Duration::from_millis(self.node.config().read_wait_ms_max)).await
    }

    /// Notes what a write reached in the session's token.
    fn wrote(&self, o: &AppendOutcome) {
        self.tokens.merge(&o.token);
    }

    /// The same session with its writes held in `stage` (a multi-statement query).
    pub fn with_stage(mut self, stage: Option<Arc<WriteStage>>) -> Session {
        self.stage = stage;
        self
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Parses `sql` with the PostgreSQL-compatible parser (which also rewrites the
    /// catalog queries of psql and drivers).
    pub fn parse(&self, sql: &str) -> Result<Vec<Statement>> {
        self.node.parser().parse(sql).map_err(|e| Error::Syntax(e.to_string()))
    }

    /// Starts a query-log entry for a statement.
    pub fn track(&self, sql: &str, kind: String) -> Tracker {
        Tracker::start(&self.node, &self.info, sql, kind)
    }

    /// Records a statement that failed before it could be classified (a parse error).
    pub fn record_failure(&self, sql: &str, err: &Error) {
        let t = self.track(sql, "UNKNOWN".into());
        t.finish_err(err);
    }

    /// Plans a statement for the extended protocol (parameters stay placeholders).
    pub async fn plan(&self, stmt: &Statement) -> Result<Option<LogicalPlan>> {
        if let Some(reason) = refused(stmt) {
            return Err(Error::NotSupported(reason.into()));
        }
        if matches!(stmt, Statement::Copy { .. }) {
            return Ok(None);
        }
        let state = self.node.state();
        Ok(Some(state.statement_to_plan(DfStatement::Statement(Box::new(stmt.clone()))).await?))
    }

    /// Runs one parsed statement; `plan` and `params` come from the extended protocol.
    /// `generic` is the prepared statement's reusable plan, if it has one.
    pub async fn execute(
        &self,
        sql: &str,
        stmt: &Statement,
        plan: Option<&LogicalPlan>,
        params: Option<ParamValues>,
        generic: Option<&Arc<GenericPlan>>,
    ) -> Result<Outcome> {
        let tracker = self.track(sql, statement_kind(stmt));
        // A panic while planning (a bug, in DataFusion or here) fails the statement, not
        // the connection.
        let outcome = std::panic::AssertUnwindSafe(self.execute_tracked(stmt, plan, params, generic, &tracker))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Err(Error::Internal(format!("statement failed: {}", panic_message(&*panic)))));
        match outcome {
            Ok(Outcome::Rows { schema, stream }) => Ok(Outcome::Rows {
                schema: pg_schema(stmt, schema),
                stream: Box::pin(LoggedStream::new(Box::pin(CatchPanics::new(stream)) as SendableRecordBatchStream, tracker, |b: &RecordBatch| {
                    (b.num_rows() as u64, b.get_array_memory_size() as u64)
                })),
            }),
            Ok(Outcome::CopyIn(mut c)) => {
                c.tracker = tracker;
                Ok(Outcome::CopyIn(c))
            }
            Ok(Outcome::Command { tag, rows, notice }) => {
                tracker.finish_ok(rows.unwrap_or(0), 0);
                Ok(Outcome::Command { tag, rows, notice })
            }
            Ok(Outcome::CopyOut { columns, csv, stream }) => Ok(Outcome::CopyOut {
                columns,
                csv,
                // COPY TO STDOUT is logged when its stream ends.
                stream: Box::pin(LoggedStream::new(stream, tracker, |b: &Bytes| (bytecount_lines(b), b.len() as u64))),
            }),
            Err(e) => {
                let e = explain_values_error(stmt, e, |t| self.node.catalog().get(t).cloned());
                tracker.finish_err(&e);
                Err(e)
            }
        }
    }

    async fn execute_tracked(
        &self,
        stmt: &Statement,
        plan: Option<&LogicalPlan>,
        params: Option<ParamValues>,
        generic: Option<&Arc<GenericPlan>>,
        tracker: &Tracker,
    ) -> Result<Outcome> {
        if let Some(reason) = refused(stmt) {
            return Err(Error::NotSupported(reason.into()));
        }
        // A peer's replica that runs one of the statement's fragments applies the
        // session's writes to that shard first.
        if self.node.cluster().replicated_reads() {
            let token = self.tokens.get();
            if !token.is_empty() {
                tracker.report.set_read_after(token);
            }
        }
        if let Statement::Copy { source, to, target, options, legacy_options, .. } = stmt {
            self.read_barrier(|| to.then_some(None)).await?;
            return self.copy(source, *to, target, options, legacy_options, tracker).await;
        }
        let started = Instant::now();
        let timeout = self.info.statement_timeout.or_else(|| self.node.statement_timeout());
        if let (Some(generic), Some(plan), Some(params), Statement::Query(_)) = (generic, plan, &params, stmt) {
            // With the statement's values, so that `entity_id = $1` names its shard.
            self.read_barrier(|| crate::storage::provider::shards_read(&plan.clone().replace_params_with_values(params).unwrap_or_else(|_| plan.clone())))
                .await?;
            let counters = self.node.plan_counters();
            // A plan built already needs no planning state at all.
            let reused = match generic.ready(params)? {
                Some(r) => Some(r),
                None => within(timeout, generic.reuse(plan, params, &self.statement_state(tracker))).await?,
            };
            if let Some(reused) = reused {
                counters.reused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let stream = execute_stream(Arc::clone(&reused.plan), self.node.task_context(Arc::clone(&tracker.report), self.info.routing_policy))?;
                tracing::debug!(reuse_us = started.elapsed().as_micros() as u64, "reused physical plan");
                let schema = stream.schema();
                // The plan goes back to its statement when the stream is dropped.
                let stream = stream.inspect(move |_| {
                    let _ = &reused;
                });
                let stream: SendableRecordBatchStream =
                    Box::pin(datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(Arc::clone(&schema), stream));
                return Ok(Outcome::Rows { schema, stream });
            }
            let state = self.statement_state(tracker);
            let state_ready = started.elapsed();
            if let Some(bound) = generic.bind(plan, params, &state)? {
                counters.bound.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let planned = started.elapsed();
                let run = async {
                    let physical = state.query_planner().create_physical_plan(&bound, &state).await?;
                    tracing::debug!(
                        state_us = state_ready.as_micros() as u64,
                        bind_us = (planned - state_ready).as_micros() as u64,
                        physical_plan_us = (started.elapsed() - planned).as_micros() as u64,
                        "generic plan phases"
                    );
                    Ok::<_, Error>(execute_stream(physical, self.node.statement_task_context(&state))?)
                };
                let stream = within(timeout, run).await?;
                return Ok(Outcome::Rows { schema: stream.schema(), stream });
            }
        }
        let state = self.statement_state(tracker);
        let state_ready = started.elapsed();
        if plan.is_some() {
            self.node.plan_counters().planned.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let logical = match plan {
            Some(p) => p.clone(),
            None => state.statement_to_plan(DfStatement::Statement(Box::new(stmt.clone()))).await?,
        };
        let logical = match params {
            Some(p) => logical.replace_params_with_values(&p)?,
            None => logical,
        };
        match &logical {
            LogicalPlan::Ddl(_) => return Err(Error::NotSupported("DDL is not supported; tables are declared in catalog/*.sql".into())),
            LogicalPlan::Statement(s) => {
                return Err(Error::NotSupported(format!("statement {} is not supported here", s.name())));
            }
            LogicalPlan::Copy(_) => return Err(Error::NotSupported("COPY in this form is not supported".into())),
            _ => {}
        }
        let is_insert = matches!(&logical, LogicalPlan::Dml(d) if matches!(d.op, datafusion::logical_expr::WriteOp::Insert(_)));
        let is_event_delete = matches!(&logical, LogicalPlan::Dml(d)
            if matches!(d.op, datafusion::logical_expr::WriteOp::Delete) && d.table_name.to_string().eq_ignore_ascii_case("system.events"));
        if matches!(&logical, LogicalPlan::Dml(_)) && !is_insert && !is_event_delete {
            return Err(Error::NotSupported("only INSERT is supported (and DELETE FROM system.events)".into()));
        }
        if is_insert {
            ingest::check_insert_casts(&logical)?;
        }
        self.read_barrier(|| if is_insert { None } else { crate::storage::provider::shards_read(&logical) }).await?;
        let planned = started.elapsed();
        let run = async {
            let physical = state.create_physical_plan(&logical).await?;
            let physical_ready = started.elapsed();
            let stream = execute_stream(physical, self.node.statement_task_context(&state))?;
            tracing::debug!(
                state_us = state_ready.as_micros() as u64,
                logical_plan_us = (planned - state_ready).as_micros() as u64,
                optimize_and_physical_plan_us = (physical_ready - planned).as_micros() as u64,
                execute_start_us = (started.elapsed() - physical_ready).as_micros() as u64,
                "statement phases"
            );
            Ok::<_, Error>(stream)
        };
        let stream = within(timeout, run).await?;
        if is_insert || is_event_delete {
            let batches: Vec<RecordBatch> = within(timeout, async { Ok(stream.try_collect().await?) }).await?;
            let added = batches
                .first()
                .and_then(|b| b.column(0).as_any().downcast_ref::<datafusion::arrow::array::UInt64Array>().map(|a| a.value(0)))
                .unwrap_or(0);
            let tag = if is_insert { "INSERT" } else { "DELETE" };
            return Ok(Outcome::Command { tag, rows: Some(added), notice: None });
        }
        let schema = stream.schema();
        Ok(Outcome::Rows { schema, stream })
    }

    /// The node's DataFusion state for one statement, reporting its scans to `tracker`.
    fn statement_state(&self, tracker: &Tracker) -> datafusion::execution::session_state::SessionState {
        let mut state = self.node.state();
        state.config_mut().set_extension(Arc::clone(&tracker.report));
        if let Some(policy) = self.info.routing_policy {
            crate::planner::fragment::TidemarkOptions::set_routing_policy(state.config_mut().options_mut(), policy);
        }
        if let Some(stage) = &self.stage {
            state.config_mut().set_extension(Arc::clone(stage));
        }
        state.config_mut().set_extension(Arc::clone(&self.tokens));
        state
    }

    async fn copy(
        &self,
        source: &CopySource,
        to: bool,
        target: &CopyTarget,
        options: &[CopyOption],
        legacy: &[CopyLegacyOption],
        tracker: &Tracker,
    ) -> Result<Outcome> {
        let opts = CopyOpts::parse(options, legacy)?;
        if to {
            let query = match source {
                CopySource::Query(q) => q.to_string(),
                CopySource::Table { table_name, columns } => {
                    let cols = if columns.is_empty() {
                        "*".to_string()
                    } else {
                        columns.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
                    };
                    format!("SELECT {cols} FROM {table_name}")
                }
            };
            let state = self.statement_state(tracker);
            let df = datafusion::prelude::SessionContext::new_with_state(state).sql(&query).await?;
            return match target {
                CopyTarget::File { filename } => {
                    let paths = self.node.copy_paths();
                    let path = paths.for_write(filename)?;
                    let rows = crate::export::write_file(df, &path, filename, opts.format.as_deref(), paths.overwrite()).await?;
                    Ok(Outcome::Command { tag: "COPY", rows: Some(rows), notice: None })
                }
                CopyTarget::Stdout => {
                    let csv = match opts.format.as_deref() {
                        None | Some("text") => false,
                        Some("csv") => true,
                        Some(other) => return Err(Error::NotSupported(format!("COPY TO STDOUT with FORMAT {other}"))),
                    };
                    let columns = df.schema().fields().len();
                    let stream = df.execute_stream().await?;
                    let delimiter = opts.delimiter.unwrap_or(if csv { b',' } else { b'\t' });
                    Ok(Outcome::CopyOut {
                        columns,
                        csv,
                        stream: crate::export::encode_text(stream, csv, delimiter, opts.header),
                    })
                }
                CopyTarget::Stdin | CopyTarget::Program { .. } => {
                    Err(Error::NotSupported("COPY TO accepts a file name or STDOUT".into()))
                }
            };
        }
        let (table_name, columns) = match source {
            CopySource::Table { table_name, columns } => (table_name.to_string().to_ascii_lowercase(), columns),
            CopySource::Query(_) => return Err(Error::Syntax("COPY FROM needs a table".into())),
        };
        let table = self
            .node
            .catalog()
            .get(&table_name)
            .cloned()
            .ok_or_else(|| Error::UndefinedTable(table_name.clone()))?;
        let column_list: Option<Vec<String>> =
            (!columns.is_empty()).then(|| columns.iter().map(|c| c.value.to_ascii_lowercase()).collect());
        if let Some(cols) = &column_list {
            for c in cols {
                table.column_index(c)?;
            }
        }
        let format = match opts.format.as_deref() {
            Some("parquet") => CopyFormat::Parquet,
            Some("csv") => CopyFormat::Csv(CsvOptions {
                header: opts.header,
                delimiter: opts.delimiter.unwrap_or(b','),
                columns: column_list,
            }),
            None | Some("text") => CopyFormat::Csv(CsvOptions {
                header: opts.header,
                delimiter: opts.delimiter.unwrap_or(b'\t'),
                columns: column_list,
            }),
            Some(other) => return Err(Error::NotSupported(format!("COPY FROM with FORMAT {other}"))),
        };
        match target {
            CopyTarget::Stdin => Ok(Outcome::CopyIn(CopyIn {
                columns: table.schema.fields().len(),
                table,
                format,
                tracker: Tracker::placeholder(&self.node),
            })),
            CopyTarget::File { filename } => {
                let format = match (&format, opts.format.as_deref()) {
                    (_, Some(_)) => format,
                    // No FORMAT given: guess from the extension.
                    (_, None) if filename.ends_with(".parquet") => CopyFormat::Parquet,
                    _ => format,
                };
                let outcome = self.copy_from_source(&table, &format, filename).await.map_err(|e| quiet_file_error(filename, e))?;
                self.wrote(&outcome);
                Ok(copy_done(outcome))
            }
            CopyTarget::Stdout | CopyTarget::Program { .. } => {
                Err(Error::NotSupported("COPY FROM accepts a file name, a URL or STDIN".into()))
            }
        }
    }

    /// Reads, decodes, validates and stores a COPY from a server file or URL, as it
    /// is read (`copy_in`).
    async fn copy_from_source(&self, table: &Arc<TableDef>, format: &CopyFormat, source: &str) -> Result<AppendOutcome> {
        use crate::export::Source;
        let opened = crate::export::open_source(source, self.node.copy_paths()).await?;
        let sink = match (format, opened) {
            (CopyFormat::Parquet, Source::Local(file)) => {
                CopySink::parquet_file(self.copy_context(), Arc::clone(table), file)?
            }
            (_, Source::Local(file)) => {
                let mut sink = self.copy_sink(table, format)?;
                sink.push_file(file).await?;
                sink
            }
            (_, Source::Stream(mut pieces)) => {
                let mut sink = self.copy_sink(table, format)?;
                while let Some(piece) = futures::StreamExt::next(&mut pieces).await {
                    sink.push(&piece?).await?;
                }
                sink
            }
        };
        sink.finish().await
    }

    fn copy_context(&self) -> CopyContext {
        let config = self.node.config();
        CopyContext {
            storage: Arc::clone(self.node.storage()),
            stage: self.stage.clone(),
            pool: Arc::clone(&self.node.context().runtime_env().memory_pool),
            query_memory_bytes_max: config.query_memory_bytes_max,
            copy_bytes_max: config.copy_bytes_max,
            spool_dir: crate::copy_in::spool_dir(&config.data_dir),
            now_us: self.node.clock().now_us(),
        }
    }

    /// A sink for a COPY's data, pushed in pieces (COPY FROM STDIN, URLs).
    pub fn copy_sink(&self, table: &Arc<TableDef>, format: &CopyFormat) -> Result<CopySink> {
        CopySink::new(self.copy_context(), Arc::clone(table), format)
    }

    /// Completes a COPY FROM STDIN with the sink its data went to.
    pub async fn finish_copy_in(&self, copy: CopyIn, sink: CopySink) -> Result<Outcome> {
        let CopyIn { tracker, .. } = copy;
        match sink.finish().await {
            Ok(o) => {
                tracker.finish_ok(o.added, 0);
                self.wrote(&o);
                Ok(copy_done(o))
            }
            Err(e) => {
                tracker.finish_err(&e);
                Err(e)
            }
        }
    }

    /// Abandons a COPY FROM STDIN (client sent CopyFail or disconnected).
    pub fn abort_copy_in(&self, copy: CopyIn, reason: &str) {
        copy.tracker.finish_err(&Error::BadCopyFormat(format!("COPY from stdin failed: {reason}")));
    }
}

/// DataFusion types the VALUES of an `INSERT ... VALUES` with the table's columns, so a
/// NULL in a NOT NULL column or a literal that does not convert fails while the batch
/// is built, with a message that names `columnN` (or nothing) and no row. The
/// statement's own VALUES say which column and row it was; report that as PostgreSQL
/// does (23502 for the NULL, 22P02 / 42804 for the value), naming both.
fn explain_values_error(stmt: &Statement, e: Error, table_def: impl Fn(&str) -> Option<Arc<TableDef>>) -> Error {
    use datafusion::sql::sqlparser::ast::{Expr, SetExpr, Value};
    if !matches!(e.sqlstate(), "23502" | "22023" | "22P02" | "42804" | "22003") {
        return e;
    }
    let Statement::Insert(insert) = stmt else { return e };
    let Some(source) = &insert.source else { return e };
    let SetExpr::Values(values) = source.body.as_ref() else { return e };
    let table = insert.table.to_string().to_ascii_lowercase();
    let Some(def) = table_def(&table) else { return e };
    let targets: Vec<datafusion::arrow::datatypes::FieldRef> = if insert.columns.is_empty() {
        def.schema.fields().iter().cloned().collect()
    } else {
        let mut out = Vec::with_capacity(insert.columns.len());
        for c in &insert.columns {
            match def.schema.field_with_name(&c.to_string().to_ascii_lowercase()) {
                Ok(f) => out.push(Arc::new(f.clone())),
                Err(_) => return e,
            }
        }
        out
    };
    // Row by row, column by column, as PostgreSQL reports the first bad value.
    for (r, row) in values.rows.iter().enumerate() {
        for (field, cell) in targets.iter().zip(row.content.iter()) {
            let text = match cell {
                Expr::Value(v) => match &v.value {
                    Value::Null if !field.is_nullable() => {
                        return Error::NotNullViolation { table, column: field.name().clone(), row: r as u64 + 1 };
                    }
                    Value::SingleQuotedString(s) => s.clone(),
                    // A number for a timestamp is refused before execution (check_insert_casts).
                    Value::Number(_, _) if matches!(field.data_type(), datafusion::arrow::datatypes::DataType::Timestamp(_, _)) => continue,
                    Value::Number(n, _) => n.to_string(),
                    _ => continue,
                },
                _ => continue,
            };
            let a: datafusion::arrow::array::ArrayRef = Arc::new(datafusion::arrow::array::StringArray::from(vec![text]));
            if let Err(bad) = ingest::convert(&table, field.name(), &a, field.data_type(), r as u64) {
                return bad;
            }
        }
    }
    e
}

/// An error about the contents of a server-side file, without the contents: a
/// decoding error can quote the bytes it failed on, and the file is the server's.
fn quiet_file_error(filename: &str, e: Error) -> Error {
    let code = e.sqlstate();
    if !(code.starts_with("22") || code.starts_with("23") || code == "42804" || code == "XX001") {
        return e;
    }
    let row = row_of(&e.message());
    let at = row.map(|r| format!(" at row {r}")).unwrap_or_default();
    Error::Relayed {
        sqlstate: code,
        message: format!("COPY from file \"{filename}\" failed{at}: invalid input (SQLSTATE {code}); the file's contents are not shown"),
    }
}

/// The row or line number an ingestion error names, if any.
fn row_of(msg: &str) -> Option<u64> {
    for key in ["row ", "line "] {
        if let Some(i) = msg.find(key) {
            let digits: String = msg[i + key.len()..].chars().take_while(|c| c.is_ascii_digit()).collect();
            if let Ok(n) = digits.parse() {
                return Some(n);
            }
        }
    }
    None
}

/// Runs `work`, failing with 57014 if it takes longer than `timeout`.
async fn within<T>(timeout: Option<std::time::Duration>, work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    match timeout {
        Some(t) => tokio::time::timeout(t, work).await.map_err(|_| Error::StatementTimeout)?,
        None => work.await,
    }
}

fn copy_done(o: AppendOutcome) -> Outcome {
    Outcome::Command {
        tag: "COPY",
        rows: Some(o.added),
        notice: Some(format!("rows added: {}, rows already present: {}, rejected: 0", o.added, o.present)),
    }
}

fn bytecount_lines(b: &Bytes) -> u64 {
    b.iter().filter(|c| **c == b'\n').count() as u64
}

#[derive(Debug, Default)]
struct CopyOpts {
    format: Option<String>,
    header: bool,
    delimiter: Option<u8>,
}

impl CopyOpts {
    fn parse(options: &[CopyOption], legacy: &[CopyLegacyOption]) -> Result<CopyOpts> {
        let mut o = CopyOpts::default();
        let delim = |c: char| -> Result<u8> {
            if c.is_ascii() {
                Ok(c as u8)
            } else {
                Err(Error::InvalidParameter("COPY delimiter must be a single one-byte character".into()))
            }
        };
        for opt in options {
            match opt {
                CopyOption::Format(f) => o.format = Some(f.value.to_ascii_lowercase()),
                CopyOption::Header(h) => o.header = *h,
                CopyOption::Delimiter(c) => o.delimiter = Some(delim(*c)?),
                other => return Err(Error::NotSupported(format!("COPY option {other}"))),
            }
        }
        for opt in legacy {
            match opt {
                CopyLegacyOption::Csv(csv) => {
                    o.format = Some("csv".into());
                    for c in csv {
                        match c {
                            CopyLegacyCsvOption::Header => o.header = true,
                            other => return Err(Error::NotSupported(format!("COPY option {other}"))),
                        }
                    }
                }
                CopyLegacyOption::Delimiter(c) => o.delimiter = Some(delim(*c)?),
                CopyLegacyOption::Header => o.header = true,
                other => return Err(Error::NotSupported(format!("COPY option {other}"))),
            }
        }
        Ok(o)
    }
}

/// A query-log entry in the making. Finishing records it; dropping an unfinished one
/// (the client went away mid-stream) records it as cancelled.
pub struct Tracker {
    node: Arc<Node>,
    entry: Option<QueryLogEntry>,
    started: Instant,
    pub report: Arc<ScanReport>,
}

impl Tracker {
    fn start(node: &Arc<Node>, info: &SessionInfo, sql: &str, kind: String) -> Tracker {
        let normalized = query_log::normalize(sql);
        let text_max = node.config().query_log_text_bytes_max;
        let entry = QueryLogEntry {
            query_id: node.query_log().next_query_id(),
            session_id: info.session_id,
            user_name: info.user.clone(),
            application_name: info.application_name.clone(),
            start_time_us: node.clock().now_us(),
            status: "running",
            sqlstate: String::new(),
            statement_kind: kind,
            query: query_log::truncate_text(sql, text_max),
            fingerprint: query_log::fingerprint(&normalized),
            normalized_query: query_log::truncate_text(&normalized, text_max),
            ..Default::default()
        };
        let report = Arc::new(ScanReport::for_query(entry.query_id));
        Tracker { node: Arc::clone(node), entry: Some(entry), started: Instant::now(), report }
    }

    fn placeholder(node: &Arc<Node>) -> Tracker {
        Tracker { node: Arc::clone(node), entry: None, started: Instant::now(), report: Arc::default() }
    }

    fn fill(&mut self, status: &'static str, sqlstate: &str, error: Option<String>, rows: u64, bytes: u64) {
        let Some(mut e) = self.entry.take() else { return };
        e.duration_us = self.started.elapsed().as_micros() as i64;
        e.status = status;
        e.sqlstate = sqlstate.to_string();
        e.error = error.map(|m| query_log::truncate_text(&m, self.node.config().query_log_text_bytes_max));
        e.rows = rows;
        e.bytes = bytes;
        let r = self.report.snapshot();
        e.tables = r.tables.iter().cloned().collect();
        if !r.tables.is_empty() {
            e.entity_ids = if r.keys_all { None } else { r.keys.map(|k| k.into_iter().collect()) };
            let single = |col: &str| match shard_key::key_values(&r.filters, col).values() {
                Some(v) if v.len() == 1 => v.iter().next().cloned(),
                _ => None,
            };
            e.service = single("service");
            e.operation = single("operation");
            if let Some(t) = r.time {
                e.time_from_us = t.lo_us();
                e.time_to_us = t.hi_us();
            }
        }
        e.shards = r.shards.iter().copied().collect::<BTreeSet<_>>().into_iter().collect();
        e.segments = r.segments;
        e.segments_total = r.segments_total;
        self.node.query_log().record(e);
    }

    pub fn finish_ok(mut self, rows: u64, bytes: u64) {
        self.fill("ok", "00000", None, rows, bytes);
    }

    pub fn finish_err(mut self, err: &Error) {
        self.fill("error", err.sqlstate(), Some(err.message()), 0, 0);
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if self.entry.is_some() {
            self.fill("cancelled", "57014", Some("the client stopped reading".into()), 0, 0);
        }
    }
}

/// The text of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_string())
}

/// A statement's rows with a panic inside an operator (a bug, in DataFusion or here)
/// turned into an error (XX000) that ends the statement: the connection, and the
/// process, go on. Panics in tasks an operator spawned reach the consumer the same way
/// (DataFusion resumes them in the stream that reads the task).
struct CatchPanics {
    inner: Option<SendableRecordBatchStream>,
    schema: SchemaRef,
}

impl CatchPanics {
    fn new(inner: SendableRecordBatchStream) -> CatchPanics {
        CatchPanics { schema: inner.schema(), inner: Some(inner) }
    }
}

impl Stream for CatchPanics {
    type Item = datafusion::error::Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll_next_unpin(cx))) {
            Ok(polled) => polled,
            Err(panic) => {
                // The operator's state is unknown after a panic: never poll it again.
                self.inner = None;
                let e = Error::Internal(format!("statement failed: {}", panic_message(&*panic)));
                Poll::Ready(Some(Err(e.into())))
            }
        }
    }
}

impl datafusion::physical_plan::RecordBatchStream for CatchPanics {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }
}

/// Counts a result stream's rows and bytes and finishes its query-log entry at the end
/// (or at the first error; dropping it early records the statement as cancelled).
struct LoggedStream<S, T> {
    inner: S,
    tracker: Option<Tracker>,
    rows: u64,
    bytes: u64,
    measure: fn(&T) -> (u64, u64),
}

impl<S, T> LoggedStream<S, T> {
    fn new(inner: S, tracker: Tracker, measure: fn(&T) -> (u64, u64)) -> Self {
        LoggedStream { inner, tracker: Some(tracker), rows: 0, bytes: 0, measure }
    }
}

/// Errors a logged stream can carry, seen as Tidemark errors for the log.
trait LoggableError {
    /// (SQLSTATE, message)
    fn log_fields(&self) -> (&'static str, String);
}
impl LoggableError for datafusion::error::DataFusionError {
    fn log_fields(&self) -> (&'static str, String) {
        if let Some(ours) = crate::error::find_ours(self) {
            return (ours.sqlstate(), ours.message());
        }
        let e = Error::from(clone_df_error(self));
        (e.sqlstate(), e.message())
    }
}
impl LoggableError for Error {
    fn log_fields(&self) -> (&'static str, String) {
        (self.sqlstate(), self.message())
    }
}

impl<S, T, E> Stream for LoggedStream<S, T>
where
    S: Stream<Item = std::result::Result<T, E>> + Unpin,
    E: LoggableError,
{
    type Item = std::result::Result<T, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.inner.poll_next_unpin(cx);
        match &polled {
            Poll::Ready(Some(Ok(item))) => {
                let (r, b) = (self.measure)(item);
                self.rows += r;
                self.bytes += b;
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(mut t) = self.tracker.take() {
                    let (state, msg) = e.log_fields();
                    t.fill("error", state, Some(msg), 0, 0);
                }
            }
            Poll::Ready(None) => {
                let (rows, bytes) = (self.rows, self.bytes);
                if let Some(t) = self.tracker.take() {
                    t.finish_ok(rows, bytes);
                }
            }
            Poll::Pending => {}
        }
        polled
    }
}

impl datafusion::physical_plan::RecordBatchStream for LoggedStream<SendableRecordBatchStream, RecordBatch> {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }
}

/// DataFusion errors are not Clone; keep the class (for the SQLSTATE) and the message.
fn clone_df_error(e: &datafusion::error::DataFusionError) -> datafusion::error::DataFusionError {
    use datafusion::error::DataFusionError as D;
    match e {
        D::ArrowError(a, _) => D::ArrowError(Box::new(datafusion::arrow::error::ArrowError::ComputeError(a.to_string())), None),
        D::Execution(m) => D::Execution(m.clone()),
        D::ResourcesExhausted(m) => D::ResourcesExhausted(m.clone()),
        D::NotImplemented(m) => D::NotImplemented(m.clone()),
        D::Plan(m) => D::Plan(m.clone()),
        other => D::Internal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose operator panics mid-way.
    struct Panicking(u32);

    impl Stream for Panicking {
        type Item = datafusion::error::Result<RecordBatch>;
        fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0 += 1;
            if self.0 == 2 {
                panic!("k must be > 0");
            }
            Poll::Ready(Some(Ok(RecordBatch::new_empty(Arc::new(datafusion::arrow::datatypes::Schema::empty())))))
        }
    }

    impl datafusion::physical_plan::RecordBatchStream for Panicking {
        fn schema(&self) -> SchemaRef {
            Arc::new(datafusion::arrow::datatypes::Schema::empty())
        }
    }

    #[tokio::test]
    async fn a_panicking_operator_fails_its_statement_only() {
        let mut s = CatchPanics::new(Box::pin(Panicking(0)));
        assert!(s.next().await.unwrap().is_ok());
        let err = Error::from(s.next().await.unwrap().unwrap_err());
        assert_eq!(err.sqlstate(), "XX000");
        assert!(err.message().contains("k must be > 0"), "{err}");
        // Never polled again after the panic.
        assert!(s.next().await.is_none());
        assert!(s.next().await.is_none());
    }
}
