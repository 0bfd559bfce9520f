//! Resilience primitives, each alone and tested alone: token-bucket rate limiting, circuit
//! breakers, exponential backoff with full jitter.

pub use relayfed_proto::backoff;

pub mod breaker;
pub mod rate_limit;
