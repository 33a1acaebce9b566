//! Tickets: their ids, and the message headers the operator and its workers set.

use sha2::{Digest, Sha256};

/// Prefix of every header the operator and its workers set on tickets. A ticket replayed
/// from quarantine loses all of them but [`HEADER_REPLAYED_AT`], which it gets anew.
pub const HEADER_PREFIX: &str = "x-testrunner-";
/// Header a replayed ticket carries: when it left quarantine (Unix seconds).
pub const HEADER_REPLAYED_AT: &str = "x-testrunner-replayed-at";
/// Header of a quarantined ticket: the queue it was moved from.
pub const HEADER_QUARANTINED_FROM: &str = "x-testrunner-quarantined-from";
/// Header of a quarantined ticket: the pod of the worker that moved it.
pub const HEADER_QUARANTINED_BY: &str = "x-testrunner-quarantined-by";
/// Header of a quarantined ticket: its delivery number when it was moved.
pub const HEADER_DELIVERY: &str = "x-testrunner-delivery";
/// Header of a ticket a worker set aside into the quarantine queue because it reached
/// the queue's delivery limit (the value says so): not blamed, it goes back to the work
/// queue when the pool works again, as a ticket the broker dead-lettered would.
pub const HEADER_SET_ASIDE: &str = "x-testrunner-set-aside";

/// Header with a ticket's publish time in Unix milliseconds, the name RabbitMQ's message
/// timestamp plugin gives it. Workers measure a ticket's wait in the queue from it, else
/// from the AMQP `timestamp` property (Unix seconds). Not one of ours: no prefix.
pub const HEADER_TIMESTAMP_MS: &str = "timestamp_in_ms";

/// The ticket id: the AMQP `message_id` when it is set, else `sha256:` and the
/// first 16 hex digits of the SHA-256 of the body.
///
/// Bytes of the message id outside printable ASCII (and `%`) are percent-encoded,
/// so the id is always one word on one line.
pub fn ticket_id(message_id: Option<&str>, body: &[u8]) -> String {
    match message_id {
        Some(id) if !id.is_empty() => {
            let mut out = String::with_capacity(id.len());
            for b in id.bytes() {
                if (0x21..=0x7e).contains(&b) && b != b'%' {
                    out.push(b as char);
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
            out
        }
        _ => {
            let digest = Sha256::digest(body);
            let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
            format!("sha256:{hex}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_id_is_the_message_id_when_set() {
        assert_eq!(ticket_id(Some("t-42"), b"body"), "t-42");
    }

    #[test]
    fn ticket_id_falls_back_to_a_stable_body_hash() {
        let a = ticket_id(None, b"hello");
        assert_eq!(a, ticket_id(None, b"hello"));
        assert_eq!(
            a,
            ticket_id(Some(""), b"hello"),
            "an empty message_id counts as absent"
        );
        // sha256("hello") = 2cf24dba5fb0a30e...
        assert_eq!(a, "sha256:2cf24dba5fb0a30e");
        assert_ne!(a, ticket_id(None, b"hello!"));
        assert_eq!(ticket_id(None, b""), "sha256:e3b0c44298fc1c14");
        assert_eq!(
            ticket_id(None, &[0xff, 0x00, 0xfe]).len(),
            "sha256:".len() + 16
        );
    }

    #[test]
    fn ticket_id_escapes_spaces_newlines_and_percent() {
        assert_eq!(ticket_id(Some("a b\nc%d"), b""), "a%20b%0Ac%25d");
        assert_eq!(ticket_id(Some("é"), b""), "%C3%A9");
        let id = ticket_id(Some("x y"), b"");
        assert!(!id.contains(char::is_whitespace));
    }

    #[test]
    fn every_header_of_ours_has_the_prefix() {
        for h in [
            HEADER_REPLAYED_AT,
            HEADER_QUARANTINED_FROM,
            HEADER_QUARANTINED_BY,
            HEADER_DELIVERY,
        ] {
            assert!(h.starts_with(HEADER_PREFIX), "{h}");
        }
    }
}
