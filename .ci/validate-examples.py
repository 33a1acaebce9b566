"""Validates the example pools in deploy/examples/ against the generated CRD schema.

kubernetes-validate only knows built-in kinds, so the TestRunnerPool examples are checked
here, with the openAPIV3Schema of crds/testrunnerpools.testrunner.dev.yaml turned into a
JSON Schema the way the API server reads it with strict field validation (kubectl's
default since 1.27): unknown fields are errors, `nullable` admits null, int-or-string
admits both, schema defaults are applied before CEL rules. CEL rules of the form
`self.a <= self.b` are evaluated; any other rule is reported as not checked.

Run with the .tools/venv interpreter (it has PyYAML and jsonschema):
    .tools/venv/bin/python .ci/validate-examples.py [FILES...]
Exits non-zero when an example fails, or when the built-in bad pools are not refused.
"""

import copy
import re
import sys
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
CRD = ROOT / "crds" / "testrunnerpools.testrunner.dev.yaml"
CEL_LE = re.compile(r"^self\.(\w+)\s*<=\s*self\.(\w+)$")


def load_crd():
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    versions = {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}
    return group, kind, versions


def to_json_schema(node):
    """The API server's structural schema as a strict JSON Schema (draft 7)."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key.startswith("x-kubernetes-") or key in ("nullable", "description", "default", "example", "format"):
            continue
        else:
            out[key] = to_json_schema(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def apply_defaults(schema, value):
    """Fills schema defaults into value, as the API server does before CEL rules."""
    if not isinstance(value, dict):
        return value
    for name, sub in schema.get("properties", {}).items():
        if name not in value and "default" in sub:
            value[name] = copy.deepcopy(sub["default"])
        if name in value:
            if isinstance(value[name], dict):
                apply_defaults(sub, value[name])
            elif isinstance(value[name], list) and isinstance(sub.get("items"), dict):
                for item in value[name]:
                    apply_defaults(sub["items"], item)
    return value


def cel_errors(schema, value, path="spec"):
    """Evaluates `self.a <= self.b` rules; yields messages for failures and skipped rules."""
    if not isinstance(value, dict):
        return
    for rule in schema.get("x-kubernetes-validations", []):
        m = CEL_LE.match(rule["rule"].strip())
        if not m:
            yield f"{path}: CEL rule not checked here: {rule['rule']}", False
            continue
        a, b = value.get(m.group(1)), value.get(m.group(2))
        if a is not None and b is not None and not a <= b:
            yield f"{path}{rule.get('fieldPath', '')}: {rule.get('message', rule['rule'])}", True
    for name, sub in schema.get("properties", {}).items():
        if isinstance(value.get(name), dict):
            yield from cel_errors(sub, value[name], f"{path}.{name}")


def validate(doc, group, kind, versions):
    """Returns the list of errors of one document."""
    errors = []
    api_version = doc.get("apiVersion", "")
    if doc.get("kind") != kind or not api_version.startswith(group + "/"):
        return [f"expected kind {kind} in group {group}, got {doc.get('kind')} {api_version}"]
    version = api_version.split("/", 1)[1]
    if version not in versions:
        return [f"unknown version {version}; the CRD serves {', '.join(versions)}"]
    raw = versions[version]
    if not doc.get("metadata", {}).get("name"):
        errors.append("metadata.name is required")
    body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
    schema = to_json_schema({k: v for k, v in raw.items() if k != "properties"} | {
        "properties": {k: v for k, v in raw["properties"].items() if k not in ("apiVersion", "kind", "metadata")}
    })
    validator = jsonschema.Draft7Validator(schema)
    for err in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in err.absolute_path) or "(root)"
        errors.append(f"{where}: {err.message}")
    if not errors:
        defaulted = apply_defaults(raw["properties"]["spec"], copy.deepcopy(doc["spec"]))
        for message, failed in cel_errors(raw["properties"]["spec"], defaulted):
            if failed:
                errors.append(message)
            else:
                print(f"  note: {message}")
    return errors


BAD_POOLS = {
    "unknown field (typo)": """
apiVersion: testrunner.dev/v1alpha1
kind: TestRunnerPool
metadata: {name: bad}
spec:
  image: x
  queue: {name: q, connectionSecretRef: {name: s}}
  scalling: {maxWorkers: 3}
""",
    "minWorkers above maxWorkers (CEL)": """
apiVersion: testrunner.dev/v1alpha1
kind: TestRunnerPool
metadata: {name: bad}
spec:
  image: x
  queue: {name: q, connectionSecretRef: {name: s}}
  scaling: {minWorkers: 20}
""",
    "malformed duration": """
apiVersion: testrunner.dev/v1alpha1
kind: TestRunnerPool
metadata: {name: bad}
spec:
  image: x
  queue: {name: q, connectionSecretRef: {name: s}}
  scaling: {pollInterval: soon}
""",
}


def main(argv):
    group, kind, versions = load_crd()
    files = [Path(a) for a in argv] or sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
    if not files:
        print("no example pools found", file=sys.stderr)
        return 1
    failed = 0
    checked = 0
    for path in files:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is None:
                continue
            checked += 1
            errors = validate(doc, group, kind, versions)
            name = f"{path.relative_to(ROOT) if path.is_absolute() else path} #{i}"
            if errors:
                failed += 1
                print(f"FAIL {name}")
                for e in errors:
                    print(f"  {e}")
            else:
                print(f"ok   {name} ({doc['metadata']['name']})")
    # The validator must refuse known-bad pools, or it proves nothing.
    for label, text in BAD_POOLS.items():
        errors = validate(yaml.safe_load(text), group, kind, versions)
        if errors:
            print(f"ok   refused bad pool: {label}: {errors[0]}")
        else:
            failed += 1
            print(f"FAIL bad pool accepted: {label}")
    print(f"{checked} example pools checked against the CRD schema, {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
