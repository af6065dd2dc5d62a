//! Services driven through commands, as Raft would apply them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use mesh_common::model::{
    Availability, DriverKind, EndpointMode, NodeState, RestartCondition, ServiceMode, TaskState,
};

use super::*;
use crate::state::{ClusterInfo, ClusterState, Command, CommandResult, NetworkSpec, Node};

struct Lab {
    s: ClusterState,
    i: u64,
}

impl Lab {
    fn new(nodes: &[&str]) -> Self {
        let mut s = ClusterState::default();
        let node = |id: &str| Node {
            id: id.into(),
            hostname: id.into(),
            role: mesh_common::model::NodeRole::Worker,
            availability: Availability::Active,
            state: NodeState::Ready,
            addr: format!("192.168.0.{}", id.len()),
            ..Default::default()
        };
        s.apply(
            1,
            &Command::Init {
                cluster: ClusterInfo {
                    id: "c".into(),
                    ..Default::default()
                },
                node: node(nodes[0]),
                ingress: Some("ing".into()),
            },
        );
        let mut lab = Lab { s, i: 1 };
        for n in &nodes[1..] {
            lab.cmd(Command::AddNode { node: node(n) });
        }
        lab.cmd(Command::CreateNetwork {
            id: "net".into(),
            spec: NetworkSpec {
                name: "app".into(),
                driver: DriverKind::Overlay,
                ..Default::default()
            },
            at: "t".into(),
        });
        lab
    }

    fn cmd(&mut self, c: Command) -> CommandResult {
        self.i += 1;
        self.s.apply(self.i, &c)
    }

    fn create(&mut self, id: &str, f: impl FnOnce(&mut ServiceSpec)) -> CommandResult {
        let mut spec = ServiceSpec {
            name: id.into(),
            mode: ServiceMode::Replicated,
            replicas: 1,
            networks: vec!["net".into()],
            endpoint_mode: EndpointMode::Vip,
            restart_condition: RestartCondition::Any,
            cmd: vec!["sleep".into(), "1000".into()],
            ..Default::default()
        };
        f(&mut spec);
        self.cmd(Command::CreateService {
            id: id.into(),
            spec,
            at: "t".into(),
        })
    }

    /// Endpoints of tasks (every node also has its ingress sandbox's).
    fn task_endpoints(&self) -> impl Iterator<Item = &crate::state::Endpoint> {
        self.s
            .endpoints
            .values()
            .filter(|e| !crate::state::is_ingress_sbox(e))
    }

    fn live(&self, svc: &str) -> Vec<Task> {
        self.s
            .tasks
            .values()
            .filter(|t| t.service_id == svc && t.desired_state == TaskState::Running)
            .cloned()
            .collect()
    }

    fn per_node(&self, svc: &str) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for t in self.live(svc) {
            *m.entry(t.node_id.clone()).or_default() += 1;
        }
        m
    }

    fn report(&mut self, task: &Task, state: TaskState, code: i32) {
        self.cmd(Command::ReportTasks {
            node_id: task.node_id.clone(),
            reports: vec![TaskReport {
                task_id: task.id.clone(),
                state,
                exit_code: code,
                ..Default::default()
            }],
            at: "t".into(),
        });
    }

    fn run_all(&mut self, svc: &str) {
        for t in self.live(svc) {
            if t.state != TaskState::Running {
                self.report(&t, TaskState::Running, 0);
            }
        }
    }

    fn scale(&mut self, svc: &str, n: u64) {
        let cur = self.s.services[svc].clone();
        let mut spec = cur.spec.clone();
        spec.replicas = n;
        self.cmd(Command::UpdateService {
            id: svc.into(),
            spec,
            force: false,
            version: cur.version,
            at: "t".into(),
        });
    }
}

#[test]
fn replicas_spread_and_get_addresses_and_vips() {
    let mut lab = Lab::new(&["a", "bb", "ccc"]);
    assert!(matches!(
        lab.create("web", |s| s.replicas = 6),
        CommandResult::Service(_)
    ));
    let per = lab.per_node("web");
    assert_eq!(per.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
    let svc = &lab.s.services["web"];
    let vip = svc.vips.get("net").copied().expect("a VIP on net");
    let ips: BTreeSet<Ipv4Addr> = lab.task_endpoints().map(|e| e.ip).collect();
    assert_eq!(ips.len(), 6, "one address per task");
    assert!(!ips.contains(&vip), "no task gets the VIP");
    assert!(
        lab.live("web")
            .iter()
            .all(|t| t.state == TaskState::Assigned)
    );
    assert!(lab.s.backends("web", "net").is_empty(), "nothing runs yet");
    lab.run_all("web");
    assert_eq!(lab.s.backends("web", "net").len(), 6);
    assert!(
        matches!(lab.create("web", |_| {}), CommandResult::Service(_)),
        "a retried create is recognised"
    );
    let dup = lab.create("web2", |s| s.name = "web".into());
    assert!(matches!(dup, CommandResult::Refused(m) if m.contains("already exists")));
}

#[test]
fn scale_down_and_up() {
    let mut lab = Lab::new(&["a", "bb", "ccc"]);
    lab.create("web", |s| s.replicas = 6);
    lab.run_all("web");
    lab.scale("web", 2);
    assert_eq!(lab.live("web").len(), 2);
    let stopping: Vec<Task> = lab
        .s
        .tasks
        .values()
        .filter(|t| t.desired_state == TaskState::Shutdown)
        .cloned()
        .collect();
    assert_eq!(stopping.len(), 4);
    assert_eq!(
        lab.s.backends("web", "net").len(),
        2,
        "stopping tasks leave the rotation at once"
    );
    // Their addresses stay theirs until they are down.
    assert_eq!(lab.task_endpoints().count(), 6);
    for t in &stopping {
        lab.report(t, TaskState::Shutdown, 0);
    }
    assert_eq!(lab.task_endpoints().count(), 2);
    lab.scale("web", 6);
    assert_eq!(lab.live("web").len(), 6);
    assert_eq!(lab.per_node("web").values().max(), Some(&2));
}

#[test]
fn node_down_moves_tasks_and_back_is_fine() {
    let mut lab = Lab::new(&["a", "bb", "ccc"]);
    lab.create("web", |s| s.replicas = 6);
    lab.run_all("web");
    lab.cmd(Command::SetNodeState {
        id: "bb".into(),
        state: NodeState::Down,
        addr: None,
        at: "t".into(),
    });
    let per = lab.per_node("web");
    assert_eq!(per.get("bb"), None);
    assert_eq!(per.values().sum::<usize>(), 6);
    assert!(
        lab.s
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Orphaned)
            .count()
            == 2
    );
    assert!(lab.task_endpoints().all(|e| e.node_id != "bb"));
    lab.run_all("web");
    assert_eq!(lab.s.backends("web", "net").len(), 6);
    // A late report from the dead node changes nothing.
    let old = lab
        .s
        .tasks
        .values()
        .find(|t| t.state == TaskState::Orphaned)
        .cloned();
    if let Some(old) = old {
        lab.report(&old, TaskState::Running, 0);
        assert_eq!(lab.s.tasks[&old.id].state, "orphaned");
    }
}

#[test]
fn restart_conditions() {
    let mut lab = Lab::new(&["a"]);
    lab.create("any", |s| s.restart_delay_ms = 100);
    lab.run_all("any");
    let t = lab.live("any")[0].clone();
    lab.report(&t, TaskState::Complete, 0);
    let next = lab.live("any");
    assert_eq!(next.len(), 1);
    assert_ne!(next[0].id, t.id);
    assert_eq!((next[0].attempt, next[0].start_delay_ms), (1, 100));

    lab.create("onf", |s| s.restart_condition = RestartCondition::OnFailure);
    lab.run_all("onf");
    let t = lab.live("onf")[0].clone();
    lab.report(&t, TaskState::Complete, 0);
    let after = lab.live("onf");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].id, t.id, "a clean exit is not restarted");

    lab.create("max", |s| s.restart_max_attempts = 2);
    for _ in 0..5 {
        let t = lab.live("max")[0].clone();
        if t.state.is_terminal() {
            break;
        }
        lab.report(&t, TaskState::Failed, 1);
    }
    let total = lab
        .s
        .tasks
        .values()
        .filter(|t| t.service_id == "max")
        .count();
    assert_eq!(total, 3, "first run and two restarts");
}

#[test]
fn rolling_update_one_at_a_time() {
    let mut lab = Lab::new(&["a", "bb"]);
    lab.create("web", |s| s.replicas = 3);
    lab.run_all("web");
    let cur = lab.s.services["web"].clone();
    let mut spec = cur.spec.clone();
    spec.env.push("A=1".into());
    lab.cmd(Command::UpdateService {
        id: "web".into(),
        spec,
        force: false,
        version: cur.version,
        at: "t".into(),
    });
    let v = lab.s.services["web"].spec_version;
    let fresh = |lab: &Lab| {
        lab.live("web")
            .iter()
            .filter(|t| t.spec_version == v)
            .count()
    };
    assert_eq!(fresh(&lab), 1, "one task replaced at a time");
    for round in 2..=3 {
        let new: Vec<Task> = lab
            .live("web")
            .into_iter()
            .filter(|t| t.spec_version == v && t.state != TaskState::Running)
            .collect();
        for t in new {
            lab.report(&t, TaskState::Running, 0);
        }
        assert_eq!(fresh(&lab), round);
    }
    lab.run_all("web");
    assert_eq!(lab.s.services["web"].update_state, UpdateState::Completed);
    // Stale version: refused.
    let stale = lab.cmd(Command::UpdateService {
        id: "web".into(),
        spec: cur.spec.clone(),
        force: false,
        version: cur.version,
        at: "t".into(),
    });
    assert!(matches!(stale, CommandResult::Refused(m) if m.contains("meanwhile")));
}

#[test]
fn constraints_global_and_bad_specs() {
    let mut lab = Lab::new(&["a", "bb", "ccc"]);
    lab.create("nowhere", |s| {
        s.constraints = vec!["node.hostname==zz".into()]
    });
    let t = lab.live("nowhere");
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].state, "pending");
    assert!(
        t[0].message
            .contains("scheduling constraints not satisfied on 3 nodes")
    );
    lab.create("pinned", |s| {
        s.replicas = 4;
        s.constraints = vec!["node.hostname==bb".into()];
    });
    assert_eq!(
        lab.per_node("pinned").keys().collect::<Vec<_>>(),
        vec!["bb"]
    );
    lab.create("g", |s| {
        s.mode = ServiceMode::Global;
        s.replicas = 0;
    });
    assert_eq!(lab.per_node("g").len(), 3);
    lab.cmd(Command::UpdateNode {
        id: "a".into(),
        availability: Some(Availability::Drain),
        role: None,
        label_add: Default::default(),
        label_rm: vec![],
        at: "t".into(),
    });
    assert_eq!(lab.per_node("g").len(), 2, "drained nodes run no tasks");
    let bad = [
        lab.create("x", |s| s.replicas = MAX_REPLICAS + 1),
        lab.create("y", |s| s.networks = vec!["nope".into()]),
        lab.create("z", |s| s.networks = vec!["ing".into()]),
        lab.create("w", |s| s.constraints = vec!["node.color=red".into()]),
        lab.create("v", |s| s.cmd = vec![]),
    ];
    for b in bad {
        assert!(matches!(b, CommandResult::Refused(_)), "{b:?}");
    }
    assert!(!lab.s.services.contains_key("x"));
    let rm = lab.cmd(Command::RemoveNetwork { id: "net".into() });
    assert!(matches!(rm, CommandResult::Refused(m) if m.contains("in use by service")));
    lab.cmd(Command::RemoveService {
        id: "nowhere".into(),
        at: "t".into(),
    });
    assert!(lab.s.tasks.values().all(|t| t.service_id != "nowhere"));
}

fn port(published: Option<u16>, target: u16, mode: mesh_common::model::PublishMode) -> PortSpec {
    PortSpec {
        protocol: mesh_common::model::Protocol::Tcp,
        target,
        published,
        mode,
    }
}

fn refused(r: CommandResult) -> String {
    match r {
        CommandResult::Refused(m) => m.to_string(),
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn published_ports_are_allocated_and_clashes_refused() {
    use mesh_common::model::{Protocol, PublishMode::*};
    let mut lab = Lab::new(&["a", "bb"]);
    lab.create("web", |s| s.ports = vec![port(Some(8080), 80, Ingress)]);
    assert_eq!(
        lab.s.services["web"].endpoint_ports,
        [port(Some(8080), 80, Ingress)]
    );
    lab.create("api", |s| {
        s.ports = vec![port(None, 80, Ingress), port(None, 81, Ingress)]
    });
    assert_eq!(
        lab.s.services["api"].endpoint_ports,
        [
            port(Some(30000), 80, Ingress),
            port(Some(30001), 81, Ingress)
        ],
        "lowest free ports of the dynamic range, in order"
    );
    assert_eq!(
        lab.s.services["api"].spec.ports[0].published, None,
        "as asked"
    );
    for (name, p) in [
        ("x1", port(Some(8080), 81, Ingress)),
        ("x2", port(Some(8080), 81, Host)),
    ] {
        let why = refused(lab.create(name, |s| s.ports = vec![p]));
        assert_eq!(why, "port 8080/tcp is already in use by service web");
    }
    // Host first, then ingress on it: refused the other way too.
    lab.create("h", |s| s.ports = vec![port(Some(9090), 80, Host)]);
    let why = refused(lab.create("x3", |s| s.ports = vec![port(Some(9090), 80, Ingress)]));
    assert_eq!(why, "port 9090/tcp is already in use by service h");
    // A dynamic port skips what others hold; udp is another port space.
    let why = refused(lab.create("x4", |s| s.ports = vec![port(Some(30000), 1, Host)]));
    assert!(why.contains("in use by service api"), "{why}");
    lab.create("u", |s| {
        s.ports = vec![PortSpec {
            protocol: Protocol::Udp,
            ..port(Some(8080), 53, Ingress)
        }]
    });
    assert!(matches!(&lab.s.services["u"].endpoint_ports[..], [p] if p.published == Some(8080)));
    // Two host-mode services may share a port: the scheduler spreads them.
    assert!(matches!(
        lab.create("h2", |s| s.ports = vec![port(Some(9090), 80, Host)]),
        CommandResult::Service(_)
    ));
    for (ports, says) in [
        (vec![port(None, 80, Host)], "mode=host needs published=PORT"),
        (vec![port(Some(1), 0, Ingress)], "target port 0"),
        (vec![port(Some(0), 80, Ingress)], "published port 0"),
        (
            vec![port(Some(7000), 80, Ingress), port(Some(7000), 81, Ingress)],
            "published twice",
        ),
        (
            vec![port(None, 80, Ingress), port(None, 80, Ingress)],
            "published twice",
        ),
    ] {
        let why = refused(lab.create("bad", |s| s.ports = ports));
        assert!(why.contains(says), "{why}");
        assert!(!why.contains('\n'));
    }
    assert!(!lab.s.services.contains_key("bad"), "nothing half made");
}

#[test]
fn ingress_endpoints_for_tasks_and_one_sandbox_per_node() {
    use mesh_common::model::PublishMode::*;
    let mut lab = Lab::new(&["a", "bb"]);
    let sboxes = |lab: &Lab| -> BTreeSet<String> {
        lab.s
            .endpoints
            .values()
            .filter(|e| crate::state::is_ingress_sbox(e) && e.network_id == "ing")
            .map(|e| e.node_id.clone())
            .collect()
    };
    assert_eq!(sboxes(&lab), ["a".to_string(), "bb".into()].into());
    lab.cmd(Command::AddNode {
        node: Node {
            id: "ccc".into(),
            hostname: "ccc".into(),
            ..Default::default()
        },
    });
    assert_eq!(sboxes(&lab).len(), 3, "a new node gets its ingress sandbox");
    lab.cmd(Command::RemoveNode { id: "ccc".into() });
    assert_eq!(sboxes(&lab).len(), 2, "and it goes with the node");
    assert!(
        lab.s.network_users("ing").is_empty(),
        "ingress sandboxes are not users"
    );

    lab.create("web", |s| {
        s.replicas = 2;
        s.ports = vec![port(Some(8080), 80, Ingress)];
    });
    lab.create("plain", |_| {});
    for t in lab.live("web") {
        let nets: BTreeSet<&str> = lab
            .task_endpoints()
            .filter(|e| e.sandbox_id == t.id)
            .map(|e| e.network_id.as_str())
            .collect();
        assert_eq!(
            nets,
            ["ing", "net"].into(),
            "a publishing task is on ingress"
        );
    }
    let plain = &lab.live("plain")[0];
    assert!(
        lab.task_endpoints()
            .all(|e| e.sandbox_id != plain.id || e.network_id == "net"),
        "a task that publishes nothing is not"
    );
    lab.run_all("web");
    assert_eq!(lab.s.backends("web", "ing").len(), 2);

    // rm ingress is refused while a service publishes through it.
    let rm = lab.cmd(Command::RemoveNetwork { id: "ing".into() });
    assert_eq!(
        refused(rm),
        "network ingress is in use by service web (published port 8080/tcp); remove its published ports first"
    );
    // Dropping the ports re-rolls the tasks (they lose their ingress endpoint).
    let cur = lab.s.services["web"].clone();
    let mut spec = cur.spec.clone();
    spec.ports.clear();
    lab.cmd(Command::UpdateService {
        id: "web".into(),
        spec,
        force: false,
        version: cur.version,
        at: "t".into(),
    });
    assert!(lab.s.services["web"].spec_version > cur.spec_version);
    assert!(lab.s.services["web"].endpoint_ports.is_empty());
    for _ in 0..4 {
        lab.run_all("web");
        let stopping: Vec<Task> = lab
            .s
            .tasks
            .values()
            .filter(|t| t.desired_state == TaskState::Shutdown && !t.state.is_terminal())
            .cloned()
            .collect();
        for t in &stopping {
            lab.report(t, TaskState::Shutdown, 0);
        }
    }
    assert!(lab.task_endpoints().all(|e| e.network_id != "ing"));
    assert!(matches!(
        lab.cmd(Command::RemoveNetwork { id: "ing".into() }),
        CommandResult::Ok
    ));
    assert!(
        sboxes(&lab).is_empty(),
        "node sandboxes go with the network"
    );
    let why = refused(lab.create("web2", |s| s.ports = vec![port(None, 80, Ingress)]));
    assert_eq!(why, super::ports::NO_INGRESS);
    assert!(
        matches!(
            lab.create("hostonly", |s| s.ports = vec![port(Some(81), 80, Host)]),
            CommandResult::Service(_)
        ),
        "host mode needs no ingress network"
    );
    // A custom ingress network: every node gets its sandbox again.
    lab.cmd(Command::CreateNetwork {
        id: "ing2".into(),
        spec: NetworkSpec {
            name: "my-ingress".into(),
            driver: DriverKind::Overlay,
            subnet: Some("10.11.0.0/16".into()),
            gateway: Some("10.11.0.2".into()),
            ingress: true,
            ..Default::default()
        },
        at: "t".into(),
    });
    assert_eq!(sboxes(&lab).len(), 0, "sboxes() checks the old ID");
    assert_eq!(
        lab.s
            .endpoints
            .values()
            .filter(|e| crate::state::is_ingress_sbox(e) && e.network_id == "ing2")
            .count(),
        2
    );
    assert!(matches!(
        lab.create("web2", |s| s.ports = vec![port(None, 80, Ingress)]),
        CommandResult::Service(_)
    ));
}

#[test]
fn host_mode_ports_one_task_per_node() {
    use mesh_common::model::PublishMode::*;
    let mut lab = Lab::new(&["a", "bb"]);
    lab.create("web", |s| {
        s.replicas = 3;
        s.ports = vec![port(Some(8080), 80, Host)];
    });
    let live = lab.live("web");
    let placed: BTreeSet<&str> = live
        .iter()
        .filter(|t| t.state == TaskState::Assigned)
        .map(|t| t.node_id.as_str())
        .collect();
    assert_eq!(placed, ["a", "bb"].into());
    let pending: Vec<&Task> = live
        .iter()
        .filter(|t| t.state == TaskState::Pending)
        .collect();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        pending[0].message,
        "no suitable node (host-mode port 8080/tcp is already used on every eligible node)"
    );
    // Another service on that host port waits too; a global one gets
    // one task per node on its own port.
    lab.create("other", |s| s.ports = vec![port(Some(8080), 81, Host)]);
    assert_eq!(lab.live("other")[0].state, TaskState::Pending);
    lab.create("g", |s| {
        s.mode = ServiceMode::Global;
        s.replicas = 0;
        s.ports = vec![port(Some(9000), 80, Host)];
    });
    assert_eq!(
        lab.per_node("g").values().copied().collect::<Vec<_>>(),
        [1, 1]
    );
    assert!(lab.live("g").iter().all(|t| t.state == TaskState::Assigned));
    // Scaling down frees a node: the pending task is placed there.
    lab.run_all("web");
    lab.scale("web", 1);
    let stopped: Vec<Task> = lab
        .s
        .tasks
        .values()
        .filter(|t| t.service_id == "web" && t.desired_state == TaskState::Shutdown)
        .cloned()
        .collect();
    assert_eq!(
        stopped.len(),
        1,
        "only the placed slot 2 stops; slot 3 was pending"
    );
    assert_eq!(
        lab.live("other")[0].state,
        TaskState::Pending,
        "the port is bound until the stopping task is down"
    );
    lab.report(&stopped[0], TaskState::Shutdown, 0);
    let other = &lab.live("other")[0];
    assert_eq!(other.state, TaskState::Assigned);
    assert_eq!(other.node_id, stopped[0].node_id);
}

#[test]
fn exhausted_network_leaves_tasks_pending_with_the_reason() {
    let mut lab = Lab::new(&["n1", "n2"]);
    lab.cmd(Command::CreateNetwork {
        id: "tiny".into(),
        spec: NetworkSpec {
            name: "tiny".into(),
            driver: DriverKind::Overlay,
            subnet: Some("10.20.0.0/30".into()),
            ..Default::default()
        },
        at: "t".into(),
    });
    let r = lab.create("web", |s| {
        s.replicas = 2;
        s.networks = vec!["tiny".into()];
    });
    assert!(matches!(r, CommandResult::Service(_)), "{r:?}");
    let tasks = lab.live("web");
    assert_eq!(tasks.len(), 2);
    for t in &tasks {
        assert_eq!(t.state, TaskState::Pending);
        assert_eq!(t.message, "network tiny has no free address (10.20.0.0/30)");
    }
    // Another orchestration does not touch them: their status holds still.
    lab.create("other", |_| {});
    assert_eq!(
        lab.live("web")
            .iter()
            .map(|t| t.version)
            .collect::<Vec<_>>(),
        tasks.iter().map(|t| t.version).collect::<Vec<_>>()
    );
    // A second VIP on the full network is refused with the same reason.
    let r = lab.create("more", |s| s.networks = vec!["tiny".into()]);
    assert!(
        matches!(&r, CommandResult::Refused(m) if m.contains("network tiny has no free address (10.20.0.0/30)")),
        "{r:?}"
    );
}

#[test]
fn network_held_only_by_leaving_tasks() {
    let mut lab = Lab::new(&["n1", "n2"]);
    assert!(
        lab.s.network_held_only_by_leaving_tasks("net"),
        "nothing holds it"
    );
    lab.create("web", |s| s.replicas = 2);
    lab.run_all("web");
    assert!(
        !lab.s.network_held_only_by_leaving_tasks("net"),
        "a live service holds it"
    );
    lab.cmd(Command::RemoveService {
        id: "web".into(),
        at: "t".into(),
    });
    assert!(lab.s.network_held_only_by_leaving_tasks("net"));
    let rm = lab.cmd(Command::RemoveNetwork { id: "net".into() });
    assert!(matches!(rm, CommandResult::Refused(_)), "{rm:?}");
    let stopping: Vec<Task> = lab.s.tasks.values().cloned().collect();
    for t in &stopping {
        lab.report(t, TaskState::Shutdown, 0);
    }
    assert!(lab.s.tasks.is_empty() && lab.task_endpoints().next().is_none());
    let rm = lab.cmd(Command::RemoveNetwork { id: "net".into() });
    assert_eq!(rm, CommandResult::Ok);
}
