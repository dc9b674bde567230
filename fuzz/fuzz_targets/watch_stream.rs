//! The watch stream as ztunnel reads it from the controller: each input line is one message
//! (`meshapi::watch::Message::decode`, its resources through `Resource::from_wire`), checked
//! in order against a `Cursor` as ztunnel's watcher does. Besides panics, it checks that every
//! resource accepted survives being encoded and decoded again, unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshapi::resource::{Resource, Wire};
use meshapi::watch::{Cursor, Message};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut cursor = Cursor::default();
    for line in text.split('\n') {
        let Ok(message) = Message::decode(line) else { continue };
        let mut next = cursor.clone();
        if next.advance(&message).is_ok() {
            cursor = next;
        } else {
            // The watcher resubscribes for a snapshot.
            cursor = Cursor::default();
        }
        let resources = match &message {
            Message::Snapshot { resources, .. } => resources.as_slice(),
            Message::Delta { upserts, .. } => upserts.as_slice(),
            Message::Resumed { .. } | Message::Heartbeat { .. } => &[],
        };
        for resource in resources.iter().flatten() {
            let encoded = resource.encode();
            let wire: Wire = serde_json::from_str(&encoded).expect("an encoded resource is a wire resource");
            match Resource::from_wire(wire) {
                Ok(back) => assert_eq!(&back, resource, "{encoded}"),
                Err(e) => panic!("{encoded} does not decode: {e}"),
            }
        }
    }
});
