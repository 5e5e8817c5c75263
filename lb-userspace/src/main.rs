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
    /// The next hop toward each backend that new flows take (`IFINDEX`, source, MACs, seconds
    /// since confirmed, or `expired` once the program no longer takes it).
    NextHops,
    /// The VIPs this node announces now (with several LB nodes: the ones it owns).
    Vips,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|arg| arg == "inspect") {
        let args = InspectArgs::parse_from(argv.iter().skip(1));
        let table = match args.what {
            What::Vips => return print_vips().await,
            What::Services => inspect::Table::Services,
            What::Backends => inspect::Table::Backends,
            What::Conntrack => inspect::Table::Conntrack,
            What::Stats => inspect::Table::Stats,
            What::NextHops => inspect::Table::NextHops,
        };
        return match inspect::print(&args.pin_dir, table, &mut std::io::stdout().lock()) {
            // `xlb inspect … | head`: the reader has what it wanted; end quietly, as Unix
            // tools do.
            Err(error) if is_broken_pipe(&error) => Ok(()),
            other => other.map_err(Into::into),
        };
    }
    let config = match Config::load(argv, &|name| std::env::var(name).ok()) {
        Ok(config) => config,
        Err(ConfigError::Args(error)) => error.exit(),
        Err(error) => anyhow::bail!(error),
    };
    xlb::logging::init(config.debug);
    xlb::controller::run(config).await
}

/// Whether `error`, or what caused it, is a write to a closed pipe.
fn is_broken_pipe(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        {
            return true;
        }
        cause = error.source();
    }
    false
}

/// `xlb inspect vips`: the addresses xlb placed on this host, with their device.
async fn print_vips() -> anyhow::Result<()> {
    use std::io::Write as _;
    let placed = xlb::addr::placed().await?;
    let mut out = std::io::stdout().lock();
    let mut write = || -> std::io::Result<()> {
        writeln!(out, "{:<20} DEVICE", "VIP")?;
        for (ip, prefix, ifindex) in &placed {
            let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
            // SAFETY: name has room for IF_NAMESIZE bytes, as if_indextoname requires.
            let device = unsafe { libc::if_indextoname(*ifindex, name.as_mut_ptr()) };
            let device = if device.is_null() {
                ifindex.to_string()
            } else {
                // SAFETY: if_indextoname wrote a NUL-terminated name into `name`.
                unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
                    .to_string_lossy()
                    .into_owned()
            };
            writeln!(out, "{:<20} {device}", format!("{ip}/{prefix}"))?;
        }
        Ok(())
    };
    match write() {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(Into::into),
    }
}
