//! Keeping the host's own sockets out of the SNAT port range.
//!
//! A translated flow's reverse entry is keyed by `backend → SNAT address:port`. Were the
//! kernel to pick a port of the range for a connection of the LB host itself (the proxy
//! fallback's connection to a backend, above all), the backend's replies to it would match a
//! translated flow and go to that flow's client. xlb therefore adds the range to
//! `net.ipv4.ip_local_reserved_ports` (per network namespace), which keeps the kernel's
//! automatic port choice (`connect()`, `bind()` to port 0) out of it; an explicit `bind()`
//! still works, so services listening on such ports are unaffected. Ports the operator
//! reserved stay reserved (the range is merged in), and xlb never removes its reservation: the
//! pinned program keeps translating after xlb exits.

use lb_common::SnatPorts;

use super::DataplaneError;

/// Where Linux keeps the reserved ports.
const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
/// Where Linux keeps its ephemeral range.
const EPHEMERAL: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// Fewest ephemeral ports the SNAT range must leave the kernel: enough for the proxy
/// fallback's connections (a port can serve several destinations at once).
pub const MIN_EPHEMERAL_LEFT: u32 = 4096;

/// Inclusive port ranges, sorted and merged.
pub type PortList = Vec<(u16, u16)>;

/// Parses `ip_local_reserved_ports` syntax (`"8080,10000-10005"`, empty for none).
pub fn parse_list(text: &str) -> Option<PortList> {
    let mut list = Vec::new();
    for item in text
        .trim()
        .split(',')
        .filter(|item| !item.trim().is_empty())
    {
        let (first, last) = match item.split_once('-') {
            Some((first, last)) => (first.trim().parse().ok()?, last.trim().parse().ok()?),
            None => {
                let port = item.trim().parse().ok()?;
                (port, port)
            }
        };
        if last < first {
            return None;
        }
        list.push((first, last));
    }
    Some(merge(list))
}

/// Sorts `list` and merges overlapping and adjacent ranges.
pub fn merge(mut list: PortList) -> PortList {
    list.sort_unstable();
    let mut merged: PortList = Vec::with_capacity(list.len());
    for (first, last) in list {
        match merged.last_mut() {
            Some(prev) if first as u32 <= prev.1 as u32 + 1 => prev.1 = prev.1.max(last),
            _ => merged.push((first, last)),
        }
    }
    merged
}

/// `ip_local_reserved_ports` syntax for `list`.
pub fn format_list(list: &[(u16, u16)]) -> String {
    let items: Vec<String> = list
        .iter()
        .map(|&(first, last)| match first == last {
            true => first.to_string(),
            false => format!("{first}-{last}"),
        })
        .collect();
    items.join(",")
}

/// How many ports of `low..=high` no range of `reserved` (merged) holds.
pub fn unreserved(low: u16, high: u16, reserved: &[(u16, u16)]) -> u32 {
    let total = (high as u32 + 1).saturating_sub(low as u32);
    let taken: u32 = reserved
        .iter()
        .map(|&(first, last)| {
            let (first, last) = (first.max(low) as u32, last.min(high) as u32);
            (last + 1).saturating_sub(first)
        })
        .sum();
    total - taken
}

/// The reserved-port list with `ports` added, after checking that the kernel's ephemeral
/// range `low..=high` keeps at least [`MIN_EPHEMERAL_LEFT`] ports.
pub fn plan(
    ports: SnatPorts,
    reserved: &[(u16, u16)],
    low: u16,
    high: u16,
) -> Result<PortList, DataplaneError> {
    let mut wanted = reserved.to_vec();
    wanted.push((ports.first, ports.last()));
    let wanted = merge(wanted);
    let left = unreserved(low, high, &wanted);
    if left < MIN_EPHEMERAL_LEFT {
        return Err(DataplaneError::SnatPortsOverlap {
            first: ports.first,
            last: ports.last(),
            low,
            high,
            reserved: match reserved.is_empty() {
                true => "none".to_owned(),
                false => format_list(reserved),
            },
            left,
            needed: MIN_EPHEMERAL_LEFT,
        });
    }
    Ok(wanted)
}

/// Reserves `ports` in the current network namespace (see the module docs).
pub fn reserve(ports: SnatPorts) -> Result<(), DataplaneError> {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|source| DataplaneError::Sysctl {
            path: path.to_owned(),
            source,
        })
    };
    let bad = |path: &str, text: &str| DataplaneError::BadPortSysctl {
        path: path.to_owned(),
        text: text.to_owned(),
    };
    let text = read(RESERVED)?;
    let reserved = parse_list(&text).ok_or_else(|| bad(RESERVED, &text))?;
    let range = read(EPHEMERAL)?;
    let (low, high) = match range
        .split_whitespace()
        .map(str::parse::<u16>)
        .collect::<Result<Vec<_>, _>>()
        .as_deref()
    {
        Ok([low, high]) => (*low, *high),
        _ => return Err(bad(EPHEMERAL, &range)),
    };
    let wanted = plan(ports, &reserved, low, high)?;
    if wanted != reserved {
        std::fs::write(RESERVED, format_list(&wanted)).map_err(|source| {
            DataplaneError::Sysctl {
                path: RESERVED.to_owned(),
                source,
            }
        })?;
        tracing::info!(
            snat_ports = %format!("{}-{}", ports.first, ports.last()),
            reserved = %format_list(&wanted),
            "reserved the SNAT port range from the host's own connections (net.ipv4.ip_local_reserved_ports)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_lists_parse_merge_and_print_as_the_kernel_does() {
        assert_eq!(parse_list(""), Some(vec![]));
        assert_eq!(parse_list("\n"), Some(vec![]));
        assert_eq!(
            parse_list("8080,10000-10005,10006-10010,9000\n"),
            Some(vec![(8080, 8080), (9000, 9000), (10000, 10010)])
        );
        assert_eq!(parse_list("10-5"), None);
        assert_eq!(parse_list("80,x"), None);
        assert_eq!(
            format_list(&[(8080, 8080), (10000, 10010)]),
            "8080,10000-10010"
        );
    }

    #[test]
    fn the_range_is_merged_with_what_the_operator_reserved() {
        let ports = SnatPorts::new(1024, 32767).expect("range");
        let wanted = plan(ports, &[(22, 22), (30000, 40000)], 32768, 60999).expect("fits");
        assert_eq!(wanted, vec![(22, 22), (1024, 40000)]);
    }

    #[test]
    fn a_range_that_leaves_too_few_ephemeral_ports_is_refused() {
        let ports = SnatPorts::new(10000, 58999).expect("range");
        // 59000-60999 left: 2,000 ports.
        let error = plan(ports, &[], 32768, 60999).expect_err("too few left");
        let text = error.to_string();
        assert!(
            text.contains("leaves the kernel 2000 ephemeral ports") && text.contains("32768-60999"),
            "{text}"
        );
        // The same range is fine once the kernel's range is moved above it.
        plan(ports, &[], 59000, 65535).expect("6,536 left");
        // Ports the operator reserved count against what is left.
        let ports = SnatPorts::new(10000, 50999).expect("range");
        plan(ports, &[], 32768, 60999).expect("10,000 left");
        plan(ports, &[(51000, 58000)], 32768, 60999).expect_err("2,999 left");
    }
}
