//! Weft's resource model: the small set of objects every proxy needs, the same whichever
//! source produced them (the Kubernetes API, a YAML directory, or a local file):
//! [`Workload`], [`Service`], [`Authorization`]. It is parsed once, at the edge
//! ([`Snapshot::from_yaml`]), into typed values, with errors that name the offending field.
//!
//! This crate knows nothing about sockets; the proxies interpret the model.

#![forbid(unsafe_code)]

pub mod model;
mod yaml;

pub use model::{
    Action, Authorization, MtlsMode, PolicyScope, Principal, Rule, Service, ServicePort, Snapshot, Source, Workload,
};
pub use yaml::ModelError;
