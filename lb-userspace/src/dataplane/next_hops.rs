//! The next hop toward each backend, kept in `XLB_NEXT_HOPS` for the program's new flows: with
//! the egress device, source address and both MACs at hand a new flow needs no FIB lookup
//! (issue 15; the lookup was about a third of a new flow's cost). The program falls back to
//! the FIB for a backend without an entry, or with one not confirmed within
//! `NEXT_HOP_MAX_AGE_NS`, so a next hop this thread cannot see (neighbour not resolved yet) or
//! a thread that stopped costs speed, never a wrong destination for longer than that.
//!
//! A thread of its own confirms every entry each [`NEXT_HOP_REFRESH`], reading the routes and
//! the neighbour table over netlink in the namespace the data plane was opened in, and at once
//! when the set of backends changes. A backend whose neighbour is not resolved gets no entry:
//! the thread asks the kernel to resolve it (as a packet sent there would) and looks again
//! after [`NEXT_HOP_RETRY_FIRST`], then at doubling intervals up to the refresh, so a new
//! backend's first flows need no FIB lookup either (an ARP answer takes well under a
//! millisecond on a LAN), while one that never answers is asked for about once a second, as the
//! kernel asks for a neighbour it has packets for.
//!
//! A stale neighbour (not confirmed within the reachable time) keeps its entry, and the thread
//! has the kernel confirm it, as the kernel would before sending there itself: packets the
//! program forwards never reach the kernel's neighbour code, so without this a backend whose
//! MAC changed without a gratuitous ARP would be sent its flows at the old MAC for good. An
//! unanswered probe fails the neighbour, which takes the entry away and resolves it afresh.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use aya::maps::{HashMap, MapData};
use lb_common::{NEXT_HOPS_MAP, NextHop};

use super::DataplaneError;
use crate::addr::route::{Neighbour, Route, RouteLookup};

/// How often every next hop is confirmed; well inside `NEXT_HOP_MAX_AGE_NS` (5 s).
pub const NEXT_HOP_REFRESH: Duration = Duration::from_secs(1);
/// The first look again after a refresh that left a backend without a next hop.
pub const NEXT_HOP_RETRY_FIRST: Duration = Duration::from_millis(20);

/// The map of next hops, with the thread that keeps it current.
pub struct NextHops {
    /// Dropped to end the thread.
    backends: Option<Sender<BTreeSet<Ipv4Addr>>>,
    thread: Option<JoinHandle<()>>,
}

impl NextHops {
    /// Starts the thread that keeps `map` current. It inherits the calling thread's network
    /// namespace, where `lookup` was opened too.
    pub fn start(
        map: HashMap<MapData, [u8; 4], NextHop>,
        lookup: RouteLookup,
    ) -> Result<NextHops, DataplaneError> {
        let (backends, wanted) = mpsc::channel::<BTreeSet<Ipv4Addr>>();
        let thread = std::thread::Builder::new()
            .name("xlb-next-hops".into())
            .spawn(move || {
                let mut writer = Writer {
                    map,
                    lookup,
                    written: BTreeSet::new(),
                    failing: false,
                };
                let mut backends = BTreeSet::new();
                let mut retry = NEXT_HOP_RETRY_FIRST;
                let mut wait = NEXT_HOP_REFRESH;
                loop {
                    match wanted.recv_timeout(wait) {
                        // The latest set wins; earlier ones queued behind it are stale.
                        Ok(set) => {
                            backends = wanted.try_iter().last().unwrap_or(set);
                            retry = NEXT_HOP_RETRY_FIRST;
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    wait = next_wait(writer.refresh(&backends), &mut retry);
                }
            })
            .map_err(DataplaneError::NextHopThread)?;
        Ok(NextHops {
            backends: Some(backends),
            thread: Some(thread),
        })
    }

    /// Makes the thread keep next hops toward exactly `backends`, starting now.
    pub fn set_backends(&self, backends: BTreeSet<Ipv4Addr>) {
        if let Some(sender) = &self.backends {
            // The thread ends only when this sender is dropped, so the send cannot fail.
            let _ = sender.send(backends);
        }
    }
}

impl Drop for NextHops {
    fn drop(&mut self) {
        // Dropping the sender ends the thread's wait.
        self.backends = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long the thread waits after a refresh that gave every backend a next hop (`complete`)
/// or not; `retry` is the wait after the next incomplete one.
fn next_wait(complete: bool, retry: &mut Duration) -> Duration {
    if complete {
        *retry = NEXT_HOP_RETRY_FIRST;
        return NEXT_HOP_REFRESH;
    }
    let wait = *retry;
    *retry = (wait * 2).min(NEXT_HOP_REFRESH);
    wait
}

/// The thread's side: the map and what it wrote there.
struct Writer {
    map: HashMap<MapData, [u8; 4], NextHop>,
    lookup: RouteLookup,
    written: BTreeSet<Ipv4Addr>,
    /// Whether the last refresh failed, so a lasting failure is logged once.
    failing: bool,
}

impl Writer {
    /// Confirms the next hop toward every backend; whether each has one.
    fn refresh(&mut self, backends: &BTreeSet<Ipv4Addr>) -> bool {
        match self.try_refresh(backends) {
            Ok(complete) => {
                if self.failing {
                    self.failing = false;
                    tracing::info!("next hops toward backends are current again");
                }
                complete
            }
            Err(error) => {
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(%error, "cannot refresh the next hops toward backends; new flows look their route up in the FIB meanwhile");
                }
                false
            }
        }
    }

    /// Writes the next hop toward every backend that has one, and asks the kernel to resolve
    /// the neighbours of those that lack only that and to confirm the stale ones; `Ok(true)`
    /// when no backend lacked its neighbour. A backend without a route, or whose route names no
    /// device MAC, is not counted: the FIB has nothing better for it.
    fn try_refresh(&mut self, backends: &BTreeSet<Ipv4Addr>) -> Result<bool, DataplaneError> {
        let ips: Vec<Ipv4Addr> = backends.iter().copied().collect();
        let routes = if ips.is_empty() {
            BTreeMap::new()
        } else {
            self.lookup.routes(&ips)?
        };
        let neighbours = if routes.is_empty() {
            BTreeMap::new()
        } else {
            self.lookup.neighbours()?
        };
        let confirmed_ns = crate::inspect::monotonic_ns();
        let mut current = BTreeSet::new();
        // Neighbours for the kernel to resolve (missing) or confirm (stale).
        let mut to_resolve = BTreeSet::new();
        let mut missing = false;
        for (ip, route) in &routes {
            let Assessed { hop, ask } = assess(*ip, route, &neighbours, confirmed_ns);
            match ask {
                Some(Ask::Resolve(neighbour)) => {
                    to_resolve.insert(neighbour);
                    missing = true;
                }
                Some(Ask::Confirm(neighbour)) => {
                    to_resolve.insert(neighbour);
                }
                None => {}
            }
            let Some(hop) = hop else {
                continue;
            };
            self.map
                .insert(ip.octets(), hop, 0)
                .map_err(|source| DataplaneError::Map {
                    name: NEXT_HOPS_MAP,
                    source,
                })?;
            current.insert(*ip);
        }
        for gone in self.written.difference(&current) {
            // Already gone is fine: the entry is what must not stay.
            let _ = self.map.remove(&gone.octets());
        }
        self.written = current;
        // Every neighbour is asked for, whichever request fails.
        let mut failed = None;
        for (ifindex, neighbour) in &to_resolve {
            if let Err(error) = self.lookup.resolve(*ifindex, *neighbour) {
                failed = Some(error);
            }
        }
        match failed {
            Some(error) => Err(error.into()),
            None => Ok(!missing),
        }
    }
}

/// What the thread asks the kernel about the neighbour (device, address) a backend's route
/// goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// Missing (never resolved, or failed): resolve it. The backend has no next hop meanwhile.
    Resolve((u32, Ipv4Addr)),
    /// Stale: confirm it. The backend keeps its next hop meanwhile.
    Confirm((u32, Ipv4Addr)),
}

/// What a refresh makes of backend `ip` reached over `route`, from one look at the neighbour
/// the route goes through.
#[derive(Debug, PartialEq, Eq)]
struct Assessed {
    /// The next hop, when the route names its source address and device MAC and the neighbour
    /// is resolved.
    hop: Option<NextHop>,
    /// None for a neighbour that is current, or on a device without a MAC (nothing to resolve).
    ask: Option<Ask>,
}

fn assess(
    ip: Ipv4Addr,
    route: &Route,
    neighbours: &BTreeMap<(u32, Ipv4Addr), Neighbour>,
    confirmed_ns: u64,
) -> Assessed {
    let key = (route.ifindex, route.next_hop(ip));
    let Some(neighbour) = neighbours.get(&key) else {
        return Assessed {
            hop: None,
            ask: route.mac.map(|_| Ask::Resolve(key)),
        };
    };
    let hop = route.source.zip(route.mac).map(|(source, smac)| NextHop {
        confirmed_ns,
        ifindex: route.ifindex,
        src: source.octets(),
        smac,
        dmac: neighbour.mac,
        _pad: [0; 4],
    });
    Assessed {
        hop,
        ask: neighbour.stale.then_some(Ask::Confirm(key)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(gateway: Option<Ipv4Addr>) -> Route {
        Route {
            device: "eth0".into(),
            ifindex: 7,
            source: Some(Ipv4Addr::new(10, 0, 0, 1)),
            gateway,
            mac: Some([2, 0, 0, 0, 0, 1]),
        }
    }

    fn reachable(mac: [u8; 6]) -> Neighbour {
        Neighbour { mac, stale: false }
    }

    fn stale(mac: [u8; 6]) -> Neighbour {
        Neighbour { mac, stale: true }
    }

    #[test]
    fn a_next_hop_needs_the_neighbour_it_goes_through() {
        let backend = Ipv4Addr::new(10, 0, 0, 9);
        let gateway = Ipv4Addr::new(10, 0, 0, 254);
        let neighbours = BTreeMap::from([((7, gateway), reachable([2, 0, 0, 0, 0, 0xfe]))]);
        // Directly connected: the backend's own entry is needed, and missing.
        assert_eq!(assess(backend, &route(None), &neighbours, 5).hop, None);
        // Through the gateway: its MAC.
        let hop = assess(backend, &route(Some(gateway)), &neighbours, 5)
            .hop
            .expect("next hop");
        assert_eq!(hop.dmac, [2, 0, 0, 0, 0, 0xfe]);
        assert_eq!(hop.smac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(hop.src, [10, 0, 0, 1]);
        assert_eq!((hop.ifindex, hop.confirmed_ns), (7, 5));
        // A stale neighbour is still valid (the thread has it confirmed meanwhile).
        let stale = BTreeMap::from([((7, gateway), stale([2, 0, 0, 0, 0, 0xfe]))]);
        assert_eq!(
            assess(backend, &route(Some(gateway)), &stale, 5).hop,
            Some(hop)
        );
        // The same neighbour on another device does not count.
        let elsewhere = BTreeMap::from([((8, gateway), reachable([2, 0, 0, 0, 0, 0xfe]))]);
        assert_eq!(
            assess(backend, &route(Some(gateway)), &elsewhere, 5).hop,
            None
        );
    }

    #[test]
    fn a_missing_next_hop_is_looked_for_again_soon_then_less_often() {
        let mut retry = NEXT_HOP_RETRY_FIRST;
        let waits: Vec<u128> = (0..8)
            .map(|_| next_wait(false, &mut retry).as_millis())
            .collect();
        assert_eq!(waits, [20, 40, 80, 160, 320, 640, 1000, 1000]);
        // Complete again: the refresh interval, and the next gap starts over.
        assert_eq!(next_wait(true, &mut retry), NEXT_HOP_REFRESH);
        assert_eq!(next_wait(false, &mut retry), NEXT_HOP_RETRY_FIRST);
    }

    #[test]
    fn the_kernel_is_asked_to_resolve_a_missing_neighbour_and_confirm_a_stale_one() {
        let backend = Ipv4Addr::new(10, 0, 0, 9);
        let none = BTreeMap::new();
        assert_eq!(
            assess(backend, &route(None), &none, 5).ask,
            Some(Ask::Resolve((7, backend)))
        );
        let stale = BTreeMap::from([((7, backend), stale([2, 0, 0, 0, 0, 9]))]);
        assert_eq!(
            assess(backend, &route(None), &stale, 5).ask,
            Some(Ask::Confirm((7, backend)))
        );
        let current = BTreeMap::from([((7, backend), reachable([2, 0, 0, 0, 0, 9]))]);
        assert_eq!(assess(backend, &route(None), &current, 5).ask, None);
        // A device without a MAC has no neighbours to resolve.
        let mut no_mac = route(None);
        no_mac.mac = None;
        assert_eq!(
            assess(backend, &no_mac, &none, 5),
            Assessed {
                hop: None,
                ask: None
            }
        );
    }

    #[test]
    fn no_next_hop_without_a_source_address_or_device_mac() {
        let backend = Ipv4Addr::new(10, 0, 0, 9);
        let neighbours = BTreeMap::from([((7, backend), reachable([2, 0, 0, 0, 0, 9]))]);
        let mut no_source = route(None);
        no_source.source = None;
        assert_eq!(assess(backend, &no_source, &neighbours, 5).hop, None);
        let mut no_mac = route(None);
        no_mac.mac = None;
        assert_eq!(assess(backend, &no_mac, &neighbours, 5).hop, None);
    }
}
