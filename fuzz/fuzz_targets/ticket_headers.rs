//! Ticket headers: any AMQP field table a publisher sets on a ticket, decoded from the
//! wire as the broker delivers it.
//!
//! - the command's environment is well formed: names of ASCII capitals, digits and `_`,
//!   each once, values without NUL bytes, each header value at most
//!   `MAX_HEADER_ENV_BYTES`, `TICKET_HEADERS` a JSON object of at most
//!   `MAX_HEADERS_JSON_BYTES` (or `{}` with `TICKET_HEADERS_TRUNCATED`);
//! - the delivery number is at least 1 and the queue wait never panics, whatever
//!   `x-delivery-count`, `timestamp_in_ms` or `x-testrunner-replayed-at` hold.
#![no_main]

use std::collections::BTreeSet;

use amq_protocol_types::parsing::parse_field_table;
use lapin::BasicProperties;
use libfuzzer_sys::fuzz_target;
use testrunner_operator::worker::{
    MAX_HEADER_ENV_BYTES, MAX_HEADERS_JSON_BYTES, delivery_number, queue_wait, ticket_env,
};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, wire)) = data.split_first() else {
        return;
    };
    let Ok((_, table)) = parse_field_table(wire) else {
        return;
    };
    let delivery = delivery_number(Some(&table), flags & 1 == 1);
    assert!(delivery >= 1);

    let env = ticket_env("t-1", delivery, Some(&table));
    let mut names = BTreeSet::new();
    for (name, value) in &env {
        assert!(names.insert(name.clone()), "{name} set twice");
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'),
            "{name:?}"
        );
        assert!(!value.contains('\0'), "{name}={value:?}");
        if name.starts_with("TICKET_HEADER_") {
            assert!(
                value.len() <= MAX_HEADER_ENV_BYTES,
                "{name}: {}",
                value.len()
            );
        }
    }
    let json = &env
        .iter()
        .find(|(n, _)| n == "TICKET_HEADERS")
        .expect("always set")
        .1;
    assert!(json.len() <= MAX_HEADERS_JSON_BYTES);
    let parsed: serde_json::Value = serde_json::from_str(json).expect("TICKET_HEADERS is JSON");
    assert!(parsed.is_object());
    if names.contains("TICKET_HEADERS_TRUNCATED") {
        assert_eq!(json, "{}");
    }

    let props = BasicProperties::default()
        .with_headers(table)
        .with_timestamp(u64::from(flags) << 40);
    let now = i64::from(flags).wrapping_mul(0x0101_0101_0101_0101);
    let _ = queue_wait(&props, 1, now);
    let _ = queue_wait(&props, delivery, i64::MIN);
    let _ = queue_wait(&props, 1, i64::MAX);
});
