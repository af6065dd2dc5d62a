//! The fast path for the common query: one question, class IN, at most an
//! EDNS OPT record, for a name the sandbox's [`SandboxTable`] answers
//! itself. The question is parsed in place, the name lowercased into a
//! stack buffer and looked up by its bytes, and the answer written into a
//! buffer the UDP loop reuses: no allocation, no task, no hickory. The
//! profile of the hickory path (per query: a task, a `Vec` for the query,
//! hickory's `Message` and encoder, records built and dropped) showed
//! malloc/free and task wake-ups taking about a third of the daemon's time.
//!
//! Anything else (forwarding, REFUSED, odd headers, answers too large for
//! the client) returns `false` and goes to the hickory path, which stays
//! the reference for every case the fast path does not take.

use super::handler::TTL;
use super::records::{Lookup, SandboxTable};

/// The largest answer over UDP without EDNS (RFC 1035 4.2.1).
const PLAIN_UDP_MAX: usize = 512;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The EDNS of a query: the client's payload size and the DO bit.
struct Edns {
    payload: u16,
    dnssec_ok: bool,
}

/// Writes into `out` the answer to `query` from `table` and returns `true`,
/// or returns `false` for the hickory path to decide.
pub(super) fn answer(table: &SandboxTable, query: &[u8], out: &mut Vec<u8>) -> bool {
    answer_inner(table, query, out).is_some()
}

fn answer_inner(table: &SandboxTable, q: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let flags = u16_at(q, 2)?;
    // A query (QR 0), opcode QUERY, one question, nothing else but an OPT.
    if flags & 0xf800 != 0 || u16_at(q, 4)? != 1 || u16_at(q, 6)? != 0 || u16_at(q, 8)? != 0 {
        return None;
    }
    let additional = u16_at(q, 10)?;
    if additional > 1 {
        return None;
    }

    // The question name, lowercased and dotted, into `name`.
    let mut name = [0u8; 256];
    let mut name_len = 0;
    let mut at = 12;
    loop {
        let len = usize::from(*q.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        // Compression pointers (legal but never sent in a question) and
        // labels holding a dot go to hickory.
        if len > 63 {
            return None;
        }
        let label = q.get(at..at + len)?;
        if label.contains(&b'.') || name_len + len + 1 > name.len() {
            return None;
        }
        if name_len > 0 {
            name[name_len] = b'.';
            name_len += 1;
        }
        for (dst, src) in name[name_len..name_len + len].iter_mut().zip(label) {
            *dst = src.to_ascii_lowercase();
        }
        name_len += len;
        at += len;
    }
    let qtype = u16_at(q, at)?;
    if u16_at(q, at + 2)? != CLASS_IN {
        return None;
    }
    let question_end = at + 4;

    let edns = if additional == 1 {
        // Root owner, type OPT, version 0, nothing after it.
        if *q.get(question_end)? != 0 || u16_at(q, question_end + 1)? != TYPE_OPT {
            return None;
        }
        let payload = u16_at(q, question_end + 3)?;
        let (version, eflags) = (*q.get(question_end + 6)?, u16_at(q, question_end + 7)?);
        let rdlen = usize::from(u16_at(q, question_end + 9)?);
        if version != 0 || question_end + 11 + rdlen != q.len() {
            return None;
        }
        Some(Edns {
            payload,
            dnssec_ok: eflags & 0x8000 != 0,
        })
    } else {
        if question_end != q.len() {
            return None;
        }
        None
    };

    let lookup = table.lookup(&name[..name_len], qtype);
    let (rcode, answers): (u8, u16) = match lookup {
        Lookup::Records(ips) => (0, u16::try_from(ips.len()).ok()?),
        Lookup::Ptr(_) => (0, 1),
        Lookup::NoData => (0, 0),
        Lookup::NxDomain => (3, 0),
        Lookup::Forward | Lookup::Refused => return None,
    };

    out.clear();
    out.extend_from_slice(&q[..2]);
    // QR, opcode 0, AA, RD copied; RA, CD copied, the code.
    out.push(0x84 | (q[2] & 0x01));
    out.push(0x80 | (q[3] & 0x10) | rcode);
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&answers.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, u8::from(edns.is_some())]);
    // The question as asked (its case too), which the answers point to.
    out.extend_from_slice(&q[12..question_end]);
    match lookup {
        Lookup::Records(ips) => {
            for ip in ips {
                out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
                out.extend_from_slice(&TTL.to_be_bytes());
                out.extend_from_slice(&[0, 4]);
                out.extend_from_slice(&ip.octets());
            }
        }
        Lookup::Ptr(target) => {
            out.extend_from_slice(&[0xc0, 12, 0, 12, 0, 1]);
            out.extend_from_slice(&TTL.to_be_bytes());
            let rdlen_at = out.len();
            out.extend_from_slice(&[0, 0]);
            for label in target.split('.') {
                let len = u8::try_from(label.len())
                    .ok()
                    .filter(|l| (1..64).contains(l))?;
                out.push(len);
                out.extend_from_slice(label.as_bytes());
            }
            out.push(0);
            let rdlen = u16::try_from(out.len() - rdlen_at - 2).ok()?;
            out[rdlen_at..rdlen_at + 2].copy_from_slice(&rdlen.to_be_bytes());
        }
        _ => {}
    }
    let max = match &edns {
        Some(e) => {
            let payload = e.payload.max(PLAIN_UDP_MAX as u16);
            out.extend_from_slice(&[0, 0, 41]);
            out.extend_from_slice(&payload.to_be_bytes());
            out.extend_from_slice(&[0, 0, if e.dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
            usize::from(payload)
        }
        None => PLAIN_UDP_MAX,
    };
    // Too large: hickory's path truncates properly.
    (out.len() <= max).then_some(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::{Name, RData, RecordType};

    use super::*;
    use crate::dns::records::{NetworkRecords, Records, SandboxNetwork};

    fn table() -> SandboxTable {
        let mut n1 = NetworkRecords::named("n1", "front");
        n1.insert_sandbox("web", Ipv4Addr::new(10, 0, 1, 2));
        n1.insert_alias("svc", Ipv4Addr::new(10, 0, 1, 2));
        n1.insert_alias("svc", Ipv4Addr::new(10, 0, 1, 3));
        let mut n2 = NetworkRecords::named("n2", "back");
        n2.insert_sandbox("db", Ipv4Addr::new(10, 0, 2, 5));
        let mut r = Records::default();
        r.networks.insert("n1".into(), n1);
        r.networks.insert("n2".into(), n2);
        SandboxTable::build(&r.normalized(), &[SandboxNetwork::new("n1", false)])
    }

    fn query(name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(hickory_proto::op::Query::query(
            Name::from_ascii(name).expect("name"),
            qtype,
        ));
        if edns {
            let mut e = hickory_proto::op::Edns::new();
            e.set_max_payload(1232);
            m.set_edns(e);
        }
        m.to_vec().expect("encode")
    }

    fn ask(name: &str, qtype: RecordType, edns: bool) -> Option<Message> {
        let mut out = Vec::new();
        answer(&table(), &query(name, qtype, edns), &mut out)
            .then(|| Message::from_vec(&out).expect("our answer parses"))
    }

    #[test]
    fn a_records_keep_the_question_case_and_id() {
        let m = ask("SVC.", RecordType::A, false).expect("fast");
        assert_eq!(m.metadata.id, 0x1234);
        assert!(m.metadata.authoritative && m.metadata.recursion_available);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.queries[0].name().to_ascii(), "SVC.");
        let ips: Vec<_> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0,
                other => panic!("not A: {other:?}"),
            })
            .collect();
        assert_eq!(
            ips,
            [Ipv4Addr::new(10, 0, 1, 2), Ipv4Addr::new(10, 0, 1, 3)]
        );
        assert!(m.answers.iter().all(|r| r.ttl == TTL));
        assert!(m.edns.is_none());
    }

    #[test]
    fn qualified_names_nxdomain_nodata_and_edns() {
        let m = ask("web.front.", RecordType::A, true).expect("fast");
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(1232));
        let m = ask("db.", RecordType::A, false).expect("fast");
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(m.answers.is_empty());
        let m = ask("web.", RecordType::AAAA, true).expect("fast");
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn ptr_answers() {
        let m = ask("2.1.0.10.in-addr.arpa.", RecordType::PTR, false).expect("fast");
        match &m.answers[0].data {
            RData::PTR(p) => assert_eq!(p.0.to_ascii(), "web."),
            other => panic!("not PTR: {other:?}"),
        }
    }

    #[test]
    fn the_rest_goes_to_hickory() {
        // Forwarded names, other classes, responses, garbage.
        assert!(ask("example.com.", RecordType::A, false).is_none());
        let mut out = Vec::new();
        let mut q = query("web.", RecordType::A, false);
        q[2] |= 0x80;
        assert!(!answer(&table(), &q, &mut out));
        let mut q = query("web.", RecordType::A, false);
        let len = q.len();
        q[len - 1] = 3; // CHAOS
        assert!(!answer(&table(), &q, &mut out));
        assert!(!answer(&table(), &q[..len - 2], &mut out));
        assert!(!answer(&table(), &[0u8; 5], &mut out));
        let mut q = query("web.", RecordType::A, false);
        q.push(0);
        assert!(!answer(&table(), &q, &mut out));
    }

    #[test]
    fn truncated_queries_never_panic_and_are_left_to_hickory() {
        let mut out = Vec::new();
        for q in [
            query("web.front.", RecordType::A, true),
            query("2.1.0.10.in-addr.arpa.", RecordType::PTR, false),
        ] {
            assert!(answer(&table(), &q, &mut out), "the whole query is ours");
            for len in 0..q.len() {
                assert!(!answer(&table(), &q[..len], &mut out), "cut at {len}");
            }
        }
    }

    #[test]
    fn compression_pointers_and_loops_are_refused() {
        let mut out = Vec::new();
        // The question name is a pointer to itself, then one to the header.
        let mut q = query("web.", RecordType::A, false);
        q.splice(12..17, [0xc0, 12]);
        assert!(!answer(&table(), &q, &mut out));
        let mut q = query("web.", RecordType::A, false);
        q.splice(16..17, [0xc0, 0]);
        assert!(!answer(&table(), &q, &mut out));
        // A label length pointing past the end.
        let mut q = query("web.", RecordType::A, false);
        q[12] = 63;
        assert!(!answer(&table(), &q, &mut out));
    }

    #[test]
    fn huge_counts_are_refused() {
        let mut out = Vec::new();
        for at in [4, 6, 8, 10] {
            let mut q = query("web.", RecordType::A, false);
            q[at] = 0xff;
            q[at + 1] = 0xff;
            assert!(!answer(&table(), &q, &mut out), "count at {at}");
        }
        // No question at all.
        let mut q = query("web.", RecordType::A, false);
        q[5] = 0;
        assert!(!answer(&table(), &q, &mut out));
    }

    #[test]
    fn names_longer_than_dns_allows_are_refused() {
        let mut q = query("web.", RecordType::A, false);
        let tail = q.split_off(12);
        for _ in 0..5 {
            q.push(63);
            q.extend_from_slice(&[b'a'; 63]);
        }
        q.extend_from_slice(&tail);
        let mut out = Vec::new();
        assert!(!answer(&table(), &q, &mut out));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A fixed xorshift so a failure reproduces; mutations of a valid
        // query reach deeper than pure noise.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let base = query("tasks.svc.front.", RecordType::A, true);
        let mut out = Vec::new();
        for _ in 0..20_000 {
            let mut q = base.clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() % q.len() as u64) as usize;
                q[at] = next() as u8;
            }
            q.truncate((next() % (q.len() as u64 + 1)) as usize);
            if answer(&table(), &q, &mut out) {
                // What we answer is a well-formed response to it.
                let m = Message::from_vec(&out).expect("our answer parses");
                assert_eq!(m.metadata.id, u16::from_be_bytes([q[0], q[1]]));
            }
        }
        for len in 0..64 {
            let noise: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = answer(&table(), &noise, &mut out);
        }
    }

    #[test]
    fn answers_too_large_for_the_client_go_to_hickory_for_tc() {
        let mut n = NetworkRecords::named("n", "big");
        for i in 0..40u8 {
            n.insert_alias("many", Ipv4Addr::new(10, 1, 0, i));
        }
        let mut r = Records::default();
        r.networks.insert("n".into(), n);
        let t = SandboxTable::build(&r.normalized(), &[SandboxNetwork::new("n", false)]);
        let mut out = Vec::new();
        // 40 answers of 16 bytes: over 512 without EDNS, fine with 1232.
        assert!(!answer(&t, &query("many.", RecordType::A, false), &mut out));
        assert!(answer(&t, &query("many.", RecordType::A, true), &mut out));
        let m = Message::from_vec(&out).expect("parses");
        assert_eq!(m.answers.len(), 40);
        assert!(!m.metadata.truncation);
    }

    #[test]
    fn edns_payload_below_512_counts_as_512_and_options_are_dropped() {
        let mut q = query("web.", RecordType::A, true);
        // Payload 100, then one option (a cookie-sized blob).
        let opt = q.len() - 11;
        q[opt + 3..opt + 5].copy_from_slice(&100u16.to_be_bytes());
        let rdlen = q.len() - 2;
        q[rdlen..].copy_from_slice(&12u16.to_be_bytes());
        q.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        let mut out = Vec::new();
        assert!(answer(&table(), &q, &mut out));
        let m = Message::from_vec(&out).expect("parses");
        assert_eq!(m.edns.as_ref().map(|e| e.max_payload()), Some(512));
        assert_eq!(m.answers.len(), 1);
        // EDNS version 1: BADVERS is hickory's to give.
        let mut q = query("web.", RecordType::A, true);
        let opt = q.len() - 11;
        q[opt + 6] = 1;
        assert!(!answer(&table(), &q, &mut out));
    }

    #[test]
    fn tasks_and_qualified_tasks_names() {
        for name in ["tasks.svc.", "TASKS.SVC.FRONT."] {
            let m = ask(name, RecordType::A, false).expect("fast");
            assert_eq!(m.answers.len(), 2, "{name}");
        }
        // Another network's qualified name: NXDOMAIN, not forwarded.
        let m = ask("db.back.", RecordType::A, false).expect("fast");
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }
}
