//! Apply: what a plan asks of the world, in order: the workers' quarantine list and
//! the quarantine queue (replays included), the pods to create and delete, the events,
//! the status, then the pool's alerts and metric series.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::observe::Seen;
use super::{Context, Error, truncate};
use crate::broker::BrokerUri;
use crate::core::{self, Plan};
use crate::crd::{FIELD_MANAGER, TestRunnerPool, Verdict};
use crate::metrics::{Metrics, PoolLabels, PoolReasonLabels};
use crate::pods;

/// Carries out `plan` for `pool`, as seen in `seen`.
pub(super) async fn apply(
    pool: &TestRunnerPool,
    plan: &Plan,
    seen: &Seen,
    ctx: &Context,
) -> Result<(), Error> {
    quarantine(pool, plan, seen.uri.as_ref(), ctx).await?;
    super::revisions::apply(pool, &plan.revisions, ctx).await?;
    pods_and_events(pool, plan, &seen.pods, ctx).await?;
    write_status(pool, plan, ctx).await?;
    let (ns, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
    let receivers = alert_receivers(pool, ctx).await;
    let alerts = core::alerting::active_alerts(
        &ns,
        &name,
        &plan.status,
        &pool.spec.alerts.on,
        Timestamp::now(),
    );
    ctx.alerter.sync((ns, name), receivers, alerts);
    record_metrics(pool, plan, &ctx.metrics);
    Ok(())
}

/// Keeps the workers' quarantine list and the quarantine queue in step with the plan,
/// and returns replayed tickets to the work queue. The list is written before the
/// replay, so that workers stop diverting a ticket before it comes back.
async fn quarantine(
    pool: &TestRunnerPool,
    plan: &Plan,
    uri: Option<&BrokerUri>,
    ctx: &Context,
) -> Result<(), Error> {
    let had_list = pool
        .status
        .as_ref()
        .and_then(|s| s.quarantine.as_ref())
        .is_some_and(|q| !q.tickets.is_empty());
    if let Some(uri) = uri
        && plan.replay_dead_lettered
    {
        let quarantine_queue = pool.spec.queue.quarantine_queue_name();
        if matches!(
            ctx.brokers.probe(uri, &quarantine_queue).await,
            crate::broker::Probe::Depth { ready, .. } if ready > 0
        ) {
            let listed: Vec<String> = plan.quarantine_list.iter().map(|t| t.id.clone()).collect();
            let moved = ctx
                .brokers
                .replay_where(
                    uri,
                    &quarantine_queue,
                    &pool.spec.queue.name,
                    crate::broker::ReplayFilter::DeadLettered { except: &listed },
                )
                .await
                .map_err(|source| Error::Broker {
                    operation: "replay dead-lettered tickets".into(),
                    source,
                })?;
            if !moved.is_empty() {
                info!(
                    replayed = moved.len(),
                    "returned tickets the broker dead-lettered while workers crashed"
                );
                let event = Event {
                    type_: EventType::Normal,
                    reason: "TicketsReplayed".into(),
                    note: Some(truncate(
                        &format!(
                            "Returned {} ticket(s) the broker dead-lettered into {quarantine_queue} while workers crashed (the environment recovered, or a failed canary is gone): {}",
                            moved.len(),
                            moved.join(", ")
                        ),
                        1024,
                    )),
                    action: "Replay".into(),
                    secondary: None,
                };
                let _ = ctx.recorder.publish(&event, &pool.object_ref(&())).await;
            }
        }
    }
    // Workers move listed tickets into the quarantine queue, and while the environment
    // is broken they set aside the tickets that reach the queue's delivery limit into it:
    // it must exist by then.
    let broken = plan
        .status
        .diagnosis
        .as_ref()
        .is_some_and(|d| d.verdict == crate::crd::Verdict::BrokenEnvironment);
    if let Some(uri) = uri
        && (broken || !plan.quarantine_list.is_empty())
    {
        let quarantine_queue = pool.spec.queue.quarantine_queue_name();
        ctx.brokers
            .ensure_queue(uri, &quarantine_queue)
            .await
            .map_err(|source| Error::Broker {
                operation: format!("declare queue {quarantine_queue:?}"),
                source,
            })?;
    }
    if plan.quarantine_list.is_empty() && !had_list && plan.replay.is_empty() {
        return Ok(());
    }
    let ns = pool.namespace().unwrap_or_default();
    let name = pods::quarantine_config_map(pool);
    let list: String = plan
        .quarantine_list
        .iter()
        .map(|t| core::quarantine::list_entry(t).render())
        .collect();
    let config_map = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": pods::selector_labels(&pool.name_any()),
            "ownerReferences": [pool.controller_owner_ref(&())],
        },
        "data": {pods::QUARANTINE_KEY: list},
    });
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    cms.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&config_map),
    )
    .await
    .map_err(Error::WriteQuarantineList)?;
    let Some(uri) = uri else {
        return Ok(());
    };
    let quarantine_queue = pool.spec.queue.quarantine_queue_name();
    if !plan.replay.is_empty() {
        let moved = ctx
            .brokers
            .replay(
                uri,
                &quarantine_queue,
                &pool.spec.queue.name,
                Some(&plan.replay),
            )
            .await
            .map_err(|source| Error::Broker {
                operation: "replay quarantined tickets".into(),
                source,
            })?;
        info!(
            replayed = moved.len(),
            asked = plan.replay.len(),
            "replayed quarantined tickets"
        );
    }
    Ok(())
}

async fn create_pod(
    pool: &TestRunnerPool,
    batch: &core::PodBatch,
    pods_api: &Api<Pod>,
    ctx: &Context,
) -> Result<(), Error> {
    let pod_name = pods::pod_name(&pool.name_any());
    let pod = pods::build_pod(pool, &pod_name, &batch.revision, &ctx.settings.pods);
    pods_api
        .patch(
            &pod_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&pod),
        )
        .await
        .map_err(|source| Error::CreatePod {
            name: pod_name.clone(),
            source,
        })?;
    info!(pod = %pod_name, revision = %batch.revision, canary = batch.canary, "created worker pod");
    Ok(())
}

async fn pods_and_events(
    pool: &TestRunnerPool,
    plan: &Plan,
    pods_api: &Api<Pod>,
    ctx: &Context,
) -> Result<(), Error> {
    for batch in &plan.create {
        // Stable pods are built from the stable revision's ControllerRevision, canaries
        // from the spec.
        let mut at_revision = pool.clone();
        at_revision.spec = pool.spec.with_workload(&batch.workload);
        for _ in 0..batch.count {
            create_pod(&at_revision, batch, pods_api, ctx).await?;
        }
    }
    for pod_name in &plan.delete {
        match pods_api.delete(pod_name, &DeleteParams::default()).await {
            Ok(_) => info!(pod = %pod_name, "deleting worker pod; it drains the ticket in hand"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(Error::DeletePod {
                    name: pod_name.clone(),
                    source,
                });
            }
        }
    }
    let reference = pool.object_ref(&());
    for ev in &plan.events {
        let event = Event {
            type_: if ev.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: ev.reason.to_string(),
            note: Some(truncate(&ev.note, 1024)),
            action: ev.action.to_string(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(reason = %ev.reason, error = %e, "failed to publish event");
        }
    }
    Ok(())
}

async fn write_status(pool: &TestRunnerPool, plan: &Plan, ctx: &Context) -> Result<(), Error> {
    if !core::status_changed(pool.status.as_ref(), &plan.status) {
        return Ok(());
    }
    let api: Api<TestRunnerPool> =
        Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default());
    let body = json!({
        "apiVersion": TestRunnerPool::api_version(&()),
        "kind": TestRunnerPool::kind(&()),
        "status": plan.status,
    });
    api.patch_status(
        &pool.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(Error::WriteStatus)?;
    Ok(())
}

fn record_metrics(pool: &TestRunnerPool, plan: &Plan, metrics: &Metrics) {
    let labels = PoolLabels {
        namespace: pool.namespace().unwrap_or_default(),
        pool: pool.name_any(),
    };
    if let Some(q) = &plan.status.queue {
        metrics.queue_ready.get_or_create(&labels).set(q.ready);
        metrics
            .queue_consumers
            .get_or_create(&labels)
            .set(q.consumers);
    }
    if let Some(w) = &plan.status.workers {
        for (family, value) in [
            (&metrics.workers_desired, w.desired),
            (&metrics.workers_current, w.current),
            (&metrics.workers_ready, w.ready),
            (&metrics.workers_busy, w.busy),
        ] {
            family.get_or_create(&labels).set(value as i64);
        }
    }
    for c in &plan.new_crashes {
        metrics
            .worker_crashes
            .get_or_create(&PoolReasonLabels {
                namespace: labels.namespace.clone(),
                pool: labels.pool.clone(),
                reason: if c.reason.is_empty() {
                    "Error".into()
                } else {
                    c.reason.clone()
                },
            })
            .inc();
    }
    metrics.quarantined_tickets.get_or_create(&labels).set(
        plan.status
            .quarantine
            .as_ref()
            .map_or(0, |q| q.count as i64),
    );
    if !plan.replay.is_empty() {
        metrics
            .replayed_tickets
            .get_or_create(&labels)
            .inc_by(plan.replay.len() as u64);
    }
    if let Some(d) = &plan.status.diagnosis {
        for &v in Verdict::ALL {
            metrics
                .verdict
                .get_or_create(&PoolReasonLabels {
                    namespace: labels.namespace.clone(),
                    pool: labels.pool.clone(),
                    reason: v.to_string(),
                })
                .set((d.verdict == v) as i64);
        }
    }
    if let Some(r) = &plan.status.rollout {
        metrics
            .rollout_failed
            .get_or_create(&labels)
            .set(core::rollout::failed(r) as i64);
        let phase = serde_json::to_value(r.phase).unwrap_or_default();
        for p in crate::metrics::ROLLOUT_PHASES {
            metrics
                .rollout_phase
                .get_or_create(&PoolReasonLabels {
                    namespace: labels.namespace.clone(),
                    pool: labels.pool.clone(),
                    reason: p.into(),
                })
                .set((phase == p) as i64);
        }
    }
    let unreachable = plan
        .status
        .conditions
        .iter()
        .any(|c| c.type_ == core::ConditionType::BrokerReachable && c.status == "False");
    metrics
        .broker_unreachable
        .get_or_create(&labels)
        .set(unreachable as i64);
}

/// The pool's alert receivers. A webhook Secret that cannot be read leaves the
/// webhook out (with a warning) rather than failing the reconcile.
async fn alert_receivers(pool: &TestRunnerPool, ctx: &Context) -> crate::alerts::Receivers {
    let spec = &pool.spec.alerts;
    let alertmanager_url = spec
        .alertmanager_url
        .as_deref()
        .and_then(|u| url::Url::parse(u).ok());
    let webhook_url = match &spec.webhook_secret_ref {
        None => None,
        Some(r) => {
            let secrets: Api<Secret> =
                Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default());
            match secrets.get_opt(&r.name).await {
                Ok(Some(s)) => s
                    .data
                    .as_ref()
                    .and_then(|d| d.get(&r.key))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok())
                    .map(|u| u.trim().to_string()),
                Ok(None) => {
                    warn!(secret = %r.name, "alert webhook Secret not found");
                    None
                }
                Err(e) => {
                    warn!(secret = %r.name, error = %e, "failed to read the alert webhook Secret");
                    None
                }
            }
        }
    };
    crate::alerts::Receivers {
        alertmanager_url,
        webhook_url,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::fixtures::{depth, pool, t};
    use crate::crd::{RolloutPhase, RolloutReason};

    #[test]
    fn busy_workers_are_a_metric_and_go_with_the_pool() {
        use crate::core::fixtures::pod;
        use crate::core::{Activity, PodState};
        let p = pool();
        let mut busy = pod("unit-a", &core::revision(&p.spec), PodState::Ready, 0);
        busy.activity = Activity::Busy {
            ticket: "t-1".into(),
        };
        let plan = core::plan(&p, &depth(0, 1, vec![busy]), t(0));
        let metrics = Metrics::default();
        record_metrics(&p, &plan, &metrics);
        let text = metrics.encode();
        assert!(
            text.contains(r#"testrunner_workers_busy{namespace="ci",pool="unit"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"testrunner_workers_desired{namespace="ci",pool="unit"} 1"#));
        metrics.forget_pool(&PoolLabels {
            namespace: "ci".into(),
            pool: "unit".into(),
        });
        assert!(!metrics.encode().contains("testrunner_workers_busy{"));
    }

    #[test]
    fn rollout_metrics_follow_the_status_and_go_with_the_pool() {
        let p = pool();
        let mut plan = core::plan(&p, &depth(0, 0, vec![]), t(0));
        let metrics = Metrics::default();
        record_metrics(&p, &plan, &metrics);
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"testrunner_rollout_phase{namespace="ci",pool="unit",reason="Promoted"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"testrunner_rollout_failed{namespace="ci",pool="unit"} 0"#));

        let rollout = plan.status.rollout.as_mut().unwrap();
        rollout.phase = RolloutPhase::RolledBack;
        rollout.reason = Some(RolloutReason::CanaryCrashedOnTickets);
        record_metrics(&p, &plan, &metrics);
        let text = metrics.encode();
        assert!(text.contains(r#"testrunner_rollout_failed{namespace="ci",pool="unit"} 1"#));
        assert!(text.contains(
            r#"testrunner_rollout_phase{namespace="ci",pool="unit",reason="RolledBack"} 1"#
        ));
        assert!(text.contains(
            r#"testrunner_rollout_phase{namespace="ci",pool="unit",reason="Promoted"} 0"#
        ));

        metrics.forget_pool(&PoolLabels {
            namespace: "ci".into(),
            pool: "unit".into(),
        });
        assert!(!metrics.encode().contains(r#"pool="unit""#));
    }
}
