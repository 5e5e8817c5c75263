//! The `xlb` binary: wiring only.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lb_common::STAT_NAMES;
use xlb::dataplane::Dataplane as _;
use xlb::dataplane::spec;
use xlb::dataplane::xdp::{ModeChoice, XdpConfig, XdpDataplane};
use xlb::inspect;

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

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Copy, ValueEnum)]
enum What {
    Services,
    Backends,
    Conntrack,
    Stats,
}

#[derive(Subcommand)]
enum Command {
    /// Load the data plane, attach it, serve the given services until interrupted. The data
    /// plane keeps forwarding after exit (pinned); a new `run` adopts it.
    Run {
        /// Link device (toward clients).
        #[arg(long = "linkdevice", alias = "link-device", env = "LINKDEVICE")]
        link_device: String,
        /// bpffs directory for maps, programs and links.
        #[arg(long, env = "XLB_PIN_DIR", default_value = lb_common::PIN_DIR)]
        pin_dir: PathBuf,
        /// XDP mode per device: native with generic fallback, or one of them only.
        #[arg(long, env = "XLB_XDP_MODE", value_enum, default_value = "auto")]
        xdp_mode: Mode,
        /// A service, `VIP:PORT/tcp|udp=BACKEND:PORT[,BACKEND:PORT...]` (repeatable).
        #[arg(long = "service")]
        services: Vec<String>,
        /// A file of service specs, one per line; re-read when it changes.
        #[arg(long, env = "XLB_SERVICES_FILE")]
        services_file: Option<PathBuf>,
    },
    /// Print the pinned maps as tables.
    Inspect {
        #[arg(value_enum)]
        what: What,
        /// bpffs directory the data plane is pinned in.
        #[arg(long, env = "XLB_PIN_DIR", default_value = lb_common::PIN_DIR)]
        pin_dir: PathBuf,
    },
}

fn read_services(
    specs: &[String],
    file: Option<&PathBuf>,
) -> anyhow::Result<Vec<xlb::model::VirtualService>> {
    let mut services = specs
        .iter()
        .map(|s| spec::parse_service(s))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(file) = file {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        services.extend(spec::parse_services(&text)?);
    }
    Ok(services)
}

fn mtime(file: Option<&PathBuf>) -> Option<SystemTime> {
    file.and_then(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match Cli::parse().command {
        Command::Run {
            link_device,
            pin_dir,
            xdp_mode,
            services,
            services_file,
        } => {
            let config = XdpConfig {
                pin_dir,
                mode: match xdp_mode {
                    Mode::Auto => ModeChoice::Auto,
                    Mode::Native => ModeChoice::Native,
                    Mode::Generic => ModeChoice::Generic,
                },
                ..XdpConfig::new(&link_device)
            };
            let mut dataplane = XdpDataplane::open(config).context("loading the XDP data plane")?;
            dataplane.apply(&read_services(&services, services_file.as_ref())?)?;
            let mut seen = mtime(services_file.as_ref());
            tracing::info!("data plane ready");
            let mut poll = tokio::time::interval(Duration::from_millis(100));
            let mut report = tokio::time::interval(Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = poll.tick() => {
                        let now = mtime(services_file.as_ref());
                        if now != seen {
                            seen = now;
                            match read_services(&services, services_file.as_ref()) {
                                Ok(desired) => dataplane.apply(&desired)?,
                                Err(error) => tracing::warn!(%error, "services file not applied"),
                            }
                        }
                    }
                    _ = report.tick() => {
                        let stats = dataplane.stats()?;
                        let line: Vec<String> = STAT_NAMES.iter().zip(stats).filter(|(_, v)| *v > 0)
                            .map(|(n, v)| format!("{n}={v}")).collect();
                        tracing::info!("counters: {}", line.join(" "));
                    }
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
        }
        Command::Inspect { what, pin_dir } => {
            let table = match what {
                What::Services => inspect::Table::Services,
                What::Backends => inspect::Table::Backends,
                What::Conntrack => inspect::Table::Conntrack,
                What::Stats => inspect::Table::Stats,
            };
            inspect::print(&pin_dir, table, &mut std::io::stdout().lock())?;
        }
    }
    Ok(())
}
