//! Weft's waypoint: the L7 proxy a service opts into (ARCHITECTURE §4.4).
//!
//! It terminates HBONE, identifies the service from the CONNECT target, serves HTTP/1.1 and
//! HTTP/2 on the tunnel, applies the service's `HTTPRoute`s and opens a new HBONE tunnel to
//! the chosen endpoint with its own identity.
//!
//! | module | what |
//! | --- | --- |
//! | [`proxy`] | the data path: which tunnels are served, requests routed, retried, recorded |
//! | [`route`] | the compiled `HTTPRoute`s of a service: matching, weights, filters, policies |
//! | [`upstream`] | HTTP connections to endpoints over HBONE, per-request balancing, ejection |
//! | [`body`] | request bodies kept for retries, response bodies observed to their end |
//! | [`control`] | the controller's watch stream applied to the state |
//! | [`app`], [`cli`] | wiring and the command line |

pub mod app;
pub mod body;
pub mod cli;
pub mod control;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod upstream;
