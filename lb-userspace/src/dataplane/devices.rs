//! The devices xlb attaches to, and the sysctls it sets on them.
//!
//! Commands (`ip`) and ioctls run in the caller's network namespace; `/proc/sys/net` is the
//! caller's namespace's too.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _};
use std::process::{Command, Stdio};

use super::DataplaneError;

/// The device through which each of `ips` is routed (`ip route get`, one `ip -batch` process
/// for all). Addresses without a route are left out.
pub fn route_devices(ips: &[Ipv4Addr]) -> Result<BTreeMap<Ipv4Addr, String>, DataplaneError> {
    if ips.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut child = Command::new("ip")
        .args(["-o", "-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| DataplaneError::Command {
            command: "ip -batch".into(),
            source,
        })?;
    {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let script: String = ips.iter().map(|ip| format!("route get {ip}\n")).collect();
        stdin
            .write_all(script.as_bytes())
            .map_err(|source| DataplaneError::Command {
                command: "ip -batch".into(),
                source,
            })?;
    }
    let output = child
        .wait_with_output()
        .map_err(|source| DataplaneError::Command {
            command: "ip -batch".into(),
            source,
        })?;
    Ok(parse_route_get(&String::from_utf8_lossy(&output.stdout)))
}

/// Parses `ip -o route get` lines (`203.0.113.2 dev lb1 src 203.0.113.1 uid 0 \ cache`);
/// `local` routes (the address is the LB's own) are skipped.
pub fn parse_route_get(text: &str) -> BTreeMap<Ipv4Addr, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (first, rest) = match words.first() {
            Some(&"local") => continue,
            Some(first) => (*first, &words[1..]),
            None => continue,
        };
        let Ok(ip) = first.parse::<Ipv4Addr>() else {
            continue;
        };
        if let Some(dev) = rest
            .iter()
            .position(|w| *w == "dev")
            .and_then(|pos| rest.get(pos + 1))
        {
            out.insert(ip, (*dev).to_owned());
        }
    }
    out
}

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

/// The kernel driver of `device` (what `ethtool -i` shows), read with the `SIOCETHTOOL` ioctl;
/// `None` when it cannot be told.
fn driver(device: &str) -> Option<String> {
    let name = device.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return None;
    }
    // SAFETY: all-zero is a valid value of these plain C structs.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    // SAFETY: as above.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(name) {
        *to = *from as libc::c_char;
    }
    request.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    // SAFETY: plain socket call; the descriptor is owned (and closed) right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: request names the device (NUL-terminated within IFNAMSIZ) and points at info,
    // which outlives the call and has the size the kernel writes for ETHTOOL_GDRVINFO.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) };
    if rc != 0 {
        return None;
    }
    let len = info
        .driver
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..len]).into_owned())
}

/// Whether `device` is a veth.
pub fn is_veth(device: &str) -> bool {
    driver(device).as_deref() == Some("veth")
}

/// Whether frames sent from native XDP (`XDP_TX`, `XDP_REDIRECT`) into `device` reach the
/// wire. A veth only delivers them when its peer runs an XDP program (or has GRO on), which xlb
/// cannot see or control (the peer sits in a container), so veths say no; other drivers that
/// took a native attach are assumed to implement `ndo_xdp_xmit`.
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
    fn route_get_output_is_parsed() {
        let text = "203.0.113.2 dev lb1 src 203.0.113.1 uid 0 \\    cache \n\
                    203.0.113.9 via 198.51.100.254 dev eth0 src 198.51.100.1 uid 0 \\    cache \n\
                    local 198.51.100.1 dev lo src 198.51.100.1 uid 0 \\    cache <local> \n";
        let routes = parse_route_get(text);
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[&Ipv4Addr::new(203, 0, 113, 2)], "lb1");
        assert_eq!(routes[&Ipv4Addr::new(203, 0, 113, 9)], "eth0");
    }

    #[test]
    fn a_device_without_driver_information_has_no_driver() {
        assert_eq!(driver("lo"), None, "loopback has no driver information");
        assert_eq!(driver("xlb-missing0"), None);
        assert_eq!(driver(""), None);
        assert_eq!(driver("a-name-longer-than-ifnamsiz"), None);
    }
}
