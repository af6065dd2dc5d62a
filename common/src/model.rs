//! The cluster's vocabulary as types: roles, states, modes and drivers.
//!
//! Each enum is written to disk, to the Raft log and to the wire as the same
//! lowercase word the code used when these fields were strings, so a state
//! dir or log written by an older version still loads. Parsing an unknown
//! word is an error naming the words that are allowed. Where an enum has a
//! `Default`, it is the value a new object starts with (a joining node is an
//! active worker in state unknown; a new task is pending).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A word that is not one of an enum's allowed values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {got:?}: expected one of {allowed}")]
pub struct UnknownWord {
    pub what: &'static str,
    pub got: String,
    pub allowed: &'static str,
}

/// Defines an enum kept as one word: `Display`/`FromStr`/serde all use the
/// same table, so the words can never drift apart between disk and CLI.
macro_rules! word_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $what:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $word:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The word this value is written as.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownWord;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($word => Ok($name::$variant),)+
                    _ => Err(UnknownWord {
                        what: $what,
                        got: s.to_string(),
                        allowed: concat!($($word, " "),+).trim_ascii_end(),
                    }),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

word_enum! {
    /// What a node may do in the cluster.
    #[derive(Default)]
    NodeRole, "role" {
        Manager = "manager",
        #[default]
        Worker = "worker",
    }
}

word_enum! {
    /// Whether the scheduler may place tasks on a node (Docker's words).
    #[derive(Default)]
    Availability, "availability" {
        #[default]
        Active = "active",
        Pause = "pause",
        Drain = "drain",
    }
}

word_enum! {
    /// A node's liveness as the leader sees it from heartbeats.
    #[derive(Default)]
    NodeState, "node state" {
        #[default]
        Unknown = "unknown",
        Ready = "ready",
        Down = "down",
    }
}

word_enum! {
    /// A task's state, observed or desired, in the order a task goes through
    /// them; the last five are terminal.
    #[derive(Default)]
    TaskState, "task state" {
        #[default]
        Pending = "pending",
        Assigned = "assigned",
        Starting = "starting",
        Running = "running",
        Complete = "complete",
        Failed = "failed",
        Rejected = "rejected",
        Shutdown = "shutdown",
        Orphaned = "orphaned",
    }
}

impl TaskState {
    /// A task in one of these states never runs again.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Complete
                | TaskState::Failed
                | TaskState::Rejected
                | TaskState::Shutdown
                | TaskState::Orphaned
        )
    }
}

word_enum! {
    /// How a service's tasks are counted.
    #[derive(Default)]
    ServiceMode, "mode" {
        #[default]
        Replicated = "replicated",
        Global = "global",
    }
}

word_enum! {
    /// How a service's name resolves: to one VIP, or to its tasks.
    #[derive(Default)]
    EndpointMode, "endpoint mode" {
        #[default]
        Vip = "vip",
        Dnsrr = "dnsrr",
    }
}

word_enum! {
    /// When a stopped task is replaced.
    #[derive(Default)]
    RestartCondition, "restart condition" {
        #[default]
        Any = "any",
        OnFailure = "on-failure",
        None = "none",
    }
}

word_enum! {
    /// The transport protocol of a published port.
    #[derive(Default)]
    Protocol, "protocol" {
        #[default]
        Tcp = "tcp",
        Udp = "udp",
    }
}

word_enum! {
    /// How a service port is published: on every node through the routing
    /// mesh, or only on the nodes running a task, straight to it.
    #[derive(Default)]
    PublishMode, "publish mode" {
        #[default]
        Ingress = "ingress",
        Host = "host",
    }
}

impl Protocol {
    /// A protocol as the wire carries it: empty is Docker's default (tcp),
    /// case is ignored, anything else is refused.
    pub fn from_wire(s: &str) -> Result<Self, UnknownWord> {
        from_wire_word(s)
    }
}

impl PublishMode {
    /// A publish mode as the wire carries it: empty is Docker's default
    /// (ingress), case is ignored, anything else is refused.
    pub fn from_wire(s: &str) -> Result<Self, UnknownWord> {
        from_wire_word(s)
    }
}

/// The wire's optional word: empty means the enum's default.
fn from_wire_word<T>(s: &str) -> Result<T, UnknownWord>
where
    T: Default + FromStr<Err = UnknownWord>,
{
    if s.is_empty() {
        Ok(T::default())
    } else {
        s.to_ascii_lowercase()
            .parse()
            .map_err(|e: UnknownWord| UnknownWord {
                got: s.to_string(),
                ..e
            })
    }
}

word_enum! {
    /// Which network driver serves a network.
    DriverKind, "driver" {
        Overlay = "overlay",
        Bridge = "bridge",
        Macvlan = "macvlan",
        Host = "host",
        None = "none",
    }
}

impl DriverKind {
    /// The driver word a create request names, with Docker's default when
    /// `-d` is not given: a local bridge.
    pub fn requested(word: &str) -> &str {
        if word.is_empty() {
            DriverKind::Bridge.as_str()
        } else {
            word
        }
    }

    /// Cluster-wide networks live in the managers' state; the rest are local.
    pub const fn is_cluster(self) -> bool {
        matches!(self, DriverKind::Overlay)
    }
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Docker's MAC for an endpoint: 02:42 (locally administered) followed by
    /// the IPv4 address, so MACs never collide within a subnet and need no
    /// allocator, and a peer's MAC follows from its address.
    pub const fn for_ip(ip: Ipv4Addr) -> Mac {
        let [a, b, c, d] = ip.octets();
        Mac([0x02, 0x42, a, b, c, d])
    }

    pub const fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl From<[u8; 6]> for Mac {
    fn from(b: [u8; 6]) -> Self {
        Mac(b)
    }
}

impl From<Mac> for [u8; 6] {
    fn from(m: Mac) -> Self {
        m.0
    }
}

impl fmt::Display for Mac {
    /// The way `ip link` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A string that is not six colon-separated hex octets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex octets such as 02:42:0a:00:00:02")]
pub struct BadMac(pub String);

impl FromStr for Mac {
    type Err = BadMac;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(|| BadMac(s.to_string()))?;
            if part.len() != 2 {
                return Err(BadMac(s.to_string()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| BadMac(s.to_string()))?;
        }
        if parts.next().is_some() {
            return Err(BadMac(s.to_string()));
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_words_default_when_empty_and_refuse_the_unknown() {
        assert_eq!(Protocol::from_wire(""), Ok(Protocol::Tcp));
        assert_eq!(Protocol::from_wire("UDP"), Ok(Protocol::Udp));
        assert_eq!(PublishMode::from_wire(""), Ok(PublishMode::Ingress));
        assert_eq!(PublishMode::from_wire("host"), Ok(PublishMode::Host));
        let e = Protocol::from_wire("SCTP").expect_err("sctp");
        assert_eq!(e.got, "SCTP");
        assert!(PublishMode::from_wire("global").is_err());
    }

    #[test]
    fn words_round_trip_through_text_and_json() {
        for r in TaskState::ALL {
            assert_eq!(r.as_str().parse::<TaskState>(), Ok(*r));
            let json = serde_json::to_string(r).expect("serialize");
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<TaskState>(&json).expect("parse"), *r);
        }
        assert_eq!(RestartCondition::OnFailure.to_string(), "on-failure");
        assert_eq!(DriverKind::Overlay, "overlay");
    }

    #[test]
    fn unknown_words_name_the_allowed_ones() {
        let e = "boss".parse::<NodeRole>().expect_err("boss is not a role");
        assert_eq!(
            e.to_string(),
            "invalid role \"boss\": expected one of manager worker"
        );
        assert!(serde_json::from_str::<Availability>("\"sleepy\"").is_err());
    }

    #[test]
    fn terminal_states_are_the_last_five() {
        let terminal: Vec<_> = TaskState::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| s.as_str())
            .collect();
        assert_eq!(
            terminal,
            ["complete", "failed", "rejected", "shutdown", "orphaned"]
        );
    }

    #[test]
    fn mac_is_derived_from_the_ip_and_round_trips() {
        let m = Mac::for_ip(Ipv4Addr::new(10, 0, 1, 2));
        assert_eq!(m.to_string(), "02:42:0a:00:01:02");
        assert_eq!("02:42:0a:00:01:02".parse::<Mac>(), Ok(m));
        assert_eq!(
            serde_json::from_str::<Mac>("\"02:42:0a:00:01:02\"").expect("parse"),
            m
        );
        for bad in [
            "",
            "02:42",
            "02:42:0a:00:01:02:03",
            "zz:42:0a:00:01:02",
            "2:42:a:0:1:2",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad} accepted");
        }
    }
}
