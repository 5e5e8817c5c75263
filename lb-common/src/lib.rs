//! Types and constants shared by the xlb BPF programs (`lb-ebpf`) and userspace
//! (`lb-userspace`): map names, map keys and values, counter indices, checksum and hash
//! helpers.
//!
//! Every map type is `#[repr(C)]`, `Copy`, with padding written out, and has a compile-time
//! size assertion so the kernel and userspace sides cannot drift apart.
#![no_std]

pub mod csum;
pub mod hash;
pub mod maps;
pub mod stats;
pub mod steps;

pub use hash::flow_hash;
pub use maps::*;
pub use stats::*;

/// Default directory under bpffs where xlb pins its maps, programs and links. A restarted
/// loader adopts what it finds here instead of recreating it.
pub const PIN_DIR: &str = "/sys/fs/bpf/xlb";

/// Name of the XDP program attached in native (driver) mode.
pub const PROGRAM_NATIVE: &str = "xlb";
/// Name of the XDP program attached in generic (skb) mode.
pub const PROGRAM_GENERIC: &str = "xlb_skb";
/// Name of the TC ingress program (clsact/TCX classifier).
pub const PROGRAM_TC: &str = "xlb_tc";
/// The new-flow program each main program tail-calls (see [`NEW_FLOW_XDP_MAP`]): native XDP.
pub const PROGRAM_NEW_FLOW_NATIVE: &str = "xlb_new_flow";
/// The new-flow program of generic XDP.
pub const PROGRAM_NEW_FLOW_GENERIC: &str = "xlb_skb_new_flow";
/// The new-flow program of TC.
pub const PROGRAM_NEW_FLOW_TC: &str = "xlb_tc_new_flow";
/// A do-nothing XDP program (returns `XDP_PASS`), the baseline for benchmarks.
pub const PROGRAM_NOOP: &str = "xlb_noop";
/// The floor XDP program (one conntrack lookup, DNAT rewrite, `XDP_TX`), the other baseline.
pub const PROGRAM_FLOOR: &str = "xlb_floor";
