//! The probe SNAT: kubelet's probes keep reaching enrolled pods under STRICT mTLS.
//!
//! kubelet probes a pod (HTTP, TCP, gRPC) in plaintext from the node. In an enrolled pod its
//! SYN would meet the capture rules and ztunnel's plaintext port, which refuses it under STRICT
//! (or under an ALLOW policy it names no principal for), and the pod would never become ready.
//! As Istio's ztunnel does, the node's own connections to enrolled pods are given a source
//! address that nothing else has, and the pods' rules ([`super::rules`]) let that source reach
//! the app untouched. This table lives in ztunnel's own network namespace, which is the node's
//! (the host network on Kubernetes, the node's namespace in the lab):
//!
//! ```text
//! table inet weft-node {
//!   set enrolled_v4 { type ipv4_addr; elements = { <the enrolled pods' IPv4 addresses> } }
//!   set enrolled_v6 { type ipv6_addr; elements = { <their IPv6 addresses> } }
//!   chain postrouting {
//!     type nat hook postrouting priority srcnat;
//!     meta mark 0x5746 return                     # ztunnel's own sockets
//!     meta l4proto tcp ip daddr @enrolled_v4 fib saddr type local \
//!         snat ip to 169.254.7.127                 # the node's own connections to a pod
//!     meta l4proto tcp ip6 daddr @enrolled_v6 fib saddr type local \
//!         snat ip6 to fd16:9254:7127:1337:ffff:ffff:ffff:ffff
//!   }
//! }
//! ```
//!
//! `fib saddr type local` (the source is one of the node's own addresses) picks the
//! connections the node itself opens: kubelet's, and those of any other process in the node's
//! namespace (hostNetwork pods). Traffic the node only forwards (pod to pod, NodePort traffic
//! from other nodes) keeps its source and stays captured. NAT applies to a connection's first
//! packet; conntrack translates the rest and the answers.
//!
//! The sets always hold the addresses of the pods this ztunnel captures: the manager rewrites
//! them in one transaction (flush, add) whenever it enrolls or releases a pod, adding a pod's
//! addresses before its capture rules go in, so no probe meets the rules unexempted. The first
//! write of a run replaces the whole table atomically (a table left by an older version is
//! brought up to date). At exit the table stays, as the pods' rules do: probes keep working
//! while ztunnel restarts, and the next ztunnel rewrites the sets.
//!
//! Nothing is written until this ztunnel has captured a pod: a ztunnel that captures none
//! (the in-process tests, a node without enrolled pods) never touches its namespace's
//! nftables. With the exemption turned off (`--probe-snat=false`), the first capture removes a
//! table an earlier run left.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::{Value, json};

use super::rules::{self, RulesError, meta_eq, payload_eq, run_nft};
use crate::config::{BYPASS_MARK, NODE_NFT_TABLE, PROBE_SOURCE_V4, PROBE_SOURCE_V6};

/// The set of the enrolled pods' IPv4 addresses.
const SET_V4: &str = "enrolled_v4";
/// The set of their IPv6 addresses.
const SET_V6: &str = "enrolled_v6";

/// The node table's keeper (one per ztunnel).
pub struct ProbeSnat {
    nft: PathBuf,
    enabled: bool,
    written: Mutex<Written>,
}

/// What this ztunnel has done to its namespace's table so far.
#[derive(Default)]
struct Written {
    /// Whether a pod was ever captured: until then the table is left alone.
    captured: bool,
    /// The addresses the table holds as last written; `None` until the first write and after a
    /// failed one (the next write replaces the whole table).
    table: Option<BTreeSet<IpAddr>>,
    /// With the exemption off: whether the table is known to be gone.
    removed: bool,
}

/// What a [`ProbeSnat::sync`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// Nothing to do: nothing captured yet, or the sets already hold these addresses.
    Unchanged,
    /// The whole table written (the first write of this run, or after a failure).
    Installed,
    /// The sets rewritten.
    Updated,
    /// The table removed (the exemption is off).
    Removed,
}

impl ProbeSnat {
    /// `nft` is the program to run; `enabled` is `--probe-snat`.
    pub fn new(nft: PathBuf, enabled: bool) -> ProbeSnat {
        ProbeSnat { nft, enabled, written: Mutex::new(Written::default()) }
    }

    /// Whether the pods' rules should let the probe source through.
    pub fn pod_rules(&self) -> rules::Probes {
        if self.enabled { rules::Probes::Pass } else { rules::Probes::Capture }
    }

    /// Makes the sets hold exactly `addresses` (the captured pods', and those about to be).
    /// Blocking: runs `nft` in ztunnel's own namespace, from the calling thread.
    pub fn sync(&self, addresses: &BTreeSet<IpAddr>) -> Result<Sync, RulesError> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        written.captured |= !addresses.is_empty();
        if !written.captured {
            return Ok(Sync::Unchanged);
        }
        if !self.enabled {
            if written.removed {
                return Ok(Sync::Unchanged);
            }
            run_nft(&self.nft, None, &removal(), NODE_NFT_TABLE, "removal")?;
            written.removed = true;
            return Ok(Sync::Removed);
        }
        let (doc, what, outcome) = match &written.table {
            Some(held) if held == addresses => return Ok(Sync::Unchanged),
            Some(_) => (update(addresses), "update", Sync::Updated),
            None => (table(addresses), "installation", Sync::Installed),
        };
        match run_nft(&self.nft, None, &doc, NODE_NFT_TABLE, what) {
            Ok(()) => {
                written.table = Some(addresses.clone());
                Ok(outcome)
            }
            Err(e) => {
                written.table = None;
                Err(e)
            }
        }
    }
}

fn node_table() -> Value {
    json!({"family": "inet", "name": NODE_NFT_TABLE})
}

fn set(name: &str, kind: &str) -> Value {
    json!({"add": {"set": {"family": "inet", "table": NODE_NFT_TABLE, "name": name, "type": kind}}})
}

fn set_ref(name: &str) -> Value {
    json!({"family": "inet", "table": NODE_NFT_TABLE, "name": name})
}

/// `add element` commands for the addresses of each family (none for an empty family: nft
/// refuses an empty element list).
fn elements(addresses: &BTreeSet<IpAddr>) -> Vec<Value> {
    let (v4, v6): (Vec<&IpAddr>, Vec<&IpAddr>) = addresses.iter().partition(|a| a.is_ipv4());
    [(SET_V4, v4), (SET_V6, v6)]
        .into_iter()
        .filter(|(_, elems)| !elems.is_empty())
        .map(|(name, elems)| {
            let mut element = set_ref(name);
            element["elem"] = json!(elems);
            json!({"add": {"element": element}})
        })
        .collect()
}

fn rule(expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": "inet", "table": NODE_NFT_TABLE, "chain": "postrouting", "expr": expr}}})
}

/// `meta l4proto tcp <family> daddr @<set> fib saddr type local snat <family> to <source>`.
fn snat(family: &str, set: &str, source: Value) -> Value {
    rule(vec![
        meta_eq("l4proto", json!("tcp")),
        payload_eq(family, "daddr", json!(format!("@{set}"))),
        json!({"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["saddr"]}}, "right": "local"}}),
        json!({"snat": {"family": family, "addr": source}}),
    ])
}

/// The whole table as one transaction: create-if-missing, delete, create.
fn table(addresses: &BTreeSet<IpAddr>) -> Value {
    let mut commands = vec![
        json!({"add": {"table": node_table()}}),
        json!({"delete": {"table": node_table()}}),
        json!({"add": {"table": node_table()}}),
        set(SET_V4, "ipv4_addr"),
        set(SET_V6, "ipv6_addr"),
    ];
    commands.extend(elements(addresses));
    commands.extend([
        json!({"add": {"chain": {
            "family": "inet", "table": NODE_NFT_TABLE, "name": "postrouting",
            "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept",
        }}}),
        rule(vec![meta_eq("mark", json!(BYPASS_MARK)), json!({"return": null})]),
        snat("ip", SET_V4, json!(PROBE_SOURCE_V4)),
        snat("ip6", SET_V6, json!(PROBE_SOURCE_V6)),
    ]);
    json!({ "nftables": commands })
}

/// The sets' new contents as one transaction: flush both, add the addresses.
fn update(addresses: &BTreeSet<IpAddr>) -> Value {
    let mut commands = vec![json!({"flush": {"set": set_ref(SET_V4)}}), json!({"flush": {"set": set_ref(SET_V6)}})];
    commands.extend(elements(addresses));
    json!({ "nftables": commands })
}

/// Removes the table if it is there (create-if-missing, delete: no error either way).
fn removal() -> Value {
    json!({"nftables": [{"add": {"table": node_table()}}, {"delete": {"table": node_table()}}]})
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn addrs(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn commands(doc: &Value) -> Vec<Value> {
        doc["nftables"].as_array().unwrap().clone()
    }

    /// The table's postrouting chain SNATs the node's own TCP to the enrolled pods, per family,
    /// to Istio's probe addresses, and lets ztunnel's marked sockets be.
    #[test]
    fn the_table_snats_the_nodes_own_tcp_to_enrolled_pods() {
        let doc = table(&addrs(&["10.244.1.2", "10.244.1.3", "fd00::2"]));
        let cmds = commands(&doc);
        assert!(cmds[0]["add"]["table"].is_object() && cmds[1]["delete"]["table"].is_object(), "replaces the table");
        let chain = cmds.iter().find_map(|c| c["add"]["chain"].as_object()).unwrap();
        assert_eq!((chain["type"].as_str(), chain["hook"].as_str()), (Some("nat"), Some("postrouting")));
        let elements: Vec<(&str, &Value)> = cmds
            .iter()
            .filter_map(|c| c["add"]["element"].as_object())
            .map(|e| (e["name"].as_str().unwrap(), &e["elem"]))
            .collect();
        assert_eq!(elements, [(SET_V4, &json!(["10.244.1.2", "10.244.1.3"])), (SET_V6, &json!(["fd00::2"]))]);

        let rules: Vec<&Value> = cmds.iter().filter_map(|c| c["add"].get("rule")).map(|r| &r["expr"]).collect();
        assert_eq!(rules[0], &json!([meta_eq("mark", json!(BYPASS_MARK)), {"return": null}]), "marked sockets first");
        for (rule, family, set, source) in [
            (rules[1], "ip", SET_V4, "169.254.7.127"),
            (rules[2], "ip6", SET_V6, "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"),
        ] {
            let expected = json!([
                {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
                {"match": {"op": "==", "left": {"payload": {"protocol": family, "field": "daddr"}}, "right": format!("@{set}")}},
                {"match": {"op": "==", "left": {"fib": {"result": "type", "flags": ["saddr"]}}, "right": "local"}},
                {"snat": {"family": family, "addr": source}},
            ]);
            assert_eq!(rule, &expected);
        }
    }

    #[test]
    fn an_update_flushes_both_sets_and_adds_the_addresses() {
        let cmds = commands(&update(&addrs(&["10.244.1.9"])));
        assert_eq!(cmds.len(), 3);
        assert_eq!(cmds[0]["flush"]["set"]["name"], SET_V4);
        assert_eq!(cmds[1]["flush"]["set"]["name"], SET_V6);
        assert_eq!(cmds[2]["add"]["element"]["elem"], json!(["10.244.1.9"]));
        assert_eq!(commands(&update(&BTreeSet::new())).len(), 2, "no pod left: both sets emptied");
    }

    /// A stand-in for `nft` that records each transaction it is given (one JSON document a
    /// line) and fails while `<dir>/fail` exists. The node's real nftables are never touched.
    fn fake_nft(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("nft");
        let script = format!(
            "#!/bin/sh\nif [ -e {dir}/fail ]; then echo 'refused' >&2; exit 1; fi\ncat >> {dir}/calls\necho >> {dir}/calls\n",
            dir = dir.display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn calls(dir: &Path) -> Vec<Value> {
        std::fs::read_to_string(dir.join("calls"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Runs `sync`, retrying while the fresh script is "text file busy" (another test thread
    /// may have forked while it was being written).
    fn sync(snat: &ProbeSnat, addresses: &[&str]) -> Result<Sync, RulesError> {
        for _ in 0..50 {
            match snat.sync(&addrs(addresses)) {
                Err(RulesError::Spawn { error, .. })
                    if error.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                other => return other,
            }
        }
        panic!("the fake nft stayed busy");
    }

    #[test]
    fn the_table_is_written_only_once_a_pod_is_captured_and_only_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("weft-probe-snat-{}-on", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let snat = ProbeSnat::new(fake_nft(&dir), true);
        assert_eq!(snat.pod_rules(), rules::Probes::Pass);

        assert_eq!(sync(&snat, &[]).unwrap(), Sync::Unchanged);
        assert!(calls(&dir).is_empty(), "nothing captured: nft never ran");

        assert_eq!(sync(&snat, &["10.244.1.2"]).unwrap(), Sync::Installed);
        assert_eq!(sync(&snat, &["10.244.1.2"]).unwrap(), Sync::Unchanged);
        assert_eq!(sync(&snat, &["10.244.1.2", "10.244.1.3"]).unwrap(), Sync::Updated);
        assert_eq!(sync(&snat, &[]).unwrap(), Sync::Updated, "the last pod released: the sets are emptied");
        let written = calls(&dir);
        assert_eq!(written.len(), 3);
        assert_eq!(written[0], table(&addrs(&["10.244.1.2"])));
        assert_eq!(written[1], update(&addrs(&["10.244.1.2", "10.244.1.3"])));
        assert_eq!(written[2], update(&BTreeSet::new()));

        // A failed write is reported, and the next one replaces the whole table.
        std::fs::write(dir.join("fail"), "").unwrap();
        let err = sync(&snat, &["10.244.1.4"]).unwrap_err();
        assert!(matches!(&err, RulesError::Nft { table: NODE_NFT_TABLE, stderr, .. } if stderr == "refused"), "{err}");
        assert!(err.to_string().contains("inet weft-node"), "{err}");
        std::fs::remove_file(dir.join("fail")).unwrap();
        assert_eq!(sync(&snat, &["10.244.1.4"]).unwrap(), Sync::Installed);
        assert_eq!(calls(&dir).last().unwrap(), &table(&addrs(&["10.244.1.4"])));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn turned_off_the_first_capture_removes_a_table_left_behind_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("weft-probe-snat-{}-off", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let snat = ProbeSnat::new(fake_nft(&dir), false);
        assert_eq!(snat.pod_rules(), rules::Probes::Capture);
        assert_eq!(sync(&snat, &[]).unwrap(), Sync::Unchanged);
        assert_eq!(sync(&snat, &["10.244.1.2"]).unwrap(), Sync::Removed);
        assert_eq!(sync(&snat, &["10.244.1.2", "10.244.1.3"]).unwrap(), Sync::Unchanged);
        assert_eq!(calls(&dir), [removal()]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
