//! L4 authorization (ARCHITECTURE §9): ALLOW and DENY policies matching source principals,
//! namespaces and IP blocks, and destination ports.
//!
//! For a connection to a workload, with the policies that govern it:
//! 1. a broken DENY policy, or a DENY policy with a matching rule, denies;
//! 2. with no ALLOW policy, the connection is allowed;
//! 3. otherwise a matching rule of a (non-broken) ALLOW policy is required.
//!
//! A plaintext connection has no identity: a source that names principals or namespaces
//! never matches it.
//!
//! A rule with `to` (methods, paths) is about requests, which only a waypoint sees
//! ([`Connection::request`]). Decided at L4, such a rule never allows, and a DENY rule denies
//! what its other fields match: without the request, the stricter answer.

use std::net::IpAddr;

use hbone::SpiffeId;
use meshapi::{Action, Authorization, Operation, Rule, Source};

/// What is known about a connection when it is authorized.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The peer's identity, proved by mTLS; `None` for plaintext.
    pub identity: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    pub dest_port: u16,
    /// The request's method and path (without the query), when a waypoint decides per
    /// request; `None` at L4.
    pub request: Option<(&'a str, &'a str)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Denied, and why (names the policy).
    Deny(String),
}

/// Decides a connection against the policies that govern its destination.
pub fn check<'a>(policies: impl IntoIterator<Item = &'a Authorization>, conn: &Connection<'_>) -> Verdict {
    let mut allows = Vec::new();
    for policy in policies {
        match policy.action {
            Action::Deny => {
                if let Some(why) = &policy.broken {
                    return Verdict::Deny(format!(
                        "DENY policy {}/{} is invalid ({why}); it denies everything it selects",
                        policy.namespace, policy.name
                    ));
                }
                if policy.rules.iter().any(|r| rule_matches(r, conn, Action::Deny)) {
                    return Verdict::Deny(format!("denied by policy {}/{}", policy.namespace, policy.name));
                }
            }
            Action::Allow => allows.push(policy),
        }
    }
    if allows.is_empty() {
        return Verdict::Allow;
    }
    if allows.iter().any(|p| p.broken.is_none() && p.rules.iter().any(|r| rule_matches(r, conn, Action::Allow))) {
        return Verdict::Allow;
    }
    let names: Vec<String> = allows
        .iter()
        .map(|p| match &p.broken {
            Some(why) => format!("{}/{} (invalid: {why})", p.namespace, p.name),
            None => format!("{}/{}", p.namespace, p.name),
        })
        .collect();
    Verdict::Deny(format!("no ALLOW policy matched (policies: {})", names.join(", ")))
}

fn rule_matches(rule: &Rule, conn: &Connection<'_>, action: Action) -> bool {
    let to = match (rule.to.is_empty(), conn.request) {
        (true, _) => true,
        (false, Some((method, path))) => rule.to.iter().any(|op| operation_matches(op, method, path)),
        // At L4: the stricter answer (see the module docs).
        (false, None) => action == Action::Deny,
    };
    to && (rule.ports.is_empty() || rule.ports.contains(&conn.dest_port))
        && (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, conn)))
}

fn operation_matches(op: &Operation, method: &str, path: &str) -> bool {
    (op.methods.is_empty() || op.methods.iter().any(|m| m == method))
        && (op.paths.is_empty() || op.paths.iter().any(|p| p.matches(path)))
}

fn source_matches(source: &Source, conn: &Connection<'_>) -> bool {
    if !source.principals.is_empty() && !conn.identity.is_some_and(|id| source.principals.iter().any(|p| p.matches(id)))
    {
        return false;
    }
    if !source.namespaces.is_empty()
        && !conn.identity.is_some_and(|id| source.namespaces.iter().any(|ns| ns == id.namespace()))
    {
        return false;
    }
    if !source.ip_blocks.is_empty() && !source.ip_blocks.iter().any(|b| b.contains(&conn.source_ip)) {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshapi::Snapshot;

    fn policies(yaml: &str) -> Vec<Authorization> {
        let doc = format!(
            "workloads:\n  - {{name: api, namespace: backend, node: n, addresses: [10.0.0.1], labels: {{app: api}}}}\nauthorizations:\n{yaml}"
        );
        Snapshot::from_yaml(&doc).unwrap().authorizations
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa).unwrap()
    }

    fn conn<'a>(identity: Option<&'a SpiffeId>, ip: &str, port: u16) -> Connection<'a> {
        Connection { identity, source_ip: ip.parse().unwrap(), dest_port: port, request: None }
    }

    #[test]
    fn request_rules_at_l7_and_their_stricter_reading_at_l4() {
        let p = policies(
            "  - {name: no-admin, namespace: backend, action: DENY, rules: [{to: [{methods: [DELETE], paths: [\"/admin/*\"]}]}]}\n  - {name: reads, namespace: backend, action: ALLOW, rules: [{from: [{namespaces: [frontend]}], to: [{methods: [GET]}]}]}",
        );
        let web = id("frontend", "web");
        let request = |method, path| Connection { request: Some((method, path)), ..conn(Some(&web), "10.1.1.1", 80) };
        assert_eq!(check(&p, &request("GET", "/admin/users")), Verdict::Allow);
        assert_eq!(
            check(&p, &request("DELETE", "/admin/users")),
            Verdict::Deny("denied by policy backend/no-admin".into())
        );
        assert!(
            matches!(check(&p, &request("POST", "/items")), Verdict::Deny(why) if why.contains("no ALLOW policy matched"))
        );
        // At L4 the DENY's request rule denies the connection, and the ALLOW's cannot allow it.
        assert_eq!(
            check(&p, &conn(Some(&web), "10.1.1.1", 80)),
            Verdict::Deny("denied by policy backend/no-admin".into())
        );
        let only_allow =
            policies("  - {name: reads, namespace: backend, action: ALLOW, rules: [{to: [{methods: [GET]}]}]}");
        assert!(matches!(check(&only_allow, &conn(Some(&web), "10.1.1.1", 80)), Verdict::Deny(_)));
    }

    #[test]
    fn request_patterns_that_cannot_be_read_fail_closed() {
        let p = policies(
            "  - {name: d, namespace: backend, action: DENY, rules: [{to: [{paths: [\"/a*b\"]}]}]}\n  - {name: m, namespace: backend, action: ALLOW, rules: [{to: [{methods: [get]}]}]}",
        );
        assert!(p.iter().all(|a| a.broken.is_some()), "{p:?}");
    }

    #[test]
    fn no_policy_allows() {
        assert_eq!(check(&[], &conn(None, "10.1.1.1", 80)), Verdict::Allow);
    }

    #[test]
    fn allow_by_principal_admits_one_and_refuses_another() {
        let p = policies(
            "  - {name: p, namespace: backend, action: ALLOW, rules: [{from: [{principals: [\"spiffe://cluster.local/ns/frontend/sa/web\"]}]}]}",
        );
        let web = id("frontend", "web");
        let other = id("frontend", "batch");
        assert_eq!(check(&p, &conn(Some(&web), "10.1.1.1", 80)), Verdict::Allow);
        let Verdict::Deny(why) = check(&p, &conn(Some(&other), "10.1.1.1", 80)) else { panic!() };
        assert!(why.contains("no ALLOW policy matched (policies: backend/p)"), "{why}");
        assert!(matches!(check(&p, &conn(None, "10.1.1.1", 80)), Verdict::Deny(_)), "plaintext has no principal");
    }

    #[test]
    fn deny_beats_allow() {
        let p = policies(
            "  - {name: allow-all-frontend, namespace: backend, action: ALLOW, rules: [{from: [{namespaces: [frontend]}]}]}\n  - {name: no-batch, namespace: backend, action: DENY, rules: [{from: [{principals: [\"*/sa/batch\"]}]}]}",
        );
        assert_eq!(check(&p, &conn(Some(&id("frontend", "web")), "10.1.1.1", 80)), Verdict::Allow);
        assert_eq!(
            check(&p, &conn(Some(&id("frontend", "batch")), "10.1.1.1", 80)),
            Verdict::Deny("denied by policy backend/no-batch".into())
        );
    }

    #[test]
    fn ports_and_ip_blocks() {
        let p = policies(
            "  - {name: p, namespace: backend, action: ALLOW, rules: [{from: [{ipBlocks: [10.244.1.0/24]}], ports: [8080]}]}",
        );
        assert_eq!(check(&p, &conn(None, "10.244.1.9", 8080)), Verdict::Allow);
        assert!(matches!(check(&p, &conn(None, "10.244.2.9", 8080)), Verdict::Deny(_)));
        assert!(matches!(check(&p, &conn(None, "10.244.1.9", 9090)), Verdict::Deny(_)));
    }

    #[test]
    fn broken_policies_fail_closed() {
        let deny = policies(
            "  - {name: d, namespace: backend, action: DENY, rules: [{from: [{principals: [\"spiffe://bad\"]}]}]}",
        );
        let Verdict::Deny(why) = check(&deny, &conn(Some(&id("x", "y")), "10.1.1.1", 80)) else { panic!() };
        assert!(why.contains("is invalid"), "{why}");
        let allow = policies(
            "  - {name: a, namespace: backend, action: ALLOW, rules: [{from: [{ipBlocks: [\"10.0.0.0/33\"]}]}]}",
        );
        assert!(matches!(check(&allow, &conn(None, "10.0.0.1", 80)), Verdict::Deny(_)));
    }
}
