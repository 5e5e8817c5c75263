//! Liveness of the other LB nodes at the data-plane level: an ARP request toward each peer's
//! link address every [`PROBE_INTERVAL`] (RFC 5227 style). A peer whose kernel answers is
//! reachable on the link and keeps answering for its VIPs, whatever its xlb process does; a
//! peer that is down, or whose link is down, stops answering. Runs on a thread of its own:
//! the socket calls block.
//!
//! Silence is counted in rounds of probes this prober actually sent, not in wall-clock time:
//! if this process is starved of CPU, it sends no rounds, so it never takes its own stall
//! for the peers' death.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::AddrError;
use super::garp::{ArpSocket, arp_sender, request_frame};
use super::netlink::Link;

/// How often each peer is asked.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// What the probing thread and its owner share.
#[derive(Debug, Default)]
struct Shared {
    /// Rounds of probes sent so far.
    round: u64,
    /// The addresses to ask, with the round before which each was first asked.
    targets: HashMap<Ipv4Addr, u64>,
    /// The last round in which each address sent an ARP frame (an answer, or a request of its
    /// own).
    heard: HashMap<Ipv4Addr, u64>,
}

/// Probes the link addresses of the other LB nodes until dropped.
#[derive(Debug)]
pub struct Prober {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
}

impl Prober {
    /// Starts probing from `own` (this node's address on `link`) on a thread of its own.
    pub(super) fn start(link: &Link, own: Ipv4Addr) -> Result<Prober, AddrError> {
        let arp_error = |source| AddrError::Arp {
            vips: Vec::new(),
            device: link.name.clone(),
            source,
        };
        let Some(mac) = link.mac else {
            return Err(arp_error(std::io::Error::other(
                "the link device has no Ethernet address, so peers cannot be probed with ARP",
            )));
        };
        let socket = ArpSocket::open(link.index).map_err(arp_error)?;
        socket
            .bind_for_receiving(Duration::from_millis(20))
            .map_err(arp_error)?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_shared, thread_stop) = (shared.clone(), stop.clone());
        let device = link.name.clone();
        std::thread::Builder::new()
            .name("xlb-arp-probe".to_owned())
            .spawn(move || probe(&socket, mac, own, &thread_shared, &thread_stop, &device))
            .map_err(arp_error)?;
        Ok(Prober { shared, stop })
    }

    /// Asks these addresses from now on (and no others).
    pub fn set_targets(&self, targets: &BTreeSet<Ipv4Addr>) {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let now = shared.round;
        shared.targets.retain(|ip, _| targets.contains(ip));
        for ip in targets {
            shared.targets.entry(*ip).or_insert(now);
        }
        let Shared { targets, heard, .. } = &mut *shared;
        heard.retain(|ip, _| targets.contains_key(ip));
    }

    /// Whether `ip` answers: heard in one of the last `rounds` rounds of probes, or asked for
    /// fewer rounds than that (not judged yet: a peer is live until it has had the time to
    /// prove otherwise).
    pub fn answers(&self, ip: Ipv4Addr, rounds: u64) -> bool {
        let shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        let since = shared
            .heard
            .get(&ip)
            .or_else(|| shared.targets.get(&ip))
            .copied()
            .unwrap_or(0);
        shared.round.saturating_sub(since) < rounds
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The probing loop: send a round of requests every [`PROBE_INTERVAL`], and between rounds
/// note every ARP frame a target sends.
fn probe(
    socket: &ArpSocket,
    mac: [u8; 6],
    own: Ipv4Addr,
    shared: &Mutex<Shared>,
    stop: &AtomicBool,
    device: &str,
) {
    let mut next_round = Instant::now();
    let mut buffer = [0u8; 128];
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_round {
            next_round = Instant::now() + PROBE_INTERVAL;
            let targets: Vec<Ipv4Addr> = {
                let mut shared = shared.lock().unwrap_or_else(PoisonError::into_inner);
                shared.round += 1;
                shared.targets.keys().copied().collect()
            };
            for target in targets {
                // A link that is down refuses sends: peers then count as silent, which is
                // what they are from here.
                match socket.send(&request_frame(mac, own, target)) {
                    Ok(()) => failing = false,
                    Err(error) if !failing => {
                        tracing::debug!(%error, %device, "ARP probe not sent");
                        failing = true;
                    }
                    Err(_) => {}
                }
            }
        }
        match socket.receive(&mut buffer) {
            Ok(Some(length)) => {
                if let Some(sender) = arp_sender(&buffer[..length]) {
                    let mut shared = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    if shared.targets.contains_key(&sender) {
                        let round = shared.round;
                        shared.heard.insert(sender, round);
                    }
                }
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, %device, "ARP probe socket failed; peers are no longer probed");
                return;
            }
        }
    }
}
