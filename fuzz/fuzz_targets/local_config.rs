//! ztunnel's local config file: YAML to the model (`meshapi::Snapshot::from_yaml`, what
//! `ztunnel::local::parse` calls after checking the bytes are UTF-8). Besides panics, it
//! checks that every resource of an accepted file survives the wire form the controller sends
//! (`Resource::encode` then `Resource::from_wire`), unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshapi::Snapshot;
use meshapi::resource::{Resource, Wire};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(snapshot) = Snapshot::from_yaml(text) else { return };
    for resource in snapshot.resources() {
        let line = resource.encode();
        let wire: Wire = serde_json::from_str(&line).expect("an encoded resource is a wire resource");
        match Resource::from_wire(wire) {
            Ok(back) => assert_eq!(back, resource, "{line}"),
            Err(e) => panic!("{line} does not decode: {e}"),
        }
    }
});
