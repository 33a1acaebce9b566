//! The reports workers send the operator on their pool's outcome queue.
//!
//! One small JSON object a message. Two kinds share one shape:
//!
//! - a **state report** (`state` is `idle` or `busy`): sent when the worker starts
//!   consuming, when it takes a ticket (before the command starts), and again every
//!   report interval, so that an operator that restarted learns it;
//! - an **outcome report** (`outcome` is `passed`, `failed` or `quarantined`): sent in
//!   the same transaction as the ack of a ticket. The worker is idle after it.
//!
//! The busy report sent when a worker takes a ticket on its first delivery also says how
//! long the ticket waited in the queue (`waitedMs`), when its publisher stamped it.
//!
//! Workers built before state reports existed send outcome reports only; they parse
//! here as they always did.
//!
//! The outcome queue is shared by the pools of a namespace (`<prefix>.<namespace>`), so a
//! report names its pool (`pool`, and `poolUid` to tell a pool from an older one of the
//! same name). Workers built when each pool had a queue of its own (`<prefix>.<namespace>.<pool>`)
//! leave both out; they parse here with both empty.

use serde::{Deserialize, Serialize};

/// What a worker is doing, in a state report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WorkerState {
    /// Consuming, no ticket in hand.
    Idle,
    /// Running the ticket the report names.
    Busy,
}

/// How a ticket ended, in an outcome report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// The command exited 0.
    Passed,
    /// The command exited with a test-failure code: the tests ran.
    Failed,
    /// The ticket was on the quarantine list and moved to the quarantine queue; it did
    /// not run.
    Quarantined,
    /// The ticket reached the queue's delivery limit and was set aside into the
    /// quarantine queue, to come back when the pool works again; it did not run.
    SetAside,
}

/// One report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The worker's pool; empty from workers that report on a queue of their pool's own.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pool: String,
    /// The uid of the worker's pool, when the worker knows it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pool_uid: String,
    /// The worker's pod.
    #[serde(default)]
    pub pod: String,
    /// The pod's revision.
    #[serde(default)]
    pub revision: String,
    /// State reports: idle or busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<WorkerState>,
    /// Outcome reports: how the ticket ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// The ticket (busy state and outcome reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// Its 1-based delivery number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<u64>,
    /// Outcome reports: the command's exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Outcome reports: how long the command ran, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The busy report sent when the worker took the ticket on its first delivery: how
    /// long the ticket waited in the queue, in milliseconds, from its publish time to
    /// the worker taking it. Absent when the publisher set no timestamp, on a
    /// redelivery, and on every later report of the same ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
}

impl Report {
    /// A state report: idle, or busy with `ticket` (and its delivery number).
    pub fn state(pod: &str, revision: &str, ticket: Option<(&str, u64)>) -> Self {
        Self {
            pod: pod.into(),
            revision: revision.into(),
            state: Some(if ticket.is_some() {
                WorkerState::Busy
            } else {
                WorkerState::Idle
            }),
            ticket: ticket.map(|(t, _)| t.to_string()),
            delivery: ticket.map(|(_, d)| d),
            ..Default::default()
        }
    }

    /// The same report, saying the ticket waited `waited_ms` in the queue.
    pub fn with_wait(self, waited_ms: Option<u64>) -> Self {
        Self { waited_ms, ..self }
    }

    /// The same report, naming the worker's pool (`name`, and its `uid` when known).
    pub fn of_pool(self, name: &str, uid: &str) -> Self {
        Self {
            pool: name.into(),
            pool_uid: uid.into(),
            ..self
        }
    }

    /// The JSON body.
    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a report serializes")
    }

    /// Reads a body; `None` when it is not a report.
    pub fn parse(body: &[u8]) -> Option<Self> {
        serde_json::from_slice(body).ok()
    }

    /// The ticket the worker holds after this report: `Some(Some(id))` busy,
    /// `Some(None)` idle, `None` when the report does not say (an outcome report from
    /// a worker that does not send state reports says it too: idle).
    pub fn holds(&self) -> Option<Option<&str>> {
        match (self.state, self.outcome) {
            (Some(WorkerState::Busy), _) => Some(Some(self.ticket.as_deref().unwrap_or(""))),
            (Some(WorkerState::Idle), _) | (None, Some(_)) => Some(None),
            (None, None) => None,
        }
    }

    /// For an outcome report: the ticket whose tests ran to the end (none for a ticket
    /// moved to quarantine, which did not run, though the worker worked). `None` for
    /// state reports, and for a ticket set aside at the delivery limit: that is no sign
    /// that the pool works.
    pub fn completed(&self) -> Option<Option<&str>> {
        let outcome = self.outcome.filter(|o| *o != Outcome::SetAside)?;
        Some(
            self.ticket
                .as_deref()
                .filter(|_| outcome != Outcome::Quarantined),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn outcome_reports_of_older_workers_still_parse() {
        let old = br#"{"ticket":"t-1","delivery":2,"outcome":"passed","exitCode":0,"pod":"unit-abcde","revision":"r1","durationMs":1200}"#;
        let r = Report::parse(old).unwrap();
        assert_eq!(r.completed(), Some(Some("t-1")));
        assert_eq!(r.holds(), Some(None), "idle after an outcome");
        assert_eq!(r.revision, "r1");
        let q = Report::parse(br#"{"ticket":"t-2","outcome":"quarantined","pod":"p"}"#).unwrap();
        assert_eq!(
            q.completed(),
            Some(None),
            "a quarantined ticket did not run"
        );
        let a = Report::parse(br#"{"ticket":"t-3","outcome":"setAside","pod":"p"}"#).unwrap();
        assert_eq!(
            a.completed(),
            None,
            "a ticket set aside did not run, and says nothing of the environment"
        );
        assert_eq!(a.holds(), Some(None), "idle after setting it aside");
        assert_eq!(Report::parse(b"not json"), None);
        assert_eq!(
            (r.pool.as_str(), r.pool_uid.as_str()),
            ("", ""),
            "no pool named"
        );
    }

    #[test]
    fn reports_name_their_pool_and_older_readers_ignore_it() {
        let r = Report::state("unit-a", "r1", None).of_pool("unit", "5f1c");
        let text = String::from_utf8(r.to_vec()).unwrap();
        assert!(
            text.contains(r#""pool":"unit""#) && text.contains(r#""poolUid":"5f1c""#),
            "{text}"
        );
        assert_eq!(Report::parse(text.as_bytes()), Some(r));
        // A report without a pool says nothing of it on the wire, as before.
        let bare = String::from_utf8(Report::state("unit-a", "r1", None).to_vec()).unwrap();
        assert!(!bare.contains("pool"), "{bare}");
    }

    #[test]
    fn state_reports_say_what_the_worker_holds() {
        let busy = Report::state("unit-a", "r1", Some(("t-9", 3)));
        let parsed = Report::parse(&busy.to_vec()).unwrap();
        assert_eq!(parsed, busy);
        assert_eq!(parsed.holds(), Some(Some("t-9")));
        assert_eq!(parsed.completed(), None);
        let idle = Report::parse(&Report::state("unit-a", "r1", None).to_vec()).unwrap();
        assert_eq!(idle.holds(), Some(None));
        let text = String::from_utf8(busy.to_vec()).unwrap();
        assert!(text.contains(r#""state":"busy""#), "{text}");
        assert!(!text.contains("waitedMs"), "{text}");
    }

    #[test]
    fn a_busy_report_can_say_how_long_the_ticket_waited() {
        let busy = Report::state("unit-a", "r1", Some(("t-9", 1))).with_wait(Some(1500));
        let text = String::from_utf8(busy.to_vec()).unwrap();
        assert!(text.contains(r#""waitedMs":1500"#), "{text}");
        assert_eq!(
            Report::parse(text.as_bytes()).unwrap().waited_ms,
            Some(1500)
        );
        let old = br#"{"pod":"unit-a","revision":"r1","state":"busy","ticket":"t-9","delivery":1}"#;
        assert_eq!(Report::parse(old).unwrap().waited_ms, None);
    }

    proptest! {
        #[test]
        fn every_report_round_trips(
            pod in "[a-z0-9-]{0,20}",
            revision in "[0-9a-f]{0,10}",
            ticket in proptest::option::of(("\\PC{0,40}", 1u64..1000)),
        ) {
            let r = Report::state(&pod, &revision, ticket.as_ref().map(|(t, d)| (t.as_str(), *d)));
            prop_assert_eq!(Report::parse(&r.to_vec()), Some(r));
        }
    }
}
