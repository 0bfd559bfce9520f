"""The injection webhook's patched pods, checked with independent tools: the JSONPatch is
applied with python-jsonpatch and the result validated against the Kubernetes OpenAPI schema
(kubernetes-validate, strict: unknown fields are errors)."""

import base64
import json
import os
import pathlib
import subprocess

import jsonpatch
import kubernetes_validate
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "operator/tests/fixtures/admission"
K8S_VERSION = "1.33.0"
RELAYFED = os.environ.get("RELAYFED")

pytestmark = pytest.mark.skipif(not RELAYFED, reason="set RELAYFED to the relayfed binary (make test-python does)")


def review(path, *flags):
    out = subprocess.run([RELAYFED, "webhook", "review", str(path), *flags], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("name", ["plain.json", "no-volumes.json", "with-init-and-annotations.json", "annotated.json"])
@pytest.mark.parametrize("native", [True, False])
def test_patched_pod_is_a_valid_pod(name, native, tmp_path):
    flags = ["--namespace-enabled"]
    if not native:
        cfg = tmp_path / "inject.json"
        cfg.write_text(json.dumps({
            "image": "ghcr.io/relayfed/relayfed:0.1.0", "proxyUid": 1337, "outboundPort": 15001, "adminPort": 15090,
            "configServer": "relayfed-operator.relayfed-system.svc:8443", "nativeSidecar": False,
            "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}}, "failurePolicy": "Fail",
        }))
        flags += ["--config", str(cfg)]
    request = json.loads((FIXTURES / name).read_text())
    response = review(FIXTURES / name, *flags)["response"]
    assert response["uid"] == request["request"]["uid"]
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = jsonpatch.JsonPatch(json.loads(base64.b64decode(response["patch"])))
    pod = patch.apply(request["request"]["object"])
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    names = [c["name"] for c in pod["spec"].get("initContainers", [])] + [c["name"] for c in pod["spec"]["containers"]]
    assert "relayfed-init" in names and "relayfed-proxy" in names
    assert pod["metadata"]["annotations"]["relayfed.io/status"] == "injected"


def test_opted_out_pod_gets_no_patch():
    response = review(FIXTURES / "opt-out.json", "--namespace-enabled")["response"]
    assert response["allowed"] is True and "patch" not in response


def test_malformed_review_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{\"kind\": \"AdmissionReview\"}")
    out = subprocess.run([RELAYFED, "webhook", "review", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0
    assert "malformed AdmissionReview" in out.stderr
