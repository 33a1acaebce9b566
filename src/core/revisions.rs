//! Revisions: what each revision's pods are built from is kept in an `apps/v1`
//! ControllerRevision owned by the pool (as StatefulSets and DaemonSets keep theirs),
//! not in the status. The status names revisions; the ControllerRevisions hold them.
//! The current stable revision carries a label saying so, and a rolled-back one an
//! annotation, so that a pool whose status is lost still knows what serves and does
//! not retry a failed rollout.
//!
//! This step decides which ControllerRevisions should exist and how they are marked;
//! the shell creates, relabels and deletes them.

use crate::crd::{RolloutPhase, RolloutStatus, Workload};

/// Revisions kept: the stable one, the one the spec asks for, and the newest others up
/// to this many in all.
pub const KEPT: usize = 10;

/// A revision as its ControllerRevision holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRevision {
    /// The revision (the hash in pod labels).
    pub revision: String,
    /// The ControllerRevision's sequence number: higher is newer.
    pub number: i64,
    /// What its pods are built from.
    pub workload: Workload,
    /// Marked as the stable revision.
    pub stable: bool,
    /// Marked as rolled back, with the rollout reason.
    pub rolled_back: Option<String>,
}

/// How a revision is marked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marks {
    /// The stable revision.
    pub stable: bool,
    /// Rolled back, and why.
    pub rolled_back: Option<String>,
}

/// A ControllerRevision to create.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRevision {
    /// The revision.
    pub revision: String,
    /// Its sequence number.
    pub number: i64,
    /// What its pods are built from.
    pub workload: Workload,
    /// How it is marked.
    pub marks: Marks,
}

/// What the shell does to the pool's ControllerRevisions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RevisionPlan {
    /// To create, in order.
    pub create: Vec<NewRevision>,
    /// Existing ones whose marks change.
    pub remark: Vec<(String, Marks)>,
    /// Existing ones to delete (beyond [`KEPT`]).
    pub delete: Vec<String>,
}

impl RevisionPlan {
    /// True when nothing is to be done.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.remark.is_empty() && self.delete.is_empty()
    }
}

/// What a revision's pods are built from: its ControllerRevision, the spec when it is
/// the spec's revision, or, for a pool whose status predates ControllerRevisions, the
/// snapshot that status kept of its stable revision.
pub fn workload_of<'a>(
    revision: &str,
    stored: &'a [StoredRevision],
    spec: &'a Workload,
    legacy: Option<(&'a str, &'a Workload)>,
) -> Option<&'a Workload> {
    stored
        .iter()
        .find(|r| r.revision == revision)
        .map(|r| &r.workload)
        .or_else(|| (super::revision_of(spec) == revision).then_some(spec))
        .or_else(|| legacy.filter(|(r, _)| *r == revision).map(|(_, w)| w))
}

/// The marks a revision should carry under `status`: the stable one is marked stable;
/// the target of a rolled-back rollout is marked rolled back; other revisions keep
/// their rolled-back mark.
fn marks_for(revision: &str, status: &RolloutStatus, kept: Option<&String>) -> Marks {
    let stable = revision == status.stable_revision;
    let rolled_back = if stable {
        None
    } else if revision == status.target_revision && status.phase == RolloutPhase::RolledBack {
        Some(
            status
                .reason
                .map(|r| r.to_string())
                .unwrap_or_else(|| "RolledBack".into()),
        )
    } else {
        kept.cloned()
    };
    Marks {
        stable,
        rolled_back,
    }
}

/// The ControllerRevisions to create, remark and delete so that the stable and the
/// target revision are stored and marked as `status` says, and at most [`KEPT`] remain.
/// `workload` says what a revision not yet stored is built from.
pub fn plan<'a>(
    stored: &[StoredRevision],
    status: &RolloutStatus,
    workload: impl Fn(&str) -> Option<&'a Workload>,
) -> RevisionPlan {
    let mut out = RevisionPlan::default();
    let mut next = stored.iter().map(|r| r.number).max().unwrap_or(0) + 1;
    let mut wanted = vec![status.stable_revision.as_str()];
    if status.target_revision != status.stable_revision {
        wanted.push(status.target_revision.as_str());
    }
    for revision in wanted.iter().copied() {
        if stored.iter().any(|r| r.revision == revision) {
            continue;
        }
        if let Some(w) = workload(revision) {
            out.create.push(NewRevision {
                revision: revision.to_string(),
                number: next,
                workload: w.clone(),
                marks: marks_for(revision, status, None),
            });
            next += 1;
        }
    }
    for r in stored {
        let marks = marks_for(&r.revision, status, r.rolled_back.as_ref());
        if marks.stable != r.stable || marks.rolled_back != r.rolled_back {
            out.remark.push((r.revision.clone(), marks));
        }
    }
    let mut others: Vec<&StoredRevision> = stored
        .iter()
        .filter(|r| !wanted.contains(&r.revision.as_str()))
        .collect();
    others.sort_by_key(|r| std::cmp::Reverse(r.number));
    let room = KEPT.saturating_sub(wanted.len());
    out.delete = others
        .iter()
        .skip(room)
        .map(|r| r.revision.clone())
        .collect();
    out.remark.retain(|(r, _)| !out.delete.contains(r));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::RolloutReason;

    fn workload(image: &str) -> Workload {
        Workload {
            image: image.into(),
            command: vec!["run".into()],
            ..Default::default()
        }
    }

    fn stored(image: &str, number: i64, stable: bool) -> StoredRevision {
        let w = workload(image);
        StoredRevision {
            revision: super::super::revision_of(&w),
            number,
            workload: w,
            stable,
            rolled_back: None,
        }
    }

    fn status(stable: &str, target: &str, phase: RolloutPhase) -> RolloutStatus {
        let rev = |image: &str| super::super::revision_of(&workload(image));
        let mut st = RolloutStatus::serving(
            &rev(stable),
            stable,
            RolloutReason::FirstRevision,
            String::new(),
        );
        st.phase = phase;
        st.reason = None;
        st.target_revision = rev(target);
        st.target_image = target.into();
        st
    }

    #[test]
    fn a_new_pool_stores_its_first_revision_marked_stable() {
        let spec = workload("v1");
        let st = status("v1", "v1", RolloutPhase::Promoted);
        let p = plan(&[], &st, |r| workload_of(r, &[], &spec, None));
        assert_eq!(p.create.len(), 1);
        assert_eq!(p.create[0].number, 1);
        assert_eq!(p.create[0].workload, spec);
        assert!(p.create[0].marks.stable);
        assert!(p.remark.is_empty() && p.delete.is_empty());
        let again = plan(&[stored("v1", 1, true)], &st, |r| {
            workload_of(r, &[], &spec, None)
        });
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn a_rollout_stores_its_target_and_a_promotion_moves_the_stable_mark() {
        let spec = workload("v2");
        let have = [stored("v1", 1, true)];
        let going = status("v1", "v2", RolloutPhase::Progressing);
        let p = plan(&have, &going, |r| workload_of(r, &have, &spec, None));
        assert_eq!(p.create.len(), 1);
        assert_eq!((p.create[0].number, p.create[0].marks.stable), (2, false));
        let have = [stored("v1", 1, true), stored("v2", 2, false)];
        let promoted = status("v2", "v2", RolloutPhase::Promoted);
        let p = plan(&have, &promoted, |r| workload_of(r, &have, &spec, None));
        assert!(p.create.is_empty());
        let marks: Vec<(&str, bool)> = p
            .remark
            .iter()
            .map(|(r, m)| (r.as_str(), m.stable))
            .collect();
        assert_eq!(
            marks,
            [
                (have[0].revision.as_str(), false),
                (have[1].revision.as_str(), true)
            ]
        );
    }

    #[test]
    fn a_rolled_back_revision_is_marked_and_keeps_its_mark_until_promoted() {
        let spec = workload("v2");
        let have = [stored("v1", 1, true), stored("v2", 2, false)];
        let mut back = status("v1", "v2", RolloutPhase::RolledBack);
        back.reason = Some(RolloutReason::CanaryCrashedOnTickets);
        let p = plan(&have, &back, |r| workload_of(r, &have, &spec, None));
        assert_eq!(
            p.remark,
            [(
                have[1].revision.clone(),
                Marks {
                    stable: false,
                    rolled_back: Some("CanaryCrashedOnTickets".into())
                }
            )]
        );
        let mut marked = have.clone();
        marked[1].rolled_back = Some("CanaryCrashedOnTickets".into());
        let v3 = workload("v3");
        let next = status("v1", "v3", RolloutPhase::Progressing);
        let p = plan(&marked, &next, |r| workload_of(r, &marked, &v3, None));
        assert!(p.remark.is_empty(), "the mark stays: {p:?}");
        let forced = status("v2", "v2", RolloutPhase::Promoted);
        let p = plan(&marked, &forced, |r| workload_of(r, &marked, &spec, None));
        assert!(p.remark.contains(&(
            have[1].revision.clone(),
            Marks {
                stable: true,
                rolled_back: None
            }
        )));
    }

    #[test]
    fn history_is_bounded_and_never_drops_the_stable_or_target_revision() {
        let mut have: Vec<StoredRevision> = (1..=12)
            .map(|n| stored(&format!("v{n}"), n, n == 1))
            .collect();
        have[0].number = 1;
        let spec = workload("v13");
        let st = status("v1", "v13", RolloutPhase::Progressing);
        let p = plan(&have, &st, |r| workload_of(r, &have, &spec, None));
        assert_eq!(p.create.len(), 1);
        assert_eq!(p.create[0].number, 13);
        // Stable v1 and target v13 stay, with the newest eight of v2..v12.
        let deleted: Vec<String> = ["v2", "v3", "v4"]
            .iter()
            .map(|i| super::super::revision_of(&workload(i)))
            .collect();
        let mut got = p.delete.clone();
        got.sort();
        let mut want = deleted;
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn a_status_snapshot_from_before_controller_revisions_is_stored_as_is() {
        let old = workload("v1");
        let old_rev = super::super::revision_of(&old);
        let spec = workload("v2");
        let st = status("v1", "v2", RolloutPhase::Progressing);
        let p = plan(&[], &st, |r| {
            workload_of(r, &[], &spec, Some((old_rev.as_str(), &old)))
        });
        let made: Vec<(&Workload, bool)> = p
            .create
            .iter()
            .map(|n| (&n.workload, n.marks.stable))
            .collect();
        assert_eq!(made, [(&old, true), (&spec, false)]);
        assert_eq!(
            workload_of("unknown", &[], &spec, Some((old_rev.as_str(), &old))),
            None
        );
    }
}
