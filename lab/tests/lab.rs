//! The lab end to end: real namespaces, veths, bridges and routes. Needs root; without it each
//! test prints SKIPPED (and fails under CI=true). The tests run in parallel, in one process,
//! which also proves that lab names do not collide.

use std::collections::BTreeSet;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use lab::addresses::{IpCidr, IpStack};
use lab::{Lab, NetState, Netns, Pod, Signal, addresses};

/// Bound for every network wait in these tests.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const ECHO_PORT: u16 = 8080;

/// True when the test can run; otherwise reports the skip (or fails under CI=true).
fn privileged() -> bool {
    match Lab::require_root() {
        Ok(()) => true,
        Err(e) => {
            lab::skip_or_fail(e);
            false
        }
    }
}

/// An echo server inside `pod`'s namespace on `ECHO_PORT`, served by a thread of ours: it echoes
/// `connections` connections, then returns the peer addresses it saw. Bounded by IO_TIMEOUT.
fn echo_server(pod: &Pod, connections: usize) -> JoinHandle<io::Result<Vec<SocketAddr>>> {
    let listener = pod.netns().run(|| TcpListener::bind((pod.ip(), ECHO_PORT))).expect("enter pod").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking listener");
    thread::spawn(move || {
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut peers = Vec::new();
        while peers.len() < connections {
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    peers.push(peer);
                    echo_until_eof(&mut stream)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(peers)
    })
}

/// Echoes what an accepted connection sends until the client half-closes.
fn echo_until_eof(stream: &mut TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

/// Connects from inside `from` to `to:port`, sends `message`, half-closes, and returns what came
/// back.
fn echo_from(from: &Netns, to: Ipv4Addr, message: &[u8]) -> Vec<u8> {
    echo_to(from, IpAddr::V4(to), message)
}

#[test]
fn pods_talk_across_nodes_and_on_the_same_node() {
    if !privileged() {
        return;
    }
    let lab = Lab::new("pods_talk", 2).expect("build the lab");
    let a = lab.add_pod(0, "a").expect("pod a");
    let c = lab.add_pod(0, "c").expect("pod c");
    let b = lab.add_pod(1, "b").expect("pod b");
    let d = lab.add_pod(1, "d").expect("pod d");
    assert_eq!(
        [a.ip(), c.ip(), b.ip(), d.ip()],
        [addresses::pod_ip(0, 0), addresses::pod_ip(0, 1), addresses::pod_ip(1, 0), addresses::pod_ip(1, 1)]
    );

    // Across nodes: a (node 0) -> b (node 1); on the same node: a -> c.
    let server_b = echo_server(&b, 1);
    let server_c = echo_server(&c, 1);
    let cross = b"across the fabric, node 0 to node 1".to_vec();
    let local = b"through cni0 on node 0".to_vec();
    assert_eq!(echo_from(a.netns(), b.ip(), &cross), cross);
    assert_eq!(echo_from(a.netns(), c.ip(), &local), local);
    // Routed, not NATed: the servers see pod a's own address.
    for server in [server_b, server_c] {
        let peers = server.join().expect("server thread").expect("echo server");
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].ip(), a.ip());
    }

    // The wiring is what the crate documents.
    let node0 = lab.nodes()[0].netns().state().expect("node 0 state");
    assert!(node0.link("cni0").is_some_and(|l| l.up) && node0.link("eth0").is_some_and(|l| l.up));
    assert!(node0.link("lo").is_some_and(|l| l.up));
    assert!(
        node0.routes.iter().any(|r| r.destination == addresses::pod_cidr(1).into()
            && r.gateway == Some(addresses::node_fabric_ip(1).into()))
    );
    let forward = lab.nodes()[1]
        .netns()
        .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward"))
        .expect("enter node 1")
        .expect("read ip_forward");
    assert_eq!(forward.trim(), "1");
    let pod_state = d.netns().state().expect("pod d state");
    let names: BTreeSet<&str> = pod_state.links.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["eth0", "lo"]));
    assert!(pod_state.routes.iter().any(|r| r.destination.prefix_len() == 0 && r.gateway == Some(d.gateway().into())));
    let fabric = lab.fabric().state().expect("fabric state");
    assert!(
        fabric.addresses.iter().all(|a| a.address.is_loopback() || a.address.is_ipv6()),
        "the fabric has no IPv4 addresses: {fabric:?}"
    );
    let bridge = fabric.link("br0").expect("fabric bridge").index;
    for port in ["node0", "node1"] {
        assert_eq!(fabric.link(port).and_then(|l| l.controller), Some(bridge), "{port} is a port of br0");
    }
}

#[test]
fn building_a_lab_changes_nothing_in_the_root_namespace() {
    if !privileged() {
        return;
    }
    let before = NetState::host().expect("read the root namespace");
    {
        let lab = Lab::new("root_untouched", 2).expect("build the lab");
        let a = lab.add_pod(0, "a").expect("pod a");
        let b = lab.add_pod(1, "b").expect("pod b");
        let server = echo_server(&b, 1);
        assert_eq!(echo_from(a.netns(), b.ip(), b"ping"), b"ping");
        server.join().expect("server thread").expect("echo server");
        let during = NetState::host().expect("read the root namespace");
        assert_no_new_state(&before, &during);
    }
    let after = NetState::host().expect("read the root namespace");
    assert_no_new_state(&before, &after);
}

fn assert_no_new_state(before: &NetState, now: &NetState) {
    let names = |s: &NetState| s.links.iter().map(|l| l.name.clone()).collect::<BTreeSet<_>>();
    let new_links: Vec<_> = names(now).difference(&names(before)).cloned().collect();
    assert!(new_links.is_empty(), "new interfaces in the root namespace: {new_links:?}");
    let new_addresses: Vec<_> = now.addresses.iter().filter(|a| !before.addresses.contains(a)).collect();
    assert!(new_addresses.is_empty(), "new addresses in the root namespace: {new_addresses:?}");
    let new_routes: Vec<_> = now.routes.iter().filter(|r| !before.routes.contains(r)).collect();
    assert!(new_routes.is_empty(), "new routes in the root namespace: {new_routes:?}");
    let lab_ranges: [IpCidr; 6] = [
        addresses::FABRIC_SUBNET.into(),
        addresses::CLUSTER_CIDR.into(),
        addresses::SERVICE_CIDR.into(),
        addresses::FABRIC_SUBNET_V6.into(),
        addresses::CLUSTER_CIDR_V6.into(),
        addresses::SERVICE_CIDR_V6.into(),
    ];
    for route in &now.routes {
        assert!(
            !lab_ranges
                .iter()
                .any(|range| range.contains(route.destination.network()) && route.destination.prefix_len() > 0),
            "a lab range is routed in the root namespace: {route:?}"
        );
    }
}

#[test]
fn fabric_capture_sees_the_payload_of_cross_node_traffic_only() {
    if !privileged() {
        return;
    }
    let lab = Lab::new("capture", 2).expect("build the lab");
    let a = lab.add_pod(0, "a").expect("pod a");
    let c = lab.add_pod(0, "c").expect("pod c");
    let b = lab.add_pod(1, "b").expect("pod b");
    let server_b = echo_server(&b, 1);
    let server_c = echo_server(&c, 1);

    let capture = lab.capture().expect("start the capture");
    let cross = b"marker-across-4d1f".to_vec();
    let local = b"marker-local-9e2c".to_vec();
    assert_eq!(echo_from(a.netns(), b.ip(), &cross), cross);
    assert_eq!(echo_from(a.netns(), c.ip(), &local), local);
    server_b.join().expect("server thread").expect("echo server");
    server_c.join().expect("server thread").expect("echo server");
    let packets = capture.stop().expect("stop the capture");

    let to_b = SocketAddrV4::new(b.ip(), ECHO_PORT);
    let carrying = |payload: &[u8]| {
        packets.iter().filter(|p| p.payload.windows(payload.len()).any(|w| w == payload)).collect::<Vec<_>>()
    };
    let request = carrying(&cross);
    // Once arriving from node 0, once leaving to node 1 (request), and the same for the echo.
    assert!(
        request.iter().any(|p| p.dst == to_b && *p.src.ip() == a.ip() && !p.outgoing && p.interface == "node0"),
        "request not seen arriving from node0: {packets:?}"
    );
    assert!(
        request.iter().any(|p| p.dst == to_b && p.outgoing && p.interface == "node1"),
        "request not seen leaving to node1: {packets:?}"
    );
    assert!(request.iter().any(|p| p.src == to_b && p.interface == "node1" && !p.outgoing), "echo not seen");
    // Exactly one SYN: the links were ready when add_pod returned, so the first packet was not
    // lost (a lost SYN is retried a second later and would show twice).
    let syns = packets.iter().filter(|p| p.dst == to_b && p.flags.syn() && !p.flags.ack() && !p.outgoing).count();
    assert_eq!(syns, 1, "SYNs from a to b arriving on the fabric: {packets:?}");
    // Same-node traffic never crosses the fabric.
    assert!(carrying(&local).is_empty(), "same-node traffic seen on the fabric");
}

#[test]
fn processes_log_take_signals_and_run_in_their_namespace() {
    if !privileged() {
        return;
    }
    let lab = Lab::new("processes", 1).expect("build the lab");
    let pod = lab.add_pod(0, "app").expect("pod");

    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "echo ready; echo to-stderr >&2; trap 'echo got TERM; exit 3' TERM; for i in $(seq 400); do sleep 0.05; done",
    ]);
    let process = pod.netns().spawn(cmd).expect("spawn");
    let logs = process.wait_for_log("ready", IO_TIMEOUT).expect("ready line");
    assert!(logs.contains("ready"));
    let in_pod = lab::processes_in_namespace(pod.netns().path());
    assert!(in_pod.contains(&process.pid()), "spawned process {} not in {in_pod:?}", process.pid());
    assert!(in_pod.contains(&pod.pause_pid()), "pause process {} not in {in_pod:?}", pod.pause_pid());
    process.signal(Signal::SIGTERM).expect("SIGTERM");
    let status = process.wait_timeout(IO_TIMEOUT).expect("wait").expect("exited after SIGTERM");
    assert_eq!(status.code(), Some(3));
    let logs = process.logs().expect("logs");
    assert!(logs.contains("to-stderr") && logs.contains("got TERM"), "logs: {logs}");
    assert!(process.signal(Signal::SIGTERM).is_err(), "signalling an exited process is an error");

    // output(): the child sees only the pod's interfaces.
    let mut cat = Command::new("cat");
    cat.arg("/proc/net/dev");
    let out = pod.netns().output(cat, IO_TIMEOUT).expect("cat /proc/net/dev");
    assert!(out.status.success());
    let dev = String::from_utf8_lossy(&out.stdout);
    let ifaces: BTreeSet<&str> = dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
    assert_eq!(ifaces, BTreeSet::from(["eth0", "lo"]), "{dev}");

    // A bounded output() of a process that hangs is a timeout.
    let mut hang = Command::new("sleep");
    hang.arg("30");
    let err = pod.netns().output(hang, Duration::from_millis(100)).expect_err("sleep 30 must time out");
    assert!(err.is_timeout(), "{err}");
}

#[test]
fn teardown_removes_namespaces_and_processes() {
    if !privileged() {
        return;
    }
    let lab = Lab::new("teardown", 2).expect("build the lab");
    let pod = lab.add_pod(1, "p").expect("pod");
    let mut cmd = Command::new("sleep");
    cmd.arg("60");
    let worker = pod.netns().spawn(cmd).expect("spawn");
    let mut names: Vec<String> = vec![lab.fabric().name().to_owned()];
    names.extend(lab.nodes().iter().map(|n| n.netns().name().to_owned()));
    names.push(pod.netns().name().to_owned());
    for name in &names {
        assert!(Path::new(lab::NETNS_DIR).join(name).exists(), "{name} exists while the lab runs");
    }
    let log_dir = lab.log_dir().to_owned();
    let pause = pod.pause_pid();

    lab.teardown().expect("teardown");
    for name in &names {
        assert!(!Path::new(lab::NETNS_DIR).join(name).exists(), "{name} removed by teardown");
    }
    assert!(!alive(pause), "pause process {pause} killed");
    assert!(worker.try_status().expect("status").is_some(), "the worker was killed and reaped by teardown");
    assert!(!log_dir.exists(), "log directory removed");
    let err = pod.netns().run(|| ()).expect_err("entering a deleted namespace fails");
    assert!(err.to_string().contains(pod.netns().name()), "{err}");
}

/// Run by `leftovers_of_a_crashed_run_are_removed` in a child process, which is then killed.
#[test]
#[ignore = "helper: run as a child process by leftovers_of_a_crashed_run_are_removed"]
fn crash_child() {
    if std::env::var_os("WEFT_LAB_CRASH_CHILD").is_none() {
        return;
    }
    let lab = Lab::new("crash", 1).expect("build the lab");
    let pod = lab.add_pod(0, "orphan").expect("pod");
    println!("CRASH-CHILD-READY {} {}", lab.name(), pod.pause_pid());
    // Bounded: the parent kills us long before.
    thread::sleep(Duration::from_secs(30));
}

#[test]
fn leftovers_of_a_crashed_run_are_removed() {
    if !privileged() {
        return;
    }
    // A hand-made leftover: an entry named after a dead pid.
    let mut done = Command::new("true").spawn().expect("spawn true");
    let dead_pid = done.id();
    done.wait().expect("reap true");
    let fake = Path::new(lab::NETNS_DIR).join(format!("{}{dead_pid}-0-fake-fabric", lab::NAME_PREFIX));
    std::fs::write(&fake, b"").expect("create a fake leftover");

    // A real one: a child builds a lab with a pod and is SIGKILLed, orphaning the pause process.
    let exe = std::env::current_exe().expect("test executable");
    let child = Command::new(exe)
        .args(["--exact", "crash_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("WEFT_LAB_CRASH_CHILD", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the crash child");
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest may print "test crash_child ... " on the same line first.
            if let Some((_, rest)) = line.split_once("CRASH-CHILD-READY ") {
                let _ = tx.send(rest.to_owned());
                return;
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(30)).expect("the crash child built its lab");
    let (lab_name, pause) = ready.split_once(' ').expect("name and pid");
    let pause: u32 = pause.parse().expect("pause pid");
    child.0.kill().expect("SIGKILL the crash child");
    child.0.wait().expect("reap the crash child");

    // Cleaning may also be done concurrently by another test's Lab::new: either way, afterwards
    // nothing of the crashed lab is left.
    let removed = lab::clean_leftovers().expect("clean leftovers");
    let leftovers: Vec<String> = std::fs::read_dir(lab::NETNS_DIR)
        .expect("list /run/netns")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(lab_name) || Path::new(lab::NETNS_DIR).join(n) == fake)
        .collect();
    assert!(leftovers.is_empty(), "left after cleaning: {leftovers:?} (removed: {removed:?})");
    assert!(!alive(pause), "the orphaned pause process {pause} was killed");
    // The crashed run's logs are kept (for a day) for debugging; this test does not need them.
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join("weft-lab").join(lab_name));
}

/// Kills and reaps the child on drop, so a failed assertion does not leave it running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rfind(')').and_then(|i| stat[i + 1..].trim_start().chars().next()) != Some('Z'),
        Err(_) => false,
    }
}

/// An echo server like [`echo_server`] on `ip` (an address of `pod`, either family), for one
/// connection.
fn echo_server_at(pod: &Pod, ip: IpAddr) -> JoinHandle<io::Result<SocketAddr>> {
    let listener = pod.netns().run(|| TcpListener::bind((ip, ECHO_PORT))).expect("enter pod").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking listener");
    thread::spawn(move || {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    echo_until_eof(&mut stream)?;
                    return Ok(peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        }
    })
}

/// Connects from inside `from` to `to` (either family), sends `message`, half-closes, and
/// returns what came back.
fn echo_to(from: &Netns, to: IpAddr, message: &[u8]) -> Vec<u8> {
    from.run(|| -> io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&SocketAddr::new(to, ECHO_PORT), IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.write_all(message)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut back = Vec::new();
        stream.read_to_end(&mut back)?;
        Ok(back)
    })
    .expect("enter the client namespace")
    .unwrap_or_else(|e| panic!("echo from {} to {to}: {e}", from.name()))
}

/// An IPv6-only lab: pods have only their planned IPv6 address (usable at once: no DAD),
/// reach each other across nodes over IPv6, routed and not NATed, the first SYN is not lost
/// (seen once on the fabric, as IPv6), and the root namespace gains no address.
#[test]
fn ipv6_only_pods_talk_across_nodes() {
    if !privileged() {
        return;
    }
    let before = NetState::host().expect("read the root namespace");
    let lab = Lab::with_stack("ipv6_only", 2, IpStack::Ipv6).expect("build the lab");
    let a = lab.add_pod(0, "a").expect("pod a");
    let b = lab.add_pod(1, "b").expect("pod b");
    let (a6, b6) = (IpAddr::V6(addresses::pod_ipv6(0, 0)), IpAddr::V6(addresses::pod_ipv6(1, 0)));
    assert_eq!((a.ips(), b.ips()), (vec![a6], vec![b6]));
    assert_eq!((a.primary_ip(), a.ipv4()), (a6, None));
    let global = |pod: &Pod| -> Vec<IpAddr> {
        let state = pod.netns().state().expect("pod state");
        state
            .addresses
            .iter()
            .filter(|x| x.interface == "eth0" && !matches!(x.address, IpAddr::V6(v6) if v6.is_unicast_link_local()))
            .map(|x| x.address)
            .collect()
    };
    assert_eq!(global(&a), vec![a6], "pod a has only its IPv6 address");

    let server = echo_server_at(&b, b6);
    let capture = lab.capture().expect("start the capture");
    let message = b"over ipv6, node 0 to node 1".to_vec();
    assert_eq!(echo_to(a.netns(), b6, &message), message);
    let peer = server.join().expect("server thread").expect("echo server");
    assert_eq!(peer.ip(), a6, "routed, not NATed");
    let packets = capture.stop_all().expect("stop the capture");
    let to_b = SocketAddr::new(b6, ECHO_PORT);
    let syns = packets.iter().filter(|p| p.dst == to_b && p.flags.syn() && !p.flags.ack() && !p.outgoing).count();
    assert_eq!(syns, 1, "SYNs from a to b arriving on the fabric: {packets:?}");
    assert!(packets.iter().any(|p| p.src.ip() == a6 && p.payload == message), "payload seen over IPv6");

    // Nodes route each other's IPv6 pod CIDRs over the fabric; the root namespace gains no
    // interface, address or route, and routes no lab range of either family.
    let node0 = lab.nodes()[0].netns().state().expect("node 0 state");
    let via = IpAddr::V6(addresses::node_fabric_ipv6(1));
    assert!(
        node0.routes.iter().any(|r| r.destination == addresses::pod_cidr_v6(1).into() && r.gateway == Some(via)),
        "{:?}",
        node0.routes
    );
    assert_no_new_state(&before, &NetState::host().expect("read the root namespace"));
}

/// A dual-stack lab: each pod has one address of each family, IPv4 first, and pods reach
/// each other across nodes over both.
#[test]
fn dual_stack_pods_talk_over_both_families() {
    if !privileged() {
        return;
    }
    let lab = Lab::with_stack("dual", 2, IpStack::Dual).expect("build the lab");
    let a = lab.add_pod(0, "a").expect("pod a");
    let b = lab.add_pod(1, "b").expect("pod b");
    assert_eq!(b.ips(), vec![IpAddr::V4(addresses::pod_ip(1, 0)), IpAddr::V6(addresses::pod_ipv6(1, 0))]);
    assert_eq!(lab.nodes()[1].fabric_ips().len(), 2);
    for to in b.ips() {
        let server = echo_server_at(&b, to);
        let message = format!("dual stack to {to}").into_bytes();
        assert_eq!(echo_to(a.netns(), to, &message), message);
        let peer = server.join().expect("server thread").expect("echo server");
        assert_eq!(Some(peer.ip()), a.ip_like(to), "the client's address of the same family");
    }
}
