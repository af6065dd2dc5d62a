//! Client threads: each sends a mix of writes and reads to one manager
//! through the `mesh` CLI, every operation under a time limit, and records
//! what happened.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mesh_lab::{Lab, LabError};

use super::{
    Config, KEY_PREFIX, Op, OpKind, Outcome, SERVICES, Scope, parse_labels, parse_networks,
};

/// Runs `mesh ARGS` on `node` and records it as `kind`; for a successful
/// read, `observe` turns its stdout into the keys it saw.
pub fn record(
    lab: &Lab,
    client: usize,
    node: &str,
    kind: OpKind,
    args: &[&str],
    limit: Duration,
    t0: Instant,
) -> Op {
    let start = t0.elapsed();
    let (outcome, stdout) = match lab.mesh_timeout(node, args, limit) {
        Ok(out) if out.status.success() => (
            Outcome::Ok,
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ),
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let line = err
                .lines()
                .next()
                .unwrap_or("(nothing on stderr)")
                .to_string();
            (Outcome::Refused(line), String::new())
        }
        Err(LabError::Timeout { .. }) => (Outcome::TimedOut, String::new()),
        Err(e) => (Outcome::Failed(e.to_string()), String::new()),
    };
    let end = t0.elapsed();
    let observed = match (&outcome, &kind) {
        (
            Outcome::Ok,
            OpKind::Read {
                scope: Scope::Label,
            },
        ) => parse_labels(&stdout).ok().map(|(k, _)| k),
        (
            Outcome::Ok,
            OpKind::Read {
                scope: Scope::Network,
            },
        ) => parse_networks(&stdout).ok(),
        _ => None,
    };
    // A successful read whose output did not parse is a failure, not a read of nothing.
    let outcome = match (&outcome, &kind, &observed) {
        (Outcome::Ok, OpKind::Read { .. }, None) => Outcome::Failed(format!(
            "unreadable output: {}",
            stdout.chars().take(200).collect::<String>()
        )),
        _ => outcome,
    };
    Op {
        client,
        node: node.to_string(),
        kind,
        start,
        end,
        outcome,
        observed,
    }
}

/// One client: until `stop`, a fixed mix per 20 operations of 11 label
/// writes, 1 network create, 1 scale, 4 label reads, 2 network reads and
/// 1 `service ps`, each to `node`.
pub fn client(
    lab: &Lab,
    id: usize,
    node: &str,
    cfg: &Config,
    t0: Instant,
    stop: &AtomicBool,
) -> Vec<Op> {
    let hostnames: Vec<String> = lab.nodes.iter().map(|n| n.name.clone()).collect();
    let mut ops = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let limit = cfg.op_timeout;
        let op = match i % 20 {
            0 => {
                let name = format!("{KEY_PREFIX}net{id}-{i}");
                record(
                    lab,
                    id,
                    node,
                    OpKind::Write {
                        scope: Scope::Network,
                        key: name.clone(),
                    },
                    &["network", "create", "-d", "overlay", "--attachable", &name],
                    limit,
                    t0,
                )
            }
            10 => {
                let service = SERVICES[(id + i / 20) % SERVICES.len()];
                let replicas = (i / 20 % 3 + 1) as u64;
                let arg = format!("{service}={replicas}");
                record(
                    lab,
                    id,
                    node,
                    OpKind::Scale {
                        service: service.to_string(),
                        replicas,
                    },
                    &["service", "scale", "--detach", &arg],
                    limit,
                    t0,
                )
            }
            3 | 7 | 13 | 17 => record(
                lab,
                id,
                node,
                OpKind::Read {
                    scope: Scope::Label,
                },
                &["node", "ls", "--format", "json"],
                limit,
                t0,
            ),
            5 | 15 => record(
                lab,
                id,
                node,
                OpKind::Read {
                    scope: Scope::Network,
                },
                &["network", "ls", "--format", "json"],
                limit,
                t0,
            ),
            19 => record(
                lab,
                id,
                node,
                OpKind::ReadTasks,
                &["service", "ps", SERVICES[0]],
                limit,
                t0,
            ),
            _ => {
                let key = format!("{KEY_PREFIX}{id}-{i}");
                let target = &hostnames[(id + i) % hostnames.len()];
                let arg = format!("{key}=v{i}");
                record(
                    lab,
                    id,
                    node,
                    OpKind::Write {
                        scope: Scope::Label,
                        key,
                    },
                    &["node", "update", "--label-add", &arg, target],
                    limit,
                    t0,
                )
            }
        };
        ops.push(op);
        i += 1;
        std::thread::sleep(cfg.think);
    }
    ops
}

/// Keys a set of reads saw, for tests.
pub fn seen(ops: &[Op]) -> BTreeSet<String> {
    ops.iter()
        .filter_map(|o| o.observed.clone())
        .flatten()
        .collect()
}
