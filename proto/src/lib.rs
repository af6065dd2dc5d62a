//! The wire contract between the CLI, daemons and managers, generated from
//! `mesh.proto`, and the one digest both ends of it must compute alike.

#[allow(clippy::all, clippy::unwrap_used)]
mod generated {
    tonic::include_proto!("mesh");
}
pub use generated::*;

/// Digest of what a node view asks of the kernel (its generation aside).
/// A node reports it with the generation it applied; a manager compares it
/// with the digest of the view it would send now, so "applied" means the
/// same content, not merely a newer number.
pub fn view_digest(view: &NodeView) -> u64 {
    use prost::Message;
    use sha2::{Digest, Sha256};
    let content = NodeView {
        generation: 0,
        ..view.clone()
    };
    let d = Sha256::digest(content.encode_to_vec());
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first)
}

/// What a join proof covers: the request with its own proof left out, so
/// the proof also vouches for the CSR and addresses it travels with.
pub fn join_request_content(r: &NodeJoinRequest) -> Vec<u8> {
    use prost::Message;
    NodeJoinRequest {
        proof: Vec::new(),
        ..r.clone()
    }
    .encode_to_vec()
}

/// [`join_request_content`] for the manager's reply.
pub fn join_reply_content(r: &NodeJoinResponse) -> Vec<u8> {
    use prost::Message;
    NodeJoinResponse {
        proof: Vec::new(),
        ..r.clone()
    }
    .encode_to_vec()
}

/// Metadata of a follower's "not the leader" reply to a heartbeat: the
/// current managers as `NODE_ID=KEY_FINGERPRINT,...`, so a node that missed
/// a manager's arrival learns it before it is sent to that manager.
pub const MANAGERS_HEADER: &str = "mesh-managers";
