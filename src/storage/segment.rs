//! Segment files: how a batch of rows of one (shard, window) becomes a Parquet file.
//!
//! Owns: the physical layout of a segment: rows sorted by the table's sort key, page
//! statistics and page indexes, a bloom filter on the shard key, ZSTD compression.
//! Must never: write a segment whose rows span more than one shard or window.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::compute::{lexsort_to_indices, take_record_batch, SortColumn, SortOptions};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::{KeyValue, SortingColumn};
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::catalog::TableDef;
use crate::error::Result;

/// Rows per Parquet data page: small pages let a point query read a few pages.
const DATA_PAGE_ROWS: usize = 4096;

/// Sorts `batch` by the table's sort key.
pub fn sort_rows(table: &TableDef, batch: &RecordBatch) -> Result<RecordBatch> {
    if table.sort_key.is_empty() || batch.num_rows() <= 1 {
        return Ok(batch.clone());
    }
    let cols: Vec<SortColumn> = table
        .sort_key
        .iter()
        .map(|c| -> Result<SortColumn> {
            let idx = table.column_index(c)?;
            Ok(SortColumn { values: batch.column(idx).clone() as ArrayRef, options: Some(SortOptions::default()) })
        })
        .collect::<Result<_>>()?;
    let indices = lexsort_to_indices(&cols, None)?;
    Ok(take_record_batch(batch, &indices)?)
}

/// Encodes already sorted rows as one Parquet file.
pub fn encode(table: &TableDef, batch: &RecordBatch, row_group_rows: usize, meta: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("valid zstd level")))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_data_page_row_count_limit(DATA_PAGE_ROWS)
        .set_write_batch_size(DATA_PAGE_ROWS)
        .set_key_value_metadata(Some(
            meta.iter().map(|(k, v)| KeyValue::new(format!("tidemark.{k}"), v.clone())).collect(),
        ));
    if !table.sort_key.is_empty() {
        let sorting = table
            .sort_key
            .iter()
            .map(|c| table.column_index(c).map(|i| SortingColumn { column_idx: i as i32, descending: false, nulls_first: true }))
            .collect::<Result<Vec<_>>>()?;
        props = props.set_sorting_columns(Some(sorting));
    }
    for c in &table.bloom_filter_columns {
        let col = parquet::schema::types::ColumnPath::from(c.as_str());
        props = props
            .set_column_bloom_filter_enabled(col.clone(), true)
            .set_column_bloom_filter_fpp(col.clone(), 0.01)
            .set_column_dictionary_enabled(col, true);
    }
    let mut buf = Vec::with_capacity(batch.get_array_memory_size() / 4 + 4096);
    let mut writer = ArrowWriter::try_new(&mut buf, Arc::clone(&table.schema), Some(props.build()))?;
    writer.write(batch)?;
    writer.close()?;
    Ok(buf)
}
