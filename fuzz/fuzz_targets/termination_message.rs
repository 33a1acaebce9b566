//! Termination messages: any bytes a container leaves (the wrapper's line, a log tail,
//! truncation, garbage).
//!
//! - the operator's reading ([`parse_termination_message`]) agrees with the wrapper's
//!   ([`TerminationLine::parse_quoted`]);
//! - a quoted line is one trimmed line of at most `MAX_QUOTED_CHARS` characters;
//! - a ticket id is one word of 1 to `MAX_TICKET_ID_BYTES` bytes;
//! - a line the wrapper renders is one newline-terminated line, reads back as the line
//!   it rendered, and renders again to the same text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use testrunner_operator::contract::{
    MAX_QUOTED_CHARS, MAX_TICKET_ID_BYTES, TerminationLine, one_line,
};
use testrunner_operator::core::crash::{InHand, parse_termination_message};

fuzz_target!(|message: &[u8]| {
    let in_hand = parse_termination_message(message);
    let Some((line, quoted)) = TerminationLine::parse_quoted(message) else {
        assert_eq!(in_hand, InHand::Unknown);
        return;
    };
    assert!(quoted.chars().count() <= MAX_QUOTED_CHARS);
    assert!(!quoted.contains('\n'), "{quoted:?}");
    assert_eq!(quoted, quoted.trim(), "a quotation is trimmed");
    assert_eq!(TerminationLine::parse(message).as_ref(), Some(&line));
    match (&line, &in_hand) {
        (TerminationLine::Starting, InHand::Starting) | (TerminationLine::Idle, InHand::Idle) => {}
        (TerminationLine::Ticket { id, delivery }, InHand::Ticket { id: i, delivery: d }) => {
            assert_eq!((id, delivery), (i, d));
            assert!(!id.is_empty() && id.len() <= MAX_TICKET_ID_BYTES, "{id:?}");
            assert!(!id.contains(char::is_whitespace), "{id:?}");
        }
        (
            TerminationLine::BrokerUnavailable(_)
            | TerminationLine::CommandError(_)
            | TerminationLine::BrokerLost(_)
            | TerminationLine::ConfigError(_),
            InHand::Environment(q),
        ) => assert_eq!(q, &quoted),
        other => panic!("the operator reads {other:?}"),
    }

    // What the wrapper writes for this line reads back as what it wrote.
    let rendered = line.render();
    assert!(rendered.ends_with('\n'));
    assert_eq!(rendered.lines().count(), 1, "{rendered:?}");
    let reread = TerminationLine::parse(rendered.as_bytes()).expect("a rendered line reads");
    let written = match &line {
        TerminationLine::BrokerUnavailable(why) => {
            TerminationLine::BrokerUnavailable(one_line(why))
        }
        TerminationLine::CommandError(why) => TerminationLine::CommandError(one_line(why)),
        TerminationLine::BrokerLost(why) => TerminationLine::BrokerLost(one_line(why)),
        TerminationLine::ConfigError(why) => TerminationLine::ConfigError(one_line(why)),
        other => other.clone(),
    };
    assert_eq!(reread, written, "{rendered:?}");
    assert_eq!(reread.render(), rendered);
});
