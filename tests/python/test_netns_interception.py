"""Unmodified apps in "pods" (network namespaces): transparent interception end to end.

Topology (created and deleted by the test): namespaces A (client pod: curl + relayfed
sidecar running as uid 1337, with the init step's iptables rules), B (server pod:
`python3 -m http.server` on localhost + sidecar exporting it), R (main relay), joined by
a bridge in a fourth namespace. An unmodified curl in A calls the imported service's
ClusterIP (IPv4 and IPv6) exactly as it would without relayfed.

Needs root (network namespaces, iptables); `.ci/run` runs it as root. Without root it is
skipped with that reason.
"""

import base64
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROXY = os.environ.get("RELAYFED_PROXY") or str(ROOT / "target" / "debug" / "relayfed-proxy")
PROXY_UID = 1337
SERVICE = "inventory-lookup"
CLUSTER_IP4 = "10.96.0.10"
CLUSTER_IP6 = "fd00:96::10"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces and iptables rules")


def sh(*args, check=True, ns=None, **kw):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [str(a) for a in args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


class Proc:
    """A background process; `ready` is its first stdout line parsed as JSON (relayfed)."""

    def __init__(self, ns, args, json_ready=True, user=None, env=None):
        prefix = ["ip", "netns", "exec", ns]
        if user is not None:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        self.p = subprocess.Popen(prefix + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.p.stdout.readline()
        if not line:
            raise AssertionError(f"{args[:2]} exited: {self.p.stderr.read()}")
        self.ready = json.loads(line) if json_ready else line

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


@pytest.fixture
def world():
    for tool in ("ip", "iptables", "ip6tables", "tcpdump", "setpriv", "curl"):
        assert shutil.which(tool), f"{tool} is missing (.ci/run installs it)"
    assert os.access(PROXY, os.X_OK), f"{PROXY} missing: run `make test-python`"
    tag = f"rf{os.getpid() % 100000}"
    ns = {k: f"{tag}-{k}" for k in ("net", "a", "b", "r")}
    work = pathlib.Path(tempfile.mkdtemp(prefix="relayfed-netns-", dir="/tmp"))
    work.chmod(0o755)
    procs = []
    try:
        for n in ns.values():
            sh("ip", "netns", "add", n)
        sh("ip", "link", "add", "br0", "type", "bridge", ns=ns["net"])
        sh("ip", "link", "set", "br0", "up", ns=ns["net"])
        for i, k in enumerate(("a", "b", "r"), start=1):
            sh("ip", "link", "add", f"v{k}", "type", "veth", "peer", "name", "eth0", "netns", ns[k], ns=ns["net"])
            sh("ip", "link", "set", f"v{k}", "master", "br0", "up", ns=ns["net"])
            sh("ip", "link", "set", "lo", "up", ns=ns[k])
            sh("ip", "addr", "add", f"10.88.0.{i}/24", "dev", "eth0", ns=ns[k])
            sh("ip", "addr", "add", f"fd00:88::{i}/64", "dev", "eth0", "nodad", ns=ns[k])
            sh("ip", "link", "set", "eth0", "up", ns=ns[k])
            sh("ip", "route", "add", "default", "dev", "eth0", ns=ns[k])
            sh("ip", "-6", "route", "add", "default", "dev", "eth0", ns=ns[k])
        yield {"ns": ns, "work": work, "procs": procs}
    finally:
        for p in procs:
            p.stop()
        for n in ns.values():
            sh("ip", "netns", "del", n, check=False)
        shutil.rmtree(work, ignore_errors=True)


def pki(work):
    ca = work / "ca"
    sh(PROXY, "ca", "init", "--trust-domain", "netns.test", "--out", ca)
    for node in ("hub", "a", "b"):
        sh(PROXY, "ca", "issue", "--ca-dir", ca, "--trust-domain", "netns.test", "--node", node, "--out", work)
    noise = {n: sh(PROXY, "noise", "keygen", "--out", work / f"{n}-noise.key").stdout.strip() for n in ("a", "b")}
    ech_list = sh(PROXY, "ech", "keygen", "--public-name", "relay.netns.test", "--out", work / "hub-ech.json").stdout.strip()
    return noise, ech_list


def snapshot(work, node, role, **extra):
    snap = {
        "schema": 1,
        "node": {"id": node, "role": role, "trustDomain": "netns.test"},
        "tls": {"caFile": "ca/ca.pem", "certFile": f"{node}.pem", "keyFile": f"{node}.key"},
        "admin": "127.0.0.1:15020",
        **extra,
    }
    path = work / f"{node}.yaml"
    path.write_text(json.dumps(snap))
    return path


def metric(text, name, **labels):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(ns):
    return sh("curl", "-s", "--max-time", "5", "http://127.0.0.1:15020/metrics", ns=ns).stdout


def rules(ns):
    """The nat tables, without iptables-save's "# Generated/Completed ... <time>" comments
    (they differ whenever two dumps straddle a second) and packet counters."""
    out = sh("iptables-save", "-t", "nat", ns=ns).stdout + sh("ip6tables-save", "-t", "nat", ns=ns).stdout
    return "\n".join(re.sub(r" \[\d+:\d+\]$", "", line) for line in out.splitlines() if not line.startswith("#"))


def test_unmodified_curl_reaches_a_localhost_server_in_another_pod(world):
    ns, work, procs = world["ns"], world["work"], world["procs"]
    noise, ech_list = pki(work)
    marker = "relayfed-secret-payload-" + base64.b16encode(os.urandom(8)).decode()
    site = work / "site"
    site.mkdir()
    (site / "secret.txt").write_text(marker + "\n")
    (site / "plain.txt").write_text("not federated\n")

    relay = Proc(ns["r"], [PROXY, "main-relay", "--config", snapshot(
        work, "hub", "main", listen="10.88.0.3:7400", ech={"keyFile": "hub-ech.json"})])
    procs.append(relay)
    server = Proc(ns["b"], ["python3", "-u", "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory", site], json_ready=False)
    other = Proc(ns["b"], ["python3", "-u", "-m", "http.server", "8081", "--bind", "10.88.0.2", "--directory", site], json_ready=False)
    procs += [server, other]
    main = {"nodeId": "hub", "endpoint": "10.88.0.3:7400"}
    b = Proc(ns["b"], [PROXY, "home", "--config", snapshot(
        work, "b", "home", mainRelays=[main], echConfigs={"hub": ech_list}, noiseKeyFile="b-noise.key",
        exports=[{"service": SERVICE, "port": 80, "target": "127.0.0.1:8080"}])])
    procs.append(b)

    def pod_a(unmatched):
        imports = [
            {"service": SERVICE, "port": 80, "listen": "127.0.0.1:0", "node": "b", "main": "hub",
             "noisePublicKey": noise["b"], "clusterIp": ip}
            for ip in (f"{CLUSTER_IP4}:80", f"[{CLUSTER_IP6}]:80")
        ]
        cfg = snapshot(work, "a", "home", mainRelays=[main], echConfigs={"hub": ech_list}, noiseKeyFile="a-noise.key", imports=imports,
                       echPolicy={"enabled": True, "mode": "required", "percentage": 100},
                       intercept={"outboundPort": 15001, "proxyUid": PROXY_UID, "scope": "all", "unmatched": unmatched})
        return cfg

    cfg_a = pod_a("passthrough")
    for f in work.iterdir():
        if f.name.startswith("a") or f.name in ("ca",):
            shutil.chown(f, PROXY_UID, PROXY_UID)
    shutil.chown(work / "ca" / "ca.pem", PROXY_UID, PROXY_UID)

    # The init step: dry run changes nothing; running twice leaves one set of rules.
    before = rules(ns["a"])
    dry = sh(PROXY, "init", "--config", cfg_a, "--dry-run", ns=ns["a"]).stdout
    assert "REDIRECT --to-ports 15001" in dry and f"--uid-owner {PROXY_UID}" in dry
    assert rules(ns["a"]) == before
    sh(PROXY, "init", "--config", cfg_a, ns=ns["a"])
    once = rules(ns["a"])
    sh(PROXY, "init", "--config", cfg_a, ns=ns["a"])
    assert rules(ns["a"]) == once
    assert once.count("-A OUTPUT -p tcp -j RELAYFED_OUTPUT") == 2  # one per family

    a = Proc(ns["a"], [PROXY, "home", "--config", cfg_a], user=PROXY_UID)
    procs.append(a)
    assert "127.0.0.1:15001" in a.ready["outbound"]

    capture = work / "link.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", ns["net"], "tcpdump", "-Z", "root", "--immediate-mode", "-i", "va", "-U", "-s", "0", "-w", str(capture)],
                            stderr=subprocess.PIPE, text=True)
    assert "listening on" in dump.stderr.readline()
    try:
        for url in (f"http://{CLUSTER_IP4}:80/secret.txt", f"http://[{CLUSTER_IP6}]:80/secret.txt"):
            out = sh("curl", "-sS", "-g", "--max-time", "10", url, ns=ns["a"])
            assert out.stdout == marker + "\n", (url, out.stderr)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=10)

    m = scrape(ns["a"])
    for dst in (f"{CLUSTER_IP4}:80", f"[{CLUSTER_IP6}]:80"):
        assert metric(m, "relayfed_proxy_intercepted_connections_total", original_dst=dst, service=SERVICE, result="federated") == 1, m
    assert metric(m, "relayfed_proxy_ech_streams_total", outcome="accepted") == 2
    assert metric(m, "relayfed_proxy_calls_total", side="origin", code="OK") == 2

    # On pod A's link: the relay traffic is there, the payload, path and service name are not.
    raw = capture.read_bytes()
    assert len(raw) > 2000, "the capture saw no federation traffic"
    assert bytes([10, 88, 0, 3]) in raw, "the capture holds the packets to the relay"
    assert marker.encode() not in raw
    assert SERVICE.encode() not in raw
    assert b"secret.txt" not in raw

    # A destination that is not imported passes through (counted).
    out = sh("curl", "-sS", "--max-time", "10", "http://10.88.0.2:8081/plain.txt", ns=ns["a"])
    assert out.stdout == "not federated\n", out.stderr
    assert metric(scrape(ns["a"]), "relayfed_proxy_intercepted_connections_total", result="passthrough") == 1

    # ... or is refused when so configured (same rules, new sidecar config).
    a.stop()
    cfg_refuse = pod_a("refuse")
    shutil.chown(cfg_refuse, PROXY_UID, PROXY_UID)
    a2 = Proc(ns["a"], [PROXY, "home", "--config", cfg_refuse], user=PROXY_UID)
    procs.append(a2)
    refused = sh("curl", "-sS", "--max-time", "10", "http://10.88.0.2:8081/plain.txt", ns=ns["a"], check=False)
    assert refused.returncode != 0
    assert metric(scrape(ns["a"]), "relayfed_proxy_intercepted_connections_total", result="refused") == 1
    # The sidecar's own connections are never redirected (uid excluded): it still reaches B.
    assert sh("curl", "-sS", "--max-time", "10", f"http://{CLUSTER_IP4}:80/secret.txt", ns=ns["a"]).stdout == marker + "\n"

    # Clean-up removes everything init added.
    sh(PROXY, "init", "--config", cfg_a, "--cleanup", ns=ns["a"])
    assert "RELAYFED" not in rules(ns["a"])
