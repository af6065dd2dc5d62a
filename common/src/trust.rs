//! Which servers a member accepts as managers. The CA and the
//! `mesh-manager` name only say a certificate was signed for a manager once;
//! a member also needs it to be the current manager with the key the
//! cluster recorded, or a demoted or removed manager that kept its
//! certificate could pose as one (and push views and tasks to workers).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::pki::{self, NodeIdentity};
use crate::tls::{ReloadableIdentity, TlsError, provider, roots};

/// Decides whether a server that shows a manager certificate is a current
/// manager: the CA and the `mesh-manager` name are checked before, this
/// checks the certificate against the cluster state (its key, its node).
pub trait ManagerCheck: Send + Sync + fmt::Debug {
    fn check_manager(&self, id: &NodeIdentity) -> Result<(), String>;
}

/// The managers a node accepts, by node ID and key fingerprint, as the
/// cluster last told it (join reply, then every heartbeat reply). Clones
/// share one set.
#[derive(Clone, Debug, Default)]
pub struct TrustedManagers {
    inner: Arc<RwLock<BTreeMap<String, String>>>,
}

impl TrustedManagers {
    pub fn new(managers: BTreeMap<String, String>) -> Self {
        TrustedManagers {
            inner: Arc::new(RwLock::new(managers)),
        }
    }

    /// Replaces the set; true if it changed (the caller then saves it).
    pub fn set(&self, managers: BTreeMap<String, String>) -> bool {
        let mut cur = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if *cur == managers {
            return false;
        }
        *cur = managers;
        true
    }

    /// The fingerprint recorded for a manager, if it is one.
    pub fn key_of(&self, node_id: &str) -> Option<String> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node_id)
            .cloned()
    }
}

impl ManagerCheck for TrustedManagers {
    fn check_manager(&self, id: &NodeIdentity) -> Result<(), String> {
        match self.key_of(&id.node_id) {
            Some(fp) if fp == id.key_fingerprint => Ok(()),
            Some(_) => Err(format!(
                "manager {} shows a certificate for another key than the cluster recorded",
                id.node_id
            )),
            None => Err(format!(
                "node {} is not a current manager of this cluster",
                id.node_id
            )),
        }
    }
}

/// Checks a server's chain against the CA and its name as usual, then asks
/// a [`ManagerCheck`] whether it is a current manager.
#[derive(Debug)]
struct CurrentManagerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check: Arc<dyn ManagerCheck>,
}

impl ServerCertVerifier for CurrentManagerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let id = pki::identity_from_der(end_entity)
            .map_err(|e| rustls::Error::General(format!("not a node certificate: {e}")))?;
        if id.role != pki::Role::Manager {
            return Err(rustls::Error::General(format!(
                "node {} is not a manager",
                id.node_id
            )));
        }
        self.check
            .check_manager(&id)
            .map_err(rustls::Error::General)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side for members: like [`client_config`], and the server must
/// also pass `check` (a current manager, with the key the cluster recorded).
pub fn member_client_config(
    ca_pem: &str,
    id: ReloadableIdentity,
    check: Arc<dyn ManagerCheck>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots(ca_pem)?,
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier = Arc::new(CurrentManagerVerifier { inner, check });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(id));
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
