//! The daemon under test: a fresh database, the real `actionsd` binary on
//! a loopback port, and what `/proc` says about it.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use crate::Settings;

/// How long the daemon may take to report its address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Postgres => "postgres",
            Self::Sqlite => "sqlite",
        })
    }
}

/// Fails unless `url`'s host is a loopback address (or `localhost`).
pub fn require_loopback_url(url: &str) -> anyhow::Result<()> {
    let after_scheme = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("{url:?} is not a URL"))?;
    let authority = after_scheme
        .split(['/', '?'])
        .next()
        .unwrap_or_default()
        .rsplit('@')
        .next()
        .unwrap_or_default();
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        bail!("only loopback addresses are allowed, not {host:?}")
    }
}

/// Drops and creates the bench database, so every scenario starts empty.
pub async fn reset_database(url: &str) -> anyhow::Result<()> {
    let options = PgConnectOptions::from_str(url).context("invalid --database-url")?;
    let name = options
        .get_database()
        .ok_or_else(|| anyhow!("--database-url names no database"))?
        .to_owned();
    // The name goes into DDL, where it cannot be a bound parameter.
    if name.is_empty()
        || name == "postgres"
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        bail!("the bench database name must be [a-z0-9_]+ and not \"postgres\", not {name:?}");
    }
    let mut admin = options
        .database("postgres")
        .connect()
        .await
        .context("cannot connect to Postgres")?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .context("cannot drop the bench database")?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .context("cannot create the bench database")?;
    admin.close().await.ok();
    Ok(())
}

/// Where requests go: a daemon this harness started, or `--server`.
pub struct Target {
    pub url: String,
    pub daemon: Option<Daemon>,
}

impl Target {
    /// A fresh store and a daemon on it (or the `--server` daemon).
    pub async fn start(settings: &Settings, backend: Backend) -> anyhow::Result<Self> {
        if let Some(server) = &settings.server {
            return Ok(Self {
                url: server.clone(),
                daemon: None,
            });
        }
        let daemon = Daemon::start(settings, backend).await?;
        Ok(Self {
            url: format!("http://{}", daemon.addr),
            daemon: Some(daemon),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.pid)
    }

    /// Peak resident memory of the daemon, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.pid().and_then(|pid| proc_status_kib(pid, "VmHWM"))
    }

    /// Current resident memory of the daemon, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.pid().and_then(|pid| proc_status_kib(pid, "VmRSS"))
    }

    /// Commands and transactions the daemon's committers reported so far.
    pub fn batches(&self) -> Option<(u64, u64)> {
        self.daemon.as_ref().map(|d| {
            (
                d.batched_commands.load(Ordering::Relaxed),
                d.batches.load(Ordering::Relaxed),
            )
        })
    }

    pub async fn stop(self) {
        if let Some(daemon) = self.daemon {
            daemon.stop().await;
        }
    }
}

/// A running `actionsd serve`.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    pub pid: u32,
    /// The SQLite store's directory, removed at stop.
    dir: Option<PathBuf>,
    /// Totals of the daemon's "group commit" debug lines.
    batched_commands: Arc<AtomicU64>,
    batches: Arc<AtomicU64>,
}

impl Daemon {
    async fn start(settings: &Settings, backend: Backend) -> anyhow::Result<Self> {
        let (url, dir) = match backend {
            Backend::Postgres => {
                reset_database(&settings.database_url).await?;
                (settings.database_url.clone(), None)
            }
            Backend::Sqlite => {
                let dir = std::env::temp_dir()
                    .join(format!("actionsd-bench-{}-sqlite", std::process::id()));
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("cannot clear {}", dir.display()))?;
                }
                // The daemon creates the file, never its directory.
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let url = format!("sqlite://{}", dir.join("actionsd.db").display());
                (url, Some(dir))
            }
        };
        let mut command = Command::new(&settings.actionsd);
        command.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--database-url",
            &url,
        ]);
        if let Some(config) = &settings.daemon_config {
            command.arg("--config").arg(config);
        }
        let mut child = command
            .env_remove("ACTIONSD_CONFIG")
            .env_remove("ACTIONSD_LISTEN")
            .env_remove("ACTIONSD_DATABASE_URL")
            .env("RUST_LOG", "info,sqlx=warn,actionsd::store::commit=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", settings.actionsd.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the daemon exited at once"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let batched_commands = Arc::new(AtomicU64::new(0));
        let batches = Arc::new(AtomicU64::new(0));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(read_log(
            stdout,
            tail.clone(),
            Some(addr_tx),
            batched_commands.clone(),
            batches.clone(),
        ));
        tokio::spawn(read_log(
            stderr,
            tail.clone(),
            None,
            batched_commands.clone(),
            batches.clone(),
        ));
        let addr = match tokio::time::timeout(START_TIMEOUT, addr_rx).await {
            Ok(Ok(addr)) => addr,
            _ => {
                let _ = child.start_kill();
                let lines: Vec<String> = tail
                    .lock()
                    .map(|t| t.iter().cloned().collect())
                    .unwrap_or_default();
                bail!(
                    "the daemon did not report its address; its last lines:\n{}",
                    lines.join("\n")
                );
            }
        };
        Ok(Self {
            child,
            addr,
            pid,
            dir,
            batched_commands,
            batches,
        })
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Drains one of the daemon's outputs (a full pipe would stall it): finds
/// the listening address, totals the group-commit lines, keeps the last
/// lines for error messages.
async fn read_log(
    output: impl AsyncRead + Unpin,
    tail: Arc<Mutex<VecDeque<String>>>,
    mut addr: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    batched_commands: Arc<AtomicU64>,
    batches: Arc<AtomicU64>,
) {
    let mut lines = BufReader::new(output).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) {
            if entry["message"] == "group commit" {
                if let Some(n) = entry["commands"].as_u64() {
                    batched_commands.fetch_add(n, Ordering::Relaxed);
                    batches.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            if entry["message"] == "actionsd listening" {
                if let Some(parsed) = entry["address"].as_str().and_then(|a| a.parse().ok()) {
                    if let Some(sender) = addr.take() {
                        let _ = sender.send(parsed);
                    }
                }
            }
        }
        if let Ok(mut tail) = tail.lock() {
            if tail.len() >= 20 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}

/// A `kB` field of /proc/<pid>/status, in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// CPU time (user + system, in clock ticks) of a process.
fn process_ticks(path: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14 and stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time of every process named `postgres` (all of the server's
/// backends, whoever they serve).
fn postgres_ticks() -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "postgres")
        })
        .filter_map(|e| process_ticks(&e.path().join("stat")))
        .sum()
}

/// Busy ticks of the whole machine, from /proc/stat.
fn machine_ticks() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(line) = stat.lines().next() else {
        return 0;
    };
    // user nice system idle iowait irq softirq steal …
    line.split_whitespace()
        .skip(1)
        .enumerate()
        .filter(|(i, _)| !matches!(i, 3 | 4))
        .take(8)
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum()
}

/// Where the CPU went during a measurement.
#[derive(Clone, Copy)]
pub struct CpuSample {
    at: std::time::Instant,
    daemon: u64,
    bench: u64,
    postgres: u64,
    machine: u64,
}

impl CpuSample {
    pub fn take(daemon: Option<u32>) -> Self {
        Self {
            at: std::time::Instant::now(),
            daemon: daemon
                .and_then(|pid| process_ticks(Path::new(&format!("/proc/{pid}/stat"))))
                .unwrap_or(0),
            bench: process_ticks(Path::new("/proc/self/stat")).unwrap_or(0),
            postgres: postgres_ticks(),
            machine: machine_ticks(),
        }
    }

    /// "daemon 80% · postgres 90% · bench 20% · machine 195%", in percent
    /// of one core (clock ticks are 1/100 s on Linux).
    pub fn since(&self, before: &CpuSample) -> String {
        let secs = self.at.duration_since(before.at).as_secs_f64().max(1e-3);
        let pct = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        format!(
            "CPU: daemon {:.0}% · postgres {:.0}% · bench {:.0}% · machine {:.0}% of {}00%",
            pct(self.daemon, before.daemon),
            pct(self.postgres, before.postgres),
            pct(self.bench, before.bench),
            pct(self.machine, before.machine),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        )
    }
}
