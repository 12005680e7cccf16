//! The object-store sink's place among the sinks: `--sink s3://BUCKET/PREFIX/` (also `gs://`,
//! `az://`, and `file:///DIR/` for the same layout in a local or mounted directory), its flags
//! ([`ObjectArgs`]), opened for writing as an [`ObjectSink`] and read back by committed run
//! ([`super::reader`]).

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use input::{Env, RetryPolicy, StoreClient, StoreKind};
use tokio_util::sync::CancellationToken;

use super::layout::{Compression, Format};
use super::reader::ObjectReader;
use super::store::Bucket;
use super::ObjectSink;
use crate::sink::{ReadError, Sink, SinkConfig, SinkContext, SinkError, SinkKind, SinkReader};

/// The object-store sink's own flags (flattened into the saver's and verify's sink flags).
#[derive(Debug, Clone, clap::Args)]
pub struct ObjectArgs {
    /// With an object-store --sink: how committed parts are written, `jsonl` (one value per
    /// line). `parquet` is not yet available: it is refused at start.
    #[arg(long, env = "SAVER_FORMAT", default_value = "jsonl", value_parser = ["jsonl", "parquet"])]
    pub format: String,

    /// With an object-store --sink and --format jsonl: `none`, `gzip` or `zstd`.
    #[arg(long, env = "SAVER_COMPRESSION", default_value = "none", value_parser = ["none", "gzip", "zstd"])]
    pub compression: String,

    /// With an object-store --sink: the size a committed part grows to before the next one
    /// starts (of staged JSON Lines, so Parquet parts come out smaller): 128MiB, 1GiB, 500MB...
    #[arg(long, env = "SAVER_PART_SIZE", default_value = "128MiB", value_parser = parse_size)]
    pub part_size: u64,
}

impl Default for ObjectArgs {
    fn default() -> Self {
        ObjectArgs { format: "jsonl".into(), compression: "none".into(), part_size: 128 << 20 }
    }
}

/// `128MiB`, `64KiB`, `1GiB`, `500MB`, `1000`: a size in bytes.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| format!("`{text}` is not a size: write e.g. 128MiB or 1GiB"))?;
    let unit = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("`{other}` is not a size unit: write B, KiB, MiB or GiB (or KB, MB, GB)")),
    };
    number.checked_mul(unit).filter(|n| *n > 0).ok_or_else(|| format!("`{text}` is not a size above 0 that fits"))
}

/// Why `--format parquet` is refused at start.
pub(crate) const PARQUET_NOT_YET: &str = "--format parquet is not yet available: the object-store sink writes JSON Lines (--format jsonl, with --compression none, gzip or zstd); Parquet parts are planned (issue 31)";

/// The object-store sink, as [`crate::sink::SINKS`] lists it.
pub(crate) struct ObjectKind;

/// The one [`ObjectKind`].
pub(crate) const OBJECT: ObjectKind = ObjectKind;

/// Where `--sink` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A bucket (container) of a cloud store, and the prefix under it (no slashes around it).
    Remote { kind: StoreKind, bucket: String, prefix: String },
    /// A local (or mounted) directory.
    Local(PathBuf),
}

impl Target {
    /// `s3://BUCKET/PREFIX/`, `gs://`, `az://` (`azure://`), `file:///DIR/`.
    pub(crate) fn parse(sink: &str) -> Result<Target, String> {
        let usage = "write s3://BUCKET/PREFIX/ (or gs://, az://), or file:///ABSOLUTE/DIR/";
        let (scheme, rest) = sink.split_once("://").ok_or_else(|| format!("`{sink}` is not a URL: {usage}"))?;
        if scheme == "file" {
            if !rest.starts_with('/') {
                return Err(format!("`{sink}`: a file:// sink needs an absolute directory (file:///DIR/): {usage}"));
            }
            return Ok(Target::Local(PathBuf::from(rest)));
        }
        let kind = match scheme {
            "s3" => StoreKind::S3,
            "gs" => StoreKind::Gcs,
            "az" | "azure" => StoreKind::Azure,
            other => return Err(format!("`{other}://` is not a store chunkmill writes to: {usage}")),
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("`{sink}` names no bucket: {usage}"));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if prefix.split('/').any(|part| part == "." || part == "..") {
            return Err(format!("`{sink}`: the prefix may not hold `.` or `..`: {usage}"));
        }
        Ok(Target::Remote { kind, bucket: bucket.to_string(), prefix })
    }

    /// The URL again, normalised with a trailing `/`.
    pub(crate) fn url(&self) -> String {
        match self {
            Target::Remote { kind, bucket, prefix } if prefix.is_empty() => format!("{}://{bucket}/", kind.scheme()),
            Target::Remote { kind, bucket, prefix } => format!("{}://{bucket}/{prefix}/", kind.scheme()),
            Target::Local(dir) => format!("file://{}/", dir.display().to_string().trim_end_matches('/')),
        }
    }
}

impl SinkKind for ObjectKind {
    fn name(&self) -> &'static str {
        "object store"
    }

    fn usage(&self) -> &'static str {
        "an object-store prefix, s3://BUCKET/PREFIX/ (gs://, az://, or file:///DIR/)"
    }

    fn accepts(&self, sink: &str) -> bool {
        ["s3://", "gs://", "az://", "azure://", "file://"].iter().any(|scheme| sink.starts_with(scheme))
    }

    fn redacted(&self, sink: &str) -> String {
        // Credentials never go in the URL (they come from the environment).
        sink.to_string()
    }

    fn configure(&self, sink: &str, context: &SinkContext<'_>) -> Result<Box<dyn SinkConfig>, SinkError> {
        let target = Target::parse(sink).map_err(|why| SinkError::Config(format!("--sink: {why}")))?;
        let args = &context.args.object;
        if args.format == "parquet" {
            return Err(SinkError::Config(PARQUET_NOT_YET.into()));
        }
        let format = Format::Jsonl;
        let compression = match args.compression.as_str() {
            "gzip" => Compression::Gzip,
            "zstd" => Compression::Zstd,
            _ => Compression::None,
        };
        Ok(Box::new(ObjectConfig {
            target,
            format,
            compression,
            part_size: args.part_size,
            saver: context.saver.to_string(),
        }))
    }
}

/// The object-store sink's configuration.
#[derive(Debug, Clone)]
pub(crate) struct ObjectConfig {
    pub(crate) target: Target,
    pub(crate) format: Format,
    pub(crate) compression: Compression,
    pub(crate) part_size: u64,
    /// The saver's instance name (part of the staging writer's name).
    pub(crate) saver: String,
}

/// Retries of the sink's store requests: shorter than an input's, so that a store that is down
/// shows as a failed save (nothing acknowledged, the mapper sends again) within seconds.
fn retry_policy() -> RetryPolicy {
    RetryPolicy { retry_timeout: std::time::Duration::from_secs(10), ..RetryPolicy::default() }
}

impl ObjectConfig {
    /// The bucket, built from the environment (no request made yet).
    pub(crate) fn bucket(&self) -> Result<Bucket, SinkError> {
        match &self.target {
            Target::Local(dir) => Bucket::local(dir.clone(), self.target.url()),
            Target::Remote { kind, bucket, prefix } => {
                let client = StoreClient::connect(*kind, bucket, &Env::process(), &retry_policy())
                    .map_err(|source| SinkError::Store { action: "configure", source })?;
                Ok(Bucket::remote(client, prefix, self.target.url()))
            }
        }
    }
}

impl SinkConfig for ObjectConfig {
    fn open<'a>(&'a self, shutdown: &'a CancellationToken) -> BoxFuture<'a, Result<Option<Sink>, SinkError>> {
        Box::pin(async move { Ok(ObjectSink::open(self, shutdown).await?.map(|sink| Sink::new(Arc::new(sink)))) })
    }

    fn reader(&self, run: &str) -> Result<Box<dyn SinkReader>, ReadError> {
        Ok(Box::new(ObjectReader::open(self, run)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_urls_name_a_store_bucket_and_prefix_or_a_directory() {
        let target = Target::parse("s3://bucket/some/prefix/").unwrap();
        assert_eq!(
            target,
            Target::Remote { kind: StoreKind::S3, bucket: "bucket".into(), prefix: "some/prefix".into() }
        );
        assert_eq!(target.url(), "s3://bucket/some/prefix/");
        assert_eq!(Target::parse("gs://b").unwrap().url(), "gs://b/");
        assert_eq!(Target::parse("azure://c/p").unwrap().url(), "az://c/p/");
        assert_eq!(Target::parse("file:///data/out/").unwrap(), Target::Local(PathBuf::from("/data/out/")));
        for (bad, says) in [
            ("ftp://host/x", "not a store"),
            ("s3://", "no bucket"),
            ("file://relative/dir", "absolute"),
            ("s3://b/a/../c", "`..`"),
        ] {
            let err = Target::parse(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn parquet_is_refused_at_start_as_not_yet_available() {
        let mut args = crate::config::SinkArgs::default();
        args.object.format = "parquet".into();
        let context = SinkContext { args: &args, out: std::path::Path::new("out"), pool_size: 1, saver: "s" };
        let Err(err) = OBJECT.configure("s3://bucket/prefix/", &context) else { panic!("--format parquet is refused") };
        assert!(err.to_string().contains("--format parquet is not yet available"), "{err}");
        args.object.format = "jsonl".into();
        let context = SinkContext { args: &args, out: std::path::Path::new("out"), pool_size: 1, saver: "s" };
        assert!(OBJECT.configure("s3://bucket/prefix/", &context).is_ok());
    }

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 1 GiB "), Ok(1 << 30));
        assert!(parse_size("0").is_err() && parse_size("12 parsecs").unwrap_err().contains("size unit"));
    }
}
