//! Kernel and process plumbing: running `ip`, entering a node's namespaces,
//! finding and signalling processes, unmounting. Every failure carries the
//! command line and its stderr so the user sees what the kernel refused.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, sethostname, setsid};

use crate::error::{LabError, Result};

/// Where `ip netns add` keeps its namespace handles.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// How long one `ip` call may take; they normally take milliseconds.
const IP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to wait for output from pipes that a grandchild still holds open
/// after the command itself exited.
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// Set by the CLI's SIGINT/SIGTERM handler during `up`, so a Ctrl-C stops
/// at the next step and the half-made lab is removed instead of abandoned.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes the first SIGINT or SIGTERM set the interrupted flag instead of
/// killing the process; a second one kills it as usual.
pub(crate) fn catch_interrupts() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::SA_RESETHAND | SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }
            .map_err(|e| LabError::sys(format!("installing a {sig} handler"), e))?;
    }
    Ok(())
}

/// Fails with [`LabError::Interrupted`] once the user pressed Ctrl-C.
pub(crate) fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(LabError::Interrupted)
    } else {
        Ok(())
    }
}

/// Forgets an interrupt once it has been acted on (cleanup must still run commands).
pub(crate) fn clear_interrupt() {
    INTERRUPTED.store(false, Ordering::SeqCst);
}

/// A printable `program arg...` for error messages.
pub(crate) fn cmd_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// "exit code 3" / "killed by signal 9", for messages.
pub(crate) fn status_text(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// The exit code a shell would report for `status` (128+N for signal N).
pub(crate) fn shell_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Reads a pipe to its end on a thread; the buffer is shared so a caller that
/// stops waiting still gets what arrived.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> (Arc<Mutex<Vec<u8>>>, mpsc::Receiver<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let shared = Arc::clone(&buf);
    thread::spawn(move || {
        if let Some(mut pipe) = pipe {
            let mut chunk = [0u8; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if let Ok(mut b) = shared.lock() {
                            b.extend_from_slice(&chunk[..n]);
                        }
                    }
                }
            }
        }
        let _ = tx.send(());
    });
    (buf, rx)
}

fn take(buf: &Arc<Mutex<Vec<u8>>>) -> Vec<u8> {
    buf.lock()
        .map(|mut b| std::mem::take(&mut *b))
        .unwrap_or_default()
}

/// Runs `cmd` with stdin closed, capturing stdout and stderr, and kills its
/// whole process group if it runs past `timeout`. The exit status is not
/// checked: that is the caller's business.
pub(crate) fn run_capture(mut cmd: Command, timeout: Option<Duration>) -> Result<Output> {
    let line = cmd_line(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(|error| LabError::Spawn {
        cmd: line.clone(),
        error,
    })?;
    let (out, out_done) = drain(child.stdout.take());
    let (err, err_done) = drain(child.stderr.take());
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(LabError::io(format!("waiting for `{line}`"), e)),
        }
        if let Err(e) = check_interrupt() {
            kill_group(&child);
            let _ = child.wait();
            return Err(e);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            kill_group(&child);
            let _ = child.wait();
            return Err(LabError::Timeout {
                cmd: line,
                secs: timeout.map(|t| t.as_secs()).unwrap_or_default(),
            });
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    };
    let grace = Instant::now() + PIPE_GRACE;
    for done in [&out_done, &err_done] {
        let _ = done.recv_timeout(grace.saturating_duration_since(Instant::now()));
    }
    Ok(Output {
        status,
        stdout: take(&out),
        stderr: take(&err),
    })
}

fn kill_group(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Turns a finished command into an error unless it exited 0.
pub(crate) fn check(cmd: &str, out: &Output) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let stderr = if stderr.is_empty() {
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    } else {
        stderr
    };
    Err(LabError::Command {
        cmd: cmd.to_string(),
        status: status_text(out.status),
        stderr: if stderr.is_empty() {
            "(no output)".into()
        } else {
            stderr
        },
    })
}

/// Runs `ip ARGS` and fails with its stderr unless it exits 0.
pub(crate) fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let line = cmd_line(&cmd);
    tracing::debug!(cmd = %line, "ip");
    let out = run_capture(cmd, Some(IP_TIMEOUT))?;
    check(&line, &out)
}

/// Writes an nftables script to `path` and runs it in namespace `netns`.
pub(crate) fn nft_file(path: &Path, netns: &str, script: &str) -> Result<()> {
    std::fs::write(path, script)
        .map_err(|e| LabError::io(format!("writing {}", path.display()), e))?;
    let path = path.to_string_lossy().into_owned();
    ip(&["netns", "exec", netns, "nft", "-f", path.as_str()])
}

/// Runs `ip ARGS` and returns its stdout; fails with its stderr unless it exits 0.
pub(crate) fn ip_output<S: AsRef<OsStr>>(args: &[S]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let line = cmd_line(&cmd);
    let out = run_capture(cmd, Some(IP_TIMEOUT))?;
    check(&line, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How a process entering a node gets its UTS namespace (its hostname).
pub(crate) enum Uts {
    /// Join the namespace of a running process (the node's daemon).
    Join(OwnedFd),
    /// Make a new one with this hostname.
    New(String),
}

/// Path of a named network namespace.
pub(crate) fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Makes `cmd` start inside network namespace `netns` with the given UTS
/// namespace, optionally as leader of a new session (detached from our
/// terminal and process group, as a daemon must be).
///
/// The process stays in the machine's mount namespace, as a daemon on a real
/// machine would: files outside the node's own directory are shared by all nodes.
pub(crate) fn enter_node(
    cmd: &mut Command,
    netns: &str,
    uts: Uts,
    new_session: bool,
) -> Result<()> {
    let path = netns_path(netns);
    let net: OwnedFd = File::open(&path)
        .map_err(|e| {
            LabError::io(
                format!(
                    "opening network namespace {} (was the lab torn down? `mesh lab ls` shows it)",
                    path.display()
                ),
                e,
            )
        })?
        .into();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // system calls (setsid, setns, unshare, sethostname) on values prepared
    // beforehand; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            if new_session {
                setsid()?;
            }
            setns(&net, CloneFlags::CLONE_NEWNET)?;
            match &uts {
                Uts::Join(fd) => setns(fd, CloneFlags::CLONE_NEWUTS)?,
                Uts::New(host) => {
                    unshare(CloneFlags::CLONE_NEWUTS)?;
                    sethostname(host)?;
                }
            }
            Ok(())
        });
    }
    Ok(())
}

/// Identity of a process: pid plus start time, so a recycled pid is never
/// mistaken for the daemon we started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcInfo {
    pub state: char,
    pub session: i32,
    pub start: u64,
}

/// Parses `/proc/PID/stat`; None when the process is gone.
pub(crate) fn proc_info(pid: i32) -> Option<ProcInfo> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); session is field 6, starttime field 22.
    Some(ProcInfo {
        state: fields.first()?.chars().next()?,
        session: fields.get(3)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// True while the process `pid` started at `start` exists and is not a zombie.
pub(crate) fn alive(pid: i32, start: Option<u64>) -> bool {
    match proc_info(pid) {
        Some(info) => !matches!(info.state, 'Z' | 'X') && start.is_none_or(|s| s == info.start),
        None => false,
    }
}

/// Every live process id on the machine.
fn all_pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Processes (pid, start) whose session is `sid`, other than `sid` itself:
/// what a daemon started and did not detach.
pub(crate) fn session_members(sid: i32) -> Vec<(i32, u64)> {
    all_pids()
        .into_iter()
        .filter(|&p| p != sid)
        .filter_map(|p| {
            let i = proc_info(p)?;
            (i.session == sid && !matches!(i.state, 'Z' | 'X')).then_some((p, i.start))
        })
        .collect()
}

/// Processes (pid, start) whose network namespace is the named namespace `ns`.
pub(crate) fn netns_members(ns: &str) -> Vec<(i32, u64)> {
    let Ok(meta) = std::fs::metadata(netns_path(ns)) else {
        return Vec::new();
    };
    let id = (meta.dev(), meta.ino());
    all_pids()
        .into_iter()
        .filter(|&p| {
            std::fs::metadata(format!("/proc/{p}/ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == id)
        })
        .filter_map(|p| {
            let i = proc_info(p)?;
            (!matches!(i.state, 'Z' | 'X')).then_some((p, i.start))
        })
        .collect()
}

/// Sends `sig` to the process if it is still the one we mean. ESRCH is success.
pub(crate) fn signal(pid: i32, start: Option<u64>, sig: Signal) -> Result<()> {
    if !alive(pid, start) {
        return Ok(());
    }
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
        Err(e) => Err(LabError::sys(format!("sending {sig} to pid {pid}"), e)),
    }
}

/// Waits until none of `procs` is alive; returns those still alive at the deadline.
pub(crate) fn wait_gone(procs: &[(i32, u64)], timeout: Duration) -> Vec<(i32, u64)> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<_> = procs
            .iter()
            .copied()
            .filter(|&(p, s)| alive(p, Some(s)))
            .collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until every thread of `pid` has exited. A killed process whose
/// leader is already a zombie keeps its sockets open while another thread
/// is still leaving the kernel (closing a TAP waits for the device to be
/// unregistered), and a daemon restarted meanwhile finds its socket taken.
pub(crate) fn wait_threads_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let live = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| {
                        let stat =
                            std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
                        // The state follows the ")" closing the command name.
                        let state = stat
                            .rsplit_once(')')
                            .and_then(|(_, r)| r.trim_start().chars().next());
                        !matches!(state, None | Some('Z' | 'X'))
                    })
                    .count()
            })
            .unwrap_or(0);
        if live == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Names in /run/netns.
pub(crate) fn list_netns() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

/// Lazily unmounts everything mounted at or below `dir`, deepest first, so the
/// directory can be removed (a daemon may bind-mount namespaces into its state dir).
pub(crate) fn unmount_below(dir: &Path) -> Vec<String> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount(p)))
        .filter(|p| p.starts_with(dir))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    let mut problems = Vec::new();
    for p in points {
        if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
            problems.push(format!("unmounting {}: {e}", p.display()));
        }
    }
    problems
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last `lines` lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    use std::io::{Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else {
        return "(no log yet)".into();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(16 * 1024);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return "(log unreadable)".into();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return "(log unreadable)".into();
    }
    let text = strip_ansi(&String::from_utf8_lossy(&buf));
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.trim().is_empty() {
        "(log is empty)".into()
    } else {
        tail
    }
}

/// Removes terminal colour sequences (ESC [ ... letter) from log text.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2mtime\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "time  INFO x"
        );
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn mount_unescape() {
        assert_eq!(unescape_mount(r"/run/a\040b"), "/run/a b");
        assert_eq!(unescape_mount(r"/plain"), "/plain");
        assert_eq!(unescape_mount(r"/x\04"), r"/x\04");
    }

    #[test]
    fn own_process_is_alive() {
        let me = std::process::id() as i32;
        let info = proc_info(me).expect("own /proc entry");
        assert!(alive(me, Some(info.start)));
        assert!(!alive(me, Some(info.start + 1)));
    }

    #[test]
    fn capture_and_timeout() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo out; echo err >&2; exit 3"]);
        let out = run_capture(c, Some(Duration::from_secs(10))).expect("sh runs");
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        let e = check("sh", &out)
            .expect_err("exit 3 is a failure")
            .to_string();
        assert!(e.contains("exit code 3") && e.contains("err"), "{e}");

        let mut c = Command::new("sleep");
        c.arg("30");
        // Timeout (not the child's own exit) is what says it was cut short.
        let r = run_capture(c, Some(Duration::from_millis(200)));
        assert!(matches!(r, Err(LabError::Timeout { .. })));
    }
}
