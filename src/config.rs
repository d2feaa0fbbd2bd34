//! One typed configuration, layered: defaults → config file → environment
//! (`ACTIONSD_*`) → flags. The environment and flags are read by clap in
//! `main`; this module merges them over the file and validates the result
//! once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::pipeline::PipelineSettings;
use crate::store::GroupCommit;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8091";

/// The address to listen on, from `IP:PORT` or `HOST:PORT`. A host name is
/// resolved once, at start-up; the daemon listens on its first IPv4
/// address, else its first address (`localhost:8092` → `127.0.0.1:8092`).
pub fn resolve_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let invalid = || format!("{text:?} is not HOST:PORT or IP:PORT, e.g. 127.0.0.1:8091");
    // `to_socket_addrs` accepts only HOST:PORT with a numeric port.
    let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(invalid());
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(text)
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{host:?} resolves to no address"))
}

/// Where actions are stored, from `database_url`.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    /// `postgres://…` or `postgresql://…`: shared by any number of daemons.
    Postgres(SecretString),
    /// `sqlite://PATH` (or no URL at all: the per-user default file): one
    /// daemon per file.
    Sqlite(PathBuf),
}

impl StoreLocation {
    /// The default store: `actionsd.db` in the per-user data directory
    /// (`$XDG_DATA_HOME/actionsd`, usually `~/.local/share/actionsd`, on
    /// Linux; `~/Library/Application Support/actionsd` on macOS).
    pub fn default_sqlite() -> Option<Self> {
        crate::store::sqlite::SqliteStore::default_path().map(Self::Sqlite)
    }

    fn parse(url: &SecretString) -> Result<Self, ConfigError> {
        let text = url.expose_secret();
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.clone()));
        }
        let path = text
            .strip_prefix("sqlite://")
            .or_else(|| text.strip_prefix("sqlite:"))
            .map(|rest| rest.split('?').next().unwrap_or(rest));
        match path {
            Some(path) if !path.is_empty() => Ok(Self::Sqlite(PathBuf::from(path))),
            _ => Err(ConfigError::Invalid {
                setting: "database_url",
                message: "expected postgres://…, postgresql://… or sqlite://PATH".to_owned(),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The parser's message and position only: toml's own rendering
    /// quotes the offending line, which may hold the database password.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting {setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
    /// A non-loopback listener without both TLS and authentication, and
    /// without `dangerously_allow_insecure_public_listener`.
    #[error("refusing to listen on {address} ({setting}) without {missing}: anyone who can reach it could read and change every run")]
    InsecurePublicListener {
        setting: &'static str,
        address: SocketAddr,
        missing: &'static str,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// The validated configuration of a daemon.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub store: StoreLocation,
    pub log_format: LogFormat,
    pub database: DatabaseConfig,
    pub pipeline: PipelineSettings,
    pub server: ServerConfig,
    pub executor: ExecutorConfig,
    pub blobs: BlobConfig,
    pub metrics: MetricsConfig,
    pub retention: RetentionConfig,
    pub tracing: TracingConfig,
    /// TLS on the listener (and the metrics listener); `None`: plain HTTP.
    pub tls: Option<crate::tls::TlsSettings>,
    /// Listen on a non-loopback address without TLS and authentication.
    pub dangerously_allow_insecure_public_listener: bool,
}

/// OpenTelemetry trace export.
#[derive(Debug, Clone)]
pub struct TracingConfig {
    /// The OTLP/gRPC collector (`http://host:4317`); none: traces are off.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    /// Share of new traces sampled (0.0–1.0); a `traceparent` that says
    /// sampled is always followed.
    pub sample_ratio: f64,
    /// Bound on one export call.
    pub export_timeout: Duration,
}

/// Where `GET /metrics` is served.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Serve `/metrics` at all.
    pub enabled: bool,
    /// An admin listener for `/metrics` alone; when unset, `/metrics` is
    /// served on the API port.
    pub listen: Option<SocketAddr>,
}

/// Deleting finished runs.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    pub enabled: bool,
    /// A run whose root finished longer ago than this is deleted.
    pub period: Duration,
    /// How often a retention pass starts.
    pub interval: Duration,
    /// Runs deleted per transaction.
    pub batch_size: usize,
    /// Pause between two batches of a pass.
    pub batch_pause: Duration,
}

/// The blob store (code bundles, inputs, outputs, logs) and its URLs.
#[derive(Debug, Clone)]
pub struct BlobConfig {
    /// `None`: the `blobs` directory next to the SQLite file, or in the
    /// per-user data directory when the store is Postgres.
    pub location: Option<crate::blob::BlobLocation>,
    /// Base URL clients reach this daemon at, for signed URLs; `None`: the
    /// Host the request came to.
    pub public_url: Option<String>,
    /// HMAC key of signed URLs; `None`: a random key kept in
    /// `signing.key` beside the local blob directory.
    pub signing_key: Option<SecretString>,
    pub limits: crate::blob::BlobLimits,
}

#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// How long a lease lasts without a heartbeat.
    pub lease_ttl: Duration,
    /// How often each daemon looks for expired leases and overdue
    /// conditions.
    pub reaper_interval: Duration,
    /// Expired leases are requeued (attempt + 1) this many times; then the
    /// action fails with a SYSTEM error.
    pub max_system_retries: u32,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// Postgres: the server-side bound on each statement and on a
    /// transaction left idle; each store operation waits at most one second
    /// longer on the client, then answers UNAVAILABLE.
    pub statement_timeout: Duration,
    /// Apply migrations (creating the database if needed) at start-up;
    /// when false, start-up only checks that they were applied.
    pub migrate_on_start: bool,
    /// Concurrent write transactions of the Postgres store (group commit).
    pub committers: usize,
    /// Most writes committed together in one transaction.
    pub max_batch: usize,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request or response message, in bytes.
    pub max_message_size: usize,
    /// How long shutdown waits for in-flight work at each step.
    pub shutdown_timeout: Duration,
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    pub tcp_keepalive: Duration,
    /// Open connections at most; more are answered RESOURCE_EXHAUSTED.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams (calls) per connection.
    pub max_concurrent_streams: u32,
    /// How long an HTTP/1.1 request's headers may take to arrive.
    pub header_read_timeout: Duration,
    /// How long a request body may take to arrive.
    pub body_read_timeout: Duration,
    /// A connection with no call in flight for this long is closed.
    pub idle_timeout: Duration,
    /// How long a unary call (or the opening of a stream) may take.
    pub request_timeout: Duration,
    /// Request body bytes held in memory at once, over all requests.
    pub max_buffered_request_bytes: usize,
}

/// Settings given on the command line or in the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub database_url: Option<SecretString>,
    pub log_format: Option<LogFormat>,
    pub workers: Option<usize>,
    pub blob_url: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    /// `true` only: the flag can allow, never forbid what the file allows.
    pub dangerously_allow_insecure_public_listener: bool,
}

/// The config file: every setting, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    database_url: Option<SecretString>,
    log_format: Option<LogFormat>,
    #[serde(default)]
    database: FileDatabase,
    #[serde(default)]
    pipeline: FilePipeline,
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    executor: FileExecutor,
    #[serde(default)]
    metrics: FileMetrics,
    #[serde(default)]
    retention: FileRetention,
    #[serde(default)]
    tracing: FileTracing,
    #[serde(default)]
    blobs: FileBlobs,
    #[serde(default)]
    logs: FileLogs,
    #[serde(default)]
    tls: FileTls,
    dangerously_allow_insecure_public_listener: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    client_auth: Option<crate::tls::ClientAuth>,
    #[serde(default, with = "humantime_serde")]
    handshake_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    reload_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTracing {
    otlp_endpoint: Option<String>,
    service_name: Option<String>,
    sample_ratio: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    export_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBlobs {
    url: Option<String>,
    public_url: Option<String>,
    signing_key: Option<SecretString>,
    max_upload_bytes: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    max_url_ttl: Option<Duration>,
    s3_endpoint: Option<String>,
    s3_region: Option<String>,
    s3_access_key_id: Option<String>,
    s3_secret_access_key: Option<SecretString>,
    s3_allow_http: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    enabled: Option<bool>,
    listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRetention {
    enabled: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    period: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    interval: Option<Duration>,
    batch_size: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    batch_pause: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLogs {
    max_attempt_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileExecutor {
    #[serde(default, with = "humantime_serde")]
    lease_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    reaper_interval: Option<Duration>,
    max_system_retries: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDatabase {
    max_connections: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    acquire_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    statement_timeout: Option<Duration>,
    migrate_on_start: Option<bool>,
    committers: Option<usize>,
    max_batch: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePipeline {
    workers: Option<usize>,
    worker_queue: Option<usize>,
    batch_size: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    poll_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    notify_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    unavailable_after: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    max_message_size: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    shutdown_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    http2_keepalive_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    http2_keepalive_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    tcp_keepalive: Option<Duration>,
    max_connections: Option<usize>,
    max_concurrent_streams: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    header_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    body_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    request_timeout: Option<Duration>,
    max_buffered_request_bytes: Option<usize>,
}

/// Describes a config file parse error without echoing the file: its line
/// and column and the parser's message, except that an error on a line
/// that mentions `database_url` (or in a message quoting a URL) says only
/// that the value is invalid, so a password in it is never printed.
fn parse_error(text: &str, err: &toml::de::Error) -> String {
    let (line_number, column, line) = match err.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let before = &text[..start];
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
            (
                before.matches('\n').count() + 1,
                before[line_start..].chars().count() + 1,
                &text[line_start..line_end],
            )
        }
        None => (0, 0, ""),
    };
    let message = err.message().trim();
    let secret = line.contains("database_url") || message.contains("://");
    let message = if secret {
        "invalid value (not shown: it may hold the database password)"
    } else {
        message
    };
    if line_number == 0 {
        message.to_owned()
    } else {
        format!("line {line_number}, column {column}: {message}")
    }
}

impl Config {
    /// Merges `overrides` over the file at `path` (if any) over defaults.
    pub fn load(path: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|err| ConfigError::Parse {
                    path: path.to_owned(),
                    message: parse_error(&text, &err),
                })?
            }
            None => FileConfig::default(),
        };
        Self::merge(file, overrides)
    }

    /// The defaults, with overrides applied.
    pub fn with_overrides(overrides: Overrides) -> Result<Self, ConfigError> {
        Self::merge(FileConfig::default(), overrides)
    }

    fn merge(mut file: FileConfig, o: Overrides) -> Result<Self, ConfigError> {
        let tls = tls_settings(std::mem::take(&mut file.tls), &o)?;
        let defaults = crate::blob::BlobLimits::default();
        let s3 = crate::blob::S3Settings {
            bucket: String::new(),
            prefix: String::new(),
            endpoint: file.blobs.s3_endpoint,
            region: file
                .blobs
                .s3_region
                .unwrap_or_else(|| "us-east-1".to_owned()),
            access_key_id: file.blobs.s3_access_key_id,
            secret_access_key: file.blobs.s3_secret_access_key,
            allow_http: file.blobs.s3_allow_http.unwrap_or(false),
        };
        let blobs = BlobConfig {
            location: o
                .blob_url
                .or(file.blobs.url)
                .map(|url| crate::blob::BlobLocation::parse(&url, s3))
                .transpose()
                .map_err(|message| ConfigError::Invalid {
                    setting: "blobs.url",
                    message,
                })?,
            public_url: file.blobs.public_url,
            signing_key: file.blobs.signing_key,
            limits: crate::blob::BlobLimits {
                max_upload_bytes: file
                    .blobs
                    .max_upload_bytes
                    .unwrap_or(defaults.max_upload_bytes),
                max_url_ttl: file.blobs.max_url_ttl.unwrap_or(defaults.max_url_ttl),
                max_attempt_log_bytes: file
                    .logs
                    .max_attempt_bytes
                    .unwrap_or(defaults.max_attempt_log_bytes),
            },
        };
        let config = Self {
            tls,
            dangerously_allow_insecure_public_listener: o
                .dangerously_allow_insecure_public_listener
                || file
                    .dangerously_allow_insecure_public_listener
                    .unwrap_or(false),
            listen: match (o.listen, file.listen) {
                (Some(listen), _) => listen,
                (None, Some(text)) => {
                    resolve_listen(&text).map_err(|message| ConfigError::Invalid {
                        setting: "listen",
                        message,
                    })?
                }
                (None, None) => DEFAULT_LISTEN.parse().expect("valid default address"),
            },
            store: match o.database_url.or(file.database_url) {
                Some(url) => StoreLocation::parse(&url)?,
                None => StoreLocation::default_sqlite().ok_or(ConfigError::Invalid {
                    setting: "database_url",
                    message: "no per-user data directory for the default SQLite file; \
                              give --database-url sqlite://PATH"
                        .to_owned(),
                })?,
            },
            log_format: o.log_format.or(file.log_format).unwrap_or_default(),
            database: DatabaseConfig {
                max_connections: file.database.max_connections.unwrap_or(16),
                acquire_timeout: file
                    .database
                    .acquire_timeout
                    .unwrap_or(Duration::from_secs(5)),
                statement_timeout: file
                    .database
                    .statement_timeout
                    .unwrap_or(Duration::from_secs(5)),
                migrate_on_start: file.database.migrate_on_start.unwrap_or(true),
                committers: file
                    .database
                    .committers
                    .unwrap_or(GroupCommit::default().committers),
                max_batch: file
                    .database
                    .max_batch
                    .unwrap_or(GroupCommit::default().max_batch),
            },
            pipeline: PipelineSettings {
                workers: o.workers.or(file.pipeline.workers).unwrap_or(16),
                worker_queue: file.pipeline.worker_queue.unwrap_or(1024),
                batch_size: file.pipeline.batch_size.unwrap_or(1000),
                poll_interval: file
                    .pipeline
                    .poll_interval
                    .unwrap_or(Duration::from_secs(1)),
                notify_interval: file
                    .pipeline
                    .notify_interval
                    .unwrap_or(Duration::from_millis(2)),
                unavailable_after: file
                    .pipeline
                    .unavailable_after
                    .unwrap_or(Duration::from_secs(15)),
            },
            server: ServerConfig {
                max_message_size: file.server.max_message_size.unwrap_or(4 * 1024 * 1024),
                shutdown_timeout: file
                    .server
                    .shutdown_timeout
                    .unwrap_or(Duration::from_secs(10)),
                http2_keepalive_interval: file
                    .server
                    .http2_keepalive_interval
                    .unwrap_or(Duration::from_secs(30)),
                http2_keepalive_timeout: file
                    .server
                    .http2_keepalive_timeout
                    .unwrap_or(Duration::from_secs(20)),
                tcp_keepalive: file.server.tcp_keepalive.unwrap_or(Duration::from_secs(60)),
                max_connections: file.server.max_connections.unwrap_or(16_384),
                max_concurrent_streams: file.server.max_concurrent_streams.unwrap_or(16_384),
                header_read_timeout: file
                    .server
                    .header_read_timeout
                    .unwrap_or(Duration::from_secs(10)),
                body_read_timeout: file
                    .server
                    .body_read_timeout
                    .unwrap_or(Duration::from_secs(30)),
                idle_timeout: file.server.idle_timeout.unwrap_or(Duration::from_secs(120)),
                request_timeout: file
                    .server
                    .request_timeout
                    .unwrap_or(Duration::from_secs(30)),
                max_buffered_request_bytes: file
                    .server
                    .max_buffered_request_bytes
                    .unwrap_or(64 * 1024 * 1024),
            },
            executor: ExecutorConfig {
                lease_ttl: file.executor.lease_ttl.unwrap_or(Duration::from_secs(30)),
                reaper_interval: file
                    .executor
                    .reaper_interval
                    .unwrap_or(Duration::from_secs(1)),
                max_system_retries: file.executor.max_system_retries.unwrap_or(3),
            },
            metrics: MetricsConfig {
                enabled: file.metrics.enabled.unwrap_or(true),
                listen: file.metrics.listen,
            },
            tracing: TracingConfig {
                otlp_endpoint: file.tracing.otlp_endpoint.filter(|e| !e.is_empty()),
                service_name: file
                    .tracing
                    .service_name
                    .unwrap_or_else(|| "actionsd".to_owned()),
                sample_ratio: file.tracing.sample_ratio.unwrap_or(1.0),
                export_timeout: file
                    .tracing
                    .export_timeout
                    .unwrap_or(Duration::from_secs(10)),
            },
            retention: RetentionConfig {
                enabled: file.retention.enabled.unwrap_or(true),
                period: file
                    .retention
                    .period
                    .unwrap_or(Duration::from_secs(30 * 24 * 3600)),
                interval: file.retention.interval.unwrap_or(Duration::from_secs(600)),
                batch_size: file.retention.batch_size.unwrap_or(100),
                batch_pause: file
                    .retention
                    .batch_pause
                    .unwrap_or(Duration::from_millis(10)),
            },
            blobs,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = |setting: &'static str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    setting,
                    message: "must be greater than 0".to_owned(),
                })
            }
        };
        positive("pipeline.workers", self.pipeline.workers > 0)?;
        positive("pipeline.worker_queue", self.pipeline.worker_queue > 0)?;
        positive("pipeline.batch_size", self.pipeline.batch_size > 0)?;
        positive(
            "pipeline.poll_interval",
            !self.pipeline.poll_interval.is_zero(),
        )?;
        positive(
            "database.max_connections",
            self.database.max_connections > 0,
        )?;
        positive(
            "database.acquire_timeout",
            !self.database.acquire_timeout.is_zero(),
        )?;
        positive(
            "database.statement_timeout",
            self.database.statement_timeout >= Duration::from_millis(1),
        )?;
        positive("database.committers", self.database.committers > 0)?;
        positive("database.max_batch", self.database.max_batch > 0)?;
        positive("server.max_message_size", self.server.max_message_size > 0)?;
        positive("server.max_connections", self.server.max_connections > 0)?;
        positive(
            "server.max_concurrent_streams",
            self.server.max_concurrent_streams > 0,
        )?;
        for (setting, value) in [
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.body_read_timeout", self.server.body_read_timeout),
            ("server.idle_timeout", self.server.idle_timeout),
            ("server.request_timeout", self.server.request_timeout),
            ("server.shutdown_timeout", self.server.shutdown_timeout),
        ] {
            positive(setting, !value.is_zero())?;
        }
        if self.server.max_buffered_request_bytes < self.server.max_message_size + 5 {
            return Err(ConfigError::Invalid {
                setting: "server.max_buffered_request_bytes",
                message: "must leave room for one message of server.max_message_size".to_owned(),
            });
        }
        positive("executor.lease_ttl", !self.executor.lease_ttl.is_zero())?;
        positive("retention.period", !self.retention.period.is_zero())?;
        positive("retention.interval", !self.retention.interval.is_zero())?;
        positive("retention.batch_size", self.retention.batch_size > 0)?;
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            return Err(ConfigError::Invalid {
                setting: "tracing.sample_ratio",
                message: "must be between 0.0 and 1.0".to_owned(),
            });
        }
        if let Some(endpoint) = &self.tracing.otlp_endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(ConfigError::Invalid {
                    setting: "tracing.otlp_endpoint",
                    message: "expected http://host:port or https://host:port".to_owned(),
                });
            }
        }
        positive(
            "blobs.max_upload_bytes",
            self.blobs.limits.max_upload_bytes > 0,
        )?;
        positive(
            "blobs.max_url_ttl",
            !self.blobs.limits.max_url_ttl.is_zero(),
        )?;
        positive(
            "logs.max_attempt_bytes",
            self.blobs.limits.max_attempt_log_bytes > 0,
        )?;
        positive(
            "executor.reaper_interval",
            !self.executor.reaper_interval.is_zero(),
        )?;
        Ok(())
    }

    /// Whether callers must authenticate. Always `false` for now: there is
    /// no authentication yet, so a non-loopback listener needs
    /// `dangerously_allow_insecure_public_listener` even with TLS. When
    /// authentication is configured this returns `true`, and TLS plus
    /// authentication is enough for a public listener.
    pub fn auth_enabled(&self) -> bool {
        false
    }

    /// The daemon listens on a non-loopback address (`listen`, or
    /// `metrics.listen`) only with TLS and authentication, or when
    /// `dangerously_allow_insecure_public_listener` says so.
    /// Checked when the daemon is built (not at load: `migrate` listens on
    /// nothing).
    pub fn check_public_listeners(&self) -> Result<(), ConfigError> {
        if self.dangerously_allow_insecure_public_listener {
            return Ok(());
        }
        let missing = match (self.tls.is_some(), self.auth_enabled()) {
            (true, true) => return Ok(()),
            (false, false) => "TLS and authentication",
            (false, true) => "TLS",
            (true, false) => "authentication",
        };
        let metrics = self.metrics.listen.filter(|_| self.metrics.enabled);
        for (setting, address) in [("listen", Some(self.listen)), ("metrics.listen", metrics)] {
            let Some(address) = address else { continue };
            if !address.ip().to_canonical().is_loopback() {
                return Err(ConfigError::InsecurePublicListener {
                    setting,
                    address,
                    missing,
                });
            }
        }
        Ok(())
    }
}

/// The `[tls]` section with `--tls-*` flags over it: none of cert and key
/// means plain HTTP; one without the other is an error.
fn tls_settings(
    file: FileTls,
    o: &Overrides,
) -> Result<Option<crate::tls::TlsSettings>, ConfigError> {
    let cert = o.tls_cert.clone().or(file.cert);
    let key = o.tls_key.clone().or(file.key);
    let client_ca = o.tls_client_ca.clone().or(file.client_ca);
    let (cert, key) = match (cert, key) {
        (Some(cert), Some(key)) => (cert, key),
        (None, None) => {
            if client_ca.is_some() || file.client_auth.is_some() {
                return Err(ConfigError::Invalid {
                    setting: "tls.client_ca",
                    message: "client certificates need TLS: set tls.cert and tls.key too"
                        .to_owned(),
                });
            }
            return Ok(None);
        }
        (Some(_), None) => {
            return Err(ConfigError::Invalid {
                setting: "tls.key",
                message: "tls.cert is set but tls.key is not; give both".to_owned(),
            })
        }
        (None, Some(_)) => {
            return Err(ConfigError::Invalid {
                setting: "tls.cert",
                message: "tls.key is set but tls.cert is not; give both".to_owned(),
            })
        }
    };
    if client_ca.is_none() && file.client_auth.is_some() {
        return Err(ConfigError::Invalid {
            setting: "tls.client_auth",
            message: "needs tls.client_ca, the CA that client certificates must chain to"
                .to_owned(),
        });
    }
    let settings = crate::tls::TlsSettings {
        cert,
        key,
        client_ca,
        client_auth: file.client_auth.unwrap_or(crate::tls::ClientAuth::Required),
        handshake_timeout: file.handshake_timeout.unwrap_or(Duration::from_secs(10)),
        reload_interval: file.reload_interval.unwrap_or(Duration::from_secs(5)),
    };
    for (setting, value) in [
        ("tls.handshake_timeout", settings.handshake_timeout),
        ("tls.reload_interval", settings.reload_interval),
    ] {
        if value.is_zero() {
            return Err(ConfigError::Invalid {
                setting,
                message: "must be greater than 0".to_owned(),
            });
        }
    }
    Ok(Some(settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let file: FileConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:9000"
            database_url = "postgres://file/db"
            [pipeline]
            workers = 4
            poll_interval = "250ms"
            "#,
        )
        .unwrap();
        let overrides = Overrides {
            listen: Some("127.0.0.1:9001".parse().unwrap()),
            ..Overrides::default()
        };
        let config = Config::merge(file, overrides).unwrap();
        assert_eq!(config.listen.port(), 9001);
        assert!(
            matches!(&config.store, StoreLocation::Postgres(url) if url.expose_secret() == "postgres://file/db")
        );
        assert_eq!(config.pipeline.workers, 4);
        assert_eq!(config.pipeline.poll_interval, Duration::from_millis(250));
        assert_eq!(config.pipeline.batch_size, 1000);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<FileConfig>("lissten = \"x\"").is_err());
        let err = Config::with_overrides(Overrides {
            workers: Some(0),
            ..Overrides::default()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid setting pipeline.workers: must be greater than 0"
        );
    }

    #[test]
    fn listen_accepts_host_names() {
        assert_eq!(
            resolve_listen("localhost:8092").unwrap(),
            "127.0.0.1:8092".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            resolve_listen("[::1]:8092").unwrap(),
            "[::1]:8092".parse::<SocketAddr>().unwrap()
        );
        assert!(resolve_listen("localhost").is_err());
        assert!(resolve_listen("localhost:http").is_err());
        assert!(resolve_listen(":8092").is_err());
    }

    #[test]
    fn a_toml_error_is_one_line_with_its_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[database]\nmax_connections = 4\nlissten = \"x\"\n").unwrap();
        let err = Config::load(Some(&path), Overrides::default()).unwrap_err();
        let text = err.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(
            text.starts_with(&format!(
                "invalid config file {}: line 3, column 1: unknown field `lissten`",
                path.display()
            )),
            "{text}"
        );
    }

    #[test]
    fn the_example_config_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/actionsd.toml");
        Config::load(Some(&path), Overrides::default()).unwrap();
    }

    #[test]
    fn blob_stores_are_configured_from_the_file_and_flag() {
        let file: FileConfig = toml::from_str(
            r#"
            [blobs]
            url = "s3://bucket/prefix"
            s3_endpoint = "http://127.0.0.1:9000"
            s3_allow_http = true
            [logs]
            max_attempt_bytes = 1024
            "#,
        )
        .unwrap();
        let config = Config::merge(file, Overrides::default()).unwrap();
        match config.blobs.location {
            Some(crate::blob::BlobLocation::S3(s3)) => {
                assert_eq!(
                    (s3.bucket.as_str(), s3.prefix.as_str()),
                    ("bucket", "prefix")
                );
                assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
                assert!(s3.allow_http);
            }
            other => panic!("expected S3, got {other:?}"),
        }
        assert_eq!(config.blobs.limits.max_attempt_log_bytes, 1024);
        let err = Config::with_overrides(Overrides {
            blob_url: Some("relative/dir".into()),
            ..Overrides::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().starts_with("invalid setting blobs.url:"),
            "{err}"
        );
    }

    #[test]
    fn database_urls_choose_the_backend() {
        let location = |url: &str| {
            Config::with_overrides(Overrides {
                database_url: Some(SecretString::from(url)),
                ..Overrides::default()
            })
            .map(|c| c.store)
        };
        assert!(matches!(
            location("postgresql://h/db"),
            Ok(StoreLocation::Postgres(_))
        ));
        assert!(
            matches!(location("sqlite:///var/lib/a.db"), Ok(StoreLocation::Sqlite(p)) if p == Path::new("/var/lib/a.db"))
        );
        assert!(
            matches!(location("sqlite:rel.db?mode=rwc"), Ok(StoreLocation::Sqlite(p)) if p == Path::new("rel.db"))
        );
        assert!(location("mysql://h/db").is_err());
        assert!(location("sqlite://").is_err());
        // No URL at all: the per-user SQLite file.
        let config = Config::with_overrides(Overrides::default()).unwrap();
        assert!(
            matches!(config.store, StoreLocation::Sqlite(p) if p.ends_with("actionsd/actionsd.db"))
        );
    }

    /// A database_url line that does not parse is reported by position,
    /// never echoed: the password in it stays out of the error.
    #[test]
    fn a_config_file_that_fails_to_parse_never_echoes_the_database_url() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("actionsd.toml");
        for text in [
            // An unterminated string.
            "listen = \"127.0.0.1:8091\"\ndatabase_url = \"postgres://u:hunter2@db/actionsd\n",
            // An unquoted URL.
            "database_url = postgres://u:hunter2@db/actionsd\n",
            // A URL where a number belongs.
            "[database]\nmax_connections = \"postgres://u:hunter2@db/actionsd\"\n",
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Config::load(Some(&path), Overrides::default()).unwrap_err();
            let shown = format!("{err} {err:?} {err:#}");
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("line "), "{shown}");
        }
        // Other errors keep the parser's message.
        std::fs::write(&path, "[server]\nmax_message_size = \"big\"\n").unwrap();
        let err = Config::load(Some(&path), Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(err.to_string().contains("invalid type"), "{err}");
    }

    #[test]
    fn a_public_listener_needs_tls_and_auth_or_the_flag() {
        let public = |allow: bool, tls: bool| {
            Config::with_overrides(Overrides {
                listen: Some("0.0.0.0:8091".parse().unwrap()),
                tls_cert: tls.then(|| "cert.pem".into()),
                tls_key: tls.then(|| "key.pem".into()),
                dangerously_allow_insecure_public_listener: allow,
                ..Overrides::default()
            })
            .unwrap()
            .check_public_listeners()
        };
        let err = public(false, false).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "refusing to listen on 0.0.0.0:8091 (listen) without TLS and authentication"
            ),
            "{err}"
        );
        // TLS alone is not enough while there is no authentication.
        let err = public(false, true).unwrap_err();
        assert!(err.to_string().contains("without authentication"), "{err}");
        assert!(public(true, false).is_ok());
        for loopback in ["127.0.0.1:8091", "[::1]:8091", "[::ffff:127.0.0.1]:8091"] {
            let config = Config::with_overrides(Overrides {
                listen: Some(loopback.parse().unwrap()),
                ..Overrides::default()
            })
            .unwrap();
            assert!(config.check_public_listeners().is_ok(), "{loopback}");
        }
        let file: FileConfig = toml::from_str(
            "dangerously_allow_insecure_public_listener = true\nlisten = \"0.0.0.0:1\"\n",
        )
        .unwrap();
        let config = Config::merge(file, Overrides::default()).unwrap();
        assert!(config.check_public_listeners().is_ok());
        // A public metrics listener counts too.
        let file: FileConfig = toml::from_str("[metrics]\nlisten = \"0.0.0.0:9091\"\n").unwrap();
        let err = Config::merge(file, Overrides::default())
            .unwrap()
            .check_public_listeners()
            .unwrap_err();
        assert!(err.to_string().contains("(metrics.listen)"), "{err}");
    }

    #[test]
    fn tls_needs_both_cert_and_key() {
        let file: FileConfig = toml::from_str(
            "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nclient_ca = \"ca.pem\"\nclient_auth = \"optional\"\n",
        )
        .unwrap();
        let tls = Config::merge(file, Overrides::default())
            .unwrap()
            .tls
            .unwrap();
        assert_eq!(tls.client_auth, crate::tls::ClientAuth::Optional);
        assert_eq!(tls.handshake_timeout, Duration::from_secs(10));
        let file: FileConfig = toml::from_str("[tls]\ncert = \"c.pem\"\n").unwrap();
        let err = Config::merge(file, Overrides::default()).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid setting tls.key"),
            "{err}"
        );
        let file: FileConfig = toml::from_str("[tls]\nclient_ca = \"ca.pem\"\n").unwrap();
        assert!(Config::merge(file, Overrides::default()).is_err());
    }

    #[test]
    fn database_url_is_redacted_in_debug_output() {
        let config = Config::with_overrides(Overrides {
            database_url: Some(SecretString::from("postgres://user:hunter2@host/db")),
            ..Overrides::default()
        })
        .unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
