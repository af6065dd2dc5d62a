//! One stable hash for names derived from other names (veth, VXLAN and
//! macvlan device names): FNV-1a, whose output never changes between Rust
//! releases or builds as std's hasher may, so a restarted or upgraded agent
//! finds the devices it made before.

/// FNV-1a over `parts`, each followed by a separator byte so that
/// ("ab", "c") and ("a", "bc") differ; 32 bits.
pub fn fnv1a32(parts: &[&[u8]]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for part in parts {
        for b in part.iter().chain(std::iter::once(&0xff)) {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// The same over 64 bits, cut to the low 48 (12 hex digits: what fits an
/// interface name after a 3-letter prefix).
pub fn fnv1a48(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h & 0xffff_ffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Outputs of the hashes the names were derived with before they were
    /// merged here: a change would rename every device on upgrade.
    #[test]
    fn outputs_are_pinned() {
        // veth, temporary VXLAN, bridge port and macvlan names.
        let veth = fnv1a32(&[&4097u32.to_be_bytes(), b"mesh1-sb-abc", b"eth0"]);
        assert_eq!(format!("{veth:08x}"), "7d08eac1");
        assert_eq!(fnv1a32(&[b"mesh1"]) & 0xf_ffff, 0x5e198);
        let port = fnv1a48(&[b"mbr-0123456789a", b"mesh1-sb-abc", b"eth0"]);
        assert_eq!(format!("{port:012x}"), "cff1ce4e9cde");
        let mv = fnv1a48(&[b"macvlan", b"mesh1-sb-abc", b"eth0"]);
        assert_eq!(format!("{mv:012x}"), "889422679a8c");
        assert_ne!(fnv1a32(&[b"ab", b"c"]), fnv1a32(&[b"a", b"bc"]));
    }
}
