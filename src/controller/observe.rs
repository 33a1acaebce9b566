//! Observe: what one reconcile reads of the world (the broker Secret, the probe's
//! latest answer and the workers' reports, the pool's pods), as the core's
//! [`Observed`].

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::ObjectRef;

use super::probes::ProbeKey;
use super::{Context, Error, Guarded};
use crate::broker::BrokerUri;
use crate::core::{self, ConfigProblem, Observed};
use crate::crd::TestRunnerPool;
use crate::pods;

/// What one reconcile saw.
pub(super) struct Seen {
    /// The core's input.
    pub observed: Observed,
    /// The pool's broker, when its Secret holds a valid URI.
    pub uri: Option<BrokerUri>,
    /// The pool's namespace's pods.
    pub pods: Api<Pod>,
}

/// Reads what the core decides on for `pool`, and keeps the pool's probe task in step
/// with its spec: started or moved when the Secret names a broker, stopped when not.
pub(super) async fn observe(
    pool: &TestRunnerPool,
    key: &ObjectRef<Guarded>,
    ctx: &Context,
) -> Result<Seen, Error> {
    let uri = broker_uri(pool, ctx).await?;
    let outcomes = pods::outcomes_queue(pool, &ctx.settings.pods.outcome_queue_prefix);
    let broker = match &uri {
        Ok(uri) => ctx.probes.ensure(
            key,
            ProbeKey {
                uri: uri.clone(),
                queue: pool.spec.queue.name.clone(),
                interval: core::settings(&pool.spec).unwrap_or_default().poll_interval,
                outcomes: outcomes.clone(),
            },
            pool.uid(),
        ),
        Err(_) => {
            ctx.probes.stop(key);
            core::BrokerView::NotProbed
        }
    };
    let pods_api: Api<Pod> =
        Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default());
    let pod_list = pods_api
        .list(&ListParams::default().labels(&pods::selector(&pool.name_any())))
        .await
        .map_err(Error::ListPods)?;
    let uid = pool.uid();
    let owned: Vec<&Pod> = pod_list
        .items
        .iter()
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == uid.as_ref())
        })
        .collect();
    // Pods of an older operator report on a queue of their pool's own (or under another
    // prefix): read it as long as they are there, so that no report is lost across an
    // upgrade; the pool's own queue goes once they are gone.
    let named: BTreeSet<String> = owned
        .iter()
        .filter_map(|p| pods::outcome_queue_of(p))
        .filter(|q| *q != outcomes)
        .collect();
    ctx.probes.read_legacy(
        key,
        named,
        BTreeSet::from([pods::legacy_outcomes_queue(pool)]),
    );
    let activity = ctx.probes.activity(key);
    let observed = Observed {
        pods: owned
            .iter()
            .map(|p| {
                let mut view = pods::view(p);
                // A reporting worker is what its last report says; until then, unknown.
                if view.activity == core::Activity::Unknown
                    && let Some(reported) = activity.get(&view.name)
                {
                    view.activity = reported.clone();
                }
                view
            })
            .collect(),
        crashes: owned
            .iter()
            .flat_map(|p| core::crash::crash_records(p))
            .collect(),
        completions: ctx.probes.completions(key),
        broker,
        config_problem: uri.as_ref().err().cloned(),
        revisions: super::revisions::read(pool, ctx).await?,
    };
    Ok(Seen {
        observed,
        uri: uri.ok(),
        pods: pods_api,
    })
}

/// Reads the broker URI from the pool's Secret, or says what is wrong with it.
async fn broker_uri(
    pool: &TestRunnerPool,
    ctx: &Context,
) -> Result<Result<BrokerUri, ConfigProblem>, Error> {
    let ns = pool.namespace().unwrap_or_default();
    let r = &pool.spec.queue.connection_secret_ref;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret = match secrets.get_opt(&r.name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Ok(Err(ConfigProblem::SecretNotFound {
                name: r.name.clone(),
            }));
        }
        Err(source) => {
            return Err(Error::ReadSecret {
                name: r.name.clone(),
                source,
            });
        }
    };
    let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(&r.key)) else {
        return Ok(Err(ConfigProblem::SecretKeyMissing {
            name: r.name.clone(),
            key: r.key.clone(),
        }));
    };
    let Ok(text) = std::str::from_utf8(&bytes.0) else {
        return Ok(Err(ConfigProblem::InvalidUri {
            detail: "the Secret value is not UTF-8 text".into(),
        }));
    };
    Ok(BrokerUri::parse(text).map_err(|e| ConfigProblem::InvalidUri { detail: e.0 }))
}
