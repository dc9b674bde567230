//! On Kubernetes, the CA kept in a Secret (`--ca-secret`, `weft-ca` in the manifests), so that
//! every replica signs with the same root, and it outlives any pod:
//!
//! - **A Secret made by the operator** (a plug-in root or intermediate: keys `ca.crt`, `ca.key`
//!   and, for an intermediate, `ca-chain.crt` up to the root) is used as it is. An optional
//!   key `extra-roots.pem` adds roots to the trust bundle (`--extra-roots`: the incoming or
//!   outgoing root of a rotation).
//! - **No Secret**: the first replica to start generates a root and creates the Secret with it;
//!   a replica that loses that race (`409`) reads the winner's. Nothing is ever overwritten.
//!
//! The Secret's keys are written into `<state dir>/ca/` (the key with mode 0600) and the
//! authority reads them from there as plugged-in files ([`crate::ca::RootSource::Files`]).
//! Every `--ca-secret-refresh` (30 s) the Secret is read again and the files rewritten if it changed (a
//! rotation by the operator): the authority takes the new CA up at its next reload. The
//! nodes' copy of the root, the ConfigMap `weft-ca-root` beside the Secret (ztunnel's
//! `--controller-ca`; it never mounts the Secret that holds the key), is applied by the
//! leader whenever the trust bundle changes ([`RootPublisher`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use hbone::ca::Ca;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::deploy::{BACKOFF_MAX, BACKOFF_MIN, CA_ROOT_CONFIG_MAP, CA_ROOT_KEY, FIELD_MANAGER, RESYNC, backoff};
use crate::leader::Leading;

/// The Secret's keys.
pub const CERT_KEY: &str = "ca.crt";
pub const KEY_KEY: &str = "ca.key";
pub const CHAIN_KEY: &str = "ca-chain.crt";
pub const EXTRA_ROOTS_KEY: &str = "extra-roots.pem";

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the Secret's keys are written, and what the authority reads.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Written only when the Secret has a chain.
    pub chain: PathBuf,
    /// The Secret's extra roots; empty when it has none.
    pub extra_roots: PathBuf,
}

impl CaFiles {
    pub fn in_dir(state_dir: &Path) -> CaFiles {
        let dir = state_dir.join("ca");
        CaFiles {
            cert: dir.join(CERT_KEY),
            key: dir.join(KEY_KEY),
            chain: dir.join(CHAIN_KEY),
            extra_roots: dir.join(EXTRA_ROOTS_KEY),
        }
    }

    /// The chain file, if the Secret had one.
    pub fn chain(&self) -> Option<PathBuf> {
        self.chain.exists().then(|| self.chain.clone())
    }
}

/// Reads the Secret `namespace/name`, creating it with a new root for `trust_domain` if there
/// is none, and writes its keys to `files`. Returns whether this replica created it.
pub async fn materialize(
    client: &Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    files: &CaFiles,
) -> anyhow::Result<bool> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let what = format!("the CA Secret {namespace}/{name}");
    let found = request(api.get_opt(name)).await.with_context(|| format!("reading {what}"))?;
    let (secret, created) = match found {
        Some(secret) => (secret, false),
        None => {
            let ca = Ca::new_root(&format!("weft root CA for {trust_domain}")).context("generating a root CA")?;
            let (cert, key) = ca.to_pem();
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_owned(),
                        "weft-controller".to_owned(),
                    )])),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".to_owned()),
                data: Some(BTreeMap::from([
                    (CERT_KEY.to_owned(), ByteString(cert.into_bytes())),
                    (KEY_KEY.to_owned(), ByteString(key.into_bytes())),
                ])),
                ..Secret::default()
            };
            match request(api.create(&PostParams::default(), &secret)).await {
                Ok(created) => {
                    info!(secret = %format!("{namespace}/{name}"), trust_domain, "generated a new root CA and kept it in the Secret");
                    (created, true)
                }
                Err(e) if conflict(&e) => {
                    // Another replica created it first: sign with its root.
                    let winner = request(api.get(name)).await.with_context(|| format!("reading {what}"))?;
                    (winner, false)
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {what} (does the controller's Role allow it?)"));
                }
            }
        }
    };
    write_files(&secret, files).with_context(|| format!("using {what}"))?;
    Ok(created)
}

/// Reads the Secret every `every` and rewrites the files when it changed; stops when
/// dropped.
pub struct Refresher(JoinHandle<()>);

impl Refresher {
    pub fn start(client: Client, namespace: String, name: String, files: CaFiles, every: Duration) -> Refresher {
        Refresher(tokio::spawn(async move {
            let api: Api<Secret> = Api::namespaced(client, &namespace);
            loop {
                tokio::time::sleep(every).await;
                match request(api.get(&name)).await {
                    Ok(secret) => match write_files(&secret, &files) {
                        Ok(true) => {
                            info!(secret = %format!("{namespace}/{name}"), "the CA Secret changed: taking it up")
                        }
                        Ok(false) => {}
                        Err(e) => warn!(secret = %format!("{namespace}/{name}"), error = %format!("{e:#}"),
                                        "the CA Secret changed but cannot be used; keeping the current CA"),
                    },
                    Err(e) => {
                        debug!(secret = %format!("{namespace}/{name}"), error = %e, "cannot read the CA Secret; retrying")
                    }
                }
            }
        }))
    }
}

impl Drop for Refresher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes the Secret's keys to `files` (each atomically, by rename); true when a file changed.
fn write_files(secret: &Secret, files: &CaFiles) -> anyhow::Result<bool> {
    let data = secret.data.clone().unwrap_or_default();
    let value = |key: &str| data.get(key).map(|b| b.0.clone());
    let cert = value(CERT_KEY).with_context(|| format!("it has no key {CERT_KEY}"))?;
    let key = value(KEY_KEY).with_context(|| format!("it has no key {KEY_KEY}"))?;
    let dir = files.cert.parent().context("the CA directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", dir.display()))?;
    // The key first: the authority reads a changed pair only once both match.
    let mut changed = replace(&files.key, &key, 0o600)?;
    changed |= replace(&files.cert, &cert, 0o644)?;
    changed |= replace(&files.extra_roots, &value(EXTRA_ROOTS_KEY).unwrap_or_default(), 0o644)?;
    match value(CHAIN_KEY) {
        Some(chain) => changed |= replace(&files.chain, &chain, 0o644)?,
        None => {
            if files.chain.exists() {
                std::fs::remove_file(&files.chain).with_context(|| format!("removing {}", files.chain.display()))?;
                changed = true;
            }
        }
    }
    Ok(changed)
}

/// Writes `bytes` to `path` unless it holds them already; true when it wrote.
fn replace(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<bool> {
    if std::fs::read(path).ok().as_deref() == Some(bytes) {
        return Ok(false);
    }
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temporary)
        .with_context(|| format!("writing {}", temporary.display()))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("renaming {} into place", temporary.display()))?;
    Ok(true)
}

/// Applies the ConfigMap `weft-ca-root` (key `root-cert.pem`: the trust bundle) in the
/// controller's namespace while this replica leads: at once, whenever the bundle changes, and
/// every 5 minutes. Stops when dropped.
pub struct RootPublisher {
    roots: watch::Sender<String>,
    task: JoinHandle<()>,
}

impl RootPublisher {
    pub fn start(client: Client, namespace: String, mut leading: Leading) -> RootPublisher {
        let (roots, mut current) = watch::channel(String::new());
        let task = tokio::spawn(async move {
            let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
            let mut leader = leading.now();
            let mut applied: Option<String> = None;
            let mut failures = 0u32;
            loop {
                let roots = current.borrow_and_update().clone();
                let mut wait = RESYNC;
                if leader && !roots.is_empty() && applied.as_ref() != Some(&roots) {
                    match apply(&api, &namespace, &roots).await {
                        Ok(()) => {
                            info!(config_map = %format!("{namespace}/{CA_ROOT_CONFIG_MAP}"), "the nodes' copy of the trust bundle applied");
                            applied = Some(roots);
                            failures = 0;
                        }
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            wait = backoff(failures, BACKOFF_MIN, BACKOFF_MAX);
                            warn!(config_map = %format!("{namespace}/{CA_ROOT_CONFIG_MAP}"), error = %e, retry_in = ?wait,
                                  "cannot apply the nodes' copy of the trust bundle; ztunnels cannot start without it");
                        }
                    }
                }
                tokio::select! {
                    changed = current.changed() => if changed.is_err() { return },
                    now = leading.changed() => {
                        leader = now;
                        applied = None;
                    }
                    () = tokio::time::sleep(wait) => applied = None,
                }
            }
        });
        RootPublisher { roots, task }
    }

    /// The trust bundle's roots, PEM, concatenated.
    pub fn publish(&self, roots: String) {
        self.roots.send_if_modified(|current| {
            let changed = *current != roots;
            *current = roots;
            changed
        });
    }
}

impl Drop for RootPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn apply(api: &Api<ConfigMap>, namespace: &str, roots: &str) -> anyhow::Result<()> {
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CA_ROOT_CONFIG_MAP.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".to_owned(), "weft-controller".to_owned())])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(CA_ROOT_KEY.to_owned(), roots.to_owned())])),
        ..ConfigMap::default()
    };
    let params = PatchParams::apply(FIELD_MANAGER).force();
    request(api.patch(CA_ROOT_CONFIG_MAP, &params, &Patch::Apply(&config_map))).await?;
    Ok(())
}

/// `future` within [`REQUEST_TIMEOUT`].
async fn request<T>(future: impl Future<Output = kube::Result<T>>) -> kube::Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, future).await {
        Ok(result) => result,
        Err(_) => Err(kube::Error::Service(format!("no answer within {REQUEST_TIMEOUT:?}").into())),
    }
}

fn conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}
