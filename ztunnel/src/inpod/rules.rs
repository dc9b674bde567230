//! The capture rules ztunnel installs inside an enrolled pod's network namespace, in an
//! nftables table of its own (`inet weft`), through `nft`'s JSON API:
//!
//! ```text
//! table inet weft {
//!   chain prerouting {            # traffic arriving at the pod
//!     type nat hook prerouting priority dstnat;
//!     iifname "lo" return                      # the pod talking to itself
//!     ip saddr 169.254.7.127 return            # its node's own connections (kubelet's
//!     ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff return  #  probes), see below
//!     tcp dport 15008 return                   # HBONE goes to ztunnel's listener as is
//!     tcp flags syn / fin,syn,rst,ack \
//!         redirect to :15006                   # any other new inbound TCP: plaintext inbound
//!   }
//!   chain output {                # traffic the pod sends
//!     type nat hook output priority -100;
//!     meta mark 0x5746 return                  # ztunnel's own sockets
//!     meta mark 0x5747 return                  # ztunnel's, to the app with the client's address
//!     oifname "lo" return                      # to the pod itself
//!     tcp flags syn / fin,syn,rst,ack \
//!         redirect to :15001                   # any other new outbound TCP: outbound
//!   }
//!   chain client_address {        # the app's answers to a client address go back to ztunnel
//!     type route hook output priority mangle;
//!     meta mark 0x5747 ct mark set 0x5747      # ztunnel's connection to the app: remembered
//!     ct mark 0x5747 meta mark set 0x5747      # the app's packets on it: marked, re-routed
//!   }
//! }
//! ```
//!
//! ztunnel connects to the app with the client's own address as source (an `IP_TRANSPARENT`
//! socket marked 0x5747), so the app sees who its client is. The app's answers to that address
//! would leave the pod through its interface; `client_address` marks them (a `route` chain:
//! changing the mark routes the packet again), and the rule and route of [`super::route`]
//! deliver marked packets inside the pod, to ztunnel's socket.
//!
//! Only a connection's first SYN is redirected. Connections that exist when a pod is enrolled
//! must keep flowing untouched, and conntrack alone does not ensure it: a namespace that had
//! no NAT table did not track them, so their next packet would be picked up mid-stream as a
//! "new" connection and redirected into a socket that never saw its handshake (a reset).
//! Matching the SYN leaves picked-up connections without a NAT binding for life. Installing
//! replaces the table atomically (one `nft` transaction); removing deletes it and leaves the
//! pod as it was.
//!
//! The two `saddr` rules (with `--probe-snat`, the default) let kubelet's probes reach the
//! app: they are plaintext from the node, and under STRICT mTLS ztunnel's plaintext port would
//! refuse them. The node's own connections to enrolled pods are given the source
//! 169.254.7.127 (or its IPv6 twin) in the node's namespace ([`super::probes`]); here that
//! source passes untouched. No pod holds those addresses, and a pod's answers to them go back
//! to its node, which delivers only the answers of connections it translated itself.

use std::io::{self, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use super::netns::Netns;
use super::route::{self, CLIENT_MARK, RouteError};
use crate::config::{
    BYPASS_MARK, HBONE_PORT, INBOUND_PLAINTEXT_PORT, NFT_TABLE, OUTBOUND_PORT, PROBE_SOURCE_V4, PROBE_SOURCE_V6,
};

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot run {nft:?}: {error}; is the nftables package installed on the node?")]
    Spawn { nft: String, error: io::Error },
    #[error("nft refused the {what} of table inet {table}: {stderr}")]
    Nft { what: &'static str, table: &'static str, stderr: String },
    #[error("cannot enter the pod's network namespace: {0}")]
    Netns(io::Error),
    #[error(transparent)]
    Route(#[from] RouteError),
}

/// Whether the pod's rules let its node's probes through (`--probe-snat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probes {
    /// Connections from the probe source addresses reach the app untouched.
    Pass,
    /// No exemption: the node's probes are captured like any plaintext.
    Capture,
}

/// Installs (or replaces) the capture rules in `netns`, with the routing that brings the app's
/// answers to a client's address back to ztunnel ([`route`]) first.
pub fn install(nft: &Path, netns: &Netns, probes: Probes) -> Result<(), RulesError> {
    route::install(netns)?;
    run_nft(nft, Some(netns), &ruleset(probes), NFT_TABLE, "installation")
}

/// Removes the capture rules from `netns`, then their routing (no error if they are not there).
pub fn remove(nft: &Path, netns: &Netns) -> Result<(), RulesError> {
    let doc = json!({"nftables": [
        {"add": {"table": table()}},
        {"delete": {"table": table()}},
    ]});
    run_nft(nft, Some(netns), &doc, NFT_TABLE, "removal")?;
    route::remove(netns)?;
    Ok(())
}

/// Whether the table exists in `netns` (for tests and the config dump).
pub fn installed(nft: &Path, netns: &Netns) -> Result<bool, RulesError> {
    table_exists(nft, Some(netns), NFT_TABLE)
}

/// Whether table `inet <name>` exists in `netns`, or in ztunnel's own namespace for `None`.
pub(super) fn table_exists(nft: &Path, netns: Option<&Netns>, name: &str) -> Result<bool, RulesError> {
    let out = spawn_in(nft, netns, &["list", "table", "inet", name])?
        .wait_with_output()
        .map_err(|error| RulesError::Spawn { nft: nft.display().to_string(), error })?;
    Ok(out.status.success())
}

fn table() -> Value {
    json!({"family": "inet", "name": NFT_TABLE})
}

fn chain(name: &str, kind: &str, hook: &str, prio: i32) -> Value {
    json!({"add": {"chain": {
        "family": "inet", "table": NFT_TABLE, "name": name,
        "type": kind, "hook": hook, "prio": prio, "policy": "accept",
    }}})
}

/// `<key> set <value>` for a `meta` or `ct` key, as `ct mark set 0x5747`.
fn set(kind: &str, key: &str, value: u32) -> Value {
    json!({"mangle": {"key": {kind: {"key": key}}, "value": value}})
}

fn rule(chain: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": "inet", "table": NFT_TABLE, "chain": chain, "expr": expr}}})
}

/// `tcp flags syn / fin,syn,rst,ack`: the first packet of a TCP connection.
fn first_syn() -> Value {
    json!({"match": {"op": "==",
        "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["fin", "syn", "rst", "ack"]]},
        "right": "syn"}})
}

pub(super) fn meta_eq(key: &str, right: Value) -> Value {
    json!({"match": {"op": "==", "left": {"meta": {"key": key}}, "right": right}})
}

/// `<family> <field> == <right>`, as `ip saddr 169.254.7.127`.
pub(super) fn payload_eq(protocol: &str, field: &str, right: Value) -> Value {
    json!({"match": {"op": "==", "left": {"payload": {"protocol": protocol, "field": field}}, "right": right}})
}

/// The whole table as one transaction: create-if-missing, delete, create, so installing is
/// idempotent and never leaves a half-written table.
fn ruleset(probes: Probes) -> Value {
    let ret = json!({"return": null});
    let mut prerouting = vec![rule("prerouting", vec![meta_eq("iifname", json!("lo")), ret.clone()])];
    if probes == Probes::Pass {
        prerouting.push(rule("prerouting", vec![payload_eq("ip", "saddr", json!(PROBE_SOURCE_V4)), ret.clone()]));
        prerouting.push(rule("prerouting", vec![payload_eq("ip6", "saddr", json!(PROBE_SOURCE_V6)), ret.clone()]));
    }
    prerouting.push(rule("prerouting", vec![payload_eq("tcp", "dport", json!(HBONE_PORT)), ret.clone()]));
    prerouting.push(rule("prerouting", vec![first_syn(), json!({"redirect": {"port": INBOUND_PLAINTEXT_PORT}})]));
    let mut commands = vec![
        json!({"add": {"table": table()}}),
        json!({"delete": {"table": table()}}),
        json!({"add": {"table": table()}}),
        chain("prerouting", "nat", "prerouting", -100),
        chain("output", "nat", "output", -100),
        // priority mangle (-150): after conntrack has found the connection.
        chain("client_address", "route", "output", -150),
    ];
    commands.extend(prerouting);
    commands.extend([
        rule("output", vec![meta_eq("mark", json!(BYPASS_MARK)), ret.clone()]),
        rule("output", vec![meta_eq("mark", json!(CLIENT_MARK)), ret.clone()]),
        rule("output", vec![meta_eq("oifname", json!("lo")), ret]),
        rule("output", vec![first_syn(), json!({"redirect": {"port": OUTBOUND_PORT}})]),
        rule("client_address", vec![meta_eq("mark", json!(CLIENT_MARK)), set("ct", "mark", CLIENT_MARK)]),
        rule(
            "client_address",
            vec![
                json!({"match": {"op": "==", "left": {"ct": {"key": "mark"}}, "right": CLIENT_MARK}}),
                set("meta", "mark", CLIENT_MARK),
            ],
        ),
    ]);
    json!({ "nftables": commands })
}

/// Runs one `nft` JSON transaction in `netns` (in ztunnel's own namespace for `None`).
pub(super) fn run_nft(
    nft: &Path,
    netns: Option<&Netns>,
    doc: &Value,
    table: &'static str,
    what: &'static str,
) -> Result<(), RulesError> {
    let spawn_err = |error| RulesError::Spawn { nft: nft.display().to_string(), error };
    let mut child = spawn_in(nft, netns, &["-j", "-f", "-"])?;
    // An nft that exits early closes its input: its status and message say more than the
    // broken pipe, so the write's error is reported only if nft then claims success.
    let written = child.stdin.take().map(|mut stdin| stdin.write_all(doc.to_string().as_bytes()));
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(RulesError::Nft { what, table, stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    written.transpose().map_err(spawn_err)?;
    Ok(())
}

/// Spawns `nft` inside `netns` (a child inherits the namespace of the thread that forks it),
/// or for `None` from the calling thread, which is in ztunnel's own namespace (threads enter
/// pods' namespaces only inside [`Netns::run`]).
fn spawn_in(nft: &Path, netns: Option<&Netns>, args: &[&str]) -> Result<std::process::Child, RulesError> {
    let spawn =
        || Command::new(nft).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    match netns {
        Some(netns) => netns.run(spawn).map_err(RulesError::Netns)?,
        None => spawn(),
    }
    .map_err(|error| RulesError::Spawn { nft: nft.display().to_string(), error })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_is_one_replacing_transaction_with_the_documented_rules() {
        let doc = ruleset(Probes::Pass);
        let cmds = doc["nftables"].as_array().unwrap();
        assert!(cmds[0]["add"]["table"].is_object());
        assert!(cmds[1]["delete"]["table"].is_object());
        let text = doc.to_string();
        assert!(text.contains(&format!("\"port\":{OUTBOUND_PORT}")));
        assert!(text.contains(&format!("\"port\":{INBOUND_PLAINTEXT_PORT}")));
        assert!(text.contains(&format!("\"right\":{BYPASS_MARK}")));
        assert!(text.contains(&format!("\"right\":{HBONE_PORT}")));
    }

    /// The prerouting rules, each as its matches and its verdict, in order.
    fn prerouting(probes: Probes) -> Vec<Vec<Value>> {
        let doc = ruleset(probes);
        doc["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"]["rule"].as_object())
            .filter(|r| r["chain"] == "prerouting")
            .map(|r| r["expr"].as_array().unwrap().clone())
            .collect()
    }

    /// The node's probes (from 169.254.7.127 or its IPv6 twin) return before the plaintext
    /// redirect, so they reach the app; with the exemption off, they do not.
    #[test]
    fn probes_from_the_node_return_before_the_plaintext_redirect() {
        let rules = prerouting(Probes::Pass);
        let redirect = rules.iter().position(|r| r.iter().any(|e| e.get("redirect").is_some())).unwrap();
        for (family, source) in [("ip", PROBE_SOURCE_V4.to_string()), ("ip6", PROBE_SOURCE_V6.to_string())] {
            let exempt = vec![payload_eq(family, "saddr", json!(source)), json!({"return": null})];
            let at =
                rules.iter().position(|r| *r == exempt).unwrap_or_else(|| panic!("no {family} exemption: {rules:?}"));
            assert!(at < redirect, "the {family} exemption comes before the redirect");
        }
        assert_eq!(PROBE_SOURCE_V4.to_string(), "169.254.7.127");
        assert_eq!(PROBE_SOURCE_V6.to_string(), "fd16:9254:7127:1337:ffff:ffff:ffff:ffff");

        let captured = prerouting(Probes::Capture);
        assert_eq!(captured.len(), rules.len() - 2);
        assert!(!ruleset(Probes::Capture).to_string().contains("saddr"), "no exemption when probes are captured");
    }
}
