//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): parsers of untrusted
//! input that are private to the crate, exposed as they are, with no other behaviour.
//!
//! The HTTP/2 and CONNECT path is reached through [`Server::serve_established`](crate::Server::serve_established),
//! which runs the server's own code over a stream whose TLS handshake is done.

use std::net::IpAddr;

use http::HeaderValue;

/// The server's reading of a `forwarded` header (RFC 7239): the client address of its first
/// element's `for=`, `Ok(None)` when none is named, an error when it cannot be read exactly.
pub fn forwarded_for(value: &HeaderValue) -> Result<Option<IpAddr>, &'static str> {
    crate::server::parse_forwarded_for(value)
}
