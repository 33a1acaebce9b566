//! Which tickets are quarantined, which go back, and which pods must be replaced
//! because a quarantined ticket keeps them in CrashLoopBackOff. Pure.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::crash::CrashRecord;
use super::{EventAction, EventReason, PlannedEvent, PodState, PodView};
use crate::contract::QuarantineEntry;
use crate::crd::ReplayedTicket;
use crate::crd::{
    ANNOTATION_REPLAY_ALL, ANNOTATION_REPLAY_TICKET, CrashStatus, DiagnosisStatus,
    QuarantineStatus, QuarantinedTicket, Verdict,
};

/// Quarantined tickets kept in status (and on the workers' list).
pub const MAX_QUARANTINED: usize = 50;

/// A quarantined ticket's entry on the workers' quarantine list, with the evidence the
/// worker copies into the ticket's headers when it moves it.
pub fn list_entry(t: &QuarantinedTicket) -> QuarantineEntry {
    QuarantineEntry::new(
        &t.id,
        t.at.0.as_second(),
        t.crashes,
        &t.pods,
        &t.images,
        &t.last_exit,
    )
}

/// What the quarantine decision needs.
pub struct QuarantineInput<'a> {
    /// The previous quarantine status.
    pub old: &'a QuarantineStatus,
    /// This reconcile's diagnosis.
    pub diagnosis: &'a DiagnosisStatus,
    /// Crash history (merged).
    pub crashes: &'a [CrashStatus],
    /// The pool's annotations.
    pub annotations: &'a BTreeMap<String, String>,
    /// `spec.image`.
    pub image: &'a str,
    /// `poison.replayOnImageChange`.
    pub replay_on_image_change: bool,
    /// Last ticket completion on the current revision.
    pub completed_on_revision: Option<Timestamp>,
    /// The quarantine queue's name, for messages.
    pub queue: &'a str,
    /// Now.
    pub now: Timestamp,
}

/// The quarantine decision.
#[derive(Clone, Debug, PartialEq)]
pub struct QuarantineDecision {
    /// The new quarantine status.
    pub status: QuarantineStatus,
    /// Ticket ids to move from the quarantine queue back to the work queue.
    pub replay: Vec<String>,
    /// Events.
    pub events: Vec<PlannedEvent>,
}

/// Decides the quarantine for one reconcile: a new poison ticket joins the list, then
/// the tickets asked for (annotations) or cleared (a new image) go back.
pub fn decide(input: &QuarantineInput<'_>) -> QuarantineDecision {
    let mut status = input.old.clone();
    let mut events: Vec<PlannedEvent> = admit(input, &mut status).into_iter().collect();
    let (replay, why) = replays(input, &mut status);
    if !replay.is_empty() {
        events.push(give_back(input, &mut status, &replay, &why));
    }
    let excess = status.tickets.len().saturating_sub(MAX_QUARANTINED);
    status.tickets.drain(..excess);
    status.count = status.tickets.len() as i32;
    QuarantineDecision {
        status,
        replay,
        events,
    }
}

/// A new poison ticket joins the list, with the evidence against it.
fn admit(input: &QuarantineInput<'_>, status: &mut QuarantineStatus) -> Option<PlannedEvent> {
    let id = input.diagnosis.ticket.as_deref()?;
    if input.diagnosis.verdict != Verdict::PoisonTicket || status.tickets.iter().any(|t| t.id == id)
    {
        return None;
    }
    let its: Vec<&CrashStatus> = input
        .crashes
        .iter()
        .filter(|c| c.ticket.as_deref() == Some(id))
        .collect();
    let distinct = |field: fn(&CrashStatus) -> &String| {
        let mut values: Vec<String> = its.iter().map(|c| field(c).clone()).collect();
        values.sort();
        values.dedup();
        values
    };
    status.tickets.push(QuarantinedTicket {
        id: id.to_string(),
        crashes: its.len() as i32,
        images: distinct(|c| &c.image),
        pods: distinct(|c| &c.pod),
        last_exit: its
            .last()
            .map(|c| super::crash::ending(c, "exit code"))
            .unwrap_or_default(),
        at: Time(input.now),
    });
    Some(PlannedEvent::warning(
        EventReason::PoisonTicketQuarantined,
        EventAction::Quarantine,
        format!(
            "Ticket {id} crashed {} workers while other tickets completed: quarantined; workers move it to queue {} when they next receive it, and its crash-looping workers are replaced",
            its.len(),
            input.queue
        ),
    ))
}

/// The tickets to return, and why: annotations (each value acted on once), and a new
/// image that has completed a ticket gets another go at the tickets that crashed only
/// the old ones.
fn replays(
    input: &QuarantineInput<'_>,
    status: &mut QuarantineStatus,
) -> (Vec<String>, Vec<String>) {
    let mut replay: Vec<String> = Vec::new();
    let mut why = Vec::new();
    if let Some(token) = input.annotations.get(ANNOTATION_REPLAY_ALL)
        && status.replay_token.as_deref() != Some(token.as_str())
    {
        replay.extend(status.tickets.iter().map(|t| t.id.clone()));
        status.replay_token = Some(token.clone());
        why.push(format!("annotation {ANNOTATION_REPLAY_ALL}={token}"));
    }
    if let Some(id) = input.annotations.get(ANNOTATION_REPLAY_TICKET)
        && status.replay_ticket_token.as_deref() != Some(id.as_str())
    {
        if !replay.contains(id) {
            replay.push(id.clone());
        }
        status.replay_ticket_token = Some(id.clone());
        why.push(format!("annotation {ANNOTATION_REPLAY_TICKET}={id}"));
    }
    if input.replay_on_image_change && input.diagnosis.verdict == Verdict::Healthy {
        let fresh: Vec<String> = status
            .tickets
            .iter()
            .filter(|t| !t.images.iter().any(|i| i == input.image))
            .filter(|t| input.completed_on_revision.is_some_and(|c| c > t.at.0))
            .map(|t| t.id.clone())
            .filter(|id| !replay.contains(id))
            .collect();
        if !fresh.is_empty() {
            why.push(format!("image {} completes tickets", input.image));
            replay.extend(fresh);
        }
    }
    (replay, why)
}

/// Takes the replayed tickets off the list; their crashes so far are forgiven.
fn give_back(
    input: &QuarantineInput<'_>,
    status: &mut QuarantineStatus,
    replay: &[String],
    why: &[String],
) -> PlannedEvent {
    status.tickets.retain(|t| !replay.contains(&t.id));
    status.replayed.retain(|r| !replay.contains(&r.id));
    status
        .replayed
        .extend(replay.iter().map(|id| ReplayedTicket {
            id: id.clone(),
            at: Time(input.now),
        }));
    let excess = status.replayed.len().saturating_sub(MAX_QUARANTINED);
    status.replayed.drain(..excess);
    PlannedEvent::normal(
        EventReason::TicketsReplayed,
        EventAction::Replay,
        format!(
            "Returning {} ticket(s) from queue {} to the work queue ({}): {}",
            replay.len(),
            input.queue,
            why.join(", "),
            replay.join(", ")
        ),
    )
}

/// Pods kept in CrashLoopBackOff by a quarantined ticket: not ready, and their last
/// crash was on a listed ticket. Replacing them restores capacity at once instead of
/// waiting out the backoff, and the new pods read the current list.
pub fn stuck_pods(pods: &[PodView], crashes: &[CrashRecord], listed: &[String]) -> Vec<String> {
    let mut last: BTreeMap<&str, &CrashRecord> = BTreeMap::new();
    for c in crashes {
        let e = last.entry(c.pod.as_str()).or_insert(c);
        if c.at > e.at {
            *e = c;
        }
    }
    pods.iter()
        .filter(|p| matches!(p.state, PodState::Starting | PodState::Pending))
        .filter(|p| {
            last.get(p.name.as_str())
                .and_then(|c| c.ticket())
                .is_some_and(|t| listed.iter().any(|l| l == t))
        })
        .map(|p| p.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::crash::InHand;

    use crate::contract::quarantine_example;
    use crate::core::fixtures::t;

    fn crash(ticket: &str, image: &str, at: i64) -> CrashStatus {
        crate::core::fixtures::ticket_crash("p", ticket, image, at)
    }

    #[test]
    fn list_entries_carry_the_evidence_into_headers() {
        let t = QuarantinedTicket {
            id: "t-9".into(),
            crashes: 3,
            images: vec!["runner:1".into(), "runner:2".into()],
            pods: vec!["unit-a".into()],
            last_exit: "exit code 139 (signal 11)".into(),
            at: Time(Timestamp::from_second(1000).unwrap()),
        };
        let line = list_entry(&t).render();
        assert_eq!(line, quarantine_example::LINE);
        let read = QuarantineEntry::parse(&line).unwrap();
        assert_eq!(read.evidence_headers(), quarantine_example::headers());
        assert!(read.diverts(Some(999)));
    }

    fn poison(id: &str) -> DiagnosisStatus {
        DiagnosisStatus {
            verdict: Verdict::PoisonTicket,
            ticket: Some(id.into()),
            ..Default::default()
        }
    }

    fn healthy() -> DiagnosisStatus {
        DiagnosisStatus {
            verdict: Verdict::Healthy,
            ..Default::default()
        }
    }

    struct Case {
        old: QuarantineStatus,
        diagnosis: DiagnosisStatus,
        crashes: Vec<CrashStatus>,
        annotations: BTreeMap<String, String>,
        image: String,
        completed: Option<i64>,
    }

    impl Case {
        fn run(&self) -> QuarantineDecision {
            decide(&QuarantineInput {
                old: &self.old,
                diagnosis: &self.diagnosis,
                crashes: &self.crashes,
                annotations: &self.annotations,
                image: &self.image,
                replay_on_image_change: true,
                completed_on_revision: self.completed.map(t),
                queue: "tickets.quarantine",
                now: t(100),
            })
        }
    }

    fn case() -> Case {
        Case {
            old: QuarantineStatus::default(),
            diagnosis: healthy(),
            crashes: vec![],
            annotations: BTreeMap::new(),
            image: "runner:1".into(),
            completed: None,
        }
    }

    #[test]
    fn a_poison_verdict_quarantines_the_ticket_once_with_its_evidence() {
        let mut c = case();
        c.diagnosis = poison("t-9");
        c.crashes = vec![
            crash("t-9", "runner:1", 1),
            crash("t-1", "runner:1", 2),
            crash("t-9", "runner:1", 3),
        ];
        let d = c.run();
        assert_eq!(d.status.count, 1);
        let q = &d.status.tickets[0];
        assert_eq!(
            (q.id.as_str(), q.crashes, q.last_exit.as_str()),
            ("t-9", 2, "exit code 3")
        );
        assert_eq!(q.images, ["runner:1"]);
        assert_eq!(d.events[0].reason, "PoisonTicketQuarantined");
        assert!(d.replay.is_empty());
        // The same verdict again changes nothing.
        c.old = d.status.clone();
        let again = c.run();
        assert_eq!(again.status, d.status);
        assert!(again.events.is_empty());
    }

    fn quarantined(id: &str, image: &str, at: i64) -> QuarantinedTicket {
        QuarantinedTicket {
            id: id.into(),
            crashes: 3,
            images: vec![image.into()],
            pods: vec!["p".into()],
            last_exit: "exit code 3".into(),
            at: Time(t(at)),
        }
    }

    #[test]
    fn annotations_replay_all_or_one_ticket_once_per_value() {
        let mut c = case();
        c.old.tickets = vec![
            quarantined("a", "runner:1", 1),
            quarantined("b", "runner:1", 2),
        ];
        c.old.count = 2;
        c.annotations
            .insert(ANNOTATION_REPLAY_TICKET.into(), "b".into());
        let one = c.run();
        assert_eq!(one.replay, ["b"]);
        assert_eq!(one.status.tickets.len(), 1);
        assert_eq!(one.status.replay_ticket_token.as_deref(), Some("b"));
        assert_eq!(one.events[0].reason, "TicketsReplayed");

        c.old = one.status;
        assert!(c.run().replay.is_empty(), "a value is acted on once");
        c.annotations
            .insert(ANNOTATION_REPLAY_ALL.into(), "2026-11-28".into());
        let all = c.run();
        assert_eq!(all.replay, ["a"]);
        assert_eq!(all.status.count, 0);
        c.old = all.status;
        assert!(c.run().replay.is_empty());
    }

    #[test]
    fn a_new_image_that_completes_tickets_gets_the_quarantined_ones_back() {
        let mut c = case();
        c.old.tickets = vec![quarantined("a", "runner:1", 10)];
        c.image = "runner:2".into();
        assert!(
            c.run().replay.is_empty(),
            "not before the new image completed a ticket"
        );
        c.completed = Some(5);
        assert!(
            c.run().replay.is_empty(),
            "a completion from before the quarantine does not count"
        );
        c.completed = Some(20);
        assert_eq!(c.run().replay, ["a"]);
        c.image = "runner:1".into();
        assert!(
            c.run().replay.is_empty(),
            "the image it crashed does not get it back"
        );
    }

    #[test]
    fn pods_stuck_on_a_quarantined_ticket_are_replaced() {
        let rec = |pod: &str, ticket: Option<&str>, at: i64| CrashRecord {
            id: format!("{pod}{at}"),
            pod: pod.into(),
            revision: "r".into(),
            image: "i".into(),
            in_hand: match ticket {
                Some(t) => InHand::Ticket {
                    id: t.into(),
                    delivery: 1,
                },
                None => InHand::Starting,
            },
            exit_code: 3,
            signal: None,
            reason: "Error".into(),
            at: t(at),
        };
        let pod = |name: &str, state| PodView {
            name: name.into(),
            revision: "r".into(),
            state,
            created: t(0),
            activity: Default::default(),
        };
        let pods = vec![
            pod("looping", PodState::Starting),
            pod("recovered", PodState::Ready),
            pod("other", PodState::Starting),
            pod("moved-on", PodState::Starting),
        ];
        let crashes = vec![
            rec("looping", Some("t-9"), 5),
            rec("recovered", Some("t-9"), 5),
            rec("other", Some("t-1"), 5),
            rec("moved-on", Some("t-9"), 1),
            rec("moved-on", None, 6),
        ];
        assert_eq!(
            stuck_pods(&pods, &crashes, &["t-9".to_string()]),
            ["looping"]
        );
    }
}
