//! The handoff protocol between two ztunnels built in one process (local mode, no pods, so no
//! root; the lab's `tests/upgrade.rs` proves it with pods and traffic): a new ztunnel takes the
//! node's sockets over and the old one learns it has handed over; a peer that speaks no common
//! version is refused; one that breaks off mid-session leaves the old ztunnel serving.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use hbone::ca::Ca;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztunnel::handoff::{Channel, Message, ServerRole, VERSIONS};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    config: ztunnel::Config,
}

/// A temporary directory with a CA and an empty cluster for node `handoff-node`.
fn setup(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ztunnel-handoff-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("proc")).unwrap();
    let ca = Ca::new_root("weft handoff test").unwrap();
    let (cert, key) = ca.to_pem();
    std::fs::write(dir.join("ca.crt"), cert).unwrap();
    std::fs::write(dir.join("ca.key"), key).unwrap();
    std::fs::write(dir.join("cluster.yaml"), "workloads: []\n").unwrap();
    dir
}

/// A ztunnel of `handoff-node` in `dir`; its HTTP servers on free loopback ports.
async fn ztunnel(dir: &Path) -> ztunnel::Bound {
    let path = |name: &str| dir.join(name).display().to_string();
    let args = [
        "ztunnel".to_owned(),
        "--node=handoff-node".into(),
        format!("--local-config={}", path("cluster.yaml")),
        format!("--ca-cert={}", path("ca.crt")),
        format!("--ca-key={}", path("ca.key")),
        format!("--node-socket={}", path("node.sock")),
        format!("--proc-root={}", path("proc")),
        "--admin-addr=127.0.0.1:0".into(),
        "--metrics-addr=127.0.0.1:0".into(),
        "--readiness-addr=127.0.0.1:0".into(),
    ];
    let config = Cli::try_parse_from(args).unwrap().config;
    tokio::time::timeout(Duration::from_secs(20), ztunnel::build(config, None)).await.unwrap().unwrap()
}

/// `GET <path>` on a loopback server: the status line.
async fn http_status(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out.lines().next().unwrap_or("").to_owned())
}

fn counted(bound: &ztunnel::Bound, outcome: &str) -> bool {
    bound.proxy.metrics.encode().contains(&format!("weft_handoffs_total{{outcome=\"{outcome}\"}} 1"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_ztunnel_takes_the_node_over_and_the_old_one_hands_over() {
    let dir = setup("takeover");
    let old = ztunnel(&dir).await;
    let old_readiness = old.readiness_addr;
    let new = ztunnel(&dir).await;
    tokio::time::timeout(Duration::from_secs(5), old.handed_over()).await.expect("the old ztunnel is told");
    assert!(counted(&new, "took_over"), "{}", new.proxy.metrics.encode());
    // The readiness socket moved: the new ztunnel answers on the old one's address (the
    // configured port 0 gave the old one a port, which the new one received as it is bound).
    assert_eq!(new.readiness_addr, old_readiness, "the same socket, not a new one");
    assert!(http_status(new.readiness_addr, "/healthz/ready").await.unwrap().contains("200"));
    let outcome = tokio::time::timeout(Duration::from_secs(10), old.shutdown()).await.expect("the old one drains");
    assert_eq!(outcome, hbone::drain::Outcome::Graceful);
    // The socket is the new one's alone now, and it is still served.
    assert!(http_status(new.readiness_addr, "/healthz/ready").await.unwrap().contains("200"));
    // The node socket too: a request is answered (by the new ztunnel, the only one left).
    let mut node = tokio::net::UnixStream::connect(dir.join("node.sock")).await.unwrap();
    node.write_all(b"{\"op\":\"del\",\"namespace\":\"a\",\"name\":\"b\"}\n").await.unwrap();
    let mut answer = String::new();
    node.read_to_string(&mut answer).await.unwrap();
    assert!(answer.contains("\"ok\":true"), "{answer}");
    new.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_common_version_is_refused_and_a_broken_session_leaves_the_old_one_serving() {
    let dir = setup("refused");
    let old = ztunnel(&dir).await;
    let handoff = dir.join("node-handoff.sock");

    let channel = Channel::connect(&handoff).await.unwrap().expect("the old ztunnel listens");
    channel.send(&Message::Hello { versions: vec![99], pid: 1 }, &[]).await.unwrap();
    match channel.recv().await.unwrap().0 {
        Message::Refused { reason, versions, pid } => {
            assert_eq!(pid, std::process::id(), "the refusing ztunnel's pid");
            assert!(reason.contains("version"), "{reason}");
            assert_eq!(versions, VERSIONS);
        }
        other => panic!("expected refused, got {other:?}"),
    }
    assert!(counted(&old, "refused"), "{}", old.proxy.metrics.encode());

    // A peer that takes the sockets and goes away before `ready`.
    let channel = Channel::connect(&handoff).await.unwrap().unwrap();
    channel.send(&Message::Hello { versions: VERSIONS.to_vec(), pid: 1 }, &[]).await.unwrap();
    let Message::Offer { sockets, .. } = channel.recv().await.unwrap().0 else { panic!("no offer") };
    let mut roles = Vec::new();
    for _ in 0..sockets {
        if let (Message::Server { role, .. }, _) = channel.recv().await.unwrap() {
            roles.push(role);
        }
    }
    roles.sort_by_key(|r| format!("{r:?}"));
    assert_eq!(roles, [ServerRole::Admin, ServerRole::Metrics, ServerRole::Readiness]);
    drop(channel);
    let aborted = async {
        while !counted(&old, "aborted") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), aborted).await.expect("the old ztunnel counts the aborted handoff");
    assert!(http_status(old.readiness_addr, "/healthz/ready").await.unwrap().contains("200"), "still serving");
    // A peer that sends `ready` and then breaks off after `stopped`: the old one resumes.
    let channel = Channel::connect(&handoff).await.unwrap().unwrap();
    channel.send(&Message::Hello { versions: VERSIONS.to_vec(), pid: 1 }, &[]).await.unwrap();
    let Message::Offer { sockets, .. } = channel.recv().await.unwrap().0 else { panic!("no offer") };
    for _ in 0..sockets {
        channel.recv().await.unwrap();
    }
    channel.send(&Message::Ready, &[]).await.unwrap();
    assert_eq!(channel.recv().await.unwrap().0, Message::Stopped);
    drop(channel);
    let resumed = async {
        loop {
            if let Ok(status) = http_status(old.readiness_addr, "/healthz/ready").await
                && status.contains("200")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), resumed).await.expect("the old ztunnel accepts again");
    old.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
