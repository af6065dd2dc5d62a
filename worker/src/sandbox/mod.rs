//! Workload sandboxes: a named network namespace plus processes that run in
//! it with their own mount and UTS namespaces.
//!
//! The network namespace is a file under `/run/netns` (as `ip netns add`
//! makes), so links can be moved into it and `ip -n NAME` can inspect it
//! whether or not a process runs there. The mount namespace exists only so
//! that the sandbox sees its own `/etc/hosts` and `/etc/resolv.conf` (bind
//! mounts from its state dir); the UTS namespace gives it its own hostname.
//! There is no image and no root filesystem switch: commands come from the
//! host's filesystem.
//!
//! The daemon never changes namespace itself: every namespace step runs in
//! the forked child between `fork` and `exec` (`Command::pre_exec`), where
//! only raw system calls on data prepared before the fork are made; `lo` is
//! brought up over netlink (a socket opened in the sandbox's namespace).
//! Creating, deleting and stopping are async, so none of them holds an
//! async worker thread while the kernel or a slow process takes its time.
//!
//! - this file: the sandbox's namespace and starting its process;
//! - `exec`: running a command inside a running sandbox (`mesh exec`);
//! - `process`: whether the process runs, its exit code, stopping it.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use tracing::{info, warn};

use crate::link::Netlink;

mod exec;
mod process;
mod vfork;

pub use exec::{ProbeResult, exec, probe};
pub use process::{alive, stop, wait_exit};

/// Where named network namespaces live, as iproute2 keeps them.
pub const NETNS_DIR: &str = "/run/netns";

/// PATH given to sandbox processes when neither the spec nor the daemon has
/// one: the usual system directories.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The kernel refuses longer hostnames (HOST_NAME_MAX).
const HOSTNAME_MAX: usize = 64;

/// What a sandbox is made of; see [`start`].
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// User-visible name; also the sandbox's hostname (cut to 64 bytes, the
    /// kernel's limit).
    pub name: String,
    /// Named network namespace (under /run/netns) made by [`create_netns`].
    pub netns: String,
    /// Command and arguments; `cmd[0]` is looked up in PATH on the host.
    pub cmd: Vec<String>,
    /// Environment added to PATH and HOSTNAME (and overriding them).
    pub env: Vec<(String, String)>,
    /// Content of the sandbox's /etc/hosts.
    pub hosts: String,
    /// Content of the sandbox's /etc/resolv.conf.
    pub resolv_conf: String,
    /// Per-sandbox state dir: `hosts`, `resolv.conf` and `output.log` live here.
    pub dir: PathBuf,
}

/// Why a sandbox operation failed; each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Net(#[from] crate::netns::NetError),
    #[error("cannot start sandbox {sandbox}: no command given")]
    EmptyCommand { sandbox: String },
    #[error("cannot start sandbox {sandbox}: command {command:?} not found in PATH")]
    CommandNotFound { sandbox: String, command: String },
    #[error("cannot exec in sandbox process {pid}: command {command:?} not found in PATH")]
    ExecNotFound { pid: u32, command: String },
    #[error("cannot exec in sandbox process {pid}: no command given")]
    ExecEmpty { pid: u32 },
    #[error(
        "invalid network namespace name {0:?}: use 1 to 64 letters, digits, '.', '-' or '_' (not \".\" or \"..\")"
    )]
    InvalidNetnsName(String),
    #[error("network namespace {0:?} does not exist ({NETNS_DIR}/{0} is missing); create it first")]
    NetnsMissing(String),
    #[error("{path} exists but is not a network namespace; remove it or pick another name")]
    NotANetns { path: PathBuf },
    #[error("cannot start sandbox {sandbox}: {what} {}: {source}", path.display())]
    StateDir {
        sandbox: String,
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot start sandbox {sandbox}: {step} failed: {source}")]
    Setup {
        sandbox: String,
        step: &'static str,
        source: io::Error,
    },
    #[error("cannot start sandbox {sandbox}: running {command:?} failed: {source}")]
    Spawn {
        sandbox: String,
        command: String,
        source: io::Error,
    },
    #[error("cannot exec in sandbox process {pid}: {step} failed: {source}")]
    Exec {
        pid: u32,
        step: &'static str,
        source: io::Error,
    },
    #[error("sandbox process {0} is not running")]
    NotRunning(u32),
    #[error("refusing to signal pid {0}: not a sandbox process id")]
    InvalidPid(u32),
    #[error("cannot signal sandbox process group {pid}: {source}")]
    Signal { pid: u32, source: Errno },
    #[error("sandbox process {pid} did not exit {waited:?} after SIGKILL")]
    Unkillable { pid: u32, waited: Duration },
    #[error("cannot remove network namespace {name:?}: {source}")]
    Delete { name: String, source: io::Error },
}

/// Path of a named network namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Namespace names become file names and `ip` arguments: keep them plain.
fn check_netns_name(name: &str) -> Result<(), SandboxError> {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if name.is_empty() || name.len() > 64 || !plain || name == "." || name == ".." {
        return Err(SandboxError::InvalidNetnsName(name.to_owned()));
    }
    Ok(())
}

/// True when `path` has a namespace mounted on it (nsfs), false when it is a
/// plain file (an interrupted create) or missing.
fn is_netns(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Creates the named network namespace `name` (like `ip netns add`) with
/// `lo` up (over netlink). Idempotent: an existing namespace is kept, and a
/// leftover plain file from an interrupted create is replaced. The mounts
/// run on tokio's blocking pool, not on the caller's async thread.
pub async fn create_netns(name: &str) -> Result<(), SandboxError> {
    check_netns_name(name)?;
    crate::netns::create_async(name).await?;
    let lo = async { Netlink::open(Some(name)).await?.set_up("lo").await };
    if let Err(e) = lo.await {
        // Nothing half-made: a namespace without loopback is useless.
        let _ = delete_netns(name).await;
        return Err(e.into());
    }
    Ok(())
}

/// Deletes the named network namespace (like `ip netns delete`); fine if it
/// does not exist. The kernel frees it, and its links, once no process is in
/// it any more.
pub async fn delete_netns(name: &str) -> Result<(), SandboxError> {
    check_netns_name(name)?;
    Ok(crate::netns::delete_async(name).await?)
}

/// Finds `command` the way a shell would: as given when it holds a '/',
/// else in the first PATH directory with an executable file of that name.
pub(super) fn find_program(command: &str, path_var: &OsStr) -> Option<PathBuf> {
    fn executable(p: &Path) -> bool {
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    }
    if command.is_empty() {
        return None;
    }
    if command.contains('/') {
        let p = PathBuf::from(command);
        return executable(&p).then_some(p);
    }
    std::env::split_paths(path_var)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(command))
        .find(|p| executable(p))
}

/// The PATH a sandbox process gets: the one in its env, else the daemon's,
/// else the usual system directories. The same PATH is used to find cmd[0]
/// so that what the user sees in the sandbox matches what was started.
pub(super) fn sandbox_path(env: &[(String, String)]) -> OsString {
    env.iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| OsString::from(v))
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_else(|| DEFAULT_PATH.into())
}

/// The mounts a sandbox's child detaches: /run/netns itself, once per
/// mount stacked there, when it is a mount point (as `ip netns` and we make
/// it), since a lazy unmount takes every mount beneath along; else each
/// mount under it, deepest first.
///
/// A sandbox's private mount namespace starts as a copy of the daemon's, and
/// a copied nsfs mount keeps its network namespace alive: without removing
/// these copies, deleting any named namespace would leave it (and its links)
/// alive for as long as a sandbox started earlier runs. One unmount, not
/// one per namespace: each costs the kernel an expedited RCU grace period
/// (an interrupt to every CPU), and with 300 sandboxes on a node the child
/// made 300 of them before its exec.
fn netns_mounts() -> Vec<CString> {
    if is_mount_point(NETNS_DIR) {
        // Twice: a second mount stacked there is rare, and a lazy unmount
        // of what is not a mount point fails harmlessly.
        let dir = CString::new(NETNS_DIR).unwrap_or_default();
        return vec![dir.clone(), dir];
    }
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut mounts: Vec<CString> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| {
            m.as_bytes() == NETNS_DIR.as_bytes() || m.as_bytes().starts_with(b"/run/netns/")
        })
        .collect();
    let stacked = mounts
        .iter()
        .filter(|m| m.as_bytes() == NETNS_DIR.as_bytes())
        .count();
    if stacked > 0 {
        mounts.retain(|m| m.as_bytes() == NETNS_DIR.as_bytes());
        return mounts;
    }
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_bytes().len()));
    mounts.dedup();
    mounts
}

/// Whether `path` is the root of a mount: its mount ID differs from its
/// parent's. A `statx` each, instead of reading the whole of mountinfo (a
/// line per namespace) at every start.
fn is_mount_point(path: &str) -> bool {
    fn mnt_id(p: &CStr) -> Option<u64> {
        // SAFETY: statx fills the zeroed struct, which outlives the call.
        unsafe {
            let mut st: libc::statx = std::mem::zeroed();
            let rc = libc::statx(
                libc::AT_FDCWD,
                p.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                libc::STATX_MNT_ID,
                &mut st,
            );
            (rc == 0 && st.stx_mask & libc::STATX_MNT_ID != 0).then_some(st.stx_mnt_id)
        }
    }
    let Some(parent) = Path::new(path).parent() else {
        return false;
    };
    let (Ok(p), Ok(up)) = (CString::new(path), path_cstring(parent)) else {
        return false;
    };
    matches!((mnt_id(&p), mnt_id(&up)), (Some(a), Some(b)) if a != b)
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> CString {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let value = oct.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                if let Ok(b) = u8::try_from(value) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out.retain(|&b| b != 0);
    CString::new(out).unwrap_or_default()
}

/// Lets a forked child say which namespace step failed: `std` only carries
/// the errno back from `pre_exec`, so the child writes the step's number to
/// this pipe before returning the error.
pub(super) struct StepPipe {
    read: OwnedFd,
    pub(super) write: OwnedFd,
}

impl StepPipe {
    pub(super) fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        Ok(Self { read, write })
    }

    /// Reads the failed step's number; `None` when the child failed after
    /// its setup (at exec).
    pub(super) fn failed_step(&self) -> Option<u8> {
        let mut b = [0u8; 1];
        match nix::unistd::read(&self.read, &mut b) {
            Ok(1) => Some(b[0]),
            _ => None,
        }
    }
}

/// Runs in the forked child: records `step` and turns `errno` into the error
/// that makes `spawn` fail.
pub(super) fn child_fail(report_fd: i32, step: u8, errno: Errno) -> io::Error {
    // SAFETY: write(2) on a pipe fd that stays open for the life of the
    // child; the buffer is one byte on the stack. It is async-signal-safe.
    unsafe {
        libc::write(report_fd, (&step as *const u8).cast(), 1);
    }
    io::Error::from_raw_os_error(errno as i32)
}

/// Steps of sandbox setup, in the order the child runs them.
const START_STEPS: [&str; 8] = [
    "starting a new session (setsid)",
    "entering the network namespace",
    "creating the mount and UTS namespaces",
    "making mounts private",
    "setting the hostname",
    "bind-mounting hosts over /etc/hosts",
    "bind-mounting resolv.conf over /etc/resolv.conf",
    "mounting a sysfs of the sandbox's network namespace on /sys",
];

/// Cuts `name` to the kernel's hostname limit on a character boundary.
fn hostname_for(name: &str) -> &str {
    if name.len() <= HOSTNAME_MAX {
        return name;
    }
    let mut end = HOSTNAME_MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    warn!(
        sandbox = name,
        "sandbox name is longer than a hostname may be; cut to 64 bytes"
    );
    &name[..end]
}

fn path_cstring(p: &Path) -> Result<CString, io::Error> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Writes a file bind-mounted into the sandbox in place, 0644 whatever the
/// umask: unprivileged processes there read it as /etc/hosts or
/// /etc/resolv.conf, and nobody but root may change it.
fn write_shared(path: &Path, data: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mode = crate::private_fs::SHARED_FILE_MODE;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(data.as_bytes())
}

/// Starts `cmd[0]` (looked up in PATH on the host filesystem) inside the
/// sandbox and returns its pid.
///
/// In the child, before exec: `setsid` (its own process group, so [`stop`]
/// reaches the whole tree), enter the network namespace, unshare mount and
/// UTS namespaces, make every mount private (nothing leaks back to the
/// host), drop the copied /run/netns mounts, set the hostname, and
/// bind-mount `dir/hosts` and `dir/resolv.conf` over /etc. stdout and stderr
/// are appended to `dir/output.log`; stdin is /dev/null; the working
/// directory is `/`. The environment is PATH, HOSTNAME and `spec.env`.
///
/// The daemon is the parent: [`wait_exit`] reports a command that exits at
/// once. `hosts` and `resolv.conf` are written in place (never renamed),
/// so a later rewrite of the same files reaches the running sandbox.
pub fn start(spec: &SandboxSpec) -> Result<u32, SandboxError> {
    let sandbox = spec.name.clone();
    let Some(command) = spec.cmd.first() else {
        return Err(SandboxError::EmptyCommand { sandbox });
    };
    check_netns_name(&spec.netns)?;
    let netns = netns_path(&spec.netns);
    if !is_netns(&netns) {
        return Err(SandboxError::NetnsMissing(spec.netns.clone()));
    }
    let path_var = sandbox_path(&spec.env);
    let program =
        find_program(command, &path_var).ok_or_else(|| SandboxError::CommandNotFound {
            sandbox: sandbox.clone(),
            command: command.clone(),
        })?;

    let state = |what: &'static str, path: &Path| {
        let sandbox = sandbox.clone();
        let path = path.to_owned();
        move |source| SandboxError::StateDir {
            sandbox,
            what,
            path,
            source,
        }
    };
    crate::private_fs::create_dir(&spec.dir).map_err(state("creating state dir", &spec.dir))?;
    let hosts = spec.dir.join("hosts");
    let resolv = spec.dir.join("resolv.conf");
    let log = spec.dir.join("output.log");
    write_shared(&hosts, &spec.hosts).map_err(state("writing", &hosts))?;
    write_shared(&resolv, &spec.resolv_conf).map_err(state("writing", &resolv))?;
    // The output may show the environment's secrets: private.
    let out = crate::private_fs::open_append(&log).map_err(state("opening", &log))?;
    let err = out.try_clone().map_err(state("opening", &log))?;
    let netns_fd: OwnedFd = File::open(&netns)
        .map_err(|source| SandboxError::Setup {
            sandbox: sandbox.clone(),
            step: "opening the network namespace",
            source,
        })?
        .into();

    // Everything the child needs is allocated here, before the fork.
    let hosts_c = path_cstring(&hosts).map_err(state("using", &hosts))?;
    let resolv_c = path_cstring(&resolv).map_err(state("using", &resolv))?;
    let hostname = hostname_for(&spec.name).as_bytes().to_vec();
    let detach = netns_mounts();
    let null = File::open("/dev/null").map_err(|source| SandboxError::Setup {
        sandbox: sandbox.clone(),
        step: "opening /dev/null",
        source,
    })?;
    let bad_arg = |what: &str| SandboxError::Setup {
        sandbox: sandbox.clone(),
        step: "preparing the command",
        source: io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} holds a NUL byte"),
        ),
    };
    let program_c = path_cstring(&program).map_err(|_| bad_arg("the program path"))?;
    let mut argv = vec![program_c.clone()];
    for a in &spec.cmd[1..] {
        argv.push(CString::new(a.as_bytes()).map_err(|_| bad_arg("an argument"))?);
    }
    // As `Command` builds it: the later of two equal names wins, sorted.
    let mut env: std::collections::BTreeMap<&OsStr, &OsStr> = std::collections::BTreeMap::new();
    env.insert(OsStr::new("PATH"), &path_var);
    env.insert(OsStr::new("HOSTNAME"), OsStr::from_bytes(&hostname));
    for (k, v) in &spec.env {
        env.insert(OsStr::new(k), OsStr::new(v));
    }
    let mut envp = Vec::with_capacity(env.len());
    for (k, v) in env {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp.push(CString::new(kv).map_err(|_| bad_arg("the environment"))?);
    }

    // Runs in the child, which shares the daemon's memory until its exec
    // (see `vfork`): only system calls (setsid, setns, unshare, mount,
    // umount2, sethostname) on data allocated above; no allocation, no
    // locks (nix passes &CStr paths through without copying).
    let setup = || -> Result<(), (u8, Errno)> {
        let none: Option<&CStr> = None;
        nix::unistd::setsid().map_err(|e| (0, e))?;
        nix::sched::setns(&netns_fd, CloneFlags::CLONE_NEWNET).map_err(|e| (1, e))?;
        nix::sched::unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS)
            .map_err(|e| (2, e))?;
        // Private before anything else: an unmount or bind in a mount
        // namespace that still shares propagation would reach the host.
        nix::mount::mount(
            none,
            c"/",
            none,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            none,
        )
        .map_err(|e| (3, e))?;
        for m in &detach {
            // Best effort: a copy we cannot drop only delays a delete.
            let _ = nix::mount::umount2(m.as_c_str(), MntFlags::MNT_DETACH);
        }
        nix::unistd::sethostname(OsStr::from_bytes(&hostname)).map_err(|e| (4, e))?;
        let bind = |from: &CStr, to: &CStr, step: u8| {
            nix::mount::mount(Some(from), to, none, MsFlags::MS_BIND, none).map_err(|e| (step, e))
        };
        bind(hosts_c.as_c_str(), c"/etc/hosts", 5)?;
        bind(resolv_c.as_c_str(), c"/etc/resolv.conf", 6)?;
        // sysfs shows the network namespace of whoever mounted it: the
        // copied /sys would list the host's interfaces (as `ip netns
        // exec` knows, it remounts /sys too).
        let _ = nix::mount::umount2(c"/sys", MntFlags::MNT_DETACH);
        nix::mount::mount(
            Some(c"sysfs"),
            c"/sys",
            Some(c"sysfs"),
            MsFlags::empty(),
            none,
        )
        .map_err(|e| (7, e))?;
        Ok(())
    };
    let spawned = vfork::spawn(&vfork::Spawn {
        program: &program_c,
        argv: &argv,
        envp: &envp,
        stdin: null.as_raw_fd(),
        stdout: out.as_raw_fd(),
        stderr: err.as_raw_fd(),
        setup: &setup,
    });
    // Our copies of the namespace fd, the log and /dev/null close here.
    drop((netns_fd, out, err, null));
    let pid = match spawned {
        Ok(pid) => pid,
        Err(vfork::Failed::Setup(i, source)) => {
            return Err(SandboxError::Setup {
                sandbox,
                step: START_STEPS.get(usize::from(i)).copied().unwrap_or("setup"),
                source,
            });
        }
        Err(vfork::Failed::Exec(source)) => {
            return Err(SandboxError::Spawn {
                sandbox,
                command: program.display().to_string(),
                source,
            });
        }
    };
    // A pid is reused only after its previous owner was reaped: forget that
    // owner's exit code.
    process::forget(pid);
    info!(sandbox = %spec.name, netns = %spec.netns, pid, program = %program.display(), "started sandbox");
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_names_are_plain() {
        assert!(check_netns_name("t1-host_a.b").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_netns_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hostname_is_cut_on_a_char_boundary() {
        assert_eq!(hostname_for("web.1.abc"), "web.1.abc");
        let long = format!("{}é", "a".repeat(63));
        assert_eq!(hostname_for(&long), "a".repeat(63));
    }

    #[test]
    fn mount_points_are_told_from_directories() {
        assert!(is_mount_point("/proc"));
        assert!(!is_mount_point("/proc/1"));
        assert!(!is_mount_point("/"), "no parent to differ from");
        assert!(!is_mount_point("/no/such/path/here"));
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(
            unescape_mountinfo(r"/run/netns/a\040b").as_bytes(),
            b"/run/netns/a b"
        );
        assert_eq!(unescape_mountinfo(r"/x\").as_bytes(), b"/x\\");
    }

    #[test]
    fn programs_are_found_in_path_or_by_path() {
        let path = OsString::from("/nonexistent:/bin:/usr/bin");
        assert!(find_program("sh", &path).is_some());
        assert!(find_program("/bin/sh", &OsString::new()).is_some());
        assert!(find_program("no-such-command-here", &path).is_none());
        assert!(find_program("", &path).is_none());
    }
}
