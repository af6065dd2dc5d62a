//! Service tasks: sandboxes whose addresses the managers chose when they
//! placed the task, so nothing is asked of them here; and the tasks' output,
//! kept after they are gone for `mesh service logs`.

use std::path::PathBuf;
use std::time::Duration;

use tracing::info;

use super::{DataPath, Record, Sandboxes, SandboxesError, check_id, wiring};
use crate::sandbox;

/// How many finished tasks' logs a node keeps.
const KEPT_LOGS: usize = 200;

impl Sandboxes {
    /// Starts a task's sandbox; on failure nothing is left behind.
    pub async fn run_task(
        &self,
        task: &mesh_proto::TaskAssignment,
        dp: &DataPath,
    ) -> Result<Record, SandboxesError> {
        check_id(&task.id)?;
        let env = task
            .env
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut rec = Record {
            id: task.id.clone(),
            name: task.name.clone(),
            netns: format!("{}-sb-{}", dp.prefix, &task.id[..task.id.len().min(12)]),
            pid: 0,
            cmd: task.cmd.clone(),
            env,
            networks: Vec::new(),
            egress_ip: None,
            created_at: String::new(),
            exit_code: None,
            host_network: false,
            service: Some(task.service_id.clone()),
            ports: Vec::new(),
        };
        let built = async {
            for info in &task.networks {
                let a = wiring::attachment(info, rec.free_ifname(), dp)?;
                rec.networks.push(a);
            }
            self.start_built(&mut rec, dp, false).await
        }
        .await;
        let built = match built {
            Ok(()) => self.wire_ingress(&rec).await,
            Err(e) => Err(e),
        };
        match built.and_then(|()| self.commit(&rec)) {
            Ok(()) => {
                info!(task = %rec.name, pid = rec.pid, "task started");
                Ok(rec)
            }
            Err(e) => {
                self.teardown(&rec, dp, None).await;
                Err(e)
            }
        }
    }

    /// Stops and removes a task's sandbox (the managers own its
    /// addresses). Its output is kept for `mesh service logs`.
    pub async fn remove_task(&self, id: &str, dp: &DataPath) -> Result<(), SandboxesError> {
        check_id(id)?;
        let Some(rec) = self.lock_records().get(id).cloned() else {
            return Ok(());
        };
        // Stop first, so the whole output is in the log we keep.
        if rec.pid != 0 && rec.running() {
            let pid = rec.pid;
            let _ = sandbox::stop(pid, Duration::from_secs(10)).await;
        }
        self.keep_task_log(&rec);
        let errors = self.teardown(&rec, dp, None).await;
        self.forget(&rec);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SandboxesError::Refused(format!(
                "removed task {} with errors: {}",
                rec.name,
                errors.join("; ")
            )))
        }
    }

    /// The task's side of the routing mesh, from the last view: the
    /// reconcile pass repairs it later, but the first connections must
    /// already find their way back. Deviation: it runs right after the
    /// process started, not before (the process starts with the wiring, in
    /// `start_built`); the managers only route to the task once it is
    /// reported running, which is after this.
    async fn wire_ingress(&self, rec: &Record) -> Result<(), SandboxesError> {
        let view = self.view.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(view) = view else {
            return Ok(());
        };
        let Ok(Some((plan, _))) = crate::ingress::Plan::of(&view) else {
            return Ok(());
        };
        let Some((a, targets)) = crate::ingress::task_side(&plan, &view, rec) else {
            return Ok(());
        };
        tokio::task::block_in_place(|| {
            crate::ingress::sync_task(&rec.netns, &a.ifname, &plan, &targets)
        })
        .map(drop)
        .map_err(|e| SandboxesError::Refused(format!("cannot set up the task's ingress side: {e}")))
    }

    fn task_logs_dir(&self) -> PathBuf {
        self.store.dir.with_file_name("task-logs")
    }

    /// Moves a task's output aside, keeping the newest [`KEPT_LOGS`].
    fn keep_task_log(&self, rec: &Record) {
        let dir = self.task_logs_dir();
        if crate::private_fs::create_dir(&dir).is_err() {
            return;
        }
        let Ok(from) = self.store.dir_of(&rec.id) else {
            return;
        };
        let _ = std::fs::rename(from.join("output.log"), dir.join(format!("{}.log", rec.id)));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut logs: Vec<(std::time::SystemTime, PathBuf)> = entries
                .flatten()
                .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                .collect();
            if logs.len() > KEPT_LOGS {
                logs.sort();
                for (_, p) in &logs[..logs.len() - KEPT_LOGS] {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }

    /// Where the output of a task is, whether its sandbox still exists or
    /// not; None for an ID that is not a mesh ID or a task without output.
    pub fn task_log_path(&self, id: &str) -> Option<PathBuf> {
        let live = self.store.dir_of(id).ok()?.join("output.log");
        let kept = self.task_logs_dir().join(format!("{id}.log"));
        [live, kept].into_iter().find(|p| p.is_file())
    }
}
