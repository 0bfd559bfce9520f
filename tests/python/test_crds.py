"""Offline checks of the generated CRDs and the example CRs with independent validators.

- kubernetes-validate checks each CRD is a valid apiextensions.k8s.io/v1 object (strict).
- jsonschema checks the examples against each CRD's openAPIV3Schema, independently of the
  Rust admission code: valid examples pass; invalid examples whose header says
  `rejected-by: schema` fail on the field they name; the others (CEL / validate()) pass the
  schema, because only those later layers can reject them.
"""

import copy
import pathlib

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "charts" / "relayfed-crds" / "templates"
EXAMPLES = ROOT / "examples"
K8S_VERSION = "1.33.0"


def load_crds():
    crds = {}
    for path in sorted(CRD_DIR.glob("*.relayfed.io.yaml")):
        crd = yaml.safe_load(path.read_text())
        crds[crd["spec"]["names"]["kind"]] = crd
    return crds


CRDS = load_crds()


def to_json_schema(node, root=False):
    """OpenAPI v3 structural schema -> JSON schema (nullable, int-or-string, strict fields)."""
    node = copy.deepcopy(node)
    out = {}
    for key, value in node.items():
        if key in ("properties",):
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key == "items":
            out[key] = to_json_schema(value)
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key.startswith("x-kubernetes-") or key in ("nullable", "format", "default"):
            continue
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out and "additionalProperties" not in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        if root:
            for k in ("apiVersion", "kind", "metadata"):
                out["properties"].setdefault(k, {})
        out["additionalProperties"] = False
    return out


def schema_for(kind):
    raw = CRDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return to_json_schema(raw, root=True)


def schema_errors(doc):
    validator = jsonschema.Draft202012Validator(schema_for(doc["kind"]))
    return list(validator.iter_errors(doc))


def error_fields(errors):
    """Dotted field paths the errors point at (including unknown-property names)."""
    fields = set()
    for err in errors:
        path = ""
        for part in err.absolute_path:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        if err.validator == "required":
            missing = err.message.split("'")[1]
            fields.add(f"{path}.{missing}" if path else missing)
        elif err.validator == "additionalProperties":
            for name in err.message.split("'")[1::2]:
                fields.add(f"{path}.{name}" if path else name)
        else:
            fields.add(path)
    return fields


def header(text, key):
    for line in text.splitlines():
        if line.startswith(f"# {key}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"missing '# {key}:' header")


@pytest.mark.parametrize("path", sorted(CRD_DIR.glob("*.relayfed.io.yaml")), ids=lambda p: p.name)
def test_crd_is_a_valid_apiextensions_v1_object(path):
    crd = yaml.safe_load(path.read_text())
    kubernetes_validate.validate(crd, K8S_VERSION, strict=True)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    version = crd["spec"]["versions"][0]
    assert version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert crd["spec"]["names"]["shortNames"]


def test_rollout_policy_columns_show_mode_percentage_and_success_rate():
    columns = {c["name"]: c["jsonPath"] for c in CRDS["RolloutPolicy"]["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["Mode"] == ".spec.ech.mode"
    assert columns["Percent"] == ".spec.ech.percentage"
    assert columns["SuccessRate"] == ".status.observedSuccessRate"


def test_schema_carries_ranges_enums_and_cel():
    ech = CRDS["RolloutPolicy"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["ech"]
    assert ech["properties"]["percentage"]["minimum"] == 0
    assert ech["properties"]["percentage"]["maximum"] == 100
    assert ech["properties"]["mode"]["enum"] == ["disabled", "opportunistic", "required"]
    assert any("whitelist" in r["rule"] for r in ech["x-kubernetes-validations"])
    relay = CRDS["Relay"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert any("mainRelays" in r["rule"] for r in relay["x-kubernetes-validations"])


def example_docs(directory):
    for path in sorted((EXAMPLES / directory).glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


@pytest.mark.parametrize("path,doc", [d for x in ("federation", "partners/acme", "partners/partner") for d in example_docs(x)], ids=lambda x: getattr(x, "name", None) or x.get("metadata", {}).get("name"))
def test_valid_example_passes_the_schema(path, doc):
    assert schema_errors(doc) == []


@pytest.mark.parametrize("path", sorted((EXAMPLES / "invalid").glob("*.yaml")), ids=lambda p: p.name)
def test_invalid_example_is_rejected_by_the_schema_only_when_it_says_so(path):
    text = path.read_text()
    layer, field = header(text, "rejected-by"), header(text, "expect-field")
    doc = yaml.safe_load(text)
    if layer == "kind":
        assert doc["kind"] not in CRDS
        return
    errors = schema_errors(doc)
    if layer == "schema":
        assert errors, f"{path.name}: the schema should reject it"
        assert field in error_fields(errors), f"{path.name}: expected {field}, got {error_fields(errors)}"
    else:
        assert errors == [], f"{path.name}: passes the schema; rejected later by {layer}"
