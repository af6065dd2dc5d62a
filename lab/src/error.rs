//! Errors of the lab harness: each says what failed and what to do next.

use std::path::PathBuf;

/// Everything `mesh lab` and the [`crate::Lab`] API can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(
        "invalid lab name {name:?}: {reason} (use 1-{max} characters of a-z, 0-9 and '-', not starting or ending with '-')",
        max = crate::names::MAX_LAB_NAME
    )]
    InvalidName { name: String, reason: &'static str },

    #[error("interrupted; what `up` had made is removed")]
    Interrupted,

    /// A request that cannot be carried out as asked; the text says why.
    #[error("{0}")]
    InvalidSpec(String),

    #[error(
        "mesh lab needs root (it creates network namespaces and starts daemons); re-run it with sudo"
    )]
    NotRoot,

    #[error("lab {0} already exists; run `mesh lab down {0}` first")]
    Exists(String),

    #[error("no lab named {0} on this machine; `mesh lab ls` lists the labs")]
    NotFound(String),

    #[error("lab {lab} has no node {node:?}; its nodes are {known}")]
    NoSuchNode {
        lab: String,
        node: String,
        known: String,
    },

    #[error(
        "lab {lab} has no outside host {host:?}; its hosts are [{known}] (`mesh lab up --hosts N` adds them)"
    )]
    NoSuchHost {
        lab: String,
        host: String,
        known: String,
    },

    #[error(
        "{host} of lab {lab} is an outside host: it runs no daemon and is not a cluster node; use node1..node{nodes}"
    )]
    NotANode {
        lab: String,
        host: String,
        nodes: usize,
    },

    #[error(
        "node {node} of lab {lab}: its daemon is already running (pid {pid}); `mesh lab kill {lab} {node}` stops it"
    )]
    AlreadyRunning { lab: String, node: String, pid: i32 },

    #[error(
        "could not run `{cmd}`: {error} (is it installed? deploy/install.sh installs what mesh needs)"
    )]
    Spawn { cmd: String, error: std::io::Error },

    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },

    #[error("`{cmd}` did not finish within {secs}s and was killed")]
    Timeout { cmd: String, secs: u64 },

    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },

    #[error("{what}: {error}")]
    Sys { what: String, error: nix::Error },

    #[error(
        "lab state file {path} is unreadable ({reason}); remove the lab with `mesh lab down {lab}`"
    )]
    State {
        lab: String,
        path: PathBuf,
        reason: String,
    },

    /// A node's daemon or a mesh command on it failed; the log tail usually says why.
    #[error("lab {lab}, {node}: {msg}{}", tail_block(log, tail))]
    Node {
        lab: String,
        node: String,
        msg: String,
        log: PathBuf,
        tail: String,
    },

    #[error("{error}\n(cleaning up the half-made lab also failed; run `mesh lab down {lab}`): {}", cleanup.join("; "))]
    UpCleanup {
        lab: String,
        error: Box<LabError>,
        cleanup: Vec<String>,
    },

    #[error("tearing down lab {lab} left problems; fix them and run `mesh lab down {lab}` again: {}", problems.join("; "))]
    Teardown { lab: String, problems: Vec<String> },
}

fn tail_block(log: &std::path::Path, tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("\n--- last lines of {} ---\n{tail}", log.display())
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = LabError> = std::result::Result<T, E>;

impl LabError {
    pub(crate) fn io(what: impl Into<String>, error: std::io::Error) -> Self {
        LabError::Io {
            what: what.into(),
            error,
        }
    }

    /// For a terminal whose caller prints errors on one line: prints the
    /// multi-line parts (log tails, lists of problems) on stderr now and
    /// returns the error without them.
    pub(crate) fn into_one_line(self) -> Self {
        match self {
            LabError::Node {
                lab,
                node,
                msg,
                log,
                tail,
            } => {
                eprintln!("--- last lines of {} ---\n{tail}\n---", log.display());
                LabError::Node {
                    lab,
                    node,
                    msg: format!("{msg} (the last lines of its daemon.log are above)"),
                    log,
                    tail: String::new(),
                }
            }
            LabError::UpCleanup {
                lab,
                error,
                cleanup,
            } => {
                for c in &cleanup {
                    eprintln!("cleanup problem: {c}");
                }
                let n = cleanup.len();
                LabError::UpCleanup {
                    lab,
                    error: Box::new(error.into_one_line()),
                    cleanup: vec![format!("{n} problem(s), listed above")],
                }
            }
            LabError::Teardown { lab, problems } => {
                for p in &problems {
                    eprintln!("teardown problem: {p}");
                }
                let n = problems.len();
                LabError::Teardown {
                    lab,
                    problems: vec![format!("{n} problem(s), listed above")],
                }
            }
            other => other,
        }
    }

    pub(crate) fn sys(what: impl Into<String>, error: nix::Error) -> Self {
        LabError::Sys {
            what: what.into(),
            error,
        }
    }
}
