//! A byte cache in front of the segment store: whole segment files kept in memory,
//! least recently used evicted first, within `segment_cache_bytes_max`.
//!
//! Owns: which segment bytes are in memory. Segments are immutable, so a cached file is
//! never stale; a put or delete of a path drops it. Must never: answer a request it
//! cannot answer exactly (conditional, versioned and HEAD requests go to the store).
//! A point query reads a handful of small ranges of one file; without the cache each
//! range is an open/pread/close on the blocking pool.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use parking_lot::Mutex;

#[derive(Default)]
struct Files {
    map: HashMap<Path, (Bytes, ObjectMeta, u64)>,
    bytes: u64,
    tick: u64,
}

pub struct CachedStore {
    inner: Arc<dyn ObjectStore>,
    files: Arc<Mutex<Files>>,
    bytes_max: u64,
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
}

/// What a cache holds and how well it served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub bytes: u64,
    pub bytes_max: u64,
    pub hits: u64,
    pub misses: u64,
}

impl CacheStats {
    /// Hits over lookups, or None before the first lookup.
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.hits + self.misses;
        (n > 0).then(|| self.hits as f64 / n as f64)
    }
}

impl Files {
    fn forget(&mut self, location: &Path) {
        if let Some((b, _, _)) = self.map.remove(location) {
            self.bytes -= b.len() as u64;
        }
    }
}

impl CachedStore {
    pub fn new(inner: Arc<dyn ObjectStore>, bytes_max: u64) -> CachedStore {
        CachedStore { inner, files: Arc::default(), bytes_max, hits: Default::default(), misses: Default::default() }
    }

    pub fn stats(&self) -> CacheStats {
        use std::sync::atomic::Ordering::Relaxed;
        CacheStats { bytes: self.cached_bytes(), bytes_max: self.bytes_max, hits: self.hits.load(Relaxed), misses: self.misses.load(Relaxed) }
    }

    /// Bytes currently cached.
    pub fn cached_bytes(&self) -> u64 {
        self.files.lock().bytes
    }

    fn forget(&self, location: &Path) {
        self.files.lock().forget(location);
    }

    async fn whole(&self, location: &Path) -> Result<(Bytes, ObjectMeta)> {
        {
            let mut f = self.files.lock();
            f.tick += 1;
            let tick = f.tick;
            if let Some(entry) = f.map.get_mut(location) {
                entry.2 = tick;
                self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok((entry.0.clone(), entry.1.clone()));
            }
        }
        self.misses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let got = self.inner.get(location).await?;
        let meta = got.meta.clone();
        let bytes = got.bytes().await?;
        let len = bytes.len() as u64;
        // A file larger than a quarter of the budget would evict too much to be worth it.
        if len <= self.bytes_max / 4 {
            let mut f = self.files.lock();
            while f.bytes + len > self.bytes_max {
                let Some(oldest) = f.map.iter().min_by_key(|(_, v)| v.2).map(|(k, _)| k.clone()) else { break };
                if let Some((b, _, _)) = f.map.remove(&oldest) {
                    f.bytes -= b.len() as u64;
                }
            }
            f.tick += 1;
            let tick = f.tick;
            if f.map.insert(location.clone(), (bytes.clone(), meta.clone(), tick)).is_none() {
                f.bytes += len;
            }
        }
        Ok((bytes, meta))
    }

    fn slice(bytes: &Bytes, r: &Range<u64>, location: &Path) -> Result<Bytes> {
        let len = bytes.len() as u64;
        if r.start > r.end || r.end > len {
            return Err(object_store::Error::Generic {
                store: "segment cache",
                source: format!("range {}..{} is outside {location} ({len} bytes)", r.start, r.end).into(),
            });
        }
        Ok(bytes.slice(r.start as usize..r.end as usize))
    }
}

impl fmt::Debug for CachedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CachedStore({}, {} of {} bytes)", self.inner, self.cached_bytes(), self.bytes_max)
    }
}

impl fmt::Display for CachedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CachedStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for CachedStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.forget(location);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.forget(location);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let plain = !options.head
            && options.version.is_none()
            && options.if_match.is_none()
            && options.if_none_match.is_none()
            && options.if_modified_since.is_none()
            && options.if_unmodified_since.is_none();
        if !plain {
            return self.inner.get_opts(location, options).await;
        }
        let (bytes, meta) = self.whole(location).await?;
        let len = bytes.len() as u64;
        let range = match &options.range {
            None => 0..len,
            Some(r) => r.as_range(len).map_err(|e| object_store::Error::Generic {
                store: "segment cache",
                source: Box::new(e),
            })?,
        };
        let data = Self::slice(&bytes, &range, location)?;
        Ok(GetResult {
            payload: GetResultPayload::Stream(futures::stream::once(async move { Ok(data) }).boxed()),
            meta,
            range,
            attributes: Default::default(),
        })
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let (bytes, _) = self.whole(location).await?;
        ranges.iter().map(|r| Self::slice(&bytes, r, location)).collect()
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        // Drop cached copies as paths go to the store and again once deleted, so that a
        // read racing the delete cannot leave bytes of a deleted file behind.
        let before = Arc::clone(&self.files);
        let after = Arc::clone(&self.files);
        let input = locations
            .inspect(move |p| {
                if let Ok(p) = p {
                    before.lock().forget(p);
                }
            })
            .boxed();
        self.inner
            .delete_stream(input)
            .inspect(move |p| {
                if let Ok(p) = p {
                    after.lock().forget(p);
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.forget(to);
        self.inner.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn serves_ranges_evicts_and_forgets() {
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let store = CachedStore::new(Arc::clone(&inner), 400);
        for (name, fill) in [("a", b'a'), ("b", b'b'), ("c", b'c')] {
            store.put(&Path::from(name), PutPayload::from(vec![fill; 100])).await.unwrap();
        }
        let a = Path::from("a");
        assert_eq!(store.get_ranges(&a, &[0..2, 98..100]).await.unwrap(), vec![Bytes::from_static(b"aa"); 2]);
        assert_eq!(store.cached_bytes(), 100);
        let got = store.get_opts(&a, GetOptions { range: Some((10..15).into()), ..Default::default() }).await.unwrap();
        assert_eq!(got.range, 10..15);
        assert_eq!(got.bytes().await.unwrap(), Bytes::from_static(b"aaaaa"));
        assert!(store.get_ranges(&a, &[90..101]).await.is_err(), "a range past the end is an error");
        // Over budget: the least recently used file goes.
        store.get_ranges(&Path::from("b"), &[0..1]).await.unwrap();
        store.get_ranges(&Path::from("c"), &[0..1]).await.unwrap();
        store.put(&Path::from("d"), PutPayload::from(vec![b'd'; 100])).await.unwrap();
        store.get_ranges(&a, &[0..1]).await.unwrap();
        store.get_ranges(&Path::from("d"), &[0..1]).await.unwrap();
        assert!(store.cached_bytes() <= 400);
        // A rewritten or deleted path is not served from the cache.
        store.put(&a, PutPayload::from(vec![b'z'; 100])).await.unwrap();
        assert_eq!(store.get_ranges(&a, &[0..1]).await.unwrap()[0], Bytes::from_static(b"z"));
        store.delete(&a).await.unwrap();
        assert!(store.get_ranges(&a, &[0..1]).await.is_err());
    }
}
