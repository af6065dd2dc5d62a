//! A sandbox's process once started: whether it runs, its exit code, and
//! stopping its whole process group. Nothing here blocks: stopping waits
//! on tokio timers.

use std::collections::BTreeMap;
use std::fs;
use std::sync::Mutex;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::sys::wait::{self, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::time::Instant;
use tracing::info;

use super::SandboxError;

/// Exit codes of sandbox processes this daemon has already reaped, so that
/// [`wait_exit`] still answers after [`stop`] or a previous call collected
/// the zombie.
static REAPED: Mutex<BTreeMap<u32, i32>> = Mutex::new(BTreeMap::new());

fn reaped() -> std::sync::MutexGuard<'static, BTreeMap<u32, i32>> {
    // A panic while holding this lock cannot leave the map inconsistent.
    REAPED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Docker's convention: the exit code, or 128 + the signal number.
fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// What the daemon knows about a sandbox process without blocking.
enum Probe {
    Running,
    Exited(i32),
    /// Not a child of this process (e.g. started before a daemon restart).
    Foreign,
}

/// Reaps `pid` if it is our child and has exited, remembering its code.
fn reap(pid: Pid) -> Probe {
    if let Some(code) = reaped().get(&(pid.as_raw() as u32)) {
        return Probe::Exited(*code);
    }
    match wait::waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => Probe::Running,
        Ok(status) => match exit_code(status) {
            Some(code) => {
                reaped().insert(pid.as_raw() as u32, code);
                Probe::Exited(code)
            }
            // Stopped or continued: still there.
            None => Probe::Running,
        },
        Err(_) => Probe::Foreign,
    }
}

/// A process that is not our child: running unless gone or a zombie.
fn foreign_alive(pid: Pid) -> bool {
    if signal::kill(pid, None::<Signal>).is_err() {
        return false;
    }
    // /proc/PID/stat: "pid (comm) S ..."; comm may hold spaces or ')'.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn checked_pid(pid: u32) -> Result<Pid, SandboxError> {
    // 0 and 1 would make killpg hit our own group or init; our own pid
    // would hit the daemon.
    match i32::try_from(pid) {
        Ok(raw) if raw > 1 && pid != std::process::id() => Ok(Pid::from_raw(raw)),
        _ => Err(SandboxError::InvalidPid(pid)),
    }
}

/// The exit code of a sandbox process this daemon started, once it has
/// exited (a signal death reads as 128 + signal, as in Docker); `None` while
/// it runs, or when the process is not a child of this daemon (then only
/// [`alive`] can tell). Never blocks.
pub fn wait_exit(pid: u32) -> Option<i32> {
    let pid = checked_pid(pid).ok()?;
    match reap(pid) {
        Probe::Exited(code) => Some(code),
        Probe::Running | Probe::Foreign => None,
    }
}

/// Whether the sandbox process `pid` is still running. Does not reap it, so
/// [`wait_exit`] can still read its exit code.
pub fn alive(pid: u32) -> bool {
    let Ok(pid) = checked_pid(pid) else {
        return false;
    };
    if reaped().contains_key(&(pid.as_raw() as u32)) {
        return false;
    }
    let peek = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    match wait::waitid(Id::Pid(pid), peek) {
        Ok(WaitStatus::StillAlive) => true,
        Ok(status) => exit_code(status).is_none(),
        Err(_) => foreign_alive(pid),
    }
}

/// Stops a sandbox: SIGTERM to its process group, SIGKILL to the group once
/// the leader has exited or `grace` has passed (so nothing it left behind
/// keeps running), then reaps the leader if the daemon is its parent.
/// Stopping a process that is already gone is not an error. Waits with
/// tokio timers, so it holds no thread while the sandbox takes its time;
/// callers should not hold a lock across it either.
pub async fn stop(pid: u32, grace: Duration) -> Result<(), SandboxError> {
    let leader = checked_pid(pid)?;
    let signal_group = |sig: Signal| match signal::killpg(leader, sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(source) => Err(SandboxError::Signal { pid, source }),
    };
    let running = |leader: Pid| match reap(leader) {
        Probe::Running => true,
        Probe::Exited(_) => false,
        Probe::Foreign => foreign_alive(leader),
    };
    signal_group(Signal::SIGTERM)?;
    let deadline = Instant::now() + grace;
    while running(leader) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal_group(Signal::SIGKILL)?;
    // SIGKILL cannot be caught, but a process stuck in the kernel (D state)
    // takes its time: wait a bounded while rather than hang the daemon.
    let waited = Duration::from_secs(5);
    let deadline = Instant::now() + waited;
    while running(leader) {
        if Instant::now() >= deadline {
            return Err(SandboxError::Unkillable { pid, waited });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    info!(pid, "stopped sandbox");
    Ok(())
}

/// Forgets the exit code of an earlier owner of `pid`: a pid is reused only
/// after its previous owner was reaped.
pub(super) fn forget(pid: u32) {
    reaped().remove(&pid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_docker() {
        let pid = Pid::from_raw(42);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 3)), Some(3));
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(137)
        );
    }
}
