//! Running commands inside a lab's nodes: their network and UTS
//! namespaces, `MESH_HOST` set to the node's daemon, and `mesh` itself.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::error::{LabError, Result};
use crate::lab::Lab;
use crate::spec::{LabHost, LabNode};
use crate::sys::{self, Uts};

impl Lab {
    /// PATH for commands in a node: the mesh binary's directory first, so
    /// `mesh` works there even when it is not installed.
    fn path_env(&self) -> OsString {
        let default =
            OsString::from("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        let old = std::env::var_os("PATH").unwrap_or(default);
        let mut dirs: Vec<PathBuf> = self
            .mesh_bin
            .parent()
            .map(Path::to_path_buf)
            .into_iter()
            .collect();
        dirs.extend(std::env::split_paths(&old));
        std::env::join_paths(dirs).unwrap_or(old)
    }

    /// The node's UTS namespace: the running daemon's, else a new one with
    /// the node's hostname.
    fn uts_for(&self, node: &LabNode) -> Uts {
        if let Some(pid) = node.pid
            && node.running()
            && let Ok(f) = File::open(format!("/proc/{pid}/ns/uts"))
            // Re-check: the fd must be the daemon's, not a recycled pid's.
            && node.running()
        {
            return Uts::Join(f.into());
        }
        Uts::New(node.name.clone())
    }

    pub(crate) fn command_idx(&self, i: usize, program: &OsStr) -> Result<Command> {
        let node = &self.nodes[i];
        let mut cmd = Command::new(program);
        cmd.env("MESH_HOST", node.host())
            .env("MESH_LAB", &self.name)
            .env("MESH_LAB_NODE", &node.name)
            .env("PATH", self.path_env());
        sys::enter_node(&mut cmd, &node.netns, self.uts_for(node), false)?;
        Ok(cmd)
    }

    /// A command in outside host `host`: its network namespace and a UTS
    /// namespace named after it; no `MESH_HOST`, as it has no daemon.
    fn host_command(&self, host: &LabHost, program: &OsStr) -> Result<Command> {
        let mut cmd = Command::new(program);
        cmd.env_remove("MESH_HOST")
            .env("MESH_LAB", &self.name)
            .env("MESH_LAB_HOST", &host.name)
            .env("PATH", self.path_env());
        sys::enter_node(&mut cmd, &host.netns, Uts::New(host.name.clone()), false)?;
        Ok(cmd)
    }

    /// A `Command` that runs `program` inside `node` (its network and UTS
    /// namespaces, `MESH_HOST` set), or inside an outside host (`host1`):
    /// for background processes such as `iperf3 -s` that the caller spawns
    /// and stops itself.
    pub fn command(&self, node: &str, program: impl AsRef<OsStr>) -> Result<Command> {
        match self.hosts.iter().find(|h| h.name == node) {
            Some(host) => self.host_command(host, program.as_ref()),
            None => self.command_idx(self.index(node)?, program.as_ref()),
        }
    }

    /// Runs `argv` inside `node` (or outside host `host1`..), capturing its
    /// output; the exit status is the caller's to check.
    pub fn exec<S: AsRef<OsStr>>(&self, node: &str, argv: &[S]) -> Result<Output> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| LabError::InvalidSpec("exec needs a command to run".into()))?;
        let mut cmd = self.command(node, program)?;
        cmd.args(args);
        sys::run_capture(cmd, Some(self.command_timeout))
    }

    /// Like [`Lab::exec`], but fails unless the command exits 0; returns its stdout.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, node: &str, argv: &[S]) -> Result<String> {
        let out = self.exec(node, argv)?;
        let shown = argv
            .iter()
            .map(|a| a.as_ref().to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        sys::check(&format!("{shown} (on {node})"), &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub(crate) fn mesh_idx<S: AsRef<OsStr>>(
        &self,
        i: usize,
        args: &[S],
        timeout: Duration,
    ) -> Result<Output> {
        let mut cmd = self.command_idx(i, self.mesh_bin.as_os_str())?;
        cmd.arg("-H").arg(self.nodes[i].host()).args(args);
        sys::run_capture(cmd, Some(timeout))
    }

    /// Runs `mesh -H unix://SOCK ARGS` inside `node`.
    pub fn mesh<S: AsRef<OsStr>>(&self, node: &str, args: &[S]) -> Result<Output> {
        self.mesh_idx(self.index(node)?, args, self.command_timeout)
    }

    /// Like [`Lab::mesh`], but fails unless it exits 0; returns its stdout.
    pub fn mesh_ok<S: AsRef<OsStr>>(&self, node: &str, args: &[S]) -> Result<String> {
        let out = self.mesh(node, args)?;
        let shown = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        sys::check(&format!("mesh {shown} (on {node})"), &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
