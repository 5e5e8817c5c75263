//! The `xlb` binary: wiring only. `xlb [FLAGS]` runs the controller; `xlb inspect …` prints the
//! pinned data plane.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use xlb::config::{Config, ConfigError};
use xlb::inspect;

/// `xlb inspect`: print the pinned maps as tables.
#[derive(Parser)]
#[command(name = "xlb inspect", about = "Print xlb's pinned BPF maps as tables")]
struct InspectArgs {
    #[arg(value_enum)]
    what: What,
    /// bpffs directory the data plane is pinned in.
    #[arg(long, env = "XLB_PIN_DIR", default_value = lb_common::PIN_DIR)]
    pin_dir: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum What {
    Services,
    Backends,
    Conntrack,
    Stats,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|arg| arg == "inspect") {
        let args = InspectArgs::parse_from(argv.iter().skip(1));
        let table = match args.what {
            What::Services => inspect::Table::Services,
            What::Backends => inspect::Table::Backends,
            What::Conntrack => inspect::Table::Conntrack,
            What::Stats => inspect::Table::Stats,
        };
        inspect::print(&args.pin_dir, table, &mut std::io::stdout().lock())?;
        return Ok(());
    }
    let config = match Config::load(argv, &|name| std::env::var(name).ok()) {
        Ok(config) => config,
        Err(ConfigError::Args(error)) => error.exit(),
        Err(error) => anyhow::bail!(error),
    };
    let level = if config.debug { "debug" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .init();
    xlb::controller::run(config).await
}
