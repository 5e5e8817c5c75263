//! Crafted Ethernet/IPv4/TCP/UDP frames for packet fixtures, with checksums computed here from
//! scratch (independently of `lb_common::csum`, which is what the program uses).

use std::net::{Ipv4Addr, SocketAddrV4};

/// TCP flags.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// Offsets in a frame without IP options.
pub const IP: usize = 14;
pub const L4: usize = 34;

/// RFC 1071 checksum over `data` with `initial` added (straightforward loop).
pub fn inet_checksum(data: &[u8], initial: u64) -> u16 {
    let mut sum = initial;
    for (i, byte) in data.iter().enumerate() {
        sum += if i % 2 == 0 {
            (*byte as u64) << 8
        } else {
            *byte as u64
        };
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u64 {
    let mut sum = 0u64;
    for pair in [
        [src[0], src[1]],
        [src[2], src[3]],
        [dst[0], dst[1]],
        [dst[2], dst[3]],
    ] {
        sum += u16::from_be_bytes(pair) as u64;
    }
    sum + proto as u64 + len as u64
}

/// An Ethernet + IPv4 (+ `options`) + TCP/UDP frame with correct checksums.
pub fn frame(
    proto: u8,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    tcp_flags: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xaa]); // dst MAC (the LB)
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0xcc]); // src MAC (the sender)
    f.extend_from_slice(&[0x08, 0x00]);
    let ihl = 5 + options.len() / 4;
    let l4_len = if proto == 6 { 20 } else { 8 } + payload.len();
    let tot_len = ihl * 4 + l4_len;
    f.extend_from_slice(&[0x40 | ihl as u8, 0]);
    f.extend_from_slice(&(tot_len as u16).to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
    f.extend_from_slice(&src.ip().octets());
    f.extend_from_slice(&dst.ip().octets());
    f.extend_from_slice(options);
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    if proto == 6 {
        f.extend_from_slice(&[
            0, 0, 0x10, 0, 0, 0, 0, 0, 0x50, tcp_flags, 0xff, 0xff, 0, 0, 0, 0,
        ]);
    } else {
        f.extend_from_slice(&(l4_len as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
    }
    f.extend_from_slice(payload);
    fix_checksums(&mut f);
    f
}

/// A TCP frame without IP options.
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, payload: &[u8]) -> Vec<u8> {
    frame(6, src, dst, flags, &[], payload)
}

/// A UDP frame without IP options.
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    frame(17, src, dst, 0, &[], payload)
}

fn ihl(f: &[u8]) -> usize {
    ((f[IP] & 0x0f) as usize) * 4
}

fn check_offset(f: &[u8]) -> usize {
    IP + ihl(f) + if f[IP + 9] == 6 { 16 } else { 6 }
}

/// Recomputes the IPv4 and L4 checksums from scratch.
pub fn fix_checksums(f: &mut [u8]) {
    let ihl = ihl(f);
    f[IP + 10..IP + 12].copy_from_slice(&[0, 0]);
    let ip_check = inet_checksum(&f[IP..IP + ihl], 0);
    f[IP + 10..IP + 12].copy_from_slice(&ip_check.to_be_bytes());
    let co = check_offset(f);
    f[co..co + 2].copy_from_slice(&[0, 0]);
    let (src, dst, proto) = (addr(f, 12), addr(f, 16), f[IP + 9]);
    let l4 = &f[IP + ihl..];
    let mut check = inet_checksum(l4, pseudo(src, dst, proto, l4.len()));
    if proto == 17 && check == 0 {
        check = 0xffff;
    }
    f[co..co + 2].copy_from_slice(&check.to_be_bytes());
}

fn addr(f: &[u8], off: usize) -> [u8; 4] {
    [
        f[IP + off],
        f[IP + off + 1],
        f[IP + off + 2],
        f[IP + off + 3],
    ]
}

/// Whether the IPv4 header checksum and the L4 checksum verify.
pub fn checksums_ok(f: &[u8]) -> bool {
    let ihl = ihl(f);
    let ip_ok = inet_checksum(&f[IP..IP + ihl], 0) == 0;
    let (src, dst, proto) = (addr(f, 12), addr(f, 16), f[IP + 9]);
    let l4 = &f[IP + ihl..];
    ip_ok && inet_checksum(l4, pseudo(src, dst, proto, l4.len())) == 0
}

/// Source and destination of a frame.
pub fn endpoints(f: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    let l4 = IP + ihl(f);
    let port = |o: usize| u16::from_be_bytes([f[l4 + o], f[l4 + o + 1]]);
    (
        SocketAddrV4::new(Ipv4Addr::from(addr(f, 12)), port(0)),
        SocketAddrV4::new(Ipv4Addr::from(addr(f, 16)), port(2)),
    )
}

/// `f` with new endpoints and checksums recomputed from scratch: what a correct NAT emits.
pub fn translated(f: &[u8], src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    let mut out = f.to_vec();
    let l4 = IP + ihl(f);
    out[IP + 12..IP + 16].copy_from_slice(&src.ip().octets());
    out[IP + 16..IP + 20].copy_from_slice(&dst.ip().octets());
    out[l4..l4 + 2].copy_from_slice(&src.port().to_be_bytes());
    out[l4 + 2..l4 + 4].copy_from_slice(&dst.port().to_be_bytes());
    fix_checksums(&mut out);
    out
}

/// Replaces the L4 checksum with the CHECKSUM_PARTIAL value Linux writes before offload:
/// the folded pseudo-header sum, uncomplemented.
pub fn make_partial(f: &mut [u8]) {
    let ihl = ihl(f);
    let (src, dst, proto) = (addr(f, 12), addr(f, 16), f[IP + 9]);
    let len = f.len() - IP - ihl;
    let partial = !inet_checksum(&[], pseudo(src, dst, proto, len));
    let co = check_offset(f);
    f[co..co + 2].copy_from_slice(&partial.to_be_bytes());
}

/// Completes a CHECKSUM_PARTIAL L4 checksum the way `skb_checksum_help` does: sum the L4
/// bytes (the field holds the pseudo-header sum), fold, complement.
pub fn complete_partial(f: &mut [u8]) {
    let ihl = ihl(f);
    let check = inet_checksum(&f[IP + ihl..], 0);
    let co = check_offset(f);
    f[co..co + 2].copy_from_slice(&check.to_be_bytes());
}
