//! The wire between the worker wrapper and the operator, in one place.
//!
//! Everything a worker and the operator must agree on is defined here once, and both
//! sides (the `worker` wrapper, and the operator's `core`, `pods`, `broker` and
//! `controller`) use it from here:
//!
//! - the wrapper's own exit codes, [`WorkerExit`], and which of them the operator does not
//!   charge to the ticket in hand;
//! - the termination log, [`TerminationLine`]: one line the wrapper overwrites before each
//!   step and the operator reads back after a crash;
//! - the reports on the namespace's outcome queue, [`Report`];
//! - the quarantine list the operator mounts into worker pods, [`QuarantineEntry`];
//! - ticket ids ([`ticket_id`]) and the message headers the operator and its workers set
//!   ([`HEADER_PREFIX`] and the names after it);
//! - the name of the worker container, [`WORKER_CONTAINER`].
//!
//! Nothing here does I/O, and this module uses no other module of the crate.

mod exit;
mod quarantine;
#[cfg(test)]
pub(crate) use quarantine::example as quarantine_example;
mod report;
mod termination;
mod ticket;

pub use exit::WorkerExit;
pub use quarantine::{
    EVIDENCE_CRASHES, EVIDENCE_IMAGES, EVIDENCE_LAST_EXIT, EVIDENCE_PODS, QuarantineEntry,
    parse_quarantine_list,
};
pub use report::{Outcome, Report, WorkerState};
pub use termination::{
    MAX_QUOTED_CHARS, MAX_REASON_CHARS, MAX_TICKET_ID_BYTES, TerminationLine, one_line,
};
pub use ticket::{
    HEADER_DELIVERY, HEADER_PREFIX, HEADER_QUARANTINED_BY, HEADER_QUARANTINED_FROM,
    HEADER_REPLAYED_AT, HEADER_SET_ASIDE, HEADER_TIMESTAMP_MS, ticket_id,
};

/// Name of the worker container in worker pods: the container whose terminations the
/// operator reads.
pub const WORKER_CONTAINER: &str = "worker";

#[cfg(test)]
mod tests {
    //! Round trips: what one side writes, the other reads back unchanged.

    use super::*;
    use proptest::prelude::*;

    /// Any termination line within its limits: ids of one word of at most
    /// [`MAX_TICKET_ID_BYTES`], reasons on one line ([`one_line`]).
    fn termination_line() -> impl Strategy<Value = TerminationLine> {
        let reason = "\\PC{0,600}|[\\s\\S]{0,40}".prop_map(|r| one_line(&r));
        prop_oneof![
            Just(TerminationLine::Starting),
            Just(TerminationLine::Idle),
            ("[^\\s]{1,64}", any::<u64>())
                .prop_map(|(id, delivery)| TerminationLine::Ticket { id, delivery }),
            reason.clone().prop_map(TerminationLine::BrokerUnavailable),
            reason.clone().prop_map(TerminationLine::CommandError),
            reason.clone().prop_map(TerminationLine::BrokerLost),
            reason.prop_map(TerminationLine::ConfigError),
        ]
    }

    fn report() -> impl Strategy<Value = Report> {
        let state = proptest::option::of(prop_oneof![
            Just(WorkerState::Idle),
            Just(WorkerState::Busy)
        ]);
        let outcome = proptest::option::of(prop_oneof![
            Just(Outcome::Passed),
            Just(Outcome::Failed),
            Just(Outcome::Quarantined),
            Just(Outcome::SetAside)
        ]);
        (
            ("\\PC{0,20}", "\\PC{0,12}", state, outcome),
            (
                proptest::option::of("\\PC{0,40}"),
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<i32>()),
                proptest::option::of(any::<u64>()),
                proptest::option::of(any::<u64>()),
            ),
            ("\\PC{0,20}", "[0-9a-f-]{0,36}"),
        )
            .prop_map(
                |(
                    (pod, revision, state, outcome),
                    (ticket, delivery, exit_code, duration_ms, waited_ms),
                    (pool, pool_uid),
                )| Report {
                    pool,
                    pool_uid,
                    pod,
                    revision,
                    state,
                    outcome,
                    ticket,
                    delivery,
                    exit_code,
                    duration_ms,
                    waited_ms,
                },
            )
    }

    fn quarantine_entry() -> impl Strategy<Value = QuarantineEntry> {
        (
            "[^\\s]{1,40}",
            proptest::option::of(any::<i64>()),
            proptest::collection::vec(("\\PC{0,12}", "[\\s\\S]{0,30}"), 0..5),
        )
            .prop_map(|(id, listed_at, evidence)| QuarantineEntry {
                id,
                listed_at,
                evidence,
            })
    }

    proptest! {
        #[test]
        fn the_wire_round_trips(
            line in termination_line(),
            before in "[^\n]{0,100}\n",
            report in report(),
            list in proptest::collection::vec(quarantine_entry(), 0..5),
        ) {
            // A termination line: alone, and as the last line of a log tail.
            let text = line.render();
            prop_assert!(text.ends_with('\n') && text.lines().count() == 1, "{:?}", text);
            prop_assert_eq!(TerminationLine::parse(text.as_bytes()), Some(line.clone()));
            let tail = format!("{before}{text}");
            prop_assert_eq!(TerminationLine::parse(tail.as_bytes()), Some(line));

            // A report.
            prop_assert_eq!(Report::parse(&report.to_vec()), Some(report));

            // The quarantine list.
            let rendered: String = list.iter().map(QuarantineEntry::render).collect();
            prop_assert_eq!(parse_quarantine_list(&rendered), list);
        }
    }
}
