//! nftables through libnftables, the library the `nft` binary itself is
//! built on, loaded at run time: the same JSON in, the same text out, but
//! no process per command. A reconcile pass that rebuilds 100 sandboxes'
//! VIP tables forked `nft` 100 times, about 5 ms of CPU each on the lab
//! machine against about 1 ms here (measured with a 300-backend table). The
//! rest of a table swap's wall time is the kernel's RCU grace period, which
//! no user space avoids.
//!
//! Where the library is missing (it ships with Debian's `nftables`, as
//! `libnftables.so.1`), callers fall back to forking `nft`.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::sync::{Mutex, OnceLock};

/// `NFT_CTX_DEFAULT` (libnftables.h).
const CTX_DEFAULT: u32 = 0;
/// `NFT_CTX_OUTPUT_JSON`: JSON output, and JSON input is parsed as such.
const OUTPUT_JSON: c_uint = 1 << 4;

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxStr = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type SetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

struct Api {
    /// Kept loaded for as long as the pointers below are used: always.
    _lib: libloading::Library,
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    buffer_output: CtxInt,
    buffer_error: CtxInt,
    output_buffer: CtxStr,
    error_buffer: CtxStr,
    set_output_flags: SetFlags,
    run_cmd: RunCmd,
}

/// libnftables initialises globals on its first context without a lock
/// (`nft_ctx_new`'s `init_once`); contexts are made and freed one at a
/// time, commands run in parallel on contexts of their own.
static CTX_LOCK: Mutex<()> = Mutex::new(());

fn api() -> Option<&'static Api> {
    static API: OnceLock<Option<Api>> = OnceLock::new();
    API.get_or_init(|| match load() {
        Ok(api) => Some(api),
        Err(e) => {
            tracing::debug!("libnftables not loaded ({e}); forking nft instead");
            None
        }
    })
    .as_ref()
}

fn load() -> Result<Api, libloading::Error> {
    // SAFETY: libnftables runs no code of consequence when loaded, and each
    // symbol is given the signature of its declaration in libnftables.h.
    unsafe {
        let lib = libloading::Library::new("libnftables.so.1")?;
        let api = Api {
            ctx_new: *lib.get::<CtxNew>(b"nft_ctx_new\0")?,
            ctx_free: *lib.get::<CtxFree>(b"nft_ctx_free\0")?,
            buffer_output: *lib.get::<CtxInt>(b"nft_ctx_buffer_output\0")?,
            buffer_error: *lib.get::<CtxInt>(b"nft_ctx_buffer_error\0")?,
            output_buffer: *lib.get::<CtxStr>(b"nft_ctx_get_output_buffer\0")?,
            error_buffer: *lib.get::<CtxStr>(b"nft_ctx_get_error_buffer\0")?,
            set_output_flags: *lib.get::<SetFlags>(b"nft_ctx_output_set_flags\0")?,
            run_cmd: *lib.get::<RunCmd>(b"nft_run_cmd_from_buffer\0")?,
            _lib: lib,
        };
        Ok(api)
    }
}

/// libnftables waits on its netlink socket with `select()`, which glibc
/// aborts on for a descriptor past `FD_SETSIZE` (1024): a manager with
/// 1,000 simulated nodes' connections died of it ("bit out of range 0 -
/// FD_SETSIZE on fd_set"). The context's socket takes the lowest free
/// descriptor, so while that is well below the limit (a margin for other
/// threads opening meanwhile) the library is safe; otherwise `nft` is
/// forked, whose descriptors start low.
fn fds_below_select_limit() -> bool {
    const LIMIT: i32 = 1024 - 128;
    std::fs::File::open("/dev/null").is_ok_and(|f| {
        use std::os::fd::AsRawFd;
        f.as_raw_fd() < LIMIT
    })
}

/// What one command gave: its output, or its error text as `nft` prints it.
pub type Outcome = Result<String, String>;

/// Runs `cmd` (nft's own syntax, or a JSON batch) with JSON output, in the
/// calling thread's network namespace. None when the library is missing.
pub fn run(cmd: &str) -> Option<Outcome> {
    let api = api()?;
    if !fds_below_select_limit() {
        return None;
    }
    let Ok(cmd) = CString::new(cmd) else {
        return Some(Err("the command holds a NUL byte".into()));
    };
    let ctx = {
        let _g = CTX_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: no arguments beyond the flags; NULL is handled below.
        unsafe { (api.ctx_new)(CTX_DEFAULT) }
    };
    if ctx.is_null() {
        return Some(Err("libnftables could not make a context".into()));
    }
    // SAFETY: `ctx` is a live context until freed below, used by this
    // thread only; the buffers it returns are NUL-terminated strings owned
    // by it, copied out before it is freed.
    let outcome = unsafe {
        (api.set_output_flags)(ctx, OUTPUT_JSON);
        (api.buffer_output)(ctx);
        (api.buffer_error)(ctx);
        let rc = (api.run_cmd)(ctx, cmd.as_ptr());
        let text = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        if rc == 0 {
            Ok(text((api.output_buffer)(ctx)))
        } else {
            Err(text((api.error_buffer)(ctx)).trim().to_owned())
        }
    };
    let _g = CTX_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: made above, not used after this.
    unsafe { (api.ctx_free)(ctx) };
    Some(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bad command fails with nft's own words, a listing comes back as
    /// JSON.
    #[test]
    fn errors_and_output_are_nfts() {
        // Debian's `nftables` (which deploy/install.sh installs) ships it.
        assert!(api().is_some(), "libnftables.so.1 did not load");
        let listed = run("list tables").expect("loaded").expect("list tables");
        assert!(listed.starts_with("{\"nftables\""), "{listed}");
        let e = run("list table ip no_such_mesh_table_xyz")
            .expect("loaded")
            .expect_err("no such table");
        assert!(e.contains("No such file or directory"), "{e}");
        let e = run("this is not nft")
            .expect("loaded")
            .expect_err("bad syntax");
        assert!(e.contains("syntax error"), "{e}");
        let e = run("a\0b").expect("loaded").expect_err("NUL");
        assert!(e.contains("NUL"), "{e}");
    }
}
