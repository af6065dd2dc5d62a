//! Health checks of service tasks, as Docker's HEALTHCHECK.
//!
//! Each task with a check gets one monitor (a tokio task) that runs the
//! check with `/bin/sh -c` inside the task's namespaces (as `mesh exec`,
//! `sandbox::probe`), kills it at the timeout, and keeps the task's health:
//! starting until a probe passes, healthy after, unhealthy after `retries`
//! consecutive failures (failures inside the start period, before the first
//! pass, do not count). The task runner reads the health and reports it;
//! monitors never block each other or the runner, and at most
//! [`MAX_PROBES`] probes run at once on a node.
//!
//! One deviation from Docker: the first probe runs as soon as the process
//! started (Docker waits an interval), and until the first pass probes run
//! every min(interval, start interval), so a fast-starting task is healthy
//! (and in rotation) at once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::sandbox;

/// Docker's defaults for a check's zero fields.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RETRIES: u32 = 3;
pub const DEFAULT_START_INTERVAL: Duration = Duration::from_secs(5);
/// Probes running at once on a node: each is a fork and a shell.
pub const MAX_PROBES: usize = 32;
/// Probe outputs kept per task, as Docker keeps.
pub const KEEP_PROBES: usize = 5;

/// A task's health as the managers hear it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

impl Health {
    pub const fn as_str(self) -> &'static str {
        match self {
            Health::Starting => "starting",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// A check with Docker's defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub cmd: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub start_period: Duration,
    pub start_interval: Duration,
}

impl Check {
    /// The check an assignment asks for; None without one (absent,
    /// `--no-healthcheck`, or no command).
    pub fn from_pb(h: Option<&mesh_proto::HealthCheck>) -> Option<Check> {
        let h = h.filter(|h| !h.disabled && !h.cmd.is_empty())?;
        let or = |ms: u64, d: Duration| {
            if ms == 0 {
                d
            } else {
                Duration::from_millis(ms)
            }
        };
        Some(Check {
            cmd: h.cmd.clone(),
            interval: or(h.interval_ms, DEFAULT_INTERVAL),
            timeout: or(h.timeout_ms, DEFAULT_TIMEOUT),
            retries: if h.retries == 0 {
                DEFAULT_RETRIES
            } else {
                h.retries
            },
            start_period: Duration::from_millis(h.start_period_ms),
            start_interval: or(h.start_interval_ms, DEFAULT_START_INTERVAL),
        })
    }
}

/// The decisions of a monitor, free of I/O: when to probe next and what
/// each result makes of the task's health.
#[derive(Debug)]
pub struct Checker {
    check: Check,
    started: Instant,
    passed_once: bool,
    /// Consecutive failures that count.
    streak: u32,
    health: Health,
}

impl Checker {
    pub fn new(check: Check, started: Instant) -> Self {
        Checker {
            check,
            started,
            passed_once: false,
            streak: 0,
            health: Health::Starting,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Wait before the next probe: the start interval (if shorter) until
    /// the first pass, the interval after.
    pub fn delay(&self) -> Duration {
        if self.passed_once {
            self.check.interval
        } else {
            self.check.interval.min(self.check.start_interval)
        }
    }

    /// A probe's result, `at` the time it ended.
    pub fn record(&mut self, passed: bool, at: Instant) -> Health {
        if self.health == Health::Unhealthy {
            return self.health;
        }
        if passed {
            self.passed_once = true;
            self.streak = 0;
            self.health = Health::Healthy;
        } else if !self.passed_once
            && at.saturating_duration_since(self.started) < self.check.start_period
        {
            // Still starting up: does not count.
        } else {
            self.streak += 1;
            if self.streak >= self.check.retries {
                self.health = Health::Unhealthy;
            }
        }
        self.health
    }
}

/// One monitor's outcome, readable while it runs.
#[derive(Debug, Clone)]
pub struct Status {
    pub health: Health,
    /// The last [`KEEP_PROBES`] outputs, oldest first.
    pub outputs: VecDeque<String>,
}

/// Runs the check of the task whose process is `pid` until the task is
/// unhealthy, its process is gone, or `stop` fires; publishes each change
/// of health on `out`, then calls `changed`.
pub async fn monitor(
    task: String,
    pid: u32,
    check: Check,
    env: Vec<(String, String)>,
    probes: Arc<Semaphore>,
    out: watch::Sender<Status>,
    changed: impl Fn() + Send + 'static,
) {
    let mut checker = Checker::new(check.clone(), Instant::now());
    let argv = vec!["/bin/sh".to_string(), "-c".to_string(), check.cmd.clone()];
    loop {
        let result = {
            let Ok(_permit) = probes.acquire().await else {
                return;
            };
            sandbox::probe(pid, &argv, &env, check.timeout).await
        };
        let result = match result {
            Ok(r) => r,
            Err(sandbox::SandboxError::NotRunning(_)) => return,
            // Cannot even start the shell in there: a failed probe.
            Err(e) => sandbox::ProbeResult {
                passed: false,
                exit_code: None,
                output: e.to_string(),
            },
        };
        let before = checker.health();
        let health = checker.record(result.passed, Instant::now());
        debug!(task = %task, passed = result.passed, exit = ?result.exit_code, "health probe");
        out.send_modify(|s| {
            s.health = health;
            if s.outputs.len() == KEEP_PROBES {
                s.outputs.pop_front();
            }
            s.outputs.push_back(result.output);
        });
        if health != before {
            if health == Health::Unhealthy {
                let last = out.borrow().outputs.iter().cloned().collect::<Vec<_>>();
                info!(task = %task, outputs = ?last, "task is unhealthy");
            } else {
                info!(task = %task, health = health.as_str(), "task health changed");
            }
            changed();
        }
        if health == Health::Unhealthy {
            return;
        }
        tokio::time::sleep(checker.delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(retries: u32, start_period_ms: u64) -> Check {
        Check::from_pb(Some(&mesh_proto::HealthCheck {
            cmd: "true".into(),
            interval_ms: 1000,
            start_interval_ms: 100,
            retries,
            start_period_ms,
            ..Default::default()
        }))
        .expect("a check")
    }

    #[test]
    fn zero_fields_are_dockers_defaults_and_disabled_is_none() {
        let c = Check::from_pb(Some(&mesh_proto::HealthCheck {
            cmd: "true".into(),
            ..Default::default()
        }))
        .expect("a check");
        assert_eq!(
            (
                c.interval,
                c.timeout,
                c.retries,
                c.start_period,
                c.start_interval
            ),
            (
                DEFAULT_INTERVAL,
                DEFAULT_TIMEOUT,
                DEFAULT_RETRIES,
                Duration::ZERO,
                DEFAULT_START_INTERVAL
            )
        );
        assert!(Check::from_pb(None).is_none());
        let off = mesh_proto::HealthCheck {
            disabled: true,
            ..Default::default()
        };
        assert!(Check::from_pb(Some(&off)).is_none());
    }

    #[test]
    fn starting_until_a_pass_then_healthy() {
        let t0 = Instant::now();
        let mut c = Checker::new(check(3, 0), t0);
        assert_eq!(c.health(), Health::Starting);
        // Until the first pass, min(interval, start interval).
        assert_eq!(c.delay(), Duration::from_millis(100));
        assert_eq!(c.record(false, t0), Health::Starting);
        assert_eq!(c.record(true, t0), Health::Healthy);
        assert_eq!(c.delay(), Duration::from_millis(1000));
    }

    #[test]
    fn retries_consecutive_failures_make_it_unhealthy_for_good() {
        let t0 = Instant::now();
        let mut c = Checker::new(check(2, 0), t0);
        c.record(true, t0);
        assert_eq!(c.record(false, t0), Health::Healthy);
        // A pass in between resets the streak.
        c.record(true, t0);
        assert_eq!(c.record(false, t0), Health::Healthy);
        assert_eq!(c.record(false, t0), Health::Unhealthy);
        assert_eq!(c.record(true, t0), Health::Unhealthy);
        // Never passing: unhealthy from starting.
        let mut c = Checker::new(check(1, 0), t0);
        assert_eq!(c.record(false, t0), Health::Unhealthy);
    }

    #[test]
    fn failures_in_the_start_period_do_not_count_until_a_pass() {
        let t0 = Instant::now();
        let mut c = Checker::new(check(1, 5000), t0);
        for _ in 0..10 {
            assert_eq!(
                c.record(false, t0 + Duration::from_secs(1)),
                Health::Starting
            );
        }
        assert_eq!(
            c.record(false, t0 + Duration::from_secs(6)),
            Health::Unhealthy
        );
        // After a pass inside the start period, failures count at once.
        let mut c = Checker::new(check(1, 5000), t0);
        c.record(true, t0);
        assert_eq!(
            c.record(false, t0 + Duration::from_secs(1)),
            Health::Unhealthy
        );
    }
}
