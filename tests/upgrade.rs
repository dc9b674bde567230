//! Upgrades that reset no connection (ARCHITECTURE §4.9), end to end in the lab (tier 3): a
//! second ztunnel for a node takes the running one's sockets over the handoff socket while
//! long-lived connections in every direction keep exchanging data and clients keep opening new
//! ones. They need root; under `CI=true` a test that cannot get it fails instead of skipping.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use weft::meshlab::{MeshLab, PodSpec};

const APP_PORT: u16 = 8080;

fn weft() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_weft"))
}

/// A two-node mesh programmed by a controller, or `None` (after a loud skip) when the lab
/// cannot run here.
fn mesh(test: &str) -> Option<MeshLab> {
    MeshLab::ready_here().then(|| MeshLab::new(test, 2, weft()).expect("building the lab"))
}

fn addr(mesh: &MeshLab, pod: &str) -> SocketAddr {
    SocketAddr::from((mesh.pod(pod).ip(), APP_PORT))
}

/// A long-lived connection from a pod that sends a numbered message every 20 ms and checks the
/// echo, until told to stop: how many round trips it made, or the first failure.
struct Conversation {
    name: &'static str,
    handle: JoinHandle<Result<u64, String>>,
}

fn converse(mesh: &MeshLab, from: &str, to: &str, name: &'static str, stop: &Arc<AtomicBool>) -> Conversation {
    let mut stream = mesh.connect(from, addr(mesh, to)).expect("opening a long-lived connection");
    let stop = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut exchanges = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let message = format!("{name} #{exchanges:08}\n");
            let mut back = vec![0u8; message.len()];
            stream
                .write_all(message.as_bytes())
                .and_then(|()| stream.read_exact(&mut back))
                .map_err(|e| format!("{name}: failed after {exchanges} round trips: {e}"))?;
            if back != message.as_bytes() {
                return Err(format!(
                    "{name}: round trip {exchanges} came back as {:?}",
                    String::from_utf8_lossy(&back)
                ));
            }
            exchanges += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(exchanges)
    });
    Conversation { name, handle }
}

impl Conversation {
    /// Stopped already (by the shared flag): the round trips, or the failure.
    fn join(self) -> Result<u64, String> {
        self.handle.join().unwrap_or_else(|_| Err(format!("{}: the thread panicked", self.name)))
    }
}

/// A client in a pod that opens a new connection every 10 ms, sends a line and reads it back.
struct Poller {
    name: &'static str,
    handle: JoinHandle<Polled>,
}

#[derive(Debug, Default)]
struct Polled {
    ok: u64,
    failures: Vec<String>,
    last_ok: Option<Instant>,
}

fn poll(mesh: &MeshLab, from: &str, to: &str, name: &'static str, stop: &Arc<AtomicBool>) -> Poller {
    let netns = mesh.pod(from).netns().clone();
    let target = addr(mesh, to);
    let stop = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut polled = Polled::default();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let attempt = netns.run(move || -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"ping\n")?;
                let mut back = [0u8; 5];
                s.read_exact(&mut back)?;
                if &back != b"ping\n" {
                    return Err(std::io::Error::other(format!("echoed {back:?}")));
                }
                Ok(())
            });
            match attempt {
                Ok(Ok(())) => {
                    polled.ok += 1;
                    polled.last_ok = Some(Instant::now());
                }
                Ok(Err(e)) => polled.failures.push(format!("{name}: {e}")),
                Err(e) => polled.failures.push(format!("{name}: entering the pod: {e}")),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        polled
    });
    Poller { name, handle }
}

impl Poller {
    fn join(self) -> Polled {
        self.handle.join().unwrap_or_else(|_| Polled {
            failures: vec![format!("{}: the thread panicked", self.name)],
            ..Default::default()
        })
    }
}

/// Waits until `check` holds, up to `timeout`; the last value read if it never does.
fn wait_for(timeout: Duration, mut check: impl FnMut() -> Result<(), String>) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Node 0: `web` (enrolled) and `old` (opted out). Node 1, the node upgraded: `api` and
/// `worker` (enrolled, PERMISSIVE). Echo apps in `web` and `api`.
fn two_nodes(mesh: &mut MeshLab) -> Vec<lab::LabProcess> {
    mesh.add_pod(PodSpec::new(0, "front", "web", "web")).unwrap();
    mesh.add_pod(PodSpec::new(0, "legacy", "old", "old").not_enrolled()).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "api", "api")).unwrap();
    mesh.add_pod(PodSpec::new(1, "back", "worker", "worker")).unwrap();
    mesh.start_ztunnels().unwrap();
    let apps = vec![mesh.start_echo("api", APP_PORT, None).unwrap(), mesh.start_echo("web", APP_PORT, None).unwrap()];
    mesh.wait_enrolled(0, 1).unwrap();
    mesh.wait_enrolled(1, 2).unwrap();
    apps
}

/// Every path through node 1's ztunnel: outbound from its pod, inbound HBONE and plaintext to
/// its pod.
const PATHS: [(&str, &str, &str); 3] = [
    ("worker", "web", "outbound from node 1"),
    ("web", "api", "inbound HBONE to node 1"),
    ("old", "api", "plaintext into node 1"),
];

#[test]
fn an_upgrade_resets_no_connection_and_refuses_none() {
    let Some(mut mesh) = mesh("upgrade") else { return };
    let _apps = two_nodes(&mut mesh);
    let (stop_long, stop_polls) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let long: Vec<Conversation> = PATHS.iter().map(|(f, t, n)| converse(&mesh, f, t, n, &stop_long)).collect();
    let polls: Vec<Poller> = PATHS.iter().map(|(f, t, n)| poll(&mesh, f, t, n, &stop_polls)).collect();
    std::thread::sleep(Duration::from_millis(500));

    let old = mesh.upgrade_ztunnel(1, &[]).expect("the new ztunnel takes node 1 over");
    let old_logs = old.wait_for_log("handoff committed", Duration::from_secs(5)).unwrap();
    assert!(old_logs.contains("handing the sockets over"), "{old_logs}");
    // The new ztunnel serves the node's metrics port, counts the handoff, and hears from the
    // old one about the connections it still carries: at least the three long-lived ones.
    let took_over = mesh.metric(1, "weft_handoffs_total", &[("outcome", "took_over")]).unwrap();
    assert_eq!(took_over, 1.0);
    wait_for(Duration::from_secs(5), || {
        let draining = mesh.metric(1, "weft_upgrade_draining_connections", &[]).map_err(|e| e.to_string())?;
        if draining >= 3.0 { Ok(()) } else { Err(format!("draining: {draining}")) }
    })
    .expect("the old ztunnel reports its connections");
    // The old one drains while the long-lived connections go on.
    std::thread::sleep(Duration::from_secs(2));
    assert!(old.try_status().unwrap().is_none(), "the old ztunnel keeps serving its connections");
    let dump = mesh.node_http(1, 15000, "/config_dump").unwrap();
    assert!(dump.contains("back/api") && dump.contains("back/worker"), "the new one holds both pods: {dump}");

    stop_long.store(true, Ordering::Relaxed);
    for c in long {
        let name = c.name;
        let exchanges = c.join().unwrap_or_else(|e| panic!("a long-lived connection broke: {e}"));
        assert!(exchanges > 50, "{name}: only {exchanges} round trips");
    }
    // Its last connections ended: the old ztunnel exits by itself, well before --upgrade-drain.
    let status = old.wait_timeout(Duration::from_secs(15)).unwrap().expect("the old ztunnel exits once drained");
    assert!(status.success(), "{status}");
    let exited = Instant::now();
    wait_for(Duration::from_secs(5), || {
        let draining = mesh.metric(1, "weft_upgrade_draining_connections", &[]).map_err(|e| e.to_string())?;
        if draining == 0.0 { Ok(()) } else { Err(format!("draining: {draining}")) }
    })
    .expect("the gauge falls to 0 once the old ztunnel has exited");

    // The new ztunnel keeps serving on its own.
    std::thread::sleep(Duration::from_millis(700));
    stop_polls.store(true, Ordering::Relaxed);
    for p in polls {
        let name = p.name;
        let polled = p.join();
        assert!(
            polled.failures.is_empty(),
            "{name}: {} of {} new connections failed: {:?}",
            polled.failures.len(),
            polled.ok + polled.failures.len() as u64,
            polled.failures
        );
        assert!(polled.ok > 30, "{name}: only {} connections", polled.ok);
        assert!(
            polled.last_ok.is_some_and(|t| t > exited),
            "{name}: no connection served after the old ztunnel exited"
        );
    }
    let new_logs = mesh.ztunnel(1).logs().unwrap();
    assert!(new_logs.contains("the previous ztunnel has exited"), "{new_logs}");
}

#[test]
fn a_new_ztunnel_killed_before_it_commits_leaves_the_old_one_serving() {
    let Some(mut mesh) = mesh("upgrade-abort") else { return };
    let _apps = two_nodes(&mut mesh);
    let (stop_long, stop_polls) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let long: Vec<Conversation> = PATHS.iter().map(|(f, t, n)| converse(&mesh, f, t, n, &stop_long)).collect();
    let polls: Vec<Poller> = PATHS.iter().map(|(f, t, n)| poll(&mesh, f, t, n, &stop_polls)).collect();

    // With the controller down and the node's kept certificates gone, a new ztunnel receives
    // the sockets but cannot get the pods' certificates: it never becomes ready.
    let controller = mesh.take_controller().expect("a controller");
    controller.kill().unwrap();
    std::fs::remove_dir_all(mesh.ztunnel_state_dir(1).join("certs")).expect("removing the kept certificates");
    let new = mesh.spawn_ztunnel(1, &[]).unwrap();
    new.wait_for_log("handed its sockets over", Duration::from_secs(20)).unwrap();
    new.wait_for_log("pod not enrolled yet", Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    new.kill().unwrap();

    // The old ztunnel never stopped accepting; it counts the handoff that did not commit.
    wait_for(Duration::from_secs(5), || {
        let aborted = mesh.metric(1, "weft_handoffs_total", &[("outcome", "aborted")]).map_err(|e| e.to_string())?;
        if aborted == 1.0 { Ok(()) } else { Err(format!("aborted: {aborted}")) }
    })
    .expect("the old ztunnel counts the aborted handoff");
    std::thread::sleep(Duration::from_secs(1));
    assert!(mesh.ztunnel(1).try_status().unwrap().is_none(), "the old ztunnel still runs");
    let logs = mesh.ztunnel(1).logs().unwrap();
    assert!(logs.contains("handoff not completed; this ztunnel keeps serving the node"), "{logs}");

    // And it can still hand over, once a new ztunnel can get what it needs.
    mesh.start_controller(&[]).unwrap();
    let old = mesh.upgrade_ztunnel(1, &[]).expect("a second attempt takes node 1 over");
    std::thread::sleep(Duration::from_millis(500));
    stop_long.store(true, Ordering::Relaxed);
    for c in long {
        c.join().unwrap_or_else(|e| panic!("a long-lived connection broke: {e}"));
    }
    old.wait_timeout(Duration::from_secs(15)).unwrap().expect("the old ztunnel exits once drained");
    stop_polls.store(true, Ordering::Relaxed);
    for p in polls {
        let (name, polled) = (p.name, p.join());
        assert!(polled.failures.is_empty(), "{name}: {:?}", polled.failures);
        assert!(polled.ok > 30, "{name}: only {} connections", polled.ok);
    }
}

/// A running ztunnel that cannot hand over (one of a version without the handoff socket: here
/// its socket file is removed) is waited for: the new one starts once the old has exited,
/// an ordinary restart, and then serves the node.
#[test]
fn a_ztunnel_that_cannot_hand_over_is_waited_for() {
    let Some(mut mesh) = mesh("upgrade-fallback") else { return };
    let _apps = two_nodes(&mut mesh);
    let handoff = mesh.node_socket(1).with_file_name("node-1-handoff.sock");
    std::fs::remove_file(&handoff).expect("the running ztunnel's handoff socket");
    let new = mesh.spawn_ztunnel(1, &[]).unwrap();
    new.wait_for_log("waiting for it to be free", Duration::from_secs(20)).unwrap();
    // The old one still serves the node meanwhile.
    let mut conn = mesh.connect("web", addr(&mesh, "api")).unwrap();
    conn.write_all(b"still\n").unwrap();
    let mut back = [0u8; 6];
    conn.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"still\n");
    drop(conn);
    let old = mesh.take_ztunnel(1).unwrap();
    old.signal(lab::Signal::SIGTERM).unwrap();
    old.wait_timeout(Duration::from_secs(20)).unwrap().expect("the old ztunnel stops on SIGTERM");
    new.wait_for_log("ztunnel ready", Duration::from_secs(20)).unwrap();
    let logs = new.logs().unwrap();
    assert!(!logs.contains("took the node over"), "nothing was handed over: {logs}");
    assert!(std::fs::metadata(&handoff).is_ok(), "the new ztunnel serves a handoff socket of its own");
    let deadline = Instant::now() + Duration::from_secs(10);
    let served = loop {
        let attempt = mesh.connect("web", addr(&mesh, "api")).and_then(|mut c| {
            c.write_all(b"again\n")?;
            let mut back = [0u8; 6];
            c.read_exact(&mut back)?;
            Ok(back)
        });
        match attempt {
            Ok(back) => break back,
            Err(e) if Instant::now() >= deadline => panic!("the new ztunnel does not serve the node: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(&served, b"again\n");
}
