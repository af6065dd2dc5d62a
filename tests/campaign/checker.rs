//! The checker: pure functions on a campaign's history and final state.
//!
//! - lost: an acknowledged write (or a key some read saw) missing at the end;
//! - stale: a successful read that misses a key known to exist before the
//!   read began (acknowledged, or seen by a read that had ended): for
//!   grow-only sets this is what linearizability asks of reads;
//! - scale: the final replica count is the value of a write that no
//!   acknowledged write strictly follows;
//! - duplicates: two networks with overlapping subnets or the same VNI,
//!   two holders of one address on a network, two services on one port;
//! - minority: writes sent to a minority-side manager end (refused or
//!   acknowledged) within the time limit, never time out;
//! - hung: any operation killed at its time limit.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use super::{Config, FaultKind, Op, OpKind, Outcome, Round, Scope};

/// A swarm network's allocation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetAlloc {
    pub name: String,
    pub subnet: String,
    pub vni: u64,
}

/// Allocations read from a manager.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Allocations {
    pub networks: Vec<NetAlloc>,
    /// (holder, network name, address): task endpoints and service VIPs.
    pub addresses: Vec<(String, String, String)>,
    /// (service, protocol, published port) of ingress-mode ports.
    pub ports: Vec<(String, String, u32)>,
}

/// The state read through the leader at the end.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FinalState {
    pub labels: BTreeSet<String>,
    pub networks: BTreeSet<String>,
    pub replicas: BTreeMap<String, u64>,
    pub allocations: Allocations,
}

fn parse_cidr(s: &str) -> Option<(u32, u32)> {
    let (ip, len) = s.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    (len <= 32).then_some((u32::from(ip), len))
}

fn overlap(a: (u32, u32), b: (u32, u32)) -> bool {
    let len = a.1.min(b.1);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    a.0 & mask == b.0 & mask
}

/// Every duplicate allocation, one line each.
pub fn duplicates(a: &Allocations) -> Vec<String> {
    let mut out = Vec::new();
    for (i, x) in a.networks.iter().enumerate() {
        for y in &a.networks[i + 1..] {
            if x.vni != 0 && x.vni == y.vni {
                out.push(format!(
                    "networks {} and {} share VNI {}",
                    x.name, y.name, x.vni
                ));
            }
            if let (Some(p), Some(q)) = (parse_cidr(&x.subnet), parse_cidr(&y.subnet))
                && overlap(p, q)
            {
                out.push(format!(
                    "networks {} ({}) and {} ({}) overlap",
                    x.name, x.subnet, y.name, y.subnet
                ));
            }
        }
    }
    let mut holders: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    for (holder, net, ip) in &a.addresses {
        holders
            .entry((net.as_str(), ip.as_str()))
            .or_default()
            .insert(holder.as_str());
    }
    for ((net, ip), h) in holders {
        if h.len() > 1 {
            out.push(format!(
                "{ip} on {net} is held by {}",
                h.into_iter().collect::<Vec<_>>().join(" and ")
            ));
        }
    }
    let mut ports: BTreeMap<(&str, u32), BTreeSet<&str>> = BTreeMap::new();
    for (service, proto, port) in &a.ports {
        ports
            .entry((proto.as_str(), *port))
            .or_default()
            .insert(service.as_str());
    }
    for ((proto, port), s) in ports {
        if s.len() > 1 {
            out.push(format!(
                "port {port}/{proto} is published by {}",
                s.into_iter().collect::<Vec<_>>().join(" and ")
            ));
        }
    }
    out
}

fn key_of(op: &Op) -> Option<(Scope, &str)> {
    match &op.kind {
        OpKind::Write { scope, key } => Some((*scope, key.as_str())),
        _ => None,
    }
}

/// Acknowledged writes whose key is missing at the end, and keys some read
/// saw that are missing at the end.
pub fn lost(history: &[Op], fin: &FinalState) -> Vec<String> {
    let present = |scope: Scope, key: &str| match scope {
        Scope::Label => fin.labels.contains(key),
        Scope::Network => fin.networks.contains(key),
    };
    let mut out = BTreeSet::new();
    for op in history {
        if let Some((scope, key)) = key_of(op)
            && op.acked()
            && !present(scope, key)
        {
            out.insert(format!(
                "{scope:?} {key} acknowledged by {} at {:.3}s is missing",
                op.node,
                op.end.as_secs_f64()
            ));
        }
        if let (OpKind::Read { scope }, Some(seen)) = (&op.kind, &op.observed) {
            for key in seen.iter().filter(|k| !present(*scope, k)) {
                out.insert(format!(
                    "{scope:?} {key} read on {} at {:.3}s is missing",
                    op.node,
                    op.end.as_secs_f64()
                ));
            }
        }
    }
    out.into_iter().collect()
}

/// Successful reads that miss a key known to exist before they began; one
/// line per stale read (its first missing key).
pub fn stale(history: &[Op]) -> Vec<String> {
    // When each key was first known to exist.
    let mut known: BTreeMap<(Scope, &str), Duration> = BTreeMap::new();
    for op in history {
        if let Some((scope, key)) = key_of(op)
            && op.acked()
        {
            let e = known.entry((scope, key)).or_insert(op.end);
            *e = (*e).min(op.end);
        }
        if let (OpKind::Read { scope }, Some(seen)) = (&op.kind, &op.observed) {
            for key in seen {
                let e = known.entry((*scope, key.as_str())).or_insert(op.end);
                *e = (*e).min(op.end);
            }
        }
    }
    let mut out = Vec::new();
    for op in history {
        let (OpKind::Read { scope }, Some(seen)) = (&op.kind, &op.observed) else {
            continue;
        };
        let missing = known
            .iter()
            .filter(|((s, _), at)| s == scope && **at < op.start)
            .find(|((_, key), _)| !seen.contains(*key));
        if let Some(((_, key), at)) = missing {
            out.push(format!(
                "client {} read {scope:?} on {} at {:.3}s-{:.3}s without {key}, known since {:.3}s",
                op.client,
                op.node,
                op.start.as_secs_f64(),
                op.end.as_secs_f64(),
                at.as_secs_f64()
            ));
        }
    }
    out
}

/// Services whose final replica count no write can explain.
pub fn scale_problems(history: &[Op], fin: &FinalState) -> Vec<String> {
    let mut out = Vec::new();
    for (service, replicas) in &fin.replicas {
        let writes: Vec<(&Op, u64)> = history
            .iter()
            .filter_map(|o| match &o.kind {
                OpKind::Scale {
                    service: s,
                    replicas,
                } if s == service => Some((o, *replicas)),
                _ => None,
            })
            .collect();
        // A write can be the last one only if no acknowledged write began after it ended.
        let explained = writes.iter().any(|(w, r)| {
            r == replicas && !writes.iter().any(|(v, _)| v.acked() && v.start > w.end)
        });
        if !explained {
            out.push(format!(
                "{service} has {replicas} replicas, which no last scale asked for"
            ));
        }
    }
    out
}

/// Writes sent to the minority side of a partition: (sent, refused,
/// acknowledged, timed out).
pub fn minority(history: &[Op], rounds: &[Round]) -> (usize, usize, usize, Vec<String>) {
    let (sent, refused, acked, hung, _) = minority_detail(history, rounds);
    (sent, refused, acked, hung)
}

/// [`minority`], with a line for each minority write acknowledged while its
/// side was still cut off (there must be none; one acknowledged after the
/// heal must be present at the end, which `lost` checks).
pub fn minority_detail(
    history: &[Op],
    rounds: &[Round],
) -> (usize, usize, usize, Vec<String>, Vec<String>) {
    let (mut sent, mut refused, mut acked) = (0, 0, 0);
    let mut hung = Vec::new();
    let mut acked_lines = Vec::new();
    for op in history.iter().filter(|o| o.kind.is_write()) {
        let Some(window) = rounds
            .iter()
            .flat_map(|r| &r.minority)
            .find(|w| w.nodes.contains(&op.node) && op.start >= w.start && op.start < w.end)
        else {
            continue;
        };
        sent += 1;
        match &op.outcome {
            Outcome::Ok => {
                acked += 1;
                // Acknowledged once the partition healed is fine; before, a
                // minority manager committed without a majority.
                if op.end < window.end {
                    acked_lines.push(format!(
                        "client {} {:?} on minority-side {} {:.3}s-{:.3}s acknowledged before the heal at {:.3}s",
                        op.client,
                        op.kind,
                        op.node,
                        op.start.as_secs_f64(),
                        op.end.as_secs_f64(),
                        window.end.as_secs_f64()
                    ));
                }
            }
            Outcome::Refused(_) | Outcome::Failed(_) => refused += 1,
            Outcome::TimedOut => hung.push(format!(
                "write to minority-side {} at {:.3}s timed out",
                op.node,
                op.start.as_secs_f64()
            )),
        }
    }
    (sent, refused, acked, hung, acked_lines)
}

/// How often each refusal line was met, most frequent first.
pub fn refusals(history: &[Op]) -> Vec<(usize, String)> {
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for op in history {
        if let Outcome::Refused(line) | Outcome::Failed(line) = &op.outcome {
            *count.entry(line.as_str()).or_default() += 1;
        }
    }
    let mut v: Vec<(usize, String)> = count.into_iter().map(|(l, n)| (n, l.to_string())).collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    v
}

/// Operations killed at their time limit.
pub fn hung(history: &[Op]) -> Vec<String> {
    history
        .iter()
        .filter(|o| o.outcome == Outcome::TimedOut)
        .map(|o| {
            format!(
                "client {} {:?} on {} at {:.3}s timed out",
                o.client,
                o.kind,
                o.node,
                o.start.as_secs_f64()
            )
        })
        .collect()
}

/// The checker's verdict.
#[derive(Debug, Default)]
pub struct Summary {
    pub ops: usize,
    pub acked: usize,
    pub lost: Vec<String>,
    pub duplicates: Vec<String>,
    pub stale: Vec<String>,
    pub scale: Vec<String>,
    pub hung: Vec<String>,
    /// (sent, refused, acknowledged) writes on a minority side.
    pub minority: (usize, usize, usize),
    pub minority_hung: Vec<String>,
    /// Minority writes acknowledged while their side was cut off.
    pub minority_acked: Vec<String>,
    /// Refusal lines met, with counts.
    pub refusals: Vec<(usize, String)>,
    /// Rounds after which no write was acknowledged within the limit.
    pub unrecovered: Vec<usize>,
    /// Anything else (convergence).
    pub problems: Vec<String>,
}

impl Summary {
    /// True when every check passed.
    pub fn clean(&self) -> bool {
        self.lost.is_empty()
            && self.duplicates.is_empty()
            && self.stale.is_empty()
            && self.scale.is_empty()
            && self.hung.is_empty()
            && self.minority_hung.is_empty()
            && self.minority_acked.is_empty()
            && self.unrecovered.is_empty()
            && self.problems.is_empty()
    }
}

/// Runs every check.
pub fn summarize(history: &[Op], rounds: &[Round], fin: &FinalState) -> Summary {
    let (sent, refused, acked, minority_hung, minority_acked) = minority_detail(history, rounds);
    let mut duplicates: BTreeSet<String> = rounds
        .iter()
        .flat_map(|r| r.duplicates.iter().cloned())
        .collect();
    duplicates.extend(self::duplicates(&fin.allocations));
    Summary {
        ops: history.len(),
        acked: history.iter().filter(|o| o.acked()).count(),
        lost: lost(history, fin),
        duplicates: duplicates.into_iter().collect(),
        stale: stale(history),
        scale: scale_problems(history, fin),
        hung: hung(history),
        minority: (sent, refused, acked),
        minority_hung,
        minority_acked,
        refusals: refusals(history),
        unrecovered: rounds
            .iter()
            .filter(|r| r.recover.is_none())
            .map(|r| r.index)
            .collect(),
        problems: Vec::new(),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

fn median_max(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort();
    format!("{}/{}", secs(v[v.len() / 2]), secs(v[v.len() - 1]))
}

/// The per-fault-kind table, in a fixed layout: each operation counts for
/// the round during which it began (from the fault to the round's end);
/// the rest is "calm".
pub fn table(
    history: &[Op],
    rounds: &[Round],
    summary: &Summary,
    converged_after: Option<Duration>,
    cfg: &Config,
) -> String {
    let round_of = |op: &Op| {
        rounds
            .iter()
            .find(|r| op.start >= r.start && op.start < r.end)
    };
    let stale_lines = stale(history);
    let mut s = String::new();
    s.push_str(&format!(
        "{:<14}{:>7}{:>8}{:>8}{:>6}{:>6}{:>7}{:>6}{:>16}{:>18}\n",
        "FAULT",
        "ROUNDS",
        "OPS",
        "ACKED",
        "LOST",
        "DUPS",
        "STALE",
        "HUNG",
        "MINORITY r/a/n",
        "RECOVER p50/max"
    ));
    let mut kinds: Vec<Option<FaultKind>> = cfg.kinds.iter().copied().map(Some).collect();
    kinds.dedup();
    kinds.push(None);
    for kind in kinds {
        let ops: Vec<&Op> = history
            .iter()
            .filter(|o| round_of(o).map(|r| r.kind) == kind)
            .collect();
        let of_kind: Vec<&Round> = rounds.iter().filter(|r| Some(r.kind) == kind).collect();
        let owned: Vec<Op> = ops.iter().map(|o| (*o).clone()).collect();
        let lost_n = summary
            .lost
            .iter()
            .filter(|l| {
                ops.iter()
                    .any(|o| key_of(o).is_some_and(|(_, k)| l.contains(&format!(" {k} "))))
            })
            .count();
        let stale_n = stale_lines
            .iter()
            .filter(|l| {
                ops.iter().any(|o| {
                    matches!(o.kind, OpKind::Read { .. })
                        && l.contains(&format!("at {:.3}s-", o.start.as_secs_f64()))
                        && l.starts_with(&format!("client {} ", o.client))
                })
            })
            .count();
        let dups: usize = of_kind.iter().map(|r| r.duplicates.len()).sum();
        let (sent, refused, acked) = {
            let (a, b, c, _) = minority(&owned, rounds);
            (a, b, c)
        };
        let minority_cell = if sent == 0 {
            "-".to_string()
        } else {
            format!("{refused}/{acked}/{sent}")
        };
        s.push_str(&format!(
            "{:<14}{:>7}{:>8}{:>8}{:>6}{:>6}{:>7}{:>6}{:>16}{:>18}\n",
            kind.map_or("calm", FaultKind::name),
            of_kind.len(),
            ops.len(),
            ops.iter().filter(|o| o.acked()).count(),
            lost_n,
            dups,
            stale_n,
            ops.iter()
                .filter(|o| o.outcome == Outcome::TimedOut)
                .count(),
            minority_cell,
            median_max(of_kind.iter().filter_map(|r| r.recover).collect()),
        ));
    }
    s.push_str(&format!(
        "{:<14}{:>7}{:>8}{:>8}{:>6}{:>6}{:>7}{:>6}{:>16}{:>18}\n",
        "all",
        rounds.len(),
        summary.ops,
        summary.acked,
        summary.lost.len(),
        summary.duplicates.len(),
        summary.stale.len(),
        summary.hung.len(),
        format!(
            "{}/{}/{}",
            summary.minority.1, summary.minority.2, summary.minority.0
        ),
        median_max(rounds.iter().filter_map(|r| r.recover).collect()),
    ));
    let reads_back: Vec<Duration> = rounds.iter().filter_map(|r| r.reads_back).collect();
    s.push_str(&format!(
        "restarted manager serves reads after (p50/max): {}\n",
        median_max(reads_back)
    ));
    s.push_str(&format!(
        "converged after the last round: {} (bound {}s)\n",
        converged_after.map_or("NOT CONVERGED".to_string(), secs),
        cfg.converge_bound.as_secs()
    ));
    s.push_str(&format!(
        "scale: {} problem(s); rounds without recovered writes: {:?}\n",
        summary.scale.len(),
        summary.unrecovered
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn write(client: usize, key: &str, start: u64, end: u64, outcome: Outcome) -> Op {
        Op {
            client,
            node: "node1".into(),
            kind: OpKind::Write {
                scope: Scope::Label,
                key: key.into(),
            },
            start: ms(start),
            end: ms(end),
            outcome,
            observed: None,
        }
    }

    fn read(client: usize, seen: &[&str], start: u64, end: u64) -> Op {
        Op {
            client,
            node: "node2".into(),
            kind: OpKind::Read {
                scope: Scope::Label,
            },
            start: ms(start),
            end: ms(end),
            outcome: Outcome::Ok,
            observed: Some(seen.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn fin(labels: &[&str]) -> FinalState {
        FinalState {
            labels: labels.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_lost_write_is_found() {
        let h = vec![
            write(0, "fc0-1", 0, 10, Outcome::Ok),
            write(0, "fc0-2", 20, 30, Outcome::Ok),
            // Not acknowledged: it may or may not be there.
            write(1, "fc1-1", 20, 30, Outcome::TimedOut),
        ];
        assert!(lost(&h, &fin(&["fc0-1", "fc0-2"])).is_empty());
        let l = lost(&h, &fin(&["fc0-1"]));
        assert_eq!(l.len(), 1, "{l:?}");
        assert!(l[0].contains("fc0-2"), "{l:?}");
        // A key a read saw that is gone at the end is lost too.
        let h = vec![read(0, &["fc9-9"], 0, 5)];
        assert_eq!(lost(&h, &fin(&[])).len(), 1);
    }

    #[test]
    fn a_stale_read_is_found() {
        let ok = vec![
            write(0, "fc0-1", 0, 10, Outcome::Ok),
            // Concurrent with the write: may miss it.
            read(1, &[], 5, 15),
            read(1, &["fc0-1"], 20, 25),
        ];
        assert!(stale(&ok).is_empty(), "{:?}", stale(&ok));
        // Began after the acknowledgement and misses it.
        let bad = vec![write(0, "fc0-1", 0, 10, Outcome::Ok), read(1, &[], 11, 15)];
        assert_eq!(stale(&bad).len(), 1);
        // A timed-out write seen by one read must be seen by every later one.
        let bad = vec![
            write(0, "fc0-1", 0, 10, Outcome::TimedOut),
            read(1, &["fc0-1"], 11, 12),
            read(2, &[], 13, 14),
        ];
        let s = stale(&bad);
        assert_eq!(s.len(), 1, "{s:?}");
        assert!(s[0].starts_with("client 2 "), "{s:?}");
    }

    #[test]
    fn duplicate_allocations_are_found() {
        let net = |name: &str, subnet: &str, vni| NetAlloc {
            name: name.into(),
            subnet: subnet.into(),
            vni,
        };
        let mut a = Allocations {
            networks: vec![net("a", "10.0.1.0/24", 4097), net("b", "10.0.2.0/24", 4098)],
            addresses: vec![
                ("task t1".into(), "a".into(), "10.0.1.3".into()),
                ("vip s".into(), "a".into(), "10.0.1.2".into()),
                // The same address on another network is fine.
                ("task t2".into(), "b".into(), "10.0.1.3".into()),
            ],
            ports: vec![
                ("s".into(), "tcp".into(), 8080),
                ("t".into(), "udp".into(), 8080),
            ],
        };
        assert!(duplicates(&a).is_empty(), "{:?}", duplicates(&a));
        a.networks.push(net("c", "10.0.1.0/25", 4099));
        a.networks.push(net("d", "10.0.9.0/24", 4098));
        a.addresses
            .push(("task t3".into(), "a".into(), "10.0.1.2".into()));
        a.ports.push(("u".into(), "tcp".into(), 8080));
        let d = duplicates(&a);
        assert_eq!(d.len(), 4, "{d:?}");
        assert!(d.iter().any(|l| l.contains("overlap")), "{d:?}");
        assert!(d.iter().any(|l| l.contains("VNI 4098")), "{d:?}");
        assert!(d.iter().any(|l| l.contains("10.0.1.2 on a")), "{d:?}");
        assert!(d.iter().any(|l| l.contains("port 8080/tcp")), "{d:?}");
    }

    #[test]
    fn final_scale_must_be_a_last_write() {
        let scale = |r: u64, start, end, outcome| Op {
            client: 0,
            node: "node1".into(),
            kind: OpKind::Scale {
                service: "s".into(),
                replicas: r,
            },
            start: ms(start),
            end: ms(end),
            outcome,
            observed: None,
        };
        let h = vec![scale(2, 0, 0, Outcome::Ok), scale(3, 10, 20, Outcome::Ok)];
        let mut f = FinalState::default();
        f.replicas.insert("s".into(), 3);
        assert!(scale_problems(&h, &f).is_empty());
        // 2 was overwritten by an acknowledged later write.
        f.replicas.insert("s".into(), 2);
        assert_eq!(scale_problems(&h, &f).len(), 1);
        // A value nobody asked for.
        f.replicas.insert("s".into(), 7);
        assert_eq!(scale_problems(&h, &f).len(), 1);
    }

    #[test]
    fn minority_writes_must_not_hang() {
        let round = Round {
            index: 0,
            kind: FaultKind::Partition,
            target: "node1".into(),
            start: ms(0),
            healed: ms(100),
            end: ms(200),
            recover: Some(ms(10)),
            reads_back: None,
            minority: vec![super::super::Window {
                start: ms(0),
                end: ms(100),
                nodes: BTreeSet::from(["node1".to_string()]),
            }],
            duplicates: Vec::new(),
        };
        let h = vec![
            write(
                0,
                "fc0-1",
                10,
                20,
                Outcome::Refused("cannot reach the leader".into()),
            ),
            write(0, "fc0-2", 30, 50, Outcome::TimedOut),
            // After the window: not a minority write.
            write(0, "fc0-3", 150, 160, Outcome::TimedOut),
        ];
        let (sent, refused, acked, hung) = minority(&h, std::slice::from_ref(&round));
        assert_eq!((sent, refused, acked), (2, 1, 0));
        assert_eq!(hung.len(), 1, "{hung:?}");
        // Acknowledged inside the window: flagged; after the heal: not.
        let h = vec![
            write(0, "fc0-4", 10, 90, Outcome::Ok),
            write(0, "fc0-5", 20, 120, Outcome::Ok),
        ];
        let (sent, _, acked, _, inside) = minority_detail(&h, &[round]);
        assert_eq!((sent, acked), (2, 2));
        assert_eq!(inside.len(), 1, "{inside:?}");
        assert!(inside[0].contains("fc0-4"), "{inside:?}");
    }
}
