//! The pin directory: where the XDP data plane's maps, programs and links live so that they
//! outlast the process, and how a restarted xlb finds and adopts them.
//!
//! Everything lives under one directory ([`super::xdp::XdpConfig::pin_dir`], default
//! [`lb_common::PIN_DIR`]), which must be on bpffs: one file per map (`XLB_SERVICES`,
//! `XLB_CT_FWD`, …, all with BTF), the programs of the hooks in use (`prog_xlb`,
//! `prog_xlb_skb`, `prog_xlb_tc`, each with its new-flow program, `prog_xlb_new_flow` and so
//! on) and one bpf_link per device (`link_drv_<ifname>` for native, `link_skb_<ifname>` for
//! generic XDP, `link_tc_<ifname>` for TC). The data plane keeps forwarding while no xlb
//! process runs (crash, SIGKILL, upgrade). A restarted loader reuses the pinned maps
//! (conntrack included, so established connections survive) once their layout is checked
//! (conntrack maps of the layout before 2026-12-08 are carried over, see `super::upgrade`),
//! writes its new-flow programs into their slots, and swaps its freshly loaded main programs
//! into the pinned links (`BPF_LINK_UPDATE`).
//!
//! # bpffs
//! When the pin directory lies under [`BPFFS_ROOT`] and no bpffs is mounted there (a fresh
//! host, or a container that did not mount it), xlb mounts one, as Cilium does, and logs it.
//! A pin directory elsewhere that is not on bpffs is refused with the command that fixes it.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use aya::Ebpf;
use aya::maps::MapInfo;
use aya::programs::ProgramError;
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::xdp::XdpLink;
use lb_common::*;

use super::DataplaneError;
use super::xdp::{AttachMode, typed_mut};

/// Where bpffs is conventionally mounted, and where xlb mounts it when it is missing.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// `BPF_FS_MAGIC` from `linux/magic.h`: `statfs` reports it for bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The filesystem type (`statfs` magic) of `path`.
fn fs_magic(path: &Path) -> std::io::Result<i64> {
    let name = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: all-zero is a valid `statfs`; the kernel fills it in.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: name is NUL-terminated and stat is a valid, writable `statfs`.
    if unsafe { libc::statfs(name.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_type as i64)
}

/// A readable name for a filesystem magic, for error messages.
fn fs_name(magic: i64) -> String {
    match magic {
        0x0102_1994 => "tmpfs".to_owned(),
        0x6265_6572 => "sysfs".to_owned(),
        0x794c_7630 => "overlayfs".to_owned(),
        0xef53 => "ext4".to_owned(),
        0x9123_683e => "btrfs".to_owned(),
        0x5846_5342 => "xfs".to_owned(),
        other => format!("filesystem type {other:#x}"),
    }
}

/// Whether `path` is on bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    fs_magic(path).is_ok_and(|magic| magic == BPF_FS_MAGIC)
}

/// Makes sure `pin_dir` can hold pins: it, or the nearest of its ancestors that exists, must be
/// on bpffs. When `pin_dir` lies under [`BPFFS_ROOT`] and nothing is mounted there, mounts
/// bpffs on [`BPFFS_ROOT`] (`mount -t bpf bpf /sys/fs/bpf`) and logs it; otherwise an error
/// says how to fix it.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), DataplaneError> {
    ensure_bpffs_under(pin_dir, Path::new(BPFFS_ROOT))
}

/// [`ensure_bpffs`] with the mount point `root` to use when bpffs is missing.
pub fn ensure_bpffs_under(pin_dir: &Path, root: &Path) -> Result<(), DataplaneError> {
    let existing = pin_dir
        .ancestors()
        .find(|dir| dir.exists())
        .unwrap_or(Path::new("/"));
    let magic = fs_magic(existing).map_err(|source| DataplaneError::Pin {
        path: existing.to_owned(),
        source,
    })?;
    if magic == BPF_FS_MAGIC {
        return Ok(());
    }
    if !pin_dir.starts_with(root) || !root.is_dir() || is_bpffs(root) {
        return Err(DataplaneError::NotBpffs {
            path: pin_dir.to_owned(),
            fs: fs_name(magic),
            mount_point: existing.to_owned(),
        });
    }
    mount_bpffs(root)?;
    tracing::info!(
        mount_point = %root.display(),
        "bpffs was not mounted: mounted it (as `mount -t bpf bpf {}` would) to pin the data plane",
        root.display()
    );
    Ok(())
}

/// `mount -t bpf bpf <root>`.
fn mount_bpffs(root: &Path) -> Result<(), DataplaneError> {
    let target = CString::new(root.as_os_str().as_bytes()).map_err(|e| DataplaneError::Pin {
        path: root.to_owned(),
        source: std::io::Error::other(e),
    })?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; no data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DataplaneError::MountBpffs {
            path: root.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Expected `(key size, value size)` of each pinned map, checked when adopting it.
fn expected_layout(name: &str) -> Option<(usize, usize)> {
    use core::mem::size_of;
    Some(match name {
        SERVICES_MAP => (size_of::<ServiceKey>(), size_of::<ServiceValue>()),
        BACKENDS_MAP => (size_of::<BackendKey>(), size_of::<BackendValue>()),
        VIPS_MAP => (4, size_of::<VipValue>()),
        SERVICE_PORTS_MAP => (4, 8),
        CT_FWD_MAP | CT_REV_MAP | CT_HALF_MAP => (size_of::<FlowKey>(), size_of::<CtEntry>()),
        DEV_MACS_MAP => (4, size_of::<DeviceMac>()),
        NEXT_HOPS_MAP => (4, size_of::<NextHop>()),
        STATS_MAP => (4, 8),
        NEW_FLOW_XDP_MAP | NEW_FLOW_TC_MAP => (4, 4),
        SVC_STATS_MAP => (4, size_of::<ServiceStats>()),
        _ => return None,
    })
}

/// Fails when map `name` is pinned in `dir` with another key or value size than this xlb's
/// (a pin left by another version); a map not pinned yet is fine.
pub fn check_pinned_layout(dir: &Path, name: &'static str) -> Result<(), DataplaneError> {
    let path = dir.join(name);
    let Some((key, value)) = expected_layout(name) else {
        return Ok(());
    };
    if !path.exists() {
        return Ok(());
    }
    let info = MapInfo::from_pin(&path).map_err(|source| DataplaneError::Map { name, source })?;
    // The global counters hold no state worth keeping: an array of another version's length
    // (new counters added) is replaced, and the counters start again from zero. The same for
    // a half-open table of another size: it holds only handshakes in progress (a client whose
    // ACK then finds no flow is answered by the kernel and connects again).
    let wanted_entries = match name {
        STATS_MAP => Some(STAT_COUNT),
        CT_HALF_MAP => Some(MAX_HALF_OPEN_ENTRIES),
        _ => None,
    };
    if let Some(wanted) = wanted_entries
        && info.max_entries() != wanted
    {
        std::fs::remove_file(&path).map_err(|source| DataplaneError::Pin {
            path: path.clone(),
            source,
        })?;
        tracing::info!(
            path = %path.display(), was = info.max_entries(), now = wanted,
            "replaced a pinned map of another xlb version's size; it starts empty"
        );
        return Ok(());
    }
    if info.key_size() as usize != key || info.value_size() as usize != value {
        return Err(DataplaneError::IncompatibleMap {
            detail: format!(
                "key/value {}/{} bytes, expected {key}/{value}",
                info.key_size(),
                info.value_size()
            ),
            path,
        });
    }
    Ok(())
}

/// Where program `name` is pinned.
pub fn program_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("prog_{name}"))
}

/// Where the link of `device`, attached in `mode`, is pinned.
pub fn link_path(dir: &Path, mode: AttachMode, device: &str) -> PathBuf {
    dir.join(format!("link_{}_{device}", mode.tag()))
}

/// A link pin found in the pin directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkPin {
    /// The device the link attaches to.
    pub device: String,
    /// How it is attached.
    pub mode: AttachMode,
    /// The pin's path.
    pub path: PathBuf,
}

/// The device and mode a link pin's file name (`link_drv_eth0`, `link_skb_eth0`) stands for.
fn parse_link_name(file: &str) -> Option<(AttachMode, &str)> {
    [AttachMode::Native, AttachMode::Generic, AttachMode::Tc]
        .into_iter()
        .find_map(|mode| {
            let device = file.strip_prefix(&format!("link_{}_", mode.tag()))?;
            (!device.is_empty()).then_some((mode, device))
        })
}

/// The link pins in `dir`.
pub fn link_pins(dir: &Path) -> Result<Vec<LinkPin>, DataplaneError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DataplaneError::Pin {
        path: dir.to_owned(),
        source,
    })?;
    let mut pins: Vec<LinkPin> = entries
        .flatten()
        .filter_map(|entry| {
            let file = entry.file_name().to_string_lossy().into_owned();
            let (mode, device) = parse_link_name(&file)?;
            Some(LinkPin {
                device: device.to_owned(),
                mode,
                path: entry.path(),
            })
        })
        .collect();
    pins.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(pins)
}

/// Whether `dir` holds XDP links pinned by an earlier xlb: they stay attached, and keep
/// forwarding with their old maps, until the pins are removed. `false` when `dir` cannot be
/// read (no pins there that xlb could have made).
pub fn stale_links(dir: &Path) -> bool {
    link_pins(dir).is_ok_and(|pins| !pins.is_empty())
}

/// Takes over the pinned link at `path`, attached in `mode`: swaps the freshly loaded program
/// of that mode into it (`BPF_LINK_UPDATE`), so the device keeps its program without a gap.
pub fn adopt_link(ebpf: &mut Ebpf, mode: AttachMode, path: &Path) -> Result<FdLink, String> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| format!("opening the pin: {e}"))?;
    let link = FdLink::from(pinned);
    let not_ours = |e: LinkError| format!("the pin is not a link of this kind: {e}");
    let swap_failed = |e: ProgramError| format!("swapping the program in: {e}");
    match mode {
        AttachMode::Native | AttachMode::Generic => {
            let program =
                typed_mut::<aya::programs::Xdp>(ebpf, mode.program()).map_err(|e| e.to_string())?;
            let link = XdpLink::try_from(link).map_err(not_ours)?;
            let id = program.attach_to_link(link).map_err(swap_failed)?;
            FdLink::try_from(program.take_link(id).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())
        }
        AttachMode::Tc => {
            let program = typed_mut::<aya::programs::SchedClassifier>(ebpf, PROGRAM_TC)
                .map_err(|e| e.to_string())?;
            let link = SchedClassifierLink::try_from(link).map_err(not_ours)?;
            let id = program.attach_to_link(link).map_err(swap_failed)?;
            FdLink::try_from(program.take_link(id).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_give_device_and_mode() {
        assert_eq!(
            parse_link_name("link_drv_eth0"),
            Some((AttachMode::Native, "eth0"))
        );
        assert_eq!(
            parse_link_name("link_skb_veth-a_1"),
            Some((AttachMode::Generic, "veth-a_1"))
        );
        assert_eq!(
            parse_link_name("link_tc_eth0"),
            Some((AttachMode::Tc, "eth0"))
        );
        assert_eq!(parse_link_name("link_skb_"), None);
        assert_eq!(parse_link_name("prog_xlb"), None);
        assert_eq!(parse_link_name("XLB_CT_FWD"), None);
        let dir = Path::new("/sys/fs/bpf/xlb");
        assert_eq!(
            link_path(dir, AttachMode::Native, "eth0"),
            dir.join("link_drv_eth0")
        );
    }

    #[test]
    fn stale_links_are_link_pins_only() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        assert!(!stale_links(dir.path()), "an empty directory");
        assert!(
            !stale_links(&dir.path().join("missing")),
            "a directory that does not exist"
        );
        for name in ["XLB_SERVICES", "prog_xlb", "link_other"] {
            std::fs::write(dir.path().join(name), b"").expect("a file");
        }
        assert!(!stale_links(dir.path()), "maps and programs are not links");
        std::fs::write(dir.path().join("link_skb_eth0"), b"").expect("a file");
        assert!(stale_links(dir.path()), "a generic link pin");
        let pins = link_pins(dir.path()).expect("readable");
        assert_eq!(
            pins,
            vec![LinkPin {
                device: "eth0".to_owned(),
                mode: AttachMode::Generic,
                path: dir.path().join("link_skb_eth0"),
            }]
        );
    }

    #[test]
    fn a_pin_dir_off_bpffs_outside_the_bpffs_root_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        assert!(!is_bpffs(dir.path()), "a temporary directory is not bpffs");
        let pins = dir.path().join("xlb");
        let err = ensure_bpffs(&pins).expect_err("not bpffs, not under /sys/fs/bpf");
        let message = err.to_string();
        assert!(
            message.contains(&format!("mount -t bpf bpf {}", dir.path().display())),
            "{message}"
        );
        assert!(!pins.exists(), "nothing is created");
    }
}
