//! Builds the `lb-ebpf` BPF object for the BPF target (nightly, `-Z build-std=core`,
//! `bpf-linker`) and leaves it in `OUT_DIR`, where the loader embeds it. `cargo xtask`
//! installs the toolchain this needs.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR unset")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("lb-userspace has no parent directory"))?
        .join("lb-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the BPF object failed; run `cargo xtask build` to install the BPF toolchain")
}
