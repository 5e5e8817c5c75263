//! Steps a benchmark load leaves out (see `lb_common::steps`). Only the measuring build
//! (feature `steps`, which `bench_xdp` loads for its step table) can leave any out; in the
//! object xlb attaches `skipped` is `false` at compile time, so it reads nothing per packet.

/// The steps left out, a bit set of `lb_common::steps::STEP_*`: 0 as built, set by
/// `bench_xdp` at load time. Read-only data, frozen at load, so the verifier knows the value
/// and treats the branches it rules out as dead code.
#[cfg(feature = "steps")]
#[unsafe(no_mangle)]
static XLB_SKIP_STEPS: u32 = 0;

/// Whether `step` is left out of this load of the program.
#[cfg(feature = "steps")]
#[inline(always)]
pub fn skipped(step: u32) -> bool {
    // SAFETY: a read of a static; volatile so the compiler does not fold the built value in.
    unsafe { core::ptr::read_volatile(&XLB_SKIP_STEPS) & step != 0 }
}

/// Whether `step` is left out of this load of the program: never, in the object xlb attaches.
#[cfg(not(feature = "steps"))]
#[inline(always)]
pub fn skipped(_step: u32) -> bool {
    false
}
