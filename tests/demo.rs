//! The README's main command, `weft demo`, runs to completion and tells its story: this test
//! keeps the command a new user runs first working at every commit. It builds a lab, so it
//! needs root; under `CI=true` it fails rather than skips without it.

use std::process::Command;

#[test]
fn weft_demo_runs_and_shows_the_mesh_at_work() {
    if let Err(e) = lab::Lab::require_root() {
        lab::skip_or_fail(e);
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_weft")).arg("demo").output().expect("run weft demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "weft demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for expected in [
        "server port(s) {8080}, TLS handshake seen: false, plaintext \"hello-from-web\" seen: true",
        "both ztunnels enrolled their pods",
        "unchanged: true",
        "web sent \"hello-from-web\"; the app greeted with \"api-1\" and echoed \"hello-from-web\"",
        "server port(s) {15008}, TLS handshake seen: true, plaintext \"hello-from-web\" seen: false",
        "src.identity=spiffe://…/ns/front/sa/web dst.addr=10.244.2.2:8080",
        "the app still sees its client's own address: 10.244.1.3:",
        "answered by: api-0, api-1, api-0, api-1, api-0, api-1",
        "protocol=\"TCP\" direction=\"outbound\"",
        "front/web -> api-1: allowed",
        "front/batch -> api-1: refused",
        "istio_tcp_connections_opened_total{reporter=\"destination\"",
        "1000 HTTP requests to reviews",
        ", failed 0",
        "With retry {attempts: 3, codes: [503]} on the route: 200 of 200 succeeded",
        "istio_requests_total{reporter=\"waypoint\"",
        "across the upgrade: none lost",
        "during the switch: failed new connections: 0",
        "weft_handoffs_total{outcome=\"took_over\"} 1",
        "Done: every namespace and process of the demo is gone.",
    ] {
        assert!(stdout.contains(expected), "demo output lacks {expected:?}:\n{stdout}");
    }
}

/// `weft demo --ip-family ipv6`: the same story on an IPv6-only cluster (pods, VIPs and the
/// controller in the unique-local ranges), the tunnel between nodes seen on the wire as TLS to
/// 15008 between the pods' IPv6 addresses.
#[test]
fn weft_demo_runs_on_ipv6() {
    if let Err(e) = lab::Lab::require_root() {
        lab::skip_or_fail(e);
        return;
    }
    let out =
        Command::new(env!("CARGO_BIN_EXE_weft")).args(["demo", "--ip-family", "ipv6"]).output().expect("run weft demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "weft demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for expected in [
        "back/api-1    node-1  fd00:244:2::2 ",
        "connects to api-1's pod IP [fd00:244:2::2]:8080",
        "server port(s) {15008}, TLS handshake seen: true, plaintext \"hello-from-web\" seen: false",
        "src.identity=spiffe://…/ns/front/sa/web dst.addr=[fd00:244:2::2]:8080",
        "the service VIP [fd00:96::14]:80 six times",
        "answered by: api-0, api-1, api-0, api-1, api-0, api-1",
        "front/batch -> api-1: refused",
        "to reviews [fd00:96::1e]:9080 on one connection",
        ", failed 0",
        "Done: every namespace and process of the demo is gone.",
    ] {
        assert!(stdout.contains(expected), "demo output lacks {expected:?}:\n{stdout}");
    }
    let rejected = Command::new(env!("CARGO_BIN_EXE_weft")).args(["demo", "--ip-family", "ipv5"]).output().unwrap();
    assert!(!rejected.status.success());
    assert!(String::from_utf8_lossy(&rejected.stderr).contains("expected ipv4, ipv6 or dual"));
}

#[test]
fn weft_demo_says_what_is_missing() {
    // With an empty PATH, `nft` and `sleep` cannot be found: the demo must name them instead
    // of failing halfway.
    let empty = std::env::temp_dir().join(format!("weft-empty-path-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weft")).arg("demo").env("PATH", &empty).output().expect("run weft demo");
    let _ = std::fs::remove_dir(&empty);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("weft demo needs:"), "{stderr}");
    assert!(stderr.contains("the `nft` program: install the nftables package"), "{stderr}");
    assert!(stderr.contains("the `sleep` program"), "{stderr}");
}
