//! Crash records: what a worker container's termination says about the ticket it
//! held. Pure parsing of pod status; nothing here talks to the API.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};

use crate::contract::{TerminationLine, WORKER_CONTAINER, WorkerExit};
use crate::crd::{CrashStatus, LABEL_REVISION};

/// What the worker said it was doing when it stopped (its termination message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InHand {
    /// A ticket: its id and delivery number.
    Ticket {
        /// Ticket id (AMQP message_id, or a hash of the body).
        id: String,
        /// Delivery number (1 for the first delivery).
        delivery: u64,
    },
    /// Still starting: the crash came before the consume loop (environment).
    Starting,
    /// Between tickets.
    Idle,
    /// The wrapper reported an environment failure (broker, command, config): its line,
    /// as quoted by [`TerminationLine::parse_quoted`].
    Environment(String),
    /// Nothing recognisable (no wrapper, a native worker, or a garbled message).
    Unknown,
}

/// Reads a termination message: the last line the wrapper wrote wins. Accepts any
/// bytes (log tails under FallbackToLogsOnError, truncation, garbage); see
/// [`TerminationLine::parse_quoted`].
pub fn parse_termination_message(message: &[u8]) -> InHand {
    match TerminationLine::parse_quoted(message) {
        None => InHand::Unknown,
        Some((TerminationLine::Starting, _)) => InHand::Starting,
        Some((TerminationLine::Idle, _)) => InHand::Idle,
        Some((TerminationLine::Ticket { id, delivery }, _)) => InHand::Ticket { id, delivery },
        Some((
            TerminationLine::BrokerUnavailable(_)
            | TerminationLine::CommandError(_)
            | TerminationLine::BrokerLost(_)
            | TerminationLine::ConfigError(_),
            quoted,
        )) => InHand::Environment(quoted),
    }
}

/// One container termination of a worker pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrashRecord {
    /// Identity: pod uid, restart count and finish time (each termination once).
    pub id: String,
    /// Pod name.
    pub pod: String,
    /// Revision label of the pod.
    pub revision: String,
    /// Image of the worker container.
    pub image: String,
    /// What the worker held.
    pub in_hand: InHand,
    /// Exit code.
    pub exit_code: i32,
    /// Signal, when killed by one.
    pub signal: Option<i32>,
    /// Kubernetes' reason: Error, OOMKilled, Completed, ...
    pub reason: String,
    /// When the container finished.
    pub at: Timestamp,
}

impl CrashRecord {
    /// True when the termination counts against the ticket in hand (a crash, not a
    /// clean exit nor an environment failure the wrapper reported).
    pub fn is_ticket_crash(&self) -> bool {
        matches!(self.in_hand, InHand::Ticket { .. })
            && self.exit_code != 0
            && !WorkerExit::is_environment(self.exit_code)
    }

    /// The ticket in hand, if any.
    pub fn ticket(&self) -> Option<&str> {
        match &self.in_hand {
            InHand::Ticket { id, .. } => Some(id),
            _ => None,
        }
    }
}

fn record(
    pod: &Pod,
    restarts: i32,
    image: &str,
    t: &ContainerStateTerminated,
) -> Option<CrashRecord> {
    let uid = pod.metadata.uid.as_deref()?;
    let at = t.finished_at.as_ref().map(|f| f.0)?;
    Some(CrashRecord {
        id: format!("{uid}/{restarts}/{}", at.as_second()),
        pod: pod.metadata.name.clone().unwrap_or_default(),
        revision: pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_REVISION))
            .cloned()
            .unwrap_or_default(),
        image: image.to_string(),
        in_hand: parse_termination_message(t.message.as_deref().unwrap_or_default().as_bytes()),
        exit_code: t.exit_code,
        signal: t.signal,
        reason: t.reason.clone().unwrap_or_default(),
        at,
    })
}

/// The terminations a worker pod's status shows: the last one (`lastState`) and,
/// while the container is down, the current one (`state`). Clean exits (code 0)
/// are left out.
pub fn crash_records(pod: &Pod) -> Vec<CrashRecord> {
    let Some(statuses) = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
    else {
        return Vec::new();
    };
    let Some(cs) = statuses.iter().find(|c| c.name == WORKER_CONTAINER) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // lastState belongs to the run before the current restart count.
    if let Some(t) = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
        out.extend(record(pod, cs.restart_count - 1, &cs.image, t));
    }
    if let Some(t) = cs.state.as_ref().and_then(|s| s.terminated.as_ref()) {
        // A pod being deleted whose worker was stopped by the kubelet (SIGTERM, or
        // SIGKILL at the end of its grace period) did not crash on its ticket: the
        // broker gives the ticket back, and it charges the ticket nothing.
        let stopped = pod.metadata.deletion_timestamp.is_some() && matches!(t.exit_code, 137 | 143);
        if !stopped {
            out.extend(record(pod, cs.restart_count, &cs.image, t));
        }
    }
    out.retain(|r| r.exit_code != 0);
    out
}

/// How a worker ended, for messages: `signal 11`, or `<exit> 3` (`exit`, `exit code`),
/// with Kubernetes' reason when it says more than Error: `exit 137 (OOMKilled)`.
pub fn ending(c: &CrashStatus, exit: &str) -> String {
    let mut s = match c.signal {
        Some(sig) => format!("signal {sig}"),
        None => format!("{exit} {}", c.exit_code),
    };
    if !c.reason.is_empty() && c.reason != "Error" {
        s.push_str(&format!(" ({})", c.reason));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn reads_the_wrapper_lines() {
        assert_eq!(
            parse_termination_message(b"ticket=t-42 delivery=3\n"),
            InHand::Ticket {
                id: "t-42".into(),
                delivery: 3
            }
        );
        assert_eq!(parse_termination_message(b"starting\n"), InHand::Starting);
        assert_eq!(parse_termination_message(b"idle"), InHand::Idle);
        assert!(matches!(
            parse_termination_message(b"command-error: /run-tests: not found\n"),
            InHand::Environment(m) if m.contains("not found")
        ));
        assert_eq!(parse_termination_message(b""), InHand::Unknown);
    }

    #[test]
    fn the_last_wrapper_line_of_a_log_tail_wins() {
        let tail =
            b"ticket=a delivery=1\nsome test output\nticket=b delivery=2\npanic: boom\n\xff\xfe";
        assert_eq!(
            parse_termination_message(tail),
            InHand::Ticket {
                id: "b".into(),
                delivery: 2
            }
        );
    }

    #[test]
    fn crash_records_come_from_last_state_with_identity() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "unit-abcde", "uid": "u-1", "labels": {"testrunner.dev/revision": "r1"}},
            "status": {"containerStatuses": [{
                "name": "worker", "image": "runner:2", "imageID": "", "ready": false, "restartCount": 3,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled",
                    "finishedAt": "2026-11-28T03:00:00Z", "message": "ticket=t-9 delivery=4\n"}}
            }]}
        }))
        .unwrap();
        let records = crash_records(&pod);
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(
            r.id,
            format!(
                "u-1/2/{}",
                "2026-11-28T03:00:00Z"
                    .parse::<Timestamp>()
                    .unwrap()
                    .as_second()
            )
        );
        assert_eq!(
            (r.pod.as_str(), r.revision.as_str(), r.image.as_str()),
            ("unit-abcde", "r1", "runner:2")
        );
        assert_eq!(r.reason, "OOMKilled");
        assert_eq!(r.ticket(), Some("t-9"));
        assert!(r.is_ticket_crash());
    }

    #[test]
    fn a_worker_stopped_at_the_end_of_its_grace_period_did_not_crash() {
        let pod = |deleting: bool, exit: i32| -> Pod {
            let mut p = json!({
                "metadata": {"name": "unit-abcde", "uid": "u-1"},
                "status": {"containerStatuses": [{
                    "name": "worker", "image": "runner:2", "imageID": "", "ready": false,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": exit, "reason": "Error",
                        "finishedAt": "2026-11-28T03:00:00Z", "message": "ticket=long-1 delivery=1\n"}}
                }]}
            });
            if deleting {
                p["metadata"]["deletionTimestamp"] = json!("2026-11-28T02:59:00Z");
            }
            serde_json::from_value(p).unwrap()
        };
        for (deleting, exit, crashes, why) in [
            (true, 137, 0, "killed after grace"),
            (true, 143, 0, "stopped by SIGTERM"),
            (true, 139, 1, "a crash while draining is a crash"),
            (false, 137, 1, "killed while not being deleted"),
        ] {
            assert_eq!(crash_records(&pod(deleting, exit)).len(), crashes, "{why}");
        }
    }

    #[test]
    fn environment_exits_are_not_ticket_crashes() {
        let mut r = CrashRecord {
            id: "x".into(),
            pod: "p".into(),
            revision: "r".into(),
            image: "i".into(),
            in_hand: InHand::Ticket {
                id: "t".into(),
                delivery: 1,
            },
            exit_code: 75,
            signal: None,
            reason: "Error".into(),
            at: Timestamp::UNIX_EPOCH,
        };
        assert!(!r.is_ticket_crash());
        r.exit_code = 2;
        assert!(r.is_ticket_crash());
        r.in_hand = InHand::Starting;
        assert!(!r.is_ticket_crash());
    }

    #[test]
    fn an_ending_says_the_signal_or_the_exit_and_a_telling_reason() {
        let mut c = crate::core::fixtures::ticket_crash("p", "t", "i", 0);
        assert_eq!(ending(&c, "exit"), "exit 3");
        assert_eq!(ending(&c, "exit code"), "exit code 3");
        c.reason = "OOMKilled".into();
        c.exit_code = 137;
        assert_eq!(ending(&c, "exit"), "exit 137 (OOMKilled)");
        c.signal = Some(9);
        assert_eq!(ending(&c, "exit code"), "signal 9 (OOMKilled)");
        c.reason = String::new();
        assert_eq!(ending(&c, "exit"), "signal 9");
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = parse_termination_message(&bytes);
        }

        #[test]
        fn a_ticket_line_survives_any_prefix(prefix in "[^\n]{0,200}\n", id in "[a-zA-Z0-9._-]{1,64}", n in 1u64..1000) {
            let text = format!("{prefix}ticket={id} delivery={n}\n");
            prop_assert_eq!(parse_termination_message(text.as_bytes()), InHand::Ticket { id, delivery: n });
        }
    }
}
