//! A ticket ledger: what a scenario's wrapped test command did with each ticket, for
//! counting tickets in and out.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

/// A ticket ledger: the wrapped test command appends `<id> start` and `<id> end`
/// lines to one file, so a scenario can count tickets in and out.
pub struct Ledger {
    /// The file the test command appends to.
    pub path: std::path::PathBuf,
}

impl Ledger {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "trp-ledger-{name}-{}-{}",
            std::process::id(),
            jiff::Timestamp::now().as_millisecond()
        ));
        let _ = std::fs::remove_file(&path);
        Self { path }
    }

    /// The test command: record the start, read the ticket, work, record the end.
    pub fn command(&self, work_seconds: f64) -> serde_json::Value {
        json!([
            "sh",
            "-c",
            format!(
                "echo \"$TICKET_ID start\" >> {p}; cat >/dev/null; sleep {work_seconds}; echo \"$TICKET_ID end\" >> {p}",
                p = self.path.display()
            )
        ])
    }

    /// The test command of [`Ledger::command`], except on images matching the shell
    /// pattern `image`: there it records `<id> crash` after the start and exits 3.
    pub fn command_crashing_on(&self, image: &str, work_seconds: f64) -> serde_json::Value {
        json!([
            "sh",
            "-c",
            format!(
                "echo \"$TICKET_ID start\" >> {p}; cat >/dev/null; case \"$TESTRUNNER_IMAGE\" in {image}) echo \"$TICKET_ID crash\" >> {p}; exit 3;; esac; sleep {work_seconds}; echo \"$TICKET_ID end\" >> {p}",
                p = self.path.display()
            )
        ])
    }

    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn count(&self, what: &str) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for line in self.lines() {
            if let Some(id) = line.strip_suffix(&format!(" {what}")) {
                *counts.entry(id.to_string()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Every published ticket ran to its end exactly once, and nothing else ran.
    pub fn assert_each_once(&self, ids: &[String]) {
        let starts = self.count("start");
        let ends = self.count("end");
        let expected: BTreeMap<String, usize> = ids.iter().map(|id| (id.clone(), 1)).collect();
        assert_eq!(ends, expected, "every ticket completes exactly once");
        assert_eq!(
            starts, expected,
            "no ticket started twice or was interrupted"
        );
    }

    /// Every published ticket ran to its end exactly once, and nothing else ran; a
    /// ticket started again only after a crash on it (one start more per crash).
    /// Returns the tickets that crashed.
    pub fn assert_each_once_but_crashes(&self, ids: &[String]) -> BTreeSet<String> {
        let crashes = self.count("crash");
        let ends = self.count("end");
        let expected: BTreeMap<String, usize> = ids.iter().map(|id| (id.clone(), 1)).collect();
        assert_eq!(ends, expected, "every ticket completes exactly once");
        let starts: BTreeMap<String, usize> = ids
            .iter()
            .map(|id| (id.clone(), 1 + crashes.get(id).copied().unwrap_or(0)))
            .collect();
        assert_eq!(
            self.count("start"),
            starts,
            "a ticket starts again only after a crash on it"
        );
        crashes.into_keys().collect()
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
