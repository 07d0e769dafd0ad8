//! Ingestion: turning rows from INSERT, COPY (CSV or Parquet) and `tidemark ingest` into
//! rows of a table's schema, checked whole before anything is stored.
//!
//! Owns: validation and conversion of input batches (column names, types, NOT NULL,
//! Tidemark-set columns), and reading CSV / Parquet input.
//! Must never: store anything itself (that is `storage::append`, called once per
//! statement after every batch passed), or accept a row it would have to alter silently.

use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{new_null_array, Array, ArrayRef, RecordBatch, TimestampMicrosecondArray};
use datafusion::arrow::compute::{cast_with_options, CastOptions};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::catalog::TableDef;
use crate::error::{Error, Result};

/// Rows per batch when decoding CSV or Parquet input.
pub const DECODE_BATCH_ROWS: usize = 64 * 1024;

/// Converts `batch` (columns named as in the table, in any order, possibly a subset,
/// possibly of other but convertible types) into the table's schema. `first_row` is the
/// 0-based position of the batch's first row in the statement, for error messages.
pub fn conform(table: &TableDef, batch: &RecordBatch, first_row: u64, ingest_time_us: i64) -> Result<RecordBatch> {
    let input = batch.schema();
    for f in input.fields() {
        if table.schema.field_with_name(&f.name().to_ascii_lowercase()).is_err() {
            return Err(Error::UndefinedColumnOf { table: table.name.clone(), column: f.name().clone() });
        }
    }
    let n = batch.num_rows();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(table.schema.fields().len());
    for target in table.schema.fields() {
        let name = target.name();
        if table.ingest_time_column.as_deref() == Some(name.as_str()) {
            // Tidemark sets the ingest time, whatever the input says.
            columns.push(Arc::new(TimestampMicrosecondArray::from(vec![ingest_time_us; n])));
            continue;
        }
        let source = input
            .fields()
            .iter()
            .position(|f| f.name().eq_ignore_ascii_case(name))
            .map(|i| batch.column(i).clone());
        let col = match source {
            None => new_null_array(target.data_type(), n),
            Some(a) => convert(&table.name, name, &a, target.data_type(), first_row)?,
        };
        columns.push(col);
    }
    // Types first (a wrong file is reported as such), then NOT NULL.
    for (target, col) in table.schema.fields().iter().zip(&columns) {
        if !target.is_nullable() && col.null_count() > 0 {
            let row = (0..n).find(|&i| col.is_null(i)).unwrap_or(0);
            return Err(Error::NotNullViolation {
                table: table.name.clone(),
                column: target.name().clone(),
                row: first_row + row as u64 + 1,
            });
        }
    }
    Ok(RecordBatch::try_new(Arc::clone(&table.schema), columns)?)
}

/// Casts one column, naming the first row that does not convert.
pub fn convert(table: &str, column: &str, a: &ArrayRef, to: &DataType, first_row: u64) -> Result<ArrayRef> {
    if a.data_type() == to {
        return Ok(a.clone());
    }
    // A timestamp with a time zone is an instant: keep its UTC value.
    let a = match (a.data_type(), to) {
        (DataType::Timestamp(_, Some(_)), DataType::Timestamp(unit, None)) => {
            let same_zone = cast_with_options(a, &DataType::Timestamp(*unit, Some("UTC".into())), &CastOptions::default())?;
            let ts = same_zone
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .ok_or_else(|| Error::Internal("timestamp cast produced another type".into()))?;
            return Ok(Arc::new(ts.clone().with_timezone_opt(None::<String>)));
        }
        _ => a.clone(),
    };
    if !datafusion::arrow::compute::can_cast_types(a.data_type(), to) || !allowed_conversion(a.data_type(), to) {
        return Err(Error::DatatypeMismatch(format!(
            "column \"{column}\" of relation \"{table}\" is of type {} but the input is of type {}",
            sql_type_name(to),
            sql_type_name(a.data_type())
        )));
    }
    let safe = CastOptions { safe: true, ..Default::default() };
    let out = cast_with_options(&a, to, &safe)?;
    if out.null_count() > a.null_count() {
        let bad = (0..a.len()).find(|&i| a.is_valid(i) && out.is_null(i)).unwrap_or(0);
        let fmt = ArrayFormatter::try_new(a.as_ref(), &FormatOptions::default())?;
        return Err(Error::InvalidText(format!(
            "invalid input syntax for type {} in column \"{column}\" at row {}: \"{}\"",
            sql_type_name(to),
            first_row + bad as u64 + 1,
            fmt.value(bad)
        )));
    }
    Ok(out)
}

/// DataFusion casts an INSERT's values to the column types, numbers to timestamps
/// included (as microseconds since 1970), which would store wrong times without a
/// word. PostgreSQL refuses such an assignment (42804); so does this, naming the column
/// and, for `VALUES`, the row.
pub fn check_insert_casts(plan: &datafusion::logical_expr::LogicalPlan) -> Result<()> {
    use datafusion::logical_expr::{Expr, ExprSchemable, LogicalPlan};
    let LogicalPlan::Dml(dml) = plan else { return Ok(()) };
    let LogicalPlan::Projection(projection) = dml.input.as_ref() else { return Ok(()) };
    let input_schema = projection.input.schema();
    let refused = |e: &Expr, schema: &datafusion::common::DFSchema| -> Option<DataType> {
        let Expr::Cast(c) = e else { return None };
        if !matches!(c.field.data_type(), DataType::Timestamp(_, _)) {
            return None;
        }
        let from = c.expr.get_type(schema).ok()?;
        (from.is_numeric()).then_some(from)
    };
    let mismatch = |column: &str, from: &DataType, row: Option<usize>| {
        Error::DatatypeMismatch(format!(
            "column \"{column}\" is of type timestamp but expression is of type {}{}",
            sql_type_name(from),
            row.map(|r| format!(" (row {})", r + 1)).unwrap_or_default()
        ))
    };
    for e in &projection.expr {
        let (name, inner) = match e {
            Expr::Alias(a) => (a.name.clone(), a.expr.as_ref()),
            other => (other.schema_name().to_string(), other),
        };
        if let Some(from) = refused(inner, input_schema) {
            return Err(mismatch(&name, &from, None));
        }
        if let (Expr::Column(col), LogicalPlan::Values(values)) = (inner, projection.input.as_ref()) {
            let Some(j) = values.schema.index_of_column(col).ok() else { continue };
            let empty = datafusion::common::DFSchema::empty();
            for (r, row) in values.values.iter().enumerate() {
                if let Some(from) = row.get(j).and_then(|cell| refused(cell, &empty)) {
                    return Err(mismatch(&name, &from, Some(r)));
                }
            }
        }
    }
    Ok(())
}

/// Conversions that keep meaning; arrow can cast more (e.g. a number to a timestamp),
/// but guessing a unit for a bare number would store wrong times.
fn allowed_conversion(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    let textual = |t: &DataType| matches!(t, Utf8 | LargeUtf8 | Utf8View | Dictionary(_, _));
    let numeric = |t: &DataType| t.is_numeric();
    match to {
        Utf8 => textual(from),
        Decimal128(_, _) => textual(from) || numeric(from),
        Timestamp(_, _) => textual(from) || matches!(from, Timestamp(_, _) | Date32 | Date64),
        Int64 | Int32 | Float64 => textual(from) || numeric(from),
        Boolean => textual(from) || matches!(from, Boolean),
        _ => false,
    }
}

pub fn sql_type_name(t: &DataType) -> String {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text".into(),
        DataType::Decimal128(p, s) => format!("numeric({p},{s})"),
        DataType::Timestamp(_, None) => "timestamp".into(),
        DataType::Timestamp(_, Some(_)) => "timestamptz".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Int32 => "integer".into(),
        DataType::Float64 => "double precision".into(),
        DataType::Boolean => "boolean".into(),
        other => other.to_string().to_ascii_lowercase(),
    }
}

/// Decodes a whole Parquet file held in memory.
pub fn read_parquet(bytes: Bytes) -> Result<Vec<RecordBatch>> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| Error::BadCopyFormat(format!("not a readable Parquet file: {e}")))?;
    let reader = builder
        .with_batch_size(DECODE_BATCH_ROWS)
        .build()
        .map_err(|e| Error::BadCopyFormat(format!("not a readable Parquet file: {e}")))?;
    reader
        .map(|b| b.map_err(|e| Error::BadCopyFormat(format!("Parquet input: {e}"))))
        .collect()
}

/// How CSV input is laid out.
#[derive(Debug, Clone)]
pub struct CsvOptions {
    pub header: bool,
    pub delimiter: u8,
    /// Explicit column list (`COPY t (a, b) FROM ...`).
    pub columns: Option<Vec<String>>,
}

/// Decodes CSV text held in memory (see [`CsvStream`]).
pub fn read_csv(table: &TableDef, data: Bytes, opts: &CsvOptions) -> Result<Vec<RecordBatch>> {
    let mut stream = CsvStream::new(opts.clone());
    let mut out = stream.push(table, &data)?;
    out.extend(stream.finish(table)?);
    Ok(out)
}

/// CSV decoded as it arrives, in pieces of any size. With a header, columns are
/// matched by name; otherwise by the explicit column list, or by table order (the
/// Tidemark-set ingest time may be left out). Every field is read as text and converted
/// by [`conform`], which names the row of any bad value. A line holding only `\.` ends
/// the data (PostgreSQL's end-of-data marker); what follows it is ignored.
///
/// Only the last, incomplete line is held between pieces; complete lines go to Arrow's
/// push decoder at once.
pub struct CsvStream {
    opts: CsvOptions,
    /// Input not yet given to the decoder: at most the last incomplete line (or, before
    /// the first line is complete, everything so far).
    raw: Vec<u8>,
    decoder: Option<datafusion::arrow::csv::reader::Decoder>,
    ended: bool,
}

impl CsvStream {
    pub fn new(opts: CsvOptions) -> CsvStream {
        CsvStream { opts, raw: Vec::new(), decoder: None, ended: false }
    }

    /// Bytes held back (an incomplete last line).
    pub fn held_bytes(&self) -> usize {
        self.raw.len()
    }

    /// Takes the next piece of input; returns the batches completed by it.
    pub fn push(&mut self, table: &TableDef, data: &[u8]) -> Result<Vec<RecordBatch>> {
        if self.ended {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        // Feed the complete lines of `data` without copying them when nothing is held.
        let Some(last_nl) = data.iter().rposition(|b| *b == b'\n') else {
            self.raw.extend_from_slice(data);
            return Ok(out);
        };
        let (complete, rest) = data.split_at(last_nl + 1);
        if self.raw.is_empty() {
            self.feed(table, complete, &mut out)?;
        } else {
            let mut joined = std::mem::take(&mut self.raw);
            joined.extend_from_slice(complete);
            self.feed(table, &joined, &mut out)?;
        }
        if !self.ended {
            self.raw.extend_from_slice(rest);
        }
        Ok(out)
    }

    /// The end of the input: decodes what is held and the last batch.
    pub fn finish(&mut self, table: &TableDef) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        if !self.ended {
            let held = std::mem::take(&mut self.raw);
            self.feed(table, &held, &mut out)?;
        }
        if let Some(d) = self.decoder.as_mut() {
            // An empty piece is the end of input: it completes a last line without a
            // line break.
            d.decode(&[]).map_err(csv_error)?;
            if let Some(b) = d.flush().map_err(csv_error)? {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Decodes whole lines (or, at the end, whatever is left), stopping at an
    /// end-of-data line.
    fn feed(&mut self, table: &TableDef, lines: &[u8], out: &mut Vec<RecordBatch>) -> Result<()> {
        let mut take = lines.len();
        let mut start = 0;
        while start < lines.len() {
            let end = lines[start..].iter().position(|b| *b == b'\n').map(|i| start + i).unwrap_or(lines.len());
            let line = &lines[start..end];
            if line == b"\\." || line == b"\\.\r" {
                take = start;
                self.ended = true;
                break;
            }
            start = end + 1;
        }
        let lines = &lines[..take];
        if lines.is_empty() {
            return Ok(());
        }
        if self.decoder.is_none() {
            let first_line = lines.split(|b| *b == b'\n').next().unwrap_or(&[]);
            let schema = csv_schema(table, first_line, &self.opts)?;
            // arrow's CSV decoder zero-fills offsets for a whole batch (rows × columns)
            // when it is built: sized by the first piece, a small statement's decoder
            // does not fill megabytes for a few rows (which dominated small COPYs).
            let first_rows = lines.iter().filter(|b| **b == b'\n').count() + 1;
            let batch_rows = first_rows.next_power_of_two().clamp(64, DECODE_BATCH_ROWS);
            self.decoder = Some(
                datafusion::arrow::csv::ReaderBuilder::new(schema)
                    .with_header(self.opts.header)
                    .with_delimiter(self.opts.delimiter)
                    .with_batch_size(batch_rows)
                    .build_decoder(),
            );
        }
        let d = self.decoder.as_mut().expect("built above");
        let mut rest = lines;
        while !rest.is_empty() {
            let used = d.decode(rest).map_err(csv_error)?;
            rest = &rest[used..];
            if d.capacity() == 0 {
                if let Some(b) = d.flush().map_err(csv_error)? {
                    out.push(b);
                }
            } else if used == 0 {
                return Err(Error::Internal("the CSV decoder made no progress".into()));
            }
        }
        Ok(())
    }
}

fn csv_error(e: datafusion::arrow::error::ArrowError) -> Error {
    Error::BadCopyFormat(format!("CSV input: {e}"))
}

/// The text columns a CSV input's first line implies.
fn csv_schema(table: &TableDef, first_line: &[u8], opts: &CsvOptions) -> Result<SchemaRef> {
    let header_names: Option<Vec<String>> = if opts.header { Some(csv_fields(first_line, opts.delimiter)?) } else { None };
    let field_count = match &header_names {
        Some(h) => h.len(),
        None => csv_fields(first_line, opts.delimiter)?.len(),
    };
    let names: Vec<String> = match (&opts.columns, header_names) {
        (Some(cols), _) => cols.clone(),
        (None, Some(h)) => h.into_iter().map(|s| s.trim().to_ascii_lowercase()).collect(),
        (None, None) => {
            let all: Vec<String> = table.schema.fields().iter().map(|f| f.name().clone()).collect();
            let without_ingest: Vec<String> = all
                .iter()
                .filter(|c| Some(c.as_str()) != table.ingest_time_column.as_deref())
                .cloned()
                .collect();
            if field_count == without_ingest.len() { without_ingest } else { all }
        }
    };
    if names.len() != field_count {
        return Err(Error::BadCopyFormat(format!(
            "CSV input has {field_count} fields per line but {} columns were named",
            names.len()
        )));
    }
    Ok(Arc::new(Schema::new(names.iter().map(|n| Field::new(n.clone(), DataType::Utf8, true)).collect::<Vec<_>>())))
}

fn csv_fields(line: &[u8], delimiter: u8) -> Result<Vec<String>> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line).map_err(|_| Error::BadCopyFormat("CSV input is not UTF-8".into()))?;
    // Header names never contain quotes or delimiters in practice; strip simple quoting.
    Ok(text
        .split(delimiter as char)
        .map(|s| s.trim().trim_matches('"').to_string())
        .collect())
}

/// Validates every batch of one statement, numbering rows across batches.
pub fn conform_all(table: &TableDef, batches: &[RecordBatch], ingest_time_us: i64) -> Result<Vec<RecordBatch>> {
    let mut first = 0u64;
    let mut out = Vec::with_capacity(batches.len());
    for b in batches {
        out.push(conform(table, b, first, ingest_time_us)?);
        first += b.num_rows() as u64;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Catalog, DEFAULT_CATALOG};
    use datafusion::arrow::array::StringArray;

    fn usage() -> TableDef {
        Catalog::parse(DEFAULT_CATALOG[0].1).unwrap().remove(0)
    }

    const CSV_HEAD: &str = "record_id,entity_id,service,operation,usage_type,region,quantity,event_time\n";

    #[test]
    fn csv_with_header_converts() {
        let t = usage();
        let csv = format!("{CSV_HEAD}r1,e1,storage,GetObject,Requests,,1.5,2026-01-05 10:00:00\n");
        let b = read_csv(&t, Bytes::from(csv), &CsvOptions { header: true, delimiter: b',', columns: None }).unwrap();
        let out = conform_all(&t, &b, 42).unwrap();
        assert_eq!(out[0].num_rows(), 1);
        assert_eq!(out[0].schema(), t.schema);
        assert!(out[0].column(5).is_null(0), "empty region is NULL");
    }

    #[test]
    fn bad_value_names_column_and_row() {
        let t = usage();
        let csv = format!(
            "{CSV_HEAD}r1,e1,storage,GetObject,Requests,,1.5,2026-01-05 10:00:00\nr2,e1,storage,GetObject,Requests,,abc,2026-01-05 10:00:00\n"
        );
        let b = read_csv(&t, Bytes::from(csv), &CsvOptions { header: true, delimiter: b',', columns: None }).unwrap();
        let err = conform_all(&t, &b, 0).unwrap_err();
        assert_eq!(err.sqlstate(), "22P02");
        let msg = err.message();
        assert!(msg.contains("quantity") && msg.contains("row 2") && msg.contains("abc"), "{msg}");
    }

    #[test]
    fn null_in_not_null_column_names_column_and_row() {
        let t = usage();
        let csv = format!(
            "{CSV_HEAD}r1,e1,storage,GetObject,Requests,,1.5,2026-01-05 10:00:00\nr2,,storage,GetObject,Requests,,1,2026-01-05 10:00:00\n"
        );
        let b = read_csv(&t, Bytes::from(csv), &CsvOptions { header: true, delimiter: b',', columns: None }).unwrap();
        let err = conform_all(&t, &b, 0).unwrap_err();
        assert_eq!(err.sqlstate(), "23502");
        assert!(err.message().contains("entity_id") && err.message().contains("row 2"), "{}", err.message());
    }

    #[test]
    fn unknown_and_missing_columns() {
        let t = usage();
        let schema = Arc::new(Schema::new(vec![Field::new("nope", DataType::Utf8, true)]));
        let b = RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(vec!["x"]))]).unwrap();
        assert_eq!(conform(&t, &b, 0, 0).unwrap_err().sqlstate(), "42703");
        let schema = Arc::new(Schema::new(vec![Field::new("record_id", DataType::Utf8, true)]));
        let b = RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(vec!["x"]))]).unwrap();
        let err = conform(&t, &b, 0, 0).unwrap_err();
        assert_eq!(err.sqlstate(), "23502");
        assert!(err.message().contains("entity_id"));
    }

    #[test]
    fn wrong_type_is_a_datatype_mismatch() {
        let t = usage();
        let schema = Arc::new(Schema::new(vec![Field::new("event_time", DataType::Int64, true)]));
        let b = RecordBatch::try_new(schema, vec![Arc::new(datafusion::arrow::array::Int64Array::from(vec![1]))]).unwrap();
        assert_eq!(conform(&t, &b, 0, 0).unwrap_err().sqlstate(), "42804");
    }

    #[test]
    fn garbage_parquet_is_a_copy_format_error() {
        assert_eq!(read_parquet(Bytes::from_static(b"PAR1 nonsense")).unwrap_err().sqlstate(), "22P04");
    }
}
