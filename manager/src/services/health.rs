//! Health checks as Docker's HEALTHCHECK: the check a service's tasks run
//! (kept in the spec, checked here for the control API and for `apply`
//! alike), and the health a node reports for each task.

use mesh_common::refusal::Refusal;
use serde::{Deserialize, Serialize};

/// Longest check command: it rides in every node view and Raft entry.
pub const MAX_HEALTH_CMD: usize = 4096;
/// Longest interval, timeout, start period or start interval: a day.
/// Longer is a typo or a unit mix-up, and a task that waits for it looks hung.
pub const MAX_HEALTH_DURATION_MS: u64 = 24 * 3600 * 1000;
/// Most consecutive failures before a task is unhealthy: beyond this a
/// failing task is never replaced in any useful time.
pub const MAX_HEALTH_RETRIES: u32 = 100;

/// A service's health check. Zero durations and retries mean Docker's
/// defaults (the node resolves them), so the spec keeps what was asked.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HealthCheck {
    /// Run with `/bin/sh -c` in the task's namespaces; exit 0 = healthy.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmd: String,
    #[serde(default)]
    pub interval_ms: u64,
    #[serde(default)]
    pub timeout_ms: u64,
    #[serde(default)]
    pub retries: u32,
    #[serde(default)]
    pub start_period_ms: u64,
    #[serde(default)]
    pub start_interval_ms: u64,
    /// `--no-healthcheck`: no check runs (Docker's `Test: ["NONE"]`).
    #[serde(default)]
    pub disabled: bool,
}

impl HealthCheck {
    /// Whether tasks run this check.
    pub fn active(&self) -> bool {
        !self.disabled && !self.cmd.is_empty()
    }

    pub fn to_pb(&self) -> mesh_proto::HealthCheck {
        mesh_proto::HealthCheck {
            cmd: self.cmd.clone(),
            interval_ms: self.interval_ms,
            timeout_ms: self.timeout_ms,
            retries: self.retries,
            start_period_ms: self.start_period_ms,
            start_interval_ms: self.start_interval_ms,
            disabled: self.disabled,
        }
    }

    pub fn from_pb(p: &mesh_proto::HealthCheck) -> Self {
        HealthCheck {
            cmd: p.cmd.clone(),
            interval_ms: p.interval_ms,
            timeout_ms: p.timeout_ms,
            retries: p.retries,
            start_period_ms: p.start_period_ms,
            start_interval_ms: p.start_interval_ms,
            disabled: p.disabled,
        }
    }

    /// `service update`'s health flags on the current check (if any).
    pub fn updated(
        old: Option<&HealthCheck>,
        u: &mesh_proto::HealthCheckUpdate,
    ) -> Result<Option<Self>, Refusal> {
        let any_field = u.cmd.is_some()
            || u.interval_ms.is_some()
            || u.timeout_ms.is_some()
            || u.retries.is_some()
            || u.start_period_ms.is_some()
            || u.start_interval_ms.is_some();
        if u.disable {
            if any_field {
                return Err(Refusal::invalid(
                    "--no-healthcheck cannot be combined with --health-* flags",
                ));
            }
            return Ok(Some(HealthCheck {
                disabled: true,
                ..Default::default()
            }));
        }
        if !any_field {
            return Ok(old.cloned());
        }
        // `--health-cmd ""` alone: no check at all, as before one was set.
        if u.cmd.as_deref() == Some("") {
            let timed = u.interval_ms.is_some()
                || u.timeout_ms.is_some()
                || u.retries.is_some()
                || u.start_period_ms.is_some()
                || u.start_interval_ms.is_some();
            if timed {
                return Err(Refusal::invalid(
                    "--health-cmd \"\" removes the check: give no other --health-* flag with it",
                ));
            }
            return Ok(None);
        }
        let mut h = old.filter(|h| h.active()).cloned().unwrap_or_default();
        if let Some(c) = &u.cmd {
            h.cmd = c.clone();
        }
        h.interval_ms = u.interval_ms.unwrap_or(h.interval_ms);
        h.timeout_ms = u.timeout_ms.unwrap_or(h.timeout_ms);
        h.retries = u.retries.unwrap_or(h.retries);
        h.start_period_ms = u.start_period_ms.unwrap_or(h.start_period_ms);
        h.start_interval_ms = u.start_interval_ms.unwrap_or(h.start_interval_ms);
        if h.cmd.is_empty() {
            return Err(Refusal::invalid(
                "the service has no health check to change: give --health-cmd",
            ));
        }
        Ok(Some(h))
    }

    /// What a check must satisfy, for the control API and `apply` alike.
    pub fn validate(&self) -> Result<(), Refusal> {
        let timed = self.interval_ms != 0
            || self.timeout_ms != 0
            || self.retries != 0
            || self.start_period_ms != 0
            || self.start_interval_ms != 0;
        if self.disabled {
            if !self.cmd.is_empty() {
                return Err(Refusal::invalid(
                    "--no-healthcheck cannot be used with --health-cmd",
                ));
            }
            if timed {
                return Err(Refusal::invalid(
                    "--no-healthcheck cannot be combined with --health-* flags",
                ));
            }
            return Ok(());
        }
        if self.cmd.trim().is_empty() {
            return Err(Refusal::invalid(
                "a health check needs a command: give --health-cmd CMD",
            ));
        }
        if self.cmd.len() > MAX_HEALTH_CMD {
            return Err(Refusal::invalid(format!(
                "--health-cmd {} is {} bytes long: use at most {MAX_HEALTH_CMD}",
                mesh_common::input::shorten(&self.cmd),
                self.cmd.len()
            )));
        }
        if self.cmd.contains('\0') {
            return Err(Refusal::invalid("--health-cmd holds a NUL character"));
        }
        for (flag, ms) in [
            ("--health-interval", self.interval_ms),
            ("--health-timeout", self.timeout_ms),
            ("--health-start-period", self.start_period_ms),
            ("--health-start-interval", self.start_interval_ms),
        ] {
            if ms > MAX_HEALTH_DURATION_MS {
                return Err(Refusal::invalid(format!(
                    "{flag} of {}s is too long: use at most 24h",
                    ms / 1000
                )));
            }
        }
        if self.retries > MAX_HEALTH_RETRIES {
            return Err(Refusal::invalid(format!(
                "--health-retries {} is more than the limit of {MAX_HEALTH_RETRIES}",
                self.retries
            )));
        }
        Ok(())
    }
}

/// A task's health as its node reported it; "" while it has no check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskHealth {
    #[default]
    #[serde(rename = "")]
    None,
    #[serde(rename = "starting")]
    Starting,
    #[serde(rename = "healthy")]
    Healthy,
    #[serde(rename = "unhealthy")]
    Unhealthy,
}

impl TaskHealth {
    pub const fn as_str(self) -> &'static str {
        match self {
            TaskHealth::None => "",
            TaskHealth::Starting => "starting",
            TaskHealth::Healthy => "healthy",
            TaskHealth::Unhealthy => "unhealthy",
        }
    }

    pub fn is_none(&self) -> bool {
        *self == TaskHealth::None
    }

    /// A word from a node's report.
    pub fn from_wire(s: &str) -> Result<Self, mesh_common::model::UnknownWord> {
        match s {
            "" => Ok(TaskHealth::None),
            "starting" => Ok(TaskHealth::Starting),
            "healthy" => Ok(TaskHealth::Healthy),
            "unhealthy" => Ok(TaskHealth::Unhealthy),
            _ => Err(mesh_common::model::UnknownWord {
                what: "task health",
                got: s.to_string(),
                allowed: "\"\", starting, healthy, unhealthy",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(cmd: &str) -> HealthCheck {
        HealthCheck {
            cmd: cmd.into(),
            ..Default::default()
        }
    }

    #[test]
    fn checks_are_refused_with_the_reason() {
        assert!(check("true").validate().is_ok());
        let both = HealthCheck {
            disabled: true,
            ..check("true")
        };
        assert!(
            both.validate()
                .expect_err("refused")
                .to_string()
                .contains("--no-healthcheck")
        );
        let timed_off = HealthCheck {
            disabled: true,
            interval_ms: 5,
            ..Default::default()
        };
        assert!(timed_off.validate().is_err());
        assert!(check(" ").validate().is_err());
        assert!(check(&"x".repeat(MAX_HEALTH_CMD + 1)).validate().is_err());
        assert!(check("a\0b").validate().is_err());
        let slow = HealthCheck {
            interval_ms: MAX_HEALTH_DURATION_MS + 1,
            ..check("true")
        };
        assert!(
            slow.validate()
                .expect_err("refused")
                .to_string()
                .contains("--health-interval")
        );
        let many = HealthCheck {
            retries: MAX_HEALTH_RETRIES + 1,
            ..check("true")
        };
        assert!(
            many.validate()
                .expect_err("refused")
                .to_string()
                .contains("--health-retries")
        );
    }

    #[test]
    fn an_update_changes_only_what_it_names() {
        let old = HealthCheck {
            interval_ms: 100,
            retries: 2,
            ..check("true")
        };
        let u = mesh_proto::HealthCheckUpdate {
            retries: Some(5),
            ..Default::default()
        };
        let new = HealthCheck::updated(Some(&old), &u)
            .expect("as expected")
            .expect("as expected");
        assert_eq!(
            (new.cmd.as_str(), new.interval_ms, new.retries),
            ("true", 100, 5)
        );
        // Nothing asked: unchanged.
        let same = HealthCheck::updated(Some(&old), &Default::default()).expect("as expected");
        assert_eq!(same, Some(old.clone()));
        // Disabling drops it; disabling while changing it is refused.
        let off = mesh_proto::HealthCheckUpdate {
            disable: true,
            ..Default::default()
        };
        assert!(
            !HealthCheck::updated(Some(&old), &off)
                .expect("as expected")
                .expect("as expected")
                .active()
        );
        let both = mesh_proto::HealthCheckUpdate {
            disable: true,
            cmd: Some("true".into()),
            ..Default::default()
        };
        assert!(HealthCheck::updated(Some(&old), &both).is_err());
        // Timing without a command on a service without a check.
        assert!(HealthCheck::updated(None, &u).is_err());
        // `--health-cmd ""` clears it, but not with timing.
        let clear = mesh_proto::HealthCheckUpdate {
            cmd: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(
            HealthCheck::updated(Some(&old), &clear).expect("as expected"),
            None
        );
        let clear_timed = mesh_proto::HealthCheckUpdate {
            retries: Some(1),
            ..clear
        };
        assert!(HealthCheck::updated(Some(&old), &clear_timed).is_err());
    }

    #[test]
    fn health_words_round_trip() {
        for h in [
            TaskHealth::None,
            TaskHealth::Starting,
            TaskHealth::Healthy,
            TaskHealth::Unhealthy,
        ] {
            assert_eq!(TaskHealth::from_wire(h.as_str()), Ok(h));
        }
        assert!(TaskHealth::from_wire("sick").is_err());
    }
}
