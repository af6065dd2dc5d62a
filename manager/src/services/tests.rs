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
    let ips: BTreeSet<Ipv4Addr> = lab.s.endpoints.values().map(|e| e.ip).collect();
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
    assert_eq!(lab.s.endpoints.len(), 6);
    for t in &stopping {
        lab.report(t, TaskState::Shutdown, 0);
    }
    assert_eq!(lab.s.endpoints.len(), 2);
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
    assert!(lab.s.endpoints.values().all(|e| e.node_id != "bb"));
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
