//! Starting a sandbox's process without copying the daemon: `clone` with
//! `CLONE_VM | CLONE_VFORK`, as `posix_spawn` does, but with our setup steps
//! (namespaces, mounts) between the clone and the exec, which `posix_spawn`
//! cannot run and `std::process::Command` runs only after a full `fork`.
//!
//! A fork of the daemon copied its page tables and then took a
//! copy-on-write fault for each page the daemon touched until the child's
//! exec: with 100 starts on a node that was about a sixth of the machine's
//! CPU (`perf`: `dup_mmap`, `do_wp_page`, TLB shootdowns, `unmap_vmas`).
//! Here the child borrows the daemon's memory and the calling thread waits
//! until the child has exec'd or failed, so the setup must only make
//! system calls on data prepared before (no allocation, no locks), exactly
//! as a `pre_exec` closure must.

use std::ffi::{CString, c_int, c_void};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI64, Ordering};

use nix::errno::Errno;

/// What the child runs before its exec: `Err((step, errno))` stops it.
pub(super) type Setup<'a> = &'a (dyn Fn() -> Result<(), (u8, Errno)> + Sync);

/// A failure in the child, as the parent learns it.
#[derive(Debug)]
pub(super) enum Failed {
    /// Setup step `step` failed.
    Setup(u8, std::io::Error),
    /// The exec itself failed (or the clone did, before any step).
    Exec(std::io::Error),
}

/// How the child ends up: its program, arguments, environment and
/// standard streams.
pub(super) struct Spawn<'a> {
    pub program: &'a CString,
    pub argv: &'a [CString],
    pub envp: &'a [CString],
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    pub setup: Setup<'a>,
}

/// Everything the child reads, in the parent's memory (which it shares).
struct Shared<'a> {
    spawn: &'a Spawn<'a>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// The parent thread's signal mask, restored in the child before exec.
    mask: libc::sigset_t,
    /// `step << 32 | errno` of a failure; -1 while none.
    failure: AtomicI64,
}

/// Not a setup step: the exec.
const EXEC: i64 = 0xff;

const STACK: usize = 256 * 1024;

/// Starts the process; returns its pid. The caller reaps it.
pub(super) fn spawn(s: &Spawn<'_>) -> Result<u32, Failed> {
    let null_terminated = |v: &[CString]| {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect::<Vec<_>>()
    };
    // SAFETY: an all-zero sigset_t is a valid value to be filled below.
    let mut shared = Shared {
        spawn: s,
        argv: null_terminated(s.argv),
        envp: null_terminated(s.envp),
        mask: unsafe { std::mem::zeroed() },
        failure: AtomicI64::new(-1),
    };
    let mut stack = vec![0u8; STACK];
    // SAFETY: `all` is filled by sigfillset before use; the mask is put
    // back below whatever happens. Blocking every signal keeps the parent's
    // handlers from running in the child, which shares their memory, until
    // the child has reset them to the defaults.
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut shared.mask);
        // The stack grows down: the child starts at its (aligned) end.
        let top = stack.as_mut_ptr().add(STACK) as usize & !15;
        let pid = libc::clone(
            child,
            top as *mut c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&raw mut shared).cast::<c_void>(),
        );
        let clone_errno = Errno::last();
        libc::pthread_sigmask(libc::SIG_SETMASK, &shared.mask, std::ptr::null_mut());
        if pid < 0 {
            return Err(Failed::Exec(clone_errno.into()));
        }
        pid
    };
    // CLONE_VFORK: the child has exec'd or exited by now.
    let failure = shared.failure.load(Ordering::Acquire);
    if failure >= 0 {
        // SAFETY: reaps our own child, which has exited.
        unsafe {
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        let errno = std::io::Error::from_raw_os_error((failure & 0xffff_ffff) as i32);
        let step = failure >> 32;
        return Err(if step == EXEC {
            Failed::Exec(errno)
        } else {
            Failed::Setup(step as u8, errno)
        });
    }
    drop(stack);
    u32::try_from(pid).map_err(|_| Failed::Exec(std::io::Error::other("negative pid")))
}

/// The child: signals back to their defaults, the setup, the streams, exec.
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the parent's `Shared`, alive while the parent waits
    // (CLONE_VFORK). Only system calls follow, on prepared data.
    unsafe {
        let sh = &*arg.cast::<Shared<'_>>();
        let fail = |step: i64, e: Errno| -> c_int {
            sh.failure
                .store((step << 32) | i64::from(e as i32), Ordering::Release);
            libc::_exit(127)
        };
        // The handler table is the child's own copy (no CLONE_SIGHAND).
        for sig in 1..=libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &sh.mask, std::ptr::null_mut());
        let s = sh.spawn;
        if let Err((step, e)) = (s.setup)() {
            return fail(i64::from(step), e);
        }
        for (from, to) in [(s.stdin, 0), (s.stdout, 1), (s.stderr, 2)] {
            if libc::dup2(from, to) < 0 {
                return fail(EXEC, Errno::last());
            }
        }
        if libc::chdir(c"/".as_ptr()) < 0 {
            return fail(EXEC, Errno::last());
        }
        libc::execve(s.program.as_ptr(), sh.argv.as_ptr(), sh.envp.as_ptr());
        fail(EXEC, Errno::last())
    }
}
