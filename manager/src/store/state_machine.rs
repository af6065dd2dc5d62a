//! The cluster state machine in memory, with its snapshots in the redb
//! file.

use super::*;

/// What a snapshot's bytes hold: the meta fields and the cluster state.
#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotFile<S> {
    pub(super) last_log_id: Option<LogId<NodeId>>,
    pub(super) last_membership: Membership,
    pub(super) snapshot_id: String,
    pub(super) state: S,
}

#[derive(Default)]
pub(super) struct SmState {
    pub(super) state: ClusterState,
    pub(super) last_applied: Option<LogId<NodeId>>,
    pub(super) last_membership: Membership,
}

pub(super) struct SmShared {
    pub(super) db: Arc<Database>,
    pub(super) sm: RwLock<SmState>,
    /// Last snapshot counter used, part of snapshot ids.
    pub(super) snapshot_seq: AtomicU64,
    pub(super) applied: watch::Sender<u64>,
}

/// The cluster state machine, in memory, with its snapshots persisted in the
/// Raft database. Cheap to clone: clones share the state.
#[derive(Clone)]
pub struct StateMachineStore {
    pub(super) inner: Arc<SmShared>,
}

impl fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("last_applied", &*self.inner.applied.borrow())
            .finish_non_exhaustive()
    }
}

impl StateMachineStore {
    /// Runs `f` on the current cluster state (a read lock is held meanwhile:
    /// keep `f` short and do not block in it).
    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        f(&self.lock_read().state)
    }

    /// [`Self::read`], with the index of the last applied entry: two reads
    /// with the same index saw the same state.
    pub fn read_indexed<R>(&self, f: impl FnOnce(&ClusterState, u64) -> R) -> R {
        let sm = self.lock_read();
        f(&sm.state, sm.last_applied.map_or(0, |id| id.index))
    }

    /// Watches the last applied log index: it changes after each applied
    /// batch and each installed snapshot.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.applied.subscribe()
    }

    fn lock_read(&self) -> RwLockReadGuard<'_, SmState> {
        self.inner.sm.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_write(&self) -> RwLockWriteGuard<'_, SmState> {
        self.inner
            .sm
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Persists `data` as the current snapshot unless a newer one is already
    /// stored (a snapshot built from older state may finish after a newer one
    /// was installed).
    async fn persist_snapshot(
        &self,
        meta: Meta,
        data: Vec<u8>,
        seq: Option<u64>,
    ) -> Result<(Meta, Vec<u8>), StoreError> {
        let meta_bytes = encode("snapshot meta", &meta)?;
        let seq_bytes = seq.map(|s| encode("snapshot counter", &s)).transpose()?;
        blocking(&self.inner.db, move |db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(SNAPSHOT)?;
                let stored = table.get(SNAP_META)?;
                let stored = stored
                    .map(|v| decode::<Meta>("snapshot meta", v.value()))
                    .transpose()?;
                let newer_stored = stored.is_some_and(|s| s.last_log_id > meta.last_log_id);
                if !newer_stored {
                    table.insert(SNAP_META, meta_bytes.as_slice())?;
                    table.insert(SNAP_DATA, data.as_slice())?;
                }
                if let Some(seq) = &seq_bytes {
                    table.insert(SNAP_SEQ, seq.as_slice())?;
                }
            }
            txn.commit()?;
            Ok((meta, data))
        })
        .await
    }

    fn current_snapshot(&self) -> Result<Option<Snapshot<TypeConfig>>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let table = txn.open_table(SNAPSHOT)?;
        let meta = table.get(SNAP_META)?;
        let data = table.get(SNAP_DATA)?;
        let (Some(meta), Some(data)) = (meta, data) else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            meta: decode("snapshot meta", meta.value())?,
            snapshot: Box::new(Cursor::new(data.value().to_vec())),
        }))
    }

    async fn build(&self) -> Result<Snapshot<TypeConfig>, StoreError> {
        let seq = self.inner.snapshot_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let (meta, data) = {
            let sm = self.lock_read();
            let snapshot_id = match sm.last_applied {
                Some(id) => format!("{}-{}-{seq}", id.leader_id.term, id.index),
                None => format!("0-0-{seq}"),
            };
            let data = encode(
                "snapshot",
                &SnapshotFile {
                    last_log_id: sm.last_applied,
                    last_membership: sm.last_membership.clone(),
                    snapshot_id: snapshot_id.clone(),
                    state: &sm.state,
                },
            )?;
            let meta = Meta {
                last_log_id: sm.last_applied,
                last_membership: sm.last_membership.clone(),
                snapshot_id,
            };
            (meta, data)
        };
        let (meta, data) = self.persist_snapshot(meta, data, Some(seq)).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }

    async fn install(&self, meta: &Meta, data: Vec<u8>) -> Result<(), StoreError> {
        let file: SnapshotFile<ClusterState> = decode("received snapshot", &data)?;
        self.persist_snapshot(meta.clone(), data, None).await?;
        {
            let mut sm = self.lock_write();
            sm.state = file.state;
            sm.last_applied = meta.last_log_id;
            sm.last_membership = meta.last_membership.clone();
        }
        self.inner
            .applied
            .send_replace(meta.last_log_id.map_or(0, |id| id.index));
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        self.build()
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Snapshot(None), ErrorVerb::Write))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, Membership)> {
        let sm = self.lock_read();
        Ok((sm.last_applied, sm.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries = entries.into_iter();
        let mut results = Vec::with_capacity(entries.size_hint().0);
        let last = {
            let mut sm = self.lock_write();
            for entry in entries {
                let log_id = entry.log_id;
                sm.last_applied = Some(log_id);
                let result = match entry.payload {
                    EntryPayload::Blank => CommandResult::default(),
                    EntryPayload::Normal(cmd) => sm.state.apply(log_id.index, &cmd),
                    EntryPayload::Membership(m) => {
                        sm.last_membership = StoredMembership::new(Some(log_id), m);
                        CommandResult::default()
                    }
                };
                results.push(result);
            }
            sm.last_applied
        };
        if let Some(id) = last {
            self.inner.applied.send_replace(id.index);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        self.install(meta, snapshot.into_inner())
            .await
            .map_err(|e| {
                e.into_raft(
                    ErrorSubject::Snapshot(Some(meta.signature())),
                    ErrorVerb::Write,
                )
            })
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        self.current_snapshot()
            .map_err(|e| e.into_raft(ErrorSubject::Snapshot(None), ErrorVerb::Read))
    }
}
