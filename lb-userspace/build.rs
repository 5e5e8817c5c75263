//! Builds the `lb-ebpf` BPF object for the BPF target (nightly, `-Z build-std=core`,
//! `bpf-linker`) and leaves it in `OUT_DIR`, where the loader embeds it, with the measuring
//! build beside it (`lb-steps`, for `bench_xdp`). `cargo xtask` installs the toolchain this
//! needs.
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
    let out_dir = std::env::var("OUT_DIR").context("OUT_DIR unset")?;
    let out_dir = std::path::Path::new(&out_dir);
    // The measuring build first (`bench_xdp` times steps left out of it), moved aside, then
    // the object xlb attaches: both come out as `lb`.
    build(root_dir, &["steps"])?;
    std::fs::rename(out_dir.join("lb"), out_dir.join("lb-steps"))
        .context("moving the measuring build aside")?;
    build(root_dir, &[])
}

fn build(root_dir: &str, features: &[&str]) -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir,
            features,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the BPF object failed; run `cargo xtask build` to install the BPF toolchain")
}
