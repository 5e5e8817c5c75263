//! Properties of `lb-common` that the kernel and userspace both rely on, checked so that each
//! test fails when its property breaks.

use core::mem::{size_of, size_of_val};

use lb_common::csum::{fold, is_partial, l4_checksum, pseudo_header_sum};
use lb_common::{
    BackendKey, BackendValue, CtEntry, DeviceMac, FlowKey, IPPROTO_TCP, IPPROTO_UDP, RewriteSums,
    ServiceKey, ServiceStats, ServiceValue, VipValue,
};

/// Asserts that `$ty`'s size is the sum of its fields' sizes. The destructuring pattern
/// lists every field, so a field added without being listed here does not compile.
macro_rules! assert_no_padding {
    ($ty:ident { $($field:ident),+ $(,)? }) => {{
        let $ty { $($field),+ } = $ty::default();
        assert_eq!(
            size_of::<$ty>(),
            0 $(+ size_of_val(&$field))+,
            concat!(stringify!($ty), " has implicit padding")
        );
    }};
}

/// A struct with implicit padding is larger than its fields: the padding bytes are left
/// uninitialised on the stack, so the kernel would hash and compare garbage in map keys.
#[test]
fn map_types_have_no_implicit_padding() {
    assert_no_padding!(ServiceKey {
        vip,
        port,
        proto,
        _pad
    });
    assert_no_padding!(ServiceValue {
        id,
        backend_count,
        rr_cursor
    });
    assert_no_padding!(BackendKey { service_id, slot });
    assert_no_padding!(BackendValue { ip, port, _pad });
    assert_no_padding!(VipValue { services });
    assert_no_padding!(FlowKey {
        src_ip,
        dst_ip,
        src_port,
        dst_port,
        proto,
        _pad
    });
    assert_no_padding!(CtEntry {
        nat_src_ip,
        nat_dst_ip,
        nat_src_port,
        nat_dst_port,
        service_id,
        state,
        ifindex,
        last_seen_ns,
        smac,
        dmac,
        dir,
        _pad,
        sums,
        _pad2
    });
    assert_no_padding!(RewriteSums {
        addrs,
        ports,
        pseudo
    });
    assert_no_padding!(DeviceMac { ifindex, mac, _pad });
    assert_no_padding!(ServiceStats {
        packets,
        bytes,
        new_flows
    });
}

/// The check itself catches padding: a `u8` before a `u32` leaves three bytes of it.
#[test]
#[should_panic(expected = "Padded has implicit padding")]
fn the_padding_check_catches_padding() {
    #[repr(C)]
    #[derive(Default)]
    struct Padded {
        small: u8,
        large: u32,
    }
    assert_no_padding!(Padded { small, large });
}

/// Deterministic pseudo-random numbers (xorshift32).
fn next(seed: &mut u32) -> u32 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 17;
    *seed ^= *seed << 5;
    *seed
}

/// A full checksum equals the folded pseudo-header sum, and so is taken for
/// `CHECKSUM_PARTIAL`, only by chance (about 1 in 65,536): over 200,000 random TCP and UDP
/// segments with full checksums at most a handful are, while every one of them, carrying the
/// partial value Linux writes before offload, is recognised as partial.
#[test]
fn full_checksum_is_rarely_taken_for_partial() {
    const SEGMENTS: usize = 200_000;
    let mut seed = 0x9e37_79b9;
    let mut mistaken = 0;
    for index in 0..SEGMENTS {
        let src = next(&mut seed).to_be_bytes();
        let dst = next(&mut seed).to_be_bytes();
        let proto = if index % 2 == 0 {
            IPPROTO_TCP
        } else {
            IPPROTO_UDP
        };
        let header = if proto == IPPROTO_TCP { 20 } else { 8 };
        let len = header + (next(&mut seed) % 64) as usize;
        let mut segment: Vec<u8> = (0..len).map(|_| next(&mut seed) as u8).collect();
        let check_at = if proto == IPPROTO_TCP { 16 } else { 6 };
        segment[check_at..check_at + 2].fill(0);
        let full = l4_checksum(src, dst, proto, &segment);
        let pseudo = fold(pseudo_header_sum(src, dst, proto, 0));
        if is_partial(full, pseudo, len as u16) {
            mistaken += 1;
        }
        let partial = fold(pseudo_header_sum(src, dst, proto, len as u16)).to_be_bytes();
        assert!(
            is_partial(partial, pseudo, len as u16),
            "a partial checksum must be recognised (segment {index})"
        );
    }
    // Expected about 3; 20 or more happens with probability below 1e-9 for a fair checksum.
    assert!(
        mistaken < 20,
        "{mistaken} of {SEGMENTS} full checksums were taken for partial ones"
    );
}

/// A reverse entry's sums at one SNAT candidate port, moved to another with
/// `RewriteSums::at_dst_port`, are the sums computed whole at that port, over random flows.
#[test]
fn sums_moved_to_another_port_are_those_computed_there() {
    let mut seed = 0x2545_f491;
    for index in 0..100_000 {
        let backend = next(&mut seed).to_be_bytes();
        let key_at = |port| FlowKey {
            src_ip: backend,
            dst_ip: [10, 0, 0, 1],
            src_port: 8080,
            dst_port: port,
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let entry = CtEntry {
            nat_src_ip: next(&mut seed).to_be_bytes(),
            nat_dst_ip: next(&mut seed).to_be_bytes(),
            nat_src_port: next(&mut seed) as u16,
            nat_dst_port: next(&mut seed) as u16,
            ..CtEntry::default()
        };
        let (was, port) = (next(&mut seed) as u16, next(&mut seed) as u16);
        let moved = RewriteSums::of(&key_at(was), &entry).at_dst_port(was, port);
        assert_eq!(
            moved,
            RewriteSums::of(&key_at(port), &entry),
            "flow {index}: port {was} -> {port}"
        );
    }
}
