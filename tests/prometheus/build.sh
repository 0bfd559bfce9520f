#!/usr/bin/env bash
# Build Prometheus 3 and promtool (the module github.com/prometheus/prometheus v0.316.0 is
# Prometheus 3.16.0) into a cache directory outside the work tree, keyed by go.mod/go.sum,
# this script and the Go version: a warm machine rebuilds nothing. Prints the binary
# directory as its last line. Built without the web UI's assets (they come from npm in
# Prometheus's own build): the HTTP API, scraping, rules and promtool are complete, the
# browser UI answers 404.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache_root="${RELAYFED_PROMETHEUS_CACHE:-/var/tmp/relayfed-prometheus}"
version="3.16.0"

key="$( (cat "$here"/go.mod "$here"/go.sum "$here"/build.sh; go version) | sha256sum | cut -c1-16)"
bin="$cache_root/$key/bin"
if [ -x "$bin/prometheus" ] && [ -x "$bin/promtool" ]; then
  echo "prometheus: $version up to date ($key)" >&2
  echo "$bin"
  exit 0
fi

start=$(date +%s)
tmp="$cache_root/$key/tmp"
rm -rf "$tmp" && mkdir -p "$tmp" "$bin"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
echo "prometheus: building $version into $bin (cold: ~5 min on 2 cores)" >&2
(cd "$here" && go build -trimpath -tags netgo \
  -ldflags "-s -w -X github.com/prometheus/common/version.Version=$version -X github.com/prometheus/common/version.Branch=relayfed-tests" \
  -o "$tmp/" github.com/prometheus/prometheus/cmd/prometheus github.com/prometheus/prometheus/cmd/promtool)
mv "$tmp"/* "$bin"/
rmdir "$tmp"
for old in "$cache_root"/*/; do [ "${old%/}" = "$cache_root/$key" ] || rm -rf "$old"; done
echo "prometheus: built in $(( $(date +%s) - start ))s" >&2
echo "$bin"
