//! Test fixtures for the core: pools and observations from YAML and builders.

use jiff::Timestamp;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::scaling::Decision;
use super::{BrokerView, Observed, PodState, PodView};
use crate::crd::{CrashStatus, TestRunnerPool};

/// A minimal valid pool.
pub fn pool() -> TestRunnerPool {
    pool_yaml(
        r#"
apiVersion: testrunner.dev/v1alpha1
kind: TestRunnerPool
metadata: {name: unit, namespace: ci, uid: 0b4d0c6e-0000-4000-8000-000000000001, generation: 1}
spec:
  image: registry.example/test-runner:1
  command: ["/run-tests"]
  queue:
    name: tickets.unit
    connectionSecretRef: {name: rabbitmq}
  scaling: {minWorkers: 0, maxWorkers: 5, scaleDownDelay: 2m}
"#,
    )
}

/// A pool from YAML.
pub fn pool_yaml(yaml: &str) -> TestRunnerPool {
    serde_saphyr::from_str(yaml).expect("fixture pool parses")
}

/// A time `secs` seconds after an arbitrary epoch.
pub fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

/// A pod of `revision` in `state`, created at `t(created)`.
pub fn pod(name: &str, revision: &str, state: PodState, created: i64) -> PodView {
    PodView {
        name: name.into(),
        revision: revision.into(),
        state,
        created: t(created),
        activity: Default::default(),
    }
}

/// An observation with a queue depth.
pub fn depth(ready: u64, consumers: u64, pods: Vec<PodView>) -> Observed {
    Observed {
        pods,
        broker: BrokerView::Depth {
            ready,
            consumers,
            at: t(0),
        },
        config_problem: None,
        ..Default::default()
    }
}

/// A recorded crash (exit 3) of worker `pod` on image `image`, holding `ticket`, at `t(at)`.
pub fn ticket_crash(pod: &str, ticket: &str, image: &str, at: i64) -> CrashStatus {
    CrashStatus {
        id: format!("{pod}/{ticket}/{at}"),
        pod: pod.into(),
        revision: "r".into(),
        image: image.into(),
        ticket: Some(ticket.into()),
        delivery: Some(1),
        state: None,
        exit_code: 3,
        signal: None,
        reason: "Error".into(),
        at: Time(t(at)),
    }
}

/// A scaling decision that wants `desired` workers, of which `current` exist and
/// `ready` are ready, and changes nothing.
pub fn decision(desired: i32, current: i32, ready: i32) -> Decision {
    Decision {
        desired,
        current,
        ready,
        busy: 0,
        warm: 0,
        queue_ready: 0,
        create: 0,
        create_canary: 0,
        replacing: false,
        delete: Vec::new(),
        scaled_down: 0,
        surplus_since: None,
        scale_down_wait: None,
    }
}
