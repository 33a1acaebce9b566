//! Worker pods: how the operator builds them (pure) and how it reads them back.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, Pod, PodSecurityContext,
    PodSpec, SeccompProfile, SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::core::{PodState, PodView};
use crate::crd::{
    APP_NAME, LABEL_POOL, LABEL_REVISION, MANAGED_BY, TestRunnerPool, WorkerMode,
};

/// Name of the worker container.
pub const WORKER_CONTAINER: &str = "worker";
/// Name of the init container that installs the wrapper (Wrapped mode).
pub const INSTALL_CONTAINER: &str = "install-worker";
/// Where the wrapper binary lives inside worker pods (Wrapped mode).
pub const WRAPPER_DIR: &str = "/testrunner";
/// Path of the wrapper binary inside worker pods (Wrapped mode).
pub const WRAPPER_PATH: &str = "/testrunner/testrunner-operator";
/// Default grace period of worker pods: time to finish the ticket in hand.
pub const DEFAULT_GRACE_SECONDS: i64 = 600;

/// What the pod builder needs besides the pool.
#[derive(Clone, Debug)]
pub struct PodSettings {
    /// The operator's own image, used by the init container in Wrapped mode.
    pub operator_image: String,
}

/// Labels that select a pool's worker pods.
pub fn selector_labels(pool_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), APP_NAME.to_string()),
        ("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
        (LABEL_POOL.to_string(), pool_name.to_string()),
    ])
}

/// The label selector string for a pool's pods.
pub fn selector(pool_name: &str) -> String {
    selector_labels(pool_name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// Builds worker pod `name` of `revision` for `pool`.
pub fn build_pod(pool: &TestRunnerPool, name: &str, revision: &str, settings: &PodSettings) -> Pod {
    let spec = &pool.spec;
    let overrides = spec.template.clone().unwrap_or_default();
    let mut labels = overrides.labels.clone();
    labels.extend(selector_labels(&pool.name_any()));
    labels.insert(LABEL_REVISION.into(), revision.into());

    let mut env_vars = vec![
        env("TESTRUNNER_POOL", &pool.name_any()),
        env("TESTRUNNER_QUEUE", &spec.queue.name),
        env("TESTRUNNER_QUARANTINE_QUEUE", &spec.queue.quarantine_queue_name()),
        env("TESTRUNNER_IMAGE", &spec.image),
        env("TESTRUNNER_REVISION", revision),
        EnvVar {
            name: "TESTRUNNER_AMQP_URI".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: spec.queue.connection_secret_ref.name.clone(),
                    key: spec.queue.connection_secret_ref.key.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
        },
    ];
    env_vars.extend(overrides.env.iter().cloned());

    let container_security = overrides.container_security_context.clone().unwrap_or(SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    });

    let mut volumes = overrides.volumes.clone();
    let mut mounts = overrides.volume_mounts.clone();
    let mut init_containers = Vec::new();
    let (command, args) = match spec.worker.mode {
        WorkerMode::Wrapped => {
            volumes.push(Volume {
                name: "testrunner-bin".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            });
            let mount = VolumeMount {
                name: "testrunner-bin".into(),
                mount_path: WRAPPER_DIR.into(),
                ..Default::default()
            };
            mounts.push(VolumeMount {
                read_only: Some(true),
                ..mount.clone()
            });
            init_containers.push(Container {
                name: INSTALL_CONTAINER.into(),
                image: Some(settings.operator_image.clone()),
                command: Some(vec![
                    "testrunner-operator".into(),
                    "install-worker".into(),
                    WRAPPER_PATH.into(),
                ]),
                volume_mounts: Some(vec![mount]),
                security_context: Some(container_security.clone()),
                ..Default::default()
            });
            let mut args = vec!["worker".to_string(), "--".to_string()];
            args.extend(spec.command.iter().cloned());
            (Some(vec![WRAPPER_PATH.to_string()]), Some(args))
        }
        WorkerMode::Native => {
            let command = (!spec.command.is_empty()).then(|| spec.command.clone());
            (command, None)
        }
    };

    let worker = Container {
        name: WORKER_CONTAINER.into(),
        image: Some(spec.image.clone()),
        image_pull_policy: overrides.image_pull_policy.clone(),
        command,
        args,
        env: Some(env_vars),
        env_from: (!overrides.env_from.is_empty()).then(|| overrides.env_from.clone()),
        resources: overrides.resources.clone(),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        termination_message_path: Some("/dev/termination-log".into()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(container_security),
        ..Default::default()
    };

    let pod_security = overrides.security_context.clone().unwrap_or(PodSecurityContext {
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    });

    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: pool.namespace(),
            labels: Some(labels),
            annotations: (!overrides.annotations.is_empty()).then(|| overrides.annotations.clone()),
            owner_references: pool.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![worker],
            init_containers: (!init_containers.is_empty()).then_some(init_containers),
            volumes: (!volumes.is_empty()).then_some(volumes),
            restart_policy: Some("Always".into()),
            termination_grace_period_seconds: Some(
                overrides
                    .termination_grace_period_seconds
                    .unwrap_or(DEFAULT_GRACE_SECONDS),
            ),
            node_selector: (!overrides.node_selector.is_empty()).then(|| overrides.node_selector.clone()),
            tolerations: (!overrides.tolerations.is_empty()).then(|| overrides.tolerations.clone()),
            affinity: overrides.affinity.clone(),
            service_account_name: overrides.service_account_name.clone(),
            image_pull_secrets: (!overrides.image_pull_secrets.is_empty())
                .then(|| overrides.image_pull_secrets.clone()),
            priority_class_name: overrides.priority_class_name.clone(),
            security_context: Some(pod_security),
            ..Default::default()
        }),
        status: None,
    }
}

/// Reads back what decisions need of a pod.
pub fn view(pod: &Pod) -> PodView {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let state = if pod.metadata.deletion_timestamp.is_some() {
        PodState::Terminating
    } else {
        match phase {
            "Succeeded" | "Failed" => PodState::Finished,
            "Running" if ready => PodState::Ready,
            "Running" => PodState::Starting,
            _ => PodState::Pending,
        }
    };
    PodView {
        name: pod.name_any(),
        revision: pod
            .labels()
            .get(LABEL_REVISION)
            .cloned()
            .unwrap_or_default(),
        state,
        created: pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_default(),
    }
}

/// A new worker pod name: `<pool>-<5 random characters>`, like Kubernetes' generateName.
pub fn pod_name(pool: &str) -> String {
    use rand::RngExt;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    let suffix: String = (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    let prefix: String = pool.chars().take(63 - 6).collect();
    format!("{prefix}-{suffix}")
}
