//! Weft's waypoint: the L7 proxy a service opts into (ARCHITECTURE §4.4).
//!
//! It terminates HBONE, identifies the service from the CONNECT target, serves HTTP/1.1 and
//! HTTP/2 on the tunnel, applies the service's `HTTPRoute`s and opens a new HBONE tunnel to
//! the chosen endpoint with its own identity.

pub mod route;
