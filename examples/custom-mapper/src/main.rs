//! A user's own transform in Rust, run by the chunkmill fleet: `shout` upper-cases every string
//! value at the top of an object and adds a mark (its parameter). This binary is a whole mapper
//! with `shout` registered beside the built-ins, and, as `custom-mapper verify ...`, the verify
//! that recomputes it (the stock `saver verify` does not know `shout`).
//!
//!   fetcher --input data/orders.jsonl --transform shout --transform-params '{"mark":"!"}'
//!   custom-mapper                     # as many as you like, next to stock mappers
//!   custom-mapper verify --input data/orders.jsonl --out out --transform shout --transform-params '{"mark":"!"}'

use std::sync::Arc;

use transform::{ObjectError, Outputs, Registry, Transform};

/// Upper-cases the top-level strings of an object and adds `"mark": <mark>`.
struct Shout {
    mark: String,
}

impl Transform for Shout {
    fn apply(&self, input: &[u8], out: &mut Outputs) -> Result<(), ObjectError> {
        let serde_json::Value::Object(mut object) =
            serde_json::from_slice(input).map_err(|e| ObjectError::refused(e.to_string()))?
        else {
            return Err(ObjectError::refused("not an object"));
        };
        for value in object.values_mut() {
            if let serde_json::Value::String(text) = value {
                *text = text.to_uppercase();
            }
        }
        object.insert("mark".into(), self.mark.clone().into());
        out.push(&object)
    }
}

fn main() -> std::process::ExitCode {
    let registry = Registry::builtin().with("shout", |params| {
        let mark = params.get("mark").and_then(|m| m.as_str()).unwrap_or("!").to_string();
        Ok(Arc::new(Shout { mark }) as Arc<dyn Transform>)
    });
    if std::env::args().nth(1).as_deref() == Some("verify") {
        return saver::verify::main_with(registry);
    }
    mapper::main_with(registry)
}
