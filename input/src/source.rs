//! A run's input as an ordered list of objects: listed once ([`Source::open`]), named by one
//! digest ([`Source::identity`]), streamed for the scan ([`Source::reader`], a blocking
//! `std::io::Read`), and read back by byte range for chunks ([`Source::read_range`]), each read
//! checked against the version that was listed.
//!
//! Remote objects are streamed by a task on a tokio runtime into a bounded channel that the
//! blocking reader drains, so the scan stays synchronous and an object is never held in memory.
//! Compressed objects are decompressed while streamed and spooled ([`crate::spool`]); their byte
//! ranges are offsets into the decompressed bytes and are served from the spool file.

use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as StorePath;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStoreExt};
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::env::Env;
use crate::error::SourceError;
use crate::location::{Compression, Location, StoreKind};
use crate::metrics::{FailureCallback, Progress, Stats};
use crate::spool::{self, Budget, SpoolLimits, SpoolWriter, Tee, Usage};
use crate::store::{traced, Remote, RetryPolicy};

/// How many buffers of a remote object may wait between the download task and the reader.
const CHANNEL_DEPTH: usize = 8;

/// The version of an object as listed: what must still hold when it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    /// A local file: its length, modification time and inode.
    Local {
        /// Length in bytes.
        len: u64,
        /// Modification time, seconds since the epoch.
        mtime_sec: i64,
        /// Modification time, nanoseconds within the second.
        mtime_nsec: u32,
        /// Inode number (a replaced file gets another).
        inode: u64,
    },
    /// A stored object: its ETag and version id when the store gives them, and its
    /// modification time (the only version of an HTTP file served without an ETag).
    Remote {
        /// The ETag, as the store sent it (quotes included).
        e_tag: Option<String>,
        /// The object version id (S3 buckets with versioning, GCS generation, Azure version).
        version: Option<String>,
        /// Last modified, seconds since the epoch.
        modified_sec: i64,
        /// Last modified, nanoseconds within the second.
        modified_nsec: u32,
    },
}

/// One object of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its name: the canonical absolute path of a local file, `s3://BUCKET/KEY` (`gs://`, `az://`)
    /// for a stored object, the URL for an HTTP file.
    pub name: String,
    /// Its name within the input, for the run id: the same as `name` for a stored object or an
    /// HTTP file; for a local file its path relative to the glob's directory (its file name for
    /// a single file), so that a data set moved to another directory keeps its run id.
    pub key: String,
    /// Its stored size in bytes (compressed, for a compressed object).
    pub size: u64,
    /// Its version as listed.
    pub version: Version,
    /// How its bytes are stored.
    pub compression: Compression,
}

fn put_bytes(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

fn put_option(hasher: &mut Sha256, value: Option<&str>) {
    match value {
        None => hasher.update([0u8]),
        Some(text) => {
            hasher.update([1u8]);
            put_bytes(hasher, text.as_bytes());
        }
    }
}

impl ObjectInfo {
    /// Feeds this object's identity record to `hasher` (the layout is in [`Source::identity`]).
    pub(crate) fn hash_into(&self, hasher: &mut Sha256) {
        put_bytes(hasher, self.name.as_bytes());
        hasher.update(self.size.to_le_bytes());
        hasher.update([self.compression.tag()]);
        match &self.version {
            Version::Local { len, mtime_sec, mtime_nsec, inode } => {
                hasher.update(b"L");
                hasher.update(len.to_le_bytes());
                hasher.update(mtime_sec.to_le_bytes());
                hasher.update(mtime_nsec.to_le_bytes());
                hasher.update(inode.to_le_bytes());
            }
            Version::Remote { e_tag, version, modified_sec, modified_nsec } => {
                hasher.update(b"R");
                put_option(hasher, e_tag.as_deref());
                put_option(hasher, version.as_deref());
                if e_tag.is_none() && version.is_none() {
                    hasher.update(modified_sec.to_le_bytes());
                    hasher.update(modified_nsec.to_le_bytes());
                }
            }
        }
    }

    fn local(name: String, key: String, meta: &std::fs::Metadata) -> ObjectInfo {
        ObjectInfo {
            compression: Compression::from_name(&name),
            name,
            key,
            size: meta.len(),
            version: local_version(meta),
        }
    }

    fn remote(name: String, meta: &ObjectMeta) -> ObjectInfo {
        ObjectInfo {
            compression: Compression::from_name(&name),
            key: name.clone(),
            name,
            size: meta.size,
            version: Version::Remote {
                e_tag: meta.e_tag.clone(),
                version: meta.version.clone(),
                modified_sec: meta.last_modified.timestamp(),
                modified_nsec: meta.last_modified.timestamp_subsec_nanos(),
            },
        }
    }

    /// What differs between the listed version and `meta` of a response, if anything.
    fn differs(&self, meta: &ObjectMeta) -> Option<String> {
        let Version::Remote { e_tag, version, modified_sec, .. } = &self.version else { return None };
        if let (Some(listed), Some(now)) = (e_tag, &meta.e_tag) {
            if listed != now {
                return Some(format!("ETag {listed} when listed, {now} now"));
            }
        }
        if let (Some(listed), Some(now)) = (version, &meta.version) {
            if listed != now {
                return Some(format!("version {listed} when listed, {now} now"));
            }
        }
        if meta.size != self.size {
            return Some(format!("{} bytes when listed, {} now", self.size, meta.size));
        }
        if e_tag.is_none() && version.is_none() && meta.last_modified.timestamp() != *modified_sec {
            return Some(format!("modified at {} after it was listed", meta.last_modified));
        }
        None
    }

    /// A GET of this version (pinned to its version id, conditional on its ETag).
    fn get_options(&self, range: Option<Range<u64>>) -> GetOptions {
        let (e_tag, version) = match &self.version {
            Version::Remote { e_tag, version, .. } => (e_tag.clone(), version.clone()),
            Version::Local { .. } => (None, None),
        };
        GetOptions { if_match: e_tag, version, range: range.map(GetRange::Bounded), ..GetOptions::default() }
    }
}

fn local_version(meta: &std::fs::Metadata) -> Version {
    Version::Local {
        len: meta.len(),
        mtime_sec: meta.mtime(),
        mtime_nsec: u32::try_from(meta.mtime_nsec()).unwrap_or(0),
        inode: meta.ino(),
    }
}

/// How a [`Source`] reaches its objects.
pub struct SourceOptions {
    /// Where compressed objects are spooled (decompressed), one file each; required when the
    /// input has a compressed object. A directory of its own, e.g. `STATE_DIR/spool`: it is
    /// created if missing, and [`Source::prune_spool`] removes what is not this input's.
    pub spool_dir: Option<PathBuf>,
    /// How much the spool may hold (a decompression bomb is refused at these limits).
    pub spool_limits: SpoolLimits,
    /// The environment the stores' settings and credentials come from.
    pub env: Env,
    /// How transient store failures are retried.
    pub retry: RetryPolicy,
    /// The runtime that runs remote I/O. [`Source::open`] defaults to the current one;
    /// [`Source::open_blocking`] starts a small one of its own when this is `None`.
    pub runtime: Option<Handle>,
    /// Called on every transient store failure (also counted in [`Source::stats`]).
    pub on_failure: Option<FailureCallback>,
}

impl Default for SourceOptions {
    /// The process environment, default retries, no spool, the current runtime.
    fn default() -> Self {
        SourceOptions {
            spool_dir: None,
            spool_limits: SpoolLimits::default(),
            env: Env::process(),
            retry: RetryPolicy::default(),
            runtime: None,
            on_failure: None,
        }
    }
}

impl std::fmt::Debug for SourceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceOptions")
            .field("spool_dir", &self.spool_dir)
            .field("spool_limits", &self.spool_limits)
            .field("env", &self.env)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// The runtime remote I/O runs on; an owned one is shut down without blocking when dropped.
struct Rt {
    handle: Handle,
    owned: Option<tokio::runtime::Runtime>,
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(runtime) = self.owned.take() {
            runtime.shutdown_background();
        }
    }
}

/// Where an object's bytes are read from.
enum Target {
    Local(PathBuf),
    Remote(StorePath),
}

struct Entry {
    target: Target,
    /// The spool file of a compressed object.
    spool: Option<PathBuf>,
    /// Held while an object is spooled on demand, so it is fetched once.
    spooling: Mutex<()>,
}

struct Inner {
    location: Location,
    objects: Vec<ObjectInfo>,
    entries: Vec<Entry>,
    remote: Option<Remote>,
    rt: Option<Rt>,
    spool_dir: Option<PathBuf>,
    /// What the spool holds, within its limits.
    spool_usage: Arc<Usage>,
    progress: Arc<Progress>,
    stats: Arc<Stats>,
    identity: [u8; 32],
}

/// A run's input: its objects, in order, and the ways to read them. Cheap to clone; `Send` and
/// `Sync`, so the scan and the chunk reads can run on different threads.
#[derive(Clone)]
pub struct Source {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("location", &self.inner.location)
            .field("objects", &self.inner.objects.len())
            .field("identity", &self.identity_hex())
            .finish_non_exhaustive()
    }
}

fn io_error(path: &Path, source: io::Error) -> SourceError {
    SourceError::Io { path: path.to_path_buf(), source }
}

/// The [`SourceError`] an I/O error carries, or `fallback` made from it.
fn unwrap_io(error: io::Error, fallback: impl FnOnce(io::Error) -> SourceError) -> SourceError {
    if SourceError::from_io(&error).is_none() {
        return fallback(error);
    }
    match error.into_inner().map(|inner| inner.downcast::<SourceError>()) {
        Some(Ok(source)) => *source,
        Some(Err(other)) => fallback(io::Error::other(other)),
        None => fallback(io::Error::other("unknown I/O error")),
    }
}

fn list_local(location: &Location) -> Result<Vec<(ObjectInfo, PathBuf)>, SourceError> {
    let input = location.to_string();
    let paths: Vec<PathBuf> = match location {
        Location::File(path) => vec![path.clone()],
        Location::Glob(pattern) => glob_files(pattern, &input)?,
        _ => unreachable!("list_local is only called on local locations"),
    };
    let mut objects = Vec::with_capacity(paths.len());
    for path in paths {
        let meta = std::fs::metadata(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => SourceError::NotFound {
                object: format!("input file {}", path.display()),
                fix: "check the path (relative paths start in the working directory); an object in a store is \
                      written s3://BUCKET/KEY"
                    .into(),
                source: Box::new(e),
            },
            _ => io_error(&path, e),
        })?;
        if meta.is_dir() {
            return Err(SourceError::Location {
                input: input.clone(),
                problem: format!("{} is a directory", path.display()),
                fix: format!("'{}/*.jsonl' for every .jsonl file in it", path.display()),
            });
        }
        let canonical = std::fs::canonicalize(&path).map_err(|e| io_error(&path, e))?;
        let key = match location {
            Location::Glob(pattern) => {
                let base = Path::new(literal_prefix(pattern));
                path.strip_prefix(base).unwrap_or(&path).to_string_lossy().into_owned()
            }
            _ => path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        objects.push((ObjectInfo::local(canonical.to_string_lossy().into_owned(), key, &meta), canonical));
    }
    Ok(objects)
}

/// The files (not directories) matching a local glob `pattern`, in path order; at least one.
fn glob_files(pattern: &str, input: &str) -> Result<Vec<PathBuf>, SourceError> {
    let matches = glob::glob(pattern).map_err(|e| SourceError::Location {
        input: input.to_string(),
        problem: format!("not a valid glob ({e})"),
        fix: "a pattern such as 'data/part-*.jsonl' ('*' and '?' within a name, '**' across directories)".into(),
    })?;
    let mut paths = Vec::new();
    for entry in matches {
        let path = entry.map_err(|e| {
            let path = e.path().to_path_buf();
            io_error(&path, io::Error::from(e))
        })?;
        if std::fs::metadata(&path).map_err(|e| io_error(&path, e))?.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    if paths.is_empty() {
        return Err(SourceError::NoObjects {
            input: input.to_string(),
            what: "file",
            fix: "check the pattern and the working directory, and quote it ('data/part-*.jsonl') so that \
                  the shell does not expand it"
                .into(),
        });
    }
    Ok(paths)
}

/// The literal directory part of a key pattern, to list under.
fn literal_prefix(pattern: &str) -> &str {
    let first = pattern.find(['*', '?', '[']).unwrap_or(pattern.len());
    match pattern[..first].rfind('/') {
        Some(slash) => &pattern[..slash],
        None => "",
    }
}

async fn list_remote(location: &Location, remote: &Remote) -> Result<Vec<(ObjectInfo, StorePath)>, SourceError> {
    let input = location.to_string();
    let named = |store: StoreKind, bucket: &str, path: &StorePath| format!("{}://{bucket}/{path}", store.scheme());
    match location {
        Location::Object { store, bucket, key } => {
            let path = StorePath::from(key.as_str());
            let name = named(*store, bucket, &path);
            let meta = remote.run(&name, false, remote.store.head(&path)).await?;
            Ok(vec![(ObjectInfo::remote(name, &meta), path)])
        }
        Location::Http { url } => {
            let parsed = url::Url::parse(url).map_err(|e| SourceError::Location {
                input: input.clone(),
                problem: format!("not a valid URL ({e})"),
                fix: "https://HOST/PATH".into(),
            })?;
            let path = StorePath::from_url_path(parsed.path()).map_err(|e| SourceError::Location {
                input: input.clone(),
                problem: format!("the URL's path is not usable ({e})"),
                fix: "https://HOST/PATH with plain path segments".into(),
            })?;
            let meta = remote.run(url, false, remote.store.head(&path)).await?;
            Ok(vec![(ObjectInfo::remote(url.clone(), &meta), path)])
        }
        Location::Prefix { store, bucket, prefix } | Location::KeyGlob { store, bucket, pattern: prefix } => {
            let (listed_prefix, pattern) = match location {
                Location::KeyGlob { pattern, .. } => {
                    let compiled = glob::Pattern::new(pattern).map_err(|e| SourceError::Location {
                        input: input.clone(),
                        problem: format!("not a valid key pattern ({e})"),
                        fix: format!("{}://BUCKET/data/part-*.jsonl", store.scheme()),
                    })?;
                    (literal_prefix(pattern), Some(compiled))
                }
                _ => (prefix.as_str(), None),
            };
            let list_path = (!listed_prefix.is_empty()).then(|| StorePath::from(listed_prefix));
            let bucket_name = format!("{}://{bucket}", store.scheme());
            let listing = remote.store.list(list_path.as_ref()).try_collect::<Vec<ObjectMeta>>();
            let mut metas = remote.run(&bucket_name, true, listing).await?;
            let options = glob::MatchOptions { require_literal_separator: true, ..glob::MatchOptions::new() };
            metas.retain(|meta| pattern.as_ref().is_none_or(|p| p.matches_with(meta.location.as_ref(), options)));
            metas.sort_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()));
            if metas.is_empty() {
                return Err(SourceError::NoObjects {
                    input,
                    what: "object",
                    fix: "check the bucket, the prefix and the pattern; a prefix is whole path segments \
                          (s3://BUCKET/data/ lists data/..., not data-old/...)"
                        .into(),
                });
            }
            Ok(metas
                .into_iter()
                .map(|meta| (ObjectInfo::remote(named(*store, bucket, &meta.location), &meta), meta.location))
                .collect())
        }
        Location::File(_) | Location::Glob(_) => unreachable!("list_remote is only called on remote locations"),
    }
}

fn connect(location: &Location, options: &SourceOptions, stats: &Arc<Stats>) -> Result<Remote, SourceError> {
    match location {
        Location::Object { store, bucket, .. }
        | Location::Prefix { store, bucket, .. }
        | Location::KeyGlob { store, bucket, .. } => {
            Remote::store(*store, bucket, &options.env, &options.retry, Arc::clone(stats))
        }
        Location::Http { url } => {
            let parsed = url::Url::parse(url).map_err(|e| SourceError::Location {
                input: url.clone(),
                problem: format!("not a valid URL ({e})"),
                fix: "https://HOST/PATH".into(),
            })?;
            let base = parsed[..url::Position::BeforePath].to_string();
            Remote::http(&base, &options.retry, Arc::clone(stats))
        }
        Location::File(_) | Location::Glob(_) => unreachable!("connect is only called on remote locations"),
    }
}

impl Source {
    /// Lists the objects `location` names (one request for an object or HTTP file, a paginated
    /// listing for a prefix or key pattern; `stat` and glob for local files). Remote I/O runs on
    /// `options.runtime` or the current runtime. Fails at once on a missing object or bucket and
    /// on refused credentials, with the setting to fix; transient failures are retried first.
    pub async fn open(location: Location, options: SourceOptions) -> Result<Source, SourceError> {
        let stats = Arc::new(Stats::new(options.on_failure.clone()));
        if !location.is_remote() {
            let listed = location.clone();
            let local = tokio::task::spawn_blocking(move || list_local(&listed))
                .await
                .map_err(|e| SourceError::Store { object: location.to_string(), source: Box::new(e) })??;
            let listed = local.into_iter().map(|(info, path)| (info, Target::Local(path))).collect();
            return Source::build(location, listed, None, None, &options, stats);
        }
        let handle = options.runtime.clone().unwrap_or_else(Handle::current);
        let remote = connect(&location, &options, &stats)?;
        let task_remote = remote.clone();
        let task_location = location.clone();
        let listed = handle
            .spawn(async move { list_remote(&task_location, &task_remote).await })
            .await
            .map_err(|e| SourceError::Store { object: location.to_string(), source: Box::new(e) })??;
        let listed = listed.into_iter().map(|(info, path)| (info, Target::Remote(path))).collect();
        Source::build(location, listed, Some(remote), Some(Rt { handle, owned: None }), &options, stats)
    }

    /// [`Source::open`] for synchronous callers (not on a runtime thread). A remote location runs
    /// its I/O on `options.runtime`, or on a two-thread runtime that the source owns.
    pub fn open_blocking(location: Location, options: SourceOptions) -> Result<Source, SourceError> {
        let stats = Arc::new(Stats::new(options.on_failure.clone()));
        if !location.is_remote() {
            let listed = list_local(&location)?.into_iter().map(|(info, path)| (info, Target::Local(path))).collect();
            return Source::build(location, listed, None, None, &options, stats);
        }
        let rt = match options.runtime.clone() {
            Some(handle) => Rt { handle, owned: None },
            None => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("input-io")
                    .enable_all()
                    .build()
                    .map_err(|e| SourceError::Config {
                        setting: "runtime".into(),
                        problem: format!("cannot start the I/O runtime ({e})"),
                    })?;
                Rt { handle: runtime.handle().clone(), owned: Some(runtime) }
            }
        };
        let remote = connect(&location, &options, &stats)?;
        let listed = rt.handle.block_on(list_remote(&location, &remote))?;
        let listed = listed.into_iter().map(|(info, path)| (info, Target::Remote(path))).collect();
        Source::build(location, listed, Some(remote), Some(rt), &options, stats)
    }

    fn build(
        location: Location,
        listed: Vec<(ObjectInfo, Target)>,
        remote: Option<Remote>,
        rt: Option<Rt>,
        options: &SourceOptions,
        stats: Arc<Stats>,
    ) -> Result<Source, SourceError> {
        let compressed = listed.iter().find(|(info, _)| info.compression != Compression::None);
        if let Some((info, _)) = compressed {
            let Some(dir) = &options.spool_dir else {
                return Err(SourceError::Config {
                    setting: "spool directory".into(),
                    problem: format!(
                        "input {location} has compressed objects ({}), which are decompressed once to a spool \
                         directory to be read by range; give one (the fetcher's state directory)",
                        info.name
                    ),
                });
            };
            std::fs::create_dir_all(dir).map_err(|source| SourceError::Spool {
                object: info.name.clone(),
                path: dir.clone(),
                source,
            })?;
        }
        let mut hasher = Sha256::new();
        hasher.update(b"chunkmill input identity v1\n");
        hasher.update((listed.len() as u64).to_le_bytes());
        for (info, _) in &listed {
            info.hash_into(&mut hasher);
        }
        let identity: [u8; 32] = hasher.finalize().into();
        let total = listed.iter().map(|(info, _)| info.size).sum();
        let spool_dir = options.spool_dir.clone();
        let spool_usage = Arc::new(Usage::new(options.spool_limits, listed.len()));
        let (objects, entries) = listed
            .into_iter()
            .map(|(info, target)| {
                let spool = match (&spool_dir, info.compression) {
                    (Some(dir), Compression::Gzip | Compression::Zstd) => Some(dir.join(spool::spool_name(&info))),
                    _ => None,
                };
                (info, Entry { target, spool, spooling: Mutex::new(()) })
            })
            .unzip();
        Ok(Source {
            inner: Arc::new(Inner {
                location,
                objects,
                entries,
                remote,
                rt,
                spool_dir,
                spool_usage,
                progress: Arc::new(Progress::new(total)),
                stats,
                identity,
            }),
        })
    }

    /// What was opened.
    pub fn location(&self) -> &Location {
        &self.inner.location
    }

    /// The objects, in run order (path order for a glob, key order for a prefix).
    pub fn objects(&self) -> &[ObjectInfo] {
        &self.inner.objects
    }

    /// The sum of the objects' stored sizes.
    pub fn total_size(&self) -> u64 {
        self.inner.progress.total_bytes()
    }

    /// SHA-256 over every object's name, size, compression and version, in order; the same input
    /// listed again gives the same digest, any change to an object, to the set or to the order
    /// another. Hashed bytes (integers little-endian; `str(x)` is `u64 len(x) ‖ x` in UTF-8;
    /// `opt(x)` is `0u8` when absent, else `1u8 ‖ str(x)`):
    ///
    /// ```text
    /// "chunkmill input identity v1\n" ‖ u64 object count ‖ for each object, in order:
    ///   str(name) ‖ u64 size ‖ u8 compression (0 none, 1 gzip, 2 zstd) ‖ version
    /// version, local file:   "L" ‖ u64 len ‖ i64 mtime seconds ‖ u32 mtime nanoseconds ‖ u64 inode
    /// version, remote:       "R" ‖ opt(ETag) ‖ opt(version id)
    ///                        ‖ (only when both are absent) i64 last-modified seconds ‖ u32 nanoseconds
    /// ```
    ///
    /// A local file's identity is where it lies, not what it holds: a copy, a `touch` or a
    /// restore from backup is another input (its content hash stays the scan's business).
    pub fn identity(&self) -> [u8; 32] {
        self.inner.identity
    }

    /// [`Source::identity`] as 64 hex digits.
    pub fn identity_hex(&self) -> String {
        self.inner.identity.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Bytes read so far out of [`Source::total_size`], to poll for a progress line or a gauge.
    pub fn progress(&self) -> Arc<Progress> {
        Arc::clone(&self.inner.progress)
    }

    /// Transient store failures seen and retried, to export as a metric.
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.inner.stats)
    }

    /// The spool file of a compressed object (whether or not it is written yet).
    pub fn spool_path(&self, index: usize) -> Option<&Path> {
        self.inner.entries.get(index).and_then(|entry| entry.spool.as_deref())
    }

    fn object(&self, index: usize) -> Result<(&ObjectInfo, &Entry), SourceError> {
        match (self.inner.objects.get(index), self.inner.entries.get(index)) {
            (Some(info), Some(entry)) => Ok((info, entry)),
            _ => Err(SourceError::Config {
                setting: "object index".into(),
                problem: format!(
                    "object #{index} asked of input {}, which has {} objects; the chunk index belongs to another input",
                    self.inner.location,
                    self.inner.objects.len()
                ),
            }),
        }
    }

    fn remote(&self) -> Result<(&Remote, &Rt), SourceError> {
        match (&self.inner.remote, &self.inner.rt) {
            (Some(remote), Some(rt)) => Ok((remote, rt)),
            _ => Err(SourceError::Config {
                setting: "input".into(),
                problem: "a remote object without a store client".into(),
            }),
        }
    }

    /// Opens object `index` for the scan: its bytes from the start, decompressed, as a blocking
    /// reader. A compressed object is spooled while it is read (finished at end of stream), or
    /// read from its spool file when an earlier run left a complete one. Errors come as
    /// `io::Error`s carrying a [`SourceError`] ([`SourceError::from_io`]); a changed object
    /// ([`ErrorKind::Changed`](crate::ErrorKind::Changed)) is detected when it is opened and at end of stream.
    ///
    /// Reading a remote object blocks on a channel: call it off the runtime's worker threads
    /// (in `spawn_blocking`, on rayon or on a plain thread).
    pub fn reader(&self, index: usize) -> Result<ObjectReader, SourceError> {
        let (info, entry) = self.object(index)?;
        if let Some(spool_path) = &entry.spool {
            if let Ok(file) = File::open(spool_path) {
                let len = file.metadata().map_err(|e| io_error(spool_path, e))?.len();
                self.inner.spool_usage.set(index, len);
                let progress = self.progress();
                return Ok(ObjectReader::new(Scaled { file, len, size: info.size, pos: 0, credited: 0, progress }));
            }
            let raw = self.raw_reader(index)?;
            let object = info.name.clone();
            let format = info.compression.name();
            let decoder: Box<dyn Read + Send> = match info.compression {
                Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(raw)),
                Compression::Zstd => {
                    Box::new(zstd::stream::read::Decoder::new(raw).map_err(|source| SourceError::Decompress {
                        object: object.clone(),
                        format,
                        source,
                    })?)
                }
                Compression::None => Box::new(raw),
            };
            let decoded = Decoded { inner: decoder, object: object.clone(), format };
            let writer = SpoolWriter::create(spool_path).map_err(|source| SourceError::Spool {
                object: object.clone(),
                path: spool_path.clone(),
                source,
            })?;
            let budget = Budget::new(Arc::clone(&self.inner.spool_usage), index, object.clone(), info.size);
            let on_error = Box::new(move |path: &Path, source: io::Error| {
                SourceError::Spool { object: object.clone(), path: path.to_path_buf(), source }.into_io()
            });
            return Ok(ObjectReader::new(Tee::new(decoded, writer, on_error, budget)));
        }
        self.raw_reader(index)
    }

    /// The stored bytes of object `index`, counted in the progress and checked against the listed
    /// version.
    fn raw_reader(&self, index: usize) -> Result<ObjectReader, SourceError> {
        let (info, entry) = self.object(index)?;
        match &entry.target {
            Target::Local(path) => {
                let file = open_checked(path, info)?;
                Ok(ObjectReader::new(LocalReader {
                    file,
                    path: path.clone(),
                    info: info.clone(),
                    read: 0,
                    progress: self.progress(),
                }))
            }
            Target::Remote(path) => {
                let (remote, rt) = self.remote()?;
                let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
                let task = rt.handle.spawn(pump(remote.clone(), path.clone(), info.clone(), tx));
                Ok(ObjectReader::new(ChannelReader {
                    rx,
                    current: Bytes::new(),
                    task,
                    progress: self.progress(),
                    object: info.name.clone(),
                    finished: false,
                }))
            }
        }
    }

    /// Reads `range` of object `index` (offsets into its decompressed bytes when compressed):
    /// one ranged GET on a remote object, conditional on the listed ETag (and pinned to the
    /// listed version id); `pread` on a local file after checking it is the listed version; the
    /// spool file for a compressed object (spooled first if it is not yet). A changed object
    /// fails with [`ErrorKind::Changed`](crate::ErrorKind::Changed) naming it.
    ///
    /// Blocks: for async callers there is [`Source::read_range_async`].
    pub fn read_range(&self, index: usize, range: Range<u64>) -> Result<Vec<u8>, SourceError> {
        let (info, entry) = self.object(index)?;
        if range.start > range.end {
            return Err(SourceError::Range { object: info.name.clone(), range, len: info.size });
        }
        if entry.spool.is_some() {
            let path = self.ensure_spooled(index)?;
            return read_spool(&path, info, range);
        }
        match &entry.target {
            Target::Local(path) => read_local(path, info, range),
            Target::Remote(path) => {
                let (remote, rt) = self.remote()?;
                rt.handle.block_on(read_remote(remote, path, info, range))
            }
        }
    }

    /// [`Source::read_range`] for async callers: remote reads are awaited, file reads run on the
    /// blocking pool.
    pub async fn read_range_async(&self, index: usize, range: Range<u64>) -> Result<Vec<u8>, SourceError> {
        let (info, entry) = self.object(index)?;
        if let (Target::Remote(path), None) = (&entry.target, &entry.spool) {
            if range.start > range.end {
                return Err(SourceError::Range { object: info.name.clone(), range, len: info.size });
            }
            let (remote, _) = self.remote()?;
            return read_remote(remote, path, info, range).await;
        }
        let this = self.clone();
        let name = info.name.clone();
        tokio::task::spawn_blocking(move || this.read_range(index, range))
            .await
            .map_err(|e| SourceError::Store { object: name, source: Box::new(e) })?
    }

    /// The spool file of compressed object `index`, written first (by streaming the whole
    /// object) if no complete one exists.
    fn ensure_spooled(&self, index: usize) -> Result<PathBuf, SourceError> {
        let (info, entry) = self.object(index)?;
        let Some(path) = &entry.spool else {
            return Err(SourceError::Config {
                setting: "spool".into(),
                problem: format!("{} is not compressed", info.name),
            });
        };
        if path.exists() {
            return Ok(path.clone());
        }
        let _guard = common::sync::lock(&entry.spooling, "spooling");
        if !path.exists() {
            let mut reader = self.reader(index)?;
            io::copy(&mut reader, &mut io::sink()).map_err(|e| {
                unwrap_io(e, |source| SourceError::Spool { object: info.name.clone(), path: path.clone(), source })
            })?;
        }
        Ok(path.clone())
    }

    /// Removes spool files in the spool directory that belong to no object of this input (older
    /// versions, other inputs) and partial files left by a crash. Returns how many it removed.
    pub fn prune_spool(&self) -> Result<usize, SourceError> {
        let Some(dir) = &self.inner.spool_dir else { return Ok(0) };
        let keep: Vec<&Path> = self.inner.entries.iter().filter_map(|e| e.spool.as_deref()).collect();
        let ours = format!("{}{}-", spool::PART, std::process::id());
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(source) => {
                return Err(SourceError::Spool { object: self.inner.location.to_string(), path: dir.clone(), source })
            }
        };
        let mut removed = 0;
        for dir_entry in entries.flatten() {
            let path = dir_entry.path();
            let name = dir_entry.file_name().to_string_lossy().into_owned();
            let stale_part = name.contains(spool::PART) && !name.contains(&ours);
            let stale_spool = name.ends_with(spool::SUFFIX) && !keep.contains(&path.as_path());
            if (stale_part || stale_spool) && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Opens a local file and checks it is still the listed version.
fn open_checked(path: &Path, info: &ObjectInfo) -> Result<File, SourceError> {
    let file = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => {
            SourceError::Changed { object: info.name.clone(), detail: "it no longer exists".into() }
        }
        _ => io_error(path, e),
    })?;
    check_local(&file, path, info)?;
    Ok(file)
}

fn check_local(file: &File, path: &Path, info: &ObjectInfo) -> Result<(), SourceError> {
    let now = local_version(&file.metadata().map_err(|e| io_error(path, e))?);
    if now != info.version {
        return Err(SourceError::Changed {
            object: info.name.clone(),
            detail: describe_local_change(&info.version, &now),
        });
    }
    Ok(())
}

fn describe_local_change(listed: &Version, now: &Version) -> String {
    match (listed, now) {
        (Version::Local { inode: a, .. }, Version::Local { inode: b, .. }) if a != b => {
            "the file was replaced (another inode)".into()
        }
        (Version::Local { len: a, .. }, Version::Local { len: b, .. }) if a != b => {
            format!("{a} bytes when listed, {b} now")
        }
        _ => "its modification time changed".into(),
    }
}

fn read_local(path: &Path, info: &ObjectInfo, range: Range<u64>) -> Result<Vec<u8>, SourceError> {
    if range.end > info.size {
        return Err(SourceError::Range { object: info.name.clone(), range, len: info.size });
    }
    let file = open_checked(path, info)?;
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    file.read_exact_at(&mut buf, range.start).map_err(|e| io_error(path, e))?;
    check_local(&file, path, info)?;
    Ok(buf)
}

fn read_spool(path: &Path, info: &ObjectInfo, range: Range<u64>) -> Result<Vec<u8>, SourceError> {
    let spool_error = |source| SourceError::Spool { object: info.name.clone(), path: path.to_path_buf(), source };
    let file = File::open(path).map_err(spool_error)?;
    let len = file.metadata().map_err(spool_error)?.len();
    if range.end > len {
        return Err(SourceError::Range { object: info.name.clone(), range, len });
    }
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    file.read_exact_at(&mut buf, range.start).map_err(spool_error)?;
    Ok(buf)
}

async fn read_remote(
    remote: &Remote,
    path: &StorePath,
    info: &ObjectInfo,
    range: Range<u64>,
) -> Result<Vec<u8>, SourceError> {
    if range.end > info.size {
        return Err(SourceError::Range { object: info.name.clone(), range, len: info.size });
    }
    let want = range.end - range.start;
    if want == 0 {
        return Ok(Vec::new());
    }
    let options = info.get_options(Some(range));
    let (result, outcome) = traced(async {
        let got = remote.store.get_opts(path, options).await?;
        let meta = got.meta.clone();
        Ok::<_, object_store::Error>((meta, got.bytes().await?))
    })
    .await;
    let (meta, bytes) = result.map_err(|e| after_listing(remote.classify(&info.name, false, e, outcome)))?;
    if let Some(detail) = info.differs(&meta) {
        return Err(SourceError::Changed { object: info.name.clone(), detail });
    }
    if bytes.len() as u64 != want {
        return Err(SourceError::Changed {
            object: info.name.clone(),
            detail: format!("a range of {want} bytes returned {}", bytes.len()),
        });
    }
    Ok(Vec::from(bytes))
}

/// An object that was listed and is now missing has changed.
fn after_listing(error: SourceError) -> SourceError {
    match error {
        SourceError::NotFound { object, .. } => SourceError::Changed { object, detail: "it no longer exists".into() },
        other => other,
    }
}

/// What the download task sends the reader.
enum Message {
    Data(Bytes),
    End,
    Failed(SourceError),
}

enum PumpError {
    Store(object_store::Error),
    Changed(String),
}

/// Streams one object into `tx`; stops early when the reader is gone.
async fn pump(remote: Remote, path: StorePath, info: ObjectInfo, tx: mpsc::Sender<Message>) {
    let stream = async {
        let got = remote.store.get_opts(&path, info.get_options(None)).await.map_err(PumpError::Store)?;
        if let Some(detail) = info.differs(&got.meta) {
            return Err(PumpError::Changed(detail));
        }
        let mut body = got.into_stream();
        let mut streamed = 0u64;
        while let Some(item) = body.next().await {
            let bytes = item.map_err(PumpError::Store)?;
            streamed += bytes.len() as u64;
            if tx.send(Message::Data(bytes)).await.is_err() {
                return Ok(());
            }
        }
        if streamed != info.size {
            return Err(PumpError::Changed(format!("{streamed} bytes streamed, {} listed", info.size)));
        }
        Ok(())
    };
    let (result, outcome) = traced(stream).await;
    let message = match result {
        Ok(()) => Message::End,
        Err(PumpError::Changed(detail)) => Message::Failed(SourceError::Changed { object: info.name.clone(), detail }),
        Err(PumpError::Store(e)) => Message::Failed(after_listing(remote.classify(&info.name, false, e, outcome))),
    };
    let _ = tx.send(message).await;
}

/// A blocking reader of one object's bytes (decompressed), from [`Source::reader`].
pub struct ObjectReader {
    inner: Box<dyn Read + Send>,
}

impl ObjectReader {
    fn new(inner: impl Read + Send + 'static) -> Self {
        ObjectReader { inner: Box::new(inner) }
    }
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl std::fmt::Debug for ObjectReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectReader").finish_non_exhaustive()
    }
}

/// Drains the download task's channel.
struct ChannelReader {
    rx: mpsc::Receiver<Message>,
    current: Bytes,
    task: tokio::task::JoinHandle<()>,
    progress: Arc<Progress>,
    object: String,
    finished: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.current.is_empty() {
                let n = buf.len().min(self.current.len());
                buf[..n].copy_from_slice(&self.current.split_to(n));
                self.progress.add(n as u64);
                return Ok(n);
            }
            if self.finished || buf.is_empty() {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Message::Data(bytes)) => self.current = bytes,
                Some(Message::End) => self.finished = true,
                Some(Message::Failed(error)) => {
                    self.finished = true;
                    return Err(error.into_io());
                }
                None => {
                    self.finished = true;
                    return Err(SourceError::Store {
                        object: self.object.clone(),
                        source: "the download stopped before the end of the object (its runtime shut down)".into(),
                    }
                    .into_io());
                }
            }
        }
    }
}

impl Drop for ChannelReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A local file's bytes, checked at end of stream against the listed version.
struct LocalReader {
    file: File,
    path: PathBuf,
    info: ObjectInfo,
    read: u64,
    progress: Arc<Progress>,
}

impl Read for LocalReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf).map_err(|e| io_error(&self.path, e).into_io())?;
        self.read += n as u64;
        self.progress.add(n as u64);
        if n == 0 && !buf.is_empty() {
            check_local(&self.file, &self.path, &self.info).map_err(SourceError::into_io)?;
            if self.read != self.info.size {
                let detail = format!("{} bytes when listed, {} read", self.info.size, self.read);
                return Err(SourceError::Changed { object: self.info.name.clone(), detail }.into_io());
            }
        }
        Ok(n)
    }
}

/// A decoder whose own errors name the object and format.
struct Decoded {
    inner: Box<dyn Read + Send>,
    object: String,
    format: &'static str,
}

impl Read for Decoded {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            if SourceError::from_io(&e).is_some() {
                e
            } else {
                SourceError::Decompress { object: self.object.clone(), format: self.format, source: e }.into_io()
            }
        })
    }
}

/// A spool file read back for the scan; progress counts its share of the stored size.
struct Scaled {
    file: File,
    len: u64,
    size: u64,
    pos: u64,
    credited: u64,
    progress: Arc<Progress>,
}

impl Read for Scaled {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.pos += n as u64;
        let target = if self.len == 0 {
            self.size
        } else {
            (u128::from(self.size) * u128::from(self.pos) / u128::from(self.len)) as u64
        };
        self.progress.add(target.saturating_sub(self.credited));
        self.credited = self.credited.max(target);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, e_tag: Option<&str>) -> ObjectInfo {
        ObjectInfo {
            name: name.into(),
            key: name.into(),
            size: 10,
            version: Version::Remote {
                e_tag: e_tag.map(String::from),
                version: None,
                modified_sec: 1,
                modified_nsec: 0,
            },
            compression: Compression::from_name(name),
        }
    }

    fn digest(objects: &[ObjectInfo]) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for object in objects {
            object.hash_into(&mut hasher);
        }
        hasher.finalize().into()
    }

    #[test]
    fn the_identity_covers_names_versions_and_order() {
        let a = info("s3://b/a", Some("\"1\""));
        let b = info("s3://b/b", Some("\"2\""));
        let base = digest(&[a.clone(), b.clone()]);
        assert_eq!(base, digest(&[a.clone(), b.clone()]));
        assert_ne!(base, digest(&[b.clone(), a.clone()]));
        assert_ne!(base, digest(&[a.clone(), info("s3://b/b", Some("\"3\""))]));
        assert_ne!(base, digest(&[a.clone(), info("s3://b/c", Some("\"2\""))]));
        let mut bigger = b.clone();
        bigger.size = 11;
        assert_ne!(base, digest(&[a, bigger]));
    }

    #[test]
    fn the_modification_time_counts_only_without_etag_or_version() {
        let mut with_tag = info("s3://b/a", Some("\"1\""));
        let before = digest(std::slice::from_ref(&with_tag));
        if let Version::Remote { modified_sec, .. } = &mut with_tag.version {
            *modified_sec = 2;
        }
        assert_eq!(before, digest(std::slice::from_ref(&with_tag)));
        let mut without = info("https://h/a", None);
        let before = digest(std::slice::from_ref(&without));
        if let Version::Remote { modified_sec, .. } = &mut without.version {
            *modified_sec = 2;
        }
        assert_ne!(before, digest(std::slice::from_ref(&without)));
    }

    fn open_local(input: &str, spool: Option<&Path>) -> Source {
        let options =
            SourceOptions { spool_dir: spool.map(Path::to_path_buf), env: Env::empty(), ..SourceOptions::default() };
        Source::open_blocking(Location::parse(input).expect("location"), options).expect("open")
    }

    fn read_all(source: &Source, index: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        source.reader(index).expect("reader").read_to_end(&mut bytes).expect("read");
        bytes
    }

    #[test]
    fn a_local_glob_lists_files_in_path_order_and_reads_them_by_range() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in [("part-2.jsonl", "two\n"), ("part-1.jsonl", "one\n"), ("other.txt", "x")] {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        let source = open_local(&format!("{}/part-*.jsonl", dir.path().display()), None);
        let names: Vec<&str> = source.objects().iter().map(|o| o.name.rsplit('/').next().unwrap_or("")).collect();
        assert_eq!(names, ["part-1.jsonl", "part-2.jsonl"]);
        assert_eq!(read_all(&source, 1), b"two\n");
        assert_eq!(source.read_range(0, 1..3).expect("range"), b"ne");
        assert_eq!(source.progress().bytes_read(), 4);
        assert_eq!(source.total_size(), 8);
        let error = source.read_range(0, 2..9).expect_err("past the end");
        assert_eq!(error.kind(), crate::ErrorKind::Range);
    }

    #[test]
    fn a_glob_that_matches_nothing_and_a_missing_file_say_so() {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = || SourceOptions { env: Env::empty(), ..SourceOptions::default() };
        let glob = Location::parse(&format!("{}/none-*.jsonl", dir.path().display())).expect("location");
        let error = Source::open_blocking(glob, options()).expect_err("no match");
        assert_eq!(error.kind(), crate::ErrorKind::NoObjects);
        assert!(error.to_string().contains("none-*.jsonl"), "{error}");
        let missing = Location::parse(&format!("{}/missing.jsonl", dir.path().display())).expect("location");
        let error = Source::open_blocking(missing, options()).expect_err("missing");
        assert_eq!(error.kind(), crate::ErrorKind::NotFound);
        assert!(error.to_string().contains("missing.jsonl"), "{error}");
    }

    #[test]
    fn gzip_and_zstd_objects_are_decompressed_once_into_the_spool_and_read_from_it() {
        use std::io::Write;
        let dir = tempfile::tempdir().expect("temp dir");
        let spool = dir.path().join("spool");
        let text: Vec<u8> = (0..1000).flat_map(|i| format!("{{\"n\":{i}}}\n").into_bytes()).collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&text[..5000]).expect("gzip");
        let mut member = gz.finish().expect("gzip");
        // A second gzip member, as `cat a.gz b.gz` makes.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&text[5000..]).expect("gzip");
        member.extend(gz.finish().expect("gzip"));
        std::fs::write(dir.path().join("a.jsonl.gz"), &member).expect("write");
        std::fs::write(dir.path().join("b.jsonl.zst"), zstd::encode_all(&text[..], 3).expect("zstd")).expect("write");
        let source = open_local(&format!("{}/*.jsonl.*", dir.path().display()), Some(&spool));
        assert_eq!(source.objects()[0].compression, Compression::Gzip);
        assert_eq!(source.objects()[1].compression, Compression::Zstd);
        for index in 0..2 {
            assert_eq!(read_all(&source, index), text, "object {index}");
            assert!(source.spool_path(index).is_some_and(Path::exists), "object {index} is spooled");
            assert_eq!(source.read_range(index, 5990..6010).expect("range"), &text[5990..6010]);
        }
        assert_eq!(source.progress().bytes_read(), source.total_size());
        // A restarted process reuses the spool; nothing else is left in it.
        let again = open_local(&format!("{}/*.jsonl.*", dir.path().display()), Some(&spool));
        assert_eq!(read_all(&again, 1), text);
        std::fs::write(spool.join("stale.spool"), b"old").expect("write");
        assert_eq!(again.prune_spool().expect("prune"), 1);
        assert_eq!(std::fs::read_dir(&spool).expect("list").count(), 2);
    }

    #[test]
    fn a_compressed_input_without_a_spool_directory_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("a.jsonl.zst"), zstd::encode_all(&b"{}\n"[..], 3).expect("zstd"))
            .expect("write");
        let location = Location::parse(&format!("{}/a.jsonl.zst", dir.path().display())).expect("location");
        let error = Source::open_blocking(location, SourceOptions { env: Env::empty(), ..SourceOptions::default() })
            .expect_err("no spool");
        assert_eq!(error.kind(), crate::ErrorKind::Config);
        assert!(error.to_string().contains("a.jsonl.zst"), "{error}");
    }

    #[test]
    fn a_corrupt_gzip_file_names_the_object_and_the_format() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("bad.jsonl.gz"), b"\x1f\x8b\x08\x00garbage").expect("write");
        let source = open_local(&format!("{}/bad.jsonl.gz", dir.path().display()), Some(&dir.path().join("spool")));
        let error = source.reader(0).expect("reader").read_to_end(&mut Vec::new()).expect_err("corrupt");
        let text = SourceError::from_io(&error).map(ToString::to_string).unwrap_or_default();
        assert!(text.contains("bad.jsonl.gz") && text.contains("gzip"), "{text}");
    }

    #[test]
    fn a_local_file_rewritten_after_it_was_listed_is_a_changed_object() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, "{\"a\":1}\n").expect("write");
        let source = open_local(&path.display().to_string(), None);
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "{\"a\":2}\n{\"b\":3}\n").expect("rewrite");
        let error = source.read_range(0, 0..4).expect_err("changed");
        assert_eq!(error.kind(), crate::ErrorKind::Changed);
        assert!(error.to_string().contains("a.jsonl"), "{error}");
    }

    #[test]
    fn a_key_pattern_is_listed_under_its_literal_directory() {
        assert_eq!(literal_prefix("data/part-*.jsonl"), "data");
        assert_eq!(literal_prefix("a/b/*/x.gz"), "a/b");
        assert_eq!(literal_prefix("part-*.jsonl"), "");
    }
}
