//! The packet as each hook hands it over. One program source is built three times, once per
//! [`Frame`]: native XDP ([`Native`]), generic XDP ([`Generic`]) and TC ingress ([`Tc`], a
//! clsact/TCX classifier on the skb). They differ in how a translated packet leaves
//! (`forward::xmit`), in how long the packet is (an skb's data may go on past its linear part)
//! and in the skb's own checksum state.

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, xdp_action},
    cty::c_void,
    helpers::{bpf_csum_update, bpf_skb_pull_data},
    programs::{TcContext, XdpContext},
};
use lb_common::{NEW_FLOW_SLOT_GENERIC, NEW_FLOW_SLOT_NATIVE};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::maps::{XLB_NEW_FLOW_TC, XLB_NEW_FLOW_XDP};

/// Words of the skb's control block (`__sk_buff::cb`, kept across the tail call into the
/// new-flow program) that carry a rewrite's checksum change to the end of the run.
const CB_CSUM_PENDING: usize = 0;
const CB_CSUM_DIFF: usize = 1;

/// The hook a build of the program runs at.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Native,
    Generic,
    Tc,
}

/// A packet at one of the hooks. Verdicts inside the program are XDP actions; the TC entry
/// point maps them ([`tc_verdict`]).
pub trait Frame {
    const HOOK: Hook;
    /// Start of the packet data that can be read directly.
    fn data(&self) -> usize;
    /// End of that data.
    fn data_end(&self) -> usize;
    /// Length of the whole packet: for an skb, its paged data included.
    fn len(&self) -> usize;
    /// The device the packet came in on.
    fn ingress_ifindex(&self) -> u32;
    /// The context pointer helpers take.
    fn as_ptr(&self) -> *mut c_void;
    /// Goes on to the new-flow program of this hook (a tail call: no return on success).
    /// Returns when that program is missing.
    fn to_new_flow(&self);
    /// Called after a rewrite that changed the sum of the L3/L4 bytes by `diff` (a 16-bit
    /// one's-complement difference): keeps an skb's `CHECKSUM_COMPLETE` sum right. XDP
    /// frames carry no such sum.
    #[inline(always)]
    fn rewritten(&self, _diff: u32) {}
}

/// A frame at native (driver) XDP.
pub struct Native(pub XdpContext);
/// A frame at generic (skb) XDP: the kernel made the skb linear first.
pub struct Generic(pub XdpContext);
/// An skb at TC ingress.
pub struct Tc(pub TcContext);

macro_rules! xdp_frame {
    ($name:ident, $hook:expr, $slot:expr) => {
        impl Frame for $name {
            const HOOK: Hook = $hook;
            #[inline(always)]
            fn data(&self) -> usize {
                self.0.data()
            }
            #[inline(always)]
            fn data_end(&self) -> usize {
                self.0.data_end()
            }
            #[inline(always)]
            fn len(&self) -> usize {
                self.0.data_end() - self.0.data()
            }
            #[inline(always)]
            fn ingress_ifindex(&self) -> u32 {
                self.0.ingress_ifindex() as u32
            }
            #[inline(always)]
            fn as_ptr(&self) -> *mut c_void {
                self.0.as_ptr()
            }
            #[inline(always)]
            fn to_new_flow(&self) {
                // SAFETY: a tail call with this run's context; on failure it returns.
                unsafe { XLB_NEW_FLOW_XDP.tail_call(&self.0, $slot) };
            }
        }
    };
}

xdp_frame!(Native, Hook::Native, NEW_FLOW_SLOT_NATIVE);
xdp_frame!(Generic, Hook::Generic, NEW_FLOW_SLOT_GENERIC);

impl Frame for Tc {
    const HOOK: Hook = Hook::Tc;
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() as usize
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: the context is the kernel's __sk_buff for this run; at ingress `ifindex` is
        // the receiving device.
        unsafe { (*self.0.skb.skb).ifindex }
    }
    #[inline(always)]
    fn as_ptr(&self) -> *mut c_void {
        self.0.as_ptr()
    }
    #[inline(always)]
    fn to_new_flow(&self) {
        // SAFETY: a tail call with this run's context; on failure it returns.
        unsafe { XLB_NEW_FLOW_TC.tail_call(&self.0, 0) };
    }
    #[inline(always)]
    fn rewritten(&self, diff: u32) {
        // Left for `finish_checksum` in the skb's control block: a helper call here, deep in
        // the program's paths, doubled the verifier's work on the new-flow program.
        // SAFETY: the context is the kernel's __sk_buff for this run; cb is the program's.
        unsafe {
            (*self.0.skb.skb).cb[CB_CSUM_DIFF] = diff;
            (*self.0.skb.skb).cb[CB_CSUM_PENDING] = 1;
        }
    }
}

/// Longest run of headers the program reads: Ethernet, IPv4 with options, and the first
/// 20 bytes of TCP (ports, flags, checksum) or the UDP header.
const HEADERS_MAX: usize = EthHdr::LEN + 60 + 20;
const _: () = assert!(Ipv4Hdr::LEN == 20);

impl Tc {
    /// Starts a run: no checksum change pending.
    #[inline(always)]
    pub fn start_checksum(&self) {
        // SAFETY: the context is the kernel's __sk_buff for this run; cb is the program's.
        unsafe { (*self.0.skb.skb).cb[CB_CSUM_PENDING] = 0 };
    }

    /// Ends a run: moves an skb's `CHECKSUM_COMPLETE` sum by what the rewrite changed, if it
    /// rewrote (whatever the verdict: a passed packet goes on to the kernel).
    #[inline(always)]
    pub fn finish_checksum(&self) {
        // SAFETY: as above.
        let (rewritten, diff) = unsafe {
            let skb = self.0.skb.skb;
            ((*skb).cb[CB_CSUM_PENDING], (*skb).cb[CB_CSUM_DIFF])
        };
        if rewritten != 0 {
            // SAFETY: plain helper call on this run's skb; it only adds to skb->csum, and
            // only when the skb is CHECKSUM_COMPLETE.
            unsafe { bpf_csum_update(self.0.skb.skb, diff) };
        }
    }

    /// Whether the skb carries a VLAN tag the driver took out of the frame (hardware VLAN
    /// receive offload). XDP sees such a frame with its 802.1Q header and leaves it alone;
    /// so does TC, or a translated packet would leave tagged.
    #[inline(always)]
    pub fn vlan_tagged(&self) -> bool {
        // SAFETY: the context is the kernel's __sk_buff for this run.
        unsafe { (*self.0.skb.skb).vlan_present != 0 }
    }

    /// Makes the headers directly readable: an skb may hold them partly in paged data (a
    /// driver that pulled only a few bytes). Costs nothing when they already are.
    #[inline(always)]
    pub fn pull_headers(&self) {
        let linear = self.data_end() - self.data();
        let len = self.len();
        if linear < HEADERS_MAX && linear < len {
            let want = if len < HEADERS_MAX { len } else { HEADERS_MAX };
            // SAFETY: plain helper call on this run's skb. A failure leaves the skb as it was;
            // the parser then finds the headers short and passes the packet.
            unsafe { bpf_skb_pull_data(self.0.skb.skb, want as u32) };
        }
    }
}

/// The TC verdict for the program's XDP action: pass to the stack, redirected (by
/// `bpf_redirect`), or dropped.
#[inline(always)]
pub fn tc_verdict(action: u32) -> i32 {
    match action {
        xdp_action::XDP_PASS => TC_ACT_OK,
        xdp_action::XDP_REDIRECT => TC_ACT_REDIRECT,
        _ => TC_ACT_SHOT,
    }
}
