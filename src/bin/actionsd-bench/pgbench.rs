//! The ceilings: pgbench running actionsd's SQL (bench/pgbench/) against
//! tables of its own in the bench database.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use sqlx::{Connection, PgConnection};

use crate::Settings;

const SETUP: &str = include_str!("../../../bench/pgbench/setup.sql");
const ENQUEUE: &str = include_str!("../../../bench/pgbench/enqueue.sql");
const CLAIM: &str = include_str!("../../../bench/pgbench/claim.sql");
const CLAIM_FILL: &str = include_str!("../../../bench/pgbench/claim_fill.sql");

/// Creates the `ceiling` tables (after the daemon's migrations).
pub async fn setup(settings: &Settings) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(&settings.database_url)
        .await
        .context("cannot connect to the bench database")?;
    sqlx::raw_sql(SETUP)
        .execute(&mut conn)
        .await
        .context("cannot create the pgbench tables")?;
    conn.close().await.ok();
    Ok(())
}

/// Refreshes the planner statistics of the daemon's tables.
pub async fn analyze(settings: &Settings) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(&settings.database_url)
        .await
        .context("cannot connect to the bench database")?;
    sqlx::raw_sql("ANALYZE public.actions, public.runs, public.events")
        .execute(&mut conn)
        .await
        .context("cannot analyze the daemon's tables")?;
    conn.close().await.ok();
    Ok(())
}

/// Transactions per second of the one-Enqueue script at `clients`.
pub async fn enqueue_tps(settings: &Settings, clients: usize) -> anyhow::Result<f64> {
    run(settings, "enqueue.sql", ENQUEUE, clients, Limit::Time).await
}

/// Actions claimed per second by the SKIP LOCKED script (10 per claim) at
/// `clients`, draining a queue of `depth` actions as the executors drain
/// theirs: each client runs depth / 10 / clients claims (`-t`), and the
/// rate is what was claimed over the wall time.
pub async fn claimed_per_second(
    settings: &Settings,
    clients: usize,
    depth: usize,
) -> anyhow::Result<f64> {
    let mut conn = PgConnection::connect(&settings.database_url)
        .await
        .context("cannot connect to the bench database")?;
    sqlx::query(CLAIM_FILL)
        .bind(i64::try_from(depth).unwrap_or(i64::MAX))
        .execute(&mut conn)
        .await
        .context("cannot fill the pgbench queue")?;
    sqlx::raw_sql("ANALYZE ceiling.actions")
        .execute(&mut conn)
        .await
        .context("cannot analyze the pgbench queue")?;
    let count = "SELECT count(*) FROM ceiling.actions WHERE phase = 3 AND kind = 1";
    let before: i64 = sqlx::query_scalar(count).fetch_one(&mut conn).await?;
    let started = std::time::Instant::now();
    run(
        settings,
        "claim.sql",
        CLAIM,
        clients,
        Limit::Transactions(depth.div_ceil(10 * clients)),
    )
    .await?;
    let elapsed = started.elapsed().max(Duration::from_millis(1));
    let after: i64 = sqlx::query_scalar(count).fetch_one(&mut conn).await?;
    conn.close().await.ok();
    Ok((after - before).max(0) as f64 / elapsed.as_secs_f64())
}

/// How long pgbench runs.
enum Limit {
    /// `-T`: the measurement duration.
    Time,
    /// `-t`: this many transactions per client.
    Transactions(usize),
}

/// Runs one script with `pgbench -n -T <duration> -c N -j N` (or `-t`)
/// and returns its tps (without connection time).
async fn run(
    settings: &Settings,
    name: &str,
    script: &str,
    clients: usize,
    limit: Limit,
) -> anyhow::Result<f64> {
    let dir = std::env::temp_dir().join(format!("actionsd-bench-{}-pgbench", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path: PathBuf = dir.join(name);
    std::fs::write(&path, script).with_context(|| format!("cannot write {}", path.display()))?;
    let clients = clients.to_string();
    let (flag, value) = match limit {
        Limit::Time => ("-T", settings.duration.as_secs().max(1)),
        Limit::Transactions(n) => ("-t", n as u64),
    };
    let value = value.to_string();
    let output = tokio::process::Command::new(&settings.pgbench)
        .args(["-n", flag, &value, "-c", &clients, "-j", &clients, "-f"])
        .arg(&path)
        .arg(&settings.database_url)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(settings.duration + Duration::from_secs(60), output)
        .await
        .map_err(|_| anyhow!("pgbench did not finish in time"))?
        .with_context(|| format!("cannot run {}", settings.pgbench.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let _ = std::fs::remove_file(&path);
    stdout
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix("tps = ")?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .ok_or_else(|| anyhow!("no tps in pgbench's output: {stdout}"))
}
