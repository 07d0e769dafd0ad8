//! Moving rows in and out as files: COPY TO a Parquet or CSV file, COPY TO STDOUT as
//! text or CSV, and reading the bytes of a COPY FROM source (a path or a URL).
//!
//! Owns: file formats at the edge. Must never: leave a half-written output file under
//! its final name (files are written beside it and renamed when complete).

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::DataFrame;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;

use crate::error::{Error, Result};

/// Writes the rows of `df` to a local file as Parquet (by `format` or the `.parquet`
/// extension) or CSV. Returns the number of rows.
pub async fn write_file(df: DataFrame, filename: &str, format: Option<&str>) -> Result<u64> {
    let path = PathBuf::from(filename);
    let format = match format {
        Some(f) => f.to_string(),
        None if filename.ends_with(".parquet") => "parquet".into(),
        None if filename.ends_with(".csv") => "csv".into(),
        None => return Err(Error::InvalidParameter("COPY TO a file needs WITH (FORMAT parquet|csv) or a .parquet/.csv name".into())),
    };
    let schema = Arc::new(df.schema().as_arrow().clone());
    let mut stream = df.execute_stream().await?;
    let tmp = path.with_extension(format!("tidemark-tmp-{}", std::process::id()));
    let file = std::fs::File::create(&tmp).map_err(|e| Error::Io(std::io::Error::new(e.kind(), format!("{filename}: {e}"))))?;
    let mut rows = 0u64;
    let result: Result<()> = async {
        match format.as_str() {
            "parquet" => {
                let mut w = parquet::arrow::ArrowWriter::try_new(file.try_clone()?, schema, None)?;
                while let Some(b) = stream.try_next().await? {
                    rows += b.num_rows() as u64;
                    w.write(&b)?;
                }
                w.close()?;
                file.sync_all()?;
            }
            "csv" => {
                let mut w = datafusion::arrow::csv::WriterBuilder::new().with_header(true).build(file);
                while let Some(b) = stream.try_next().await? {
                    rows += b.num_rows() as u64;
                    w.write(&b)?;
                }
                w.into_inner().sync_all()?;
            }
            other => return Err(Error::NotSupported(format!("COPY TO with FORMAT {other}"))),
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            std::fs::rename(&tmp, &path)?;
            Ok(rows)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Encodes a result stream for COPY TO STDOUT: PostgreSQL's text format (tab separated,
/// `\N` for NULL) or CSV.
pub fn encode_text(
    stream: SendableRecordBatchStream,
    csv: bool,
    delimiter: u8,
    header: bool,
) -> futures::stream::BoxStream<'static, Result<Bytes>> {
    let mut first = true;
    stream
        .map(move |b: datafusion::error::Result<RecordBatch>| -> Result<Vec<Bytes>> {
            let b = b?;
            // One message per row: clients and pgwire count rows by CopyData messages.
            let mut rows = Vec::with_capacity(b.num_rows());
            for i in 0..b.num_rows() {
                let mut buf = Vec::new();
                {
                    let mut w = datafusion::arrow::csv::WriterBuilder::new()
                        .with_header(header && first)
                        .with_delimiter(delimiter);
                    if !csv {
                        w = w.with_null("\\N".to_string()).with_quote(b'\x01');
                    }
                    let mut w = w.build(&mut buf);
                    w.write(&b.slice(i, 1))?;
                }
                first = false;
                rows.push(Bytes::from(buf));
            }
            Ok(rows)
        })
        .flat_map(|r| match r {
            Ok(rows) => futures::stream::iter(rows.into_iter().map(Ok).collect::<Vec<_>>()),
            Err(e) => futures::stream::iter(vec![Err(e)]),
        })
        .boxed()
}

/// Reads a whole COPY FROM source: a local path, a `file://` URL or an `s3://` URL
/// (credentials from the `AWS_*` environment variables).
pub async fn read_source(source: &str) -> Result<Bytes> {
    if let Ok(url) = url::Url::parse(source) {
        match url.scheme() {
            "file" => return read_local(url.path()),
            "s3" | "s3a" => {
                let store = object_store::aws::AmazonS3Builder::from_env().with_url(source).build()?;
                let path = object_store::path::Path::from(url.path().trim_start_matches('/'));
                let got = store.get(&path).await?;
                return Ok(got.bytes().await?);
            }
            // A Windows-style or relative path parses as a one-letter scheme; fall through.
            s if s.len() > 1 => return Err(Error::NotSupported(format!("COPY FROM {s}:// sources"))),
            _ => {}
        }
    }
    read_local(source)
}

fn read_local(path: &str) -> Result<Bytes> {
    match std::fs::read(path) {
        Ok(b) => Ok(Bytes::from(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::UndefinedFile(path.to_string())),
        Err(e) => Err(Error::Io(std::io::Error::new(e.kind(), format!("{path}: {e}")))),
    }
}
