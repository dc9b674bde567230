//! HBONE: TCP streams carried as HTTP/2 `CONNECT` streams inside mutual TLS 1.3, with SPIFFE
//! identities (ARCHITECTURE §4–§6, wire contract in `docs/ARCHITECTURE.md`).
//!
//! This crate knows nothing of pods or Kubernetes. It provides:
//! - [`identity`]: the [`SpiffeId`] type;
//! - [`tls`]: credentials, the swappable trust bundle, SPIFFE verification;
//! - [`ca`]: a small CA (rcgen) for tests and for the controller;
//! - [`client`]: opening tunnels over pooled HTTP/2 connections;
//! - [`server`]: accepting tunnels, with a caller-supplied authorization and dialer;
//! - [`copy`]: moving bytes between a socket and a tunnel with half-close and resets;
//! - [`drain`]: the graceful-shutdown primitive every listener uses;
//! - [`limits`]: what one hostile client may cost the server, and rate-limited log lines;
//! - `testing` (feature `testing`): helpers shared by tests, benchmarks and the demo.
//! - `fuzzing` (feature `fuzzing`): the crate's private parsers, for the fuzz targets.

#![forbid(unsafe_code)]

pub mod ca;
pub mod client;
pub mod config;
pub mod copy;
pub mod drain;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod limits;
pub mod server;
pub mod socket;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod tunnel;

pub use client::{Client, ConnectError, ConnectRequest};
pub use config::Config;
pub use server::{Handler, InboundRequest, Rejection, Server, Upstream};
/// The identity types live in the `spiffe` crate (shared with the model, which must not
/// depend on a TLS stack); `hbone::identity` keeps their old path.
pub use spiffe as identity;
pub use spiffe::SpiffeId;
pub use tls::{Credentials, TrustBundle, TrustStore, WorkloadCert};
pub use tunnel::Tunnel;
