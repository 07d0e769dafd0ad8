//! `system.events`: known future events that scale forecasts. The one writable system
//! table: `INSERT INTO system.events (name, scope, key, starts_at, ends_at, multiplier)`
//! and `DELETE FROM system.events WHERE ...`.
//!
//! Owns: the SQL surface of events (schema, INSERT sink, DELETE). Must never: store an
//! event that fails validation (a statement's events are checked whole first), or keep
//! events only in memory (the forecaster persists them in the data directory).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray, TimestampMicrosecondArray, UInt64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType};
use datafusion::catalog::Session;
use datafusion::common::{DFSchema, Result as DfResult};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::datasource::{TableProvider, TableType};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan};
use futures::TryStreamExt;

use crate::clock::Clock;
use crate::error::Error;
use crate::forecaster::{Event, Forecaster};

pub fn schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, None);
    Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, false),
        Field::new("scope", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, true),
        Field::new("starts_at", ts.clone(), false),
        Field::new("ends_at", ts.clone(), false),
        Field::new("multiplier", DataType::Float64, false),
        Field::new("created_at", ts, true),
    ]))
}

fn batch(events: &[Event]) -> DfResult<RecordBatch> {
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(events.iter().map(|e| e.name.as_str()).collect::<Vec<_>>())),
        Arc::new(StringArray::from(events.iter().map(|e| e.scope.as_str()).collect::<Vec<_>>())),
        Arc::new(StringArray::from(events.iter().map(|e| (!e.key.is_empty()).then_some(e.key.as_str())).collect::<Vec<_>>())),
        Arc::new(TimestampMicrosecondArray::from(events.iter().map(|e| e.starts_at_us).collect::<Vec<_>>())),
        Arc::new(TimestampMicrosecondArray::from(events.iter().map(|e| e.ends_at_us).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(events.iter().map(|e| e.multiplier).collect::<Vec<_>>())),
        Arc::new(TimestampMicrosecondArray::from(events.iter().map(|e| Some(e.created_at_us)).collect::<Vec<_>>())),
    ];
    Ok(RecordBatch::try_new(schema(), cols)?)
}

fn count_batch(n: u64) -> DfResult<Arc<dyn ExecutionPlan>> {
    let s = Arc::new(Schema::new(vec![Field::new("count", DataType::UInt64, false)]));
    let b = RecordBatch::try_new(Arc::clone(&s), vec![Arc::new(UInt64Array::from(vec![n]))])?;
    Ok(MemorySourceConfig::try_new_exec(&[vec![b]], s, None)?)
}

#[derive(Debug)]
pub struct EventsTable {
    forecaster: Arc<Forecaster>,
    clock: Clock,
}

impl EventsTable {
    pub fn new(forecaster: Arc<Forecaster>, clock: Clock) -> EventsTable {
        EventsTable { forecaster, clock }
    }
}

#[async_trait]
impl TableProvider for EventsTable {
    fn schema(&self) -> SchemaRef {
        schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let b = batch(&self.forecaster.events())?;
        Ok(MemorySourceConfig::try_new_exec(&[vec![b]], schema(), projection.cloned())?)
    }

    async fn insert_into(
        &self,
        _state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        op: InsertOp,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if op != InsertOp::Append {
            return Err(Error::NotSupported(format!("{op} into system.events; only INSERT INTO is supported")).into());
        }
        let nullable = Arc::new(Schema::new(schema().fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect::<Vec<_>>()));
        let sink = EventsSink { forecaster: Arc::clone(&self.forecaster), clock: self.clock.clone(), schema: nullable };
        Ok(Arc::new(DataSinkExec::new(input, Arc::new(sink), None)))
    }

    async fn delete_from(&self, state: &dyn Session, filters: Vec<Expr>) -> DfResult<Arc<dyn ExecutionPlan>> {
        refuse_staged(state.config())?;
        let events = self.forecaster.events();
        let b = batch(&events)?;
        let doomed: Vec<Event> = match datafusion::logical_expr::utils::conjunction(filters) {
            None => events,
            Some(predicate) => {
                let df_schema = DFSchema::try_from(schema().as_ref().clone())?;
                let p = state.create_physical_expr(predicate, &df_schema)?;
                let mask = p.evaluate(&b)?.into_array(b.num_rows())?;
                let mask = mask.as_boolean();
                events.into_iter().enumerate().filter(|(i, _)| mask.is_valid(*i) && mask.value(*i)).map(|(_, e)| e).collect()
            }
        };
        let removed = self.forecaster.remove_events(|_, e| doomed.contains(e))?;
        count_batch(removed)
    }
}

/// Collects an INSERT's rows, validates them all, then stores them.
#[derive(Debug)]
struct EventsSink {
    forecaster: Arc<Forecaster>,
    clock: Clock,
    schema: SchemaRef,
}

impl DisplayAs for EventsSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventsSink")
    }
}

#[async_trait]
impl DataSink for EventsSink {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn write_all(&self, data: SendableRecordBatchStream, ctx: &Arc<TaskContext>) -> DfResult<u64> {
        refuse_staged(ctx.session_config())?;
        let batches: Vec<RecordBatch> = data.try_collect().await?;
        let now = self.clock.now_us();
        let mut events = Vec::new();
        for b in &batches {
            let text = |i: usize| -> DfResult<StringArray> { Ok(cast(b.column(i), &DataType::Utf8)?.as_string::<i32>().clone()) };
            let (name, scope, key) = (text(0)?, text(1)?, text(2)?);
            let ts = |i: usize| -> DfResult<TimestampMicrosecondArray> {
                Ok(cast(b.column(i), &DataType::Timestamp(TimeUnit::Microsecond, None))?.as_primitive::<TimestampMicrosecondType>().clone())
            };
            let (starts, ends) = (ts(3)?, ts(4)?);
            let mult = cast(b.column(5), &DataType::Float64)?;
            let mult = mult.as_primitive::<Float64Type>();
            for r in 0..b.num_rows() {
                let row = events.len() + 1;
                let need = |a: &dyn Array, col: &str| -> DfResult<()> {
                    if a.is_null(r) {
                        return Err(Error::NotNullViolation { table: "system.events".into(), column: col.into(), row: row as u64 }.into());
                    }
                    Ok(())
                };
                need(&name, "name")?;
                need(&scope, "scope")?;
                need(&starts, "starts_at")?;
                need(&ends, "ends_at")?;
                need(mult, "multiplier")?;
                events.push(Event {
                    name: name.value(r).to_string(),
                    scope: scope.value(r).to_ascii_lowercase(),
                    key: if key.is_null(r) { String::new() } else { key.value(r).to_string() },
                    starts_at_us: starts.value(r),
                    ends_at_us: ends.value(r),
                    multiplier: mult.value(r),
                    created_at_us: now,
                });
            }
        }
        Ok(self.forecaster.add_events(events, now)?)
    }
}

/// Events are stored at once, so they cannot wait for the end of a multi-statement
/// query (its implicit transaction): such a write is refused rather than kept when a
/// later statement fails.
fn refuse_staged(config: &datafusion::prelude::SessionConfig) -> DfResult<()> {
    if config.get_extension::<crate::storage::write_stage::WriteStage>().is_some() {
        return Err(crate::error::Error::NotSupported(
            "writes to system.events inside a multi-statement query; send them as their own statements".into(),
        )
        .into());
    }
    Ok(())
}
