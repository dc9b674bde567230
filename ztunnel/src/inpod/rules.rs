//! The capture rules ztunnel installs inside an enrolled pod's network namespace, in an
//! nftables table of its own (`inet weft`), through `nft`'s JSON API:
//!
//! ```text
//! table inet weft {
//!   chain prerouting {            # traffic arriving at the pod
//!     type nat hook prerouting priority dstnat;
//!     iifname "lo" return                      # the pod talking to itself
//!     tcp dport 15008 return                   # HBONE goes to ztunnel's listener as is
//!     tcp flags syn / fin,syn,rst,ack \
//!         redirect to :15006                   # any other new inbound TCP: plaintext inbound
//!   }
//!   chain output {                # traffic the pod sends
//!     type nat hook output priority -100;
//!     meta mark 0x5746 return                  # ztunnel's own sockets
//!     oifname "lo" return                      # to the pod itself
//!     tcp flags syn / fin,syn,rst,ack \
//!         redirect to :15001                   # any other new outbound TCP: outbound
//!   }
//! }
//! ```
//!
//! Only a connection's first SYN is redirected. Connections that exist when a pod is enrolled
//! must keep flowing untouched, and conntrack alone does not ensure it: a namespace that had
//! no NAT table did not track them, so their next packet would be picked up mid-stream as a
//! "new" connection and redirected into a socket that never saw its handshake (a reset).
//! Matching the SYN leaves picked-up connections without a NAT binding for life. Installing replaces the table atomically (one `nft`
//! transaction); removing deletes it and leaves the pod as it was.

use std::io::{self, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use super::netns::Netns;
use crate::config::{BYPASS_MARK, HBONE_PORT, INBOUND_PLAINTEXT_PORT, NFT_TABLE, OUTBOUND_PORT};

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot run {nft:?}: {error}; is the nftables package installed on the node?")]
    Spawn { nft: String, error: io::Error },
    #[error("nft refused the {what} of table inet {NFT_TABLE}: {stderr}")]
    Nft { what: &'static str, stderr: String },
    #[error("cannot enter the pod's network namespace: {0}")]
    Netns(io::Error),
}

/// Installs (or replaces) the capture rules in `netns`.
pub fn install(nft: &Path, netns: &Netns) -> Result<(), RulesError> {
    run_nft(nft, netns, &ruleset(), "installation")
}

/// Removes the capture rules from `netns` (no error if they are not there).
pub fn remove(nft: &Path, netns: &Netns) -> Result<(), RulesError> {
    let doc = json!({"nftables": [
        {"add": {"table": table()}},
        {"delete": {"table": table()}},
    ]});
    run_nft(nft, netns, &doc, "removal")
}

/// Whether the table exists in `netns` (for tests and the config dump).
pub fn installed(nft: &Path, netns: &Netns) -> Result<bool, RulesError> {
    let out = spawn_in(nft, netns, &["list", "table", "inet", NFT_TABLE])?
        .wait_with_output()
        .map_err(|error| RulesError::Spawn { nft: nft.display().to_string(), error })?;
    Ok(out.status.success())
}

fn table() -> Value {
    json!({"family": "inet", "name": NFT_TABLE})
}

fn chain(name: &str, hook: &str) -> Value {
    json!({"add": {"chain": {
        "family": "inet", "table": NFT_TABLE, "name": name,
        "type": "nat", "hook": hook, "prio": -100, "policy": "accept",
    }}})
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

fn meta_eq(key: &str, right: Value) -> Value {
    json!({"match": {"op": "==", "left": {"meta": {"key": key}}, "right": right}})
}

/// The whole table as one transaction: create-if-missing, delete, create, so installing is
/// idempotent and never leaves a half-written table.
fn ruleset() -> Value {
    let ret = json!({"return": null});
    json!({"nftables": [
        {"add": {"table": table()}},
        {"delete": {"table": table()}},
        {"add": {"table": table()}},
        chain("prerouting", "prerouting"),
        chain("output", "output"),
        rule("prerouting", vec![meta_eq("iifname", json!("lo")), ret.clone()]),
        rule("prerouting", vec![
            json!({"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": HBONE_PORT}}),
            ret.clone(),
        ]),
        rule("prerouting", vec![first_syn(), json!({"redirect": {"port": INBOUND_PLAINTEXT_PORT}})]),
        rule("output", vec![meta_eq("mark", json!(BYPASS_MARK)), ret.clone()]),
        rule("output", vec![meta_eq("oifname", json!("lo")), ret]),
        rule("output", vec![first_syn(), json!({"redirect": {"port": OUTBOUND_PORT}})]),
    ]})
}

fn run_nft(nft: &Path, netns: &Netns, doc: &Value, what: &'static str) -> Result<(), RulesError> {
    let spawn_err = |error| RulesError::Spawn { nft: nft.display().to_string(), error };
    let mut child = spawn_in(nft, netns, &["-j", "-f", "-"])?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(doc.to_string().as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(RulesError::Nft { what, stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    Ok(())
}

/// Spawns `nft` inside `netns`: a child inherits the namespace of the thread that forks it.
fn spawn_in(nft: &Path, netns: &Netns, args: &[&str]) -> Result<std::process::Child, RulesError> {
    netns
        .run(|| {
            Command::new(nft).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()
        })
        .map_err(RulesError::Netns)?
        .map_err(|error| RulesError::Spawn { nft: nft.display().to_string(), error })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_is_one_replacing_transaction_with_the_documented_rules() {
        let doc = ruleset();
        let cmds = doc["nftables"].as_array().unwrap();
        assert!(cmds[0]["add"]["table"].is_object());
        assert!(cmds[1]["delete"]["table"].is_object());
        let text = doc.to_string();
        assert!(text.contains(&format!("\"port\":{OUTBOUND_PORT}")));
        assert!(text.contains(&format!("\"port\":{INBOUND_PLAINTEXT_PORT}")));
        assert!(text.contains(&format!("\"right\":{BYPASS_MARK}")));
        assert!(text.contains(&format!("\"right\":{HBONE_PORT}")));
    }
}
