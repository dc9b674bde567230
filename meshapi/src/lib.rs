//! Weft's resource model and the protocols that carry it: the small set of objects every
//! proxy needs, the same whichever source produced them (the Kubernetes API, a YAML
//! directory, or a local file): [`Workload`], [`Service`], [`Authorization`], [`Waypoint`],
//! [`HttpRoute`], [`TrustBundle`]. It is parsed once, at the edge ([`Snapshot::from_yaml`],
//! [`Resource::from_wire`]), into typed values, with errors that name the offending field.
//!
//! [`watch`] and [`certificate`] are both ends of the controller's APIs, without I/O: this
//! crate knows nothing about sockets, TLS or async runtimes, so tools and the controller's
//! sources can depend on it cheaply.

#![forbid(unsafe_code)]

pub mod certificate;
pub mod httproute;
pub mod model;
pub mod node;
pub mod resource;
pub mod watch;
mod yaml;

pub use model::{
    Action, Authorization, Fault, HttpRoute, MtlsMode, Operation, PathPattern, PolicyScope, Principal, Rule, Service,
    ServicePort, Snapshot, Source, TrustBundle, Waypoint, Workload,
};
pub use resource::{Key, Kind, Resource};
pub use yaml::ModelError;
