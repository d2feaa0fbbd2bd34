//! Building and running the daemon. `build` binds the listener and
//! connects everything; `run` serves until the shutdown token fires.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::PgConnectOptions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codec::CompressionEncoding;
use tonic::service::Routes;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tonic_web::GrpcWebLayer;
use tower::ServiceBuilder;
use tracing::{info, warn};

use crate::blob::Blobs;
use crate::config::ExecutorConfig;
use crate::config::{Config, StoreLocation};
use crate::domain::ReapSettings;
use crate::metrics::RpcMetricsLayer;
use crate::pipeline::Pipeline;
use crate::proto::actionsd::executor::v1::executor_service_server::ExecutorServiceServer;
use crate::proto::actionsd::read::v1::read_service_server::ReadServiceServer;
use crate::proto::flyteidl2::actions::actions_service_server::ActionsServiceServer;
use crate::proto::flyteidl2::core::{execution_error::ErrorKind, ExecutionError};
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::rpc::connect::ConnectLayer;
use crate::rpc::edge::{EdgeLayer, EdgeSettings, SizeStatusLayer};
use crate::rpc::executor::ExecutorApi;
use crate::rpc::{ActionsApi, ReadApi};
use crate::server::ListenerSettings;
use crate::store::postgres::{PgStore, PoolSettings};
use crate::store::sqlite::{SqliteSettings, SqliteStore};
use crate::store::{Detached, GroupCommit, Store};
use crate::tls::Tls;

pub struct Application {
    config: Arc<Config>,
    listener: TcpListener,
    local_addr: SocketAddr,
    /// The admin listener for `/metrics`, when configured.
    admin: Option<TcpListener>,
    /// TLS on both listeners, when configured.
    tls: Option<Tls>,
    store: Arc<dyn Store>,
    pipeline: Pipeline,
    blobs: Blobs,
    shutdown: CancellationToken,
}

/// Creates the database if it is missing and applies pending migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let store = open_store(config, true).await?;
    store.close().await;
    Ok(())
}

/// Checks, without changing anything, that the configured database has
/// every migration applied and none unknown.
pub async fn check_migrations(config: &Config) -> anyhow::Result<()> {
    match &config.store {
        StoreLocation::Postgres(url) => {
            let options =
                PgConnectOptions::from_str(url.expose_secret()).context("invalid database URL")?;
            let store = PgStore::connect(
                options,
                &PoolSettings {
                    max_connections: 1,
                    acquire_timeout: config.database.acquire_timeout,
                    statement_timeout: config.database.statement_timeout,
                },
            );
            let result = store.check_migrations().await;
            store.close().await;
            result.map_err(anyhow::Error::msg)
        }
        StoreLocation::Sqlite(path) => SqliteStore::check_migrations(path)
            .await
            .map_err(anyhow::Error::msg),
    }
}

/// Opens the configured store. Postgres is migrated (or checked) as
/// configured; an SQLite file belongs to one daemon, which always brings
/// it up to date.
async fn open_store(config: &Config, migrate: bool) -> anyhow::Result<Arc<dyn Store>> {
    match &config.store {
        StoreLocation::Postgres(url) => Ok(Arc::new(open_postgres(config, url, migrate).await?)),
        StoreLocation::Sqlite(path) => {
            if !migrate {
                warn!(
                    "database.migrate_on_start = false is ignored on SQLite: \
                     the file belongs to this daemon, which always applies its migrations"
                );
            }
            // The per-user default directory is created on first use; a
            // configured path's directory must exist (see SqliteStore::open).
            if Some(path) == SqliteStore::default_path().as_ref() {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).with_context(|| {
                        format!("cannot create the data directory {}", dir.display())
                    })?;
                }
            }
            let settings = SqliteSettings {
                max_batch: config.database.max_batch,
                ..SqliteSettings::default()
            };
            let store = SqliteStore::open(path, &settings)
                .await
                .with_context(|| format!("cannot open the SQLite store {}", path.display()))?;
            info!(path = %path.display(), "store: SQLite");
            Ok(Arc::new(store))
        }
    }
}

async fn open_postgres(
    config: &Config,
    url: &SecretString,
    migrate: bool,
) -> anyhow::Result<PgStore> {
    let url = url.expose_secret();
    let options = PgConnectOptions::from_str(url).context("invalid database URL")?;
    let store = PgStore::connect(
        options,
        &PoolSettings {
            max_connections: config.database.max_connections,
            acquire_timeout: config.database.acquire_timeout,
            statement_timeout: config.database.statement_timeout,
        },
    )
    .with_group_commit(GroupCommit {
        committers: config.database.committers,
        max_batch: config.database.max_batch,
    });
    if migrate {
        if !sqlx::Postgres::database_exists(url)
            .await
            .context("cannot reach the database")?
        {
            sqlx::Postgres::create_database(url)
                .await
                .context("cannot create the database")?;
            info!("created the database");
        }
        store.migrate().await.context("cannot apply migrations")?;
    } else {
        store.check_migrations().await?;
    }
    info!("store: Postgres");
    Ok(store)
}

impl Application {
    /// Connects to the database (migrating it if configured), starts the
    /// event pipeline and binds the listening socket.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        // The listener rule and the certificate first: they fail the start
        // before any database work.
        config.check_public_listeners()?;
        let tls = config.tls.as_ref().map(Tls::new).transpose()?;
        let store: Arc<dyn Store> = Arc::new(Detached::new(
            open_store(&config, config.database.migrate_on_start).await?,
        ));
        let pipeline = Pipeline::start(store.clone(), config.pipeline.clone())
            .await
            .context("cannot start the event pipeline")?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let local_addr = listener.local_addr()?;
        let admin = match config.metrics.listen.filter(|_| config.metrics.enabled) {
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .with_context(|| format!("cannot listen on {address} (metrics.listen)"))?,
            ),
            None => None,
        };
        let blobs = crate::rpc::flyte::open_blobs(&config)?;
        Ok(Self {
            config: Arc::new(config),
            listener,
            local_addr,
            admin,
            tls,
            store,
            pipeline,
            blobs,
            shutdown: CancellationToken::new(),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's bound address, when `metrics.listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// What task processes need in their environment to use this daemon's
    /// blob store (empty for a local directory).
    pub fn task_env(&self) -> Vec<(String, String)> {
        self.blobs.task_env().to_vec()
    }

    /// Cancel it to shut the daemon down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until the shutdown token fires, then: stops accepting, waits
    /// for in-flight writes, delivers their events, ends streams with
    /// UNAVAILABLE and closes the pool.
    pub async fn run(self) -> anyhow::Result<()> {
        let Self {
            config,
            listener,
            local_addr,
            admin,
            tls,
            store,
            pipeline,
            blobs,
            shutdown,
        } = self;
        let server_config = &config.server;
        let writes = TaskTracker::new();
        let api = ActionsApi::new(
            store.clone(),
            pipeline.registry(),
            pipeline.waker(),
            writes.clone(),
        );
        let executor_api = ExecutorApi::new(
            store.clone(),
            pipeline.executors(),
            pipeline.waker(),
            writes.clone(),
            config.executor.lease_ttl,
            shutdown.clone(),
        );
        let read_api = ReadApi::new(store.clone(), pipeline.registry());
        let purge_blobs = blobs.clone();
        let flyte = crate::rpc::flyte::FlyteServices::new(
            &config,
            local_addr,
            &api,
            &store,
            &pipeline,
            blobs,
            shutdown.clone(),
        );
        let executor_api = executor_api.with_logs(flyte.logs.clone());
        let connect = ConnectLayer::new(
            api.clone(),
            executor_api.clone(),
            read_api.clone(),
            server_config.max_message_size,
        )
        .with_flyte(flyte.api.clone());
        let reads = ReadServiceServer::new(read_api)
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(server_config.max_message_size)
            .max_encoding_message_size(server_config.max_message_size);
        let executors = ExecutorServiceServer::new(executor_api)
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(server_config.max_message_size)
            .max_encoding_message_size(server_config.max_message_size);
        let reaper = tokio::spawn(reap(
            store.clone(),
            pipeline.waker(),
            config.executor.clone(),
            shutdown.clone(),
        ));
        let actions = ActionsServiceServer::new(api)
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(server_config.max_message_size)
            .max_encoding_message_size(server_config.max_message_size);
        let (health, health_service) = tonic_health::server::health_reporter();
        let health_service = health_service
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip);
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()?
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip);
        let reflection_v1alpha = reflection()
            .build_v1alpha()?
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip);
        // Serving from the first request: `build` has just reached the
        // database. The monitor keeps it up to date from then on.
        for service in HEALTH_SERVICES {
            health
                .set_service_status(service, ServingStatus::Serving)
                .await;
        }
        let monitor = tokio::spawn(monitor_health(
            store.clone(),
            health.clone(),
            shutdown.clone(),
        ));
        let routes = Routes::new(actions)
            .add_service(executors)
            .add_service(reads)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(flyte.runs())
            .add_service(flyte.data())
            .add_service(flyte.clusters())
            .prepare();
        // HTTP/1.1 and HTTP/2 (h2c) on one listener: Connect and gRPC-Web
        // clients may use either. Signed uploads have their own bounds.
        let metrics_here = (config.metrics.enabled && admin.is_none()).then(|| store.clone());
        let trace_context = config
            .tracing
            .otlp_endpoint
            .is_some()
            .then_some(crate::telemetry::TraceContextLayer);
        let service = ServiceBuilder::new()
            .option_layer(trace_context)
            .layer(RpcMetricsLayer::new(metrics_here))
            .layer(flyte.http.clone())
            .layer(EdgeLayer::new(EdgeSettings {
                request_timeout: server_config.request_timeout,
                body_read_timeout: server_config.body_read_timeout,
                max_buffered_request_bytes: server_config.max_buffered_request_bytes,
            }))
            .layer(connect)
            .layer(GrpcWebLayer::new())
            .layer(SizeStatusLayer)
            .service(routes);
        let listener_settings = ListenerSettings {
            max_connections: server_config.max_connections,
            max_concurrent_streams: server_config.max_concurrent_streams,
            header_read_timeout: server_config.header_read_timeout,
            idle_timeout: server_config.idle_timeout,
            http2_keepalive_interval: server_config.http2_keepalive_interval,
            http2_keepalive_timeout: server_config.http2_keepalive_timeout,
            tcp_keepalive: server_config.tcp_keepalive,
        };
        let admin_server = admin.map(|admin| {
            let service = crate::metrics::AdminService {
                store: store.clone(),
            };
            tokio::spawn(crate::server::serve(
                admin,
                service,
                listener_settings.clone(),
                tls.clone(),
                shutdown.clone(),
            ))
        });
        let tls_reload = match (&tls, &config.tls) {
            (Some(tls), Some(settings)) => Some(tokio::spawn(tls.clone().watch(
                settings.clone(),
                crate::tls::hangup_signal(),
                shutdown.clone(),
            ))),
            _ => None,
        };
        let retention = tokio::spawn({
            let (store, settings, shutdown) =
                (store.clone(), config.retention.clone(), shutdown.clone());
            crate::retention::run(store, Some(purge_blobs), settings, shutdown)
        });
        let mut server = tokio::spawn(crate::server::serve(
            listener,
            service,
            listener_settings,
            tls.clone(),
            shutdown.clone(),
        ));
        info!(address = %local_addr, tls = tls.is_some(), "actionsd listening");

        tokio::select! {
            // The server ends by itself only after the token fired; checking
            // the token first keeps that ordinary end off the error path.
            biased;
            () = shutdown.cancelled() => {}
            result = &mut server => {
                pipeline.shutdown(server_config.shutdown_timeout).await;
                store.close().await;
                return match result {
                    Ok(()) => Err(anyhow::anyhow!("server stopped unexpectedly")),
                    Err(err) => Err(err).context("server task failed"),
                };
            }
        }

        // One deadline for the whole shutdown: every step gets what is left
        // of `shutdown_timeout`, so stopping never takes longer than that
        // (plus the moment it takes to abort what is left).
        info!("shutting down: no new requests; finishing in-flight writes");
        let deadline = tokio::time::Instant::now() + server_config.shutdown_timeout;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        for (name, mut task) in [
            ("health monitor", monitor),
            ("reaper", reaper),
            ("retention", retention),
        ]
        .into_iter()
        .chain(admin_server.map(|task| ("metrics listener", task)))
        .chain(tls_reload.map(|task| ("TLS reload", task)))
        {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                warn!(task = name, "did not stop before the shutdown deadline");
                task.abort();
            }
        }
        writes.close();
        if tokio::time::timeout_at(deadline, writes.wait())
            .await
            .is_err()
        {
            warn!("in-flight writes did not finish before the shutdown deadline");
        }
        pipeline.shutdown(left()).await;
        match tokio::time::timeout_at(deadline, &mut server).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => warn!(error = %err, "server task failed"),
            Err(_) => {
                warn!("connections did not close before the shutdown deadline; closing them");
                server.abort();
            }
        }
        if tokio::time::timeout_at(deadline, store.close())
            .await
            .is_err()
        {
            warn!("database connections did not close before the shutdown deadline");
        }
        info!("shut down");
        Ok(())
    }
}

/// The services whose health follows the database: "" is the server as a
/// whole.
const HEALTH_SERVICES: [&str; 2] = ["", "flyteidl2.actions.ActionsService"];

/// How often the health service re-checks the database.
const HEALTH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Keeps `grpc.health.v1.Health` truthful: SERVING while the database
/// answers, NOT_SERVING while it does not and once shutdown has begun.
async fn monitor_health(
    store: Arc<dyn Store>,
    health: HealthReporter,
    shutdown: CancellationToken,
) {
    let mut last = ServingStatus::Serving;
    loop {
        let up = store.ping().await.is_ok();
        ::metrics::gauge!(crate::metrics::names::STORE_UP).set(if up { 1.0 } else { 0.0 });
        let status = if up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != status {
            info!(?status, "health changed");
            for service in HEALTH_SERVICES {
                health.set_service_status(service, status).await;
            }
            last = status;
        }
        tokio::select! {
            () = tokio::time::sleep(HEALTH_INTERVAL) => {}
            () = shutdown.cancelled() => break,
        }
    }
    for service in HEALTH_SERVICES {
        health
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
}

/// Requeues expired leases and times out overdue conditions, on every
/// daemon (passes on several daemons skip each other's rows).
async fn reap(
    store: Arc<dyn Store>,
    waker: crate::pipeline::Waker,
    config: ExecutorConfig,
    shutdown: CancellationToken,
) {
    let error = |code: &str, message: String, kind: ErrorKind| {
        bytes::Bytes::from(prost::Message::encode_to_vec(&ExecutionError {
            code: code.to_owned(),
            message,
            kind: kind as i32,
            ..Default::default()
        }))
    };
    let settings = ReapSettings {
        max_system_retries: config.max_system_retries,
        lease_error: error(
            "LeaseExpired",
            format!(
                "the executor stopped heartbeating; the lease expired {} times",
                config.max_system_retries + 1
            ),
            ErrorKind::System,
        ),
        timeout_error: error(
            "ConditionTimedOut",
            "the condition was not signalled before its timeout".to_owned(),
            ErrorKind::User,
        ),
    };
    loop {
        let result = store.reap(&settings).await;
        record_reap(&result);
        match result {
            Ok(outcome) if outcome != crate::domain::ReapOutcome::default() => {
                info!(
                    requeued = outcome.requeued,
                    failed = outcome.failed,
                    timed_out = outcome.timed_out,
                    "reaped"
                );
                waker.wake();
            }
            Ok(_) => {}
            Err(err) => warn!(error = %err, "reaper pass failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(config.reaper_interval) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

fn record_reap(result: &Result<crate::domain::ReapOutcome, crate::domain::Error>) {
    use crate::metrics::names;
    ::metrics::counter!(names::REAPER_RUNS).increment(1);
    match result {
        Ok(outcome) => {
            let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
            ::metrics::counter!(names::LEASES_EXPIRED)
                .increment(count(outcome.requeued + outcome.failed));
            ::metrics::counter!(names::LEASES_REQUEUED).increment(count(outcome.requeued));
            ::metrics::counter!(names::CONDITIONS_TIMED_OUT).increment(count(outcome.timed_out));
        }
        Err(_) => ::metrics::counter!(names::REAPER_FAILURES).increment(1),
    }
}
