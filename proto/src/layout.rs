//! The file layout of an injected sidecar's runtime directory: the plan names these files in
//! the snapshot it writes for a workload, and the sidecar resolves them against its `--dir`.

/// Federation CA bundle.
pub const CA_FILE: &str = "ca.pem";
/// Workload certificate.
pub const CERT_FILE: &str = "tls.pem";
/// Workload private key.
pub const KEY_FILE: &str = "tls.key";
/// Workload Noise static key.
pub const NOISE_FILE: &str = "noise.key";
