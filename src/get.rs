//! `weft get`: what a ztunnel or the controller holds, as a table, JSON or YAML (the mesh's
//! `istioctl ztunnel-config`).
//!
//! ```text
//! weft get workloads                                 this node's ztunnel (admin 127.0.0.1:15000)
//! weft get services --ztunnel 127.0.0.1:15000 -o json
//! weft get policies --controller 127.0.0.1:15000 -o yaml
//! weft get certificates                              the workload certificates, with their expiry
//! weft get certificates --controller 127.0.0.1:15000 the trust bundle's roots
//! weft get status --controller 127.0.0.1:15000       nodes, the versions they applied, rejections
//! ```
//!
//! Two steps: [`fetch`] asks the server (the only I/O: one or two HTTP GETs on its admin
//! port) and gives a [`Report`]; [`render`] turns a report into text and is pure, tested on
//! canned answers. JSON and YAML print the items as the server served them (the config dump's
//! entries from a ztunnel, resources `{kind, name, spec}` from the controller), so fields
//! this command does not know about still show; a table picks columns and shows `-` for what
//! an item lacks. Derived items (the controller's roots, the status summaries) are built from
//! what the server said, never from local state.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::time::SystemTime;

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};

use weft::meshlab::http_get;

/// ztunnel's admin address on its node (its `--admin-addr` default): it listens on the node's
/// loopback only, so `weft get` runs in the node's network namespace (or is told another
/// address).
const ZTUNNEL_ADMIN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15000));

#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to show.
    #[arg(value_enum)]
    what: What,
    /// Ask this ztunnel's admin server (the default: this node's, 127.0.0.1:15000).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr, conflicts_with = "controller")]
    ztunnel: Option<SocketAddr>,
    /// Ask the controller's admin server instead (127.0.0.1:15000 inside the controller's pod).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    controller: Option<SocketAddr>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

/// What `weft get` shows.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    #[value(alias = "workload")]
    Workloads,
    #[value(alias = "service", alias = "svc")]
    Services,
    /// Authorization policies.
    #[value(alias = "policy", alias = "authorizations")]
    Policies,
    /// A ztunnel's workload certificates, or the controller's trust bundle roots.
    #[value(alias = "certificate", alias = "certs")]
    Certificates,
    /// A ztunnel's summary and enrolled pods, or the controller's nodes and rejections.
    Status,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// Which admin server answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Ztunnel,
    Controller,
}

/// What a server said, ready to print.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// Items of one kind.
    Items {
        what: What,
        server: Server,
        /// The server's trust domain, when it names one (the controller's workloads carry no
        /// identity; the table derives it).
        trust_domain: Option<String>,
        items: Vec<Value>,
    },
    /// A server's status: the controller's `/status` as served, or a summary of a ztunnel's
    /// config dump ([`ztunnel_status`]).
    Status { server: Server, status: Value },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (server, addr) = match (args.controller, args.ztunnel) {
        (Some(addr), _) => (Server::Controller, addr),
        (None, Some(addr)) => (Server::Ztunnel, addr),
        (None, None) => (Server::Ztunnel, ZTUNNEL_ADMIN),
    };
    let report = fetch(server, addr, args.what, SystemTime::now())?;
    print!("{}", render(&report, args.output)?);
    Ok(())
}

/// Asks the admin server at `addr` for `what`. `now` dates the controller's roots.
pub fn fetch(server: Server, addr: SocketAddr, what: What, now: SystemTime) -> anyhow::Result<Report> {
    match server {
        Server::Ztunnel => {
            let dump = get_json(server, addr, "/config_dump")?;
            ztunnel_report(&dump, what).with_context(|| format!("reading the config dump of the ztunnel at {addr}"))
        }
        Server::Controller => {
            let resources = |kind: meshapi::Kind| -> anyhow::Result<Vec<Value>> {
                let path = format!("/resources?kind={kind}");
                match get_json(server, addr, &path)? {
                    Value::Array(items) => Ok(items),
                    other => bail!("GET {path} on {addr} answered {}, not a JSON array", kind_of(&other)),
                }
            };
            let items = |what, items, trust_domain| Report::Items { what, server, trust_domain, items };
            Ok(match what {
                What::Workloads => {
                    // The resources carry service accounts; identities need the trust domain.
                    let status = get_json(server, addr, "/status")?;
                    let td = status.get("trustDomain").and_then(Value::as_str).map(str::to_owned);
                    items(what, resources(meshapi::Kind::Workload)?, td)
                }
                What::Services => items(what, resources(meshapi::Kind::Service)?, None),
                What::Policies => items(what, resources(meshapi::Kind::Authorization)?, None),
                What::Certificates => {
                    let bundles = resources(meshapi::Kind::TrustBundle)?;
                    let roots = roots(&bundles, unix(now)).with_context(|| format!("the trust bundle of {addr}"))?;
                    items(what, roots, None)
                }
                What::Status => Report::Status { server, status: get_json(server, addr, "/status")? },
            })
        }
    }
}

/// A report as text in `format`.
pub fn render(report: &Report, format: Format) -> anyhow::Result<String> {
    let value = match report {
        Report::Items { items, .. } => Value::Array(items.clone()),
        Report::Status { status, .. } => status.clone(),
    };
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(&value)? + "\n",
        Format::Yaml => serde_saphyr::to_string(&value).context("writing YAML")?,
        Format::Table => match report {
            Report::Items { what, server, trust_domain, items } => {
                items_table(*what, *server, trust_domain.as_deref(), items)
            }
            Report::Status { server: Server::Ztunnel, status } => ztunnel_status_tables(status),
            Report::Status { server: Server::Controller, status } => controller_status_tables(status),
        },
    })
}

/// The report for `what` from a ztunnel's config dump. Only the top-level keys are relied on;
/// each entry is kept whole.
pub fn ztunnel_report(dump: &Value, what: What) -> anyhow::Result<Report> {
    let trust_domain = dump.get("trustDomain").and_then(Value::as_str).map(str::to_owned);
    let key = match what {
        What::Workloads => "workloads",
        What::Services => "services",
        What::Policies => "policies",
        What::Certificates => "certificates",
        What::Status => return Ok(Report::Status { server: Server::Ztunnel, status: ztunnel_status(dump)? }),
    };
    // The dump's order is its maps' order: sort, so that two dumps compare line by line.
    let mut items = list(dump, key)?;
    items.sort_by_cached_key(|item| ["namespace", "name", "identity"].map(|k| field(item, k)));
    Ok(Report::Items { what, server: Server::Ztunnel, trust_domain, items })
}

/// A ztunnel's status: its node and trust domain, how many of each thing it holds, and the
/// pods it captured.
pub fn ztunnel_status(dump: &Value) -> anyhow::Result<Value> {
    let count = |key| list(dump, key).map(|l| l.len());
    Ok(json!({
        "node": dump.get("node"),
        "trustDomain": dump.get("trustDomain"),
        "workloads": count("workloads")?,
        "services": count("services")?,
        "policies": count("policies")?,
        "certificates": count("certificates")?,
        "enrolledPods": list(dump, "enrolledPods")?,
    }))
}

/// The roots of the controller's trust bundles (`TrustBundle` resources), one item each:
/// trust domain, subject, serial, validity, and how long until it expires at `now` (Unix
/// seconds).
pub fn roots(bundles: &[Value], now: i64) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for bundle in bundles {
        let spec = bundle.get("spec").unwrap_or(bundle);
        let trust_domain = field(spec, "trustDomain");
        let pems = spec.get("roots").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        for (i, pem) in pems.iter().enumerate() {
            let pem = pem.as_str().unwrap_or_default();
            let root = |e: String| anyhow!("trust domain {trust_domain}: root {i} is not a PEM certificate: {e}");
            let blocks: Vec<_> = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()).collect();
            if blocks.is_empty() {
                return Err(root("no BEGIN CERTIFICATE block".into()));
            }
            for block in blocks {
                let block = block.map_err(|e| root(e.to_string()))?;
                let cert = block.parse_x509().map_err(|e| root(e.to_string()))?;
                let validity = cert.validity();
                let not_after = validity.not_after.timestamp();
                out.push(json!({
                    "trustDomain": trust_domain,
                    "subject": cert.subject().to_string(),
                    "serial": cert.raw_serial_as_string(),
                    "notBefore": rfc3339(validity.not_before.timestamp()),
                    "notAfter": rfc3339(not_after),
                    "notAfterUnix": not_after,
                    "expiresInSeconds": (not_after - now).max(0),
                }));
            }
        }
    }
    Ok(out)
}

/// The table of `items`: a header, then a row per item (an empty list prints the header
/// alone).
pub fn items_table(what: What, server: Server, trust_domain: Option<&str>, items: &[Value]) -> String {
    let spec = |item| fields(server, item);
    let rows = items.iter();
    match (what, server) {
        (What::Workloads, _) => table(
            &["NAMESPACE", "NAME", "NODE", "ADDRESSES", "ENROLLED", "MTLS", "IDENTITY"],
            rows.map(spec).map(|w| {
                let identity = match (server, trust_domain) {
                    (Server::Ztunnel, _) => cell(w.get("identity")),
                    (Server::Controller, Some(td)) => controller_identity(w, td),
                    (Server::Controller, None) => "-".to_owned(),
                };
                vec![
                    cell(w.get("namespace")),
                    cell(w.get("name")),
                    cell(w.get("node")),
                    cell(w.get("addresses")),
                    cell(w.get("enrolled")),
                    cell(w.get("mtls")),
                    identity,
                ]
            }),
        ),
        (What::Services, Server::Ztunnel) => table(
            &["NAMESPACE", "NAME", "HOSTNAME", "VIPS", "PORTS", "ENDPOINTS"],
            rows.map(|s| {
                vec![
                    cell(s.get("namespace")),
                    cell(s.get("name")),
                    cell(s.get("hostname")),
                    cell(s.get("vips")),
                    ports(s.get("ports")),
                    count(s.get("endpoints")),
                ]
            }),
        ),
        (What::Services, Server::Controller) => table(
            &["NAMESPACE", "NAME", "HOSTNAME", "VIPS", "PORTS", "SELECTOR", "WAYPOINT"],
            rows.map(spec).map(|s| {
                vec![
                    cell(s.get("namespace")),
                    cell(s.get("name")),
                    cell(s.get("hostname")),
                    cell(s.get("vips")),
                    ports(s.get("ports")),
                    cell(s.get("selector")),
                    cell(s.get("waypoint")),
                ]
            }),
        ),
        // The config dump does not say whom a policy selects, so ztunnel's table has no scope.
        (What::Policies, Server::Ztunnel) => table(
            &["NAMESPACE", "NAME", "ACTION", "RULES", "BROKEN"],
            rows.map(|p| {
                vec![
                    cell(p.get("namespace")),
                    cell(p.get("name")),
                    cell(p.get("action")),
                    count(p.get("rules")),
                    cell(p.get("broken")),
                ]
            }),
        ),
        (What::Policies, Server::Controller) => table(
            &["NAMESPACE", "NAME", "ACTION", "SCOPE", "RULES", "BROKEN"],
            rows.map(spec).map(|p| {
                let scope = match p.get("selector") {
                    Some(selector) if !selector.is_null() => cell(Some(selector)),
                    _ if p.get("namespace").and_then(Value::as_str) == Some(meshapi::model::ROOT_NAMESPACE) => {
                        "mesh".to_owned()
                    }
                    _ => "namespace".to_owned(),
                };
                vec![
                    cell(p.get("namespace")),
                    cell(p.get("name")),
                    cell(p.get("action")),
                    scope,
                    // The model leaves an empty rule list out.
                    p.get("rules").map_or_else(|| "0".to_owned(), |r| count(Some(r))),
                    cell(p.get("broken")),
                ]
            }),
        ),
        (What::Certificates, Server::Ztunnel) => table(
            &["IDENTITY", "NOT AFTER", "EXPIRES IN"],
            rows.map(|c| vec![cell(c.get("identity")), date(c.get("notAfterUnix")), expires(c)]),
        ),
        (What::Certificates, Server::Controller) => table(
            &["TRUST DOMAIN", "SUBJECT", "NOT BEFORE", "NOT AFTER", "EXPIRES IN"],
            rows.map(|c| {
                vec![
                    cell(c.get("trustDomain")),
                    cell(c.get("subject")),
                    cell(c.get("notBefore")),
                    date(c.get("notAfterUnix")),
                    expires(c),
                ]
            }),
        ),
        // A status is not a list; `render` prints it with its own tables.
        (What::Status, _) => String::new(),
    }
}

/// A ztunnel's status ([`ztunnel_status`]): a summary line, then the pods it captured.
pub fn ztunnel_status_tables(status: &Value) -> String {
    let summary = table(
        &["NODE", "TRUST DOMAIN", "WORKLOADS", "SERVICES", "POLICIES", "CERTIFICATES"],
        [["node", "trustDomain", "workloads", "services", "policies", "certificates"]
            .map(|k| cell(status.get(k)))
            .to_vec()],
    );
    let pods = status.get("enrolledPods").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let pods = table(
        &["ENROLLED POD", "ADDRESSES", "NETNS INODE"],
        pods.iter().map(|p| {
            let inode = p.get("netnsInode").or_else(|| p.get("netns_inode"));
            vec![cell(p.get("uid")), cell(p.get("ips")), cell(inode)]
        }),
    );
    format!("{summary}\n{pods}")
}

/// The controller's `/status`: its epoch and version, each node's last acknowledgement, and
/// what was rejected (by a node, or by the controller while reading the cluster).
pub fn controller_status_tables(status: &Value) -> String {
    let epoch = status.get("epoch").and_then(Value::as_str).unwrap_or_default();
    let summary = table(
        &["EPOCH", "VERSION", "READY", "TRUST DOMAIN"],
        [["epoch", "version", "ready", "trustDomain"].map(|k| cell(status.get(k))).to_vec()],
    );
    let empty = serde_json::Map::new();
    let nodes = status.get("nodes").and_then(Value::as_object).unwrap_or(&empty);
    let node_rows = nodes.iter().map(|(name, node)| {
        // A version counts in its epoch only: a node still on an older epoch says so.
        let acked = match node.get("acked").filter(|a| !a.is_null()) {
            None => "-".to_owned(),
            Some(a) => match a.get("epoch").and_then(Value::as_str) {
                Some(e) if e != epoch => format!("{} (epoch {e})", cell(a.get("version"))),
                _ => cell(a.get("version")),
            },
        };
        vec![
            name.clone(),
            cell(node.get("subscribers")),
            acked,
            date(node.get("lastAckUnix")),
            count(node.get("rejected")),
        ]
    });
    let nodes_table = table(&["NODE", "STREAMS", "ACKED VERSION", "LAST ACK", "REJECTED"], node_rows);
    let by_nodes = nodes.iter().flat_map(|(name, node)| {
        let rejected = node.get("rejected").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        rejected.iter().map(move |r| {
            let object = format!("{} {}", cell(r.get("kind")), cell(r.get("name")));
            vec![format!("node {name}"), object, cell(r.get("reason"))]
        })
    });
    let by_controller = status
        .get("rejected")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|r| vec!["controller".to_owned(), "-".to_owned(), cell(Some(r))]);
    let rejected = table(&["REJECTED BY", "OBJECT", "REASON"], by_nodes.chain(by_controller));
    format!("{summary}\n{nodes_table}\n{rejected}")
}

/// Aligned columns: each as wide as its widest cell, two spaces between, no trailing blanks.
/// A line break inside a cell becomes a space, so that each item stays on its line.
pub fn table(headers: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let one_line = |c: String| if c.contains(['\n', '\r', '\t']) { c.replace(['\n', '\r', '\t'], " ") } else { c };
    let rows: Vec<Vec<String>> = rows.into_iter().map(|r| r.into_iter().map(one_line).collect()).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let header = headers.iter().map(|h| h.to_string()).collect::<Vec<_>>();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(c);
            line.extend(std::iter::repeat_n(' ', w - c.chars().count()));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// What a table reads of an item: a controller resource's spec (it serves `{kind, name,
/// spec}`), a ztunnel's entry as it is.
fn fields(server: Server, item: &Value) -> &Value {
    static NULL: Value = Value::Null;
    match server {
        Server::Controller => item.get("spec").unwrap_or(&NULL),
        Server::Ztunnel => item,
    }
}

/// One value as a table cell: strings as they are, lists joined with commas, maps as
/// `key=value` pairs, and `-` for what is absent, null or empty.
fn cell(value: Option<&Value>) -> String {
    let text = match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => items.iter().map(|i| cell(Some(i))).collect::<Vec<_>>().join(","),
        Some(Value::Object(map)) => {
            map.iter().map(|(k, v)| format!("{k}={}", cell(Some(v)))).collect::<Vec<_>>().join(",")
        }
        Some(other) => other.to_string(),
    };
    if text.is_empty() { "-".to_owned() } else { text }
}

/// A list's length, or a number as it is (the config dump counts a policy's rules).
fn count(value: Option<&Value>) -> String {
    match value {
        Some(Value::Array(items)) => items.len().to_string(),
        other => cell(other),
    }
}

/// Service ports: `80->8080` (`80` when the target is the same port), `/<appProtocol>` when
/// one is named.
fn ports(value: Option<&Value>) -> String {
    let Some(Value::Array(ports)) = value else { return cell(value) };
    let port = |p: &Value| {
        let port = cell(p.get("port"));
        let mut text = match p.get("targetPort").map(|t| cell(Some(t))) {
            Some(target) if target != "-" && target != port => format!("{port}->{target}"),
            _ => port,
        };
        if let Some(protocol) = p.get("appProtocol").and_then(Value::as_str) {
            text = format!("{text}/{protocol}");
        }
        text
    };
    cell(Some(&Value::String(ports.iter().map(port).collect::<Vec<_>>().join(","))))
}

/// Unix seconds as an RFC 3339 UTC time.
fn date(value: Option<&Value>) -> String {
    value.and_then(Value::as_i64).map(rfc3339).unwrap_or_else(|| "-".to_owned())
}

/// How long a certificate has left (`expiresInSeconds`): `expired` once it is none.
fn expires(cert: &Value) -> String {
    match cert.get("expiresInSeconds").and_then(Value::as_u64) {
        None => "-".to_owned(),
        Some(0) => "expired".to_owned(),
        Some(secs) => duration(secs),
    }
}

/// A duration in its two largest units: `45s`, `12m5s`, `23h59m`, `364d23h`.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

/// A controller workload's SPIFFE identity, from its namespace and service account.
fn controller_identity(workload: &Value, trust_domain: &str) -> String {
    let text = |k| workload.get(k).and_then(Value::as_str).unwrap_or_default();
    hbone::SpiffeId::new(trust_domain, text("namespace"), text("serviceAccount"))
        .map(|id| id.to_string())
        .unwrap_or_else(|_| "-".to_owned())
}

/// The list at `key` of a config dump (null counts as empty). A missing key is an error
/// rather than an empty table: it means this command and that ztunnel disagree on the dump.
fn list(dump: &Value, key: &str) -> anyhow::Result<Vec<Value>> {
    match dump.get(key) {
        Some(Value::Array(items)) => Ok(items.clone()),
        Some(Value::Null) => Ok(Vec::new()),
        Some(other) => bail!("\"{key}\" is {}, not a list", kind_of(other)),
        None => {
            let keys = dump.as_object().map(|m| m.keys().cloned().collect::<Vec<_>>().join(", ")).unwrap_or_default();
            bail!("the dump has no \"{key}\" (it has: {keys}); is this weft as new as that ztunnel?")
        }
    }
}

fn field(item: &Value, key: &str) -> String {
    item.get(key).and_then(Value::as_str).unwrap_or_default().to_owned()
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default()
}

/// `GET path` on an admin server, as JSON; errors say what to check.
fn get_json(server: Server, addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let body = http_get(addr, path).map_err(|e| explain(server, addr, e))?;
    serde_json::from_str(&body)
        .with_context(|| format!("GET {path} on {addr} did not answer JSON; {}", wrong_server(server, addr)))
}

/// An operator's reading of a failed GET: no connection at all (nothing listens there, or
/// this is the wrong network namespace), or an answer from something that is not the server
/// asked for.
fn explain(server: Server, addr: SocketAddr, error: anyhow::Error) -> anyhow::Error {
    if connect_failed(&error) {
        let cause = error.root_cause();
        let hint = match server {
            Server::Ztunnel => "is ztunnel running, and is this the node's network namespace?",
            Server::Controller => {
                "is the controller running, and is this its pod's network namespace (its admin server listens on localhost)?"
            }
        };
        anyhow!("cannot connect to {addr}: {hint} ({cause})")
    } else {
        anyhow!("{error:#}; {}", wrong_server(server, addr))
    }
}

fn wrong_server(server: Server, addr: SocketAddr) -> String {
    match server {
        Server::Ztunnel => format!("is {addr} a ztunnel's admin address? (use --controller for the controller's)"),
        Server::Controller => format!("is {addr} the controller's admin address? (use --ztunnel for a ztunnel's)"),
    }
}

/// Whether the connection itself failed (these kinds come only from connecting; a read that
/// times out is `WouldBlock`).
fn connect_failed(error: &anyhow::Error) -> bool {
    use std::io::ErrorKind::*;
    error.chain().filter_map(|e| e.downcast_ref::<std::io::Error>()).any(|e| {
        matches!(e.kind(), ConnectionRefused | TimedOut | HostUnreachable | NetworkUnreachable | AddrNotAvailable)
    })
}

/// `ip:port`, or `host:port` resolved now.
fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let mut addrs = text.to_socket_addrs().map_err(|e| format!("{text:?} is not an address (host:port): {e}"))?;
    addrs.next().ok_or_else(|| format!("{text:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ztunnel's `/config_dump`, in the form `ztunnel/src/admin.rs` writes.
    const DUMP: &str = r#"{
      "node": "node-0",
      "trustDomain": "cluster.local",
      "trustBundle": {"trustDomain": "cluster.local", "roots": 1},
      "enrolledPods": [{"uid": "front/web-0", "ips": ["10.244.1.2"], "netns_inode": 4026532001}],
      "workloads": [
        {"uid": "back/api-0", "name": "api-0", "namespace": "back", "node": "node-1",
         "addresses": ["10.244.2.2", "fd00::2"], "serviceAccount": "api",
         "identity": "spiffe://cluster.local/ns/back/sa/api", "enrolled": true, "mtls": "STRICT", "local": false},
        {"uid": "front/web-0", "name": "web-0", "namespace": "front", "node": "node-0",
         "addresses": ["10.244.1.2"], "serviceAccount": "web",
         "identity": "spiffe://cluster.local/ns/front/sa/web", "enrolled": true, "mtls": "PERMISSIVE", "local": true}
      ],
      "services": [
        {"name": "api", "namespace": "back", "hostname": "api.back.svc.cluster.local", "vips": ["10.96.0.10"],
         "ports": [{"port": 80, "targetPort": 8080}, {"port": 443, "targetPort": 443}], "endpoints": ["back/api-0"]}
      ],
      "policies": [
        {"name": "only-web", "namespace": "back", "action": "ALLOW", "rules": 1, "broken": null},
        {"name": "odd", "namespace": "back", "action": "DENY", "rules": 2, "broken": "rules[0].from[0].ipBlocks[0]: not a CIDR"}
      ],
      "certificates": [
        {"identity": "spiffe://cluster.local/ns/front/sa/web", "notAfterUnix": 1767312000, "expiresInSeconds": 86399}
      ]
    }"#;

    fn dump() -> Value {
        serde_json::from_str(DUMP).unwrap()
    }

    fn ztunnel(what: What) -> Report {
        ztunnel_report(&dump(), what).unwrap()
    }

    /// The controller's `/resources` answer for the objects of `yaml`, encoded by the model
    /// itself (so these samples follow its wire form).
    fn resources(yaml: &str) -> Vec<Value> {
        let snapshot = meshapi::Snapshot::from_yaml(yaml).unwrap();
        let mut items: Vec<Value> = snapshot.resources().map(|r| serde_json::from_str(&r.encode()).unwrap()).collect();
        // The controller serves them in key order.
        items.sort_by_key(|r| r["name"].as_str().unwrap().to_owned());
        items
    }

    const CLUSTER: &str = r#"
workloads:
  - {name: web-0, namespace: front, node: node-0, addresses: [10.244.1.2], serviceAccount: web, enrolled: true, mtls: PERMISSIVE}
  - {name: api-0, namespace: back, node: node-1, addresses: [10.244.2.2], serviceAccount: api}
services:
  - {name: api, namespace: back, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080, appProtocol: http}], selector: {app: api}}
authorizations:
  - {name: only-web, namespace: back, selector: {app: api}, action: ALLOW,
     rules: [{from: [{principals: ["spiffe://cluster.local/ns/front/sa/web"]}], ports: [8080]}]}
  - {name: mesh, namespace: weft-system, action: ALLOW}
  - {name: lockdown, namespace: front, action: DENY, rules: [{ports: [22]}]}
"#;

    fn controller(what: What, kind: &str) -> Report {
        let items = resources(CLUSTER).into_iter().filter(|r| r["kind"] == kind).collect();
        let trust_domain = (what == What::Workloads).then(|| "cluster.local".to_owned());
        Report::Items { what, server: Server::Controller, trust_domain, items }
    }

    fn text(report: &Report) -> String {
        render(report, Format::Table).unwrap()
    }

    /// JSON and YAML print the items exactly as served: both parse back to them.
    fn assert_json_and_yaml(report: &Report) {
        let Report::Items { items, .. } = report else { panic!("not a list") };
        let json = render(report, Format::Json).unwrap();
        assert!(json.starts_with("[\n  {"), "pretty JSON array:\n{json}");
        assert_eq!(serde_json::from_str::<Value>(&json).unwrap(), Value::Array(items.clone()));
        let yaml = render(report, Format::Yaml).unwrap();
        assert!(yaml.starts_with("- "), "a YAML sequence:\n{yaml}");
        assert!(!yaml.contains('{'), "block style, not JSON:\n{yaml}");
        assert_eq!(serde_saphyr::from_str::<Value>(&yaml).unwrap(), Value::Array(items.clone()), "{yaml}");
    }

    #[test]
    fn table_aligns_columns_without_trailing_blanks() {
        let t = table(
            &["A", "LONG HEADER", "C"],
            [vec!["wide cell", "x", ""].into_iter().map(String::from).collect::<Vec<_>>()],
        );
        assert_eq!(t, "A          LONG HEADER  C\nwide cell  x\n");
        let t = table(&["A", "B"], [vec!["two\nlines".to_owned(), "b".to_owned()]]);
        assert_eq!(t, "A          B\ntwo lines  b\n");
    }

    #[test]
    fn an_empty_list_prints_the_header_alone() {
        for what in [What::Workloads, What::Services, What::Policies, What::Certificates] {
            for server in [Server::Ztunnel, Server::Controller] {
                let report = Report::Items { what, server, trust_domain: None, items: vec![] };
                let t = text(&report);
                assert_eq!(t.lines().count(), 1, "{what:?} from {server:?}: {t}");
                assert!(t.chars().next().unwrap().is_ascii_uppercase(), "{t}");
                assert_eq!(render(&report, Format::Json).unwrap(), "[]\n");
                assert_eq!(
                    serde_saphyr::from_str::<Value>(&render(&report, Format::Yaml).unwrap()).unwrap(),
                    json!([])
                );
            }
        }
    }

    #[test]
    fn ztunnel_workloads() {
        let report = ztunnel(What::Workloads);
        assert_eq!(
            text(&report),
            "\
NAMESPACE  NAME   NODE    ADDRESSES           ENROLLED  MTLS        IDENTITY
back       api-0  node-1  10.244.2.2,fd00::2  true      STRICT      spiffe://cluster.local/ns/back/sa/api
front      web-0  node-0  10.244.1.2          true      PERMISSIVE  spiffe://cluster.local/ns/front/sa/web
"
        );
        assert_json_and_yaml(&report);
        let yaml = render(&report, Format::Yaml).unwrap();
        assert!(yaml.contains("- addresses:\n  - \"10.244.2.2\"\n  - fd00::2\n"), "{yaml}");
    }

    #[test]
    fn ztunnel_services() {
        let report = ztunnel(What::Services);
        assert_eq!(
            text(&report),
            "\
NAMESPACE  NAME  HOSTNAME                    VIPS        PORTS         ENDPOINTS
back       api   api.back.svc.cluster.local  10.96.0.10  80->8080,443  1
"
        );
        assert_json_and_yaml(&report);
    }

    #[test]
    fn ztunnel_policies() {
        let report = ztunnel(What::Policies);
        assert_eq!(
            text(&report),
            "\
NAMESPACE  NAME      ACTION  RULES  BROKEN
back       odd       DENY    2      rules[0].from[0].ipBlocks[0]: not a CIDR
back       only-web  ALLOW   1      -
"
        );
        assert_json_and_yaml(&report);
    }

    #[test]
    fn ztunnel_certificates() {
        let report = ztunnel(What::Certificates);
        assert_eq!(
            text(&report),
            "\
IDENTITY                                NOT AFTER             EXPIRES IN
spiffe://cluster.local/ns/front/sa/web  2026-01-02T00:00:00Z  23h59m
"
        );
        assert_json_and_yaml(&report);
    }

    #[test]
    fn ztunnel_status_counts_and_enrolled_pods() {
        let report = ztunnel(What::Status);
        assert_eq!(
            text(&report),
            "\
NODE    TRUST DOMAIN   WORKLOADS  SERVICES  POLICIES  CERTIFICATES
node-0  cluster.local  2          1         2         1

ENROLLED POD  ADDRESSES   NETNS INODE
front/web-0   10.244.1.2  4026532001
"
        );
        let yaml = render(&report, Format::Yaml).unwrap();
        let back: Value = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back["node"], "node-0");
        assert_eq!(back["enrolledPods"][0]["uid"], "front/web-0");
    }

    #[test]
    fn missing_fields_show_as_dashes() {
        let report = ztunnel_report(&json!({"workloads": [{"name": "bare"}]}), What::Workloads).unwrap();
        assert_eq!(text(&report).lines().nth(1).unwrap(), "-          bare  -     -          -         -     -");
        let report = ztunnel_report(&json!({"workloads": null}), What::Workloads).unwrap();
        assert_eq!(text(&report).lines().count(), 1);
        let status = ztunnel_status_tables(&json!({}));
        assert!(status.starts_with("NODE"), "{status}");
    }

    #[test]
    fn a_dump_without_the_list_is_an_error_naming_what_it_has() {
        let e = ztunnel_report(&json!({"node": "n", "workloadz": []}), What::Workloads).unwrap_err();
        assert_eq!(
            format!("{e}"),
            "the dump has no \"workloads\" (it has: node, workloadz); is this weft as new as that ztunnel?"
        );
        let e = ztunnel_report(&json!({"services": {}}), What::Services).unwrap_err();
        assert!(format!("{e}").contains("is an object, not a list"), "{e}");
    }

    #[test]
    fn controller_workloads_derive_identities_from_the_trust_domain() {
        let report = controller(What::Workloads, "Workload");
        assert_eq!(
            text(&report),
            "\
NAMESPACE  NAME   NODE    ADDRESSES   ENROLLED  MTLS        IDENTITY
back       api-0  node-1  10.244.2.2  false     PERMISSIVE  spiffe://cluster.local/ns/back/sa/api
front      web-0  node-0  10.244.1.2  true      PERMISSIVE  spiffe://cluster.local/ns/front/sa/web
"
        );
        assert_json_and_yaml(&report);
        let yaml = render(&report, Format::Yaml).unwrap();
        assert!(yaml.contains("- kind: Workload\n  name: back/api-0\n  spec:\n"), "resources as served:\n{yaml}");
    }

    #[test]
    fn controller_services() {
        let report = controller(What::Services, "Service");
        assert_eq!(
            text(&report),
            "\
NAMESPACE  NAME  HOSTNAME                    VIPS        PORTS          SELECTOR  WAYPOINT
back       api   api.back.svc.cluster.local  10.96.0.10  80->8080/http  app=api   -
"
        );
        assert_json_and_yaml(&report);
    }

    #[test]
    fn controller_policies_show_their_scope() {
        let report = controller(What::Policies, "Authorization");
        assert_eq!(
            text(&report),
            "\
NAMESPACE    NAME      ACTION  SCOPE      RULES  BROKEN
back         only-web  ALLOW   app=api    1      -
front        lockdown  DENY    namespace  1      -
weft-system  mesh      ALLOW   mesh       0      -
"
        );
        assert_json_and_yaml(&report);
    }

    #[test]
    fn controller_certificates_are_the_trust_bundle_roots() {
        let ca = hbone::ca::Ca::new_root("weft test root").unwrap();
        let (pem, _) = ca.to_pem();
        let bundle = meshapi::Resource::TrustBundle(meshapi::model::TrustBundle {
            trust_domain: "cluster.local".into(),
            roots: vec![pem],
        });
        let bundles = vec![serde_json::from_str::<Value>(&bundle.encode()).unwrap()];
        let not_after = unix(ca.not_after());
        let items = roots(&bundles, not_after - 90_061).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["notAfterUnix"], not_after);
        let subject = items[0]["subject"].as_str().unwrap();
        assert!(subject.contains("CN=weft test root"), "{subject}");
        let report = Report::Items { what: What::Certificates, server: Server::Controller, trust_domain: None, items };
        let t = text(&report);
        let row = t.lines().nth(1).unwrap();
        assert!(t.starts_with("TRUST DOMAIN   SUBJECT"), "{t}");
        assert!(row.starts_with("cluster.local  ") && row.contains(&rfc3339(not_after)), "{t}");
        assert!(row.ends_with("  1d1h"), "{t}");
        assert_json_and_yaml(&report);

        let broken = json!([{"kind": "TrustBundle", "name": "cluster.local",
            "spec": {"trustDomain": "cluster.local", "roots": ["-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]}}]);
        let e = roots(broken.as_array().unwrap(), 0).unwrap_err();
        assert!(format!("{e}").starts_with("trust domain cluster.local: root 0 is not a PEM certificate"), "{e}");
    }

    #[test]
    fn controller_status() {
        let status = json!({
            "epoch": "1a2b", "version": 42, "ready": true, "trustDomain": "cluster.local",
            "nodes": {
                "node-0": {"subscribers": 1, "acked": {"epoch": "1a2b", "version": 42}, "rejected": [], "lastAckUnix": 1767225600},
                "node-1": {"subscribers": 0, "acked": {"epoch": "9f9f", "version": 7},
                           "rejected": [{"kind": "Service", "name": "shop/api", "reason": "spec.ports[0].port: port 0 is not a port"}],
                           "lastAckUnix": 1767225000},
                "node-2": {"subscribers": 1, "acked": null, "rejected": [], "lastAckUnix": null}
            },
            "rejected": ["Service shop/bad in cluster/shop.yaml (document 2): spec.ports: no ports"]
        });
        let report = Report::Status { server: Server::Controller, status: status.clone() };
        assert_eq!(
            text(&report),
            "\
EPOCH  VERSION  READY  TRUST DOMAIN
1a2b   42       true   cluster.local

NODE    STREAMS  ACKED VERSION   LAST ACK              REJECTED
node-0  1        42              2026-01-01T00:00:00Z  0
node-1  0        7 (epoch 9f9f)  2025-12-31T23:50:00Z  1
node-2  1        -               -                     0

REJECTED BY  OBJECT            REASON
node node-1  Service shop/api  spec.ports[0].port: port 0 is not a port
controller   -                 Service shop/bad in cluster/shop.yaml (document 2): spec.ports: no ports
"
        );
        assert_eq!(serde_json::from_str::<Value>(&render(&report, Format::Json).unwrap()).unwrap(), status);
        assert_eq!(serde_saphyr::from_str::<Value>(&render(&report, Format::Yaml).unwrap()).unwrap(), status);
    }

    #[test]
    fn durations_and_dates() {
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(12 * 60 + 5), "12m5s");
        assert_eq!(duration(86_399), "23h59m");
        assert_eq!(duration(365 * 86_400 - 1), "364d23h");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(expires(&json!({"expiresInSeconds": 0})), "expired");
        assert_eq!(expires(&json!({})), "-");
    }

    /// Serves one canned HTTP answer on a loopback port, in a thread.
    fn serve_once(answer: &'static str) -> SocketAddr {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().unwrap();
            // Read the whole request first: closing with unread bytes would reset the
            // connection under the answer.
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && tcp.read(&mut byte).is_ok_and(|n| n == 1) {
                request.push(byte[0]);
            }
            let _ = tcp.write_all(answer.as_bytes());
        });
        addr
    }

    #[test]
    fn fetch_reads_a_config_dump_over_http() {
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{DUMP}",
            DUMP.len()
        );
        let addr = serve_once(Box::leak(answer.into_boxed_str()));
        let report = fetch(Server::Ztunnel, addr, What::Workloads, SystemTime::now()).unwrap();
        assert_eq!(report, ztunnel(What::Workloads));
    }

    #[test]
    fn errors_say_what_to_check() {
        // A port nothing listens on: bound, then closed.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let e = fetch(Server::Ztunnel, closed, What::Workloads, SystemTime::now()).unwrap_err();
        let text = format!("{e:#}");
        let hint =
            format!("cannot connect to {closed}: is ztunnel running, and is this the node's network namespace? (");
        assert!(text.starts_with(&hint), "{text}");

        // A ztunnel asked for the controller's resources answers 404.
        let addr = serve_once("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
        let e = fetch(Server::Controller, addr, What::Services, SystemTime::now()).unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("404 Not Found"), "{text}");
        assert!(
            text.ends_with(&format!("is {addr} the controller's admin address? (use --ztunnel for a ztunnel's)")),
            "{text}"
        );

        let addr = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello");
        let e = fetch(Server::Ztunnel, addr, What::Workloads, SystemTime::now()).unwrap_err();
        assert!(
            format!("{e:#}")
                .starts_with(&format!("GET /config_dump on {addr} did not answer JSON; is {addr} a ztunnel's"))
        );
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("127.0.0.1:15000").unwrap(), SocketAddr::from(([127, 0, 0, 1], 15000)));
        assert_eq!(parse_addr("localhost:15000").unwrap().port(), 15000);
        assert!(parse_addr("15000").unwrap_err().contains("is not an address (host:port)"));
    }
}
