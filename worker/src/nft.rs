//! Our nftables tables: small builders for the JSON ruleset, and applying a
//! batch atomically with `nft -j -f -` inside a namespace. Each user (egress
//! through mesh_gwbridge, local bridge networks) owns one table of its own
//! and replaces it whole; rules we did not make are never touched.

use std::borrow::Cow;
use std::io::{self, Write};
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;
use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, NfListObject, Rule, Table};
use nftables::stmt::{Counter, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::netns;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

pub(crate) fn table(name: &'static str) -> NfListObject<'static> {
    NfListObject::Table(Table {
        family: NfFamily::IP,
        name: name.into(),
        handle: None,
    })
}

/// A chain of `table`; with `base`, hooked in with policy accept: our
/// tables add NAT and a few drops, and must not decide the fate of the
/// node's other traffic.
pub(crate) fn chain(
    table: &'static str,
    name: String,
    base: Option<(NfChainType, NfHook, i32)>,
) -> NfListObject<'static> {
    let mut c = Chain {
        family: NfFamily::IP,
        table: table.into(),
        name: Cow::Owned(name),
        ..Chain::default()
    };
    if let Some((kind, hook, prio)) = base {
        c._type = Some(kind);
        c.hook = Some(hook);
        c.prio = Some(prio);
        c.policy = Some(NfChainPolicy::Accept);
    }
    NfListObject::Chain(c)
}

pub(crate) fn rule(
    table: &'static str,
    chain: String,
    expr: Vec<Statement<'static>>,
    comment: &'static str,
) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family: NfFamily::IP,
        table: table.into(),
        chain: Cow::Owned(chain),
        expr: Cow::Owned(expr),
        comment: Some(comment.into()),
        ..Rule::default()
    })
}

/// `meta KEY OP RIGHT`, e.g. `oifname != "mesh_gwbridge"`.
pub(crate) fn meta_is(
    key: MetaKey,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Meta(Meta { key })),
        right,
        op,
    })
}

/// An interface name as a match operand.
pub(crate) fn name_expr(name: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(name.to_owned()))
}

/// `ip saddr SUBNET`
pub(crate) fn saddr_in(net: &Ipv4Net) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: "ip".into(),
                field: "saddr".into(),
            },
        ))),
        right: Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(Expression::String(net.network().to_string().into())),
            len: u32::from(net.prefix_len()),
        })),
        op: Operator::EQ,
    })
}

pub(crate) fn counter() -> Statement<'static> {
    Statement::Counter(Counter::Anonymous(None))
}

/// Applies `batch` in `ns` (`None`: the caller's) with `nft -j -f -`,
/// keeping nft's stderr for the error. The command is forked from a thread
/// that entered the namespace, so the daemon itself never moves.
pub(crate) fn apply(ns: Option<&str>, batch: Batch<'_>) -> io::Result<()> {
    let input = serde_json::to_vec(&batch.to_nftables())
        .map_err(|e| io::Error::other(format!("cannot encode the ruleset: {e}")))?;
    let run = || -> io::Result<()> {
        let mut child = Command::new("nft")
            .args(["-j", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot run nft ({e}); install Debian's `nftables` package"),
                )
            })?;
        // nft exiting early breaks the pipe; its stderr then says more than
        // EPIPE, so a failed status wins over a failed write.
        let written = match child.stdin.take() {
            Some(mut pipe) => pipe.write_all(&input),
            None => Ok(()),
        };
        let out = child.wait_with_output()?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            return Err(io::Error::other(format!(
                "nft -j -f - failed ({}): {stderr}",
                out.status
            )));
        }
        written
    };
    in_ns(ns, run)
}

/// Turns IPv4 forwarding on in `ns`; returns whether it was off. It is left
/// on at removal since other parts of the node may rely on it.
pub(crate) fn enable_forwarding(ns: Option<&str>) -> io::Result<bool> {
    // /proc/sys/net answers for the opening thread's namespace.
    in_ns(ns, || {
        if std::fs::read_to_string(IP_FORWARD)?.trim() == "1" {
            return Ok(false);
        }
        std::fs::write(IP_FORWARD, b"1")?;
        Ok(true)
    })
}

fn in_ns<T: Send>(ns: Option<&str>, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    match ns {
        Some(name) => netns::run_in(name, f).map_err(|e| io::Error::other(e.to_string()))?,
        None => f(),
    }
}
