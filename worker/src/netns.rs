//! Named network namespaces, kept where `ip netns` keeps them
//! (`/run/netns/NAME`, a bind mount of an nsfs inode), so an operator can
//! inspect ours with `ip netns exec`.
//!
//! Entering a namespace is done only on a dedicated thread (STYLE.md point 6):
//! `setns` changes the namespace of the calling *thread*, and a tokio worker
//! left in a foreign namespace would silently run unrelated tasks there. A
//! netlink socket keeps the namespace it was created in, so [`handle_in`]
//! opens the socket on such a thread and hands it back to async code.
//!
//! This module also owns [`NetError`], the error of the whole data path
//! (`netns`, `link`, `overlay`).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use netlink_sys::{Socket, TokioSocket, protocols::NETLINK_ROUTE};
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::statfs::{NSFS_MAGIC, fstatfs, statfs};
use tracing::{debug, warn};

/// Where named namespaces live; the same directory `ip netns` uses.
pub const NETNS_DIR: &str = "/run/netns";

/// The calling thread's own namespace. `/proc/self` would name the main
/// thread's, which is not the same thing once a thread has called `setns`.
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Serialises create/delete in this process so two reconcilers creating the
/// same namespace cannot stack two bind mounts on one path.
static NS_LOCK: Mutex<()> = Mutex::new(());

/// Errors of the data path: namespaces, links, addresses, FDB and neighbour
/// entries. Each says what failed, on which device and in which namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A namespace operation (mount, unshare, setns, open) failed.
    #[error("cannot {action} network namespace {name}: {source}")]
    Namespace {
        action: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    /// The namespace was expected and is not there.
    #[error(
        "network namespace {0} does not exist (no nsfs mount at {NETNS_DIR}/{0}); create it first or check `ip netns list`"
    )]
    NoNamespace(String),
    /// The name cannot be a file name under /run/netns.
    #[error("invalid network namespace name {0:?}: use 1-255 characters without '/'")]
    InvalidName(String),
    /// A netlink request was refused by the kernel (or could not be sent).
    #[error("cannot {what} in namespace {ns}: {reason}")]
    Netlink {
        what: String,
        ns: String,
        /// The kernel's errno, when it gave one, so callers can tell
        /// "exists" or "not found" from real failures.
        errno: Option<Errno>,
        reason: String,
    },
    /// A device the operation depends on is missing.
    #[error("device {dev} not found in namespace {ns}: {hint}")]
    NoDevice {
        dev: String,
        ns: String,
        hint: &'static str,
    },
    /// A device is in the way and is not one of ours, so it is left alone.
    #[error("{0}")]
    Conflict(String),
    /// Desired state that cannot be made real (bad VNI, gateway outside
    /// the subnet, ...).
    #[error("invalid {0}")]
    Invalid(String),
    /// Async netlink needs a tokio runtime with I/O enabled.
    #[error("netlink needs a tokio runtime with I/O enabled: {0}")]
    NoRuntime(String),
}

impl NetError {
    /// The kernel's errno, if this error carries one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            NetError::Netlink { errno, .. } => *errno,
            NetError::Namespace { source, .. } => source.raw_os_error().map(Errno::from_raw),
            _ => None,
        }
    }

    fn ns(action: &'static str, name: &str, source: impl Into<io::Error>) -> Self {
        NetError::Namespace {
            action,
            name: name.to_string(),
            source: source.into(),
        }
    }
}

/// The label used for a namespace in messages and logs (`None` is the
/// process's own namespace).
pub fn label(ns: Option<&str>) -> String {
    ns.unwrap_or("host").to_string()
}

fn check_name(name: &str) -> Result<(), NetError> {
    if name.is_empty() || name.len() > 255 || name.contains('/') || name == "." || name == ".." {
        return Err(NetError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// Path of a named namespace's mount point.
pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn is_nsfs(p: &Path) -> bool {
    statfs(p).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
}

/// Whether a named namespace exists (its mount point holds an nsfs mount, not
/// just an empty file left by a crash).
pub fn exists(name: &str) -> bool {
    check_name(name).is_ok() && is_nsfs(&path(name))
}

/// Creates the named namespace if it does not exist yet. Idempotent: an
/// existing namespace is kept as it is; an empty mount point left by an
/// interrupted create is reused.
pub fn create(name: &str) -> Result<(), NetError> {
    name_and_bind(name, |target| {
        // The new namespace exists only as long as something refers to it:
        // the thread that unshared it, until the bind mount takes over.
        let mounted = std::thread::scope(|s| {
            s.spawn(|| -> Result<(), NetError> {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetError::ns("unshare", name, e))?;
                bind(THREAD_NETNS, target, name)
            })
            .join()
        });
        match mounted {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })?;
    debug!(netns = name, "created network namespace");
    Ok(())
}

/// What [`create`] and [`attach_current`] share: under the lock, unless the
/// name already holds a namespace, make its mount point and have `mount`
/// bind a namespace on it; a failed mount leaves no empty file behind.
fn name_and_bind(
    name: &str,
    mount: impl FnOnce(&Path) -> Result<(), NetError>,
) -> Result<(), NetError> {
    check_name(name)?;
    let _guard = NS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let target = path(name);
    if is_nsfs(&target) {
        return Ok(());
    }
    make_mount_point(name, &target)?;
    let result = mount(&target);
    if result.is_err() {
        let _ = fs::remove_file(&target);
    }
    result
}

/// Bind-mounts the namespace file `source` on `target`.
fn bind(source: &str, target: &Path, name: &str) -> Result<(), NetError> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| NetError::ns("bind-mount", name, e))
}

/// Creates the empty file a namespace is bind-mounted on (and /run/netns
/// around it).
fn make_mount_point(name: &str, target: &Path) -> Result<(), NetError> {
    prepare_dir()?;
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o444)
        .open(target)
        .map_err(|e| NetError::ns("create the mount point of", name, e))?;
    Ok(())
}

/// Makes /run/netns exist and be a shared mount point, as `ip netns add`
/// does, so namespaces created later also appear in other mount namespaces
/// (a sandbox's private one included). Failing to share it only matters to
/// those, so it is a warning.
fn prepare_dir() -> Result<(), NetError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(NETNS_DIR)
        .map_err(|e| NetError::ns("create the directory of", NETNS_DIR, e))?;
    let share = || {
        nix::mount::mount(
            None::<&str>,
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match share() {
        Ok(()) => {}
        // Not a mount point yet: bind it onto itself, then share it.
        Err(Errno::EINVAL) => {
            let bound = nix::mount::mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            );
            if let Err(e) = bound.and_then(|()| share()) {
                warn!(error = %e, "cannot make {NETNS_DIR} a shared mount; namespaces may not be visible in other mount namespaces");
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot make {NETNS_DIR} a shared mount; namespaces may not be visible in other mount namespaces");
        }
    }
    Ok(())
}

/// Removes the named namespace: unmounts it and removes its mount point. The
/// kernel frees it (and destroys its devices) once nothing else refers to it.
/// Absent is fine.
pub fn delete(name: &str) -> Result<(), NetError> {
    check_name(name)?;
    let _guard = NS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let target = path(name);
    // Several mounts may be stacked on the path by another tool: undo all.
    while is_nsfs(&target) {
        match nix::mount::umount2(&target, MntFlags::MNT_DETACH) {
            Ok(()) => {}
            Err(Errno::EINVAL | Errno::ENOENT) => break,
            Err(e) => return Err(NetError::ns("unmount", name, e)),
        }
    }
    match fs::remove_file(&target) {
        Ok(()) => {
            debug!(netns = name, "deleted network namespace");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NetError::ns("remove the mount point of", name, e)),
    }
}

/// [`create`] for async callers: the mounts and the thread that unshares
/// run on tokio's blocking pool, never on an async worker.
pub async fn create_async(name: &str) -> Result<(), NetError> {
    let owned = name.to_string();
    off_thread(name, "create", move || create(&owned)).await
}

/// [`delete`] for async callers, on tokio's blocking pool.
pub async fn delete_async(name: &str) -> Result<(), NetError> {
    let owned = name.to_string();
    off_thread(name, "delete", move || delete(&owned)).await
}

async fn off_thread(
    name: &str,
    action: &'static str,
    f: impl FnOnce() -> Result<(), NetError> + Send + 'static,
) -> Result<(), NetError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NetError::ns(action, name, io::Error::other(e.to_string())))?
}

/// Names of the namespaces under /run/netns that start with `prefix`, sorted;
/// how a restarted agent finds what it made before.
pub fn list_with_prefix(prefix: &str) -> Result<Vec<String>, NetError> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(NetError::ns("list", NETNS_DIR, e)),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    Ok(names)
}

/// Opens a namespace by name: the fd that `setns` and
/// `LinkSetRequest::setns_by_fd` take.
pub fn open(name: &str) -> Result<OwnedFd, NetError> {
    check_name(name)?;
    let file = File::open(path(name)).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            NetError::NoNamespace(name.to_string())
        } else {
            NetError::ns("open", name, e)
        }
    })?;
    match fstatfs(&file) {
        Ok(s) if s.filesystem_type() == NSFS_MAGIC => Ok(file.into()),
        // An empty file: a create was interrupted before its mount.
        Ok(_) => Err(NetError::NoNamespace(name.to_string())),
        Err(e) => Err(NetError::ns("inspect", name, e)),
    }
}

/// Opens the calling thread's namespace (the node's, on a tokio worker).
pub fn open_current() -> Result<OwnedFd, NetError> {
    File::open(THREAD_NETNS)
        .map(OwnedFd::from)
        .map_err(|e| NetError::ns("open", "of this thread", e))
}

/// Runs `f` inside the named namespace on a dedicated thread that ends with
/// it, so no other code ever runs in the wrong namespace. For sysctl writes
/// under /proc/sys/net or sockets that must belong to the namespace. Blocks
/// the caller until `f` returns.
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
    let fd = open(ns)?;
    let joined = std::thread::scope(|s| {
        s.spawn(move || -> Result<T, NetError> {
            nix::sched::setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetError::ns("enter", ns, e))?;
            Ok(f())
        })
        .join()
    });
    match joined {
        Ok(r) => r,
        // A panic in `f` is the caller's bug: surface it as if `f` ran here.
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Opens an rtnetlink connection in `ns` (`None`: the calling thread's
/// namespace, which for async code is the node's) and returns its handle.
/// The connection runs as a task on the current tokio runtime and ends when
/// the last clone of the handle is dropped, releasing the namespace.
pub async fn handle_in(ns: Option<&str>) -> Result<rtnetlink::Handle, NetError> {
    let runtime =
        tokio::runtime::Handle::try_current().map_err(|e| NetError::NoRuntime(e.to_string()))?;
    let socket = match ns {
        None => {
            Socket::new(NETLINK_ROUTE).map_err(|e| NetError::ns("open netlink in", "host", e))?
        }
        Some(name) => {
            let fd = open(name)?;
            let name_owned = name.to_string();
            let (tx, rx) = tokio::sync::oneshot::channel();
            // A thread of its own, not spawn_blocking: the pool would reuse
            // the thread after we moved it into the namespace.
            std::thread::Builder::new()
                .name("netns-open".into())
                .spawn(move || {
                    let r = nix::sched::setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                        .map_err(|e| NetError::ns("enter", &name_owned, e))
                        .and_then(|()| {
                            Socket::new(NETLINK_ROUTE)
                                .map_err(|e| NetError::ns("open netlink in", &name_owned, e))
                        });
                    let _ = tx.send(r);
                })
                .map_err(|e| NetError::ns("start a thread to enter", name, e))?;
            rx.await.map_err(|_| {
                NetError::ns(
                    "open netlink in",
                    name,
                    io::Error::other("the namespace thread ended without an answer"),
                )
            })??
        }
    };
    socket
        .set_non_blocking(true)
        .map_err(|e| NetError::ns("configure netlink in", &label(ns), e))?;
    let raw = socket.into_raw_fd();
    // SAFETY: `raw` is an open netlink socket whose ownership we just took
    // from `Socket::into_raw_fd`; nothing else closes it. A runtime is
    // present (checked above), so registering it with tokio's reactor can
    // only fail on resource exhaustion.
    let tokio_socket = unsafe { TokioSocket::from_raw_fd(raw) };
    let (connection, handle, _unsolicited) = rtnetlink::from_socket(tokio_socket);
    runtime.spawn(connection);
    Ok(handle)
}

/// Runs async netlink work to completion for a synchronous caller, on a
/// thread of its own with a small runtime: callable from plain threads and,
/// through `block_in_place`, from async code (a runtime cannot be nested in
/// the caller's thread). The thread starts in the caller's namespace; the
/// work enters others only through [`handle_in`].
pub fn block_on<F>(work: F) -> Result<F::Output, NetError>
where
    F: Future + Send,
    F::Output: Send,
{
    let joined = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("mesh-netlink".into())
            .spawn_scoped(s, || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| NetError::NoRuntime(e.to_string()))?;
                Ok(runtime.block_on(work))
            })
            .map_err(|e| NetError::ns("start a thread for", "netlink", e))
            .map(|t| t.join())
    })?;
    match joined {
        Ok(r) => r,
        // A panic in `work` is the caller's bug: surface it as if it ran here.
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Gives the daemon's own network namespace a name under /run/netns (as
/// `ip netns attach NAME $$` does), so `host` sandboxes can join it the same
/// way other sandboxes join theirs. Idempotent.
pub fn attach_current(name: &str) -> Result<(), NetError> {
    name_and_bind(name, |target| bind("/proc/self/ns/net", target, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_files_are_refused() {
        for bad in ["", ".", "..", "a/b", &"x".repeat(256)] {
            assert!(
                matches!(check_name(bad), Err(NetError::InvalidName(_))),
                "{bad:?}"
            );
        }
        assert!(check_name("mesh-ov-4097").is_ok());
    }

    #[test]
    fn absent_namespace_is_not_found() {
        assert!(!exists("mesh-test-never-created"));
        assert!(matches!(
            open("mesh-test-never-created"),
            Err(NetError::NoNamespace(_))
        ));
    }
}
