use proptest::prelude::*;

use super::*;
use crate::core::crash::{CrashRecord, InHand};

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn crash(
    id: &str,
    rev: &str,
    ticket: Option<&str>,
    exit: i32,
    reason: &str,
    at: i64,
) -> CrashStatus {
    crash_status(&CrashRecord {
        id: id.into(),
        pod: format!("pod-{id}"),
        revision: rev.into(),
        image: format!("runner:{rev}"),
        in_hand: match ticket {
            Some(t) => InHand::Ticket {
                id: t.into(),
                delivery: 1,
            },
            None => InHand::Starting,
        },
        exit_code: exit,
        signal: None,
        reason: reason.into(),
        at: t(at),
    })
}

fn completions(pairs: &[(&str, i64)]) -> Completions {
    Completions {
        tickets_by_revision: Default::default(),
        last_by_revision: pairs
            .iter()
            .map(|(r, at)| (r.to_string(), t(*at)))
            .collect(),
    }
}

struct Case<'a> {
    crashes: Vec<CrashStatus>,
    revision: &'a str,
    completions: Completions,
    ready: Option<u64>,
    previous_ready: Option<i64>,
    previous: Option<DiagnosisStatus>,
    reached_at: Option<i64>,
    back_at: Option<i64>,
    now: i64,
}

impl Case<'_> {
    fn new(crashes: Vec<CrashStatus>) -> Self {
        Case {
            crashes,
            revision: "a",
            completions: Completions::default(),
            ready: Some(1),
            previous_ready: Some(1),
            previous: None,
            reached_at: Some(100),
            back_at: None,
            now: 100,
        }
    }
    fn run(&self) -> DiagnosisStatus {
        diagnose(&DiagnosisInput {
            crashes: &self.crashes,
            revision: self.revision,
            completions: &self.completions,
            crashes_to_quarantine: 3,
            quarantined: &[],
            forgiven: &[],
            stall_timeout: Duration::from_secs(600),
            queue_ready: self.ready,
            previous_ready: self.previous_ready,
            previous: self.previous.as_ref(),
            paused: false,
            broker_reached_at: self.reached_at.map(t),
            broker_back_at: self.back_at.map(t),
            now: t(self.now),
        })
    }
}

#[test]
fn one_ticket_crashing_while_others_complete_is_poison() {
    let mut case = Case::new(vec![
        crash("1", "a", Some("t-9"), 2, "Error", 10),
        crash("2", "a", Some("t-9"), 2, "Error", 20),
        crash("3", "a", Some("t-9"), 139, "Error", 30),
    ]);
    case.completions = completions(&[("a", 25)]);
    let d = case.run();
    assert_eq!(d.verdict, Verdict::PoisonTicket);
    assert_eq!(d.ticket.as_deref(), Some("t-9"));
    assert!(d.message.contains("crashed 3 workers"), "{}", d.message);
    assert!(d.message.contains("exit 139"), "{}", d.message);
}

#[test]
fn below_the_threshold_a_crashing_ticket_is_not_yet_poison() {
    let mut case = Case::new(vec![
        crash("1", "a", Some("t-9"), 2, "Error", 10),
        crash("2", "a", Some("t-9"), 2, "Error", 20),
    ]);
    case.completions = completions(&[("a", 25)]);
    assert_eq!(case.run().verdict, Verdict::Healthy);
}

#[test]
fn crashes_on_different_tickets_with_nothing_completed_are_a_broken_environment() {
    let d = Case::new(vec![
        crash("1", "b", Some("t-1"), 1, "Error", 10),
        crash("2", "b", Some("t-2"), 1, "Error", 20),
    ])
    .run_on("b");
    assert_eq!(d.verdict, Verdict::BrokenEnvironment);
    assert!(d.message.contains("2 different tickets"), "{}", d.message);
    assert!(d.message.contains("none is quarantined"), "{}", d.message);
    assert_eq!(d.ticket, None);
}

#[test]
fn workers_that_cannot_reach_a_broker_the_operator_cannot_reach_either_are_excused() {
    let unavailable = || {
        vec![
            crash("1", "a", None, 69, "Error", 50),
            crash("2", "a", None, 69, "Error", 60),
        ]
    };
    // The operator reached the broker after the workers failed to: their environment.
    let mut case = Case::new(unavailable());
    assert_eq!(case.run().verdict, Verdict::BrokenEnvironment);
    // The operator has not reached it since (down for everyone, or not probed yet);
    // a crash recorded in whole seconds may have come up to a second later.
    case.reached_at = Some(51);
    assert_eq!(case.run().verdict, Verdict::Healthy);
    case.reached_at = Some(40);
    assert_eq!(case.run().verdict, Verdict::Healthy);
    case.reached_at = None;
    assert_eq!(case.run().verdict, Verdict::Healthy);
    // It came back at t=70, after the crashes: an outage, not the image.
    case.reached_at = Some(100);
    case.back_at = Some(70);
    assert_eq!(case.run().verdict, Verdict::Healthy);
    // Workers failing after the broker came back are the environment's again.
    case.back_at = Some(55);
    assert_eq!(case.run().verdict, Verdict::BrokenEnvironment);
    // Other exits during an outage still count.
    let mut other = Case::new(vec![crash("1", "a", None, 1, "Error", 50)]);
    other.reached_at = Some(40);
    assert_eq!(other.run().verdict, Verdict::BrokenEnvironment);
}

#[test]
fn a_crash_before_the_consume_loop_is_a_broken_environment() {
    let d = Case::new(vec![crash("1", "a", None, 1, "Error", 10)]).run();
    assert_eq!(d.verdict, Verdict::BrokenEnvironment);
    assert!(d.message.contains("no ticket in hand"), "{}", d.message);
}

#[test]
fn a_ticket_without_evidence_against_it_is_held_not_blamed() {
    // The seed's story: a broken upgrade and one ticket; nothing else completes.
    let d = Case::new(vec![
        crash("1", "a", Some("t-1"), 1, "Error", 10),
        crash("2", "a", Some("t-1"), 1, "Error", 20),
        crash("3", "a", Some("t-1"), 1, "Error", 30),
    ])
    .run();
    assert_eq!(d.verdict, Verdict::BrokenEnvironment);
    assert!(d.message.contains("cannot be blamed"), "{}", d.message);
}

#[test]
fn out_of_memory_is_said_as_such_and_alongside_poison() {
    let d = Case::new(vec![crash("1", "a", Some("t-1"), 137, "OOMKilled", 10)]).run();
    assert_eq!(d.verdict, Verdict::OutOfMemory);
    assert!(
        d.message.contains("OOMKilled") && d.message.contains("t-1"),
        "{}",
        d.message
    );

    let mut poison = Case::new(vec![
        crash("1", "a", Some("t-9"), 137, "OOMKilled", 10),
        crash("2", "a", Some("t-9"), 137, "OOMKilled", 20),
        crash("3", "a", Some("t-9"), 137, "OOMKilled", 30),
    ]);
    poison.completions = completions(&[("a", 15)]);
    let d = poison.run();
    assert_eq!(d.verdict, Verdict::PoisonTicket);
    assert!(d.message.contains("OOMKilled"), "{}", d.message);
}

#[test]
fn a_ticket_crashing_old_and_new_revisions_is_poison_not_a_bad_rollout() {
    let mut case = Case::new(vec![
        crash("1", "a", Some("t-9"), 2, "Error", 10),
        crash("2", "b", Some("t-9"), 2, "Error", 20),
        crash("3", "a", Some("t-9"), 2, "Error", 30),
    ]);
    case.revision = "b";
    case.completions = completions(&[("a", 12)]);
    assert_eq!(case.run().verdict, Verdict::PoisonTicket);
}

#[test]
fn old_crashes_and_lost_connections_do_not_count() {
    let mut case = Case::new(vec![
        crash("1", "a", None, 1, "Error", 10),
        crash("2", "a", Some("t-1"), 75, "Error", 20),
    ]);
    case.now = 10 + 3601;
    case.previous_ready = Some(0);
    assert_eq!(case.run().verdict, Verdict::Healthy);
}

#[test]
fn an_environment_that_completes_tickets_again_has_recovered() {
    let mut case = Case::new(vec![
        crash("1", "a", Some("t-1"), 1, "Error", 10),
        crash("2", "a", Some("t-2"), 1, "Error", 20),
    ]);
    case.completions = completions(&[("a", 30)]);
    assert_eq!(case.run().verdict, Verdict::Healthy);
}

#[test]
fn a_ticket_that_crashed_while_the_environment_was_broken_is_not_poison_once_it_works() {
    // One worker crash-looping on the ticket at the head of the queue: held.
    let mut case = Case::new(vec![
        crash("1", "a", Some("t-1"), 3, "Error", 10),
        crash("2", "a", Some("t-1"), 3, "Error", 20),
        crash("3", "a", Some("t-1"), 3, "Error", 30),
        crash("4", "a", Some("t-1"), 3, "Error", 40),
    ]);
    case.now = 50;
    let held = case.run();
    assert_eq!(held.verdict, Verdict::BrokenEnvironment);
    assert_eq!(held.broken_until, None);
    // Fixed: another ticket completes. t-1 crashed four workers, but while nothing
    // worked: it is not blamed, now nor later.
    case.previous = Some(held);
    case.completions = completions(&[("a", 60)]);
    case.now = 61;
    let fixed = case.run();
    assert_eq!(fixed.verdict, Verdict::Healthy, "{}", fixed.message);
    assert_eq!(fixed.broken_until, Some(Time(t(60))));
    case.previous = Some(fixed);
    case.completions = completions(&[("a", 70)]);
    case.now = 71;
    let later = case.run();
    assert_eq!(later.verdict, Verdict::Healthy, "{}", later.message);
    assert_eq!(later.broken_until, Some(Time(t(60))), "remembered");
    // Crashes after it count again: three more and t-1 is poison.
    case.previous = Some(later);
    for (id, at) in [("5", 72), ("6", 74), ("7", 76)] {
        case.crashes
            .push(crash(id, "a", Some("t-1"), 3, "Error", at));
    }
    case.now = 80;
    let d = case.run();
    assert_eq!(d.verdict, Verdict::PoisonTicket);
    assert!(d.message.contains("crashed 3 workers"), "{}", d.message);
}

#[test]
fn a_queue_with_no_progress_for_the_timeout_is_stalled() {
    let mut case = Case::new(vec![]);
    case.ready = Some(4);
    case.previous_ready = Some(4);
    case.previous = Some(DiagnosisStatus {
        verdict: Verdict::Healthy,
        last_progress_time: Some(Time(t(0))),
        ..Default::default()
    });
    case.now = 599;
    assert_eq!(case.run().verdict, Verdict::Healthy);
    case.now = 600;
    let d = case.run();
    assert_eq!(d.verdict, Verdict::QueueStalled);
    assert!(
        d.message.starts_with("4 tickets are ready"),
        "{}",
        d.message
    );
    assert_eq!(d.last_progress_time, Some(Time(t(0))));

    // A ticket taken is progress.
    case.ready = Some(3);
    let d = case.run();
    assert_eq!(d.verdict, Verdict::Healthy);
    assert_eq!(d.last_progress_time, Some(Time(t(600))));
    // So is a completion.
    case.ready = Some(4);
    case.previous_ready = Some(4);
    case.completions = completions(&[("a", 300)]);
    assert_eq!(case.run().last_progress_time, Some(Time(t(600))));
}

#[test]
fn since_moves_only_when_the_verdict_changes() {
    let mut case = Case::new(vec![crash("1", "a", None, 1, "Error", 10)]);
    let first = case.run();
    assert_eq!(first.since, Some(Time(t(100))));
    case.previous = Some(first);
    case.now = 200;
    assert_eq!(case.run().since, Some(Time(t(100))));
}

impl Case<'_> {
    fn run_on(mut self, rev: &'static str) -> DiagnosisStatus {
        self.revision = rev;
        self.run()
    }
}

fn record(id: &str, at: i64) -> CrashRecord {
    CrashRecord {
        id: id.into(),
        pod: "p".into(),
        revision: "a".into(),
        image: "i".into(),
        in_hand: InHand::Ticket {
            id: format!("t-{id}"),
            delivery: 1,
        },
        exit_code: 1,
        signal: None,
        reason: "Error".into(),
        at: t(at),
    }
}

#[test]
fn merging_records_each_crash_once_newest_last_bounded() {
    let seen = vec![record("b", 2), record("a", 1)];
    let (history, fresh) = merge_crashes(&[], &seen);
    assert_eq!(
        fresh.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    let (again, fresh) = merge_crashes(&history, &seen);
    assert_eq!(again, history);
    assert!(fresh.is_empty());

    let many: Vec<CrashRecord> = (0..30)
        .map(|i| record(&format!("{i:02}"), 10 + i))
        .collect();
    let (full, _) = merge_crashes(&history, &many);
    assert_eq!(full.len(), MAX_CRASHES);
    assert_eq!(full.last().unwrap().id, "29");
    // A termination older than everything kept was recorded and dropped already.
    let (same, fresh) = merge_crashes(&full, &[record("a", 1), record("05", 15)]);
    assert!(fresh.is_empty());
    assert_eq!(same, full);
}

proptest! {
    #[test]
    fn a_crash_is_never_counted_twice(
        ats in proptest::collection::vec(0i64..1000, 0..60),
        split in 0usize..60,
    ) {
        let records: Vec<CrashRecord> = ats.iter().enumerate().map(|(i, at)| record(&format!("c{i}"), *at)).collect();
        let split = split.min(records.len());
        // Seen in two rounds, then everything again (a re-list, an operator restart).
        let (h1, f1) = merge_crashes(&[], &records[..split]);
        let (h2, f2) = merge_crashes(&h1, &records[split..]);
        let (h3, f3) = merge_crashes(&h2, &records);
        prop_assert!(f3.is_empty());
        prop_assert_eq!(&h3, &h2);
        let mut ids: Vec<&str> = f1.iter().chain(f2.iter()).map(|c| c.id.as_str()).collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        prop_assert_eq!(ids.len(), n, "no crash reported new twice");
        prop_assert!(h3.len() <= MAX_CRASHES);
    }

    #[test]
    fn crashes_spread_over_distinct_tickets_never_blame_a_ticket(
        n in 1usize..20,
        completed in proptest::option::of(0i64..200),
    ) {
        let crashes: Vec<CrashStatus> = (0..n)
            .map(|i| crash(&format!("c{i}"), "a", Some(&format!("t-{i}")), 1, "Error", i as i64 * 5))
            .collect();
        let mut case = Case::new(crashes);
        if let Some(at) = completed {
            case.completions = completions(&[("a", at)]);
        }
        let d = case.run();
        prop_assert_ne!(d.verdict, Verdict::PoisonTicket);
        prop_assert_eq!(d.ticket, None);
    }
}
