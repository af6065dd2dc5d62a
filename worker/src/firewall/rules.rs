//! Builders for the pieces our tables are made of, so each table file reads
//! as its rules and nothing else. They build the JSON objects of
//! libnftables (through the `nftables` crate); nothing here runs `nft`.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use mesh_common::model::Protocol;
use nftables::expr::{
    CT, Expression, Fib, FibFlag, FibResult, Map, Meta, MetaKey, NamedExpression, NgMode, Numgen,
    Payload, PayloadField, Prefix, SetItem,
};
use nftables::schema::{Chain, NfListObject, Rule, Table};
use nftables::stmt::{Counter, JumpTarget, Match, NAT, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::FirewallError;

/// nft refuses longer rule comments.
pub(crate) const COMMENT_MAX: usize = 128;

/// Which table an object belongs to: its family and name. Every object a
/// table builds carries both, so a batch can never touch another table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableId {
    pub family: NfFamily,
    pub name: &'static str,
}

impl TableId {
    /// A table of family `ip`, the family of all our tables today.
    pub const fn ip(name: &'static str) -> Self {
        Self {
            family: NfFamily::IP,
            name,
        }
    }

    /// The family as `nft` spells it on its command line.
    pub fn family_word(&self) -> &'static str {
        match self.family {
            NfFamily::IP => "ip",
            NfFamily::IP6 => "ip6",
            NfFamily::INet => "inet",
            NfFamily::ARP => "arp",
            NfFamily::Bridge => "bridge",
            NfFamily::NetDev => "netdev",
        }
    }

    pub fn table(&self) -> NfListObject<'static> {
        NfListObject::Table(Table {
            family: self.family,
            name: self.name.into(),
            handle: None,
        })
    }

    /// A chain of this table; with `base`, hooked in with policy accept:
    /// our tables add NAT and a few drops, and must not decide the fate of
    /// the node's other traffic.
    pub fn chain(
        &self,
        name: impl Into<Cow<'static, str>>,
        base: Option<(NfChainType, NfHook, i32)>,
    ) -> NfListObject<'static> {
        let mut c = Chain {
            family: self.family,
            table: self.name.into(),
            name: name.into(),
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

    /// A rule of this table; every rule says why it exists in its comment,
    /// which `nft list` shows and drift detection compares.
    pub fn rule(
        &self,
        chain: impl Into<Cow<'static, str>>,
        expr: Vec<Statement<'static>>,
        comment: impl Into<Cow<'static, str>>,
    ) -> NfListObject<'static> {
        NfListObject::Rule(Rule {
            family: self.family,
            table: self.name.into(),
            chain: chain.into(),
            expr: Cow::Owned(expr),
            comment: Some(comment.into()),
            ..Rule::default()
        })
    }
}

/// `meta KEY OP RIGHT`, e.g. `oifname != "mesh_gwbridge"`.
pub fn meta_is(key: MetaKey, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Meta(Meta { key })),
        right,
        op,
    })
}

/// A string operand: an interface name, an address, a protocol name.
pub fn string(s: impl ToString) -> Expression<'static> {
    Expression::String(Cow::Owned(s.to_string()))
}

/// `ip FIELD == RIGHT` for `saddr` or `daddr`.
pub fn ip_field_is(field: &'static str, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left: payload("ip", field),
        right,
        op: Operator::EQ,
    })
}

/// `PROTOCOL FIELD`, a header field: `tcp dport`, `ether saddr`.
pub fn payload(protocol: impl Into<Cow<'static, str>>, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

/// `tcp dport P` / `udp dport P`: the protocol match is implied by the
/// payload.
pub fn dport(proto: Protocol, port: u16) -> Statement<'static> {
    Statement::Match(Match {
        left: payload(proto.as_str(), "dport"),
        right: Expression::Number(u32::from(port)),
        op: Operator::EQ,
    })
}

/// `fib daddr type local`: any of the node's own addresses.
pub fn fib_daddr_local() -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Fib(Fib {
            result: FibResult::Type,
            flags: [FibFlag::Daddr].into_iter().collect(),
        })),
        right: string("local"),
        op: Operator::EQ,
    })
}

/// `ct KEY`: `ct state`, `ct mark`, `ct status`.
pub fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

/// `ct status dnat`: a connection some rule DNATed.
pub fn ct_status_dnat() -> Statement<'static> {
    Statement::Match(Match {
        left: ct("status"),
        right: string("dnat"),
        op: Operator::IN,
    })
}

/// `dnat to ADDR[:PORT]`
pub fn dnat(addr: Ipv4Addr, port: Option<u16>) -> Statement<'static> {
    Statement::DNAT(Some(NAT {
        addr: Some(string(addr)),
        family: None,
        port: port.map(|p| Expression::Number(u32::from(p))),
        flags: None,
    }))
}

/// `dnat to numgen inc mod N map { 0 : b0, 1 : b1, ... } [: PORT]`, the
/// backends in their (sorted) order; `table` names the caller's table in
/// the refusal of an impossible count.
pub fn dnat_round_robin(
    table: &'static str,
    backends: &BTreeSet<Ipv4Addr>,
    port: Option<u16>,
) -> Result<Statement<'static>, FirewallError> {
    let n = u32::try_from(backends.len()).map_err(|_| FirewallError::Invalid {
        table,
        reason: "too many backends".into(),
    })?;
    let map = backends
        .iter()
        .zip(0u32..)
        .map(|(ip, i)| SetItem::Mapping(Expression::Number(i), string(ip)))
        .collect();
    Ok(Statement::DNAT(Some(NAT {
        addr: Some(Expression::Named(NamedExpression::Map(Box::new(Map {
            key: Expression::Named(NamedExpression::Numgen(Numgen {
                mode: NgMode::Inc,
                ng_mod: n,
                offset: Some(0),
            })),
            data: Expression::Named(NamedExpression::Set(map)),
        })))),
        family: None,
        port: port.map(|p| Expression::Number(u32::from(p))),
        flags: None,
    })))
}

/// A rule comment cut to what nft accepts, on a character boundary (a
/// service or sandbox name may hold any UTF-8).
pub fn cut_comment(mut c: String) -> String {
    if c.len() > COMMENT_MAX {
        let mut end = COMMENT_MAX;
        while !c.is_char_boundary(end) {
            end -= 1;
        }
        c.truncate(end);
    }
    c
}

/// `ip saddr SUBNET`
pub fn saddr_in(net: &Ipv4Net) -> Statement<'static> {
    ip_field_is(
        "saddr",
        Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(Expression::String(net.network().to_string().into())),
            len: u32::from(net.prefix_len()),
        })),
    )
}

/// An anonymous counter: `nft list` then shows what a rule matched.
pub fn counter() -> Statement<'static> {
    Statement::Counter(Counter::Anonymous(None))
}

/// `jump CHAIN`
pub fn jump(chain: impl Into<Cow<'static, str>>) -> Statement<'static> {
    Statement::Jump(JumpTarget {
        target: chain.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_are_cut_on_a_char_boundary() {
        // 'é' is two bytes: byte 128 falls inside one after "x".
        let c = cut_comment(format!("x{}", "é".repeat(100)));
        assert_eq!(c.len(), COMMENT_MAX - 1);
        assert!(c.starts_with("xé") && c.ends_with('é'));
        assert_eq!(cut_comment("short".into()), "short");
        let exact = "a".repeat(COMMENT_MAX);
        assert_eq!(cut_comment(exact.clone()), exact);
    }
}
