//! The actionsd binary: parse the command line, load the configuration,
//! install logging, run the chosen subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use actionsd::app::{self, Application};
use actionsd::config::{Config, LogFormat, Overrides};
use actionsd::executor::{self, ExecutorSettings, FlyteSettings, Runner};
use actionsd::telemetry;
use clap::{Args, Parser, Subcommand};
use humantime_serde::re::humantime;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "actionsd",
    version,
    about = "Flyte v2 ActionsService over an embedded SQLite file (the default) or Postgres"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Create the database if needed and apply pending migrations.
    Migrate(MigrateArgs),
    /// Lease task actions from a daemon and run each: a shell command
    /// (`--exec`) or the task itself as a Flyte task process (`--flyte`).
    Executor(ExecutorArgs),
    /// Serve with a Flyte executor in the same process, for a Flyte user
    /// on one machine; writes a `flyte` config that points at it.
    Dev(DevArgs),
}

#[derive(Args)]
struct DevArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// Task processes at once [default: the number of CPUs].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    capacity: Option<u32>,
    /// The bin directory of the Python environment whose `a0` runs tasks
    /// (e.g. .venv/bin) [default: found on PATH].
    #[arg(long, value_name = "DIR")]
    flyte_bin: Option<PathBuf>,
    /// Where to write the flyte config [default: flyte.yaml in the data
    /// directory].
    #[arg(long, value_name = "FILE")]
    flyte_config: Option<PathBuf>,
}

#[derive(Args)]
struct CommonArgs {
    /// Config file (TOML); see config/actionsd.toml.
    #[arg(long, env = "ACTIONSD_CONFIG")]
    config: Option<PathBuf>,
    /// The store: sqlite://PATH, or postgres://user@host:5432/actionsd.
    /// [default: sqlite, actionsd.db in the per-user data directory,
    /// e.g. ~/.local/share/actionsd/]
    #[arg(long, env = "ACTIONSD_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Log format.
    #[arg(long, env = "ACTIONSD_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Blob store for code bundles, inputs, outputs and logs: an absolute
    /// path or s3://bucket/prefix [default: `blobs` beside the SQLite file].
    #[arg(long, env = "ACTIONSD_BLOB_URL")]
    blob_url: Option<String>,
}

#[derive(Args)]
struct MigrateArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Change nothing: exit 1 if any migration is pending or unknown (for
    /// deploy pipelines).
    #[arg(long)]
    check: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Address to listen on, IP:PORT or HOST:PORT (a host name is resolved
    /// at start-up to its first IPv4 address) [default: 127.0.0.1:8091].
    #[arg(long, env = "ACTIONSD_LISTEN", value_parser = actionsd::config::resolve_listen)]
    listen: Option<SocketAddr>,
    /// Event pipeline workers [default: 16].
    #[arg(long, env = "ACTIONSD_WORKERS")]
    workers: Option<usize>,
    /// PEM certificate chain for TLS on the listener (tls.cert).
    #[arg(long, env = "ACTIONSD_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (tls.key).
    #[arg(long, env = "ACTIONSD_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates that client certificates must chain to
    /// (tls.client_ca); clients must then present one (tls.client_auth).
    #[arg(long, env = "ACTIONSD_TLS_CLIENT_CA", value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// Listen on a non-loopback address even without TLS and
    /// authentication: anyone who can reach the port can read and change
    /// every run. Only for a network you trust.
    #[arg(long, env = "ACTIONSD_DANGEROUSLY_ALLOW_INSECURE_PUBLIC_LISTENER")]
    dangerously_allow_insecure_public_listener: bool,
}

impl ServeArgs {
    /// The common flags, and these with the common ones left empty.
    fn split(mut self) -> (CommonArgs, ServeArgs) {
        let common = std::mem::replace(
            &mut self.common,
            CommonArgs {
                config: None,
                database_url: None,
                log_format: None,
                blob_url: None,
            },
        );
        (common, self)
    }
}

#[derive(Args)]
struct ExecutorArgs {
    /// The daemon to lease from.
    #[arg(long, env = "ACTIONSD_SERVER", default_value = "http://127.0.0.1:8091")]
    server: String,
    /// The queue to lease task actions from.
    #[arg(long, default_value = "default")]
    queue: String,
    /// How many actions run at once (with --flyte: not counting parents
    /// waiting on their children).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    capacity: u32,
    /// The shell command run for each action (with `sh -c`); it finds the
    /// action in ACTIONSD_* environment variables.
    #[arg(
        long = "exec",
        value_name = "COMMAND",
        required_unless_present = "flyte",
        conflicts_with = "flyte"
    )]
    command: Option<String>,
    /// Run each task action as a Flyte task process: the TaskSpec's
    /// container command and arguments, placeholders filled in.
    #[arg(long)]
    flyte: bool,
    /// With --flyte: the hard bound on task processes, waiting parents
    /// included [default: 8 x capacity].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_processes: Option<u32>,
    /// With --flyte: the directory of the environment whose `a0` runs
    /// tasks (e.g. .venv/bin) [default: found on PATH].
    #[arg(long, value_name = "DIR")]
    flyte_bin: Option<PathBuf>,
    /// With --flyte: run every attempt in this directory (a code root)
    /// instead of a fresh directory per attempt.
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// With --flyte: where per-attempt directories and logs go
    /// [default: <temp dir>/actionsd-executor/<executor id>].
    #[arg(long, value_name = "DIR")]
    scratch_dir: Option<PathBuf>,
    /// With --flyte: the size at which an attempt's log file is rotated.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    log_max_bytes: u64,
    /// Unique per running executor [default: <hostname>-<pid>].
    #[arg(long)]
    executor_id: Option<String>,
    /// How often leases are extended while actions run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// How long a cancelled command has between SIGTERM and SIGKILL.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    kill_grace: Duration,
    /// Log format.
    #[arg(long, env = "ACTIONSD_LOG_FORMAT", value_enum, default_value_t)]
    log_format: LogFormat,
    /// Bearer token sent with every call (`authorization: Bearer …`).
    #[arg(
        long,
        env = "ACTIONSD_TOKEN",
        hide_env_values = true,
        value_parser = actionsd::client::parse_token
    )]
    token: Option<SecretString>,
    /// PEM CA certificate the daemon's certificate must chain to (with an
    /// https:// --server) [default: the system's roots].
    #[arg(long, env = "ACTIONSD_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate, for a daemon that verifies clients (mTLS).
    #[arg(
        long,
        env = "ACTIONSD_CLIENT_CERT",
        value_name = "FILE",
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(
        long,
        env = "ACTIONSD_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
}

impl ExecutorArgs {
    fn into_settings(self) -> ExecutorSettings {
        let executor_id = self
            .executor_id
            .unwrap_or_else(executor::default_executor_id);
        let (runner, max_processes) = if self.flyte {
            let scratch = self.scratch_dir.unwrap_or_else(|| {
                std::env::temp_dir()
                    .join("actionsd-executor")
                    .join(&executor_id)
            });
            // Task processes run in other directories: relative paths are
            // taken from the executor's.
            let absolute = |path: PathBuf| std::path::absolute(&path).unwrap_or(path);
            let scratch = absolute(scratch);
            let flyte = FlyteSettings {
                flyte_bin: self.flyte_bin.map(absolute),
                workdir: self.workdir.map(absolute),
                log_dir: scratch.join("logs"),
                scratch_dir: scratch.join("work"),
                log_max_bytes: self.log_max_bytes,
                env: executor::TaskEnv::default(),
            };
            let bound = self
                .max_processes
                .unwrap_or_else(|| self.capacity.saturating_mul(8));
            (Runner::Flyte(flyte), bound.max(self.capacity))
        } else {
            let command = self.command.unwrap_or_default();
            (Runner::Shell { command }, 0)
        };
        ExecutorSettings {
            server: self.server,
            security: actionsd::client::ClientSecurity {
                token: self.token,
                ca_cert: self.ca_cert,
                client_cert: self.client_cert,
                client_key: self.client_key,
            },
            executor_id,
            queue: self.queue,
            capacity: self.capacity,
            max_processes,
            runner,
            heartbeat_interval: self.heartbeat_interval,
            kill_grace: self.kill_grace,
        }
    }
}

fn load(common: CommonArgs, serve: Option<ServeArgs>) -> anyhow::Result<Config> {
    let mut overrides = Overrides {
        database_url: common.database_url.map(SecretString::from),
        log_format: common.log_format,
        blob_url: common.blob_url,
        ..Overrides::default()
    };
    if let Some(serve) = serve {
        overrides.listen = serve.listen;
        overrides.workers = serve.workers;
        overrides.tls_cert = serve.tls_cert;
        overrides.tls_key = serve.tls_key;
        overrides.tls_client_ca = serve.tls_client_ca;
        overrides.dangerously_allow_insecure_public_listener =
            serve.dangerously_allow_insecure_public_listener;
    }
    Ok(Config::load(common.config.as_deref(), overrides)?)
}

/// Start-up errors are printed by `main` itself (see `actionsd::startup`):
/// one or two lines, no repeated causes and no backtrace.
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{}", actionsd::startup::describe(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let (common, serve) = args.split();
            let config = load(common, Some(serve))?;
            let traces = telemetry::init_with(config.log_format, Some(&config.tracing));
            let signals = ShutdownSignals::install()?;
            let app = Application::build(config).await?;
            signals.cancel_on_signal(app.shutdown_token());
            let result = app.run().await;
            tokio::task::spawn_blocking(move || traces.shutdown()).await?;
            result
        }
        Command::Dev(args) => {
            let (common, serve) = args.serve.split();
            let config = load(common, Some(serve))?;
            let traces = telemetry::init_with(config.log_format, Some(&config.tracing));
            let shutdown = CancellationToken::new();
            ShutdownSignals::install()?.cancel_on_signal(shutdown.clone());
            let settings = actionsd::dev::DevSettings {
                capacity: args.capacity,
                flyte_bin: args.flyte_bin,
                flyte_config: args.flyte_config,
            };
            let result = actionsd::dev::run(config, settings, shutdown).await;
            tokio::task::spawn_blocking(move || traces.shutdown()).await?;
            result
        }
        Command::Migrate(args) => {
            let config = load(args.common, None)?;
            telemetry::init(config.log_format);
            if args.check {
                app::check_migrations(&config).await?;
                tracing::info!("every migration is applied");
            } else {
                app::migrate(&config).await?;
                tracing::info!("migrations applied");
            }
            Ok(())
        }
        Command::Executor(args) => {
            telemetry::init(args.log_format);
            let shutdown = CancellationToken::new();
            ShutdownSignals::install()?.cancel_on_signal(shutdown.clone());
            executor::run(args.into_settings(), shutdown).await
        }
    }
}

/// SIGINT and SIGTERM, registered when this is made: a signal that arrives
/// while the daemon is still starting is kept, not lost to the default
/// action (which would end the process without a graceful shutdown).
struct ShutdownSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use anyhow::Context as _;
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
                terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Cancels `token` at the first signal.
    fn cancel_on_signal(self, token: CancellationToken) {
        tokio::spawn(async move {
            self.recv().await;
            token.cancel();
        });
    }

    async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
        tracing::info!("shutdown signal received");
    }
}
