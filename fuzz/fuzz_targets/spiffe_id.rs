//! SPIFFE ID parsing (`spiffe::SpiffeId`), as a certificate's URI SAN, a CSR, the config and
//! the controller's API hand it strings. Besides panics, it checks that an accepted ID keeps
//! its text, splits into the parts it was made of, and is rebuilt from them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spiffe::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(id) = text.parse::<SpiffeId>() else { return };
    assert_eq!(id.as_str(), text);
    assert_eq!(format!("spiffe://{}/ns/{}/sa/{}", id.trust_domain(), id.namespace(), id.service_account()), text);
    let rebuilt = SpiffeId::new(id.trust_domain(), id.namespace(), id.service_account())
        .expect("the parts of a valid ID make a valid ID");
    assert_eq!(rebuilt, id);
});
