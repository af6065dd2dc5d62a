//! `mesh network create|ls|inspect|rm|prune` for cluster (overlay)
//! networks: checks what can be checked before Raft (names, options, flag
//! combinations), then proposes; subnets and VNIs are allocated inside the
//! state machine. Local networks are the node's own
//! (`mesh_worker::local_request`).

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_common::id::check_network_name as check_name;
use mesh_common::model::DriverKind;
use mesh_proto::NetworkCreateRequest;
use tonic::Status;

use crate::dispatcher::MTU_OPTIONS;
use crate::manager::{Manager, ManagerError, now};
use crate::pb::network::network_to_pb;
use crate::state::{
    Command, CommandResult, NO_OVERLAP_CHECK, Network, NetworkSpec, no_such_network,
};
use mesh_common::refusal::{Refusal, RefusalKind};

/// The driver a create asks for (Docker's default is a local bridge).
pub fn driver_of(r: &NetworkCreateRequest) -> &str {
    DriverKind::requested(&r.driver)
}

/// `--opt encrypted` on a local driver: only overlays cross nodes, so only
/// they can be carried in WireGuard.
pub fn encrypted_needs_overlay(driver: &str) -> Refusal {
    Refusal::invalid(format!(
        "--opt encrypted needs -d overlay: a {driver} network never leaves this node, so there is nothing to encrypt"
    ))
}

/// A cluster network request, checked, with Docker's option spellings
/// folded into ours.
pub fn spec_from(r: NetworkCreateRequest) -> Result<NetworkSpec, Refusal> {
    check_name(&r.name)?;
    // Before Raft, so entries already in the log replay as they did.
    mesh_common::input::check_network_words(&r.subnet, &r.labels)?;
    if driver_of(&r) != DriverKind::Overlay.as_str() {
        if r.options.contains_key("encrypted") {
            return Err(encrypted_needs_overlay(driver_of(&r)));
        }
        return Err(Refusal::invalid(format!(
            "{} is a local driver, not a cluster one",
            driver_of(&r)
        )));
    }
    let mut options: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in r.options {
        match k.as_str() {
            // Carried in WireGuard between nodes. Docker ignores the
            // value and shows `"encrypted": ""`: so do we.
            "encrypted" => {
                options.insert(k, String::new());
            }
            // The escape hatch of the check against the nodes' own routes
            // (done in `apply`); a flag, shown as Docker shows flags.
            NO_OVERLAP_CHECK => {
                if !v.is_empty() && v != "true" {
                    return Err(Refusal::invalid(format!(
                        "--opt {NO_OVERLAP_CHECK} takes no value (got {v:?}): pass --opt {NO_OVERLAP_CHECK} to skip the check, leave it out to keep it"
                    )));
                }
                options.insert(k, String::new());
            }
            // Kept under the name given, as `network inspect` shows it;
            // `dispatcher::network_mtu` reads either.
            k2 if MTU_OPTIONS.contains(&k2) => match v.parse::<u32>() {
                Ok(mtu) if (68..=65535).contains(&mtu) => {
                    if options.keys().any(|o| MTU_OPTIONS.contains(&o.as_str())) {
                        return Err(Refusal::invalid(
                            "the MTU is given twice: use one of --opt mtu=N or --opt com.docker.network.driver.mtu=N",
                        ));
                    }
                    options.insert(k, mtu.to_string());
                }
                _ => {
                    return Err(Refusal::invalid(format!(
                        "invalid {k} {v:?}: use --opt {k}=N with N between 68 and 65535"
                    )));
                }
            },
            _ => {
                return Err(Refusal::invalid(format!(
                    "unknown option {k:?} for the overlay driver: use --opt mtu=N (or com.docker.network.driver.mtu=N), --opt encrypted or --opt {NO_OVERLAP_CHECK}"
                )));
            }
        }
    }
    if r.subnet.is_empty() && (!r.gateway.is_empty() || !r.ip_range.is_empty()) {
        return Err(Refusal::invalid("--gateway and --ip-range need --subnet"));
    }
    if r.ingress && r.attachable {
        return Err(Refusal::invalid(
            "an ingress network cannot be attachable; drop --attachable",
        ));
    }
    if r.ingress && r.internal {
        return Err(Refusal::invalid(
            "an ingress network cannot be internal; drop --internal",
        ));
    }
    let opt = |s: String| (!s.is_empty()).then_some(s);
    Ok(NetworkSpec {
        name: r.name,
        driver: DriverKind::Overlay,
        subnet: opt(r.subnet),
        gateway: opt(r.gateway),
        ip_range: opt(r.ip_range),
        attachable: r.attachable,
        internal: r.internal,
        ingress: r.ingress,
        options,
        labels: r.labels.into_iter().collect(),
    })
}

/// Creates a cluster network. `local_taken` says whether this node already
/// has a local network of that name (names are unique across both).
pub async fn create(
    mgr: &Manager,
    r: NetworkCreateRequest,
    local_taken: bool,
) -> Result<mesh_proto::Network, Status> {
    let spec = spec_from(r)?;
    if local_taken {
        return Err(Refusal::already_exists(format!(
            "network with name {} already exists on this node",
            spec.name
        ))
        .into());
    }
    let cmd = Command::CreateNetwork {
        id: mesh_common::id::new_id(),
        spec,
        at: now(),
    };
    match mgr.write(cmd).await? {
        CommandResult::Network(n) => Ok(mgr.read(|s| network_to_pb(s, &n, &mgr.node_id))),
        _ => Err(Status::internal("unexpected result")),
    }
}

pub fn list(mgr: &Manager) -> Vec<mesh_proto::Network> {
    mgr.read(|s| {
        s.networks
            .values()
            .map(|n| network_to_pb(s, n, &mgr.node_id))
            .collect()
    })
}

/// One network, or Docker's "No such network" (an ambiguous prefix keeps
/// its own refusal).
pub fn inspect(mgr: &Manager, r: &str) -> Result<mesh_proto::Network, Refusal> {
    mgr.read(|s| match s.find_network(r) {
        Ok(n) => Ok(network_to_pb(s, n, &mgr.node_id)),
        Err(e) if e.kind == RefusalKind::NotFound => Err(no_such_network(r)),
        Err(e) => Err(e),
    })
}

/// How long `network rm` waits for tasks already being removed (a
/// `service rm --detach`, or one still stopping) to let go of the network:
/// more than a task's 10 s stop grace and a lost node's 2 s to Down.
pub const RM_WAIT: Duration = Duration::from_secs(30);

/// Removes a cluster network. Refused while anything uses it, except that
/// when its only users are tasks on their way out, it waits for them (up
/// to [`RM_WAIT`]), so `service rm X` then `network rm N` works at once.
pub async fn remove(mgr: &Manager, r: &str) -> Result<mesh_proto::Network, Status> {
    let net = mgr.read(|s| s.find_network(r).cloned())?;
    let deadline = tokio::time::Instant::now() + RM_WAIT;
    let mut applied = mgr.sm.subscribe();
    loop {
        let refused = match mgr
            .write(Command::RemoveNetwork { id: net.id.clone() })
            .await
        {
            Ok(_) => return Ok(mgr.read(|s| network_to_pb(s, &net, &mgr.node_id))),
            // In use: maybe only by tasks on their way out.
            Err(ManagerError::Refused(r)) if r.kind == RefusalKind::FailedPrecondition => r,
            Err(e) => return Err(e.into()),
        };
        // The leader refused from its state: judge the users from a state
        // at least that new, not from this manager's possibly older copy.
        // Users that left meanwhile count as leaving: the retry succeeds.
        if mgr.ensure_current().await.is_err()
            || !mgr.read(|s| s.network_held_only_by_leaving_tasks(&net.id))
        {
            return Err(refused.into());
        }
        if tokio::time::Instant::now() >= deadline {
            let users = mgr.read(|s| s.network_users(&net.id)).join(", ");
            return Err(Refusal::precondition(format!(
                "network {} is still in use after {}s by {users}: tasks being removed whose nodes have not confirmed they stopped; retry once they have (see `mesh node ls`)",
                net.spec.name,
                RM_WAIT.as_secs()
            ))
            .into());
        }
        // Retry at the next change applied here, or after a second.
        let next = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
        let _ = tokio::time::timeout_at(next, applied.changed()).await;
    }
}

/// Removes every cluster network nothing uses; ingress belongs to the
/// cluster and stays.
pub async fn prune(mgr: &Manager) -> Result<Vec<mesh_proto::Network>, Status> {
    let unused: Vec<Network> = mgr.read(|s| {
        s.networks
            .values()
            .filter(|n| !n.spec.ingress && s.network_users(&n.id).is_empty())
            .cloned()
            .collect()
    });
    let mut removed = Vec::new();
    for n in unused {
        match mgr.write(Command::RemoveNetwork { id: n.id.clone() }).await {
            Ok(_) => removed.push(mgr.read(|s| network_to_pb(s, &n, &mgr.node_id))),
            // Someone started using it meanwhile: keep it.
            Err(ManagerError::Refused(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::refusal::RefusalKind;

    fn req(name: &str) -> NetworkCreateRequest {
        NetworkCreateRequest {
            name: name.into(),
            driver: "overlay".into(),
            ..Default::default()
        }
    }

    #[test]
    fn names() {
        assert!(mesh_common::id::valid_name("front-end_1.x"));
        assert!(!mesh_common::id::valid_name(""));
        assert!(!mesh_common::id::valid_name("-x"));
        assert!(!mesh_common::id::valid_name("a b"));
        assert!(spec_from(req("bad name")).is_err());
    }

    #[test]
    fn drivers_and_options() {
        let mut r = req("n");
        r.driver = String::new();
        assert!(spec_from(r).is_err_and(|e| e.contains("local driver")));
        let mut r = req("n");
        r.options
            .insert("com.docker.network.driver.mtu".into(), "1400".into());
        let spec = spec_from(r).expect("valid");
        assert_eq!(
            spec.options
                .get("com.docker.network.driver.mtu")
                .map(String::as_str),
            Some("1400"),
            "kept as given"
        );
        assert_eq!(crate::dispatcher::network_mtu(&spec), 1400);
        for value in ["", "yes", "false"] {
            let mut r = req("n");
            r.options.insert("encrypted".into(), value.into());
            let spec = spec_from(r).expect("encrypted overlays are accepted");
            assert_eq!(
                spec.options.get("encrypted").map(String::as_str),
                Some(""),
                "recorded as Docker shows it, whatever the value"
            );
        }
        let mut r = req("n");
        r.driver = "bridge".into();
        r.options.insert("encrypted".into(), String::new());
        assert!(spec_from(r).is_err_and(|e| e.contains("needs -d overlay")));
        let mut r = req("n");
        r.options.insert("mtu".into(), "70000".into());
        assert!(spec_from(r).is_err());
        for bad in ["67", "x", ""] {
            let mut r = req("n");
            r.options.insert("mtu".into(), bad.into());
            assert!(spec_from(r).is_err_and(|e| e.contains("between 68 and 65535")));
        }
        let mut r = req("n");
        r.options.insert("mtu".into(), "68".into());
        assert_eq!(
            crate::dispatcher::network_mtu(&spec_from(r).expect("valid")),
            68
        );
        let mut r = req("n");
        r.options.insert("colour".into(), "blue".into());
        assert!(spec_from(r).is_err_and(|e| e.contains("unknown option")));
    }

    #[test]
    fn flag_combinations() {
        let mut r = req("n");
        r.gateway = "10.1.0.1".into();
        assert!(spec_from(r).is_err_and(|e| e.contains("need --subnet")));
        let mut r = req("n");
        r.ingress = true;
        r.attachable = true;
        assert!(spec_from(r).is_err_and(|e| e.kind == RefusalKind::InvalidArgument));
    }
}
