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
//!
//! This file opens the database and holds what both stores share; `log`
//! and `state_machine` are the two stores.

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

mod log;
mod state_machine;
#[cfg(test)]
mod tests;

pub use log::LogStore;
pub use state_machine::StateMachineStore;
use state_machine::{SmShared, SmState, SnapshotFile};

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
