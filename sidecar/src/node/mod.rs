//! Running a node as a process: the snapshot, admin server, ready line and config
//! subscription around a main relay ([`crate::relay`]) or a home proxy ([`crate::proxy`]), and
//! the workload sidecar (a home that bootstraps its identity and config in a pod).

pub mod identity_files;
pub mod runner;
pub mod workload;
