//! What can go wrong setting up TLS or reaching a peer, in words a user can
//! act on.

use std::io;
use std::time::Duration;

use rustls::CertificateError;

/// What can go wrong setting up TLS or reaching a peer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate found in the PEM (expected a -----BEGIN CERTIFICATE----- block)")]
    NoCertificate,
    #[error("invalid certificate PEM: {0}")]
    Certificate(String),
    #[error("invalid private key PEM (expected a -----BEGIN PRIVATE KEY----- block): {0}")]
    Key(String),
    #[error(
        "the private key does not belong to the certificate (were the key and certificate of different nodes mixed up?)"
    )]
    KeyMismatch,
    #[error("invalid cluster CA certificate: {0}")]
    CaCertificate(String),
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
    #[error("invalid address {addr:?}: expected IP:PORT or HOST:PORT")]
    InvalidAddress { addr: String },
    #[error("invalid TLS server name {0:?}")]
    InvalidServerName(String),
    #[error("cannot reach {peer} at {addr}: {}", describe_io(.cause))]
    Unreachable {
        peer: String,
        addr: String,
        cause: io::Error,
    },
    #[error("timed out after {after:?} connecting to {peer} at {addr}")]
    Timeout {
        peer: String,
        addr: String,
        after: Duration,
    },
    #[error("TLS handshake with {peer} at {addr} failed: {}", describe_tls(.cause))]
    Handshake {
        peer: String,
        addr: String,
        cause: io::Error,
    },
    #[error("cannot open a gRPC connection to {peer} at {addr}: {}", chain(.cause))]
    Transport {
        peer: String,
        addr: String,
        cause: tonic::transport::Error,
    },
}

/// An error with its causes ("transport error" alone says nothing).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

/// Short, lowercase reasons for the usual connect failures.
fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused (is mesh running there?)".into(),
        io::ErrorKind::TimedOut => "connection timed out".into(),
        io::ErrorKind::HostUnreachable => "host unreachable".into(),
        io::ErrorKind::NetworkUnreachable => "network unreachable".into(),
        _ => e.to_string(),
    }
}

/// Adds what to do about the certificate errors a user can cause.
fn describe_tls(e: &io::Error) -> String {
    let hint = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            " (its certificate is not from this cluster's CA: wrong address, or a node of another cluster?)"
        }
        Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForName))
        | Some(rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            ..
        })) => " (it is not a manager of this cluster)",
        Some(rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => " (its certificate has expired: check both clocks)",
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        )) => " (its certificate is not valid yet: check both clocks)",
        _ => "",
    };
    format!("{e}{hint}")
}
