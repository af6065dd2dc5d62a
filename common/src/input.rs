//! Limits on free-form words users type (labels, DNS aliases), shared by
//! the managers' checks, the node's own checks and the CLI, so each is
//! refused the same way wherever it enters.

use crate::refusal::Refusal;

/// Longest label key: long enough for reverse-DNS keys
/// (`com.example.team.owner`), short enough to print.
pub const MAX_LABEL_KEY: usize = 255;
/// Longest label value: labels are metadata carried in every view and
/// Raft entry, not a place for documents.
pub const MAX_LABEL_VALUE: usize = 4096;
/// Most labels on one object, for the same reason.
pub const MAX_LABELS: usize = 64;

/// Why a label key cannot be used, if it cannot: empty, too long, or
/// holding whitespace, `=` or control characters (which would break the
/// one-line `K=V` forms it is shown and matched in).
pub fn check_label_key(flag: &str, key: &str) -> Result<(), Refusal> {
    if key.is_empty() {
        return Err(Refusal::invalid(format!(
            "invalid {flag}: a label needs a key: use {flag} KEY=VALUE"
        )));
    }
    if key.len() > MAX_LABEL_KEY {
        return Err(Refusal::invalid(format!(
            "invalid {flag}: label key {}... is {} bytes long: use at most {MAX_LABEL_KEY}",
            shorten(key),
            key.len()
        )));
    }
    if key
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '=')
    {
        return Err(Refusal::invalid(format!(
            "invalid {flag}: label key {key:?} has a space, '=' or control character"
        )));
    }
    Ok(())
}

/// Why a set of labels cannot be stored, if it cannot: each key as
/// [`check_label_key`], values of at most [`MAX_LABEL_VALUE`] bytes without
/// control characters, at most [`MAX_LABELS`] of them.
pub fn check_labels<'a>(
    flag: &str,
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), Refusal> {
    let mut count = 0;
    for (k, v) in labels {
        count += 1;
        check_label_key(flag, k)?;
        if v.len() > MAX_LABEL_VALUE {
            return Err(Refusal::invalid(format!(
                "invalid {flag}: the value of label {k} is {} bytes long: use at most {MAX_LABEL_VALUE}",
                v.len()
            )));
        }
        if v.chars().any(char::is_control) {
            return Err(Refusal::invalid(format!(
                "invalid {flag}: the value of label {k} has a control character"
            )));
        }
    }
    if count > MAX_LABELS {
        return Err(Refusal::invalid(format!(
            "{count} labels given with {flag}: use at most {MAX_LABELS}"
        )));
    }
    Ok(())
}

/// What a user typed into a network create that no state can make right,
/// cluster or local network alike: a subnet in a range hosts cannot use,
/// labels beyond their limits. Checked before anything is made.
pub fn check_network_words<'a>(
    subnet: &str,
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), Refusal> {
    if !subnet.is_empty() {
        let net = crate::ipam::parse_subnet(subnet)?;
        crate::ipam::check_usable(&net, "subnet")?;
    }
    check_labels("--label", labels)
}

/// Why a DNS alias (`--network-alias`, `network connect --alias`) cannot be
/// used: it must be a DNS name the embedded resolver can answer, dot-separated
/// labels of letters, digits, `-` and `_` (1-63 each, 253 in all), not
/// starting or ending with `-`.
pub fn check_alias(alias: &str) -> Result<(), Refusal> {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if alias.len() <= 253 && alias.split('.').all(label_ok) {
        return Ok(());
    }
    Err(Refusal::invalid(format!(
        "invalid alias {:?}: use a DNS name of letters, digits, '-' and '_' in dot-separated parts of 1 to 63 characters",
        shorten(alias)
    )))
}

/// The start of a long value, for messages that must stay one short line.
pub fn shorten(s: &str) -> String {
    const SHOWN: usize = 40;
    if s.chars().count() <= SHOWN {
        return s.to_string();
    }
    let head: String = s.chars().take(SHOWN).collect();
    format!("{head}...")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn labels(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn labels_within_limits_pass() {
        let ok = labels(&[("com.example.team", "net".into()), ("empty", String::new())]);
        assert!(check_labels("--label", &ok).is_ok());
        let max = labels(&[("k", "v".repeat(MAX_LABEL_VALUE))]);
        assert!(check_labels("--label", &max).is_ok());
    }

    #[test]
    fn bad_labels_are_refused() {
        for (bad, says) in [
            (labels(&[("", "v".into())]), "needs a key"),
            (labels(&[("a b", "v".into())]), "space"),
            (labels(&[("a\nb", "v".into())]), "control"),
            (labels(&[(&*"k".repeat(256), "v".into())]), "at most 255"),
            (
                labels(&[("k", "v".repeat(MAX_LABEL_VALUE + 1))]),
                "at most 4096",
            ),
            (labels(&[("k", "a\nb".into())]), "control character"),
        ] {
            let e = check_labels("--label", &bad).expect_err("refused");
            assert!(e.contains(says), "{e}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
        let many: BTreeMap<String, String> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert!(check_labels("--label", &many).is_err_and(|e| e.contains("at most 64")));
    }

    #[test]
    fn aliases_are_dns_names() {
        for ok in ["www", "a.b-c", "db_1", &"a".repeat(63)] {
            assert!(check_alias(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "-x",
            "x-",
            "a..b",
            ".a",
            "é",
            &"a".repeat(64),
            "a/b",
        ] {
            assert!(check_alias(bad).is_err(), "{bad:?}");
        }
    }
}
