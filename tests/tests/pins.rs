//! The pin directory's filesystem: xlb mounts bpffs on /sys/fs/bpf when nothing is mounted
//! there. The test runs again inside a private mount namespace (`unshare --mount
//! --propagation private`), where it hides /sys/fs/bpf under a tmpfs, so the host's
//! /sys/fs/bpf is never touched.

use std::path::Path;
use std::process::Command;

use lb_common::SERVICES_MAP;
use xlb::dataplane::pins::{BPFFS_ROOT, ensure_bpffs, is_bpffs};
use xlb::dataplane::xdp::{XdpConfig, XdpDataplane};
use xlb_tests::netns::require_root;

/// Set in the re-run inside the private mount namespace, to the mount namespace it must not be.
const IN_PRIVATE_NS: &str = "XLB_PINS_TEST_IN_PRIVATE_MOUNT_NS";

/// The mount namespace of process `pid` (`self` for this one).
fn mount_ns(pid: &str) -> String {
    let link = format!("/proc/{pid}/ns/mnt");
    std::fs::read_link(&link)
        .unwrap_or_else(|err| panic!("reading {link}: {err}"))
        .display()
        .to_string()
}

#[test]
fn bpffs_is_mounted_on_sys_fs_bpf_when_missing() {
    const NAME: &str = "bpffs_is_mounted_on_sys_fs_bpf_when_missing";
    if let Ok(outer) = std::env::var(IN_PRIVATE_NS) {
        in_private_mount_ns(&outer);
        return;
    }
    require_root("mounting bpffs in a private mount namespace");
    let host_had_bpffs = is_bpffs(Path::new(BPFFS_ROOT));
    let exe = std::env::current_exe().expect("the test binary");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private"])
        .arg(exe)
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(IN_PRIVATE_NS, mount_ns("self"))
        .output()
        .unwrap_or_else(|err| panic!("running unshare (util-linux): {err}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "the test in a private mount namespace failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert_eq!(
        is_bpffs(Path::new(BPFFS_ROOT)),
        host_had_bpffs,
        "the host's /sys/fs/bpf must be as it was"
    );
}

/// Inside the private mount namespace: hide bpffs, then let the data plane open.
fn in_private_mount_ns(outer: &str) {
    assert_ne!(
        mount_ns("self"),
        outer,
        "not in a private mount namespace: refusing to mount over /sys/fs/bpf"
    );
    let root = Path::new(BPFFS_ROOT);
    // SAFETY: NUL-terminated strings that outlive the call; no data.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    assert_eq!(
        rc,
        0,
        "hiding /sys/fs/bpf under a tmpfs: {}",
        std::io::Error::last_os_error()
    );
    assert!(!is_bpffs(root), "/sys/fs/bpf is a tmpfs now");

    let pin_dir = root.join("xlb-pins-test");
    ensure_bpffs(&pin_dir).unwrap_or_else(|err| panic!("ensure_bpffs: {err}"));
    assert!(is_bpffs(root), "xlb mounted bpffs on /sys/fs/bpf");
    ensure_bpffs(&pin_dir).unwrap_or_else(|err| panic!("a second call: {err}"));

    let dataplane = XdpDataplane::open(XdpConfig {
        pin_dir: pin_dir.clone(),
        set_sysctls: false,
        ..XdpConfig::default()
    })
    .unwrap_or_else(|err| panic!("opening the data plane on the new bpffs: {err}"));
    assert!(
        pin_dir.join(SERVICES_MAP).exists(),
        "maps are pinned in {}",
        pin_dir.display()
    );
    drop(dataplane);
}

/// Pins map `name` in `pins` as an older xlb left it, with `bpftool map create`: of `kind`,
/// with keys and values of `key` and `value` bytes and `entries` entries.
fn pin_old_map(
    pins: &xlb_tests::bpf::PinDir,
    name: &str,
    kind: &str,
    key: u32,
    value: u32,
    entries: u32,
) {
    let created = Command::new("bpftool")
        .args(["map", "create"])
        .arg(pins.path().join(name))
        .args([
            "type",
            kind,
            "key",
            &key.to_string(),
            "value",
            &value.to_string(),
        ])
        .args(["entries", &entries.to_string(), "name", name])
        .output()
        .expect("running bpftool");
    assert!(
        created.status.success(),
        "bpftool map create {name}: {}",
        String::from_utf8_lossy(&created.stderr)
    );
}

/// Counters pinned by an xlb with fewer counters (an upgrade) are replaced, not left short:
/// every counter of this version reads.
#[test]
fn counters_pinned_by_another_version_are_replaced() {
    require_root("loading BPF programs and pinning maps");
    let pins = xlb_tests::bpf::PinDir::new();
    std::fs::create_dir_all(pins.path()).expect("pin directory");
    pin_old_map(&pins, lb_common::STATS_MAP, "percpu_array", 4, 8, 26);
    let dataplane = XdpDataplane::open(XdpConfig {
        pin_dir: pins.path().to_owned(),
        ..XdpConfig::default()
    })
    .unwrap_or_else(|error| panic!("opening over an older counters pin: {error}"));
    let counters = dataplane
        .stats()
        .unwrap_or_else(|error| panic!("every counter reads: {error}"));
    assert_eq!(counters.len(), lb_common::STAT_COUNT as usize);
}

/// Conntrack entries pinned by an xlb from before the checksum sums were stored in them (48
/// bytes: today's first 48) are carried into this version's maps, sums filled in, so that an
/// upgrade keeps established flows as a restart does.
#[test]
fn conntrack_entries_of_the_layout_before_sums_are_carried_over() {
    use lb_common::{
        CT_DIR_FORWARD, CT_FWD_MAP, CT_HALF_MAP, CT_STATE_OPEN, CtEntry, FlowKey, IPPROTO_TCP,
        MAX_FLOWS, MAX_HALF_OPEN_ENTRIES, RewriteSums,
    };
    const BEFORE_SUMS: usize = 48;
    require_root("loading BPF programs and pinning maps");
    let pins = xlb_tests::bpf::PinDir::new();
    std::fs::create_dir_all(pins.path()).expect("pin directory");
    let key = FlowKey {
        src_ip: [192, 0, 2, 9],
        dst_ip: [198, 51, 100, 1],
        src_port: 40000,
        dst_port: 80,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let entry = CtEntry {
        nat_src_ip: [10, 0, 0, 1],
        nat_dst_ip: [10, 1, 0, 5],
        nat_src_port: 20000,
        nat_dst_port: 8080,
        service_id: 3,
        state: CT_STATE_OPEN,
        ifindex: 7,
        last_seen_ns: 123_456_789,
        smac: [2, 0, 0, 0, 0, 1],
        dmac: [2, 0, 0, 0, 0, 2],
        dir: CT_DIR_FORWARD,
        ..CtEntry::default()
    };
    // SAFETY: CtEntry is repr(C) plain data of its size, without padding (shared_types).
    let bytes: [u8; size_of::<CtEntry>()] = unsafe { std::mem::transmute(entry) };
    let old: [u8; BEFORE_SUMS] = bytes[..BEFORE_SUMS].try_into().expect("48 bytes");
    for (name, entries) in [
        (CT_FWD_MAP, MAX_FLOWS),
        (CT_HALF_MAP, MAX_HALF_OPEN_ENTRIES),
    ] {
        pin_old_map(&pins, name, "lru_hash", 16, BEFORE_SUMS as u32, entries);
        pins.hash_map::<FlowKey, [u8; BEFORE_SUMS]>(name)
            .insert(key, old, 0)
            .unwrap_or_else(|error| panic!("an old entry in {name}: {error}"));
    }
    let dataplane = XdpDataplane::open(XdpConfig {
        pin_dir: pins.path().to_owned(),
        ..XdpConfig::default()
    })
    .unwrap_or_else(|error| panic!("opening over conntrack pins of the layout before: {error}"));
    let expected = entry.with_sums(&key);
    assert_ne!(
        expected.sums,
        RewriteSums::default(),
        "the flow is translated"
    );
    for name in [CT_FWD_MAP, CT_HALF_MAP] {
        let carried = pins
            .ct_map(name)
            .get(&key, 0)
            .unwrap_or_else(|error| panic!("the entry in {name} after the upgrade: {error}"));
        assert_eq!(carried, expected, "{name}: the entry, sums filled in");
    }
    drop(dataplane);
}
