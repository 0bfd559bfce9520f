//! Federation logic: which route and which ECH decision a stream gets.

pub mod ech_policy;
