//! `actionsd dev`: one command for a Flyte user on one machine. The daemon
//! (by default on the per-user SQLite file and the local blob store) and a
//! Flyte executor for the queue `default` in the same process, plus a
//! `flyte` config file that points the CLI and SDK at them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::app::Application;
use crate::config::{Config, StoreLocation};
use crate::executor::{self, ExecutorSettings, FlyteSettings, Runner, TaskEnv};

/// The project and domain the written config names: Flyte's defaults.
pub const PROJECT: &str = "flytesnacks";
pub const DOMAIN: &str = "development";

pub struct DevSettings {
    /// Task processes at once [default: the number of CPUs].
    pub capacity: Option<u32>,
    /// The `bin` directory of the Python environment with flyte; else `a0`
    /// is looked up on PATH.
    pub flyte_bin: Option<PathBuf>,
    /// Where to write the flyte config [default: `flyte.yaml` in the data
    /// directory].
    pub flyte_config: Option<PathBuf>,
}

/// The directory actionsd keeps its files in for `config`.
fn data_dir(config: &Config) -> anyhow::Result<PathBuf> {
    match &config.store {
        StoreLocation::Sqlite(path) => Ok(path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."))),
        StoreLocation::Postgres(_) => crate::store::sqlite::SqliteStore::default_path()
            .and_then(|p| p.parent().map(Path::to_owned))
            .context("no per-user data directory; give --flyte-config"),
    }
}

/// Finds `a0` (the Flyte task entrypoint) in `bin` or on PATH.
fn find_a0(bin: Option<&Path>) -> Option<PathBuf> {
    let dirs: Vec<PathBuf> = match bin {
        Some(bin) => vec![bin.to_owned()],
        None => std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).collect())
            .unwrap_or_default(),
    };
    dirs.into_iter()
        .map(|dir| dir.join("a0"))
        .find(|candidate| candidate.is_file())
}

/// The flyte config (YAML) for a daemon at `address`.
pub fn flyte_config(address: std::net::SocketAddr) -> String {
    format!(
        "# Written by `actionsd dev`: points the flyte CLI and SDK at it.\n\
         admin:\n  endpoint: dns:///{address}\n  insecure: true\n\
         task:\n  project: {PROJECT}\n  domain: {DOMAIN}\n"
    )
}

/// Serves until `shutdown` fires, with the Flyte executor in-process.
pub async fn run(
    config: Config,
    settings: DevSettings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if config.tls.is_some() {
        anyhow::bail!(
            "actionsd dev serves plain HTTP on loopback for local development; \
             remove the [tls] settings (or --tls-* flags), or run `actionsd serve` with an executor"
        );
    }
    let flyte_bin = settings
        .flyte_bin
        .map(|p| std::path::absolute(&p).unwrap_or(p));
    let a0 = find_a0(flyte_bin.as_deref()).with_context(|| match &flyte_bin {
        Some(bin) => format!(
            "no `a0` in {}: give the bin directory of a Python environment with flyte installed",
            bin.display()
        ),
        None => "no `a0` on PATH: install flyte (pip install flyte) in the active Python \
                 environment, or give --flyte-bin DIR"
            .to_owned(),
    })?;
    let dir = data_dir(&config)?;
    let config_path = match settings.flyte_config {
        Some(path) => path,
        None => dir.join("flyte.yaml"),
    };
    let capacity = settings.capacity.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1)
    });

    let app = Application::build(config).await?;
    let address = app.local_addr();
    let task_env = app.task_env();
    if let Some(parent) = config_path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(&config_path, flyte_config(address))
        .with_context(|| format!("cannot write {}", config_path.display()))?;

    let scratch = dir.join("executor");
    let executor_settings = ExecutorSettings {
        server: format!("http://{address}"),
        security: Default::default(),
        executor_id: format!("dev-{}", std::process::id()),
        queue: "default".to_owned(),
        capacity,
        max_processes: capacity.saturating_mul(8),
        runner: Runner::Flyte(FlyteSettings {
            flyte_bin: a0.parent().map(Path::to_owned),
            workdir: None,
            scratch_dir: scratch.join("work"),
            log_dir: scratch.join("logs"),
            log_max_bytes: 16 * 1024 * 1024,
            env: TaskEnv(task_env),
        }),
        heartbeat_interval: Duration::from_secs(5),
        kill_grace: Duration::from_secs(10),
    };
    println!(
        "actionsd dev: listening on {address}, with a Flyte executor for queue `default` \
         ({capacity} at a time, {})",
        a0.display()
    );
    println!("Run Flyte programs against it:\n");
    println!(
        "    flyte --config {} run wf.py main",
        config_path.display()
    );
    println!(
        "\nor: flyte --endpoint dns:///{address} --insecure run --project {PROJECT} --domain {DOMAIN} wf.py main"
    );

    let daemon_shutdown = app.shutdown_token();
    let daemon = tokio::spawn(app.run());
    let executor_shutdown = shutdown.child_token();
    let executor = tokio::spawn(executor::run(executor_settings, executor_shutdown));
    shutdown.cancelled().await;
    // The executor lets running tasks end (and reports them) first.
    match executor.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(error = %err, "the executor failed"),
        Err(err) => tracing::warn!(error = %err, "the executor task failed"),
    }
    daemon_shutdown.cancel();
    daemon.await.context("daemon task")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_names_the_endpoint_and_project() {
        let text = flyte_config("127.0.0.1:8091".parse().unwrap());
        assert!(text.contains("endpoint: dns:///127.0.0.1:8091\n"), "{text}");
        assert!(text.contains("insecure: true"));
        assert!(text.contains("project: flytesnacks") && text.contains("domain: development"));
    }

    #[test]
    fn a0_is_found_in_the_given_directory_only() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find_a0(Some(dir.path())), None);
        std::fs::write(dir.path().join("a0"), "").unwrap();
        assert_eq!(find_a0(Some(dir.path())), Some(dir.path().join("a0")));
    }
}
