//! The controller: one source of truth for the mesh. It watches the cluster (a directory of
//! Kubernetes-style YAML objects, or the Kubernetes API), translates it into the `meshapi`
//! model, pushes every change to the subscribed proxies as a small versioned delta, and acts
//! as the certificate authority that signs workload certificates for the nodes entitled to
//! them.
//!
//! Modules in the order a change travels: `source` (cluster objects) → `translate` (model
//! resources) → `store` (versions and history) → `server` (watch and certificate APIs); beside
//! them `ca` (signing) and `auth` (which node is calling; `tokenreview` in a Kubernetes
//! cluster), and on Kubernetes `deploy` (each waypoint Gateway's ServiceAccount, CA root and
//! Deployment).

#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod ca;
pub mod ca_secret;
pub mod cli;
pub mod config;
pub mod deploy;
pub mod leader;
pub mod metrics;
pub mod server;
pub mod store;
pub mod tokenreview;

pub mod source;
pub mod status;
pub mod translate;
