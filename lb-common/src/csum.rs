//! Internet checksum helpers (RFC 1071, incremental updates per RFC 1624).
//!
//! Checksum fields and data words are handled as big-endian 16-bit numbers, as on the wire.
//! A "delta" is a 32-bit one's-complement sum of `~old + new` over the 16-bit words that
//! changed; it is folded into a checksum field with [`update_full`] or [`update_partial`].
//!
//! Two kinds of L4 checksum field reach the data plane:
//! - **full**: `~fold(pseudo-header + L4 header + payload)`, what every packet on a wire has;
//!   updated with [`update_full`] using the address *and* port deltas.
//! - **partial** (`CHECKSUM_PARTIAL`, a locally generated packet seen by generic XDP on veth
//!   before the checksum is completed): the field holds `fold(pseudo-header)` without the
//!   complement and the stack later adds the L4 bytes. Only the addresses are in it, so it is
//!   updated with [`update_partial`] using the address delta only (ports are summed later
//!   with the payload). [`is_partial`] recognises such a field.

/// Folds a 32-bit one's-complement sum to 16 bits (end-around carry), without complementing.
#[inline(always)]
pub const fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Delta for a 32-bit field (e.g. an IPv4 address) changing from `old` to `new`.
#[inline(always)]
pub const fn delta4(old: [u8; 4], new: [u8; 4]) -> u32 {
    delta2([old[0], old[1]], [new[0], new[1]]) + delta2([old[2], old[3]], [new[2], new[3]])
}

/// Delta for a 16-bit field (e.g. a port, in wire order) changing from `old` to `new`.
#[inline(always)]
pub const fn delta2(old: [u8; 2], new: [u8; 2]) -> u32 {
    (!u16::from_be_bytes(old)) as u32 + u16::from_be_bytes(new) as u32
}

/// Applies `delta` to a full checksum field (RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')`).
#[inline(always)]
pub const fn update_full(check: [u8; 2], delta: u32) -> [u8; 2] {
    let sum = (!u16::from_be_bytes(check)) as u32 + fold(delta) as u32;
    (!fold(sum)).to_be_bytes()
}

/// Applies `delta` to a partial checksum field, which holds the pseudo-header sum
/// uncomplemented: `F' = F + ~m + m'`.
#[inline(always)]
pub const fn update_partial(check: [u8; 2], delta: u32) -> [u8; 2] {
    let sum = u16::from_be_bytes(check) as u32 + fold(delta) as u32;
    fold(sum).to_be_bytes()
}

/// How a rewrite changed the one's-complement sum of a segment's bytes (what an skb's
/// `CHECKSUM_COMPLETE` value covers, with the IP header, whose own checksum cancels its
/// address change): the ports changed by `port_delta` and the checksum field from
/// `old_check` to `new_check`. Nothing else in the segment changed.
#[inline(always)]
pub const fn segment_delta(port_delta: u32, old_check: [u8; 2], new_check: [u8; 2]) -> u32 {
    port_delta + delta2(old_check, new_check)
}

/// One's-complement sum of the IPv4 pseudo-header (RFC 793/768), not folded.
#[inline(always)]
pub const fn pseudo_header_sum(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: u16) -> u32 {
    u16::from_be_bytes([src[0], src[1]]) as u32
        + u16::from_be_bytes([src[2], src[3]]) as u32
        + u16::from_be_bytes([dst[0], dst[1]]) as u32
        + u16::from_be_bytes([dst[2], dst[3]]) as u32
        + proto as u32
        + l4_len as u32
}

/// Whether an L4 checksum field looks like `CHECKSUM_PARTIAL`: it equals the folded,
/// uncomplemented pseudo-header sum of the packet's own addresses and L4 length, which is
/// what Linux writes before offloading the rest. `pseudo` is that sum without the length,
/// folded (`pseudo_header_sum(src, dst, proto, 0)`, fixed per flow). A full checksum has that
/// value by chance with probability 2^-16; such a packet would get a wrong checksum and be
/// retransmitted.
#[inline(always)]
pub const fn is_partial(check: [u8; 2], pseudo: u16, l4_len: u16) -> bool {
    u16::from_be_bytes(check) == fold(pseudo as u32 + l4_len as u32)
}

/// One's-complement sum of `data` as big-endian 16-bit words (odd length padded with zero),
/// added to `initial`, not folded beyond 32 bits. For userspace and tests; the BPF program only
/// uses incremental updates.
pub fn sum_bytes(data: &[u8], initial: u32) -> u32 {
    let mut sum = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for word in &mut chunks {
        sum += u16::from_be_bytes([word[0], word[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    while sum >> 32 != 0 {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

/// Full Internet checksum of `data` (e.g. an IPv4 header with its checksum field zeroed).
pub fn checksum(data: &[u8]) -> [u8; 2] {
    (!fold(sum_bytes(data, 0))).to_be_bytes()
}

/// Full TCP/UDP checksum of `segment` (L4 header with checksum zeroed, plus payload).
pub fn l4_checksum(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> [u8; 2] {
    let pseudo = pseudo_header_sum(src, dst, proto, segment.len() as u16);
    (!fold(sum_bytes(segment, pseudo))).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    extern crate std;
    use std::vec::Vec;

    const TCP: u8 = 6;

    /// A TCP segment (20-byte header, some payload) from `src:sport` to `dst:dport` with a
    /// correct full checksum.
    fn segment(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut seg = Vec::new();
        seg.extend_from_slice(&sport.to_be_bytes());
        seg.extend_from_slice(&dport.to_be_bytes());
        seg.extend_from_slice(&[0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0, 0x50, 0x02, 0xfa, 0xf0]);
        seg.extend_from_slice(&[0, 0, 0, 0]); // check, urg
        seg.extend_from_slice(payload);
        let check = l4_checksum(src, dst, TCP, &seg);
        seg[16..18].copy_from_slice(&check);
        seg
    }

    /// Deterministic pseudo-random bytes (xorshift), so the tests cover many values.
    fn rng(seed: &mut u32) -> u32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 17;
        *seed ^= *seed << 5;
        *seed
    }

    #[test]
    fn full_update_matches_recomputation() {
        let mut seed = 0x1234_5678;
        for _ in 0..5000 {
            let src = rng(&mut seed).to_be_bytes();
            let dst = rng(&mut seed).to_be_bytes();
            let (nsrc, ndst) = (rng(&mut seed).to_be_bytes(), rng(&mut seed).to_be_bytes());
            let (sport, dport) = (rng(&mut seed) as u16, rng(&mut seed) as u16);
            let (nsport, ndport) = (rng(&mut seed) as u16, rng(&mut seed) as u16);
            let len = (rng(&mut seed) % 40) as usize;
            let payload: Vec<u8> = (0..len).map(|_| rng(&mut seed) as u8).collect();
            let seg = segment(src, dst, sport, dport, &payload);
            let delta = delta4(src, nsrc)
                + delta4(dst, ndst)
                + delta2(sport.to_be_bytes(), nsport.to_be_bytes())
                + delta2(dport.to_be_bytes(), ndport.to_be_bytes());
            let updated = update_full([seg[16], seg[17]], delta);
            let expected = segment(nsrc, ndst, nsport, ndport, &payload);
            // 0x0000 and 0xffff are the same one's-complement value; a receiver accepts both.
            let (got, want) = (
                u16::from_be_bytes(updated),
                u16::from_be_bytes([expected[16], expected[17]]),
            );
            assert!(
                got == want || (got == 0 && want == 0xffff) || (got == 0xffff && want == 0),
                "full update {got:#06x} != recomputed {want:#06x}"
            );
            // And the receiver's verification (sum over everything = 0xffff) holds.
            let mut check_seg = expected.clone();
            check_seg[16..18].copy_from_slice(&updated);
            let pseudo = pseudo_header_sum(nsrc, ndst, TCP, check_seg.len() as u16);
            assert_eq!(fold(sum_bytes(&check_seg, pseudo)), 0xffff);
        }
    }

    /// The sum of a rewritten segment's bytes (full checksum updated, ports changed) is the
    /// old sum plus `segment_delta`, as `bpf_csum_update` adds it to a CHECKSUM_COMPLETE skb.
    #[test]
    fn segment_delta_is_the_change_of_the_segment_sum() {
        let mut seed = 0x0bad_cafe;
        for _ in 0..5000 {
            let (src, dst) = (rng(&mut seed).to_be_bytes(), rng(&mut seed).to_be_bytes());
            let (nsrc, ndst) = (rng(&mut seed).to_be_bytes(), rng(&mut seed).to_be_bytes());
            let (sport, dport) = (rng(&mut seed) as u16, rng(&mut seed) as u16);
            let (nsport, ndport) = (rng(&mut seed) as u16, rng(&mut seed) as u16);
            let len = (rng(&mut seed) % 40) as usize;
            let payload: Vec<u8> = (0..len).map(|_| rng(&mut seed) as u8).collect();
            let seg = segment(src, dst, sport, dport, &payload);
            let port_delta = delta2(sport.to_be_bytes(), nsport.to_be_bytes())
                + delta2(dport.to_be_bytes(), ndport.to_be_bytes());
            let old = [seg[16], seg[17]];
            let new = update_full(old, delta4(src, nsrc) + delta4(dst, ndst) + port_delta);
            let mut rewritten = seg.clone();
            rewritten[0..2].copy_from_slice(&nsport.to_be_bytes());
            rewritten[2..4].copy_from_slice(&ndport.to_be_bytes());
            rewritten[16..18].copy_from_slice(&new);
            let before = sum_bytes(&seg, 0);
            let after = sum_bytes(&rewritten, 0);
            // Compared as one's-complement values: 0x0000 and 0xffff are the same.
            let norm = |v: u16| if v == 0xffff { 0 } else { v };
            assert_eq!(
                norm(fold(
                    before + fold(segment_delta(port_delta, old, new)) as u32
                )),
                norm(fold(after)),
            );
        }
    }

    #[test]
    fn ip_header_update_matches_recomputation() {
        let mut header = [
            0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 0x40, 6, 0, 0, 192, 0, 2, 1, 198, 51, 100, 10,
        ];
        let check = checksum(&header);
        header[10..12].copy_from_slice(&check);
        let (nsrc, ndst) = ([198, 51, 100, 1], [203, 0, 113, 7]);
        let delta = delta4([192, 0, 2, 1], nsrc) + delta4([198, 51, 100, 10], ndst);
        let updated = update_full(check, delta);
        header[12..16].copy_from_slice(&nsrc);
        header[16..20].copy_from_slice(&ndst);
        header[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(updated, checksum(&header));
    }

    /// A CHECKSUM_PARTIAL field updated with the address delta, then completed the way the
    /// kernel's `skb_checksum_help` does (sum the L4 bytes including the field, fold,
    /// complement), equals the full checksum of the rewritten segment.
    #[test]
    fn partial_update_then_completion_matches_recomputation() {
        let mut seed = 0xdead_beef;
        for _ in 0..5000 {
            let src = rng(&mut seed).to_be_bytes();
            let dst = rng(&mut seed).to_be_bytes();
            let (nsrc, ndst) = (rng(&mut seed).to_be_bytes(), rng(&mut seed).to_be_bytes());
            let (nsport, ndport) = (rng(&mut seed) as u16, rng(&mut seed) as u16);
            let len = (rng(&mut seed) % 40) as usize;
            let payload: Vec<u8> = (0..len).map(|_| rng(&mut seed) as u8).collect();
            let mut seg = segment(src, dst, 1000, 80, &payload);
            let l4_len = seg.len() as u16;
            let partial = fold(pseudo_header_sum(src, dst, TCP, l4_len)).to_be_bytes();
            seg[16..18].copy_from_slice(&partial);
            let pseudo = fold(pseudo_header_sum(src, dst, TCP, 0));
            assert!(is_partial(partial, pseudo, l4_len));
            // Rewrite addresses and ports, update the partial field with the address delta only.
            let delta = delta4(src, nsrc) + delta4(dst, ndst);
            let updated = update_partial(partial, delta);
            assert_eq!(
                updated,
                fold(pseudo_header_sum(nsrc, ndst, TCP, l4_len)).to_be_bytes()
            );
            seg[0..2].copy_from_slice(&nsport.to_be_bytes());
            seg[2..4].copy_from_slice(&ndport.to_be_bytes());
            seg[16..18].copy_from_slice(&updated);
            // skb_checksum_help: csum over the L4 bytes from csum_start, folded and complemented.
            let completed = (!fold(sum_bytes(&seg, 0))).to_be_bytes();
            let expected = segment(nsrc, ndst, nsport, ndport, &payload);
            let (got, want) = (
                u16::from_be_bytes(completed),
                u16::from_be_bytes([expected[16], expected[17]]),
            );
            assert!(
                got == want || (got == 0 && want == 0xffff),
                "{got:#06x} != {want:#06x}"
            );
        }
    }
}
