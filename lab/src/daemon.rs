//! A node's daemon: starting it in the node's namespaces, waiting for its
//! socket, killing and restarting it, and errors that carry its log.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::error::{LabError, Result};
use crate::lab::{Lab, create_dir};
use crate::spec::UpSpec;
use crate::sys::{self, Uts};
use crate::teardown::reap;

/// Log lines shown in errors about a node.
const LOG_TAIL_LINES: usize = 30;

impl Lab {
    /// Starts node `i`'s daemon in its netns and a fresh UTS namespace whose
    /// hostname is the node's name, detached, logging to daemon.log.
    pub(crate) fn spawn_daemon(&mut self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        create_dir(&node.state_dir, 0o700)?;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(&node.log)
            .map_err(|e| LabError::io(format!("opening {}", node.log.display()), e))?;
        let mut cmd = Command::new(&self.mesh_bin);
        cmd.arg("daemon")
            .arg("--state-dir")
            .arg(&node.state_dir)
            .arg("--socket")
            .arg(&node.socket)
            .args(&self.daemon_args)
            .current_dir(&node.dir)
            .env_remove("MESH_HOST")
            // Plain text in daemon.log: its tail goes into error messages.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        let line = sys::cmd_line(&cmd);
        let _ = writeln!(log, "--- mesh lab: {} starting `{line}` ---", node.name);
        let err_log = log
            .try_clone()
            .map_err(|e| LabError::io(format!("opening {}", node.log.display()), e))?;
        cmd.stdout(log).stderr(err_log);
        sys::enter_node(&mut cmd, &node.netns, Uts::New(node.name.clone()), true)?;
        let child = cmd
            .spawn()
            .map_err(|error| LabError::Spawn { cmd: line, error })?;
        let pid = i32::try_from(child.id()).map_err(|_| {
            LabError::InvalidSpec(format!("pid {} does not fit a pid_t", child.id()))
        })?;
        let name = node.name.clone();
        let node = &mut self.nodes[i];
        if let Some(old) = node.pid {
            node.previous_pids.push(old);
        }
        node.pid = Some(pid);
        node.paused = false;
        node.pid_start = sys::proc_info(pid).map(|p| p.start);
        self.children.insert(name, child);
        tracing::debug!(lab = %self.name, node = %self.nodes[i].name, pid, "daemon started");
        Ok(())
    }

    /// An error about node `i`, with the tail of its daemon log.
    pub(crate) fn node_error(&self, i: usize, msg: String) -> LabError {
        let node = &self.nodes[i];
        LabError::Node {
            lab: self.name.clone(),
            node: node.name.clone(),
            msg,
            log: node.log.clone(),
            tail: sys::log_tail(&node.log, LOG_TAIL_LINES),
        }
    }

    /// Waits until node `i`'s socket answers `mesh info`.
    pub(crate) fn wait_socket(&self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            sys::check_interrupt()?;
            if !self.nodes[i].running() {
                return Err(
                    self.node_error(i, "its daemon exited before its socket answered".into())
                );
            }
            // Spawn `mesh info` only once the socket exists: cheap for big labs.
            if !self.nodes[i].socket.exists() {
                last = "the socket was not created".to_string();
            } else {
                match self.mesh_idx(i, &["info"], Duration::from_secs(5)) {
                    Ok(out) if out.status.success() => return Ok(()),
                    Ok(out) => last = String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    Err(LabError::Timeout { .. }) => last = "`mesh info` hung for 5s".into(),
                    Err(e) => return Err(e),
                }
            }
            if Instant::now() >= deadline {
                return Err(self.node_error(
                    i,
                    format!(
                        "its socket {} did not answer `mesh info` within {}s (last: {last})",
                        self.nodes[i].socket.display(),
                        timeout.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs `node`'s daemon (a crash: it removes nothing). Ok(false) if it
    /// was not running.
    pub fn kill(&mut self, node: &str) -> Result<bool> {
        let i = self.index(node)?;
        let n = &self.nodes[i];
        let (Some(pid), true) = (n.pid, n.running()) else {
            return Ok(false);
        };
        let start = n
            .pid_start
            .or_else(|| sys::proc_info(pid).map(|p| p.start))
            .unwrap_or(0);
        sys::signal(pid, Some(start), Signal::SIGKILL)?;
        if !sys::wait_gone(&[(pid, start)], Duration::from_secs(10)).is_empty()
            || !sys::wait_threads_gone(pid, Duration::from_secs(10))
        {
            return Err(self.node_error(i, format!("daemon pid {pid} survived SIGKILL for 10s")));
        }
        reap(&mut self.children);
        self.nodes[i].paused = false;
        self.save()?;
        tracing::info!(lab = %self.name, node = %self.nodes[i].name, pid, "daemon killed");
        Ok(true)
    }

    /// Starts `node`'s daemon again on the same state dir and socket and waits
    /// until its socket answers.
    pub fn start(&mut self, node: &str) -> Result<()> {
        let i = self.index(node)?;
        let n = &self.nodes[i];
        if let (Some(pid), true) = (n.pid, n.running()) {
            return Err(LabError::AlreadyRunning {
                lab: self.name.clone(),
                node: n.name.clone(),
                pid,
            });
        }
        if !sys::netns_path(&n.netns).exists() {
            return Err(LabError::InvalidSpec(format!(
                "{}'s namespace {} is gone; the lab is broken: `mesh lab down {}` and `up` again",
                n.name, n.netns, self.name
            )));
        }
        reap(&mut self.children);
        self.spawn_daemon(i)?;
        self.save()?;
        self.wait_socket(i, UpSpec::default().socket_timeout)
    }
}
