//! Which node is calling: every request to the controller's API carries a node credential
//! (`authorization: Bearer <token>`), and an [`Authenticator`] turns it into the node's name.
//! The certificate API then signs only identities of workloads scheduled on that node.
//!
//! Two kinds of credential, one trait:
//! - **Node tokens** ([`NodeTokens`], for the lab and for VMs): bearer tokens the controller
//!   issues and checks itself, bound to one node name by an HMAC-SHA256 under a key that never
//!   leaves the controller's state directory.
//! - **Kubernetes** ([`crate::tokenreview`]): a ztunnel's projected service-account token,
//!   checked by the API server's TokenReview and mapped to the node of the pod it is bound
//!   to. That check is a network call, hence the asynchronous trait.
//!
//! **Token format, version 1** (exact; nothing else is accepted):
//!
//! ```text
//! weftnode.v1.<node>.<mac>
//!   <node>  the node name, a DNS subdomain as Kubernetes requires (lowercase letters, digits,
//!           '-' and '.', at most 253 characters): it may contain dots, so <mac> is everything
//!           after the last one
//!   <mac>   base64url without padding (RFC 4648 §5) of
//!           HMAC-SHA256(key, "weftnode.v1." + <node>), 43 characters
//! ```
//!
//! A token does not expire: it is revoked by deleting the key file, which revokes every token
//! (the controller makes a new key at its next start). The key is 32 random bytes in
//! `node-token.key` (mode 0600), generated at first start and never regenerated over an
//! existing file: a file of the wrong size fails start-up.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tracing::info;

use crate::ca::{FileError, create_private_dir, read_optional, warn_if_exposed, write_new_file};

/// The node-token key file in the state directory (mode 0600).
pub const KEY_FILE: &str = "node-token.key";

/// What every version-1 token starts with, and what its MAC covers before the node name.
const PREFIX: &str = "weftnode.";
const VERSION: &str = "v1";

/// HMAC-SHA256 keys as long as the hash: shorter weakens it, longer adds nothing (RFC 2104 §3).
const KEY_LEN: usize = 32;

/// Kubernetes' limit on a node name (a DNS subdomain, RFC 1123).
const MAX_NODE_NAME: usize = 253;

/// Longest token looked at: the longest node name plus the fixed parts, with room to spare.
/// Anything longer is refused before any parsing.
const MAX_TOKEN: usize = 512;

/// Why a credential was refused, or the token key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("node token is malformed ({0}); expected weftnode.v1.<node>.<signature>")]
    Malformed(&'static str),
    #[error("node token version {0:?} is not supported; this controller accepts v1")]
    UnknownVersion(String),
    #[error(
        "node token for {node} has an invalid signature: it was not issued with this controller's \
         key (was the state directory reset? then issue the node a new token)"
    )]
    BadSignature { node: NodeName },
    #[error("node name {name:?} is invalid: {why}")]
    InvalidNodeName { name: String, why: &'static str },
    #[error(transparent)]
    File(#[from] FileError),
    #[error(
        "{} holds {len} bytes; a node-token key is exactly {KEY_LEN}. Restore it, or delete it to \
         make a new key at the next start (which revokes every node token)",
        path.display()
    )]
    BadKeyFile { path: PathBuf, len: usize },
    #[error("the system random number generator failed; cannot make the node-token key")]
    Random,
    #[error("service-account token refused: {0}")]
    TokenRefused(String),
    #[error(
        "service-account token of {username}, not of ztunnel's service account {expected}: only \
         ztunnel may act for a node"
    )]
    NotZtunnel { username: String, expected: String },
    #[error(
        "cannot review a service-account token with the Kubernetes API: {0} (is the API server \
         reachable, and may the controller create tokenreviews and get pods?)"
    )]
    Review(String),
}

impl AuthError {
    /// The caller's credential was refused (answer 401), rather than the controller failing.
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            AuthError::Malformed(_)
                | AuthError::UnknownVersion(_)
                | AuthError::BadSignature { .. }
                | AuthError::InvalidNodeName { .. }
                | AuthError::TokenRefused(_)
                | AuthError::NotZtunnel { .. }
        )
    }
}

/// A node name: a DNS subdomain (RFC 1123), as Kubernetes requires of node names.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

/// The future an [`Authenticator`] returns.
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<String, AuthError>> + Send + 'a>>;

/// Turns the credential of an API request (the token of its `authorization: Bearer <token>`
/// header, without the scheme) into the calling node's name. Object-safe, so the server holds
/// an `Arc<dyn Authenticator>` whichever kind of credential the cluster uses.
pub trait Authenticator: Send + Sync {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a>;
}

/// Issues and checks node tokens (see the module docs for the format).
pub struct NodeTokens {
    key: hmac::Key,
}

impl NodeName {
    pub fn new(name: &str) -> Result<NodeName, AuthError> {
        check_node_name(name).map_err(|why| AuthError::InvalidNodeName { name: name.to_owned(), why })?;
        Ok(NodeName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeName({})", self.0)
    }
}

impl NodeTokens {
    /// Loads the key from `state_dir`, or generates and persists it there the first time.
    pub fn open(state_dir: &Path) -> Result<NodeTokens, AuthError> {
        let path = state_dir.join(KEY_FILE);
        let bytes = match read_optional(&path, "read the node-token key")? {
            Some(bytes) => {
                warn_if_exposed(&path);
                bytes
            }
            None => {
                let mut bytes = vec![0u8; KEY_LEN];
                aws_lc_rs::rand::fill(&mut bytes).map_err(|_| AuthError::Random)?;
                create_private_dir(state_dir)?;
                write_new_file(&path, &bytes, 0o600)?;
                info!(path = %path.display(), "generated a new node-token key");
                bytes
            }
        };
        if bytes.len() != KEY_LEN {
            return Err(AuthError::BadKeyFile { path, len: bytes.len() });
        }
        Ok(NodeTokens { key: hmac::Key::new(hmac::HMAC_SHA256, &bytes) })
    }

    /// Whether `token` is meant as a node token (it may still not verify): how a controller
    /// that also accepts service-account tokens tells the two apart.
    pub fn claims(token: &str) -> bool {
        token.starts_with(PREFIX)
    }

    /// A token for `node`. Give it to that node's proxy only: whoever holds it may obtain the
    /// certificates of every workload scheduled on the node.
    pub fn issue(&self, node: &NodeName) -> String {
        let mac = hmac::sign(&self.key, signed_part(node.as_str()).as_bytes());
        format!("{}.{}", signed_part(node.as_str()), URL_SAFE_NO_PAD.encode(mac.as_ref()))
    }

    /// The node a token was issued for, if this controller's key issued it. The signature is
    /// compared in constant time.
    pub fn verify(&self, token: &str) -> Result<NodeName, AuthError> {
        if token.len() > MAX_TOKEN {
            return Err(AuthError::Malformed("too long"));
        }
        let rest = token.strip_prefix(PREFIX).ok_or(AuthError::Malformed("it does not start with \"weftnode.\""))?;
        let (version, rest) = rest.split_once('.').ok_or(AuthError::Malformed("no version"))?;
        if version != VERSION {
            return Err(AuthError::UnknownVersion(version.chars().take(16).collect()));
        }
        let (node, mac) = rest.rsplit_once('.').ok_or(AuthError::Malformed("no signature"))?;
        let node = NodeName::new(node)?;
        let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| AuthError::Malformed("the signature is not base64url"))?;
        hmac::verify(&self.key, signed_part(node.as_str()).as_bytes(), &mac)
            .map_err(|_| AuthError::BadSignature { node: node.clone() })?;
        Ok(node)
    }
}

impl Authenticator for NodeTokens {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(std::future::ready(self.verify(token).map(NodeName::into_string)))
    }
}

/// `weftnode.v1.<node>`: what the MAC covers, and the token up to its last dot.
fn signed_part(node: &str) -> String {
    format!("{PREFIX}{VERSION}.{node}")
}

/// RFC 1123 subdomain: dot-separated labels of lowercase letters, digits and '-', each 1 to 63
/// characters, starting and ending with a letter or digit; 253 characters at most.
fn check_node_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > MAX_NODE_NAME {
        return Err("it is longer than 253 characters");
    }
    for label in name.split('.') {
        let bytes = label.as_bytes();
        match (bytes.first(), bytes.last()) {
            (Some(first), Some(last)) if first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric() => {}
            _ => return Err("each dot-separated part must start and end with a letter or digit"),
        }
        if label.len() > 63 {
            return Err("a dot-separated part is longer than 63 characters");
        }
        if !bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-') {
            return Err("only lowercase letters, digits, '-' and '.' are allowed");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::ca::tests::TempDir;

    fn node(name: &str) -> NodeName {
        NodeName::new(name).unwrap()
    }

    #[tokio::test]
    async fn a_token_authenticates_its_node() {
        let dir = TempDir::new("token-good");
        let tokens = NodeTokens::open(&dir.0).unwrap();
        let token = tokens.issue(&node("worker-1.lab"));
        assert!(token.starts_with("weftnode.v1.worker-1.lab."), "{token}");
        assert_eq!(token.rsplit('.').next().unwrap().len(), 43, "base64url of 32 bytes, no padding");
        assert_eq!(tokens.verify(&token).unwrap(), node("worker-1.lab"));
        let auth: &dyn Authenticator = &tokens;
        assert_eq!(auth.authenticate(&token).await.unwrap(), "worker-1.lab");
    }

    #[test]
    fn the_key_is_persisted_private_and_never_regenerated() {
        let dir = TempDir::new("token-key");
        let token = NodeTokens::open(&dir.0).unwrap().issue(&node("n1"));
        let path = dir.path(KEY_FILE);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(NodeTokens::open(&dir.0).unwrap().verify(&token).unwrap(), node("n1"), "same key after restart");

        fs::write(&path, b"short").unwrap();
        let err = NodeTokens::open(&dir.0).err().unwrap();
        assert!(matches!(err, AuthError::BadKeyFile { len: 5, .. }), "{err}");
        assert!(!err.is_unauthenticated());
        assert_eq!(fs::read(&path).unwrap(), b"short", "left as found");
    }

    #[test]
    fn a_tampered_token_is_refused() {
        let dir = TempDir::new("token-tamper");
        let tokens = NodeTokens::open(&dir.0).unwrap();
        let token = tokens.issue(&node("n1"));
        let mut bytes = token.into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let err = tokens.verify(std::str::from_utf8(&bytes).unwrap()).unwrap_err();
        assert!(matches!(err, AuthError::BadSignature { ref node } if node.as_str() == "n1"), "{err}");
        assert!(err.is_unauthenticated());
    }

    #[test]
    fn another_nodes_name_on_a_valid_token_is_refused() {
        let dir = TempDir::new("token-swap");
        let tokens = NodeTokens::open(&dir.0).unwrap();
        let token = tokens.issue(&node("node-a"));
        let swapped = token.replacen("node-a", "node-b", 1);
        assert_ne!(swapped, token);
        let err = tokens.verify(&swapped).unwrap_err();
        assert!(matches!(err, AuthError::BadSignature { ref node } if node.as_str() == "node-b"), "{err}");
        // Nor can a dot move the boundary between name and signature.
        let (signed, mac) = token.rsplit_once('.').unwrap();
        let err = tokens.verify(&format!("{signed}.x.{mac}")).unwrap_err();
        assert!(matches!(err, AuthError::BadSignature { .. }), "{err}");
    }

    #[test]
    fn a_token_of_another_key_is_refused() {
        let (a, b) = (TempDir::new("token-key-a"), TempDir::new("token-key-b"));
        let token = NodeTokens::open(&a.0).unwrap().issue(&node("n1"));
        let err = NodeTokens::open(&b.0).unwrap().verify(&token).unwrap_err();
        assert!(matches!(err, AuthError::BadSignature { .. }), "{err}");
    }

    /// Whether an error is the one expected.
    type Check = fn(&AuthError) -> bool;

    #[test]
    fn malformed_tokens_say_why() {
        let dir = TempDir::new("token-malformed");
        let tokens = NodeTokens::open(&dir.0).unwrap();
        let good = tokens.issue(&node("n1"));
        let mac = good.rsplit('.').next().unwrap();
        let cases: [(&str, Check); 8] = [
            ("", |e| matches!(e, AuthError::Malformed(_))),
            ("Bearer x", |e| matches!(e, AuthError::Malformed(_))),
            ("weftnode.v1", |e| matches!(e, AuthError::Malformed(_))),
            ("weftnode.v1.n1", |e| matches!(e, AuthError::Malformed(_))),
            ("weftnode.v1..AAAA", |e| matches!(e, AuthError::InvalidNodeName { .. })),
            ("weftnode.v1.n1.!!!", |e| matches!(e, AuthError::Malformed(_))),
            ("weftnode.v2.n1.AAAA", |e| matches!(e, AuthError::UnknownVersion(v) if v == "v2")),
            ("weftnode.v1.N1.AAAA", |e| matches!(e, AuthError::InvalidNodeName { .. })),
        ];
        for (token, want) in cases {
            let err = tokens.verify(token).unwrap_err();
            assert!(want(&err), "{token:?}: {err}");
            assert!(err.is_unauthenticated(), "{token:?}");
        }
        let long = format!("weftnode.v1.{}.{mac}", "a".repeat(600));
        assert!(matches!(tokens.verify(&long), Err(AuthError::Malformed("too long"))));
    }

    #[test]
    fn node_names_follow_kubernetes() {
        for ok in ["a", "node-1", "ip-10-0-0-1.ec2.internal", &"a".repeat(63)] {
            assert!(NodeName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "a..b", ".a", "Node", "a_b", &"a".repeat(64), &["a"; 128].join(".")] {
            assert!(NodeName::new(bad).is_err(), "{bad}");
        }
    }
}
