//! The records a sandbox's resolver answers from, and the pure decision
//! of what to do with one query. No sockets here: the node agent builds
//! [`Records`] from the managers' view, and [`answer`] is tested inline
//! without a server.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use hickory_proto::rr::RecordType;

/// Plain-data records of one network. Built by the node agent from the
/// managers' view; holds no sockets and knows nothing of the wire.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkRecords {
    pub network_id: String,
    /// The network's name: every name on it also answers as
    /// `<name>.<network name>`, as in Docker. Empty: no qualified names.
    pub network_name: String,
    /// Name (sandbox name, `--network-alias`, later service name) to its
    /// addresses on this network. Keys are matched case-insensitively once
    /// normalized (see [`Records::normalized`]; the `insert_*` helpers and
    /// [`DnsServer::set_records`](super::DnsServer::set_records) do it).
    pub names: BTreeMap<String, Vec<Ipv4Addr>>,
    /// Address to names, the first being the PTR answer. Kept explicitly
    /// rather than derived from `names` because only the sandbox's own name
    /// should answer a reverse lookup, never one of its aliases (as in
    /// Docker); an address missing here falls back to the first name in
    /// `names` that carries it.
    pub reverse: BTreeMap<Ipv4Addr, Vec<String>>,
}

impl NetworkRecords {
    /// Empty records for `network_id`.
    pub fn new(network_id: impl Into<String>) -> Self {
        NetworkRecords {
            network_id: network_id.into(),
            ..Default::default()
        }
    }

    /// Adds a sandbox's (or task's) own name: resolvable and the PTR answer
    /// for its address.
    pub fn insert_sandbox(&mut self, name: &str, ip: Ipv4Addr) {
        let name = normalize(name);
        push_unique(self.names.entry(name.clone()).or_default(), ip);
        push_unique(self.reverse.entry(ip).or_default(), name);
    }

    /// Adds an alias: resolvable, but never a PTR answer.
    pub fn insert_alias(&mut self, alias: &str, ip: Ipv4Addr) {
        push_unique(self.names.entry(normalize(alias)).or_default(), ip);
    }

    /// Empty records for `network_id`, whose names also answer qualified
    /// by `network_name` (`web.front`).
    pub fn named(network_id: impl Into<String>, network_name: &str) -> Self {
        NetworkRecords {
            network_id: network_id.into(),
            network_name: normalize(network_name),
            ..Default::default()
        }
    }

    fn normalized(self) -> Self {
        let mut out = NetworkRecords::named(self.network_id, &self.network_name);
        for (name, ips) in self.names {
            let entry = out.names.entry(normalize(&name)).or_default();
            for ip in ips {
                push_unique(entry, ip);
            }
        }
        for (ip, names) in self.reverse {
            let entry = out.reverse.entry(ip).or_default();
            for name in names {
                push_unique(entry, normalize(&name));
            }
        }
        out
    }
}

/// All records the node knows, per network id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Records {
    pub networks: BTreeMap<String, NetworkRecords>,
}

impl Records {
    /// The same records with every name lowercased and without a trailing
    /// dot, which is the form [`answer`] looks names up in. Normalizing once
    /// per update keeps each query a plain map lookup.
    pub fn normalized(self) -> Self {
        Records {
            networks: self
                .networks
                .into_iter()
                .map(|(id, n)| (id, n.normalized()))
                .collect(),
        }
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

pub(super) fn push_unique<T: PartialEq>(v: &mut Vec<T>, item: T) {
    if !v.contains(&item) {
        v.push(item);
    }
}

/// A network a sandbox is on, as its resolver sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxNetwork {
    pub id: String,
    /// `--internal` (overlay or local bridge): no egress. A sandbox whose
    /// networks are all internal gets no forwarding either, see [`answer`].
    pub internal: bool,
}

impl SandboxNetwork {
    pub fn new(id: impl Into<String>, internal: bool) -> Self {
        SandboxNetwork {
            id: id.into(),
            internal,
        }
    }
}

/// Whether queries of a sandbox on `networks` may go to the host's
/// resolvers: only if one of its networks has a way out. For a sandbox on
/// internal networks only (or on none), the upstream resolver would be a
/// way out: the query names themselves carry data (Docker's CVE-2024-29018).
pub fn may_forward(networks: &[SandboxNetwork]) -> bool {
    networks.iter().any(|n| !n.internal)
}

/// [`Answer::Forward`] if the sandbox may forward, else [`Answer::Refused`].
pub fn forward_or_refuse(networks: &[SandboxNetwork]) -> Answer {
    if may_forward(networks) {
        Answer::Forward
    } else {
        Answer::Refused
    }
}

/// What to do with one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A records (the name is ours and has addresses).
    Records(Vec<Ipv4Addr>),
    /// The PTR answer, fully qualified (`web.`).
    Ptr(String),
    /// The name is ours but has no record of this type (AAAA, MX, ...):
    /// NOERROR with no answer, so the client does not conclude the name is
    /// gone.
    NoData,
    /// The name looks like ours (single label, or known on another network)
    /// and is not visible to this sandbox.
    NxDomain,
    /// Not ours: relay to the host's resolvers.
    Forward,
    /// Not ours, and the sandbox has no egress: REFUSED, and nothing is
    /// sent upstream.
    Refused,
}

/// Answers `qname`/`qtype` for a sandbox attached to `networks`, from
/// normalized `records` (see [`Records::normalized`]). What would be
/// forwarded is [`Answer::Refused`] instead when every network is internal
/// ([`may_forward`]). The rules are [`SandboxTable`]'s; this builds one
/// table per call, which the server does only once per change.
pub fn answer(
    records: &Records,
    networks: &[SandboxNetwork],
    qname: &str,
    qtype: RecordType,
) -> Answer {
    let name = normalize(qname);
    SandboxTable::build(records, networks)
        .lookup(name.as_bytes(), u16::from(qtype))
        .to_answer()
}

/// What one sandbox can resolve, precomputed from the records and its
/// networks so a query is one hash lookup by its lowercase name bytes, with
/// no allocation. Rebuilt (lazily, by the sandbox's loop) when the records
/// or the sandbox's networks change, never per query.
///
/// Rules, Docker's:
/// - names match case-insensitively, with or without the trailing dot;
/// - only records of the asking sandbox's networks are visible; a name that
///   exists only on other networks gets NXDOMAIN rather than going upstream,
///   which would leak it and could return an unrelated public address;
/// - every name of a visible network also answers as `<name>.<network>`
///   (Docker's `container_name.network_name`, aliases and services alike,
///   `tasks.<service>.<network>` too); a plain name that exists wins over
///   a qualified reading of it, as Docker tries the whole name first;
/// - a single-label name found nowhere is NXDOMAIN too (it cannot exist
///   upstream); any other unknown name is forwarded;
/// - `tasks.<name>` gives all addresses of `<name>` (for services, the task
///   addresses rather than the VIP);
/// - `d.c.b.a.in-addr.arpa` PTR is answered for addresses on the sandbox's
///   networks and forwarded otherwise;
/// - a known name asked for another type than A gets NODATA.
#[derive(Debug, Default)]
pub struct SandboxTable {
    names: HashMap<Box<[u8]>, Entry>,
    /// Address to PTR target, without the trailing dot.
    reverse: HashMap<Ipv4Addr, Box<str>>,
    may_forward: bool,
}

#[derive(Debug)]
enum Entry {
    /// Visible: these addresses, merged over the networks in order.
    Visible(Vec<Ipv4Addr>),
    /// Known only on networks the sandbox is not on.
    Hidden,
}

/// [`SandboxTable::lookup`]'s decision, borrowing from the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    Records(&'a [Ipv4Addr]),
    /// PTR target without the trailing dot.
    Ptr(&'a str),
    NoData,
    NxDomain,
    Forward,
    Refused,
}

impl Lookup<'_> {
    /// The owned [`Answer`].
    pub fn to_answer(self) -> Answer {
        match self {
            Lookup::Records(ips) => Answer::Records(ips.to_vec()),
            Lookup::Ptr(target) => Answer::Ptr(format!("{target}.")),
            Lookup::NoData => Answer::NoData,
            Lookup::NxDomain => Answer::NxDomain,
            Lookup::Forward => Answer::Forward,
            Lookup::Refused => Answer::Refused,
        }
    }
}

const TYPE_A: u16 = 1;
const TYPE_PTR: u16 = 12;
const TYPE_ANY: u16 = 255;

impl SandboxTable {
    /// The table of a sandbox on `networks`, from normalized `records`.
    pub fn build(records: &Records, networks: &[SandboxNetwork]) -> Self {
        let visible: Vec<&NetworkRecords> = networks
            .iter()
            .filter_map(|n| records.networks.get(&n.id))
            .collect();
        let mut names: HashMap<Box<[u8]>, Entry> = HashMap::new();
        fn add_visible(names: &mut HashMap<Box<[u8]>, Entry>, key: &str, ips: &[Ipv4Addr]) {
            let entry = names
                .entry(key.as_bytes().into())
                .or_insert_with(|| Entry::Visible(Vec::new()));
            if let Entry::Visible(acc) = entry {
                for ip in ips {
                    push_unique(acc, *ip);
                }
            }
        }
        // Plain names first: they win over a qualified reading.
        for net in &visible {
            for (name, ips) in &net.names {
                add_visible(&mut names, name, ips);
            }
        }
        let mut qualified: Vec<(String, &[Ipv4Addr])> = Vec::new();
        for net in visible.iter().filter(|n| !n.network_name.is_empty()) {
            for (name, ips) in &net.names {
                qualified.push((format!("{name}.{}", net.network_name), ips));
            }
        }
        let plain: std::collections::HashSet<Box<[u8]>> = names.keys().cloned().collect();
        for (key, ips) in qualified {
            if !plain.contains(key.as_bytes()) {
                add_visible(&mut names, &key, ips);
            }
        }
        // Names of the other networks, plain and qualified: NXDOMAIN.
        let shown: Vec<&str> = networks.iter().map(|n| n.id.as_str()).collect();
        for net in records
            .networks
            .values()
            .filter(|n| !shown.contains(&n.network_id.as_str()))
        {
            for name in net.names.keys() {
                names.entry(name.as_bytes().into()).or_insert(Entry::Hidden);
                if !net.network_name.is_empty() {
                    names
                        .entry(format!("{name}.{}", net.network_name).into_bytes().into())
                        .or_insert(Entry::Hidden);
                }
            }
        }

        // Reverse: explicit entries (a sandbox's own name) first, then the
        // first name carrying the address.
        let mut reverse: HashMap<Ipv4Addr, Box<str>> = HashMap::new();
        for net in &visible {
            for (ip, targets) in &net.reverse {
                if let Some(t) = targets.first() {
                    reverse.entry(*ip).or_insert_with(|| t.as_str().into());
                }
            }
        }
        for net in &visible {
            for (name, ips) in &net.names {
                for ip in ips {
                    reverse.entry(*ip).or_insert_with(|| name.as_str().into());
                }
            }
        }
        SandboxTable {
            names,
            reverse,
            may_forward: may_forward(networks),
        }
    }

    /// The decision for a normalized name (lowercase, no trailing dot) and
    /// a query type, forwarding policy included.
    pub fn lookup(&self, name: &[u8], qtype: u16) -> Lookup<'_> {
        match self.local(name, qtype) {
            Lookup::Forward if !self.may_forward => Lookup::Refused,
            l => l,
        }
    }

    fn local(&self, name: &[u8], qtype: u16) -> Lookup<'_> {
        if name.is_empty() {
            return Lookup::Forward;
        }
        if name.ends_with(b".in-addr.arpa")
            && let Some(ip) = std::str::from_utf8(name).ok().and_then(parse_reverse)
        {
            if qtype == TYPE_PTR
                && let Some(target) = self.reverse.get(&ip)
            {
                return Lookup::Ptr(target);
            }
            return Lookup::Forward;
        }
        let exact = self.names.get(name);
        let base = name
            .strip_prefix(b"tasks.")
            .and_then(|base| self.names.get(base));
        let found = match (exact, base) {
            (Some(Entry::Visible(ips)), _) | (_, Some(Entry::Visible(ips))) => Some(ips),
            _ => None,
        };
        if let Some(ips) = found {
            return match qtype {
                TYPE_A | TYPE_ANY => Lookup::Records(ips),
                _ => Lookup::NoData,
            };
        }
        if exact.is_some() || base.is_some() || !name.contains(&b'.') {
            Lookup::NxDomain
        } else {
            Lookup::Forward
        }
    }
}

/// `d.c.b.a.in-addr.arpa` (normalized) to `a.b.c.d`; anything else (a
/// partial reverse zone, IPv6) is not an address we could hold.
/// Allocation-free, as it runs on the query path.
fn parse_reverse(name: &str) -> Option<Ipv4Addr> {
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let mut labels = rest.split('.');
    let mut octets = [0u8; 4];
    for o in octets.iter_mut().rev() {
        *o = labels.next()?.parse().ok()?;
    }
    match labels.next() {
        Some(_) => None,
        None => Some(Ipv4Addr::from(octets)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn records() -> Records {
        let mut n1 = NetworkRecords::new("n1");
        n1.insert_sandbox("web", ip("10.0.1.2"));
        n1.insert_alias("w", ip("10.0.1.2"));
        n1.insert_sandbox("web2", ip("10.0.1.3"));
        n1.insert_alias("svc", ip("10.0.1.2"));
        n1.insert_alias("svc", ip("10.0.1.3"));
        let mut n2 = NetworkRecords::new("n2");
        n2.insert_sandbox("db", ip("10.0.2.5"));
        n2.insert_alias("db.internal", ip("10.0.2.5"));
        n2.insert_sandbox("svc", ip("10.0.2.9"));
        let mut r = Records::default();
        r.networks.insert("n1".into(), n1);
        r.networks.insert("n2".into(), n2);
        r
    }

    /// Non-internal networks.
    fn on(nets: &[&str]) -> Vec<SandboxNetwork> {
        nets.iter()
            .map(|s| SandboxNetwork::new(*s, false))
            .collect()
    }

    #[test]
    fn internal_only_sandboxes_get_refused_instead_of_forwarded() {
        let r = records();
        let sealed = vec![SandboxNetwork::new("n1", true)];
        for (q, t) in [
            ("example.com.", RecordType::A),
            ("tasks.nosuch", RecordType::A),
            (".", RecordType::NS),
            ("8.8.8.8.in-addr.arpa.", RecordType::PTR),
            ("2.1.0.10.in-addr.arpa.", RecordType::A),
        ] {
            assert_eq!(answer(&r, &sealed, q, t), Answer::Refused, "{q} {t}");
        }
        // Our own names still answer; NXDOMAIN stays NXDOMAIN.
        assert_eq!(
            answer(&r, &sealed, "web", RecordType::A),
            Answer::Records(vec![ip("10.0.1.2")])
        );
        assert_eq!(
            answer(&r, &sealed, "2.1.0.10.in-addr.arpa", RecordType::PTR),
            Answer::Ptr("web.".into())
        );
        assert_eq!(answer(&r, &sealed, "db", RecordType::A), Answer::NxDomain);
        // Several networks, all internal: still no way out.
        let both = vec![
            SandboxNetwork::new("n1", true),
            SandboxNetwork::new("n2", true),
        ];
        assert_eq!(
            answer(&r, &both, "example.com", RecordType::A),
            Answer::Refused
        );
        // No networks at all: no way out either.
        assert_eq!(
            answer(&r, &[], "example.com", RecordType::A),
            Answer::Refused
        );
        assert_eq!(forward_or_refuse(&[]), Answer::Refused);
    }

    #[test]
    fn one_network_with_egress_forwards() {
        let r = records();
        let mixed = vec![
            SandboxNetwork::new("n1", true),
            SandboxNetwork::new("n2", false),
        ];
        assert!(may_forward(&mixed));
        assert_eq!(
            answer(&r, &mixed, "example.com", RecordType::A),
            Answer::Forward
        );
        assert_eq!(
            answer(&r, &mixed, "8.8.8.8.in-addr.arpa.", RecordType::PTR),
            Answer::Forward
        );
        assert_eq!(forward_or_refuse(&mixed), Answer::Forward);
        assert_eq!(
            answer(&r, &mixed, "web", RecordType::A),
            Answer::Records(vec![ip("10.0.1.2")])
        );
    }

    #[test]
    fn names_on_own_networks_case_and_dot_insensitive() {
        let r = records();
        let n1 = on(&["n1"]);
        for q in ["web", "web.", "WEB.", "Web"] {
            assert_eq!(
                answer(&r, &n1, q, RecordType::A),
                Answer::Records(vec![ip("10.0.1.2")]),
                "{q}"
            );
        }
        assert_eq!(
            answer(&r, &n1, "w", RecordType::A),
            Answer::Records(vec![ip("10.0.1.2")])
        );
    }

    #[test]
    fn other_networks_and_unknown_single_labels_are_nxdomain() {
        let r = records();
        let n1 = on(&["n1"]);
        assert_eq!(answer(&r, &n1, "db.", RecordType::A), Answer::NxDomain);
        assert_eq!(
            answer(&r, &n1, "db.internal", RecordType::A),
            Answer::NxDomain
        );
        assert_eq!(answer(&r, &n1, "nosuch", RecordType::A), Answer::NxDomain);
        assert_eq!(
            answer(&r, &n1, "nosuch", RecordType::AAAA),
            Answer::NxDomain
        );
        assert_eq!(
            answer(&r, &n1, "example.com.", RecordType::A),
            Answer::Forward
        );
        assert_eq!(answer(&r, &n1, ".", RecordType::NS), Answer::Forward);
        // No networks: everything of ours is invisible.
        assert_eq!(answer(&r, &[], "web", RecordType::A), Answer::NxDomain);
    }

    #[test]
    fn several_networks_merge_addresses() {
        let r = records();
        assert_eq!(
            answer(&r, &on(&["n1", "n2"]), "svc", RecordType::A),
            Answer::Records(vec![ip("10.0.1.2"), ip("10.0.1.3"), ip("10.0.2.9")])
        );
        assert_eq!(
            answer(&r, &on(&["n2"]), "svc", RecordType::A),
            Answer::Records(vec![ip("10.0.2.9")])
        );
        // An unknown network id is simply empty.
        assert_eq!(
            answer(&r, &on(&["zz"]), "web", RecordType::A),
            Answer::NxDomain
        );
    }

    #[test]
    fn tasks_prefix() {
        let r = records();
        let n1 = on(&["n1"]);
        assert_eq!(
            answer(&r, &n1, "tasks.svc.", RecordType::A),
            Answer::Records(vec![ip("10.0.1.2"), ip("10.0.1.3")])
        );
        assert_eq!(answer(&r, &n1, "tasks.db", RecordType::A), Answer::NxDomain);
        assert_eq!(
            answer(&r, &n1, "tasks.nosuch", RecordType::A),
            Answer::Forward
        );
    }

    #[test]
    fn other_types_of_known_names_are_nodata() {
        let r = records();
        let n1 = on(&["n1"]);
        assert_eq!(answer(&r, &n1, "web", RecordType::AAAA), Answer::NoData);
        assert_eq!(answer(&r, &n1, "web", RecordType::MX), Answer::NoData);
        assert_eq!(
            answer(&r, &n1, "web", RecordType::ANY),
            Answer::Records(vec![ip("10.0.1.2")])
        );
    }

    #[test]
    fn reverse_lookups() {
        let r = records();
        let n1 = on(&["n1"]);
        // The sandbox name, not the alias "w" that sorts first.
        assert_eq!(
            answer(&r, &n1, "2.1.0.10.in-addr.arpa.", RecordType::PTR),
            Answer::Ptr("web.".into())
        );
        assert_eq!(
            answer(&r, &n1, "2.1.0.10.IN-ADDR.ARPA", RecordType::PTR),
            Answer::Ptr("web.".into())
        );
        // Another network's address, an unknown one, a partial zone.
        assert_eq!(
            answer(&r, &n1, "5.2.0.10.in-addr.arpa.", RecordType::PTR),
            Answer::Forward
        );
        assert_eq!(
            answer(&r, &n1, "8.8.8.8.in-addr.arpa.", RecordType::PTR),
            Answer::Forward
        );
        assert_eq!(
            answer(&r, &n1, "1.0.10.in-addr.arpa.", RecordType::PTR),
            Answer::Forward
        );
        assert_eq!(
            answer(&r, &n1, "2.1.0.10.in-addr.arpa.", RecordType::A),
            Answer::Forward
        );
    }

    #[test]
    fn reverse_falls_back_to_names() {
        let mut n = NetworkRecords::new("n");
        n.names.insert("only".into(), vec![ip("10.9.0.1")]);
        let mut r = Records::default();
        r.networks.insert("n".into(), n);
        assert_eq!(
            answer(&r, &on(&["n"]), "1.0.9.10.in-addr.arpa", RecordType::PTR),
            Answer::Ptr("only.".into())
        );
    }

    #[test]
    fn normalization_lowercases_and_merges() {
        let mut n = NetworkRecords::new("n");
        n.names.insert("Web.".into(), vec![ip("10.0.0.1")]);
        n.names
            .insert("web".into(), vec![ip("10.0.0.2"), ip("10.0.0.1")]);
        n.reverse.insert(ip("10.0.0.1"), vec!["Web.".into()]);
        let mut r = Records::default();
        r.networks.insert("n".into(), n);
        let r = r.normalized();
        let n = &r.networks["n"];
        assert_eq!(n.names.len(), 1);
        assert_eq!(n.names["web"], vec![ip("10.0.0.1"), ip("10.0.0.2")]);
        assert_eq!(n.reverse[&ip("10.0.0.1")], vec!["web".to_string()]);
    }

    #[test]
    fn names_qualified_by_network_name() {
        let mut front = NetworkRecords::named("f", "Front");
        front.insert_sandbox("web", ip("10.0.1.2"));
        front.insert_alias("tasks.api", ip("10.0.1.5"));
        // A plain name that reads like a qualified one wins over it.
        front.insert_alias("db.front", ip("10.0.1.9"));
        let mut back = NetworkRecords::named("b", "back");
        back.insert_sandbox("db", ip("10.0.2.5"));
        back.insert_sandbox("web", ip("10.0.2.2"));
        let mut unnamed = NetworkRecords::new("u");
        unnamed.insert_sandbox("x", ip("10.0.3.3"));
        let mut r = Records::default();
        r.networks.insert("f".into(), front);
        r.networks.insert("b".into(), back);
        r.networks.insert("u".into(), unnamed);
        let r = r.normalized();
        let f = on(&["f"]);
        assert_eq!(
            answer(&r, &f, "WEB.front.", RecordType::A),
            Answer::Records(vec![ip("10.0.1.2")])
        );
        assert_eq!(
            answer(&r, &f, "tasks.api.front", RecordType::A),
            Answer::Records(vec![ip("10.0.1.5")])
        );
        assert_eq!(
            answer(&r, &f, "db.front", RecordType::A),
            Answer::Records(vec![ip("10.0.1.9")])
        );
        assert_eq!(
            answer(&r, &f, "web.front", RecordType::AAAA),
            Answer::NoData
        );
        // Qualified by a network the sandbox is not on: NXDOMAIN, never
        // forwarded; by a network that does not exist: forwarded.
        assert_eq!(answer(&r, &f, "web.back", RecordType::A), Answer::NxDomain);
        assert_eq!(answer(&r, &f, "db.back", RecordType::A), Answer::NxDomain);
        assert_eq!(answer(&r, &f, "web.nosuch", RecordType::A), Answer::Forward);
        // On both: each qualified name gives its own network's address.
        let both = on(&["f", "b"]);
        assert_eq!(
            answer(&r, &both, "web.back", RecordType::A),
            Answer::Records(vec![ip("10.0.2.2")])
        );
        assert_eq!(
            answer(&r, &both, "web", RecordType::A),
            Answer::Records(vec![ip("10.0.1.2"), ip("10.0.2.2")])
        );
        // A network without a name has no qualified names.
        assert_eq!(
            answer(&r, &on(&["u"]), "x.", RecordType::A),
            Answer::Records(vec![ip("10.0.3.3")])
        );
    }

    #[test]
    fn reverse_names_parse_exactly_four_octets() {
        assert_eq!(
            parse_reverse("4.3.2.1.in-addr.arpa"),
            Some(Ipv4Addr::new(1, 2, 3, 4))
        );
        for bad in [
            "5.4.3.2.1.in-addr.arpa",
            "3.2.1.in-addr.arpa",
            "256.3.2.1.in-addr.arpa",
            "a.3.2.1.in-addr.arpa",
            "4.3.2.1.ip6.arpa",
            ".in-addr.arpa",
        ] {
            assert_eq!(parse_reverse(bad), None, "{bad}");
        }
    }
}
