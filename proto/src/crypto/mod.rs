//! Cryptography without I/O: ECH (HPKE), Noise XK sessions, the federation CA.

pub mod ca;
pub mod ech;
pub mod ech_signature;
pub mod noise;
