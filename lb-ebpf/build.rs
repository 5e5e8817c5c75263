//! Building this crate for the BPF target needs `bpf-linker`, which cargo does not know about:
//! rebuild whenever the linker binary changes so a reinstalled linker is picked up.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!(
            "cargo:warning=bpf-linker not found ({err}); run `cargo xtask build` to install it"
        ),
    }
}
