//! The service commands' flags that need more than clap: replica counts,
//! restart delays, `NAME=N` for scale, `-e` and `--label` lists.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Result, bail};

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
