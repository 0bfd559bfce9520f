//! The binary's modes, composed from the layers below: main relay, home node, and the
//! workload sidecar (a home node that bootstraps its identity and config in a pod).

pub mod home;
pub mod main_control;
pub mod main_homes;
pub mod main_live;
pub mod main_relay;
pub(crate) mod router;
pub mod runner;
pub mod workload;
