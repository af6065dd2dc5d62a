//! The long fault campaign (issue 14): 100 rounds (kill -9 and restart a
//! manager, partition a minority then another, pause a manager, cut a
//! worker) on a lab of 3 managers + 1 worker while clients write and read
//! through every manager. Prints, per fault kind: rounds, operations,
//! acknowledged, lost, duplicates, stale reads, hung operations, minority
//! writes (refused/acknowledged/sent) and the time to recover writes
//! (median/max); then how long a restarted manager took to serve reads and
//! how long the cluster took to converge at the end.
//!
//! Run: `cargo bench --bench faults` (as root). Rounds: `FAULT_ROUNDS=8
//! cargo bench --bench faults` or `cargo bench --bench faults -- 8`;
//! managers: `FAULT_MANAGERS=5`; only some fault kinds:
//! `FAULT_KINDS=kill-manager,partition`; the whole history to a file:
//! `FAULT_HISTORY=/tmp/history.txt`.

use std::time::Instant;

use anyhow::{Result, bail};

#[path = "../tests/campaign/mod.rs"]
mod campaign;
#[path = "../tests/common/mod.rs"]
mod common;

fn number(env: &str, arg: Option<String>, default: usize) -> Result<usize> {
    match arg.or_else(|| std::env::var(env).ok()) {
        None => Ok(default),
        Some(v) => match v.parse() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("{env}: {v:?} is not a positive number"),
        },
    }
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; the first plain number is the round count.
    let arg = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let rounds = number("FAULT_ROUNDS", arg, 100)?;
    let managers = number("FAULT_MANAGERS", None, 3)?;
    let mut lab = common::up("fb", managers + 1, managers, &[])?;
    // FAULT_KINDS=kill-manager,partition narrows the nemesis to those kinds.
    let kinds = match std::env::var("FAULT_KINDS") {
        Ok(list) => list
            .split(',')
            .map(|k| {
                campaign::FaultKind::ALL
                    .into_iter()
                    .find(|f| f.name() == k.trim())
                    .ok_or_else(|| anyhow::anyhow!("FAULT_KINDS: no fault kind {k:?}"))
            })
            .collect::<Result<Vec<_>>>()?,
        Err(_) => campaign::FaultKind::ALL.to_vec(),
    };
    let cfg = campaign::Config {
        rounds,
        kinds,
        ..campaign::Config::default()
    };
    let started = Instant::now();
    let report = campaign::run(&mut lab, &cfg)?;
    println!(
        "fault campaign: {rounds} rounds on {managers} managers + 1 worker, {} clients, {:.0}s",
        managers * cfg.clients_per_manager,
        started.elapsed().as_secs_f64()
    );
    print!("{}", report.table);
    // FAULT_HISTORY=FILE keeps every operation, one per line, for evidence.
    if let Ok(path) = std::env::var("FAULT_HISTORY") {
        let lines: Vec<String> = report.history.iter().map(|o| format!("{o:?}")).collect();
        std::fs::write(&path, lines.join("\n") + "\n")?;
        println!("history: {} operations in {path}", lines.len());
    }
    let s = &report.summary;
    for (what, lines) in [
        ("lost", &s.lost),
        ("duplicate", &s.duplicates),
        ("stale", &s.stale),
        ("scale", &s.scale),
        ("hung", &s.hung),
        ("minority hung", &s.minority_hung),
        ("minority acked", &s.minority_acked),
        ("problem", &s.problems),
    ] {
        for l in lines.iter().take(10) {
            println!("{what}: {l}");
        }
        if lines.len() > 10 {
            println!("{what}: ... {} more", lines.len() - 10);
        }
    }
    for (n, line) in s.refusals.iter().take(8) {
        println!("refused {n:5}x: {line}");
    }
    println!(
        "verdict: {}",
        if s.clean() { "clean" } else { "FAULTS FOUND" }
    );
    Ok(())
}
