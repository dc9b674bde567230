//! The README's main command, `weft demo`, runs to completion and tells its story: this test
//! keeps the command a new user runs first working at every commit.

use std::process::Command;

#[test]
fn weft_demo_runs_and_shows_the_mesh_at_work() {
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["demo", "--bulk-mib", "8", "--connections", "50"])
        .output()
        .expect("run weft demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "weft demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for expected in [
        "got back \"hello from the frontend\"",
        "node 2 saw spiffe://cluster.local/ns/ns-frontend/sa/web -> 127.0.0.1:",
        "by policy (HTTP 403)",
        "is not one of the identities expected for this destination: spiffe://cluster.local/ns/ns-backend/sa/payments",
        "50 tunnels,",
        "8 MiB echoed intact",
    ] {
        assert!(stdout.contains(expected), "demo output lacks {expected:?}:\n{stdout}");
    }
}

#[test]
fn weft_demo_rejects_bad_arguments_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_weft")).args(["demo", "--bulk-mib", "0"]).output().expect("run weft");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--bulk-mib must be between 1 and 4096, got 0"), "{stderr}");
}
