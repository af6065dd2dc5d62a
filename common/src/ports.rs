//! Published ports as users write them: `--publish` of a service (Docker's
//! long `published=8080,target=80,protocol=udp,mode=host` and short
//! `8080:80/udp` forms) and `-p [IP:]HOST:CONT[/udp]` of a standalone
//! sandbox. Parsed once here, so the CLI, the daemon and the managers refuse
//! the same input with the same words.

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use crate::model::{Protocol, PublishMode};

/// Where the managers pick a published port when none is given (Swarm's).
pub const DYNAMIC_PORTS: RangeInclusive<u16> = 30000..=32767;

/// Why a port specification was refused; one line naming the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid port specification {spec:?}: {why}")]
pub struct PortError {
    pub spec: String,
    pub why: String,
}

/// One port of a service, as Docker's `PortConfig`; also the managers'
/// `PortSpec`, kept in the Raft log and state as this JSON (field names and
/// order are the stored form: do not rename).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct ServicePort {
    pub protocol: Protocol,
    pub target: u16,
    /// None in a spec: the managers allocate one from [`DYNAMIC_PORTS`].
    /// Always set in a service's `endpoint_ports`.
    #[serde(default)]
    pub published: Option<u16>,
    pub mode: PublishMode,
}

impl ServicePort {
    /// `8080/tcp`, as refusals name a port.
    pub fn label(&self) -> String {
        format!("{}/{}", self.published.unwrap_or(0), self.protocol)
    }
}

impl fmt::Display for ServicePort {
    /// As `docker service ls` shows a port: `*:8080->80/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.published {
            Some(p) => write!(f, "*:{p}->{}/{}", self.target, self.protocol),
            None => write!(f, "*:0->{}/{}", self.target, self.protocol),
        }
    }
}

/// One `-p` binding of a standalone sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortBinding {
    /// None: every address of the node.
    pub host_ip: Option<Ipv4Addr>,
    /// None: the node picks a free one.
    pub host_port: Option<u16>,
    pub container_port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for PortBinding {
    /// As `docker port` prints a binding's host side: `0.0.0.0:8080`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&host_side(self.host_ip, self.host_port.unwrap_or(0)))
    }
}

/// A binding's host side as `docker port` prints it: `0.0.0.0:8080` when
/// bound on every address.
pub fn host_side(ip: Option<Ipv4Addr>, port: u16) -> String {
    format!("{}:{port}", ip.unwrap_or(Ipv4Addr::UNSPECIFIED))
}

fn err(spec: &str, why: impl Into<String>) -> PortError {
    PortError {
        spec: spec.to_string(),
        why: why.into(),
    }
}

/// A port number 1-65535.
pub fn parse_port(spec: &str, s: &str) -> Result<u16, PortError> {
    if s.contains('-') && !s.starts_with('-') {
        return Err(err(
            spec,
            "port ranges are not supported; publish each port",
        ));
    }
    match s.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        Ok(p) => Err(err(spec, format!("port {p} is out of range 1-65535"))),
        Err(_) if s.is_empty() => Err(err(spec, "a port is missing")),
        Err(_) => Err(err(spec, format!("{s:?} is not a port number"))),
    }
}

fn parse_protocol(spec: &str, s: &str) -> Result<Protocol, PortError> {
    s.to_ascii_lowercase().parse().map_err(|_| {
        err(
            spec,
            format!("unknown protocol {s:?}: expected tcp or udp (sctp is not supported)"),
        )
    })
}

/// Splits `80/udp` into the port text and its protocol (None if not given).
fn split_protocol(s: &str) -> Result<(&str, Option<Protocol>), PortError> {
    match s.split_once('/') {
        Some((p, proto)) => Ok((p, Some(parse_protocol(s, proto)?))),
        None => Ok((s, None)),
    }
}

/// A port named with an optional protocol, `8080` or `8080/udp`, as
/// `--publish-rm` and `mesh port` take it: None when no protocol is given
/// (the caller decides whether that means tcp or any).
pub fn parse_port_ref(spec: &str) -> Result<(u16, Option<Protocol>), PortError> {
    let (port, protocol) = split_protocol(spec)?;
    Ok((parse_port(spec, port)?, protocol))
}

/// A service's `--publish`, long or short form.
pub fn parse_service_port(spec: &str) -> Result<ServicePort, PortError> {
    if spec.contains('=') {
        parse_long(spec)
    } else {
        parse_short(spec)
    }
}

fn parse_long(spec: &str) -> Result<ServicePort, PortError> {
    let mut target = None;
    let mut published = None;
    let mut protocol = Protocol::Tcp;
    let mut mode = PublishMode::Ingress;
    for field in spec.split(',') {
        let Some((k, v)) = field.split_once('=') else {
            return Err(err(spec, format!("{field:?} is not KEY=VALUE")));
        };
        match k.trim().to_ascii_lowercase().as_str() {
            "target" => target = Some(parse_port(spec, v.trim())?),
            "published" => published = Some(parse_port(spec, v.trim())?),
            "protocol" => protocol = parse_protocol(spec, v.trim())?,
            "mode" => {
                mode = v.trim().parse().map_err(|_| {
                    err(
                        spec,
                        format!("unknown mode {:?}: expected ingress or host", v.trim()),
                    )
                })?;
            }
            other => {
                return Err(err(
                    spec,
                    format!("unknown key {other:?}: expected published, target, protocol or mode"),
                ));
            }
        }
    }
    let Some(target) = target else {
        return Err(err(spec, "the target port is missing (target=PORT)"));
    };
    Ok(ServicePort {
        protocol,
        target,
        published,
        mode,
    })
}

/// `8080:80`, `8080:80/udp` or `80` (published port allocated).
fn parse_short(spec: &str) -> Result<ServicePort, PortError> {
    let (ports, protocol) = split_protocol(spec)?;
    let protocol = protocol.unwrap_or_default();
    let (published, target) = match ports.split(':').collect::<Vec<_>>().as_slice() {
        [t] => (None, parse_port(spec, t)?),
        [p, t] => (Some(parse_port(spec, p)?), parse_port(spec, t)?),
        _ => {
            return Err(err(
                spec,
                "expected PUBLISHED:TARGET[/PROTOCOL] or published=P,target=T[,protocol=tcp|udp][,mode=ingress|host]",
            ));
        }
    };
    Ok(ServicePort {
        protocol,
        target,
        published,
        mode: PublishMode::Ingress,
    })
}

/// A standalone sandbox's `-p [IP:][HOST]:CONT[/PROTOCOL]`, or `-p CONT`.
pub fn parse_binding(spec: &str) -> Result<PortBinding, PortError> {
    let (ports, protocol) = split_protocol(spec)?;
    let protocol = protocol.unwrap_or_default();
    let parts: Vec<&str> = ports.split(':').collect();
    let ip = |s: &str| -> Result<Option<Ipv4Addr>, PortError> {
        if s.is_empty() {
            return Ok(None);
        }
        s.parse()
            .map(Some)
            .map_err(|_| err(spec, format!("{s:?} is not an IPv4 address to bind on")))
    };
    let host_port = |s: &str| -> Result<Option<u16>, PortError> {
        if s.is_empty() {
            Ok(None)
        } else {
            parse_port(spec, s).map(Some)
        }
    };
    let (host_ip, host_port, container_port) = match parts.as_slice() {
        [c] => (None, None, parse_port(spec, c)?),
        [h, c] => (None, host_port(h)?, parse_port(spec, c)?),
        [i, h, c] => (ip(i)?, host_port(h)?, parse_port(spec, c)?),
        _ => {
            return Err(err(
                spec,
                "expected [IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL]",
            ));
        }
    };
    Ok(PortBinding {
        host_ip,
        host_port,
        container_port,
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_long_and_short_forms() {
        let p =
            parse_service_port("published=8080,target=80,protocol=udp,mode=host").expect("valid");
        assert_eq!(
            p,
            ServicePort {
                protocol: Protocol::Udp,
                target: 80,
                published: Some(8080),
                mode: PublishMode::Host
            }
        );
        let p = parse_service_port("target=80").expect("valid");
        assert_eq!(
            (p.published, p.mode, p.protocol),
            (None, PublishMode::Ingress, Protocol::Tcp)
        );
        let p = parse_service_port("8080:80/udp").expect("valid");
        assert_eq!(
            (p.published, p.target, p.protocol),
            (Some(8080), 80, Protocol::Udp)
        );
        assert_eq!(parse_service_port("80").expect("valid").published, None);
        assert_eq!(
            parse_service_port("8080:80").expect("valid").to_string(),
            "*:8080->80/tcp"
        );
    }

    #[test]
    fn service_bad_input_says_what() {
        for (spec, says) in [
            ("published=0,target=80", "out of range"),
            ("published=70000,target=80", "out of range"),
            ("published=8080", "target port is missing"),
            ("target=80,protocol=sctp", "unknown protocol"),
            ("target=80,mode=global", "unknown mode"),
            ("target=80,colour=red", "unknown key"),
            ("8080:80/icmp", "unknown protocol"),
            ("1:2:3", "expected PUBLISHED:TARGET"),
            ("http:80", "not a port number"),
            ("8080-8081:80", "ranges"),
            (":80", "a port is missing"),
        ] {
            let e = parse_service_port(spec).expect_err(spec).to_string();
            assert!(e.contains(says), "{spec}: {e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn port_refs() {
        assert_eq!(parse_port_ref("8080"), Ok((8080, None)));
        assert_eq!(parse_port_ref("8080/UDP"), Ok((8080, Some(Protocol::Udp))));
        assert_eq!(parse_port_ref("53/tcp"), Ok((53, Some(Protocol::Tcp))));
        for (spec, says) in [
            ("8080/sctp", "unknown protocol"),
            ("0/tcp", "out of range"),
            ("web", "not a port number"),
            ("/udp", "a port is missing"),
        ] {
            let e = parse_port_ref(spec).expect_err(spec).to_string();
            assert!(e.contains(says), "{spec}: {e}");
            assert!(e.contains(spec), "{spec}: {e}");
        }
    }

    #[test]
    fn a_service_port_keeps_its_stored_json() {
        // As a PortSpec written before it became this type.
        let old = r#"{"protocol":"udp","target":53,"published":5353,"mode":"host"}"#;
        let p: ServicePort = serde_json::from_str(old).expect("loads");
        assert_eq!(p.label(), "5353/udp");
        assert_eq!(serde_json::to_string(&p).expect("json"), old);
        let unset: ServicePort =
            serde_json::from_str(r#"{"protocol":"tcp","target":80,"mode":"ingress"}"#)
                .expect("published may be left out");
        assert_eq!(unset.published, None);
        assert_eq!(
            serde_json::to_string(&ServicePort::default()).expect("json"),
            r#"{"protocol":"tcp","target":0,"published":null,"mode":"ingress"}"#
        );
    }

    #[test]
    fn bindings() {
        let b = parse_binding("127.0.0.1:8080:80").expect("valid");
        assert_eq!(
            (b.host_ip, b.host_port, b.container_port),
            (Some(Ipv4Addr::LOCALHOST), Some(8080), 80)
        );
        let b = parse_binding("80").expect("valid");
        assert_eq!((b.host_ip, b.host_port), (None, None));
        let b = parse_binding("5353:53/udp").expect("valid");
        assert_eq!(
            (b.host_port, b.container_port, b.protocol),
            (Some(5353), 53, Protocol::Udp)
        );
        let b = parse_binding("10.0.0.1::80").expect("valid");
        assert_eq!(b.host_port, None);
        assert_eq!(b.to_string(), "10.0.0.1:0");
        for spec in [
            "0:80",
            "8080:65536",
            "x:80:80",
            "a:b:c:d",
            "8080:80/sctp",
            "",
        ] {
            assert!(parse_binding(spec).is_err(), "{spec}");
        }
    }
}
