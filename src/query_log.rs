//! The query log: one entry per statement, failed ones included, with what its
//! predicates said (entities, service, operation, time interval) and what it touched.
//!
//! Owns: the bounded in-memory buffer, its periodic flush to Parquet files under
//! `<data_dir>/system/query_log/`, retention by bytes, and the entry schema.
//! Must never: block a statement on disk IO (statements only push to the buffer), or
//! grow without bound (the buffer drops its oldest entries when full and counts them).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Int32Builder, Int64Builder, ListBuilder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
    UInt32Builder, UInt64Builder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parking_lot::Mutex;
use parquet::arrow::ArrowWriter;

use crate::error::Result;
use crate::fsutil;

#[derive(Debug, Clone, Default)]
pub struct QueryLogEntry {
    pub query_id: u64,
    pub session_id: i32,
    pub user_name: String,
    pub application_name: String,
    pub start_time_us: i64,
    pub duration_us: i64,
    /// `ok` or `error`.
    pub status: &'static str,
    /// `00000` on success.
    pub sqlstate: String,
    pub error: Option<String>,
    pub statement_kind: String,
    pub rows: u64,
    pub bytes: u64,
    pub query: String,
    pub fingerprint: String,
    pub normalized_query: String,
    pub tables: Vec<String>,
    /// Shard-key values the predicates allow; `None` = all entities.
    pub entity_ids: Option<Vec<String>>,
    pub service: Option<String>,
    pub operation: Option<String>,
    pub time_from_us: Option<i64>,
    pub time_to_us: Option<i64>,
    pub shards: Vec<u32>,
    pub segments: u64,
    pub segments_total: u64,
}

pub fn schema() -> SchemaRef {
    let ts = DataType::Timestamp(TimeUnit::Microsecond, None);
    let list = |name: &str, t: DataType| Field::new(name, DataType::List(Arc::new(Field::new("item", t, true))), true);
    Arc::new(Schema::new(vec![
        Field::new("query_id", DataType::UInt64, false),
        Field::new("session_id", DataType::Int32, false),
        Field::new("user_name", DataType::Utf8, false),
        Field::new("application_name", DataType::Utf8, false),
        Field::new("start_time", ts.clone(), false),
        Field::new("duration_us", DataType::Int64, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("sqlstate", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, true),
        Field::new("statement_kind", DataType::Utf8, false),
        Field::new("rows", DataType::UInt64, false),
        Field::new("bytes", DataType::UInt64, false),
        Field::new("query", DataType::Utf8, false),
        Field::new("fingerprint", DataType::Utf8, false),
        Field::new("normalized_query", DataType::Utf8, false),
        list("tables", DataType::Utf8),
        list("entity_ids", DataType::Utf8),
        Field::new("service", DataType::Utf8, true),
        Field::new("operation", DataType::Utf8, true),
        Field::new("time_from", ts.clone(), true),
        Field::new("time_to", ts, true),
        list("shards", DataType::UInt32),
        Field::new("segments", DataType::UInt64, false),
        Field::new("segments_total", DataType::UInt64, false),
    ]))
}

pub fn to_batch(entries: &[QueryLogEntry]) -> Result<RecordBatch> {
    let n = entries.len();
    let mut query_id = UInt64Builder::with_capacity(n);
    let mut session_id = Int32Builder::with_capacity(n);
    let mut user = StringBuilder::new();
    let mut app = StringBuilder::new();
    let mut start = TimestampMicrosecondBuilder::with_capacity(n);
    let mut dur = Int64Builder::with_capacity(n);
    let mut status = StringBuilder::new();
    let mut sqlstate = StringBuilder::new();
    let mut error = StringBuilder::new();
    let mut kind = StringBuilder::new();
    let mut rows = UInt64Builder::with_capacity(n);
    let mut bytes = UInt64Builder::with_capacity(n);
    let mut query = StringBuilder::new();
    let mut fp = StringBuilder::new();
    let mut norm = StringBuilder::new();
    let mut tables = ListBuilder::new(StringBuilder::new());
    let mut entities = ListBuilder::new(StringBuilder::new());
    let mut service = StringBuilder::new();
    let mut operation = StringBuilder::new();
    let mut tfrom = TimestampMicrosecondBuilder::with_capacity(n);
    let mut tto = TimestampMicrosecondBuilder::with_capacity(n);
    let mut shards = ListBuilder::new(UInt32Builder::new());
    let mut segs = UInt64Builder::with_capacity(n);
    let mut segs_total = UInt64Builder::with_capacity(n);
    for e in entries {
        query_id.append_value(e.query_id);
        session_id.append_value(e.session_id);
        user.append_value(&e.user_name);
        app.append_value(&e.application_name);
        start.append_value(e.start_time_us);
        dur.append_value(e.duration_us);
        status.append_value(e.status);
        sqlstate.append_value(&e.sqlstate);
        error.append_option(e.error.as_deref());
        kind.append_value(&e.statement_kind);
        rows.append_value(e.rows);
        bytes.append_value(e.bytes);
        query.append_value(&e.query);
        fp.append_value(&e.fingerprint);
        norm.append_value(&e.normalized_query);
        for t in &e.tables {
            tables.values().append_value(t);
        }
        tables.append(true);
        match &e.entity_ids {
            Some(ids) => {
                for id in ids {
                    entities.values().append_value(id);
                }
                entities.append(true);
            }
            None => entities.append(false),
        }
        service.append_option(e.service.as_deref());
        operation.append_option(e.operation.as_deref());
        tfrom.append_option(e.time_from_us);
        tto.append_option(e.time_to_us);
        for s in &e.shards {
            shards.values().append_value(*s);
        }
        shards.append(true);
        segs.append_value(e.segments);
        segs_total.append_value(e.segments_total);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(query_id.finish()),
        Arc::new(session_id.finish()),
        Arc::new(user.finish()),
        Arc::new(app.finish()),
        Arc::new(start.finish()),
        Arc::new(dur.finish()),
        Arc::new(status.finish()),
        Arc::new(sqlstate.finish()),
        Arc::new(error.finish()),
        Arc::new(kind.finish()),
        Arc::new(rows.finish()),
        Arc::new(bytes.finish()),
        Arc::new(query.finish()),
        Arc::new(fp.finish()),
        Arc::new(norm.finish()),
        Arc::new(tables.finish()),
        Arc::new(entities.finish()),
        Arc::new(service.finish()),
        Arc::new(operation.finish()),
        Arc::new(tfrom.finish()),
        Arc::new(tto.finish()),
        Arc::new(shards.finish()),
        Arc::new(segs.finish()),
        Arc::new(segs_total.finish()),
    ];
    Ok(RecordBatch::try_new(schema(), cols)?)
}

/// Replaces literals with `?` and collapses whitespace, so that statements that
/// differ only in constants share a fingerprint.
/// `text` cut to at most `max` bytes (on a character boundary), with a marker saying
/// how long it was, so that a huge statement does not stay in memory and on disk.
pub fn truncate_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... [{} bytes in all]", &text[..end], text.len())
}

pub fn normalize(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.trim().trim_end_matches(';').chars().peekable();
    let mut last_space = false;
    let mut prev_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                // Quoted string ('' is an escaped quote inside it).
                loop {
                    match chars.next() {
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                        }
                        Some('\'') | None => break,
                        Some(_) => {}
                    }
                }
                out.push('?');
                last_space = false;
                prev_word = false;
            }
            c if c.is_ascii_digit() && !prev_word => {
                while chars.peek().is_some_and(|d| d.is_ascii_digit() || *d == '.') {
                    chars.next();
                }
                out.push('?');
                last_space = false;
            }
            c if c.is_whitespace() => {
                if !last_space && !out.is_empty() {
                    out.push(' ');
                }
                last_space = true;
                prev_word = false;
            }
            c => {
                out.push(c.to_ascii_lowercase());
                last_space = false;
                prev_word = c.is_alphanumeric() || c == '_' || c == '$';
            }
        }
    }
    out.trim_end().to_string()
}

pub fn fingerprint(normalized: &str) -> String {
    format!("{:016x}", twox_hash::XxHash3_64::oneshot(normalized.as_bytes()))
}

pub struct QueryLog {
    dir: PathBuf,
    buffer: Mutex<VecDeque<QueryLogEntry>>,
    memory_rows_max: usize,
    disk_bytes_max: u64,
    next_id: AtomicU64,
    dropped: AtomicU64,
    /// Serializes flushes so files are written in id order.
    flush_lock: Mutex<()>,
    /// Sees every entry as it is recorded (the forecaster counts patterns).
    observer: parking_lot::RwLock<Option<Observer>>,
}

/// A callback that sees each recorded entry; it must be cheap (it runs on the
/// statement's task).
pub type Observer = Arc<dyn Fn(&QueryLogEntry) + Send + Sync>;

impl std::fmt::Debug for QueryLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryLog").field("dir", &self.dir).finish()
    }
}

impl QueryLog {
    pub fn open(data_dir: &Path, memory_rows_max: usize, disk_bytes_max: u64) -> Result<Arc<QueryLog>> {
        let dir = data_dir.join("system").join("query_log");
        std::fs::create_dir_all(&dir)?;
        let mut next = 1;
        for f in std::fs::read_dir(&dir)? {
            let f = f?;
            let name = f.file_name().to_string_lossy().to_string();
            if name.contains(".tmp") {
                std::fs::remove_file(f.path())?;
                continue;
            }
            if let Some((_, last)) = parse_file_name(&name) {
                next = next.max(last + 1);
            }
        }
        Ok(Arc::new(QueryLog {
            dir,
            buffer: Mutex::new(VecDeque::new()),
            memory_rows_max,
            disk_bytes_max,
            next_id: AtomicU64::new(next),
            dropped: AtomicU64::new(0),
            flush_lock: Mutex::new(()),
            observer: parking_lot::RwLock::new(None),
        }))
    }

    pub fn next_query_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Sets the callback that sees every entry from now on.
    pub fn set_observer(&self, observer: Observer) {
        *self.observer.write() = Some(observer);
    }

    pub fn record(&self, e: QueryLogEntry) {
        if let Some(o) = self.observer.read().as_ref() {
            o(&e);
        }
        let mut b = self.buffer.lock();
        if b.len() >= self.memory_rows_max {
            b.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        b.push_back(e);
    }

    /// Entries dropped because the buffer was full before a flush.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The entries not yet on disk and the persisted files, as of one moment: taken
    /// between flushes, so no entry is in both (a flush writes its file before it
    /// removes the entries from memory) and none is in neither.
    pub fn snapshot(&self) -> Result<(Vec<QueryLogEntry>, Vec<(PathBuf, u64)>)> {
        let _g = self.flush_lock.lock();
        let buffered = self.buffered();
        Ok((buffered, self.files()?))
    }

    /// Entries not yet on disk, oldest first.
    pub fn buffered(&self) -> Vec<QueryLogEntry> {
        self.buffer.lock().iter().cloned().collect()
    }

    /// Calls `f` with every persisted entry that started at or after `since_us` (only
    /// the fields patterns need are filled in); returns how many. Files are read one
    /// batch at a time.
    pub fn read_persisted(&self, since_us: i64, mut f: impl FnMut(&QueryLogEntry)) -> Result<u64> {
        use datafusion::arrow::array::{Array, AsArray};
        use datafusion::arrow::datatypes::{Int64Type, TimestampMicrosecondType, UInt32Type, UInt64Type};
        let mut n = 0;
        for (path, _) in self.files()? {
            let file = std::fs::File::open(&path)?;
            let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?;
            let want = ["start_time", "duration_us", "rows", "tables", "entity_ids", "service", "operation", "shards"];
            let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), want.iter().copied());
            for batch in builder.with_projection(mask).build()? {
                let b = batch?;
                let col = |name: &str| b.column_by_name(name).cloned();
                let (Some(start), Some(dur), Some(rows), Some(tables), Some(ents), Some(svc), Some(op), Some(shards)) = (
                    col("start_time"),
                    col("duration_us"),
                    col("rows"),
                    col("tables"),
                    col("entity_ids"),
                    col("service"),
                    col("operation"),
                    col("shards"),
                ) else {
                    return Err(crate::error::Error::Corrupt(format!("{}: query log file lacks columns", path.display())));
                };
                let start = start.as_primitive::<TimestampMicrosecondType>();
                let dur = dur.as_primitive::<Int64Type>();
                let rows = rows.as_primitive::<UInt64Type>();
                let (tables, ents, shards) = (tables.as_list::<i32>(), ents.as_list::<i32>(), shards.as_list::<i32>());
                let (svc, op) = (svc.as_string::<i32>(), op.as_string::<i32>());
                let strings = |l: &datafusion::arrow::array::ListArray, r: usize| -> Vec<String> {
                    let v = l.value(r);
                    let v = v.as_string::<i32>();
                    (0..v.len()).filter(|i| v.is_valid(*i)).map(|i| v.value(i).to_string()).collect()
                };
                for r in 0..b.num_rows() {
                    if start.value(r) < since_us {
                        continue;
                    }
                    let e = QueryLogEntry {
                        start_time_us: start.value(r),
                        duration_us: dur.value(r),
                        rows: rows.value(r),
                        tables: if tables.is_valid(r) { strings(tables, r) } else { Vec::new() },
                        entity_ids: ents.is_valid(r).then(|| strings(ents, r)),
                        service: svc.is_valid(r).then(|| svc.value(r).to_string()),
                        operation: op.is_valid(r).then(|| op.value(r).to_string()),
                        shards: if shards.is_valid(r) {
                            let v = shards.value(r);
                            v.as_primitive::<UInt32Type>().iter().flatten().collect()
                        } else {
                            Vec::new()
                        },
                        ..Default::default()
                    };
                    f(&e);
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Persisted files (path, bytes), oldest first.
    pub fn files(&self) -> Result<Vec<(PathBuf, u64)>> {
        let mut files = Vec::new();
        for f in std::fs::read_dir(&self.dir)? {
            let f = f?;
            let name = f.file_name().to_string_lossy().to_string();
            if let Some((first, _)) = parse_file_name(&name) {
                files.push((first, f.path(), f.metadata()?.len()));
            }
        }
        files.sort();
        Ok(files.into_iter().map(|(_, p, len)| (p, len)).collect())
    }

    /// Writes buffered entries to a new Parquet file and applies retention.
    pub fn flush(&self) -> Result<usize> {
        let _g = self.flush_lock.lock();
        let entries: Vec<QueryLogEntry> = {
            let b = self.buffer.lock();
            b.iter().cloned().collect()
        };
        if entries.is_empty() {
            return Ok(0);
        }
        let first = entries.iter().map(|e| e.query_id).min().unwrap_or(0);
        let last = entries.iter().map(|e| e.query_id).max().unwrap_or(0);
        let batch = to_batch(&entries)?;
        let mut buf = Vec::new();
        {
            let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), None)?;
            w.write(&batch)?;
            w.close()?;
        }
        fsutil::write_file_durably(&self.dir.join(format!("ql-{first:020}-{last:020}.parquet")), &buf)?;
        // Remove exactly what was written; entries recorded meanwhile stay.
        {
            let mut b = self.buffer.lock();
            let n = entries.len().min(b.len());
            let written: std::collections::HashSet<u64> = entries.iter().map(|e| e.query_id).collect();
            let mut kept = VecDeque::with_capacity(b.len() - n);
            for e in b.drain(..) {
                if !written.contains(&e.query_id) {
                    kept.push_back(e);
                }
            }
            *b = kept;
        }
        self.apply_retention()?;
        Ok(entries.len())
    }

    fn apply_retention(&self) -> Result<()> {
        let files = self.files()?;
        let mut total: u64 = files.iter().map(|(_, l)| *l).sum();
        for (path, len) in files {
            if total <= self.disk_bytes_max {
                break;
            }
            std::fs::remove_file(&path)?;
            total -= len;
        }
        Ok(())
    }
}

fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("ql-")?.strip_suffix(".parquet")?;
    let (a, b) = rest.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Flushes the log every `interval` until the task is aborted.
pub fn spawn_flusher(log: Arc<QueryLog>, interval: std::time::Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let l = Arc::clone(&log);
            match tokio::task::spawn_blocking(move || l.flush()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "query log flush failed; will retry"),
                Err(e) => tracing::error!(error = %e, "query log flush panicked"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_replaces_literals() {
        let a = normalize("SELECT sum(quantity) FROM usage WHERE entity_id = 'e1' AND q > 10.5;");
        let b = normalize("select  sum(quantity) from usage\n where entity_id = 'it''s' and q > 3");
        assert_eq!(a, "select sum(quantity) from usage where entity_id = ? and q > ?");
        assert_eq!(a, b);
        assert_eq!(normalize("SELECT * FROM t2 WHERE a = $1"), "select * from t2 where a = $1");
        assert_eq!(fingerprint(&a), fingerprint(&b));
    }

    #[test]
    fn buffer_is_bounded_and_flush_persists() {
        let dir = tempfile::tempdir().unwrap();
        let log = QueryLog::open(dir.path(), 3, 1 << 30).unwrap();
        for _ in 0..5 {
            let id = log.next_query_id();
            log.record(QueryLogEntry { query_id: id, status: "ok", ..Default::default() });
        }
        assert_eq!(log.buffered().len(), 3);
        assert_eq!(log.dropped(), 2);
        assert_eq!(log.flush().unwrap(), 3);
        assert!(log.buffered().is_empty());
        assert_eq!(log.files().unwrap().len(), 1);
        // Ids continue after a restart.
        let log2 = QueryLog::open(dir.path(), 3, 1 << 30).unwrap();
        assert_eq!(log2.next_query_id(), 6);
    }

    /// A reader never sees an entry twice (in memory and in a file) or not at all,
    /// however its read interleaves with flushes.
    #[test]
    fn snapshots_between_flushes_hold_each_entry_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = QueryLog::open(dir.path(), 1 << 20, 1 << 30).unwrap();
        let writer = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for i in 0..300u64 {
                    let id = log.next_query_id();
                    log.record(QueryLogEntry { query_id: id, status: "ok", ..Default::default() });
                    if i % 7 == 0 {
                        log.flush().unwrap();
                    }
                }
                log.flush().unwrap();
            })
        };
        let mut snapshots = 0;
        loop {
            let done = writer.is_finished();
            let (buffered, files) = log.snapshot().unwrap();
            let mut ids: Vec<u64> = buffered.iter().map(|e| e.query_id).collect();
            for (path, _) in files {
                let name = path.file_name().unwrap().to_string_lossy().to_string();
                let (first, last) = parse_file_name(&name).unwrap();
                ids.extend(first..=last);
            }
            ids.sort();
            let n = ids.len() as u64;
            assert_eq!(ids, (1..=n).collect::<Vec<_>>(), "an entry seen twice or missing");
            snapshots += 1;
            if done {
                assert_eq!(n, 300);
                break;
            }
        }
        writer.join().unwrap();
        assert!(snapshots >= 1);
    }
}
