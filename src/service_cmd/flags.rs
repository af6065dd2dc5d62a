//! The service commands' flags that need more than clap: replica counts,
//! restart delays, `NAME=N` for scale, `-e` and `--label` lists, and the
//! health check flags of `create` and `update`.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, bail};
use mesh_proto::{HealthCheck, HealthCheckUpdate};

/// `--replicas N`: a clear word for negative numbers rather than clap's
/// "unexpected argument".
pub fn parse_replicas(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    if s.parse::<i64>().is_ok_and(|n| n < 0) {
        return Err(format!(
            "replicas cannot be negative (got {s}): use 0 or more"
        ));
    }
    Err(format!(
        "invalid replicas {s:?}: use a whole number, 0 or more"
    ))
}

/// `--restart-delay 5s|500ms|1m30s|0`.
pub fn parse_delay(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    if s.trim().starts_with('-') {
        return Err(format!("a delay cannot be negative (got {s})"));
    }
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?}: {e} (e.g. 5s, 500ms, 1m30s)"))
}

/// `--health-interval 5s` and the like: 0 means Docker's default, anything
/// else must be at least a millisecond (the API counts milliseconds, and a
/// value that rounds to 0 would silently become the default).
pub fn parse_health_duration(s: &str) -> Result<Duration, String> {
    let d = parse_delay(s)?;
    if !d.is_zero() && d < Duration::from_millis(1) {
        return Err(format!(
            "a health check duration of {s} is too short: use at least 1ms, or 0 for the default"
        ));
    }
    Ok(d)
}

/// `--health-retries N`: a clear word for negative numbers.
pub fn parse_health_retries(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    if s.parse::<i64>().is_ok_and(|n| n < 0) {
        return Err(format!(
            "--health-retries cannot be negative (got {s}): use 0 (the default, 3) or more"
        ));
    }
    Err(format!(
        "invalid --health-retries {s:?}: use a whole number, 0 (the default, 3) or more"
    ))
}

/// The health check flags, as Docker's, shared by `service create` and
/// `service update`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct HealthArgs {
    /// Command to check health, run with /bin/sh -c in the task (exit 0 =
    /// healthy); on update, "" removes the check.
    #[arg(long = "health-cmd", id = "health-cmd", value_name = "CMD")]
    pub cmd: Option<String>,
    /// Time between checks (e.g. 5s; 0 = default 30s).
    #[arg(long = "health-interval", id = "health-interval", value_name = "DURATION", allow_hyphen_values = true, value_parser = parse_health_duration)]
    pub interval: Option<Duration>,
    /// Longest a check may run (0 = default 30s).
    #[arg(long = "health-timeout", id = "health-timeout", value_name = "DURATION", allow_hyphen_values = true, value_parser = parse_health_duration)]
    pub timeout: Option<Duration>,
    /// Consecutive failures that make a task unhealthy (0 = default 3).
    #[arg(long = "health-retries", id = "health-retries", value_name = "N", allow_hyphen_values = true, value_parser = parse_health_retries)]
    pub retries: Option<u32>,
    /// Start-up time in which failures do not count until a check passes.
    #[arg(long = "health-start-period", id = "health-start-period", value_name = "DURATION", allow_hyphen_values = true, value_parser = parse_health_duration)]
    pub start_period: Option<Duration>,
    /// Time between checks until the first passes (0 = default 5s).
    #[arg(long = "health-start-interval", id = "health-start-interval", value_name = "DURATION", allow_hyphen_values = true, value_parser = parse_health_duration)]
    pub start_interval: Option<Duration>,
    /// Run no health check.
    #[arg(long = "no-healthcheck", id = "no-healthcheck")]
    pub no_healthcheck: bool,
}

fn millis(d: Option<Duration>) -> Option<u64> {
    d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl HealthArgs {
    fn any_field(&self) -> bool {
        self.cmd.is_some()
            || self.interval.is_some()
            || self.timeout.is_some()
            || self.retries.is_some()
            || self.start_period.is_some()
            || self.start_interval.is_some()
    }

    /// The check `service create` asks for; None without any flag. The
    /// managers check the combination (e.g. timing without a command).
    pub(super) fn for_create(&self) -> Result<Option<HealthCheck>> {
        if self.no_healthcheck && self.any_field() {
            bail!("--no-healthcheck cannot be combined with --health-* flags");
        }
        if !self.no_healthcheck && !self.any_field() {
            return Ok(None);
        }
        Ok(Some(HealthCheck {
            cmd: self.cmd.clone().unwrap_or_default(),
            interval_ms: millis(self.interval).unwrap_or(0),
            timeout_ms: millis(self.timeout).unwrap_or(0),
            retries: self.retries.unwrap_or(0),
            start_period_ms: millis(self.start_period).unwrap_or(0),
            start_interval_ms: millis(self.start_interval).unwrap_or(0),
            disabled: self.no_healthcheck,
        }))
    }

    /// What `service update` changes; None without any flag.
    pub(super) fn for_update(&self) -> Result<Option<HealthCheckUpdate>> {
        if self.no_healthcheck && self.any_field() {
            bail!("--no-healthcheck cannot be combined with --health-* flags");
        }
        if !self.no_healthcheck && !self.any_field() {
            return Ok(None);
        }
        Ok(Some(HealthCheckUpdate {
            cmd: self.cmd.clone(),
            interval_ms: millis(self.interval),
            timeout_ms: millis(self.timeout),
            retries: self.retries,
            start_period_ms: millis(self.start_period),
            start_interval_ms: millis(self.start_interval),
            disable: self.no_healthcheck,
        }))
    }
}

/// `mesh service scale NAME=N`.
pub fn parse_scale(s: &str) -> Result<(String, u64), String> {
    let Some((name, n)) = s.split_once('=') else {
        return Err(format!(
            "invalid scale specifier {s:?}: use SERVICE=REPLICAS"
        ));
    };
    if name.is_empty() {
        return Err(format!(
            "invalid scale specifier {s:?}: use SERVICE=REPLICAS"
        ));
    }
    let n = parse_replicas(n).map_err(|e| format!("{name}: {e}"))?;
    Ok((name.to_string(), n))
}

/// `-e K=V` as given; a bare `-e K` takes K's value from `lookup` (this
/// shell's environment) and is dropped if unset, as Docker does.
pub(super) fn env_from_flags(
    items: Vec<String>,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for item in items {
        match item.split_once('=') {
            Some(("", _)) => bail!("invalid environment variable {item:?}: use -e KEY=VALUE"),
            Some(_) => out.push(item),
            None if item.is_empty() => bail!("invalid environment variable \"\": use -e KEY=VALUE"),
            None => {
                if let Some(v) = lookup(&item) {
                    out.push(format!("{item}={v}"));
                }
            }
        }
    }
    Ok(out)
}

/// `--label K=V`; a bare K means an empty value.
pub(super) fn labels(items: Vec<String>) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for item in items {
        let (k, v) = item.split_once('=').unwrap_or((item.as_str(), ""));
        if k.is_empty() {
            bail!("invalid --label {item:?}: use --label KEY=VALUE");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service_cmd::show::human_duration;

    #[test]
    fn replicas_and_scale() {
        assert_eq!(parse_replicas("3"), Ok(3));
        assert_eq!(parse_replicas("0"), Ok(0));
        assert!(parse_replicas("-1").is_err_and(|e| e.contains("cannot be negative")));
        assert!(parse_replicas("two").is_err_and(|e| e.contains("whole number")));
        assert_eq!(parse_scale("web=5"), Ok(("web".to_string(), 5)));
        assert_eq!(parse_scale("a.b=0"), Ok(("a.b".to_string(), 0)));
        assert!(parse_scale("web").is_err_and(|e| e.contains("SERVICE=REPLICAS")));
        assert!(parse_scale("=3").is_err());
        assert!(parse_scale("web=-2").is_err_and(|e| e.starts_with("web: ")));
        assert!(parse_scale("web=").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_delay("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_delay("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_delay("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_delay("0"), Ok(Duration::ZERO));
        assert!(parse_delay("soon").is_err());
        assert_eq!(
            human_duration(Duration::from_millis(300)),
            "less than a second"
        );
        assert_eq!(human_duration(Duration::from_secs(3)), "3 seconds");
        assert_eq!(human_duration(Duration::from_secs(70)), "about a minute");
        assert_eq!(human_duration(Duration::from_secs(3 * 3600)), "3 hours");
    }

    #[test]
    fn health_flags() {
        assert_eq!(parse_health_duration("0"), Ok(Duration::ZERO));
        assert_eq!(
            parse_health_duration("250ms"),
            Ok(Duration::from_millis(250))
        );
        assert!(parse_health_duration("-1s").is_err_and(|e| e.contains("negative")));
        assert!(parse_health_duration("10us").is_err_and(|e| e.contains("at least 1ms")));
        assert!(parse_health_duration("fast").is_err());
        assert_eq!(parse_health_retries("2"), Ok(2));
        assert!(parse_health_retries("-1").is_err_and(|e| e.contains("negative")));
        assert!(parse_health_retries("x").is_err());

        assert_eq!(HealthArgs::default().for_create().expect("none"), None);
        let a = HealthArgs {
            cmd: Some("true".into()),
            interval: Some(Duration::from_millis(1500)),
            retries: Some(2),
            ..Default::default()
        };
        let c = a.for_create().expect("valid").expect("a check");
        assert_eq!(
            (c.cmd.as_str(), c.interval_ms, c.timeout_ms, c.retries),
            ("true", 1500, 0, 2)
        );
        let u = a.for_update().expect("valid").expect("an update");
        assert_eq!((u.interval_ms, u.timeout_ms), (Some(1500), None));
        let off = HealthArgs {
            no_healthcheck: true,
            ..Default::default()
        };
        assert!(off.for_create().expect("valid").expect("a check").disabled);
        assert!(off.for_update().expect("valid").expect("an update").disable);
        let both = HealthArgs {
            no_healthcheck: true,
            ..a
        };
        assert!(both.for_create().is_err());
        assert!(both.for_update().is_err());
    }

    #[test]
    fn health_flags_parse_beside_the_command() {
        use crate::cli::{Cli, Cmd, ServiceCmd};
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "mesh",
            "service",
            "create",
            "--name",
            "s",
            "--health-cmd",
            "curl -f x",
            "--health-retries",
            "2",
            "--",
            "sleep",
            "1",
        ])
        .expect("parses");
        let Cmd::Service(ServiceCmd::Create(a)) = cli.cmd else {
            panic!("not service create");
        };
        assert_eq!(a.cmd, ["sleep", "1"]);
        assert_eq!(a.health.cmd.as_deref(), Some("curl -f x"));
        assert_eq!(a.health.retries, Some(2));
        let cli = Cli::try_parse_from(["mesh", "service", "update", "--no-healthcheck", "web"])
            .expect("parses");
        let Cmd::Service(ServiceCmd::Update(a)) = cli.cmd else {
            panic!("not service update");
        };
        assert!(a.health.no_healthcheck && a.health.cmd.is_none());
    }

    #[test]
    fn env_flags() {
        let lookup = |k: &str| (k == "HOME").then(|| "/root".to_string());
        let env = env_from_flags(
            vec!["A=1".into(), "HOME".into(), "UNSET".into(), "B=x=y".into()],
            lookup,
        )
        .expect("valid");
        assert_eq!(env, ["A=1", "HOME=/root", "B=x=y"]);
        assert!(env_from_flags(vec!["=1".into()], lookup).is_err());
    }
}
