//! The SNAT port range, set by userspace at load time, and the SNAT addresses.
//!
//! A `.rodata` constant that the loader overwrites before the program is verified
//! (`EbpfLoader::set_global`): the map is frozen, so the verifier knows the range's numbers
//! and prunes the branches they rule out; a packet still pays the load of it (the JIT keeps
//! the instruction), from memory every packet touches.

use lb_common::{MAX_SNAT_EXTRA, SNAT_PORTS_DEFAULT, SnatPorts};

use crate::maps::{XLB_SNAT_ADDRS, XLB_SNAT_SCRATCH};

/// The SNAT port range ([`lb_common::SNAT_PORTS_GLOBAL`]).
#[unsafe(no_mangle)]
static XLB_SNAT_PORTS: SnatPorts = SNAT_PORTS_DEFAULT;

/// The SNAT port range the loader set.
#[inline(always)]
pub fn ports() -> SnatPorts {
    // SAFETY: a plain read of a static; volatile so the compiler does not fold the default in
    // (the loader rewrites the value in the object before loading it).
    unsafe { core::ptr::read_volatile(&XLB_SNAT_PORTS) }
}

/// Number of address slots in the per-CPU scratch list: a power of two, so an index masked
/// with `SLOTS - 1` needs no bounds branch.
const SLOTS: usize = MAX_SNAT_EXTRA + 1;
const _: () = assert!(SLOTS.is_power_of_two());
/// Scratch slot holding how many addresses the list has.
const COUNT: usize = SLOTS;
/// Scratch slot holding the index of the address of a flow's first candidate.
const FIRST: usize = SLOTS + 1;
/// Words in the scratch list.
pub const SCRATCH_WORDS: usize = SLOTS + 2;

/// Prepares a new flow's SNAT addresses when its route gives `src` as source and its hash is
/// `hash`: `src` itself, then the extra addresses userspace put in `XLB_SNAT_ADDRS` for it,
/// written to a per-CPU scratch list (addresses as native words of their network-order
/// bytes) with their count and the address the hash picks for the first candidate. `false`
/// if the scratch slot is missing. One hash lookup, on new flows only; the probe loop reads
/// the list without branches and keeps nothing on the short BPF stack.
#[inline(always)]
pub fn prepare(src: [u8; 4], hash: u32) -> bool {
    let Some(list) = XLB_SNAT_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU scratch slot, private to this CPU while the program runs; extra points
    // into a map value, valid for this program run.
    unsafe {
        (*list)[0] = u32::from_ne_bytes(src);
        let mut count = 1u32;
        if let Some(extra) = XLB_SNAT_ADDRS.get_ptr(&src) {
            let extra = &*extra;
            let n = extra.count.min(MAX_SNAT_EXTRA as u32);
            for i in 0..MAX_SNAT_EXTRA {
                if (i as u32) < n {
                    (*list)[i + 1] = u32::from_ne_bytes(extra.addrs[i]);
                }
            }
            count += n;
        }
        (*list)[COUNT] = count;
        (*list)[FIRST] = (hash >> 8) & 0xff;
    }
    true
}

/// Index of the address of candidate `attempt`: candidates go round the addresses from the
/// one the hash picked.
#[inline(always)]
pub fn candidate(attempt: u32) -> u32 {
    match XLB_SNAT_SCRATCH.get_ptr(0) {
        // SAFETY: per-CPU scratch slot written by `prepare` in this program run.
        Some(list) => unsafe { ((*list)[FIRST] + attempt) % (*list)[COUNT].max(1) },
        None => 0,
    }
}

/// Address `index` of the list [`prepare`] wrote (the index is masked into the list).
#[inline(always)]
pub fn address(index: u32) -> [u8; 4] {
    let Some(list) = XLB_SNAT_SCRATCH.get_ptr(0) else {
        return [0; 4];
    };
    // SAFETY: per-CPU scratch slot written by `prepare` in this program run; the index is
    // masked into bounds.
    unsafe { (*list)[index as usize & (SLOTS - 1)] }.to_ne_bytes()
}
