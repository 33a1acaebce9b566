"""Helpers of .ci/check-chart, run with the .tools/venv interpreter (PyYAML).

    split RENDER BUILTIN_OUT          write the built-in kinds of RENDER to BUILTIN_OUT and
                                      list the custom-resource kinds left out (kubernetes-validate
                                      has no schema for them)
    assert CASE RENDER [BUILTIN_OUT]  check what the case must render (see CASES), then split
    rules RENDER RULES_OUT TESTS_IN TESTS_OUT
                                      extract the PrometheusRule as a Prometheus rule file and
                                      fill the alert expressions into the promtool unit tests
"""

import json
import re
import sys
from pathlib import Path

import yaml

# libyaml when the interpreter has it: the CRD alone is 250 kB of YAML.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
ROOT = Path(__file__).resolve().parent.parent
BUILTIN_GROUPS = {
    "v1", "apps/v1", "rbac.authorization.k8s.io/v1", "policy/v1", "networking.k8s.io/v1",
    "apiextensions.k8s.io/v1",
}
RELEASE_NAMESPACE = "testrunner-system"
FULLNAME = "testrunner-operator"
ALERTS = ["TestRunnerWorkerCrashLooping", "TestRunnerBrokerUnreachable", "TestRunnerQueueStalled",
          "TestRunnerPoisonTicket", "TestRunnerBrokenEnvironment", "TestRunnerRolloutFailed",
          "TestRunnerOperatorDown"]


def docs(path):
    return [d for d in yaml.load_all(Path(path).read_text(), Loader=LOADER) if d]


def split(render, out):
    builtin, skipped = [], []
    for d in docs(render):
        (builtin if d["apiVersion"] in BUILTIN_GROUPS else skipped).append(d)
    Path(out).write_text(yaml.dump_all(builtin, Dumper=DUMPER, sort_keys=False))
    for d in skipped:
        print(f"    not schema-checked (custom resource): {d['kind']} {d['apiVersion']}")


class Failed(Exception):
    pass


def expect(cond, message):
    if not cond:
        raise Failed(message)


def by_kind(ds, kind):
    return [d for d in ds if d["kind"] == kind]


def one(ds, kind, name=None):
    found = [d for d in by_kind(ds, kind) if name is None or d["metadata"]["name"] == name]
    expect(len(found) == 1, f"expected one {kind}{' ' + name if name else ''}, found {len(found)}")
    return found[0]


def container(ds):
    return one(ds, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env(ds):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(ds)["env"]}


def common(ds):
    """What every render must hold."""
    for d in ds:
        for rule in d.get("rules", []) if d["kind"] in ("ClusterRole", "Role") else []:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                expect("*" not in rule.get(field, []), f"{d['kind']} {d['metadata']['name']}: wildcard in {field}")
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Namespace"):
            expect("namespace" in d["metadata"], f"{d['kind']} {d['metadata']['name']} has no namespace")
    c = container(ds)
    sc = c["securityContext"]
    expect(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
    expect(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true")
    expect(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities must drop ALL")
    psc = one(ds, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    expect(psc.get("runAsNonRoot") is True, "runAsNonRoot must be true")
    expect(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "seccomp must be RuntimeDefault")
    expect(c["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness probe must GET /healthz")
    expect(c["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe must GET /readyz")
    e = env(ds)
    expect(e["TESTRUNNER_OPERATOR_IMAGE"] == c["image"], "TESTRUNNER_OPERATOR_IMAGE must be the operator's own image")
    expect(e["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}, "POD_NAME must come from the downward API")
    expect(e["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, "POD_NAMESPACE must come from the downward API")
    expect(c["args"] == ["run"], "the container must run `run`")


def operator_rules(role):
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    expect(rules.get(("testrunner.dev", "testrunnerpools")) == {"get", "list", "watch", "patch", "update"}, "pool verbs")
    expect(rules.get(("testrunner.dev", "testrunnerpools/status")) == {"get", "patch", "update"}, "pool status verbs")
    expect(rules.get(("testrunner.dev", "testrunnerpools/finalizers")) == {"update"}, "pool finalizer verbs")
    expect(rules.get(("", "pods")) == {"get", "list", "watch", "create", "patch", "delete"}, "pod verbs")
    expect(rules.get(("events.k8s.io", "events")) == {"create", "patch"}, "event verbs")
    expect(rules.get(("", "secrets")) == {"get"}, "secrets must be get only")
    expect(rules.get(("", "configmaps")) == {"get", "create", "patch"}, "configmap verbs (quarantine lists)")
    expect(rules.get(("apps", "controllerrevisions")) == {"list", "create", "patch", "delete"}, "controllerrevision verbs (revisions)")
    expect(len(rules) == 8, f"unexpected rules: {sorted(rules)}")


def leader_role(ds, present=True):
    roles = [d for d in by_kind(ds, "Role") if d["metadata"]["name"] == f"{FULLNAME}-leader-election"]
    if not present:
        expect(not roles, "no leader-election Role without leader election")
        return
    expect(len(roles) == 1, "one leader-election Role")
    role = roles[0]
    expect(role["metadata"]["namespace"] == RELEASE_NAMESPACE, "the lease Role lives in the release namespace")
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    expect(verbs == {"get", "create", "update", "patch"}, f"lease verbs: {sorted(verbs)}")
    expect(all(rule["resources"] == ["leases"] for rule in role["rules"]), "lease Role covers leases only")


def crd_identical(ds):
    crd = one(ds, "CustomResourceDefinition")
    source = docs(ROOT / "crds" / "testrunnerpools.testrunner.dev.yaml")[0]
    expect(crd["spec"] == source["spec"], "the templated CRD's spec differs from crds/")
    expect(crd["metadata"]["name"] == source["metadata"]["name"], "CRD name")
    return crd


def monitoring_absent(ds):
    expect(not by_kind(ds, "ServiceMonitor"), "no ServiceMonitor expected")
    expect(not by_kind(ds, "PrometheusRule"), "no PrometheusRule expected")


def dashboard_configmaps(ds):
    return [d for d in by_kind(ds, "ConfigMap") if d["metadata"].get("labels", {}).get("grafana_dashboard")]


def case_default(ds):
    common(ds)
    expect(not dashboard_configmaps(ds), "no Grafana dashboard ConfigMap by default")
    expect(one(ds, "Deployment")["spec"]["replicas"] == 2, "two replicas by default")
    e = env(ds)
    expect(e["TESTRUNNER_LEADER_ELECTION"] == "true", "leader election on by default")
    expect(e["TESTRUNNER_WATCH_NAMESPACES"] == "", "all namespaces by default")
    crd = crd_identical(ds)
    expect(crd["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep", "CRD must be kept on uninstall")
    operator_rules(one(ds, "ClusterRole", FULLNAME))
    binding = one(ds, "ClusterRoleBinding", FULLNAME)
    expect(binding["subjects"][0]["namespace"] == RELEASE_NAMESPACE, "binding subject namespace")
    leader_role(ds)
    one(ds, "ServiceAccount", FULLNAME)
    one(ds, "Service", f"{FULLNAME}-metrics")
    monitoring_absent(ds)
    expect(not by_kind(ds, "NetworkPolicy"), "NetworkPolicy off by default")


def case_namespaced(ds):
    common(ds)
    expect(env(ds)["TESTRUNNER_WATCH_NAMESPACES"] == "ci,ci-nightly", "watched namespaces passed to the operator")
    expect(not by_kind(ds, "ClusterRoleBinding"), "no ClusterRoleBinding in namespaced mode")
    expect(all(d["metadata"]["name"].endswith(("-view", "-edit")) for d in by_kind(ds, "ClusterRole")),
           "only the aggregated user ClusterRoles in namespaced mode")
    for ns in ("ci", "ci-nightly"):
        roles = [d for d in by_kind(ds, "Role") if d["metadata"]["namespace"] == ns]
        expect(len(roles) == 1, f"one Role in {ns}")
        operator_rules(roles[0])
        bindings = [d for d in by_kind(ds, "RoleBinding") if d["metadata"]["namespace"] == ns]
        expect(len(bindings) == 1 and bindings[0]["subjects"][0]["namespace"] == RELEASE_NAMESPACE, f"RoleBinding in {ns}")
    leader_role(ds)


def runbook_anchors():
    text = (ROOT / "docs" / "runbooks.md").read_text()
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+)$", text, re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def case_monitoring(ds):
    common(ds)
    sm = one(ds, "ServiceMonitor")
    expect(sm["metadata"]["labels"].get("release") == "kube-prometheus-stack", "ServiceMonitor labels")
    expect(sm["spec"]["endpoints"][0]["honorLabels"] is True, "honorLabels keeps the pools' namespace label")
    rule = one(ds, "PrometheusRule")
    rules = rule["spec"]["groups"][0]["rules"]
    names = [r.get("alert") for r in rules]
    expect(names == ALERTS + ["TestRunnerPoolAtMaxWorkers"], f"alerts: {names}")
    anchors = runbook_anchors()
    for r in rules[:len(ALERTS)]:
        a = r["annotations"]
        for key in ("summary", "description", "runbook_url"):
            expect(a.get(key), f"{r['alert']} has no {key}")
        anchor = a["runbook_url"].split("#", 1)[1]
        expect(anchor in anchors, f"{r['alert']}: docs/runbooks.md has no heading for #{anchor}")
        expect(r["labels"].get("team") == "ci" and r["labels"].get("severity"), f"{r['alert']} labels")
    rollout = rules[ALERTS.index("TestRunnerRolloutFailed")]
    expect(rollout["expr"].strip() == "max by (namespace, pool) (testrunner_rollout_failed) == 1",
           f"TestRunnerRolloutFailed expr: {rollout['expr']}")
    expect(rollout["for"] == "0m" and rollout["labels"]["severity"] == "warning",
           "TestRunnerRolloutFailed: for 0m and severity warning by default")
    one(ds, "NetworkPolicy")
    one(ds, "PodDisruptionBudget")
    dashboards = dashboard_configmaps(ds)
    expect(len(dashboards) == 1, f"one Grafana dashboard ConfigMap, got {len(dashboards)}")
    cm = dashboards[0]
    expect(cm["metadata"]["labels"]["grafana_dashboard"] == "1", "label grafana_dashboard: \"1\"")
    expect(cm["metadata"].get("annotations", {}).get("grafana_folder") == "CI", "dashboard annotations")
    expect(cm["metadata"]["namespace"] == RELEASE_NAMESPACE, "dashboard in the release namespace by default")
    shipped = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    expect(list(cm["data"]) == ["testrunner-operator.json"], f"dashboard keys: {list(cm['data'])}")
    expect(json.loads(cm["data"]["testrunner-operator.json"]) == shipped,
           "the ConfigMap's dashboard differs from docs/grafana-dashboard.json")


def case_monitoring_without_api(ds):
    common(ds)
    monitoring_absent(ds)
    one(ds, "NetworkPolicy")


def case_single_replica(ds):
    common(ds)
    expect(one(ds, "Deployment")["spec"]["replicas"] == 1, "one replica")
    expect(env(ds)["TESTRUNNER_LEADER_ELECTION"] == "false", "leader election off")
    leader_role(ds, present=False)


def case_custom_image(ds):
    common(ds)
    image = "registry.example/ci/testrunner-operator@sha256:" + "0123456789abcdef" * 4
    c = container(ds)
    expect(c["image"] == image, f"image: {c['image']}")
    expect(c["imagePullPolicy"] == "Always", "pull policy")
    expect(env(ds)["TESTRUNNER_OPERATOR_IMAGE"] == image, "operator image env follows the custom image")
    expect(env(ds)["TZ"] == "UTC", "extraEnv")
    spec = one(ds, "Deployment")["spec"]["template"]["spec"]
    expect(spec["serviceAccountName"] == "ci-operator", "existing ServiceAccount used")
    expect(spec["imagePullSecrets"] == [{"name": "registry-example"}], "pull secrets")
    expect(not by_kind(ds, "ServiceAccount"), "no ServiceAccount created")
    expect(not by_kind(ds, "CustomResourceDefinition"), "no CRD with crds.install=false")
    expect(one(ds, "ClusterRoleBinding")["subjects"][0]["name"] == "ci-operator", "binding to the existing ServiceAccount")


CASES = {
    "default": case_default,
    "namespaced": case_namespaced,
    "monitoring": case_monitoring,
    "monitoring-without-api": case_monitoring_without_api,
    "single-replica": case_single_replica,
    "custom-image": case_custom_image,
}


def rules(render, rules_out, tests_in, tests_out):
    rule = one(docs(render), "PrometheusRule")
    Path(rules_out).write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    exprs = {r["alert"]: r["expr"] for r in rule["spec"]["groups"][0]["rules"] if "alert" in r}
    tests = yaml.safe_load(Path(tests_in).read_text())
    tests["rule_files"] = [Path(rules_out).name]
    for test in tests["tests"]:
        for t in test.get("promql_expr_test", []):
            name = t["expr"]
            expect(name in exprs, f"test names unknown alert {name}")
            t["expr"] = exprs[name]
    Path(tests_out).write_text(yaml.safe_dump(tests, sort_keys=False))


def main(argv):
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "split":
            split(*args)
        elif cmd == "assert":
            CASES[args[0]](docs(args[1]))
            if len(args) > 2:
                split(args[1], args[2])
        elif cmd == "rules":
            rules(*args)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Failed as e:
        print(f"    assertion failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
