//! Types and constants shared by the xlb BPF programs (`lb-ebpf`) and userspace
//! (`lb-userspace`): map names, map keys and values, counter indices.
//!
//! Every map type is `#[repr(C)]`, `Copy`, with padding written out, and has a compile-time
//! size assertion so the kernel and userspace sides cannot drift apart.
#![no_std]

pub mod stats;

pub use stats::*;

/// Directory under bpffs where xlb pins its maps, programs and links. A restarted loader adopts
/// what it finds here instead of recreating it.
pub const PIN_DIR: &str = "/sys/fs/bpf/xlb";
