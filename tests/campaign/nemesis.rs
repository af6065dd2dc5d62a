//! The nemesis: one fault per round, undone after `hold`; then it waits
//! until a write is acknowledged again (the time to recover writes) and
//! checks allocations for duplicates before the next round.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mesh_lab::Lab;

use super::clients::record;
use super::{
    Config, FaultKind, KEY_PREFIX, Op, OpKind, Round, Scope, Window, allocations, checker,
    find_leader, mesh_quick, roles,
};

/// Runs `cfg.rounds` rounds on `lab` (the nemesis's own handle). Probe
/// writes go to `probes` so the checker sees them too.
pub fn rounds(
    lab: &mut Lab,
    cfg: &Config,
    t0: Instant,
    probes: &Mutex<Vec<Op>>,
) -> Result<Vec<Round>> {
    let (managers, workers) = roles(lab);
    let mut out = Vec::with_capacity(cfg.rounds);
    for index in 0..cfg.rounds {
        let kind = cfg.kinds[index % cfg.kinds.len()];
        // Every other round of a kind hits the leader.
        let at_leader = (index / cfg.kinds.len()).is_multiple_of(2);
        let leader = find_leader(lab, &managers).unwrap_or_else(|| managers[0].clone());
        let victim = if at_leader {
            leader.clone()
        } else {
            managers
                .iter()
                .find(|m| **m != leader)
                .cloned()
                .unwrap_or_else(|| leader.clone())
        };
        let start = t0.elapsed();
        let mut minority = Vec::new();
        let mut reads_back = None;
        let target;
        match kind {
            FaultKind::KillManager => {
                lab.kill(&victim)?;
                std::thread::sleep(cfg.hold / 2);
                let restarted = Instant::now();
                lab.start(&victim)?;
                // How long until the restarted manager answers reads.
                let limit = Instant::now() + cfg.recover_limit;
                while Instant::now() < limit {
                    if mesh_quick(
                        lab,
                        &victim,
                        &["node", "ls", "--format", "json"],
                        Duration::from_secs(5),
                    )
                    .is_ok()
                    {
                        reads_back = Some(restarted.elapsed());
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                target = victim;
            }
            FaultKind::Partition => {
                // First a minority holding the leader; then a different
                // minority, the first one now with the majority.
                let small = (managers.len() - 1) / 2;
                let mut first: Vec<String> = vec![leader.clone()];
                first.extend(
                    managers
                        .iter()
                        .filter(|m| **m != leader)
                        .take(small.saturating_sub(1))
                        .cloned(),
                );
                let rest: Vec<String> = lab
                    .nodes
                    .iter()
                    .map(|n| n.name.clone())
                    .filter(|n| !first.contains(n))
                    .collect();
                let w1 = partition(lab, &first, &rest, t0)?;
                std::thread::sleep(cfg.hold);
                let second: Vec<String> = managers
                    .iter()
                    .filter(|m| !first.contains(m))
                    .rev()
                    .take(small)
                    .cloned()
                    .collect();
                let rest: Vec<String> = lab
                    .nodes
                    .iter()
                    .map(|n| n.name.clone())
                    .filter(|n| !second.contains(n))
                    .collect();
                // A window ends before the call that changes it (the change
                // happens inside) and starts after the call returns.
                let switch = t0.elapsed();
                let w2 = partition(lab, &second, &rest, t0)?;
                minority.push(Window { end: switch, ..w1 });
                std::thread::sleep(cfg.hold);
                let heal = t0.elapsed();
                lab.heal_all()?;
                minority.push(Window { end: heal, ..w2 });
                target = format!("{} then {}", first.join(","), second.join(","));
            }
            FaultKind::PauseManager => {
                lab.pause(&victim)?;
                std::thread::sleep(cfg.hold);
                lab.resume(&victim)?;
                target = victim;
            }
            FaultKind::CutWorker => {
                let worker = workers
                    .get(index / cfg.kinds.len() % workers.len().max(1))
                    .cloned()
                    .context("a cut-worker round needs a worker in the lab")?;
                lab.cut(&worker)?;
                std::thread::sleep(cfg.hold);
                lab.heal(&worker)?;
                target = worker;
            }
        }
        let healed = t0.elapsed();
        let recover = recover_writes(lab, &managers, index, cfg, t0, probes);
        let duplicates = match find_leader(lab, &managers) {
            Some(l) => match allocations(lab, &l) {
                Ok(a) => checker::duplicates(&a),
                Err(e) => {
                    eprintln!("round {index}: allocations not read: {e:#}");
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        let end = t0.elapsed();
        eprintln!(
            "round {index:3} {:<13} {target:<24} {:7.3}s-{:7.3}s healed {:7.3}s recover {} dups {}",
            kind.name(),
            start.as_secs_f64(),
            end.as_secs_f64(),
            healed.as_secs_f64(),
            recover.map_or("NONE".to_string(), |d| format!("{:.2}s", d.as_secs_f64())),
            duplicates.len()
        );
        out.push(Round {
            index,
            kind,
            target,
            start,
            healed,
            end,
            recover,
            reads_back,
            minority,
            duplicates,
        });
        std::thread::sleep(cfg.between);
    }
    Ok(out)
}

/// Partitions `small` from `rest` and returns the window (open-ended).
fn partition(lab: &mut Lab, small: &[String], rest: &[String], t0: Instant) -> Result<Window> {
    let a: Vec<&str> = small.iter().map(String::as_str).collect();
    let b: Vec<&str> = rest.iter().map(String::as_str).collect();
    lab.partition(&[&a, &b])?;
    let start = t0.elapsed();
    Ok(Window {
        start,
        end: start,
        nodes: small.iter().cloned().collect::<BTreeSet<_>>(),
    })
}

/// Sends probe writes to each manager in turn until one is acknowledged;
/// the time from now to that acknowledgement.
fn recover_writes(
    lab: &Lab,
    managers: &[String],
    round: usize,
    cfg: &Config,
    t0: Instant,
    probes: &Mutex<Vec<Op>>,
) -> Option<Duration> {
    let began = Instant::now();
    let mut attempt = 0usize;
    while began.elapsed() < cfg.recover_limit {
        let node = &managers[attempt % managers.len()];
        let key = format!("{KEY_PREFIX}n-{round}-{attempt}");
        let arg = format!("{key}=probe");
        let op = record(
            lab,
            usize::MAX,
            node,
            OpKind::Write {
                scope: Scope::Label,
                key,
            },
            &["node", "update", "--label-add", &arg, node],
            Duration::from_secs(5),
            t0,
        );
        let acked = op.acked();
        if let Ok(mut p) = probes.lock() {
            p.push(op);
        }
        if acked {
            return Some(began.elapsed());
        }
        attempt += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Heals everything and starts every daemon that is not running.
pub fn restore(lab: &mut Lab) -> Result<()> {
    lab.heal_all()?;
    let dead: Vec<String> = lab
        .nodes
        .iter()
        .filter(|n| !n.running())
        .map(|n| n.name.clone())
        .collect();
    for n in dead {
        lab.start(&n)?;
    }
    Ok(())
}
