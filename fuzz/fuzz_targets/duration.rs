//! Durations in a pool's spec (`pollInterval`, `scaleDownDelay`, `stallTimeout`, ...): any
//! string a client stores, the API server's schema bypassed or not.
//!
//! - the text reads back exactly as written (Display, serde);
//! - a text the schema accepts (`DURATION_PATTERN`, at most 32 characters) is a
//!   duration, and the one it says: the sum of its `<number><unit>` groups;
//! - a parsed duration formats back (humantime) to a text that parses to the same value.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use testrunner_operator::crd::SpecDuration;

/// The duration a text matching `^([0-9]{1,6}(ms|s|m|h))+$` says, or `None` when it
/// does not match.
fn schema_value(text: &str) -> Option<Duration> {
    let mut rest = text.as_bytes();
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=6).contains(&digits) {
            return None;
        }
        let n: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = match rest {
            [b'm', b's', ..] => (Duration::from_millis(1), 2),
            [b's', ..] => (Duration::from_secs(1), 1),
            [b'm', ..] => (Duration::from_secs(60), 1),
            [b'h', ..] => (Duration::from_secs(3600), 1),
            _ => return None,
        };
        total += unit * u32::try_from(n).ok()?;
        rest = &rest[len..];
    }
    Some(total)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let d = SpecDuration::new(text);
    assert_eq!(d.as_str(), text);
    assert_eq!(d.to_string(), text);
    let json = serde_json::to_string(&d).expect("serializes");
    let back: SpecDuration = serde_json::from_str(&json).expect("deserializes");
    assert_eq!(back, d);

    if text.chars().count() <= 32
        && let Some(says) = schema_value(text)
    {
        assert_eq!(d.duration(), Ok(says), "{text:?} passes the schema");
    }
    if let Ok(value) = d.duration() {
        let formatted = humantime::format_duration(value).to_string();
        assert_eq!(
            SpecDuration::new(formatted.as_str()).duration(),
            Ok(value),
            "{text:?} formats as {formatted:?}"
        );
    }
});
