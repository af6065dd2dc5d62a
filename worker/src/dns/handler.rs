//! The wire side of one sandbox's resolver: turns a parsed request into
//! [`answer`]'s decision and that decision into a response, or relays the
//! query upstream. Shared by UDP (hickory's server) and TCP (our loop).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use hickory_proto::op::MessageType;
use hickory_proto::op::{Edns, Header, HeaderCounts, Message, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::forward::Forwarder;
use super::records::{Answer, Records, SandboxNetwork, SandboxTable, forward_or_refuse};

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

/// State shared by every sandbox's handler.
pub(super) struct Shared {
    /// Swapped whole by `set_records`; handlers clone the `Arc` per query so
    /// an update never blocks or tears a lookup.
    pub(super) records: RwLock<Arc<Records>>,
    /// Bumped after every change of the records or of any sandbox's
    /// networks; a sandbox's table built at another generation is stale.
    pub(super) generation: AtomicU64,
    pub(super) forwarder: Forwarder,
}

impl Shared {
    /// Marks every sandbox's table stale (after the change is stored).
    pub(super) fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// A sandbox's [`SandboxTable`] with the generation it was built at.
pub(super) type Table = (u64, Arc<SandboxTable>);

/// Answers the queries of one sandbox, over UDP (through hickory) and TCP
/// (our own accept loop); both share its state, so the caps are per
/// sandbox whatever the transport.
#[derive(Clone)]
pub(super) struct SandboxHandler {
    pub(super) sandbox_id: String,
    pub(super) shared: Arc<Shared>,
    pub(super) networks: NetworksSlot,
    /// Caps this sandbox's forwarded queries in flight, UDP and TCP
    /// together ([`MAX_INFLIGHT_FORWARDS`]).
    pub(super) inflight: Arc<Semaphore>,
    /// The sandbox's table, built on the first query after a change.
    pub(super) table: Arc<Mutex<Option<Table>>>,
}

/// The networks of a served sandbox, read on every query so attach/detach
/// takes effect without reopening sockets.
pub(super) type NetworksSlot = Arc<RwLock<Arc<[SandboxNetwork]>>>;

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
    /// The sandbox's current table: the cached one if nothing changed since
    /// it was built, else a new one. The generation is read before the
    /// records and networks, so a change racing the build only makes the
    /// next query build again.
    pub(super) fn table(&self) -> Table {
        let generation = self.shared.generation.load(Ordering::Acquire);
        let mut cache = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cache.as_ref().filter(|(g, _)| *g == generation) {
            return t.clone();
        }
        let records = self
            .shared
            .records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let networks = self
            .networks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let t = (
            generation,
            Arc::new(SandboxTable::build(&records, &networks)),
        );
        *cache = Some(t.clone());
        t
    }

    /// Refreshes a table held by a loop if it is stale: one atomic load
    /// when nothing changed.
    pub(super) fn refresh(&self, t: &mut Table) {
        if self.shared.generation.load(Ordering::Acquire) != t.0 {
            *t = self.table();
        }
    }

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
        // `answer_raw` has already dropped what has no header and answered
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
        let decision = if info.query.query_class() == DNSClass::IN {
            let name = qname.trim_end_matches('.').to_ascii_lowercase();
            self.table()
                .1
                .lookup(name.as_bytes(), u16::from(qtype))
                .to_answer()
        } else {
            // CHAOS, HESIOD...: never ours.
            let networks = self
                .networks
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            forward_or_refuse(&networks)
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
