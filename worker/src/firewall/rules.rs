//! Builders for the pieces our tables are made of, so each table file reads
//! as its rules and nothing else. They build the JSON objects of
//! libnftables (through the `nftables` crate); nothing here runs `nft`.

use std::borrow::Cow;

use ipnet::Ipv4Net;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, NfListObject, Rule, Table};
use nftables::stmt::{Counter, JumpTarget, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

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
        left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: "ip".into(),
                field: field.into(),
            },
        ))),
        right,
        op: Operator::EQ,
    })
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
