//! ztunnel programmed by the controller.
//!
//! ```text
//!  controller ──watch stream──► Watcher: decode ─► cursor check ─► state.apply(changes)
//!      ▲                                              │             trust bundle → TLS trust store
//!      │ ack (version, rejected resources)            ├─► manager.reconcile() (local pods)
//!      └──────────────────────────────────────────────┘─► persist (last applied config)
//! ```
//!
//! The watcher subscribes for its node, applies each message as it comes (a snapshot is
//! turned into the changes against what is held, so it too touches only what differs),
//! reports the version it applied with the resources it rejected, and writes what it applied
//! to the node's state directory. When the controller is unreachable it keeps serving with
//! what it last applied and resubscribes with backoff, resuming from its cursor (the
//! controller then sends only what was missed, or a snapshot if it no longer can). A ztunnel
//! that starts while the controller is down starts from the persisted configuration.

pub mod client;
pub mod persist;
