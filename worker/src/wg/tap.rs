//! The TAP device: opened with a virtio-net header so the kernel can hand
//! over (and accept) whole VXLAN-wrapped bursts instead of single packets.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use super::offload::VNET_HDR_LEN;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
/// GSO over UDP tunnels (kernel >= 6.17), and with outer checksums.
const TUN_F_UDP_TUNNEL_GSO: libc::c_uint = 0x80;
const TUN_F_UDP_TUNNEL_GSO_CSUM: libc::c_uint = 0x100;

/// An open TAP and whether it passes tunnel GSO bursts.
pub struct Tap {
    pub fd: OwnedFd,
    pub tunnel_gso: bool,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates (or attaches to) TAP `name` in the calling thread's namespace.
/// The device lives as long as the returned fd. Returns the failing step on
/// error.
pub fn open(name: &str) -> Result<Tap, (&'static str, io::Error)> {
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(|e| ("open /dev/net/tun", e))?;
    let fd = file.as_raw_fd();
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    if name.len() >= libc::IFNAMSIZ {
        return Err((
            "check the name",
            io::Error::from_raw_os_error(libc::ENAMETOOLONG),
        ));
    }
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
    if unsafe { libc::ioctl(fd, TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(("TUNSETIFF", io::Error::last_os_error()));
    }
    let sz: libc::c_int = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int.
    if unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ, &sz as *const libc::c_int) } < 0 {
        return Err(("TUNSETVNETHDRSZ", io::Error::last_os_error()));
    }
    let base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
    let set = |flags: libc::c_uint| {
        // SAFETY: TUNSETOFFLOAD takes the flags as the argument itself.
        unsafe { libc::ioctl(fd, TUNSETOFFLOAD, flags as libc::c_ulong) >= 0 }
    };
    // MESH_WG_DATAPATH=batch: a diagnostic switch to measure (or work
    // around) the fallback path on a kernel that has tunnel GSO.
    let want_batch = std::env::var("MESH_WG_DATAPATH").is_ok_and(|v| v == "batch");
    let tunnel_gso = !want_batch && set(base | TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM);
    if !tunnel_gso && !set(base) {
        return Err(("TUNSETOFFLOAD", io::Error::last_os_error()));
    }
    Ok(Tap {
        fd: file.into(),
        tunnel_gso,
    })
}
