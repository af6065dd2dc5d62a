//! `mesh exec`: running a command inside a running sandbox, by joining its
//! namespaces in the forked child.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus};

use nix::sched::CloneFlags;

use super::{SandboxError, StepPipe, child_fail, find_program, sandbox_path};

/// Steps of joining a sandbox, in the order the child runs them.
const EXEC_STEPS: [&str; 3] = [
    "joining the network namespace",
    "joining the UTS namespace",
    "joining the mount namespace",
];

/// Runs `argv` inside the running sandbox whose process is `pid`, as `mesh
/// exec` does: the child joins the sandbox's network, UTS and mount
/// namespaces (via /proc/PID/ns) before exec, inherits the caller's stdio
/// and starts in `/`. Blocks until it exits and returns its status.
///
/// The environment is PATH (from `env`, else the daemon's) plus `env`;
/// pass HOSTNAME in `env` if the command needs it.
pub fn exec(
    pid: u32,
    argv: &[String],
    env: &[(String, String)],
) -> Result<ExitStatus, SandboxError> {
    let Some(command) = argv.first() else {
        return Err(SandboxError::ExecEmpty { pid });
    };
    if pid <= 1 {
        return Err(SandboxError::InvalidPid(pid));
    }
    let open_ns = |kind: &str| -> Result<OwnedFd, SandboxError> {
        match File::open(format!("/proc/{pid}/ns/{kind}")) {
            Ok(f) => Ok(f.into()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(SandboxError::NotRunning(pid)),
            Err(source) => Err(SandboxError::Exec {
                pid,
                step: "opening the sandbox's namespaces",
                source,
            }),
        }
    };
    let net = open_ns("net")?;
    let uts = open_ns("uts")?;
    let mnt = open_ns("mnt")?;
    let path_var = sandbox_path(env);
    // The sandbox sees the host's filesystem, so the host lookup holds there.
    let program = find_program(command, &path_var).ok_or_else(|| SandboxError::ExecNotFound {
        pid,
        command: command.clone(),
    })?;
    let steps = StepPipe::new().map_err(|source| SandboxError::Exec {
        pid,
        step: "creating a pipe",
        source,
    })?;
    let report = steps.write.as_raw_fd();

    let mut cmd = Command::new(&program);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", &path_var)
        .envs(env.iter().map(|(k, v)| (k, v)));
    // SAFETY: runs in the forked child; only setns(2) and write(2) on fds
    // opened before the fork, no allocation, no locks.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(&net, CloneFlags::CLONE_NEWNET)
                .map_err(|e| child_fail(report, 0, e))?;
            nix::sched::setns(&uts, CloneFlags::CLONE_NEWUTS)
                .map_err(|e| child_fail(report, 1, e))?;
            // Last: joining a mount namespace also moves the root and the
            // working directory to the sandbox's `/`.
            nix::sched::setns(&mnt, CloneFlags::CLONE_NEWNS)
                .map_err(|e| child_fail(report, 2, e))?;
            Ok(())
        });
    }
    let result = cmd.status();
    drop(cmd);
    result.map_err(|source| SandboxError::Exec {
        pid,
        step: steps
            .failed_step()
            .and_then(|i| EXEC_STEPS.get(usize::from(i)).copied())
            .unwrap_or("running the command"),
        source,
    })
}
