//! [`XdpDataplane`]: loads the embedded XDP object with aya, pins and adopts its maps, program
//! and links, attaches to devices and keeps the maps in line with the desired services.
//!
//! # Pinning and restarts
//! Maps, programs and links are pinned under [`XdpConfig::pin_dir`] and adopted by the next
//! xlb; see [`super::pins`].
//!
//! # System settings
//! With [`XdpConfig::set_sysctls`] (the default) xlb sets, in its network namespace:
//! - `net.ipv4.ip_forward=1`: a translated packet whose egress device cannot take XDP frames,
//!   or whose next hop is not resolved yet, is passed to the kernel, which forwards it;
//! - `net.ipv4.conf.<dev>.accept_local=1` on every device it attaches to: such packets carry one
//!   of the LB's own addresses as source (the SNAT address, or the VIP on replies);
//! - `net.ipv4.conf.<dev>.rp_filter=2` (loose) on those devices: the SNAT address may belong
//!   to another device than the one the packet came in on;
//! - the SNAT port range added to `net.ipv4.ip_local_reserved_ports` ([`super::ports`]).
//!
//! # Devices
//! xlb attaches to [`XdpConfig::devices`] (the link device) and, with
//! [`XdpConfig::follow_backend_routes`], to every device through which a backend is routed
//! (a netlink route lookup, [`crate::addr::route`], re-checked on every [`Dataplane::apply`]
//! that changes backends). Devices stay attached until [`XdpDataplane::detach_all`]: a device
//! toward a removed backend may still carry its draining flows.
//!
//! # Forwarding
//! The program looks the translated packet's route up in the FIB (`bpf_fib_lookup`). In
//! generic mode it then uses `XDP_TX` (same device) or `bpf_redirect` (another device), which
//! work into any device because the frame is still an skb. In native mode it uses them only
//! for devices in the `XLB_XMIT` devmap, which holds natively attached non-veth devices: a frame
//! redirected into a veth is lost unless the veth's peer runs XDP, and xlb does not control
//! the peer. Otherwise, and when the neighbour is unresolved, the translated packet is passed
//! to the kernel, which forwards it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray, PerCpuValues, ProgramArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode as XdpAttachFlags, links::FdLink,
        tc::TcAttachOptions,
    },
};
use lb_common::*;

use super::next_hops::NextHops;
use super::{Dataplane, DataplaneError, devices, pins, sum_service_stats, sync, upgrade};
use crate::addr::route::{Route, RouteLookup};
use crate::config::XdpMode;
use crate::model::{Backend, Frontend, Protocol, VirtualService};

/// The BPF object built by `build.rs` (aya-build), embedded at compile time.
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// The measuring build of the same object (feature `steps`): its load-time constant
/// `lb_common::steps::SKIP_STEPS_GLOBAL` leaves steps out, for `bench_xdp` alone; xlb never
/// loads it.
pub static BPF_OBJECT_STEPS: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-steps"));

/// How the program ended up attached to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AttachMode {
    /// Native (driver) XDP, program [`PROGRAM_NATIVE`].
    Native,
    /// Generic (skb) XDP, program [`PROGRAM_GENERIC`].
    Generic,
    /// TC ingress (a TCX link), program [`PROGRAM_TC`].
    Tc,
}

impl AttachMode {
    /// Short name in link pins and logs: `drv` or `skb`.
    pub fn tag(self) -> &'static str {
        match self {
            AttachMode::Native => "drv",
            AttachMode::Generic => "skb",
            AttachMode::Tc => "tc",
        }
    }

    pub(super) fn program(self) -> &'static str {
        match self {
            AttachMode::Native => PROGRAM_NATIVE,
            AttachMode::Generic => PROGRAM_GENERIC,
            AttachMode::Tc => PROGRAM_TC,
        }
    }

    /// The new-flow program its main program tail-calls.
    pub(super) fn new_flow_program(self) -> &'static str {
        match self {
            AttachMode::Native => PROGRAM_NEW_FLOW_NATIVE,
            AttachMode::Generic => PROGRAM_NEW_FLOW_GENERIC,
            AttachMode::Tc => PROGRAM_NEW_FLOW_TC,
        }
    }

    /// Where that program goes: its `PROG_ARRAY` and slot.
    fn new_flow_slot(self) -> (&'static str, u32) {
        match self {
            AttachMode::Native => (NEW_FLOW_XDP_MAP, NEW_FLOW_SLOT_NATIVE),
            AttachMode::Generic => (NEW_FLOW_XDP_MAP, NEW_FLOW_SLOT_GENERIC),
            AttachMode::Tc => (NEW_FLOW_TC_MAP, 0),
        }
    }

    /// Its name in errors.
    fn describe(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
            AttachMode::Tc => "TC",
        }
    }
}

/// How [`XdpDataplane`] is set up.
#[derive(Debug, Clone)]
pub struct XdpConfig {
    /// Where maps, programs and links are pinned (must be on bpffs). Default
    /// [`lb_common::PIN_DIR`]; tests use their own directory.
    pub pin_dir: PathBuf,
    /// Devices always attached (the link device). Empty attaches nothing: maps and programs
    /// only, for `BPF_PROG_TEST_RUN` fixtures and benchmarks.
    pub devices: Vec<String>,
    /// Also attach to every device through which a backend is routed.
    pub follow_backend_routes: bool,
    /// XDP mode per device.
    pub mode: XdpMode,
    /// Set the sysctls listed in the module docs.
    pub set_sysctls: bool,
    /// SNAT port range (`--snat-ports`), a load-time constant of the program.
    pub snat_ports: SnatPorts,
}

impl Default for XdpConfig {
    fn default() -> Self {
        XdpConfig {
            pin_dir: PathBuf::from(PIN_DIR),
            devices: Vec::new(),
            follow_backend_routes: true,
            mode: XdpMode::Auto,
            set_sysctls: true,
            snat_ports: SNAT_PORTS_DEFAULT,
        }
    }
}

impl XdpConfig {
    /// The usual setup: attach to `link_device` and to the devices toward backends.
    pub fn new(link_device: &str) -> Self {
        XdpConfig {
            devices: vec![link_device.to_owned()],
            ..XdpConfig::default()
        }
    }
}

/// One device the program is attached to.
#[derive(Debug)]
struct Attachment {
    mode: AttachMode,
    pin: PathBuf,
    /// Keeps the link fd open; the pin keeps the link alive without it.
    _link: FdLink,
}

/// The XDP data plane: the loaded programs, their pinned maps, the attachments, and what the
/// maps hold.
pub struct XdpDataplane {
    config: XdpConfig,
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, BackendValue>,
    vips: HashMap<MapData, [u8; 4], VipValue>,
    xmit: DevMapHash<MapData>,
    stats: PerCpuArray<MapData, u64>,
    svc_stats: PerCpuArray<MapData, ServiceStats>,
    dev_macs: Array<MapData, DeviceMac>,
    snat_addrs: HashMap<MapData, [u8; 4], SnatAddrs>,
    service_ports: Array<MapData, u64>,
    /// What `service_ports` was last written with; `None` until the first apply writes it
    /// whole (a map adopted from another run, or created empty for installed services).
    service_port_words: Option<Vec<u64>>,
    installed: sync::InstalledSet,
    attached: BTreeMap<String, Attachment>,
    /// Routes toward the installed backends, as last looked up.
    backend_routes: BTreeMap<Ipv4Addr, Route>,
    /// Route lookups, when following the routes toward backends.
    routes: Option<RouteLookup>,
    /// The next hops toward backends, kept current by their own thread (with route lookups).
    next_hops: Option<NextHops>,
}

impl XdpDataplane {
    /// Loads the programs, creating the maps under the pin directory or adopting the ones
    /// already pinned there, adopts pinned links, reads the installed services back from the
    /// maps and attaches to [`XdpConfig::devices`].
    pub fn open(config: XdpConfig) -> Result<Self, DataplaneError> {
        let dir = config.pin_dir.clone();
        pins::ensure_bpffs(&dir)?;
        std::fs::create_dir_all(&dir).map_err(|source| DataplaneError::Pin {
            path: dir.clone(),
            source,
        })?;
        let carried = upgrade::take_entries_before_sums(&dir)?;
        for name in ALL_MAPS {
            pins::check_pinned_layout(&dir, name)?;
        }
        let mut loader = EbpfLoader::new();
        loader.override_global(SNAT_PORTS_GLOBAL, &config.snat_ports, true);
        for name in ALL_MAPS {
            loader.map_pin_path(name, dir.join(name));
        }
        let mut ebpf = loader.load(BPF_OBJECT)?;
        upgrade::restore(&mut ebpf, carried)?;
        let hooks = hooks_to_load(&config, &pins::link_pins(&dir)?);
        for mode in [AttachMode::Native, AttachMode::Generic, AttachMode::Tc] {
            load_hook(&mut ebpf, mode, &dir, hooks.contains(&mode))?;
        }
        if config.devices.is_empty() {
            for name in [PROGRAM_NOOP, PROGRAM_FLOOR] {
                let program = typed_mut::<Xdp>(&mut ebpf, name)?;
                load_program(|| program.load(), name)?;
            }
        }
        let services =
            HashMap::try_from(take_map(&mut ebpf, SERVICES_MAP)?).map_err(map_err(SERVICES_MAP))?;
        let backends =
            HashMap::try_from(take_map(&mut ebpf, BACKENDS_MAP)?).map_err(map_err(BACKENDS_MAP))?;
        let vips = HashMap::try_from(take_map(&mut ebpf, VIPS_MAP)?).map_err(map_err(VIPS_MAP))?;
        let xmit =
            DevMapHash::try_from(take_map(&mut ebpf, XMIT_MAP)?).map_err(map_err(XMIT_MAP))?;
        let stats =
            PerCpuArray::try_from(take_map(&mut ebpf, STATS_MAP)?).map_err(map_err(STATS_MAP))?;
        let svc_stats = PerCpuArray::try_from(take_map(&mut ebpf, SVC_STATS_MAP)?)
            .map_err(map_err(SVC_STATS_MAP))?;
        let dev_macs =
            Array::try_from(take_map(&mut ebpf, DEV_MACS_MAP)?).map_err(map_err(DEV_MACS_MAP))?;
        let snat_addrs = HashMap::try_from(take_map(&mut ebpf, SNAT_ADDRS_MAP)?)
            .map_err(map_err(SNAT_ADDRS_MAP))?;
        let service_ports = Array::try_from(take_map(&mut ebpf, SERVICE_PORTS_MAP)?)
            .map_err(map_err(SERVICE_PORTS_MAP))?;
        let mut dataplane = XdpDataplane {
            config,
            ebpf,
            services,
            backends,
            vips,
            xmit,
            stats,
            svc_stats,
            dev_macs,
            snat_addrs,
            service_ports,
            service_port_words: None,
            installed: sync::InstalledSet::new(),
            attached: BTreeMap::new(),
            backend_routes: BTreeMap::new(),
            routes: None,
            next_hops: None,
        };
        if dataplane.follows_routes() {
            // Opened here, in the caller's network namespace, where the devices are.
            let lookup = RouteLookup::open()?;
            let map = HashMap::try_from(take_map(&mut dataplane.ebpf, NEXT_HOPS_MAP)?)
                .map_err(map_err(NEXT_HOPS_MAP))?;
            dataplane.next_hops = Some(NextHops::start(map, lookup.clone())?);
            dataplane.routes = Some(lookup);
        }
        dataplane.installed = dataplane.read_installed()?;
        if dataplane.config.set_sysctls && !dataplane.config.devices.is_empty() {
            devices::set_sysctl("ip_forward", "1")?;
            super::ports::reserve(dataplane.config.snat_ports)?;
        }
        dataplane.adopt_links()?;
        let wanted = dataplane.config.devices.clone();
        for device in &wanted {
            dataplane.ensure_attached(device)?;
        }
        dataplane.log_devices();
        Ok(dataplane)
    }

    /// The loaded XDP program `name` ([`PROGRAM_NATIVE`], [`PROGRAM_GENERIC`] or
    /// [`PROGRAM_NOOP`]), e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&self, name: &'static str) -> Result<&Xdp, DataplaneError> {
        typed(&self.ebpf, name)
    }

    /// The loaded TC program `name` ([`PROGRAM_TC`], [`PROGRAM_NEW_FLOW_TC`]), e.g. for
    /// `BPF_PROG_TEST_RUN`.
    pub fn tc_program(&self, name: &'static str) -> Result<&SchedClassifier, DataplaneError> {
        typed(&self.ebpf, name)
    }

    /// The pin directory in use.
    pub fn pin_dir(&self) -> &Path {
        &self.config.pin_dir
    }

    /// What the maps hold: service id and backend slots per frontend.
    pub fn installed(&self) -> &sync::InstalledSet {
        &self.installed
    }

    /// Devices the program is attached to, with their mode.
    pub fn devices(&self) -> BTreeMap<String, AttachMode> {
        self.attached
            .iter()
            .map(|(d, a)| (d.clone(), a.mode))
            .collect()
    }

    /// Global counters summed over CPUs, indexed by `lb_common::STAT_*`.
    pub fn stats(&self) -> Result<[u64; STAT_COUNT as usize], DataplaneError> {
        let mut totals = [0u64; STAT_COUNT as usize];
        for (index, total) in (0..STAT_COUNT).zip(totals.iter_mut()) {
            *total = self
                .stats
                .get(&index, 0)
                .map_err(map_err(STATS_MAP))?
                .iter()
                .sum();
        }
        Ok(totals)
    }

    /// Counters of service `id` summed over CPUs.
    pub fn service_stats(&self, id: u32) -> Result<ServiceStats, DataplaneError> {
        let values = self.svc_stats.get(&id, 0).map_err(map_err(SVC_STATS_MAP))?;
        Ok(sum_service_stats(values.iter()))
    }

    /// Detaches from every device and removes the link pins (maps stay pinned). Traffic then
    /// goes to the kernel (and the proxy fallback).
    pub fn detach_all(&mut self) {
        for (device, attachment) in std::mem::take(&mut self.attached) {
            let _ = std::fs::remove_file(&attachment.pin);
            tracing::info!(device = %device, "XDP detached");
        }
    }

    /// Rebuilds the installed set from the pinned services and backends maps.
    fn read_installed(&self) -> Result<sync::InstalledSet, DataplaneError> {
        let mut installed = sync::InstalledSet::new();
        for item in self.services.iter() {
            let (key, value) = item.map_err(map_err(SERVICES_MAP))?;
            let protocol = match key.proto {
                IPPROTO_TCP => Protocol::Tcp,
                IPPROTO_UDP => Protocol::Udp,
                _ => continue,
            };
            let frontend = Frontend {
                vip: Ipv4Addr::from(key.vip),
                port: key.port,
                protocol,
            };
            let mut slots = Vec::new();
            for slot in 0..value.backend_count {
                let key = BackendKey {
                    service_id: value.id,
                    slot,
                };
                match self.backends.get(&key, 0) {
                    Ok(b) => slots.push(Backend {
                        ip: Ipv4Addr::from(b.ip),
                        port: b.port,
                    }),
                    Err(aya::maps::MapError::KeyNotFound) => break,
                    Err(source) => {
                        return Err(DataplaneError::Map {
                            name: BACKENDS_MAP,
                            source,
                        });
                    }
                }
            }
            installed.insert(
                frontend,
                sync::Installed {
                    id: value.id,
                    slots,
                },
            );
        }
        if !installed.is_empty() {
            tracing::info!(
                services = installed.len(),
                "adopted services from pinned maps"
            );
        }
        Ok(installed)
    }

    /// Records `mac` as the own MAC of the device `ifindex`: the program translates only frames
    /// addressed to it that arrive on that device. Done for every attached device; tests of
    /// `BPF_PROG_TEST_RUN` (whose frames arrive on `lo`) set it themselves.
    pub fn set_device_mac(&mut self, ifindex: u32, mac: [u8; 6]) -> Result<(), DataplaneError> {
        let value = DeviceMac {
            ifindex,
            mac,
            _pad: [0; 6],
        };
        self.dev_macs
            .set(ifindex & (MAX_DEVICE_MACS - 1), value, 0)
            .map_err(map_err(DEV_MACS_MAP))
    }

    /// Makes `XLB_SNAT_ADDRS` hold exactly `extra`: for each own source address (the one a
    /// route toward backends gives), the extra SNAT addresses new flows may also take (at
    /// most [`MAX_SNAT_EXTRA`] each; more is an error). The addresses must be on the host
    /// (see `crate::addr::snat`) so that backends' replies reach it.
    pub fn set_snat_addresses(
        &mut self,
        extra: &BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>,
    ) -> Result<(), DataplaneError> {
        for (src, addrs) in extra {
            if addrs.len() > MAX_SNAT_EXTRA {
                return Err(DataplaneError::TooManySnatAddresses {
                    source_ip: *src,
                    count: addrs.len(),
                });
            }
            let mut value = SnatAddrs {
                count: addrs.len() as u32,
                ..SnatAddrs::default()
            };
            for (slot, addr) in value.addrs.iter_mut().zip(addrs) {
                *slot = addr.octets();
            }
            self.snat_addrs
                .insert(src.octets(), value, 0)
                .map_err(map_err(SNAT_ADDRS_MAP))?;
        }
        let stale: Vec<[u8; 4]> = self
            .snat_addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|src| !extra.contains_key(&Ipv4Addr::from(*src)))
            .collect();
        for src in stale {
            ignore_missing(self.snat_addrs.remove(&src), SNAT_ADDRS_MAP)?;
        }
        Ok(())
    }

    /// Reads `device`'s MAC and records it (see [`Self::set_device_mac`]).
    fn register_mac(&mut self, device: &str) -> Result<(), DataplaneError> {
        let ifindex = devices::ifindex(device)?;
        let mac = devices::mac(device)?;
        self.set_device_mac(ifindex, mac)
    }

    /// Takes over the links pinned by a previous loader: swaps the freshly loaded program in.
    fn adopt_links(&mut self) -> Result<(), DataplaneError> {
        for pin in pins::link_pins(&self.config.pin_dir)? {
            let adopted = pins::adopt_link(&mut self.ebpf, pin.mode, &pin.path);
            match adopted {
                Ok(link) => {
                    self.register_mac(&pin.device)?;
                    tracing::info!(device = %pin.device, mode = ?pin.mode, "adopted pinned XDP link");
                    self.attached.insert(
                        pin.device,
                        Attachment {
                            mode: pin.mode,
                            pin: pin.path,
                            _link: link,
                        },
                    );
                }
                Err(error) => {
                    // The device went away or the link is defunct: drop it; ensure_attached
                    // attaches afresh if the device is still wanted.
                    tracing::warn!(device = %pin.device, %error, "stale pinned XDP link removed");
                    let _ = std::fs::remove_file(&pin.path);
                }
            }
        }
        Ok(())
    }

    /// Attaches to `device` unless already attached; pins the link; sets the device's
    /// sysctls; lists it in the xmit devmap when native XDP can transmit into it.
    fn ensure_attached(&mut self, device: &str) -> Result<(), DataplaneError> {
        let ifindex = devices::ifindex(device)?;
        if !self.attached.contains_key(device) {
            let (mode, link) = self.attach(device, ifindex)?;
            let path = pins::link_path(&self.config.pin_dir, mode, device);
            let _ = std::fs::remove_file(&path);
            let pinned = link
                .pin(&path)
                .map_err(|source| DataplaneError::PinObject {
                    path: path.clone(),
                    source,
                })?;
            self.attached.insert(
                device.to_owned(),
                Attachment {
                    mode,
                    pin: path,
                    _link: FdLink::from(pinned),
                },
            );
            tracing::info!(device, ?mode, "XDP attached");
        }
        self.register_mac(device)?;
        if self.config.set_sysctls {
            devices::set_device_sysctls(device)?;
        }
        let native = self.attached.get(device).map(|a| a.mode) == Some(AttachMode::Native);
        if native && devices::native_xmit_ok(device) {
            self.xmit
                .insert(ifindex, ifindex, None, 0)
                .map_err(|e| DataplaneError::Map {
                    name: XMIT_MAP,
                    source: map_error_from(e),
                })?;
        } else {
            let _ = self.xmit.remove(ifindex);
        }
        Ok(())
    }

    /// Attaches to `device` in the configured mode. In `Auto`: native XDP where the driver
    /// takes it; else (a veth, a driver without XDP) TC, where the skb goes on as it is
    /// (generic XDP must first copy every GSO packet into one linear buffer: through a veth,
    /// `bench_e2e` measured TC at 0.99x nftables' CPU per GB and generic XDP at 1.10x, medians
    /// of nine runs).
    fn attach(
        &mut self,
        device: &str,
        ifindex: u32,
    ) -> Result<(AttachMode, FdLink), DataplaneError> {
        let only = match self.config.mode {
            XdpMode::Native => Some(AttachMode::Native),
            XdpMode::Skb => Some(AttachMode::Generic),
            XdpMode::Tc => Some(AttachMode::Tc),
            XdpMode::Auto if devices::is_veth(device) => {
                // Native XDP on a veth also turns every packet into an XDP frame, copying
                // each GSO packet into pages, and cannot transmit to a peer without XDP.
                tracing::info!(device, "veth: TC ingress (faster than XDP on veth)");
                Some(AttachMode::Tc)
            }
            XdpMode::Auto => None,
        };
        if let Some(mode) = only {
            return self
                .attach_in(mode, device, ifindex)
                .map(|link| (mode, link))
                .map_err(|source| DataplaneError::AttachMode {
                    iface: device.into(),
                    mode: mode.describe(),
                    source,
                });
        }
        match self.attach_in(AttachMode::Native, device, ifindex) {
            Ok(link) => Ok((AttachMode::Native, link)),
            Err(native) => {
                tracing::warn!(device, error = %native, "native XDP attach failed (driver lacks XDP?); falling back to TC ingress");
                match self.attach_in(AttachMode::Tc, device, ifindex) {
                    Ok(link) => Ok((AttachMode::Tc, link)),
                    Err(tc) => Err(DataplaneError::Attach {
                        iface: device.into(),
                        native: native.to_string(),
                        tc: tc.to_string(),
                    }),
                }
            }
        }
    }

    /// Attaches the program of `mode` to `device` and hands over its link.
    fn attach_in(
        &mut self,
        mode: AttachMode,
        device: &str,
        ifindex: u32,
    ) -> Result<FdLink, aya::programs::ProgramError> {
        let not_loaded = |_| aya::programs::ProgramError::NotLoaded;
        let link = match mode {
            AttachMode::Native | AttachMode::Generic => {
                let flags = if mode == AttachMode::Native {
                    XdpAttachFlags::Driver
                } else {
                    XdpAttachFlags::Skb
                };
                let program =
                    typed_mut::<Xdp>(&mut self.ebpf, mode.program()).map_err(not_loaded)?;
                let id = program.attach_to_if_index(ifindex, flags)?;
                FdLink::try_from(program.take_link(id)?).map_err(|e| e.to_string())
            }
            AttachMode::Tc => {
                let program =
                    typed_mut::<SchedClassifier>(&mut self.ebpf, PROGRAM_TC).map_err(not_loaded)?;
                let id = program.attach_with_options(
                    device,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )?;
                FdLink::try_from(program.take_link(id)?).map_err(|e| e.to_string())
            }
        };
        link.map_err(|e| aya::programs::ProgramError::IOError(std::io::Error::other(e)))
    }

    /// Whether devices toward backends are attached too (see [`XdpConfig::follow_backend_routes`]).
    fn follows_routes(&self) -> bool {
        self.config.follow_backend_routes && !self.config.devices.is_empty()
    }

    fn log_devices(&self) {
        let list: Vec<String> = self
            .attached
            .iter()
            .map(|(d, a)| format!("{d}({})", a.mode.tag()))
            .collect();
        tracing::info!(devices = %list.join(","), "XDP data plane devices");
    }

    /// Writes the words of `XLB_SERVICE_PORTS` that differ from the installed services' ports
    /// (all of them after a failed write, whose words are then unknown).
    fn write_service_ports(&mut self) -> Result<(), DataplaneError> {
        let words = sync::service_port_words(&self.installed);
        let written = self.service_port_words.take();
        for (index, word) in words.iter().enumerate() {
            if written.as_ref().is_some_and(|old| old[index] == *word) {
                continue;
            }
            self.service_ports
                .set(index as u32, *word, 0)
                .map_err(map_err(SERVICE_PORTS_MAP))?;
        }
        self.service_port_words = Some(words);
        Ok(())
    }

    fn execute(&mut self, op: &sync::Op) -> Result<(), DataplaneError> {
        match *op {
            sync::Op::ResetStats { id } => {
                let cpus =
                    aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::PossibleCpus(e))?;
                let zero =
                    PerCpuValues::try_from(vec![ServiceStats::default(); cpus]).map_err(|e| {
                        DataplaneError::Map {
                            name: SVC_STATS_MAP,
                            source: aya::maps::MapError::IoError(e),
                        }
                    })?;
                self.svc_stats
                    .set(id, zero, 0)
                    .map_err(map_err(SVC_STATS_MAP))
            }
            sync::Op::SetBackend { id, slot, backend } => self
                .backends
                .insert(
                    BackendKey {
                        service_id: id,
                        slot,
                    },
                    BackendValue {
                        ip: backend.ip.octets(),
                        port: backend.port,
                        _pad: 0,
                    },
                    0,
                )
                .map_err(map_err(BACKENDS_MAP)),
            sync::Op::SetService {
                frontend,
                id,
                count,
            } => self
                .services
                .insert(
                    service_key(&frontend),
                    ServiceValue {
                        id,
                        backend_count: count,
                        rr_cursor: 0,
                    },
                    0,
                )
                .map_err(map_err(SERVICES_MAP)),
            sync::Op::DeleteService { frontend } => {
                ignore_missing(self.services.remove(&service_key(&frontend)), SERVICES_MAP)
            }
            sync::Op::DeleteBackend { id, slot } => ignore_missing(
                self.backends.remove(&BackendKey {
                    service_id: id,
                    slot,
                }),
                BACKENDS_MAP,
            ),
            sync::Op::SetVip { vip, services } => {
                if services == 0 {
                    ignore_missing(self.vips.remove(&vip.octets()), VIPS_MAP)
                } else {
                    self.vips
                        .insert(vip.octets(), VipValue { services }, 0)
                        .map_err(map_err(VIPS_MAP))
                }
            }
        }
    }
}

impl Dataplane for XdpDataplane {
    fn apply(&mut self, services: &[VirtualService]) -> Result<(), DataplaneError> {
        let (ops, next) = sync::plan(&self.installed, services)?;
        for op in &ops {
            self.execute(op)?;
        }
        if !ops.is_empty() {
            tracing::info!(
                changes = ops.len(),
                services = next.len(),
                "data plane maps updated"
            );
        }
        self.installed = next;
        self.write_service_ports()?;
        if let Some(routes) = &self.routes {
            let ips: BTreeSet<Ipv4Addr> = self
                .installed
                .values()
                .flat_map(|i| i.slots.iter().map(|b| b.ip))
                .collect();
            let known: BTreeSet<Ipv4Addr> = self.backend_routes.keys().copied().collect();
            if ips != known {
                if let Some(next_hops) = &self.next_hops {
                    next_hops.set_backends(ips.clone());
                }
                let ips: Vec<Ipv4Addr> = ips.into_iter().collect();
                self.backend_routes = routes.routes(&ips)?;
                for (backend, route) in &self.backend_routes {
                    tracing::debug!(
                        backend = %backend, device = %route.device, source = ?route.source,
                        gateway = ?route.gateway, "route toward backend"
                    );
                }
                let wanted: BTreeSet<String> = self
                    .backend_routes
                    .values()
                    .map(|r| r.device.clone())
                    .collect();
                let before = self.attached.len();
                for device in &wanted {
                    self.ensure_attached(device)?;
                }
                if self.attached.len() != before {
                    self.log_devices();
                }
            }
        }
        Ok(())
    }
}

/// How often a program load is tried. The verifier gives up with EAGAIN when a signal reaches
/// the loading thread while it verifies; libbpf retries such loads 5 times too.
const PROGRAM_LOAD_ATTEMPTS: u32 = 5;

/// Loads `program` (named `name`) into the kernel.
fn load_program(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
    name: &'static str,
) -> Result<(), DataplaneError> {
    let mut attempt = 1;
    loop {
        match load() {
            Ok(()) => return Ok(()),
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN)
                    && attempt < PROGRAM_LOAD_ATTEMPTS =>
            {
                tracing::debug!(name, attempt, "BPF program load interrupted; retrying");
                attempt += 1;
            }
            Err(source) => return Err(DataplaneError::Program { name, source }),
        }
    }
}

fn service_key(frontend: &Frontend) -> ServiceKey {
    ServiceKey {
        vip: frontend.vip.octets(),
        port: frontend.port,
        proto: frontend.protocol.number(),
        _pad: 0,
    }
}

/// Program `name` of `ebpf` as its kind (`Xdp`, `SchedClassifier`).
pub(super) fn typed_mut<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut P, DataplaneError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(DataplaneError::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    program
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// Program `name` of `ebpf` as its kind, read-only.
fn typed<'a, P>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a P, DataplaneError>
where
    &'a P: TryFrom<&'a aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program(name).ok_or(DataplaneError::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    program
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
}

/// Loads the programs of hook `mode` (its new-flow program first, written into its slot, then
/// its main program) and pins both; or, when the hook is not `wanted`, removes their pins and
/// empties the slot, so nothing of an earlier xlb's build of that hook stays alive.
fn load_hook(
    ebpf: &mut Ebpf,
    mode: AttachMode,
    dir: &Path,
    wanted: bool,
) -> Result<(), DataplaneError> {
    let (array_name, slot) = mode.new_flow_slot();
    if !wanted {
        let _ = program_array(ebpf, array_name)?.clear_index(&slot);
    }
    for name in [mode.new_flow_program(), mode.program()] {
        let path = pins::program_path(dir, name);
        let _ = std::fs::remove_file(&path);
        if !wanted {
            continue;
        }
        match mode {
            AttachMode::Tc => {
                let program = typed_mut::<SchedClassifier>(ebpf, name)?;
                load_program(|| program.load(), name)?;
            }
            AttachMode::Native | AttachMode::Generic => {
                let program = typed_mut::<Xdp>(ebpf, name)?;
                load_program(|| program.load(), name)?;
            }
        }
        let program = ebpf.program_mut(name).ok_or(DataplaneError::Program {
            name,
            source: aya::programs::ProgramError::NotLoaded,
        })?;
        program
            .pin(&path)
            .map_err(|source| DataplaneError::PinObject { path, source })?;
        if name == mode.new_flow_program() {
            let fd = program
                .fd()
                .and_then(|fd| fd.try_clone().map_err(aya::programs::ProgramError::IOError))
                .map_err(|source| DataplaneError::Program { name, source })?;
            program_array(ebpf, array_name)?
                .set(slot, &fd, 0)
                .map_err(map_err(array_name))?;
        }
    }
    Ok(())
}

/// The `PROG_ARRAY` map `name`.
fn program_array<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<ProgramArray<&'a mut MapData>, DataplaneError> {
    let map = ebpf
        .map_mut(name)
        .ok_or(DataplaneError::MissingMap { name })?;
    ProgramArray::try_from(map).map_err(map_err(name))
}

/// The hooks whose programs [`XdpDataplane::open`] loads: all of them when no device is to be
/// attached (`BPF_PROG_TEST_RUN` fixtures and benchmarks, which also get the baselines);
/// otherwise those the configured mode attaches with, and those of links an earlier xlb
/// pinned (adopted with a program of their own hook). Verifying the program costs seconds of
/// CPU per build, so builds no device uses are not loaded.
fn hooks_to_load(config: &XdpConfig, pinned: &[pins::LinkPin]) -> BTreeSet<AttachMode> {
    let mut hooks: BTreeSet<AttachMode> = match config.mode {
        _ if config.devices.is_empty() => {
            [AttachMode::Native, AttachMode::Generic, AttachMode::Tc].into()
        }
        XdpMode::Auto => [AttachMode::Native, AttachMode::Tc].into(),
        XdpMode::Native => [AttachMode::Native].into(),
        XdpMode::Skb => [AttachMode::Generic].into(),
        XdpMode::Tc => [AttachMode::Tc].into(),
    };
    hooks.extend(pinned.iter().map(|pin| pin.mode));
    hooks
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DataplaneError> {
    ebpf.take_map(name)
        .ok_or(DataplaneError::MissingMap { name })
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

fn map_error_from(error: aya::maps::xdp::XdpMapError) -> aya::maps::MapError {
    match error {
        aya::maps::xdp::XdpMapError::MapError(e) => e,
        other => aya::maps::MapError::IoError(std::io::Error::other(other.to_string())),
    }
}

fn ignore_missing(
    result: Result<(), aya::maps::MapError>,
    name: &'static str,
) -> Result<(), DataplaneError> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(DataplaneError::Map { name, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_hooks_a_device_can_use_are_loaded() {
        use AttachMode::{Generic, Native, Tc};
        let config = |mode, devices: &[&str]| XdpConfig {
            mode,
            devices: devices.iter().map(|d| d.to_string()).collect(),
            ..XdpConfig::default()
        };
        let hooks = |config: &XdpConfig, pinned: &[pins::LinkPin]| {
            hooks_to_load(config, pinned)
                .into_iter()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            hooks(&config(XdpMode::Auto, &[]), &[]),
            [Native, Generic, Tc],
            "test_run users get every build"
        );
        assert_eq!(hooks(&config(XdpMode::Auto, &["eth0"]), &[]), [Native, Tc]);
        assert_eq!(hooks(&config(XdpMode::Skb, &["eth0"]), &[]), [Generic]);
        let pinned = pins::LinkPin {
            device: "eth1".into(),
            mode: Generic,
            path: PathBuf::from("/sys/fs/bpf/xlb/link_skb_eth1"),
        };
        assert_eq!(
            hooks(&config(XdpMode::Tc, &["eth0"]), &[pinned]),
            [Generic, Tc],
            "an adopted link keeps its hook"
        );
    }
}
