//! Moving rows in and out as files: COPY TO a Parquet or CSV file, COPY TO STDOUT as
//! text or CSV, and reading the bytes of a COPY FROM source (a path or a URL).
//!
//! Owns: file formats at the edge, and which server-side paths COPY may touch
//! ([`CopyPaths`]). Must never: leave a half-written output file under its final name
//! (files are written beside it and linked into place when complete); read or write a
//! path outside the configured COPY directories; replace a file unless configured to;
//! read anything but a regular file.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::DataFrame;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;

use crate::error::{Error, Result};

/// The directories server-side `COPY ... FROM/TO 'path'` may use (PostgreSQL lets only
/// privileged roles name server files at all; Tidemark confines them to `copy_dirs`).
#[derive(Debug, Clone)]
pub struct CopyPaths {
    /// Relative names are taken from here (the data directory, absolute).
    base: PathBuf,
    /// Each allowed directory as configured (absolute) and as resolved on disk.
    dirs: Vec<(PathBuf, PathBuf)>,
    overwrite: bool,
    bytes_max: u64,
}

impl CopyPaths {
    /// Creates the directories if missing and resolves them.
    pub fn open(base: &Path, dirs: &[PathBuf], overwrite: bool, bytes_max: u64) -> Result<CopyPaths> {
        let absolute = |p: &Path| -> Result<PathBuf> {
            Ok(if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) })
        };
        let base = absolute(base)?;
        let mut out = Vec::with_capacity(dirs.len());
        for d in dirs {
            let d = lexical(&absolute(d)?).ok_or_else(|| Error::Config(format!("copy_dirs: {} climbs above /", d.display())))?;
            std::fs::create_dir_all(&d).map_err(|e| Error::Config(format!("cannot create COPY directory {}: {e}", d.display())))?;
            let real = std::fs::canonicalize(&d)?;
            out.push((d, real));
        }
        Ok(CopyPaths { base, dirs: out, overwrite, bytes_max })
    }

    /// The absolute, `..`-free form of `name`, refused unless inside an allowed directory.
    fn resolve(&self, name: &str) -> Result<PathBuf> {
        let p = Path::new(name);
        let p = if p.is_absolute() { p.to_path_buf() } else { self.base.join(p) };
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(Error::InsufficientPrivilege(format!("COPY file names may not contain \"..\": {name}")));
        }
        if !self.dirs.iter().any(|(d, _)| p.starts_with(d)) {
            return Err(self.outside(name));
        }
        Ok(p)
    }

    fn outside(&self, name: &str) -> Error {
        let dirs: Vec<String> = self.dirs.iter().map(|(d, _)| d.display().to_string()).collect();
        Error::InsufficientPrivilege(format!(
            "COPY may only use server files inside the configured copy_dirs ({}); \"{name}\" is not (use COPY ... FROM STDIN / TO STDOUT, or psql's \\copy, for client files)",
            dirs.join(", ")
        ))
    }

    /// A file COPY FROM may read: inside an allowed directory after following links,
    /// a regular file, at most `copy_bytes_max` bytes.
    pub fn for_read(&self, name: &str) -> Result<PathBuf> {
        let p = self.resolve(name)?;
        let real = match std::fs::canonicalize(&p) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::UndefinedFile(name.to_string())),
            Err(e) => return Err(Error::Io(std::io::Error::new(e.kind(), format!("{name}: {e}")))),
        };
        if !self.dirs.iter().any(|(_, r)| real.starts_with(r)) {
            return Err(self.outside(name));
        }
        let meta = std::fs::metadata(&real)?;
        if !meta.is_file() {
            return Err(Error::InsufficientPrivilege(format!("\"{name}\" is not a regular file")));
        }
        if meta.len() > self.bytes_max {
            return Err(Error::ProgramLimit(format!(
                "\"{name}\" has {} bytes, more than copy_bytes_max ({})",
                meta.len(),
                self.bytes_max
            )));
        }
        Ok(real)
    }

    /// Where COPY TO may write `name`: its directory exists inside an allowed one, and
    /// the file does not exist yet (unless `copy_overwrite`).
    pub fn for_write(&self, name: &str) -> Result<PathBuf> {
        let p = self.resolve(name)?;
        let (Some(parent), Some(file)) = (p.parent(), p.file_name()) else {
            return Err(Error::InvalidParameter(format!("COPY TO needs a file name: {name}")));
        };
        let real_parent = std::fs::canonicalize(parent)
            .map_err(|e| Error::Io(std::io::Error::new(e.kind(), format!("{}: {e}", parent.display()))))?;
        if !self.dirs.iter().any(|(_, r)| real_parent.starts_with(r)) {
            return Err(self.outside(name));
        }
        let target = real_parent.join(file);
        match std::fs::symlink_metadata(&target) {
            Ok(m) if !m.is_file() => return Err(Error::InsufficientPrivilege(format!("\"{name}\" exists and is not a regular file"))),
            Ok(_) if !self.overwrite => return Err(Error::DuplicateFile(name.to_string())),
            _ => {}
        }
        Ok(target)
    }

    pub fn overwrite(&self) -> bool {
        self.overwrite
    }
}

/// `p` with `.` removed and `..` applied (None if it climbs above the root).
fn lexical(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            other => out.push(other),
        }
    }
    Some(out)
}

/// Writes the rows of `df` to a local file as Parquet (by `format` or the `.parquet`
/// extension) or CSV. Returns the number of rows. `path` was checked by
/// [`CopyPaths::for_write`]; the file appears whole or not at all, and an existing file
/// is replaced only when `overwrite`.
pub async fn write_file(df: DataFrame, path: &Path, filename: &str, format: Option<&str>, overwrite: bool) -> Result<u64> {
    let path = path.to_path_buf();
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
            // Without overwrite, a hard link puts the file in place only if the name is
            // still free (a file created meanwhile is not replaced).
            let placed = if overwrite {
                std::fs::rename(&tmp, &path)
            } else {
                let linked = std::fs::hard_link(&tmp, &path);
                let _ = std::fs::remove_file(&tmp);
                linked
            };
            match placed {
                Ok(()) => Ok(rows),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::DuplicateFile(filename.to_string())),
                Err(e) => Err(e.into()),
            }
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

/// An opened COPY FROM source.
pub enum Source {
    /// A local file inside `copy_dirs`, opened after its checks.
    Local(std::fs::File),
    /// An object store's bytes, in pieces.
    Stream(futures::stream::BoxStream<'static, Result<Bytes>>),
}

/// Opens a COPY FROM source: a local path or `file://` URL (inside `paths`), or an
/// `s3://` URL (credentials from the `AWS_*` environment variables); at most
/// `copy_bytes_max` bytes either way (checked here on the size, and again by the COPY
/// on the bytes read, in case the source grows).
pub async fn open_source(source: &str, paths: &CopyPaths) -> Result<Source> {
    if let Ok(url) = url::Url::parse(source) {
        match url.scheme() {
            "file" => return open_local(url.path(), paths),
            "s3" | "s3a" => {
                let store = object_store::aws::AmazonS3Builder::from_env().with_url(source).build()?;
                let path = object_store::path::Path::from(url.path().trim_start_matches('/'));
                let got = store.get(&path).await?;
                if got.meta.size > paths.bytes_max {
                    return Err(Error::ProgramLimit(format!(
                        "{source} has {} bytes, more than copy_bytes_max ({})",
                        got.meta.size, paths.bytes_max
                    )));
                }
                return Ok(Source::Stream(got.into_stream().map(|r| r.map_err(Error::from)).boxed()));
            }
            // A Windows-style or relative path parses as a one-letter scheme; fall through.
            s if s.len() > 1 => return Err(Error::NotSupported(format!("COPY FROM {s}:// sources"))),
            _ => {}
        }
    }
    open_local(source, paths)
}

fn open_local(name: &str, paths: &CopyPaths) -> Result<Source> {
    let real = paths.for_read(name)?;
    let file = std::fs::File::open(&real).map_err(|e| Error::Io(std::io::Error::new(e.kind(), format!("{name}: {e}"))))?;
    Ok(Source::Local(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(dir: &Path, overwrite: bool) -> CopyPaths {
        CopyPaths::open(dir, &[dir.join("import"), dir.join("export")], overwrite, 1 << 20).unwrap()
    }

    #[test]
    fn only_regular_files_inside_the_copy_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path(), false);
        std::fs::write(dir.path().join("import/a.csv"), "x\n").unwrap();
        std::fs::write(dir.path().join("secret"), "x\n").unwrap();
        assert!(p.for_read(dir.path().join("import/a.csv").to_str().unwrap()).is_ok());
        // Relative names are taken from the data directory.
        assert!(p.for_read("import/a.csv").is_ok());
        for bad in ["/etc/os-release", "secret", "import/../secret", "../secret", "/dev/zero", "import"] {
            let e = p.for_read(bad).unwrap_err();
            assert_eq!(e.sqlstate(), "42501", "{bad}: {e}");
        }
        // A symbolic link out of an allowed directory is followed, then refused.
        std::os::unix::fs::symlink("/etc/os-release", dir.path().join("import/link")).unwrap();
        assert_eq!(p.for_read("import/link").unwrap_err().sqlstate(), "42501");
        assert_eq!(p.for_read("import/missing.csv").unwrap_err().sqlstate(), "58P01");
        // Too large.
        std::fs::write(dir.path().join("import/big"), vec![b'x'; (1 << 20) + 1]).unwrap();
        assert_eq!(p.for_read("import/big").unwrap_err().sqlstate(), "54000");
    }

    #[test]
    fn writes_stay_inside_and_do_not_replace_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path(), false);
        assert!(p.for_write("export/out.csv").is_ok());
        std::fs::write(dir.path().join("export/out.csv"), "x").unwrap();
        assert_eq!(p.for_write("export/out.csv").unwrap_err().sqlstate(), "58P02");
        assert!(paths(dir.path(), true).for_write("export/out.csv").is_ok());
        for bad in ["/tmp/x.csv", "export/../x.csv", "x.csv", "/etc/passwd"] {
            assert_eq!(p.for_write(bad).unwrap_err().sqlstate(), "42501", "{bad}");
        }
    }
}
