//! resolv.conf both ways: the host's, read for the upstream resolvers, and
//! the one written into every sandbox, pointing at our resolver.

use std::net::{IpAddr, SocketAddr};

use super::RESOLVER_IP;
use super::records::push_unique;

/// Upstream resolvers from the host's resolv.conf text, port 53.
///
/// Loopback resolvers (systemd-resolved's 127.0.0.53, a local dnsmasq) are
/// kept: they are unreachable from a sandbox, but forwarding is done by the
/// daemon from the node's own namespace, where they work. Link-local IPv6
/// entries with a zone (`fe80::1%eth0`) are skipped: the zone names an
/// interface we would have to resolve, and such setups are rare.
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else { continue };
        if let Ok(ip) = addr.parse::<IpAddr>() {
            push_unique(&mut out, SocketAddr::new(ip, 53));
        }
    }
    out
}

/// The resolv.conf a sandbox sees: our resolver, the host's search domains
/// and options, and `ndots:0` so that single-label names (other sandboxes)
/// are asked as they are first instead of walking the search list.
pub fn sandbox_resolv_conf(host_text: &str) -> String {
    let mut out = format!("nameserver {RESOLVER_IP}\n");
    for line in host_text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("search" | "domain") => {
                out.push_str(line.trim());
                out.push('\n');
            }
            Some("options") => {
                // Our ndots:0 replaces the host's: the sandbox's names are
                // single labels and must not be tried under search domains
                // upstream first.
                let kept: Vec<&str> = words.filter(|o| !o.starts_with("ndots:")).collect();
                if !kept.is_empty() {
                    out.push_str(&format!("options {}\n", kept.join(" ")));
                }
            }
            _ => {}
        }
    }
    out.push_str("options ndots:0\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_upstreams() {
        let text = "# generated\nnameserver 10.0.0.2\nnameserver 127.0.0.53 # local\n\
                    nameserver ::1\nnameserver fe80::1%eth0\nnameserver 10.0.0.2\n\
                    nameserver\nsearch example.com\n";
        assert_eq!(
            upstreams_from_resolv_conf(text),
            vec![
                "10.0.0.2:53".parse::<SocketAddr>().expect("addr"),
                "127.0.0.53:53".parse().expect("addr"),
                "[::1]:53".parse().expect("addr"),
            ]
        );
    }

    #[test]
    fn resolv_conf_for_sandboxes() {
        let host = "nameserver 10.0.0.2\nsearch corp.example lab\n\
                    options ndots:3 timeout:2 edns0\n;comment\n";
        assert_eq!(
            sandbox_resolv_conf(host),
            "nameserver 127.0.0.11\nsearch corp.example lab\n\
             options timeout:2 edns0\noptions ndots:0\n"
        );
        assert_eq!(
            sandbox_resolv_conf(""),
            "nameserver 127.0.0.11\noptions ndots:0\n"
        );
    }
}
