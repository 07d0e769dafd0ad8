//! The write-ahead log of the write buffer: small appends are made durable here (one
//! fsync) and kept in memory until they are flushed into segments.
//!
//! Owns: the record format (`TMW1`, length, CRC32, table name, Arrow IPC stream) and
//! the files `<data_dir>/meta/wal-<seq>.log`. Must never: report a record as written
//! before it is fsynced, or return a record whose checksum does not match (a torn tail
//! after a crash ends the log: it was never acknowledged).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::ipc::writer::StreamWriter;

use crate::error::{Error, Result};
use crate::fsutil;

const MAGIC: &[u8; 4] = b"TMW1";
/// Largest record accepted when reading (a corrupt length must not allocate gigabytes).
const RECORD_BYTES_MAX: usize = 1 << 30;

pub struct Wal {
    dir: PathBuf,
    seq: u64,
    file: File,
}

fn file_name(seq: u64) -> String {
    format!("wal-{seq:020}.log")
}

impl Wal {
    /// Creates a new, empty log file with sequence number `seq`.
    pub fn create(dir: &Path, seq: u64) -> Result<Wal> {
        std::fs::create_dir_all(dir)?;
        let file = std::fs::OpenOptions::new().create_new(true).append(true).open(dir.join(file_name(seq)))?;
        fsutil::sync_dir(dir)?;
        Ok(Wal { dir: dir.to_path_buf(), seq, file })
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Appends one record and fsyncs it.
    pub fn append(&mut self, table: &str, batch: &RecordBatch) -> Result<()> {
        let mut payload = Vec::with_capacity(batch.get_array_memory_size() / 2 + 64);
        payload.extend_from_slice(&(table.len() as u16).to_le_bytes());
        payload.extend_from_slice(table.as_bytes());
        {
            let mut w = StreamWriter::try_new(&mut payload, &batch.schema())?;
            w.write(batch)?;
            w.finish()?;
        }
        let mut record = Vec::with_capacity(payload.len() + 12);
        record.extend_from_slice(MAGIC);
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        record.extend_from_slice(&payload);
        self.file.write_all(&record)?;
        self.file.sync_data()?;
        Ok(())
    }

    /// Starts a new file for later appends; returns the path of the finished one.
    pub fn rotate(&mut self) -> Result<PathBuf> {
        let old = self.dir.join(file_name(self.seq));
        *self = Wal::create(&self.dir, self.seq + 1)?;
        Ok(old)
    }

    /// Log files in `dir`, oldest first.
    pub fn existing(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        if !dir.exists() {
            return Ok(out);
        }
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            if let Some(seq) = name.strip_prefix("wal-").and_then(|r| r.strip_suffix(".log")).and_then(|s| s.parse().ok()) {
                out.push((seq, p));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Reads every intact record of a log file. A torn or corrupt record ends it; the
    /// second value says whether that happened.
    pub fn read(path: &Path) -> Result<(Vec<(String, RecordBatch)>, bool)> {
        let mut bytes = Vec::new();
        File::open(path)?.read_to_end(&mut bytes)?;
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let Some(header) = bytes.get(pos..pos + 12) else { return Ok((out, true)) };
            if &header[..4] != MAGIC {
                return Ok((out, true));
            }
            let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
            let crc = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
            if len > RECORD_BYTES_MAX {
                return Ok((out, true));
            }
            let Some(payload) = bytes.get(pos + 12..pos + 12 + len) else { return Ok((out, true)) };
            if crc32fast::hash(payload) != crc {
                return Ok((out, true));
            }
            let name_len = u16::from_le_bytes([payload[0], payload[1]]) as usize;
            let table = std::str::from_utf8(payload.get(2..2 + name_len).unwrap_or_default())
                .map_err(|_| Error::Corrupt(format!("{}: table name is not UTF-8", path.display())))?
                .to_string();
            let reader = StreamReader::try_new(std::io::Cursor::new(&payload[2 + name_len..]), None)?;
            for b in reader {
                out.push((table.clone(), b?));
            }
            pos += 12 + len;
        }
        Ok((out, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn batch(v: i64) -> RecordBatch {
        let s = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, false)]));
        RecordBatch::try_new(s, vec![Arc::new(Int64Array::from(vec![v, v + 1]))]).unwrap()
    }

    #[test]
    fn round_trip_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::create(dir.path(), 1).unwrap();
        w.append("usage", &batch(1)).unwrap();
        w.append("usage", &batch(3)).unwrap();
        let path = dir.path().join(file_name(1));
        let (recs, torn) = Wal::read(&path).unwrap();
        assert_eq!(recs.len(), 2);
        assert!(!torn);
        assert_eq!(recs[1].1, batch(3));
        // Cut the last record in half: only the first survives.
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 10).unwrap();
        let (recs, torn) = Wal::read(&path).unwrap();
        assert_eq!(recs.len(), 1);
        assert!(torn);
        // A flipped byte fails the checksum.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let (recs, torn) = Wal::read(&path).unwrap();
        assert!(recs.is_empty() && torn);
        w.rotate().unwrap();
        assert_eq!(Wal::existing(dir.path()).unwrap().len(), 2);
    }
}
