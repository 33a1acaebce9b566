//! The scaling benchmark's simulator (benches/scaling/sim.rs) on tiny traces: what it
//! measures must be real outcomes of the models, not artefacts of the simulation.

#[path = "../benches/scaling/sim.rs"]
#[allow(dead_code)]
mod sim;

use sim::{Params, Policy, Ticket, quantile};

fn trace(tickets: &[(f64, f64)]) -> Vec<Ticket> {
    tickets
        .iter()
        .map(|&(arrival, run)| Ticket { arrival, run })
        .collect()
}

fn params(max_workers: u32) -> Params {
    Params {
        pod_start: 15.0,
        max_workers,
        ..Params::default()
    }
}

#[test]
fn the_floor_never_makes_a_ticket_wait_below_max_workers() {
    // At most 3 tickets run at once; 4 workers are allowed.
    let t = trace(&[
        (0.0, 60.0),
        (1.0, 60.0),
        (2.0, 30.0),
        (40.0, 10.0),
        (200.0, 5.0),
    ]);
    let o = sim::run(Policy::Floor, &t, &params(4));
    assert!(o.waits.iter().all(|w| *w == 0.0), "{:?}", o.waits);
    let work: f64 = t.iter().map(|t| t.run).sum();
    assert!(
        (o.worker_seconds - work).abs() < 1e-9,
        "workers cost their runs only"
    );
    assert_eq!((o.interrupted, o.redeliveries), (0, 0));
}

#[test]
fn the_floor_queues_beyond_max_workers() {
    let t = trace(&[(0.0, 100.0), (0.0, 100.0), (0.0, 100.0)]);
    let o = sim::run(Policy::Floor, &t, &params(2));
    let mut waits = o.waits.clone();
    waits.sort_by(f64::total_cmp);
    assert_eq!(waits, [0.0, 0.0, 100.0]);
}

#[test]
fn every_ticket_completes_exactly_once_under_every_policy() {
    // Short tickets, a burst, and a long one after the queue emptied.
    let mut t: Vec<(f64, f64)> = (0..30).map(|i| (i as f64 * 3.0, 40.0)).collect();
    t.extend((0..12).map(|i| (400.0 + i as f64 * 0.1, 20.0)));
    t.push((900.0, 2400.0));
    let t = trace(&t);
    for policy in Policy::ALL {
        let o = sim::run(policy, &t, &params(8));
        for (i, c) in o.completions.iter().enumerate() {
            let abandoned = u32::from(o.abandoned[i]);
            assert_eq!(c + abandoned, 1, "{policy:?}: ticket {i}");
        }
        let deliveries: u32 = o.deliveries.iter().sum();
        assert_eq!(deliveries, t.len() as u32 + o.redeliveries, "{policy:?}");
        assert!(o.redeliveries >= o.interrupted, "{policy:?}");
        // KEDA and Native workers lose the long ticket (see the tests below).
        if matches!(policy, Policy::Operator | Policy::Floor) {
            assert!(o.abandoned.iter().all(|a| !a), "{policy:?}");
            assert!(o.end >= 900.0 + 2400.0, "{policy:?} ran the long ticket");
        }
    }
}

#[test]
fn keda_sees_ready_tickets_only_and_kills_the_long_ticket_it_cannot_see() {
    // One long ticket, alone: once a worker takes it, the queue is empty.
    let t = trace(&[(0.0, 3600.0)]);
    let o = sim::run(Policy::Keda, &t, &params(5));
    assert!(!o.readings.is_empty());
    assert!(
        o.readings.iter().all(|r| r.seen == r.ready),
        "AMQP counts ready messages"
    );
    assert!(
        o.readings.iter().any(|r| r.in_flight > 0 && r.seen == 0),
        "the ticket in flight is invisible to the scaler"
    );
    // Scaled to zero after the cooldown, the worker is killed after 30 s of grace; the
    // ticket comes back, activates KEDA again, and is killed again: a run never fits
    // between two activations, until the simulation gives it up.
    assert_eq!(o.interrupted, 1);
    assert_eq!(o.deliveries[0], sim::MAX_DELIVERIES);
    assert!(o.abandoned[0] && o.completions[0] == 0);
    assert!(o.lost_work_s > 0.0);
}

#[test]
fn the_operator_keeps_a_busy_worker_however_long_its_ticket() {
    let t = trace(&[(0.0, 3600.0)]);
    let o = sim::run(Policy::Operator, &t, &params(5));
    assert_eq!((o.interrupted, o.redeliveries), (0, 0));
    // Started after the pod start-up (plus at most one poll interval), never again.
    assert!(
        o.waits[0] >= 15.0 && o.waits[0] <= 15.0 + 2.0 + 1e-9,
        "{:?}",
        o.waits
    );
    // One pod: started, ran the ticket, went after the scale-down delay.
    assert_eq!(o.pods_created, 1);
}

#[test]
fn native_workers_are_drained_and_killed_after_the_grace_period() {
    // Without reports the operator removes the worker after the scale-down delay; it
    // drains for 600 s, then its ticket is killed and runs again.
    let t = trace(&[(0.0, 3600.0)]);
    let o = sim::run(Policy::OperatorNative, &t, &params(5));
    assert!(o.interrupted == 1 && o.redeliveries >= 1, "{o:?}");
}

#[test]
fn quantiles_by_nearest_rank() {
    let v: Vec<f64> = (1..=100).map(f64::from).collect();
    assert_eq!(quantile(&v, 0.5), 50.0);
    assert_eq!(quantile(&v, 0.99), 99.0);
    assert_eq!(quantile(&v, 1.0), 100.0);
    assert_eq!(quantile(&[], 0.5), 0.0);
}
