//! Writes held back until the end of a multi-statement query, so that the query is one
//! implicit transaction as in PostgreSQL: if any of its statements fails, none of its
//! writes is stored.
//!
//! Owns: the staged rows of one query message, per table, and their commit (one
//! `Storage::append` per table, which is all-or-nothing). Must never: store anything
//! before [`WriteStage::commit`], or let a statement read a table that the same query
//! wrote before it (it would not see those rows: such a read is refused instead).

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use parking_lot::Mutex;

use crate::catalog::TableDef;
use crate::error::{Error, Result};
use super::{AppendOutcome, Storage};
use crate::write_token::TokenCell;

/// The staged writes of one query message. Travels to the INSERT sink and to scans as
/// a DataFusion session-config extension.
#[derive(Debug)]
pub struct WriteStage {
    /// Bytes of staged rows at most (the same bound as one COPY's payload).
    bytes_max: u64,
    inner: Mutex<Staged>,
}

#[derive(Debug, Default)]
struct Staged {
    tables: BTreeMap<String, (Arc<TableDef>, Vec<RecordBatch>, u64)>,
    bytes: u64,
}

impl WriteStage {
    pub fn new(bytes_max: u64) -> WriteStage {
        WriteStage { bytes_max, inner: Mutex::default() }
    }

    /// Holds `batches` (already validated) for `table`; says how many rows the commit
    /// will add and how many are already stored or repeated, as an append would.
    pub fn stage(&self, storage: &Storage, table: &Arc<TableDef>, batches: Vec<RecordBatch>) -> Result<AppendOutcome> {
        let bytes: u64 = batches.iter().map(|b| b.get_array_memory_size() as u64).sum();
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        let mut inner = self.inner.lock();
        if inner.bytes + bytes > self.bytes_max {
            return Err(Error::ProgramLimit(format!(
                "the writes of one multi-statement query exceed {} bytes (copy_bytes_max); send them as separate statements",
                self.bytes_max
            )));
        }
        let entry = inner.tables.entry(table.name.clone()).or_insert_with(|| (Arc::clone(table), Vec::new(), 0));
        entry.1.extend(batches);
        // Rows new to the store and to the earlier staged rows, as one append of all
        // of them would count.
        let after = storage.preview_append(table, &entry.1)?;
        let added = after.added.saturating_sub(entry.2);
        entry.2 = after.added;
        inner.bytes += bytes;
        Ok(AppendOutcome { added, present: rows.saturating_sub(added), ..Default::default() })
    }

    /// Whether this query has written `table` already.
    pub fn has_written(&self, table: &str) -> bool {
        self.inner.lock().tables.contains_key(table)
    }

    /// Refuses a read of `table` after this query wrote it.
    pub fn check_read(&self, table: &str) -> Result<()> {
        if self.has_written(table) {
            return Err(Error::NotSupported(format!(
                "reading \"{table}\" after writing it in the same multi-statement query; send the statements as separate queries"
            )));
        }
        Ok(())
    }

    /// Stores every staged write: one append per table, in name order; what each
    /// reached goes into the session's write token.
    pub async fn commit(&self, storage: &Storage, tokens: &TokenCell) -> Result<u64> {
        let tables = std::mem::take(&mut self.inner.lock().tables);
        let mut added = 0;
        for (_, (def, batches, _)) in tables {
            let o = storage.append(&def, batches).await?;
            tokens.merge(&o.token);
            added += o.added;
        }
        Ok(added)
    }
}
