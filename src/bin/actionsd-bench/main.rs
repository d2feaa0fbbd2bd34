//! actionsd-bench: the load generator of BENCHMARKS.md.
//!
//! Starts the `actionsd` binary that sits next to it (or uses `--server`),
//! on a fresh bench database, drives it over gRPC with the generated
//! clients, runs `pgbench` with the same SQL as a ceiling, and prints each
//! figure beside its target. Loopback only; every load loop is bounded in
//! count and in time.

mod daemon;
mod drain;
mod enqueue;
mod load;
mod pgbench;
mod report;
mod retention;
mod traces;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};

use daemon::Backend;
use report::Report;

#[derive(Parser)]
#[command(
    name = "actionsd-bench",
    about = "Load scenarios for actionsd, with pgbench ceilings"
)]
struct Cli {
    /// Scenarios to run, in order [default: all].
    #[arg(value_enum)]
    scenarios: Vec<Scenario>,
    /// Drive a daemon that is already running (a loopback URL such as
    /// http://127.0.0.1:8091) instead of starting one. Its memory is not
    /// measured.
    #[arg(long)]
    server: Option<String>,
    /// The Postgres database the harness drops, creates and hands to the
    /// daemons it starts, and runs pgbench against (loopback only).
    #[arg(
        long,
        env = "ACTIONSD_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/actionsd_bench"
    )]
    database_url: String,
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=60))]
    duration: u64,
    /// Seconds in all: small sizes and one-second measurements.
    #[arg(long)]
    smoke: bool,
    /// The actionsd binary [default: `actionsd` next to this binary].
    #[arg(long)]
    actionsd: Option<PathBuf>,
    /// A config file for the daemons the harness starts (their `--config`),
    /// e.g. to try other `database.committers` or `database.max_batch`.
    #[arg(long)]
    daemon_config: Option<PathBuf>,
    /// The pgbench binary.
    #[arg(long, default_value = "pgbench")]
    pgbench: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Enqueue at 1, 16 and 64 clients, Postgres and SQLite, beside pgbench.
    Enqueue,
    /// Update → watcher latency, one parent with 1,000 children.
    UpdateWatch,
    /// 10,000 watch streams over 1,000 parents under 5,000 updates/s.
    Fanout,
    /// 4 executors draining 20,000 actions, beside a pgbench claim.
    Drain,
    /// Enqueue → lease latency with an idle executor, 200 enqueues/s.
    Dispatch,
    /// Enqueue latency during a retention pass over 100,000 finished
    /// actions, beside the same load without it.
    Retention,
    /// Enqueue at 16 clients with OpenTelemetry export off, then on (to an
    /// OTLP receiver on loopback).
    Tracing,
}

/// What every scenario gets.
pub struct Settings {
    /// How long each measurement runs.
    pub duration: Duration,
    pub smoke: bool,
    pub database_url: String,
    pub server: Option<String>,
    pub actionsd: PathBuf,
    pub pgbench: PathBuf,
    pub daemon_config: Option<PathBuf>,
}

impl Settings {
    /// `full` normally, `smoke` with `--smoke`.
    pub fn size(&self, full: usize, smoke: usize) -> usize {
        if self.smoke {
            smoke
        } else {
            full
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("actionsd-bench: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("actionsd-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the chosen scenarios; `Ok(false)` when one failed or saw a
/// backwards version.
async fn run(cli: Cli) -> anyhow::Result<bool> {
    daemon::require_loopback_url(&cli.database_url).context("--database-url")?;
    if let Some(server) = &cli.server {
        daemon::require_loopback_url(server).context("--server")?;
    }
    let actionsd = match cli.actionsd {
        Some(path) => path,
        None => std::env::current_exe()
            .context("cannot find this binary's directory")?
            .with_file_name("actionsd"),
    };
    if cli.server.is_none() && !actionsd.is_file() {
        bail!(
            "no actionsd binary at {}; build it (cargo build --release --bins) or pass --actionsd",
            actionsd.display()
        );
    }
    let settings = Settings {
        duration: Duration::from_secs(if cli.smoke { 1 } else { cli.duration }),
        smoke: cli.smoke,
        database_url: cli.database_url,
        server: cli.server,
        actionsd,
        pgbench: cli.pgbench,
        daemon_config: cli.daemon_config,
    };
    let scenarios = if cli.scenarios.is_empty() {
        Scenario::value_variants().to_vec()
    } else {
        cli.scenarios
    };

    let mut report = Report::new(settings.smoke);
    report::print_machine();
    for scenario in scenarios {
        println!("\n== {scenario:?}");
        let result = match scenario {
            Scenario::Enqueue => {
                let mut ceilings = enqueue::Ceilings::new();
                let mut result =
                    enqueue::run(&settings, Backend::Postgres, &mut ceilings, &mut report).await;
                if result.is_ok() && settings.server.is_none() {
                    result =
                        enqueue::run(&settings, Backend::Sqlite, &mut ceilings, &mut report).await;
                }
                result
            }
            Scenario::UpdateWatch => watch::update_watch(&settings, &mut report).await,
            Scenario::Fanout => watch::fanout(&settings, &mut report).await,
            Scenario::Drain => drain::drain(&settings, &mut report).await,
            Scenario::Dispatch => drain::dispatch(&settings, &mut report).await,
            Scenario::Retention => retention::retention(&settings, &mut report).await,
            Scenario::Tracing => traces::tracing(&settings, &mut report).await,
        };
        if let Err(err) = result {
            report.fail(format!("{scenario:?}: {err:#}"));
        }
    }
    report.print_summary();
    Ok(report.passed())
}
