//! Answering one raw query outside hickory's server loops: our UDP and TCP
//! loops hand the bytes here and send what comes back themselves, so no
//! answer waits in (or is dropped from) a queue shared with other queries.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Header, Message, ResponseCode};
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder};
use hickory_server::net::NetError as HickoryNetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use tracing::debug;

use super::handler::SandboxHandler;

/// The largest answer over UDP to a query without EDNS (RFC 1035 4.2.1).
const PLAIN_UDP_MAX: u16 = 512;

/// Collects the encoded response to one query, cut to what the transport
/// allows (hickory sets TC when answers do not fit).
#[derive(Clone)]
struct Reply {
    bytes: Arc<Mutex<Option<Vec<u8>>>>,
    max_size: u16,
}

impl Reply {
    fn new(max_size: u16) -> Self {
        Reply {
            bytes: Arc::default(),
            max_size,
        }
    }

    fn put(&self, bytes: Vec<u8>) {
        *self.bytes.lock().unwrap_or_else(|p| p.into_inner()) = Some(bytes);
    }

    fn take(&self) -> Option<Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Reply {
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
        encoder.set_max_size(self.max_size);
        match response.destructive_emit(&mut encoder) {
            Ok(info) => {
                self.put(bytes);
                Ok(info)
            }
            Err(e) => {
                // The client still gets an answer: SERVFAIL.
                let servfail = Message::error_msg(id, op_code, ResponseCode::ServFail).to_vec()?;
                self.put(servfail);
                Err(e.into())
            }
        }
    }
}

/// How large an answer to `request` may be on its transport.
fn max_size(request: &Request, protocol: Protocol) -> u16 {
    match protocol {
        Protocol::Udp => request
            .edns
            .as_ref()
            .map_or(PLAIN_UDP_MAX, |e| e.max_payload().max(PLAIN_UDP_MAX)),
        _ => u16::MAX,
    }
}

impl SandboxHandler {
    /// Answers one raw query: the encoded response, or `None` for what
    /// deserves none (too short for a header, a response).
    pub(super) async fn answer_raw(
        &self,
        raw: Vec<u8>,
        peer: SocketAddr,
        protocol: Protocol,
    ) -> Option<Vec<u8>> {
        let header = Header::read(&mut BinDecoder::new(&raw)).ok()?;
        let request = match Request::from_bytes(raw, peer, protocol) {
            Ok(r) => r,
            Err(e) => {
                debug!(sandbox = %self.sandbox_id, error = %e, "malformed DNS query");
                return Message::error_msg(
                    header.metadata.id,
                    header.metadata.op_code,
                    ResponseCode::FormErr,
                )
                .to_vec()
                .ok();
            }
        };
        let reply = Reply::new(max_size(&request, protocol));
        self.handle_request::<_, TokioTime>(&request, reply.clone())
            .await;
        reply.take()
    }
}
