//! SPIFFE identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Identities are parsed once, where they enter the process (a certificate's URI SAN, a config
//! file, the controller's API), into a [`SpiffeId`]; everything past that edge passes the typed
//! value around and never re-parses strings.

#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The trust domain used when an operator does not set one (ARCHITECTURE §5).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The SPIFFE specification caps an ID at 2048 bytes.
const MAX_LEN: usize = 2048;

/// A workload identity in the Kubernetes shape SPIFFE IDs take in a mesh.
///
/// Cheap to clone (one reference count): identities are copied into pool keys, access logs and
/// policy decisions on every connection.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole URI, kept so that `Display` and comparisons need no formatting.
    uri: Arc<str>,
    /// Byte ranges of the three parts inside `uri` (an ID is at most 2048 bytes, so `u16`
    /// fits and keeps the type at 32 bytes).
    trust_domain: (u16, u16),
    namespace: (u16, u16),
    service_account: (u16, u16),
}

/// Why a string is not a valid SPIFFE identity. Each variant names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with \"spiffe://\"")]
    NotSpiffe(String),
    #[error("identity {0:?} is longer than the 2048 bytes SPIFFE allows")]
    TooLong(String),
    #[error("identity {id:?} has an invalid trust domain {domain:?}: {why}")]
    TrustDomain { id: String, domain: String, why: &'static str },
    #[error("identity {0:?} must have the path /ns/<namespace>/sa/<service-account>")]
    Path(String),
    #[error("identity {id:?} has an invalid {part} {value:?}: {why}")]
    Segment { id: String, part: &'static str, value: String, why: &'static str },
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, IdentityError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    pub fn trust_domain(&self) -> &str {
        self.part(self.trust_domain)
    }

    pub fn namespace(&self) -> &str {
        self.part(self.namespace)
    }

    pub fn service_account(&self) -> &str {
        self.part(self.service_account)
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    fn part(&self, (start, end): (u16, u16)) -> &str {
        &self.uri[start as usize..end as usize]
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const SCHEME: &str = "spiffe://";
        if s.len() > MAX_LEN {
            return Err(IdentityError::TooLong(s.chars().take(64).collect()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or_else(|| IdentityError::NotSpiffe(s.to_owned()))?;
        let (domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        check_trust_domain(domain).map_err(|why| IdentityError::TrustDomain {
            id: s.to_owned(),
            domain: domain.to_owned(),
            why,
        })?;
        let parts: Vec<&str> = path.split('/').collect();
        // "/ns/x/sa/y" splits into ["", "ns", x, "sa", y].
        if parts.len() != 5 || !parts[0].is_empty() || parts[1] != "ns" || parts[3] != "sa" {
            return Err(IdentityError::Path(s.to_owned()));
        }
        for (part, value) in [("namespace", parts[2]), ("service account", parts[4])] {
            check_segment(value).map_err(|why| IdentityError::Segment {
                id: s.to_owned(),
                part,
                value: value.to_owned(),
                why,
            })?;
        }
        let td_start = SCHEME.len();
        let td_end = td_start + domain.len();
        let ns_start = td_end + "/ns/".len();
        let ns_end = ns_start + parts[2].len();
        let sa_start = ns_end + "/sa/".len();
        // All offsets are <= s.len() <= MAX_LEN (2048), checked above.
        let r = |a: usize, b: usize| (a as u16, b as u16);
        Ok(SpiffeId {
            uri: Arc::from(s),
            trust_domain: r(td_start, td_end),
            namespace: r(ns_start, ns_end),
            service_account: r(sa_start, s.len()),
        })
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = IdentityError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

/// SPIFFE: a trust domain is lowercase letters, digits, dots, dashes and underscores.
fn check_trust_domain(domain: &str) -> Result<(), &'static str> {
    if domain.is_empty() {
        return Err("it is empty");
    }
    if domain.contains(':') {
        return Err("a port is not allowed");
    }
    if !domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')) {
        return Err("only lowercase letters, digits, '.', '-' and '_' are allowed");
    }
    Ok(())
}

/// SPIFFE: a path segment is letters, digits, dots, dashes and underscores, and not `.`/`..`.
fn check_segment(segment: &str) -> Result<(), &'static str> {
    if segment.is_empty() {
        return Err("it is empty");
    }
    if segment == "." || segment == ".." {
        return Err("'.' and '..' are not allowed");
    }
    if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) {
        return Err("only letters, digits, '.', '-' and '_' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_parts() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(SpiffeId::new("cluster.local", "default", "web").unwrap(), id);
    }

    #[test]
    fn rejects_malformed_with_reason() {
        let cases = [
            ("https://cluster.local/ns/a/sa/b", "does not start with"),
            ("spiffe:///ns/a/sa/b", "trust domain \"\": it is empty"),
            ("spiffe://Cluster.local/ns/a/sa/b", "only lowercase"),
            ("spiffe://td:8080/ns/a/sa/b", "a port is not allowed"),
            ("spiffe://td/ns/a", "must have the path"),
            ("spiffe://td/ns/a/sa/b/extra", "must have the path"),
            ("spiffe://td/namespace/a/sa/b", "must have the path"),
            ("spiffe://td/ns//sa/b", "invalid namespace \"\": it is empty"),
            ("spiffe://td/ns/a/sa/..", "invalid service account \"..\""),
            ("spiffe://td/ns/a b/sa/c", "invalid namespace \"a b\""),
        ];
        for (input, want) in cases {
            let err = input.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(err.contains(want), "{input}: got {err:?}, want it to contain {want:?}");
        }
        let long = format!("spiffe://td/ns/a/sa/{}", "x".repeat(3000));
        assert!(matches!(long.parse::<SpiffeId>(), Err(IdentityError::TooLong(_))));
    }
}
