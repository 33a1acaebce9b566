//! The termination log: what the wrapper holds, as one line the operator reads back.
//!
//! The wrapper overwrites the container's termination log with one line before each
//! step. When the container ends, Kubernetes copies the file into the container's
//! termination message (or, under `FallbackToLogsOnError` with an empty file, the tail of
//! its logs), and the operator reads it to learn which ticket a crash belongs to.

/// Longest reason text the wrapper writes on one line, in characters.
pub const MAX_REASON_CHARS: usize = 512;
/// Longest ticket id the operator accepts on a `ticket=` line, in bytes; a longer one
/// makes the line unrecognisable. The longest id [`ticket_id`](super::ticket_id) makes:
/// a message id of 255 bytes (an AMQP short string), each percent-encoded.
pub const MAX_TICKET_ID_BYTES: usize = 3 * 255;
/// Longest quotation of a line the operator keeps, in characters (see
/// [`TerminationLine::parse_quoted`]).
pub const MAX_QUOTED_CHARS: usize = 300;

/// One state of the worker, as written to the termination log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TerminationLine {
    /// `starting`: before the consume loop is up.
    Starting,
    /// `idle`: consuming, nothing in hand.
    Idle,
    /// `ticket=<id> delivery=<n>`: a ticket in hand, written before its command starts.
    Ticket {
        /// Ticket id: one word (see [`ticket_id`](super::ticket_id)).
        id: String,
        /// 1-based delivery number.
        delivery: u64,
    },
    /// `broker-unavailable: <why>`: could not start consuming.
    BrokerUnavailable(String),
    /// `command-error: <why>`: the command could not be started.
    CommandError(String),
    /// `broker-lost: <why>`: the connection or the consumer was lost.
    BrokerLost(String),
    /// `config-error: <why>`: invalid configuration.
    ConfigError(String),
}

/// Makes a line from its reason.
type FromReason = fn(String) -> TerminationLine;

/// The prefixes of the environment failures, each with its line.
const ENVIRONMENT_PREFIXES: [(&str, FromReason); 4] = [
    ("broker-unavailable:", TerminationLine::BrokerUnavailable),
    ("command-error:", TerminationLine::CommandError),
    ("broker-lost:", TerminationLine::BrokerLost),
    ("config-error:", TerminationLine::ConfigError),
];

/// A reason as [`TerminationLine::render`] writes it: control characters (newlines
/// included) become spaces, at most [`MAX_REASON_CHARS`] characters are kept, and the
/// ends are trimmed. A reason that is its own `one_line` reads back unchanged.
pub fn one_line(reason: &str) -> String {
    let flat: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON_CHARS)
        .collect();
    flat.trim().to_string()
}

impl TerminationLine {
    /// The termination-log text: one line, newline-terminated. Reasons go through
    /// [`one_line`].
    pub fn render(&self) -> String {
        let text = match self {
            TerminationLine::Starting => "starting".to_string(),
            TerminationLine::Idle => "idle".to_string(),
            TerminationLine::Ticket { id, delivery } => format!("ticket={id} delivery={delivery}"),
            TerminationLine::BrokerUnavailable(why) => {
                format!("broker-unavailable: {}", one_line(why))
            }
            TerminationLine::CommandError(why) => format!("command-error: {}", one_line(why)),
            TerminationLine::BrokerLost(why) => format!("broker-lost: {}", one_line(why)),
            TerminationLine::ConfigError(why) => format!("config-error: {}", one_line(why)),
        };
        text + "\n"
    }

    /// Reads one line (surrounding whitespace ignored); `None` when it is not a line of
    /// the wrapper's. A `ticket=` line needs an id of 1 to [`MAX_TICKET_ID_BYTES`] bytes;
    /// a missing or malformed delivery number reads as 1.
    pub fn parse_line(line: &str) -> Option<Self> {
        let line = line.trim();
        match line {
            "starting" => return Some(TerminationLine::Starting),
            "idle" => return Some(TerminationLine::Idle),
            _ => {}
        }
        if let Some(rest) = line.strip_prefix("ticket=") {
            let mut parts = rest.split_whitespace();
            let id = parts.next().unwrap_or_default();
            let delivery = parts
                .find_map(|p| p.strip_prefix("delivery="))
                .and_then(|d| d.parse().ok())
                .unwrap_or(1);
            return (!id.is_empty() && id.len() <= MAX_TICKET_ID_BYTES).then(|| {
                TerminationLine::Ticket {
                    id: id.to_string(),
                    delivery,
                }
            });
        }
        ENVIRONMENT_PREFIXES.iter().find_map(|(prefix, line_of)| {
            line.strip_prefix(prefix)
                .map(|why| line_of(why.trim_start().to_string()))
        })
    }

    /// Reads a termination message: the last line of the wrapper's wins, whatever
    /// follows it. Accepts any bytes (log tails under `FallbackToLogsOnError`,
    /// truncation, garbage); `None` when no line is the wrapper's.
    pub fn parse(message: &[u8]) -> Option<Self> {
        Self::parse_quoted(message).map(|(line, _)| line)
    }

    /// Like [`TerminationLine::parse`], with the line as it was written (cut to
    /// [`MAX_QUOTED_CHARS`] characters, then trimmed), for the operator to quote.
    pub fn parse_quoted(message: &[u8]) -> Option<(Self, String)> {
        let text = String::from_utf8_lossy(message);
        text.lines().rev().find_map(|line| {
            let line = line.trim();
            Self::parse_line(line).map(|parsed| {
                let cut: String = line.chars().take(MAX_QUOTED_CHARS).collect();
                (parsed, cut.trim_end().to_string())
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_as_written() {
        assert_eq!(TerminationLine::Starting.render(), "starting\n");
        assert_eq!(TerminationLine::Idle.render(), "idle\n");
        let t = TerminationLine::Ticket {
            id: "t-1".into(),
            delivery: 3,
        };
        assert_eq!(t.render(), "ticket=t-1 delivery=3\n");
        let lost = TerminationLine::BrokerLost("closed\nby\tadmin".into()).render();
        assert_eq!(lost, "broker-lost: closed by admin\n");
        let long = TerminationLine::CommandError("x".repeat(10_000)).render();
        assert!(long.len() < 600, "{}", long.len());
        assert_eq!(long.lines().count(), 1);
    }

    #[test]
    fn lines_as_read() {
        assert_eq!(
            TerminationLine::parse(b"  ticket=t-42   delivery=x \n"),
            Some(TerminationLine::Ticket {
                id: "t-42".into(),
                delivery: 1
            })
        );
        let long_id = format!(
            "idle\nticket={} delivery=2\n",
            "i".repeat(MAX_TICKET_ID_BYTES + 1)
        );
        assert_eq!(
            TerminationLine::parse(long_id.as_bytes()),
            Some(TerminationLine::Idle),
            "an id too long is no ticket line"
        );
        assert_eq!(TerminationLine::parse(b"ticket=\n"), None);
        let (line, quoted) =
            TerminationLine::parse_quoted(format!("config-error:{}", "y".repeat(400)).as_bytes())
                .unwrap();
        assert_eq!(line, TerminationLine::ConfigError("y".repeat(400)));
        assert_eq!(quoted.chars().count(), MAX_QUOTED_CHARS);
        assert!(quoted.starts_with("config-error:yyy"));
        assert_eq!(TerminationLine::parse(b"\xff\xfe panic\n\n"), None);
    }

    #[test]
    fn every_ticket_id_fits_on_a_line() {
        // The longest message id, every byte percent-encoded (found by fuzzing).
        let id = super::super::ticket_id(Some(&"é".repeat(127)), b"");
        assert_eq!(id.len(), 3 * 254);
        let line = TerminationLine::Ticket { id, delivery: 1 };
        assert_eq!(TerminationLine::parse(line.render().as_bytes()), Some(line));
    }

    #[test]
    fn a_quotation_cut_short_is_trimmed() {
        // A space at the cut (found by fuzzing).
        let message = format!("ticket=t-1 {}x", " ".repeat(MAX_QUOTED_CHARS));
        let (_, quoted) = TerminationLine::parse_quoted(message.as_bytes()).unwrap();
        assert_eq!(quoted, "ticket=t-1");
    }
}
