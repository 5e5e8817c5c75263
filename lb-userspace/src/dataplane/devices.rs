//! The devices xlb attaches to, and the sysctls it sets on them.
//!
//! Ioctls run in the caller's network namespace; `/proc/sys/net` is the caller's namespace's
//! too. Routes toward backends are looked up over netlink by [`crate::addr::route`].

use std::os::fd::{AsRawFd as _, FromRawFd as _};

use super::DataplaneError;

/// The ifindex of `device`, or an error saying it does not exist.
pub fn ifindex(device: &str) -> Result<u32, DataplaneError> {
    let name =
        std::ffi::CString::new(device).map_err(|_| DataplaneError::NoSuchDevice(device.into()))?;
    // SAFETY: name is a valid NUL-terminated string; if_nametoindex has no other preconditions.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(DataplaneError::NoSuchDevice(device.into()));
    }
    Ok(index)
}

/// `struct ethtool_drvinfo` from `linux/ethtool.h`: what `ETHTOOL_GDRVINFO` fills in.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// `ETHTOOL_GDRVINFO` from `linux/ethtool.h`.
const ETHTOOL_GDRVINFO: u32 = 0x03;

/// Runs the interface ioctl `request` on `device` with an `ifreq` naming it (`prepare` fills
/// in the rest), and returns the `ifreq` the kernel wrote back.
fn interface_ioctl(
    device: &str,
    request: libc::c_ulong,
    prepare: impl FnOnce(&mut libc::ifreq),
) -> std::io::Result<libc::ifreq> {
    let name = device.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    // SAFETY: all-zero is a valid ifreq.
    let mut ifreq: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in ifreq.ifr_name.iter_mut().zip(name) {
        *to = *from as libc::c_char;
    }
    prepare(&mut ifreq);
    // SAFETY: plain socket call; the descriptor is owned (and closed) right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq names the device (NUL-terminated within IFNAMSIZ); whatever `prepare`
    // pointed it at outlives the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), request, &mut ifreq) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ifreq)
}

/// The kernel driver of `device` (what `ethtool -i` shows), read with the `SIOCETHTOOL` ioctl;
/// `None` when it cannot be told.
fn driver(device: &str) -> Option<String> {
    // SAFETY: all-zero is a valid value of this plain C struct.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    interface_ioctl(device, libc::SIOCETHTOOL, |ifreq| {
        ifreq.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    })
    .ok()?;
    let len = info
        .driver
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..len]).into_owned())
}

/// `device`'s Ethernet address (`SIOCGIFHWADDR`), which the program compares frames with.
pub fn mac(device: &str) -> Result<[u8; 6], DataplaneError> {
    let ifreq = interface_ioctl(device, libc::SIOCGIFHWADDR, |_| {}).map_err(|source| {
        DataplaneError::DeviceMac {
            device: device.to_owned(),
            source,
        }
    })?;
    // SAFETY: SIOCGIFHWADDR wrote the hardware address member of the union.
    let data = unsafe { ifreq.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (to, from) in mac.iter_mut().zip(data) {
        *to = from as u8;
    }
    Ok(mac)
}

/// Whether `device` is a veth.
pub fn is_veth(device: &str) -> bool {
    driver(device).as_deref() == Some("veth")
}

/// Whether frames sent from native XDP (`XDP_TX`, `XDP_REDIRECT`) into `device` reach the
/// wire. A veth only delivers them when its peer runs an XDP program (or has GRO on), which xlb
/// cannot see or control (the peer sits in a container), and a packet a local sender left for
/// checksum offload reaches the peer with its checksum unfinished (an XDP frame cannot carry
/// that state), so veths say no; other drivers that took a native attach are assumed to
/// implement `ndo_xdp_xmit`.
pub fn native_xmit_ok(device: &str) -> bool {
    driver(device).is_some_and(|driver| driver != "veth")
}

/// Sets an IPv4 sysctl under `/proc/sys/net/ipv4/` (e.g. `ip_forward`, `conf/eth0/rp_filter`).
pub fn set_sysctl(key: &str, value: &str) -> Result<(), DataplaneError> {
    let path = format!("/proc/sys/net/ipv4/{key}");
    std::fs::write(&path, value).map_err(|source| DataplaneError::Sysctl { path, source })
}

/// The sysctls a device xlb attaches to needs: `accept_local=1` (a translated packet passed
/// to the kernel carries one of the LB's own addresses as source) and `rp_filter=2` (loose:
/// the SNAT address may belong to another device).
pub fn set_device_sysctls(device: &str) -> Result<(), DataplaneError> {
    set_sysctl(&format!("conf/{device}/accept_local"), "1")?;
    set_sysctl(&format!("conf/{device}/rp_filter"), "2")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_without_driver_information_has_no_driver() {
        assert_eq!(driver("lo"), None, "loopback has no driver information");
        assert_eq!(driver("xlb-missing0"), None);
        assert_eq!(driver(""), None);
        assert_eq!(driver("a-name-longer-than-ifnamsiz"), None);
    }
}
