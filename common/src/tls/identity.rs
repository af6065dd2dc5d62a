//! The node's certificate and key, swappable at run time: renewal is one
//! [`ReloadableIdentity::set`], with no restart and no new configs.

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::SignatureScheme;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::TlsError;
use crate::pki::{self, NodeIdentity};

/// This node's certificate and key, swappable while connections are served.
///
/// Clones share the same slot, so the copy handed to a server or client
/// config sees every later [`set`](Self::set).
#[derive(Clone)]
pub struct ReloadableIdentity {
    inner: Arc<RwLock<Arc<CertifiedKey>>>,
}

impl ReloadableIdentity {
    /// Loads a certificate chain (leaf first) and its private key.
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        Ok(ReloadableIdentity {
            inner: Arc::new(RwLock::new(Arc::new(certified_key(cert_pem, key_pem)?))),
        })
    }

    /// Replaces certificate and key; new handshakes use them, established
    /// connections keep theirs. On error the old identity stays in place.
    pub fn set(&self, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let key = Arc::new(certified_key(cert_pem, key_pem)?);
        *self.inner.write().unwrap_or_else(PoisonError::into_inner) = key;
        Ok(())
    }

    /// The certificate and key in use now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Who the current certificate says this node is (e.g. to decide when to
    /// renew, or whether the role changed).
    pub fn identity(&self) -> Result<NodeIdentity, pki::PkiError> {
        let key = self.current();
        let leaf = key.cert.first().ok_or(pki::PkiError::NoPemCertificate)?;
        pki::identity_from_der(leaf)
    }
}

impl fmt::Debug for ReloadableIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self
            .identity()
            .map(|id| format!("{} ({})", id.node_id, id.role))
            .unwrap_or_else(|_| "<not a node certificate>".to_owned());
        f.debug_struct("ReloadableIdentity")
            .field("certificate", &shown)
            .finish()
    }
}

impl rustls::server::ResolvesServerCert for ReloadableIdentity {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Always offers the certificate: servers only trust the cluster CA anyway,
/// and an unsolicited certificate is harmless.
impl rustls::client::ResolvesClientCert for ReloadableIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError::Key(e.to_string()))?;
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider()).map_err(|e| {
        match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch,
            other => TlsError::Key(other.to_string()),
        }
    })
}
