//! Gratuitous ARP: after a VIP is placed on the link device (or adopted after a restart), its
//! neighbours are told at once rather than when their cache entry expires.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::Duration;

use super::AddrError;
use super::netlink::Link;

/// Gratuitous ARP: how many announcements per VIP, and the gap between them.
const GARP_COUNT: usize = 3;
const GARP_GAP: Duration = Duration::from_millis(100);

/// Announces `vips` on `link` with gratuitous ARP, [`GARP_COUNT`] times each: the first round
/// before returning, the others from a background task (so call it inside a tokio runtime).
/// A device without an Ethernet address gets none.
pub(super) fn announce(link: &Link, vips: &[Ipv4Addr]) -> Result<(), AddrError> {
    let Some(mac) = link.mac else {
        tracing::debug!(device = %link.name, "device has no Ethernet address: no gratuitous ARP");
        return Ok(());
    };
    if vips.is_empty() {
        return Ok(());
    }
    let arp_error = |source| AddrError::Arp {
        vips: vips.to_vec(),
        device: link.name.clone(),
        source,
    };
    let socket = ArpSocket::open(link.index).map_err(arp_error)?;
    for &vip in vips {
        socket.send(&garp_frame(mac, vip)).map_err(arp_error)?;
        tracing::debug!(vip = %vip, device = %link.name, round = 0, "gratuitous ARP sent");
    }
    // The repeats go out in the background: waiting for them held the whole control loop
    // (data plane, status) for (GARP_COUNT - 1) * GARP_GAP = 200 ms on every new VIP.
    let (vips, device) = (vips.to_vec(), link.name.clone());
    tokio::spawn(async move {
        for round in 1..GARP_COUNT {
            tokio::time::sleep(GARP_GAP).await;
            for &vip in &vips {
                if let Err(error) = socket.send(&garp_frame(mac, vip)) {
                    tracing::warn!(%error, vip = %vip, %device, round, "repeating gratuitous ARP failed");
                    return;
                }
                tracing::debug!(vip = %vip, %device, round, "gratuitous ARP sent");
            }
        }
    });
    Ok(())
}

/// Ethernet type of ARP.
const ETH_P_ARP: u16 = 0x0806;
/// Length of an Ethernet frame carrying an IPv4-over-Ethernet ARP packet (no padding; the
/// driver pads to 60 bytes).
const GARP_LEN: usize = 42;

/// A gratuitous ARP request for `vip` from `mac`: broadcast, sender and target address both
/// the VIP, target hardware address zero (RFC 5227 "ARP announcement"). Multi-byte fields are
/// big-endian, as on the wire.
fn garp_frame(mac: [u8; 6], vip: Ipv4Addr) -> [u8; GARP_LEN] {
    request_frame(mac, vip, vip)
}

/// A broadcast ARP request from `mac`/`sender` for `target`.
pub(super) fn request_frame(mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> [u8; GARP_LEN] {
    let mut frame = [0u8; GARP_LEN];
    frame[0..6].copy_from_slice(&[0xff; 6]); // destination: broadcast
    frame[6..12].copy_from_slice(&mac); // source
    frame[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    frame[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    frame[18] = 6; // hardware address length
    frame[19] = 4; // protocol address length
    frame[20..22].copy_from_slice(&1u16.to_be_bytes()); // operation: request
    frame[22..28].copy_from_slice(&mac); // sender hardware address
    frame[28..32].copy_from_slice(&sender.octets()); // sender protocol address
    // 32..38: target hardware address, zero.
    frame[38..42].copy_from_slice(&target.octets()); // target protocol address
    frame
}

/// The sender protocol address of an ARP frame (request or reply), if `frame` is one.
pub(super) fn arp_sender(frame: &[u8]) -> Option<Ipv4Addr> {
    let is_arp = frame.get(12..14)? == ETH_P_ARP.to_be_bytes()
        && frame.get(14..20)? == [0, 1, 0x08, 0, 6, 4];
    if !is_arp {
        return None;
    }
    let sender: [u8; 4] = frame.get(28..32)?.try_into().ok()?;
    Some(Ipv4Addr::from(sender))
}

/// An `AF_PACKET` raw socket for ARP on one device, for sending whole Ethernet frames (and,
/// once bound, receiving them).
pub(super) struct ArpSocket {
    fd: OwnedFd,
    ifindex: u32,
}

impl ArpSocket {
    pub(super) fn open(ifindex: u32) -> std::io::Result<ArpSocket> {
        // SAFETY: socket() takes no pointers; the result is checked before use.
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
        // SAFETY: fd is a socket just opened by us and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(ArpSocket { fd, ifindex })
    }

    /// Receives only the ARP frames of this device from now on, waiting at most `timeout`
    /// for each.
    pub(super) fn bind_for_receiving(&self, timeout: Duration) -> std::io::Result<()> {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ARP.to_be();
        addr.sll_ifindex = i32::try_from(self.ifindex).map_err(std::io::Error::other)?;
        // SAFETY: addr is valid for the length passed.
        let bound = unsafe {
            libc::bind(
                self.fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if bound < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let timeval = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: timeval is valid for the length passed.
        let set = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next frame, or `None` when none came within the receive timeout.
    pub(super) fn receive(&self, buffer: &mut [u8]) -> std::io::Result<Option<usize>> {
        // SAFETY: buffer is valid for writes of its length.
        let read = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if read < 0 {
            let error = std::io::Error::last_os_error();
            return match error.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(None),
                _ => Err(error),
            };
        }
        Ok(Some(read as usize))
    }

    pub(super) fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ARP.to_be();
        addr.sll_ifindex = i32::try_from(self.ifindex).map_err(std::io::Error::other)?;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: frame and addr are valid for the lengths passed, and outlive the call.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_garp_frame_is_an_arp_announcement() {
        let mac = [0x02, 0, 0, 0, 0, 0x01];
        let frame = garp_frame(mac, Ipv4Addr::new(198, 51, 100, 10));
        let expected: [u8; GARP_LEN] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 0x01, 0x08,
            0x06, // Ethernet
            0, 1, 0x08, 0, 6, 4, 0, 1, // htype, ptype, hlen, plen, op = request
            0x02, 0, 0, 0, 0, 0x01, 198, 51, 100, 10, // sender
            0, 0, 0, 0, 0, 0, 198, 51, 100, 10, // target
        ];
        assert_eq!(frame, expected);
    }
}

#[cfg(test)]
mod frame_tests {
    use super::*;

    #[test]
    fn addr_arp_sender_reads_requests_and_replies_only() {
        let mac = [0x02, 0, 0, 0, 0, 0x01];
        let request = request_frame(
            mac,
            Ipv4Addr::new(198, 51, 100, 2),
            Ipv4Addr::new(198, 51, 100, 3),
        );
        assert_eq!(arp_sender(&request), Some(Ipv4Addr::new(198, 51, 100, 2)));
        let mut reply = request;
        reply[20..22].copy_from_slice(&2u16.to_be_bytes());
        assert_eq!(arp_sender(&reply), Some(Ipv4Addr::new(198, 51, 100, 2)));
        let mut ipv4 = request;
        ipv4[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        assert_eq!(arp_sender(&ipv4), None);
        assert_eq!(arp_sender(&request[..20]), None);
    }
}
