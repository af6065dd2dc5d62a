//! The state machine's commands, applied in order as Raft would.

use mesh_common::model::{Availability, DriverKind, NodeRole, NodeState};

use super::*;

fn node(id: &str) -> Node {
    Node {
        id: id.into(),
        role: NodeRole::Worker,
        availability: Availability::Active,
        state: NodeState::Unknown,
        ..Default::default()
    }
}

fn init(s: &mut ClusterState) {
    let cluster = ClusterInfo {
        id: "c".into(),
        worker_token: "w".into(),
        manager_token: "m".into(),
        ..Default::default()
    };
    let mut first = node("m1");
    first.role = NodeRole::Manager;
    assert!(matches!(
        s.apply(
            1,
            &Command::Init {
                cluster,
                node: first,
                ingress: Some("ing".into()),
            }
        ),
        CommandResult::Node(_)
    ));
}

#[test]
fn data_path_errors_are_recorded_and_absent_while_empty() {
    let mut s = ClusterState::default();
    init(&mut s);
    s.apply(2, &Command::AddNode { node: node("w1") });
    let plain = serde_json::to_value(&s.nodes["w1"]).expect("json");
    assert!(plain.get("datapath_errors").is_none(), "{plain}");
    let set = Command::SetNodeErrors {
        id: "w1".into(),
        errors: vec!["network app: no such device".into()],
    };
    assert!(matches!(s.apply(3, &set), CommandResult::Node(_)));
    assert_eq!(s.nodes["w1"].datapath_errors.len(), 1);
    // A node written before the field existed still loads.
    let old: Node = serde_json::from_value(plain).expect("old node");
    assert!(old.datapath_errors.is_empty());
    let gone = Command::SetNodeErrors {
        id: "nosuch".into(),
        errors: Vec::new(),
    };
    assert!(matches!(s.apply(4, &gone), CommandResult::Refused(_)));
}

fn wg_key(i: u8) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([i; 32])
}

fn set_key(id: &str, public_key: &str) -> Command {
    Command::SetNodeEncryptionKey {
        id: id.into(),
        public_key: public_key.into(),
    }
}

fn refusal(r: CommandResult) -> mesh_common::refusal::Refusal {
    match r {
        CommandResult::Refused(why) => why,
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn wireguard_keys_are_checked_and_unique() {
    use mesh_common::refusal::RefusalKind;
    let mut s = ClusterState::default();
    init(&mut s);
    s.apply(2, &Command::AddNode { node: node("w1") });
    let CommandResult::Node(n) = s.apply(3, &set_key("w1", &wg_key(1))) else {
        panic!("a good key is recorded")
    };
    assert_eq!(
        (n.encryption_public_key.as_str(), n.version),
        (wg_key(1).as_str(), 3)
    );
    let r = refusal(s.apply(4, &set_key("nosuch", &wg_key(2))));
    assert_eq!(r.kind, RefusalKind::NotFound);
    let r = refusal(s.apply(5, &set_key("m1", &wg_key(1))));
    assert_eq!(r.kind, RefusalKind::AlreadyExists, "{r}");
    assert!(r.contains("w1"), "{r}");
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    for bad in [
        String::new(),
        "not base64!".into(),
        b64.encode([1u8; 31]),
        b64.encode([1u8; 33]),
        // URL-safe alphabet and missing padding are not what `wg` prints.
        base64::engine::general_purpose::URL_SAFE.encode([0xfbu8; 32]),
        b64.encode([1u8; 32]).trim_end_matches('=').to_string(),
        b64.encode([0u8; 32]),
    ] {
        let r = refusal(s.apply(6, &set_key("m1", &bad)));
        assert_eq!(r.kind, RefusalKind::InvalidArgument, "{bad:?}: {r}");
    }
    assert!(
        s.nodes["m1"].encryption_public_key.is_empty(),
        "nothing half-made"
    );
    // A node may report its own key again, and replace it.
    assert!(matches!(
        s.apply(7, &set_key("w1", &wg_key(1))),
        CommandResult::Node(_)
    ));
    assert!(matches!(
        s.apply(8, &set_key("w1", &wg_key(3))),
        CommandResult::Node(_)
    ));
    // The key it gave up may go to another node.
    assert!(matches!(
        s.apply(9, &set_key("m1", &wg_key(1))),
        CommandResult::Node(_)
    ));
    // A removed node's key is free again, and the node stays out.
    s.apply(10, &Command::RemoveNode { id: "w1".into() });
    assert_eq!(
        refusal(s.apply(11, &set_key("w1", &wg_key(5)))).kind,
        RefusalKind::NotFound
    );
}

#[test]
fn key_rotations_count_per_node() {
    let mut s = ClusterState::default();
    init(&mut s);
    s.apply(2, &Command::AddNode { node: node("w1") });
    for i in 0..3 {
        let CommandResult::Node(n) = s.apply(3 + i, &Command::RotateNodeKey { id: "w1".into() })
        else {
            panic!("rotation refused")
        };
        assert_eq!(n.encryption_key_rotations, i + 1);
        assert_eq!(n.version, 3 + i);
    }
    assert_eq!(s.nodes["m1"].encryption_key_rotations, 0, "only that node");
    assert!(matches!(
        s.apply(
            9,
            &Command::RotateNodeKey {
                id: "nosuch".into()
            }
        ),
        CommandResult::Refused(_)
    ));
}

#[test]
fn encryption_fields_are_absent_until_set_and_old_states_load() {
    let mut s = ClusterState::default();
    init(&mut s);
    let plain = serde_json::to_value(&s.nodes["m1"]).expect("json");
    assert!(plain.get("encryption_public_key").is_none(), "{plain}");
    assert!(plain.get("encryption_key_rotations").is_none(), "{plain}");
    let cluster = serde_json::to_value(s.cluster.as_ref().expect("cluster")).expect("json");
    assert!(
        cluster.get("encryption_key_rotation_secs").is_none(),
        "{cluster}"
    );
    let old: Node = serde_json::from_value(plain).expect("old node loads");
    assert!(old.encryption_public_key.is_empty());
    assert_eq!(old.encryption_key_rotations, 0);
    s.apply(2, &set_key("m1", &wg_key(4)));
    s.apply(3, &Command::RotateNodeKey { id: "m1".into() });
    let v = serde_json::to_value(&s.nodes["m1"]).expect("json");
    assert_eq!(v["encryption_public_key"], wg_key(4));
    assert_eq!(v["encryption_key_rotations"], 1);
    let back: Node = serde_json::from_value(v).expect("reads back");
    assert_eq!(back, s.nodes["m1"]);
    let mut c = s.cluster.clone().expect("cluster");
    c.encryption_key_rotation_secs = 3600;
    let v = serde_json::to_value(&c).expect("json");
    assert_eq!(v["encryption_key_rotation_secs"], 3600);
    assert_eq!(serde_json::from_value::<ClusterInfo>(v).expect("back"), c);
}

#[test]
fn init_only_once() {
    let mut s = ClusterState::default();
    init(&mut s);
    let again = Command::Init {
        cluster: ClusterInfo::default(),
        node: node("x"),
        ingress: None,
    };
    assert!(matches!(s.apply(2, &again), CommandResult::Refused(_)));
    assert_eq!(s.nodes.len(), 1);
    assert_eq!(s.cluster.as_ref().map(|c| c.id.as_str()), Some("c"));
}

#[test]
fn update_labels_role_and_version() {
    let mut s = ClusterState::default();
    init(&mut s);
    s.apply(2, &Command::AddNode { node: node("w1") });
    let cmd = Command::UpdateNode {
        id: "w1".into(),
        availability: Some(Availability::Drain),
        role: None,
        label_add: [
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ]
        .into(),
        label_rm: vec![],
        at: "t".into(),
    };
    s.apply(3, &cmd);
    let rm = Command::UpdateNode {
        id: "w1".into(),
        availability: None,
        role: Some(NodeRole::Manager),
        label_add: Default::default(),
        label_rm: vec!["a".into()],
        at: "t2".into(),
    };
    let CommandResult::Node(n) = s.apply(4, &rm) else {
        panic!("update refused")
    };
    assert_eq!(n.availability, "drain");
    assert_eq!(n.role, "manager");
    assert_eq!(
        n.raft_id,
        mesh_common::id::raft_id("w1"),
        "a promoted node gets its Raft ID"
    );
    assert_eq!(n.labels.len(), 1);
    assert_eq!(n.labels.get("b").map(String::as_str), Some("2"));
    assert_eq!(n.version, 4);
    assert_eq!(n.updated_at, "t2");
}

#[test]
fn removed_nodes_stay_out() {
    let mut s = ClusterState::default();
    init(&mut s);
    s.apply(2, &Command::AddNode { node: node("w1") });
    assert_eq!(
        s.apply(3, &Command::RemoveNode { id: "w1".into() }),
        CommandResult::Ok
    );
    assert!(s.removed.contains("w1"));
    assert!(matches!(
        s.apply(4, &Command::AddNode { node: node("w1") }),
        CommandResult::Refused(_)
    ));
    assert!(matches!(
        s.apply(5, &Command::RemoveNode { id: "w1".into() }),
        CommandResult::Refused(_)
    ));
    let st = Command::SetNodeState {
        id: "w1".into(),
        state: NodeState::Ready,
        addr: None,
        at: "t".into(),
    };
    assert!(matches!(s.apply(6, &st), CommandResult::Refused(_)));
}

#[test]
fn token_rotation() {
    let mut s = ClusterState::default();
    let rot = Command::RotateToken {
        role: "worker".into(),
        token: "new".into(),
    };
    assert!(matches!(s.apply(1, &rot), CommandResult::Refused(_)));
    init(&mut s);
    assert_eq!(s.apply(2, &rot), CommandResult::Ok);
    assert_eq!(
        s.cluster.as_ref().map(|c| c.worker_token.as_str()),
        Some("new")
    );
    assert_eq!(
        s.cluster.as_ref().map(|c| c.manager_token.as_str()),
        Some("m")
    );
    let bad = Command::RotateToken {
        role: "boss".into(),
        token: "x".into(),
    };
    assert!(matches!(s.apply(3, &bad), CommandResult::Refused(_)));
}

#[test]
fn apply_is_deterministic() {
    let cmds = [
        Command::AddNode { node: node("a") },
        Command::SetNodeState {
            id: "a".into(),
            state: NodeState::Ready,
            addr: Some("10.0.0.1".into()),
            at: "t".into(),
        },
        Command::RemoveNode { id: "a".into() },
    ];
    let run = || {
        let mut s = ClusterState::default();
        init(&mut s);
        for (i, c) in cmds.iter().enumerate() {
            s.apply(i as u64 + 2, c);
        }
        serde_json::to_string(&s).unwrap_or_default()
    };
    assert_eq!(run(), run());
}

fn create(
    s: &mut ClusterState,
    index: u64,
    id: &str,
    name: &str,
    subnet: Option<&str>,
) -> CommandResult {
    let spec = NetworkSpec {
        name: name.into(),
        driver: DriverKind::Overlay,
        subnet: subnet.map(String::from),
        ..Default::default()
    };
    s.apply(
        index,
        &Command::CreateNetwork {
            id: id.into(),
            spec,
            at: "t".into(),
        },
    )
}

#[test]
fn networks_allocate_and_free() {
    let mut s = ClusterState::default();
    init(&mut s);
    let ingress = s.networks.get("ing").expect("ingress made at init");
    assert_eq!(
        (
            ingress.subnet.to_string().as_str(),
            ingress.vni,
            ingress.spec.ingress
        ),
        ("10.0.0.0/24", 4096, true)
    );
    let CommandResult::Network(a) = create(&mut s, 2, "a", "front", None) else {
        panic!("create refused")
    };
    assert_eq!(
        (
            a.subnet.to_string().as_str(),
            a.gateway.to_string().as_str(),
            a.vni
        ),
        ("10.0.1.0/24", "10.0.1.1", 4097)
    );
    // A retried proposal returns the same network, allocating nothing.
    assert_eq!(
        create(&mut s, 3, "a", "front", None),
        CommandResult::Network(a.clone())
    );
    assert_eq!(s.networks.len(), 2);
    assert!(
        matches!(create(&mut s, 4, "b", "front", None), CommandResult::Refused(m) if m.contains("already exists"))
    );
    assert!(
        matches!(create(&mut s, 5, "c", "x", Some("10.0.1.128/25")), CommandResult::Refused(m) if m.contains("overlaps"))
    );
    assert_eq!(s.networks.len(), 2, "refused creates allocate nothing");
    assert_eq!(
        s.apply(6, &Command::RemoveNetwork { id: "a".into() }),
        CommandResult::Ok
    );
    let CommandResult::Network(d) = create(&mut s, 7, "d", "again", None) else {
        panic!("create refused")
    };
    assert_eq!(
        (d.subnet.to_string().as_str(), d.vni),
        ("10.0.1.0/24", 4097),
        "freed subnet and VNI are reused"
    );
    let spec = NetworkSpec {
        name: "ing2".into(),
        driver: DriverKind::Overlay,
        ingress: true,
        ..Default::default()
    };
    let second = s.apply(
        8,
        &Command::CreateNetwork {
            id: "e".into(),
            spec,
            at: "t".into(),
        },
    );
    assert!(
        matches!(second, CommandResult::Refused(m) if m.contains("ingress network already exists"))
    );
}

#[test]
fn pools_from_cluster_config() {
    let mut s = ClusterState::default();
    let cluster = ClusterInfo {
        id: "c".into(),
        address_pools: vec!["10.20.0.0/20".into()],
        pool_mask_len: 24,
        ..Default::default()
    };
    s.apply(
        1,
        &Command::Init {
            cluster,
            node: node("m"),
            ingress: None,
        },
    );
    for i in 0..16 {
        assert!(matches!(
            create(&mut s, 2 + i, &format!("n{i}"), &format!("n{i}"), None),
            CommandResult::Network(_)
        ));
    }
    assert!(
        matches!(create(&mut s, 20, "x", "x", None), CommandResult::Refused(m) if m.contains("10.20.0.0/20"))
    );
}

fn attach(
    s: &mut ClusterState,
    index: u64,
    id: &str,
    net: &str,
    sandbox: &str,
    standalone: bool,
) -> CommandResult {
    s.apply(
        index,
        &Command::CreateEndpoint {
            id: id.into(),
            network_id: net.into(),
            node_id: "m1".into(),
            sandbox: sandbox.into(),
            sandbox_id: format!("sb-{sandbox}"),
            aliases: vec![],
            standalone,
            at: "t".into(),
        },
    )
}

#[test]
fn endpoints_allocate_addresses_and_hold_networks() {
    let mut s = ClusterState::default();
    init(&mut s);
    let spec = NetworkSpec {
        name: "app".into(),
        driver: DriverKind::Overlay,
        subnet: Some("10.9.0.0/24".into()),
        ip_range: Some("10.9.0.128/25".into()),
        attachable: true,
        ..Default::default()
    };
    s.apply(
        2,
        &Command::CreateNetwork {
            id: "app".into(),
            spec,
            at: "t".into(),
        },
    );
    let CommandResult::Endpoint(a) = attach(&mut s, 3, "e1", "app", "web", true) else {
        panic!("refused")
    };
    assert_eq!(
        (a.ip.to_string().as_str(), a.mac.to_string().as_str()),
        ("10.9.0.128", "02:42:0a:09:00:80")
    );
    let CommandResult::Endpoint(b) = attach(&mut s, 4, "e2", "app", "db", true) else {
        panic!("refused")
    };
    assert_eq!(b.ip.to_string(), "10.9.0.129");
    // Retried proposal: same endpoint, nothing new.
    assert!(
        matches!(attach(&mut s, 5, "e2", "app", "db", true), CommandResult::Endpoint(e) if e.ip.to_string() == "10.9.0.129")
    );
    assert!(
        matches!(attach(&mut s, 6, "e3", "app", "db", true), CommandResult::Refused(m) if m.contains("already connected"))
    );
    // Standalone sandboxes need --attachable.
    assert!(
        matches!(attach(&mut s, 7, "e4", "ing", "x", true), CommandResult::Refused(m) if m.contains("not manually attachable"))
    );
    let rm = s.apply(8, &Command::RemoveNetwork { id: "app".into() });
    assert!(
        matches!(rm, CommandResult::Refused(m) if m.contains("web on ") && m.contains("db on "))
    );
    assert_eq!(
        s.apply(9, &Command::RemoveEndpoint { id: "e1".into() }),
        CommandResult::Ok
    );
    let CommandResult::Endpoint(c) = attach(&mut s, 10, "e5", "app", "cache", true) else {
        panic!("refused")
    };
    assert_eq!(c.ip.to_string(), "10.9.0.128", "a freed address is reused");
    s.apply(11, &Command::AddNode { node: node("w9") });
    let ep = Command::CreateEndpoint {
        id: "e6".into(),
        network_id: "app".into(),
        node_id: "w9".into(),
        sandbox: "t".into(),
        sandbox_id: "sb-t".into(),
        aliases: vec![],
        standalone: true,
        at: "t".into(),
    };
    s.apply(12, &ep);
    s.apply(13, &Command::RemoveNode { id: "w9".into() });
    assert!(
        !s.endpoints.contains_key("e6"),
        "a removed node's endpoints go with it"
    );
}

/// Objects as the string-typed code wrote them read back into the typed
/// model and write out the same JSON, so old state dirs and logs load.
#[test]
fn old_json_round_trips_through_the_typed_model() {
    fn same<T: serde::Serialize + serde::de::DeserializeOwned>(old: &str) {
        let want: serde_json::Value = serde_json::from_str(old).expect("fixture is JSON");
        let typed: T = serde_json::from_str(old).expect("old form loads");
        let got = serde_json::to_value(&typed).expect("serialize");
        assert_eq!(got, want);
    }
    same::<Node>(
        r#"{"id":"n","raft_id":1,"hostname":"h","role":"manager","availability":"drain","labels":{},"addr":"192.168.1.11","manager_addr":"192.168.1.11:2377","state":"ready","created_at":"t","updated_at":"t","version":3,"os":"linux","architecture":"x86_64","key_fingerprint":"k","cert_serial":"s","cert_not_after":"t2","joined_addr":"192.168.1.11"}"#,
    );
    same::<Network>(
        r#"{"id":"x","spec":{"name":"app","driver":"overlay","subnet":"10.20.0.0/24","gateway":null,"ip_range":null,"attachable":true,"internal":false,"ingress":false,"options":{},"labels":{}},"subnet":"10.20.0.0/24","gateway":"10.20.0.1","vni":4097,"created_at":"t","version":5}"#,
    );
    same::<Endpoint>(
        r#"{"id":"e","network_id":"x","node_id":"n","sandbox":"box","sandbox_id":"b","ip":"10.20.0.5","mac":"02:42:0a:14:00:05","aliases":["boxy"],"created_at":"t"}"#,
    );
    same::<Service>(
        r#"{"id":"s","spec":{"name":"web","mode":"replicated","replicas":2,"networks":["x"],"endpoint_mode":"vip","env":[],"constraints":[],"restart_condition":"on-failure","restart_delay_ms":5000,"restart_max_attempts":0,"cmd":["sleep"],"labels":{}},"vips":{"x":"10.20.0.2"},"spec_version":7,"created_at":"t","updated_at":"t","version":9,"update_state":"","update_message":""}"#,
    );
    same::<Task>(
        r#"{"id":"t","service_id":"s","slot":1,"node_id":"n","desired_state":"running","state":"orphaned","message":"node is down","error":"","exit_code":0,"spec_version":7,"attempt":0,"start_delay_ms":0,"created_at":"t","updated_at":"t","version":11}"#,
    );
    same::<Command>(
        r#"{"UpdateNode":{"id":"n","availability":"pause","role":null,"label_add":{},"label_rm":[],"at":"t"}}"#,
    );
    same::<ClusterInfo>(
        r#"{"id":"c","created_at":"t","ca_cert_pem":"p","ca_key_pem":"k","worker_token":"w","manager_token":"m","cert_expiry_secs":7776000,"address_pools":["10.0.0.0/8"],"pool_mask_len":24,"data_path_port":4789}"#,
    );
    same::<Command>(
        r#"{"ReportTasks":{"node_id":"n","reports":[{"task_id":"t","state":"complete","message":"finished","error":"","exit_code":0}],"at":"t"}}"#,
    );
}
