//! Signing node certificates with the cluster CA held in the replicated state.
//! The role written into a certificate is always the one the cluster state
//! says, never the one a node asks for.

use std::time::Duration;

use mesh_common::pki::{CertAuthority, PkiError, Role};

use crate::state::ClusterInfo;

/// Default node certificate lifetime, as Swarm's (90 days).
pub const DEFAULT_CERT_EXPIRY: Duration = Duration::from_secs(90 * 24 * 3600);

pub fn sign(
    cluster: &ClusterInfo,
    csr_pem: &str,
    node_id: &str,
    role: Role,
) -> Result<String, PkiError> {
    let ca = CertAuthority {
        cert_pem: cluster.ca_cert_pem.clone(),
        key_pem: cluster.ca_key_pem.clone(),
    };
    let expiry = match cluster.cert_expiry_secs {
        0 => DEFAULT_CERT_EXPIRY,
        s => Duration::from_secs(s),
    };
    ca.sign_node(csr_pem, node_id, role, &cluster.id, expiry)
}
