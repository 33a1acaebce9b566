//! The pool's ControllerRevisions: read into the core's [`StoredRevision`]s, and kept
//! as the core's [`RevisionPlan`] says (created, relabelled, deleted). Each is named
//! `<pool>-<revision>`, owned by the pool, and holds the revision's workload as its
//! `data`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
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
    for new in &plan.create {
        let name = name(&pool_name, &new.revision);
        let object =
            ControllerRevision {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: pool.namespace(),
                    labels: Some(labels(&pool_name, &new.revision, &new.marks)),
                    annotations: new.marks.rolled_back.as_ref().map(|why| {
                        BTreeMap::from([(ANNOTATION_ROLLED_BACK.to_string(), why.clone())])
                    }),
                    owner_references: pool.controller_owner_ref(&()).map(|o| vec![o]),
                    ..Default::default()
                },
                data: Some(RawExtension(
                    serde_json::to_value(&new.workload).expect("a workload serializes"),
                )),
                revision: new.number,
            };
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        api.create(&params, &object)
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
