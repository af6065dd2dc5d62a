//! openraft storage for the cluster store, persisted in one redb file
//! (`<state dir>/raft.redb`).
//!
//! - [`LogStore`] keeps the Raft log (index -> JSON of the entry), the vote,
//!   the committed log id and the last purged log id. Every write is a redb
//!   write transaction committed with immediate durability before openraft is
//!   told it is done (one transaction per append batch); only the committed
//!   log id, which openraft treats as a hint, is written without an fsync of
//!   its own and reaches the disk with the next durable write.
//! - [`StateMachineStore`] keeps the [`ClusterState`] in memory. Snapshots are
//!   JSON of the snapshot meta fields plus the state; the current snapshot is
//!   persisted in the same database, loaded by [`open`], and openraft replays
//!   the log after it on start-up.
//!
//! Writes run on tokio's blocking pool so that an fsync never stalls the
//! runtime's workers; each write is awaited before the call returns, which
//! keeps writes serialized as openraft requires.

use std::fmt;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, LogState, OptionalSend,
    RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageIOError, StoredMembership,
    Vote,
};
use redb::{Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::TypeConfig;
use crate::state::{ClusterState, CommandResult};

/// File name of the Raft database inside the state directory.
const DB_FILE: &str = "raft.redb";

/// Log entries: Raft log index -> JSON of `Entry<TypeConfig>`.
const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Log-store metadata, JSON values under the `KEY_*` keys below.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
/// The current snapshot: `SNAP_META` (JSON of `SnapshotMeta`), `SNAP_DATA`
/// (the snapshot bytes as sent to followers) and `SNAP_SEQ` (JSON u64, the
/// last snapshot counter used by this node).
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_snapshot");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";
const SNAP_META: &str = "meta";
const SNAP_DATA: &str = "data";
const SNAP_SEQ: &str = "seq";

type NodeId = u64;
type StorageResult<T> = Result<T, openraft::StorageError<NodeId>>;
type Membership = StoredMembership<NodeId, BasicNode>;
type Meta = SnapshotMeta<NodeId, BasicNode>;

/// Errors of the Raft store. Inside openraft they travel as
/// [`openraft::StorageError`]; [`open`] returns them directly.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot create the Raft state directory {path}: {source}; check that it is writable by the mesh daemon"
    )]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot open Raft store at {path}: {source}; is another mesh daemon using this state dir?"
    )]
    Locked {
        path: PathBuf,
        source: DatabaseError,
    },
    #[error(
        "cannot open Raft store at {path}: {source}; the file may be damaged or written by an incompatible mesh version"
    )]
    Open {
        path: PathBuf,
        source: DatabaseError,
    },
    #[error("Raft store database error: {0}; the disk may be full or the state dir damaged")]
    Db(#[from] redb::Error),
    #[error(
        "cannot decode {what} read from the Raft store: {source}; the state dir is damaged or was written by an incompatible mesh version"
    )]
    Decode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("cannot encode {what} for the Raft store: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("a Raft store write did not complete: {0}")]
    Task(#[from] tokio::task::JoinError),
}

macro_rules! from_redb_error {
    ($($t:ty),*) => {
        $(impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        })*
    };
}
from_redb_error!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl StoreError {
    /// Converts into openraft's error, naming what was being done.
    fn into_raft(
        self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
    ) -> openraft::StorageError<NodeId> {
        StorageIOError::new(subject, verb, &self).into()
    }
}

fn encode<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode { what, source })
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode { what, source })
}

/// Runs a database write on the blocking pool and waits for it.
async fn blocking<T, F>(db: &Arc<Database>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
{
    let db = Arc::clone(db);
    tokio::task::spawn_blocking(move || f(&db)).await?
}

/// Reads one JSON value from a `&str -> &[u8]` table.
fn read_json<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
    what: &'static str,
) -> Result<Option<T>, StoreError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(table)?;
    let value = table.get(key)?;
    value.map(|v| decode(what, v.value())).transpose()
}

/// Writes one value to the META table in its own transaction.
fn write_meta(
    db: &Database,
    key: &str,
    value: &[u8],
    durability: Durability,
) -> Result<(), StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(durability)?;
    {
        let mut table = txn.open_table(META)?;
        table.insert(key, value)?;
    }
    txn.commit()?;
    Ok(())
}

/// Opens (creating if needed) the Raft store in `dir/raft.redb` and loads the
/// last persisted snapshot into the state machine.
///
/// The database holds the CA key and the join tokens, so the dir is made
/// 0700 and the file 0600 before redb opens it (redb would create it with
/// the umask's mode); a looser existing one is tightened first, with a warning.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let path = dir.join(DB_FILE);
    make_private(dir, &path).map_err(|source| StoreError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let db = Database::create(&path).map_err(|source| {
        let path = path.clone();
        if matches!(
            source,
            DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch
        ) {
            StoreError::Locked { path, source }
        } else {
            StoreError::Open { path, source }
        }
    })?;

    // Create the tables once so that read transactions can always open them.
    let txn = db.begin_write()?;
    {
        txn.open_table(LOGS)?;
        txn.open_table(META)?;
        txn.open_table(SNAPSHOT)?;
    }
    txn.commit()?;

    let mut sm = SmState::default();
    if let Some(meta) = read_json::<Meta>(&db, SNAPSHOT, SNAP_META, "snapshot meta")? {
        let data = {
            let txn = db.begin_read()?;
            let table = txn.open_table(SNAPSHOT)?;
            let data = table.get(SNAP_DATA)?;
            data.map(|d| decode::<SnapshotFile<ClusterState>>("snapshot", d.value()))
                .transpose()?
        };
        if let Some(file) = data {
            sm = SmState {
                state: file.state,
                last_applied: meta.last_log_id,
                last_membership: meta.last_membership,
            };
        }
    }
    let seq = read_json::<u64>(&db, SNAPSHOT, SNAP_SEQ, "snapshot counter")?.unwrap_or(0);

    let db = Arc::new(db);
    let (applied, _) = watch::channel(sm.last_applied.map_or(0, |id| id.index));
    let sm_store = StateMachineStore {
        inner: Arc::new(SmShared {
            db: Arc::clone(&db),
            sm: RwLock::new(sm),
            snapshot_seq: AtomicU64::new(seq),
            applied,
        }),
    };
    Ok((LogStore { db }, sm_store))
}

/// Creates `dir` (0700) and an empty `file` (0600) if missing, and narrows
/// either if others may read it.
fn make_private(dir: &Path, file: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // Not `truncate`: an existing database is opened as it is.
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(file)?;
    for (path, want) in [(dir, 0o700), (file, 0o600)] {
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o7777;
        if mode & !want != 0 {
            tracing::warn!(
                path = %path.display(),
                "{} was mode {mode:04o}, readable by other users; tightened to {:04o}",
                path.display(),
                mode & want
            );
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & want))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Log store

/// The Raft log, vote and log pointers. Cheap to clone: clones share the
/// database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl fmt::Debug for LogStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

/// The first index of `range`, and its end bound, or `None` if it is empty.
fn log_range(range: &impl RangeBounds<u64>) -> Option<(u64, Bound<u64>)> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = range.end_bound().cloned();
    let empty = match end {
        Bound::Included(e) => start > e,
        Bound::Excluded(e) => start >= e,
        Bound::Unbounded => false,
    };
    (!empty).then_some((start, end))
}

impl LogStore {
    fn read_entries(
        &self,
        range: impl RangeBounds<u64>,
    ) -> Result<Vec<Entry<TypeConfig>>, StoreError> {
        let Some((start, end)) = log_range(&range) else {
            return Ok(Vec::new());
        };
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOGS)?;
        let mut entries = Vec::new();
        for item in table.range::<u64>((Bound::Included(start), end))? {
            let (_, value) = item?;
            entries.push(decode("log entry", value.value())?);
        }
        Ok(entries)
    }

    fn log_state(&self) -> Result<LogState<TypeConfig>, StoreError> {
        let txn = self.db.begin_read()?;
        let last_purged = {
            let meta = txn.open_table(META)?;
            let value = meta.get(KEY_LAST_PURGED)?;
            value
                .map(|v| decode::<LogId<NodeId>>("last purged log id", v.value()))
                .transpose()?
        };
        let last = {
            let logs = txn.open_table(LOGS)?;
            let last = logs.last()?;
            last.map(|(_, v)| decode::<Entry<TypeConfig>>("log entry", v.value()))
                .transpose()?
                .map(|e| e.log_id)
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn write_entries<I>(&self, entries: I) -> Result<(), StoreError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>>,
    {
        let batch = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, encode("log entry", &e)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        if batch.is_empty() {
            return Ok(());
        }
        blocking(&self.db, move |db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(LOGS)?;
                for (index, bytes) in &batch {
                    table.insert(*index, bytes.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })
        .await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        self.read_entries(range)
            .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        self.log_state()
            .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Read))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let write = async {
            let bytes = encode("vote", vote)?;
            blocking(&self.db, move |db| {
                write_meta(db, KEY_VOTE, &bytes, Durability::Immediate)
            })
            .await
        };
        write
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Write))
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        read_json(&self.db, META, KEY_VOTE, "vote")
            .map_err(|e| e.into_raft(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        let write = async {
            let bytes = encode("committed log id", &committed)?;
            // The committed log id only saves re-applying logs at start-up, so
            // it rides on the next durable commit instead of costing an fsync.
            blocking(&self.db, move |db| {
                write_meta(db, KEY_COMMITTED, &bytes, Durability::None)
            })
            .await
        };
        write
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        read_json::<Option<LogId<NodeId>>>(&self.db, META, KEY_COMMITTED, "committed log id")
            .map(Option::flatten)
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Read))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        match self.write_entries(entries).await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e.into_raft(ErrorSubject::Logs, ErrorVerb::Write))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        blocking(&self.db, move |db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(LOGS)?;
                table.retain_in(log_id.index.., |_, _| false)?;
            }
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let write = async {
            let bytes = encode("last purged log id", &log_id)?;
            blocking(&self.db, move |db| {
                let txn = db.begin_write()?;
                {
                    let mut meta = txn.open_table(META)?;
                    meta.insert(KEY_LAST_PURGED, bytes.as_slice())?;
                    let mut logs = txn.open_table(LOGS)?;
                    logs.retain_in(..=log_id.index, |_, _| false)?;
                }
                txn.commit()?;
                Ok(())
            })
            .await
        };
        write
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Logs, ErrorVerb::Delete))
    }
}

// ---------------------------------------------------------------------------
// State machine

/// What a snapshot's bytes hold: the meta fields and the cluster state.
#[derive(Serialize, Deserialize)]
struct SnapshotFile<S> {
    last_log_id: Option<LogId<NodeId>>,
    last_membership: Membership,
    snapshot_id: String,
    state: S,
}

#[derive(Default)]
struct SmState {
    state: ClusterState,
    last_applied: Option<LogId<NodeId>>,
    last_membership: Membership,
}

struct SmShared {
    db: Arc<Database>,
    sm: RwLock<SmState>,
    /// Last snapshot counter used, part of snapshot ids.
    snapshot_seq: AtomicU64,
    applied: watch::Sender<u64>,
}

/// The cluster state machine, in memory, with its snapshots persisted in the
/// Raft database. Cheap to clone: clones share the state.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<SmShared>,
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

#[cfg(test)]
mod tests {
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
}
