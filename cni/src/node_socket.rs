//! The client side of the node socket (`docs/PROTOCOL.md`, "The node socket"): one request
//! per connection, one JSON line each way, the whole exchange bounded by one deadline.
//!
//! The exchange runs on a thread of its own and the caller waits for it at most `timeout`:
//! a Unix `connect` has no timeout of its own and blocks while a stuck ztunnel's backlog is
//! full, so bounding the reads and writes alone would not bound the call. On a timeout the
//! thread is left behind; the plugin exits right after.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use meshapi::node::{NodeRequest, NodeResponse};

/// Why ztunnel gave no answer; `is_unreachable()` and `is_denied()` classify the causes.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot connect to ztunnel's node socket {}: {error}{}", socket.display(), connect_hint(error))]
    Connect { socket: PathBuf, error: std::io::Error },
    #[error("the request on ztunnel's node socket {} failed: {error} (is ztunnel restarting?)", socket.display())]
    Exchange { socket: PathBuf, error: std::io::Error },
    #[error("ztunnel gave no answer on {} within {after:?}", socket.display())]
    Timeout { socket: PathBuf, after: Duration },
    #[error("ztunnel's answer on {} is not a node socket response ({error}): {answer:?}", socket.display())]
    Answer { socket: PathBuf, answer: String, error: serde_json::Error },
}

impl CallError {
    /// ztunnel is not there or did not answer: it may be starting or restarting, and the
    /// same call is likely to work later.
    pub fn is_unreachable(&self) -> bool {
        match self {
            CallError::Connect { error, .. } => !is_denied(error),
            CallError::Exchange { .. } | CallError::Timeout { .. } => true,
            CallError::Answer { .. } => false,
        }
    }

    /// The socket exists and refused this process (it is root-only).
    pub fn is_denied(&self) -> bool {
        matches!(self, CallError::Connect { error, .. } if is_denied(error))
    }
}

/// Sends `request` to the ztunnel listening at `socket` and returns its answer, waiting at
/// most `timeout` for the whole exchange.
pub fn call(socket: &Path, request: &NodeRequest, timeout: Duration) -> Result<NodeResponse, CallError> {
    let (tx, rx) = mpsc::channel();
    let (path, request) = (socket.to_owned(), request.clone());
    std::thread::spawn(move || {
        // The receiver is gone only after a timeout, when nobody needs the result.
        let _ = tx.send(exchange(&path, &request, timeout));
    });
    match rx.recv_timeout(timeout) {
        Ok(result) => result,
        Err(_) => Err(CallError::Timeout { socket: socket.to_owned(), after: timeout }),
    }
}

/// Whether something accepts connections on `socket` within `timeout` (what CHECK verifies:
/// the protocol has no query, so the pod's own state cannot be asked for).
pub fn probe(socket: &Path, timeout: Duration) -> Result<(), CallError> {
    let (tx, rx) = mpsc::channel();
    let path = socket.to_owned();
    std::thread::spawn(move || {
        let result = UnixStream::connect(&path).map(drop).map_err(|error| CallError::Connect { socket: path, error });
        let _ = tx.send(result);
    });
    match rx.recv_timeout(timeout) {
        Ok(result) => result,
        Err(_) => Err(CallError::Timeout { socket: socket.to_owned(), after: timeout }),
    }
}

fn exchange(socket: &Path, request: &NodeRequest, timeout: Duration) -> Result<NodeResponse, CallError> {
    let mut stream =
        UnixStream::connect(socket).map_err(|error| CallError::Connect { socket: socket.to_owned(), error })?;
    let failed = |error| CallError::Exchange { socket: socket.to_owned(), error };
    // Also bound the thread's own reads and writes, so it does not outlive the plugin's wait
    // by much where the plugin is used as a library.
    stream.set_read_timeout(Some(timeout)).map_err(failed)?;
    stream.set_write_timeout(Some(timeout)).map_err(failed)?;
    // Serializing a request of strings and addresses cannot fail.
    let mut line = serde_json::to_string(request).unwrap_or_default();
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(failed)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(failed)?;
    if answer.is_empty() {
        return Err(failed(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the connection closed without an answer",
        )));
    }
    serde_json::from_str(answer.trim_end()).map_err(|error| CallError::Answer {
        socket: socket.to_owned(),
        answer: answer.trim_end().to_owned(),
        error,
    })
}

fn is_denied(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::PermissionDenied
}

fn connect_hint(error: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::NotFound => {
            " (is ztunnel running on this node, and is the plugin's nodeSocket the path of ztunnel's --node-socket?)"
        }
        ErrorKind::ConnectionRefused => " (nothing listens there: ztunnel is not running, or is restarting)",
        ErrorKind::PermissionDenied => " (the socket is root-only: the container runtime must run the plugin as root)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_classified() {
        let connect = |kind| CallError::Connect { socket: "/s".into(), error: std::io::Error::from(kind) };
        assert!(connect(std::io::ErrorKind::NotFound).is_unreachable());
        assert!(connect(std::io::ErrorKind::ConnectionRefused).is_unreachable());
        assert!(connect(std::io::ErrorKind::PermissionDenied).is_denied());
        assert!(!connect(std::io::ErrorKind::PermissionDenied).is_unreachable());
        assert!(CallError::Timeout { socket: "/s".into(), after: Duration::from_secs(1) }.is_unreachable());
        let message = connect(std::io::ErrorKind::NotFound).to_string();
        assert!(message.contains("/s") && message.contains("is ztunnel running"), "{message}");
    }

    #[test]
    fn a_missing_socket_is_reported_at_once() {
        let socket = Path::new("/nonexistent-weft-cni-test/ztunnel.sock");
        let request = NodeRequest::Del(meshapi::node::PodRef {
            namespace: "shop".into(),
            name: "web-0".into(),
            netns: String::new(),
            ips: vec![],
        });
        let started = std::time::Instant::now();
        let error = call(socket, &request, Duration::from_secs(30)).unwrap_err();
        assert!(error.is_unreachable(), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(probe(socket, Duration::from_secs(30)).unwrap_err().is_unreachable());
    }
}
