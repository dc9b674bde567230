//! `weft-cni`: Weft's chained CNI plugin. The container runtime runs it after the pod's
//! interface plugin (bridge, Calico, Cilium, ...) has given the pod its network; the plugin
//! hands the pod's network namespace to the node's ztunnel over the node socket
//! (`docs/PROTOCOL.md`, "The node socket") and lets the pod start only when ztunnel answers
//! `ok`: its traffic is then captured from its very first connection, or it is known not to
//! be part of the mesh. If ztunnel cannot be reached the pod does not start (fail closed).
//!
//! ```text
//!  container runtime ──ADD──► bridge ──prevResult──► weft-cni ──{"op":"add",..}──► ztunnel
//!        ▲                                              │ ◄──{"ok":true,..}──────────┘
//!        └────────────── prevResult, unchanged ─────────┘   (or a CNI error: the pod waits)
//! ```
//!
//! - [`plugin`]: the CNI commands (ADD, DEL, CHECK, STATUS, GC, VERSION) over the spec's
//!   environment, stdin and stdout contract;
//! - [`node_socket`]: the one request to ztunnel, bounded in time;
//! - [`error`]: the spec's error object and the codes this plugin uses;
//! - [`install`]: what the ztunnel DaemonSet runs on each node to put the plugin in place (its
//!   binary and an entry in the runtime's network configuration) and to take it out.
//!
//! Synchronous on purpose: it runs once per pod event and makes one request.

#![forbid(unsafe_code)]

pub mod error;
pub mod install;
pub mod node_socket;
pub mod plugin;

/// The name of the binary and the `type` of its entry in a network configuration.
pub const PLUGIN_TYPE: &str = "weft-cni";
