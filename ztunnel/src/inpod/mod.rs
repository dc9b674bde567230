//! In-pod capture (ARCHITECTURE §8): finding an enrolled pod's network namespace, installing
//! redirection rules there, and opening ztunnel's listeners and outbound sockets inside it.
//! The pod is never restarted. Beside them, in the node's own namespace, the probe SNAT that
//! lets kubelet's probes through the pods' rules.

pub mod netns;
pub mod probes;
pub mod route;
pub mod rules;
pub mod scan;
pub mod socket;

pub use netns::Netns;
