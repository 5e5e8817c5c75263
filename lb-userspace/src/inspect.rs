//! `xlb inspect …`: prints the pinned maps as tables. Works while no xlb process runs.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use lb_common::*;

use crate::dataplane::sum_service_stats;

/// What to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `VIP:port/proto → service id, backend count`.
    Services,
    /// `(service id, slot) → backend`.
    Backends,
    /// The conntrack maps: open flows (forward and reverse) then half-open flows.
    Conntrack,
    /// Global counters and per-service counters.
    Stats,
    /// `backend → egress device, source address, MACs` of the next hops new flows take.
    NextHops,
}

/// Errors of `xlb inspect`.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(
        "cannot open pinned map {path}: {source}; is the data plane loaded (is `--pin-dir` right)?"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("reading map {name}: {source}")]
    Read {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("writing output: {0}")]
    Write(#[from] std::io::Error),
}

fn open(dir: &Path, name: &'static str) -> Result<Map, InspectError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| InspectError::Open {
        path: path.clone(),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| InspectError::Open { path, source })
}

fn read_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> InspectError {
    move |source| InspectError::Read { name, source }
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "TCP",
        IPPROTO_UDP => "UDP",
        _ => "?",
    }
}

/// `aa:bb:cc:dd:ee:ff`.
fn mac(bytes: [u8; 6]) -> String {
    bytes
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `CLOCK_MONOTONIC` now, in ns: the clock of conntrack `last_seen_ns` stamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The data plane's counters (name, value summed over CPUs), read from the pinned map now:
/// for `xlb inspect stats` and for `/metrics` at scrape time.
pub fn counters(pin_dir: &Path) -> Result<Vec<(&'static str, u64)>, InspectError> {
    let stats: PerCpuArray<_, u64> =
        PerCpuArray::try_from(open(pin_dir, STATS_MAP)?).map_err(read_err(STATS_MAP))?;
    STAT_NAMES
        .iter()
        .enumerate()
        .map(|(index, name)| {
            let value = stats
                .get(&(index as u32), 0)
                .map_err(read_err(STATS_MAP))?
                .iter()
                .sum();
            Ok((*name, value))
        })
        .collect()
}

/// Prints `table` from the maps pinned in `pin_dir`.
pub fn print(pin_dir: &Path, table: Table, out: &mut impl Write) -> Result<(), InspectError> {
    match table {
        Table::Services => {
            let map: HashMap<_, ServiceKey, ServiceValue> =
                HashMap::try_from(open(pin_dir, SERVICES_MAP)?).map_err(read_err(SERVICES_MAP))?;
            let mut rows = Vec::new();
            for item in map.iter() {
                let (k, v) = item.map_err(read_err(SERVICES_MAP))?;
                rows.push((
                    v.id,
                    format!(
                        "{}:{}/{}",
                        Ipv4Addr::from(k.vip),
                        k.port,
                        proto_name(k.proto)
                    ),
                    v.backend_count,
                    v.rr_cursor,
                ));
            }
            rows.sort();
            writeln!(
                out,
                "{:<4} {:<28} {:>8} {:>12}",
                "ID", "FRONTEND", "BACKENDS", "NEW_FLOWS_RR"
            )?;
            for (id, frontend, count, rr) in rows {
                writeln!(out, "{id:<4} {frontend:<28} {count:>8} {rr:>12}")?;
            }
        }
        Table::Backends => {
            let map: HashMap<_, BackendKey, BackendValue> =
                HashMap::try_from(open(pin_dir, BACKENDS_MAP)?).map_err(read_err(BACKENDS_MAP))?;
            let mut rows = Vec::new();
            for item in map.iter() {
                let (k, v) = item.map_err(read_err(BACKENDS_MAP))?;
                rows.push((
                    k.service_id,
                    k.slot,
                    format!("{}:{}", Ipv4Addr::from(v.ip), v.port),
                ));
            }
            rows.sort();
            writeln!(out, "{:<10} {:>5} {:<22}", "SERVICE_ID", "SLOT", "BACKEND")?;
            for (id, slot, backend) in rows {
                writeln!(out, "{id:<10} {slot:>5} {backend:<22}")?;
            }
        }
        Table::Conntrack => {
            let now = monotonic_ns();
            writeln!(
                out,
                "{:<4} {:<5} {:<44} {:<44} {:<17} {:>7} {:>4} {:>7}",
                "DIR",
                "PROTO",
                "PACKET (SRC -> DST)",
                "REWRITTEN TO (SRC -> DST)",
                "STATE",
                "IDLE_S",
                "SVC",
                "IFINDEX"
            )?;
            for (table, name) in [("fwd", CT_FWD_MAP), ("rev", CT_REV_MAP), ("", CT_HALF_MAP)] {
                let map: HashMap<_, FlowKey, CtEntry> =
                    HashMap::try_from(open(pin_dir, name)?).map_err(read_err(name))?;
                for item in map.iter() {
                    let (k, e) = item.map_err(read_err(name))?;
                    let dir = match (table, e.dir) {
                        ("", CT_DIR_REVERSE) => "rev",
                        ("", _) => "fwd",
                        (table, _) => table,
                    };
                    let live = now.saturating_sub(e.last_seen_ns) < ct_timeout_ns(k.proto, e.state);
                    let state = match (e.state, live) {
                        (_, false) => "expired",
                        (CT_STATE_CLOSING, _) => "closing",
                        (CT_STATE_CLOSED, _) => "closed",
                        (CT_STATE_CLOSED_ACKED, _) => "closed-acked",
                        (CT_STATE_TIME_WAIT, _) => "time-wait",
                        (CT_STATE_HALF_OPEN, _) => "half-open",
                        (CT_STATE_HALF_OPEN_REPLIED, _) => "half-open-replied",
                        _ => "open",
                    };
                    writeln!(
                        out,
                        "{dir:<4} {:<5} {:<44} {:<44} {state:<17} {:>7} {:>4} {:>7}",
                        proto_name(k.proto),
                        format!(
                            "{}:{} -> {}:{}",
                            Ipv4Addr::from(k.src_ip),
                            k.src_port,
                            Ipv4Addr::from(k.dst_ip),
                            k.dst_port
                        ),
                        format!(
                            "{}:{} -> {}:{}",
                            Ipv4Addr::from(e.nat_src_ip),
                            e.nat_src_port,
                            Ipv4Addr::from(e.nat_dst_ip),
                            e.nat_dst_port
                        ),
                        now.saturating_sub(e.last_seen_ns) / 1_000_000_000,
                        e.service_id,
                        e.ifindex,
                    )?;
                }
            }
        }
        Table::NextHops => {
            let map: HashMap<_, [u8; 4], NextHop> =
                HashMap::try_from(open(pin_dir, NEXT_HOPS_MAP)?)
                    .map_err(read_err(NEXT_HOPS_MAP))?;
            let now = monotonic_ns();
            let mut rows = Vec::new();
            for item in map.iter() {
                let (ip, hop) = item.map_err(read_err(NEXT_HOPS_MAP))?;
                rows.push((Ipv4Addr::from(ip), hop));
            }
            rows.sort_by_key(|(ip, _)| *ip);
            writeln!(
                out,
                "{:<15} {:>7} {:<15} {:<17} {:<17} {:>11}",
                "BACKEND", "IFINDEX", "SOURCE", "SOURCE_MAC", "NEXT_HOP_MAC", "CONFIRMED_S"
            )?;
            for (ip, hop) in rows {
                let age = now.saturating_sub(hop.confirmed_ns);
                // The program takes a next hop only while it is this fresh.
                let confirmed = if age < NEXT_HOP_MAX_AGE_NS {
                    format!("{}", age / 1_000_000_000)
                } else {
                    "expired".to_string()
                };
                writeln!(
                    out,
                    "{:<15} {:>7} {:<15} {:<17} {:<17} {confirmed:>11}",
                    ip.to_string(),
                    hop.ifindex,
                    Ipv4Addr::from(hop.src).to_string(),
                    mac(hop.smac),
                    mac(hop.dmac),
                )?;
            }
        }
        Table::Stats => {
            writeln!(out, "{:<20} {:>16}", "COUNTER", "VALUE")?;
            for (name, value) in counters(pin_dir)? {
                writeln!(out, "{name:<20} {value:>16}")?;
            }
            let services: HashMap<_, ServiceKey, ServiceValue> =
                HashMap::try_from(open(pin_dir, SERVICES_MAP)?).map_err(read_err(SERVICES_MAP))?;
            let per: PerCpuArray<_, ServiceStats> =
                PerCpuArray::try_from(open(pin_dir, SVC_STATS_MAP)?)
                    .map_err(read_err(SVC_STATS_MAP))?;
            writeln!(out)?;
            writeln!(
                out,
                "{:<4} {:<28} {:>12} {:>14} {:>10}",
                "ID", "FRONTEND", "PACKETS", "BYTES", "NEW_FLOWS"
            )?;
            let mut rows = Vec::new();
            for item in services.iter() {
                let (k, v) = item.map_err(read_err(SERVICES_MAP))?;
                let s =
                    sum_service_stats(per.get(&v.id, 0).map_err(read_err(SVC_STATS_MAP))?.iter());
                rows.push((
                    v.id,
                    format!(
                        "{}:{}/{}",
                        Ipv4Addr::from(k.vip),
                        k.port,
                        proto_name(k.proto)
                    ),
                    s,
                ));
            }
            rows.sort_by_key(|r| r.0);
            for (id, frontend, s) in rows {
                writeln!(
                    out,
                    "{id:<4} {frontend:<28} {:>12} {:>14} {:>10}",
                    s.packets, s.bytes, s.new_flows
                )?;
            }
        }
    }
    Ok(())
}
