//! Files only the daemon's user may read.
//!
//! The state dir holds the cluster CA key and join tokens (in the Raft
//! store), the node's key, and task environments and output, which may hold
//! secrets. So directories are made 0700 and files 0600 from the start (the
//! mode is given to `mkdir`/`open`, never fixed afterwards, so no file is
//! ever readable by others, whatever the umask), and a daemon that finds
//! something more open (an older version, a hand-made dir) tightens it.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::warn;

/// Mode of every directory in the state dir.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file in the state dir that is not meant for others.
pub const FILE_MODE: u32 = 0o600;
/// Mode of files a sandbox's unprivileged processes must read (its
/// /etc/hosts and /etc/resolv.conf are bind mounts of them): they hold no
/// secret, and the 0700 dir above them keeps other host users out.
pub const SHARED_FILE_MODE: u32 = 0o644;

/// Files that stay world-readable, by name: see [`SHARED_FILE_MODE`].
const SHARED_FILES: [&str; 2] = ["hosts", "resolv.conf"];

/// Creates `path` and any missing parents as 0700 directories.
pub fn create_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// Writes `data` to `path` through a fresh temporary file made with `mode`
/// and renamed over `path`, so a crash never leaves half a file and the file
/// never exists with a wider mode. A stale temporary file is removed first
/// (an existing file would keep its old mode, and could be a symlink).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    replace(path, data, mode, true)
}

/// [`write_atomic`] without the fsync, for records of kernel state
/// (sandboxes, their namespaces and processes) that a crash of the machine
/// takes with it anyway; a crash of the daemon leaves the write in the page
/// cache. Still never half a file.
pub fn write_atomic_unsynced(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    replace(path, data, mode, false)
}

fn replace(path: &Path, data: &[u8], mode: u32, durable: bool) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    if durable {
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

/// Opens `path` for appending, creating it 0600.
pub fn open_append(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Narrows `path`'s mode to at most `want` (never widens it). Returns
/// whether it was narrowed. Symlinks are left alone: chmod would follow them.
pub fn tighten(path: &Path, want: u32) -> io::Result<bool> {
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(false);
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & !want == 0 {
        return Ok(false);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode & want))?;
    Ok(true)
}

/// Tightens `root` and everything below it: directories to 0700, files to
/// 0600 (sandboxes' `hosts` and `resolv.conf` to 0644). Warns once per path
/// it changed and returns those paths; an error on one path is warned about
/// and does not stop the walk.
pub fn tighten_tree(root: &Path) -> Vec<PathBuf> {
    let mut changed = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(path) = todo.pop() {
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let want = if meta.is_dir() {
            DIR_MODE
        } else if meta.is_file() && is_shared_file(&path) {
            SHARED_FILE_MODE
        } else if meta.is_file() {
            FILE_MODE
        } else {
            // Symlinks, sockets, fifos: not ours to chmod.
            continue;
        };
        let old = meta.permissions().mode() & 0o7777;
        match tighten(&path, want) {
            Ok(true) => {
                warn!(
                    path = %path.display(),
                    "{} was mode {old:04o}, readable by other users; tightened to {:04o}",
                    path.display(),
                    old & want
                );
                changed.push(path.clone());
            }
            Ok(false) => {}
            Err(e) => {
                warn!(path = %path.display(), "cannot tighten the mode of {}: {e}", path.display())
            }
        }
        if meta.is_dir() {
            match fs::read_dir(&path) {
                Ok(entries) => todo.extend(entries.flatten().map(|e| e.path())),
                Err(e) => warn!(path = %path.display(), "cannot read {}: {e}", path.display()),
            }
        }
    }
    changed
}

fn is_shared_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| SHARED_FILES.contains(&n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o7777
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-pfs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn made_private_whatever_the_umask() {
        let dir = scratch("make");
        let sub = dir.join("a/b");
        create_dir(&sub).expect("mkdir");
        assert_eq!(mode(&dir), DIR_MODE);
        assert_eq!(mode(&sub), DIR_MODE);
        let f = sub.join("secret.json");
        write_atomic(&f, b"x", FILE_MODE).expect("write");
        assert_eq!(mode(&f), FILE_MODE);
        // A stale, world-readable temp file does not lend its mode.
        let tmp = f.with_extension("tmp");
        fs::write(&tmp, b"old").expect("tmp");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o666)).expect("chmod");
        write_atomic(&f, b"y", FILE_MODE).expect("rewrite");
        assert_eq!(mode(&f), FILE_MODE);
        assert_eq!(fs::read(&f).expect("read"), b"y");
        assert!(!tmp.exists());
        let log = sub.join("output.log");
        drop(open_append(&log).expect("log"));
        assert_eq!(mode(&log), FILE_MODE);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn tree_is_tightened_once() {
        let dir = scratch("tree");
        fs::create_dir_all(dir.join("certs")).expect("mkdir");
        fs::create_dir_all(dir.join("sandboxes/x")).expect("mkdir");
        for (p, m) in [
            ("node.json", 0o644),
            ("certs/node.key", 0o600),
            ("certs/ca.pem", 0o640),
            ("sandboxes/x/sandbox.json", 0o666),
            ("sandboxes/x/hosts", 0o666),
            ("sandboxes/x/resolv.conf", 0o644),
        ] {
            fs::write(dir.join(p), b"x").expect("write");
            fs::set_permissions(dir.join(p), fs::Permissions::from_mode(m)).expect("chmod");
        }
        for d in ["", "certs", "sandboxes", "sandboxes/x"] {
            fs::set_permissions(dir.join(d), fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        std::os::unix::fs::symlink("/etc/passwd", dir.join("link")).expect("symlink");
        let mut changed = tighten_tree(&dir);
        changed.sort();
        let rel: Vec<String> = changed
            .iter()
            .map(|p| p.strip_prefix(&dir).expect("below").display().to_string())
            .collect();
        assert_eq!(
            rel,
            [
                "",
                "certs",
                "certs/ca.pem",
                "node.json",
                "sandboxes",
                "sandboxes/x",
                "sandboxes/x/hosts",
                "sandboxes/x/sandbox.json"
            ]
        );
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("node.json")), 0o600);
        assert_eq!(mode(&dir.join("certs/ca.pem")), 0o600);
        assert_eq!(mode(&dir.join("sandboxes/x/sandbox.json")), 0o600);
        assert_eq!(mode(&dir.join("sandboxes/x/hosts")), 0o644);
        assert_eq!(mode(&dir.join("sandboxes/x/resolv.conf")), 0o644);
        // The symlink's target is untouched.
        assert_ne!(mode(Path::new("/etc/passwd")) & 0o044, 0);
        // A second pass finds nothing to do.
        assert!(tighten_tree(&dir).is_empty());
        let _ = fs::remove_dir_all(&dir);
    }
}
