//! Flow hash shared by the program (SNAT port choice) and userspace (tests, inspect).

/// Hash of a flow's client-side 5-tuple (addresses network order, ports host order).
/// A murmur3-style mix: cheap in BPF, well spread over the SNAT port range.
#[inline(always)]
pub const fn flow_hash(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16, proto: u8) -> u32 {
    let mut h = 0x9747_b28c_u32 ^ proto as u32;
    h = mix(h, u32::from_ne_bytes(src));
    h = mix(h, u32::from_ne_bytes(dst));
    h = mix(h, ((src_port as u32) << 16) | dst_port as u32);
    fmix(h)
}

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SNAT_PORT_COUNT, SNAT_PORT_MIN, SNAT_PROBES, snat_port};

    #[test]
    fn snat_ports_stay_in_range_and_probes_differ() {
        for client_port in 1000..3000u16 {
            let h = flow_hash([192, 0, 2, 1], [198, 51, 100, 10], client_port, 80, 6);
            let mut seen = [0u16; SNAT_PROBES as usize];
            for attempt in 0..SNAT_PROBES {
                let port = snat_port(h, attempt);
                assert!(
                    port >= SNAT_PORT_MIN && (port as u32) < SNAT_PORT_MIN as u32 + SNAT_PORT_COUNT
                );
                assert!(!seen.contains(&port), "probe {attempt} repeats port {port}");
                seen[attempt as usize] = port;
            }
        }
    }

    /// A burst of connections from one client to one VIP, spread round robin over three
    /// backends, the client's ports stepping by two (Linux's connect()) through its whole
    /// ephemeral range: about 29% of each backend's SNAT ports end up taken, and every flow
    /// must still find a free one within its probes. (With a fixed probe distance, one or two
    /// flows in such a burst ran out.)
    #[test]
    fn a_connection_burst_never_exhausts_the_probes() {
        let mut taken = [[false; SNAT_PORT_COUNT as usize]; 3];
        for i in 0..14_000u32 {
            let client_port = 32768 + (2 * i % 28_232) as u16;
            let h = flow_hash([192, 0, 2, 1], [198, 51, 100, 10], client_port, 80, 6);
            let backend = &mut taken[i as usize % 3];
            let free = (0..SNAT_PROBES)
                .map(|attempt| (snat_port(h, attempt) - SNAT_PORT_MIN) as usize)
                .find(|&port| !backend[port]);
            let port = free.unwrap_or_else(|| panic!("flow {i}: all {SNAT_PROBES} probes taken"));
            backend[port] = true;
        }
    }

    #[test]
    fn same_client_port_through_two_vips_hashes_differently() {
        let a = flow_hash([192, 0, 2, 1], [198, 51, 100, 10], 5000, 80, 6);
        let b = flow_hash([192, 0, 2, 1], [198, 51, 100, 11], 5000, 80, 6);
        assert_ne!(snat_port(a, 0), snat_port(b, 0));
    }
}
