//! The stores checked by openraft's own suite, and what survives a reopen.

use std::collections::{BTreeMap, BTreeSet};

use openraft::storage::RaftLogStorageExt;
use openraft::testing::{StoreBuilder, Suite, blank_ent, log_id, membership_ent};
use tempfile::TempDir;

use super::*;
use crate::state::{ClusterInfo, Command, Node};

struct TempStore;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for TempStore {
    async fn build(&self) -> StorageResult<(TempDir, LogStore, StateMachineStore)> {
        let dir = TempDir::new().map_err(|e| StorageIOError::write(&e))?;
        let (log, sm) = open(dir.path()).map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn store_passes_openraft_suite() {
    Suite::test_all(TempStore).expect("openraft storage suite");
}

fn normal(index: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(1, 1, index),
        payload: EntryPayload::Normal(cmd),
    }
}

fn node(id: &str) -> Node {
    Node {
        id: id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn store_survives_reopen() {
    let dir = TempDir::new().expect("temp dir");
    let vote = Vote::new(3, 1);
    let members = vec![BTreeSet::from([1u64])];
    let entries = vec![
        blank_ent::<TypeConfig>(1, 1, 1),
        membership_ent::<TypeConfig>(1, 1, 2, members.clone()),
        normal(
            3,
            Command::Init {
                cluster: ClusterInfo {
                    id: "c1".into(),
                    ..Default::default()
                },
                node: node("n1"),
                ingress: None,
            },
        ),
        normal(4, Command::AddNode { node: node("n2") }),
    ];

    let built_meta = {
        let (mut log, mut sm) = open(dir.path()).expect("open");
        let mut applied = sm.subscribe();
        log.save_vote(&vote).await.expect("save vote");
        log.blocking_append(entries.clone()).await.expect("append");
        let results = sm.apply(entries[..3].to_vec()).await.expect("apply");
        assert_eq!(results.len(), 3);
        assert!(matches!(results[2], CommandResult::Node(_)));
        assert!(applied.has_changed().expect("watch open"));
        assert_eq!(*applied.borrow_and_update(), 3);

        let snap = sm.build_snapshot().await.expect("build snapshot");
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 1, 3)));
        assert!(snap.meta.snapshot_id.starts_with("1-3-"));
        log.save_committed(Some(log_id(1, 1, 4)))
            .await
            .expect("save committed");
        log.purge(log_id(1, 1, 1)).await.expect("purge");
        // Entry 4 is applied after the snapshot: it must come back from the log.
        sm.apply(entries[3..].to_vec()).await.expect("apply");
        assert_eq!(sm.read(|s| s.nodes.len()), 2);
        snap.meta
    };

    let (mut log, mut sm) = open(dir.path()).expect("reopen");
    assert_eq!(log.read_vote().await.expect("read vote"), Some(vote));
    assert_eq!(
        log.read_committed().await.expect("read committed"),
        Some(log_id(1, 1, 4))
    );
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 1)));
    assert_eq!(state.last_log_id, Some(log_id(1, 1, 4)));
    let got = log.try_get_log_entries(0..10).await.expect("read log");
    let ids: Vec<_> = got.iter().map(|e| e.log_id.index).collect();
    assert_eq!(ids, [2, 3, 4]);
    assert!(matches!(
        &got[2].payload,
        EntryPayload::Normal(Command::AddNode { node }) if node.id == "n2"
    ));

    let (last_applied, membership) = sm.applied_state().await.expect("applied state");
    assert_eq!(last_applied, Some(log_id(1, 1, 3)));
    assert_eq!(membership.log_id(), &Some(log_id(1, 1, 2)));
    assert_eq!(*sm.subscribe().borrow(), 3);
    let nodes: Vec<String> = sm.read(|s| s.nodes.keys().cloned().collect());
    assert_eq!(nodes, ["n1"]);
    assert_eq!(
        sm.read(|s| s.cluster.as_ref().map(|c| c.id.clone())),
        Some("c1".into())
    );
    let current = sm
        .get_current_snapshot()
        .await
        .expect("current snapshot")
        .expect("a snapshot");
    assert_eq!(current.meta, built_meta);

    // A new snapshot gets a new id even at the same log id.
    let again = sm.build_snapshot().await.expect("build snapshot");
    assert_eq!(again.meta.last_log_id, built_meta.last_log_id);
    assert_ne!(again.meta.snapshot_id, built_meta.snapshot_id);
}

#[tokio::test]
async fn installed_snapshot_survives_reopen() {
    let leader_dir = TempDir::new().expect("temp dir");
    let follower_dir = TempDir::new().expect("temp dir");
    let (_, mut leader) = open(leader_dir.path()).expect("open leader");
    let mut labels = BTreeMap::new();
    labels.insert("zone".to_string(), "a".to_string());
    leader
        .apply([
            membership_ent::<TypeConfig>(2, 1, 1, vec![BTreeSet::from([1u64, 2])]),
            normal(
                2,
                Command::AddNode {
                    node: Node {
                        labels,
                        ..node("n9")
                    },
                },
            ),
        ])
        .await
        .expect("apply");
    let snap = leader.build_snapshot().await.expect("build");

    {
        let (_, mut follower) = open(follower_dir.path()).expect("open follower");
        let mut applied = follower.subscribe();
        let mut buf = follower.begin_receiving_snapshot().await.expect("begin");
        *buf = *snap.snapshot;
        follower
            .install_snapshot(&snap.meta, buf)
            .await
            .expect("install");
        assert!(applied.has_changed().expect("watch open"));
        assert_eq!(*applied.borrow_and_update(), 2);
    }

    let (_, mut follower) = open(follower_dir.path()).expect("reopen follower");
    let (last_applied, membership) = follower.applied_state().await.expect("applied");
    assert_eq!(last_applied, snap.meta.last_log_id);
    assert_eq!(membership, snap.meta.last_membership);
    assert_eq!(
        follower.read(|s| s.nodes.get("n9").map(|n| n.labels.len())),
        Some(1)
    );
}

#[test]
fn second_open_of_same_dir_is_refused_with_a_hint() {
    let dir = TempDir::new().expect("temp dir");
    let _first = open(dir.path()).expect("open");
    let err = open(dir.path()).expect_err("second open must fail");
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    assert!(err.to_string().contains("another mesh daemon"), "{err}");
}

#[test]
fn store_is_private_and_tightened() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    let tmp = TempDir::new().expect("temp dir");
    let dir = tmp.path().join("raft");
    let file = dir.join(DB_FILE);
    drop(open(&dir).expect("open"));
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&file), 0o600);
    // An older daemon's world-readable store is narrowed and still opens.
    for (p, m) in [(&dir, 0o755), (&file, 0o644)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
    }
    drop(open(&dir).expect("reopen"));
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&file), 0o600);
}

#[test]
fn store_error_is_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<StoreError>();
}
