//! Test loader: the data plane as a separate process, as the controller will run it.
//!
//! `xlb_loader <pin-dir> <link-device> <auto|native|generic> <services-file>`: opens (or
//! adopts) the data plane, applies the services file, prints `ready`, then re-applies the file
//! whenever it changes. Kill it with SIGKILL to test that forwarding survives.
//!
//! `XLB_SNAT_PORTS=FIRST-LAST` and `XLB_SNAT_ADDRESSES=IP,IP` in the environment set the SNAT
//! port range and place extra SNAT addresses, as xlb's flags of those names do.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use xlb::config::XdpMode;
use xlb::dataplane::Dataplane as _;
use xlb::dataplane::xdp::{XdpConfig, XdpDataplane};
use xlb_tests::spec::parse_services;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, pin_dir, device, mode, file] = &args[..] else {
        eprintln!("usage: xlb_loader PIN_DIR LINK_DEVICE auto|native|generic|tc SERVICES_FILE");
        std::process::exit(2);
    };
    let mode = match mode.as_str() {
        "native" => XdpMode::Native,
        "generic" => XdpMode::Skb,
        "tc" => XdpMode::Tc,
        _ => XdpMode::Auto,
    };
    let mut config = XdpConfig {
        pin_dir: PathBuf::from(pin_dir),
        mode,
        ..XdpConfig::new(device)
    };
    if let Ok(range) = std::env::var("XLB_SNAT_PORTS") {
        let (first, last) = range.split_once('-').expect("XLB_SNAT_PORTS=FIRST-LAST");
        config.snat_ports = lb_common::SnatPorts::new(
            first.parse().expect("first port"),
            last.parse().expect("last port"),
        )
        .expect("a SNAT range of at least 1024 ports");
    }
    let extra: Vec<std::net::Ipv4Addr> = std::env::var("XLB_SNAT_ADDRESSES")
        .unwrap_or_default()
        .split(',')
        .filter(|ip| !ip.is_empty())
        .map(|ip| ip.parse().expect("XLB_SNAT_ADDRESSES: IPv4 addresses"))
        .collect();
    let mut dp = XdpDataplane::open(config).unwrap_or_else(|e| panic!("open: {e}"));
    let by_source = xlb::addr::snat::place(&extra).unwrap_or_else(|e| panic!("{e}"));
    dp.set_snat_addresses(&by_source)
        .unwrap_or_else(|e| panic!("SNAT addresses: {e}"));
    let read = || {
        parse_services(&std::fs::read_to_string(file).expect("services file")).expect("services")
    };
    let mtime = || {
        std::fs::metadata(file)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    dp.apply(&read()).unwrap_or_else(|e| panic!("apply: {e}"));
    let mut seen = mtime();
    let devices: Vec<String> = dp
        .devices()
        .iter()
        .map(|(d, m)| format!("{d}:{m:?}"))
        .collect();
    println!("ready {}", devices.join(" "));
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if mtime() != seen {
            seen = mtime();
            dp.apply(&read()).unwrap_or_else(|e| panic!("apply: {e}"));
            let devices: Vec<String> = dp
                .devices()
                .iter()
                .map(|(d, m)| format!("{d}:{m:?}"))
                .collect();
            println!("applied {}", devices.join(" "));
        }
    }
}
