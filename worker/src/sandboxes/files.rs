//! The files a sandbox's processes see in place of the host's: /etc/hosts
//! and, when it has no resolver of its own, resolv.conf.

use super::Record;

/// /etc/hosts as Docker writes it: localhost, then the sandbox's own name on
/// its first address.
pub(super) fn hosts_file(rec: &Record) -> String {
    let mut s = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    );
    if let Some(a) = rec.networks.first() {
        s.push_str(&format!("{}\t{}\n", a.ip, rec.name));
    } else if let Some(ip) = rec.egress_ip {
        s.push_str(&format!("{ip}\t{}\n", rec.name));
    }
    s
}

/// The host's resolvers, minus loopback ones a sandbox cannot reach.
pub(super) fn host_resolv_conf(host: &str) -> String {
    host.lines()
        .filter(|l| !(l.starts_with("nameserver") && (l.contains(" 127.") || l.contains(" ::1"))))
        .map(|l| format!("{l}\n"))
        .collect()
}

pub(super) fn read_host_resolv_conf() -> String {
    std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
}

pub(super) fn now() -> String {
    crate::rfc3339(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_resolvers_are_dropped() {
        let host = "search lab\nnameserver 127.0.0.53\nnameserver 192.0.2.53\nnameserver ::1\n";
        assert_eq!(
            host_resolv_conf(host),
            "search lab\nnameserver 192.0.2.53\n"
        );
    }

    #[test]
    fn hosts_names_the_sandbox_on_its_first_address() {
        let mut r: Record = serde_json::from_str(
            r#"{"id":"x","name":"web","netns":"n","pid":0,"cmd":[],"env":[],"networks":[],
                "egress_ip":"172.18.0.2","created_at":""}"#,
        )
        .expect("record");
        assert!(hosts_file(&r).ends_with("172.18.0.2\tweb\n"));
        r.egress_ip = None;
        assert!(hosts_file(&r).ends_with("ip6-allrouters\n"));
    }
}
