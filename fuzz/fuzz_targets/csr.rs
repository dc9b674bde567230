//! The CA's certificate signing request parser (`hbone::ca::Csr::parse`), PEM or DER, as the
//! controller receives it from any node. Besides panics, it checks that an accepted request
//! names a valid SPIFFE ID.

#![no_main]

use hbone::ca::Csr;
use libfuzzer_sys::fuzz_target;
use spiffe::SpiffeId;

fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = Csr::parse(data) {
        let id = csr.identity();
        assert_eq!(id.as_str().parse::<SpiffeId>().as_ref(), Ok(id));
    }
});
