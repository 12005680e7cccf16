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
use super::schema::Schema;
use super::store::Bucket;
use super::ObjectSink;
use crate::sink::{ReadError, Sink, SinkConfig, SinkContext, SinkError, SinkKind, SinkReader};

/// The object-store sink's own flags (flattened into the saver's and verify's sink flags).
#[derive(Debug, Clone, clap::Args)]
pub struct ObjectArgs {
    /// With an object-store --sink: how committed parts are written, `jsonl` (one value per
    /// line) or `parquet` (one row per value, with the run's schema: --schema, or inferred from
    /// the run's first staged batch).
    #[arg(long, env = "SAVER_FORMAT", default_value = "jsonl", value_parser = ["jsonl", "parquet"])]
    pub format: String,

    /// With an object-store --sink: `none`, `gzip` or `zstd` for --format jsonl; `none`, `zstd`
    /// or `snappy` for --format parquet.
    #[arg(long, env = "SAVER_COMPRESSION", default_value = "none", value_parser = ["none", "gzip", "zstd", "snappy"])]
    pub compression: String,

    /// With an object-store --sink and --format parquet: the run's schema, a JSON file
    /// (`{"fields":[{"name":"price","type":"float64","nullable":true}, ...]}`, types boolean,
    /// int64, float64, string, {"list": T}, {"struct": [fields]}). Without it, the schema is
    /// inferred from the run's first staged batch.
    #[arg(long, env = "SAVER_SCHEMA")]
    pub schema: Option<PathBuf>,

    /// With an object-store --sink: the size a committed part grows to before the next one
    /// starts (of staged JSON Lines, so Parquet parts come out smaller): 128MiB, 1GiB, 500MB...
    #[arg(long, env = "SAVER_PART_SIZE", default_value = "128MiB", value_parser = parse_size)]
    pub part_size: u64,
}

impl Default for ObjectArgs {
    fn default() -> Self {
        ObjectArgs { format: "jsonl".into(), compression: "none".into(), schema: None, part_size: 128 << 20 }
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
        let (format, compression) = format_and_compression(&args.format, &args.compression)?;
        let schema = match (&args.schema, format) {
            (None, _) => None,
            (Some(path), Format::Parquet) => Some(read_schema(path)?),
            (Some(path), Format::Jsonl) => {
                return Err(SinkError::Config(format!(
                    "--schema {} is for Parquet parts, and --format is jsonl: add --format parquet, or drop --schema (SAVER_SCHEMA)",
                    path.display()
                )))
            }
        };
        Ok(Box::new(ObjectConfig {
            target,
            format,
            compression,
            schema,
            part_size: args.part_size,
            saver: context.saver.to_string(),
        }))
    }
}

/// `--format` and `--compression`, refusing a combination that does not exist.
fn format_and_compression(format: &str, compression: &str) -> Result<(Format, Compression), SinkError> {
    let format = if format == "parquet" { Format::Parquet } else { Format::Jsonl };
    let compression = match (format, compression) {
        (_, "none") => Compression::None,
        (_, "zstd") => Compression::Zstd,
        (Format::Jsonl, "gzip") => Compression::Gzip,
        (Format::Parquet, "snappy") => Compression::Snappy,
        (Format::Jsonl, other) => {
            return Err(SinkError::Config(format!(
                "--compression {other} is for Parquet parts, and --format is jsonl: JSON Lines take --compression none, gzip or zstd"
            )))
        }
        (Format::Parquet, other) => {
            return Err(SinkError::Config(format!(
                "--compression {other} does not exist for --format parquet: Parquet parts take --compression none, zstd or snappy"
            )))
        }
    };
    Ok((format, compression))
}

/// The schema file of `--schema`.
fn read_schema(path: &std::path::Path) -> Result<Schema, SinkError> {
    let text = std::fs::read(path).map_err(|e| {
        SinkError::Config(format!("--schema {}: cannot read it: {e}; fix the path (SAVER_SCHEMA)", path.display()))
    })?;
    Schema::parse(&text).map_err(|why| {
        SinkError::Config(format!(
            "--schema {}: not a schema: {why}; see README (Parquet parts) for its form",
            path.display()
        ))
    })
}

/// The object-store sink's configuration.
#[derive(Debug, Clone)]
pub(crate) struct ObjectConfig {
    pub(crate) target: Target,
    pub(crate) format: Format,
    pub(crate) compression: Compression,
    /// `--schema`, read (Parquet only).
    pub(crate) schema: Option<Schema>,
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

    fn configure(args: &crate::config::SinkArgs) -> Result<Box<dyn SinkConfig>, SinkError> {
        let context = SinkContext { args, out: std::path::Path::new("out"), pool_size: 1, saver: "s" };
        OBJECT.configure("s3://bucket/prefix/", &context)
    }

    #[test]
    fn a_format_and_compression_that_do_not_go_together_are_refused_naming_both_flags() {
        let mut args = crate::config::SinkArgs::default();
        for (format, compression, ok) in [
            ("parquet", "zstd", true),
            ("parquet", "snappy", true),
            ("parquet", "none", true),
            ("jsonl", "gzip", true),
            ("parquet", "gzip", false),
            ("jsonl", "snappy", false),
        ] {
            args.object.format = format.into();
            args.object.compression = compression.into();
            match configure(&args) {
                Ok(_) => assert!(ok, "{format} {compression} is refused"),
                Err(err) => {
                    let text = err.to_string();
                    assert!(
                        !ok && text.contains("--compression") && text.contains("--format"),
                        "{format} {compression}: {text}"
                    )
                }
            }
        }
    }

    #[test]
    fn a_schema_file_is_read_at_start_and_refused_with_jsonl_or_when_it_is_not_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (good, bad) = (dir.path().join("good.json"), dir.path().join("bad.json"));
        std::fs::write(&good, r#"{"fields":[{"name":"a","type":"int64"}]}"#).expect("write");
        std::fs::write(&bad, r#"{"fields":[{"name":"a","type":"int"}]}"#).expect("write");
        let mut args = crate::config::SinkArgs::default();
        args.object.format = "parquet".into();
        args.object.schema = Some(good.clone());
        assert!(configure(&args).is_ok());
        args.object.schema = Some(bad.clone());
        let err = configure(&args).expect_err("a bad schema is refused").to_string();
        assert!(err.contains("bad.json") && err.contains("`int` is not a type"), "{err}");
        args.object.format = "jsonl".into();
        args.object.schema = Some(good);
        let err = configure(&args).expect_err("--schema with jsonl is refused").to_string();
        assert!(err.contains("--schema") && err.contains("--format parquet"), "{err}");
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
