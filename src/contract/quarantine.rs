//! The quarantine list: which tickets workers move to the quarantine queue instead of
//! running them.
//!
//! The operator writes the list into a ConfigMap mounted in worker pods; the wrapper
//! reads it before every ticket. One line a ticket:
//!
//! ```text
//! <id> <listed at> <evidence>
//! ```
//!
//! `<id>` is the ticket id (one word), `<listed at>` when it was listed (Unix seconds;
//! `-` or absent when unknown, as in the lists of older operators), `<evidence>` a
//! URL-encoded query (`crashes`, `pods`, `images`, `last_exit`) that the wrapper copies
//! into the quarantined ticket's headers.

use super::ticket::HEADER_PREFIX;

/// Evidence key: how many worker crashes the ticket caused.
pub const EVIDENCE_CRASHES: &str = "crashes";
/// Evidence key: the worker pods it crashed, comma-separated.
pub const EVIDENCE_PODS: &str = "pods";
/// Evidence key: the images it crashed, comma-separated.
pub const EVIDENCE_IMAGES: &str = "images";
/// Evidence key: how the last worker it crashed ended.
pub const EVIDENCE_LAST_EXIT: &str = "last_exit";

/// One ticket on the quarantine list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuarantineEntry {
    /// Ticket id: one word, as [`ticket_id`](super::ticket_id) makes it.
    pub id: String,
    /// When it was listed (Unix seconds), if the list says.
    pub listed_at: Option<i64>,
    /// The evidence, as key and value pairs in their order.
    pub evidence: Vec<(String, String)>,
}

impl QuarantineEntry {
    /// The entry the operator writes for a ticket it quarantined at `listed_at`, with
    /// the evidence against it.
    pub fn new(
        id: &str,
        listed_at: i64,
        crashes: i32,
        pods: &[String],
        images: &[String],
        last_exit: &str,
    ) -> Self {
        Self {
            id: id.to_string(),
            listed_at: Some(listed_at),
            evidence: vec![
                (EVIDENCE_CRASHES.into(), crashes.to_string()),
                (EVIDENCE_PODS.into(), pods.join(",")),
                (EVIDENCE_IMAGES.into(), images.join(",")),
                (EVIDENCE_LAST_EXIT.into(), last_exit.to_string()),
            ],
        }
    }

    /// Its line on the list, newline-terminated.
    pub fn render(&self) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (key, value) in &self.evidence {
            query.append_pair(key, value);
        }
        let evidence = query.finish();
        let listed_at = self
            .listed_at
            .map_or_else(|| "-".to_string(), |at| at.to_string());
        format!("{} {listed_at} {evidence}\n", self.id)
    }

    /// Reads one line of the list; `None` for a blank line. Fields are separated by
    /// whitespace; a `<listed at>` that is not a number reads as unknown, and a missing
    /// evidence as none.
    pub fn parse(line: &str) -> Option<Self> {
        let mut parts = line.split_whitespace();
        let id = parts.next()?;
        let listed_at = parts.next().and_then(|t| t.parse::<i64>().ok());
        let evidence = url::form_urlencoded::parse(parts.next().unwrap_or_default().as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        Some(Self {
            id: id.to_string(),
            listed_at,
            evidence,
        })
    }

    /// True when a delivery of the ticket is to be moved to quarantine: always, unless
    /// the ticket was replayed from quarantine (at `replayed_at`) and not listed again
    /// after that. An entry that does not say when it was listed does not hold a
    /// replayed ticket.
    pub fn diverts(&self, replayed_at: Option<i64>) -> bool {
        match (replayed_at, self.listed_at) {
            (Some(replayed), Some(listed)) => listed > replayed,
            (Some(_), None) => false,
            (None, _) => true,
        }
    }

    /// The evidence as the headers the quarantined ticket gets: `x-testrunner-` and the
    /// key with `_` made `-` (`x-testrunner-crashes`, `x-testrunner-last-exit`, ...).
    pub fn evidence_headers(&self) -> Vec<(String, String)> {
        self.evidence
            .iter()
            .map(|(k, v)| (format!("{HEADER_PREFIX}{}", k.replace('_', "-")), v.clone()))
            .collect()
    }
}

/// Reads a quarantine list, blank lines skipped. A ticket may be listed more than once.
pub fn parse_quarantine_list(text: &str) -> Vec<QuarantineEntry> {
    text.lines().filter_map(QuarantineEntry::parse).collect()
}

/// A list line with its evidence and the headers it gives: what the operator writes
/// (the core) and what a worker reads (the wrapper) must agree on it.
#[cfg(test)]
pub(crate) mod example {
    /// Ticket t-9, listed at 1000, with its evidence.
    pub const LINE: &str = "t-9 1000 crashes=3&pods=unit-a&images=runner%3A1%2Crunner%3A2&last_exit=exit+code+139+%28signal+11%29\n";

    /// The headers t-9 gets when a worker moves it to the quarantine queue.
    pub fn headers() -> Vec<(String, String)> {
        [
            ("crashes", "3"),
            ("pods", "unit-a"),
            ("images", "runner:1,runner:2"),
            ("last-exit", "exit code 139 (signal 11)"),
        ]
        .map(|(k, v)| (format!("x-testrunner-{k}"), v.to_string()))
        .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_older_operators_still_read() {
        let list = parse_quarantine_list("t-1 1000\n\n  \nt-2\nt-3 x crashes=2\n");
        let ids: Vec<&str> = list.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["t-1", "t-2", "t-3"]);
        assert_eq!(list[0].listed_at, Some(1000));
        assert_eq!(list[1].listed_at, None);
        assert_eq!(
            list[2].evidence_headers(),
            [("x-testrunner-crashes".to_string(), "2".to_string())]
        );
        assert!(list[0].diverts(None));
        assert!(list[0].diverts(Some(999)), "listed again after a replay");
        assert!(!list[0].diverts(Some(1000)), "replayed after it was listed");
        assert!(list[1].diverts(None));
        assert!(!list[1].diverts(Some(5)), "no listing time: a replay wins");
    }
}
