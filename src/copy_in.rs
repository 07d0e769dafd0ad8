//! COPY FROM data decoded and stored as it arrives, so that a COPY of any size (up to
//! `copy_bytes_max` of input) needs a bounded amount of memory and is still stored
//! all-or-nothing.
//!
//! Owns: one COPY FROM between its first byte and its commit: the input bound
//! (`copy_bytes_max`), the decoding (CSV in pieces through [`ingest::CsvStream`];
//! Parquet, whose footer comes last, spooled to a file under `<data_dir>/tmp` unless it
//! already is a local file, then read one row group at a time), validation
//! ([`ingest::conform`], rows numbered across the whole input), and the hand-over to
//! storage ([`BulkAppend`], which writes large statements out in chunks before one
//! commit) or to the query's [`WriteStage`]. Memory held (input not yet decoded, rows
//! not yet written) is reserved in the query's pool over the node's pool
//! (`query_memory_bytes_max`, `node_memory_bytes_max`): past it, the COPY fails with
//! 53200 and stores nothing.
//!
//! Must never: store part of a COPY that failed, hold a whole input in memory, or keep
//! a spool file after the COPY ends (it is removed when the sink drops).
//!
//! Where the work runs: callers drive a sink on the node's execution runtime (decoding
//! is CPU work), never on a connection's task.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryPool, MemoryReservation};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::catalog::TableDef;
use crate::error::{Error, Result};
use crate::ingest::{self, CsvStream, DECODE_BATCH_ROWS};
use crate::session::CopyFormat;
use crate::storage::bulk::BulkAppend;
use crate::storage::{AppendOutcome, Storage};
use crate::storage::write_stage::WriteStage;

/// CSV input gathered before it is decoded (fewer, larger decoder calls).
const CSV_PIECE_BYTES: usize = 1 << 20;

/// Where a COPY's rows go.
enum Target {
    Store(BulkAppend),
    Stage { stage: Arc<WriteStage>, storage: Arc<Storage>, rows: Vec<RecordBatch>, bytes: usize },
}

enum Decoding {
    Csv { stream: CsvStream, piece: Vec<u8> },
    /// Parquet input written to a spool file until the end.
    Spool(Spool),
    /// A local Parquet file, read in place at the end.
    ParquetFile(std::fs::File),
    /// Finished.
    Done,
}

/// What the sink needs from the node.
pub struct CopyContext {
    pub storage: Arc<Storage>,
    pub stage: Option<Arc<WriteStage>>,
    pub pool: Arc<dyn MemoryPool>,
    pub query_memory_bytes_max: u64,
    pub copy_bytes_max: u64,
    pub spool_dir: PathBuf,
    pub now_us: i64,
}

/// One COPY FROM in progress.
pub struct CopySink {
    table: Arc<TableDef>,
    decoding: Decoding,
    target: Target,
    reservation: MemoryReservation,
    now_us: i64,
    /// Rows decoded so far: the position of the next row in error messages.
    rows: u64,
    bytes_in: u64,
    bytes_max: u64,
}

impl CopySink {
    /// Starts a COPY of `table` in `format`.
    pub fn new(ctx: CopyContext, table: Arc<TableDef>, format: &CopyFormat) -> Result<CopySink> {
        let decoding = match format {
            CopyFormat::Csv(o) => Decoding::Csv { stream: CsvStream::new(o.clone()), piece: Vec::new() },
            CopyFormat::Parquet => Decoding::Spool(Spool::create(&ctx.spool_dir)?),
        };
        Self::with_decoding(ctx, table, decoding)
    }

    /// Starts a COPY of `table` from an open local Parquet file, which is read in place.
    pub fn parquet_file(ctx: CopyContext, table: Arc<TableDef>, file: std::fs::File) -> Result<CopySink> {
        Self::with_decoding(ctx, table, Decoding::ParquetFile(file))
    }

    fn with_decoding(ctx: CopyContext, table: Arc<TableDef>, decoding: Decoding) -> Result<CopySink> {
        let query_pool: Arc<dyn MemoryPool> = Arc::new(crate::memory::QueryPool::new(
            Arc::clone(&ctx.pool),
            if ctx.query_memory_bytes_max == 0 { usize::MAX } else { ctx.query_memory_bytes_max as usize },
        ));
        let reservation = MemoryConsumer::new(format!("COPY {}", table.name)).register(&query_pool);
        let target = match ctx.stage {
            Some(stage) => Target::Stage { stage, storage: ctx.storage, rows: Vec::new(), bytes: 0 },
            None => Target::Store(BulkAppend::new(ctx.storage, Arc::clone(&table), chunk_bytes(ctx.query_memory_bytes_max))?),
        };
        Ok(CopySink {
            table,
            decoding,
            target,
            reservation,
            now_us: ctx.now_us,
            rows: 0,
            bytes_in: 0,
            bytes_max: ctx.copy_bytes_max,
        })
    }

    /// Takes the next piece of input.
    pub async fn push(&mut self, data: &[u8]) -> Result<()> {
        self.bytes_in += data.len() as u64;
        if self.bytes_max > 0 && self.bytes_in > self.bytes_max {
            return Err(Error::ProgramLimit(format!("the COPY input is larger than copy_bytes_max ({} bytes)", self.bytes_max)));
        }
        match &mut self.decoding {
            Decoding::Csv { piece, .. } => {
                piece.extend_from_slice(data);
                if piece.len() >= CSV_PIECE_BYTES {
                    self.decode_piece().await?;
                }
            }
            Decoding::Spool(s) => s.write(data)?,
            Decoding::ParquetFile(_) | Decoding::Done => return Err(Error::Internal("input pushed into a COPY that takes none".into())),
        }
        self.account()
    }

    /// Reads a local file through the sink, in pieces.
    pub async fn push_file(&mut self, file: std::fs::File) -> Result<()> {
        use std::io::Read;
        let mut file = file;
        let mut buf = vec![0u8; CSV_PIECE_BYTES];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            self.push(&buf[..n]).await?;
        }
    }

    async fn decode_piece(&mut self) -> Result<()> {
        let Decoding::Csv { stream, piece } = &mut self.decoding else { return Ok(()) };
        let raw = stream.push(&self.table, piece)?;
        piece.clear();
        self.take(raw).await
    }

    /// Validates decoded rows and hands them on.
    async fn take(&mut self, raw: Vec<RecordBatch>) -> Result<()> {
        let mut rows = Vec::with_capacity(raw.len());
        for b in &raw {
            rows.push(ingest::conform(&self.table, b, self.rows, self.now_us)?);
            self.rows += b.num_rows() as u64;
        }
        drop(raw);
        match &mut self.target {
            Target::Store(bulk) => bulk.push(rows).await?,
            Target::Stage { rows: staged, bytes, .. } => {
                *bytes += rows.iter().map(|b| b.get_array_memory_size()).sum::<usize>();
                staged.extend(rows);
            }
        }
        self.account()
    }

    /// Reserves the memory held now; past the budget the COPY fails (53200).
    fn account(&mut self) -> Result<()> {
        let held = match &self.decoding {
            Decoding::Csv { stream, piece } => stream.held_bytes() + piece.capacity(),
            Decoding::Spool(_) | Decoding::ParquetFile(_) | Decoding::Done => 0,
        } + match &self.target {
            Target::Store(bulk) => bulk.pending_bytes(),
            Target::Stage { bytes, .. } => *bytes,
        };
        self.reservation.try_resize(held).map_err(|e| {
            Error::ResourcesExhausted(format!("no memory left for COPY FROM (query_memory_bytes_max / node_memory_bytes_max): {e}"))
        })
    }

    /// The end of the input: decodes the rest and stores the whole COPY.
    pub async fn finish(mut self) -> Result<AppendOutcome> {
        match std::mem::replace(&mut self.decoding, Decoding::Done) {
            Decoding::Csv { mut stream, piece } => {
                let mut raw = stream.push(&self.table, &piece)?;
                drop(piece);
                raw.extend(stream.finish(&self.table)?);
                self.take(raw).await?;
            }
            Decoding::Spool(mut spool) => {
                let file = spool.close()?;
                self.read_parquet(file).await?;
                drop(spool);
            }
            Decoding::ParquetFile(file) => self.read_parquet(file).await?,
            Decoding::Done => {}
        }
        let CopySink { target, table, .. } = self;
        match target {
            Target::Store(bulk) => bulk.finish().await,
            Target::Stage { stage, storage, rows, .. } => stage.stage(&storage, &table, rows),
        }
    }

    async fn read_parquet(&mut self, file: std::fs::File) -> Result<()> {
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| Error::BadCopyFormat(format!("not a readable Parquet file: {e}")))?
            .with_batch_size(DECODE_BATCH_ROWS)
            .build()
            .map_err(|e| Error::BadCopyFormat(format!("not a readable Parquet file: {e}")))?;
        for batch in reader {
            let batch = batch.map_err(|e| Error::BadCopyFormat(format!("Parquet input: {e}")))?;
            self.take(vec![batch]).await?;
        }
        Ok(())
    }
}

/// Rows a statement holds before they are written out as (uncommitted) segments: a
/// quarter of the query's memory, since writing a chunk out briefly holds it about three
/// times (the pending batches, their concatenation, the sorted copy being encoded).
fn chunk_bytes(query_memory_bytes_max: u64) -> usize {
    match query_memory_bytes_max {
        0 => 256 << 20,
        q => ((q / 4) as usize).max(8 << 20),
    }
}

/// A spool file for input that must be whole before it is decoded.
struct Spool {
    path: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl Spool {
    fn create(dir: &Path) -> Result<Spool> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("copy-{}.spool", uuid::Uuid::new_v4()));
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
        Ok(Spool { path, file: Some(std::io::BufWriter::with_capacity(1 << 20, file)) })
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        match &mut self.file {
            Some(f) => Ok(f.write_all(data)?),
            None => Err(Error::Internal("write to a closed spool".into())),
        }
    }

    /// Ends the writing; returns the file opened for reading.
    fn close(&mut self) -> Result<std::fs::File> {
        if let Some(f) = self.file.take() {
            f.into_inner().map_err(|e| Error::Io(e.into_error()))?;
        }
        Ok(std::fs::File::open(&self.path)?)
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.file.take();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where spool files live.
pub fn spool_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tmp")
}

/// Removes spool files left by a crash (called at start, before any COPY runs).
pub fn clear_spool_dir(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "spool") {
            let _ = std::fs::remove_file(p);
        }
    }
}
