//! Parquet parts: written at commit from the staged JSON Lines of a part (decoded by arrow-json
//! against the run's [`Schema`], strict, every value checked against it when it was staged) into
//! a streamed upload, one row group at a time; and read back for `saver verify` as JSON values in
//! the normal form [`normalise`] gives (docs/PROTOCOL.md §8.7).

use std::borrow::Cow;

use ::parquet::arrow::ArrowWriter;
use ::parquet::basic::{Compression as Codec, ZstdLevel};
use ::parquet::file::properties::WriterProperties;
use arrow_array::RecordBatch;
use bytes::Bytes;
use common::exact::{Decimal, Value};
use futures::TryStreamExt;
use sha2::{Digest, Sha256};

use super::layout::{Compression, PartEntry, PartPlan};
use super::schema::Schema;
use super::store::{Bucket, Upload};
use crate::sink::SinkError;

/// Rows decoded at once (and the most a row group is cut at).
const BATCH_ROWS: usize = 8192;
/// Rows per row group.
const ROW_GROUP_ROWS: usize = 128 * 1024;

/// The Parquet codec of `--compression` (zstd, snappy or none; gzip is refused at start).
fn codec(compression: Compression) -> Codec {
    match compression {
        Compression::Zstd => Codec::ZSTD(ZstdLevel::try_new(3).expect("3 is a zstd level")),
        Compression::Snappy => Codec::SNAPPY,
        Compression::None | Compression::Gzip => Codec::UNCOMPRESSED,
    }
}

/// The encoder of one part: decoded rows in, Parquet bytes out as each row group is done.
struct Encoder {
    decoder: arrow_json::reader::Decoder,
    writer: ArrowWriter<Vec<u8>>,
    rows: u64,
    part: String,
}

impl Encoder {
    fn new(schema: &Schema, compression: Compression, part: &str) -> Result<Self, SinkError> {
        let arrow = schema.arrow();
        let decoder = arrow_json::ReaderBuilder::new(arrow.clone())
            .with_strict_mode(true)
            // A number in a string field is kept as its text, exactly as written (the fit check
            // lets only numbers and strings into a string field).
            .with_coerce_primitive(true)
            .with_batch_size(BATCH_ROWS)
            .build_decoder()
            .map_err(|e| invalid(part, format!("cannot decode with the run's schema: {e}")))?;
        let properties = WriterProperties::builder()
            .set_compression(codec(compression))
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .build();
        let writer = ArrowWriter::try_new(Vec::new(), arrow, Some(properties))
            .map_err(|e| invalid(part, format!("cannot start a Parquet writer: {e}")))?;
        Ok(Encoder { decoder, writer, rows: 0, part: part.to_string() })
    }

    /// Feeds staged lines (a piece may end in the middle of one); the encoded bytes so far.
    fn feed(&mut self, mut lines: &[u8]) -> Result<Vec<u8>, SinkError> {
        while !lines.is_empty() {
            let read = self.decoder.decode(lines).map_err(|e| self.broken(e))?;
            lines = &lines[read..];
            if !lines.is_empty() {
                self.flush_rows()?;
            }
        }
        Ok(std::mem::take(self.writer.inner_mut()))
    }

    fn flush_rows(&mut self) -> Result<(), SinkError> {
        if let Some(batch) = self.decoder.flush().map_err(|e| self.broken(e))? {
            self.write(&batch)?;
        }
        Ok(())
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        self.rows += batch.num_rows() as u64;
        self.writer.write(batch).map_err(|e| invalid(&self.part, format!("cannot encode rows: {e}")))
    }

    /// The last rows and the footer: the rest of the part's bytes, and its rows.
    fn finish(mut self) -> Result<(Vec<u8>, u64), SinkError> {
        self.flush_rows()?;
        let bytes = self.writer.into_inner().map_err(|e| invalid(&self.part, format!("cannot finish: {e}")))?;
        Ok((bytes, self.rows))
    }

    /// A staged line the run's schema does not decode: every value was checked when staged, so
    /// the staging area was changed, or the check and the decoder disagree.
    fn broken(&self, e: arrow_schema::ArrowError) -> SinkError {
        invalid(
            &self.part,
            format!("a staged value does not decode with the run's schema, though it was checked when staged: {e}"),
        )
    }
}

fn invalid(part: &str, why: String) -> SinkError {
    SinkError::Invalid(format!("Parquet part {part}: {why}"))
}

/// Writes one part of a Parquet run: its staged ranges, decoded and encoded row group by row
/// group into one upload.
pub(crate) async fn write_part(
    bucket: &Bucket,
    run: &str,
    schema: &Schema,
    compression: Compression,
    part: &PartPlan,
) -> Result<PartEntry, SinkError> {
    let name = format!("{run}/{}", part.name);
    let location = format!("{}{name}", bucket.url());
    let mut encoder = Encoder::new(schema, compression, &location)?;
    let mut upload = bucket.upload(&name).await?;
    let (mut hasher, mut bytes) = (Sha256::new(), 0u64);
    let mut pieces = std::pin::pin!(super::commit::staged_pieces(bucket, run, part));
    while let Some(piece) = pieces.try_next().await? {
        let (back, encoded) = off_runtime(encoder, move |encoder| encoder.feed(&piece)).await?;
        encoder = back;
        bytes += send(bucket, &mut upload, &mut hasher, &encoded).await?;
    }
    let (rest, rows) = tokio::task::spawn_blocking(move || encoder.finish()).await.map_err(stopped)??;
    bytes += send(bucket, &mut upload, &mut hasher, &rest).await?;
    let values: u64 = part.chunks.iter().map(|c| c.values).sum();
    if rows != values {
        return Err(invalid(&location, format!("{rows} rows decoded, the plan lists {values} values")));
    }
    bucket.finish(upload).await?;
    Ok(PartEntry {
        name: part.name.clone(),
        values,
        bytes,
        sha256: super::commit::hex(&hasher.finalize()),
        chunks: part.chunks.clone(),
    })
}

/// Runs `work` on `encoder` in tokio's blocking pool and hands the encoder back: decoding and
/// encoding a piece is CPU work (tens of milliseconds per piece) that would otherwise hold one of
/// the runtime's threads, which the saves and acks of other runs need meanwhile.
async fn off_runtime<T: Send + 'static>(
    mut encoder: Encoder,
    work: impl FnOnce(&mut Encoder) -> Result<T, SinkError> + Send + 'static,
) -> Result<(Encoder, T), SinkError> {
    tokio::task::spawn_blocking(move || work(&mut encoder).map(|done| (encoder, done))).await.map_err(stopped)?
}

fn stopped(e: tokio::task::JoinError) -> SinkError {
    SinkError::Task(format!("encoding a Parquet part: {e}"))
}

async fn send(bucket: &Bucket, upload: &mut Upload, hasher: &mut Sha256, bytes: &[u8]) -> Result<u64, SinkError> {
    if !bytes.is_empty() {
        hasher.update(bytes);
        upload.write(bucket, bytes).await?;
    }
    Ok(bytes.len() as u64)
}

/// The rows of a Parquet part as JSON values in [`normalise`]d form, in order.
pub(crate) fn rows(part: Bytes) -> Result<Vec<Vec<u8>>, String> {
    let reader = ::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(part)
        .and_then(|b| b.with_batch_size(BATCH_ROWS).build())
        .map_err(|e| format!("not a Parquet file: {e}"))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| format!("cannot read its rows: {e}"))?;
        let mut writer = arrow_json::LineDelimitedWriter::new(Vec::new());
        writer.write(&batch).map_err(|e| format!("cannot turn its rows into JSON: {e}"))?;
        writer.finish().map_err(|e| format!("cannot turn its rows into JSON: {e}"))?;
        for line in writer.into_inner().split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let value = common::exact::parse(line).map_err(|e| format!("a row is not JSON: {e}"))?;
            let value = normalise(value).ok_or_else(|| "a row holds a number that is not one".to_string())?;
            rows.push(to_json(&value));
        }
    }
    Ok(rows)
}

/// What a Parquet part of a run with `schema` does to a value: [`normalise`], after a number in
/// a string field became the string of its text, exactly as written (`12.50` is "12.50").
pub(crate) fn normalise_as(schema: Option<Schema>) -> crate::sink::Normalise {
    let row = schema.map(|schema| super::schema::Type::Struct(schema.fields));
    std::sync::Arc::new(move |value: Value<'_>| match &row {
        Some(row) => normalise(as_typed(value, row)),
        None => normalise(value),
    })
}

/// `value` with each number where `ty` has a string turned into that string.
fn as_typed<'a>(value: Value<'a>, ty: &super::schema::Type) -> Value<'a> {
    use super::schema::Type;
    match (value, ty) {
        (Value::Number(text), Type::String) => Value::String(text),
        (Value::Array(items), Type::List(item)) => Value::Array(items.into_iter().map(|v| as_typed(v, item)).collect()),
        (Value::Object(members), Type::Struct(fields)) => Value::Object(
            members
                .into_iter()
                .map(|(k, v)| {
                    let typed = match fields.iter().find(|f| f.name == *k) {
                        Some(field) => as_typed(v, &field.ty),
                        None => v,
                    };
                    (k, typed)
                })
                .collect(),
        ),
        (other, _) => other,
    }
}

/// What a Parquet part does to a value: a member that is null is as if missing (both are a null
/// cell), and a number is its exact value whatever way it is written (`3`, `3.0`, `30e-1`: a
/// float64 cell holds it once). `None`: a number that is not one.
pub(crate) fn normalise(value: Value<'_>) -> Option<Value<'_>> {
    Some(match value {
        Value::Number(text) => Value::Number(Cow::Owned(Decimal::parse(&text)?.canonical())),
        Value::Array(items) => Value::Array(items.into_iter().map(normalise).collect::<Option<_>>()?),
        Value::Object(members) => Value::Object(
            members
                .into_iter()
                .filter(|(_, v)| *v != Value::Null)
                .map(|(k, v)| Some((k, normalise(v)?)))
                .collect::<Option<_>>()?,
        ),
        other => other,
    })
}

/// JSON text of `value`.
fn to_json(value: &Value<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    write_json(value, &mut out);
    out
}

fn write_json(value: &Value<'_>, out: &mut Vec<u8>) {
    let string = |s: &str, out: &mut Vec<u8>| serde_json::to_writer(out, s).expect("a string serialises");
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(text) => out.extend_from_slice(text.as_bytes()),
        Value::String(s) => string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json(item, out);
            }
            out.push(b']');
        }
        Value::Object(members) => {
            out.push(b'{');
            for (i, (key, item)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                string(key, out);
                out.push(b':');
                write_json(item, out);
            }
            out.push(b'}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_lines_encode_into_parquet_that_reads_back_as_the_same_values_normalised() {
        let schema = Schema::parse(
            br#"{"fields":[{"name":"id","type":"string"},{"name":"price","type":"float64"},{"name":"n","type":"int64"},
            {"name":"tags","type":{"list":"string"}},{"name":"shop","type":{"struct":[{"name":"city","type":"string"}]}}]}"#,
        )
        .expect("a schema");
        let lines = [
            r#"{"id":"a","price":3,"n":-5,"tags":["x",null],"shop":{"city":"Oslo \"N\""}}"#,
            r#"{"id":"b","price":0.1,"shop":null,"tags":[]}"#,
            r#"{"id":"c","price":1e300,"n":9223372036854775807}"#,
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        for compression in [Compression::None, Compression::Zstd, Compression::Snappy] {
            let mut encoder = Encoder::new(&schema, compression, "p").expect("an encoder");
            // Pieces cut in the middle of a line, as ranged reads come.
            let (first, second) = text.as_bytes().split_at(17);
            let mut bytes = encoder.feed(first).expect("encodes");
            bytes.extend(encoder.feed(second).expect("encodes"));
            let (rest, rows) = encoder.finish().expect("finishes");
            bytes.extend(rest);
            assert_eq!(rows, 3);
            let back = super::rows(Bytes::from(bytes)).expect("reads back");
            assert_eq!(back.len(), 3);
            for (line, row) in lines.iter().zip(&back) {
                let expected = normalise(common::exact::parse(line.as_bytes()).expect("JSON")).expect("numbers");
                let read = common::exact::parse(row).expect("JSON");
                assert!(expected.same(&read), "{line} read back as {}", String::from_utf8_lossy(row));
            }
        }
    }

    #[test]
    fn a_number_in_a_string_field_is_kept_as_its_exact_text_and_verify_expects_that() {
        let schema = Schema::parse(
            br#"{"fields":[{"name":"amount","type":"string"},{"name":"big","type":{"list":"string"}},{"name":"n","type":"int64"}]}"#,
        )
        .expect("a schema");
        let line = r#"{"amount":12.50,"big":[92233720368547758070,"x",1e400],"n":7}"#;
        let mut encoder = Encoder::new(&schema, Compression::Zstd, "p").expect("an encoder");
        let mut bytes = encoder.feed(format!("{line}\n").as_bytes()).expect("encodes");
        let (rest, rows) = encoder.finish().expect("finishes");
        bytes.extend(rest);
        assert_eq!(rows, 1);
        let back = super::rows(Bytes::from(bytes)).expect("reads back");
        let read = String::from_utf8(back[0].clone()).expect("text");
        assert_eq!(read, r#"{"amount":"12.50","big":["92233720368547758070","x","1e400"],"n":7}"#);
        let expected =
            normalise_as(Some(schema.clone()))(common::exact::parse(line.as_bytes()).expect("JSON")).expect("numbers");
        assert!(expected.same(&common::exact::parse(read.as_bytes()).expect("JSON")), "verify expects what was kept");
        let untyped = normalise_as(None)(common::exact::parse(line.as_bytes()).expect("JSON")).expect("numbers");
        assert!(!untyped.same(&common::exact::parse(read.as_bytes()).expect("JSON")), "the schema is what says so");
    }

    #[test]
    fn a_run_without_values_makes_a_part_of_no_columns_and_no_rows() {
        let encoder = Encoder::new(&Schema { fields: Vec::new() }, Compression::Zstd, "p").expect("an encoder");
        let (bytes, rows) = encoder.finish().expect("finishes");
        assert_eq!(rows, 0);
        assert!(super::rows(Bytes::from(bytes)).expect("reads back").is_empty());
    }

    #[test]
    fn normalising_drops_null_members_and_writes_numbers_by_their_value() {
        let value = common::exact::parse(br#"{"a":null,"b":3.0,"c":[null,1e2],"d":{"e":null}}"#).expect("JSON");
        let normal = to_json(&normalise(value).expect("numbers"));
        assert_eq!(String::from_utf8(normal).expect("text"), r#"{"b":3,"c":[null,100],"d":{}}"#);
    }
}
