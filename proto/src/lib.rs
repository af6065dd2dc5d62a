//! The wire contract between the CLI, daemons and managers, generated from
//! `mesh.proto`, and the one digest both ends of it must compute alike.

#[allow(clippy::all, clippy::unwrap_used)]
mod generated {
    tonic::include_proto!("mesh");
}
pub use generated::*;
/// The encoding the messages use, for the crates that measure them.
pub use prost;

/// Digest of what a node view asks of the kernel (its generation aside).
/// A node reports it with the generation it applied; a manager compares it
/// with the digest of the view it would send now, so "applied" means the
/// same content, not merely a newer number.
pub fn view_digest(view: &NodeView) -> u64 {
    use prost::Message;
    use sha2::{Digest, Sha256};
    // The encoding with generation 0, without copying the view (300 tasks'
    // peers and backends): prost writes fields in number order, and
    // `generation` is field 1, a varint that is left out when 0; so the
    // encoding of the view less its first field is that of the view with
    // generation 0.
    let mut bytes = view.encode_to_vec();
    if view.generation != 0 {
        let field =
            prost::encoding::key_len(1) + prost::encoding::encoded_len_varint(view.generation);
        bytes.drain(..field);
    }
    let d = Sha256::digest(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first)
}

/// What changed from view `a` to view `b` of one node, as the Assignments
/// stream sends it; `None` when a delta cannot say it (a network or task id
/// listed twice), so the whole view goes instead. Applying it on `a` gives
/// `b` exactly (`mesh_worker::views::apply`), order included, which the
/// digest the update carries lets the node check.
pub fn view_delta(a: &NodeView, b: &NodeView) -> Option<ViewDelta> {
    let (networks, removed_networks, network_order) =
        list_delta(&a.networks, &b.networks, |n| n.id.as_str())?;
    let (tasks, removed_tasks, task_order) = list_delta(&a.tasks, &b.tasks, |t| t.id.as_str())?;
    Some(ViewDelta {
        networks,
        removed_networks,
        network_order,
        tasks,
        removed_tasks,
        task_order,
        data_path_port: (a.data_path_port != b.data_path_port).then_some(b.data_path_port),
        ingress: (a.ingress != b.ingress).then(|| IngressChange {
            view: b.ingress.clone(),
        }),
        encryption: (a.encryption != b.encryption).then(|| EncryptionChange {
            view: b.encryption.clone(),
        }),
    })
}

/// Whether a delta changes nothing.
pub fn delta_is_empty(d: &ViewDelta) -> bool {
    d.networks.is_empty()
        && d.removed_networks.is_empty()
        && d.network_order.is_empty()
        && d.tasks.is_empty()
        && d.removed_tasks.is_empty()
        && d.task_order.is_empty()
        && d.data_path_port.is_none()
        && d.ingress.is_none()
        && d.encryption.is_none()
}

/// One keyed list's part of a delta: the items of `b` that are new or
/// differ, the ids of `a` gone from `b`, and `b`'s ids when replacing in
/// place and appending the new ones would not give `b`'s order.
fn list_delta<T: Clone + PartialEq>(
    a: &[T],
    b: &[T],
    id: impl Fn(&T) -> &str,
) -> Option<(Vec<T>, Vec<String>, Vec<String>)> {
    use std::collections::HashMap;
    let old: HashMap<&str, &T> = a.iter().map(|t| (id(t), t)).collect();
    let new: HashMap<&str, &T> = b.iter().map(|t| (id(t), t)).collect();
    if old.len() != a.len() || new.len() != b.len() {
        return None;
    }
    let set: Vec<T> = b
        .iter()
        .filter(|t| old.get(id(t)).is_none_or(|o| *o != *t))
        .cloned()
        .collect();
    let removed: Vec<String> = a
        .iter()
        .map(&id)
        .filter(|i| !new.contains_key(i))
        .map(str::to_string)
        .collect();
    let derived = a
        .iter()
        .map(&id)
        .filter(|i| new.contains_key(i))
        .chain(b.iter().map(&id).filter(|i| !old.contains_key(i)));
    let order = if derived.eq(b.iter().map(&id)) {
        Vec::new()
    } else {
        b.iter().map(|t| id(t).to_string()).collect()
    };
    Some((set, removed, order))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest is that of the view with generation 0, whatever the
    /// generation's size: the encoding is cut, not the view copied.
    #[test]
    fn the_digest_leaves_the_generation_out() {
        use prost::Message;
        use sha2::{Digest, Sha256};
        let view = NodeView {
            generation: 0,
            data_path_port: 4789,
            networks: vec![NetworkAssignment {
                id: "n1".into(),
                name: "web".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let d = Sha256::digest(view.encode_to_vec());
        let want = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
        for generation in [0, 1, 127, 128, 300, 1 << 40, u64::MAX] {
            let v = NodeView {
                generation,
                ..view.clone()
            };
            assert_eq!(view_digest(&v), want, "generation {generation}");
        }
        let other = NodeView {
            data_path_port: 4790,
            ..view
        };
        assert_ne!(view_digest(&other), want);
    }
}
