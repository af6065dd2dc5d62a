//! End-to-end tests of the security review (issue 10): one test per finding,
//! each on a lab of its own. Findings that live in one part of the system
//! have their tests in a module of their own under `tests/security/`.
//!
//! The attacker's side runs inside a lab node's network namespace, with
//! certificates and keys taken from that node's state dir, and speaks to
//! the real daemons over the real cluster port.
//!
//! Over 600 lines: each test is one whole lab scenario, and they share
//! this file's helpers; splitting them apart would only move the helpers.

mod common;

#[path = "security/dns.rs"]
mod dns;
#[path = "security/files.rs"]
mod files;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use mesh_common::pki::{self, Role};
use mesh_common::tls::{self, ReloadableIdentity};
use mesh_manager::TypeConfig;
use mesh_manager::state::Command;
use mesh_proto::cluster_client::ClusterClient;
use mesh_proto::raft_client::RaftClient;
use mesh_worker::state_dir::{Certs, StateDir};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, SnapshotMeta, Vote};

const WAIT: Duration = Duration::from_secs(5);

/// Runs `f` on a thread of its own inside `node`'s network namespace, on a
/// runtime of its own: setns affects only that thread, which never returns
/// to a shared pool.
fn in_netns<T, F, Fut>(lab: &mesh_lab::Lab, node: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    spawn_in_netns(lab, node, f)?
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// [`in_netns`] without waiting: the thread's handle.
fn spawn_in_netns<T, F, Fut>(
    lab: &mesh_lab::Lab,
    node: &str,
    f: F,
) -> Result<std::thread::JoinHandle<Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let netns = PathBuf::from("/run/netns").join(&lab.node(node)?.netns);
    Ok(std::thread::spawn(move || -> Result<T> {
        let ns = std::fs::File::open(&netns)?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let _ = rustls::crypto::ring::default_provider().install_default();
            f().await
        })
    }))
}

/// A channel to `remote` presenting `certs`, checking the server only
/// against the CA (the attacker does not care whom it talks to).
async fn channel_as(certs: &Certs, remote: &str) -> Result<tonic::transport::Channel> {
    let id = ReloadableIdentity::new(&certs.cert, &certs.key)?;
    let cfg = tls::client_config(&certs.ca, Some(id))?;
    Ok(tls::connect(remote, cfg, tls::MANAGER_SERVER_NAME, WAIT).await?)
}

/// A node's cluster port, as other nodes dial it.
fn cluster_addr(lab: &mesh_lab::Lab, node: &str) -> Result<String> {
    Ok(format!("{}:2377", lab.node(node)?.ip))
}

fn raft_bytes<T: serde::Serialize>(v: &T) -> Result<mesh_proto::RaftBytes> {
    Ok(mesh_proto::RaftBytes {
        data: serde_json::to_vec(v)?,
    })
}

fn code<T>(r: &Result<T, tonic::Status>) -> tonic::Code {
    r.as_ref().err().map_or(tonic::Code::Ok, |s| s.code())
}

fn tokens(lab: &mesh_lab::Lab) -> Result<(String, String)> {
    Ok((
        lab.mesh_ok("node1", &["join-token", "-q", "worker"])?
            .trim()
            .to_string(),
        lab.mesh_ok("node1", &["join-token", "-q", "manager"])?
            .trim()
            .to_string(),
    ))
}

fn node_id(lab: &mesh_lab::Lab, via: &str, hostname: &str) -> Result<String> {
    node_ls(lab, via)?
        .iter()
        .find(|n| n["Hostname"] == hostname)
        .and_then(|n| n["ID"].as_str().map(String::from))
        .with_context(|| format!("{hostname} not in node ls"))
}

/// What a fake manager saw: the RPCs that reached it.
#[derive(Default)]
struct Seen {
    calls: Vec<String>,
    joins: Vec<mesh_proto::NodeJoinRequest>,
}

/// A cluster port served with a stolen manager certificate: answers GetCa
/// with the real CA (public anyway), records everything else.
struct FakeManager {
    ca_pem: String,
    seen: Arc<Mutex<Seen>>,
}

impl FakeManager {
    fn saw(&self, what: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .calls
            .push(what.to_string());
    }
}

type Reply<T> = Result<tonic::Response<T>, tonic::Status>;

fn no<T>() -> Reply<T> {
    Err(tonic::Status::unimplemented("fake manager"))
}

#[tonic::async_trait]
impl mesh_proto::cluster_server::Cluster for FakeManager {
    async fn get_ca(&self, _: tonic::Request<mesh_proto::Empty>) -> Reply<mesh_proto::CaResponse> {
        Ok(tonic::Response::new(mesh_proto::CaResponse {
            ca_cert_pem: self.ca_pem.clone(),
        }))
    }
    async fn join(
        &self,
        r: tonic::Request<mesh_proto::NodeJoinRequest>,
    ) -> Reply<mesh_proto::NodeJoinResponse> {
        self.saw("join");
        let r = r.into_inner();
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .joins
            .push(r);
        // The best an impostor without the secret can do.
        Ok(tonic::Response::new(mesh_proto::NodeJoinResponse {
            node_id: "impostor".into(),
            role: "worker".into(),
            proof: vec![0; 32],
            ..Default::default()
        }))
    }
    async fn heartbeat(
        &self,
        _: tonic::Request<mesh_proto::HeartbeatRequest>,
    ) -> Reply<mesh_proto::HeartbeatResponse> {
        self.saw("heartbeat");
        no()
    }
    async fn renew_cert(
        &self,
        _: tonic::Request<mesh_proto::RenewCertRequest>,
    ) -> Reply<mesh_proto::RenewCertResponse> {
        self.saw("renew");
        no()
    }
    async fn propose(
        &self,
        _: tonic::Request<mesh_proto::ProposeRequest>,
    ) -> Reply<mesh_proto::ProposeResponse> {
        self.saw("propose");
        no()
    }
    async fn join_raft(
        &self,
        _: tonic::Request<mesh_proto::JoinRaftRequest>,
    ) -> Reply<mesh_proto::Empty> {
        self.saw("join_raft");
        no()
    }
    async fn read_index(
        &self,
        _: tonic::Request<mesh_proto::Empty>,
    ) -> Reply<mesh_proto::ReadIndexReply> {
        self.saw("read_index");
        no()
    }
    type AssignmentsStream =
        tokio_stream::wrappers::ReceiverStream<Result<mesh_proto::ViewUpdate, tonic::Status>>;
    async fn assignments(
        &self,
        _: tonic::Request<mesh_proto::Empty>,
    ) -> Reply<Self::AssignmentsStream> {
        self.saw("assignments");
        no()
    }
    async fn attach(
        &self,
        _: tonic::Request<mesh_proto::AttachRequest>,
    ) -> Reply<mesh_proto::EndpointInfo> {
        self.saw("attach");
        no()
    }
    async fn detach(
        &self,
        _: tonic::Request<mesh_proto::DetachRequest>,
    ) -> Reply<mesh_proto::Empty> {
        self.saw("detach");
        no()
    }
    async fn report_tasks(
        &self,
        _: tonic::Request<mesh_proto::TaskReports>,
    ) -> Reply<mesh_proto::Empty> {
        self.saw("report_tasks");
        no()
    }
    async fn wait_converged(
        &self,
        _: tonic::Request<mesh_proto::WaitConvergedRequest>,
    ) -> Reply<mesh_proto::WaitConvergedReply> {
        self.saw("wait_converged");
        no()
    }
    type LogRequestsStream =
        tokio_stream::wrappers::ReceiverStream<Result<mesh_proto::LogRequest, tonic::Status>>;
    async fn log_requests(
        &self,
        _: tonic::Request<mesh_proto::Empty>,
    ) -> Reply<Self::LogRequestsStream> {
        self.saw("log_requests");
        no()
    }
    async fn publish_logs(
        &self,
        _: tonic::Request<mesh_proto::LogChunk>,
    ) -> Reply<mesh_proto::Empty> {
        self.saw("publish_logs");
        no()
    }
}

/// Serves a [`FakeManager`] on `addr` inside `node`'s namespace, with the
/// stolen `certs`, until the returned sender is dropped.
fn serve_fake_manager(
    lab: &mesh_lab::Lab,
    node: &str,
    addr: String,
    certs: Certs,
    seen: Arc<Mutex<Seen>>,
) -> Result<std::sync::mpsc::Sender<()>> {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
    let server = spawn_in_netns(lab, node, move || async move {
        let id = ReloadableIdentity::new(&certs.cert, &certs.key)?;
        let config = tls::server_config(&certs.ca, id)?;
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        let _ = ready_tx.send(());
        let fake = FakeManager {
            ca_pem: certs.ca.clone(),
            seen,
        };
        let stop = async move {
            // The std receiver blocks: poll it from a blocking task.
            let _ = tokio::task::spawn_blocking(move || stopped.recv()).await;
        };
        tonic::transport::Server::builder()
            .add_service(mesh_proto::cluster_server::ClusterServer::new(fake))
            .serve_with_incoming_shutdown(tls::incoming(listener, config), stop)
            .await?;
        anyhow::Ok(())
    })?;
    if ready.recv_timeout(WAIT).is_err() {
        let why = match server.join() {
            Ok(Err(e)) => e.to_string(),
            _ => "it did not listen in time".to_string(),
        };
        bail!("fake manager did not start: {why}");
    }
    Ok(stop)
}

/// Finding 1 and 2: a manager's certificate and key, kept after the node was
/// demoted and removed, are refused everywhere: by Raft, by the control
/// path, by workers and by joining nodes; the join tokens stay the cluster's.
#[test]
fn removed_manager_certificate_is_refused() -> Result<()> {
    let mut lab = up("sr", 4, 1, &[])?;
    lab.mesh_ok("node1", &["node", "promote", "node2"])?;
    let node2 = lab.node("node2")?.clone();
    let stolen = wait_for(
        "node2 to hold a manager certificate and be Reachable",
        Duration::from_secs(30),
        || {
            let certs = StateDir::new(&node2.state_dir).load_certs().ok()?;
            let id = pki::identity_from_pem(&certs.cert).ok()?;
            let nodes = node_ls(&lab, "node1").ok()?;
            let row = nodes.iter().find(|n| n["Hostname"] == "node2")?;
            (id.role == Role::Manager && row["ManagerStatus"] == "Reachable").then_some(certs)
        },
    )?
    .0;
    let stolen_id = pki::identity_from_pem(&stolen.cert)?;
    let raft_id = mesh_common::id::raft_id(&stolen_id.node_id);
    let before = tokens(&lab)?;

    lab.mesh_ok("node1", &["node", "demote", "node2"])?;
    wait_for("node2 to be a worker", Duration::from_secs(20), || {
        let nodes = node_ls(&lab, "node1").ok()?;
        let row = nodes.iter().find(|n| n["Hostname"] == "node2")?;
        (row["ManagerStatus"].as_str().unwrap_or_default().is_empty()).then_some(())
    })?;
    lab.kill("node2")?;
    lab.mesh_ok("node1", &["node", "rm", "--force", "node2"])?;

    // From node2's own address, with its old certificate and key.
    let remote = cluster_addr(&lab, "node1")?;
    let (certs, target) = (stolen.clone(), remote.clone());
    let results = in_netns(&lab, "node2", move || async move {
        let ch = channel_as(&certs, &target).await?;
        let mut raft = RaftClient::new(ch.clone());
        let mut out = Vec::new();
        let vote = VoteRequest::<u64> {
            vote: Vote::new(1_000, raft_id),
            last_log_id: None,
        };
        out.push(("vote", raft.vote(raft_bytes(&vote)?).await.map(|_| ())));
        // One entry that would rotate the manager token to the attacker's.
        let rotate = Command::RotateToken {
            role: "manager".into(),
            token: format!("SWMTKN-1-{}-{}", "0".repeat(50), "a".repeat(25)),
        };
        for leader in [raft_id, 4_242] {
            let log_id = LogId::new(CommittedLeaderId::new(1_000, leader), 1_000_000);
            let append = AppendEntriesRequest::<TypeConfig> {
                vote: Vote::new_committed(1_000, leader),
                prev_log_id: None,
                entries: vec![Entry {
                    log_id,
                    payload: EntryPayload::Normal(rotate.clone()),
                }],
                leader_commit: Some(log_id),
            };
            out.push((
                "append",
                raft.append(raft_bytes(&append)?).await.map(|_| ()),
            ));
        }
        let snapshot = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(1_000, raft_id),
            meta: SnapshotMeta::default(),
            offset: 0,
            data: Vec::new(),
            done: true,
        };
        out.push((
            "snapshot",
            raft.snapshot(raft_bytes(&snapshot)?).await.map(|_| ()),
        ));
        let mut cluster = ClusterClient::new(ch);
        let cmd = serde_json::to_vec(&rotate)?;
        out.push((
            "propose",
            cluster
                .propose(mesh_proto::ProposeRequest { command: cmd })
                .await
                .map(|_| ()),
        ));
        out.push((
            "heartbeat",
            cluster
                .heartbeat(mesh_proto::HeartbeatRequest::default())
                .await
                .map(|_| ()),
        ));
        out.push((
            "read_index",
            cluster.read_index(mesh_proto::Empty {}).await.map(|_| ()),
        ));
        Ok(out
            .into_iter()
            .map(|(w, r)| (w, code(&r), r.err().map(|s| s.message().to_string())))
            .collect::<Vec<_>>())
    })?;
    ensure!(results.len() == 7, "{results:?}");
    for (what, code, msg) in &results {
        ensure!(
            *code == tonic::Code::PermissionDenied,
            "{what} with a removed manager's certificate: {code:?} {msg:?}"
        );
    }
    ensure!(tokens(&lab)? == before, "the join tokens changed");

    // The same certificate as a server: node2's address now answers as a
    // "manager". node3 (a worker) is pointed at it and must refuse it.
    let fake_addr = format!("{}:2377", node2.ip);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = serve_fake_manager(
        &lab,
        "node2",
        fake_addr.clone(),
        stolen.clone(),
        seen.clone(),
    )?;
    // node3 learns with its next heartbeat that node2 is no manager.
    let dir = StateDir::new(&lab.node("node3")?.state_dir);
    wait_for("node3 to trust only node1", Duration::from_secs(10), || {
        let keys = dir.load_config().ok()??.manager_keys;
        (keys.len() == 1 && !keys.contains_key(&stolen_id.node_id)).then_some(())
    })
    .with_context(|| {
        std::fs::read_to_string(lab.node("node3").map(|n| n.log.clone()).unwrap_or_default())
            .unwrap_or_default()
    })?;
    lab.kill("node3")?;
    let mut config = dir.load_config()?.context("node3 has no node.json")?;
    config.managers = vec![fake_addr.clone()];
    dir.save_config(&config)?;
    lab.start("node3")?;
    let last = std::cell::RefCell::new(String::new());
    let (err, _) = wait_for(
        "node3 to refuse the impostor",
        Duration::from_secs(15),
        || {
            let info: serde_json::Value =
                serde_json::from_str(&lab.mesh_ok("node3", &["info", "--format", "json"]).ok()?)
                    .ok()?;
            let err = info["Swarm"]["Error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            last.replace(err.clone());
            err.contains("not a current manager").then_some(err)
        },
    )
    .with_context(|| format!("node3's last error: {}", last.borrow()))?;
    ensure!(err.contains(&fake_addr), "{err}");
    let calls = seen.lock().unwrap_or_else(|e| e.into_inner()).calls.clone();
    ensure!(calls.is_empty(), "node3 talked to the impostor: {calls:?}");

    // A joining node (node4 left the cluster) is sent to the impostor.
    lab.mesh_ok("node4", &["leave"])?;
    let (worker_token, _) = &before;
    let secret = worker_token
        .rsplit('-')
        .next()
        .unwrap_or_default()
        .to_string();
    let (code, _, err) = mesh(
        &lab,
        "node4",
        &["join", "--token", worker_token, &fake_addr],
    )?;
    ensure!(code != 0, "node4 joined an impostor");
    ensure!(
        err.contains("could not prove it knows the join token"),
        "node4: {err}"
    );
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    ensure!(seen.joins.len() == 1, "the join did not reach the impostor");
    let sent = format!("{:?}", seen.joins[0]);
    ensure!(!sent.contains(&secret), "the join secret was sent: {sent}");
    drop(stop);
    let info: serde_json::Value =
        serde_json::from_str(&lab.mesh_ok("node4", &["info", "--format", "json"])?)?;
    ensure!(
        info["Swarm"]["LocalNodeState"] == "inactive",
        "node4 half-joined: {info}"
    );

    // The cluster itself carries on, tokens unchanged.
    lab.mesh_ok(
        "node1",
        &["node", "update", "--label-add", "after=attack", "node1"],
    )?;
    ensure!(tokens(&lab)? == before, "the join tokens changed");
    lab.down()?;
    Ok(())
}

/// How a stream thread ended, waiting at most 5 s for it.
fn ended(
    h: std::thread::JoinHandle<Result<(tonic::Code, String)>>,
    what: &str,
) -> Result<(tonic::Code, String)> {
    wait_for(what, Duration::from_secs(5), || {
        h.is_finished().then_some(())
    })
    .with_context(|| format!("{what}: still open"))?;
    h.join()
        .map_err(|_| anyhow::anyhow!("{what}: thread panicked"))?
}

/// Reads a stream to its end: how it ended.
async fn drain<T>(mut s: tonic::Streaming<T>) -> (tonic::Code, String) {
    loop {
        match s.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => return (tonic::Code::Ok, "ended".to_string()),
            Err(e) => return (e.code(), e.message().to_string()),
        }
    }
}

/// Finding 2: removal and demotion end the node's open streams at once,
/// and renewal cannot swap the node's key.
#[test]
fn removal_and_demotion_end_open_streams() -> Result<()> {
    let mut lab = up("ss", 3, 1, &[])?;
    let remote = cluster_addr(&lab, "node1")?;
    lab.mesh_ok("node1", &["node", "promote", "node2"])?;
    let node2 = lab.node("node2")?.clone();
    let manager_certs = wait_for(
        "node2 to hold a manager certificate",
        Duration::from_secs(30),
        || {
            let certs = StateDir::new(&node2.state_dir).load_certs().ok()?;
            let id = pki::identity_from_pem(&certs.cert).ok()?;
            (id.role == Role::Manager).then_some(certs)
        },
    )?
    .0;
    let worker_certs = StateDir::new(&lab.node("node3")?.state_dir).load_certs()?;

    // The promotion renewed node2's certificate: the state records that one,
    // for the key node2 joined with.
    let mine = pki::identity_from_pem(&manager_certs.cert)?;
    let recorded: serde_json::Value =
        serde_json::from_str(&lab.mesh_ok("node1", &["node", "inspect", "node2"])?)?;
    let recorded = if recorded.is_array() {
        recorded[0]["Description"]["TLSInfo"].clone()
    } else {
        recorded["Description"]["TLSInfo"].clone()
    };
    ensure!(
        recorded["CertSerial"] == mine.serial.as_str()
            && recorded["KeyFingerprint"] == mine.key_fingerprint.as_str(),
        "recorded {recorded}, node2 holds serial {} key {}",
        mine.serial,
        mine.key_fingerprint
    );

    // Renewal with another key is refused: the node is pinned to its key.
    let (certs, target) = (worker_certs.clone(), remote.clone());
    let renew = in_netns(&lab, "node3", move || async move {
        let (_, csr) = pki::new_key_and_csr()?;
        let r = ClusterClient::new(channel_as(&certs, &target).await?)
            .renew_cert(mesh_proto::RenewCertRequest { csr_pem: csr })
            .await;
        Ok((code(&r), r.err().map(|s| s.message().to_string())))
    })?;
    ensure!(
        renew.0 == tonic::Code::FailedPrecondition
            && renew
                .1
                .as_deref()
                .unwrap_or_default()
                .contains("another key"),
        "renewal with a new key: {renew:?}"
    );

    // Streams opened with each certificate, then the state changes.
    let open = |node: &str, certs: Certs, logs: bool| {
        let target = remote.clone();
        spawn_in_netns(&lab, node, move || async move {
            let mut c = ClusterClient::new(channel_as(&certs, &target).await?);
            Ok(if logs {
                drain(c.log_requests(mesh_proto::Empty {}).await?.into_inner()).await
            } else {
                drain(c.assignments(mesh_proto::Empty {}).await?.into_inner()).await
            })
        })
    };
    let demoted_logs = open("node2", manager_certs, true)?;
    let removed_view = open("node3", worker_certs, false)?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        !demoted_logs.is_finished() && !removed_view.is_finished(),
        "the streams ended before anything changed"
    );

    lab.mesh_ok("node1", &["node", "demote", "node2"])?;
    let (code, msg) = ended(demoted_logs, "node2's log stream after its demotion")?;
    ensure!(
        code == tonic::Code::PermissionDenied && msg.contains("no longer a manager"),
        "{code:?} {msg}"
    );

    lab.kill("node3")?;
    lab.mesh_ok("node1", &["node", "rm", "--force", "node3"])?;
    let (code, msg) = ended(removed_view, "node3's assignment stream after its removal")?;
    ensure!(
        code == tonic::Code::PermissionDenied && msg.contains("removed"),
        "{code:?} {msg}"
    );
    lab.down()?;
    Ok(())
}

/// Finding 5: a heartbeat cannot move a node's address anywhere but where
/// it joined from, and a join cannot take another node's hostname.
#[test]
fn nodes_assert_nothing_about_others() -> Result<()> {
    let lab = up("sa", 3, 1, &[])?;
    let remote = cluster_addr(&lab, "node1")?;
    let certs = StateDir::new(&lab.node("node3")?.state_dir).load_certs()?;
    let version = |lab: &mesh_lab::Lab| -> Result<(String, u64)> {
        let v: serde_json::Value =
            serde_json::from_str(&lab.mesh_ok("node1", &["node", "inspect", "node3"])?)?;
        let v = if v.is_array() { v[0].clone() } else { v };
        Ok((
            v["Status"]["Addr"].as_str().unwrap_or_default().to_string(),
            v["Version"]["Index"].as_u64().unwrap_or_default(),
        ))
    };
    let (addr_before, index_before) = version(&lab)?;
    ensure!(!addr_before.is_empty(), "node inspect shows no address");
    let target = remote.clone();
    let forged = in_netns(&lab, "node3", move || async move {
        let mut c = ClusterClient::new(channel_as(&certs, &target).await?);
        let mut ok = 0;
        for i in 0..40 {
            let r = c
                .heartbeat(mesh_proto::HeartbeatRequest {
                    addr: format!("10.99.{}.{}", i / 200, 1 + i % 200),
                    ..Default::default()
                })
                .await;
            if r.is_ok() {
                ok += 1;
            }
        }
        // The read index is for managers: a worker learns nothing of the
        // leader's log from it.
        let read_index = c.read_index(mesh_proto::Empty {}).await;
        Ok((ok, code(&read_index)))
    })?;
    ensure!(
        forged.0 == 40,
        "heartbeats themselves are allowed: {}/40",
        forged.0
    );
    ensure!(
        forged.1 == tonic::Code::PermissionDenied,
        "a worker's ReadIndex: {:?}",
        forged.1
    );
    std::thread::sleep(Duration::from_secs(1));
    let (addr_after, index_after) = version(&lab)?;
    ensure!(
        addr_after == addr_before,
        "a forged heartbeat moved node3 to {addr_after}"
    );
    ensure!(
        index_after == index_before,
        "forged heartbeats wrote node3 ({index_before} -> {index_after})"
    );

    // A join claiming node2's hostname, with a valid token.
    let (worker_token, _) = tokens(&lab)?;
    let node2 = node_id(&lab, "node1", "node2")?;
    let target = remote.clone();
    let refused_join = in_netns(&lab, "node3", move || async move {
        let presented = mesh_common::token::parse(&worker_token)?;
        let unverified = tls::connect(
            &target,
            tls::unverified_client_config(),
            tls::MANAGER_SERVER_NAME,
            WAIT,
        )
        .await?;
        let ca = ClusterClient::new(unverified)
            .get_ca(mesh_proto::Empty {})
            .await?
            .into_inner()
            .ca_cert_pem;
        let (ch, exporter) = tls::connect_bound(
            &target,
            None,
            tls::client_config(&ca, None)?,
            tls::MANAGER_SERVER_NAME,
            WAIT,
        )
        .await?;
        let (_, csr) = pki::new_key_and_csr()?;
        let mut req = mesh_proto::NodeJoinRequest {
            csr_pem: csr,
            advertise_addr: "192.0.2.7".into(),
            hostname: "node2".into(),
            ..Default::default()
        };
        req.proof = mesh_common::token::join_proof(
            &presented.secret,
            mesh_common::token::ProofSide::Node,
            &exporter,
            &mesh_proto::join_request_content(&req),
        );
        let r = ClusterClient::new(ch).join(req).await;
        Ok((code(&r), r.err().map(|s| s.message().to_string())))
    })?;
    let short: String = node2.chars().take(12).collect();
    ensure!(
        refused_join.0 == tonic::Code::AlreadyExists
            && refused_join
                .1
                .as_deref()
                .unwrap_or_default()
                .contains(&format!("hostname node2 is taken by node {short}")),
        "{refused_join:?}"
    );
    ensure!(node_ls(&lab, "node1")?.len() == 3, "a node was added");
    lab.down()?;
    Ok(())
}

/// Finding 6: attach and logs only for the caller's own sandboxes and
/// tasks; aliases cannot shadow services; failed joins are rate-limited.
#[test]
fn nodes_act_only_on_their_own_things() -> Result<()> {
    let lab = up("so", 3, 1, &[])?;
    let remote = cluster_addr(&lab, "node1")?;
    lab.mesh_ok(
        "node1",
        &["network", "create", "-d", "overlay", "--attachable", "app"],
    )?;
    lab.mesh_ok(
        "node2",
        &[
            "run",
            "-d",
            "--name",
            "own2",
            "--network",
            "app",
            "--",
            "sleep",
            "600",
        ],
    )?;
    let own2 = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let mut c = control(&lab, "node2").await?;
            anyhow::Ok(
                c.sandbox_inspect(mesh_proto::SandboxRef {
                    sandbox: "own2".into(),
                })
                .await?
                .into_inner(),
            )
        })?;
    let sandbox_id = own2.id.clone();
    let endpoint_id = own2
        .networks
        .first()
        .map(|n| n.endpoint_id.clone())
        .context("own2 has no endpoint")?;
    lab.mesh_ok(
        "node1",
        &[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "1",
            "--network",
            "app",
            "--constraint",
            "node.hostname==node2",
            "--",
            "sleep",
            "600",
        ],
    )?;
    let task = status(&lab, "node1", "web")?
        .tasks
        .first()
        .map(|t| format!("{}.{}", t.name, t.id))
        .context("web has no task")?;

    // An alias equal to a service name on the network.
    refused(
        &lab,
        "node3",
        &[
            "run",
            "-d",
            "--network",
            "app",
            "--network-alias",
            "web",
            "--",
            "sleep",
            "1",
        ],
        "alias web is the name of a service on network app",
    )?;

    let certs = StateDir::new(&lab.node("node3")?.state_dir).load_certs()?;
    let target = remote.clone();
    let (sid, eid, t) = (sandbox_id.clone(), endpoint_id.clone(), task.clone());
    let results = in_netns(&lab, "node3", move || async move {
        let mut c = ClusterClient::new(channel_as(&certs, &target).await?);
        let mut out = Vec::new();
        let r = c
            .attach(mesh_proto::AttachRequest {
                network: "app".into(),
                sandbox: "own2".into(),
                sandbox_id: sid.clone(),
                ..Default::default()
            })
            .await;
        out.push(("attach another node's sandbox", code(&r), format!("{r:?}")));
        let r = c
            .attach(mesh_proto::AttachRequest {
                network: "app".into(),
                sandbox: "mine".into(),
                sandbox_id: mesh_common::id::new_id(),
                endpoint_id: eid.clone(),
                ..Default::default()
            })
            .await;
        out.push((
            "attach with another node's endpoint ID",
            code(&r),
            format!("{r:?}"),
        ));
        let r = c
            .detach(mesh_proto::DetachRequest { endpoint_id: eid })
            .await;
        out.push(("detach another node's endpoint", code(&r), format!("{r:?}")));
        let r = c
            .publish_logs(mesh_proto::LogChunk {
                request_id: "x".into(),
                lines: vec![mesh_proto::LogLine {
                    task: t,
                    node: "node2".into(),
                    line: "forged".into(),
                    stderr: false,
                }],
                done: true,
            })
            .await;
        out.push(("logs for another node's task", code(&r), format!("{r:?}")));
        Ok(out)
    })?;
    for (what, code, r) in &results {
        ensure!(
            matches!(
                code,
                tonic::Code::PermissionDenied | tonic::Code::FailedPrecondition
            ),
            "{what}: {r}"
        );
    }
    ensure!(
        !format!("{results:?}").contains("10.0."),
        "a refusal leaked an address: {results:?}"
    );
    // Had an attach gone through, node3 would hold an endpoint on app.
    let inspect: serde_json::Value =
        serde_json::from_str(&lab.mesh_ok("node1", &["network", "inspect", "app"])?)?;
    let peers = inspect[0]["Peers"].as_array().context("Peers")?;
    ensure!(
        peers.iter().any(|p| p["Name"] == "node2") && !peers.iter().any(|p| p["Name"] == "node3"),
        "node3 attached anyway: {inspect}"
    );
    lab.mesh_ok("node2", &["exec", "own2", "--", "true"])?;

    // Failed joins from one address are cut off after a few.
    lab.mesh_ok("node3", &["leave"])?;
    let (worker_token, _) = tokens(&lab)?;
    let (head, secret) = worker_token.rsplit_once('-').context("token shape")?;
    let wrong = format!("{head}-{}", "0".repeat(secret.len()));
    let mut last = String::new();
    for _ in 0..mesh_manager::join_limit::MAX_FAILURES {
        let (c, _, err) = mesh(&lab, "node3", &["join", "--token", &wrong, &remote])?;
        ensure!(c != 0 && err.contains("invalid join token"), "{err}");
    }
    for _ in 0..2 {
        let (c, _, err) = mesh(&lab, "node3", &["join", "--token", &worker_token, &remote])?;
        ensure!(c != 0, "joined despite the rate limit");
        last = err;
    }
    ensure!(last.contains("too many failed join attempts"), "{last}");
    let name = lab.name.clone();
    lab.down()?;
    bail_if_left(&name)
}

fn bail_if_left(name: &str) -> Result<()> {
    let left = netns_with_prefix(name);
    if !left.is_empty() {
        bail!("namespaces left: {left:?}");
    }
    Ok(())
}
