//! `mesh service create|ls|ps|inspect|update|scale|rm|logs`: resolves
//! network names, fills in Docker's defaults and checks the spec before
//! proposing it, so mistakes are refused at once rather than by Raft;
//! placement, addresses and rollouts are decided inside the state machine
//! (`crate::services`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use mesh_common::model::{EndpointMode, NodeState, RestartCondition, ServiceMode, TaskState};
use mesh_proto::{LogLine, ServiceCreateRequest, ServiceStatusReply, ServiceUpdateRequest};
use tokio::sync::mpsc;
use tonic::Status;

use crate::logs::LogError;
use crate::manager::{Manager, ManagerError, now};
use crate::pb::service::{port_from_pb, service_to_pb, task_to_pb};
use crate::services::{
    DEFAULT_RESTART_DELAY_MS, HealthCheck, PortSpec, Service, ServiceSpec, Task, check_user_words,
    validate,
};
use crate::state::{ClusterState, Command, CommandResult};
use mesh_common::refusal::Refusal;

/// How long a write's result may take to reach this manager's copy of the
/// state (it was committed by the leader, which may be another manager).
const LOCAL_APPLY_WAIT: Duration = Duration::from_secs(2);
/// An update that lost a race with another change is recomputed and
/// retried this many times before the user is told.
const UPDATE_RETRIES: usize = 3;

/// Which local driver serves a network name on this node, if one does:
/// the daemon knows its local networks, the managers do not.
pub type LocalDriver<'a> = &'a (dyn Fn(&str) -> Option<String> + Sync);

fn find(s: &ClusterState, r: &str) -> Result<Service, Refusal> {
    s.find_service(r).cloned()
}

/// A `--network` reference as a cluster network ID. Local networks (bridge,
/// macvlan, host, none) exist on one node only, so they get their own
/// refusal saying what to use instead.
fn resolve_network(
    s: &ClusterState,
    r: &str,
    local_driver: LocalDriver,
) -> Result<String, Refusal> {
    match s.find_network(r) {
        Ok(n) => Ok(n.id.clone()),
        Err(e) => match local_driver(r) {
            Some(driver) => Err(Refusal::precondition(format!(
                "network {r} is a local network (driver {driver}); services need an overlay network: create one with `mesh network create -d overlay {r}`"
            ))),
            None => Err(e),
        },
    }
}

/// A word of a create request, or its default when left out.
fn word<T: std::str::FromStr<Err = mesh_common::model::UnknownWord>>(
    s: &str,
    default: T,
) -> Result<T, Refusal> {
    if s.is_empty() {
        Ok(default)
    } else {
        Ok(s.parse()?)
    }
}

/// The spec a create asks for, with Docker's defaults; networks are given
/// already resolved to IDs.
pub fn spec_from_create(
    r: ServiceCreateRequest,
    networks: Vec<String>,
) -> Result<ServiceSpec, Refusal> {
    let mode = word(&r.mode, ServiceMode::Replicated)?;
    if mode == ServiceMode::Global && r.has_replicas {
        return Err(Refusal::invalid(
            "replicas can only be used with replicated mode",
        ));
    }
    let replicas = match (mode, r.has_replicas) {
        (ServiceMode::Global, _) => 0,
        (_, true) => r.replicas,
        (_, false) => 1,
    };
    let ports = r
        .ports
        .iter()
        .map(port_from_pb)
        .collect::<Result<Vec<_>, _>>()?;
    let spec = ServiceSpec {
        ports,
        name: r.name,
        mode,
        replicas,
        networks,
        endpoint_mode: word(&r.endpoint_mode, EndpointMode::Vip)?,
        env: r.env,
        constraints: r.constraints,
        restart_condition: word(&r.restart_condition, RestartCondition::Any)?,
        restart_delay_ms: if r.has_restart_delay {
            r.restart_delay_ms
        } else {
            DEFAULT_RESTART_DELAY_MS
        },
        restart_max_attempts: r.restart_max_attempts,
        cmd: r.cmd,
        labels: r.labels.into_iter().collect(),
        health: r.health.as_ref().map(HealthCheck::from_pb),
    };
    validate(&spec)?;
    check_user_words(&spec)?;
    Ok(spec)
}

/// Sets `K=V` in an environment list: replaces the variable where it is,
/// or appends it, so the order users gave is kept.
pub fn env_set(env: &mut Vec<String>, kv: &str) {
    let key = kv.split_once('=').map_or(kv, |(k, _)| k);
    match env
        .iter_mut()
        .find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key)
    {
        Some(e) => *e = kv.to_string(),
        None => env.push(kv.to_string()),
    }
}

/// Removes every `KEY=...` (or bare `KEY`) from an environment list.
pub fn env_unset(env: &mut Vec<String>, key: &str) {
    env.retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != key);
}

/// `--publish-rm` and `--publish-add` on a spec. `allocated` is the
/// service's `endpoint_ports` (in the spec's order), so `8080` also names
/// a port the managers allocated. Removals come first, so a port can be
/// replaced in one update; an added port replaces one with the same
/// published port and protocol.
pub fn update_ports(
    spec: &mut ServiceSpec,
    allocated: &[PortSpec],
    add: &[mesh_proto::PortConfig],
    rm: &[String],
) -> Result<(), Refusal> {
    let mut ports: Vec<(PortSpec, Option<u16>)> = spec
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                *p,
                p.published.or(allocated.get(i).and_then(|a| a.published)),
            )
        })
        .collect();
    for r in rm {
        let (port, protocol) = mesh_common::ports::parse_port_ref(r)
            .map_err(|e| Refusal::invalid(format!("invalid --publish-rm {r:?}: {}", e.why)))?;
        let before = ports.len();
        ports.retain(|(p, published)| {
            !(*published == Some(port) && protocol.is_none_or(|x| x == p.protocol))
        });
        if ports.len() == before {
            return Err(Refusal::invalid(format!(
                "no published port {port}/{} on service {}",
                protocol.unwrap_or_default(),
                spec.name
            )));
        }
    }
    for a in add {
        let p = port_from_pb(a)?;
        if let Some(n) = p.published {
            ports.retain(|(q, published)| !(*published == Some(n) && q.protocol == p.protocol));
        }
        ports.push((p, p.published));
    }
    spec.ports = ports.into_iter().map(|(p, _)| p).collect();
    Ok(())
}

/// The spec an update asks for, computed from the current one. Networks to
/// add and remove come as (what the user wrote, network ID); `allocated`
/// is the service's allocated ports (for `--publish-rm`).
pub fn updated_spec(
    old: &ServiceSpec,
    allocated: &[PortSpec],
    r: &ServiceUpdateRequest,
    net_add: &[(String, String)],
    net_rm: &[(String, String)],
) -> Result<ServiceSpec, Refusal> {
    let mut spec = old.clone();
    update_ports(&mut spec, allocated, &r.publish_add, &r.publish_rm)?;
    if let Some(n) = r.replicas {
        if spec.mode != ServiceMode::Replicated {
            return Err(Refusal::invalid(
                "replicas can only be used with replicated mode",
            ));
        }
        spec.replicas = n;
    }
    for (given, id) in net_rm {
        let before = spec.networks.len();
        spec.networks.retain(|n| n != id);
        if spec.networks.len() == before {
            return Err(Refusal::invalid(format!(
                "service {} is not attached to network {given}",
                old.name
            )));
        }
    }
    for (given, id) in net_add {
        if spec.networks.contains(id) {
            return Err(Refusal::invalid(format!(
                "service {} is already attached to network {given}",
                old.name
            )));
        }
        spec.networks.push(id.clone());
    }
    for k in &r.env_rm {
        env_unset(&mut spec.env, k);
    }
    for kv in &r.env_add {
        if kv.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
            return Err(Refusal::invalid(format!(
                "invalid environment variable {kv:?}: use --env-add KEY=VALUE"
            )));
        }
        env_set(&mut spec.env, kv);
    }
    for c in &r.constraint_rm {
        spec.constraints.retain(|x| x.trim() != c.trim());
    }
    for c in &r.constraint_add {
        if !spec.constraints.iter().any(|x| x.trim() == c.trim()) {
            spec.constraints.push(c.clone());
        }
    }
    if let Some(h) = &r.health {
        spec.health = HealthCheck::updated(old.health.as_ref(), h)?;
    }
    validate(&spec)?;
    check_user_words(&spec)?;
    Ok(spec)
}

/// Up to 25 ms per attempt so far, at random.
fn jitter(attempt: usize) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    Duration::from_millis(r % (25 * attempt as u64 + 1))
}

/// Waits until this manager's copy of the state shows `done`: a write
/// committed by a leader elsewhere lands here a moment later, and the CLI
/// reads its progress back from here.
async fn wait_local(mgr: &Manager, done: impl Fn(&ClusterState) -> bool) {
    let mut applied = mgr.sm.subscribe();
    let deadline = tokio::time::Instant::now() + LOCAL_APPLY_WAIT;
    while !mgr.read(&done) {
        match tokio::time::timeout_at(deadline, applied.changed()).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

fn service_reply(mgr: &Manager, r: CommandResult) -> Result<mesh_proto::Service, Status> {
    match r {
        CommandResult::Service(svc) => Ok(mgr.read(|s| service_to_pb(s, &svc))),
        _ => Err(Status::internal("unexpected result")),
    }
}

pub async fn create(
    mgr: &Manager,
    r: ServiceCreateRequest,
    local: LocalDriver<'_>,
) -> Result<mesh_proto::Service, Status> {
    let networks = mgr.read(|s| {
        r.networks
            .iter()
            .map(|n| resolve_network(s, n, local))
            .collect::<Result<Vec<_>, _>>()
    })?;
    let spec = spec_from_create(r, networks)?;
    let cmd = Command::CreateService {
        id: mesh_common::id::new_id(),
        spec,
        at: now(),
    };
    let res = mgr.write(cmd).await?;
    if let CommandResult::Service(svc) = &res {
        let (id, v) = (svc.id.clone(), svc.version);
        wait_local(mgr, |s| s.services.get(&id).is_some_and(|x| x.version >= v)).await;
    }
    service_reply(mgr, res)
}

pub fn list(mgr: &Manager) -> mesh_proto::ServiceList {
    mgr.read(|s| {
        let mut services: Vec<mesh_proto::Service> = s
            .services
            .values()
            .map(|svc| service_to_pb(s, svc))
            .collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        mesh_proto::ServiceList { services }
    })
}

pub async fn status(mgr: &Manager, r: &str) -> Result<ServiceStatusReply, Status> {
    // The state first, then convergence: nodes that caught up with a newer
    // state have also applied this one.
    let (service, tasks) = mgr.read(|s| {
        let (service, id) = match find(s, r) {
            Ok(svc) => (Some(service_to_pb(s, &svc)), svc.id),
            // A removed service, by full ID, while its tasks are still
            // stopping: no service, its remaining tasks (what `service rm`
            // waits for). NotFound once they are gone.
            Err(e) if s.tasks.values().any(|t| t.service_id == r) => {
                if e.kind != mesh_common::refusal::RefusalKind::NotFound {
                    return Err(e);
                }
                (None, r.to_string())
            }
            Err(e) => return Err(e),
        };
        let mut tasks: Vec<&Task> = s.tasks.values().filter(|t| t.service_id == id).collect();
        let host = |t: &Task| s.nodes.get(&t.node_id).map(|n| n.hostname.clone());
        tasks.sort_by_cached_key(|t| {
            (
                t.slot,
                if t.slot == 0 { host(t) } else { None },
                t.desired_state != TaskState::Running,
                std::cmp::Reverse((rfc3339(&t.created_at), t.version)),
            )
        });
        let tasks: Vec<mesh_proto::Task> = tasks.into_iter().map(|t| task_to_pb(s, t)).collect();
        Ok::<_, Refusal>((service, tasks))
    })?;
    let behind = mgr.wait_converged("", Duration::ZERO).await?;
    let behind: Vec<String> = mgr.read(|s| {
        behind
            .iter()
            .map(|id| s.nodes.get(id).map_or(id.clone(), |n| n.hostname.clone()))
            .collect()
    });
    Ok(ServiceStatusReply {
        service,
        tasks,
        converged: behind.is_empty(),
        behind,
    })
}

pub async fn update(
    mgr: &Manager,
    r: ServiceUpdateRequest,
    local: LocalDriver<'_>,
) -> Result<mesh_proto::Service, Status> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (id, version, spec) = mgr.read(|s| {
            let svc = find(s, &r.service)?;
            let resolve = |refs: &[String]| {
                refs.iter()
                    .map(|n| Ok((n.clone(), resolve_network(s, n, local)?)))
                    .collect::<Result<Vec<_>, Refusal>>()
            };
            let add = resolve(&r.network_add)?;
            let rm = resolve(&r.network_rm)?;
            let spec = updated_spec(&svc.spec, &svc.endpoint_ports, &r, &add, &rm)?;
            Ok::<_, Refusal>((svc.id, svc.version, spec))
        })?;
        let cmd = Command::UpdateService {
            id: id.clone(),
            spec,
            force: r.force,
            version,
            at: now(),
        };
        match mgr.write(cmd).await {
            Ok(res) => {
                if let CommandResult::Service(svc) = &res {
                    let v = svc.version;
                    wait_local(mgr, |s| s.services.get(&id).is_some_and(|x| x.version >= v)).await;
                }
                return service_reply(mgr, res);
            }
            Err(ManagerError::Refused(m))
                if m.contains("changed by someone else meanwhile") && attempt <= UPDATE_RETRIES =>
            {
                // Recompute from the newer version once it is here, after a
                // random pause so racing updaters do not collide again.
                wait_local(mgr, |s| {
                    s.services.get(&id).is_none_or(|x| x.version != version)
                })
                .await;
                tokio::time::sleep(jitter(attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

pub async fn remove(mgr: &Manager, r: &str) -> Result<mesh_proto::Service, Status> {
    let svc = mgr.read(|s| find(s, r))?;
    let cmd = Command::RemoveService {
        id: svc.id.clone(),
        at: now(),
    };
    let res = mgr.write(cmd).await?;
    wait_local(mgr, |s| !s.services.contains_key(&svc.id)).await;
    service_reply(mgr, res)
}

/// Asks every Ready node holding tasks of the service for their logs and
/// forwards the lines as they come. Nodes that are down or not connected to
/// this manager are skipped; one that goes silent is given up after the log
/// router's timeout, and the stream then ends with an error naming it.
pub fn logs(mgr: Arc<Manager>, r: &str) -> Result<mpsc::Receiver<Result<LogLine, Status>>, Status> {
    type Asks = BTreeMap<String, (String, Vec<String>)>;
    let (by_node, names): (Asks, HashMap<String, String>) = mgr.read(|s| {
        let svc = find(s, r)?;
        let mut out = Asks::new();
        let mut names = HashMap::new();
        for t in s.tasks.values().filter(|t| t.service_id == svc.id) {
            let Some(node) = s
                .nodes
                .get(&t.node_id)
                .filter(|n| n.state == NodeState::Ready)
            else {
                continue;
            };
            out.entry(node.id.clone())
                .or_insert_with(|| (node.hostname.clone(), Vec::new()))
                .1
                .push(t.id.clone());
            names.insert(t.id.clone(), s.task_sandbox_name(t));
        }
        Ok::<_, Refusal>((out, names))
    })?;
    let names = Arc::new(names);
    let (tx, rx) = mpsc::channel(256);
    let mut asks = Vec::new();
    for (node_id, (hostname, task_ids)) in by_node {
        let mgr = mgr.clone();
        let tx = tx.clone();
        let names = names.clone();
        // Each ask ends with the node's failure to answer, if it failed.
        asks.push(tokio::spawn(async move {
            let mut chunks = match mgr.logs.request(&node_id, &hostname, task_ids).await {
                Ok(c) => c,
                Err(e @ LogError::Timeout { .. }) => return Some(e),
                Err(e) => {
                    tracing::debug!("service logs: {e}");
                    return None;
                }
            };
            loop {
                let chunk = match chunks.next().await {
                    Ok(Some(c)) => c,
                    Ok(None) => return None,
                    Err(e) => return Some(e),
                };
                for mut line in chunk.lines {
                    // Docker's prefix: SERVICE.SLOT.TASKID@HOSTNAME.
                    if let Some(name) = names.get(&line.task) {
                        line.task = name.clone();
                    }
                    if line.node.is_empty() || line.node == node_id {
                        line.node = hostname.clone();
                    }
                    if tx.send(Ok(line)).await.is_err() {
                        return None;
                    }
                }
            }
        }));
    }
    // The stream ends once every node has answered or been given up.
    tokio::spawn(async move {
        let mut silent = Vec::new();
        for ask in asks {
            if let Ok(Some(e)) = ask.await {
                silent.push(e.to_string());
            }
        }
        if !silent.is_empty() {
            let _ = tx.send(Err(Status::unavailable(silent.join("; ")))).await;
        }
    });
    Ok(rx)
}

fn rfc3339(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::model::Protocol;

    fn create_req() -> ServiceCreateRequest {
        ServiceCreateRequest {
            name: "web".into(),
            cmd: vec!["sleep".into(), "1000".into()],
            ..Default::default()
        }
    }

    #[test]
    fn create_defaults() {
        let spec = spec_from_create(create_req(), vec![]).expect("valid");
        assert_eq!(spec.mode, ServiceMode::Replicated);
        assert_eq!(spec.replicas, 1);
        assert_eq!(spec.endpoint_mode, EndpointMode::Vip);
        assert_eq!(spec.restart_condition, RestartCondition::Any);
        assert_eq!(spec.restart_delay_ms, DEFAULT_RESTART_DELAY_MS);

        let mut r = create_req();
        r.has_replicas = true;
        r.replicas = 0;
        r.has_restart_delay = true;
        r.restart_delay_ms = 0;
        let spec = spec_from_create(r, vec![]).expect("valid");
        assert_eq!((spec.replicas, spec.restart_delay_ms), (0, 0));
    }

    #[test]
    fn create_refusals() {
        let mut r = create_req();
        r.mode = "global".into();
        r.has_replicas = true;
        r.replicas = 2;
        assert_eq!(
            spec_from_create(r, vec![])
                .err()
                .map(|e| e.message)
                .as_deref(),
            Some("replicas can only be used with replicated mode")
        );
        let mut r = create_req();
        r.cmd.clear();
        assert!(spec_from_create(r, vec![]).is_err_and(|e| e.contains("no command")));
        let mut r = create_req();
        r.env = vec!["=x".into()];
        assert!(spec_from_create(r, vec![]).is_err());
    }

    #[test]
    fn env_merge() {
        let mut env = vec!["A=1".to_string(), "B=2".into(), "C=3".into()];
        env_set(&mut env, "B=20");
        env_set(&mut env, "D=4");
        assert_eq!(env, ["A=1", "B=20", "C=3", "D=4"]);
        env_unset(&mut env, "A");
        env_unset(&mut env, "missing");
        assert_eq!(env, ["B=20", "C=3", "D=4"]);
        // A key is matched whole, not as a prefix.
        env_set(&mut env, "C3=x");
        assert_eq!(env, ["B=20", "C=3", "D=4", "C3=x"]);
    }

    #[test]
    fn update_spec() {
        let old = spec_from_create(create_req(), vec!["n1".into()]).expect("valid");
        let r = ServiceUpdateRequest {
            replicas: Some(3),
            env_add: vec!["X=1".into()],
            constraint_add: vec!["node.role==worker".into()],
            ..Default::default()
        };
        let add = [("front".to_string(), "n2".to_string())];
        let rm = [("back".to_string(), "n1".to_string())];
        let spec = updated_spec(&old, &[], &r, &add, &rm).expect("valid");
        assert_eq!(spec.replicas, 3);
        assert_eq!(spec.networks, ["n2"]);
        assert_eq!(spec.env, ["X=1"]);
        assert_eq!(spec.constraints, ["node.role==worker"]);

        let none = ServiceUpdateRequest::default();
        assert!(
            updated_spec(&old, &[], &none, &[], &[("x".into(), "n9".into())])
                .is_err_and(|e| e.contains("not attached to network x"))
        );
        assert!(
            updated_spec(&old, &[], &none, &[("y".into(), "n1".into())], &[])
                .is_err_and(|e| e.contains("already attached"))
        );
        let bad = ServiceUpdateRequest {
            constraint_add: vec!["colour==blue".into()],
            ..Default::default()
        };
        assert!(updated_spec(&old, &[], &bad, &[], &[]).is_err());

        let mut global = old.clone();
        global.mode = ServiceMode::Global;
        assert!(
            updated_spec(&global, &[], &r, &[], &[]).is_err_and(|e| e.contains("replicated mode"))
        );
    }

    #[test]
    fn publish_add_and_rm() {
        use mesh_common::model::PublishMode;
        let mut r = create_req();
        r.ports = vec![
            mesh_proto::PortConfig {
                target_port: 80,
                published_port: 8080,
                ..Default::default()
            },
            mesh_proto::PortConfig {
                protocol: "udp".into(),
                target_port: 53,
                published_port: 8080,
                ..Default::default()
            },
            mesh_proto::PortConfig {
                target_port: 90,
                ..Default::default()
            },
        ];
        let spec = spec_from_create(r, vec![]).expect("valid");
        assert_eq!(spec.ports.len(), 3);
        assert_eq!(spec.ports[2].published, None);
        assert_eq!(spec.ports[0].mode, PublishMode::Ingress);
        let mut allocated = spec.ports.clone();
        allocated[2].published = Some(30000);

        let mut s = spec.clone();
        update_ports(&mut s, &allocated, &[], &["8080/udp".into()]).expect("valid");
        assert_eq!(s.ports.len(), 2);
        assert_eq!(s.ports[0].protocol, Protocol::Tcp);
        let mut s = spec.clone();
        update_ports(&mut s, &allocated, &[], &["8080".into()]).expect("valid");
        assert_eq!(s.ports.len(), 1, "every protocol");
        let mut s = spec.clone();
        update_ports(&mut s, &allocated, &[], &["30000".into()]).expect("valid");
        assert_eq!(s.ports.len(), 2, "an allocated port is named by its number");
        let mut s = spec.clone();
        let e = update_ports(&mut s, &allocated, &[], &["9999/tcp".into()]).expect_err("none");
        assert_eq!(e.to_string(), "no published port 9999/tcp on service web");
        assert!(update_ports(&mut s, &allocated, &[], &["80/sctp".into()]).is_err());
        assert!(update_ports(&mut s, &allocated, &[], &["0".into()]).is_err());
        let add = mesh_proto::PortConfig {
            target_port: 81,
            published_port: 8080,
            publish_mode: "host".into(),
            ..Default::default()
        };
        let mut s = spec.clone();
        update_ports(&mut s, &allocated, &[add], &[]).expect("valid");
        assert_eq!(s.ports.len(), 3, "replaces 8080/tcp");
        assert_eq!(s.ports[2].target, 81);
        for bad in [
            mesh_proto::PortConfig {
                target_port: 0,
                ..Default::default()
            },
            mesh_proto::PortConfig {
                target_port: 80,
                published_port: 70000,
                ..Default::default()
            },
            mesh_proto::PortConfig {
                target_port: 80,
                protocol: "sctp".into(),
                ..Default::default()
            },
            mesh_proto::PortConfig {
                target_port: 80,
                publish_mode: "global".into(),
                ..Default::default()
            },
            mesh_proto::PortConfig {
                target_port: 80,
                publish_mode: "host".into(),
                ..Default::default()
            },
        ] {
            let mut r = create_req();
            r.ports = vec![bad.clone()];
            assert!(spec_from_create(r, vec![]).is_err(), "{bad:?}");
        }
    }
}
