//! The actionsd binary: parse the command line, load the configuration,
//! install logging, run the chosen subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;

use actionsd::app::{self, Application};
use actionsd::config::{Config, LogFormat, Overrides};
use actionsd::telemetry;
use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;

#[derive(Parser)]
#[command(
    name = "actionsd",
    version,
    about = "Flyte v2 ActionsService over Postgres"
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
    Migrate(CommonArgs),
}

#[derive(Args)]
struct CommonArgs {
    /// Config file (TOML); see config/actionsd.toml.
    #[arg(long, env = "ACTIONSD_CONFIG")]
    config: Option<PathBuf>,
    /// Postgres URL, e.g. postgres://postgres@127.0.0.1:5432/actionsd.
    #[arg(long, env = "ACTIONSD_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Log format.
    #[arg(long, env = "ACTIONSD_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Address to listen on [default: 127.0.0.1:8091].
    #[arg(long, env = "ACTIONSD_LISTEN")]
    listen: Option<SocketAddr>,
    /// Event pipeline workers [default: 16].
    #[arg(long, env = "ACTIONSD_WORKERS")]
    workers: Option<usize>,
}

fn load(
    common: CommonArgs,
    listen: Option<SocketAddr>,
    workers: Option<usize>,
) -> anyhow::Result<Config> {
    let overrides = Overrides {
        listen,
        database_url: common.database_url.map(SecretString::from),
        log_format: common.log_format,
        workers,
    };
    Ok(Config::load(common.config.as_deref(), overrides)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = load(args.common, args.listen, args.workers)?;
            telemetry::init(config.log_format);
            let app = Application::build(config).await?;
            let shutdown = app.shutdown_token();
            tokio::spawn(async move {
                wait_for_signal().await;
                shutdown.cancel();
            });
            app.run().await
        }
        Command::Migrate(common) => {
            let config = load(common, None, None)?;
            telemetry::init(config.log_format);
            app::migrate(&config).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received");
}
