#!/usr/bin/env bash
# Build the test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kube-proxy, kubectl, kwok, helm, CoreDNS) from Go modules into a cache directory outside the work tree, keyed by
# the hash of the three go.mod/go.sum pairs and the Go version: a warm machine rebuilds nothing.
# Prints the binary directory as its last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache_root="${RELAYFED_CLUSTER_CACHE:-/var/tmp/relayfed-cluster}"
k8s_version="v1.36.3"

key="$( (cat "$here"/go.mod "$here"/go.sum "$here"/kwok/go.mod "$here"/kwok/go.sum \
          "$here"/helm/go.mod "$here"/helm/go.sum "$here"/helm-docs/go.mod "$here"/helm-docs/go.sum \
          "$here"/coredns/go.mod "$here"/coredns/go.sum "$here"/coredns/main.go \
          "$here"/build.sh; go version) | sha256sum | cut -c1-16)"
bin="$cache_root/$key/bin"
want=(etcd kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl kwok helm helm-docs coredns)

complete=1
for b in "${want[@]}"; do [ -x "$bin/$b" ] || complete=0; done
if [ "$complete" = 1 ]; then
  echo "cluster: binaries up to date ($key)" >&2
  echo "$bin"
  exit 0
fi

start=$(date +%s)
tmp="$cache_root/$key/tmp"
rm -rf "$tmp" && mkdir -p "$tmp" "$bin"
export GOFLAGS="-mod=mod -buildvcs=false"
# Static binaries: nothing of the host C library is needed at run time.
export CGO_ENABLED=0
minor="${k8s_version#v1.}"; minor="${minor%%.*}"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8s_version \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=$k8s_version \
 -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"

echo "cluster: building the control plane $k8s_version into $bin (cold: ~15 min on 2 cores)" >&2
(cd "$here" && go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl)
# etcd's main package is the module root: the binary comes out named `server`.
(cd "$here" && go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
(cd "$here/kwok" && go build -trimpath -ldflags "-s -w" -o "$tmp/kwok" sigs.k8s.io/kwok/cmd/kwok)
# helm stamps the Kubernetes version `helm template`/`lint` assume (else v1.20) from its
# client-go minor, as its Makefile does.
helm_k8s_minor="$(cd "$here/helm" && go list -m -f '{{.Version}}' k8s.io/client-go | cut -d. -f2)"
(cd "$here/helm" && go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=v3.22.0 \
  -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$helm_k8s_minor \
  -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$helm_k8s_minor" \
  -o "$tmp/helm" helm.sh/helm/v3/cmd/helm)
# CoreDNS with the kubernetes plugin: the two-cluster test's cluster DNS (tests/cluster/coredns).
(cd "$here/coredns" && go build -trimpath -ldflags "-s -w" -o "$tmp/coredns" .)
# helm-docs generates (and the chart test re-checks) the chart README's values table.
(cd "$here/helm-docs" && go build -trimpath -ldflags "-s -w" -o "$tmp/helm-docs" github.com/norwoodj/helm-docs/cmd/helm-docs)
# kwok's stage configuration ships in its module: fast node initialisation, heartbeats with
# leases, and pods that become Ready, complete and are deleted.
kwok_dir="$(cd "$here/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"
stages="$tmp/kwok-stages.yaml"
: > "$stages"
for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
         pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
  src="$kwok_dir/kustomize/stage/$f"
  [ -f "$src" ] || { echo "cluster: kwok stage $f missing in $kwok_dir" >&2; exit 1; }
  { echo "---"; cat "$src"; } >> "$stages"
done
mv "$tmp"/* "$bin"/
rmdir "$tmp"
# Older builds (another go.sum or script) are dead weight: ~0.5 GB each.
for old in "$cache_root"/*/; do [ "${old%/}" = "$cache_root/$key" ] || rm -rf "$old"; done
echo "cluster: built in $(( $(date +%s) - start ))s" >&2
echo "$bin"
