//! What `--input` names: a local file or glob, an object, prefix or key pattern in S3, GCS or
//! Azure, or a file behind HTTP(S). [`Location::parse`] only reads the text (no I/O, no
//! credentials); [`crate::Source::open`] lists what it names. A name ending in `.gz` or `.zst`
//! is compressed ([`Compression::from_name`]), decided per object, so a prefix may mix them.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::SourceError;

/// How an object's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// As they are.
    None,
    /// gzip (`.gz`), possibly several members one after the other.
    Gzip,
    /// zstd (`.zst`), possibly several frames one after the other.
    Zstd,
}

impl Compression {
    /// From a file or key name's suffix: `.gz` is gzip, `.zst` is zstd, anything else plain.
    pub fn from_name(name: &str) -> Self {
        if name.ends_with(".gz") {
            Compression::Gzip
        } else if name.ends_with(".zst") {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// Its name in messages: "gzip", "zstd" or "none".
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    /// Its tag in the identity digest (see [`crate::Source::identity`]).
    pub(crate) fn tag(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Zstd => 2,
        }
    }
}

/// An object store reached through `object_store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreKind {
    /// Amazon S3 and S3-compatible stores (`s3://`).
    S3,
    /// Google Cloud Storage (`gs://`).
    Gcs,
    /// Azure Blob Storage (`az://`, `azure://`).
    Azure,
}

impl StoreKind {
    /// The URL scheme used to write it.
    pub fn scheme(self) -> &'static str {
        match self {
            StoreKind::S3 => "s3",
            StoreKind::Gcs => "gs",
            StoreKind::Azure => "az",
        }
    }

    /// What the bucket is called in this store.
    fn bucket_word(self) -> &'static str {
        match self {
            StoreKind::Azure => "CONTAINER",
            StoreKind::S3 | StoreKind::Gcs => "BUCKET",
        }
    }
}

/// Where the input lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// One local file.
    File(PathBuf),
    /// Every local file matching a glob (`*`, `?`, `[...]`, `**`), in path order.
    Glob(String),
    /// One object: `s3://BUCKET/KEY`.
    Object {
        /// The store.
        store: StoreKind,
        /// The bucket (Azure: the container).
        bucket: String,
        /// The key.
        key: String,
    },
    /// Every object under a prefix, in key order: `s3://BUCKET/PREFIX/` (or `s3://BUCKET/` for the
    /// whole bucket). The prefix is whole path segments: `data/` does not match `data-old/x`.
    Prefix {
        /// The store.
        store: StoreKind,
        /// The bucket.
        bucket: String,
        /// The prefix without its trailing `/` (empty for the whole bucket).
        prefix: String,
    },
    /// Every object whose key matches a glob, in key order: `s3://BUCKET/data/part-*.jsonl`
    /// (`*` does not cross `/`; `**` does).
    KeyGlob {
        /// The store.
        store: StoreKind,
        /// The bucket.
        bucket: String,
        /// The key pattern.
        pattern: String,
    },
    /// One file behind HTTP(S): `https://HOST/PATH`.
    Http {
        /// The URL.
        url: String,
    },
}

const FIX_ANY: &str = "a local path ('data/users.jsonl'), a local glob ('data/part-*.jsonl'), s3://BUCKET/KEY, \
                       s3://BUCKET/PREFIX/, gs://BUCKET/KEY, az://CONTAINER/KEY or https://HOST/PATH";

fn has_glob(text: &str) -> bool {
    text.contains(['*', '?', '['])
}

impl Location {
    /// Reads `--input`. Local paths stay as written (relative to the working directory).
    pub fn parse(input: &str) -> Result<Location, SourceError> {
        let error = |problem: String, fix: String| SourceError::Location { input: input.to_string(), problem, fix };
        if input.trim().is_empty() {
            return Err(error("it is empty".into(), FIX_ANY.into()));
        }
        let Some((scheme, rest)) = input.split_once("://") else {
            return Ok(if has_glob(input) { Location::Glob(input.to_string()) } else { Location::File(input.into()) });
        };
        let store = match scheme.to_ascii_lowercase().as_str() {
            "s3" | "s3a" => StoreKind::S3,
            "gs" | "gcs" => StoreKind::Gcs,
            "az" | "azure" | "adl" | "abfs" | "abfss" => StoreKind::Azure,
            "http" | "https" => return Self::parse_http(input),
            "file" => {
                let path = rest.strip_prefix("localhost").unwrap_or(rest);
                if !path.starts_with('/') {
                    return Err(error(
                        "a file:// URL needs an absolute path".into(),
                        "file:///ABSOLUTE/PATH or a plain path".into(),
                    ));
                }
                return Location::parse(path);
            }
            other => return Err(error(format!("'{other}://' is not a supported scheme"), FIX_ANY.into())),
        };
        let word = store.bucket_word();
        let example = format!("{}://{word}/KEY or {}://{word}/PREFIX/", store.scheme(), store.scheme());
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(error(format!("the {} is missing", word.to_ascii_lowercase()), example));
        }
        if bucket.contains(['@', '?', '#', ' ']) || has_glob(bucket) {
            return Err(error(format!("'{bucket}' is not a {} name", word.to_ascii_lowercase()), example));
        }
        let bucket = bucket.to_string();
        if key.contains("//") || key.starts_with('/') {
            return Err(error("the key has an empty path segment ('//')".into(), example));
        }
        Ok(if key.is_empty() || key.ends_with('/') {
            Location::Prefix { store, bucket, prefix: key.trim_end_matches('/').to_string() }
        } else if has_glob(key) {
            glob::Pattern::new(key)
                .map_err(|e| error(format!("the key pattern is not a valid glob ({e})"), example.clone()))?;
            Location::KeyGlob { store, bucket, pattern: key.to_string() }
        } else {
            Location::Object { store, bucket, key: key.to_string() }
        })
    }

    fn parse_http(input: &str) -> Result<Location, SourceError> {
        let error = |problem: String| SourceError::Location {
            input: input.to_string(),
            problem,
            fix: "https://HOST/PATH/FILE.jsonl (one URL per file; for many files use object storage)".into(),
        };
        let url = url::Url::parse(input).map_err(|e| error(format!("not a valid URL ({e})")))?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(error("the host is missing".into()));
        }
        if url.path().is_empty() || url.path() == "/" || url.path().ends_with('/') {
            return Err(error("it names a directory, and HTTP cannot list one".into()));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(error("a query or fragment is not supported (pre-signed URLs are not)".into()));
        }
        Ok(Location::Http { url: url.to_string() })
    }

    /// Whether reading it needs an object store client (and so a tokio runtime).
    pub fn is_remote(&self) -> bool {
        !matches!(self, Location::File(_) | Location::Glob(_))
    }
}

impl FromStr for Location {
    type Err = SourceError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        Location::parse(input)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File(path) => write!(f, "{}", path.display()),
            Location::Glob(pattern) => f.write_str(pattern),
            Location::Object { store, bucket, key } => write!(f, "{}://{bucket}/{key}", store.scheme()),
            Location::Prefix { store, bucket, prefix } if prefix.is_empty() => {
                write!(f, "{}://{bucket}/", store.scheme())
            }
            Location::Prefix { store, bucket, prefix } => write!(f, "{}://{bucket}/{prefix}/", store.scheme()),
            Location::KeyGlob { store, bucket, pattern } => write!(f, "{}://{bucket}/{pattern}", store.scheme()),
            Location::Http { url } => f.write_str(url),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn parse(input: &str) -> Location {
        Location::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"))
    }

    fn object(store: StoreKind, bucket: &str, key: &str) -> Location {
        Location::Object { store, bucket: bucket.into(), key: key.into() }
    }

    #[test]
    fn local_paths_and_globs() {
        assert_eq!(parse("data/users.jsonl"), Location::File("data/users.jsonl".into()));
        assert_eq!(parse("/abs/users.jsonl.gz"), Location::File("/abs/users.jsonl.gz".into()));
        assert_eq!(parse("data/part-*.jsonl"), Location::Glob("data/part-*.jsonl".into()));
        assert_eq!(parse("data/part-?[0-9].jsonl"), Location::Glob("data/part-?[0-9].jsonl".into()));
        assert_eq!(parse("file:///abs/x.jsonl"), Location::File("/abs/x.jsonl".into()));
    }

    #[test]
    fn objects_prefixes_and_key_globs() {
        assert_eq!(parse("s3://bucket/users.jsonl"), object(StoreKind::S3, "bucket", "users.jsonl"));
        assert_eq!(parse("s3://bucket/a/b/users.jsonl.zst"), object(StoreKind::S3, "bucket", "a/b/users.jsonl.zst"));
        assert_eq!(parse("gs://bucket/k"), object(StoreKind::Gcs, "bucket", "k"));
        assert_eq!(parse("az://container/k"), object(StoreKind::Azure, "container", "k"));
        assert_eq!(parse("azure://container/k"), object(StoreKind::Azure, "container", "k"));
        assert_eq!(
            parse("s3://bucket/data/"),
            Location::Prefix { store: StoreKind::S3, bucket: "bucket".into(), prefix: "data".into() }
        );
        assert_eq!(
            parse("s3://bucket"),
            Location::Prefix { store: StoreKind::S3, bucket: "bucket".into(), prefix: String::new() }
        );
        assert_eq!(
            parse("s3://bucket/data/part-*.jsonl"),
            Location::KeyGlob { store: StoreKind::S3, bucket: "bucket".into(), pattern: "data/part-*.jsonl".into() }
        );
    }

    #[test]
    fn display_writes_back_what_was_parsed() {
        for input in
            ["s3://b/k.jsonl", "s3://b/p/", "s3://b/", "gs://b/x/*.gz", "https://h:8080/a/b.jsonl", "data/x.jsonl"]
        {
            assert_eq!(parse(input).to_string(), input);
        }
    }

    #[test]
    fn http_urls() {
        assert_eq!(parse("https://host/a/b.jsonl"), Location::Http { url: "https://host/a/b.jsonl".into() });
        assert_eq!(
            parse("http://127.0.0.1:9000/b.jsonl"),
            Location::Http { url: "http://127.0.0.1:9000/b.jsonl".into() }
        );
    }

    #[test]
    fn mistakes_name_the_input_and_what_to_write() {
        for (input, needle) in [
            ("ftp://host/x", "'ftp://' is not a supported scheme"),
            ("s3:///key", "the bucket is missing"),
            ("az:///key", "the container is missing"),
            ("s3://b//k", "empty path segment"),
            ("https://host/dir/", "HTTP cannot list"),
            ("https://host/x.jsonl?X-Amz-Signature=1", "query"),
            ("", "it is empty"),
            ("s3://b/[oops", "not a valid glob"),
        ] {
            let error = Location::parse(input).expect_err(input);
            assert_eq!(error.kind(), ErrorKind::Location);
            let text = error.to_string();
            assert!(text.contains(needle), "{input}: {text}");
            assert!(text.contains(&format!("'{input}'")), "{input}: {text}");
            assert!(text.contains("; write "), "{input}: {text}");
        }
    }

    #[test]
    fn compression_comes_from_the_suffix() {
        assert_eq!(Compression::from_name("a.jsonl.gz"), Compression::Gzip);
        assert_eq!(Compression::from_name("s3://b/a.json.zst"), Compression::Zstd);
        assert_eq!(Compression::from_name("a.jsonl"), Compression::None);
        assert_eq!(Compression::from_name("a.gzip"), Compression::None);
    }
}
