//! `kube-fake`: runs the in-memory Kubernetes API server until killed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

/// In-memory Kubernetes API server for xlb's demo and tests. Prints a kubeconfig
/// for it (or writes it to --kubeconfig) and serves on --addr (127.0.0.1) until killed.
/// Faults: POST /__fake/drop-watches, /__fake/refuse?seconds=N, /__fake/latency?ms=N,
/// /__fake/clear, /__fake/compact.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "KUBE_FAKE_ADDR", default_value = "127.0.0.1")]
    addr: std::net::IpAddr,
    /// Port (0: any free port).
    #[arg(long, env = "KUBE_FAKE_PORT", default_value_t = 0)]
    port: u16,
    /// Write the kubeconfig here instead of printing it.
    #[arg(long, env = "KUBE_FAKE_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// How many changes to keep for watches before they get 410 Gone.
    #[arg(long, env = "KUBE_FAKE_HISTORY", default_value_t = 10_000)]
    history: usize,
    /// Seconds between watch bookmarks.
    #[arg(long, env = "KUBE_FAKE_BOOKMARK_SECONDS", default_value_t = 60)]
    bookmark_seconds: u64,
    /// Directory of the recorded discovery/OpenAPI documents.
    #[arg(long, env = kube_fake::FIXTURES_ENV)]
    fixtures: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = kube_fake::Config {
        addr: args.addr,
        port: args.port,
        history_limit: args.history,
        bookmark_interval: Duration::from_secs(args.bookmark_seconds),
        ..kube_fake::Config::default()
    };
    if let Some(dir) = args.fixtures {
        config.fixtures_dir = dir;
    }
    let server = kube_fake::Server::start_with(config)
        .await
        .context("starting kube-fake")?;
    match &args.kubeconfig {
        Some(path) => {
            server
                .write_kubeconfig(path)
                .with_context(|| format!("writing the kubeconfig to {}", path.display()))?;
            eprintln!(
                "kube-fake listening on {}; kubeconfig in {}",
                server.url(),
                path.display()
            );
        }
        None => {
            eprintln!("kube-fake listening on {}", server.url());
            print!("{}", server.kubeconfig_yaml());
        }
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    drop(server);
    Ok(())
}
