//! What the benches and the tests that measure share: the CPU model they print beside their
//! figures, and an iperf3 run.

use std::net::SocketAddrV4;

use crate::netns::Netns;

/// The CPU model from `/proc/cpuinfo` ("unknown" when it says none).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// One iperf3 run of `seconds` from `client` to `addr` (bounded by `timeout`, connect timeout
/// 3 s): iperf3's JSON report, `Null` when it printed none.
pub fn iperf3(client: &Netns, addr: SocketAddrV4, seconds: u32) -> serde_json::Value {
    let out = client.output(&[
        "timeout",
        "20",
        "iperf3",
        "-c",
        &addr.ip().to_string(),
        "-p",
        &addr.port().to_string(),
        "-t",
        &seconds.to_string(),
        "--connect-timeout",
        "3000",
        "-J",
    ]);
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}
