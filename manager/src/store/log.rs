//! The Raft log, the vote and the log pointers, in the redb file.

use super::*;

/// The Raft log, vote and log pointers. Cheap to clone: clones share the
/// database.
#[derive(Clone)]
pub struct LogStore {
    pub(super) db: Arc<Database>,
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
