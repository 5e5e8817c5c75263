//! `cargo xtask bench`: a full reconcile of 10,000 Services with 100,000 endpoints (time and
//! peak RSS), against the targets of 1 s and 300 MB.

use std::time::Instant;

use xlb::model::Allocations;
use xlb::reconcile::reconcile;
use xlb::settings::Settings;

fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage fills the zeroed struct; RUSAGE_SELF is always valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}

fn main() {
    let built = Instant::now();
    let (state, config, host) = xlb_tests::synthetic::cluster(10_000, 10);
    println!(
        "synthetic cluster: 10000 Services, 100000 endpoints, built in {:.2} s",
        built.elapsed().as_secs_f64()
    );
    let mut allocations = Allocations::default();
    for run in ["first (allocates every IP)", "second (adopts)"] {
        let started = Instant::now();
        let plan = reconcile(&state, &Settings::from(&config), &host, &allocations);
        let took = started.elapsed().as_secs_f64();
        println!(
            "reconcile {run}: {took:.3} s for {} virtual services (target < 1 s)",
            plan.virtual_services.len()
        );
        allocations = plan.allocations;
    }
    println!("peak RSS: {:.0} MiB (target < 300 MB)", peak_rss_mib());
}
