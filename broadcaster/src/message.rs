//! Events as sentences a person reads in a chat: "Run 3f2c… finished: 100 000 objects in 41 s
//! (2 430/s), 0 dead-lettered". Numbers get thousands separators, durations a unit a person
//! would use, rates three significant digits, and a run is named by its first four hex digits.

use common::events::{Event, EventBody};

/// The message for `event`.
pub fn render(event: &Event) -> String {
    let run = short_run(&event.run);
    match &event.body {
        EventBody::Started { objects, chunks, chunk_size, transform } => format!(
            "Run {run} started: {} {} in {} {} of up to {}{}",
            number(*objects),
            plural(*objects, "object", "objects"),
            number(*chunks),
            plural(*chunks, "chunk", "chunks"),
            number(u64::from(*chunk_size)),
            if transform.is_empty() { String::new() } else { format!(", through {transform}") }
        ),
        EventBody::Progress { percent, chunks_done, chunks, objects_done, objects, elapsed_ms } => format!(
            "Run {run} is {percent} % done: {} of {} chunks, {} of {} objects saved, {} in",
            number(*chunks_done),
            number(*chunks),
            number(*objects_done),
            number(*objects),
            duration(*elapsed_ms)
        ),
        EventBody::ChunkDead { chunk, reason, first_line, objects } => format!(
            "Run {run}: chunk {chunk} (input line {}, {} {}) was dead-lettered: {reason}",
            number(*first_line),
            number(*objects),
            plural(*objects, "object", "objects")
        ),
        EventBody::Completed { objects, duration_ms, dead_chunks, dead_objects, bad_records, .. } => {
            let mut text = format!(
                "Run {run} finished: {} {} in {} ({}/s), {}",
                number(*objects),
                plural(*objects, "object", "objects"),
                duration(*duration_ms),
                rate(*objects, *duration_ms),
                dead_lettered(*dead_chunks, *dead_objects)
            );
            if *bad_records > 0 {
                text += &format!(
                    ", {} invalid input {} skipped",
                    number(*bad_records),
                    plural(*bad_records, "record", "records")
                );
            }
            text
        }
        EventBody::Resumed { chunks, chunks_done, chunks_dead, instance } => {
            let to_go = chunks.saturating_sub(chunks_done + chunks_dead);
            let dead =
                if *chunks_dead > 0 { format!(", {} dead-lettered", number(*chunks_dead)) } else { String::new() };
            format!(
                "Run {run} resumed by {instance} after a restart: {} of {} chunks already done{dead}, {} to go",
                number(*chunks_done),
                number(*chunks),
                number(to_go)
            )
        }
    }
}

/// `3f2c…`: enough to tell runs apart in a channel.
fn short_run(run: &str) -> String {
    match run.char_indices().nth(4) {
        Some((cut, _)) => format!("{}…", &run[..cut]),
        None => run.to_string(),
    }
}

fn plural(n: u64, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// `100 000`: groups of three digits separated by a space.
pub fn number(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// `850 ms`, `4.2 s`, `41 s`, `3 min 20 s`, `2 h 5 min`.
pub fn duration(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=9_949 => format!("{:.1} s", ms as f64 / 1000.0),
        9_950..=59_499 => format!("{} s", (ms + 500) / 1000),
        59_500..=3_599_499 => {
            let s = (ms + 500) / 1000;
            match s % 60 {
                0 => format!("{} min", s / 60),
                rest => format!("{} min {rest} s", s / 60),
            }
        }
        _ => {
            let min = (ms + 30_000) / 60_000;
            match min % 60 {
                0 => format!("{} h", min / 60),
                rest => format!("{} h {rest} min", min / 60),
            }
        }
    }
}

/// Objects per second to three significant digits: `2 430`, `843`, `12.5`, `0.25`.
pub fn rate(objects: u64, ms: u64) -> String {
    if ms == 0 {
        return "∞".to_string();
    }
    let per_s = objects as f64 * 1000.0 / ms as f64;
    if per_s >= 1000.0 {
        let magnitude = 10f64.powi(per_s.log10().floor() as i32 - 2);
        number(((per_s / magnitude).round() * magnitude) as u64)
    } else if per_s >= 100.0 {
        format!("{}", per_s.round() as u64)
    } else if per_s >= 10.0 {
        format!("{per_s:.1}")
    } else {
        format!("{per_s:.2}")
    }
}

fn dead_lettered(chunks: u64, objects: u64) -> String {
    match (chunks, objects) {
        (0, 0) => "0 dead-lettered".to_string(),
        (c, 0) => format!("{} {} dead-lettered", number(c), plural(c, "chunk", "chunks")),
        (0, o) => format!("{} {} dead-lettered", number(o), plural(o, "object", "objects")),
        (c, o) => format!(
            "{} {} and {} {} dead-lettered",
            number(c),
            plural(c, "chunk", "chunks"),
            number(o),
            plural(o, "object", "objects")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(body: EventBody) -> Event {
        Event { v: 1, id: "x".into(), run: "3f2c8a91d0e4b7c6".into(), at: 0, body }
    }

    #[test]
    fn every_kind_reads_as_a_sentence() {
        let started =
            event(EventBody::Started { objects: 100_000, chunks: 1000, chunk_size: 100, transform: String::new() });
        assert_eq!(render(&started), "Run 3f2c… started: 100 000 objects in 1 000 chunks of up to 100");
        let started = event(EventBody::Started { objects: 1, chunks: 1, chunk_size: 100, transform: "jq '.a'".into() });
        assert_eq!(render(&started), "Run 3f2c… started: 1 object in 1 chunk of up to 100, through jq '.a'");
        let progress = event(EventBody::Progress {
            percent: 30,
            chunks_done: 300,
            chunks: 1000,
            objects_done: 30_000,
            objects: 100_000,
            elapsed_ms: 12_400,
        });
        assert_eq!(
            render(&progress),
            "Run 3f2c… is 30 % done: 300 of 1 000 chunks, 30 000 of 100 000 objects saved, 12 s in"
        );
        let dead = event(EventBody::ChunkDead {
            chunk: common::protocol::ChunkId(7),
            reason: "the transform panicked".into(),
            first_line: 701,
            objects: 100,
        });
        assert_eq!(
            render(&dead),
            "Run 3f2c…: chunk 7 (input line 701, 100 objects) was dead-lettered: the transform panicked"
        );
        let completed = event(EventBody::Completed {
            chunks: 1000,
            objects: 100_000,
            duration_ms: 41_150,
            dead_chunks: 0,
            dead_objects: 0,
            bad_records: 0,
        });
        assert_eq!(render(&completed), "Run 3f2c… finished: 100 000 objects in 41 s (2 430/s), 0 dead-lettered");
        let resumed =
            event(EventBody::Resumed { chunks: 1000, chunks_done: 420, chunks_dead: 0, instance: "fetcher-0".into() });
        assert_eq!(
            render(&resumed),
            "Run 3f2c… resumed by fetcher-0 after a restart: 420 of 1 000 chunks already done, 580 to go"
        );
    }

    #[test]
    fn a_run_with_losses_says_what_was_lost() {
        let completed = event(EventBody::Completed {
            chunks: 3,
            objects: 300,
            duration_ms: 2_345,
            dead_chunks: 1,
            dead_objects: 1,
            bad_records: 2,
        });
        assert_eq!(
            render(&completed),
            "Run 3f2c… finished: 300 objects in 2.3 s (128/s), 1 chunk and 1 object dead-lettered, 2 invalid input records skipped"
        );
    }

    #[test]
    fn numbers_durations_and_rates_are_for_people() {
        assert_eq!(number(0), "0");
        assert_eq!(number(999), "999");
        assert_eq!(number(1_000), "1 000");
        assert_eq!(number(1_234_567), "1 234 567");
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(4_249), "4.2 s");
        assert_eq!(duration(41_000), "41 s");
        assert_eq!(duration(200_000), "3 min 20 s");
        assert_eq!(duration(120_000), "2 min");
        assert_eq!(duration(7_500_000), "2 h 5 min");
        assert_eq!(rate(100_000, 41_150), "2 430");
        assert_eq!(rate(1_000_000, 1_000), "1 000 000");
        assert_eq!(rate(843, 1_000), "843");
        assert_eq!(rate(125, 10_000), "12.5");
        assert_eq!(rate(1, 4_000), "0.25");
    }
}
