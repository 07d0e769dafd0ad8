//! Tidemark's own session settings over pgwire: `SET tidemark.routing_policy = '...'`,
//! `SET tidemark.routing_policy TO DEFAULT`, `RESET` and `SHOW tidemark.routing_policy`;
//! read-your-writes across connections: `SHOW tidemark.write_token` (what this
//! connection's writes reached) and `SET tidemark.read_after = '<token>'` (this
//! connection's reads then wait for those writes too; the token only grows within a
//! connection, so `TO DEFAULT` changes nothing).
//!
//! Owns: the client-metadata key each setting lives under, and its validation (an
//! unknown value is refused with 22023, as PostgreSQL refuses a bad enum setting).
//! Must never: let a setting of one connection change another's (the value lives in
//! the connection's metadata, read per statement).

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::common::{DFSchema, ParamValues};
use datafusion::logical_expr::{EmptyRelation, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::sqlparser::ast::{Expr, Set, Statement, Value};
use datafusion_postgres::hooks::HookClient;
use datafusion_postgres::QueryHook;
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::{ClientInfo, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};

use crate::router::Policy;
use crate::write_token::{TokenCell, WriteToken};

/// The client-metadata key of the session's routing policy.
pub const ROUTING_POLICY_KEY: &str = "tidemark.routing_policy";

/// The setting that makes a connection's reads wait for a token's writes.
pub const READ_AFTER_KEY: &str = "tidemark.read_after";
/// What this connection's writes reached (read-only).
pub const WRITE_TOKEN_KEY: &str = "tidemark.write_token";

/// The session's routing policy, when it chose one.
pub fn routing_policy<C: ClientInfo + ?Sized>(client: &C) -> Option<Policy> {
    client.metadata().get(ROUTING_POLICY_KEY).and_then(|v| Policy::parse(v))
}

enum Action {
    Set(Option<Policy>),
    Show,
    ReadAfter(WriteToken),
    ShowToken(&'static str),
}

fn user_error(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".into(), code.into(), message)))
}

fn action(stmt: &Statement) -> Option<PgWireResult<Action>> {
    match stmt {
        Statement::Set(Set::SingleAssignment { variable, values, .. }) if variable.to_string().eq_ignore_ascii_case(READ_AFTER_KEY) => {
            let text = value_text(values.first());
            if text.eq_ignore_ascii_case("default") {
                return Some(Ok(Action::ReadAfter(WriteToken::default())));
            }
            Some(text.parse::<WriteToken>().map(Action::ReadAfter).map_err(|e| user_error("22023", e.to_string())))
        }
        Statement::Set(Set::SingleAssignment { variable, .. }) if variable.to_string().eq_ignore_ascii_case(WRITE_TOKEN_KEY) => Some(Err(
            user_error("55P02", format!("parameter \"{WRITE_TOKEN_KEY}\" cannot be changed: set {READ_AFTER_KEY} to wait for another session's writes")),
        )),
        Statement::ShowVariable { variable } if [READ_AFTER_KEY, WRITE_TOKEN_KEY].iter().any(|k| dotted(variable).eq_ignore_ascii_case(k)) => {
            let key = if dotted(variable).eq_ignore_ascii_case(READ_AFTER_KEY) { READ_AFTER_KEY } else { WRITE_TOKEN_KEY };
            Some(Ok(Action::ShowToken(key)))
        }
        Statement::Set(Set::SingleAssignment { variable, values, .. })
            if variable.to_string().eq_ignore_ascii_case(ROUTING_POLICY_KEY) =>
        {
            let text = value_text(values.first());
            if text.eq_ignore_ascii_case("default") {
                return Some(Ok(Action::Set(None)));
            }
            Some(match Policy::parse(&text) {
                Some(p) => Ok(Action::Set(Some(p))),
                None => Err(PgWireError::UserError(Box::new(ErrorInfo::new(
                    "ERROR".into(),
                    "22023".into(),
                    format!(
                        "invalid value for parameter \"{ROUTING_POLICY_KEY}\": \"{text}\" (round_robin, least_in_flight, power_of_two or predictive)"
                    ),
                )))),
            })
        }
        Statement::ShowVariable { variable } if dotted(variable).eq_ignore_ascii_case(ROUTING_POLICY_KEY) => Some(Ok(Action::Show)),
        _ => None,
    }
}

fn dotted(variable: &[datafusion::sql::sqlparser::ast::Ident]) -> String {
    variable.iter().map(|i| i.value.as_str()).collect::<Vec<_>>().join(".")
}

/// A SET's value as text (quoted or not).
fn value_text(value: Option<&Expr>) -> String {
    match value {
        Some(Expr::Value(v)) => match &v.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
            other => other.to_string(),
        },
        Some(Expr::Identifier(i)) => i.value.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

fn one_text_row(name: &str, value: String) -> PgWireResult<Response> {
    let fields = Arc::new(vec![FieldInfo::new(name.into(), None, None, Type::VARCHAR, FieldFormat::Text)]);
    let mut encoder = DataRowEncoder::new(Arc::clone(&fields));
    encoder.encode_field(&Some(value))?;
    let row = encoder.take_row();
    Ok(Response::Query(QueryResponse::new(fields, Box::pin(futures::stream::once(async move { Ok(row) })))))
}

/// Answers Tidemark's settings before datafusion-postgres's SET/SHOW hook sees them.
pub struct SettingsHook {
    /// The node's policy, shown when the session chose none.
    pub node_policy: Policy,
}

impl SettingsHook {
    fn respond(&self, act: Action, client: &mut dyn HookClient) -> PgWireResult<Response> {
        match act {
            Action::Set(Some(p)) => {
                client.metadata_mut().insert(ROUTING_POLICY_KEY.to_string(), p.as_str().to_string());
                Ok(Response::Execution(Tag::new("SET")))
            }
            Action::Set(None) => {
                client.metadata_mut().remove(ROUTING_POLICY_KEY);
                Ok(Response::Execution(Tag::new("SET")))
            }
            Action::Show => one_text_row(ROUTING_POLICY_KEY, routing_policy(&*client).unwrap_or(self.node_policy).as_str().to_string()),
            Action::ReadAfter(token) => {
                client.session_extensions().get_or_insert_with(TokenCell::default).merge(&token);
                Ok(Response::Execution(Tag::new("SET")))
            }
            Action::ShowToken(key) => one_text_row(key, client.session_extensions().get_or_insert_with(TokenCell::default).get().to_string()),
        }
    }
}

#[async_trait]
impl QueryHook for SettingsHook {
    async fn handle_simple_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        let act = action(statement)?;
        Some(act.and_then(|a| self.respond(a, client)))
    }

    async fn handle_extended_parse_query(
        &self,
        statement: &Statement,
        _ctx: &SessionContext,
        _client: &(dyn ClientInfo + Send + Sync),
    ) -> Option<PgWireResult<LogicalPlan>> {
        let act = action(statement)?;
        Some(act.and_then(|a| {
            let empty = LogicalPlan::EmptyRelation(EmptyRelation { produce_one_row: true, schema: Arc::new(DFSchema::empty()) });
            // A SHOW describes its one text column, so that a driver's Describe matches
            // the row it gets.
            let column = match a {
                Action::Show => ROUTING_POLICY_KEY,
                Action::ShowToken(key) => key,
                Action::Set(_) | Action::ReadAfter(_) => return Ok(empty),
            };
            datafusion::logical_expr::LogicalPlanBuilder::from(empty)
                .project(vec![datafusion::prelude::lit("").alias(column)])
                .and_then(|b| b.build())
                .map_err(|e| PgWireError::ApiError(Box::new(e)))
        }))
    }

    async fn handle_extended_query(
        &self,
        statement: &Statement,
        _plan: &LogicalPlan,
        _params: &ParamValues,
        _ctx: &SessionContext,
        client: &mut dyn HookClient,
    ) -> Option<PgWireResult<Response>> {
        let act = action(statement)?;
        Some(act.and_then(|a| self.respond(a, client)))
    }
}
