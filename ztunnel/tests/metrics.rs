//! The metrics endpoint as a scraper sees it: a ztunnel built from its configuration (local
//! mode, no pods of its own, so no root), a connection and a refusal recorded on its metrics,
//! and `GET /metrics` read over HTTP. The body must be what its content type says: OpenMetrics
//! text, which an independent parser (the Prometheus project's Python client,
//! `prometheus_client.openmetrics.parser`) reads with every counter typed as a counter.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use clap::Parser;
use hbone::ca::Ca;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ztunnel::metrics::{CONTENT_TYPE, Refusal};
use ztunnel::proxy::record::{ConnectionRecord, Direction, Outcome, Protocol, Traffic};
use ztunnel::state::Peer;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    config: ztunnel::Config,
}

/// Reads the families of an OpenMetrics text with `prometheus_client`'s parser, as JSON
/// (`{name: {type, samples: [{name, labels, value}]}}`); `None` (after a loud skip, or a
/// failure under `CI=true`) when the parser is not installed.
fn parse_openmetrics(text: &str) -> Option<Value> {
    const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
families = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    families[f.name] = {"type": f.type, "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
json.dump(families, sys.stdout)
"#;
    let check = Command::new("python3").args(["-c", "import prometheus_client.openmetrics.parser"]).output();
    match check {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            skip_or_fail(&format!(
                "python3 cannot import prometheus_client (Debian package python3-prometheus-client, or `pip install \
                 prometheus-client`): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return None;
        }
        Err(e) => {
            skip_or_fail(&format!("python3 cannot be run ({e}); install python3 and python3-prometheus-client"));
            return None;
        }
    }
    let mut child = Command::new("python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

/// Without the parser: a loud failure under `CI=true`, a `SKIPPED` banner elsewhere.
fn skip_or_fail(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why}");
    }
    eprintln!("\n*** SKIPPED: {why} ***\n");
}

/// `GET path` over HTTP/1.1: the response's head and body.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), body.to_owned())
}

/// A ztunnel of node `metrics-node`, which holds no pod.
async fn ztunnel(dir: &std::path::Path) -> ztunnel::Bound {
    let ca = Ca::new_root("weft metrics test").unwrap();
    let (cert, key) = ca.to_pem();
    std::fs::write(dir.join("ca.crt"), cert).unwrap();
    std::fs::write(dir.join("ca.key"), key).unwrap();
    let yaml =
        "workloads:\n  - {name: web, namespace: front, node: elsewhere, addresses: [10.9.0.2], enrolled: true}\n";
    std::fs::write(dir.join("cluster.yaml"), yaml).unwrap();
    std::fs::create_dir_all(dir.join("proc")).unwrap();
    let path = |name: &str| dir.join(name).display().to_string();
    let args = [
        "ztunnel".to_owned(),
        "--node=metrics-node".into(),
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
    ztunnel::build(config, None).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_as_openmetrics_that_an_independent_parser_types() {
    let dir: PathBuf = std::env::temp_dir().join(format!("ztunnel-metrics-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bound = ztunnel(&dir).await;

    // One connection and one refusal, recorded as the data path records them.
    let metrics = bound.proxy.metrics.clone();
    let peer = |workload: &str, ns: &str| {
        Arc::new(Peer {
            workload: workload.into(),
            namespace: ns.into(),
            principal: format!("spiffe://cluster.local/ns/{ns}/sa/{workload}"),
        })
    };
    let (src, dst): (SocketAddr, SocketAddr) = ("10.9.0.2:40000".parse().unwrap(), "10.9.1.2:8080".parse().unwrap());
    let mut record = ConnectionRecord::new(&metrics, Direction::Outbound, Protocol::Hbone, src, dst);
    record.source(peer("web", "front"));
    record.destination(peer("api", "back"), Arc::from("api.back.svc.cluster.local"));
    record.open();
    record.finish(Outcome::Ok(Traffic { sent: 10, received: 20 }));
    let mut refused = ConnectionRecord::new(&metrics, Direction::Inbound, Protocol::Hbone, src, dst);
    refused.destination(peer("api", "back"), Arc::from("api.back.svc.cluster.local"));
    refused.refuse(Refusal::Policy, "denied by policy back/no-web");

    let (head, body) = get(bound.metrics_addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")).map(|(_, v)| v.trim()))
        .unwrap_or_default();
    assert_eq!(content_type, CONTENT_TYPE);
    assert_eq!(content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8");
    assert!(body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF: {body}");

    bound.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    let Some(families) = parse_openmetrics(&body) else { return };

    let family = |name: &str| families.get(name).unwrap_or_else(|| panic!("no family {name} in {families:#}"));
    for counter in [
        "istio_tcp_connections_opened",
        "istio_tcp_connections_closed",
        "istio_tcp_received_bytes",
        "istio_tcp_sent_bytes",
        "weft_connections_refused",
        "weft_config_applied",
        "weft_config_rejected",
    ] {
        assert_eq!(family(counter)["type"], "counter", "{counter}: {:#}", family(counter));
    }
    assert_eq!(family("weft_enrolled_pods")["type"], "gauge");
    let sample = |name: &str| {
        let samples = family(name)["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 1, "{name}: {samples:#?}");
        samples[0].clone()
    };
    let opened = sample("istio_tcp_connections_opened");
    assert_eq!(opened["name"], "istio_tcp_connections_opened_total");
    assert_eq!(opened["value"], 1.0);
    assert_eq!(opened["labels"]["reporter"], "source");
    assert_eq!(opened["labels"]["source_principal"], "spiffe://cluster.local/ns/front/sa/web");
    assert_eq!(opened["labels"]["destination_workload"], "api");
    assert_eq!(opened["labels"]["connection_security_policy"], "mutual_tls");
    // Bytes from the server's side: received from the client is what the source sent.
    assert_eq!(sample("istio_tcp_received_bytes")["value"], 10.0);
    assert_eq!(sample("istio_tcp_sent_bytes")["value"], 20.0);
    let refused = sample("weft_connections_refused");
    assert_eq!(refused["name"], "weft_connections_refused_total");
    assert_eq!(refused["labels"]["reason"], "policy");
    assert_eq!(refused["labels"]["destination_workload"], "api");
    assert_eq!(refused["value"], 1.0);
    assert_eq!(sample("weft_config_applied")["value"], 1.0, "the local file, applied at start");
}
