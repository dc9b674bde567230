//! The node socket: the container runtime's side (the CNI plugin on a Kubernetes node, the lab
//! in tests) hands each new pod's network namespace to ztunnel here *before* the pod's
//! containers start, and waits for the answer, so the pod's first connection is already
//! captured. If ztunnel cannot be reached, or cannot capture a pod that belongs to the mesh,
//! the runtime does not start the pod (fail closed).
//!
//! One request per connection on a Unix stream socket, one JSON line each way
//! ([`meshapi::node`]; `docs/PROTOCOL.md`, "The node socket"). The socket is created mode
//! 0600: only root (the runtime) may hand pods over.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meshapi::node::{MAX_REQUEST, NodeRequest, NodeResponse};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::manager::Manager;

/// How long a client may take to send its request line: 5 s (the runtime writes it at once).
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("cannot serve the node socket at {path}: {error}")]
pub struct SocketError {
    path: PathBuf,
    error: std::io::Error,
}

/// Binds the node socket at `path` (replacing a stale one left by a previous ztunnel).
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |error| SocketError { path: path.to_owned(), error };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => debug!(path = %path.display(), "removed a stale node socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves requests until the task is aborted; `wait` bounds how long an ADD waits for the
/// controller to report the pod.
pub async fn serve(listener: UnixListener, manager: Arc<Manager>, wait: Duration) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let manager = manager.clone();
                tokio::spawn(async move { handle(stream, &manager, wait).await });
            }
            Err(e) => {
                warn!(error = %e, "node socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(stream: UnixStream, manager: &Manager, wait: Duration) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
    let response = match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => NodeResponse { ok: false, message: format!("no request within {READ_TIMEOUT:?}") },
        Ok(Err(e)) => NodeResponse { ok: false, message: format!("reading the request: {e}") },
        Ok(Ok(_)) if !line.ends_with('\n') => {
            NodeResponse { ok: false, message: format!("the request must be one line of at most {MAX_REQUEST} bytes") }
        }
        Ok(Ok(_)) => match serde_json::from_str::<NodeRequest>(line.trim_end()) {
            Err(e) => NodeResponse { ok: false, message: format!("the request is not valid: {e}") },
            Ok(request) => {
                let what = format!("{request:?}");
                let response = manager.runtime_request(request, wait).await;
                info!(request = %what, ok = response.ok, answer = %response.message, "node socket request");
                response
            }
        },
    };
    let mut out = serde_json::to_string(&response).unwrap_or_default();
    out.push('\n');
    if let Err(e) = write.write_all(out.as_bytes()).await {
        debug!(error = %e, "node socket client went away before the answer");
    }
}
