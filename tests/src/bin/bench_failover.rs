//! `cargo xtask bench` → bench_failover: several LB nodes (`xlb_tests::lb_group`), a client
//! knocking on a VIP every 20 ms. For 20 trials each, the owner of the VIP is stopped with
//! SIGTERM, or its link is taken down; the failover time is from that moment to the first
//! knock that succeeds after the last one that failed (0 when none failed). Printed as p50 and
//! p99 beside the targets (SIGTERM 0.5 s, link down 2 s), with the API writes per second of the
//! three instances at rest. A failed knock takes its 100 ms connect timeout, so outages are
//! seen to about 100 ms.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use xlb_tests::lb_group::Group;
use xlb_tests::servers::spawn_in;

const TRIALS: usize = 20;
const KNOCK: Duration = Duration::from_millis(20);
/// How long the client knocks after the event; a trial whose VIP has not come back by then
/// counts as this long.
const GIVE_UP: Duration = Duration::from_secs(4);

fn main() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    println!("bench_failover on {cpu}");
    let mut group = Group::new("bf");
    let vip = group.services(1)[0];
    let addr = SocketAddr::from((vip, 80));

    // At rest: every write the three instances make (Lease renewals).
    std::thread::sleep(Duration::from_secs(3));
    let window = Duration::from_secs(10);
    let from = Instant::now();
    std::thread::sleep(window);
    let writes = group
        .api
        .faults()
        .requests()
        .into_iter()
        .filter(|request| request.at >= from)
        .filter(|request| request.method != "GET")
        .filter(|request| {
            request
                .user_agent
                .as_deref()
                .is_some_and(|agent| agent.starts_with("xlb/"))
        })
        .count();
    println!(
        "API writes at rest: {:.1}/s for 3 instances (Lease renewals every 500 ms)",
        writes as f64 / window.as_secs_f64()
    );

    let mut sigterm = Vec::new();
    let mut link_down = Vec::new();
    for trial in 0..TRIALS {
        let (owner, _) = group.single_answer(vip, None);
        let mut stopping = group.xlbs[owner].take().expect("xlb running");
        let took = knock_through(&group, addr, || {
            let status = stopping.stop(Duration::from_secs(20));
            assert!(status.is_some(), "lb{} did not exit", owner + 1);
        });
        sigterm.push(took);
        group.start(owner);
        settle(&group, vip);

        let (owner, _) = group.single_answer(vip, None);
        let port = format!("f{}", owner + 1);
        let took = knock_through(&group, addr, || {
            group.switch.run(&["ip", "link", "set", &port, "down"]);
        });
        link_down.push(took);
        group.switch.run(&["ip", "link", "set", &port, "up"]);
        settle(&group, vip);
        eprintln!(
            "trial {}: SIGTERM {:?}, link down {:?}",
            trial + 1,
            sigterm[trial],
            link_down[trial]
        );
    }
    report(
        "SIGTERM of the owner (handover)",
        &mut sigterm,
        Duration::from_millis(500),
    );
    report(
        "link down on the owner (failover)",
        &mut link_down,
        Duration::from_secs(2),
    );
}

/// Lets the group settle after a trial: the stopped node back, one owner again.
fn settle(group: &Group, vip: std::net::Ipv4Addr) {
    std::thread::sleep(Duration::from_secs(3));
    group.single_answer(vip, None);
}

/// Knocks on `addr` from the client every [`KNOCK`] while `event` happens; returns the
/// time from the event to the first success after the last failure.
fn knock_through(group: &Group, addr: SocketAddr, event: impl FnOnce()) -> Duration {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let knocking = {
        let stop = stop.clone();
        spawn_in(&group.client, move || {
            let mut knocks = Vec::new();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < GIVE_UP * 3 {
                let at = Instant::now();
                let ok = TcpStream::connect_timeout(&addr, KNOCK * 5).is_ok();
                knocks.push((at, ok));
                std::thread::sleep(KNOCK.saturating_sub(at.elapsed()));
            }
            knocks
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let event_at = Instant::now();
    event();
    std::thread::sleep(GIVE_UP.saturating_sub(event_at.elapsed()));
    stop.store(true, Ordering::Relaxed);
    let knocks = knocking.join().expect("knocking thread");
    let after: Vec<&(Instant, bool)> = knocks.iter().filter(|(at, _)| *at >= event_at).collect();
    if std::env::var_os("XLB_BENCH_DEBUG").is_some() {
        eprintln!(
            "{} knocks, {} after the event, {} failed",
            knocks.len(),
            after.len(),
            after.iter().filter(|(_, ok)| !ok).count()
        );
    }
    let Some(last_failure) = after.iter().rposition(|(_, ok)| !ok) else {
        return Duration::ZERO;
    };
    after
        .get(last_failure + 1)
        .map_or(GIVE_UP, |(at, _)| at.duration_since(event_at))
}

fn report(what: &str, samples: &mut [Duration], target: Duration) {
    samples.sort();
    let percentile =
        |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1];
    println!(
        "{what}: p50 {:.0} ms, p99 {:.0} ms over {} trials (target p99 < {:.1} s)",
        percentile(0.50).as_secs_f64() * 1000.0,
        percentile(0.99).as_secs_f64() * 1000.0,
        samples.len(),
        target.as_secs_f64()
    );
}
