//! `mesh exec`: running a command inside a running sandbox, by joining its
//! namespaces in the forked child.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

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
    let (mut cmd, steps) = prepare(pid, argv, env)?;
    let result = cmd.status();
    drop(cmd);
    result.map_err(|source| step_error(pid, &steps, source))
}

/// What became of one health probe.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    /// Exit 0 within the timeout.
    pub passed: bool,
    /// The exit code, or None when killed (timeout or signal).
    pub exit_code: Option<i32>,
    /// The start of its stdout then stderr, at most [`PROBE_OUTPUT`] bytes each.
    pub output: String,
}

/// Output kept of each stream of a probe; the rest is read and dropped so
/// the probe never blocks on a full pipe.
pub const PROBE_OUTPUT: u64 = 4096;

/// Runs `argv` in the sandbox of `pid` as [`exec`] does, without blocking a
/// thread: stdin empty, output captured (bounded), in a process group of
/// its own that is killed whole when `timeout` runs out (a failed probe).
pub async fn probe(
    pid: u32,
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<ProbeResult, SandboxError> {
    let (mut cmd, steps) = prepare(pid, argv, env)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let spawned = cmd.spawn();
    drop(cmd);
    let mut child = spawned.map_err(|source| step_error(pid, &steps, source))?;
    let group = child.id().and_then(|id| i32::try_from(id).ok());
    let out = child.stdout.take();
    let err = child.stderr.take();
    let run = async {
        let (o, e, status) = tokio::join!(bounded(out), bounded(err), child.wait());
        (o, e, status)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok((o, e, status)) => {
            let status = status.map_err(|source| SandboxError::Exec {
                pid,
                step: "waiting for the command",
                source,
            })?;
            Ok(ProbeResult {
                passed: status.success(),
                exit_code: status.code(),
                output: format!("{o}{e}"),
            })
        }
        Err(_) => {
            // The whole group: a shell's children would keep the pipes open.
            if let Some(g) = group {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(g),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill().await;
            Ok(ProbeResult {
                passed: false,
                exit_code: None,
                output: format!("health check exceeded timeout ({timeout:?})"),
            })
        }
    }
}

/// The first [`PROBE_OUTPUT`] bytes of a pipe, lossily as text; the rest
/// is drained.
async fn bounded<R: tokio::io::AsyncRead + Unpin>(r: Option<R>) -> String {
    use tokio::io::AsyncReadExt;
    let Some(mut r) = r else {
        return String::new();
    };
    let mut buf = Vec::new();
    let _ = (&mut r).take(PROBE_OUTPUT).read_to_end(&mut buf).await;
    let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
    String::from_utf8_lossy(&buf).into_owned()
}

fn step_error(pid: u32, steps: &StepPipe, source: io::Error) -> SandboxError {
    SandboxError::Exec {
        pid,
        step: steps
            .failed_step()
            .and_then(|i| EXEC_STEPS.get(usize::from(i)).copied())
            .unwrap_or("running the command"),
        source,
    }
}

/// A command that joins the namespaces of `pid` before exec; the pipe
/// tells which step failed.
fn prepare(
    pid: u32,
    argv: &[String],
    env: &[(String, String)],
) -> Result<(Command, StepPipe), SandboxError> {
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
    Ok((cmd, steps))
}
