//! BPF helpers for tests: a private pin directory, test runs.

use std::path::{Path, PathBuf};

use aya::maps::{DevMapHash, HashMap, Map, MapData};
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use lb_common::{CT_FWD_MAP, CT_HALF_MAP, CT_REV_MAP, CtEntry, FlowKey, PROGRAM_NOOP};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A pin directory `/sys/fs/bpf/xlb-test-<pid>-<n>` removed (with everything pinned in it:
/// maps, programs, links, so attachments go too) on drop.
#[derive(Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    /// The data plane counter `name` (summed over CPUs), read from the pinned map now.
    pub fn counter(&self, name: &str) -> u64 {
        xlb::inspect::counters(&self.0)
            .unwrap_or_else(|error| panic!("reading the counters: {error}"))
            .into_iter()
            .find_map(|(counter, value)| (counter == name).then_some(value))
            .unwrap_or_else(|| panic!("counter {name} missing"))
    }

    /// A fresh, empty pin directory.
    pub fn new() -> PinDir {
        crate::netns::require_root("pinning BPF objects");
        ensure_bpffs();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("/sys/fs/bpf/xlb-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        PinDir(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The conntrack map `name` (`CT_FWD_MAP` or `CT_REV_MAP`) pinned here.
    pub fn ct_map(&self, name: &str) -> HashMap<MapData, FlowKey, CtEntry> {
        self.hash_map(name)
    }

    /// The pinned hash map `name`.
    pub fn hash_map<K: aya::Pod, V: aya::Pod>(&self, name: &str) -> HashMap<MapData, K, V> {
        let data = MapData::from_pin(self.0.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        HashMap::try_from(Map::from_map_data(data).expect("map type")).expect("hash map")
    }

    /// Lists device `ifindex` in the pinned xmit devmap (`XMIT_MAP`), as xlb does for a
    /// native attach to a device whose driver takes XDP frames. Call it inside the namespace
    /// that holds the device: the kernel resolves the ifindex in the caller's.
    pub fn list_xmit_device(&self, ifindex: u32) {
        let name = lb_common::XMIT_MAP;
        let data = MapData::from_pin(self.0.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut xmit: DevMapHash<MapData> =
            DevMapHash::try_from(Map::from_map_data(data).expect("map type")).expect("devmap");
        xmit.insert(ifindex, ifindex, None, 0)
            .unwrap_or_else(|e| panic!("listing ifindex {ifindex} in {name}: {e}"));
    }
}

impl Default for PinDir {
    fn default() -> Self {
        PinDir::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Mounts bpffs on `/sys/fs/bpf` unless it is there already (fresh machines and containers
/// often lack it), as xlb itself does; panics with the command to run when mounting fails.
pub fn ensure_bpffs() {
    let probe = Path::new(xlb::dataplane::pins::BPFFS_ROOT).join("xlb-test");
    if let Err(err) = xlb::dataplane::pins::ensure_bpffs(&probe) {
        panic!("{err}");
    }
}

/// Attaches xlb's do-nothing program (`xlb_noop`, `XDP_PASS`) in native mode to `device` in
/// `ns`, until the returned object is dropped. A veth takes the frames native XDP redirects
/// (or sends back with `XDP_TX`) into its pair only when this, the receiving end, runs an XDP
/// program. The object's conntrack maps are made small: the program never touches them.
pub fn attach_native_noop(ns: &crate::netns::Netns, device: &str) -> Ebpf {
    ns.enter(|| {
        let mut loader = EbpfLoader::new();
        for map in [CT_FWD_MAP, CT_REV_MAP, CT_HALF_MAP] {
            loader.map_max_entries(map, 1024);
        }
        let mut ebpf = loader
            .load(xlb::dataplane::xdp::BPF_OBJECT)
            .unwrap_or_else(|e| panic!("loading the BPF object: {e}"));
        let noop: &mut Xdp = ebpf
            .program_mut(PROGRAM_NOOP)
            .expect("the no-op program")
            .try_into()
            .expect("an XDP program");
        noop.load()
            .unwrap_or_else(|e| panic!("loading {PROGRAM_NOOP}: {e}"));
        noop.attach(device, XdpMode::Driver)
            .unwrap_or_else(|e| panic!("attaching {PROGRAM_NOOP} natively to {device}: {e}"));
        ebpf
    })
}
