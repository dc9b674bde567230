//! A peer's certificate, DER: what the HBONE server and client read from it (the SPIFFE
//! identity of the leaf's single URI SAN, `hbone::tls::peer_identity`) and a trust bundle's
//! root (`TrustBundle::new`, as the controller's bundle is loaded). Besides panics, it checks
//! that an identity read from a certificate is a valid SPIFFE ID as written.

#![no_main]

use hbone::TrustBundle;
use hbone::tls::peer_identity;
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;
use spiffe::SpiffeId;

fuzz_target!(|data: &[u8]| {
    let der = CertificateDer::from(data.to_vec());
    if let Ok(id) = peer_identity(Some(std::slice::from_ref(&der))) {
        assert_eq!(id.as_str().parse::<SpiffeId>().as_ref(), Ok(&id));
    }
    let _ = TrustBundle::new(vec![der]);
});
