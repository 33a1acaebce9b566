//! Worker reports on the outcome queue: any message body (the queue is open to anything
//! that can publish to the broker).
//!
//! - a body that reads as a report serializes to JSON that reads back as the same report;
//! - what it says about the ticket in hand and the one completed is consistent: a
//!   report that completed a ticket leaves the worker idle, a quarantined ticket is
//!   not completed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use testrunner_operator::contract::{Outcome, Report};

fuzz_target!(|body: &[u8]| {
    let Some(report) = Report::parse(body) else {
        return;
    };
    let json = report.to_vec();
    assert_eq!(
        Report::parse(&json).as_ref(),
        Some(&report),
        "{}",
        String::from_utf8_lossy(&json)
    );
    match report.completed() {
        None => assert!(report.outcome.is_none()),
        Some(ticket) => {
            if report.state.is_none() {
                assert_eq!(report.holds(), Some(None));
            }
            if report.outcome == Some(Outcome::Quarantined) {
                assert_eq!(ticket, None);
            }
        }
    }
});
