//! The manifest: the list of committed segments. A segment exists for readers exactly
//! when the manifest names it.
//!
//! Owns: the manifest's format and its atomic replacement on disk (write a temporary
//! file, fsync, rename, fsync the directory). Must never: be edited in place; a commit
//! produces a new manifest value and a new file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil;
use crate::shard_map::ShardId;

pub const MANIFEST_FORMAT: u32 = 1;

/// One immutable Parquet file of one table, shard and time window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SegmentMeta {
    pub id: u64,
    pub table: String,
    pub shard: ShardId,
    /// Start of the segment's time window (inclusive), microseconds since the epoch.
    pub window_start_us: i64,
    /// End of the time window (exclusive).
    pub window_end_us: i64,
    /// Object-store path relative to the segment store root.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    pub min_time_us: i64,
    pub max_time_us: i64,
    pub created_at_us: i64,
    /// 0 for a freshly ingested segment, 1 + the highest input level after compaction.
    pub level: u32,
}

/// Per-table layout fixed at creation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TableLayout {
    pub name: String,
    pub shard_count: u32,
    pub window_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: u32,
    /// Incremented by every commit.
    pub version: u64,
    pub next_segment_id: u64,
    pub tables: Vec<TableLayout>,
    pub segments: Vec<SegmentMeta>,
    /// Per Raft group (shard), the applied state (opaque here: `raft::state_machine`
    /// writes it) that these segments reflect: after a restart the group re-applies its
    /// log from there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<ShardId, serde_json::Value>,
}

impl Manifest {
    pub fn empty() -> Manifest {
        Manifest { format: MANIFEST_FORMAT, version: 0, next_segment_id: 1, tables: vec![], segments: vec![], groups: BTreeMap::new() }
    }

    pub fn layout(&self, table: &str) -> Option<&TableLayout> {
        self.tables.iter().find(|t| t.name == table)
    }

    pub fn segments_of<'a>(&'a self, table: &'a str) -> impl Iterator<Item = &'a SegmentMeta> + 'a {
        self.segments.iter().filter(move |s| s.table == table)
    }
}

/// The manifest file in a data directory, and the current value.
pub struct ManifestFile {
    path: PathBuf,
}

impl ManifestFile {
    pub fn new(data_dir: &Path) -> ManifestFile {
        ManifestFile { path: data_dir.join("meta").join("manifest.json") }
    }

    pub fn load(&self) -> Result<Arc<Manifest>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let m: Manifest = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Corrupt(format!("manifest {}: {e}", self.path.display())))?;
                if m.format != MANIFEST_FORMAT {
                    return Err(Error::Corrupt(format!(
                        "manifest {} has format {}, this build reads {MANIFEST_FORMAT}",
                        self.path.display(),
                        m.format
                    )));
                }
                Ok(Arc::new(m))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Arc::new(Manifest::empty())),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes `m` the committed manifest. When this returns, a crash keeps it.
    pub fn commit(&self, m: &Manifest) -> Result<()> {
        let bytes = serde_json::to_vec(m).map_err(|e| Error::Internal(format!("manifest encode: {e}")))?;
        fsutil::write_file_durably(&self.path, &bytes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let f = ManifestFile::new(dir.path());
        assert_eq!(*f.load().unwrap(), Manifest::empty());
        let mut m = Manifest::empty();
        m.version = 3;
        m.tables.push(TableLayout { name: "usage".into(), shard_count: 8, window_secs: 86400 });
        f.commit(&m).unwrap();
        assert_eq!(*f.load().unwrap(), m);
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("meta")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn a_torn_manifest_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("meta")).unwrap();
        std::fs::write(dir.path().join("meta/manifest.json"), b"{\"format\":1,\"vers").unwrap();
        let err = ManifestFile::new(dir.path()).load().unwrap_err();
        assert_eq!(err.sqlstate(), "XX001");
    }
}
