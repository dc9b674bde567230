//! The HBONE server's reading of a `forwarded` header (RFC 7239 `for=`), on any bytes a header
//! value can hold. Besides panics, it checks what the wire contract promises: an address is
//! read only from a value it can read exactly, so every address returned appears in the value
//! as it was written.

#![no_main]

use std::net::IpAddr;

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // What h2 hands the server: a value without CR, LF or NUL (others are refused before).
    let Ok(value) = HeaderValue::from_bytes(data) else { return };
    let Ok(Some(ip)) = hbone::fuzzing::forwarded_for(&value) else { return };
    let text = value.to_str().expect("an address was read, so the value is visible ASCII");
    let written = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(_) => return, // IPv6 has many spellings; parsed by the standard library.
    };
    assert!(text.contains(&written), "{text:?} was read as {ip}");
});
