//! The wire protocol: frames, route header, ECHConfigList and error codes. No I/O here.

pub mod control;
pub mod ech_config;
pub mod error_code;
pub mod frame;
pub mod proxy_header;
pub mod punch;
pub mod route;
pub mod wire;

pub use ech_config::{EchConfig, EchConfigList};
pub use error_code::ErrorCode;
pub use frame::{ErrorFrame, Frame};
pub use route::{InnerRoute, PathEntry, RouteBody, RouteHeader, SealedRoute};
pub use wire::DecodeError;
