//! Egress for sandboxes, as Docker's `docker_gwbridge`: one bridge per node
//! with a private subnet, one veth per sandbox, the sandbox's default route
//! through the bridge, and MASQUERADE for whatever leaves the node.
//!
//! Every function takes the node's namespace explicitly (`None` = the
//! namespace the daemon runs in), so a test or a lab can stand a namespace
//! in for a host. Links are driven with the `ip` command and nftables with
//! `nft -j` (JSON built with the `nftables` crate); every exit status is
//! checked and stderr ends up in the error. The daemon never changes its own
//! namespace: commands enter the node namespace in the forked child, and the
//! one sysctl write happens on a short-lived thread of its own.
//!
//! The nftables side is one table of our own, `ip mesh_egress`, replaced in
//! one atomic batch; rules we did not make are never touched.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

use mesh_common::ipam::{self, IpamError, Ipv4Net};
use nftables::batch::Batch;
use nftables::expr::{Expression, MetaKey, NamedExpression};
use nftables::stmt::{Match, Operator, Statement};
use nftables::types::{NfChainType, NfHook};
use nix::sched::CloneFlags;
use tracing::{debug, info};

use crate::nft;
use crate::sandbox::netns_path;

/// The node's egress bridge, as `docker_gwbridge`.
pub const GWBRIDGE: &str = "mesh_gwbridge";
/// Docker's usual gwbridge subnet.
pub const DEFAULT_GW_SUBNET: &str = "172.18.0.0/16";
/// Our nftables table (family `ip`) in the node namespace.
pub const TABLE: &str = "mesh_egress";
/// Name of the egress interface inside a sandbox; overlay interfaces are
/// `ethN`, so this one cannot collide with them.
pub const SANDBOX_IFNAME: &str = "gw0";

const POSTROUTING: &str = "postrouting";
const FORWARD: &str = "forward";

/// Why an egress operation failed; each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("invalid gateway bridge subnet: {0}")]
    Subnet(#[from] IpamError),
    #[error("invalid egress address {ip}/{prefix}: the prefix must be between 1 and 30")]
    Prefix { ip: Ipv4Addr, prefix: u8 },
    #[error(
        "invalid egress address {ip}/{prefix}: it is the network, broadcast or gateway address"
    )]
    Address { ip: Ipv4Addr, prefix: u8 },
    #[error("network namespace {0:?} does not exist (no /run/netns/{0}); create it first")]
    NetnsMissing(String),
    #[error("{GWBRIDGE} does not exist in {ns}: call ensure_gwbridge before attaching sandboxes")]
    NoBridge { ns: Ns },
    #[error("`{command}` in {ns} failed: {reason}")]
    Command {
        ns: Ns,
        command: String,
        reason: String,
    },
    #[error("cannot turn on IP forwarding in {ns}: {source}")]
    Forwarding { ns: Ns, source: io::Error },
    #[error("unexpected output from `{command}` in {ns}: {reason}")]
    Output {
        ns: Ns,
        command: String,
        reason: String,
    },
    #[error("removing egress in {ns} was incomplete: {}", join(.errors))]
    Teardown { ns: Ns, errors: Vec<EgressError> },
}

fn join(errors: &[EgressError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A namespace as errors name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ns(Option<String>);

impl Ns {
    fn of(ns: Option<&str>) -> Self {
        Self(ns.map(str::to_owned))
    }
}

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            None => f.write_str("the host namespace"),
            Some(n) => write!(f, "namespace {n}"),
        }
    }
}

/// Opens a named namespace for setns, or says it is missing.
fn open_netns(name: &str) -> Result<OwnedFd, EgressError> {
    File::open(netns_path(name))
        .map(OwnedFd::from)
        .map_err(|_| EgressError::NetnsMissing(name.to_owned()))
}

/// Runs `program ARGS` in namespace `ns` (entered in the child before exec)
/// and returns its output, whatever its exit status.
fn output(
    ns: Option<&str>,
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<(String, Output), EgressError> {
    let command = format!("{program} {}", args.join(" "));
    let fail = |reason: String| EgressError::Command {
        ns: Ns::of(ns),
        command: command.clone(),
        reason,
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(name) = ns {
        let fd = open_netns(name)?;
        // SAFETY: runs in the forked child; setns(2) on an fd opened before
        // the fork is a plain system call: no allocation, no locks.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            });
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot run {program}: {e}")))?;
    // A program that exits before reading all its input breaks the pipe;
    // its own stderr then says more than EPIPE, so that wins.
    let written = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => pipe.write_all(input),
        _ => Ok(()),
    };
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("waiting for {program}: {e}")))?;
    match written {
        Err(e) if out.status.success() => Err(fail(format!("writing to {program}: {e}"))),
        _ => Ok((command, out)),
    }
}

/// Like [`output`], but a non-zero exit is an error carrying stderr.
fn run(
    ns: Option<&str>,
    program: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> Result<String, EgressError> {
    let (command, out) = output(ns, program, args, stdin)?;
    if !out.status.success() {
        return Err(EgressError::Command {
            ns: Ns::of(ns),
            command,
            reason: failure_reason(&out),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn failure_reason(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if stderr.is_empty() {
        out.status.to_string()
    } else {
        stderr
    }
}

fn ip(ns: Option<&str>, args: &[&str]) -> Result<String, EgressError> {
    run(ns, "ip", args, None)
}

/// Whether link `name` exists in `ns`.
fn link_exists(ns: Option<&str>, name: &str) -> Result<bool, EgressError> {
    let (command, out) = output(ns, "ip", &["-o", "link", "show", "dev", name], None)?;
    if out.status.success() {
        return Ok(true);
    }
    let reason = failure_reason(&out);
    if reason.contains("does not exist") {
        return Ok(false);
    }
    Err(EgressError::Command {
        ns: Ns::of(ns),
        command,
        reason,
    })
}

/// Deletes link `name` in `ns`; fine if it is not there.
fn delete_link(ns: Option<&str>, name: &str) -> Result<(), EgressError> {
    if link_exists(ns, name)? {
        ip(ns, &["link", "del", "dev", name])?;
    }
    Ok(())
}

/// The IPv4 addresses on `dev`, as `ADDR/PREFIX`.
fn addresses(ns: Option<&str>, dev: &str) -> Result<Vec<String>, EgressError> {
    let args = ["-j", "-4", "addr", "show", "dev", dev];
    let json = ip(ns, &args)?;
    let bad = |reason: String| EgressError::Output {
        ns: Ns::of(ns),
        command: format!("ip {}", args.join(" ")),
        reason,
    };
    let links: serde_json::Value = serde_json::from_str(&json).map_err(|e| bad(e.to_string()))?;
    let mut found = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            match (a["local"].as_str(), a["prefixlen"].as_u64()) {
                (Some(local), Some(len)) => found.push(format!("{local}/{len}")),
                _ => return Err(bad(format!("address without local/prefixlen: {a}"))),
            }
        }
    }
    Ok(found)
}

/// The whole `ip mesh_egress` table as one batch. It starts with "add
/// table; delete table" so that applying it replaces whatever an earlier
/// run left, atomically, whether or not the table existed.
fn egress_batch(net: &Ipv4Net) -> Batch<'static> {
    let mut b = Batch::new();
    b.add(nft::table(TABLE));
    b.delete(nft::table(TABLE));
    b.add(nft::table(TABLE));
    // srcnat priority, as Docker's and netavark's NAT.
    b.add(nft::chain(
        TABLE,
        POSTROUTING.into(),
        Some((NfChainType::NAT, NfHook::Postrouting, 100)),
    ));
    b.add(nft::rule(
        TABLE,
        POSTROUTING.into(),
        vec![
            nft::saddr_in(net),
            nft::meta_is(MetaKey::Oifname, Operator::NEQ, nft::name_expr(GWBRIDGE)),
            nft::counter(),
            Statement::Masquerade(None),
        ],
        "sandbox traffic leaving the node takes the node's address",
    ));
    b.add(nft::chain(
        TABLE,
        FORWARD.into(),
        Some((NfChainType::Filter, NfHook::Forward, 0)),
    ));
    b.add(nft::rule(
        TABLE,
        FORWARD.into(),
        vec![
            nft::meta_is(MetaKey::Iifname, Operator::EQ, nft::name_expr(GWBRIDGE)),
            nft::meta_is(MetaKey::Oifname, Operator::EQ, nft::name_expr(GWBRIDGE)),
            nft::counter(),
            Statement::Drop(None),
        ],
        "no sandbox-to-sandbox traffic routed over the gateway bridge",
    ));
    b.add(nft::rule(
        TABLE,
        FORWARD.into(),
        vec![
            Statement::Match(Match {
                left: Expression::Named(NamedExpression::CT(nftables::expr::CT {
                    key: "state".into(),
                    family: None,
                    dir: None,
                })),
                right: Expression::List(vec![
                    Expression::String("established".into()),
                    Expression::String("related".into()),
                ]),
                op: Operator::IN,
            }),
            Statement::Accept(None),
        ],
        "replies to sandbox connections",
    ));
    b
}

/// Applies a batch to our table, naming the namespace in the error.
fn apply(ns: Option<&str>, batch: Batch<'_>) -> Result<(), EgressError> {
    nft::apply(ns, batch).map_err(|e| EgressError::Command {
        ns: Ns::of(ns),
        command: "nft -j -f -".into(),
        reason: e.to_string(),
    })
}

/// The gateway of a gw subnet: its first address, as Docker's IPAM gives it.
fn gateway(net: &Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).saturating_add(1))
}

/// Makes the node's egress bridge: `mesh_gwbridge` with the subnet's first
/// address, up; IPv4 forwarding on; and the `ip mesh_egress` table
/// (masquerade what leaves from the subnet through any other interface; drop
/// what would be routed from one gwbridge port to another). Idempotent: a
/// second call fixes the address and replaces the table.
pub fn ensure_gwbridge(node_ns: Option<&str>, subnet: &str) -> Result<(), EgressError> {
    let net = ipam::parse_subnet(subnet)?;
    let gw = format!("{}/{}", gateway(&net), net.prefix_len());
    if let Some(name) = node_ns {
        open_netns(name)?;
    }
    if !link_exists(node_ns, GWBRIDGE)? {
        ip(node_ns, &["link", "add", GWBRIDGE, "type", "bridge"])?;
        info!(ns = %Ns::of(node_ns), "created {GWBRIDGE}");
    }
    for stale in addresses(node_ns, GWBRIDGE)?
        .into_iter()
        .filter(|a| *a != gw)
    {
        debug!(address = %stale, "removing stale {GWBRIDGE} address");
        ip(node_ns, &["addr", "del", &stale, "dev", GWBRIDGE])?;
    }
    ip(node_ns, &["addr", "replace", &gw, "dev", GWBRIDGE])?;
    ip(node_ns, &["link", "set", GWBRIDGE, "up"])?;
    nft::enable_forwarding(node_ns).map_err(|source| EgressError::Forwarding {
        ns: Ns::of(node_ns),
        source,
    })?;
    apply(node_ns, egress_batch(&net))?;
    Ok(())
}

/// The node-side name of a sandbox's egress veth: derived from the sandbox
/// namespace (unique on the node) so that detach finds it again without
/// any saved state. "mgw" + 12 hex digits fits the 15-byte limit.
pub fn host_ifname(sandbox_ns: &str) -> String {
    // FNV-1a, 64 bits, kept to 48: stable across runs and builds.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sandbox_ns.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("mgw{:012x}", h & 0xffff_ffff_ffff)
}

/// Gives a sandbox egress: a veth whose sandbox end `gw0` has `ip/prefix`
/// and whose node end is an isolated port of `mesh_gwbridge`. The default
/// route goes through the bridge address when `default_route` is true, or
/// when the sandbox has no default route yet. Idempotent; a failure leaves
/// no veth behind.
pub fn attach(
    node_ns: Option<&str>,
    sandbox_ns: &str,
    ip_addr: Ipv4Addr,
    prefix: u8,
    default_route: bool,
) -> Result<(), EgressError> {
    if !(1..=30).contains(&prefix) {
        return Err(EgressError::Prefix {
            ip: ip_addr,
            prefix,
        });
    }
    let net = Ipv4Net::new(ip_addr, prefix)
        .map_err(|_| EgressError::Prefix {
            ip: ip_addr,
            prefix,
        })?
        .trunc();
    let gw = gateway(&net);
    if ip_addr == net.network() || ip_addr == net.broadcast() || ip_addr == gw {
        return Err(EgressError::Address {
            ip: ip_addr,
            prefix,
        });
    }
    open_netns(sandbox_ns)?;
    if !link_exists(node_ns, GWBRIDGE)? {
        return Err(EgressError::NoBridge {
            ns: Ns::of(node_ns),
        });
    }
    let host_if = host_ifname(sandbox_ns);
    let sb = Some(sandbox_ns);
    let have_host = link_exists(node_ns, &host_if)?;
    let have_inner = link_exists(sb, SANDBOX_IFNAME)?;
    if have_host != have_inner {
        // Half of a pair (an interrupted attach): start over.
        delete_link(node_ns, &host_if)?;
        delete_link(sb, SANDBOX_IFNAME)?;
    }
    if !(have_host && have_inner) {
        ip(
            node_ns,
            &[
                "link",
                "add",
                &host_if,
                "type",
                "veth",
                "peer",
                "name",
                SANDBOX_IFNAME,
                "netns",
                sandbox_ns,
            ],
        )?;
    }
    let configure = || -> Result<(), EgressError> {
        ip(
            node_ns,
            &["link", "set", "dev", &host_if, "master", GWBRIDGE],
        )?;
        // Isolated ports cannot talk to each other at layer 2: sandboxes
        // reach only the gateway through this bridge.
        ip(
            node_ns,
            &[
                "link",
                "set",
                "dev",
                &host_if,
                "type",
                "bridge_slave",
                "isolated",
                "on",
            ],
        )?;
        ip(node_ns, &["link", "set", "dev", &host_if, "up"])?;
        let cidr = format!("{ip_addr}/{prefix}");
        ip(sb, &["addr", "replace", &cidr, "dev", SANDBOX_IFNAME])?;
        ip(sb, &["link", "set", "dev", SANDBOX_IFNAME, "up"])?;
        ip(sb, &["link", "set", "dev", "lo", "up"])?;
        let gw = gw.to_string();
        let route = ["default", "via", gw.as_str(), "dev", SANDBOX_IFNAME];
        if default_route {
            ip(sb, &[&["route", "replace"][..], &route[..]].concat())?;
        } else if ip(sb, &["-4", "route", "show", "default"])?
            .trim()
            .is_empty()
        {
            ip(sb, &[&["route", "add"][..], &route[..]].concat())?;
        }
        Ok(())
    };
    if let Err(e) = configure() {
        let _ = delete_link(node_ns, &host_if);
        return Err(e);
    }
    info!(sandbox = sandbox_ns, address = %ip_addr, port = %host_if, "attached sandbox to {GWBRIDGE}");
    Ok(())
}

/// Removes a sandbox's egress veth (both ends go together). Fine if it is
/// already gone, or if the sandbox namespace is.
pub fn detach(node_ns: Option<&str>, sandbox_ns: &str) -> Result<(), EgressError> {
    delete_link(node_ns, &host_ifname(sandbox_ns))?;
    // The node end may have gone another way (a half-made attach); the
    // sandbox end is only worth looking for while its namespace exists.
    if netns_path(sandbox_ns).exists() {
        delete_link(Some(sandbox_ns), SANDBOX_IFNAME)?;
    }
    debug!(sandbox = sandbox_ns, "detached sandbox from {GWBRIDGE}");
    Ok(())
}

/// Removes the bridge and our nftables table from the node; keeps going past
/// failures and reports them all. IP forwarding stays on: other parts of
/// the node may rely on it. Ports still on the bridge are released, not
/// deleted: detach sandboxes first.
pub fn remove_gwbridge(node_ns: Option<&str>) -> Result<(), EgressError> {
    let mut errors = Vec::new();
    // "add; delete" removes the table whether or not it exists.
    let mut b = Batch::new();
    b.add(nft::table(TABLE));
    b.delete(nft::table(TABLE));
    if let Err(e) = apply(node_ns, b) {
        errors.push(e);
    }
    if let Err(e) = delete_link(node_ns, GWBRIDGE) {
        errors.push(e);
    }
    if errors.is_empty() {
        info!(ns = %Ns::of(node_ns), "removed {GWBRIDGE} and table {TABLE}");
        Ok(())
    } else {
        Err(EgressError::Teardown {
            ns: Ns::of(node_ns),
            errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ifnames_fit_and_differ() {
        let a = host_ifname("t1-s1");
        let b = host_ifname("t1-s2");
        assert_eq!(a.len(), 15);
        assert_ne!(a, b);
        assert_eq!(a, host_ifname("t1-s1"));
    }

    #[test]
    fn gateway_is_the_first_address() {
        let net = ipam::parse_subnet(DEFAULT_GW_SUBNET).expect("subnet");
        assert_eq!(gateway(&net), Ipv4Addr::new(172, 18, 0, 1));
    }

    #[test]
    fn batch_replaces_only_our_table() {
        let net = ipam::parse_subnet("172.18.0.0/16").expect("subnet");
        let json = serde_json::to_value(egress_batch(&net).to_nftables()).expect("json");
        let cmds = json["nftables"].as_array().expect("array");
        // add table, delete table, add table: an atomic replace.
        assert_eq!(cmds[0]["add"]["table"]["name"], TABLE);
        assert_eq!(cmds[1]["delete"]["table"]["name"], TABLE);
        assert_eq!(cmds[2]["add"]["table"]["name"], TABLE);
        for c in cmds {
            let obj = c
                .as_object()
                .and_then(|o| o.values().next())
                .expect("command");
            let inner = obj
                .as_object()
                .and_then(|o| o.values().next())
                .expect("object");
            let table = inner.get("table").or_else(|| inner.get("name"));
            assert_eq!(table.and_then(|t| t.as_str()), Some(TABLE), "{c}");
        }
        let text = json.to_string();
        assert!(text.contains("\"masquerade\""), "{text}");
        assert!(text.contains("172.18.0.0"), "{text}");
    }
}
