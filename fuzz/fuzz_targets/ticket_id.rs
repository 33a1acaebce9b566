//! Ticket ids from any message id a publisher sets (an AMQP short string: up to 255
//! bytes) or, without one, from the body.
//!
//! - an id is one word of printable ASCII;
//! - the wrapper's termination line for it reads back as the same ticket, so a crash is
//!   tied to the ticket whatever its id;
//! - a quarantine list entry for it reads back as the same entry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use testrunner_operator::contract::{
    QuarantineEntry, TerminationLine, parse_quarantine_list, ticket_id,
};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let message_id = (flags & 1 == 1).then(|| {
        let mut end = text.len().min(255);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[..end]
    });
    let id = ticket_id(message_id, rest);
    assert!(!id.is_empty());
    assert!(id.bytes().all(|b| (0x21..=0x7e).contains(&b)), "{id:?}");

    let delivery = u64::from(flags >> 1);
    let line = TerminationLine::Ticket {
        id: id.clone(),
        delivery,
    };
    assert_eq!(
        TerminationLine::parse(line.render().as_bytes()),
        Some(line),
        "the termination line of ticket {id:?}"
    );

    let entry = QuarantineEntry::new(&id, 1000, 3, &["p".into()], &["i:1".into()], "exit 1");
    assert_eq!(parse_quarantine_list(&entry.render()), [entry]);
});
