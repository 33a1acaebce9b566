//! Rollout tests through [`crate::core::plan`]: a small world applies each plan to its
//! pods, as the shell and the kubelet would, and carries the status forward.

use std::collections::BTreeMap;

use proptest::prelude::*;

use crate::core::crash::{CrashRecord, InHand};
use crate::core::diagnosis::Completions;
use crate::core::fixtures::{pool, t};
use crate::core::revisions::StoredRevision;
use crate::core::{BrokerView, Observed, Plan, PodState, PodView, plan, revision};
use crate::crd::{
    ANNOTATION_ABORT, ANNOTATION_PROMOTE, RolloutPhase, RolloutReason, TestRunnerPool, Verdict,
};

struct World {
    pool: TestRunnerPool,
    pods: Vec<PodView>,
    crashes: Vec<CrashRecord>,
    completions: Completions,
    ready: u64,
    unreachable: bool,
    now: i64,
    made: usize,
    last: Option<Plan>,
    revisions: Vec<StoredRevision>,
}

impl World {
    /// A pool serving `workers` ready pods of its first revision, `ready` tickets waiting.
    fn serving(workers: u64) -> World {
        let mut w = World {
            pool: pool(),
            pods: Vec::new(),
            crashes: Vec::new(),
            completions: Completions::default(),
            ready: workers,
            unreachable: false,
            now: 0,
            made: 0,
            last: None,
            revisions: Vec::new(),
        };
        w.step();
        w.settle();
        w.step();
        w
    }

    fn rollout(&self) -> crate::crd::RolloutStatus {
        self.pool.status.as_ref().unwrap().rollout.clone().unwrap()
    }

    fn plan(&self) -> &Plan {
        self.last.as_ref().unwrap()
    }

    fn set_image(&mut self, image: &str) -> String {
        self.pool.spec.workload.image = image.into();
        revision(&self.pool.spec)
    }

    fn annotate(&mut self, key: &str, value: &str) {
        self.pool
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
    }

    fn observed(&self) -> Observed {
        // Consumers are busy only while tickets are ready, and they are counted in the
        // depth already: the ready count alone drives the workers here.
        let consumers = 0;
        Observed {
            pods: self.pods.clone(),
            broker: if self.unreachable {
                BrokerView::Unreachable {
                    reason: "ConnectionFailed".into(),
                    message: "connection refused".into(),
                    since: t(self.now),
                }
            } else {
                BrokerView::Depth {
                    ready: self.ready,
                    consumers,
                    at: t(self.now),
                }
            },
            crashes: self.crashes.clone(),
            completions: self.completions.clone(),
            revisions: self.revisions.clone(),
            ..Default::default()
        }
    }

    /// One reconcile: plan, then apply it (new pods Pending, deleted ones gone).
    fn step(&mut self) -> &Plan {
        let p = plan(&self.pool, &self.observed(), t(self.now));
        for batch in &p.create {
            for _ in 0..batch.count {
                self.made += 1;
                self.pods.push(PodView {
                    name: format!("w{}", self.made),
                    revision: batch.revision.clone(),
                    state: PodState::Pending,
                    created: t(self.now),
                    activity: Default::default(),
                });
            }
        }
        self.pods.retain(|pod| !p.delete.contains(&pod.name));
        // The ControllerRevisions, as the shell keeps them.
        let r = &p.revisions;
        self.revisions.retain(|s| !r.delete.contains(&s.revision));
        for (revision, marks) in &r.remark {
            let stored = self.revisions.iter_mut().find(|s| &s.revision == revision);
            let stored = stored.expect("a remarked revision is stored");
            stored.stable = marks.stable;
            stored.rolled_back = marks.rolled_back.clone();
        }
        self.revisions
            .extend(r.create.iter().map(|n| StoredRevision {
                revision: n.revision.clone(),
                number: n.number,
                workload: n.workload.clone(),
                stable: n.marks.stable,
                rolled_back: n.marks.rolled_back.clone(),
            }));
        self.pool.status = Some(p.status.clone());
        self.last = Some(p);
        self.last.as_ref().unwrap()
    }

    fn settle(&mut self) {
        for p in &mut self.pods {
            if p.state != PodState::Terminating {
                p.state = PodState::Ready;
            }
        }
    }

    fn tick(&mut self, secs: i64) {
        self.now += secs;
    }

    fn pods_of(&self, revision: &str) -> usize {
        self.pods.iter().filter(|p| p.revision == revision).count()
    }

    fn first_of(&self, revision: &str) -> String {
        self.pods
            .iter()
            .find(|p| p.revision == revision)
            .map(|p| p.name.clone())
            .expect("a pod of that revision")
    }

    fn complete(&mut self, revision: &str, ticket: &str) {
        self.completions.record(revision, Some(ticket), t(self.now));
    }

    fn crash(&mut self, pod: &str, ticket: Option<&str>) {
        self.crash_with(pod, ticket, 1);
    }

    fn crash_with(&mut self, pod: &str, ticket: Option<&str>, exit_code: i32) {
        let revision = self
            .pods
            .iter()
            .find(|p| p.name == pod)
            .map(|p| p.revision.clone())
            .unwrap();
        let n = self.crashes.len();
        self.crashes.push(CrashRecord {
            id: format!("{pod}/{n}"),
            pod: pod.into(),
            revision,
            image: "img".into(),
            in_hand: match ticket {
                Some(id) => InHand::Ticket {
                    id: id.into(),
                    delivery: 1,
                },
                None => InHand::Starting,
            },
            exit_code,
            signal: None,
            reason: "Error".into(),
            at: t(self.now),
        });
        for p in &mut self.pods {
            if p.name == pod {
                p.state = PodState::Starting;
            }
        }
    }

    fn events(&self) -> Vec<&'static str> {
        self.plan()
            .events
            .iter()
            .map(|e| e.reason.as_str())
            .collect()
    }

    fn condition(&self, type_: &str) -> (String, String) {
        let c = self
            .plan()
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap();
        (c.status.clone(), c.reason.clone())
    }

    /// Starts a rollout to `image` and runs its canary pod.
    fn start_rollout(&mut self, image: &str) -> String {
        let new = self.set_image(image);
        self.tick(1);
        self.step();
        self.settle();
        self.tick(1);
        self.step();
        new
    }
}

#[test]
fn a_new_pool_serves_its_first_revision_directly() {
    let mut w = World::serving(3);
    let r = w.rollout();
    assert_eq!(r.phase, RolloutPhase::Promoted);
    assert_eq!(r.reason, Some(RolloutReason::FirstRevision));
    assert_eq!(r.stable_revision, revision(&w.pool.spec));
    assert_eq!(r.history.len(), 1);
    assert_eq!(w.pods.len(), 3);
    assert_eq!(
        w.condition("RolloutComplete"),
        ("True".into(), "FirstRevision".into())
    );
    // Nothing changes while nothing does.
    w.tick(5);
    assert_eq!(w.step().created(), 0);
}

#[test]
fn a_new_image_runs_one_canary_next_to_the_stable_pods() {
    let mut w = World::serving(3);
    let old = revision(&w.pool.spec);
    let new = w.set_image("registry.example/test-runner:2");
    w.tick(1);
    let p = w.step().clone();
    assert_eq!(p.create.len(), 1, "{:?}", p.create);
    assert!(p.create[0].canary);
    assert_eq!(p.create[0].revision, new);
    assert_eq!(p.create[0].workload.image, "registry.example/test-runner:2");
    assert!(p.delete.is_empty(), "the stable pods stay");
    assert!(w.events().contains(&"RolloutStarted"), "{:?}", w.events());
    let r = w.rollout();
    assert_eq!(r.phase, RolloutPhase::Progressing);
    assert_eq!(r.stable_revision, old);
    assert_eq!(r.target_revision, new);
    assert_eq!(
        w.condition("RolloutComplete"),
        ("False".into(), "CanaryRunning".into())
    );
    // A stable pod lost meanwhile comes back as the stable revision, from its snapshot.
    let gone = w.first_of(&old);
    w.pods.retain(|p| p.name != gone);
    w.settle();
    w.tick(1);
    let p = w.step().clone();
    assert_eq!(p.create.len(), 1);
    assert!(!p.create[0].canary);
    assert_eq!(p.create[0].revision, old);
    assert_eq!(p.create[0].workload.image, "registry.example/test-runner:1");
    assert_eq!((w.pods_of(&old), w.pods_of(&new)), (3, 1));
}

#[test]
fn canaries_that_complete_their_tickets_are_promoted_and_replace_the_old_pods() {
    let mut w = World::serving(3);
    let old = revision(&w.pool.spec);
    let new = w.start_rollout("registry.example/test-runner:2");
    w.complete(&new, "t-1");
    w.complete(&new, "t-2");
    w.complete(&old, "t-3");
    w.tick(1);
    w.step();
    assert_eq!(w.rollout().phase, RolloutPhase::Progressing);
    assert_eq!(w.rollout().canary_tickets_ok, 2);
    // The same ticket twice counts once.
    w.complete(&new, "t-2");
    w.tick(1);
    w.step();
    assert_eq!(w.rollout().phase, RolloutPhase::Progressing);
    w.complete(&new, "t-4");
    w.tick(1);
    w.step();
    let r = w.rollout();
    assert_eq!(r.phase, RolloutPhase::Promoted, "{}", r.message);
    assert_eq!(r.reason, Some(RolloutReason::CanaryPassed));
    assert_eq!(r.stable_revision, new);
    assert_eq!(r.stable_image, "registry.example/test-runner:2");
    assert!(w.events().contains(&"RolloutPromoted"));
    // Then the old pods are replaced, never more than one extra pod at a time, and
    // never fewer ready pods than the queue needs.
    for _ in 0..20 {
        w.settle();
        w.tick(1);
        w.step();
        assert!(w.pods.len() <= 4, "{:?}", w.pods);
        let ready = w.pods.iter().filter(|p| p.state == PodState::Ready).count();
        assert!(ready >= 3, "{:?}", w.pods);
        assert!(
            !w.events().contains(&"ScaledUp"),
            "a replacement is no scale-up"
        );
    }
    assert_eq!((w.pods_of(&old), w.pods_of(&new)), (0, 3));
    assert_eq!(
        w.condition("RolloutComplete"),
        ("True".into(), "CanaryPassed".into())
    );
}

#[test]
fn a_canary_crashing_before_its_consume_loop_is_rolled_back_and_nothing_is_quarantined() {
    let mut w = World::serving(3);
    let old = revision(&w.pool.spec);
    let new = w.start_rollout("registry.example/test-runner:broken");
    let canary = w.first_of(&new);
    w.crash(&canary, None);
    w.tick(1);
    let p = w.step().clone();
    let r = w.rollout();
    assert_eq!(r.phase, RolloutPhase::RolledBack);
    assert_eq!(r.reason, Some(RolloutReason::CanaryCrashedBeforeConsuming));
    assert_eq!(r.stable_revision, old);
    assert!(p.delete.contains(&canary), "{:?}", p.delete);
    assert!(p.replay_dead_lettered, "dead-lettered tickets come back");
    assert!(p.quarantine_list.is_empty());
    let ev = p
        .events
        .iter()
        .find(|e| e.reason == "RolloutFailed")
        .unwrap();
    assert!(ev.warning);
    assert!(ev.note.contains("none is quarantined"), "{}", ev.note);
    // The canary's crash is the rollout's business, not a broken environment.
    assert_eq!(
        p.status.diagnosis.as_ref().unwrap().verdict,
        Verdict::Healthy
    );
    assert_eq!(
        w.condition("Degraded"),
        ("True".into(), "RolloutFailed".into())
    );
    assert_eq!(
        w.condition("RolloutComplete"),
        ("False".into(), "RolledBack".into())
    );
    // It stays rolled back: no new canary for the failed revision.
    for _ in 0..5 {
        w.settle();
        w.tick(30);
        let p = w.step().clone();
        assert!(p.create.iter().all(|b| b.revision == old), "{:?}", p.create);
        assert!(!p.events.iter().any(|e| e.reason == "RolloutFailed"));
    }
    assert_eq!((w.pods_of(&old), w.pods_of(&new)), (3, 0));
    assert_eq!(w.rollout().history.last().unwrap().result, "RolledBack");
}

#[test]
fn canaries_crashing_on_two_tickets_are_rolled_back_but_a_ticket_crashing_stable_workers_is_poison()
{
    let mut w = World::serving(3);
    let old = revision(&w.pool.spec);
    let new = w.start_rollout("registry.example/test-runner:2");
    let canary = w.first_of(&new);
    let stable: Vec<String> = w
        .pods
        .iter()
        .filter(|p| p.revision == old)
        .map(|p| p.name.clone())
        .collect();
    // A poison ticket crashes the canary and stable workers alike, while others complete.
    w.crash(&canary, Some("poison"));
    w.crash(&stable[0], Some("poison"));
    w.crash(&stable[1], Some("poison"));
    w.complete(&old, "fine-1");
    w.settle();
    w.tick(1);
    let p = w.step().clone();
    assert_eq!(
        w.rollout().phase,
        RolloutPhase::Progressing,
        "{}",
        w.rollout().message
    );
    let d = p.status.diagnosis.as_ref().unwrap();
    assert_eq!(d.verdict, Verdict::PoisonTicket, "{}", d.message);
    assert_eq!(d.ticket.as_deref(), Some("poison"));
    assert_eq!(p.quarantine_list.len(), 1);
    // One canary-only crash is not yet a verdict; a second ticket is.
    w.crash(&canary, Some("t-1"));
    w.settle();
    w.tick(1);
    w.step();
    assert_eq!(w.rollout().phase, RolloutPhase::Progressing);
    w.crash(&canary, Some("t-2"));
    w.tick(1);
    let p = w.step().clone();
    let r = w.rollout();
    assert_eq!(r.phase, RolloutPhase::RolledBack);
    assert_eq!(r.reason, Some(RolloutReason::CanaryCrashedOnTickets));
    assert!(r.message.contains("t-1, t-2"), "{}", r.message);
    // t-1 and t-2 are not quarantined: they go back to the queue.
    let listed: Vec<&str> = p.quarantine_list.iter().map(|q| q.id.as_str()).collect();
    assert_eq!(listed, ["poison"]);
}

#[test]
fn a_canary_not_promoted_by_the_deadline_fails_unless_auto_rollback_is_off() {
    for auto in [true, false] {
        let mut w = World::serving(3);
        w.pool.spec.rollout.auto_rollback = auto;
        let new = w.start_rollout("registry.example/test-runner:2");
        w.complete(&new, "t-1");
        w.tick(599);
        w.step();
        assert_eq!(w.rollout().phase, RolloutPhase::Progressing);
        assert!(
            w.plan().requeue_after <= std::time::Duration::from_secs(1),
            "it wakes up for the deadline: {:?}",
            w.plan().requeue_after
        );
        w.tick(1);
        let p = w.step().clone();
        let r = w.rollout();
        assert_eq!(r.reason, Some(RolloutReason::ProgressDeadlineExceeded));
        assert!(super::failed(&r));
        assert!(p.events.iter().any(|e| e.reason == "RolloutFailed"));
        if auto {
            assert_eq!(r.phase, RolloutPhase::RolledBack);
        } else {
            assert_eq!(r.phase, RolloutPhase::Progressing);
            assert!(r.message.contains(ANNOTATION_ABORT), "{}", r.message);
            assert_eq!(w.pods_of(&new), 1, "the canary stays");
            // The event is not repeated.
            w.tick(1);
            assert!(!w.step().events.iter().any(|e| e.reason == "RolloutFailed"));
            // The user decides.
            w.annotate(ANNOTATION_ABORT, "1");
            w.tick(1);
            w.step();
            assert_eq!(w.rollout().phase, RolloutPhase::RolledBack);
        }
    }
}

#[test]
fn a_newer_image_supersedes_the_rollout_and_the_old_image_back_reverts_it() {
    let mut w = World::serving(2);
    let old = revision(&w.pool.spec);
    let second = w.start_rollout("registry.example/test-runner:2");
    let third = w.set_image("registry.example/test-runner:3");
    w.tick(1);
    let p = w.step().clone();
    let r = w.rollout();
    assert_eq!(r.phase, RolloutPhase::Progressing);
    assert_eq!(r.target_revision, third);
    assert_eq!(r.stable_revision, old);
    let h = r.history.last().unwrap();
    assert_eq!(
        (h.revision.as_str(), h.result.as_str()),
        (second.as_str(), "Superseded")
    );
    assert!(p.events.iter().any(|e| e.reason == "RolloutSuperseded"));
    assert_eq!(
        w.pods_of(&second),
        0,
        "the superseded canary goes: {:?}",
        p.delete
    );
    assert!(p.create.iter().any(|b| b.canary && b.revision == third));
    // The old image back: no canary, the stable revision simply serves.
    w.settle();
    w.tick(1);
    w.step();
    w.set_image("registry.example/test-runner:1");
    w.tick(1);
    let p = w.step().clone();
    let r = w.rollout();
    assert_eq!(r.phase, RolloutPhase::Promoted);
    assert_eq!(r.reason, Some(RolloutReason::Reverted));
    assert_eq!(w.pods_of(&third), 0, "the canary goes: {:?}", p.delete);
    assert!(!super::failed(&r));
}

#[test]
fn after_a_rollback_a_new_image_rolls_out_from_the_stable_revision() {
    let mut w = World::serving(2);
    let old = revision(&w.pool.spec);
    let bad = w.start_rollout("registry.example/test-runner:bad");
    let canary = w.first_of(&bad);
    w.crash(&canary, None);
    w.tick(1);
    w.step();
    assert_eq!(w.rollout().phase, RolloutPhase::RolledBack);
    let fixed = w.start_rollout("registry.example/test-runner:fixed");
    let r = w.rollout();
    assert_eq!(r.phase, RolloutPhase::Progressing);
    assert_eq!(r.stable_revision, old);
    assert_eq!(w.pods_of(&fixed), 1);
    assert!(!super::failed(&r), "the failure is over");
    assert_eq!(w.condition("Degraded").0, "False");
    for t in ["a", "b", "c"] {
        w.complete(&fixed, t);
    }
    w.tick(1);
    w.step();
    assert_eq!(w.rollout().phase, RolloutPhase::Promoted);
    assert_eq!(w.rollout().stable_revision, fixed);
    let results: Vec<&str> = w
        .rollout()
        .history
        .iter()
        .map(|h| h.result.as_str())
        .collect::<Vec<_>>()
        .into_iter()
        .map(|s| match s {
            "Promoted" => "P",
            "RolledBack" => "R",
            _ => "?",
        })
        .collect();
    assert_eq!(results, ["P", "R", "P"]);
}

#[test]
fn annotations_promote_and_abort_once_per_value() {
    let mut w = World::serving(2);
    let old = revision(&w.pool.spec);
    let new = w.start_rollout("registry.example/test-runner:2");
    w.annotate(ANNOTATION_ABORT, "2026-11-28T10:00:00Z");
    w.tick(1);
    let p = w.step().clone();
    let r = w.rollout();
    assert_eq!(r.phase, RolloutPhase::RolledBack);
    assert_eq!(r.reason, Some(RolloutReason::AbortedByAnnotation));
    assert!(p.events.iter().any(|e| e.reason == "RolloutAborted"));
    assert!(!super::failed(&r), "an abort is no failure to alert on");
    assert_eq!(w.condition("Degraded").0, "False");
    // Promote skips the gates, even of a rolled-back revision.
    w.annotate(ANNOTATION_PROMOTE, "a");
    w.tick(1);
    w.step();
    let r = w.rollout();
    assert_eq!(r.phase, RolloutPhase::Promoted);
    assert_eq!(r.reason, Some(RolloutReason::PromotedByAnnotation));
    assert_eq!(r.stable_revision, new);
    // The same values again do nothing; a new rollout is judged as usual.
    let third = w.start_rollout("registry.example/test-runner:3");
    assert_eq!(w.rollout().phase, RolloutPhase::Progressing);
    assert_eq!(w.rollout().target_revision, third);
    assert_ne!(old, third);
}

#[test]
fn min_canary_time_holds_a_canary_that_completed_its_tickets() {
    let mut w = World::serving(2);
    w.pool.spec.rollout.min_canary_time = "2m".into();
    let new = w.start_rollout("registry.example/test-runner:2");
    for t in ["a", "b", "c"] {
        w.complete(&new, t);
    }
    w.tick(1);
    w.step();
    assert_eq!(w.rollout().phase, RolloutPhase::Progressing);
    assert_eq!(w.rollout().canary_tickets_ok, 3);
    let wake = w.plan().requeue_after;
    assert!(
        wake <= std::time::Duration::from_secs(119),
        "it wakes for the gate: {wake:?}"
    );
    w.tick(wake.as_secs() as i64);
    w.step();
    assert_eq!(w.rollout().phase, RolloutPhase::Promoted);
    assert_eq!(w.rollout().reason, Some(RolloutReason::CanaryPassed));
}

#[test]
fn a_broker_outage_neither_fails_nor_promotes_a_canary() {
    let mut w = World::serving(2);
    let new = w.start_rollout("registry.example/test-runner:2");
    w.tick(300);
    w.step();
    // The broker goes away for longer than the progress deadline.
    w.unreachable = true;
    for _ in 0..4 {
        w.tick(300);
        w.step();
        let r = w.rollout();
        assert_eq!(r.phase, RolloutPhase::Progressing, "{}", r.message);
        assert_eq!(r.reason, Some(RolloutReason::BrokerUnreachable));
    }
    // Workers of both revisions fail to reach it as they restart: exit 69.
    let stable = w.first_of(&w.rollout().stable_revision);
    let canary = w.first_of(&new);
    w.crash_with(&stable, None, 69);
    w.crash_with(&canary, None, 69);
    w.tick(1);
    w.step();
    // Back: the canary's clock starts over, and the shared outage is not its fault.
    w.unreachable = false;
    w.settle();
    w.tick(1);
    w.step();
    let r = w.rollout();
    assert_eq!(r.phase, RolloutPhase::Progressing, "{}", r.message);
    w.tick(599);
    w.step();
    assert_eq!(w.rollout().phase, RolloutPhase::Progressing);
    w.tick(1);
    w.step();
    assert_eq!(
        w.rollout().reason,
        Some(RolloutReason::ProgressDeadlineExceeded)
    );
}

#[test]
fn a_canary_alone_failing_to_reach_the_broker_is_rolled_back() {
    let mut w = World::serving(2);
    let new = w.start_rollout("registry.example/test-runner:2");
    let canary = w.first_of(&new);
    // Its new template names a broker only it cannot reach.
    w.crash_with(&canary, None, 69);
    w.tick(1);
    w.step();
    let r = w.rollout();
    assert_eq!(r.phase, RolloutPhase::RolledBack);
    assert_eq!(r.reason, Some(RolloutReason::CanaryCrashedBeforeConsuming));
}

#[test]
fn a_paused_rollout_holds_and_its_clock_restarts_on_resume() {
    let mut w = World::serving(2);
    let new = w.set_image("registry.example/test-runner:2");
    w.pool.spec.paused = true;
    w.tick(1);
    let p = w.step().clone();
    assert_eq!(p.created(), 0);
    assert_eq!(w.rollout().phase, RolloutPhase::Paused);
    w.tick(3600);
    w.step();
    assert_eq!(
        w.rollout().phase,
        RolloutPhase::Paused,
        "no deadline while paused"
    );
    w.pool.spec.paused = false;
    w.tick(1);
    let p = w.step().clone();
    assert_eq!(w.rollout().phase, RolloutPhase::Progressing);
    assert!(p.create.iter().any(|b| b.canary && b.revision == new));
}

#[test]
fn with_no_ticket_waiting_a_quiet_canary_is_promoted_after_idle_promote_after() {
    let mut w = World::serving(2);
    w.pool.spec.scaling.min_workers = 2;
    let new = w.start_rollout("registry.example/test-runner:2");
    w.ready = 0;
    w.tick(299);
    w.step();
    assert_eq!(w.rollout().phase, RolloutPhase::Progressing);
    w.tick(1);
    w.step();
    let r = w.rollout();
    assert_eq!(r.phase, RolloutPhase::Promoted, "{}", r.message);
    assert_eq!(r.reason, Some(RolloutReason::IdlePromoted));
    assert_eq!(r.stable_revision, new);
}

#[test]
fn a_pool_at_zero_waits_for_work_before_its_canary_runs() {
    let mut w = World::serving(2);
    w.ready = 0;
    w.pool.spec.scaling.scale_down_delay = "0s".into();
    w.tick(1);
    w.step();
    assert!(w.pods.is_empty());
    w.set_image("registry.example/test-runner:2");
    w.tick(1);
    assert_eq!(w.step().created(), 0);
    assert_eq!(w.rollout().reason, Some(RolloutReason::WaitingForWork));
    w.tick(7200);
    w.step();
    assert_eq!(
        w.rollout().phase,
        RolloutPhase::Progressing,
        "no deadline without canary"
    );
    w.ready = 4;
    w.tick(1);
    let p = w.step().clone();
    assert_eq!(
        p.created(),
        5,
        "four workers and the canary: {:?}",
        p.create
    );
}

#[test]
fn a_canary_waiting_for_work_after_a_crash_says_so() {
    let mut w = World::serving(2);
    w.pool.spec.scaling.scale_down_delay = "0s".into();
    let new = w.start_rollout("registry.example/test-runner:broken");
    let canary = w.first_of(&new);
    w.crash_with(&canary, Some("t-9"), 3);
    w.tick(1);
    w.step();
    let r = w.rollout();
    assert_eq!(r.reason, Some(RolloutReason::CanaryRunning));
    assert!(
        r.message.contains("1 crash(es) (last: pod") && r.message.contains("on ticket t-9, exit 3"),
        "{}",
        r.message
    );
    // The stable workers drain the queue before the canary takes a second ticket.
    w.ready = 0;
    for _ in 0..3 {
        w.settle();
        w.tick(1);
        w.step();
    }
    assert!(w.pods.is_empty(), "{:?}", w.pods);
    let r = w.rollout();
    assert_eq!(
        (r.phase, r.reason),
        (
            RolloutPhase::Progressing,
            Some(RolloutReason::WaitingForWork)
        )
    );
    assert_eq!(r.canary_crashes, 1);
    for words in [
        "1 canary crash(es) on record",
        "on ticket t-9, exit 3",
        "no ticket is left",
        "(1 so far)",
    ] {
        assert!(r.message.contains(words), "{words:?} in {}", r.message);
    }
}

#[test]
fn a_restarted_operator_goes_on_counting_the_canary_tickets_from_status() {
    let mut w = World::serving(2);
    let new = w.start_rollout("registry.example/test-runner:2");
    w.complete(&new, "a");
    w.complete(&new, "b");
    w.tick(1);
    w.step();
    assert_eq!(w.rollout().canary_tickets, ["a", "b"]);
    // The operator restarts: completions reported so far are gone from memory.
    w.completions = Completions::default();
    w.tick(1);
    w.step();
    assert_eq!(w.rollout().canary_tickets_ok, 2);
    w.complete(&new, "c");
    w.tick(1);
    w.step();
    assert_eq!(w.rollout().phase, RolloutPhase::Promoted);
}

#[test]
fn zero_canaries_promote_at_once_and_a_broken_stable_revision_still_gets_a_canary() {
    let mut w = World::serving(2);
    w.pool.spec.rollout.canary_workers = 0;
    let new = w.start_rollout("registry.example/test-runner:2");
    assert_eq!(w.rollout().stable_revision, new);
    assert_eq!(w.rollout().reason, Some(RolloutReason::NoCanary));

    let mut w = World::serving(2);
    let old = revision(&w.pool.spec);
    let stable = w.first_of(&old);
    w.crash(&stable, None);
    w.tick(1);
    w.step();
    assert_eq!(
        w.plan().status.diagnosis.as_ref().unwrap().verdict,
        Verdict::BrokenEnvironment
    );
    let fixed = w.start_rollout("registry.example/test-runner:2");
    let r = w.rollout();
    assert_eq!(r.phase, RolloutPhase::Progressing);
    assert_eq!(w.pods_of(&fixed), 1);
    for t in ["a", "b", "c"] {
        w.complete(&fixed, t);
    }
    w.tick(1);
    w.step();
    assert_eq!(w.rollout().stable_revision, fixed);
    assert_eq!(w.rollout().reason, Some(RolloutReason::CanaryPassed));
}

/// A random thing happening to a pool during rollouts.
/// Takes the pool's status away, as a restore without status or another client's
/// write would.
fn wipe(w: &mut World) {
    w.pool.status = None;
}

#[test]
fn a_wiped_status_keeps_the_stable_revision_its_controller_revision_names() {
    let mut w = World::serving(3);
    let first = revision(&w.pool.spec);
    assert_eq!(w.revisions.len(), 1);
    assert!(w.revisions[0].stable && w.revisions[0].revision == first);
    let second = w.start_rollout("registry.example/test-runner:2");
    for t in ["t-1", "t-2", "t-3"] {
        w.complete(&second, t);
    }
    w.tick(1);
    w.step();
    assert_eq!(w.rollout().stable_revision, second);
    for _ in 0..10 {
        w.settle();
        w.tick(1);
        w.step();
    }
    assert_eq!(w.pods_of(&second), 3);
    // A spec whose revision is not the stable one's: after the wipe the stable revision
    // still serves, and the spec's goes through a canary, not straight to every pod.
    wipe(&mut w);
    let third = w.set_image("registry.example/test-runner:3");
    w.tick(1);
    let p = w.step().clone();
    let r = w.rollout();
    assert_eq!(r.stable_revision, second, "{}", r.message);
    assert_eq!(r.phase, RolloutPhase::Progressing);
    assert!(p.delete.is_empty(), "no pod is replaced: {:?}", p.delete);
    assert!(p.create.iter().all(|b| b.canary && b.revision == third));
    // A stable pod lost now comes back from the stable ControllerRevision.
    let gone = w.first_of(&second);
    w.pods.retain(|p| p.name != gone);
    w.tick(1);
    let p = w.step().clone();
    let made: Vec<(&str, &str)> = p
        .create
        .iter()
        .map(|b| (b.revision.as_str(), b.workload.image.as_str()))
        .collect();
    assert_eq!(made, [(second.as_str(), "registry.example/test-runner:2")]);
    assert_ne!(first, second);
}

#[test]
fn a_wiped_status_with_the_spec_on_the_stable_revision_changes_nothing() {
    let mut w = World::serving(3);
    let first = revision(&w.pool.spec);
    wipe(&mut w);
    w.tick(1);
    let p = w.step().clone();
    let r = w.rollout();
    assert_eq!(
        (r.phase, r.reason),
        (RolloutPhase::Promoted, Some(RolloutReason::Restored))
    );
    assert_eq!(r.stable_revision, first);
    assert!(p.create.is_empty() && p.delete.is_empty(), "{p:?}");
    assert!(p.revisions.is_empty(), "{:?}", p.revisions);
}

#[test]
fn a_wiped_status_does_not_retry_a_rolled_back_revision() {
    let mut w = World::serving(3);
    let old = revision(&w.pool.spec);
    let new = w.start_rollout("registry.example/test-runner:2");
    let canary = w.first_of(&new);
    w.crash(&canary, None);
    w.tick(1);
    w.step();
    assert_eq!(w.rollout().phase, RolloutPhase::RolledBack);
    let marked = w.revisions.iter().find(|s| s.revision == new).unwrap();
    assert_eq!(
        marked.rolled_back.as_deref(),
        Some("CanaryCrashedBeforeConsuming")
    );
    wipe(&mut w);
    w.tick(1);
    let p = w.step().clone();
    let r = w.rollout();
    assert_eq!(r.phase, RolloutPhase::RolledBack, "{}", r.message);
    assert_eq!(r.reason, Some(RolloutReason::CanaryCrashedBeforeConsuming));
    assert_eq!(
        (r.stable_revision.as_str(), r.target_revision.as_str()),
        (old.as_str(), new.as_str())
    );
    assert!(p.create.iter().all(|b| !b.canary), "no canary again: {p:?}");
}

#[test]
fn a_status_from_before_controller_revisions_migrates_without_a_rollout_or_a_restart() {
    let mut w = World::serving(3);
    let first = revision(&w.pool.spec);
    let old_spec = w.pool.spec.workload.clone();
    // As an older operator left it: the stable snapshot in the status, no
    // ControllerRevision, and since then the spec moved on to a rollout.
    w.revisions.clear();
    let mut st = w.pool.status.clone().unwrap();
    st.rollout.as_mut().unwrap().stable = Some(old_spec.clone());
    w.pool.status = Some(st);
    let before: Vec<String> = w.pods.iter().map(|p| p.name.clone()).collect();
    w.tick(1);
    let p = w.step().clone();
    assert!(p.create.is_empty() && p.delete.is_empty(), "{p:?}");
    let made: Vec<(&str, bool)> = p
        .revisions
        .create
        .iter()
        .map(|n| (n.revision.as_str(), n.marks.stable))
        .collect();
    assert_eq!(made, [(first.as_str(), true)]);
    assert_eq!(p.revisions.create[0].workload, old_spec);
    assert_eq!(w.rollout().stable, None, "the snapshot is dropped");
    assert_eq!(w.rollout().reason, Some(RolloutReason::FirstRevision));
    let after: Vec<String> = w.pods.iter().map(|p| p.name.clone()).collect();
    assert_eq!(before, after);
}

#[test]
fn a_migrating_pool_in_the_middle_of_a_rollout_keeps_its_stable_pods() {
    let mut w = World::serving(2);
    let old = revision(&w.pool.spec);
    let old_spec = w.pool.spec.workload.clone();
    let new = w.start_rollout("registry.example/test-runner:2");
    w.revisions.clear();
    let mut st = w.pool.status.clone().unwrap();
    st.rollout.as_mut().unwrap().stable = Some(old_spec.clone());
    w.pool.status = Some(st);
    let gone = w.first_of(&old);
    w.pods.retain(|p| p.name != gone);
    w.tick(1);
    let p = w.step().clone();
    let stable: Vec<&crate::crd::Workload> = p
        .create
        .iter()
        .filter(|b| b.revision == old)
        .map(|b| &b.workload)
        .collect();
    assert_eq!(stable, [&old_spec]);
    let stored: Vec<(&str, bool)> = w
        .revisions
        .iter()
        .map(|s| (s.revision.as_str(), s.stable))
        .collect();
    assert_eq!(stored, [(old.as_str(), true), (new.as_str(), false)]);
    assert_eq!(w.rollout().phase, RolloutPhase::Progressing);
}

#[derive(Clone, Debug)]
enum Happening {
    Tickets(u64),
    NewImage(u8),
    Settle,
    Tick(i64),
    CanaryCompletes(u8),
    CanaryCrashes(Option<u8>),
    StableCrashes(u8),
    Pause(bool),
    Promote(u8),
    Abort(u8),
}

fn happening() -> impl Strategy<Value = Happening> {
    prop_oneof![
        (0u64..30).prop_map(Happening::Tickets),
        (0u8..4).prop_map(Happening::NewImage),
        Just(Happening::Settle),
        Just(Happening::Settle),
        (1i64..400).prop_map(Happening::Tick),
        (0u8..20).prop_map(Happening::CanaryCompletes),
        prop::option::of(0u8..20).prop_map(Happening::CanaryCrashes),
        (0u8..20).prop_map(Happening::StableCrashes),
        any::<bool>().prop_map(Happening::Pause),
        (0u8..3).prop_map(Happening::Promote),
        (0u8..3).prop_map(Happening::Abort),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn rollouts_keep_their_promises(
        max in 1i32..8,
        canaries in 0i32..3,
        happenings in prop::collection::vec(happening(), 1..60),
    ) {
        let mut w = World::serving(1);
        w.pool.spec.scaling.max_workers = max;
        w.pool.spec.rollout.canary_workers = canaries;
        w.pool.spec.scaling.scale_down_delay = "30s".into();
        let surge = 1 + canaries as usize;
        let mut promoted = vec![w.rollout().stable_revision.clone()];
        for h in happenings {
            match h {
                Happening::Tickets(n) => w.ready = n,
                Happening::NewImage(i) => { w.set_image(&format!("registry.example/test-runner:{i}")); }
                Happening::Settle => w.settle(),
                Happening::Tick(s) => w.tick(s),
                Happening::CanaryCompletes(n) => {
                    let target = w.rollout().target_revision.clone();
                    w.complete(&target, &format!("t-{n}"));
                }
                Happening::CanaryCrashes(ticket) => {
                    let target = w.rollout().target_revision.clone();
                    if let Some(pod) = w.pods.iter().find(|p| p.revision == target).map(|p| p.name.clone()) {
                        w.crash(&pod, ticket.map(|n| format!("t-{n}")).as_deref());
                    }
                }
                Happening::StableCrashes(n) => {
                    let stable = w.rollout().stable_revision.clone();
                    if let Some(pod) = w.pods.iter().find(|p| p.revision == stable).map(|p| p.name.clone()) {
                        w.crash(&pod, Some(&format!("t-{n}")));
                    }
                }
                Happening::Pause(p) => w.pool.spec.paused = p,
                Happening::Promote(v) => w.annotate(ANNOTATION_PROMOTE, &v.to_string()),
                Happening::Abort(v) => w.annotate(ANNOTATION_ABORT, &v.to_string()),
            }
            let before = w.rollout();
            w.tick(1);
            let p = w.step().clone();
            let r = w.rollout();
            // Never more pods than maxWorkers plus the documented surge.
            prop_assert!(w.pods.len() <= max as usize + surge, "{} pods, max {max}, surge {surge}: {:?}", w.pods.len(), w.pods);
            // Never zero workers while tickets wait (unless paused).
            if w.ready > 0 && !w.pool.spec.paused {
                prop_assert!(!w.pods.is_empty(), "no worker for {} tickets", w.ready);
            }
            // The stable revision changes only by a promotion, and a rollback returns
            // to the last promoted revision.
            if r.stable_revision != before.stable_revision {
                prop_assert_eq!(r.phase, RolloutPhase::Promoted);
                promoted.push(r.stable_revision.clone());
            }
            if r.phase == RolloutPhase::RolledBack {
                prop_assert_eq!(&r.stable_revision, promoted.last().unwrap());
                prop_assert!(p.create.iter().all(|b| b.revision == r.stable_revision));
            }
            // The stable pods are built from the stable snapshot.
            for b in &p.create {
                prop_assert_eq!(&crate::core::revision_of(&b.workload), &b.revision);
            }
            prop_assert!(r.history.len() <= super::HISTORY);
            // Exactly the stable revision is stored marked stable; history is bounded.
            prop_assert!(w.revisions.len() <= crate::core::revisions::KEPT);
            let marked: Vec<&str> = w.revisions.iter().filter(|s| s.stable).map(|s| s.revision.as_str()).collect();
            prop_assert_eq!(marked, vec![r.stable_revision.as_str()]);
        }
        // Left alone with work to do, every rollout ends (promoted or rolled back) and
        // the pool converges on its stable revision.
        w.pool.spec.paused = false;
        w.ready = 3;
        for _ in 0..40 {
            w.settle();
            w.tick(31);
            w.step();
        }
        let r = w.rollout();
        prop_assert!(matches!(r.phase, RolloutPhase::Promoted | RolloutPhase::RolledBack), "{:?}: {}", r.phase, r.message);
        prop_assert!(w.pods.iter().all(|p| p.revision == r.stable_revision), "{:?} stable {}", w.pods, r.stable_revision);
        let broken = w.plan().status.diagnosis.as_ref().is_some_and(|d| d.verdict == Verdict::BrokenEnvironment);
        prop_assert_eq!(w.pods.len(), if broken { 1 } else { 3.min(max as usize) });
    }
}
