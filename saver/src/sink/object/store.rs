//! The bucket under the sink: an `object_store` client at `PREFIX/`, for S3, GCS and Azure (built
//! from the same environment as inputs, `input::StoreClient`) or a local directory
//! (`file:///DIR/`), with the few operations the sink needs and their failures explained.
//!
//! On a local directory every write is fsynced (the file, then its directory) before it
//! returns, since `object_store`'s local store does not; a cloud store's acknowledgement is its
//! own durability promise.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

use crate::sink::SinkError;

/// Bytes a part upload buffers before sending them (S3 takes parts of 5 MiB or more).
const UPLOAD_CHUNK: usize = 8 << 20;
/// Part uploads in flight at once per committed part.
const UPLOADS_IN_FLIGHT: usize = 2;

/// Where the sink writes: a store and the prefix every name is under.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    store: Arc<dyn ObjectStore>,
    /// Explains a cloud store's failures; `None` for a local directory.
    client: Option<input::StoreClient>,
    /// The local directory, for fsync; `None` for a cloud store.
    local: Option<PathBuf>,
    prefix: String,
    /// `s3://bucket/prefix/`, for messages.
    url: String,
}

/// What a create-only write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Created {
    /// Written now.
    New,
    /// Something was there already (written before, by this or another writer).
    Existed,
}

impl Bucket {
    /// A bucket of a cloud store at `prefix` (no leading or trailing `/`).
    pub(crate) fn remote(client: input::StoreClient, prefix: &str, url: String) -> Self {
        Bucket { store: Arc::clone(client.store()), client: Some(client), local: None, prefix: prefix.to_string(), url }
    }

    /// A local directory, made if missing.
    pub(crate) fn local(dir: PathBuf, url: String) -> Result<Self, SinkError> {
        std::fs::create_dir_all(&dir).map_err(|source| SinkError::Io {
            action: "create",
            path: dir.clone(),
            source,
        })?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| SinkError::Config(format!("--sink {url}: cannot use directory {}: {e}", dir.display())))?;
        Ok(Bucket { store: Arc::new(store), client: None, local: Some(dir), prefix: String::new(), url })
    }

    /// `s3://bucket/prefix/`, for messages.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, name: &str) -> StorePath {
        if self.prefix.is_empty() {
            StorePath::from(name)
        } else {
            StorePath::from(format!("{}/{name}", self.prefix))
        }
    }

    /// The name of `path` under the prefix.
    fn name_of<'a>(&self, path: &'a str) -> &'a str {
        if self.prefix.is_empty() {
            path
        } else {
            path.strip_prefix(&self.prefix).and_then(|p| p.strip_prefix('/')).unwrap_or(path)
        }
    }

    /// Runs `operation` on `name`, explaining a failure.
    async fn run<T>(
        &self,
        action: &'static str,
        name: &str,
        listing: bool,
        operation: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T, SinkError> {
        let object = format!("{}{name}", self.url);
        match &self.client {
            Some(client) => client.run(&object, listing, operation).await.map_err(|source| {
                // A read of a missing object is answered inside the operation (None); a 404 that
                // gets here, on a write or a listing, is the bucket's.
                if source.kind() == input::ErrorKind::NotFound && action != "read" {
                    SinkError::Config(format!(
                        "--sink {}: the bucket does not exist (cannot {action} {object}: 404 Not Found); create the bucket, or fix --sink (SAVER_SINK)",
                        self.url
                    ))
                } else {
                    SinkError::Store { action, source }
                }
            }),
            None => operation.await.map_err(|e| SinkError::Io {
                action,
                path: self.local.clone().unwrap_or_default().join(name),
                source: std::io::Error::other(e),
            }),
        }
    }

    /// Writes `bytes` as `name` unless something is there already.
    pub(crate) async fn put_new(&self, name: &str, bytes: Bytes) -> Result<Created, SinkError> {
        let path = self.path(name);
        let put = async {
            let options = PutOptions { mode: PutMode::Create, ..Default::default() };
            match self.store.put_opts(&path, PutPayload::from(bytes), options).await {
                Ok(_) => Ok(Created::New),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::Existed),
                Err(e) => Err(e),
            }
        };
        let created = self.run("write", name, false, put).await?;
        if created == Created::New {
            self.sync(name)?;
        }
        Ok(created)
    }

    /// Writes `bytes` as `name`, replacing what is there.
    pub(crate) async fn put(&self, name: &str, bytes: Bytes) -> Result<(), SinkError> {
        let path = self.path(name);
        let put = self.store.put(&path, PutPayload::from(bytes));
        self.run("write", name, false, put).await?;
        self.sync(name)
    }

    /// The object `name`, or `None` if there is none.
    pub(crate) async fn get(&self, name: &str) -> Result<Option<Bytes>, SinkError> {
        let path = self.path(name);
        let get = async {
            match self.store.get(&path).await {
                Ok(found) => found.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        };
        self.run("read", name, false, get).await
    }

    /// Bytes `range` of `name`.
    pub(crate) async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes, SinkError> {
        let path = self.path(name);
        let get = self.store.get_range(&path, range);
        self.run("read", name, false, get).await
    }

    /// Whether `name` exists.
    pub(crate) async fn exists(&self, name: &str) -> Result<bool, SinkError> {
        let path = self.path(name);
        let head = async {
            match self.store.head(&path).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        };
        self.run("read", name, false, head).await
    }

    /// The names (under the prefix) of every object under `dir`, with their sizes.
    pub(crate) async fn list(&self, dir: &str) -> Result<Vec<(String, u64)>, SinkError> {
        let path = self.path(dir);
        let list = async {
            let mut found = Vec::new();
            let mut listing = self.store.list(Some(&path));
            while let Some(meta) = listing.next().await {
                let meta = meta?;
                found.push((self.name_of(meta.location.as_ref()).to_string(), meta.size));
            }
            Ok(found)
        };
        self.run("list", dir, true, list).await
    }

    /// Removes `names` in as few requests as the store takes (S3's DeleteObjects: up to 1 000
    /// keys each, where one request per key made a commit's clean-up half its time); a name gone
    /// already counts as removed. Best effort: how many could not be removed, and the first
    /// reason.
    pub(crate) async fn delete_all(&self, names: &[String]) -> (usize, Option<String>) {
        let paths: Vec<object_store::Result<StorePath>> = names.iter().map(|name| Ok(self.path(name))).collect();
        let mut results = self.store.delete_stream(futures::stream::iter(paths).boxed());
        let (mut failed, mut first) = (0, None);
        while let Some(result) = results.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    failed += 1;
                    first.get_or_insert_with(|| format!("{}: {e}", self.url));
                }
            }
        }
        (failed, first)
    }

    /// A streamed upload of `name` (a multipart upload: nothing is visible under the name until
    /// [`Upload::finish`], then all of it), replacing what is there.
    pub(crate) async fn upload(&self, name: &str) -> Result<Upload, SinkError> {
        let path = self.path(name);
        let start = self.store.put_multipart(&path);
        let upload = self.run("start an upload of", name, false, start).await?;
        Ok(Upload { writer: Some(WriteMultipart::new_with_chunk_size(upload, UPLOAD_CHUNK)), name: name.to_string() })
    }

    /// Makes a local write durable: the file, then its directory (a new name lives there).
    fn sync(&self, name: &str) -> Result<(), SinkError> {
        let Some(root) = &self.local else { return Ok(()) };
        let path = root.join(name);
        let sync = |p: &std::path::Path| std::fs::File::open(p).and_then(|f| f.sync_all());
        sync(&path).map_err(|source| SinkError::Io { action: "fsync", path: path.clone(), source })?;
        let dir = path.parent().unwrap_or(root);
        sync(dir).map_err(|source| SinkError::Io { action: "fsync", path: dir.to_path_buf(), source })
    }

    /// Finishes an upload: the object appears whole, and (locally) durably.
    pub(crate) async fn finish(&self, mut upload: Upload) -> Result<(), SinkError> {
        let writer = upload.writer.take().expect("an upload is finished once");
        self.run("finish the upload of", &upload.name, false, writer.finish()).await?;
        self.sync(&upload.name)
    }
}

/// An upload in progress (see [`Bucket::upload`]); dropped unfinished, it is aborted.
pub(crate) struct Upload {
    writer: Option<WriteMultipart>,
    name: String,
}

impl Upload {
    /// Appends `bytes`, waiting while [`UPLOADS_IN_FLIGHT`] parts are being sent.
    pub(crate) async fn write(&mut self, bucket: &Bucket, bytes: &[u8]) -> Result<(), SinkError> {
        let writer = self.writer.as_mut().expect("an unfinished upload");
        let name = self.name.clone();
        bucket.run("upload", &name, false, writer.wait_for_capacity(UPLOADS_IN_FLIGHT)).await?;
        writer.write(bytes);
        super::hooks::reached(super::hooks::Point::MidUpload);
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            // Its parts would otherwise wait for the store's lifecycle rule.
            tokio::spawn(async move {
                let _ = writer.abort().await;
            });
        }
    }
}
