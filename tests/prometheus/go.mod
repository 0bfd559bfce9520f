// Test infrastructure only: Prometheus 3 and promtool from their Go module
// (tests/prometheus/build.sh); the observability tests and the alert-rule tests run them.
module relayfed.io/tests/prometheus

go 1.26.7

require github.com/prometheus/prometheus v0.316.0
