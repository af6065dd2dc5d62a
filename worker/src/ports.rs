//! Host ports of standalone sandboxes (`mesh run -p`), as Docker hands them
//! out: one protocol + port + address per node, `0.0.0.0` overlapping every
//! address, a free port chosen from the ephemeral range when none is given,
//! and a port a host process already holds refused (Docker's docker-proxy
//! binds it; we try to). Pure except [`probe`], so the rules are tested
//! without a kernel.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::ops::RangeInclusive;

use mesh_common::model::Protocol;
use mesh_common::ports::PortBinding;
use serde::{Deserialize, Serialize};

/// Where Docker picks a host port when `-p` gives none (Linux's default
/// ephemeral range).
pub const EPHEMERAL: RangeInclusive<u16> = 32768..=60999;

/// One binding as bound: the host port is always known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Published {
    /// None: every address of the node (`0.0.0.0`).
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

impl Published {
    /// `0.0.0.0:8080`, the host side as `docker port` prints it.
    pub fn host(&self) -> String {
        mesh_common::ports::host_side(self.host_ip, self.host_port)
    }

    /// Whether both would receive the same packets: same protocol and port,
    /// and one address is everything or both are the same.
    pub fn overlaps(&self, other: &Published) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && match (self.host_ip, other.host_ip) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// Why a binding was refused; the words are Docker's where it has some.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortsError {
    #[error("Bind for {0} failed: port is already allocated")]
    Allocated(String),
    #[error("Bind for {host} failed: {reason}")]
    Busy { host: String, reason: String },
    #[error("no free host port left in 32768-60999 for {0}: remove sandboxes that publish ports")]
    Exhausted(String),
    #[error("invalid port binding: {0}")]
    Invalid(String),
}

/// Turns the wire form into a binding, checking each field again: the
/// daemon never trusts the CLI to have parsed it.
pub fn from_wire(
    host_ip: &str,
    host_port: u32,
    container_port: u32,
    protocol: &str,
) -> Result<PortBinding, PortsError> {
    let host_ip = match host_ip.trim() {
        "" | "0.0.0.0" => None,
        s => Some(
            s.parse::<Ipv4Addr>()
                .map_err(|_| PortsError::Invalid(format!("{s:?} is not an IPv4 address")))?,
        ),
    };
    let port = |p: u32, what: &str| {
        u16::try_from(p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| PortsError::Invalid(format!("{what} {p} is out of range 1-65535")))
    };
    let host_port = if host_port == 0 {
        None
    } else {
        Some(port(host_port, "host port")?)
    };
    let container_port = port(container_port, "container port")?;
    let protocol = Protocol::from_wire(protocol).map_err(|_| {
        PortsError::Invalid(format!(
            "unknown protocol {protocol:?}: expected tcp or udp"
        ))
    })?;
    Ok(PortBinding {
        host_ip,
        host_port,
        container_port,
        protocol,
    })
}

/// Chooses the host side of every binding of one new sandbox, against
/// `taken` (every other sandbox's bindings on this node). `free` says
/// whether the host could bind it right now ([`probe`] in the daemon).
/// All or nothing: the first refusal is returned.
pub fn allocate(
    wanted: &[PortBinding],
    taken: &[Published],
    free: impl Fn(&Published) -> Result<(), String>,
) -> Result<Vec<Published>, PortsError> {
    let mut out: Vec<Published> = Vec::new();
    let clash =
        |p: &Published, out: &[Published]| taken.iter().chain(out.iter()).any(|t| t.overlaps(p));
    for b in wanted {
        if b.container_port == 0 || b.host_port == Some(0) {
            return Err(PortsError::Invalid("port 0 is out of range 1-65535".into()));
        }
        let mut p = Published {
            host_ip: b.host_ip.filter(|ip| !ip.is_unspecified()),
            host_port: b.host_port.unwrap_or(0),
            container_port: b.container_port,
            protocol: b.protocol,
        };
        if b.host_port.is_some() {
            if clash(&p, &out) {
                return Err(PortsError::Allocated(p.host()));
            }
            free(&p).map_err(|reason| PortsError::Busy {
                host: p.host(),
                reason,
            })?;
        } else {
            let found = EPHEMERAL.clone().find(|port| {
                p.host_port = *port;
                !clash(&p, &out) && free(&p).is_ok()
            });
            let Some(port) = found else {
                p.host_port = 0;
                return Err(PortsError::Exhausted(format!(
                    "{}/{}",
                    p.container_port, p.protocol
                )));
            };
            p.host_port = port;
        }
        out.push(p);
    }
    Ok(out)
}

/// Whether a host process holds the port: bind it for a moment, as
/// docker-proxy would for good. Runs in the calling thread's namespace
/// (the daemon's: the node's).
pub fn probe(p: &Published) -> Result<(), String> {
    let addr = SocketAddrV4::new(p.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED), p.host_port);
    let r = match p.protocol {
        Protocol::Tcp => TcpListener::bind(addr).map(drop),
        Protocol::Udp => UdpSocket::bind(addr).map(drop),
    };
    r.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => "address already in use by a process on this node".into(),
        std::io::ErrorKind::AddrNotAvailable => {
            "cannot assign requested address: it is not an address of this node".into()
        }
        _ => e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(ip: Option<[u8; 4]>, host: Option<u16>, cont: u16, proto: Protocol) -> PortBinding {
        PortBinding {
            host_ip: ip.map(Ipv4Addr::from),
            host_port: host,
            container_port: cont,
            protocol: proto,
        }
    }

    fn p(ip: Option<[u8; 4]>, host: u16, proto: Protocol) -> Published {
        Published {
            host_ip: ip.map(Ipv4Addr::from),
            host_port: host,
            container_port: 80,
            protocol: proto,
        }
    }

    fn any(_: &Published) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn overlap_rules() {
        use Protocol::{Tcp, Udp};
        let all = p(None, 8080, Tcp);
        assert!(all.overlaps(&p(Some([127, 0, 0, 1]), 8080, Tcp)));
        assert!(p(Some([127, 0, 0, 1]), 8080, Tcp).overlaps(&all));
        assert!(!p(Some([127, 0, 0, 1]), 8080, Tcp).overlaps(&p(Some([10, 0, 0, 1]), 8080, Tcp)));
        assert!(!all.overlaps(&p(None, 8080, Udp)), "tcp and udp are apart");
        assert!(!all.overlaps(&p(None, 8081, Tcp)));
    }

    #[test]
    fn a_taken_port_is_refused_with_dockers_words() {
        let taken = [p(None, 8080, Protocol::Tcp)];
        let e =
            allocate(&[b(None, Some(8080), 80, Protocol::Tcp)], &taken, any).expect_err("taken");
        assert_eq!(
            e.to_string(),
            "Bind for 0.0.0.0:8080 failed: port is already allocated"
        );
        let e = allocate(
            &[b(Some([127, 0, 0, 1]), Some(8080), 80, Protocol::Tcp)],
            &taken,
            any,
        )
        .expect_err("0.0.0.0 overlaps loopback");
        assert_eq!(
            e.to_string(),
            "Bind for 127.0.0.1:8080 failed: port is already allocated"
        );
        // The same request twice in one run clashes with itself.
        let twice = [
            b(None, Some(9000), 80, Protocol::Tcp),
            b(None, Some(9000), 81, Protocol::Tcp),
        ];
        assert!(matches!(
            allocate(&twice, &[], any),
            Err(PortsError::Allocated(_))
        ));
        // udp beside tcp is fine.
        let ok = allocate(&[b(None, Some(8080), 53, Protocol::Udp)], &taken, any).expect("udp");
        assert_eq!(ok[0].host_port, 8080);
    }

    #[test]
    fn a_busy_port_is_refused_and_chosen_ports_skip_used_ones() {
        let e = allocate(&[b(None, Some(8080), 80, Protocol::Tcp)], &[], |_| {
            Err("address already in use by a process on this node".into())
        })
        .expect_err("busy");
        assert!(
            e.to_string()
                .starts_with("Bind for 0.0.0.0:8080 failed: address already in use"),
            "{e}"
        );
        let taken = [p(None, 32768, Protocol::Tcp)];
        let got = allocate(
            &[
                b(None, None, 80, Protocol::Tcp),
                b(None, None, 81, Protocol::Tcp),
            ],
            &taken,
            |x| {
                if x.host_port == 32770 {
                    Err("busy".into())
                } else {
                    Ok(())
                }
            },
        )
        .expect("free ports");
        assert_eq!(
            got.iter().map(|x| x.host_port).collect::<Vec<_>>(),
            vec![32769, 32771]
        );
        let e = allocate(&[b(None, None, 80, Protocol::Udp)], &[], |_| {
            Err("no".into())
        })
        .expect_err("exhausted");
        assert!(matches!(e, PortsError::Exhausted(_)), "{e}");
    }

    #[test]
    fn wire_input_is_checked_again() {
        assert!(from_wire("", 0, 80, "tcp").expect("ok").host_port.is_none());
        assert_eq!(
            from_wire("0.0.0.0", 8080, 80, "udp").expect("ok").host_ip,
            None
        );
        for (ip, h, c, pr) in [
            ("x", 1, 80, "tcp"),
            ("", 70000, 80, "tcp"),
            ("", 1, 0, "tcp"),
            ("", 1, 80, "sctp"),
        ] {
            assert!(from_wire(ip, h, c, pr).is_err(), "{ip} {h} {c} {pr}");
        }
    }

    #[test]
    fn probe_sees_a_listener() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let e = probe(&p(Some([127, 0, 0, 1]), port, Protocol::Tcp)).expect_err("held");
        assert!(e.contains("already in use"), "{e}");
        drop(l);
        probe(&p(Some([127, 0, 0, 1]), port, Protocol::Tcp)).expect("free again");
    }
}
