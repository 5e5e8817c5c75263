//! Test helper: places VIPs on a device with xlb's address manager, prints `ready`, then
//! waits to be killed. The adoption test kills it with SIGKILL to leave VIPs behind as a
//! crashed xlb would.
//!
//! Usage: `xlb-addr-hold <device> <vip>...`

use std::collections::BTreeSet;
use std::io::Write as _;

use xlb::addr::{AddrConfig, AddrManager, DesiredVips};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let device = args.next().expect("usage: xlb-addr-hold <device> <vip>...");
    let desired: DesiredVips = args
        .map(|vip| {
            let vip = vip.parse().unwrap_or_else(|err| panic!("VIP {vip}: {err}"));
            (vip, BTreeSet::from(["test/hold".to_owned()]))
        })
        .collect();
    let config = AddrConfig {
        link_device: Some(device),
        ..AddrConfig::default()
    };
    let mut manager = AddrManager::new(config)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    let report = manager
        .sync(&desired)
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(report.failed.is_empty(), "sync failed: {:?}", report.failed);
    println!("ready");
    std::io::stdout().flush().expect("flush stdout");
    std::future::pending::<()>().await;
}
