//! Who is calling: every request to the controller's API carries a credential
//! (`authorization: Bearer <token>`), and an [`Authenticator`] turns it into a [`Caller`]:
//!
//! - a **node** (its ztunnel): the certificate API then signs only identities of workloads
//!   scheduled on that node;
//! - a **service account** `<namespace>/<name>` (a proxy that terminates HBONE with an
//!   identity of its own: a waypoint): it may obtain only that identity, and only while it
//!   serves a waypoint. It never gets a node's rights, so a waypoint cannot obtain the
//!   identities of the workloads beside it.
//!
//! Two kinds of credential, one trait:
//! - **Controller tokens** ([`Tokens`], for the lab and for VMs): bearer tokens the
//!   controller issues and checks itself, bound to one node or one service account by an
//!   HMAC-SHA256 under a key that never leaves the controller's state directory.
//! - **Kubernetes** ([`crate::tokenreview`]): a proxy's projected service-account token,
//!   checked by the API server's TokenReview; ztunnel's is mapped to the node of the pod it is
//!   bound to, any other service account's is that service account. That check is a network
//!   call, hence the asynchronous trait.
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
//!
//! weftsa.v1.<namespace>.<name>.<mac>
//!   <namespace>  the service account's namespace, a DNS label (no dots, at most 63): it ends
//!                at the first dot after "weftsa.v1."
//!   <name>       the service account's name, a DNS subdomain (it may contain dots, at most
//!                253): everything up to the last dot
//!   <mac>        base64url without padding of
//!                HMAC-SHA256(key, "weftsa.v1." + <namespace> + "." + <name>), 43 characters
//! ```
//!
//! Both kinds are signed with the same key; the prefixes keep the signed texts apart, so a
//! node token can never pass for a service account's or the other way round. A token does
//! not expire: it is revoked by deleting the key file, which revokes every token (the
//! controller makes a new key at its next start). The key is 32 random bytes in
//! `node-token.key` (mode 0600), generated at first start and never regenerated over an
//! existing file: a file of the wrong size fails start-up.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meshapi::watch::Subscriber;
use spiffe::SpiffeId;
use tracing::info;

use crate::ca::{FileError, create_private_dir, read_optional, warn_if_exposed, write_new_file};

/// The token key file in the state directory (mode 0600). Its name predates service-account
/// tokens, which it signs too.
pub const KEY_FILE: &str = "node-token.key";

/// What every version-1 token starts with, and what its MAC covers before the subject.
const NODE_PREFIX: &str = "weftnode.";
const SERVICE_ACCOUNT_PREFIX: &str = "weftsa.";
const VERSION: &str = "v1";

/// HMAC-SHA256 keys as long as the hash: shorter weakens it, longer adds nothing (RFC 2104 §3).
const KEY_LEN: usize = 32;

/// Kubernetes' limit on a node or service account name (a DNS subdomain, RFC 1123).
const MAX_SUBDOMAIN: usize = 253;
/// Kubernetes' limit on a namespace name (a DNS label, RFC 1123).
const MAX_LABEL: usize = 63;

/// Longest token looked at: the longest service account (a namespace and a name) plus the
/// fixed parts, with room to spare. Anything longer is refused before any parsing.
const MAX_TOKEN: usize = 512;

/// Why a credential was refused, or the token key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "token is malformed ({0}); expected weftnode.v1.<node>.<signature> or \
         weftsa.v1.<namespace>.<service-account>.<signature>"
    )]
    Malformed(&'static str),
    #[error("token version {0:?} is not supported; this controller accepts v1")]
    UnknownVersion(String),
    #[error(
        "token for {caller} has an invalid signature: it was not issued with this controller's \
         key (was the state directory reset? then issue a new token)"
    )]
    BadSignature { caller: Caller },
    #[error("node name {name:?} is invalid: {why}")]
    InvalidNodeName { name: String, why: &'static str },
    #[error("service account {name:?} is invalid: {why}")]
    InvalidServiceAccount { name: String, why: &'static str },
    #[error(transparent)]
    File(#[from] FileError),
    #[error(
        "{} holds {len} bytes; a token key is exactly {KEY_LEN}. Restore it, or delete it to \
         make a new key at the next start (which revokes every token issued)",
        path.display()
    )]
    BadKeyFile { path: PathBuf, len: usize },
    #[error("the system random number generator failed; cannot make the token key")]
    Random,
    #[error("service-account token refused: {0}")]
    TokenRefused(String),
    #[error(
        "token of {username}, which is not a service account: proxies present their service \
         account's projected token (audience weft-controller)"
    )]
    NotServiceAccount { username: String },
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
                | AuthError::InvalidServiceAccount { .. }
                | AuthError::TokenRefused(_)
                | AuthError::NotServiceAccount { .. }
        )
    }
}

/// Who an authenticated request comes from; every call acts for that caller only.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Caller {
    /// A node's proxy (ztunnel): acts for every workload scheduled on the node.
    Node(NodeName),
    /// A proxy with an identity of its own (a waypoint): acts for that service account only.
    ServiceAccount(ServiceAccount),
}

/// A node name: a DNS subdomain (RFC 1123), as Kubernetes requires of node names.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

/// A service account: its namespace (a DNS label) and name (a DNS subdomain), as Kubernetes
/// requires of them.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAccount {
    namespace: String,
    name: String,
}

/// The future an [`Authenticator`] returns.
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Caller, AuthError>> + Send + 'a>>;

/// Turns the credential of an API request (the token of its `authorization: Bearer <token>`
/// header, without the scheme) into the caller. Object-safe, so the server holds an
/// `Arc<dyn Authenticator>` whichever kind of credential the cluster uses.
pub trait Authenticator: Send + Sync {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a>;
}

/// Issues and checks controller tokens, of nodes and of service accounts (see the module
/// docs for the format).
pub struct Tokens {
    key: hmac::Key,
}

impl Caller {
    /// How the caller's requests name it (the watch query, the acknowledgement).
    pub fn subscriber(&self) -> Subscriber {
        match self {
            Caller::Node(node) => Subscriber::Node(node.as_str().to_owned()),
            Caller::ServiceAccount(account) => {
                Subscriber::ServiceAccount { namespace: account.namespace.clone(), name: account.name.clone() }
            }
        }
    }

    pub fn is_node(&self) -> bool {
        matches!(self, Caller::Node(_))
    }
}

/// `node node-1`, `service account shop/wp`: how messages and logs name a caller.
impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Node(node) => write!(f, "node {node}"),
            Caller::ServiceAccount(account) => write!(f, "service account {account}"),
        }
    }
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Node(node) => write!(f, "Node({node})"),
            Caller::ServiceAccount(account) => write!(f, "ServiceAccount({account})"),
        }
    }
}

impl NodeName {
    pub fn new(name: &str) -> Result<NodeName, AuthError> {
        check_subdomain(name).map_err(|why| AuthError::InvalidNodeName { name: name.to_owned(), why })?;
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

impl ServiceAccount {
    pub fn new(namespace: &str, name: &str) -> Result<ServiceAccount, AuthError> {
        let invalid = |why| AuthError::InvalidServiceAccount { name: format!("{namespace}/{name}"), why };
        check_namespace(namespace).map_err(invalid)?;
        check_subdomain(name).map_err(invalid)?;
        Ok(ServiceAccount { namespace: namespace.to_owned(), name: name.to_owned() })
    }

    /// `<namespace>/<name>`, as the command line and the watch API write it.
    pub fn parse(text: &str) -> Result<ServiceAccount, AuthError> {
        match text.split_once('/') {
            Some((namespace, name)) => ServiceAccount::new(namespace, name),
            None => Err(AuthError::InvalidServiceAccount { name: text.to_owned(), why: "write it <namespace>/<name>" }),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<name>`: the one identity it may obtain.
    pub fn identity(&self, trust_domain: &str) -> Result<SpiffeId, spiffe::IdentityError> {
        SpiffeId::new(trust_domain, &self.namespace, &self.name)
    }
}

/// `<namespace>/<name>`.
impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceAccount({self})")
    }
}

impl Tokens {
    /// Loads the key from `state_dir`, or generates and persists it there the first time.
    pub fn open(state_dir: &Path) -> Result<Tokens, AuthError> {
        let path = state_dir.join(KEY_FILE);
        let bytes = match read_optional(&path, "read the token key")? {
            Some(bytes) => {
                warn_if_exposed(&path);
                bytes
            }
            None => {
                let mut bytes = vec![0u8; KEY_LEN];
                aws_lc_rs::rand::fill(&mut bytes).map_err(|_| AuthError::Random)?;
                create_private_dir(state_dir)?;
                write_new_file(&path, &bytes, 0o600)?;
                info!(path = %path.display(), "generated a new token key");
                bytes
            }
        };
        if bytes.len() != KEY_LEN {
            return Err(AuthError::BadKeyFile { path, len: bytes.len() });
        }
        Ok(Tokens { key: hmac::Key::new(hmac::HMAC_SHA256, &bytes) })
    }

    /// Whether `token` is meant as a controller token (it may still not verify): how a
    /// controller that also accepts Kubernetes service-account tokens tells them apart.
    pub fn claims(token: &str) -> bool {
        token.starts_with(NODE_PREFIX) || token.starts_with(SERVICE_ACCOUNT_PREFIX)
    }

    /// A token for `caller`. Give a node's to that node's proxy only: whoever holds it may
    /// obtain the certificates of every workload scheduled on the node. A service account's
    /// obtains that service account's identity while it serves a waypoint.
    pub fn issue(&self, caller: &Caller) -> String {
        let signed = signed_part(caller);
        let mac = hmac::sign(&self.key, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()))
    }

    /// Who a token was issued for, if this controller's key issued it. The signature is
    /// compared in constant time.
    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        if token.len() > MAX_TOKEN {
            return Err(AuthError::Malformed("too long"));
        }
        let (node_token, rest) = match (token.strip_prefix(NODE_PREFIX), token.strip_prefix(SERVICE_ACCOUNT_PREFIX)) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => return Err(AuthError::Malformed("it starts with neither \"weftnode.\" nor \"weftsa.\"")),
        };
        let (version, rest) = rest.split_once('.').ok_or(AuthError::Malformed("no version"))?;
        if version != VERSION {
            return Err(AuthError::UnknownVersion(version.chars().take(16).collect()));
        }
        let (subject, mac) = rest.rsplit_once('.').ok_or(AuthError::Malformed("no signature"))?;
        let caller = if node_token {
            Caller::Node(NodeName::new(subject)?)
        } else {
            let (namespace, name) =
                subject.split_once('.').ok_or(AuthError::Malformed("no service account name after the namespace"))?;
            Caller::ServiceAccount(ServiceAccount::new(namespace, name)?)
        };
        let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| AuthError::Malformed("the signature is not base64url"))?;
        hmac::verify(&self.key, signed_part(&caller).as_bytes(), &mac)
            .map_err(|_| AuthError::BadSignature { caller: caller.clone() })?;
        Ok(caller)
    }
}

impl Authenticator for Tokens {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(std::future::ready(self.verify(token)))
    }
}

/// `weftnode.v1.<node>` or `weftsa.v1.<namespace>.<name>`: what the MAC covers, and the
/// token up to its last dot.
fn signed_part(caller: &Caller) -> String {
    match caller {
        Caller::Node(node) => format!("{NODE_PREFIX}{VERSION}.{node}"),
        Caller::ServiceAccount(account) => {
            format!("{SERVICE_ACCOUNT_PREFIX}{VERSION}.{}.{}", account.namespace, account.name)
        }
    }
}

/// RFC 1123 subdomain: dot-separated labels, 253 characters at most.
fn check_subdomain(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > MAX_SUBDOMAIN {
        return Err("it is longer than 253 characters");
    }
    name.split('.').try_for_each(check_label)
}

/// A namespace: one RFC 1123 label (no dots).
fn check_namespace(namespace: &str) -> Result<(), &'static str> {
    match namespace {
        "" => Err("the namespace is empty"),
        ns if ns.contains('.') => Err("the namespace has a dot (a namespace is a DNS label)"),
        ns => check_label(ns).map_err(|_| {
            "the namespace must be 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        }),
    }
}

/// RFC 1123 label: lowercase letters, digits and '-', 1 to 63 characters, starting and ending
/// with a letter or digit.
fn check_label(label: &str) -> Result<(), &'static str> {
    let bytes = label.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) if first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric() => {}
        _ => return Err("each dot-separated part must start and end with a letter or digit"),
    }
    if label.len() > MAX_LABEL {
        return Err("a dot-separated part is longer than 63 characters");
    }
    if !bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-') {
        return Err("only lowercase letters, digits, '-' and '.' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::ca::tests::TempDir;

    fn node(name: &str) -> Caller {
        Caller::Node(NodeName::new(name).unwrap())
    }

    fn account(namespace: &str, name: &str) -> Caller {
        Caller::ServiceAccount(ServiceAccount::new(namespace, name).unwrap())
    }

    #[tokio::test]
    async fn a_token_authenticates_its_node() {
        let dir = TempDir::new("token-good");
        let tokens = Tokens::open(&dir.0).unwrap();
        let token = tokens.issue(&node("worker-1.lab"));
        assert!(token.starts_with("weftnode.v1.worker-1.lab."), "{token}");
        assert_eq!(token.rsplit('.').next().unwrap().len(), 43, "base64url of 32 bytes, no padding");
        assert_eq!(tokens.verify(&token).unwrap(), node("worker-1.lab"));
        let auth: &dyn Authenticator = &tokens;
        assert_eq!(auth.authenticate(&token).await.unwrap().subscriber(), Subscriber::Node("worker-1.lab".into()));
    }

    #[tokio::test]
    async fn a_token_authenticates_its_service_account() {
        let dir = TempDir::new("token-sa");
        let tokens = Tokens::open(&dir.0).unwrap();
        let token = tokens.issue(&account("shop", "wp.v2"));
        let (signed, mac) = token.rsplit_once('.').unwrap();
        assert_eq!(signed, "weftsa.v1.shop.wp.v2", "the name may hold dots: the signature follows the last");
        // The MAC is exactly the documented one, computed here from the key file.
        let key = hmac::Key::new(hmac::HMAC_SHA256, &fs::read(dir.path(KEY_FILE)).unwrap());
        let expected = URL_SAFE_NO_PAD.encode(hmac::sign(&key, b"weftsa.v1.shop.wp.v2").as_ref());
        assert_eq!(mac, expected);
        let caller = tokens.verify(&token).unwrap();
        assert_eq!(caller, account("shop", "wp.v2"));
        assert_eq!(caller.to_string(), "service account shop/wp.v2");
        assert!(!caller.is_node());
        let auth: &dyn Authenticator = &tokens;
        assert_eq!(
            auth.authenticate(&token).await.unwrap().subscriber(),
            Subscriber::ServiceAccount { namespace: "shop".into(), name: "wp.v2".into() }
        );
        assert!(Tokens::claims(&token) && Tokens::claims("weftnode.v1.n1.x") && !Tokens::claims("eyJhbGciOi"));
    }

    #[test]
    fn the_key_is_persisted_private_and_never_regenerated() {
        let dir = TempDir::new("token-key");
        let token = Tokens::open(&dir.0).unwrap().issue(&node("n1"));
        let path = dir.path(KEY_FILE);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Tokens::open(&dir.0).unwrap().verify(&token).unwrap(), node("n1"), "same key after restart");

        fs::write(&path, b"short").unwrap();
        let err = Tokens::open(&dir.0).err().unwrap();
        assert!(matches!(err, AuthError::BadKeyFile { len: 5, .. }), "{err}");
        assert!(!err.is_unauthenticated());
        assert_eq!(fs::read(&path).unwrap(), b"short", "left as found");
    }

    #[test]
    fn a_tampered_token_is_refused() {
        let dir = TempDir::new("token-tamper");
        let tokens = Tokens::open(&dir.0).unwrap();
        for (caller, subject) in [(node("n1"), "node n1"), (account("shop", "wp"), "service account shop/wp")] {
            let mut bytes = tokens.issue(&caller).into_bytes();
            let last = bytes.len() - 2;
            bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
            let err = tokens.verify(std::str::from_utf8(&bytes).unwrap()).unwrap_err();
            assert!(matches!(err, AuthError::BadSignature { caller: ref c } if *c == caller), "{err}");
            assert!(err.to_string().starts_with(&format!("token for {subject} has an invalid signature")), "{err}");
            assert!(err.is_unauthenticated());
        }
    }

    #[test]
    fn another_name_on_a_valid_token_is_refused() {
        let dir = TempDir::new("token-swap");
        let tokens = Tokens::open(&dir.0).unwrap();
        let token = tokens.issue(&node("node-a"));
        let swapped = token.replacen("node-a", "node-b", 1);
        assert_ne!(swapped, token);
        let err = tokens.verify(&swapped).unwrap_err();
        assert!(matches!(err, AuthError::BadSignature { ref caller } if *caller == node("node-b")), "{err}");
        // Nor can a dot move the boundary between name and signature.
        let (signed, mac) = token.rsplit_once('.').unwrap();
        let err = tokens.verify(&format!("{signed}.x.{mac}")).unwrap_err();
        assert!(matches!(err, AuthError::BadSignature { .. }), "{err}");

        let waypoint = tokens.issue(&account("shop", "wp"));
        for forged in [
            waypoint.replacen("shop", "bank", 1),
            waypoint.replacen(".wp.", ".api.", 1),
            // The same letters, the boundary between namespace and name moved.
            waypoint.replacen("shop.wp", "sho.pwp", 1),
        ] {
            let err = tokens.verify(&forged).unwrap_err();
            assert!(matches!(err, AuthError::BadSignature { .. }), "{forged}: {err}");
        }
    }

    #[test]
    fn a_node_token_does_not_pass_for_a_service_account_or_back() {
        let dir = TempDir::new("token-kinds");
        let tokens = Tokens::open(&dir.0).unwrap();
        // A node named like a namespace and service account: the same subject text, another
        // kind. The prefixes are signed, so neither MAC fits the other.
        let as_node = tokens.issue(&node("shop.wp"));
        let as_account = tokens.issue(&account("shop", "wp"));
        let node_mac = as_node.rsplit_once('.').unwrap().1;
        let account_mac = as_account.rsplit_once('.').unwrap().1;
        assert_ne!(node_mac, account_mac);
        let err = tokens.verify(&format!("weftsa.v1.shop.wp.{node_mac}")).unwrap_err();
        assert!(matches!(err, AuthError::BadSignature { ref caller } if *caller == account("shop", "wp")), "{err}");
        let err = tokens.verify(&format!("weftnode.v1.shop.wp.{account_mac}")).unwrap_err();
        assert!(matches!(err, AuthError::BadSignature { ref caller } if *caller == node("shop.wp")), "{err}");
    }

    #[test]
    fn a_token_of_another_key_is_refused() {
        let (a, b) = (TempDir::new("token-key-a"), TempDir::new("token-key-b"));
        let key_a = Tokens::open(&a.0).unwrap();
        let key_b = Tokens::open(&b.0).unwrap();
        for caller in [node("n1"), account("shop", "wp")] {
            let err = key_b.verify(&key_a.issue(&caller)).unwrap_err();
            assert!(matches!(err, AuthError::BadSignature { .. }), "{err}");
        }
    }

    /// Whether an error is the one expected.
    type Check = fn(&AuthError) -> bool;

    #[test]
    fn malformed_tokens_say_why() {
        let dir = TempDir::new("token-malformed");
        let tokens = Tokens::open(&dir.0).unwrap();
        let good = tokens.issue(&node("n1"));
        let mac = good.rsplit('.').next().unwrap();
        fn invalid_account(e: &AuthError, what: &str) -> bool {
            matches!(e, AuthError::InvalidServiceAccount { why, .. } if why.contains(what))
        }
        let cases: [(&str, Check); 15] = [
            ("", |e| matches!(e, AuthError::Malformed(_))),
            ("Bearer x", |e| matches!(e, AuthError::Malformed(_))),
            ("weftnode.v1", |e| matches!(e, AuthError::Malformed(_))),
            ("weftnode.v1.n1", |e| matches!(e, AuthError::Malformed(_))),
            ("weftnode.v1..AAAA", |e| matches!(e, AuthError::InvalidNodeName { .. })),
            ("weftnode.v1.n1.!!!", |e| matches!(e, AuthError::Malformed(_))),
            ("weftnode.v2.n1.AAAA", |e| matches!(e, AuthError::UnknownVersion(v) if v == "v2")),
            ("weftnode.v1.N1.AAAA", |e| matches!(e, AuthError::InvalidNodeName { .. })),
            (
                "weftsa.v1.shop.AAAA",
                |e| matches!(e, AuthError::Malformed(why) if why.contains("no service account name")),
            ),
            ("weftsa.v2.shop.wp.AAAA", |e| matches!(e, AuthError::UnknownVersion(v) if v == "v2")),
            ("weftsa.v1.Shop.wp.AAAA", |e| invalid_account(e, "namespace")),
            ("weftsa.v1..wp.AAAA", |e| invalid_account(e, "namespace is empty")),
            ("weftsa.v1.shop.-wp.AAAA", |e| invalid_account(e, "start and end")),
            ("weftsa.v1.shop.wp..AAAA", |e| invalid_account(e, "start and end")),
            ("weftsa.v1.shop.wp.!!!", |e| matches!(e, AuthError::Malformed(why) if why.contains("base64url"))),
        ];
        for (token, want) in cases {
            let err = tokens.verify(token).unwrap_err();
            assert!(want(&err), "{token:?}: {err}");
            assert!(err.is_unauthenticated(), "{token:?}");
        }
        let long = format!("weftnode.v1.{}.{mac}", "a".repeat(600));
        assert!(matches!(tokens.verify(&long), Err(AuthError::Malformed("too long"))));
        // The longest service account there is fits.
        let longest =
            account(&"n".repeat(63), &vec!["a".repeat(63); 4].join(".").chars().take(253).collect::<String>());
        assert_eq!(tokens.verify(&tokens.issue(&longest)).unwrap(), longest);
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

    #[test]
    fn service_accounts_follow_kubernetes() {
        for (ok, namespace, name) in
            [("shop/wp", "shop", "wp"), ("weft-system/ztunnel", "weft-system", "ztunnel"), ("a/b.c", "a", "b.c")]
        {
            let account = ServiceAccount::parse(ok).unwrap();
            assert_eq!((account.namespace(), account.name(), account.to_string()), (namespace, name, ok.to_owned()));
        }
        let id = ServiceAccount::parse("shop/wp").unwrap().identity("cluster.local").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/shop/sa/wp");
        let long_namespace = format!("{}/wp", "n".repeat(64));
        for bad in ["shop", "/wp", "shop/", "shop.eu/wp", "Shop/wp", "shop/Wp", "shop/w_p", "a/b/c", &long_namespace] {
            let err = ServiceAccount::parse(bad).unwrap_err();
            assert!(matches!(err, AuthError::InvalidServiceAccount { .. }), "{bad}: {err}");
        }
    }
}
