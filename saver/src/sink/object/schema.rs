//! The schema of a Parquet run: written as `--schema F` or `PREFIX/<run>/_schema.json` in a small
//! JSON form of its own (docs/PROTOCOL.md §8.7), inferred from a run's first staged batch when
//! not given, turned into an Arrow schema for the writer, and the check that a value fits it.
//!
//! ```json
//! {"fields": [{"name": "id", "type": "string", "nullable": false},
//!             {"name": "price", "type": "float64"},
//!             {"name": "tags", "type": {"list": "string"}},
//!             {"name": "shop", "type": {"struct": [{"name": "city", "type": "string"}]}}]}
//! ```
//!
//! Types: `boolean`, `int64`, `float64`, `string`, `{"list": T}`, `{"struct": [fields]}`;
//! `nullable` defaults to true (a missing field is a null). A value fits when it is an object
//! whose every member is a field of the schema with a value of that type: nothing is coerced (a
//! string is never read as a number), an integer must fit int64 and be written without a point
//! or exponent, a float64 must keep every digit it was written with. What does not fit is
//! dead-lettered by its object when staged ([`Schema::fit`] says why).

use std::borrow::Cow;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields};
use common::exact::{Decimal, Value};
use serde::{Deserialize, Serialize};

/// A run's schema: its top-level fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Schema {
    /// The fields of every row, in column order.
    pub(crate) fields: Vec<FieldSpec>,
}

/// One field (a column, or a member of a struct).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FieldSpec {
    /// Its name: the value's member.
    pub(crate) name: String,
    /// Its type.
    #[serde(rename = "type")]
    pub(crate) ty: Type,
    /// Whether it may be null or missing.
    #[serde(default = "yes")]
    pub(crate) nullable: bool,
}

fn yes() -> bool {
    true
}

/// A field's type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TypeText", into = "TypeText")]
pub(crate) enum Type {
    /// `true`/`false`.
    Boolean,
    /// An integer within int64.
    Int64,
    /// A number float64 holds with every digit.
    Float64,
    /// A string.
    String,
    /// An array of the item type (items may be null).
    List(Box<Type>),
    /// An object with these fields.
    Struct(Vec<FieldSpec>),
}

/// [`Type`] as JSON writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum TypeText {
    Name(String),
    List {
        list: Box<Type>,
    },
    Struct {
        #[serde(rename = "struct")]
        fields: Vec<FieldSpec>,
    },
}

impl TryFrom<TypeText> for Type {
    type Error = String;

    fn try_from(text: TypeText) -> Result<Self, String> {
        Ok(match text {
            TypeText::Name(name) => match name.as_str() {
                "boolean" => Type::Boolean,
                "int64" => Type::Int64,
                "float64" => Type::Float64,
                "string" => Type::String,
                other => {
                    return Err(format!(
                        "`{other}` is not a type: write boolean, int64, float64, string, {{\"list\": T}} or {{\"struct\": [fields]}}"
                    ))
                }
            },
            TypeText::List { list } => Type::List(list),
            TypeText::Struct { fields } => {
                check_fields(&fields)?;
                Type::Struct(fields)
            }
        })
    }
}

impl From<Type> for TypeText {
    fn from(ty: Type) -> Self {
        match ty {
            Type::List(item) => TypeText::List { list: item },
            Type::Struct(fields) => TypeText::Struct { fields },
            named => TypeText::Name(named.to_string()),
        }
    }
}

impl std::fmt::Display for Type {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Type::Boolean => f.write_str("boolean"),
            Type::Int64 => f.write_str("int64"),
            Type::Float64 => f.write_str("float64"),
            Type::String => f.write_str("string"),
            Type::List(item) => write!(f, "list<{item}>"),
            Type::Struct(_) => f.write_str("struct"),
        }
    }
}

/// A struct's (or the schema's) fields: at least one, each name once.
fn check_fields(fields: &[FieldSpec]) -> Result<(), String> {
    if fields.is_empty() {
        return Err("a struct (and the schema) needs at least one field".into());
    }
    for (i, field) in fields.iter().enumerate() {
        if fields[..i].iter().any(|f| f.name == field.name) {
            return Err(format!("field `{}` is named twice", field.name));
        }
    }
    Ok(())
}

/// Why a value does not fit the schema: the field (`.a.b[2]`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Misfit(pub(crate) String);

impl Schema {
    /// A schema from its JSON text (`--schema F`, `_schema.json`).
    pub(crate) fn parse(text: &[u8]) -> Result<Schema, String> {
        let schema: Schema = serde_json::from_slice(text).map_err(|e| e.to_string())?;
        check_fields(&schema.fields)?;
        Ok(schema)
    }

    /// The schema as `_schema.json` holds it.
    pub(crate) fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a schema serialises: plain fields")
    }

    /// The schema the values `values` (JSON texts) fit, inferred by arrow-json: integers int64,
    /// other numbers float64 (both: float64), objects structs, arrays lists, conflicting types
    /// string. Fields in name order; a field seen only as null, `[]` or `{}` becomes a string.
    /// Values that are not objects are left out (they fit no schema). `None`: no object.
    pub(crate) fn infer<'a>(values: impl Iterator<Item = &'a [u8]>) -> Option<Schema> {
        let objects: Vec<serde_json::Value> = values
            .filter_map(|v| serde_json::from_slice::<serde_json::Value>(v).ok())
            .filter(serde_json::Value::is_object)
            .collect();
        let inferred = arrow_json::reader::infer_json_schema_from_iterator(objects.iter().map(Ok)).ok()?;
        let fields = from_arrow_fields(inferred.fields());
        (!fields.is_empty()).then_some(Schema { fields })
    }

    /// The Arrow schema of the Parquet parts.
    pub(crate) fn arrow(&self) -> arrow_schema::SchemaRef {
        Arc::new(arrow_schema::Schema::new(to_arrow_fields(&self.fields)))
    }

    /// Whether the JSON value `value` fits: why not, naming the field and both types.
    pub(crate) fn fit(&self, value: &[u8]) -> Result<(), Misfit> {
        let value = common::exact::parse(value).map_err(|e| Misfit(format!("the value is not JSON: {e}")))?;
        match &value {
            Value::Object(members) => fit_members(members, &self.fields, ""),
            other => Err(Misfit(format!("the value is {}, where a Parquet row needs an object", kind(other)))),
        }
    }
}

fn from_arrow_fields(fields: &Fields) -> Vec<FieldSpec> {
    let mut specs: Vec<FieldSpec> = fields
        .iter()
        .map(|f| FieldSpec { name: f.name().clone(), ty: from_arrow(f.data_type()), nullable: true })
        .collect();
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    specs
}

fn from_arrow(ty: &DataType) -> Type {
    match ty {
        DataType::Boolean => Type::Boolean,
        DataType::Int64 => Type::Int64,
        DataType::Float64 => Type::Float64,
        DataType::List(item) => Type::List(Box::new(from_arrow(item.data_type()))),
        DataType::Struct(fields) if !fields.is_empty() => Type::Struct(from_arrow_fields(fields)),
        // Null (never seen with a value), an empty struct, Utf8 (arrow-json's type of conflicts).
        _ => Type::String,
    }
}

fn to_arrow_fields(fields: &[FieldSpec]) -> Fields {
    fields.iter().map(|f| Field::new(&f.name, to_arrow(&f.ty), f.nullable)).collect()
}

fn to_arrow(ty: &Type) -> DataType {
    match ty {
        Type::Boolean => DataType::Boolean,
        Type::Int64 => DataType::Int64,
        Type::Float64 => DataType::Float64,
        Type::String => DataType::Utf8,
        Type::List(item) => DataType::List(Arc::new(Field::new_list_field(to_arrow(item), true))),
        Type::Struct(fields) => DataType::Struct(to_arrow_fields(fields)),
    }
}

/// What a JSON value is, for messages.
fn kind(value: &Value<'_>) -> Cow<'static, str> {
    match value {
        Value::Null => "null".into(),
        Value::Bool(_) => "a boolean".into(),
        Value::Number(text) => format!("the number {text}").into(),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn fit_members(members: &[(Cow<'_, str>, Value<'_>)], fields: &[FieldSpec], path: &str) -> Result<(), Misfit> {
    for (i, (key, _)) in members.iter().enumerate() {
        let at = format!("{path}.{key}");
        if members[..i].iter().any(|(k, _)| k == key) {
            return Err(Misfit(format!("field {at} appears twice in one object")));
        }
        if !fields.iter().any(|f| f.name == *key) {
            return Err(Misfit(format!("field {at} is not in the schema")));
        }
    }
    for field in fields {
        let at = format!("{path}.{}", field.name);
        match members.iter().find(|(k, _)| *k == field.name.as_str()).map(|(_, v)| v) {
            None | Some(Value::Null) if field.nullable => {}
            None => {
                return Err(Misfit(format!("field {at} is missing, where the schema has a non-nullable {}", field.ty)))
            }
            Some(value) => fit_value(value, &field.ty, field.nullable, &at)?,
        }
    }
    Ok(())
}

fn fit_value(value: &Value<'_>, ty: &Type, nullable: bool, at: &str) -> Result<(), Misfit> {
    let misfit = || Misfit(format!("field {at}: {} where the schema has {}", kind(value), described(ty, nullable)));
    match (value, ty) {
        (Value::Null, _) if nullable => Ok(()),
        (Value::Bool(_), Type::Boolean) | (Value::String(_), Type::String) => Ok(()),
        // Kept as its text, exactly: the way to keep a number int64 or float64 cannot hold.
        (Value::Number(_), Type::String) => Ok(()),
        (Value::Number(text), Type::Int64) => fits_int64(text).map_err(|why| Misfit(format!("field {at}: {why}"))),
        (Value::Number(text), Type::Float64) => fits_float64(text).map_err(|why| Misfit(format!("field {at}: {why}"))),
        (Value::Array(items), Type::List(item)) => {
            items.iter().enumerate().try_for_each(|(i, v)| fit_value(v, item, true, &format!("{at}[{i}]")))
        }
        (Value::Object(members), Type::Struct(fields)) => fit_members(members, fields, at),
        _ => Err(misfit()),
    }
}

fn described(ty: &Type, nullable: bool) -> String {
    if nullable {
        ty.to_string()
    } else {
        format!("a non-nullable {ty}")
    }
}

/// An int64: an integer written as one (no point, no exponent) within its range.
fn fits_int64(text: &str) -> Result<(), String> {
    if text.contains(['.', 'e', 'E']) {
        return Err(format!(
            "the number {text} where the schema has int64 (an integer written without a point or exponent)"
        ));
    }
    text.parse::<i64>().map(|_| ()).map_err(|_| format!("the number {text} is outside int64"))
}

/// A float64 that keeps every digit: the double nearest to it reads back as the same number.
fn fits_float64(text: &str) -> Result<(), String> {
    let exact = Decimal::parse(text).map(|d| d.canonical());
    let double = text.parse::<f64>().ok().filter(|f| f.is_finite());
    let back = double.and_then(|f| Decimal::parse(&format!("{f:e}"))).map(|d| d.canonical());
    match (exact, back) {
        (Some(exact), Some(back)) if exact == back => Ok(()),
        _ => Err(format!(
            "the number {text} would lose digits in float64 (make the field a string upstream to keep it exactly)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(text: &str) -> Schema {
        Schema::parse(text.as_bytes()).expect("a schema")
    }

    #[test]
    fn a_schema_reads_its_json_form_and_writes_it_back_the_same() {
        let text = r#"{"fields":[{"name":"id","type":"string","nullable":false},{"name":"price","type":"float64"},
            {"name":"tags","type":{"list":"string"}},{"name":"shop","type":{"struct":[{"name":"n","type":"int64"}]}}]}"#;
        let parsed = schema(text);
        assert!(!parsed.fields[0].nullable);
        assert!(parsed.fields[1].nullable, "nullable by default");
        assert_eq!(parsed.fields[2].ty, Type::List(Box::new(Type::String)));
        assert_eq!(Schema::parse(&parsed.to_json()).expect("its own output"), parsed);
        let arrow = parsed.arrow();
        assert_eq!(arrow.field(3).data_type(), &DataType::Struct(vec![Field::new("n", DataType::Int64, true)].into()));
        for (bad, says) in [
            (r#"{"fields":[{"name":"a","type":"decimal"}]}"#, "`decimal` is not a type"),
            (r#"{"fields":[{"name":"a","type":"int64"},{"name":"a","type":"string"}]}"#, "named twice"),
            (r#"{"fields":[]}"#, "at least one field"),
        ] {
            let err = Schema::parse(bad.as_bytes()).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn inference_makes_structs_and_lists_in_name_order_and_strings_of_what_has_no_type() {
        let values: Vec<&[u8]> =
            vec![br#"{"b":1,"a":{"x":true},"l":[1.5,2],"n":null,"e":[]}"#, br#"{"b":2,"m":"s"}"#, b"[1,2]"];
        let inferred = Schema::infer(values.into_iter()).expect("objects");
        let names: Vec<&str> = inferred.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "e", "l", "m", "n"]);
        let ty = |name: &str| inferred.fields.iter().find(|f| f.name == name).map(|f| f.ty.clone()).expect("a field");
        assert_eq!(ty("a"), Type::Struct(vec![FieldSpec { name: "x".into(), ty: Type::Boolean, nullable: true }]));
        assert_eq!(ty("b"), Type::Int64);
        assert_eq!(ty("l"), Type::List(Box::new(Type::Float64)));
        assert_eq!(ty("n"), Type::String);
        assert_eq!(ty("e"), Type::List(Box::new(Type::String)));
        assert!(Schema::infer([b"3".as_slice()].into_iter()).is_none(), "no object: nothing to infer from");
    }

    #[test]
    fn a_value_fits_only_as_it_is_written_and_the_misfit_names_the_field_and_both_types() {
        let s = schema(
            r#"{"fields":[{"name":"id","type":"string","nullable":false},{"name":"price","type":"float64"},
            {"name":"n","type":"int64"},{"name":"tags","type":{"list":"string"}},
            {"name":"shop","type":{"struct":[{"name":"city","type":"string"}]}}]}"#,
        );
        for fits in [
            r#"{"id":"a"}"#,
            r#"{"id":"a","price":3,"n":-9223372036854775808,"tags":["x",null],"shop":{"city":"Oslo"}}"#,
            r#"{"id":"a","price":0.1,"n":null,"shop":null}"#,
            r#"{"id":"a","price":1e300}"#,
            // A number where the schema has a string is kept as its text: how a number int64 or
            // float64 cannot hold is kept exactly.
            r#"{"id":12.50,"tags":[2,92233720368547758070,0.1000000000000000000001]}"#,
        ] {
            assert_eq!(s.fit(fits.as_bytes()), Ok(()), "{fits}");
        }
        for (bad, says) in [
            (r#"{"id":"a","price":"1.5"}"#, "field .price: a string where the schema has float64"),
            (r#"{"id":true}"#, "field .id: a boolean where the schema has a non-nullable string"),
            (r#"{"price":1}"#, "field .id is missing, where the schema has a non-nullable string"),
            (r#"{"id":"a","n":1.5}"#, "field .n: the number 1.5 where the schema has int64"),
            (r#"{"id":"a","n":9223372036854775808}"#, "field .n: the number 9223372036854775808 is outside int64"),
            (r#"{"id":"a","price":0.1000000000000000000001}"#, "would lose digits in float64"),
            (r#"{"id":"a","tags":["x",{}]}"#, "field .tags[1]: an object where the schema has string"),
            (r#"{"id":"a","shop":{"city":"x","zip":1}}"#, "field .shop.zip is not in the schema"),
            (r#"{"id":"a","id":"b"}"#, "field .id appears twice"),
            (r#"{"id":"a","extra":1}"#, "field .extra is not in the schema"),
            ("[1]", "the value is an array, where a Parquet row needs an object"),
        ] {
            let err = s.fit(bad.as_bytes()).expect_err(bad);
            assert!(err.0.contains(says), "{bad}: {err}");
        }
    }
}
