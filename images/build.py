#!/usr/bin/env python3
"""Builds relayfed's container images as OCI image archives, without a container engine.

    python3 images/build.py --bin-dir target/release --out target/images --version 0.1.0

Each image is one layer holding the release binary, exactly the shared libraries it (and, for
the proxy image, iptables) loads at run time — found with ldd on this Debian bookworm host,
the same distribution the Dockerfile's runtime stages use — and the users it runs as. The
result, `<out>/<image>-<version>.oci.tar`, is an OCI image layout in a tar ("oci-archive"),
which `skopeo copy oci-archive:FILE docker://REGISTRY/IMAGE:TAG`, `podman load` and
`docker load` (>= 25) read. Builds are reproducible: sorted entries, fixed timestamps
(SOURCE_DATE_EPOCH, default 0), root ownership.

The image contract (docs/operations.md, "Images") and images/Dockerfile describe the same
two images; tests/python/test_images.py unpacks each archive and runs its entrypoint.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

# Debian bookworm merges /usr: these top-level names are symlinks into /usr.
MERGED_USR = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
# iptables variants the init step can be told to use (`relayfed-proxy init --iptables`), and
# what plain `iptables` resolves to (Debian's default alternative: nf_tables).
IPTABLES_LINKS = {
    "iptables": "xtables-nft-multi",
    "ip6tables": "xtables-nft-multi",
    "iptables-restore": "xtables-nft-multi",
    "ip6tables-restore": "xtables-nft-multi",
    "iptables-save": "xtables-nft-multi",
    "ip6tables-save": "xtables-nft-multi",
}
IPTABLES_MULTI = ["/usr/sbin/xtables-nft-multi", "/usr/sbin/xtables-legacy-multi"]
IPTABLES_NAMES = [
    f"{fam}-{kind}{suffix}"
    for fam in ("iptables", "ip6tables")
    for kind in ("nft", "legacy")
    for suffix in ("", "-save", "-restore")
]


@dataclass
class Image:
    """One image: its files (path in the image -> path on this host), users and entrypoint."""

    name: str
    entrypoint: list[str]
    user: str
    passwd: list[str]
    files: dict[str, str] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    dirs: dict[str, int] = field(default_factory=dict)
    extra: dict[str, bytes] = field(default_factory=dict)


def shared_libraries(binary: str) -> list[str]:
    """The absolute paths ldd resolves for `binary` (the dynamic loader included)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if out.returncode != 0:
        if "not a dynamic executable" in out.stdout + out.stderr:
            return []
        sys.exit(f"images: ldd {binary} failed: {out.stderr.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        if "not found" in line:
            sys.exit(f"images: {binary} needs a library this host lacks: {line.strip()}")
        m = re.search(r"=>\s+(/\S+)", line) or re.match(r"\s*(/\S+)", line)
        if m:
            libs.append(m.group(1))
    return libs


def canonical(path: str) -> str:
    """`path` with merged-/usr directory names resolved (its last component kept)."""
    head, tail = os.path.split(path)
    return os.path.join(os.path.realpath(head), tail)


def add_host_file(img: Image, path: str) -> None:
    """Adds a host file under its own path, following (and keeping) symlinks."""
    path = canonical(path)
    if path in img.files or path in img.symlinks:
        return
    if os.path.islink(path):
        target = os.readlink(path)
        img.symlinks[path] = target
        add_host_file(img, os.path.join(os.path.dirname(path), target))
        return
    if not os.path.isfile(path):
        sys.exit(f"images: {path} is missing on this host")
    img.files[path] = path


def add_binary(img: Image, host: str, image_path: str) -> None:
    """Adds an executable at `image_path` and every shared library it loads."""
    if not os.path.isfile(host):
        sys.exit(f"images: {host} not found (build the release binaries first)")
    img.files[image_path] = host
    for lib in shared_libraries(host):
        add_host_file(img, lib)


def add_iptables(img: Image) -> None:
    """Adds iptables (nft and legacy, IPv4 and IPv6) with its extension modules."""
    for multi in IPTABLES_MULTI:
        add_binary(img, multi, multi)
    for name in IPTABLES_NAMES:
        link = f"/usr/sbin/{name}"
        if not os.path.islink(link):
            sys.exit(f"images: {link} is missing on this host (apt-get install iptables)")
        img.symlinks[link] = os.readlink(link)
    for name, target in IPTABLES_LINKS.items():
        img.symlinks[f"/usr/sbin/{name}"] = target
    # Extensions are dlopen()ed by name at run time, so ldd of the binaries misses them.
    ext_dirs = sorted({os.path.realpath(p) for p in Path("/usr/lib").glob("*/xtables")})
    if not ext_dirs:
        sys.exit("images: no xtables extension directory under /usr/lib (apt-get install iptables)")
    for ext_dir in ext_dirs:
        for so in sorted(Path(ext_dir).glob("*.so")):
            add_binary(img, str(so), str(so))


def layer_tar(img: Image, epoch: int) -> bytes:
    """The image's single layer, as a reproducible uncompressed tar."""
    entries: dict[str, tarfile.TarInfo] = {}
    data: dict[str, bytes] = {}

    def info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name.lstrip("/"))
        ti.type, ti.mode, ti.mtime = kind, mode, epoch
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    def parents(path: str) -> None:
        parent = os.path.dirname(path.rstrip("/"))
        while parent not in ("/", ""):
            if parent.lstrip("/") in MERGED_USR:
                return
            entries.setdefault(parent, info(parent, tarfile.DIRTYPE, 0o755))
            parent = os.path.dirname(parent)

    for top, target in MERGED_USR.items():
        ti = info("/" + top, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        entries["/" + top] = ti
    for path, mode in img.dirs.items():
        parents(path)
        entries[path] = info(path, tarfile.DIRTYPE, mode)
    for path, target in img.symlinks.items():
        parents(path)
        ti = info(path, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        entries[path] = ti
    for path, host in img.files.items():
        parents(path)
        blob = Path(host).read_bytes()
        mode = 0o755 if os.access(host, os.X_OK) else 0o644
        entries[path] = info(path, tarfile.REGTYPE, mode)
        data[path] = blob
    for path, blob in img.extra.items():
        parents(path)
        entries[path] = info(path, tarfile.REGTYPE, 0o644)
        data[path] = blob

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            ti = entries[path]
            if path in data:
                ti.size = len(data[path])
                tar.addfile(ti, io.BytesIO(data[path]))
            else:
                tar.addfile(ti)
    return buf.getvalue()


def sha256(blob: bytes) -> str:
    """The OCI digest of `blob`."""
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def oci_archive(img: Image, version: str, epoch: int, out: Path) -> Path:
    """Writes the OCI image layout of `img` as a tar archive; returns its path."""
    layer = layer_tar(img, epoch)
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=epoch, compresslevel=9) as z:
        z.write(layer)
    layer_gz = gz.getvalue()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    created = "1970-01-01T00:00:00Z" if epoch == 0 else _rfc3339(epoch)
    labels = {
        "org.opencontainers.image.title": img.name,
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.source": "https://github.com/relayfed/relayfed",
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    config = {
        "created": created,
        "architecture": arch,
        "os": "linux",
        "config": {
            "User": img.user,
            "Entrypoint": img.entrypoint,
            "Env": ["PATH=/usr/local/bin:/usr/sbin:/usr/bin"],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]},
        "history": [{"created": created, "created_by": "images/build.py"}],
    }
    config_blob = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(config_blob),
            "size": len(config_blob),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha256(layer_gz),
                "size": len(layer_gz),
            }
        ],
        "annotations": labels,
    }
    manifest_blob = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": manifest["mediaType"],
                "digest": sha256(manifest_blob),
                "size": len(manifest_blob),
                "platform": {"architecture": arch, "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": version},
            }
        ],
    }
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True, indent=2).encode(),
    }
    for blob in (layer_gz, config_blob, manifest_blob):
        files["blobs/sha256/" + sha256(blob).split(":", 1)[1]] = blob
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{img.name}-{version}.oci.tar"
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, epoch
            tar.addfile(ti)
        for name in sorted(files):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(files[name]), 0o644, epoch
            tar.addfile(ti, io.BytesIO(files[name]))
    tmp.replace(path)
    print(f"images: {path} ({len(layer_gz) / 1e6:.1f} MB layer, {len(img.files)} files, "
          f"manifest {sha256(manifest_blob)})")
    return path


def _rfc3339(epoch: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def passwd_files(entries: list[str]) -> dict[str, bytes]:
    """/etc/passwd and /etc/group for `name:uid` entries (plus root)."""
    users = [("root", 0)] + [(e.split(":")[0], int(e.split(":")[1])) for e in entries]
    passwd = "".join(f"{n}:x:{u}:{u}:{n}:/:/usr/sbin/nologin\n" for n, u in users)
    group = "".join(f"{n}:x:{u}:\n" for n, u in users)
    return {"/etc/passwd": passwd.encode(), "/etc/group": group.encode()}


def binary_image(bin_dir: Path, binary: str, user: str, uid: int) -> Image:
    """An image whose ENTRYPOINT is `binary` (from `bin_dir`), run as `user` with `uid`."""
    path = f"/usr/local/bin/{binary}"
    img = Image(name=binary, entrypoint=[path], user=f"{uid}:{uid}", passwd=[f"{user}:{uid}"])
    add_binary(img, str(bin_dir / binary), path)
    return img


def images(bin_dir: Path) -> list[Image]:
    """The two images of the contract."""
    relayfed = binary_image(bin_dir, "relayfed", "nonroot", 65532)
    proxy = binary_image(bin_dir, "relayfed-proxy", "relayfed-proxy", 1337)
    add_iptables(proxy)
    for img in (relayfed, proxy):
        img.dirs.update({"/tmp": 0o1777, "/run": 0o755})
        img.symlinks["/var/run"] = "../run"
        img.extra.update(passwd_files(img.passwd))
        # Verification of peers other than the federation CA is not done by relayfed, but a
        # CA bundle lets `relayfed check` and kube clients reach API servers with public CAs.
        bundle = "/etc/ssl/certs/ca-certificates.crt"
        if os.path.isfile(bundle):
            img.files[bundle] = bundle
    return [relayfed, proxy]


def main() -> None:
    """Parses the arguments and writes both archives."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin-dir", type=Path, required=True, help="directory with the release binaries")
    ap.add_argument("--out", type=Path, required=True, help="where the .oci.tar archives go")
    ap.add_argument("--version", required=True, help="image tag (the chart's appVersion)")
    args = ap.parse_args()
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    for img in images(args.bin_dir):
        oci_archive(img, args.version, epoch, args.out)


if __name__ == "__main__":
    main()
