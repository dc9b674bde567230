//! The connection to the controller: one HTTP/2 connection over TLS, opened on first use and
//! again after it fails, carrying the watch stream, acknowledgements and certificate requests
//! (`docs/PROTOCOL.md`). Every request carries the subscriber's credential: a node's (ztunnel)
//! or a service account's (a waypoint, which reuses this client).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshapi::certificate::{CERTIFICATES_PATH, CertificateRequest, CertificateResponse, ErrorBody};
use meshapi::watch::{ACK_PATH, Ack, Cursor, Subscriber, WATCH_PATH};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Connecting (TCP and TLS) to the controller gives up after 5 s: a controller that does not
/// answer in that time is down or unreachable, and the caller backs off and retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Unary calls (acknowledgements, certificates) give up after 10 s.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest watch message accepted: 256 MiB. A snapshot of 10,000 pods and 1,000 services
/// is about 4 MiB; the bound only stops a broken peer from growing the buffer forever.
const MAX_LINE: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot connect to the controller at {addr}: {error}; is it running, and is port 15012 reachable from this node?"
    )]
    Connect { addr: String, error: std::io::Error },
    #[error("cannot read the controller credential {path}: {error}")]
    Credential { path: PathBuf, error: String },
    #[error(
        "TLS with the controller at {addr} failed: {error}; does --controller-ca hold the root that signed its certificate, and does --controller-name match it?"
    )]
    Tls { addr: String, error: std::io::Error },
    #[error("HTTP/2 with the controller failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the controller did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the controller refused {path}: {status} {reason}: {error}")]
    Refused { path: &'static str, status: StatusCode, reason: String, error: String },
    #[error("the controller's answer to {path} is not valid: {error}")]
    Invalid { path: &'static str, error: String },
    #[error("a watch message is longer than {MAX_LINE} bytes")]
    LineTooLong,
}

impl ControlError {
    /// Whether the controller answered but refused (retrying the same call will not help
    /// until something changes).
    pub fn is_refusal(&self) -> bool {
        matches!(self, ControlError::Refused { .. })
    }

    /// The refusal's stable reason (`docs/PROTOCOL.md`), if the controller refused.
    pub fn reason(&self) -> Option<&str> {
        match self {
            ControlError::Refused { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// Where the controller is and how to prove who we are.
#[derive(Clone)]
pub struct Endpoint {
    /// A DNS name or an IP address (resolved again at each connection).
    pub host: String,
    pub port: u16,
    /// The name its certificate must carry (a DNS name or the IP address).
    pub server_name: ServerName<'static>,
    /// Roots its certificate may chain to (`--controller-ca`). The mesh's trust bundle is
    /// added as it arrives ([`Client::trust_also`]), so a controller that rotated to a new
    /// root is still trusted on the next connection.
    pub roots: Vec<CertificateDer<'static>>,
    /// The file holding the bearer token, read again for each request (a projected
    /// service-account token rotates).
    pub token_file: PathBuf,
    /// Who the watch and acknowledgements are for: the node (ztunnel) or the service account
    /// (a waypoint) the token belongs to.
    pub subscriber: Subscriber,
}

pub struct Client {
    endpoint: Endpoint,
    /// The bearer token as last read from the endpoint's file.
    token: std::sync::RwLock<String>,
    /// TLS for the next connection: the endpoint's roots and the mesh's trust bundle.
    tls: std::sync::RwLock<Arc<rustls::ClientConfig>>,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl Client {
    /// A client; fails if the token file cannot be read now.
    pub fn new(endpoint: Endpoint) -> Result<Client, ControlError> {
        let tls = tls_config(&endpoint.roots, &[]);
        let token = read_token(&endpoint.token_file)?;
        Ok(Client {
            endpoint,
            token: std::sync::RwLock::new(token),
            tls: std::sync::RwLock::new(tls),
            conn: tokio::sync::Mutex::new(None),
        })
    }

    /// Also trusts `roots` (the mesh's current trust bundle) for connections opened from now
    /// on; the endpoint's own roots stay trusted.
    pub fn trust_also(&self, roots: &[CertificateDer<'static>]) {
        let tls = tls_config(&self.endpoint.roots, roots);
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = tls;
    }

    pub fn subscriber(&self) -> &Subscriber {
        &self.endpoint.subscriber
    }

    /// The open connection, or a new one.
    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, ControlError> {
        let mut conn = self.conn.lock().await;
        if let Some(s) = conn.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let addr = format!("{}:{}", bracket(&self.endpoint.host), self.endpoint.port);
        let connect = async {
            let tcp = TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port))
                .await
                .map_err(|error| ControlError::Connect { addr: addr.clone(), error })?;
            let _ = tcp.set_nodelay(true);
            let tls = self.tls.read().unwrap_or_else(|p| p.into_inner()).clone();
            TlsConnector::from(tls)
                .connect(self.endpoint.server_name.clone(), tcp)
                .await
                .map_err(|error| ControlError::Tls { addr: addr.clone(), error })
        };
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| ControlError::Timeout(CONNECT_TIMEOUT))??;
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        // Pings keep the watch stream honest across silent network failures.
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let (sender, connection) = builder.handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "controller connection ended");
            }
        });
        *conn = Some(sender.clone());
        Ok(sender)
    }

    fn request(&self, method: Method, path_and_query: &str, body: Bytes) -> Result<Request<Full<Bytes>>, ControlError> {
        let uri = format!("https://{}:{}{}", bracket(&self.endpoint.host), self.endpoint.port, path_and_query);
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri.parse().unwrap_or_default();
        // Read for every request: a projected token rotates while one connection lasts for
        // days, and the controller checks each request. A failed read keeps the last token.
        let token = match read_token(&self.endpoint.token_file) {
            Ok(token) => {
                *self.token.write().unwrap_or_else(|p| p.into_inner()) = token.clone();
                token
            }
            Err(e) => {
                tracing::warn!(error = %e, "keeping the controller credential read before");
                self.token.read().unwrap_or_else(|p| p.into_inner()).clone()
            }
        };
        let value =
            header::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| ControlError::Credential {
                path: self.endpoint.token_file.clone(),
                error: "the token holds characters an HTTP header cannot carry".into(),
            })?;
        req.headers_mut().insert(header::AUTHORIZATION, value);
        req.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
        Ok(req)
    }

    /// Sends `req` and returns the response if it is a success; a refusal becomes
    /// [`ControlError::Refused`] with the controller's reason.
    async fn send(
        &self,
        path: &'static str,
        req: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<Incoming>, ControlError> {
        let mut sender = self.sender().await?;
        let resp = sender.send_request(req).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = tokio::time::timeout(CALL_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| ControlError::Timeout(CALL_TIMEOUT))??
            .to_bytes();
        let (reason, error) = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => (e.reason, e.error),
            Err(_) => ("unknown".to_owned(), String::from_utf8_lossy(&body).into_owned()),
        };
        Err(ControlError::Refused { path, status, reason, error })
    }

    /// Subscribes for this subscriber, resuming after `since` when given.
    pub async fn watch(&self, since: Option<&Cursor>) -> Result<Lines, ControlError> {
        let req = self.request(Method::GET, &watch_path(&self.endpoint.subscriber, since), Bytes::new())?;
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.send("watch", req))
            .await
            .map_err(|_| ControlError::Timeout(CALL_TIMEOUT))??;
        Ok(Lines { body: resp.into_body(), buf: BytesMut::new(), searched: 0 })
    }

    /// Reports what this subscriber applied.
    pub async fn ack(&self, ack: &Ack) -> Result<(), ControlError> {
        let body = serde_json::to_vec(ack).unwrap_or_default();
        let req = self.request(Method::POST, ACK_PATH, Bytes::from(body))?;
        tokio::time::timeout(CALL_TIMEOUT, self.send("ack", req))
            .await
            .map_err(|_| ControlError::Timeout(CALL_TIMEOUT))??;
        Ok(())
    }

    /// Asks for a certificate for the CSR's identity.
    pub async fn certificate(&self, request: &CertificateRequest) -> Result<CertificateResponse, ControlError> {
        let body = serde_json::to_vec(request).unwrap_or_default();
        let req = self.request(Method::POST, CERTIFICATES_PATH, Bytes::from(body))?;
        let call = async {
            let resp = self.send("certificates", req).await?;
            let body = resp.into_body().collect().await?.to_bytes();
            serde_json::from_slice::<CertificateResponse>(&body)
                .map_err(|e| ControlError::Invalid { path: "certificates", error: e.to_string() })
        };
        tokio::time::timeout(CALL_TIMEOUT, call).await.map_err(|_| ControlError::Timeout(CALL_TIMEOUT))?
    }
}

/// `/v1/watch?node=<node>` or `?serviceAccount=<namespace>/<name>`, with the cursor to resume
/// from when one was ever set.
fn watch_path(subscriber: &Subscriber, since: Option<&Cursor>) -> String {
    let mut path = format!("{WATCH_PATH}?{}", subscriber.query());
    if let Some(c) = since.filter(|c| c.is_set()) {
        path.push_str(&format!("&epoch={}&since={}", c.epoch, c.version));
    }
    path
}

/// Splits `host:port` (IPv6 in brackets: `[fd00::1]:15012`).
pub fn split_host_port(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// An IPv6 address in brackets, anything else as it is.
fn bracket(host: &str) -> String {
    if host.contains(':') { format!("[{host}]") } else { host.to_owned() }
}

fn read_token(path: &std::path::Path) -> Result<String, ControlError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ControlError::Credential { path: path.to_owned(), error: e.to_string() })?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(ControlError::Credential { path: path.to_owned(), error: "the file is empty".into() });
    }
    Ok(token)
}

/// TLS 1.3 verifying the controller's certificate by name against `roots` and `more`, ALPN
/// `h2`. Roots that cannot be used are skipped (the others still verify).
fn tls_config(roots: &[CertificateDer<'static>], more: &[CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    let (_added, _skipped) = store.add_parsable_certificates(roots.iter().chain(more).cloned());
    let mut tls = rustls::ClientConfig::builder_with_provider(hbone::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        // The provider is built with TLS 1.3 suites; this cannot fail.
        .expect("TLS 1.3 is supported by the aws-lc-rs provider")
        .with_root_certificates(store)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(tls)
}

/// The watch stream's lines.
pub struct Lines {
    body: Incoming,
    buf: BytesMut,
    /// How much of `buf` is known to hold no newline: a multi-megabyte snapshot arrives in
    /// many frames, and searching it from the start after each would be quadratic.
    searched: usize,
}

impl Lines {
    /// The next line (without its newline), or `None` when the stream ended.
    pub async fn next(&mut self) -> Result<Option<String>, ControlError> {
        loop {
            if let Some(i) = self.buf[self.searched..].iter().position(|b| *b == b'\n').map(|i| i + self.searched) {
                let line = self.buf.split_to(i + 1);
                self.searched = 0;
                let text = String::from_utf8_lossy(&line[..i]).into_owned();
                return Ok(Some(text));
            }
            self.searched = self.buf.len();
            if self.buf.len() > MAX_LINE {
                return Err(ControlError::LineTooLong);
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.buf.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port() {
        assert_eq!(split_host_port("10.0.0.5:15012"), Some(("10.0.0.5".into(), 15012)));
        assert_eq!(
            split_host_port("weft-controller.weft-system.svc:15012"),
            Some(("weft-controller.weft-system.svc".into(), 15012))
        );
        assert_eq!(split_host_port("[fd00::5]:15012"), Some(("fd00::5".into(), 15012)));
        assert_eq!(split_host_port("fd00::5:15012"), None, "IPv6 needs brackets");
        assert_eq!(split_host_port("host"), None);
        assert_eq!(split_host_port(":15012"), None);
        assert_eq!(bracket("fd00::5"), "[fd00::5]");
    }

    #[test]
    fn the_watch_names_the_subscriber() {
        let node = Subscriber::Node("node-1".into());
        let cursor = Cursor { epoch: "e1".into(), version: 7 };
        assert_eq!(watch_path(&node, None), "/v1/watch?node=node-1");
        assert_eq!(watch_path(&node, Some(&cursor)), "/v1/watch?node=node-1&epoch=e1&since=7");
        assert_eq!(watch_path(&node, Some(&Cursor::default())), "/v1/watch?node=node-1", "never synced");
        let waypoint = Subscriber::ServiceAccount { namespace: "shop".into(), name: "wp".into() };
        assert_eq!(watch_path(&waypoint, Some(&cursor)), "/v1/watch?serviceAccount=shop/wp&epoch=e1&since=7");
    }
}
