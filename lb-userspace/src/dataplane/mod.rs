//! The data plane: what carries the traffic of the virtual services.
//!
//! [`Dataplane::apply`] takes the whole desired set of virtual services and changes only what
//! differs. [`xdp::XdpDataplane`] programs the XDP program's pinned maps; see `xdp.rs` for the
//! system settings it makes and how it survives restarts. [`proxy::ProxyDataplane`] is the
//! userspace TCP/UDP proxy listening on the same `VIP:port`s: it serves whatever the XDP
//! program passes to the kernel, and everything when XDP is not in use. [`Layered`] runs both.

pub mod devices;
pub mod next_hops;
pub mod pins;
pub mod ports;
pub mod proxy;
pub mod sync;
pub mod upgrade;
pub mod xdp;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use crate::model::VirtualService;

/// Something that carries the traffic of virtual services.
pub trait Dataplane {
    /// Makes the data plane serve exactly `services`: new frontends start taking flows,
    /// removed frontends stop taking new flows at once, removed backends get no new flows but
    /// keep their established ones until they end. Applying the same set twice changes nothing.
    fn apply(&mut self, services: &[VirtualService]) -> Result<(), DataplaneError>;
}

/// No data plane of this kind: applying does nothing. Lets [`Layered`] hold an optional one.
impl<D: Dataplane> Dataplane for Option<D> {
    fn apply(&mut self, services: &[VirtualService]) -> Result<(), DataplaneError> {
        match self {
            Some(dataplane) => dataplane.apply(services),
            None => Ok(()),
        }
    }
}

/// Two data planes serving the same services: xlb runs the XDP program (`first`) for the fast
/// path and the proxy (`second`) on the same `VIP:port`s for the flows XDP passes to the
/// kernel. `apply` applies to both, even when the first fails, and returns the first error.
#[derive(Debug, Default)]
pub struct Layered<A, B> {
    pub first: A,
    pub second: B,
}

impl<A: Dataplane, B: Dataplane> Dataplane for Layered<A, B> {
    fn apply(&mut self, services: &[VirtualService]) -> Result<(), DataplaneError> {
        let first = self.first.apply(services);
        let second = self.second.apply(services);
        first.and(second)
    }
}

/// Errors of the data plane, each saying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "loading the BPF object failed: {0}; check the kernel (5.15+, 6.7+ for SNAT source lookup) and that xlb runs as root with CAP_BPF/CAP_NET_ADMIN"
    )]
    Load(#[from] aya::EbpfError),
    #[error("BPF program {name} failed: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("BPF map {name} is missing from the object; rebuild xlb")]
    MissingMap { name: &'static str },
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "pinned map {path} has a different layout than this xlb expects ({detail}); it is from another xlb version: remove it (this drops its state) with `rm {path}` and restart"
    )]
    IncompatibleMap { path: PathBuf, detail: String },
    /// The pin directory could not be created or read.
    #[error(
        "cannot create or read the pin directory {path}: {source}; check --pin-dir and that xlb runs as root"
    )]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A map, program or link could not be pinned (the directory is on bpffs by then).
    #[error(
        "pinning {path} failed: {source}; check that xlb runs as root (CAP_BPF, CAP_SYS_ADMIN) and that nothing else uses that path"
    )]
    PinObject {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    /// The pin directory is not on bpffs, and it is not where xlb mounts bpffs itself.
    #[error(
        "pin directory {path} is on {fs}, not bpffs, and BPF objects can only be pinned on bpffs: mount one with `mount -t bpf bpf {mount_point}`, or choose a --pin-dir under /sys/fs/bpf"
    )]
    NotBpffs {
        path: PathBuf,
        fs: String,
        mount_point: PathBuf,
    },
    /// bpffs was missing on /sys/fs/bpf and mounting it failed.
    #[error(
        "bpffs is not mounted on {path} and mounting it failed: {source}; mount it yourself with `mount -t bpf bpf {path}` (in a container: mount the host's /sys/fs/bpf into it), or run xlb as root (CAP_SYS_ADMIN)"
    )]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "attach failed on {iface} in native XDP mode ({native}) and at TC ingress ({tc}); check the device is up and has no other XDP program (`ip link show {iface}`)"
    )]
    Attach {
        iface: String,
        native: String,
        tc: String,
    },
    #[error(
        "attach in {mode} mode failed on {iface}: {source}; retry with another --xdp-mode or check `ip link show {iface}`"
    )]
    AttachMode {
        iface: String,
        mode: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "device {0} does not exist in this network namespace; check --link-device and the routes to backends"
    )]
    NoSuchDevice(String),
    #[error(
        "the proxy cannot listen on {frontend}: {source}; {}",
        listen_hint(source)
    )]
    ProxyListen {
        frontend: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the proxy is out of file descriptors: some frontends do not listen (xlb_proxy_frontends_not_listening) and are retried; raise the open-file limit (LimitNOFILE, ulimit -n)"
    )]
    ProxyOutOfDescriptors,
    #[error(
        "reading the MAC address of {device} failed: {source}; the data plane translates only frames addressed to a device's own MAC"
    )]
    DeviceMac {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the proxy data plane must be created inside a tokio runtime")]
    NoRuntime,
    #[error("{0}")]
    Plan(#[from] sync::PlanError),
    /// The number of possible CPUs (the length of per-CPU map values) could not be read.
    #[error(
        "cannot read the possible CPUs from /sys/devices/system/cpu/possible: {0}; per-CPU counters cannot be reset without it; check that /sys is mounted in xlb's mount namespace"
    )]
    PossibleCpus(#[source] std::io::Error),
    /// A route lookup toward the backends failed (not: a backend has no route).
    #[error("looking up the routes toward backends failed: {0}")]
    Routes(#[from] crate::addr::AddrError),
    /// The thread that keeps the next hops toward backends could not start.
    #[error("starting the next-hop thread failed: {0}")]
    NextHopThread(#[source] std::io::Error),
    #[error(
        "setting sysctl {path} failed: {source}; xlb sets it when it attaches XDP: run xlb as root in the network namespace it serves, with /proc/sys writable (a privileged container), or use --dataplane proxy"
    )]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The SNAT port range would leave the host too few ephemeral ports.
    #[error(
        "--snat-ports {first}-{last} leaves the kernel {left} ephemeral ports of net.ipv4.ip_local_port_range {low}-{high} (ports already reserved: {reserved}); it needs at least {needed} for the host's own connections (the proxy fallback's among them): choose a SNAT range outside {low}-{high}, or move ip_local_port_range"
    )]
    SnatPortsOverlap {
        first: u16,
        last: u16,
        low: u16,
        high: u16,
        reserved: String,
        left: u32,
        needed: u32,
    },
    /// More extra SNAT addresses for one source address than the program takes.
    #[error(
        "{count} extra SNAT addresses go with {source_ip}, at most {} can: list fewer in --snat-addresses",
        lb_common::MAX_SNAT_EXTRA
    )]
    TooManySnatAddresses { source_ip: Ipv4Addr, count: usize },
    /// A port sysctl holds something xlb cannot read.
    #[error("cannot parse {path} ({text:?}); fix it by hand, then restart xlb")]
    BadPortSysctl { path: String, text: String },
}

/// What to do about a frontend the proxy cannot listen on.
fn listen_hint(error: &std::io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EADDRINUSE) => {
            "another program listens there: find it with `ss -lntup` and stop it"
        }
        _ => "it is retried",
    }
}

/// Sums per-CPU service counters (for the loader and for `xlb inspect`, which reads the pinned
/// maps without the loader).
pub fn sum_service_stats<'a>(
    values: impl Iterator<Item = &'a lb_common::ServiceStats>,
) -> lb_common::ServiceStats {
    values.fold(lb_common::ServiceStats::default(), |acc, v| {
        lb_common::ServiceStats {
            packets: acc.packets + v.packets,
            bytes: acc.bytes + v.bytes,
            new_flows: acc.new_flows + v.new_flows,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records how many times it was applied; fails if told to.
    #[derive(Default)]
    struct Fake {
        applied: usize,
        fail: Option<&'static str>,
    }

    impl Dataplane for Fake {
        fn apply(&mut self, _services: &[VirtualService]) -> Result<(), DataplaneError> {
            self.applied += 1;
            match self.fail {
                Some(name) => Err(DataplaneError::MissingMap { name }),
                None => Ok(()),
            }
        }
    }

    #[test]
    fn layered_applies_to_both_and_reports_the_first_error() {
        let mut both = Layered {
            first: Fake {
                fail: Some("first"),
                ..Fake::default()
            },
            second: Fake {
                fail: Some("second"),
                ..Fake::default()
            },
        };
        match both.apply(&[]) {
            Err(DataplaneError::MissingMap { name }) => assert_eq!(name, "first"),
            other => panic!("expected the first error, got {other:?}"),
        }
        assert_eq!((both.first.applied, both.second.applied), (1, 1));
        both.first.fail = None;
        match both.apply(&[]) {
            Err(DataplaneError::MissingMap { name }) => assert_eq!(name, "second"),
            other => panic!("expected the second error, got {other:?}"),
        }
        both.second.fail = None;
        both.apply(&[]).expect("both succeed");
        let mut absent: Layered<Option<Fake>, Option<Fake>> = Layered {
            first: None,
            second: Some(Fake::default()),
        };
        absent
            .apply(&[])
            .expect("an absent data plane applies nothing");
        assert_eq!(absent.second.map(|fake| fake.applied), Some(1));
    }
}
