//! The address pool (`--restricted-cidr` / `RESTRICTED_CIDR`): CIDRs and ranges, parsed,
//! merged and sorted. Plain data at the ground: configuration parses it, IPAM allocates from
//! it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::model::{broadcast, network};

/// Why a pool could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// An entry is neither `a.b.c.d/len` nor `a.b.c.d-e.f.g.h` (nor a single address).
    #[error("{0:?} is not a CIDR or range")]
    BadEntry(String),
}

/// The address pool: CIDRs and ranges (`RESTRICTED_CIDR`), merged and sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pool {
    /// Disjoint, sorted, inclusive ranges of host-order addresses.
    ranges: Vec<(u32, u32)>,
    /// Network and broadcast addresses of the pool's CIDRs (prefixes up to /30).
    reserved: BTreeMap<u32, String>,
    /// The entries as written, for messages.
    text: String,
}

impl FromStr for Pool {
    type Err = PoolError;

    /// Parses a comma-separated list of `a.b.c.d/len`, `a.b.c.d-e.f.g.h` or `a.b.c.d`.
    /// Blank entries are ignored, so an empty string is an empty pool.
    fn from_str(text: &str) -> Result<Self, PoolError> {
        let mut ranges = Vec::new();
        let mut reserved = BTreeMap::new();
        let mut entries = Vec::new();
        for entry in text
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
        {
            let bad = || PoolError::BadEntry(entry.to_owned());
            if let Some((address, len)) = entry.split_once('/') {
                let address: Ipv4Addr = address.trim().parse().map_err(|_| bad())?;
                let len: u8 = len.trim().parse().map_err(|_| bad())?;
                if len > 32 {
                    return Err(bad());
                }
                let (first, last) = (network(address, len), broadcast(address, len));
                if len <= 30 {
                    reserved.insert(u32::from(first), format!("the network address of {entry}"));
                    reserved.insert(u32::from(last), format!("the broadcast address of {entry}"));
                }
                ranges.push((u32::from(first), u32::from(last)));
            } else if let Some((first, last)) = entry.split_once('-') {
                let first: Ipv4Addr = first.trim().parse().map_err(|_| bad())?;
                let last: Ipv4Addr = last.trim().parse().map_err(|_| bad())?;
                if first > last {
                    return Err(bad());
                }
                ranges.push((u32::from(first), u32::from(last)));
            } else {
                let address: Ipv4Addr = entry.parse().map_err(|_| bad())?;
                ranges.push((u32::from(address), u32::from(address)));
            }
            entries.push(entry);
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for (first, last) in ranges {
            match merged.last_mut() {
                Some(previous) if first <= previous.1.saturating_add(1) => {
                    previous.1 = previous.1.max(last);
                }
                _ => merged.push((first, last)),
            }
        }
        Ok(Self {
            ranges: merged,
            reserved,
            text: entries.join(","),
        })
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Pool {
    /// True when no pool is configured: only explicit requests can be served.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// True when `ip` lies in one of the pool's CIDRs or ranges.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        let after = self.ranges.partition_point(|&(first, _)| first <= ip);
        after > 0 && self.ranges[after - 1].1 >= ip
    }

    /// Why `ip` is never allocated though it lies in the pool (the network or broadcast
    /// address of one of its CIDRs), or `None`.
    pub fn reserved(&self, ip: Ipv4Addr) -> Option<&str> {
        self.reserved.get(&u32::from(ip)).map(String::as_str)
    }

    /// The pool's addresses from `start` upwards, in order.
    pub(crate) fn addresses_from(&self, start: u32) -> impl Iterator<Item = u32> + '_ {
        self.ranges
            .iter()
            .filter(move |&&(_, last)| last >= start)
            .flat_map(move |&(first, last)| first.max(start)..=last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().expect("test IP literal")
    }

    fn pool(text: &str) -> Pool {
        text.parse().expect("test pool literal")
    }

    #[test]
    fn pool_parses_cidrs_ranges_and_single_addresses() {
        let pool = pool(" 198.51.100.0/30, 198.51.100.10-198.51.100.12 ,198.51.100.20");
        for inside in [
            "198.51.100.0",
            "198.51.100.3",
            "198.51.100.11",
            "198.51.100.20",
        ] {
            assert!(pool.contains(ip(inside)), "{inside} should be in {pool}");
        }
        for outside in [
            "198.51.100.4",
            "198.51.100.9",
            "198.51.100.13",
            "198.51.100.21",
        ] {
            assert!(
                !pool.contains(ip(outside)),
                "{outside} should not be in {pool}"
            );
        }
        assert!("".parse::<Pool>().expect("empty pool parses").is_empty());
    }

    #[test]
    fn pool_refuses_bad_entries_naming_them() {
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/x",
            "10.0.0.300",
            "10.0.0.9-10.0.0.1",
            "10.0.0.1-",
            "banana",
        ] {
            let error = format!("10.1.0.0/24,{bad}")
                .parse::<Pool>()
                .expect_err("a bad entry must be refused");
            assert_eq!(error.to_string(), format!("{bad:?} is not a CIDR or range"));
        }
    }
}
