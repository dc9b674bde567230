//! ztunnel, Weft's node proxy (ARCHITECTURE §4, §8). One per node: it captures the TCP traffic
//! of the enrolled pods on its node inside their own network namespaces, without restarting
//! them, and carries it to the destination's node over HBONE, applying L4 authorization,
//! service load balancing and Istio-compatible metrics.
//!
//! Modules in the order a connection travels: [`inpod`] (capture) → [`proxy::outbound`] →
//! HBONE (`hbone` crate) → [`proxy::inbound`] / [`proxy::plaintext`] → the app. Around them:
//! [`state`] with [`control`] (the controller's watch stream) or [`local`] (a local file) as
//! the cluster view, [`authz`], [`certs`], [`manager`]
//! (enrollment) with [`runtime`] (pods handed over by the container runtime), [`handoff`]
//! (upgrades: a new ztunnel takes the running one's sockets), [`metrics`], [`admin`], and [`app`]
//! which wires them.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod authz;
pub mod certs;
pub mod cli;
pub mod config;
pub mod control;
pub mod handoff;
pub mod inpod;
pub mod local;
pub mod logwriter;
pub mod manager;
pub mod metrics;
pub mod proxy;
pub mod runtime;
pub mod state;

pub use app::{Bound, build};
pub use config::Config;
