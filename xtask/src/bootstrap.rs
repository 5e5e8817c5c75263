//! Makes sure the BPF toolchain and the test tools are on the machine, installing what is
//! missing (see `../shared/TESTING.md`). Each step prints one line; satisfied steps are checked
//! with cheap file and package-database look-ups so a ready machine is through in well under a
//! second. A step that cannot be done fails with the command to run by hand.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};

/// Debian packages bpf-linker links against (Debian's LLVM 22 matches nightly's LLVM 22.1).
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Where Debian puts LLVM 22's tools; must come first in PATH when building bpf-linker.
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
/// Tools the tests, the demo and the benchmarks drive.
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "nftables",
    "iperf3",
    "haproxy",
    "bpftool",
    "tcpdump",
    "ethtool",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

/// What a subcommand needs on the machine.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Building the BPF object: nightly rust-src, LLVM 22, bpf-linker.
    Build,
    /// Building plus the tools tests, demo and bench drive.
    BuildAndTestTools,
}

/// Installs whatever `needs` lacks.
pub fn ensure(needs: Needs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut apt = Apt::default();
    ensure_rust_src()?;
    apt.ensure(LLVM_PACKAGES, "LLVM 22 for bpf-linker")?;
    ensure_bpf_linker()?;
    if needs == Needs::BuildAndTestTools {
        apt.ensure(TEST_PACKAGES, "test tools")?;
        if which("kubectl").is_none() {
            eprintln!(
                "[xtask] warning: kubectl not found; the controller tests that drive it will fail"
            );
        }
    }
    eprintln!(
        "[xtask] toolchain ready ({:.2}s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let sysroot = output("rustup", &["run", "nightly", "rustc", "--print", "sysroot"]).context(
        "the nightly toolchain is missing; install it by hand: rustup toolchain install nightly",
    )?;
    let library = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if library.is_dir() {
        return Ok(());
    }
    step(
        "adding rust-src to the nightly toolchain (for -Z build-std=core)",
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        "rustup component add rust-src --toolchain nightly",
    )
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if let Some(path) = which("bpf-linker")
        && Command::new(&path)
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success())
    {
        return Ok(());
    }
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    step(
        "building bpf-linker against LLVM 22 (1-3 minutes)",
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path),
        &format!(
            "PATH={LLVM_BIN}:$PATH cargo install bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-22"
        ),
    )
}

/// apt-get, with `apt-get update` run at most once per xtask run, before the first install.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn ensure(&mut self, packages: &[&str], why: &str) -> anyhow::Result<()> {
        let missing: Vec<&str> = packages
            .iter()
            .copied()
            .filter(|package| !installed(package))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let list = missing.join(" ");
        let by_hand = format!("apt-get update && apt-get install -y {list}");
        if !is_root() {
            bail!(
                "{why} missing ({list}) and installing needs root; run by hand: sudo sh -c '{by_hand}'"
            );
        }
        if !self.updated {
            step(
                "refreshing the package lists (apt-get update)",
                Command::new("apt-get").args(["update", "-q"]),
                &by_hand,
            )?;
            self.updated = true;
        }
        step(
            &format!("installing {why}: {list}"),
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            &by_hand,
        )
    }
}

/// Whether this process runs as root (installing packages and loading BPF need it).
pub fn is_root() -> bool {
    output("id", &["-u"]).is_ok_and(|uid| uid.trim() == "0")
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).starts_with("install ok installed"))
}

/// Runs one install step with a progress line; its output goes to a log shown only on failure.
fn step(what: &str, cmd: &mut Command, by_hand: &str) -> anyhow::Result<()> {
    eprintln!("[xtask] {what} ...");
    let started = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("could not start {cmd:?}; run by hand: {by_hand}"))?;
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("{what} failed ({}); run by hand: {by_hand}", out.status);
    }
    eprintln!(
        "[xtask] {what}: done in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Finds `program` in PATH or in cargo's bin directory.
pub fn which(program: &str) -> Option<PathBuf> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .map(|home| home.join("bin"));
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(cargo_bin)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
