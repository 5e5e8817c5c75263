//! Steps a benchmark load leaves out (see `lb_common::steps`).

/// The steps left out, a bit set of `lb_common::steps::STEP_*`: 0 as built, set by
/// `bench_xdp` at load time. Read-only data, frozen at load, so the verifier knows the value
/// and treats the branches it rules out as dead code.
#[unsafe(no_mangle)]
static XLB_SKIP_STEPS: u32 = 0;

/// Whether `step` is left out of this load of the program.
#[inline(always)]
pub fn skipped(step: u32) -> bool {
    // SAFETY: a read of a static; volatile so the compiler does not fold the built value in.
    unsafe { core::ptr::read_volatile(&XLB_SKIP_STEPS) & step != 0 }
}
