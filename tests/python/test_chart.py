"""The Helm chart, linted and rendered with the Helm engine (helm-python-sdk, no helm binary),
every rendered object validated against the Kubernetes 1.33 OpenAPI schema (strict), and the
rendered injection settings fed to the real webhook binary."""

import base64
import json
import os
import pathlib
import subprocess

import helm_python
import kubernetes_validate
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts/relayfed"
FIXTURES = ROOT / "operator/tests/fixtures/admission"
K8S_VERSION = "1.33.0"
RELAYFED = os.environ.get("RELAYFED")


def render(values=None):
    chart = helm_python.Chart.load(str(CHART))
    out = chart.render(values=values or {}, name="relayfed", namespace="relayfed-system", is_install=True)
    docs = []
    for name, text in out.items():
        if name.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def test_chart_lints_clean_in_strict_mode():
    result = helm_python.lint(str(CHART), strict=True, kube_version="v" + K8S_VERSION)
    assert result["errors"] == [], result


@pytest.mark.parametrize("values", [{}, {"injection": {"nativeSidecar": False, "failurePolicy": "Ignore"}}])
def test_every_rendered_object_is_valid(values):
    docs = render(values)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "Secret", "ConfigMap", "MutatingWebhookConfiguration"}
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_injection_can_be_turned_off():
    docs = render({"injection": {"enabled": False}})
    assert docs and all("injector" not in d["metadata"]["name"] for d in docs)
    assert not [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    # Only the read-only `relayfed check` identity remains (ClusterRole, ServiceAccount, binding).
    rest = render({"injection": {"enabled": False}, "operator": {"enabled": False}, "tests": {"enabled": False}})
    assert sorted(d["kind"] for d in rest) == ["ClusterRole", "ClusterRoleBinding", "ServiceAccount"]
    assert all(d["metadata"]["name"] == "relayfed-check" for d in rest)


def test_the_operator_is_leader_elected_and_may_do_what_its_reconcilers_do():
    docs = render()
    (dep,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "relayfed-operator"]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in c and c["args"][:2] == ["operator", "run"], "the image's ENTRYPOINT is relayfed"
    assert "--federation=relayfed-system/relayfed" in c["args"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (role,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "relayfed-operator"]
    verbs = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert "create" in verbs[("", "secrets")], "the CA Secret is created with POST"
    assert "update" not in verbs[("", "secrets")], "the operator never replaces a Secret"
    assert "create" in verbs[("authentication.k8s.io", "tokenreviews")]
    assert "update" in verbs[("relayfed.io", "relays/finalizers")]
    (lease,) = [d for d in docs if d["kind"] == "Role"]
    assert lease["rules"][0]["resources"] == ["leases"]
    assert lease["rules"][1] == {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "patch"]}, \
        "the leader labels pods in its own namespace only"


def test_every_replica_is_ready_and_the_distribution_service_selects_the_leader():
    docs = render()
    svcs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert svcs["relayfed-operator"]["spec"]["selector"]["relayfed.io/leader"] == "true"
    assert "relayfed.io/leader" not in svcs["relayfed-operator-metrics"]["spec"]["selector"]
    pdbs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert pdbs["relayfed-operator"]["spec"]["minAvailable"] == 1
    assert pdbs["relayfed-injector"]["spec"]["minAvailable"] == 1
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        anti = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        assert anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"] == \
            "kubernetes.io/hostname", dep["metadata"]["name"]
    # One replica: no PDB (it would block every drain).
    assert not [d for d in render({"operator": {"replicas": 1}, "injection": {"webhook": {"replicas": 1}}})
                if d["kind"] == "PodDisruptionBudget"]


def test_placement_and_metadata_values_reach_every_workload():
    place = {"nodeSelector": {"pool": "infra"}, "tolerations": [{"key": "infra", "operator": "Exists"}],
             "priorityClassName": "system-cluster-critical", "podLabels": {"team": "net"},
             "podAnnotations": {"owner": "net"}, "topologySpreadConstraints": [
                 {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "ScheduleAnyway"}]}
    values = {"imagePullSecrets": [{"name": "regcred"}], "operator": place, "injection": {"webhook": place},
              "relays": place, "image": {"digest": "sha256:" + "a" * 64}}
    docs = render(values)
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        tpl = dep["spec"]["template"]
        spec = tpl["spec"]
        assert spec["nodeSelector"] == {"pool": "infra"} and spec["tolerations"][0]["key"] == "infra"
        assert spec["priorityClassName"] == "system-cluster-critical"
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]
        assert spec["topologySpreadConstraints"][0]["topologyKey"] == "zone"
        assert tpl["metadata"]["labels"]["team"] == "net" and tpl["metadata"]["annotations"]["owner"] == "net"
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    (op,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "relayfed-operator"]
    c = op["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "ghcr.io/relayfed/relayfed@sha256:" + "a" * 64, "a digest replaces the tag"
    (relay_pods,) = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--relay-pods=")]
    relay_pods = json.loads(relay_pods)
    assert relay_pods["nodeSelector"] == {"pool": "infra"} and relay_pods["imagePullSecrets"] == [{"name": "regcred"}]
    assert any(a == "--proxy-image=ghcr.io/relayfed/relayfed-proxy:0.1.0" for a in c["args"])


def test_the_values_schema_rejects_unknown_keys_and_bad_enums():
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(defaults, schema)
    for bad in ({"operator": {"replicaz": 2}}, {"injection": {"failurePolicy": "fail"}},
                {"injection": {"iptables": "nftables"}}, {"image": {"digest": "latest"}},
                {"injection": {"webhook": {"certManager": {"issuerRef": {"kind": "Certificate"}}}}},
                {"monitoring": {"podMonitor": {"interval": "often"}}}, {"typo": True}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(_merge(defaults, bad), schema)


def _merge(base, extra):
    out = json.loads(json.dumps(base))
    for k, v in extra.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


CHECKOV = os.environ.get("CHECKOV", "checkov")


@pytest.mark.parametrize("values", [
    {},
    {"injection": {"webhook": {"certManager": {"enabled": True, "issuerRef": {"kind": "ClusterIssuer", "name": "ca"}}}},
     "monitoring": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True},
                    "dashboards": {"enabled": True}, "prometheusRule": {"enabled": True}}},
])
def test_checkov_finds_nothing_without_a_written_reason(values, tmp_path):
    import shutil

    if shutil.which(CHECKOV) is None:
        pytest.fail(f"checkov missing ({CHECKOV}): make python-deps installs it")
    docs = render(values)
    for d in docs:
        for key, reason in (d["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, why = reason.partition("=")
                assert check.startswith("CKV") and len(why) > 40, f"{d['metadata']['name']}: {key} has no reason"
    (tmp_path / "rendered.yaml").write_text(yaml.safe_dump_all(docs))
    out = subprocess.run([CHECKOV, "-d", str(tmp_path), "--framework", "kubernetes", "--quiet", "--compact",
                          "-o", "json"], capture_output=True, text=True)
    report = json.loads(out.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert failed == [], failed
    assert report["summary"]["passed"] > 250, "checkov scanned the rendered objects"


def test_the_two_webhooks_have_disjoint_namespace_selectors_and_paths():
    (mwc,) = [d for d in render() if d["kind"] == "MutatingWebhookConfiguration"]
    hooks = {h["name"]: h for h in mwc["webhooks"]}
    ns, pod = hooks["namespace.inject.relayfed.io"], hooks["pod.inject.relayfed.io"]
    assert ns["clientConfig"]["service"]["path"] == "/inject/namespace"
    assert pod["clientConfig"]["service"]["path"] == "/inject"
    sel = lambda h: {e["key"]: (e["operator"], e["values"]) for e in h["namespaceSelector"]["matchExpressions"]}
    assert sel(ns)["relayfed.io/inject"] == ("In", ["enabled"])
    assert sel(pod)["relayfed.io/inject"] == ("NotIn", ["enabled"])
    for h in (ns, pod):
        assert "kube-system" in sel(h)["kubernetes.io/metadata.name"][1]
        assert h["failurePolicy"] == "Fail" and h["sideEffects"] == "None" and h["clientConfig"]["caBundle"]


@pytest.mark.skipif(not RELAYFED, reason="set RELAYFED to the relayfed binary (make test-python does)")
@pytest.mark.parametrize("native", [True, False])
def test_rendered_injection_settings_drive_the_webhook(native, tmp_path):
    (cm,) = [d for d in render({"injection": {"nativeSidecar": native}}) if d["kind"] == "ConfigMap"]
    cfg = tmp_path / "inject.json"
    cfg.write_text(cm["data"]["inject.json"])
    out = subprocess.run([RELAYFED, "webhook", "review", str(FIXTURES / "plain.json"), "--namespace-enabled", "--config", str(cfg)],
                         check=True, capture_output=True, text=True)
    response = json.loads(out.stdout)["response"]
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    proxy = [op["value"] for op in ops if op["path"].startswith("/spec/") and isinstance(op["value"], (dict, list))]
    proxy = [c for v in proxy for c in (v if isinstance(v, list) else [v]) if c.get("name") == "relayfed-proxy"]
    assert len(proxy) == 1
    assert proxy[0].get("restartPolicy") == ("Always" if native else None)


def test_the_chart_readme_is_generated_from_the_current_values():
    bin_dir = os.environ.get("RELAYFED_CLUSTER_BIN")
    if not bin_dir:
        pytest.fail("RELAYFED_CLUSTER_BIN unset: make test-python sets it (helm-docs is built with the control plane)")
    out = subprocess.run([os.path.join(bin_dir, "helm-docs"), "--chart-search-root", str(ROOT / "charts"),
                          "--chart-to-generate", str(CHART), "--dry-run"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (CHART / "README.md").read_text().strip(), \
        "charts/relayfed/README.md is stale: run `make chart-docs` and commit it"


def test_the_chart_ships_the_generated_dashboards_and_alerts_when_asked():
    assert not [d for d in render() if d["kind"] == "PrometheusRule"], "off by default"
    docs = render({"monitoring": {"dashboards": {"enabled": True, "annotations": {"grafana_folder": "relayfed"}},
                                  "prometheusRule": {"enabled": True, "labels": {"release": "kps"}}}})
    chart = CHART
    boards = {d["metadata"]["name"]: d for d in docs
              if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1"}
    files = sorted((chart / "dashboards").glob("*.json"))
    assert len(files) == 5 and len(boards) == 5
    for f in files:
        (cm,) = [b for b in boards.values() if f.name in b["data"]]
        assert json.loads(cm["data"][f.name]) == json.loads(f.read_text())
        assert cm["metadata"]["annotations"] == {"grafana_folder": "relayfed"}
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"] == yaml.safe_load((chart / "alerts" / "relayfed.rules.yaml").read_text())
    # The PodMonitors give every target the labels the dashboards filter on.
    monitors = render({"monitoring": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}})
    for pm in [d for d in monitors if d["kind"] == "PodMonitor"]:
        targets = {r["targetLabel"] for r in pm["spec"]["podMetricsEndpoints"][0]["relabelings"]}
        assert targets == {"federation", "node", "role"}, pm["metadata"]["name"]
