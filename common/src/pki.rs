//! The cluster CA and node certificates.
//!
//! `mesh init` makes a self-signed root CA whose certificate and key are
//! replicated through Raft, so any manager can sign. A node makes its own key
//! and sends only a CSR; the CA ignores what the CSR asks for and writes the
//! identity itself: CN = node ID, OU = `mesh-manager` / `mesh-worker` (the
//! role), O = cluster ID. Handlers read that back with [`identity_from_der`].
//!
//! Just over 600 lines because its inline tests are a third of it; the
//! logic is one concept (certificates of this cluster).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    string::Ia5String,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Common name of the cluster root CA.
pub const CA_COMMON_NAME: &str = "mesh-root-ca";
/// How long the root CA is valid: rotating it is out of scope, so make it long.
pub const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 60 * 60);
/// Node certificates start a minute in the past to absorb small clock skew.
const BACKDATE: Duration = Duration::from_secs(60);

/// What can go wrong making or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("unknown role {0:?}: expected \"manager\" or \"worker\"")]
    UnknownRole(String),
    #[error("cannot generate a key pair: {0}")]
    KeyGeneration(rcgen::Error),
    #[error("the node key is not a valid PEM private key (is certs/node.key damaged?): {0}")]
    Key(rcgen::Error),
    #[error("the cluster CA key is not a valid PEM private key: {0}")]
    CaKey(rcgen::Error),
    #[error("the cluster CA certificate is not a valid PEM certificate: {0}")]
    CaCert(String),
    #[error(
        "the cluster CA key does not belong to the CA certificate (is the cluster state corrupt?)"
    )]
    CaKeyMismatch,
    #[error("invalid certificate signing request (send a PEM CSR made by this mesh version): {0}")]
    Csr(rcgen::Error),
    #[error("cannot use {0:?} in a certificate: {1}")]
    Name(String, rcgen::Error),
    #[error("cannot sign a node certificate with an empty {0}")]
    EmptyName(&'static str),
    #[error("certificate validity of {0:?} is too long")]
    Validity(Duration),
    #[error("cannot sign the certificate: {0}")]
    Sign(rcgen::Error),
    #[error("no PEM certificate found (expected a -----BEGIN CERTIFICATE----- block)")]
    NoPemCertificate,
    #[error("not a valid X.509 certificate: {0}")]
    Parse(String),
    #[error("not a mesh node certificate: {0}")]
    NotNodeCertificate(String),
}

/// What a node may do: managers run Raft and the control API, workers only
/// run workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Manager,
    Worker,
}

impl Role {
    /// `"manager"` or `"worker"`, as shown to users and sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
        }
    }

    /// The organizational unit and DNS SAN that carry the role in a node
    /// certificate: `mesh-manager` or `mesh-worker`.
    pub fn cert_name(self) -> &'static str {
        match self {
            Role::Manager => "mesh-manager",
            Role::Worker => "mesh-worker",
        }
    }

    fn from_cert_name(s: &str) -> Option<Self> {
        [Role::Manager, Role::Worker]
            .into_iter()
            .find(|r| r.cert_name() == s)
    }
}

/// The certificate's role and the state's role are the same two words.
impl From<Role> for crate::model::NodeRole {
    fn from(r: Role) -> Self {
        match r {
            Role::Manager => crate::model::NodeRole::Manager,
            Role::Worker => crate::model::NodeRole::Worker,
        }
    }
}

impl From<crate::model::NodeRole> for Role {
    fn from(r: crate::model::NodeRole) -> Self {
        match r {
            crate::model::NodeRole::Manager => Role::Manager,
            crate::model::NodeRole::Worker => Role::Worker,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "manager" => Ok(Role::Manager),
            "worker" => Ok(Role::Worker),
            other => Err(PkiError::UnknownRole(other.to_owned())),
        }
    }
}

/// The cluster root CA, as stored in the replicated cluster state.
#[derive(Clone, PartialEq, Eq)]
pub struct CertAuthority {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Hides the key: the CA may end up in debug logs with the cluster state.
impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAuthority")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl CertAuthority {
    /// A new self-signed root CA (ECDSA P-256, CN `mesh-root-ca`, O = cluster
    /// ID, valid 20 years) that may sign node certificates only.
    pub fn generate(cluster_id: &str) -> Result<Self, PkiError> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, CA_COMMON_NAME);
        params
            .distinguished_name
            .push(DnType::OrganizationName, cluster_id);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key).map_err(PkiError::Sign)?;
        Ok(CertAuthority {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The CA certificate in DER (what join tokens pin).
    pub fn cert_der(&self) -> Result<Vec<u8>, PkiError> {
        pem_to_der(&self.cert_pem)
    }

    /// Signs a node certificate for the key in `csr_pem`.
    ///
    /// Only the CSR's public key is used (its signature is checked so the
    /// requester holds the key); subject and extensions come from the
    /// arguments, so a node cannot ask for another ID or role.
    pub fn sign_node(
        &self,
        csr_pem: &str,
        node_id: &str,
        role: Role,
        cluster_id: &str,
        validity: Duration,
    ) -> Result<String, PkiError> {
        for (what, value) in [("node ID", node_id), ("cluster ID", cluster_id)] {
            if value.is_empty() {
                return Err(PkiError::EmptyName(what));
            }
        }
        let issuer = self.issuer()?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::Csr)?;

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, node_id);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role.cert_name());
        params
            .distinguished_name
            .push(DnType::OrganizationName, cluster_id);
        params.subject_alt_names = vec![dns_name(role.cert_name())?, dns_name(node_id)?];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let validity_t =
            time::Duration::try_from(validity).map_err(|_| PkiError::Validity(validity))?;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now
            .checked_add(validity_t)
            .ok_or(PkiError::Validity(validity))?;

        let cert = params
            .signed_by(&csr.public_key, &issuer)
            .map_err(PkiError::Sign)?;
        Ok(cert.pem())
    }

    /// Loads the replicated CA back into something that can sign, checking
    /// that key and certificate belong together.
    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(PkiError::CaKey)?;
        let der = pem_to_der(&self.cert_pem)
            .map_err(|_| PkiError::CaCert("no -----BEGIN CERTIFICATE----- block".into()))?;
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| PkiError::CaCert(e.to_string()))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::CaKeyMismatch);
        }
        Issuer::from_ca_cert_der(&CertificateDer::from(der), key)
            .map_err(|e| PkiError::CaCert(e.to_string()))
    }
}

/// The node's own key (PKCS#8 PEM) and a CSR for it. The key never leaves the
/// node; only the CSR is sent to a manager.
pub fn new_key_and_csr() -> Result<(String, String), PkiError> {
    let key = new_key()?;
    let csr_pem = csr_for(&key)?;
    Ok((key.serialize_pem(), csr_pem))
}

/// A CSR for the node's existing key. Renewals keep the key: the cluster
/// pins each node to its public key (see [`NodeIdentity::key_fingerprint`]),
/// so a manager that missed a renewal still recognises the node.
pub fn csr_for_key(key_pem: &str) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(PkiError::Key)?;
    csr_for(&key)
}

fn csr_for(key: &KeyPair) -> Result<String, PkiError> {
    let mut params = CertificateParams::default();
    // The CA overwrites the subject; this only makes the CSR readable.
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "mesh-node");
    let csr = params.serialize_request(key).map_err(PkiError::Sign)?;
    csr.pem().map_err(PkiError::Sign)
}

/// Who a node certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node_id: String,
    pub role: Role,
    pub cluster_id: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo, hex: what the
    /// cluster state records for each node and every peer checks, so that a
    /// certificate for that node ID with any other key is refused.
    pub key_fingerprint: String,
    /// The certificate's serial number, hex (shown, and recorded per node).
    pub serial: String,
}

/// Reads node ID (CN), role (OU) and cluster ID (O) from a DER node
/// certificate. Does not check the signature: use it on certificates a TLS
/// handshake has already verified, or on the node's own certificate.
pub fn identity_from_der(cert_der: &[u8]) -> Result<NodeIdentity, PkiError> {
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let subject = cert.subject();
    let node_id = single_attr(subject.iter_common_name(), "common name (node ID)")?;
    let unit = single_attr(subject.iter_organizational_unit(), "organizational unit")?;
    let cluster_id = single_attr(subject.iter_organization(), "organization (cluster ID)")?;
    let role = Role::from_cert_name(&unit).ok_or_else(|| {
        PkiError::NotNodeCertificate(format!(
            "organizational unit {unit:?} is neither \"mesh-manager\" nor \"mesh-worker\""
        ))
    })?;
    let validity = cert.validity();
    Ok(NodeIdentity {
        node_id,
        role,
        cluster_id,
        not_before: SystemTime::from(validity.not_before.to_datetime()),
        not_after: SystemTime::from(validity.not_after.to_datetime()),
        key_fingerprint: sha256_hex(cert.public_key().raw),
        serial: hex::encode(cert.raw_serial()),
    })
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}

/// [`identity_from_der`] for the first certificate in a PEM string.
pub fn identity_from_pem(cert_pem: &str) -> Result<NodeIdentity, PkiError> {
    identity_from_der(&pem_to_der(cert_pem)?)
}

/// DER of the first certificate in a PEM string.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|der| der.to_vec())
        .map_err(|_| PkiError::NoPemCertificate)
}

fn new_key() -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(PkiError::KeyGeneration)
}

fn dns_name(name: &str) -> Result<SanType, PkiError> {
    Ia5String::try_from(name)
        .map(SanType::DnsName)
        .map_err(|e| PkiError::Name(name.to_owned(), e))
}

/// A random positive 127-bit serial, so renewals with the same key still get
/// distinct serials (rcgen's default derives it from the key).
fn random_serial() -> SerialNumber {
    let mut bytes = rand::random::<u128>().to_be_bytes();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// The one value of a subject attribute, as text.
fn single_attr<'a, 'b: 'a>(
    mut values: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'b>>,
    what: &str,
) -> Result<String, PkiError> {
    let value = values
        .next()
        .ok_or_else(|| PkiError::NotNodeCertificate(format!("no {what} in the subject")))?;
    if values.next().is_some() {
        return Err(PkiError::NotNodeCertificate(format!(
            "more than one {what} in the subject"
        )));
    }
    value
        .as_str()
        .map(str::to_owned)
        .map_err(|_| PkiError::NotNodeCertificate(format!("{what} is not text")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::server::WebPkiClientVerifier;
    use rustls::{RootCertStore, client::WebPkiServerVerifier};
    use rustls_pki_types::{ServerName, UnixTime};
    use std::sync::Arc;

    const CLUSTER: &str = "k3f0cluster0000000000000a";
    const NODE: &str = "n0de1d0000000000000000abc";
    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn roots(ca: &CertAuthority) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.cert_der().expect("CA DER")))
            .expect("CA is a valid trust anchor");
        Arc::new(roots)
    }

    fn signed(ca: &CertAuthority, role: Role, validity: Duration) -> Vec<u8> {
        let (_key, csr) = new_key_and_csr().expect("CSR");
        let pem = ca
            .sign_node(&csr, NODE, role, CLUSTER, validity)
            .expect("signs");
        pem_to_der(&pem).expect("DER")
    }

    fn secs(t: SystemTime) -> i64 {
        OffsetDateTime::from(t).unix_timestamp()
    }

    #[test]
    fn roles_round_trip() {
        for role in [Role::Manager, Role::Worker] {
            assert_eq!(role.as_str().parse::<Role>().expect("parses"), role);
            assert_eq!(role.to_string(), role.as_str());
        }
        let err = "boss".parse::<Role>().expect_err("unknown role");
        assert_eq!(
            err.to_string(),
            "unknown role \"boss\": expected \"manager\" or \"worker\""
        );
    }

    #[test]
    fn signed_certificate_carries_the_identity_and_validity() {
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        let before = OffsetDateTime::now_utc().unix_timestamp();
        let der = signed(&ca, Role::Manager, 3 * DAY);
        let id = identity_from_der(&der).expect("identity");
        assert_eq!(id.node_id, NODE);
        assert_eq!(id.role, Role::Manager);
        assert_eq!(id.cluster_id, CLUSTER);
        let lifetime = 3 * DAY.as_secs() as i64;
        assert!((secs(id.not_after) - (before + lifetime)).abs() <= 5);
        assert!((secs(id.not_before) - (before - 60)).abs() <= 5);

        let (_, cert) = X509Certificate::from_der(&der).expect("parses");
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .expect("SAN ok")
            .expect("SAN present")
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(sans, ["mesh-manager", NODE]);
        let eku = cert
            .extended_key_usage()
            .expect("EKU ok")
            .expect("EKU present")
            .value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());
    }

    #[test]
    fn csr_subject_is_ignored() {
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["mesh-manager".to_owned()]).expect("params");
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, "mesh-manager");
        params.distinguished_name.push(DnType::CommonName, "evil");
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .expect("CSR");
        let pem = ca
            .sign_node(&csr, NODE, Role::Worker, CLUSTER, DAY)
            .expect("signs");
        let id = identity_from_pem(&pem).expect("identity");
        assert_eq!(id.node_id, NODE);
        assert_eq!(id.role, Role::Worker);
    }

    #[test]
    fn chain_verifies_with_webpki_for_both_roles() {
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        let now = UnixTime::now();

        let manager = CertificateDer::from(signed(&ca, Role::Manager, DAY));
        let server = WebPkiServerVerifier::builder_with_provider(roots(&ca), provider())
            .build()
            .expect("verifier");
        let name = ServerName::try_from("mesh-manager").expect("name");
        server
            .verify_server_cert(&manager, &[], &name, &[], now)
            .expect("manager cert verifies as mesh-manager");
        let by_id = ServerName::try_from(NODE).expect("name");
        server
            .verify_server_cert(&manager, &[], &by_id, &[], now)
            .expect("manager cert verifies by node ID");

        let worker = CertificateDer::from(signed(&ca, Role::Worker, DAY));
        assert!(
            server
                .verify_server_cert(&worker, &[], &name, &[], now)
                .is_err(),
            "a worker certificate must not pass as a manager"
        );
        let client = WebPkiClientVerifier::builder_with_provider(roots(&ca), provider())
            .build()
            .expect("verifier");
        client
            .verify_client_cert(&worker, &[], now)
            .expect("worker cert verifies as a client");

        let other = CertAuthority::generate("other").expect("CA");
        let foreign = CertificateDer::from(signed(&other, Role::Manager, DAY));
        assert!(
            server
                .verify_server_cert(&foreign, &[], &name, &[], now)
                .is_err(),
            "a certificate from another CA must be rejected"
        );
    }

    #[test]
    fn ca_reloaded_from_pem_signs() {
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        let reloaded = CertAuthority {
            cert_pem: ca.cert_pem.clone(),
            key_pem: ca.key_pem.clone(),
        };
        let der = CertificateDer::from(signed(&reloaded, Role::Worker, DAY));
        let client = WebPkiClientVerifier::builder_with_provider(roots(&ca), provider())
            .build()
            .expect("verifier");
        client
            .verify_client_cert(&der, &[], UnixTime::now())
            .expect("verifies against the original CA");
        let ca_cert = X509Certificate::from_der(&ca.cert_der().expect("DER"))
            .expect("parses")
            .1
            .subject()
            .to_string();
        assert!(ca_cert.contains("CN=mesh-root-ca"), "{ca_cert}");
    }

    #[test]
    fn expired_certificate_is_rejected() {
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        let der = CertificateDer::from(signed(&ca, Role::Worker, Duration::from_secs(1)));
        let later = UnixTime::since_unix_epoch(Duration::from_secs(
            (OffsetDateTime::now_utc().unix_timestamp() + 3600) as u64,
        ));
        let client = WebPkiClientVerifier::builder_with_provider(roots(&ca), provider())
            .build()
            .expect("verifier");
        assert!(client.verify_client_cert(&der, &[], later).is_err());
    }

    #[test]
    fn mismatched_ca_key_is_reported() {
        let a = CertAuthority::generate(CLUSTER).expect("CA");
        let b = CertAuthority::generate(CLUSTER).expect("CA");
        let broken = CertAuthority {
            cert_pem: a.cert_pem,
            key_pem: b.key_pem,
        };
        let (_key, csr) = new_key_and_csr().expect("CSR");
        assert!(matches!(
            broken.sign_node(&csr, NODE, Role::Worker, CLUSTER, DAY),
            Err(PkiError::CaKeyMismatch)
        ));
    }

    #[test]
    fn garbage_is_rejected() {
        let ca = CertAuthority::generate(CLUSTER).expect("CA");
        assert!(matches!(
            ca.sign_node("nope", NODE, Role::Worker, CLUSTER, DAY),
            Err(PkiError::Csr(_))
        ));
        assert!(matches!(
            pem_to_der("nope"),
            Err(PkiError::NoPemCertificate)
        ));
        assert!(matches!(
            identity_from_der(b"nope"),
            Err(PkiError::Parse(_))
        ));
        // The CA certificate is a certificate, but not a node's.
        assert!(matches!(
            identity_from_pem(&ca.cert_pem),
            Err(PkiError::NotNodeCertificate(_))
        ));
    }
}
