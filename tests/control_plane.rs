//! `testrunner_sim::control_plane` against the real binaries: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler from `bash tests/control-plane/build.sh`
//! (in `<target>/control-plane/bin/`, or the directory env `TESTRUNNER_CONTROL_PLANE`
//! names). Those tests are ignored by default; `cargo test --test control_plane --
//! --ignored` runs them, and they fail when a binary is missing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use serde_json::json;
use testrunner_operator::crd::TestRunnerPool;
use testrunner_sim::control_plane::ControlPlane;

mod common;
use common::{eventually_some, init_logs, whole_control_plane_bin};

const NODE: &str = "simulated-node";
const NODE_USER: &str = "system:node:simulated-node";

/// A work directory of this test's own, that does not exist yet.
fn work_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("testrunner-cp-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A control plane with every component.
async fn start(test: &str) -> ControlPlane {
    init_logs();
    let started = std::time::Instant::now();
    let plane = ControlPlane::start(&whole_control_plane_bin(), &work_dir(test))
        .await
        .unwrap_or_else(|e| panic!("the control plane did not start: {e}"));
    eprintln!("{test}: control plane ready in {:.1?}", started.elapsed());
    assert!(plane.missing().is_empty(), "{:?}", plane.missing());
    plane
}

/// User name and groups the API server sees for `client`.
async fn whoami(client: &kube::Client) -> (String, Vec<String>) {
    let review = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview is allowed to everyone");
    let info = review.status.and_then(|s| s.user_info).unwrap_or_default();
    (
        info.username.unwrap_or_default(),
        info.groups.unwrap_or_default(),
    )
}

/// The HTTP status of a failed request (0 for an error that is not the API's).
fn status(e: &kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        _ => 0,
    }
}

fn pod(name: &str, node: Option<&str>) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "main", "image": "registry.example/app:1"}],
        },
    }))
    .unwrap()
}

/// True when `meta` names the object with `uid` among its owners.
fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|owner| owner.uid == uid)
}

/// True while a process whose command line names `dir` runs (a component of the control
/// plane that lived in `dir`).
fn runs_in(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()))
}

#[tokio::test]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --ignored"]
async fn apiserver_is_live_on_etcd_and_knows_its_clients() {
    let plane = start("livez").await;
    assert!(
        plane.url().starts_with("https://127.0.0.1:"),
        "{}",
        plane.url()
    );
    let admin = plane.admin_client().await.unwrap();
    let livez = admin
        .request_text(
            http::Request::get("/livez?verbose")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(livez.contains("[+]etcd ok"), "{livez}");

    let (user, groups) = whoami(&admin).await;
    assert_eq!(user, "admin");
    assert!(groups.contains(&"system:masters".to_string()), "{groups:?}");

    // Two groups, and the kubeconfig file route.
    let path = plane.work_dir().join("alice.kubeconfig");
    plane
        .write_kubeconfig(&path, "alice", &["team-a", "team-b"])
        .unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(config.default_namespace, "default");
    let alice = kube::Client::try_from(config).unwrap();
    let (user, groups) = whoami(&alice).await;
    assert_eq!(user, "alice");
    for group in ["team-a", "team-b", "system:authenticated"] {
        assert!(groups.contains(&group.to_string()), "{group} in {groups:?}");
    }
    // Alice has no role: RBAC denies her.
    let denied = Api::<Pod>::default_namespaced(alice)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(status(&denied), 403, "{denied}");
    plane.stop().await;
}

#[tokio::test]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --ignored"]
async fn the_crd_is_established() {
    let plane = start("crd").await;
    let admin = plane.admin_client().await.unwrap();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/testrunnerpools.testrunner.dev.yaml"
    ))
    .unwrap();
    let crd: CustomResourceDefinition = serde_saphyr::from_str(&text).unwrap();
    let crds = Api::<CustomResourceDefinition>::all(admin.clone());
    crds.create(&PostParams::default(), &crd).await.unwrap();
    eventually_some("the CRD Established", Duration::from_secs(60), || async {
        let crd = crds.get("testrunnerpools.testrunner.dev").await.ok()?;
        let conditions = crd.status?.conditions?;
        conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await;
    // Served: an empty list.
    let pools = Api::<TestRunnerPool>::default_namespaced(admin)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(pools.items.is_empty());
    plane.stop().await;
}

/// What a kubelet-like node does with identity `system:node:simulated-node` in
/// `system:nodes`, under the Node authorizer and NodeRestriction admission.
#[tokio::test]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --ignored"]
async fn a_node_identity_registers_renews_its_lease_and_watches_its_pods() {
    let plane = start("node").await;
    let admin = plane.admin_client().await.unwrap();
    let node = plane.client_as(NODE_USER, &["system:nodes"]).await.unwrap();
    let (user, groups) = whoami(&node).await;
    assert_eq!(user, NODE_USER);
    assert!(groups.contains(&"system:nodes".to_string()), "{groups:?}");

    // Its Node object, and its status.
    let nodes = Api::<Node>::all(node.clone());
    let object: Node = serde_json::from_value(json!({
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
    }))
    .unwrap();
    nodes.create(&PostParams::default(), &object).await.unwrap();
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    nodes
        .patch_status(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "simulated", "lastHeartbeatTime": now, "lastTransitionTime": now,
            }]}})),
        )
        .await
        .unwrap();
    // Not another node's (NodeRestriction).
    let other: Node = serde_json::from_value(json!({"metadata": {"name": "other-node"}})).unwrap();
    let denied = nodes
        .create(&PostParams::default(), &other)
        .await
        .unwrap_err();
    assert_eq!(status(&denied), 403, "{denied}");

    // Its Lease, created then renewed.
    let leases = Api::<Lease>::namespaced(node.clone(), "kube-node-lease");
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": NODE},
        "spec": {"holderIdentity": NODE, "leaseDurationSeconds": 40, "renewTime": now},
    }))
    .unwrap();
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut current = leases.get(NODE).await.unwrap();
    let renewed = k8s_openapi::jiff::Timestamp::now();
    current.spec.as_mut().unwrap().renew_time = Some(MicroTime(renewed));
    leases
        .replace(NODE, &PostParams::default(), &current)
        .await
        .unwrap();

    // Its pods, through a field selector: listed and watched.
    let selector = format!("spec.nodeName={NODE}");
    let all_pods = Api::<Pod>::all(node.clone());
    let listed = all_pods
        .list(&ListParams::default().fields(&selector))
        .await
        .unwrap();
    let mut events = all_pods
        .watch(
            &WatchParams::default().fields(&selector).timeout(60),
            &listed.metadata.resource_version.unwrap(),
        )
        .await
        .unwrap()
        .boxed();
    let pods = Api::<Pod>::default_namespaced(admin.clone());
    pods.create(&PostParams::default(), &pod("elsewhere", None))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("here", Some(NODE)))
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match events.try_next().await.unwrap() {
                Some(WatchEvent::Added(p)) => break p,
                Some(WatchEvent::Bookmark(_)) => continue,
                other => panic!("unexpected watch event {other:?}"),
            }
        }
    })
    .await
    .expect("the node sees its pod within 60 s");
    assert_eq!(seen.metadata.name.as_deref(), Some("here"));
    let mine = Api::<Pod>::default_namespaced(node.clone())
        .get("here")
        .await
        .unwrap();
    assert_eq!(mine.spec.unwrap().node_name.as_deref(), Some(NODE));

    // Without the field selector, the Node authorizer refuses: list, watch, and a pod
    // bound elsewhere.
    let denied = all_pods.list(&ListParams::default()).await.unwrap_err();
    assert_eq!(status(&denied), 403, "{denied}");
    let denied = Api::<Pod>::default_namespaced(node.clone())
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(status(&denied), 403, "{denied}");
    let denied = all_pods
        .watch(&WatchParams::default(), "0")
        .await
        .err()
        .expect("an unselected watch is refused");
    assert_eq!(status(&denied), 403, "{denied}");
    let denied = Api::<Pod>::default_namespaced(node)
        .get("elsewhere")
        .await
        .unwrap_err();
    assert_eq!(status(&denied), 403, "{denied}");
    plane.stop().await;
}

#[tokio::test]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --ignored"]
async fn a_deployment_gets_a_replicaset_and_pods() {
    let plane = start("deployment").await;
    let admin = plane.admin_client().await.unwrap();
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "registry.example/web:1"}]},
            },
        },
    }))
    .unwrap();
    let created = Api::<Deployment>::default_namespaced(admin.clone())
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let deployment_uid = created.metadata.uid.unwrap();
    let replica_sets = Api::<ReplicaSet>::default_namespaced(admin.clone());
    let rs_uid = eventually_some(
        "a ReplicaSet of Deployment web",
        Duration::from_secs(60),
        || async {
            let list = replica_sets.list(&ListParams::default()).await.ok()?;
            list.items
                .into_iter()
                .find(|rs| owned_by(&rs.metadata, &deployment_uid))
                .and_then(|rs| rs.metadata.uid)
        },
    )
    .await;
    let pods = Api::<Pod>::default_namespaced(admin);
    eventually_some(
        "two pods of the ReplicaSet",
        Duration::from_secs(60),
        || async {
            let list = pods
                .list(&ListParams::default().labels("app=web"))
                .await
                .ok()?;
            (list
                .items
                .iter()
                .filter(|p| owned_by(&p.metadata, &rs_uid))
                .count()
                == 2)
                .then_some(())
        },
    )
    .await;
    plane.stop().await;
}

#[tokio::test]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --ignored"]
async fn the_garbage_collector_deletes_a_pod_with_its_owner() {
    let plane = start("gc").await;
    let admin = plane.admin_client().await.unwrap();
    let config_maps = Api::<ConfigMap>::default_namespaced(admin.clone());
    let owner: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap();
    let owner = config_maps
        .create(&PostParams::default(), &owner)
        .await
        .unwrap();
    let mut dependent = pod("dependent", None);
    dependent.metadata.owner_references = Some(vec![
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
            "uid": owner.metadata.uid.unwrap(),
        }))
        .unwrap(),
    ]);
    let pods = Api::<Pod>::default_namespaced(admin);
    pods.create(&PostParams::default(), &dependent)
        .await
        .unwrap();
    config_maps
        .delete("owner", &DeleteParams::default())
        .await
        .unwrap();
    eventually_some("the owned pod deleted", Duration::from_secs(60), || async {
        match pods.get("dependent").await {
            Err(e) if status(&e) == 404 => Some(()),
            _ => None,
        }
    })
    .await;
    plane.stop().await;
}

/// Two control planes at once, each on ports of its own; stop() leaves no process and no
/// directory behind.
#[tokio::test]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --ignored"]
async fn two_run_at_once_and_stop_leaves_nothing_behind() {
    let (a, b) = tokio::join!(start("stop-a"), start("stop-b"));
    assert_ne!(a.url(), b.url());
    for plane in [&a, &b] {
        let admin = plane.admin_client().await.unwrap();
        let ready = admin
            .request_text(http::Request::get("/readyz").body(Vec::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(ready, "ok");
    }
    let mut left = Vec::new();
    for plane in [a, b] {
        let dir = plane.work_dir().to_path_buf();
        let processes = plane.processes();
        let names: Vec<&str> = processes.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                "etcd",
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler"
            ]
        );
        for (name, pid) in &processes {
            assert!(runs_in(*pid, &dir), "{name} ({pid}) runs");
        }
        let started = std::time::Instant::now();
        plane.stop().await;
        eprintln!("stopped in {:.1?}", started.elapsed());
        assert!(!dir.exists(), "{} is removed", dir.display());
        left.extend(processes.into_iter().filter(|(_, pid)| runs_in(*pid, &dir)));
    }
    assert!(left.is_empty(), "still running after stop(): {left:?}");
}

/// Without controller manager and scheduler: the API server alone, and missing() says
/// what is lacking.
#[tokio::test]
#[ignore = "needs the real control plane: bash tests/control-plane/build.sh, then cargo test -- --ignored"]
async fn without_the_optional_components_missing_says_what_lacks() {
    init_logs();
    let full = whole_control_plane_bin();
    let partial = work_dir("partial-bin");
    std::fs::create_dir_all(&partial).unwrap();
    for name in ["etcd", "kube-apiserver"] {
        std::os::unix::fs::symlink(full.join(name), partial.join(name)).unwrap();
    }
    let plane = ControlPlane::start(&partial, &work_dir("partial"))
        .await
        .unwrap_or_else(|e| panic!("the control plane did not start: {e}"));
    assert_eq!(
        plane.missing(),
        ["kube-controller-manager", "kube-scheduler"]
    );
    assert_eq!(
        plane.missing_effects(),
        [
            "no controller manager: no garbage collection, namespace deletion, Deployments/ReplicaSets or service-account tokens",
            "no scheduler: the node binds pending pods itself",
        ]
    );
    let names: Vec<&str> = plane.processes().iter().map(|(name, _)| *name).collect();
    assert_eq!(names, ["etcd", "kube-apiserver"]);
    plane.stop().await;
    std::fs::remove_dir_all(&partial).unwrap();
}

/// No binaries: an error that says how to build them, and no directory made.
#[tokio::test]
async fn start_without_binaries_says_how_to_build_them() {
    let empty = work_dir("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let dir = work_dir("no-binaries");
    let error = ControlPlane::start(&empty, &dir)
        .await
        .err()
        .expect("no binaries, no control plane");
    assert!(
        error.contains("etcd and kube-apiserver missing")
            && error.contains("bash tests/control-plane/build.sh"),
        "{error}"
    );
    assert!(!dir.exists());
    std::fs::remove_dir_all(&empty).unwrap();
}

/// A work directory that holds files is refused, and left as it was.
#[tokio::test]
async fn start_refuses_a_work_directory_in_use() {
    let bin = work_dir("fake-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in ["etcd", "kube-apiserver"] {
        std::fs::write(bin.join(name), "").unwrap();
    }
    let dir = work_dir("in-use");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("keep"), "mine").unwrap();
    let error = ControlPlane::start(&bin, &dir)
        .await
        .err()
        .expect("a directory in use is refused");
    assert!(error.contains("is not empty"), "{error}");
    assert_eq!(std::fs::read_to_string(dir.join("keep")).unwrap(), "mine");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&bin).unwrap();
}

/// Writes an executable shell script at `path`. The file is written by a `cp` process, so
/// that no process this test binary forks meanwhile holds it open for writing (exec would
/// then fail with "text file busy").
fn fake_binary(path: &Path, script: &str) {
    let source = path.with_extension("txt");
    std::fs::write(&source, script).unwrap();
    let status = std::process::Command::new("cp")
        .arg(&source)
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// A fake etcd that logs 30 numbered lines, then `last`, and exits with `code`; it also
/// counts its runs in `runs`.
fn failing_etcd(bin: &Path, runs: &Path, last: &str, code: u8) {
    std::fs::create_dir_all(bin).unwrap();
    fake_binary(
        &bin.join("etcd"),
        &format!(
            "#!/bin/sh\necho run >> '{}'\ni=0\nwhile [ $i -lt 30 ]; do echo \"line $i\"; i=$((i+1)); done\necho '{last}' >&2\nexit {code}\n",
            runs.display()
        ),
    );
    fake_binary(&bin.join("kube-apiserver"), "#!/bin/sh\nexit 1\n");
}

/// A component that exits: the error names it and shows the end of its log; nothing is
/// left behind.
#[tokio::test]
async fn a_component_that_exits_fails_the_start_with_its_log() {
    let bin = work_dir("exits-bin");
    let runs = work_dir("exits-runs");
    failing_etcd(&bin, &runs, "etcd: giving up", 3);
    let dir = work_dir("exits");
    let error = ControlPlane::start(&bin, &dir)
        .await
        .err()
        .expect("etcd exits, the start fails");
    assert!(
        error.contains("etcd exited (exit status: 3) before it was healthy"),
        "{error}"
    );
    // The last 20 lines: 11 to 29, then the last message.
    assert!(
        error.contains("line 11\n")
            && error.contains("line 29\netcd: giving up")
            && !error.contains("line 10"),
        "{error}"
    );
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap().lines().count(),
        1,
        "not retried"
    );
    assert!(!dir.exists());
    std::fs::remove_dir_all(&bin).unwrap();
    std::fs::remove_file(&runs).unwrap();
}

/// A component whose port was taken: the whole start is tried again, three times in all.
#[tokio::test]
async fn a_taken_port_is_tried_again_on_other_ports() {
    let bin = work_dir("taken-bin");
    let runs = work_dir("taken-runs");
    failing_etcd(
        &bin,
        &runs,
        "listen tcp 127.0.0.1:1: bind: address already in use",
        1,
    );
    let dir = work_dir("taken");
    let error = ControlPlane::start(&bin, &dir)
        .await
        .err()
        .expect("etcd never gets its port");
    assert!(error.contains("address already in use"), "{error}");
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap().lines().count(),
        3,
        "three tries"
    );
    assert!(!dir.exists());
    std::fs::remove_dir_all(&bin).unwrap();
    std::fs::remove_file(&runs).unwrap();
}
