//! Test harness: a real daemon on an ephemeral port over a fresh database
//! (from `#[sqlx::test]`), and builders for flyteidl2 requests.

#![allow(dead_code)]

pub mod faultproxy;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Once;
use std::time::Duration;

use actionsd::app::Application;
use actionsd::config::{Config, Overrides};
use actionsd::proto::actionsd::executor::v1::executor_service_client::ExecutorServiceClient;
use actionsd::proto::flyteidl2::actions::actions_service_client::ActionsServiceClient;
use actionsd::proto::flyteidl2::actions::{
    action, watch_for_updates_request, watch_for_updates_response, AbortRequest, Action,
    EnqueueRequest, SignalRequest, UpdateRequest, WatchForUpdatesRequest,
};
use actionsd::proto::flyteidl2::common::{ActionIdentifier, RunIdentifier};
use actionsd::proto::flyteidl2::core::{self, literal, primitive, scalar};
use actionsd::proto::flyteidl2::task::{OutputReferences, TaskIdentifier};
use actionsd::proto::flyteidl2::workflow::{
    ActionStatus, ActionUpdate, ConditionAction, TaskAction, TraceAction,
};
use secrecy::SecretString;
use sqlx::ConnectOptions;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Streaming;

pub use actionsd::proto::flyteidl2::actions::WatchForUpdatesResponse;

/// Every wait in a test is bounded by this.
pub const TIMEOUT: Duration = Duration::from_secs(30);

pub const QUEUED: i32 = 1;
pub const INITIALIZING: i32 = 3;
pub const RUNNING: i32 = 4;
pub const SUCCEEDED: i32 = 5;
pub const FAILED: i32 = 6;
pub const ABORTED: i32 = 7;
pub const PAUSED: i32 = 9;

pub type Client = ActionsServiceClient<Channel>;
pub type ExecutorClient = ExecutorServiceClient<Channel>;

/// Logs go to the test output only when TEST_LOG is set.
pub fn init_logging() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "actionsd=debug,info".into()),
                )
                .with_test_writer()
                .init();
        }
    });
}

/// A connection to the server's maintenance database, outside the test's.
pub async fn admin(pool: &PgPool) -> sqlx::PgConnection {
    pool.connect_options()
        .as_ref()
        .clone()
        .database("postgres")
        .connect()
        .await
        .unwrap()
}

/// Takes the test's own Postgres database away from every client (new
/// connections refused, open ones terminated), or gives it back.
pub async fn set_database_reachable(pool: &PgPool, reachable: bool) {
    let database = pool.connect_options().get_database().unwrap().to_owned();
    let mut admin = admin(pool).await;
    sqlx::query(&format!(
        "ALTER DATABASE \"{database}\" WITH ALLOW_CONNECTIONS {reachable}"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    if !reachable {
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(&database)
            .execute(&mut admin)
            .await
            .unwrap();
    }
}

/// The URL of the test's own database.
pub fn database_url(pool: &PgPool) -> String {
    pool.connect_options().to_url_lossy().to_string()
}

/// A fresh, empty database of either backend, owned by one test.
pub enum TestDb {
    /// A database created by `#[sqlx::test]` on the server of DATABASE_URL.
    Postgres(PgPool),
    /// A file in a temporary directory, removed with the test.
    Sqlite {
        dir: tempfile::TempDir,
        pool: sqlx::SqlitePool,
    },
}

impl TestDb {
    pub fn postgres(pool: PgPool) -> Self {
        Self::Postgres(pool)
    }

    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Connected lazily: the daemon creates and migrates the file.
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(2)
            .connect_lazy_with(
                sqlx::sqlite::SqliteConnectOptions::new().filename(dir.path().join("actionsd.db")),
            );
        Self::Sqlite { dir, pool }
    }

    pub fn url(&self) -> String {
        match self {
            Self::Postgres(pool) => database_url(pool),
            Self::Sqlite { dir, .. } => {
                format!("sqlite://{}", dir.path().join("actionsd.db").display())
            }
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }
}

/// Runs a query that reads the same on both backends and returns its rows.
#[macro_export]
macro_rules! rows {
    ($db:expr, $row:ty, $sql:expr) => {
        match &$db {
            $crate::common::TestDb::Postgres(pool) => sqlx::query_as::<_, $row>($sql)
                .fetch_all(pool)
                .await
                .unwrap(),
            $crate::common::TestDb::Sqlite { pool, .. } => sqlx::query_as::<_, $row>($sql)
                .fetch_all(pool)
                .await
                .unwrap(),
        }
    };
}

/// Runs each named `async fn(TestDb)` on both backends: `NAME::postgres`
/// on a fresh Postgres database (ignored, never passed, without
/// DATABASE_URL) and `NAME::sqlite` on a fresh SQLite file.
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[sqlx::test(migrations = "migrations/postgres")]
                #[cfg_attr(not(actionsd_postgres), ignore = "the Postgres suite needs DATABASE_URL")]
                async fn postgres(pool: sqlx::PgPool) {
                    super::$name($crate::common::TestDb::postgres(pool)).await;
                }

                #[tokio::test]
                async fn sqlite() {
                    super::$name($crate::common::TestDb::sqlite()).await;
                }
            }
        )*
    };
}

/// A daemon on its own runtime, so that `kill` can drop every task at once
/// the way a crash would.
pub struct Daemon {
    pub addr: SocketAddr,
    /// The `/metrics` admin listener, when configured.
    pub admin_addr: Option<SocketAddr>,
    token: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    runtime: Option<tokio::runtime::Runtime>,
    /// The blob store, unless the test chose one.
    _blobs: tempfile::TempDir,
}

impl Daemon {
    pub async fn start(db: &TestDb) -> Self {
        Self::start_url(&db.url()).await
    }

    /// A daemon whose configuration `configure` adjusts first.
    pub async fn start_with(db: &TestDb, configure: impl FnOnce(&mut Config)) -> Self {
        Self::start_configured(&db.url(), configure).await
    }

    pub async fn start_url(url: &str) -> Self {
        Self::start_configured(url, |_| {}).await
    }

    /// A daemon on the database at `url`, its configuration adjusted first.
    pub async fn start_url_with(url: &str, configure: impl FnOnce(&mut Config)) -> Self {
        Self::start_configured(url, configure).await
    }

    async fn start_configured(url: &str, configure: impl FnOnce(&mut Config)) -> Self {
        init_logging();
        let mut config = Config::with_overrides(Overrides {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            database_url: Some(SecretString::from(url.to_owned())),
            workers: Some(4),
            ..Overrides::default()
        })
        .unwrap();
        config.database.max_connections = 8;
        config.database.acquire_timeout = Duration::from_secs(2);
        config.server.shutdown_timeout = Duration::from_secs(5);
        let blobs = tempfile::tempdir().unwrap();
        config.blobs.location = Some(actionsd::blob::BlobLocation::Local(blobs.path().into()));
        configure(&mut config);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let app = runtime
            .spawn(Application::build(config))
            .await
            .unwrap()
            .expect("daemon builds");
        let addr = app.local_addr();
        let admin_addr = app.admin_addr();
        let token = app.shutdown_token();
        let handle = runtime.spawn(app.run());
        Self {
            addr,
            admin_addr,
            token,
            handle: Some(handle),
            runtime: Some(runtime),
            _blobs: blobs,
        }
    }

    pub async fn client(&self) -> Client {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connects");
        ActionsServiceClient::new(channel)
    }

    pub async fn executor_client(&self) -> ExecutorClient {
        ExecutorServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connects")
    }

    /// A client whose HTTP/2 receive windows are `bytes` large.
    pub async fn client_with_window(&self, bytes: u32) -> Client {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .initial_stream_window_size(Some(bytes))
            .initial_connection_window_size(Some(bytes))
            .connect()
            .await
            .expect("connects");
        ActionsServiceClient::new(channel)
    }

    /// Graceful shutdown, as on SIGTERM.
    pub async fn stop(mut self) {
        self.token.cancel();
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(TIMEOUT, handle)
            .await
            .expect("daemon stops in time")
            .expect("daemon task")
            .expect("daemon run");
    }

    /// Ends the daemon abruptly, as a crash would: no draining, every task
    /// cancelled where it stands and every connection dropped. Returns once
    /// everything is dropped (a dead process holds no file locks either).
    pub async fn kill(mut self) {
        if let Some(runtime) = self.runtime.take() {
            tokio::task::spawn_blocking(move || runtime.shutdown_timeout(TIMEOUT))
                .await
                .unwrap();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

pub fn run_id(run: &str) -> RunIdentifier {
    RunIdentifier {
        org: String::new(),
        project: "flytesnacks".into(),
        domain: "development".into(),
        name: run.into(),
    }
}

pub fn aid(run: &str, name: &str) -> ActionIdentifier {
    ActionIdentifier {
        run: Some(run_id(run)),
        name: name.into(),
    }
}

fn base_action(run: &str, name: &str, parent: Option<&str>, spec: action::Spec) -> Action {
    Action {
        action_id: Some(aid(run, name)),
        parent_action_name: parent.map(str::to_owned),
        input_uri: format!("s3://bucket/{run}/{name}/inputs.pb"),
        run_output_base: format!("s3://bucket/{run}"),
        group: String::new(),
        subject: String::new(),
        spec: Some(spec),
        recovered_from: None,
    }
}

pub fn task_spec(name: &str) -> action::Spec {
    action::Spec::Task(TaskAction {
        id: Some(TaskIdentifier {
            org: String::new(),
            project: "flytesnacks".into(),
            domain: "development".into(),
            name: format!("tasks.{name}"),
            version: "v1".into(),
        }),
        // An encoded flyteidl2.task.TaskSpec {task_template: {type:
        // "python-task"}, short_name: "hello"}, opaque to actionsd.
        spec: bytes::Bytes::from_static(b"\n\r\x12\x0bpython-task\x1a\x05hello"),
        cache_key: None,
        queue: String::new(),
    })
}

pub fn task(run: &str, name: &str, parent: Option<&str>) -> EnqueueRequest {
    EnqueueRequest {
        action: Some(base_action(run, name, parent, task_spec(name))),
        run_spec: bytes::Bytes::new(),
    }
}

pub fn trace(run: &str, name: &str, parent: &str, phase: i32, output_uri: &str) -> EnqueueRequest {
    let spec = action::Spec::Trace(TraceAction {
        name: name.into(),
        phase,
        start_time: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        end_time: None,
        outputs: Some(OutputReferences {
            output_uri: output_uri.into(),
            report_uri: String::new(),
        }),
        spec: bytes::Bytes::from_static(b"\x0a\x02hi"),
    });
    EnqueueRequest {
        action: Some(base_action(run, name, Some(parent), spec)),
        run_spec: bytes::Bytes::new(),
    }
}

pub fn condition(run: &str, name: &str, parent: &str, simple: core::SimpleType) -> EnqueueRequest {
    let spec = action::Spec::Condition(ConditionAction {
        name: name.into(),
        r#type: Some(core::LiteralType {
            r#type: Some(core::literal_type::Type::Simple(simple as i32)),
            ..Default::default()
        }),
        prompt: "Proceed?".into(),
        description: "approval gate".into(),
        prompt_type: 1,
        timeout: None,
        webhook: bytes::Bytes::new(),
    });
    EnqueueRequest {
        action: Some(base_action(run, name, Some(parent), spec)),
        run_spec: bytes::Bytes::new(),
    }
}

pub fn status_update(run: &str, name: &str, attempt: u32, phase: i32) -> UpdateRequest {
    UpdateRequest {
        address: None,
        action_id: Some(aid(run, name)),
        attempt,
        status: Some(ActionStatus {
            phase,
            start_time: None,
            end_time: None,
            attempts: attempt,
            cache_status: 0,
            duration_ms: None,
        }),
    }
}

pub fn abort(run: &str, name: &str, reason: &str) -> AbortRequest {
    AbortRequest {
        action_id: Some(aid(run, name)),
        reason: Some(reason.into()),
        aborted_by: None,
    }
}

pub fn primitive_literal(value: primitive::Value) -> core::Literal {
    core::Literal {
        value: Some(literal::Value::Scalar(core::Scalar {
            value: Some(scalar::Value::Primitive(core::Primitive {
                value: Some(value),
            })),
        })),
        ..Default::default()
    }
}

pub fn signal(run: &str, name: &str, parent: &str, value: primitive::Value) -> SignalRequest {
    SignalRequest {
        action_id: Some(aid(run, name)),
        parent_action_name: parent.into(),
        value: Some(primitive_literal(value)),
        signalled_by: None,
    }
}

pub fn watch_request(run: &str, parent: &str) -> WatchForUpdatesRequest {
    WatchForUpdatesRequest {
        filter: Some(watch_for_updates_request::Filter::ParentActionId(aid(
            run, parent,
        ))),
    }
}

/// What one stream message was.
#[derive(Debug)]
pub enum Msg {
    Update(Box<ActionUpdate>),
    Sentinel,
}

pub fn classify(response: WatchForUpdatesResponse) -> Msg {
    match response.message {
        Some(watch_for_updates_response::Message::ActionUpdate(update)) => {
            Msg::Update(Box::new(update))
        }
        Some(watch_for_updates_response::Message::ControlMessage(c)) if c.sentinel => Msg::Sentinel,
        other => panic!("unexpected stream message {other:?}"),
    }
}

/// A WatchForUpdates stream with its per-action view.
pub struct Watcher {
    pub stream: Streaming<WatchForUpdatesResponse>,
    /// Latest phase per action name.
    pub phases: HashMap<String, i32>,
    /// Every update received, in order.
    pub updates: Vec<ActionUpdate>,
}

impl Watcher {
    /// Opens the stream and reads the snapshot up to the sentinel.
    pub async fn open(client: &mut Client, run: &str, parent: &str) -> Self {
        let stream = client
            .watch_for_updates(watch_request(run, parent))
            .await
            .expect("watch opens")
            .into_inner();
        let mut watcher = Self {
            stream,
            phases: HashMap::new(),
            updates: Vec::new(),
        };
        loop {
            match watcher.next().await {
                Msg::Sentinel => break,
                Msg::Update(_) => {}
            }
        }
        watcher
    }

    /// The next message; records updates.
    pub async fn next(&mut self) -> Msg {
        let message = tokio::time::timeout(TIMEOUT, self.stream.message())
            .await
            .expect("stream message in time")
            .expect("stream ok")
            .expect("stream not ended");
        let message = classify(message);
        if let Msg::Update(update) = &message {
            let name = update.action_id.as_ref().unwrap().name.clone();
            self.phases.insert(name, update.phase);
            self.updates.push(update.as_ref().clone());
        }
        message
    }

    /// Reads until `done` holds for the latest phases.
    pub async fn until(&mut self, mut done: impl FnMut(&HashMap<String, i32>) -> bool) {
        while !done(&self.phases) {
            if let Msg::Sentinel = self.next().await {
                panic!("a second sentinel on one stream");
            }
        }
    }

    /// Reads until `name` is in `phase`.
    pub async fn until_phase(&mut self, name: &str, phase: i32) -> ActionUpdate {
        self.until(|p| p.get(name) == Some(&phase)).await;
        self.updates
            .iter()
            .rev()
            .find(|u| u.action_id.as_ref().unwrap().name == name)
            .cloned()
            .unwrap()
    }
}

/// The updates of a snapshot (everything before the sentinel).
pub async fn snapshot(client: &mut Client, run: &str, parent: &str) -> Vec<ActionUpdate> {
    let mut stream = client
        .watch_for_updates(watch_request(run, parent))
        .await
        .expect("watch opens")
        .into_inner();
    let mut updates = Vec::new();
    loop {
        let message = tokio::time::timeout(TIMEOUT, stream.message())
            .await
            .expect("snapshot in time")
            .expect("stream ok")
            .expect("stream not ended");
        match classify(message) {
            Msg::Update(update) => updates.push(*update),
            Msg::Sentinel => return updates,
        }
    }
}

/// Phase per action name in a snapshot.
pub async fn phases(client: &mut Client, run: &str, parent: &str) -> HashMap<String, i32> {
    snapshot(client, run, parent)
        .await
        .into_iter()
        .map(|u| (u.action_id.unwrap().name, u.phase))
        .collect()
}

/// Rank of a phase in the forward order; terminal phases rank highest.
pub fn rank(phase: i32) -> u8 {
    match phase {
        1 => 1,
        2 => 2,
        3 => 3,
        4 | 9 => 4,
        5..=8 | 10 => 5,
        other => panic!("unexpected phase {other}"),
    }
}

/// Asserts the status code of a failed call and returns its message.
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
) -> String {
    match result {
        Ok(value) => panic!("expected {code:?}, got Ok({value:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "unexpected status: {status:?}");
            status.message().to_owned()
        }
    }
}
