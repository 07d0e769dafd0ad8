//! Tidemark's own session settings over pgwire: `SET tidemark.routing_policy = '...'`,
//! `SET tidemark.routing_policy TO DEFAULT`, `RESET` and `SHOW tidemark.routing_policy`.
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

/// The client-metadata key of the session's routing policy.
pub const ROUTING_POLICY_KEY: &str = "tidemark.routing_policy";

/// The session's routing policy, when it chose one.
pub fn routing_policy<C: ClientInfo + ?Sized>(client: &C) -> Option<Policy> {
    client.metadata().get(ROUTING_POLICY_KEY).and_then(|v| Policy::parse(v))
}

enum Action {
    Set(Option<Policy>),
    Show,
}

fn action(stmt: &Statement) -> Option<PgWireResult<Action>> {
    match stmt {
        Statement::Set(Set::SingleAssignment { variable, values, .. })
            if variable.to_string().eq_ignore_ascii_case(ROUTING_POLICY_KEY) =>
        {
            let text = match values.first() {
                Some(Expr::Value(v)) => match &v.value {
                    Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
                    other => other.to_string(),
                },
                Some(Expr::Identifier(i)) => i.value.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
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
        Statement::ShowVariable { variable } if variable.iter().map(|i| i.value.as_str()).collect::<Vec<_>>().join(".").eq_ignore_ascii_case(ROUTING_POLICY_KEY) => {
            Some(Ok(Action::Show))
        }
        _ => None,
    }
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
            Action::Show => {
                let value = routing_policy(&*client).unwrap_or(self.node_policy).as_str().to_string();
                let fields = Arc::new(vec![FieldInfo::new(ROUTING_POLICY_KEY.into(), None, None, Type::VARCHAR, FieldFormat::Text)]);
                let mut encoder = DataRowEncoder::new(Arc::clone(&fields));
                encoder.encode_field(&Some(value))?;
                let row = encoder.take_row();
                Ok(Response::Query(QueryResponse::new(fields, Box::pin(futures::stream::once(async move { Ok(row) })))))
            }
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
        Some(act.map(|_| {
            LogicalPlan::EmptyRelation(EmptyRelation { produce_one_row: true, schema: Arc::new(DFSchema::empty()) })
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
