//! Network sysctls (`/proc/sys/net/...`) of a namespace, written only when
//! they differ: a reconcile pass reads them every time, and a write that
//! changes nothing still costs a syscall and hides whether anything drifted.

use std::io;

use crate::netns::{self, NetError};

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("cannot set {path} in {ns}: {source}")]
    Io {
        path: String,
        ns: String,
        source: io::Error,
    },
    /// Entering the namespace failed (it is missing, most often).
    #[error(transparent)]
    Net(#[from] NetError),
}

/// Sets each `(key, value)` (key below `/proc/sys/net/`, e.g.
/// `ipv4/ip_forward`) in `ns` (None: the daemon's own namespace) where it
/// differs; returns how many it changed.
pub fn ensure<K: AsRef<str> + Sync>(
    ns: Option<&str>,
    items: &[(K, &str)],
) -> Result<usize, SysctlError> {
    let work = || -> Result<usize, SysctlError> {
        let mut changed = 0;
        for (key, value) in items {
            let path = format!("/proc/sys/net/{}", key.as_ref());
            let err = |source| SysctlError::Io {
                path: path.clone(),
                ns: netns::label(ns),
                source,
            };
            if std::fs::read_to_string(&path).map_err(err)?.trim() != *value {
                std::fs::write(&path, value).map_err(err)?;
                changed += 1;
            }
        }
        Ok(changed)
    };
    match ns {
        // /proc/sys/net answers for the opening thread's namespace.
        Some(name) => netns::run_in(name, work)?,
        None => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_key_names_its_path() {
        let e = ensure(None, &[("ipv4/conf/no-such-if0/route_localnet", "1")])
            .expect_err("no such interface");
        let text = e.to_string();
        assert!(
            text.contains("/proc/sys/net/ipv4/conf/no-such-if0/route_localnet in host"),
            "{text}"
        );
    }

    #[test]
    fn an_equal_value_is_not_written() {
        // Readable by anyone, writable by root only: equal means no write,
        // so this succeeds without privileges and changes nothing.
        let now = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("read");
        assert_eq!(
            ensure(None, &[("ipv4/ip_forward", now.trim())]).expect("unchanged"),
            0
        );
    }
}
