//! Handshakes on loopback between the configs of this module.

use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::Channel;

use super::*;
use crate::pki;
use crate::pki::{CertAuthority, Role};
use mesh_proto::RaftBytes;
use mesh_proto::raft_client::RaftClient;
use mesh_proto::raft_server::{Raft, RaftServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLUSTER: &str = "c1uster000000000000000000";
const DAY: Duration = Duration::from_secs(24 * 60 * 60);
const WAIT: Duration = Duration::from_secs(5);

fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A signed node: its ID, identity, and the PEMs behind it.
struct Node {
    id: String,
    identity: ReloadableIdentity,
    cert_pem: String,
    key_pem: String,
}

fn node(ca: &CertAuthority, role: Role) -> Node {
    let id = crate::id::new_id();
    let (key_pem, csr) = pki::new_key_and_csr().expect("CSR");
    let cert_pem = ca.sign_node(&csr, &id, role, CLUSTER, DAY).expect("signs");
    let identity = ReloadableIdentity::new(&cert_pem, &key_pem).expect("identity");
    Node {
        id,
        identity,
        cert_pem,
        key_pem,
    }
}

fn leaf_id(certs: Option<&[CertificateDer<'static>]>) -> Option<String> {
    let leaf = certs?.first()?;
    Some(pki::identity_from_der(leaf).expect("node cert").node_id)
}

/// What each side saw of one handshake on loopback: the peer's node ID
/// (None = no certificate), or the error text.
struct Outcome {
    server: Result<Option<String>, String>,
    client: Result<Option<String>, String>,
}

async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: &'static str,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let seen = leaf_id(tls.get_ref().1.peer_certificates());
        tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok(seen)
    });
    let client_side = async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from(name).expect("name");
        let mut tls = TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let seen = leaf_id(tls.get_ref().1.peer_certificates());
        let mut buf = [0u8; 2];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok(seen)
    };
    let client = tokio::time::timeout(WAIT, client_side)
        .await
        .expect("client side finishes");
    let server = tokio::time::timeout(WAIT, server_side)
        .await
        .expect("server side finishes")
        .expect("server task");
    Outcome { server, client }
}

#[tokio::test]
async fn mutual_tls_with_and_without_client_certificate() {
    install_provider();
    let ca = CertAuthority::generate(CLUSTER).expect("CA");
    let manager = node(&ca, Role::Manager);
    let worker = node(&ca, Role::Worker);
    let server = server_config(&ca.cert_pem, manager.identity.clone()).expect("server");

    let with = client_config(&ca.cert_pem, Some(worker.identity.clone())).expect("client");
    let out = handshake(server.clone(), with, MANAGER_SERVER_NAME).await;
    assert_eq!(out.client, Ok(Some(manager.id.clone())));
    assert_eq!(out.server, Ok(Some(worker.id.clone())));

    let without = client_config(&ca.cert_pem, None).expect("client");
    let out = handshake(server, without, MANAGER_SERVER_NAME).await;
    assert_eq!(out.client, Ok(Some(manager.id)));
    assert_eq!(
        out.server,
        Ok(None),
        "a joining node gets in without a certificate"
    );
}

#[tokio::test]
async fn set_swaps_the_certificate_for_new_handshakes() {
    install_provider();
    let ca = CertAuthority::generate(CLUSTER).expect("CA");
    let first = node(&ca, Role::Manager);
    let second = node(&ca, Role::Manager);
    let client_node = node(&ca, Role::Worker);
    let renewed = node(&ca, Role::Manager);

    let server = server_config(&ca.cert_pem, first.identity.clone()).expect("server");
    let client = client_config(&ca.cert_pem, Some(client_node.identity.clone())).expect("c");
    let out = handshake(server.clone(), client.clone(), MANAGER_SERVER_NAME).await;
    assert_eq!(out.client, Ok(Some(first.id.clone())));

    first
        .identity
        .set(&second.cert_pem, &second.key_pem)
        .expect("set");
    client_node
        .identity
        .set(&renewed.cert_pem, &renewed.key_pem)
        .expect("set");
    let out = handshake(server, client, MANAGER_SERVER_NAME).await;
    assert_eq!(out.client, Ok(Some(second.id.clone())));
    assert_eq!(out.server, Ok(Some(renewed.id)));
    assert_eq!(first.identity.identity().expect("id").node_id, second.id);
}

#[test]
fn set_rejects_bad_input_and_keeps_the_old_identity() {
    let ca = CertAuthority::generate(CLUSTER).expect("CA");
    let a = node(&ca, Role::Worker);
    let b = node(&ca, Role::Worker);
    assert!(matches!(
        a.identity.set(&a.cert_pem, &b.key_pem),
        Err(TlsError::KeyMismatch)
    ));
    assert!(matches!(
        a.identity.set("", &a.key_pem),
        Err(TlsError::NoCertificate)
    ));
    assert!(matches!(
        a.identity.set(&a.cert_pem, "nope"),
        Err(TlsError::Key(_))
    ));
    assert_eq!(a.identity.identity().expect("id").node_id, a.id);
    assert!(matches!(
        server_config("nope", a.identity.clone()),
        Err(TlsError::CaCertificate(_))
    ));
}

#[tokio::test]
async fn certificates_from_another_ca_are_rejected() {
    install_provider();
    let ca = CertAuthority::generate(CLUSTER).expect("CA");
    let other = CertAuthority::generate("other").expect("CA");
    let manager = node(&ca, Role::Manager);
    let foreign = node(&other, Role::Manager);

    // A server with a foreign certificate.
    let server = server_config(&other.cert_pem, foreign.identity.clone()).expect("server");
    let client = client_config(&ca.cert_pem, None).expect("client");
    let out = handshake(server, client, MANAGER_SERVER_NAME).await;
    let err = out.client.expect_err("client must reject the server");
    assert!(err.contains("UnknownIssuer"), "{err}");

    // A client with a foreign certificate.
    let server = server_config(&ca.cert_pem, manager.identity.clone()).expect("server");
    let client = client_config(&ca.cert_pem, Some(foreign.identity)).expect("client");
    let out = handshake(server, client, MANAGER_SERVER_NAME).await;
    let err = out.server.expect_err("server must reject the client");
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(out.client.is_err(), "the client learns it was rejected");
}

#[tokio::test]
async fn a_worker_certificate_does_not_pass_as_a_manager() {
    install_provider();
    let ca = CertAuthority::generate(CLUSTER).expect("CA");
    let worker = node(&ca, Role::Worker);
    let server = server_config(&ca.cert_pem, worker.identity).expect("server");
    let client = client_config(&ca.cert_pem, None).expect("client");
    let out = handshake(server, client, MANAGER_SERVER_NAME).await;
    let err = out.client.expect_err("worker is not mesh-manager");
    assert!(err.contains("not valid for name"), "{err}");
}

#[tokio::test]
async fn members_accept_only_current_managers_with_their_recorded_key() {
    install_provider();
    let ca = CertAuthority::generate(CLUSTER).expect("CA");
    let manager = node(&ca, Role::Manager);
    let client = node(&ca, Role::Worker);
    let fp = manager.identity.identity().expect("id").key_fingerprint;
    let server = server_config(&ca.cert_pem, manager.identity.clone()).expect("server");
    let trusted = TrustedManagers::default();
    let config = member_client_config(
        &ca.cert_pem,
        client.identity.clone(),
        Arc::new(trusted.clone()),
    )
    .expect("client");

    // CA-signed, right name, but not a manager the cluster lists.
    let out = handshake(server.clone(), config.clone(), MANAGER_SERVER_NAME).await;
    let err = out.client.expect_err("unknown manager");
    assert!(err.contains("not a current manager"), "{err}");

    // Listed, but for another key (a certificate signed for its ID).
    trusted.set([(manager.id.clone(), "0".repeat(64))].into());
    let out = handshake(server.clone(), config.clone(), MANAGER_SERVER_NAME).await;
    let err = out.client.expect_err("other key");
    assert!(err.contains("another key"), "{err}");

    trusted.set([(manager.id.clone(), fp)].into());
    let out = handshake(server, config, MANAGER_SERVER_NAME).await;
    assert_eq!(out.client, Ok(Some(manager.id)));
}

#[tokio::test]
async fn unverified_client_accepts_any_server() {
    install_provider();
    let other = CertAuthority::generate("other").expect("CA");
    let foreign = node(&other, Role::Worker);
    let server = server_config(&other.cert_pem, foreign.identity).expect("server");
    let out = handshake(server, unverified_client_config(), MANAGER_SERVER_NAME).await;
    assert_eq!(out.client, Ok(Some(foreign.id)));
    assert_eq!(out.server, Ok(None));
}

/// Answers `vote` with "<node ID>/<role>" of the caller's certificate.
struct WhoAmI;

#[tonic::async_trait]
impl Raft for WhoAmI {
    async fn vote(
        &self,
        request: tonic::Request<RaftBytes>,
    ) -> Result<tonic::Response<RaftBytes>, tonic::Status> {
        let who = peer_identity(&request)
            .map(|id| format!("{}/{}", id.node_id, id.role))
            .unwrap_or_default();
        Ok(tonic::Response::new(RaftBytes {
            data: who.into_bytes(),
        }))
    }

    async fn append(
        &self,
        _request: tonic::Request<RaftBytes>,
    ) -> Result<tonic::Response<RaftBytes>, tonic::Status> {
        Err(tonic::Status::unimplemented("test service"))
    }

    async fn snapshot(
        &self,
        _request: tonic::Request<RaftBytes>,
    ) -> Result<tonic::Response<RaftBytes>, tonic::Status> {
        Err(tonic::Status::unimplemented("test service"))
    }
}

async fn serve(config: Arc<ServerConfig>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RaftServer::new(WhoAmI))
            .serve_with_incoming(incoming(listener, config)),
    );
    addr
}

async fn who(channel: Channel) -> Result<String, tonic::Status> {
    let reply = tokio::time::timeout(WAIT, RaftClient::new(channel).vote(RaftBytes::default()))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("test timeout"))??;
    Ok(String::from_utf8_lossy(&reply.into_inner().data).into_owned())
}

#[tokio::test]
async fn tonic_round_trip_sees_the_peer_identity() {
    install_provider();
    let ca = CertAuthority::generate(CLUSTER).expect("CA");
    let manager = node(&ca, Role::Manager);
    let worker = node(&ca, Role::Worker);
    let addr = serve(server_config(&ca.cert_pem, manager.identity).expect("server")).await;

    let config = client_config(&ca.cert_pem, Some(worker.identity)).expect("client");
    let lazy = channel(&addr, config.clone(), MANAGER_SERVER_NAME, WAIT).expect("channel");
    assert_eq!(
        who(lazy).await.expect("vote"),
        format!("{}/worker", worker.id)
    );

    let eager = connect(&addr, config, MANAGER_SERVER_NAME, WAIT)
        .await
        .expect("connect");
    assert_eq!(
        who(eager.clone()).await.expect("vote"),
        format!("{}/worker", worker.id)
    );
    assert_eq!(
        who(eager).await.expect("again"),
        format!("{}/worker", worker.id)
    );

    let anonymous = client_config(&ca.cert_pem, None).expect("client");
    let anonymous = channel(&addr, anonymous, MANAGER_SERVER_NAME, WAIT).expect("channel");
    assert_eq!(who(anonymous).await.expect("vote"), "");
}

#[tokio::test]
async fn stalled_and_garbage_clients_do_not_block_the_server() {
    install_provider();
    let ca = CertAuthority::generate(CLUSTER).expect("CA");
    let manager = node(&ca, Role::Manager);
    let addr = serve(server_config(&ca.cert_pem, manager.identity).expect("server")).await;

    // Holds a TCP connection open without ever starting TLS.
    let _stalled = TcpStream::connect(&addr).await.expect("connect");
    // Speaks plain HTTP to a TLS port.
    let mut garbage = TcpStream::connect(&addr).await.expect("connect");
    garbage
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");

    let config = client_config(&ca.cert_pem, None).expect("client");
    for _ in 0..3 {
        let ch = channel(&addr, config.clone(), MANAGER_SERVER_NAME, WAIT).expect("channel");
        assert_eq!(
            who(ch).await.expect("served despite the stalled client"),
            ""
        );
    }
}

#[tokio::test]
async fn connect_errors_name_the_address() {
    install_provider();
    let ca = CertAuthority::generate(CLUSTER).expect("CA");
    let config = client_config(&ca.cert_pem, None).expect("client");

    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let err = connect(&addr, config.clone(), MANAGER_SERVER_NAME, WAIT)
        .await
        .expect_err("nothing listens there");
    assert_eq!(
        err.to_string(),
        format!("cannot reach manager at {addr}: connection refused (is mesh running there?)")
    );

    let other = CertAuthority::generate("other").expect("CA");
    let foreign = node(&other, Role::Manager);
    let addr = serve(server_config(&other.cert_pem, foreign.identity).expect("server")).await;
    let err = connect(&addr, config.clone(), MANAGER_SERVER_NAME, WAIT)
        .await
        .expect_err("foreign cluster");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("TLS handshake with manager at {addr} failed"))
            && text.contains("not from this cluster's CA"),
        "{text}"
    );

    for bad in ["", "no-port", "http://1.2.3.4:5", "1.2.3.4:99999"] {
        assert!(
            matches!(
                channel(bad, config.clone(), MANAGER_SERVER_NAME, WAIT),
                Err(TlsError::InvalidAddress { .. })
            ),
            "{bad:?} must be rejected"
        );
    }
}

#[tokio::test]
async fn connect_times_out_on_a_silent_server() {
    install_provider();
    let ca = CertAuthority::generate(CLUSTER).expect("CA");
    let config = client_config(&ca.cert_pem, None).expect("client");
    // Accepts TCP (via the backlog) but never answers the ClientHello.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = silent.local_addr().expect("addr").to_string();
    let err = connect(
        &addr,
        config,
        MANAGER_SERVER_NAME,
        Duration::from_millis(200),
    )
    .await
    .expect_err("times out");
    assert!(matches!(err, TlsError::Timeout { .. }), "{err}");
    drop(silent);
}
