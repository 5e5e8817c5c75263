//! Asking "who has this address?" on a test namespace's device with a raw `AF_PACKET` socket,
//! to count how many hosts answer ARP for a VIP.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::servers::spawn_in;

const ETH_P_ARP: u16 = 0x0806;

/// The MAC addresses that answer an ARP request for `target` sent from `device` in `ns`
/// (with sender address `from`) within `wait`.
pub fn who_has(
    ns: &Netns,
    device: &str,
    from: Ipv4Addr,
    target: Ipv4Addr,
    wait: Duration,
) -> BTreeSet<[u8; 6]> {
    let device = device.to_owned();
    spawn_in(ns, move || ask(&device, from, target, wait))
        .join()
        .expect("ARP thread")
        .unwrap_or_else(|error| panic!("asking who has {target}: {error}"))
}

fn ask(
    device: &str,
    from: Ipv4Addr,
    target: Ipv4Addr,
    wait: Duration,
) -> std::io::Result<BTreeSet<[u8; 6]>> {
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(device).map_err(std::io::Error::other)?;
    // SAFETY: name is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mac = hardware_address(&fd, device)?;
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ARP.to_be();
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: addr is valid for `len`.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 20_000,
    };
    // SAFETY: timeout is valid for the length passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let mut frame = [0u8; 42];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    frame[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame[22..28].copy_from_slice(&mac);
    frame[28..32].copy_from_slice(&from.octets());
    frame[38..42].copy_from_slice(&target.octets());
    // SAFETY: frame and addr are valid for the lengths passed.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            len,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut answers = BTreeSet::new();
    let deadline = Instant::now() + wait;
    let mut buffer = [0u8; 128];
    while Instant::now() < deadline {
        // SAFETY: buffer is valid for writes of its length.
        let read =
            unsafe { libc::recv(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
        if read < 42 {
            continue;
        }
        let reply = &buffer[..read as usize];
        let is_reply = reply[12..14] == ETH_P_ARP.to_be_bytes() && reply[20..22] == [0, 2];
        if is_reply && reply[28..32] == target.octets() {
            let mut sender = [0u8; 6];
            sender.copy_from_slice(&reply[22..28]);
            answers.insert(sender);
        }
    }
    Ok(answers)
}

/// The Ethernet address of `device`.
fn hardware_address(fd: &OwnedFd, device: &str) -> std::io::Result<[u8; 6]> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(device.bytes().take(15)) {
        *slot = byte as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the name from and writes the address into `request`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut request) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR filled the hardware address member of the union.
    let data = unsafe { request.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (slot, byte) in mac.iter_mut().zip(data.iter()) {
        *slot = *byte as u8;
    }
    Ok(mac)
}
