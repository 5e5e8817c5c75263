//! `cargo xtask …`: bootstrap the toolchain, build, run, demo, test, bench. No product logic
//! lives here: every subcommand drives cargo, the `xlb` binary and the test suite.

mod bootstrap;

use std::process::Command;

use anyhow::{Context as _, bail};
use bootstrap::Needs;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run, test and measure xlb")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the BPF toolchain if missing and build everything (release).
    Build,
    /// Build and run `xlb` with the given arguments (as root).
    Run {
        /// Arguments for `xlb`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build and run xlb on its embedded default: a small cluster of network namespaces.
    Demo,
    /// Run every test (unit, BPF_PROG_TEST_RUN, network namespaces, API server).
    Test {
        /// Extra arguments passed to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure the data plane and the controller, side by side with the comparisons.
    Bench,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::Build => {
            bootstrap::ensure(Needs::Build)?;
            cargo(&["build", "--release"])
        }
        Task::Run { args } => {
            bootstrap::ensure(Needs::Build)?;
            cargo(&["build", "--release", "--bin", "xlb"])?;
            require_root("xlb run")?;
            let status = Command::new(workspace_root().join("target/release/xlb"))
                .args(&args)
                .status()
                .context("starting target/release/xlb")?;
            exit_like(status)
        }
        Task::Demo => {
            bootstrap::ensure(Needs::BuildAndTestTools)?;
            cargo(&["build", "--release", "--bin", "xlb", "--bin", "xlb_demo"])?;
            require_root("the demo")?;
            let root = workspace_root();
            let status = Command::new(root.join("target/release/xlb_demo"))
                .arg(root.join("target/release/xlb"))
                .arg(root.join("demo/manifests"))
                .status()
                .context("starting the demo")?;
            exit_like(status)
        }
        Task::Test { args } => {
            bootstrap::ensure(Needs::BuildAndTestTools)?;
            if !bootstrap::is_root() {
                eprintln!(
                    "[xtask] warning: not root: tests that need network namespaces or BPF will fail saying so; run `sudo -E cargo xtask test`"
                );
            }
            // The end-to-end tests run the real `xlb` binary, which `cargo test` does not build
            // for another package's tests: build every binary first.
            cargo(&["build", "--workspace", "--exclude", "lb-ebpf", "--bins"])?;
            let mut test_args = vec![
                "test",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--no-fail-fast",
            ];
            test_args.extend(args.iter().map(String::as_str));
            cargo_test(&test_args)
        }
        Task::Bench => {
            bootstrap::ensure(Needs::BuildAndTestTools)?;
            cargo(&[
                "build",
                "--release",
                "--bin",
                "bench_xdp",
                "--bin",
                "bench_reconcile",
                "--bin",
                "bench_e2e",
                "--bin",
                "xlb_loader",
                "--bin",
                "bench_apply",
                "--bin",
                "bench_failover",
                "--bin",
                "xlb",
            ])?;
            require_root("the data plane benchmark")?;
            let root = workspace_root();
            for bench in [
                "bench_xdp",
                "bench_e2e",
                "bench_reconcile",
                "bench_apply",
                "bench_failover",
            ] {
                eprintln!("[xtask] {bench}");
                let status = Command::new(root.join("target/release").join(bench))
                    .status()
                    .with_context(|| format!("starting {bench}"))?;
                if !status.success() {
                    bail!("{bench} failed ({status})");
                }
            }
            Ok(())
        }
    }
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !bootstrap::is_root() {
        bail!(
            "{what} loads BPF programs and changes network devices: run as root (sudo -E cargo xtask …)"
        );
    }
    Ok(())
}

/// Runs cargo in the workspace root with the given arguments.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Runs `cargo test`, echoing its output, and closes with one line that sums every test
/// binary's result (`N passed, N failed, N skipped`), so a reader (or CI) sees the whole run
/// at a glance instead of the last binary's line.
fn cargo_test(args: &[&str]) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut child = Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test's stdout")?;
    let mut totals = TestTotals::default();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!(
        "summary: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}

/// Sums of the `test result:` lines cargo test prints, one per test binary.
#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestTotals {
    /// Adds a line like `test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; …`.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

fn exit_like(status: std::process::ExitStatus) -> anyhow::Result<()> {
    std::process::exit(status.code().unwrap_or(1))
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::TestTotals;

    #[test]
    fn test_result_lines_are_summed() {
        let mut totals = TestTotals::default();
        totals.add("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.1s");
        totals.add("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s");
        totals.add("running 5 tests");
        assert_eq!((totals.passed, totals.failed, totals.ignored), (15, 2, 1));
    }
}
