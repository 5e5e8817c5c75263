//! Global per-CPU packet counters, indexed by the `STAT_*` constants.
//!
//! The map [`STATS_MAP`] is a `BPF_MAP_TYPE_PERCPU_ARRAY` of `u64` with [`STAT_COUNT`]
//! entries; userspace sums the per-CPU values.

/// Name of the per-CPU counter array (kernel map names are at most 15 bytes).
pub const STATS_MAP: &str = "XLB_STATS";

/// Every packet the program saw.
pub const STAT_TOTAL: u32 = 0;
/// Returned `XDP_PASS`: handed to the kernel stack.
pub const STAT_PASS: u32 = 1;
/// Returned `XDP_DROP`.
pub const STAT_DROP: u32 = 2;
/// Returned `XDP_TX`: sent back out of the device it came in on.
pub const STAT_TX: u32 = 3;
/// Returned `XDP_REDIRECT`: sent out of another device.
pub const STAT_REDIRECT: u32 = 4;
/// Returned `XDP_ABORTED`: a cannot-happen path was taken.
pub const STAT_ABORTED: u32 = 5;
/// Frame too short for the Ethernet header.
pub const STAT_TRUNCATED_ETH: u32 = 6;
/// Not IPv4 or IPv6 (ARP, LLDP, …).
pub const STAT_NOT_IP: u32 = 7;
/// IPv4 packets.
pub const STAT_IPV4: u32 = 8;
/// IPv6 packets.
pub const STAT_IPV6: u32 = 9;
/// TCP segments (IPv4 or IPv6).
pub const STAT_TCP: u32 = 10;
/// UDP datagrams (IPv4 or IPv6).
pub const STAT_UDP: u32 = 11;
/// IP packets carrying neither TCP nor UDP.
pub const STAT_OTHER_L4: u32 = 12;
/// IP or L4 header cut short by the end of the frame.
pub const STAT_TRUNCATED_L3L4: u32 = 13;

/// Number of counters in [`STATS_MAP`].
pub const STAT_COUNT: u32 = 14;

/// Human-readable name of each counter, indexed like the map (for `xlb inspect stats`).
pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "total",
    "pass",
    "drop",
    "tx",
    "redirect",
    "aborted",
    "truncated_eth",
    "not_ip",
    "ipv4",
    "ipv6",
    "tcp",
    "udp",
    "other_l4",
    "truncated_l3l4",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_a_distinct_name() {
        for (index, name) in STAT_NAMES.iter().enumerate() {
            assert!(!name.is_empty(), "counter {index} has no name");
            assert_eq!(
                STAT_NAMES.iter().filter(|other| *other == name).count(),
                1,
                "counter name {name} is used twice"
            );
        }
    }
}
