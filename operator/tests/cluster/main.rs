//! The operator on a real control plane (etcd, kube-apiserver, controller-manager, scheduler,
//! kwok; built from Go modules by tests/cluster/build.sh and started by the
//! relayfed-test-cluster harness once for this binary). Each test takes its own namespace;
//! tests that run an operator hold [`support::serial`]. What the harness does not emulate: a
//! kubelet (kwok marks pods Running; no container runs), image pulls, cgroups, kube-proxy and
//! cluster DNS. Node processes do not run either: where a test needs a node's side of config
//! distribution (the rollout's cohort reports), it subscribes as that node itself.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod api;
mod chart;
mod identity;
mod injection;
mod install;
mod leader;
mod observability;
mod reconcilers;
mod rollout;
mod services;
mod support;
