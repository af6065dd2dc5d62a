//! The records a sandbox's resolver answers from, and the pure decision
//! of what to do with one query. No sockets here: the node agent builds
//! [`Records`] from the managers' view, and [`answer`] is tested inline
//! without a server.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use hickory_proto::rr::RecordType;

/// Plain-data records of one network. Built by the node agent from the
/// managers' view; holds no sockets and knows nothing of the wire.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkRecords {
    pub network_id: String,
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

    fn normalized(self) -> Self {
        let mut out = NetworkRecords::new(self.network_id);
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
/// ([`may_forward`]).
///
/// Rules, Docker's:
/// - names match case-insensitively, with or without the trailing dot;
/// - only records of the asking sandbox's networks are visible; a name that
///   exists only on other networks gets NXDOMAIN rather than going upstream,
///   which would leak it and could return an unrelated public address;
/// - a single-label name found nowhere is NXDOMAIN too (it cannot exist
///   upstream); any other unknown name is forwarded;
/// - `tasks.<name>` gives all addresses of `<name>` (for services, the task
///   addresses rather than the VIP);
/// - `d.c.b.a.in-addr.arpa` PTR is answered for addresses on the sandbox's
///   networks and forwarded otherwise;
/// - a known name asked for another type than A gets NODATA.
pub fn answer(
    records: &Records,
    networks: &[SandboxNetwork],
    qname: &str,
    qtype: RecordType,
) -> Answer {
    match local_answer(records, networks, qname, qtype) {
        Answer::Forward => forward_or_refuse(networks),
        a => a,
    }
}

/// [`answer`] without the forwarding policy: what our records say.
fn local_answer(
    records: &Records,
    networks: &[SandboxNetwork],
    qname: &str,
    qtype: RecordType,
) -> Answer {
    let name = normalize(qname);
    if name.is_empty() {
        return Answer::Forward;
    }
    let visible: Vec<&NetworkRecords> = networks
        .iter()
        .filter_map(|n| records.networks.get(&n.id))
        .collect();

    if let Some(ip) = parse_reverse(&name) {
        if qtype == RecordType::PTR {
            return match ptr_for(&visible, ip) {
                Some(target) => Answer::Ptr(format!("{target}.")),
                None => Answer::Forward,
            };
        }
        return Answer::Forward;
    }

    let mut found = lookup(&visible, &name);
    if found.is_none()
        && let Some(base) = name.strip_prefix("tasks.")
    {
        found = lookup(&visible, base);
    }
    if let Some(ips) = found {
        return match qtype {
            RecordType::A | RecordType::ANY => Answer::Records(ips),
            _ => Answer::NoData,
        };
    }

    let elsewhere = records.networks.values().any(|n| {
        n.names.contains_key(&name)
            || name
                .strip_prefix("tasks.")
                .is_some_and(|base| n.names.contains_key(base))
    });
    if elsewhere || !name.contains('.') {
        Answer::NxDomain
    } else {
        Answer::Forward
    }
}

/// Addresses of `name` on the visible networks, in network order, without
/// duplicates; `None` if no visible network knows the name.
fn lookup(visible: &[&NetworkRecords], name: &str) -> Option<Vec<Ipv4Addr>> {
    let mut out: Option<Vec<Ipv4Addr>> = None;
    for net in visible {
        if let Some(ips) = net.names.get(name) {
            let acc = out.get_or_insert_with(Vec::new);
            for ip in ips {
                push_unique(acc, *ip);
            }
        }
    }
    out
}

fn ptr_for<'a>(visible: &[&'a NetworkRecords], ip: Ipv4Addr) -> Option<&'a str> {
    let explicit = visible
        .iter()
        .find_map(|n| n.reverse.get(&ip).and_then(|names| names.first()));
    explicit
        .or_else(|| {
            visible.iter().find_map(|n| {
                n.names
                    .iter()
                    .find(|(_, ips)| ips.contains(&ip))
                    .map(|(name, _)| name)
            })
        })
        .map(String::as_str)
}

/// `d.c.b.a.in-addr.arpa` (normalized) to `a.b.c.d`; anything else (a
/// partial reverse zone, IPv6) is not an address we could hold.
fn parse_reverse(name: &str) -> Option<Ipv4Addr> {
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let octets: Vec<u8> = rest
        .split('.')
        .map(|l| l.parse::<u8>().ok())
        .collect::<Option<_>>()?;
    match octets.as_slice() {
        [d, c, b, a] => Some(Ipv4Addr::new(*a, *b, *c, *d)),
        _ => None,
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
}
