//! Kubernetes credentials: a proxy presents its projected service-account token and the API
//! server says whose it is (a `TokenReview`). ztunnel's is a node's credential: the pod the
//! token is bound to says which node the ztunnel runs on. Any other service account's is that
//! service account's credential (a waypoint's), with none of a node's rights.
//!
//! ```text
//!  ztunnel ── Bearer <token> ──► controller ── TokenReview {token, audiences: [weft-controller]} ──► API server
//!                                           ◄── authenticated, audiences, user:
//!                                                 username  system:serviceaccount:weft-system:ztunnel
//!                                                 extra     authentication.kubernetes.io/node-name: [node-1]
//!                                                           authentication.kubernetes.io/pod-name:  [ztunnel-x7k2p]
//!                                                           authentication.kubernetes.io/pod-uid:   [...]
//! ```
//!
//! A token is accepted when the API server authenticates it **for the audience
//! `weft-controller`** (ztunnel's DaemonSet and waypoints mount a token with that audience, so
//! a token stolen from another workload or meant for another service is refused, and ours is
//! useless elsewhere) and it is a **service account's** (`system:serviceaccount:<ns>:<name>`;
//! a user's or a node's is refused). Then:
//!
//! - **ztunnel's service account** (`weft-system/ztunnel`): the token must be **bound to a
//!   pod**, and the caller is that pod's node: the binding's `node-name` (set for bound tokens
//!   since Kubernetes 1.30); on older API servers, the `spec.nodeName` of the pod named by
//!   `pod-name` (checked against `pod-uid`, so a pod recreated under the same name elsewhere
//!   is not mistaken for it).
//! - **any other service account**: the caller is that service account. What it may do is
//!   decided per request (its own identity, while it serves a waypoint: `crate::server`).
//!
//! Positive answers are cached for [`CACHE_TTL`] (60 s) by the token's SHA-256: a proxy
//! authenticates every watch, acknowledgement and certificate request, and a call to the API
//! server for each would put the cluster's busiest dependency on the mesh's hot path. A
//! minute bounds how long a revoked token (its pod deleted) keeps working, as kubelet's own
//! caches do. Refusals are not cached: a ztunnel whose token was just fixed gets in at once.
//!
//! [`KubernetesAuth`] takes both kinds of credential in a cluster: controller tokens
//! (`weftnode.v1...`, `weftsa.v1...`, for VMs joined to it) and service-account tokens.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, PostParams};

use crate::auth::{AuthError, AuthFuture, Authenticator, Caller, NodeName, ServiceAccount, Tokens};

/// The audience proxies' projected tokens are minted for.
pub const AUDIENCE: &str = "weft-controller";
/// ztunnel's namespace and service account.
pub const ZTUNNEL_NAMESPACE: &str = "weft-system";
pub const ZTUNNEL_SERVICE_ACCOUNT: &str = "ztunnel";
/// How long a positive review is trusted (see the module docs).
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// How long a proxy's request waits for the API server's answer: 5 s. The client retries
/// an API server that answers 429 or 503 for minutes; a proxy would rather be told to
/// come back (it retries with backoff) than hold its request open meanwhile.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// The node the pod a bound token belongs to is scheduled on (Kubernetes ≥ 1.30).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The pod a bound token belongs to, and its uid.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Tokens held in the cache at most: several per node and per waypoint (tokens rotate) in
/// the largest clusters. Past it, expired entries go, then all: a bound that costs a few reviews.
const MAX_CACHED: usize = 16_384;

/// A service-account token is a JWT of one or two KiB; anything much longer is not one and
/// is refused before it is sent anywhere.
const MAX_TOKEN: usize = 16 * 1024;

/// What a service-account username starts with, before `<namespace>:<name>`.
const SERVICE_ACCOUNT_USER: &str = "system:serviceaccount:";

/// Checks proxies' service-account tokens with the API server's TokenReview.
pub struct TokenReviewer {
    reviews: Api<TokenReview>,
    /// Pods of ztunnel's namespace: the node of a token bound to one, on API servers older
    /// than 1.30.
    pods: Api<Pod>,
    /// ztunnel's: `system:serviceaccount:weft-system:ztunnel`.
    ztunnel: String,
    ttl: Duration,
    timeout: Duration,
    /// By the token's SHA-256: the token itself is never kept.
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

struct Cached {
    caller: Caller,
    until: Instant,
}

/// The credentials a controller in a Kubernetes cluster accepts: controller tokens (which it
/// issues) and proxies' service-account tokens.
pub struct KubernetesAuth {
    pub tokens: Tokens,
    pub reviewer: TokenReviewer,
}

impl TokenReviewer {
    /// Reviews with `client`; ztunnel's service account is `weft-system/ztunnel`.
    pub fn new(client: Client) -> TokenReviewer {
        TokenReviewer {
            reviews: Api::all(client.clone()),
            pods: Api::namespaced(client, ZTUNNEL_NAMESPACE),
            ztunnel: format!("{SERVICE_ACCOUNT_USER}{ZTUNNEL_NAMESPACE}:{ZTUNNEL_SERVICE_ACCOUNT}"),
            ttl: CACHE_TTL,
            timeout: REVIEW_TIMEOUT,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// How long a positive review is trusted ([`CACHE_TTL`] by default; zero: never).
    pub fn with_cache_ttl(mut self, ttl: Duration) -> TokenReviewer {
        self.ttl = ttl;
        self
    }

    /// How long a review may take ([`REVIEW_TIMEOUT`] by default).
    pub fn with_timeout(mut self, timeout: Duration) -> TokenReviewer {
        self.timeout = timeout;
        self
    }

    /// Who holds `token`: the node whose ztunnel it is, or another service account.
    pub async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        match tokio::time::timeout(self.timeout, self.review_now(token)).await {
            Ok(result) => result,
            Err(_) => Err(AuthError::Review(format!("no answer within {:?}", self.timeout))),
        }
    }

    async fn review_now(&self, token: &str) -> Result<Caller, AuthError> {
        if token.is_empty() || token.len() > MAX_TOKEN {
            return Err(AuthError::TokenRefused("it is empty or too long to be a service-account token".into()));
        }
        let key = fingerprint(token);
        if let Some(caller) = self.cached(&key) {
            return Ok(caller);
        }
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![AUDIENCE.to_owned()]) },
            ..TokenReview::default()
        };
        let answer = self.reviews.create(&PostParams::default(), &review).await.map_err(review_error)?;
        let status =
            answer.status.ok_or_else(|| AuthError::Review("the TokenReview came back without a status".into()))?;
        let caller = self.caller_of(status).await?;
        self.remember(key, &caller);
        Ok(caller)
    }

    /// Checks a review's answer and finds the caller.
    async fn caller_of(&self, status: TokenReviewStatus) -> Result<Caller, AuthError> {
        if status.authenticated != Some(true) {
            let why = status.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".into());
            return Err(AuthError::TokenRefused(why));
        }
        // An API server that ignores `spec.audiences` would confirm a token minted for
        // anything; Kubernetes asks reviewers to check the audience came back.
        if !status.audiences.as_ref().is_some_and(|a| a.iter().any(|a| a == AUDIENCE)) {
            return Err(AuthError::TokenRefused(format!(
                "the API server did not confirm the audience {AUDIENCE}: mount the proxy's token \
                 with `audience: {AUDIENCE}`"
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.ztunnel {
            let account = username.strip_prefix(SERVICE_ACCOUNT_USER).and_then(|rest| rest.split_once(':'));
            return match account {
                Some((namespace, name)) => Ok(Caller::ServiceAccount(ServiceAccount::new(namespace, name)?)),
                None => Err(AuthError::NotServiceAccount { username }),
            };
        }
        self.node_of(user.extra.unwrap_or_default()).await.map(Caller::Node)
    }

    /// The node of a ztunnel's token, from the review's extras.
    async fn node_of(&self, extra: std::collections::BTreeMap<String, Vec<String>>) -> Result<NodeName, AuthError> {
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).filter(|v| !v.is_empty()).cloned();
        if let Some(node) = first(NODE_NAME_EXTRA) {
            return NodeName::new(&node);
        }
        let Some(pod_name) = first(POD_NAME_EXTRA) else {
            return Err(AuthError::TokenRefused(
                "it is not bound to a pod: ztunnel must present its projected service-account token".into(),
            ));
        };
        let pod = match self.pods.get(&pod_name).await {
            Ok(pod) => pod,
            Err(kube::Error::Api(status)) if status.is_not_found() => {
                return Err(AuthError::TokenRefused(format!(
                    "the pod it is bound to, {ZTUNNEL_NAMESPACE}/{pod_name}, no longer exists"
                )));
            }
            Err(e) => return Err(review_error(e)),
        };
        if let Some(uid) = first(POD_UID_EXTRA)
            && pod.metadata.uid.as_deref() != Some(uid.as_str())
        {
            return Err(AuthError::TokenRefused(format!(
                "the pod it is bound to, {ZTUNNEL_NAMESPACE}/{pod_name}, was replaced by another of the same name"
            )));
        }
        match pod.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty()) {
            Some(node) => NodeName::new(&node),
            None => Err(AuthError::TokenRefused(format!(
                "the pod it is bound to, {ZTUNNEL_NAMESPACE}/{pod_name}, is not scheduled on a node"
            ))),
        }
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Caller> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(key).filter(|c| c.until > Instant::now()).map(|c| c.caller.clone())
    }

    fn remember(&self, key: [u8; 32], caller: &Caller) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, c| c.until > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, Cached { caller: caller.clone(), until: now + self.ttl });
    }
}

impl Authenticator for TokenReviewer {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(self.review(token))
    }
}

/// A controller token (`weftnode.`..., `weftsa.`...) is checked here and never sent to the
/// API server; anything else goes to the TokenReview.
impl Authenticator for KubernetesAuth {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        if Tokens::claims(token) { self.tokens.authenticate(token) } else { self.reviewer.authenticate(token) }
    }
}

fn fingerprint(token: &str) -> [u8; 32] {
    let mut key = [0u8; 32];
    key.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
    key
}

/// The API server could not answer (as opposed to refusing the token).
fn review_error(error: kube::Error) -> AuthError {
    match error {
        kube::Error::Api(status) => AuthError::Review(format!("{} ({})", status.message, status.code)),
        other => AuthError::Review(other.to_string()),
    }
}
