//! TLS with rustls (ring provider): what the node and the client trust when they dial
//! `wss://` and `https://` (the public web roots, plus a CA of one's own from a PEM file),
//! what the relay and the node serve with (a certificate chain and its key, PEM), and a
//! failed handshake said in one sentence.
//!
//! Below the transports and the relay server, like `net.rs`: both sides use it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{CertificateError, ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite;
use tracing::debug;

/// How long a client has to finish a TLS handshake (counted from its TCP connection):
/// one that stalls is closed, so it cannot hold a connection slot.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes a TLS listener runs at once, in all and per client IP: past them a new
/// connection is closed at once.
const MAX_HANDSHAKES: usize = 1024;
const MAX_HANDSHAKES_PER_IP: usize = 32;
/// Finished handshakes waiting for the server to take them.
const READY_QUEUE: usize = 64;

/// Why a certificate, key or CA file cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{path}: not valid PEM: {reason}")]
    BadPem { path: PathBuf, reason: String },
    #[error("{path}: not a usable CA certificate: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("{cert} with {key}: {reason}")]
    BadPair {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    /// The crypto provider refused the default protocol versions (not expected with
    /// ring, which has them all).
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// One crypto provider, named, so that nothing depends on a process-wide default.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file, in order (a chain: the server's own first).
pub(crate) fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_owned(),
        },
        e => TlsError::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
        },
    })
}

/// What a client trusts: the public web roots (webpki-roots, compiled in), plus every
/// certificate of `extra_ca` (a private CA, or a self-signed relay's own certificate).
pub(crate) fn client_config(extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_ca {
        for cert in certificates(path)? {
            roots.add(cert).map_err(|e| TlsError::BadCa {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The extra CA's certificates for reqwest (which builds its own rustls config).
pub(crate) fn reqwest_roots(
    extra_ca: Option<&Path>,
) -> Result<Vec<reqwest::Certificate>, TlsError> {
    let Some(path) = extra_ca else {
        return Ok(Vec::new());
    };
    certificates(path)?
        .iter()
        .map(|der| {
            reqwest::Certificate::from_der(der).map_err(|e| TlsError::BadCa {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// What a server presents: the chain in `cert` (its own certificate first) and the key
/// in `key`, which must match. HTTP/1.1 only, as the node and the relay speak.
pub(crate) fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(cert)?;
    let secret = private_key(key)?;
    let pair = |e: rustls::Error| TlsError::BadPair {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason: e.to_string(),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, secret)
        .map_err(pair)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A WebSocket over `ws://` or `wss://`.
pub(crate) type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket to `url`; `wss://` trusts what `tls` trusts.
pub(crate) async fn dial(
    url: &str,
    config: Option<tungstenite::protocol::WebSocketConfig>,
    tls: Arc<ClientConfig>,
) -> Result<WsStream, tungstenite::Error> {
    let connector = tokio_tungstenite::Connector::Rustls(tls);
    let (socket, _) =
        tokio_tungstenite::connect_async_tls_with_config(url, config, true, Some(connector))
            .await?;
    Ok(socket)
}

/// A failed TLS handshake somewhere in `err`'s chain, as one sentence for a person
/// (`TLS: the certificate is not trusted (…)`); `None` when TLS is not what failed.
/// Also the likely reason a `ws://` dial got an answer that is not HTTP: a TLS port.
pub(crate) fn failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    use tungstenite::error::ProtocolError;
    if let Some(tungstenite::Error::Protocol(ProtocolError::HttparseError(_))) =
        err.downcast_ref::<tungstenite::Error>()
    {
        return Some("the answer is not HTTP (a TLS port? then use wss://)".to_owned());
    }
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(format!("TLS: {}", sentence(tls)));
        }
        // An io::Error's `source()` skips the error it wraps: look inside it too.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return Some(format!("TLS: {}", sentence(inner)));
        }
        next = e.source();
    }
    None
}

/// The hint for a certificate the client does not trust.
const GIVE_THE_CA: &str = "give its CA with --relay-ca FILE";

fn sentence(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => {
                format!("the certificate is not trusted (unknown issuer); {GIVE_THE_CA}")
            }
            CertificateError::NotValidForNameContext {
                expected,
                presented,
            } => {
                let names: Vec<&str> = presented.iter().map(|n| plain_name(n)).collect();
                format!(
                    "the certificate is for another name (it is for {}, not {})",
                    names.join(", "),
                    expected.to_str()
                )
            }
            CertificateError::NotValidForName => "the certificate is for another name".into(),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the certificate is not valid yet (is the clock right?)".into()
            }
            CertificateError::Revoked => "the certificate was revoked".into(),
            CertificateError::BadSignature => "the certificate's signature is bad".into(),
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "the certificate is not one for a server".into()
            }
            // webpki's reason, which rustls passes on opaquely: a CA certificate (e.g.
            // openssl's `req -x509` default) presented as the server's own.
            CertificateError::Other(other)
                if format!("{other:?}").contains("CaUsedAsEndEntity") =>
            {
                "the certificate is a CA's, not a server's (make it with basicConstraints \
                 CA:FALSE, or sign a server certificate with it)"
                    .into()
            }
            other => format!("the certificate is not acceptable ({other:?})"),
        },
        E::InvalidMessage(_) => {
            "the server does not speak TLS there (a ws:// or http:// port?)".into()
        }
        E::AlertReceived(alert) => format!("the server refused the handshake ({alert:?})"),
        E::PeerIncompatible(_) => "no TLS version or cipher suite in common".into(),
        E::NoCertificatesPresented => "the server presented no certificate".into(),
        other => other.to_string(),
    }
}

/// `other.example` of webpki's `DnsName("other.example")`, `10.0.0.1` of
/// `IpAddress(10.0.0.1)`; anything else as it is.
fn plain_name(presented: &str) -> &str {
    presented
        .strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| {
            presented
                .strip_prefix("IpAddress(")
                .and_then(|n| n.strip_suffix(')'))
        })
        .unwrap_or(presented)
}

/// A listener whose connections come out with their TLS handshake done. Handshakes run
/// side by side in a task of its own, each bounded by [`HANDSHAKE_TIMEOUT`], because
/// `axum::serve` takes one connection at a time and a client that stalls in its
/// handshake must hold up no one. Dropping it stops the task and its handshakes.
pub(crate) struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub(crate) fn new(listener: TcpListener, config: Arc<ServerConfig>) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        let task = tokio::spawn(handshakes(listener, TlsAcceptor::from(config), tx));
        Ok(TlsListener {
            ready,
            local_addr,
            task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The handshake task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

/// Accepts TCP connections and runs their handshakes until the listener is dropped.
async fn handshakes(
    mut listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let per_ip = crate::net::IpCounts::default();
    let mut running = JoinSet::new();
    loop {
        let (mut tcp, addr) = tokio::select! {
            conn = axum::serve::Listener::accept(&mut listener) => conn,
            Some(_) = running.join_next(), if !running.is_empty() => continue,
            _ = ready.closed() => return,
        };
        let (Ok(slot), Some(ip_slot)) = (
            slots.clone().try_acquire_owned(),
            per_ip.take(addr.ip(), MAX_HANDSHAKES_PER_IP),
        ) else {
            debug!(%addr, "too many TLS handshakes at once; connection closed");
            continue;
        };
        crate::net::no_delay(&mut tcp);
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        running.spawn(async move {
            let _slots = (slot, ip_slot);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send((tls, addr)).await;
                }
                Ok(Err(e)) => debug!(%addr, error = %e, "TLS handshake failed"),
                Err(_) => debug!(%addr, "TLS handshake not finished in time; closed"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_errors_read_as_sentences() {
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert_eq!(
            sentence(&unknown),
            "the certificate is not trusted (unknown issuer); give its CA with --relay-ca FILE"
        );
        let name = rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected: rustls::pki_types::ServerName::try_from("127.0.0.1")
                .unwrap()
                .to_owned(),
            presented: vec!["DnsName(\"other.example\")".into()],
        });
        assert_eq!(
            sentence(&name),
            "the certificate is for another name (it is for other.example, not 127.0.0.1)"
        );
        assert_eq!(plain_name("IpAddress(10.0.0.1)"), "10.0.0.1");
        assert_eq!(plain_name("DirectoryName"), "DirectoryName");
        // Wrapped as tokio-rustls wraps it, the sentence is still found.
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown);
        let ws = tungstenite::Error::Io(io);
        assert!(failure(&ws)
            .unwrap()
            .starts_with("TLS: the certificate is not trusted"));
        assert_eq!(failure(&std::io::Error::other("refused")), None);
    }

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = client_config(Some(&missing)).unwrap_err();
        assert!(e
            .to_string()
            .starts_with(&format!("cannot read {}", missing.display())));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem\n").unwrap();
        let e = client_config(Some(&empty)).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        let e = server_config(&empty, &empty).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
    }
}
