//! Where a translated packet goes: next hop or FIB lookup, then `XDP_TX`, a redirect, or the
//! kernel.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC, bpf_fib_lookup,
        xdp_action,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect},
};
use lb_common::{
    steps::{STEP_REDIRECT, STEP_ROUTE},
    *,
};
use network_types::eth::EthHdr;

use crate::{
    frame::{Frame, Hook},
    maps::{XLB_FIB_SCRATCH, XLB_NEXT_HOPS, XLB_ROUTE_SCRATCH, XLB_XMIT, count},
    packet::ptr_at,
    steps::skipped,
};

/// `AF_INET`.
const AF_INET: u8 = 2;
/// Longest frame generic mode transmits from XDP: a standard Ethernet frame (1500-byte MTU).
/// Longer ones are TCP segmentation super-packets the generic redirect would drop.
const GENERIC_MAX_XMIT_FRAME: usize = EthHdr::LEN + 1500;
/// Size of `bpf_fib_lookup` in 32-bit words.
const FIB_PARAMS_WORDS: usize = core::mem::size_of::<bpf_fib_lookup>() / 4;
const _: () = assert!(core::mem::size_of::<bpf_fib_lookup>() == 64);

/// Result of a FIB lookup toward a destination (kept in a per-CPU scratch slot, see
/// [`route`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Route {
    /// Egress ifindex (also set when the neighbour is unresolved).
    pub ifindex: u32,
    /// Preferred source address for the route (network order), when asked for.
    pub src: [u8; 4],
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// Whether the neighbour is resolved (MACs valid).
    pub resolved: bool,
}

/// Looks up the route to `dst` as the kernel would forward it from the ingress device.
/// `want_src` also asks for the source address the kernel would use (BPF_FIB_LOOKUP_SRC,
/// Linux 6.7+). `None` when there is no usable route. The result lives in a per-CPU scratch
/// slot (the 512-byte BPF stack is short), valid until the next call on this CPU.
#[inline(always)]
pub fn route<F: Frame>(
    ctx: &F,
    proto: u8,
    dst: [u8; 4],
    tot_len: u16,
    want_src: bool,
) -> Option<&'static Route> {
    // The 64-byte parameter block lives in a per-CPU scratch slot, not on the 512-byte BPF
    // stack. Zeroed word by word with volatile stores: a zero-fill LLVM recognises compiles
    // to a call of the BPF object's byte-loop `memset`, 64 iterations.
    let scratch = XLB_FIB_SCRATCH.get_ptr_mut(0)?;
    let words = scratch.cast::<u32>();
    for i in 0..FIB_PARAMS_WORDS {
        // SAFETY: i < 16 words of 4 bytes inside the 64-byte, 8-aligned map value.
        unsafe { words.add(i).write_volatile(0) };
    }
    let params = scratch.cast::<bpf_fib_lookup>();
    // SAFETY: params points to 64 zeroed, writable bytes (a valid bpf_fib_lookup, plain C
    // data), private to this CPU while the program runs.
    unsafe {
        (*params).family = AF_INET;
        (*params).l4_protocol = proto;
        // At TC the kernel checks the skb itself when no length is given, which lets a GSO
        // packet (longer than the MTU, segmented on the way out) through.
        (*params).__bindgen_anon_1.tot_len = if F::HOOK == Hook::Tc { 0 } else { tot_len };
        (*params).ifindex = ctx.ingress_ifindex();
        (*params).__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    }
    let flags = if want_src { BPF_FIB_LOOKUP_SRC } else { 0 };
    // SAFETY: params is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    // SAFETY: as above; the kernel filled it in.
    let params = unsafe { &*params };
    let resolved = rc == BPF_FIB_LKUP_RET_SUCCESS as i64;
    if !resolved && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return None;
    }
    let out = XLB_ROUTE_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch slot, private to this CPU while the program runs.
    unsafe {
        *out = Route {
            ifindex: params.ifindex,
            // SAFETY: the ipv4_src arm of the union is the one the kernel writes for AF_INET.
            src: params.__bindgen_anon_3.ipv4_src.to_ne_bytes(),
            smac: params.smac,
            dmac: params.dmac,
            resolved,
        };
        Some(&*out)
    }
}

/// The route of a new flow toward backend `ip`: the next hop userspace resolved for it, or
/// the FIB's when it has none current (counted). See [`route`] for the rest.
///
/// Not inlined (a BPF subprogram): the verifier then meets one state after it, not one per
/// way the route was found, and the whole program stays within its instruction budget.
#[inline(never)]
pub fn new_flow_route<F: Frame>(
    ctx: &F,
    proto: u8,
    ip: [u8; 4],
    tot_len: u16,
    now: u64,
) -> Option<&'static Route> {
    if skipped(STEP_ROUTE) {
        return fixed_route(ctx);
    }
    if let Some(hop) = next_hop(ip, now) {
        return Some(hop);
    }
    count(STAT_NEXT_HOP_MISS);
    route(ctx, proto, ip, tot_len, true)
}

/// The route toward backend `ip` from its next hop (`XLB_NEXT_HOPS`), when userspace has
/// confirmed it within `NEXT_HOP_MAX_AGE_NS` of `now`; `None` otherwise. Same scratch slot
/// as [`route`].
#[inline(always)]
fn next_hop(ip: [u8; 4], now: u64) -> Option<&'static Route> {
    let hop = XLB_NEXT_HOPS.get_ptr(&ip)?;
    // SAFETY: points into a map value, valid for this program run.
    let hop = unsafe { &*hop };
    if now.saturating_sub(hop.confirmed_ns) >= NEXT_HOP_MAX_AGE_NS || hop.ifindex == 0 {
        return None;
    }
    let out = XLB_ROUTE_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch slot, private to this CPU while the program runs.
    unsafe {
        *out = Route {
            ifindex: hop.ifindex,
            src: hop.src,
            smac: hop.smac,
            dmac: hop.dmac,
            resolved: true,
        };
        Some(&*out)
    }
}

/// The route a benchmark load uses when it leaves the route step out (`STEP_ROUTE`): back out
/// of the ingress device from a fixed documentation address (198.18.0.1), the frame's MACs
/// kept as they are.
#[inline(always)]
fn fixed_route<F: Frame>(ctx: &F) -> Option<&'static Route> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    let out = XLB_ROUTE_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch slot, private to this CPU while the program runs; eth was
    // bounds checked.
    unsafe {
        *out = Route {
            ifindex: ctx.ingress_ifindex(),
            src: [198, 18, 0, 1],
            smac: (*eth).0.src_addr,
            dmac: (*eth).0.dst_addr,
            resolved: true,
        };
        Some(&*out)
    }
}

/// Sends the (already translated) packet out of `ifindex` with the given MACs.
///
/// - TC: `bpf_redirect` to the device's egress, any device and any length: the skb goes as it
///   is, a GSO packet is segmented by the egress device.
/// - Generic XDP: the frame is an skb, so `XDP_TX` / redirect work into any device, veth
///   included; frames longer than [`GENERIC_MAX_XMIT_FRAME`] (GSO super-packets) are passed
///   to the kernel translated.
/// - Native XDP: only devices in the xmit devmap (drivers that take XDP frames) are used; for
///   others (a veth whose peer runs no XDP program loses redirected frames) the translated
///   packet is passed to the kernel with its Ethernet header untouched, and the kernel
///   forwards it.
#[inline(always)]
pub fn xmit<F: Frame>(ctx: &F, ifindex: u32, smac: [u8; 6], dmac: [u8; 6]) -> Result<u32, u32> {
    let same_device = ifindex == ctx.ingress_ifindex();
    if F::HOOK == Hook::Generic && ctx.len() > GENERIC_MAX_XMIT_FRAME {
        // Pass: a GSO/GRO super-packet (generic XDP sees the whole skb); the generic
        // redirect drops any skb longer than the egress MTU, so the kernel forwards the
        // translated packet and segments it (ip_forward=1, accept_local=1, as below).
        count(STAT_XMIT_PASS);
        return Ok(xdp_action::XDP_PASS);
    }
    if F::HOOK == Hook::Native {
        // Toward another device the redirect itself is the devmap lookup (one hash walk, where
        // a lookup first was two): `XDP_PASS` when the device is not in it. It only records the
        // target, so the MACs can still be written after it; toward the ingress device
        // `XDP_TX` needs no redirect, only the lookup.
        let verdict = if same_device {
            match XLB_XMIT.get_ifindex(ifindex) {
                Some(_) => xdp_action::XDP_TX,
                None => xdp_action::XDP_PASS,
            }
        } else {
            match XLB_XMIT.redirect(ifindex, xdp_action::XDP_PASS as u64) {
                Ok(verdict) | Err(verdict) => verdict,
            }
        };
        if verdict == xdp_action::XDP_PASS {
            // Pass: the kernel forwards the translated packet (ip_forward=1, accept_local=1).
            count(STAT_XMIT_PASS);
            return Ok(verdict);
        }
        rewrite_macs(ctx, smac, dmac)?;
        return Ok(verdict);
    }
    rewrite_macs(ctx, smac, dmac)?;
    if F::HOOK == Hook::Generic && (same_device || skipped(STEP_REDIRECT)) {
        // Out of the ingress device; a benchmark load leaving the redirect out (the helper
        // call) does so too.
        return Ok(xdp_action::XDP_TX);
    }
    // SAFETY: plain helper call. At TC it returns TC_ACT_REDIRECT, in generic XDP
    // XDP_REDIRECT (flags are 0, so it cannot fail); both are XDP_REDIRECT here.
    unsafe { bpf_redirect(ifindex, 0) };
    Ok(xdp_action::XDP_REDIRECT)
}

/// Writes the next hop's MACs into the frame's Ethernet header.
#[inline(always)]
fn rewrite_macs<F: Frame>(ctx: &F, smac: [u8; 6], dmac: [u8; 6]) -> Result<(), u32> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(xdp_action::XDP_ABORTED)?;
    // SAFETY: ptr_at checked bounds.
    unsafe {
        (*eth).0.src_addr = smac;
        (*eth).0.dst_addr = dmac;
    }
    Ok(())
}
