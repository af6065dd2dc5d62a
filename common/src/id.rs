//! Node and cluster IDs.
//!
//! IDs have Docker Swarm's shape — 25 lowercase base-36 characters holding 128
//! random bits — so they look familiar in `mesh node ls` and are valid DNS
//! labels (node certificates carry the node ID as a DNS name).

use sha2::{Digest, Sha256};

/// Length of an ID: 128 bits need at most 25 base-36 digits.
pub const ID_LEN: usize = 25;

const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// A fresh random ID: 128 random bits in base 36, left-padded with `0` to 25
/// characters.
pub fn new_id() -> String {
    base36(&rand::random::<u128>().to_be_bytes(), ID_LEN)
}

/// An ID derived from `parts`: the same on every manager, so objects made
/// inside the Raft state machine (tasks) get IDs without randomness.
pub fn derived_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    let digest = h.finalize();
    base36(&digest[..16], ID_LEN)
}

/// The openraft node ID for a mesh node ID.
///
/// Raft wants a `u64`; deriving it from the node ID (first 8 bytes of its
/// SHA-256) lets every manager compute it without a lookup. 0 is mapped to 1
/// because some Raft code treats 0 as "no node".
pub fn raft_id(node_id: &str) -> u64 {
    let digest = Sha256::digest(node_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    match u64::from_be_bytes(first) {
        0 => 1,
        n => n,
    }
}

/// Whether `s` has the shape of an ID made by [`new_id`] or [`derived_id`]:
/// exactly 25 lowercase base-36 characters. Nodes check every ID a manager
/// sends before it names a file, a namespace or a link, so none can hold
/// `/`, `..`, NUL or anything else a path or interface name would misread.
pub fn is_valid_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(is_base36_digit)
}

/// Lowercase base-36 digit (what [`base36`] emits).
pub(crate) fn is_base36_digit(b: u8) -> bool {
    b.is_ascii_digit() || b.is_ascii_lowercase()
}

/// Renders a big-endian unsigned integer of any size in lowercase base 36,
/// left-padded with `0` to at least `width` characters.
///
/// Shared with `token` (the CA digest is a 256-bit number); schoolbook long
/// division is plenty for 32 bytes.
pub(crate) fn base36(big_endian: &[u8], width: usize) -> String {
    let mut number: Vec<u8> = big_endian.to_vec();
    let mut digits: Vec<u8> = Vec::with_capacity(width);
    while number.iter().any(|&b| b != 0) {
        let mut remainder: u32 = 0;
        for byte in number.iter_mut() {
            let acc = (remainder << 8) | u32::from(*byte);
            // acc < 36 * 256, so the quotient fits in a byte.
            *byte = (acc / 36) as u8;
            remainder = acc % 36;
        }
        digits.push(DIGITS[remainder as usize]);
    }
    while digits.len() < width {
        digits.push(b'0');
    }
    digits.reverse();
    digits.into_iter().map(char::from).collect()
}

/// Docker's rule for names of networks and sandboxes: a letter or digit,
/// then letters, digits, `_`, `.` or `-`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Longest name of a network, service or sandbox: each fits one DNS label.
pub const MAX_NAME: usize = 63;

/// The refusal for a malformed network name, local or cluster-wide alike.
pub fn check_network_name(name: &str) -> Result<(), crate::refusal::Refusal> {
    if name.len() > MAX_NAME && valid_name(name) {
        return Err(crate::refusal::Refusal::invalid(format!(
            "invalid network name {}: it is {} characters long: use at most {MAX_NAME}",
            crate::input::shorten(name),
            name.len()
        )));
    }
    if valid_name(name) {
        return Ok(());
    }
    Err(crate::refusal::Refusal::invalid(format!(
        "invalid network name {:?}: use letters, digits, '_', '.' and '-', starting with a letter or digit",
        crate::input::shorten(name)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_swarm_shape() {
        for _ in 0..200 {
            let id = new_id();
            assert_eq!(id.len(), ID_LEN, "{id}");
            assert!(is_valid_id(&id), "{id}");
        }
        assert_ne!(new_id(), new_id());
    }

    #[test]
    fn base36_matches_known_values() {
        assert_eq!(base36(&[], 3), "000");
        assert_eq!(base36(&[0, 0], 1), "0");
        assert_eq!(base36(&[35], 0), "z");
        assert_eq!(base36(&[36], 0), "10");
        assert_eq!(base36(&[0x01, 0x00], 0), "74"); // 256 = 7*36 + 4
        assert_eq!(
            base36(&u128::MAX.to_be_bytes(), 0),
            "f5lxx1zz5pnorynqglhzmsp33"
        );
        assert_eq!(base36(&u128::MAX.to_be_bytes(), 0).len(), ID_LEN);
        assert_eq!(base36(&[0xff; 32], 0).len(), 50);
    }

    #[test]
    fn raft_id_is_stable_and_nonzero() {
        let id = new_id();
        assert_eq!(raft_id(&id), raft_id(&id));
        assert_ne!(raft_id(&id), 0);
        assert_ne!(raft_id("a"), raft_id("b"));
        // First 8 bytes of SHA-256("abc") = ba7816bf8f01cfea.
        assert_eq!(raft_id("abc"), 0xba78_16bf_8f01_cfea);
    }

    #[test]
    fn invalid_ids_are_rejected() {
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("ABCDEFGHIJKLMNOPQRSTUVWXY"));
        assert!(!is_valid_id("abc"));
        let good = new_id();
        assert!(is_valid_id(&derived_id(&["svc", "1"])));
        // One character short or long.
        assert!(!is_valid_id(&good[1..]));
        assert!(!is_valid_id(&format!("{good}0")));
        // Path and name tricks of the right length.
        for bad in [
            "../../../../../../etc/x00",
            "aaaaaaaaaaaa/aaaaaaaaaaaa",
            "aaaaaaaaaaaa.aaaaaaaaaaaa",
            "aaaaaaaaaaaa-aaaaaaaaaaaa",
            "aaaaaaaaaaaa aaaaaaaaaaaa",
            "aaaaaaaaaaaa\0aaaaaaaaaaaa",
            "aaaaaaaaaaaa\\aaaaaaaaaaaa",
            "aaaaaaaaaaaaaaaaaaaaaaaa\n",
            "aaaaaaaaaaaaaaaaaaaaaaaaA",
        ] {
            assert_eq!(bad.len(), ID_LEN, "{bad:?}");
            assert!(!is_valid_id(bad), "{bad:?}");
        }
        // Multi-byte characters: 25 bytes, fewer characters.
        let wide = format!("{}é", &good[..23]);
        assert_eq!(wide.len(), ID_LEN);
        assert!(!is_valid_id(&wide));
    }
}
