//! Worker pods: how the operator builds them (pure) and how it reads them back.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile,
    SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::contract::WORKER_CONTAINER;
use crate::core::{Activity, PodState, PodView};
use crate::crd::{APP_NAME, LABEL_POOL, LABEL_REVISION, MANAGED_BY, TestRunnerPool, WorkerMode};

/// Name of the init container that installs the wrapper (Wrapped mode).
pub const INSTALL_CONTAINER: &str = "install-worker";
/// Where the wrapper binary lives inside worker pods (Wrapped mode).
pub const WRAPPER_DIR: &str = "/testrunner";
/// Path of the wrapper binary inside worker pods (Wrapped mode).
pub const WRAPPER_PATH: &str = "/testrunner/testrunner-operator";
/// Name of the broker sidecar (Wrapped mode): a native sidecar (an init container with
/// `restartPolicy: Always`) that alone gets the broker credentials.
pub const BROKER_CONTAINER: &str = "broker";
/// Where the broker sidecar's socket lives in both containers (Wrapped mode).
pub const SOCKET_DIR: &str = "/run/testrunner";
/// The broker sidecar's socket (Wrapped mode).
pub const SOCKET_PATH: &str = "/run/testrunner/broker.sock";
/// The user (and group) the broker sidecar runs as: not the test container's, so that
/// even a pod that shares its process namespace keeps the sidecar's environment from
/// the tests.
pub const BROKER_USER: i64 = 65533;
/// Default grace period of worker pods: time to finish the ticket in hand.
pub const DEFAULT_GRACE_SECONDS: i64 = 600;
/// Annotation on worker pods whose worker reports its state (idle, or the ticket in
/// hand) on the outcome queue: the operator removes them only when they are idle.
pub const ANNOTATION_REPORTS: &str = "testrunner.dev/reports";
/// Value of [`ANNOTATION_REPORTS`].
pub const REPORTS_STATE: &str = "state";
/// How often a wrapped worker repeats its state on the outcome queue, so that an
/// operator that restarted (or lost its connection) learns it again.
pub const REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// What the pod builder needs besides the pool.
#[derive(Clone, Debug)]
pub struct PodSettings {
    /// The operator's own image, used by the init container in Wrapped mode.
    pub operator_image: String,
    /// How often wrapped workers repeat their state ([`REPORT_INTERVAL`] by default).
    pub report_interval: std::time::Duration,
    /// The log format of the wrapper and the broker sidecar: the operator's own.
    pub log_format: crate::telemetry::LogFormat,
    /// The outcome queues are `<prefix>.<namespace>` ([`DEFAULT_OUTCOME_QUEUE_PREFIX`] by
    /// default): operators of two clusters that share a broker and namespace names
    /// need different prefixes, or each reads reports of the other's workers.
    pub outcome_queue_prefix: String,
}

/// The default prefix of the outcome queues.
pub const DEFAULT_OUTCOME_QUEUE_PREFIX: &str = "testrunner.outcomes";

/// Checks an outcome queue prefix: `<prefix>.<namespace>` must be a queue name a client
/// may declare (at most 255 bytes with a namespace of up to 63, not `amq.`).
pub fn check_outcome_queue_prefix(prefix: &str) -> Result<String, String> {
    if prefix.is_empty() {
        return Err("the outcome queue prefix is empty".into());
    }
    if prefix.len() > 255 - 64 {
        return Err(format!(
            "the outcome queue prefix has {} bytes: at most {} leave room for `.<namespace>`",
            prefix.len(),
            255 - 64
        ));
    }
    if prefix.starts_with("amq.") {
        return Err("queue names starting with `amq.` are reserved by the broker".into());
    }
    Ok(prefix.to_string())
}

/// The environment variable that names the outcome queue in worker pods (in the broker
/// sidecar in Wrapped mode, in the worker container in Native mode).
pub const ENV_OUTCOMES_QUEUE: &str = "TESTRUNNER_OUTCOMES_QUEUE";

/// The queue workers report their state and completed tickets to: one per namespace
/// (and broker), shared by its pools, declared by the operator (`<prefix>.<namespace>`).
pub fn outcomes_queue(pool: &TestRunnerPool, prefix: &str) -> String {
    format!("{prefix}.{}", pool.namespace().unwrap_or_default())
}

/// The queue of a pool's own that operators before the shared outcome queue declared
/// (`testrunner.outcomes.<namespace>.<pool>`): workers they started still report there.
pub fn legacy_outcomes_queue(pool: &TestRunnerPool) -> String {
    format!(
        "{DEFAULT_OUTCOME_QUEUE_PREFIX}.{}.{}",
        pool.namespace().unwrap_or_default(),
        pool.name_any()
    )
}

/// The outcome queue `pod`'s worker reports to, as its spec names it: in the broker
/// sidecar (Wrapped mode), else in the worker container (Native mode).
pub fn outcome_queue_of(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let reporter = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == BROKER_CONTAINER)
        .or_else(|| spec.containers.iter().find(|c| c.name == WORKER_CONTAINER))?;
    reporter
        .env
        .iter()
        .flatten()
        .rev()
        .find(|e| e.name == ENV_OUTCOMES_QUEUE)
        .and_then(|e| e.value.clone())
        .filter(|q| !q.is_empty())
}

/// The ConfigMap that lists the pool's quarantined tickets for its workers.
pub fn quarantine_config_map(pool: &TestRunnerPool) -> String {
    format!("{}-quarantine", pool.name_any())
}

/// Where workers find the quarantine list.
pub const QUARANTINE_DIR: &str = "/etc/testrunner/quarantine";
/// The key (file) of the quarantine list in its ConfigMap.
pub const QUARANTINE_KEY: &str = "tickets";

/// Labels that select a pool's worker pods.
pub fn selector_labels(pool_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), APP_NAME.to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
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
    let overrides = spec.workload.template.clone().unwrap_or_default();
    let mut labels = overrides.labels.clone();
    labels.extend(selector_labels(&pool.name_any()));
    labels.insert(LABEL_REVISION.into(), revision.into());

    // What both containers are told about the pod.
    let pod_env = vec![
        env("TESTRUNNER_POOL", &pool.name_any()),
        env("TESTRUNNER_POOL_UID", &pool.uid().unwrap_or_default()),
        env("TESTRUNNER_IMAGE", &spec.workload.image),
        env("TESTRUNNER_REVISION", revision),
        EnvVar {
            name: "TESTRUNNER_POD_NAME".into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        },
    ];
    // What the consumer of the queue needs: the sidecar in Wrapped mode, the image's own
    // consumer in Native mode. The broker URI comes from the Secret only.
    let broker_env = vec![
        env("TESTRUNNER_QUEUE", &spec.queue.name),
        env(
            "TESTRUNNER_QUARANTINE_QUEUE",
            &spec.queue.quarantine_queue_name(),
        ),
        env(
            ENV_OUTCOMES_QUEUE,
            &outcomes_queue(pool, &settings.outcome_queue_prefix),
        ),
        env(
            "TESTRUNNER_REPORT_INTERVAL",
            &format!("{}ms", settings.report_interval.as_millis()),
        ),
        env(
            "TESTRUNNER_QUARANTINE_FILE",
            &format!("{QUARANTINE_DIR}/{QUARANTINE_KEY}"),
        ),
        env(
            "TESTRUNNER_DELIVERY_LIMIT",
            &spec.queue.delivery_limit().to_string(),
        ),
        EnvVar {
            name: crate::worker::ENV_AMQP_URI.into(),
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
    let wrapped = spec.workload.worker.mode == WorkerMode::Wrapped;
    // The wrapper and the sidecar log as the operator does (JSON where the chart asks).
    let log_env = match settings.log_format {
        crate::telemetry::LogFormat::Json => vec![env(crate::telemetry::ENV_LOG_FORMAT, "json")],
        crate::telemetry::LogFormat::Pretty => Vec::new(),
    };

    let container_security =
        overrides
            .container_security_context
            .clone()
            .unwrap_or(SecurityContext {
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Default::default()
                }),
                ..Default::default()
            });

    let mut volumes = overrides.volumes.clone();
    let mut mounts = overrides.volume_mounts.clone();
    // The quarantine list: optional, so pods start before the operator writes it. It goes
    // to whoever consumes the queue.
    volumes.push(Volume {
        name: "testrunner-quarantine".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: quarantine_config_map(pool),
            optional: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    });
    let quarantine_mount = VolumeMount {
        name: "testrunner-quarantine".into(),
        mount_path: QUARANTINE_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    };
    let mut env_vars = pod_env.clone();
    let mut init_containers = Vec::new();
    let (command, args) = if wrapped {
        volumes.push(Volume {
            name: "testrunner-bin".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "testrunner-socket".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
        let bin_mount = VolumeMount {
            name: "testrunner-bin".into(),
            mount_path: WRAPPER_DIR.into(),
            ..Default::default()
        };
        let socket_mount = VolumeMount {
            name: "testrunner-socket".into(),
            mount_path: SOCKET_DIR.into(),
            ..Default::default()
        };
        mounts.push(VolumeMount {
            read_only: Some(true),
            ..bin_mount.clone()
        });
        mounts.push(socket_mount.clone());
        init_containers.push(Container {
            name: INSTALL_CONTAINER.into(),
            image: Some(settings.operator_image.clone()),
            command: Some(vec![
                "testrunner-operator".into(),
                "install-worker".into(),
                WRAPPER_PATH.into(),
            ]),
            volume_mounts: Some(vec![bin_mount]),
            security_context: Some(container_security.clone()),
            ..Default::default()
        });
        let socket_env = env(crate::worker::ENV_BROKER_SOCKET, SOCKET_PATH);
        let mut sidecar_env = pod_env;
        sidecar_env.extend(broker_env);
        sidecar_env.push(socket_env.clone());
        sidecar_env.extend(log_env.clone());
        init_containers.push(Container {
            name: BROKER_CONTAINER.into(),
            image: Some(settings.operator_image.clone()),
            command: Some(vec!["testrunner-operator".into(), "broker-sidecar".into()]),
            // A native sidecar: it starts before the worker and stops after it.
            restart_policy: Some("Always".into()),
            env: Some(sidecar_env),
            volume_mounts: Some(vec![socket_mount, quarantine_mount]),
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_string(), Quantity("10m".into())),
                    ("memory".to_string(), Quantity("32Mi".into())),
                ])),
                ..Default::default()
            }),
            termination_message_path: Some("/dev/termination-log".into()),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Default::default()
                }),
                run_as_non_root: Some(true),
                run_as_user: Some(BROKER_USER),
                run_as_group: Some(BROKER_USER),
                read_only_root_filesystem: Some(true),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        env_vars.push(socket_env);
        env_vars.extend(log_env);
        let mut args = vec!["worker".to_string(), "--".to_string()];
        args.extend(spec.workload.command.iter().cloned());
        (Some(vec![WRAPPER_PATH.to_string()]), Some(args))
    } else {
        env_vars.extend(broker_env);
        mounts.push(quarantine_mount);
        let command = (!spec.workload.command.is_empty()).then(|| spec.workload.command.clone());
        (command, None)
    };
    env_vars.extend(overrides.env.iter().cloned());

    let worker = Container {
        name: WORKER_CONTAINER.into(),
        image: Some(spec.workload.image.clone()),
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

    let pod_security = overrides
        .security_context
        .clone()
        .unwrap_or(PodSecurityContext {
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
            annotations: {
                let mut annotations = overrides.annotations.clone();
                if wrapped {
                    annotations.insert(ANNOTATION_REPORTS.into(), REPORTS_STATE.into());
                }
                (!annotations.is_empty()).then_some(annotations)
            },
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
            node_selector: (!overrides.node_selector.is_empty())
                .then(|| overrides.node_selector.clone()),
            tolerations: (!overrides.tolerations.is_empty()).then(|| overrides.tolerations.clone()),
            affinity: overrides.affinity.clone(),
            service_account_name: overrides.service_account_name.clone(),
            // Workers need no API access: the tests get a token only from a service
            // account the pool names.
            automount_service_account_token: Some(overrides.service_account_name.is_some()),
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
        // What the worker does comes from its reports; until one arrives it may be busy.
        activity: if pod
            .annotations()
            .get(ANNOTATION_REPORTS)
            .map(String::as_str)
            == Some(REPORTS_STATE)
        {
            Activity::Unknown
        } else {
            Activity::Untracked
        },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::fixtures::{pool, pool_yaml};

    const OPERATOR_IMAGE: &str = "registry.example/testrunner-operator:0.1.0";

    fn settings() -> PodSettings {
        PodSettings {
            operator_image: OPERATOR_IMAGE.into(),
            report_interval: REPORT_INTERVAL,
            log_format: crate::telemetry::LogFormat::Pretty,
            outcome_queue_prefix: DEFAULT_OUTCOME_QUEUE_PREFIX.into(),
        }
    }

    fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a EnvVar> {
        c.env.as_ref()?.iter().find(|e| e.name == name)
    }

    /// What every worker container gets, wrapped or native: the queue in its
    /// environment, the broker URI from the Secret only, the termination log.
    fn assert_connection_settings(worker: &Container) {
        let queue = env_value(worker, "TESTRUNNER_QUEUE").unwrap();
        assert_eq!(queue.value.as_deref(), Some("tickets.unit"));
        let uri = env_value(worker, "TESTRUNNER_AMQP_URI").unwrap();
        assert_eq!(uri.value, None, "the URI never appears in the pod spec");
        let secret = uri.value_from.as_ref().unwrap().secret_key_ref.as_ref();
        let secret = secret.unwrap();
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("rabbitmq", "uri")
        );
        assert_eq!(
            worker.termination_message_path.as_deref(),
            Some("/dev/termination-log")
        );
    }

    fn worker_args() -> clap::Command {
        use clap::Args;
        crate::worker::WorkerArgs::augment_args(clap::Command::new("worker"))
    }

    #[test]
    fn wrapped_pod_installs_the_wrapper_and_runs_the_command_behind_it() {
        let mut p = pool();
        p.spec.workload.command = vec!["/run-tests".into(), "--fast".into(), "-x".into()];
        let pod = build_pod(&p, "unit-b2c4d", "rev1", &settings());
        let spec = pod.spec.as_ref().unwrap();

        let volumes = spec.volumes.as_ref().unwrap();
        let bin = volumes.iter().find(|v| v.name == "testrunner-bin").unwrap();
        assert!(bin.empty_dir.is_some(), "the wrapper lives in an emptyDir");

        let init = spec.init_containers.as_ref().unwrap();
        assert_eq!(init.len(), 2);
        assert_eq!(init[0].name, INSTALL_CONTAINER);
        assert_eq!(init[0].image.as_deref(), Some(OPERATOR_IMAGE));
        assert_eq!(
            init[0].command.as_deref().unwrap(),
            ["testrunner-operator", "install-worker", WRAPPER_PATH]
        );
        let init_mount = &init[0].volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (init_mount.name.as_str(), init_mount.mount_path.as_str()),
            ("testrunner-bin", WRAPPER_DIR)
        );
        assert_ne!(
            init_mount.read_only,
            Some(true),
            "the init container writes the binary"
        );
        assert!(WRAPPER_PATH.starts_with(&format!("{WRAPPER_DIR}/")));

        assert_eq!(spec.containers.len(), 1);
        let worker = &spec.containers[0];
        assert_eq!(worker.name, WORKER_CONTAINER);
        assert_eq!(
            worker.image.as_deref(),
            Some("registry.example/test-runner:1")
        );
        assert_eq!(worker.command.as_deref().unwrap(), [WRAPPER_PATH]);
        assert_eq!(
            worker.args.as_deref().unwrap(),
            ["worker", "--", "/run-tests", "--fast", "-x"]
        );
        let mount = worker
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "testrunner-bin")
            .unwrap();
        assert_eq!(mount.mount_path, WRAPPER_DIR);
        assert_eq!(mount.read_only, Some(true));

        // The broker sidecar alone consumes the queue and gets the credentials.
        let sidecar = &init[1];
        assert_eq!(sidecar.name, BROKER_CONTAINER);
        assert_eq!(sidecar.image.as_deref(), Some(OPERATOR_IMAGE));
        assert_eq!(
            sidecar.restart_policy.as_deref(),
            Some("Always"),
            "a native sidecar: started before the worker, stopped after it"
        );
        assert_eq!(
            sidecar.command.as_deref().unwrap(),
            ["testrunner-operator", "broker-sidecar"]
        );
        assert_connection_settings(sidecar);
        let sc = sidecar.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_user, Some(BROKER_USER));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        let paths = |c: &Container| -> Vec<String> {
            c.volume_mounts
                .iter()
                .flatten()
                .map(|m| m.mount_path.clone())
                .collect()
        };
        assert_eq!(paths(sidecar), [SOCKET_DIR, QUARANTINE_DIR]);
        assert_eq!(paths(worker), [WRAPPER_DIR, SOCKET_DIR]);
        assert!(SOCKET_PATH.starts_with(&format!("{SOCKET_DIR}/")));
        for c in [sidecar, worker] {
            assert_eq!(
                env_value(c, crate::worker::ENV_BROKER_SOCKET).and_then(|e| e.value.as_deref()),
                Some(SOCKET_PATH)
            );
        }
        // The test container holds nothing of the broker: no URI, no Secret.
        for name in [crate::worker::ENV_AMQP_URI, "TESTRUNNER_QUEUE"] {
            assert!(env_value(worker, name).is_none(), "{name} in the worker");
        }
        assert!(
            worker.env_from.is_none(),
            "nothing imported into the worker"
        );

        // Every flag the wrapper and the sidecar require is given through their
        // environment.
        use clap::Args;
        let sidecar_cmd =
            crate::worker::SidecarArgs::augment_args(clap::Command::new("broker-sidecar"));
        for (cmd, container) in [(worker_args(), worker), (sidecar_cmd, sidecar)] {
            for arg in cmd.get_arguments().filter(|a| a.is_required_set()) {
                if let Some(var) = arg.get_env() {
                    let var = var.to_str().unwrap();
                    assert!(
                        env_value(container, var).is_some(),
                        "{var} missing from the env of {}",
                        container.name
                    );
                }
            }
        }
        let cmd = worker_args();
        // And the wrapper's CLI reads the user's command, dashes included, after `--`.
        let mut argv = vec![
            "worker".to_string(),
            "--amqp-uri=amqp://h/".into(),
            "--queue=q".into(),
        ];
        argv.extend(worker.args.as_ref().unwrap()[1..].iter().cloned());
        let matches = cmd.try_get_matches_from(argv).unwrap();
        let command: Vec<String> = matches
            .get_many::<std::ffi::OsString>("command")
            .unwrap()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        assert_eq!(command, p.spec.workload.command);

        assert_eq!(
            spec.automount_service_account_token,
            Some(false),
            "no API token for the tests unless the pool names a service account"
        );

        let meta = &pod.metadata;
        assert_eq!(meta.labels.as_ref().unwrap()[LABEL_REVISION], "rev1");
        assert_eq!(meta.labels.as_ref().unwrap()[LABEL_POOL], "unit");
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("TestRunnerPool", Some(true))
        );
    }

    #[test]
    fn wrapper_and_sidecar_log_as_the_operator_does() {
        let json = PodSettings {
            log_format: crate::telemetry::LogFormat::Json,
            ..settings()
        };
        for (settings, expected) in [(settings(), None), (json, Some("json"))] {
            let pod = build_pod(&pool(), "unit-b2c4d", "rev1", &settings);
            let spec = pod.spec.unwrap();
            let sidecar = &spec.init_containers.as_ref().unwrap()[1];
            for c in [sidecar, &spec.containers[0]] {
                let format = env_value(c, crate::telemetry::ENV_LOG_FORMAT);
                assert_eq!(
                    format.and_then(|e| e.value.as_deref()),
                    expected,
                    "{}",
                    c.name
                );
            }
        }
    }

    #[test]
    fn workers_report_to_their_namespace_s_queue_and_name_their_pool() {
        let prefixed = PodSettings {
            outcome_queue_prefix: "testrunner.outcomes.east".into(),
            ..settings()
        };
        for (settings, queue) in [
            (settings(), "testrunner.outcomes.ci"),
            (prefixed, "testrunner.outcomes.east.ci"),
        ] {
            for p in [pool(), native_pool("command: [/run-tests]")] {
                let pod = build_pod(&p, "unit-b2c4d", "rev1", &settings);
                assert_eq!(outcome_queue_of(&pod).as_deref(), Some(queue));
                let spec = pod.spec.as_ref().unwrap();
                // Whoever reports (the sidecar, or a Native worker) names the pool.
                let reporter = spec
                    .init_containers
                    .iter()
                    .flatten()
                    .find(|c| c.name == BROKER_CONTAINER)
                    .unwrap_or(&spec.containers[0]);
                let value = |name| env_value(reporter, name).and_then(|e| e.value.as_deref());
                assert_eq!(value(ENV_OUTCOMES_QUEUE), Some(queue));
                assert_eq!(value("TESTRUNNER_POOL"), Some("unit"));
                assert_eq!(
                    value("TESTRUNNER_POOL_UID"),
                    Some("0b4d0c6e-0000-4000-8000-000000000001")
                );
            }
        }
        assert_eq!(
            legacy_outcomes_queue(&pool()),
            "testrunner.outcomes.ci.unit"
        );
    }

    #[test]
    fn the_outcome_queue_of_a_pod_is_the_one_its_reporter_names() {
        let mut pod = build_pod(&pool(), "unit-b2c4d", "rev1", &settings());
        // A variable of the test container is not what the sidecar reports to.
        let spec = pod.spec.as_mut().unwrap();
        spec.containers[0]
            .env
            .get_or_insert_default()
            .push(env(ENV_OUTCOMES_QUEUE, "elsewhere"));
        assert_eq!(
            outcome_queue_of(&pod).as_deref(),
            Some("testrunner.outcomes.ci")
        );
        // An older operator's pod: its pool's own queue.
        let spec = pod.spec.as_mut().unwrap();
        let sidecar = &mut spec.init_containers.as_mut().unwrap()[1];
        sidecar
            .env
            .get_or_insert_default()
            .retain(|e| e.name != ENV_OUTCOMES_QUEUE);
        sidecar
            .env
            .get_or_insert_default()
            .push(env(ENV_OUTCOMES_QUEUE, "testrunner.outcomes.ci.unit"));
        assert_eq!(
            outcome_queue_of(&pod).as_deref(),
            Some("testrunner.outcomes.ci.unit")
        );
        assert_eq!(outcome_queue_of(&Pod::default()), None);
    }

    #[test]
    fn outcome_queue_prefixes_are_checked() {
        assert!(check_outcome_queue_prefix("testrunner.outcomes.east").is_ok());
        assert!(check_outcome_queue_prefix("").is_err());
        assert!(check_outcome_queue_prefix("amq.outcomes").is_err());
        assert!(check_outcome_queue_prefix(&"x".repeat(192)).is_err());
        assert!(check_outcome_queue_prefix(&"x".repeat(191)).is_ok());
    }

    #[test]
    fn wrapped_is_the_default_mode() {
        let pod = build_pod(&pool(), "unit-b2c4d", "rev1", &settings());
        let spec = pod.spec.unwrap();
        assert!(spec.init_containers.is_some());
        assert_eq!(
            spec.containers[0].args.as_deref().unwrap(),
            ["worker", "--", "/run-tests"]
        );
    }

    fn native_pool(command: &str) -> TestRunnerPool {
        pool_yaml(&format!(
            r#"
apiVersion: testrunner.dev/v1alpha1
kind: TestRunnerPool
metadata: {{name: unit, namespace: ci, uid: 0b4d0c6e-0000-4000-8000-000000000001, generation: 1}}
spec:
  image: registry.example/amqp-runner:1
  {command}
  worker: {{mode: Native}}
  queue:
    name: tickets.unit
    connectionSecretRef: {{name: rabbitmq}}
"#
        ))
    }

    #[test]
    fn native_pod_runs_the_image_without_the_wrapper() {
        for (command, expected) in [
            (
                "command: [\"/consume\", \"--once\"]",
                Some(vec!["/consume", "--once"]),
            ),
            ("", None),
        ] {
            let pod = build_pod(&native_pool(command), "unit-b2c4d", "rev1", &settings());
            let spec = pod.spec.as_ref().unwrap();
            assert!(
                spec.init_containers.is_none(),
                "no init container in Native mode"
            );
            assert!(
                spec.volumes
                    .iter()
                    .flatten()
                    .all(|v| v.name != "testrunner-bin")
            );
            let worker = &spec.containers[0];
            // Only the quarantine list, which native workers may read too.
            let mounts: Vec<&str> = worker
                .volume_mounts
                .iter()
                .flatten()
                .map(|m| m.mount_path.as_str())
                .collect();
            assert_eq!(mounts, [QUARANTINE_DIR]);
            assert_eq!(
                worker.command,
                expected.map(|c| c.into_iter().map(String::from).collect::<Vec<_>>()),
                "the image's entrypoint unless a command is set"
            );
            assert_eq!(worker.args, None);
            assert_eq!(
                worker.image.as_deref(),
                Some("registry.example/amqp-runner:1")
            );
            // A native worker gets the same connection settings and termination log.
            assert_connection_settings(worker);
        }
    }
}
