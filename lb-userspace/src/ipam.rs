//! IP address management: which external IP each Service gets. Pure, no I/O.
//!
//! The rules (ARCHITECTURE.md, "IP allocation"):
//! - Services are visited in a stable order: those that already hold an IP (from the previous
//!   run or from their status) and still want it first, then by creation time, then by `namespace/name`. So the
//!   outcome depends on the cluster state only, and a restart moves no IP.
//! - An explicit request (`spec.loadBalancerIP` or the `xlb.io/loadBalancerIPs` annotation)
//!   gets exactly that IP or nothing: a port already held on it is a conflict.
//! - Otherwise a Service keeps the IP it held if that IP is still valid and its ports are still
//!   free there; else it shares the lowest IP in use whose ports do not overlap its own; else it
//!   gets the lowest free IP of the pool.
//! - Never a VIP: the device's own addresses, its gateways, the network and broadcast address
//!   of a device prefix or of a pool CIDR (for prefixes up to /30).
//! - With `require_device_prefix` (announcing on the link device), a VIP must lie within one of
//!   the device's prefixes: that is where its mask comes from.
//!
//! An IP is released simply by no Service asking for it in the next run.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::model::{Allocation, HostNetwork, PortKey, ServiceKey, VipRefusal};
use crate::pool::Pool;

/// Why a Service got no IP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    /// The requested `IP:port` is held by another Service. The message is the log line of the
    /// original design, word for word.
    #[error(
        "FAILED to allocate requested LoadBalancerIP {ip}:{port} - Reason: IP:port already allocated to {holder}"
    )]
    Conflict {
        ip: Ipv4Addr,
        port: u16,
        holder: ServiceKey,
    },
    /// The requested IP is outside the configured pool.
    #[error(
        "requested LoadBalancerIP {ip} is outside the address pool ({pool}); request an address in the pool or extend RESTRICTED_CIDR"
    )]
    NotInPool { ip: Ipv4Addr, pool: String },
    /// The requested IP is outside every prefix of the link device, so it cannot be added to it.
    #[error(
        "requested LoadBalancerIP {ip} is outside every prefix of the link device; xlb can only announce addresses within the device's subnets"
    )]
    OutsideDevice { ip: Ipv4Addr },
    /// The requested IP is one that must never be a VIP.
    #[error("requested LoadBalancerIP {ip} is {what}, which cannot be a VIP")]
    Reserved { ip: Ipv4Addr, what: String },
    /// Nothing was requested and there is no pool to allocate from.
    #[error(
        "no LoadBalancerIP requested and no address pool configured; set spec.loadBalancerIP or the xlb.io/loadBalancerIPs annotation, or configure RESTRICTED_CIDR"
    )]
    NoPool,
    /// Every usable IP of the pool already holds one of the requested ports.
    #[error("no free IP left in the address pool ({pool}) for ports {ports}")]
    PoolExhausted { pool: String, ports: String },
}

/// Fixed inputs of an allocation run.
#[derive(Debug, Clone, Copy)]
pub struct IpamSettings<'a> {
    /// Where dynamic IPs come from; explicit requests must lie in it when it is not empty.
    pub pool: &'a Pool,
    /// The link device's prefixes, own addresses and gateways.
    pub host: &'a HostNetwork,
    /// True when VIPs go on the link device (`--announce link`): each must then lie in one of
    /// its prefixes. False for `--announce lo`, where VIPs are host routes.
    pub require_device_prefix: bool,
}

/// One Service asking for an IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub service: ServiceKey,
    /// `metadata.creationTimestamp`: older Services are served first.
    pub created: Option<Time>,
    /// The `(port, protocol)` pairs the Service needs on its IP.
    pub ports: BTreeSet<PortKey>,
    /// The IP the Service asks for, if it asks for one.
    pub explicit: Option<Ipv4Addr>,
    /// The IP it held before (previous run, or its status after a restart).
    pub previous: Option<Ipv4Addr>,
}

impl Request {
    /// True when the Service held an IP and still wants it: such Services are served first,
    /// so that nobody takes their IP:port from them. (A Service whose explicit request changed
    /// is a newcomer for its new IP.)
    fn holds_its_ip(&self) -> bool {
        self.previous.is_some()
            && self
                .explicit
                .is_none_or(|explicit| Some(explicit) == self.previous)
    }
}

/// Allocates IPs for `requests` (in any order: they are sorted here) and returns, per
/// Service, the IP it holds with its ports, or why it holds none.
pub fn allocate(
    settings: IpamSettings<'_>,
    requests: Vec<Request>,
) -> BTreeMap<ServiceKey, Result<Allocation, IpamError>> {
    allocate_counting(settings, requests).0
}

/// [`allocate`], also returning how many pool addresses the run examined for a free one.
fn allocate_counting(
    settings: IpamSettings<'_>,
    mut requests: Vec<Request>,
) -> (BTreeMap<ServiceKey, Result<Allocation, IpamError>>, u64) {
    requests.sort_by(|a, b| {
        (!a.holds_its_ip(), &a.created, &a.service).cmp(&(
            !b.holds_its_ip(),
            &b.created,
            &b.service,
        ))
    });
    let mut run = Run {
        settings,
        holders: BTreeMap::new(),
        reuse_from: HashMap::new(),
        next_free: 0,
        exhausted: false,
        examined: 0,
    };
    let outcome = requests
        .into_iter()
        .map(|request| {
            let outcome = run.place(&request).map(|ip| {
                run.take(ip, &request);
                Allocation {
                    ip,
                    ports: request.ports.clone(),
                }
            });
            (request.service, outcome)
        })
        .collect();
    (outcome, run.examined)
}

/// The state of one allocation run. IPs and ports are only ever taken during a run, never
/// given back, which is what lets the scans below resume where they stopped.
struct Run<'a> {
    settings: IpamSettings<'a>,
    /// IPs in use (host order) and, per port, the Service holding it.
    holders: BTreeMap<u32, BTreeMap<PortKey, ServiceKey>>,
    /// Per set of ports: the IP in use from which to resume looking for one to share (every
    /// IP in use below it holds one of those ports already).
    reuse_from: HashMap<Vec<PortKey>, u32>,
    /// Every pool address below this one is taken or unusable.
    next_free: u32,
    /// No pool address is free any more (so no need to scan the pool again).
    exhausted: bool,
    /// Pool addresses examined for a free one so far.
    examined: u64,
}

impl Run<'_> {
    /// The IP `request` should get.
    fn place(&mut self, request: &Request) -> Result<Ipv4Addr, IpamError> {
        let pool = self.settings.pool;
        if let Some(ip) = request.explicit {
            self.check_usable(ip)?;
            if !pool.is_empty() && !pool.contains(ip) {
                return Err(IpamError::NotInPool {
                    ip,
                    pool: pool.to_string(),
                });
            }
            if let Some((port, holder)) = self.conflict(u32::from(ip), &request.ports) {
                return Err(IpamError::Conflict {
                    ip,
                    port: port.port,
                    holder: holder.clone(),
                });
            }
            return Ok(ip);
        }
        if pool.is_empty() {
            return Err(IpamError::NoPool);
        }
        if let Some(ip) = request.previous.filter(|&ip| {
            pool.contains(ip)
                && self.check_usable(ip).is_ok()
                && self.conflict(u32::from(ip), &request.ports).is_none()
        }) {
            return Ok(ip);
        }
        if let Some(ip) = self.shareable(&request.ports) {
            return Ok(ip);
        }
        self.lowest_free().ok_or_else(|| IpamError::PoolExhausted {
            pool: pool.to_string(),
            ports: request
                .ports
                .iter()
                .map(PortKey::to_string)
                .collect::<Vec<_>>()
                .join(","),
        })
    }

    /// Records that `request` holds `ip`.
    fn take(&mut self, ip: Ipv4Addr, request: &Request) {
        let ports = self.holders.entry(u32::from(ip)).or_default();
        for &port in &request.ports {
            ports.insert(port, request.service.clone());
        }
    }

    /// A port of `ports` already held on `ip`, and its holder.
    fn conflict(&self, ip: u32, ports: &BTreeSet<PortKey>) -> Option<(PortKey, &ServiceKey)> {
        let held = self.holders.get(&ip)?;
        ports
            .iter()
            .find_map(|port| held.get(port).map(|holder| (*port, holder)))
    }

    /// The lowest pool IP in use on which none of `ports` is held.
    fn shareable(&mut self, ports: &BTreeSet<PortKey>) -> Option<Ipv4Addr> {
        let memo_key: Vec<PortKey> = ports.iter().copied().collect();
        let start = self.reuse_from.get(&memo_key).copied().unwrap_or(0);
        let mut found = None;
        let mut scanned_to = start;
        for (&ip, held) in self.holders.range(start..) {
            scanned_to = ip;
            let address = Ipv4Addr::from(ip);
            if ports.iter().all(|port| !held.contains_key(port))
                && self.settings.pool.contains(address)
                && self.check_usable(address).is_ok()
            {
                found = Some(address);
                break;
            }
        }
        // The IP found (if any) is about to take these ports, so the next scan for the same
        // ports may start at it, as at the last IP scanned in vain.
        self.reuse_from.insert(memo_key, scanned_to);
        found
    }

    /// The lowest pool IP that nobody uses and that may be a VIP.
    fn lowest_free(&mut self) -> Option<Ipv4Addr> {
        if self.exhausted {
            return None;
        }
        let mut examined = 0;
        let found = self
            .settings
            .pool
            .addresses_from(self.next_free)
            .map(Ipv4Addr::from)
            .inspect(|_| examined += 1)
            .find(|&ip| {
                !self.holders.contains_key(&u32::from(ip)) && self.check_usable(ip).is_ok()
            });
        self.examined += examined;
        match found {
            Some(ip) => self.next_free = u32::from(ip),
            None => self.exhausted = true,
        }
        found
    }

    /// Refuses addresses that must never be a VIP (the host's rule,
    /// [`HostNetwork::check_vip_requiring`], then the pool's own network and broadcast
    /// addresses), and (announcing on the link device) addresses outside every device prefix.
    fn check_usable(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        let reserved = |what: String| Err(IpamError::Reserved { ip, what });
        match self
            .settings
            .host
            .check_vip_requiring(ip, self.settings.require_device_prefix)
        {
            Ok(()) => {}
            Err(VipRefusal::OwnAddress) => {
                return reserved("an address of the link device".to_owned());
            }
            Err(VipRefusal::Gateway) => return reserved("a gateway of the link device".to_owned()),
            Err(VipRefusal::NetworkAddress { prefix: (net, len) }) => {
                return reserved(format!(
                    "the network address of the device prefix {net}/{len}"
                ));
            }
            Err(VipRefusal::BroadcastAddress { prefix: (net, len) }) => {
                return reserved(format!(
                    "the broadcast address of the device prefix {net}/{len}"
                ));
            }
            Err(VipRefusal::OutsidePrefixes { .. }) => return Err(IpamError::OutsideDevice { ip }),
        }
        match self.settings.pool.reserved(ip) {
            Some(what) => reserved(what.to_owned()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().expect("test IP literal")
    }

    fn host() -> HostNetwork {
        HostNetwork {
            prefixes: vec![(ip("198.51.100.2"), 24)],
            own_addresses: vec![ip("198.51.100.2")],
            gateways: vec![ip("198.51.100.1")],
            ..HostNetwork::default()
        }
    }

    fn pool(text: &str) -> Pool {
        text.parse().expect("test pool literal")
    }

    fn tcp(port: u16) -> PortKey {
        PortKey {
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn udp(port: u16) -> PortKey {
        PortKey {
            port,
            protocol: Protocol::Udp,
        }
    }

    fn request(name: &str, ports: &[PortKey]) -> Request {
        Request {
            service: ServiceKey::new("default", name),
            created: None,
            ports: ports.iter().copied().collect(),
            explicit: None,
            previous: None,
        }
    }

    fn explicit(name: &str, address: &str, ports: &[PortKey]) -> Request {
        Request {
            explicit: Some(ip(address)),
            ..request(name, ports)
        }
    }

    fn run(
        pool: &Pool,
        requests: Vec<Request>,
    ) -> BTreeMap<ServiceKey, Result<Allocation, IpamError>> {
        let host = host();
        let settings = IpamSettings {
            pool,
            host: &host,
            require_device_prefix: true,
        };
        allocate(settings, requests)
    }

    fn ip_of(
        outcome: &BTreeMap<ServiceKey, Result<Allocation, IpamError>>,
        name: &str,
    ) -> Result<Ipv4Addr, IpamError> {
        outcome
            .get(&ServiceKey::new("default", name))
            .unwrap_or_else(|| panic!("no outcome for {name}"))
            .clone()
            .map(|allocation| allocation.ip)
    }

    #[test]
    fn dynamic_services_get_the_lowest_free_pool_ip_skipping_reserved_ones() {
        // .0 network, .1 gateway, .2 own address, .255 broadcast: never VIPs.
        let pool = pool("198.51.100.0/24");
        let outcome = run(
            &pool,
            vec![request("a", &[tcp(80)]), request("b", &[tcp(80)])],
        );
        assert_eq!(ip_of(&outcome, "a"), Ok(ip("198.51.100.3")));
        assert_eq!(ip_of(&outcome, "b"), Ok(ip("198.51.100.4")));
        let tail = self::pool("198.51.100.254-198.51.100.255");
        let outcome = run(
            &tail,
            vec![request("a", &[tcp(80)]), request("b", &[tcp(80)])],
        );
        assert_eq!(ip_of(&outcome, "a"), Ok(ip("198.51.100.254")));
        assert!(
            matches!(ip_of(&outcome, "b"), Err(IpamError::PoolExhausted { .. })),
            "the broadcast address must not be handed out: {outcome:?}"
        );
    }

    #[test]
    fn explicit_requests_for_reserved_addresses_are_refused() {
        let pool = Pool::default();
        for (address, what) in [
            (
                "198.51.100.0",
                "the network address of the device prefix 198.51.100.0/24",
            ),
            ("198.51.100.1", "a gateway of the link device"),
            ("198.51.100.2", "an address of the link device"),
            (
                "198.51.100.255",
                "the broadcast address of the device prefix 198.51.100.0/24",
            ),
        ] {
            let outcome = run(&pool, vec![explicit("a", address, &[tcp(80)])]);
            assert_eq!(
                ip_of(&outcome, "a"),
                Err(IpamError::Reserved {
                    ip: ip(address),
                    what: what.to_owned()
                })
            );
        }
    }

    #[test]
    fn pool_cidr_network_and_broadcast_are_skipped() {
        let pool = pool("198.51.100.64/30");
        let outcome = run(
            &pool,
            vec![
                request("a", &[tcp(80)]),
                request("b", &[tcp(80)]),
                request("c", &[tcp(80)]),
            ],
        );
        assert_eq!(ip_of(&outcome, "a"), Ok(ip("198.51.100.65")));
        assert_eq!(ip_of(&outcome, "b"), Ok(ip("198.51.100.66")));
        assert!(matches!(
            ip_of(&outcome, "c"),
            Err(IpamError::PoolExhausted { .. })
        ));
    }

    #[test]
    fn without_a_pool_explicit_requests_in_the_device_subnet_are_honoured() {
        let pool = Pool::default();
        let outcome = run(
            &pool,
            vec![
                explicit("inside", "198.51.100.50", &[tcp(80)]),
                explicit("outside", "203.0.113.5", &[tcp(80)]),
                request("dynamic", &[tcp(80)]),
            ],
        );
        assert_eq!(ip_of(&outcome, "inside"), Ok(ip("198.51.100.50")));
        assert_eq!(
            ip_of(&outcome, "outside"),
            Err(IpamError::OutsideDevice {
                ip: ip("203.0.113.5")
            })
        );
        assert_eq!(ip_of(&outcome, "dynamic"), Err(IpamError::NoPool));
    }

    #[test]
    fn with_a_pool_explicit_requests_must_lie_in_it() {
        let pool = pool("198.51.100.10-198.51.100.20");
        let outcome = run(&pool, vec![explicit("a", "198.51.100.50", &[tcp(80)])]);
        assert!(
            matches!(ip_of(&outcome, "a"), Err(IpamError::NotInPool { .. })),
            "{outcome:?}"
        );
    }

    #[test]
    fn announcing_on_lo_does_not_need_a_device_prefix() {
        let pool = pool("203.0.113.8/29");
        let host = host();
        let settings = IpamSettings {
            pool: &pool,
            host: &host,
            require_device_prefix: false,
        };
        let outcome = allocate(settings, vec![request("a", &[tcp(80)])]);
        assert_eq!(ip_of(&outcome, "a"), Ok(ip("203.0.113.9")));
        let strict = run(&pool, vec![request("a", &[tcp(80)])]);
        assert!(
            matches!(ip_of(&strict, "a"), Err(IpamError::PoolExhausted { .. })),
            "on the link device a pool outside its prefixes has nothing to give: {strict:?}"
        );
    }

    #[test]
    fn the_original_sharing_and_conflict_scenario() {
        let pool = pool("198.51.100.10-198.51.100.20");
        let outcome = run(
            &pool,
            vec![
                request("svc1", &[tcp(80)]),
                explicit("svc2", "198.51.100.10", &[tcp(80)]),
                request("svc3", &[tcp(80)]),
                request("svc4", &[tcp(443)]),
            ],
        );
        assert_eq!(ip_of(&outcome, "svc1"), Ok(ip("198.51.100.10")));
        let refused = ip_of(&outcome, "svc2").expect_err("svc2 conflicts with svc1");
        assert_eq!(
            refused.to_string(),
            "FAILED to allocate requested LoadBalancerIP 198.51.100.10:80 - Reason: IP:port already allocated to default/svc1"
        );
        assert_eq!(ip_of(&outcome, "svc3"), Ok(ip("198.51.100.11")));
        assert_eq!(ip_of(&outcome, "svc4"), Ok(ip("198.51.100.10")));
    }

    #[test]
    fn udp_and_tcp_on_the_same_port_share_an_ip() {
        let pool = pool("198.51.100.10-198.51.100.20");
        let outcome = run(
            &pool,
            vec![
                request("dns-tcp", &[tcp(53)]),
                request("dns-udp", &[udp(53)]),
                explicit("dns-udp-2", "198.51.100.10", &[udp(53)]),
            ],
        );
        assert_eq!(ip_of(&outcome, "dns-tcp"), Ok(ip("198.51.100.10")));
        assert_eq!(ip_of(&outcome, "dns-udp"), Ok(ip("198.51.100.10")));
        assert!(
            matches!(
                ip_of(&outcome, "dns-udp-2"),
                Err(IpamError::Conflict { port: 53, .. })
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn explicit_sharing_without_overlap_is_allowed() {
        let pool = Pool::default();
        let outcome = run(
            &pool,
            vec![
                explicit("web", "198.51.100.50", &[tcp(80), tcp(443)]),
                explicit("ssh", "198.51.100.50", &[tcp(22)]),
            ],
        );
        assert_eq!(ip_of(&outcome, "web"), Ok(ip("198.51.100.50")));
        assert_eq!(ip_of(&outcome, "ssh"), Ok(ip("198.51.100.50")));
    }

    #[test]
    fn previous_holders_are_served_first_and_keep_their_ip() {
        let pool = pool("198.51.100.10-198.51.100.20");
        // "a" sorts first by name, but "z" already holds .10 and must keep it.
        let outcome = run(
            &pool,
            vec![
                request("a", &[tcp(80)]),
                Request {
                    previous: Some(ip("198.51.100.10")),
                    ..request("z", &[tcp(80)])
                },
            ],
        );
        assert_eq!(ip_of(&outcome, "z"), Ok(ip("198.51.100.10")));
        assert_eq!(ip_of(&outcome, "a"), Ok(ip("198.51.100.11")));
    }

    #[test]
    fn a_previous_ip_that_is_no_longer_valid_is_replaced() {
        let pool = pool("198.51.100.10-198.51.100.20");
        let outcome = run(
            &pool,
            vec![Request {
                previous: Some(ip("198.51.100.99")),
                ..request("a", &[tcp(80)])
            }],
        );
        assert_eq!(ip_of(&outcome, "a"), Ok(ip("198.51.100.10")));
    }

    #[test]
    fn older_services_are_served_first() {
        let pool = pool("198.51.100.10-198.51.100.20");
        let at = |seconds: i64| {
            Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(seconds).expect("valid timestamp"),
            ))
        };
        let outcome = run(
            &pool,
            vec![
                Request {
                    created: at(2_000),
                    ..request("a", &[tcp(80)])
                },
                Request {
                    created: at(1_000),
                    ..request("b", &[tcp(80)])
                },
            ],
        );
        assert_eq!(ip_of(&outcome, "b"), Ok(ip("198.51.100.10")));
        assert_eq!(ip_of(&outcome, "a"), Ok(ip("198.51.100.11")));
    }

    #[test]
    fn an_unusable_pool_is_scanned_once_per_run() {
        // A large pool outside the device prefixes: every address is unusable. It must be
        // examined once for the whole run, not once for each of the 1,000 Services.
        let pool = pool("10.0.0.0/14");
        let requests = (0..1_000)
            .map(|i| request(&format!("svc{i:04}"), &[tcp(80)]))
            .collect();
        let host = host();
        let settings = IpamSettings {
            pool: &pool,
            host: &host,
            require_device_prefix: true,
        };
        let (outcome, examined) = allocate_counting(settings, requests);
        assert!(
            outcome
                .values()
                .all(|result| matches!(result, Err(IpamError::PoolExhausted { .. }))),
            "nothing in 10.0.0.0/14 lies within the device prefix 198.51.100.0/24"
        );
        assert_eq!(
            examined,
            1 << 18,
            "each of the 2^18 addresses examined once"
        );
    }

    #[test]
    fn many_services_on_one_port_fill_the_pool_in_order() {
        let pool = pool("10.0.0.0/16");
        let host = HostNetwork::default();
        let settings = IpamSettings {
            pool: &pool,
            host: &host,
            require_device_prefix: false,
        };
        let requests = (0..2_000)
            .map(|i| request(&format!("svc{i:05}"), &[tcp(80), tcp(443)]))
            .chain((0..2_000).map(|i| request(&format!("tls{i:05}"), &[tcp(8443)])))
            .collect();
        let outcome = allocate(settings, requests);
        assert_eq!(ip_of_ns(&outcome, "svc00000"), ip("10.0.0.1"));
        assert_eq!(ip_of_ns(&outcome, "svc01999"), ip("10.0.7.208"));
        // The 8443 Services share the IPs of the 80/443 ones, lowest first.
        assert_eq!(ip_of_ns(&outcome, "tls00000"), ip("10.0.0.1"));
        assert_eq!(ip_of_ns(&outcome, "tls01999"), ip("10.0.7.208"));
    }

    fn ip_of_ns(
        outcome: &BTreeMap<ServiceKey, Result<Allocation, IpamError>>,
        name: &str,
    ) -> Ipv4Addr {
        ip_of(outcome, name).unwrap_or_else(|error| panic!("{name} got no IP: {error}"))
    }
}
