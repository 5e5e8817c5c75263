//! The `xlb` binary: wiring only.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_common::STAT_NAMES;
use xlb::dataplane::xdp::{ModeChoice, XdpProgram};

#[derive(Parser)]
#[command(
    name = "xlb",
    version,
    about = "Kubernetes LoadBalancer Services on bare metal, with XDP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the data plane to a device and print its counters until interrupted.
    Run {
        /// Device to attach to.
        #[arg(long = "linkdevice", alias = "link-device", env = "LINKDEVICE")]
        link_device: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { link_device } => {
            let mut program = XdpProgram::load().context("loading the XDP program")?;
            let mode = program
                .attach(&link_device, ModeChoice::Auto)
                .with_context(|| format!("attaching XDP to {link_device}"))?;
            tracing::info!(device = %link_device, ?mode, "XDP attached");
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let stats = program.stats()?;
                        let line: Vec<String> = STAT_NAMES
                            .iter()
                            .zip(stats)
                            .filter(|(_, value)| *value > 0)
                            .map(|(name, value)| format!("{name}={value}"))
                            .collect();
                        tracing::info!("counters: {}", line.join(" "));
                    }
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
        }
    }
    Ok(())
}
