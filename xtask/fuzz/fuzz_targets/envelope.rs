//! `Envelope::from_kafka` on arbitrary records: never panics; whatever it
//! accepts re-encodes (`header_map`) and decodes to the same envelope.
//!
//! Input (plain-text seeds): the first line is the record key (empty: no
//! key), then `name: value` header lines up to an empty line, then the
//! payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use soma_bus::Envelope;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let key = lines.next().filter(|k| !k.is_empty());
    let mut headers: Vec<(&str, Option<&[u8]>)> = Vec::new();
    let mut consumed = key.map_or(1, |k| k.len() + 1);
    for line in lines.by_ref() {
        consumed += line.len() + 1;
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let Ok(name) = std::str::from_utf8(&line[..colon]) else {
            continue;
        };
        let value = line[colon + 1..]
            .strip_prefix(b" ")
            .unwrap_or(&line[colon + 1..]);
        headers.push((name, Some(value)));
    }
    let payload = data.get(consumed.min(data.len())..);
    let Ok(env) = Envelope::from_kafka(key, payload, headers.iter().copied()) else {
        return;
    };
    let map = env.header_map();
    let again = Envelope::from_kafka(
        env.kafka_key(),
        Some(&env.payload),
        map.iter().map(|(k, v)| (k.as_str(), Some(v.as_bytes()))),
    )
    .expect("an accepted envelope decodes again from its own encoding");
    assert_eq!(again, env);
});
