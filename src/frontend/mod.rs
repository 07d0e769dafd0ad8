//! The PostgreSQL wire-protocol front end (pgwire): connections, simple and extended
//! query protocol, COPY, and error responses.
//!
//! Owns: everything that knows pgwire. Statements are executed by `session`; rows are
//! encoded with arrow-pg; SET/SHOW and BEGIN/COMMIT use datafusion-postgres's hooks;
//! psql's catalog queries go to datafusion-pg-catalog's pg_catalog.
//! Statements are parsed, planned and run on the node's execution runtime (see
//! `node::EXEC_STACK_BYTES`); the connection's task forwards their rows and stops them
//! on a CancelRequest, at the statement timeout, or when the client goes away
//! (`interrupt`). A multi-statement simple query is one implicit transaction: its
//! writes are held (`storage::write_stage`) and stored only if every statement succeeded.
//! Must never: end a connection because a statement failed (errors become
//! ErrorResponse messages), or accept more connections than `connections_max`.

mod admission;
mod params;
pub mod settings;
pub mod framing;
mod wire;

pub use wire::invalid_utf8_marker;

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_postgres::hooks::set_show::SetShowHook;
use datafusion_postgres::hooks::transactions::TransactionStatementHook;
use datafusion_postgres::QueryHook;
use futures::{Sink, SinkExt, StreamExt};
use parking_lot::Mutex;
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::auth::StartupHandler;
use pgwire::api::cancel::CancelHandler;
use pgwire::api::copy::CopyHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{CopyResponse, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, ErrorHandler, PgWireConnectionState, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::copy::{CopyData, CopyDone, CopyFail};
use pgwire::messages::response::{NoticeResponse, TransactionStatus};
use pgwire::messages::PgWireBackendMessage;
use pgwire::types::format::FormatOptions;
use tokio::net::TcpListener;

use crate::error::Error;
use crate::interrupt::{self, CancelRegistry, CancelSlot, Probe, Registration, Stop};
use crate::node::Node;
use crate::storage::write_stage::WriteStage;
use crate::planner::generic::GenericPlan;
use crate::copy_in::CopySink;
use crate::session::{statement_kind, CopyIn, Outcome, Session, SessionInfo};

/// One prepared statement of the extended protocol.
#[derive(Clone, Debug)]
pub struct Prepared {
    sql: String,
    stmt: Option<Arc<Statement>>,
    plan: Option<Arc<LogicalPlan>>,
    /// Planned by a datafusion-postgres hook (SET, SHOW, BEGIN, ...).
    hooked: bool,
    /// Parameter types in `$1, $2, ...` order.
    param_types: Vec<Option<DataType>>,
    /// The optimized plan reused by every Execute (shared by clones of the statement).
    generic: Arc<GenericPlan>,
}

impl Prepared {
    /// This connection's statement for `sql`, prepared by the node once for all
    /// connections.
    fn of_shared(sql: &str, s: &crate::planner::shared::SharedStatement) -> Prepared {
        Prepared {
            sql: sql.to_string(),
            stmt: Some(Arc::clone(&s.stmt)),
            plan: Some(Arc::clone(&s.plan)),
            hooked: false,
            param_types: s.param_types.clone(),
            generic: Arc::clone(&s.generic),
        }
    }
}

/// Per-connection state kept in pgwire's session extensions.
struct ConnState {
    session: Session,
    /// A COPY FROM STDIN in progress: its data so far, reserved from the node's memory
    /// pool (so that many connections' COPY buffers together stay within the node's
    /// budget).
    /// A COPY FROM STDIN in progress: its statement and the sink its data goes to.
    copy_in: Mutex<Option<(CopyIn, CopySink)>>,
    /// Fired by a CancelRequest carrying this connection's key.
    cancel: Arc<CancelSlot>,
    _registration: Registration,
    /// Tells whether the client is still connected while a statement runs.
    probe: Option<Probe>,
    /// Names of the prepared statements and portals this connection made (closed
    /// ones are pruned when the count reaches the limit).
    named: Mutex<(HashSet<String>, HashSet<String>)>,
}

pub struct Frontend {
    node: Arc<Node>,
    parser: Arc<PreparedParser>,
    hooks: Vec<Arc<dyn QueryHook>>,
    startup: Arc<Startup>,
    cancel: Arc<Canceller>,
    cancels: Arc<CancelRegistry>,
    probes: Arc<Mutex<HashMap<SocketAddr, Probe>>>,
}

struct Startup;

impl NoopStartupHandler for Startup {}

/// CancelRequests go to the statement running on the connection they name.
struct Canceller(Arc<CancelRegistry>);

#[async_trait]
impl CancelHandler for Canceller {
    async fn on_cancel_request(&self, req: pgwire::messages::cancel::CancelRequest) {
        self.0.cancel(req.pid, &req.secret_key.to_bytes());
    }
}

/// What a statement of a simple query left the message in.
enum Step {
    Next,
    Failed,
    CopyIn,
}

pub struct PreparedParser {
    node: Arc<Node>,
    hooks: Vec<Arc<dyn QueryHook>>,
}

/// Who the client is, from its start-up parameters.
fn session_info<C: ClientInfo + ?Sized>(client: &C) -> SessionInfo {
    let md = client.metadata();
    SessionInfo {
        session_id: client.pid_and_secret_key().0,
        user: md.get("user").cloned().unwrap_or_default(),
        application_name: md.get("application_name").cloned().unwrap_or_default(),
        statement_timeout: None,
        routing_policy: None,
    }
}

fn to_pg(e: &Error) -> PgWireError {
    PgWireError::UserError(Box::new(error_info(e)))
}

fn error_info(e: &Error) -> ErrorInfo {
    ErrorInfo::new("ERROR".to_owned(), e.sqlstate().to_owned(), e.message())
}

impl Frontend {
    pub fn new(node: Arc<Node>) -> Arc<Frontend> {
        let hooks: Vec<Arc<dyn QueryHook>> = vec![
            Arc::new(settings::SettingsHook { node_policy: node.cluster().policy() }),
            Arc::new(SetShowHook),
            Arc::new(TransactionStatementHook),
        ];
        let cancels = Arc::new(CancelRegistry::default());
        Arc::new(Frontend {
            parser: Arc::new(PreparedParser { node: Arc::clone(&node), hooks: hooks.clone() }),
            hooks,
            startup: Arc::new(Startup),
            cancel: Arc::new(Canceller(Arc::clone(&cancels))),
            cancels,
            probes: Arc::default(),
            node,
        })
    }

    fn conn<C: ClientInfo>(&self, client: &C) -> Arc<ConnState> {
        let node = Arc::clone(&self.node);
        if let Some(c) = client.session_extensions().get::<ConnState>() {
            return c;
        }
        // Taken first: the closure below runs under the extensions' lock.
        let tokens = client.session_extensions().get_or_insert_with(crate::write_token::TokenCell::default);
        client.session_extensions().get_or_insert_with(|| {
            let (pid, key) = client.pid_and_secret_key();
            let (cancel, registration) = self.cancels.register(pid, key.to_bytes().to_vec());
            ConnState {
                session: Session::new(node, session_info(client))
                    .with_tokens(tokens),
                copy_in: Mutex::new(None),
                cancel,
                _registration: registration,
                probe: self.probes.lock().get(&client.socket_addr()).cloned(),
                named: Mutex::default(),
            }
        })
    }

    /// What stops the statement about to run: a cancel request, its timeout (the
    /// session's `SET statement_timeout`, else the node's), its client leaving.
    fn stop<C: ClientInfo>(&self, conn: &ConnState, client: &C) -> Stop {
        let timeout = statement_timeout(client).or_else(|| self.node.statement_timeout());
        Stop::new(Some(conn.cancel.arm()), timeout, conn.probe.clone())
    }

    /// Runs the statements of one simple-protocol Query message, sending each one's
    /// answer before the next runs. With several statements the message is one
    /// implicit transaction: its writes wait in a [`WriteStage`] and are stored only
    /// after the last statement succeeded.
    async fn query_message<C>(&self, client: &mut C, query: &str, status: &mut TransactionStatus) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let conn = self.conn(client);
        let statements = match parse_checked(&self.node, query).await {
            Ok(s) => s,
            Err(e) => {
                conn.session.record_failure(logged_text(query), &e);
                return self.fail(client, &e, status).await;
            }
        };
        if statements.is_empty() {
            client.feed(PgWireBackendMessage::EmptyQueryResponse(pgwire::messages::response::EmptyQueryResponse::new())).await?;
            return Ok(());
        }
        let stage = (statements.len() > 1 && *status == TransactionStatus::Idle)
            .then(|| Arc::new(WriteStage::new(self.node.config().copy_bytes_max)));
        for (stmt, text) in statements {
            // Hooks read the connection's status: keep it current within the message.
            client.set_transaction_status(*status);
            match self.simple_statement(client, &conn, text, stmt, status, stage.clone()).await? {
                Step::Next => {}
                // An error ends the message; its staged writes are dropped unstored.
                Step::Failed | Step::CopyIn => return Ok(()),
            }
        }
        if let Some(stage) = stage {
            if let Err(e) = stage.commit(self.node.storage(), conn.session.tokens()).await {
                conn.session.record_failure(logged_text(query), &e);
                return self.fail(client, &e, status).await;
            }
        }
        Ok(())
    }

    async fn fail<C>(&self, client: &mut C, e: &Error, status: &mut TransactionStatus) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        client.feed(PgWireBackendMessage::ErrorResponse(error_info(e).into())).await?;
        *status = status.to_error_state();
        Ok(())
    }

    /// Runs one statement of a simple query and sends its answer.
    async fn simple_statement<C>(
        &self,
        client: &mut C,
        conn: &Arc<ConnState>,
        sql: String,
        stmt: Statement,
        status: &mut TransactionStatus,
        stage: Option<Arc<WriteStage>>,
    ) -> PgWireResult<Step>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if let Some(r) = self.refuse_engine_settings(&stmt) {
            conn.session.record_failure(&sql, &r);
            self.fail(client, &r, status).await?;
            return Ok(Step::Failed);
        }
        for hook in &self.hooks {
            if let Some(result) = hook.handle_simple_query(&stmt, self.node.context(), client).await {
                let t = conn.session.track(&sql, statement_kind(&stmt));
                let resp = match result {
                    Ok(resp) => {
                        t.finish_ok(0, 0);
                        resp
                    }
                    Err(e) => {
                        let info = pgwire_error_info(e);
                        t.finish_err(&Error::InvalidParameter(info.message.clone()));
                        Response::Error(Box::new(info))
                    }
                };
                return send_response(client, resp, status).await;
            }
        }
        // The status as of this statement: a BEGIN earlier in the same message counts.
        let refused = write_in_transaction(*status, &stmt).or_else(|| {
            let copy_in = matches!(&stmt, Statement::Copy { to: false, target: datafusion::sql::sqlparser::ast::CopyTarget::Stdin, .. });
            (stage.is_some() && copy_in).then(|| {
                Error::NotSupported("COPY FROM STDIN inside a multi-statement query; send it as its own query".into())
            })
        });
        if let Some(e) = refused {
            conn.session.record_failure(&sql, &e);
            self.fail(client, &e, status).await?;
            return Ok(Step::Failed);
        }
        let mut stop = self.stop(conn, client);
        let session = conn.session.with_timeout(statement_timeout(client)).with_routing(settings::routing_policy(client)).with_stage(stage);
        let exec = self.node.exec();
        let ran = interrupt::run(&exec, &mut stop, started(async move { session.execute(&sql, &stmt, None, None, None).await })).await;
        let resp = match ran {
            Ok(ran) => self.respond(client, conn, ran, &Format::UnifiedText, stop).await,
            Err(e) => Response::Error(Box::new(error_info(&e))),
        };
        send_response(client, resp, status).await
    }

    fn refuse_engine_settings(&self, stmt: &Statement) -> Option<Error> {
        if let Statement::Set(datafusion::sql::sqlparser::ast::Set::SingleAssignment { variable, .. }) = stmt {
            if variable.to_string().to_ascii_lowercase().starts_with("datafusion.") {
                return Some(Error::NotSupported(
                    "engine settings are shared by all sessions of a node; set them in the node's configuration".into(),
                ));
            }
        }
        None
    }

    /// The answer to a statement; its rows (or COPY data) are produced on the
    /// execution runtime and end early if `stop` fires.
    async fn respond<C>(&self, client: &mut C, conn: &ConnState, ran: Ran, format: &Format, stop: Stop) -> Response
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let exec = self.node.exec();
        let outcome = match ran {
            // Rows whose driver started on the execution runtime already.
            Ran::Rows { schema, started } => {
                let pumped = started.with_stop(stop, |e| Err(e.into()));
                let stream = Box::pin(datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(Arc::clone(&schema), pumped));
                return rows_response(client, &schema, stream, format);
            }
            Ran::Other(o) => o,
        };
        match outcome {
            Outcome::Rows { schema, stream } => rows_response(client, &schema, interrupt::pump_batches(&exec, stream, stop), format),
            Outcome::Command { tag, rows, notice } => {
                if let Some(n) = notice {
                    let msg = ErrorInfo::new("NOTICE".to_owned(), "00000".to_owned(), n);
                    let _ = client.send(PgWireBackendMessage::NoticeResponse(NoticeResponse::from(msg))).await;
                }
                let mut t = Tag::new(tag);
                if tag == "INSERT" {
                    t = t.with_oid(0);
                }
                if let Some(n) = rows {
                    t = t.with_rows(n as usize);
                }
                Response::Execution(t)
            }
            Outcome::CopyIn(copy) => {
                let columns = copy.columns;
                let sink = match conn.session.copy_sink(&copy.table, &copy.format) {
                    Ok(sink) => sink,
                    Err(e) => {
                        conn.session.abort_copy_in(copy, &e.to_string());
                        return Response::Error(Box::new(error_info(&e)));
                    }
                };
                *conn.copy_in.lock() = Some((copy, sink));
                Response::CopyIn(CopyResponse::new(0, columns, futures::stream::empty()))
            }
            Outcome::CopyOut { columns, stream, .. } => {
                let stream = interrupt::pump(&exec, stream, stop, Err);
                let data = stream.map(|r| r.map(CopyData::new).map_err(|e| to_pg(&e)));
                Response::CopyOut(CopyResponse::new(0, columns, data))
            }
        }
    }
}

/// A statement's outcome as it leaves the execution runtime: rows come with their
/// driver started there already ([`started`]).
enum Ran {
    Rows { schema: datafusion::arrow::datatypes::SchemaRef, started: interrupt::Started<datafusion::error::Result<datafusion::arrow::record_batch::RecordBatch>> },
    Other(Outcome),
}

/// `execute`, and for rows their driver started on the runtime that ran it (where
/// this future runs: `interrupt::run` spawns it on the execution runtime), so that the
/// rows reach the connection without another wake-up of an execution thread.
async fn started(execute: impl std::future::Future<Output = crate::error::Result<Outcome>>) -> crate::error::Result<Ran> {
    Ok(match execute.await? {
        Outcome::Rows { schema, stream } => Ran::Rows { schema, started: interrupt::start(stream) },
        other => Ran::Other(other),
    })
}

/// The answer of a statement's rows, as the client's result formats ask.
fn rows_response<C: ClientInfo>(client: &C, schema: &datafusion::arrow::datatypes::SchemaRef, stream: datafusion::execution::SendableRecordBatchStream, format: &Format) -> Response {
    let options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
    match arrow_pg::datatypes::arrow_schema_to_pg_fields(schema, format, Some(options)) {
        Ok(f) => Response::Query(encode_rows(Arc::new(f), stream)),
        Err(e) => Response::Error(Box::new(pgwire_error_info(e))),
    }
}

/// Encodes Arrow batches as DataRows, turning mid-stream errors into ErrorResponses.
fn encode_rows(fields: Arc<Vec<FieldInfo>>, stream: datafusion::execution::SendableRecordBatchStream) -> QueryResponse {
    let f = Arc::clone(&fields);
    let rows = stream
        .map(move |batch| {
            let it: Box<dyn Iterator<Item = PgWireResult<pgwire::messages::data::DataRow>> + Send + Sync> = match batch {
                Ok(b) => arrow_pg::datatypes::encode_recordbatch(Arc::clone(&f), b),
                Err(e) => Box::new(std::iter::once(Err(to_pg(&Error::from(e))))),
            };
            futures::stream::iter(it)
        })
        .flatten();
    QueryResponse::new(fields, rows)
}

fn pgwire_error_info(e: PgWireError) -> ErrorInfo {
    match e {
        PgWireError::UserError(info) => *info,
        other => ErrorInfo::new("ERROR".to_owned(), "XX000".to_owned(), other.to_string()),
    }
}

fn statement_timeout<C: ClientInfo>(client: &C) -> Option<std::time::Duration> {
    client
        .metadata()
        .get("statement_timeout_ms")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(std::time::Duration::from_millis)
}

/// Each statement commits on its own; a write inside BEGIN ... COMMIT could not be
/// rolled back, so it is refused rather than silently committed.
fn write_in_transaction(status: TransactionStatus, stmt: &Statement) -> Option<Error> {
    let writes = matches!(stmt, Statement::Insert(_)) || matches!(stmt, Statement::Copy { to: false, .. });
    (writes && status != TransactionStatus::Idle).then(|| {
        Error::NotSupported(
            "writes inside a transaction block are not supported: every INSERT and COPY commits on its own (use autocommit)".into(),
        )
    })
}

#[async_trait]
impl SimpleQueryHandler for Frontend {
    /// As pgwire's default, except that each statement's answer is sent before the
    /// next statement runs (so a later statement's failure is known before a write
    /// would be stored), statements run on the execution runtime, and a transaction
    /// block begun inside the message counts for the statements after it.
    async fn on_query<C>(&self, client: &mut C, query: pgwire::messages::simplequery::Query) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if !matches!(client.state(), PgWireConnectionState::ReadyForQuery) {
            return Err(PgWireError::NotReadyForQuery);
        }
        let mut status = client.transaction_status();
        client.set_state(PgWireConnectionState::QueryInProgress);
        self.query_message(client, &query.query, &mut status).await?;
        client.set_transaction_status(status);
        if !matches!(client.state(), PgWireConnectionState::CopyInProgress(_)) {
            client.set_state(PgWireConnectionState::ReadyForQuery);
            pgwire::api::query::send_ready_for_query(client, status).await?;
        }
        Ok(())
    }

    async fn do_query<C>(&self, _client: &mut C, _query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        Err(to_pg(&Error::Internal("simple queries are answered by on_query".into())))
    }
}

/// Sends one statement's answer; a statement error becomes an ErrorResponse (the
/// connection goes on), a broken connection is returned.
async fn send_response<C>(client: &mut C, resp: Response, status: &mut TransactionStatus) -> PgWireResult<Step>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    use pgwire::api::copy::{send_copy_both_response, send_copy_in_response, send_copy_out_response};
    use pgwire::api::query::{send_execution_response, send_query_response};
    let sent = match resp {
        Response::EmptyQuery => {
            client.feed(PgWireBackendMessage::EmptyQueryResponse(pgwire::messages::response::EmptyQueryResponse::new())).await?;
            Ok(())
        }
        Response::Query(q) => send_query_response(client, q, true).await,
        Response::Execution(tag) => send_execution_response(client, tag).await,
        Response::TransactionStart(tag) => {
            *status = status.to_in_transaction_state();
            send_execution_response(client, tag).await
        }
        Response::TransactionEnd(tag) => {
            *status = status.to_idle_state();
            send_execution_response(client, tag).await
        }
        Response::Error(e) => {
            client.feed(PgWireBackendMessage::ErrorResponse((*e).into())).await?;
            *status = status.to_error_state();
            return Ok(Step::Failed);
        }
        Response::CopyIn(r) => {
            send_copy_in_response(client, r).await?;
            client.set_state(PgWireConnectionState::CopyInProgress(false));
            return Ok(Step::CopyIn);
        }
        Response::CopyOut(r) => send_copy_out_response(client, r).await,
        Response::CopyBoth(r) => {
            send_copy_both_response(client, r).await?;
            client.set_state(PgWireConnectionState::CopyInProgress(false));
            return Ok(Step::CopyIn);
        }
    };
    match sent {
        Ok(()) => Ok(Step::Next),
        Err(PgWireError::IoError(e)) => Err(PgWireError::IoError(e)),
        Err(other) => {
            client.feed(PgWireBackendMessage::ErrorResponse(pgwire_error_info(other).into())).await?;
            *status = status.to_error_state();
            Ok(Step::Failed)
        }
    }
}

/// The statements of `sql` with the text each one is logged under, parsed on the
/// execution runtime after the checks that keep parsing and planning bounded:
/// valid UTF-8 (see [`invalid_utf8_marker`]), expression depth, parameter count.
async fn parse_checked(node: &Arc<Node>, sql: &str) -> crate::error::Result<Vec<(Statement, String)>> {
    if sql == invalid_utf8_marker() {
        return Err(Error::InvalidEncoding);
    }
    let node = Arc::clone(node);
    let sql = sql.to_string();
    let work = node.exec().spawn(async move {
        let cfg = node.config();
        crate::limits::check(&sql, cfg.expression_depth_max, cfg.statement_params_max)?;
        let statements = node.parser().parse(&sql).map_err(|e| Error::Syntax(e.to_string()))?;
        for s in &statements {
            crate::limits::check_target_lists(s)?;
        }
        let single = statements.len() == 1;
        Ok(statements
            .into_iter()
            .map(|s| {
                let text = if single { sql.clone() } else { s.to_string() };
                (s, text)
            })
            .collect())
    });
    work.await.map_err(|e| Error::Internal(format!("parsing failed: {e}")))?
}

/// The text a failed statement is logged under: never the stand-in for invalid UTF-8.
fn logged_text(sql: &str) -> &str {
    if sql == invalid_utf8_marker() {
        "<query text that is not valid UTF-8>"
    } else {
        sql
    }
}

#[async_trait]
impl QueryParser for PreparedParser {
    type Statement = Prepared;

    async fn parse_sql<C>(&self, client: &C, sql: &str, _types: &[Option<Type>]) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let info = session_info(client);
        // Prepared by another connection (or this one) before: parsed and planned once
        // per node (`planner::shared`). The hooks still see it, as they would a new one.
        if let Some(shared) = self.node.shared_statements().get(sql) {
            let mut hooked = false;
            for hook in &self.hooks {
                if hook.handle_extended_parse_query(&shared.stmt, self.node.context(), client).await.is_some() {
                    hooked = true;
                    break;
                }
            }
            if !hooked {
                return Ok(Some(Prepared::of_shared(sql, &shared)));
            }
        }
        let session = Session::new(Arc::clone(&self.node), info.clone());
        let mut statements: Vec<Statement> = match parse_checked(&self.node, sql).await {
            Ok(s) => s.into_iter().map(|(s, _)| s).collect(),
            Err(e) => {
                session.record_failure(logged_text(sql), &e);
                return Err(to_pg(&e));
            }
        };
        if statements.is_empty() {
            return Ok(None);
        }
        if statements.len() > 1 {
            let e = Error::Syntax("cannot insert multiple commands into a prepared statement".into());
            session.record_failure(sql, &e);
            return Err(to_pg(&e));
        }
        let stmt = statements.remove(0);
        for hook in &self.hooks {
            if let Some(plan) = hook.handle_extended_parse_query(&stmt, self.node.context(), client).await {
                let plan = plan?;
                return Ok(Some(Prepared {
                    sql: sql.to_string(),
                    stmt: Some(Arc::new(stmt)),
                    plan: Some(Arc::new(plan)),
                    hooked: true,
                    param_types: vec![],
                    generic: Arc::default(),
                }));
            }
        }
        // Planned on the execution runtime (deep plans recurse).
        let node = Arc::clone(&self.node);
        let planned = self
            .node
            .exec()
            .spawn(async move {
                let session = Session::new(node, info);
                let planned = match session.plan(&stmt).await {
                    Ok(Some(p)) => ordered_param_types(&p).map(|t| (Some(p), t)),
                    Ok(None) => Ok((None, vec![])),
                    Err(e) => Err(e),
                };
                (stmt, planned)
            })
            .await
            .map_err(|e| to_pg(&Error::Internal(format!("planning failed: {e}"))))?;
        match planned {
            (stmt, Ok((plan, param_types))) => {
                let stmt = Arc::new(stmt);
                let plan = plan.map(Arc::new);
                let shared = plan.as_ref().and_then(|p| {
                    let s = crate::planner::shared::SharedStatement {
                        stmt: Arc::clone(&stmt),
                        plan: Arc::clone(p),
                        param_types: param_types.clone(),
                        generic: Arc::default(),
                    };
                    self.node.shared_statements().insert(sql, s)
                });
                Ok(Some(match shared {
                    Some(s) => Prepared::of_shared(sql, &s),
                    None => Prepared { sql: sql.to_string(), stmt: Some(stmt), plan, hooked: false, param_types, generic: Arc::default() },
                }))
            }
            (_, Err(e)) => {
                session.record_failure(sql, &e);
                Err(to_pg(&e))
            }
        }
    }

    fn get_parameter_types(&self, stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        stmt.param_types
            .iter()
            .map(|t| match t {
                Some(t) => arrow_pg::datatypes::into_pg_type(t),
                None => Ok(Type::UNKNOWN),
            })
            .collect()
    }

    fn get_result_schema(&self, stmt: &Prepared, format: Option<&Format>) -> PgWireResult<Vec<FieldInfo>> {
        match (&stmt.plan, &stmt.stmt) {
            (Some(plan), Some(parsed)) if !matches!(**plan, LogicalPlan::Dml(_) | LogicalPlan::Ddl(_)) => {
                let schema = crate::session::pg_schema(parsed, Arc::new(plan.schema().as_arrow().clone()));
                arrow_pg::datatypes::arrow_schema_to_pg_fields(&schema, format.unwrap_or(&Format::UnifiedText), None)
            }
            _ => Ok(vec![]),
        }
    }
}

/// `$1, $2, ...` types of a plan, in order.
fn ordered_param_types(plan: &LogicalPlan) -> crate::error::Result<Vec<Option<DataType>>> {
    let mut types = plan.get_parameter_types()?;
    // As in PostgreSQL, a parameter that is a LIMIT or OFFSET is a bigint.
    let _ = plan.apply_with_subqueries(|p| {
        if let LogicalPlan::Limit(l) = p {
            for e in [&l.skip, &l.fetch].into_iter().flatten() {
                if let datafusion::logical_expr::Expr::Placeholder(ph) = e.as_ref() {
                    if let Some(slot @ None) = types.get_mut(&ph.id) {
                        *slot = Some(DataType::Int64);
                    }
                }
            }
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    let mut out: Vec<(usize, Option<DataType>)> = types
        .into_iter()
        .filter_map(|(name, t)| name.trim_start_matches('$').parse::<usize>().ok().map(|i| (i, t)))
        .collect();
    out.sort_by_key(|(i, _)| *i);
    let n = out.last().map(|(i, _)| *i).unwrap_or(0);
    let mut dense = vec![None; n];
    for (i, t) in out {
        if i >= 1 {
            dense[i - 1] = t;
        }
    }
    Ok(dense)
}

#[async_trait]
impl ExtendedQueryHandler for Frontend {
    type Statement = Prepared;
    type QueryParser = PreparedParser;

    fn query_parser(&self) -> Arc<PreparedParser> {
        Arc::clone(&self.parser)
    }

    /// As pgwire's default, except that BindComplete is queued rather than flushed: as
    /// in PostgreSQL, it reaches the client with the Execute's rows at the next Flush or
    /// Sync, in one write instead of one write per message.
    async fn on_bind<C>(&self, client: &mut C, message: pgwire::messages::extendedquery::Bind) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        use pgwire::api::store::Entry;
        let statement_name = message.statement_name.as_deref().unwrap_or(pgwire::api::DEFAULT_NAME);
        let portal_name = message.portal_name.as_deref().unwrap_or(pgwire::api::DEFAULT_NAME);
        match client.portal_store().get_statement(statement_name) {
            Some(Entry::Value(statement)) => {
                check_bind(&message, statement_name, &statement)?;
                // Only named portals count (the unnamed one is replaced by each Bind).
                if message.portal_name.as_deref().is_some_and(|n| !n.is_empty()) {
                    let conn = self.conn(client);
                    let store = client.portal_store();
                    self.count_named(&conn, portal_name, true, |n| matches!(store.get_portal(n), Some(Entry::Value(_)) | Some(Entry::Empty)))?;
                }
                let portal = Portal::try_new(&message, statement)?;
                client.portal_store().put_portal(Arc::new(portal));
            }
            Some(Entry::Empty) => {
                if !message.parameters.is_empty() {
                    return Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                        "ERROR".to_owned(),
                        "08P01".to_owned(),
                        format!(
                            "bind message supplies {} parameters, but prepared statement {statement_name:?} requires 0",
                            message.parameters.len()
                        ),
                    ))));
                }
                client.portal_store().put_empty_portal(portal_name);
            }
            None => return Err(PgWireError::StatementNotFound(statement_name.to_owned())),
        }
        client.feed(PgWireBackendMessage::BindComplete(pgwire::messages::extendedquery::BindComplete::new())).await?;
        Ok(())
    }

    /// As pgwire's default, with a bound on the named statements a connection holds
    /// (`prepared_statements_max`).
    async fn on_parse<C>(&self, client: &mut C, message: pgwire::messages::extendedquery::Parse) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        use pgwire::api::store::Entry;
        let name = message.name.clone().unwrap_or_default();
        if !name.is_empty() {
            let conn = self.conn(client);
            let store = client.portal_store();
            self.count_named(&conn, &name, false, |n| matches!(store.get_statement(n), Some(Entry::Value(_)) | Some(Entry::Empty)))?;
        }
        let parser = self.query_parser();
        match pgwire::api::stmt::StoredStatement::parse(client, &message, parser).await? {
            Some(stmt) => client.portal_store().put_statement(Arc::new(stmt)),
            None => client.portal_store().put_empty_statement(if name.is_empty() { pgwire::api::DEFAULT_NAME } else { &name }),
        }
        client
            .send(PgWireBackendMessage::ParseComplete(pgwire::messages::extendedquery::ParseComplete::new()))
            .await?;
        Ok(())
    }

    /// As pgwire's default, except that the description is queued rather than flushed
    /// (it goes out at the next Flush or Sync, as in PostgreSQL).
    async fn on_describe<C>(&self, client: &mut C, message: pgwire::messages::extendedquery::Describe) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        use pgwire::api::results::{DescribePortalResponse, DescribeResponse};
        use pgwire::api::store::Entry;
        let name = message.name.as_deref().unwrap_or(pgwire::api::DEFAULT_NAME);
        let (parameters, fields) = match message.target_type {
            b'S' => match client.portal_store().get_statement(name) {
                Some(Entry::Value(stmt)) => {
                    let r = self.do_describe_statement(client, &stmt).await?;
                    let no_data = r.is_no_data();
                    (Some(r.parameters), (!no_data).then_some(r.fields))
                }
                Some(Entry::Empty) => (Some(vec![]), None),
                None => return Err(PgWireError::StatementNotFound(name.to_owned())),
            },
            b'P' => match client.portal_store().get_portal(name) {
                Some(Entry::Value(portal)) => {
                    let r: DescribePortalResponse = self.do_describe_portal(client, &portal).await?;
                    let no_data = r.is_no_data();
                    (None, (!no_data).then_some(r.fields))
                }
                Some(Entry::Empty) => (None, None),
                None => return Err(PgWireError::PortalNotFound(name.to_owned())),
            },
            other => return Err(PgWireError::InvalidTargetType(other)),
        };
        if let Some(types) = parameters {
            let oids = types.iter().map(|t| t.oid()).collect();
            client.feed(PgWireBackendMessage::ParameterDescription(pgwire::messages::data::ParameterDescription::new(oids))).await?;
        }
        match fields {
            Some(f) => {
                let row = pgwire::messages::data::RowDescription::new(f.iter().map(Into::into).collect());
                client.feed(PgWireBackendMessage::RowDescription(row)).await?;
            }
            None => client.feed(PgWireBackendMessage::NoData(pgwire::messages::data::NoData::new())).await?,
        }
        Ok(())
    }

    async fn do_query<C>(&self, client: &mut C, portal: &Portal<Prepared>, _max_rows: usize) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let conn = self.conn(client);
        let prepared = &portal.statement.statement;
        let Some(stmt) = &prepared.stmt else {
            return Ok(Response::EmptyQuery);
        };
        let types: Vec<Option<&DataType>> = prepared.param_types.iter().map(|t| t.as_ref()).collect();
        let params = match params::decode(portal, &types) {
            Ok(p) => p,
            Err(e) => {
                let info = pgwire_error_info(e);
                conn.session.record_failure(&prepared.sql, &Error::InvalidParameter(info.message.clone()));
                return Err(PgWireError::UserError(Box::new(info)));
            }
        };
        if prepared.hooked {
            let plan = prepared.plan.as_deref().cloned().unwrap_or_else(|| LogicalPlan::EmptyRelation(datafusion::logical_expr::EmptyRelation {
                produce_one_row: false,
                schema: Arc::new(datafusion::common::DFSchema::empty()),
            }));
            for hook in &self.hooks {
                if let Some(result) = hook.handle_extended_query(stmt, &plan, &params, self.node.context(), client).await {
                    let t = conn.session.track(&prepared.sql, statement_kind(stmt));
                    match &result {
                        Ok(_) => t.finish_ok(0, 0),
                        Err(e) => t.finish_err(&Error::InvalidParameter(e.to_string())),
                    }
                    return result;
                }
            }
        }
        if let Some(e) = self.refuse_engine_settings(stmt).or_else(|| write_in_transaction(client.transaction_status(), stmt)) {
            conn.session.record_failure(&prepared.sql, &e);
            return Err(to_pg(&e));
        }
        let session = conn.session.with_timeout(statement_timeout(client)).with_routing(settings::routing_policy(client));
        let mut stop = self.stop(&conn, client);
        let (sql, stmt, plan, generic) = (prepared.sql.clone(), Arc::clone(stmt), prepared.plan.clone(), Arc::clone(&prepared.generic));
        let work = started(async move { session.execute(&sql, &stmt, plan.as_deref(), Some(params), Some(&generic)).await });
        match interrupt::run(&self.node.exec(), &mut stop, work).await {
            Ok(ran) => match self.respond(client, &conn, ran, &portal.result_column_format, stop).await {
                Response::Error(info) => Err(PgWireError::UserError(info)),
                other => Ok(other),
            },
            Err(e) => Err(to_pg(&e)),
        }
    }
}

#[async_trait]
impl CopyHandler for Frontend {
    async fn on_copy_data<C>(&self, client: &mut C, copy_data: CopyData) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let conn = self.conn(client);
        // Decoding is CPU work: the sink goes to the execution runtime for each piece.
        let Some((copy, mut sink)) = conn.copy_in.lock().take() else { return Ok(()) };
        let data = copy_data.data;
        let pushed = self.node.exec().spawn(async move {
            let r = sink.push(&data).await;
            (sink, r)
        });
        match pushed.await {
            Ok((sink, Ok(()))) => {
                *conn.copy_in.lock() = Some((copy, sink));
                Ok(())
            }
            Ok((sink, Err(e))) => {
                drop(sink);
                conn.session.abort_copy_in(copy, &e.to_string());
                Err(to_pg(&e))
            }
            Err(join) => {
                let e = Error::Internal(format!("COPY decoder panicked: {join}"));
                conn.session.abort_copy_in(copy, &e.to_string());
                Err(to_pg(&e))
            }
        }
    }

    async fn on_copy_done<C>(&self, client: &mut C, _done: CopyDone) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let conn = self.conn(client);
        let Some((copy, sink)) = conn.copy_in.lock().take() else {
            return Err(to_pg(&Error::BadCopyFormat("no COPY in progress".into())));
        };
        let session = conn.session.clone();
        let finished = self.node.exec().spawn(async move { session.finish_copy_in(copy, sink).await });
        let finished = finished.await.unwrap_or_else(|join| Err(Error::Internal(format!("COPY decoder panicked: {join}"))));
        match finished {
            Ok(Outcome::Command { tag, rows, notice }) => {
                if let Some(n) = notice {
                    let msg = ErrorInfo::new("NOTICE".to_owned(), "00000".to_owned(), n);
                    client.send(PgWireBackendMessage::NoticeResponse(NoticeResponse::from(msg))).await?;
                }
                let tag = Tag::new(tag).with_rows(rows.unwrap_or(0) as usize);
                client.send(PgWireBackendMessage::CommandComplete(tag.into())).await?;
                Ok(())
            }
            Ok(_) => Err(to_pg(&Error::Internal("COPY finished with an unexpected outcome".into()))),
            Err(e) => Err(to_pg(&e)),
        }
    }

    async fn on_copy_fail<C>(&self, client: &mut C, fail: CopyFail) -> PgWireError
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let conn = self.conn(client);
        if let Some((copy, _sink)) = conn.copy_in.lock().take() {
            conn.session.abort_copy_in(copy, &fail.message);
        }
        to_pg(&Error::BadCopyFormat(format!("COPY from stdin failed: {}", fail.message)))
    }
}

struct QuietErrors;

impl ErrorHandler for QuietErrors {
    fn on_error<C>(&self, _client: &C, error: &mut PgWireError)
    where
        C: ClientInfo,
    {
        tracing::debug!(%error, "statement error sent to client");
    }
}

impl PgWireServerHandlers for Frontend {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::new(self.clone_handle())
    }
    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::new(self.clone_handle())
    }
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::clone(&self.startup)
    }
    fn copy_handler(&self) -> Arc<impl CopyHandler> {
        Arc::new(self.clone_handle())
    }
    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(QuietErrors)
    }
    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        Arc::clone(&self.cancel)
    }
}

impl Frontend {
    fn clone_handle(&self) -> Frontend {
        Frontend {
            node: Arc::clone(&self.node),
            parser: Arc::clone(&self.parser),
            hooks: self.hooks.clone(),
            startup: Arc::clone(&self.startup),
            cancel: Arc::clone(&self.cancel),
            cancels: Arc::clone(&self.cancels),
            probes: Arc::clone(&self.probes),
        }
    }

    /// Counts a new named statement (or portal) against `prepared_statements_max`;
    /// names no longer `open` are forgotten first when the limit is reached.
    fn count_named(&self, conn: &ConnState, name: &str, portal: bool, open: impl Fn(&str) -> bool) -> PgWireResult<()> {
        let max = self.node.config().prepared_statements_max;
        let mut named = conn.named.lock();
        let set = if portal { &mut named.1 } else { &mut named.0 };
        if set.contains(name) {
            return Ok(());
        }
        if set.len() >= max {
            set.retain(|n| open(n));
        }
        if set.len() >= max {
            let what = if portal { "portals" } else { "prepared statements" };
            return Err(to_pg(&Error::TooManyObjects(format!(
                "this connection holds {max} named {what} (prepared_statements_max); close some first"
            ))));
        }
        set.insert(name.to_string());
        Ok(())
    }

    /// Registers the client-liveness probe of a connection for as long as it lives.
    fn watch(&self, peer: SocketAddr, socket: &tokio::net::TcpStream) -> ProbeEntry {
        if let Some(p) = Probe::of(socket) {
            self.probes.lock().insert(peer, p);
        }
        ProbeEntry { probes: Arc::clone(&self.probes), peer }
    }
}

struct ProbeEntry {
    probes: Arc<Mutex<HashMap<SocketAddr, Probe>>>,
    peer: SocketAddr,
}

impl Drop for ProbeEntry {
    fn drop(&mut self) {
        self.probes.lock().remove(&self.peer);
    }
}

/// A Bind must supply one value per parameter, and 0, 1 or one format code per value
/// (and per result column); codes are 0 (text) or 1 (binary). As PostgreSQL: 08P01
/// for the counts, 22023 for an unknown code.
fn check_bind(
    bind: &pgwire::messages::extendedquery::Bind,
    name: &str,
    stmt: &pgwire::api::stmt::StoredStatement<Prepared>,
) -> PgWireResult<()> {
    let violation = |code: &str, msg: String| PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".to_owned(), code.to_owned(), msg)));
    let required = stmt.parameter_types.len().max(stmt.statement.param_types.len());
    let given = bind.parameters.len();
    if given != required {
        return Err(violation(
            "08P01",
            format!("bind message supplies {given} parameters, but prepared statement \"{name}\" requires {required}"),
        ));
    }
    let formats = bind.parameter_format_codes.len();
    if formats > 1 && formats != given {
        return Err(violation("08P01", format!("bind message has {formats} parameter formats but {given} parameters")));
    }
    let columns = match (&stmt.statement.plan, &stmt.statement.stmt) {
        (Some(plan), Some(_)) if !matches!(**plan, LogicalPlan::Dml(_) | LogicalPlan::Ddl(_)) => Some(plan.schema().fields().len()),
        _ => None,
    };
    let results = bind.result_column_format_codes.len();
    if let Some(columns) = columns {
        if results > 1 && results != columns {
            return Err(violation("08P01", format!("bind message has {results} result formats but query has {columns} columns")));
        }
    }
    if let Some(c) = bind.parameter_format_codes.iter().chain(&bind.result_column_format_codes).find(|c| !matches!(c, 0 | 1)) {
        return Err(violation("22023", format!("unsupported format code: {c}")));
    }
    Ok(())
}

/// A running pgwire listener.
pub struct Server {
    pub local_addr: SocketAddr,
    handle: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port) and serves connections until stopped.
    pub async fn start(node: Arc<Node>, addr: SocketAddr) -> crate::error::Result<Server> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on {addr}: {e}")))?;
        let local_addr = listener.local_addr()?;
        let cfg = node.config();
        let admission = admission::Admission::new(admission::Limits {
            connections_max: cfg.connections_max,
            reserved_loopback: cfg.reserved_connections,
            per_address_max: cfg.connections_per_address_max,
            pending_max: cfg.startup_pending_max,
        });
        let startup_timeout = Duration::from_millis(cfg.startup_timeout_ms.max(1));
        let frontend = Frontend::new(node);
        let handle = tokio::spawn(async move {
            loop {
                let (socket, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and similar: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = socket.set_nodelay(true);
                let ticket = match admission.admit(peer.ip()) {
                    Ok(t) => t,
                    Err(refusal) => {
                        tokio::spawn(refuse(socket, refusal.message()));
                        continue;
                    }
                };
                let f = Arc::clone(&frontend);
                tokio::spawn(async move {
                    let _probe = f.watch(peer, &socket);
                    wire::serve(socket, &f, ticket, startup_timeout).await;
                });
            }
        });
        Ok(Server { local_addr, handle })
    }

    pub fn stop(&self) {
        self.handle.abort();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Tells a client over the connection limit why, as PostgreSQL does (53300).
async fn refuse(mut socket: tokio::net::TcpStream, message: &'static str) {
    use tokio::io::AsyncWriteExt;
    let mut body = Vec::new();
    for (k, v) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', "53300"), (b'M', message)] {
        body.push(k);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    msg.extend_from_slice(&body);
    let _ = socket.write_all(&msg).await;
    let _ = socket.shutdown().await;
}
