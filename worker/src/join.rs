//! The client side of a join: fetch the cluster's CA and pin it by the
//! token's digest, then prove the token's secret on a connection bound to
//! that proof and check the manager's proof in return. The daemon's `join`
//! and the node simulator (`mesh lab sim`) both go through here, so a
//! simulated node joins exactly as a real one does.

use std::net::IpAddr;
use std::time::Duration;

use mesh_common::pki::{self, PkiError};
use mesh_common::tls::{self, TlsError};
use mesh_common::token::{self, JoinToken, ProofSide};
use mesh_proto::cluster_client::ClusterClient;
use mesh_proto::{Empty, NodeJoinRequest, NodeJoinResponse};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const JOIN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("manager at {addr}: {msg}")]
    Manager { addr: String, msg: String },
    /// The join itself was refused: the manager's own words.
    #[error("{0}")]
    Refused(String),
    #[error(
        "the manager at {0} presented a CA certificate that does not match the join token's digest: check the token, or you are not talking to the cluster you think"
    )]
    WrongCa(String),
    #[error(
        "the manager at {0} could not prove it knows the join token: it is not a current manager of this cluster (the token's secret was not revealed to it)"
    )]
    NoProof(String),
    #[error("the manager at {0} sent a certificate that does not match its reply")]
    WrongCert(String),
}

/// The CA certificate (PEM) of the cluster at `remote`, fetched without
/// trusting it and accepted only if the token pins it.
pub async fn fetch_ca(remote: &str, presented: &JoinToken) -> Result<String, JoinError> {
    let unverified = tls::connect(
        remote,
        tls::unverified_client_config(),
        tls::MANAGER_SERVER_NAME,
        CONNECT_TIMEOUT,
    )
    .await?;
    let ca_pem = ClusterClient::new(unverified)
        .get_ca(Empty {})
        .await
        .map_err(|s| JoinError::Manager {
            addr: remote.to_string(),
            msg: s.message().to_string(),
        })?
        .into_inner()
        .ca_cert_pem;
    if !presented.matches_ca(&pki::pem_to_der(&ca_pem)?) {
        return Err(JoinError::WrongCa(remote.to_string()));
    }
    Ok(ca_pem)
}

/// A node's admission: its new private key (PEM) and the manager's reply,
/// whose certificate was checked to match it.
pub struct Joined {
    pub key_pem: String,
    pub reply: NodeJoinResponse,
}

/// Joins through the manager at `remote`, whose CA `ca_pem` was pinned by
/// [`fetch_ca`]. `request` carries the node's description; its key, CSR and
/// proof are made here. `from` is the local address to connect from.
pub async fn join(
    remote: &str,
    from: Option<IpAddr>,
    ca_pem: &str,
    presented: &JoinToken,
    mut request: NodeJoinRequest,
) -> Result<Joined, JoinError> {
    // From here on the server must prove it knows the join secret; the
    // secret itself is never sent (see `token::join_proof`).
    let (pinned, exporter) = tls::connect_bound(
        remote,
        from,
        tls::client_config(ca_pem, None)?,
        tls::MANAGER_SERVER_NAME,
        CONNECT_TIMEOUT,
    )
    .await?;
    let (key_pem, csr) = pki::new_key_and_csr()?;
    request.csr_pem = csr;
    request.proof = token::join_proof(
        &presented.secret,
        ProofSide::Node,
        &exporter,
        &mesh_proto::join_request_content(&request),
    );
    let mut req = tonic::Request::new(request);
    req.set_timeout(JOIN_TIMEOUT);
    let reply = ClusterClient::new(pinned)
        .join(req)
        .await
        .map_err(|s| JoinError::Refused(s.message().to_string()))?
        .into_inner();
    let expected = token::join_proof(
        &presented.secret,
        ProofSide::Manager,
        &exporter,
        &mesh_proto::join_reply_content(&reply),
    );
    if !token::proofs_match(&reply.proof, &expected) {
        return Err(JoinError::NoProof(remote.to_string()));
    }
    let mine = pki::identity_from_pem(&reply.cert_pem)?;
    if mine.node_id != reply.node_id || mine.role.as_str() != reply.role {
        return Err(JoinError::WrongCert(remote.to_string()));
    }
    Ok(Joined { key_pem, reply })
}
