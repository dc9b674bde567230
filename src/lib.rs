//! The `weft` package as a library: what the `weft` command, the end-to-end tests (`tests/`)
//! and the benchmarks (`benches/`) share. Today that is [`meshlab`]: a mesh on a
//! network-namespace lab.

#![forbid(unsafe_code)]

pub mod meshlab;
