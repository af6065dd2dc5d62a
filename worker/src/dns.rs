//! Embedded DNS for sandboxes: the resolver every sandbox finds at
//! `127.0.0.11:53` (UDP and TCP), as Docker's is.
//!
//! Three layers, kept apart so the middle one can be tested without sockets:
//!
//! - [`Records`]: plain data (names and addresses per network), built by the
//!   node agent from the managers' view and swapped in whole by
//!   [`DnsServer::set_records`]; a query never sees half an update.
//! - [`answer`]: pure logic deciding, for the networks of the sandbox that
//!   asks, whether a query is ours (an answer, NXDOMAIN, an empty NOERROR),
//!   goes to the host's resolvers, or is refused because the sandbox has no
//!   egress (all its networks `--internal`).
//! - [`DnsServer`]: the wire side. Each served sandbox gets its own sockets,
//!   opened inside its network namespace, and its own tasks on the daemon's
//!   runtime (hickory-server for UDP, our accept loop for TCP, which caps
//!   connections), so a sandbox flooding its resolver only queues behind
//!   itself. Forwarded queries leave from the daemon's (node's) namespace,
//!   where the host's resolvers are reachable.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use hickory_proto::op::MessageType;
use hickory_proto::op::{Edns, Header, HeaderCounts, Message, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder};
use hickory_server::Server;
use hickory_server::net::NetError as HickoryNetError;
use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use nix::errno::Errno;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{debug, info, warn};

use crate::netns::{self, NetError};

/// Where the resolver listens inside every sandbox, as in Docker: an address
/// on the sandbox's own loopback, so it needs no route and no interface of
/// any network, and is the same whatever networks the sandbox is on.
pub const RESOLVER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);

/// TTL of the answers we give ourselves: 600 s, Docker's value, so tools
/// behave as they do under Docker. It is safe because stub resolvers in
/// sandboxes (glibc, musl) do not cache, sandbox addresses are fixed for the
/// sandbox's life, and service names resolve to a VIP that outlives its
/// tasks; only a caching resolver run inside a sandbox could hold a stale
/// `tasks.` answer, for at most this long, exactly as under Docker.
pub const TTL: u32 = 600;

/// Forwarded queries in flight per sandbox. Beyond this the sandbox gets
/// SERVFAIL at once: a sandbox flooding us with names that go upstream must
/// not hold an unbounded number of sockets and tasks (each of which may wait
/// the whole timeout on a silent upstream). Docker bounds it the same way.
pub const MAX_INFLIGHT_FORWARDS: usize = 256;

/// DNS-over-TCP connections served at once per sandbox; one more is
/// accepted and closed at once. Each holds a socket (a file descriptor) of
/// the daemon, so without a cap one sandbox could exhaust them. Stub
/// resolvers use one connection per lookup, so a few suffice.
pub const MAX_TCP_CONNECTIONS: usize = 16;

/// A TCP connection that has not sent a whole query this long after it
/// opened or after its last answer is closed, so a sandbox cannot hold its
/// connection slots with idle (or trickling) connections.
pub const TCP_IDLE: Duration = Duration::from_secs(3);

/// A TCP connection is closed this long after it opened, however busy, so
/// no client keeps a slot for good.
pub const TCP_LIFETIME: Duration = Duration::from_secs(30);

/// How long [`DnsServer::stop_sandbox`] waits for the server tasks to end;
/// they only have to notice cancellation, so this is generous.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Errors of the embedded DNS server, each naming the sandbox or namespace.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// Entering the sandbox's namespace or configuring its loopback failed.
    #[error("DNS for sandbox {sandbox}: {source}")]
    Net {
        sandbox: String,
        #[source]
        source: NetError,
    },
    /// The resolver's socket could not be bound inside the namespace
    /// (something else listening on 127.0.0.11:53 there?).
    #[error(
        "cannot bind {proto} {RESOLVER_IP}:53 in namespace {ns} for sandbox {sandbox}: {source} (is another DNS server listening there?)"
    )]
    Bind {
        proto: &'static str,
        ns: String,
        sandbox: String,
        #[source]
        source: io::Error,
    },
}

// ---------------------------------------------------------------------------
// Records: plain data
// ---------------------------------------------------------------------------

/// Plain-data records of one network. Built by the node agent from the
/// managers' view; holds no sockets and knows nothing of the wire.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkRecords {
    pub network_id: String,
    /// Name (sandbox name, `--network-alias`, later service name) to its
    /// addresses on this network. Keys are matched case-insensitively once
    /// normalized (see [`Records::normalized`]; the `insert_*` helpers and
    /// [`DnsServer::set_records`] do it).
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

fn push_unique<T: PartialEq>(v: &mut Vec<T>, item: T) {
    if !v.contains(&item) {
        v.push(item);
    }
}

// ---------------------------------------------------------------------------
// Answer logic: pure
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// resolv.conf
// ---------------------------------------------------------------------------

/// Upstream resolvers from the host's resolv.conf text, port 53.
///
/// Loopback resolvers (systemd-resolved's 127.0.0.53, a local dnsmasq) are
/// kept: they are unreachable from a sandbox, but forwarding is done by the
/// daemon from the node's own namespace, where they work. Link-local IPv6
/// entries with a zone (`fe80::1%eth0`) are skipped: the zone names an
/// interface we would have to resolve, and such setups are rare.
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        if let Ok(ip) = addr.parse::<IpAddr>() {
            push_unique(&mut out, SocketAddr::new(ip, 53));
        }
    }
    out
}

/// The resolv.conf a sandbox sees: our resolver, the host's search domains
/// and options, and `ndots:0` so that single-label names (other sandboxes)
/// are asked as they are first instead of walking the search list.
pub fn sandbox_resolv_conf(host_text: &str) -> String {
    let mut out = format!("nameserver {RESOLVER_IP}\n");
    for line in host_text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("search" | "domain") => {
                out.push_str(line.trim());
                out.push('\n');
            }
            Some("options") => {
                // Our ndots:0 replaces the host's: the sandbox's names are
                // single labels and must not be tried under search domains
                // upstream first.
                let kept: Vec<&str> = words.filter(|o| !o.starts_with("ndots:")).collect();
                if !kept.is_empty() {
                    out.push_str(&format!("options {}\n", kept.join(" ")));
                }
            }
            _ => {}
        }
    }
    out.push_str("options ndots:0\n");
    out
}

// ---------------------------------------------------------------------------
// Forwarding
// ---------------------------------------------------------------------------

/// Why a forwarded query got no usable reply (logged; the sandbox sees
/// SERVFAIL).
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("no upstream resolver configured")]
    NoUpstreams,
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("query of {0} bytes is too long for TCP")]
    TooLong(usize),
}

/// The host's resolvers and how long to wait for them.
struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
}

impl Forwarder {
    /// Sends `query` to the upstreams in order until one replies, all within
    /// `self.timeout`, and returns the raw reply. Each upstream gets an even
    /// share of the time left, so one silent resolver cannot use it all.
    async fn forward(&self, query: &[u8], tcp: bool) -> Result<Vec<u8>, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        // A fresh random ID: the sandbox chose the original, so reusing it
        // would let the sandbox (or anyone who sees its queries) forge
        // replies to the daemon.
        let mut query = query.to_vec();
        let id: u16 = rand::random();
        if let Some(id_field) = query.get_mut(..2) {
            id_field.copy_from_slice(&id.to_be_bytes());
        }

        let deadline = Instant::now() + self.timeout;
        let mut last = ForwardError::Timeout(self.timeout);
        let n = self.upstreams.len();
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let share = left / u32::try_from(n - i).unwrap_or(1);
            let attempt_deadline = Instant::now() + share;
            let attempt = async {
                if !tcp {
                    let reply = exchange_udp(*upstream, &query).await?;
                    // TC set: the answer did not fit; ask again over TCP.
                    if reply.get(2).is_none_or(|b| b & 0x02 == 0) {
                        return Ok(reply);
                    }
                }
                exchange_tcp(*upstream, &query).await
            };
            match timeout_at(attempt_deadline, attempt).await {
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(e)) => {
                    debug!(%upstream, error = %e, "upstream DNS failed");
                    last = e;
                }
                Err(_) => {
                    debug!(%upstream, "upstream DNS timed out");
                    last = ForwardError::Timeout(share);
                }
            }
        }
        Err(last)
    }
}

/// Whether `reply` is a response to `query` (same ID, QR bit set).
fn is_reply_to(reply: &[u8], query: &[u8]) -> bool {
    reply.len() >= 12 && reply[..2] == query[..2] && reply[2] & 0x80 != 0
}

/// One UDP exchange from an ephemeral port; stray or foreign datagrams are
/// ignored (the socket is connected, so only the upstream can reach it).
async fn exchange_udp(upstream: SocketAddr, query: &[u8]) -> Result<Vec<u8>, ForwardError> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = tokio::net::UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        if let Some(reply) = buf.get(..n)
            && is_reply_to(reply, query)
        {
            return Ok(reply.to_vec());
        }
    }
}

/// One TCP exchange (RFC 1035 4.2.2 length prefix).
async fn exchange_tcp(upstream: SocketAddr, query: &[u8]) -> Result<Vec<u8>, ForwardError> {
    let len = u16::try_from(query.len()).map_err(|_| ForwardError::TooLong(query.len()))?;
    let mut stream = tokio::net::TcpStream::connect(upstream).await?;
    let mut out = Vec::with_capacity(query.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(query);
    stream.write_all(&out).await?;
    loop {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await?;
        if is_reply_to(&reply, query) {
            return Ok(reply);
        }
    }
}

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

/// State shared by every sandbox's handler.
struct Shared {
    /// Swapped whole by `set_records`; handlers clone the `Arc` per query so
    /// an update never blocks or tears a lookup.
    records: RwLock<Arc<Records>>,
    forwarder: Forwarder,
}

/// One served sandbox.
struct Served {
    netns: String,
    networks: NetworksSlot,
    /// UDP.
    server: Server<SandboxHandler>,
    /// TCP: the accept loop, which owns its connections' tasks (aborting it
    /// ends them all). A set, so dropping it aborts the loop, as dropping
    /// `server` aborts hickory's.
    tcp: tokio::task::JoinSet<()>,
}

/// The embedded DNS server. One instance per daemon; one set of sockets per
/// sandbox.
pub struct DnsServer {
    shared: Arc<Shared>,
    sandboxes: Mutex<HashMap<String, Served>>,
    /// Serializes serve/stop so two calls for one sandbox cannot both bind.
    lifecycle: tokio::sync::Mutex<()>,
}

impl DnsServer {
    /// A server forwarding unknown names to `upstreams` (from the host's
    /// resolv.conf or `--dns-upstream`), giving up after `timeout` with
    /// SERVFAIL.
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Arc<Self> {
        Arc::new(DnsServer {
            shared: Arc::new(Shared {
                records: RwLock::new(Arc::new(Records::default())),
                forwarder: Forwarder { upstreams, timeout },
            }),
            sandboxes: Mutex::new(HashMap::new()),
            lifecycle: tokio::sync::Mutex::new(()),
        })
    }

    /// Replaces all records at once (normalized first).
    pub fn set_records(&self, r: Records) {
        let r = Arc::new(r.normalized());
        *self
            .shared
            .records
            .write()
            .unwrap_or_else(|p| p.into_inner()) = r;
    }

    /// Serves the sandbox `sandbox_id`, whose network namespace is `netns`,
    /// at 127.0.0.11:53 (UDP and TCP) inside that namespace.
    ///
    /// The sockets are created on a thread that entered the namespace and
    /// keep it; they are then served on the current tokio runtime, in the
    /// daemon's namespace. Idempotent: serving a sandbox again only updates
    /// its networks (or moves it if its namespace changed).
    pub async fn serve_sandbox(
        self: &Arc<Self>,
        sandbox_id: &str,
        netns: &str,
        networks: Vec<SandboxNetwork>,
    ) -> Result<(), DnsError> {
        let _serial = self.lifecycle.lock().await;
        let moved = {
            let mut map = self.lock_sandboxes();
            match map.get(sandbox_id) {
                Some(s) if s.netns == netns => {
                    set_networks(&s.networks, networks);
                    return Ok(());
                }
                Some(_) => map.remove(sandbox_id),
                None => None,
            }
        };
        if let Some(old) = moved {
            shutdown(sandbox_id, old).await;
        }

        let net_err = |source| DnsError::Net {
            sandbox: sandbox_id.to_string(),
            source,
        };
        ensure_loopback(netns).await.map_err(net_err)?;
        let bind_err = |proto, source| DnsError::Bind {
            proto,
            ns: netns.to_string(),
            sandbox: sandbox_id.to_string(),
            source,
        };
        let (udp, tcp) = netns::run_in(netns, bind_sockets)
            .map_err(net_err)?
            .map_err(|(proto, e)| bind_err(proto, e))?;
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(|e| bind_err("udp", e))?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(|e| bind_err("tcp", e))?;

        let networks: NetworksSlot = Arc::new(RwLock::new(Arc::from(networks)));
        let handler = SandboxHandler {
            sandbox_id: sandbox_id.to_string(),
            shared: self.shared.clone(),
            networks: networks.clone(),
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT_FORWARDS)),
        };
        // TCP is not hickory's: its listener takes every connection, with
        // no cap on how many are open at once.
        let mut tcp_task = tokio::task::JoinSet::new();
        tcp_task.spawn(serve_tcp(tcp, handler.clone()));
        let mut server = Server::new(handler);
        server.register_socket(udp);
        info!(
            sandbox = sandbox_id,
            netns, "serving DNS at {RESOLVER_IP}:53"
        );
        self.lock_sandboxes().insert(
            sandbox_id.to_string(),
            Served {
                netns: netns.to_string(),
                networks,
                server,
                tcp: tcp_task,
            },
        );
        Ok(())
    }

    /// Changes the networks whose names a served sandbox sees; unknown
    /// sandboxes are ignored (the next `serve_sandbox` brings them).
    pub fn update_sandbox_networks(&self, sandbox_id: &str, networks: Vec<SandboxNetwork>) {
        if let Some(s) = self.lock_sandboxes().get(sandbox_id) {
            set_networks(&s.networks, networks);
        }
    }

    /// Stops serving a sandbox and closes its sockets. The 127.0.0.11
    /// address is left on the sandbox's `lo`: it is harmless, and the
    /// namespace is usually about to go.
    pub async fn stop_sandbox(&self, sandbox_id: &str) {
        let _serial = self.lifecycle.lock().await;
        let served = self.lock_sandboxes().remove(sandbox_id);
        if let Some(s) = served {
            shutdown(sandbox_id, s).await;
        }
    }

    /// Sandbox ids currently served, sorted (for reconcile-by-diff).
    pub fn served(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock_sandboxes().keys().cloned().collect();
        ids.sort();
        ids
    }

    fn lock_sandboxes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Served>> {
        self.sandboxes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn set_networks(slot: &RwLock<Arc<[SandboxNetwork]>>, networks: Vec<SandboxNetwork>) {
    *slot.write().unwrap_or_else(|p| p.into_inner()) = Arc::from(networks);
}

async fn shutdown(sandbox_id: &str, mut served: Served) {
    served.tcp.shutdown().await;
    match timeout(STOP_GRACE, served.server.shutdown_gracefully()).await {
        Ok(Ok(())) => info!(sandbox = sandbox_id, "stopped DNS"),
        Ok(Err(e)) => warn!(sandbox = sandbox_id, error = %e, "DNS server ended with an error"),
        // Dropping the server aborts whatever is left.
        Err(_) => warn!(
            sandbox = sandbox_id,
            "DNS server did not stop in time; aborted"
        ),
    }
}

/// Makes 127.0.0.11 reachable in `ns`: `lo` up (a fresh namespace has it
/// down, and then nothing on loopback answers) and the address on it.
/// 127.0.0.0/8 is routed to `lo` already, so binding would work without the
/// address; adding it makes the resolver visible in `ip addr` and keeps it
/// working if the sandbox narrows its loopback.
async fn ensure_loopback(ns: &str) -> Result<(), NetError> {
    let nl = crate::link::Netlink::open(Some(ns)).await?;
    nl.set_up("lo").await?;
    if nl
        .addresses_v4("lo")
        .await?
        .iter()
        .any(|(ip, _)| *ip == RESOLVER_IP)
    {
        return Ok(());
    }
    match nl.add_address_v4("lo", RESOLVER_IP, 32).await {
        Err(e) if e.errno() == Some(Errno::EEXIST) => Ok(()),
        r => r,
    }
}

/// Runs inside the sandbox's namespace: binds the resolver's sockets there.
fn bind_sockets() -> Result<(std::net::UdpSocket, std::net::TcpListener), (&'static str, io::Error)>
{
    let addr = SocketAddr::from((RESOLVER_IP, 53));
    let udp = std::net::UdpSocket::bind(addr).map_err(|e| ("udp", e))?;
    udp.set_nonblocking(true).map_err(|e| ("udp", e))?;
    let tcp = std::net::TcpListener::bind(addr).map_err(|e| ("tcp", e))?;
    tcp.set_nonblocking(true).map_err(|e| ("tcp", e))?;
    Ok((udp, tcp))
}

// ---------------------------------------------------------------------------
// TCP: our own accept loop, for the per-sandbox caps
// ---------------------------------------------------------------------------

/// Accepts the sandbox's DNS-over-TCP connections and serves at most
/// [`MAX_TCP_CONNECTIONS`] at once. One more is accepted and closed at once:
/// left in the backlog it would still hold kernel memory, and the client
/// would only find out after its own timeout. Runs until aborted; the
/// connections' tasks are in a `JoinSet` it owns, so they end with it.
async fn serve_tcp(listener: tokio::net::TcpListener, handler: SandboxHandler) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = listener.accept().await;
        while conns.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                debug!(sandbox = %handler.sandbox_id, error = %e, "DNS TCP accept failed");
                // Out of descriptors or memory: pause rather than spin. An
                // aborted handshake (the client's doing) costs no pause, so
                // a sandbox cannot slow the accepts down with those.
                if e.raw_os_error().map(Errno::from_raw).is_some_and(|n| {
                    matches!(
                        n,
                        Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM
                    )
                }) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(sandbox = %handler.sandbox_id, %peer, "too many DNS TCP connections; closing the new one");
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        conns.spawn(async move {
            let _slot = slot;
            if let Err(e) = serve_tcp_connection(&handler, stream, peer).await {
                debug!(sandbox = %handler.sandbox_id, %peer, error = %e, "DNS TCP connection failed");
            }
        });
    }
}

/// Serves one TCP connection: each query is answered before the next is
/// read (in order, as RFC 7766 allows), so one connection has at most one
/// query in flight. Ends when the client closes, sends no whole query for
/// [`TCP_IDLE`], or [`TCP_LIFETIME`] is up.
async fn serve_tcp_connection(
    handler: &SandboxHandler,
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
) -> io::Result<()> {
    let end = Instant::now() + TCP_LIFETIME;
    loop {
        let deadline = (Instant::now() + TCP_IDLE).min(end);
        let query = match timeout_at(deadline, read_tcp_message(&mut stream)).await {
            Ok(Ok(Some(query))) => query,
            // Closed by the client, idle, or old enough.
            Ok(Ok(None)) | Err(_) => return Ok(()),
            Ok(Err(e)) => return Err(e),
        };
        if let Some(reply) = handler.answer_tcp(query, peer).await {
            let len = u16::try_from(reply.len())
                .map_err(|_| io::Error::other("DNS reply too long for TCP"))?;
            let mut out = Vec::with_capacity(reply.len() + 2);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&reply);
            // A client that does not read its answers is as idle as one
            // that does not ask.
            timeout(TCP_IDLE, stream.write_all(&out))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        }
        if Instant::now() >= end {
            return Ok(());
        }
    }
}

/// Reads one length-prefixed DNS message; `None` if the client closed the
/// connection between messages.
async fn read_tcp_message(stream: &mut tokio::net::TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

/// Collects the response to one TCP query, encoded, for the connection to
/// write (hickory's own handle only writes to its own TCP streams).
#[derive(Clone, Default)]
struct TcpReply(Arc<Mutex<Option<Vec<u8>>>>);

impl TcpReply {
    fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[async_trait::async_trait]
impl ResponseHandler for TcpReply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, HickoryNetError> {
        let (id, op_code) = (response.metadata().id, response.metadata().op_code);
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(u16::MAX);
        match response.destructive_emit(&mut encoder) {
            Ok(info) => {
                *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(bytes);
                Ok(info)
            }
            Err(e) => {
                // The client still gets an answer: SERVFAIL.
                let servfail = Message::error_msg(id, op_code, ResponseCode::ServFail).to_vec()?;
                *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(servfail);
                Err(e.into())
            }
        }
    }
}

impl SandboxHandler {
    /// Answers one raw query that came over TCP: the encoded response, or
    /// `None` for what deserves none (too short for a header, a response).
    async fn answer_tcp(&self, raw: Vec<u8>, peer: SocketAddr) -> Option<Vec<u8>> {
        let header = Header::read(&mut BinDecoder::new(&raw)).ok()?;
        let request = match Request::from_bytes(raw, peer, Protocol::Tcp) {
            Ok(r) => r,
            Err(e) => {
                debug!(sandbox = %self.sandbox_id, error = %e, "malformed DNS query over TCP");
                return Message::error_msg(
                    header.metadata.id,
                    header.metadata.op_code,
                    ResponseCode::FormErr,
                )
                .to_vec()
                .ok();
            }
        };
        let reply = TcpReply::default();
        self.handle_request::<_, TokioTime>(&request, reply.clone())
            .await;
        reply.take()
    }
}

// ---------------------------------------------------------------------------
// Wire side: one handler per sandbox
// ---------------------------------------------------------------------------

/// Answers the queries of one sandbox, over UDP (through hickory) and TCP
/// (our own accept loop); both share its state, so the caps are per
/// sandbox whatever the transport.
#[derive(Clone)]
struct SandboxHandler {
    sandbox_id: String,
    shared: Arc<Shared>,
    networks: NetworksSlot,
    /// Caps this sandbox's forwarded queries in flight, UDP and TCP
    /// together ([`MAX_INFLIGHT_FORWARDS`]).
    inflight: Arc<Semaphore>,
}

/// The networks of a served sandbox, read on every query so attach/detach
/// takes effect without reopening sockets.
type NetworksSlot = Arc<RwLock<Arc<[SandboxNetwork]>>>;

/// The response's OPT record: present when the query had one, advertising
/// the client's own payload size so hickory truncates UDP answers to what
/// the client can take.
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|req| {
        let mut e = Edns::new();
        e.set_max_payload(req.max_payload().max(512));
        e.set_dnssec_ok(req.flags().dnssec_ok);
        e
    })
}

/// What a failed send reports to hickory's logging: SERVFAIL.
fn servfail_info(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

impl SandboxHandler {
    async fn send_error<R: ResponseHandler>(
        &self,
        request: &Request,
        mut handle: R,
        code: ResponseCode,
    ) -> ResponseInfo {
        let edns = response_edns(request);
        let mut response = MessageResponseBuilder::new(&request.queries, edns.as_ref())
            .error_msg(&request.metadata, code);
        response.metadata_mut().recursion_available = true;
        match handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                debug!(sandbox = %self.sandbox_id, error = %e, "cannot send DNS response");
                servfail_info(request)
            }
        }
    }

    async fn send_records<R: ResponseHandler>(
        &self,
        request: &Request,
        mut handle: R,
        metadata: Metadata,
        answers: &[Record],
        authorities: &[Record],
        additionals: &[Record],
    ) -> ResponseInfo {
        let edns = response_edns(request);
        let response = MessageResponseBuilder::new(&request.queries, edns.as_ref()).build(
            metadata,
            answers.iter(),
            authorities.iter(),
            std::iter::empty(),
            additionals.iter(),
        );
        match handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                debug!(sandbox = %self.sandbox_id, error = %e, "cannot send DNS response");
                servfail_info(request)
            }
        }
    }

    /// Relays the query upstream and the reply back, or SERVFAIL.
    async fn forward<R: ResponseHandler>(&self, request: &Request, handle: R) -> ResponseInfo {
        let Ok(_permit) = self.inflight.clone().try_acquire_owned() else {
            debug!(sandbox = %self.sandbox_id, "too many forwarded queries in flight");
            return self
                .send_error(request, handle, ResponseCode::ServFail)
                .await;
        };
        let tcp = request.protocol() == Protocol::Tcp;
        let raw = match self.shared.forwarder.forward(request.as_slice(), tcp).await {
            Ok(raw) => raw,
            Err(e) => {
                debug!(sandbox = %self.sandbox_id, error = %e, "forwarding failed");
                return self
                    .send_error(request, handle, ResponseCode::ServFail)
                    .await;
            }
        };
        let reply = match Message::from_vec(&raw) {
            Ok(m) => m,
            Err(e) => {
                debug!(sandbox = %self.sandbox_id, error = %e, "malformed upstream reply");
                return self
                    .send_error(request, handle, ResponseCode::ServFail)
                    .await;
            }
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = reply.metadata.response_code;
        metadata.authoritative = reply.metadata.authoritative;
        metadata.recursion_available = reply.metadata.recursion_available;
        metadata.authentic_data = reply.metadata.authentic_data;
        metadata.truncation = reply.metadata.truncation;
        self.send_records(
            request,
            handle,
            metadata,
            &reply.answers,
            &reply.authorities,
            &reply.additionals,
        )
        .await
    }
}

#[async_trait::async_trait]
impl RequestHandler for SandboxHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        handle: R,
    ) -> ResponseInfo {
        // hickory has already dropped what has no header and answered
        // FORMERR to what does not parse; what is left may still be odd.
        if request.metadata.message_type != MessageType::Query {
            return servfail_info(request);
        }
        if request.metadata.op_code != OpCode::Query {
            return self.send_error(request, handle, ResponseCode::NotImp).await;
        }
        let Ok(info) = request.request_info() else {
            // Zero or several questions.
            return self
                .send_error(request, handle, ResponseCode::FormErr)
                .await;
        };
        let qtype = info.query.query_type();
        let qname = info.query.name().to_string();
        let decision = {
            let networks = self
                .networks
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if info.query.query_class() == DNSClass::IN {
                let records = self
                    .shared
                    .records
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                answer(&records, &networks, &qname, qtype)
            } else {
                // CHAOS, HESIOD...: never ours.
                forward_or_refuse(&networks)
            }
        };
        debug!(sandbox = %self.sandbox_id, %qname, %qtype, ?decision, "DNS query");

        let owner: Name = info.query.original().name().clone();
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.recursion_available = true;
        let answers: Vec<Record> = match decision {
            Answer::Forward => return self.forward(request, handle).await,
            Answer::Refused => {
                return self
                    .send_error(request, handle, ResponseCode::Refused)
                    .await;
            }
            Answer::NxDomain => {
                metadata.response_code = ResponseCode::NXDomain;
                Vec::new()
            }
            Answer::NoData => Vec::new(),
            Answer::Records(ips) => ips
                .into_iter()
                .map(|ip| Record::from_rdata(owner.clone(), TTL, RData::A(A(ip))))
                .collect(),
            Answer::Ptr(target) => match Name::from_ascii(&target) {
                Ok(target) => vec![Record::from_rdata(owner, TTL, RData::PTR(PTR(target)))],
                Err(e) => {
                    // A record name that is not a valid DNS name: our data,
                    // not the client's fault.
                    warn!(%target, error = %e, "PTR target is not a valid DNS name");
                    return self
                        .send_error(request, handle, ResponseCode::ServFail)
                        .await;
                }
            },
        };
        self.send_records(request, handle, metadata, &answers, &[], &[])
            .await
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
    fn resolv_conf_upstreams() {
        let text = "# generated\nnameserver 10.0.0.2\nnameserver 127.0.0.53 # local\n\
                    nameserver ::1\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\n\
                    nameserver\nsearch example.com\n";
        assert_eq!(
            upstreams_from_resolv_conf(text),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().expect("addr"),
                "127.0.0.53:53".parse().expect("addr"),
                "[::1]:53".parse().expect("addr"),
            ]
        );
    }

    #[test]
    fn resolv_conf_for_sandboxes() {
        let host = "nameserver 10.0.0.2\nsearch corp.example lab\n\
                    options ndots:3 timeout:2 edns0\n;comment\n";
        assert_eq!(
            sandbox_resolv_conf(host),
            "nameserver 127.0.0.11\nsearch corp.example lab\n\
             options timeout:2 edns0\noptions ndots:0\n"
        );
        assert_eq!(
            sandbox_resolv_conf(""),
            "nameserver 127.0.0.11\noptions ndots:0\n"
        );
    }
}
