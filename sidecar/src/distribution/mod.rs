//! Config distribution, the node side: the long-poll subscription client and the workload
//! certificate client. The wire types (snapshot long-poll, acks, reports, certificate
//! requests) are plain data in [`relayfed_proto::distribution`], re-exported here.

pub mod certificate;
pub mod client;

pub use relayfed_proto::distribution::*;
