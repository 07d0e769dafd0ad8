//! Runs every `sql/*.slt` file three times: in-process (through `Session`), over the
//! wire with the simple protocol, and over the wire with the extended protocol.

mod common;

use std::path::PathBuf;

use async_trait::async_trait;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use futures::TryStreamExt;
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType};
use tidemark::session::Outcome;

use common::{normalize_value, TestNode};

#[derive(Debug)]
struct SltError(String);
impl std::fmt::Display for SltError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for SltError {}

fn tm_err(e: tidemark::Error) -> SltError {
    SltError(format!("{}: {}", e.sqlstate(), e.message()))
}

fn pg_err(e: tokio_postgres::Error) -> SltError {
    match e.as_db_error() {
        Some(db) => SltError(format!("{}: {}", db.code().code(), db.message())),
        None => SltError(format!("connection: {e}")),
    }
}

enum Mode {
    InProcess,
    Simple(tokio_postgres::Client),
    Extended(tokio_postgres::Client),
}

struct Db {
    node: TestNode,
    mode: Mode,
}

fn batches_to_rows(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let opts = FormatOptions::default().with_null("NULL");
    let mut rows = Vec::new();
    for b in batches {
        let fmts: Vec<ArrayFormatter> = b.columns().iter().map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).unwrap()).collect();
        let bools: Vec<bool> = b.columns().iter().map(|c| c.data_type() == &datafusion::arrow::datatypes::DataType::Boolean).collect();
        for i in 0..b.num_rows() {
            rows.push(
                fmts.iter()
                    .zip(&bools)
                    .map(|(f, is_bool)| {
                        let v = f.value(i).to_string();
                        // PostgreSQL's text form of booleans.
                        match (*is_bool, v.as_str()) {
                            (true, "true") => "t".to_string(),
                            (true, "false") => "f".to_string(),
                            _ => normalize_value(&v),
                        }
                    })
                    .collect(),
            );
        }
    }
    rows
}

fn pg_value(row: &tokio_postgres::Row, i: usize) -> String {
    use tokio_postgres::types::Type;
    let ty = row.columns()[i].type_().clone();
    let s: Option<String> = match ty {
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => row.get(i),
        Type::INT8 => row.get::<_, Option<i64>>(i).map(|v| v.to_string()),
        Type::INT4 => row.get::<_, Option<i32>>(i).map(|v| v.to_string()),
        Type::INT2 => row.get::<_, Option<i16>>(i).map(|v| v.to_string()),
        Type::FLOAT8 => row.get::<_, Option<f64>>(i).map(|v| v.to_string()),
        Type::FLOAT4 => row.get::<_, Option<f32>>(i).map(|v| v.to_string()),
        Type::BOOL => row.get::<_, Option<bool>>(i).map(|v| if v { "t" } else { "f" }.to_string()),
        Type::NUMERIC => row.get::<_, Option<rust_decimal::Decimal>>(i).map(|v| v.to_string()),
        Type::TIMESTAMP => row.get::<_, Option<chrono::NaiveDateTime>>(i).map(|v| v.format("%Y-%m-%d %H:%M:%S%.f").to_string()),
        Type::TIMESTAMPTZ => row
            .get::<_, Option<chrono::DateTime<chrono::Utc>>>(i)
            .map(|v| v.naive_utc().format("%Y-%m-%d %H:%M:%S%.f").to_string()),
        other => panic!("slt extended mode: add a conversion for column type {other}"),
    };
    s.map(|v| normalize_value(&v)).unwrap_or_else(|| "NULL".into())
}

#[async_trait]
impl AsyncDB for Db {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltError> {
        match &self.mode {
            Mode::InProcess => {
                let session = self.node.session();
                let stmts = session.parse(sql).map_err(tm_err)?;
                let mut last = DBOutput::StatementComplete(0);
                for stmt in &stmts {
                    last = match session.execute(sql, stmt, None, None, None).await.map_err(tm_err)? {
                        Outcome::Rows { schema, stream } => {
                            let batches: Vec<RecordBatch> = stream.try_collect().await.map_err(|e| tm_err(e.into()))?;
                            DBOutput::Rows {
                                types: vec![DefaultColumnType::Any; schema.fields().len()],
                                rows: batches_to_rows(&batches),
                            }
                        }
                        Outcome::Command { rows, .. } => DBOutput::StatementComplete(rows.unwrap_or(0)),
                        Outcome::CopyIn(_) | Outcome::CopyOut { .. } => {
                            return Err(SltError("COPY STDIN/STDOUT is tested over the wire".into()))
                        }
                    };
                }
                Ok(last)
            }
            Mode::Simple(client) => {
                let msgs = client.simple_query(sql).await.map_err(pg_err)?;
                let mut rows = Vec::new();
                let mut cols = None;
                let mut count = None;
                for m in msgs {
                    match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => {
                            cols = Some(r.len());
                            rows.push((0..r.len()).map(|i| r.get(i).map(normalize_value).unwrap_or_else(|| "NULL".into())).collect());
                        }
                        tokio_postgres::SimpleQueryMessage::RowDescription(d) => cols = Some(d.len()),
                        tokio_postgres::SimpleQueryMessage::CommandComplete(n) => count = Some(n),
                        _ => {}
                    }
                }
                match cols {
                    Some(n) => Ok(DBOutput::Rows { types: vec![DefaultColumnType::Any; n], rows }),
                    None => Ok(DBOutput::StatementComplete(count.unwrap_or(0))),
                }
            }
            Mode::Extended(client) => {
                let stmt = client.prepare(sql).await.map_err(pg_err)?;
                if stmt.columns().is_empty() {
                    let n = client.execute(&stmt, &[]).await.map_err(pg_err)?;
                    return Ok(DBOutput::StatementComplete(n));
                }
                let rows = client.query(&stmt, &[]).await.map_err(pg_err)?;
                Ok(DBOutput::Rows {
                    types: vec![DefaultColumnType::Any; stmt.columns().len()],
                    rows: rows.iter().map(|r| (0..r.len()).map(|i| pg_value(r, i)).collect()).collect(),
                })
            }
        }
    }

    async fn shutdown(&mut self) {}

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await;
    }
}

fn slt_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sql");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files under {}", dir.display());
    files
}

async fn run_all(mode: &'static str) {
    for file in slt_files() {
        let node = TestNode::start().await;
        let mode_value = match mode {
            "in-process" => Mode::InProcess,
            "simple" => Mode::Simple(node.client().await),
            _ => Mode::Extended(node.client().await),
        };
        let db = std::sync::Arc::new(tokio::sync::Mutex::new(Some(Db { node, mode: mode_value })));
        let mut runner = sqllogictest::Runner::new(move || {
            let db = db.clone();
            async move { Ok(db.lock().await.take().expect("one connection per file")) }
        });
        runner.add_label(mode);
        runner
            .run_file_async(&file)
            .await
            .unwrap_or_else(|e| panic!("{} ({mode}):\n{e}", file.display()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_in_process() {
    run_all("in-process").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_simple_protocol() {
    run_all("simple").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_extended_protocol() {
    run_all("extended").await;
}
