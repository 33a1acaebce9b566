//! The pool's ControllerRevisions: read into the core's [`StoredRevision`]s, and kept
//! as the core's [`RevisionPlan`] says (created, relabelled, deleted). Each is named
//! `<pool>-<revision>`, owned by the pool, and holds the revision's workload as its
//! `data`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::ControllerRevision;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::{Context, Error};
use crate::core::revisions::{Marks, RevisionPlan, StoredRevision};
use crate::crd::{
    ANNOTATION_ROLLED_BACK, FIELD_MANAGER, LABEL_REVISION, LABEL_STABLE, TestRunnerPool, Workload,
};
use crate::pods;

/// The ControllerRevision name of `revision` of `pool`.
pub fn name(pool: &str, revision: &str) -> String {
    format!("{pool}-{revision}")
}

fn api(pool: &TestRunnerPool, ctx: &Context) -> Api<ControllerRevision> {
    Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default())
}

/// The pool's stored revisions. One whose `data` is not a workload (edited by hand) is
/// left out, with a warning: the pool then acts as if it were not stored.
pub(super) async fn read(
    pool: &TestRunnerPool,
    ctx: &Context,
) -> Result<Vec<StoredRevision>, Error> {
    let list = api(pool, ctx)
        .list(&ListParams::default().labels(&pods::selector(&pool.name_any())))
        .await
        .map_err(Error::ListRevisions)?;
    let uid = pool.uid();
    Ok(list
        .items
        .into_iter()
        .filter(|r| {
            r.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref())
        })
        .filter_map(|r| stored(&r))
        .collect())
}

fn stored(r: &ControllerRevision) -> Option<StoredRevision> {
    let revision = r.labels().get(LABEL_REVISION)?.clone();
    let data = r.data.as_ref().map(|d| d.0.clone()).unwrap_or_default();
    let workload: Workload = match serde_json::from_value(data) {
        Ok(w) => w,
        Err(e) => {
            warn!(controllerrevision = %r.name_any(), error = %e, "ignoring a ControllerRevision whose data is not a workload");
            return None;
        }
    };
    Some(StoredRevision {
        revision,
        number: r.revision,
        workload,
        stable: r.labels().get(LABEL_STABLE).is_some_and(|v| v == "true"),
        rolled_back: r.annotations().get(ANNOTATION_ROLLED_BACK).cloned(),
    })
}

/// Creates a ControllerRevision holding `workload`. Its `data` is written in the form
/// the API server re-encodes it to (compact, with `<`, `>`, `&`, U+2028 and U+2029
/// escaped as Go's encoder does): the API server compares a ControllerRevision's `data`
/// bytes before and after a patch, and refuses a label patch as changing an immutable
/// field when its re-encoding differs from the stored bytes. The typed client would
/// write those characters as they are, so the body is written here.
async fn create(
    ns: &str,
    metadata: &ObjectMeta,
    workload: &Workload,
    number: i64,
    ctx: &Context,
) -> Result<ControllerRevision, kube::Error> {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        api_version: &'a str,
        kind: &'a str,
        metadata: &'a ObjectMeta,
        data: &'a serde_json::value::RawValue,
        revision: i64,
    }
    let data = go_canonical(workload).map_err(kube::Error::SerdeError)?;
    let body = serde_json::to_vec(&Body {
        api_version: &ControllerRevision::api_version(&()),
        kind: &ControllerRevision::kind(&()),
        metadata,
        data: &data,
        revision: number,
    })
    .map_err(kube::Error::SerdeError)?;
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let request = kube::core::Request::new(ControllerRevision::url_path(&(), Some(ns)))
        .create(&params, body)
        .map_err(kube::Error::BuildRequest)?;
    ctx.client.request(request).await
}

/// `workload` as compact JSON, escaped as Go's encoder escapes it.
fn go_canonical(
    workload: &Workload,
) -> Result<Box<serde_json::value::RawValue>, serde_json::Error> {
    let compact = serde_json::to_string(workload)?;
    serde_json::value::RawValue::from_string(escape_like_go(&compact))
}

/// Escapes what Go's JSON encoder escapes and serde_json does not. Each of these
/// characters can only stand inside a JSON string, where its escape means the same.
fn escape_like_go(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

fn labels(pool: &str, revision: &str, marks: &Marks) -> BTreeMap<String, String> {
    let mut labels = pods::selector_labels(pool);
    labels.insert(LABEL_REVISION.into(), revision.into());
    if marks.stable {
        labels.insert(LABEL_STABLE.into(), "true".into());
    }
    labels
}

/// Carries out `plan`: new revisions first (pods are built from them next), then the
/// marks, then the pruning.
pub(super) async fn apply(
    pool: &TestRunnerPool,
    plan: &RevisionPlan,
    ctx: &Context,
) -> Result<(), Error> {
    if plan.is_empty() {
        return Ok(());
    }
    let api = api(pool, ctx);
    let pool_name = pool.name_any();
    let ns = pool.namespace().unwrap_or_default();
    for new in &plan.create {
        let name = name(&pool_name, &new.revision);
        let metadata = ObjectMeta {
            name: Some(name.clone()),
            namespace: pool.namespace(),
            labels: Some(labels(&pool_name, &new.revision, &new.marks)),
            annotations: new
                .marks
                .rolled_back
                .as_ref()
                .map(|why| BTreeMap::from([(ANNOTATION_ROLLED_BACK.to_string(), why.clone())])),
            owner_references: pool.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        };
        create(&ns, &metadata, &new.workload, new.number, ctx)
            .await
            .map_err(|source| Error::WriteRevision {
                name: name.clone(),
                source,
            })?;
        info!(controllerrevision = %name, revision = %new.revision, number = new.number, stable = new.marks.stable, "stored revision");
    }
    for (revision, marks) in &plan.remark {
        let name = name(&pool_name, revision);
        let patch = json!({
            "metadata": {
                "labels": { LABEL_STABLE: marks.stable.then_some("true") },
                "annotations": { ANNOTATION_ROLLED_BACK: marks.rolled_back },
            }
        });
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| Error::WriteRevision {
                name: name.clone(),
                source,
            })?;
        info!(controllerrevision = %name, stable = marks.stable, rolled_back = ?marks.rolled_back, "marked revision");
    }
    for revision in &plan.delete {
        let name = name(&pool_name, revision);
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => info!(controllerrevision = %name, "deleted a revision beyond the history"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => return Err(Error::WriteRevision { name, source }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_is_written_as_go_re_encodes_it_and_still_reads_back() {
        let workload = Workload {
            image: "runner:1".into(),
            command: vec!["sh".into(), "-c".into(), "a < b && c > d \u{2028}é".into()],
            ..Default::default()
        };
        let raw = go_canonical(&workload).unwrap();
        let text = raw.get();
        for escaped in ["\\u003c", "\\u003e", "\\u0026\\u0026", "\\u2028"] {
            assert!(text.contains(escaped), "{escaped} in {text}");
        }
        assert!(!text.contains(['<', '>', '&', '\u{2028}']), "{text}");
        assert!(
            text.contains("é"),
            "other characters stay as they are: {text}"
        );
        let back: Workload = serde_json::from_str(text).unwrap();
        assert_eq!(back, workload);
    }
}
