//! xlb's XDP program.
//!
//! Parses Ethernet, IPv4/IPv6 and TCP/UDP headers with bounds checks and counts every packet
//! by verdict in the per-CPU [`lb_common::STATS_MAP`] array.
#![no_std]
#![no_main]

mod packet;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::*;
use packet::{Parsed, parse};

use crate::packet::count;

/// Entry point attached to the link device and backend-facing devices.
#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    count(STAT_TOTAL);
    let action = match try_xlb(&ctx) {
        Ok(action) => action,
        Err(action) => action,
    };
    count(match action {
        xdp_action::XDP_PASS => STAT_PASS,
        xdp_action::XDP_DROP => STAT_DROP,
        xdp_action::XDP_TX => STAT_TX,
        xdp_action::XDP_REDIRECT => STAT_REDIRECT,
        _ => STAT_ABORTED,
    });
    action
}

fn try_xlb(ctx: &XdpContext) -> Result<u32, u32> {
    // Everything passes for now: nothing is a VIP until the data plane is programmed.
    match parse(ctx) {
        Parsed::NotIp | Parsed::Truncated | Parsed::OtherL4 | Parsed::L4 { .. } => {
            Ok(xdp_action::XDP_PASS)
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that can reach a panic, so this is never called.
    unsafe { core::hint::unreachable_unchecked() }
}

/// The kernel requires a GPL-compatible license for the helpers the program calls.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
