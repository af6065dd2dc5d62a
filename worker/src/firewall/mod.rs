//! Our nftables tables. Each purpose owns one table in one namespace and
//! replaces it whole, in one atomic batch; rules we did not make are never
//! touched (STYLE.md point 5).
//!
//! - this file: the [`Table`] trait every table implements, and the one
//!   way to apply a batch in a namespace ([`apply`], `nft -j -f -` run
//!   from a thread that entered the namespace: in process through
//!   `libnft` where libnftables loads, forked otherwise), to read a table back
//!   ([`drift`]) and to turn IPv4 forwarding on;
//! - `rules`: builders for chains, rules and the few expressions we use;
//! - `drift`: comparing what a namespace holds with what we would apply;
//! - `egress`: `ip mesh_egress`, the gwbridge's NAT, in the node namespace;
//! - `bridge_nat`: `ip mesh_local`, NAT and isolation of the local bridge
//!   networks, in the node namespace;
//! - `vip`: `ip mesh_vip`, service VIP load balancing, in each sandbox.

pub mod bridge_nat;
mod drift;
pub mod egress;
pub mod ingress_host;
pub mod ingress_lb;
pub mod ingress_task;
pub mod libnft;
pub mod ports;
pub mod rules;
pub mod vip;

use std::io::{self, Write};
use std::process::{Command, Stdio};

use nftables::batch::Batch;
use nftables::schema::NfListObject;

use crate::netns::{self, NetError};

pub use drift::Drift;
use drift::Shape;
pub use rules::TableId;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Why a firewall operation failed; each message names the table or the
/// command, and the namespace when it is not the node's own.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot encode the ruleset of table {table}: {reason}")]
    Encode { table: &'static str, reason: String },
    #[error("invalid table {table}: {reason}")]
    Invalid { table: &'static str, reason: String },
    #[error("cannot run nft ({0}); install Debian's `nftables` package")]
    NoNft(io::Error),
    #[error("nft {args} failed ({status}): {stderr}")]
    Nft {
        args: String,
        status: String,
        stderr: String,
    },
    #[error("cannot talk to nft {args}: {source}")]
    Pipe { args: String, source: io::Error },
    #[error("unexpected output from nft {args}: {reason}")]
    Output { args: String, reason: String },
    #[error("cannot turn on IPv4 forwarding ({IP_FORWARD}): {0}")]
    Forwarding(io::Error),
    /// Entering the namespace failed (it is missing, most often).
    #[error(transparent)]
    Net(#[from] NetError),
}

/// One of our tables: it knows its family and name and builds its content.
/// [`batch`] turns it into the batch that replaces it atomically.
pub trait Table {
    fn id(&self) -> TableId;

    /// Whether the table should exist at all; when not, its batch only
    /// removes it.
    fn wanted(&self) -> bool {
        true
    }

    /// The chains and rules of the table, in the order they are added.
    fn objects(&self) -> Result<Vec<NfListObject<'static>>, FirewallError>;
}

/// The batch that makes `table` exactly what it builds. It starts with "add
/// table; delete table" so that applying it replaces whatever an earlier
/// run left, atomically, whether or not the table existed.
pub fn batch(table: &dyn Table) -> Result<Batch<'static>, FirewallError> {
    let id = table.id();
    let mut b = removal(id);
    if table.wanted() {
        b.add(id.table());
        for o in table.objects()? {
            b.add(o);
        }
    }
    Ok(b)
}

/// The batch that removes a table whether or not it exists ("add" first
/// makes "delete" succeed either way).
pub fn removal(id: TableId) -> Batch<'static> {
    let mut b = Batch::new();
    b.add(id.table());
    b.delete(id.table());
    b
}

/// The batch as the JSON text `nft -j` reads.
pub fn encode(id: TableId, batch: Batch<'_>) -> Result<String, FirewallError> {
    serde_json::to_string(&batch.to_nftables()).map_err(|e| FirewallError::Encode {
        table: id.name,
        reason: e.to_string(),
    })
}

/// Applies `batch` in `ns` (`None`: the node's own namespace) with `nft -j
/// -f -`: all of it or nothing. The one way any table reaches the kernel.
pub fn apply(ns: Option<&str>, id: TableId, batch: Batch<'_>) -> Result<(), FirewallError> {
    apply_text(ns, &encode(id, batch)?)
}

/// Applies a batch [`encode`] made: [`apply`] for a batch encoded once and
/// applied in many namespaces.
pub fn apply_text(ns: Option<&str>, encoded: &str) -> Result<(), FirewallError> {
    nft(ns, &["-j", "-f", "-"], Some(encoded.as_bytes())).map(drop)
}

/// Makes `table` in `ns` exactly what it builds.
pub fn sync(ns: Option<&str>, table: &dyn Table) -> Result<(), FirewallError> {
    apply(ns, table.id(), batch(table)?)
}

/// Removes a table from `ns`; absent is fine.
pub fn remove(ns: Option<&str>, id: TableId) -> Result<(), FirewallError> {
    apply(ns, id, removal(id))
}

/// Compares the table in `ns` with what `table` would build (see the
/// `drift` module for what is compared). One `nft` run, no change made.
pub fn drift(ns: Option<&str>, table: &dyn Table) -> Result<Drift, FirewallError> {
    let id = table.id();
    let args = ["-j", "list", "table", id.family_word(), id.name];
    let listed = match nft(ns, &args, None) {
        Ok(out) => Some(out),
        // nft's words for "no such table".
        Err(FirewallError::Nft { stderr, .. }) if stderr.contains("No such file or directory") => {
            None
        }
        Err(e) => return Err(e),
    };
    let Some(listed) = listed else {
        return Ok(if table.wanted() {
            Drift::Missing
        } else {
            Drift::InSync
        });
    };
    if !table.wanted() {
        return Ok(Drift::Differs);
    }
    let have: serde_json::Value =
        serde_json::from_str(&listed).map_err(|e| FirewallError::Output {
            args: args.join(" "),
            reason: e.to_string(),
        })?;
    let want =
        serde_json::to_value(batch(table)?.to_nftables()).map_err(|e| FirewallError::Encode {
            table: id.name,
            reason: e.to_string(),
        })?;
    Ok(if Shape::of(&have) == Shape::of(&want) {
        Drift::InSync
    } else {
        Drift::Differs
    })
}

/// Rebuilds `table` in `ns` unless it is in sync; returns what it found.
/// Cheap enough for every reconcile pass: one `nft` run when nothing
/// drifted, two when something did.
pub fn repair(ns: Option<&str>, table: &dyn Table) -> Result<Drift, FirewallError> {
    let found = drift(ns, table)?;
    if found != Drift::InSync {
        sync(ns, table)?;
    }
    Ok(found)
}

/// Turns IPv4 forwarding on in `ns`; returns whether it was off. Nothing
/// here turns it off again: other parts of the node may rely on it.
pub fn enable_forwarding(ns: Option<&str>) -> Result<bool, FirewallError> {
    match crate::sysctl::ensure(ns, &[("ipv4/ip_forward", "1")]) {
        Ok(changed) => Ok(changed > 0),
        Err(crate::sysctl::SysctlError::Io { source, .. }) => {
            Err(FirewallError::Forwarding(source))
        }
        Err(crate::sysctl::SysctlError::Net(e)) => Err(FirewallError::Net(e)),
    }
}

/// Runs `nft ARGS` in `ns`, feeding it `input`, and returns its stdout; a
/// failure carries nft's stderr. Forked from a thread that entered the
/// namespace, so the daemon itself never moves.
fn nft(ns: Option<&str>, args: &[&str], input: Option<&[u8]>) -> Result<String, FirewallError> {
    let joined = args.join(" ");
    in_ns(ns, || {
        if let Some(done) = in_process(args, input) {
            return done.map_err(|stderr| FirewallError::Nft {
                args: joined.clone(),
                status: "libnftables".into(),
                stderr,
            });
        }
        let mut child = Command::new("nft")
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(FirewallError::NoNft)?;
        // nft exiting early breaks the pipe; its stderr then says more than
        // EPIPE, so a failed status wins over a failed write.
        let written = match (input, child.stdin.take()) {
            (Some(bytes), Some(mut pipe)) => pipe.write_all(bytes),
            _ => Ok(()),
        };
        let out = child
            .wait_with_output()
            .map_err(|source| FirewallError::Pipe {
                args: joined.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(FirewallError::Nft {
                args: joined.clone(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        written.map_err(|source| FirewallError::Pipe {
            args: joined.clone(),
            source,
        })?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })
}

/// `nft ARGS` through libnftables, when it is loaded: every caller asks
/// for JSON (`-j`), and either feeds a batch (`-f -`) or names a command.
fn in_process(args: &[&str], input: Option<&[u8]>) -> Option<libnft::Outcome> {
    let rest = args.strip_prefix(&["-j"])?;
    match (rest, input) {
        (["-f", "-"], Some(bytes)) => match std::str::from_utf8(bytes) {
            Ok(text) => libnft::run(text),
            Err(_) => Some(Err("the batch is not UTF-8".into())),
        },
        (words, None) if !words.is_empty() && !words[0].starts_with('-') => {
            libnft::run(&words.join(" "))
        }
        _ => None,
    }
}

/// The table a command of a batch (`{"add": {"rule": {...}}}`) is about,
/// for tests that check a batch never touches another table.
#[cfg(test)]
pub(crate) fn table_of(cmd: &serde_json::Value) -> Option<&str> {
    fn first(v: &serde_json::Value) -> Option<&serde_json::Value> {
        v.as_object()?.values().next()
    }
    let inner = first(first(cmd)?)?;
    inner.get("table").or_else(|| inner.get("name"))?.as_str()
}

fn in_ns<T: Send>(
    ns: Option<&str>,
    f: impl FnOnce() -> Result<T, FirewallError> + Send,
) -> Result<T, FirewallError> {
    match ns {
        Some(name) => netns::run_in(name, f)?,
        None => f(),
    }
}
