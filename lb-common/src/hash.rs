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
    extern crate std;
    use super::*;
    use crate::{SNAT_PORTS_DEFAULT, SNAT_PROBES, SnatPorts, snat_port};
    use std::vec;

    /// Ranges of every kind of size: the default, the old power of two, odd and tiny ones,
    /// and one ending at 65535 (no wrap past the last port).
    const RANGES: [(u16, u16); 5] = [
        (1024, 32767),
        (16384, 32767),
        (10000, 22344),
        (40000, 41023),
        (61000, 65535),
    ];

    #[test]
    fn snat_ports_stay_in_range_and_probes_differ() {
        for (first, last) in RANGES {
            let ports = SnatPorts::new(first, last).expect("range");
            for client_port in 1000..3000u16 {
                let h = flow_hash([192, 0, 2, 1], [198, 51, 100, 10], client_port, 80, 6);
                let mut seen = [0u16; SNAT_PROBES as usize];
                for attempt in 0..SNAT_PROBES {
                    let port = snat_port(ports, h, attempt);
                    assert!(
                        (first..=last).contains(&port),
                        "{first}-{last}: port {port} out of range"
                    );
                    assert!(
                        !seen.contains(&port),
                        "{first}-{last}: probe {attempt} repeats port {port}"
                    );
                    seen[attempt as usize] = port;
                }
            }
        }
    }

    /// Every port of a range is some flow's first choice, about equally often: the
    /// multiply-shift spreads hashes over ranges that are no power of two.
    #[test]
    fn first_choices_cover_the_range_evenly() {
        let ports = SnatPorts::new(10000, 22344).expect("range");
        let mut hits = vec![0u32; ports.count as usize];
        let flows = 40 * ports.count;
        for i in 0..flows {
            let h = flow_hash(
                [192, 0, 2, (i >> 16) as u8],
                [198, 51, 100, 10],
                i as u16,
                80,
                6,
            );
            hits[(snat_port(ports, h, 0) - ports.first) as usize] += 1;
        }
        let (min, max) = (hits.iter().min().copied(), hits.iter().max().copied());
        assert!(
            min >= Some(10) && max <= Some(80),
            "40 flows per port on average, got {min:?}..{max:?}"
        );
    }

    /// A burst of connections from one client to one VIP, spread round robin over three
    /// backends, the client's ports stepping by two (Linux's connect()) through its whole
    /// ephemeral range: about 29% of each backend's SNAT ports end up taken, and every flow
    /// must still find a free one within its probes. (With a fixed probe distance, one or two
    /// flows in such a burst ran out.) Run on the old power-of-two range and on a range of
    /// another size.
    #[test]
    fn a_connection_burst_never_exhausts_the_probes() {
        for (first, last) in [(16384, 32767), (10000, 22344)] {
            let ports = SnatPorts::new(first, last).expect("range");
            let count = ports.count as usize;
            let mut taken = vec![vec![false; count]; 3];
            let flows = (count * 3 * 29 / 100) as u32;
            for i in 0..flows {
                let client_port = 32768 + (2 * i % 28_232) as u16;
                let h = flow_hash([192, 0, 2, 1], [198, 51, 100, 10], client_port, 80, 6);
                let backend = &mut taken[i as usize % 3];
                let free = (0..SNAT_PROBES)
                    .map(|attempt| (snat_port(ports, h, attempt) - first) as usize)
                    .find(|&port| !backend[port]);
                let port = free.unwrap_or_else(|| {
                    panic!("{first}-{last}, flow {i}: all {SNAT_PROBES} probes taken")
                });
                backend[port] = true;
            }
        }
    }

    #[test]
    fn same_client_port_through_two_vips_hashes_differently() {
        let a = flow_hash([192, 0, 2, 1], [198, 51, 100, 10], 5000, 80, 6);
        let b = flow_hash([192, 0, 2, 1], [198, 51, 100, 11], 5000, 80, 6);
        assert_ne!(
            snat_port(SNAT_PORTS_DEFAULT, a, 0),
            snat_port(SNAT_PORTS_DEFAULT, b, 0)
        );
    }

    #[test]
    fn ranges_too_small_or_reversed_are_refused() {
        assert_eq!(SnatPorts::new(2000, 1000), None);
        assert_eq!(SnatPorts::new(0, 5000), None);
        assert_eq!(SnatPorts::new(10000, 10000 + 1022), None);
        let ports = SnatPorts::new(10000, 10000 + 1023).expect("1024 ports");
        assert_eq!((ports.count, ports.last()), (1024, 11023));
        assert_eq!(
            SNAT_PORTS_DEFAULT,
            SnatPorts::new(1024, 32767).expect("default")
        );
    }
}
