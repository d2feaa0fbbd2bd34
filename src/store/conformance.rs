//! The store conformance suite: every test runs against both backends
//! through the [`Store`] trait (`NAME::postgres` on a fresh Postgres
//! database, ignored without DATABASE_URL; `NAME::sqlite` on a fresh
//! file). What only one backend has (the SQLite file lock, the Postgres
//! feed horizon) is tested in that backend's module.

#![cfg(test)]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;

use super::postgres::{PgStore, PoolSettings};
use super::sqlite::{SqliteSettings, SqliteStore};
use super::{FeedCursor, Store};
use crate::domain::{
    AbortAction, ActionId, ActionKind, Cancellation, ClaimRequest, Command, EnqueueAction, Error,
    Event, FinishAction, Lease, Phase, ReapOutcome, ReapSettings, RunId, RunSettings, SignalAction,
    SignalValue, SimpleKind, UpdateStatus,
};
use crate::proto::flyteidl2::actions;

/// A fresh store of either backend, with the raw SQL a test needs to set
/// up or inspect what the trait does not show.
pub(crate) struct Db {
    pub store: Arc<dyn Store>,
    backend: Backend,
}

enum Backend {
    Postgres(sqlx::PgPool),
    Sqlite {
        pool: sqlx::SqlitePool,
        _dir: tempfile::TempDir,
    },
}

/// Runs one statement on either backend; `$1`-style parameters read the
/// same on both.
macro_rules! on_both {
    ($db:expr, |$q:ident| $body:expr, $pg:expr, $lite:expr) => {
        match &$db.backend {
            Backend::Postgres(pool) => {
                let $q = $pg;
                $body.fetch_all(pool).await.unwrap()
            }
            Backend::Sqlite { pool, .. } => {
                let $q = $lite;
                $body.fetch_all(pool).await.unwrap()
            }
        }
    };
}

/// (phase, attempt, lease_holder, lease_deadline, end_time, version).
type LeaseRow = (i64, i64, Option<String>, Option<i64>, Option<i64>, i64);

impl Db {
    pub async fn postgres(pool: sqlx::PgPool) -> Self {
        let store = PgStore::connect(
            pool.connect_options().as_ref().clone(),
            &PoolSettings {
                max_connections: 8,
                acquire_timeout: Duration::from_secs(5),
                statement_timeout: Duration::from_secs(30),
            },
        );
        Self {
            store: Arc::new(store),
            backend: Backend::Postgres(pool),
        }
    }

    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(
            &dir.path().join("actionsd.db"),
            &SqliteSettings {
                busy_timeout: Duration::from_secs(2),
                ..SqliteSettings::default()
            },
        )
        .await
        .expect("open");
        let pool = store.pool().clone();
        Self {
            store: Arc::new(store),
            backend: Backend::Sqlite { pool, _dir: dir },
        }
    }

    /// (phase, attempt, lease_holder, lease_deadline, end_time, version) of
    /// an action of run r1; times in microseconds since the Unix epoch.
    async fn lease_row(&self, name: &str) -> LeaseRow {
        let rows: Vec<LeaseRow> = on_both!(
            self,
            |sql| sqlx::query_as(sql).bind(name),
            "SELECT phase::int8, attempt, lease_holder, \
               (extract(epoch FROM lease_deadline) * 1000000)::int8, \
               (extract(epoch FROM end_time) * 1000000)::int8, version FROM actions \
             WHERE run_name = 'r1' AND name = $1",
            "SELECT phase, attempt, lease_holder, lease_deadline, end_time, version FROM actions \
             WHERE run_name = 'r1' AND name = $1"
        );
        rows.into_iter().next().expect("the action exists")
    }

    /// Moves the live lease of r1's `name` an hour into the past.
    async fn expire_lease(&self, name: &str) {
        let _: Vec<(i64,)> = on_both!(
            self,
            |sql| sqlx::query_as(sql).bind(name),
            "UPDATE actions SET lease_deadline = lease_deadline - interval '1 hour' \
             WHERE run_name = 'r1' AND name = $1 AND lease_deadline IS NOT NULL RETURNING 1::int8",
            "UPDATE actions SET lease_deadline = lease_deadline - 3600000000 \
             WHERE run_name = 'r1' AND name = $1 AND lease_deadline IS NOT NULL RETURNING 1"
        );
    }

    /// Sets when `name` was created, in microseconds since the Unix epoch.
    async fn set_created_at(&self, name: &str, micros: i64) {
        let _: Vec<(i64,)> = on_both!(
            self,
            |sql| sqlx::query_as(sql).bind(micros).bind(name),
            "UPDATE actions SET created_at = to_timestamp($1 / 1000000.0) WHERE name = $2 RETURNING 1::int8",
            "UPDATE actions SET created_at = $1 WHERE name = $2 RETURNING 1"
        );
    }

    /// Moves the deadline of condition `name` a second into the past.
    async fn expire_condition(&self, name: &str) {
        let _: Vec<(i64,)> = on_both!(
            self,
            |sql| sqlx::query_as(sql).bind(name),
            "UPDATE actions SET deadline = now() - interval '1 second' WHERE name = $1 RETURNING 1::int8",
            "UPDATE actions SET deadline = CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER) - 1000000 \
             WHERE name = $1 RETURNING 1"
        );
    }

    /// Every action's (name, queue, deadline in microseconds), by name.
    async fn queues_and_deadlines(&self) -> Vec<(String, Option<String>, Option<i64>)> {
        on_both!(
            self,
            |sql| sqlx::query_as(sql),
            "SELECT name, queue, (extract(epoch FROM deadline) * 1000000)::int8 FROM actions ORDER BY name",
            "SELECT name, queue, deadline FROM actions ORDER BY name"
        )
    }

    async fn abort_info(&self, name: &str) -> (String, Vec<u8>) {
        let rows: Vec<(String, Vec<u8>)> = on_both!(
            self,
            |sql| sqlx::query_as(sql).bind(name),
            "SELECT abort_reason, aborted_by FROM actions WHERE name = $1",
            "SELECT abort_reason, aborted_by FROM actions WHERE name = $1"
        );
        rows.into_iter().next().expect("the action exists")
    }

    async fn error_of(&self, name: &str) -> Vec<u8> {
        let rows: Vec<(Vec<u8>,)> = on_both!(
            self,
            |sql| sqlx::query_as(sql).bind(name),
            "SELECT error FROM actions WHERE name = $1",
            "SELECT error FROM actions WHERE name = $1"
        );
        rows.into_iter().next().expect("the action exists").0
    }

    /// Names of the queued actions, sorted.
    async fn queued_names(&self) -> Vec<String> {
        let rows: Vec<(String,)> = on_both!(
            self,
            |sql| sqlx::query_as(sql).bind(Phase::Queued),
            "SELECT name FROM actions WHERE phase = $1 ORDER BY name",
            "SELECT name FROM actions WHERE phase = $1 ORDER BY name"
        );
        rows.into_iter().map(|(name,)| name).collect()
    }
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Every event after `from`, read in pages of `page`, numbered from 1.
/// Waits (boundedly) while the feed reports committed events it cannot
/// read yet (on Postgres, transactions of other tests still running).
async fn read_all(store: &dyn Store, from: FeedCursor, page: usize) -> Vec<(i64, Event)> {
    let mut cursor = from;
    let mut all: Vec<Event> = Vec::new();
    for _ in 0..400 {
        let batch = store.read_feed(cursor, page).await.expect("read_feed");
        assert!(batch.events.len() <= page);
        all.extend(batch.events);
        cursor = batch.cursor;
        if !batch.more && !batch.pending {
            return (1..).zip(all).collect();
        }
        if !batch.more {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    panic!("the feed did not settle");
}

/// A cursor after every event committed so far, each read: unlike
/// `feed_start` (which on Postgres may stop before events of transactions
/// that were running), reading on from it yields only later events.
async fn feed_mark(store: &dyn Store) -> FeedCursor {
    let mut cursor = FeedCursor::default();
    for _ in 0..400 {
        let batch = store.read_feed(cursor, 1000).await.expect("read_feed");
        cursor = batch.cursor;
        if !batch.more && !batch.pending {
            return cursor;
        }
        if !batch.more {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    panic!("the feed did not settle");
}

/// The cursor after every event from `from`.
async fn read_end(store: &dyn Store, from: FeedCursor) -> FeedCursor {
    let mut cursor = from;
    loop {
        let batch = store.read_feed(cursor, 100).await.expect("read_feed");
        cursor = batch.cursor;
        if !batch.more {
            return cursor;
        }
    }
}

pub(crate) fn run_id() -> RunId {
    RunId {
        org: String::new(),
        project: "p".to_owned(),
        domain: "d".to_owned(),
        name: "r1".to_owned(),
    }
}

pub(crate) fn id(name: &str) -> ActionId {
    ActionId::new(run_id(), name)
}

/// A valid encoded Action; `input_uri` makes contents differ.
pub(crate) fn spec(name: &str, input_uri: &str) -> Bytes {
    Bytes::from(
        actions::Action {
            input_uri: input_uri.to_owned(),
            run_output_base: format!("s3://b/{name}"),
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

pub(crate) fn task(name: &str, parent: Option<&str>) -> EnqueueAction {
    EnqueueAction {
        by: None,
        id: id(name),
        parent: parent.map(str::to_owned),
        kind: ActionKind::Task,
        spec: spec(name, "s3://b/in"),
        run: parent.is_none().then(|| RunSettings {
            run_spec: Bytes::new(),
            queue: Some("gpu".to_owned()),
            max_action_concurrency: 0,
        }),
        task_queue: None,
        phase: Phase::Queued,
        output_uri: String::new(),
        run_output_base: "s3://b/r1/".to_owned(),
        condition_type: None,
        condition_timeout: None,
    }
}

fn condition(name: &str, parent: &str) -> EnqueueAction {
    EnqueueAction {
        by: None,
        kind: ActionKind::Condition,
        phase: Phase::Paused,
        condition_type: Some(SimpleKind::Boolean as i32),
        condition_timeout: Some(Duration::from_secs(60)),
        ..task(name, Some(parent))
    }
}

pub(crate) fn update(name: &str, attempt: u32, phase: Phase) -> Command {
    Command::Update(UpdateStatus {
        by: None,
        id: id(name),
        attempt,
        phase,
        start_time: None,
        end_time: None,
        address: None,
    })
}

fn signal(name: &str, parent: &str, literal: &'static [u8]) -> Command {
    Command::Signal(SignalAction {
        by: None,
        id: id(name),
        parent: parent.to_owned(),
        value: SignalValue {
            kind: SimpleKind::Boolean,
            literal: Bytes::from_static(literal),
        },
        signalled_by: None,
    })
}

fn abort(name: &str) -> Command {
    Command::Abort(AbortAction {
        by: None,
        id: id(name),
        reason: "stop".to_owned(),
        aborted_by: Some(Bytes::from_static(b"who")),
        error: Bytes::from_static(b"aborted-error"),
    })
}

fn in_run(action: EnqueueAction, run: &str) -> EnqueueAction {
    let run_id = RunId {
        name: run.to_owned(),
        ..run_id()
    };
    EnqueueAction {
        by: None,
        id: ActionId::new(run_id, action.id.name.clone()),
        run_output_base: format!("s3://b/{run}/"),
        ..action
    }
}

fn claim_request(executor: &str, capacity: u32) -> ClaimRequest {
    ClaimRequest {
        executor: executor.to_owned(),
        queue: "gpu".to_owned(),
        capacity,
        max_leases: 0,
        lease_ttl: Duration::from_secs(60),
    }
}

fn finish(
    name: &str,
    executor: &str,
    attempt: u32,
    phase: Phase,
    output_uri: Option<&str>,
) -> Command {
    Command::Finish(FinishAction {
        by: None,
        id: id(name),
        executor: executor.to_owned(),
        attempt,
        phase,
        output_uri: output_uri.map(str::to_owned),
        error: None,
        retry: false,
    })
}

fn reap_settings(max_system_retries: u32) -> ReapSettings {
    ReapSettings {
        max_system_retries,
        lease_error: Bytes::from_static(b"lease-error"),
        timeout_error: Bytes::from_static(b"timeout-error"),
    }
}

async fn enqueue_all(store: &dyn Store, actions: Vec<EnqueueAction>) {
    for action in actions {
        assert_eq!(store.execute(Command::Enqueue(action)).await.unwrap(), 1);
    }
}

fn names(leases: &[Lease]) -> Vec<(&str, &str)> {
    leases
        .iter()
        .map(|l| (l.id.run.name.as_str(), l.id.name.as_str()))
        .collect()
}

async fn commands_round_trip_and_the_feed_returns_every_event_once_in_order(db: Db) {
    let store = db.store.clone();
    let start = feed_mark(&*store).await;

    // Enqueue: root, idempotent repeat, conflicting content, second root.
    assert_eq!(
        store
            .execute(Command::Enqueue(task("a0", None)))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .execute(Command::Enqueue(task("a0", None)))
            .await
            .unwrap(),
        0
    );
    let changed = EnqueueAction {
        by: None,
        spec: spec("a0", "s3://b/other"),
        ..task("a0", None)
    };
    let err = store.execute(Command::Enqueue(changed)).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err:?}");
    let err = store
        .execute(Command::Enqueue(task("b0", None)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::AlreadyExists(m) if m.contains("'a0'")),
        "{err:?}"
    );

    // Children: missing parent, a task inheriting the run's queue, a
    // task with its own queue, a condition with a deadline, a grandchild.
    let err = store
        .execute(Command::Enqueue(task("c9", Some("nope"))))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ParentNotFound(_)), "{err:?}");
    assert_eq!(
        store
            .execute(Command::Enqueue(task("c1", Some("a0"))))
            .await
            .unwrap(),
        1
    );
    let own_queue = EnqueueAction {
        by: None,
        task_queue: Some("cpu".to_owned()),
        ..task("c2", Some("a0"))
    };
    assert_eq!(store.execute(Command::Enqueue(own_queue)).await.unwrap(), 1);
    assert_eq!(
        store
            .execute(Command::Enqueue(condition("k1", "a0")))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .execute(Command::Enqueue(task("g1", Some("c1"))))
            .await
            .unwrap(),
        1
    );
    let queues = db.queues_and_deadlines().await;
    let now = now_micros();
    for (name, queue, deadline) in &queues {
        match name.as_str() {
            "a0" | "c1" | "g1" => assert_eq!(queue.as_deref(), Some("gpu"), "{name}"),
            "c2" => assert_eq!(queue.as_deref(), Some("cpu")),
            "k1" => {
                assert_eq!(queue, &None);
                let deadline = deadline.expect("a condition with a timeout has a deadline");
                assert!(deadline > now + 50_000_000 && deadline <= now + 60_000_000);
            }
            other => panic!("unexpected action {other}"),
        }
    }

    // Update: forward, repeat, backwards, stale.
    assert_eq!(
        store
            .execute(update("c1", 1, Phase::Running))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .execute(update("c1", 1, Phase::Running))
            .await
            .unwrap(),
        0
    );
    let err = store
        .execute(update("c1", 1, Phase::Queued))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    assert_eq!(
        store
            .execute(update("c2", 1, Phase::Succeeded))
            .await
            .unwrap(),
        1
    );
    let err = store
        .execute(update("zz", 1, Phase::Running))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ActionNotFound(_)), "{err:?}");

    // Signal: resolve, repeat, different value.
    assert_eq!(store.execute(signal("k1", "a0", b"yes")).await.unwrap(), 1);
    assert_eq!(store.execute(signal("k1", "a0", b"yes")).await.unwrap(), 0);
    let err = store.execute(signal("k1", "a0", b"no")).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");

    // Abort the root: a0, c1 and g1 are aborted; c2 and k1 are terminal.
    assert_eq!(store.execute(abort("a0")).await.unwrap(), 3);
    let err = store.execute(abort("a0")).await.unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    let err = store
        .execute(Command::Enqueue(task("c3", Some("a0"))))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ParentTerminal {
                phase: Phase::Aborted,
                ..
            }
        ),
        "{err:?}"
    );

    // The snapshot: the action, then its children by creation.
    let snapshot = store
        .watch_snapshot(&id("a0"), None, 100)
        .await
        .unwrap()
        .items;
    let names: Vec<&str> = snapshot.iter().map(|s| s.id.name.as_str()).collect();
    assert_eq!(names, ["a0", "c1", "c2", "k1"]);
    let phases: Vec<Phase> = snapshot.iter().map(|s| s.phase).collect();
    assert_eq!(
        phases,
        [
            Phase::Aborted,
            Phase::Aborted,
            Phase::Succeeded,
            Phase::Succeeded
        ]
    );
    assert_eq!(snapshot[0].error.as_deref(), Some(&b"aborted-error"[..]));
    assert_eq!(snapshot[3].value.as_deref(), Some(&b"yes"[..]));
    let err = store
        .watch_snapshot(&id("zz"), None, 100)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ActionNotFound(_)), "{err:?}");
    let (reason, by) = db.abort_info("g1").await;
    assert_eq!((reason.as_str(), by.as_slice()), ("stop", &b"who"[..]));

    // The feed: 5 enqueues + 2 updates + 1 signal + 3 aborts, each once,
    // in commit order, read in pages smaller than the log.
    let events = read_all(&*store, start, 4).await;
    let seen: Vec<(&str, i64, Phase)> = events
        .iter()
        .map(|(_, e)| (e.id.name.as_str(), e.version, e.phase))
        .collect();
    assert_eq!(
        &seen[..8],
        [
            ("a0", 1, Phase::Queued),
            ("c1", 1, Phase::Queued),
            ("c2", 1, Phase::Queued),
            ("k1", 1, Phase::Paused),
            ("g1", 1, Phase::Queued),
            ("c1", 2, Phase::Running),
            ("c2", 2, Phase::Succeeded),
            ("k1", 2, Phase::Succeeded),
        ]
    );
    let mut aborted: Vec<(&str, i64, Phase)> = seen[8..].to_vec();
    aborted.sort_unstable_by_key(|(name, version, _)| (*name, *version));
    assert_eq!(
        aborted,
        [
            ("a0", 2, Phase::Aborted),
            ("c1", 3, Phase::Aborted),
            ("g1", 2, Phase::Aborted),
        ]
    );
    assert!(events[8..]
        .iter()
        .all(|(_, e)| e.error.as_deref() == Some(&b"aborted-error"[..])));
    assert_eq!(events.len(), 11);
    // Nothing more after the end.
    let end = read_end(&*store, start).await;
    let empty = store.read_feed(end, 10).await.unwrap();
    assert!(empty.events.is_empty() && !empty.more);

    store.notify_peers().await.unwrap();
    store.ping().await.unwrap();
    store.close().await;
}

async fn concurrent_writers_take_turns(db: Db) {
    let store = db.store.clone();
    store
        .execute(Command::Enqueue(task("a0", None)))
        .await
        .unwrap();
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..16 {
        let store = store.clone();
        writers.spawn(async move {
            let name = format!("c{i}");
            store
                .execute(Command::Enqueue(task(&name, Some("a0"))))
                .await
                .unwrap();
            store
                .execute(update(&name, 1, Phase::Running))
                .await
                .unwrap()
        });
    }
    while let Some(result) = writers.join_next().await {
        assert_eq!(result.unwrap(), 1);
    }
    let events = read_all(&*store, FeedCursor::default(), 7).await;
    assert_eq!(events.len(), 1 + 16 * 2);
    store.close().await;
}

async fn claim_is_oldest_first_within_capacity_and_run_limits(db: Db) {
    let store = db.store.clone();
    // r1 may lease 2 actions at once; r2 is unlimited.
    let limited = EnqueueAction {
        by: None,
        run: Some(RunSettings {
            run_spec: Bytes::from_static(b"run-spec-1"),
            queue: Some("gpu".to_owned()),
            max_action_concurrency: 2,
        }),
        ..task("a0", None)
    };
    let other_queue = EnqueueAction {
        by: None,
        task_queue: Some("cpu".to_owned()),
        ..task("x1", Some("a0"))
    };
    enqueue_all(
        &*store,
        vec![
            limited,
            task("c1", Some("a0")),
            task("c2", Some("a0")),
            task("c3", Some("a0")),
            other_queue,
            condition("k1", "a0"),
            in_run(task("b0", None), "r2"),
            in_run(task("d1", Some("b0")), "r2"),
        ],
    )
    .await;
    // Creation order, unlike name order: c3, a0, x1, c1, b0, c2, d1.
    for (name, created) in [
        ("c3", 10),
        ("a0", 20),
        ("x1", 25),
        ("c1", 30),
        ("b0", 40),
        ("c2", 50),
        ("d1", 60),
    ] {
        db.set_created_at(name, created).await;
    }
    let cursor = feed_mark(&*store).await;

    // Capacity 3: c3 and a0 fill r1's limit, so c1 is skipped for b0.
    let before = now_micros();
    let leases = store.claim(&claim_request("e1", 3)).await.unwrap();
    assert_eq!(names(&leases), [("r1", "c3"), ("r1", "a0"), ("r2", "b0")]);
    let c3 = &leases[0];
    assert_eq!(c3.attempt, 1);
    assert_eq!(c3.output_uri, "s3://b/r1/c3/1");
    assert_eq!(c3.spec, spec("c3", "s3://b/in"));
    assert_eq!(c3.run_spec, Bytes::from_static(b"run-spec-1"));
    assert_eq!(leases[2].output_uri, "s3://b/r2/b0/1");
    assert!(leases[2].run_spec.is_empty());
    let deadline = c3.deadline.timestamp_micros();
    assert!(deadline >= before + 60_000_000 && deadline <= now_micros() + 60_000_000);
    let (phase, attempt, holder, stored_deadline, _, version) = db.lease_row("c3").await;
    assert_eq!(
        (phase, attempt, holder.as_deref(), stored_deadline, version),
        (3, 1, Some("e1"), Some(deadline), 2)
    );

    // One event per lease, naming the queue and the executor.
    let events = read_all(&*store, cursor, 10).await;
    assert_eq!(events.len(), 3);
    for (_, event) in &events {
        assert_eq!(event.phase, Phase::Initializing);
        assert_eq!(event.version, 2);
        assert_eq!(event.queue.as_deref(), Some("gpu"));
        assert_eq!(event.lease_holder.as_deref(), Some("e1"));
    }

    // e1 is full; e2 gets what r1's limit leaves: d1 only.
    assert!(store
        .claim(&claim_request("e1", 3))
        .await
        .unwrap()
        .is_empty());
    let leases = store.claim(&claim_request("e2", 10)).await.unwrap();
    assert_eq!(names(&leases), [("r2", "d1")]);
    // A claimed attempt is not claimed again.
    assert!(store
        .claim(&claim_request("e2", 10))
        .await
        .unwrap()
        .is_empty());

    // c3 ends: r1 has room for one more, the oldest (c1 before c2), and
    // e1 has room for one more too.
    assert_eq!(
        store
            .execute(finish("c3", "e1", 1, Phase::Succeeded, None))
            .await
            .unwrap(),
        1
    );
    let leases = store.claim(&claim_request("e2", 10)).await.unwrap();
    assert_eq!(names(&leases), [("r1", "c1")]);
    assert!(store
        .claim(&claim_request("e1", 3))
        .await
        .unwrap()
        .is_empty());

    // The other queue is served separately; conditions never are.
    let cpu = ClaimRequest {
        queue: "cpu".to_owned(),
        ..claim_request("e3", 10)
    };
    let leases = store.claim(&cpu).await.unwrap();
    assert!(leases.is_empty(), "r1 is at its limit: {leases:?}");
    let queued = db.queued_names().await;
    assert_eq!(queued, ["c2", "x1"]);
    store.close().await;
}

async fn claim_serves_other_queues_and_unlimited_runs_up_to_capacity(db: Db) {
    let store = db.store.clone();
    let mut actions = vec![task("a0", None)];
    for i in 0..40 {
        actions.push(task(&format!("c{i:02}"), Some("a0")));
    }
    actions.push(EnqueueAction {
        by: None,
        task_queue: Some("cpu".to_owned()),
        ..task("x1", Some("a0"))
    });
    enqueue_all(&*store, actions).await;
    let cpu = ClaimRequest {
        queue: "cpu".to_owned(),
        ..claim_request("e1", 10)
    };
    assert_eq!(names(&store.claim(&cpu).await.unwrap()), [("r1", "x1")]);
    // e1 holds one lease, so 39 more fit.
    let leases = store.claim(&claim_request("e1", 40)).await.unwrap();
    assert_eq!(leases.len(), 39);
    let leases = store.claim(&claim_request("e2", 100)).await.unwrap();
    assert_eq!(leases.len(), 2);
    store.close().await;
}

async fn claim_pages_past_runs_at_their_limit(db: Db) {
    let store = db.store.clone();
    // r1 (limit 1) has many old queued actions; r2's one is newer.
    let mut actions = vec![EnqueueAction {
        by: None,
        run: Some(RunSettings {
            run_spec: Bytes::new(),
            queue: Some("gpu".to_owned()),
            max_action_concurrency: 1,
        }),
        ..task("a0", None)
    }];
    for i in 0..40 {
        actions.push(task(&format!("c{i:02}"), Some("a0")));
    }
    actions.push(in_run(task("b0", None), "r2"));
    enqueue_all(&*store, actions).await;
    let leases = store.claim(&claim_request("e1", 1)).await.unwrap();
    assert_eq!(names(&leases), [("r1", "a0")]);
    let leases = store.claim(&claim_request("e2", 1)).await.unwrap();
    assert_eq!(names(&leases), [("r2", "b0")]);
    store.close().await;
}

async fn heartbeat_extends_live_leases_and_reports_an_abort_once(db: Db) {
    let store = db.store.clone();
    enqueue_all(
        &*store,
        vec![
            task("a0", None),
            task("c1", Some("a0")),
            task("c2", Some("a0")),
        ],
    )
    .await;
    let leases = store.claim(&claim_request("e1", 10)).await.unwrap();
    assert_eq!(leases.len(), 3);
    assert_eq!(store.execute(abort("c1")).await.unwrap(), 1);
    // c2 ends without a Finish: released, but not reported.
    assert_eq!(
        store
            .execute(update("c2", 1, Phase::Succeeded))
            .await
            .unwrap(),
        1
    );
    db.expire_lease("a0").await;
    let (_, _, _, _, _, version) = db.lease_row("a0").await;
    let cursor = feed_mark(&*store).await;

    let before = now_micros();
    let beat = store
        .heartbeat("e1", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        beat.cancelled,
        [Cancellation {
            id: id("c1"),
            attempt: 1,
            reason: "stop".to_owned(),
        }]
    );
    let deadline = beat.deadline.timestamp_micros();
    assert!(deadline >= before + 30_000_000 && deadline <= now_micros() + 30_000_000);
    // a0 is extended (even past its deadline, until a reaper took it);
    // the ended leases are released. No version change, no event.
    let a0 = db.lease_row("a0").await;
    assert_eq!((a0.3, a0.5), (Some(deadline), version));
    assert_eq!(db.lease_row("c1").await.3, None);
    assert_eq!(db.lease_row("c2").await.3, None);
    assert!(read_all(&*store, cursor, 10).await.is_empty());

    // Reported once.
    let beat = store
        .heartbeat("e1", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(beat.cancelled.is_empty());
    // Another executor's heartbeat touches nothing of e1's.
    let other = store
        .heartbeat("e2", Duration::from_secs(90))
        .await
        .unwrap();
    assert!(other.cancelled.is_empty());
    assert_eq!(
        db.lease_row("a0").await.3,
        Some(beat.deadline.timestamp_micros())
    );
    // The released leases no longer count against e1's capacity.
    enqueue_all(&*store, vec![task("c3", Some("a0"))]).await;
    let leases = store.claim(&claim_request("e1", 2)).await.unwrap();
    assert_eq!(names(&leases), [("r1", "c3")]);
    store.close().await;
}

async fn finish_needs_the_holder_and_the_current_attempt(db: Db) {
    let store = db.store.clone();
    enqueue_all(
        &*store,
        vec![
            task("a0", None),
            task("c1", Some("a0")),
            condition("k1", "a0"),
        ],
    )
    .await;
    assert_eq!(
        store.claim(&claim_request("e1", 10)).await.unwrap().len(),
        2
    );
    let cursor = feed_mark(&*store).await;

    for (command, what) in [
        (
            finish("a0", "e2", 1, Phase::Succeeded, None),
            "other executor",
        ),
        (
            finish("a0", "e1", 2, Phase::Succeeded, None),
            "stale attempt",
        ),
        (finish("k1", "e1", 1, Phase::Succeeded, None), "not a task"),
    ] {
        let err = store.execute(command).await.unwrap_err();
        assert!(
            matches!(err, Error::FailedPrecondition(_)),
            "{what}: {err:?}"
        );
    }
    let err = store
        .execute(finish("zz", "e1", 1, Phase::Succeeded, None))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ActionNotFound(_)), "{err:?}");

    // The default output location; the lease ends, the holder stays.
    assert_eq!(
        store
            .execute(finish("a0", "e1", 1, Phase::Succeeded, None))
            .await
            .unwrap(),
        1
    );
    let (phase, attempt, holder, deadline, end_time, version) = db.lease_row("a0").await;
    assert_eq!(
        (phase, attempt, holder.as_deref(), deadline, version),
        (5, 1, Some("e1"), None, 3)
    );
    assert!(end_time.is_some());
    // A repeat changes nothing; a different end is refused.
    assert_eq!(
        store
            .execute(finish("a0", "e1", 1, Phase::Succeeded, None))
            .await
            .unwrap(),
        0
    );
    let err = store
        .execute(finish("a0", "e1", 1, Phase::Failed, None))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");

    // A given output location and error are stored as given.
    let failed = Command::Finish(FinishAction {
        by: None,
        id: id("c1"),
        executor: "e1".to_owned(),
        attempt: 1,
        phase: Phase::Failed,
        output_uri: Some("s3://elsewhere/c1".to_owned()),
        error: Some(Bytes::from_static(b"user-error")),
        retry: false,
    });
    assert_eq!(store.execute(failed).await.unwrap(), 1);

    let events = read_all(&*store, cursor, 10).await;
    let seen: Vec<_> = events
        .iter()
        .map(|(_, e)| {
            (
                e.id.name.as_str(),
                e.phase,
                e.output_uri.as_str(),
                e.error.as_deref(),
                e.lease_holder.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("a0", Phase::Succeeded, "s3://b/r1/a0/1", None, Some("e1")),
            (
                "c1",
                Phase::Failed,
                "s3://elsewhere/c1",
                Some(&b"user-error"[..]),
                Some("e1")
            ),
        ]
    );
    store.close().await;
}

async fn reap_requeues_expired_leases_then_fails_them(db: Db) {
    let store = db.store.clone();
    enqueue_all(&*store, vec![task("a0", None), task("c1", Some("a0"))]).await;
    assert_eq!(
        store.claim(&claim_request("e1", 10)).await.unwrap().len(),
        2
    );
    // c1 ends without a Finish, so its lease stays until it expires.
    assert_eq!(
        store
            .execute(update("c1", 1, Phase::Succeeded))
            .await
            .unwrap(),
        1
    );
    // Nothing expired yet.
    assert_eq!(
        store.reap(&reap_settings(1)).await.unwrap(),
        ReapOutcome::default()
    );
    db.expire_lease("a0").await;
    db.expire_lease("c1").await;
    let cursor = feed_mark(&*store).await;

    let outcome = store.reap(&reap_settings(1)).await.unwrap();
    assert_eq!(
        outcome,
        ReapOutcome {
            requeued: 1,
            failed: 0,
            timed_out: 0
        }
    );
    assert_eq!(db.lease_row("a0").await, (1, 2, None, None, None, 3));
    // The terminal action's lease is cleared without a change.
    let c1 = db.lease_row("c1").await;
    assert_eq!((c1.0, c1.3, c1.5), (5, None, 3));

    // The next attempt is leased as any queued action.
    let leases = store.claim(&claim_request("e2", 10)).await.unwrap();
    assert_eq!(names(&leases), [("r1", "a0")]);
    assert_eq!(
        (leases[0].attempt, leases[0].output_uri.as_str()),
        (2, "s3://b/r1/a0/2")
    );
    db.expire_lease("a0").await;
    let outcome = store.reap(&reap_settings(1)).await.unwrap();
    assert_eq!(
        outcome,
        ReapOutcome {
            requeued: 0,
            failed: 1,
            timed_out: 0
        }
    );
    let (phase, attempt, holder, deadline, end_time, version) = db.lease_row("a0").await;
    assert_eq!(
        (phase, attempt, holder, deadline, version),
        (6, 2, None, None, 5)
    );
    assert!(end_time.is_some());
    let error = db.error_of("a0").await;
    assert_eq!(error, b"lease-error");
    assert_eq!(
        store.reap(&reap_settings(1)).await.unwrap(),
        ReapOutcome::default()
    );

    let events = read_all(&*store, cursor, 10).await;
    let seen: Vec<(&str, i64, Phase, u32, Option<&str>)> = events
        .iter()
        .map(|(_, e)| {
            (
                e.id.name.as_str(),
                e.version,
                e.phase,
                e.attempt,
                e.lease_holder.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("a0", 3, Phase::Queued, 2, None),
            ("a0", 4, Phase::Initializing, 2, Some("e2")),
            ("a0", 5, Phase::Failed, 2, None),
        ]
    );
    assert_eq!(events[2].1.error.as_deref(), Some(&b"lease-error"[..]));
    store.close().await;
}

async fn reap_times_out_conditions_past_their_deadline(db: Db) {
    let store = db.store.clone();
    enqueue_all(
        &*store,
        vec![
            task("a0", None),
            condition("k1", "a0"),
            condition("k2", "a0"),
        ],
    )
    .await;
    assert_eq!(
        store.reap(&reap_settings(1)).await.unwrap(),
        ReapOutcome::default()
    );
    db.expire_condition("k1").await;
    let cursor = feed_mark(&*store).await;
    let outcome = store.reap(&reap_settings(1)).await.unwrap();
    assert_eq!(
        outcome,
        ReapOutcome {
            requeued: 0,
            failed: 0,
            timed_out: 1
        }
    );
    let (phase, _, _, _, end_time, version) = db.lease_row("k1").await;
    assert_eq!((phase, version), (8, 2));
    assert!(end_time.is_some());
    assert_eq!(db.lease_row("k2").await.0, 9);
    let events = read_all(&*store, cursor, 10).await;
    assert_eq!(events.len(), 1);
    let event = &events[0].1;
    assert_eq!(
        (event.id.name.as_str(), event.phase, event.error.as_deref()),
        ("k1", Phase::TimedOut, Some(&b"timeout-error"[..]))
    );
    // Once.
    assert_eq!(
        store.reap(&reap_settings(1)).await.unwrap(),
        ReapOutcome::default()
    );
    store.close().await;
}

/// The store's round-trip counter as the Prometheus recorder renders it.
fn round_trips(store: &str) -> f64 {
    let prefix = format!(
        "{}{{store=\"{store}\"}} ",
        crate::metrics::names::STORE_ROUND_TRIPS
    );
    crate::metrics::handle()
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map_or(0.0, |value| value.trim().parse().expect("a number"))
}

/// Every statement of the write path is counted: an Enqueue of a child
/// costs at least its lookups and its insert.
async fn writes_count_their_round_trips(db: Db) {
    crate::metrics::handle();
    let store = db.store.clone();
    let name = match db.backend {
        Backend::Postgres(_) => "postgres",
        Backend::Sqlite { .. } => "sqlite",
    };
    enqueue_all(&*store, vec![task("a0", None)]).await;
    let before = round_trips(name);
    enqueue_all(&*store, vec![task("c1", Some("a0"))]).await;
    // Tests of the same backend run at once and count too: at least.
    assert!(round_trips(name) - before >= 3.0);
}

/// Runs each named `async fn(Db)` on both backends.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[sqlx::test(migrations = "./migrations/postgres")]
                #[cfg_attr(not(actionsd_postgres), ignore = "the Postgres suite needs DATABASE_URL")]
                async fn postgres(pool: sqlx::PgPool) {
                    super::$name(super::Db::postgres(pool).await).await;
                }

                #[tokio::test]
                async fn sqlite() {
                    super::$name(super::Db::sqlite().await).await;
                }
            }
        )*
    };
}

conformance!(
    commands_round_trip_and_the_feed_returns_every_event_once_in_order,
    concurrent_writers_take_turns,
    claim_is_oldest_first_within_capacity_and_run_limits,
    claim_serves_other_queues_and_unlimited_runs_up_to_capacity,
    claim_pages_past_runs_at_their_limit,
    heartbeat_extends_live_leases_and_reports_an_abort_once,
    finish_needs_the_holder_and_the_current_attempt,
    reap_requeues_expired_leases_then_fails_them,
    reap_times_out_conditions_past_their_deadline,
    writes_count_their_round_trips
);

/// A batch whose commands read what earlier commands of the same batch
/// wrote (a root and its child, an Abort of the root, then commands that
/// must see it aborted), through `batch` (the store's own batch function):
/// every command sees the batch's earlier writes, whatever the store read
/// ahead for the batch.
pub(crate) async fn a_batch_sees_its_own_writes<F, Fut>(store: &dyn Store, batch: F)
where
    F: Fn(Vec<Command>) -> Fut,
    Fut: std::future::Future<Output = Vec<Result<usize, Error>>>,
{
    let results = batch(vec![
        Command::Enqueue(task("a0", None)),
        Command::Enqueue(task("c1", Some("a0"))),
        update("c1", 1, Phase::Running),
        abort("a0"),
        Command::Enqueue(task("c2", Some("a0"))),
        update("c1", 1, Phase::Succeeded),
        Command::Enqueue(task("c1", Some("a0"))),
        abort("a0"),
    ])
    .await;
    let outcome: Vec<Result<usize, &'static str>> = results
        .iter()
        .map(|result| match result {
            Ok(events) => Ok(*events),
            Err(Error::ParentTerminal { .. }) => Err("parent terminal"),
            Err(Error::FailedPrecondition(_)) => Err("failed precondition"),
            Err(other) => panic!("unexpected error {other:?}"),
        })
        .collect();
    assert_eq!(
        outcome,
        vec![
            Ok(1),
            Ok(1),
            Ok(1),
            // a0 and c1.
            Ok(2),
            Err("parent terminal"),
            Err("failed precondition"),
            Ok(0),
            Err("failed precondition"),
        ]
    );
    let snapshot = store
        .watch_snapshot(&id("a0"), None, 100)
        .await
        .expect("snapshot")
        .items;
    let states: Vec<(&str, i64, Phase)> = snapshot
        .iter()
        .map(|s| (s.id.name.as_str(), s.version, s.phase))
        .collect();
    assert_eq!(
        states,
        [("a0", 2, Phase::Aborted), ("c1", 3, Phase::Aborted)]
    );
}

/// A batch whose every command is refused writes nothing and reports
/// each command's own error.
pub(crate) async fn a_batch_of_refusals_writes_nothing<F, Fut>(store: &dyn Store, batch: F)
where
    F: Fn(Vec<Command>) -> Fut,
    Fut: std::future::Future<Output = Vec<Result<usize, Error>>>,
{
    let start = feed_mark(store).await;
    let results = batch(vec![
        Command::Enqueue(task("c1", Some("nobody"))),
        update("zz", 1, Phase::Running),
        abort("zz"),
    ])
    .await;
    assert!(
        matches!(
            results.as_slice(),
            [
                Err(Error::ParentNotFound(_)),
                Err(Error::ActionNotFound(_)),
                Err(Error::ActionNotFound(_))
            ]
        ),
        "{results:?}"
    );
    assert!(read_all(store, start, 10).await.is_empty());
}

/// Batches of many commands each (64 children enqueued, leased, updated
/// and finished; through `batch`, the store's own batch function): every
/// command's result and every action's events, in order, are what one
/// command per transaction gives.
pub(crate) async fn a_large_batch_applies_each_command_in_order<F, Fut>(store: &dyn Store, batch: F)
where
    F: Fn(Vec<Command>) -> Fut,
    Fut: std::future::Future<Output = Vec<Result<usize, Error>>>,
{
    const CHILDREN: usize = 64;
    let names: Vec<String> = (0..CHILDREN).map(|i| format!("c{i:02}")).collect();
    enqueue_all(store, vec![task("a0", None)]).await;
    let start = feed_mark(store).await;
    let each = |make: &dyn Fn(&str) -> Command| names.iter().map(|n| make(n)).collect();

    let enqueued = batch(each(&|n| Command::Enqueue(task(n, Some("a0"))))).await;
    assert!(enqueued.iter().all(|r| matches!(r, Ok(1))), "{enqueued:?}");
    // The root is a queued task too.
    let leases = store
        .claim(&claim_request("e1", CHILDREN as u32 + 1))
        .await
        .expect("claim");
    assert_eq!(leases.len(), CHILDREN + 1);
    let running = batch(each(&|n| update(n, 1, Phase::Running))).await;
    assert!(running.iter().all(|r| matches!(r, Ok(1))), "{running:?}");
    // A repeated report changes nothing; a finished attempt is refused.
    let mut mixed = vec![update("c00", 1, Phase::Running)];
    mixed.extend(each(&|n| finish(n, "e1", 1, Phase::Succeeded, None)));
    mixed.push(finish("c01", "e1", 1, Phase::Failed, None));
    let finished = batch(mixed).await;
    assert!(matches!(finished[0], Ok(0)), "{finished:?}");
    assert!(
        finished[1..=CHILDREN].iter().all(|r| matches!(r, Ok(1))),
        "{finished:?}"
    );
    assert!(
        matches!(finished[CHILDREN + 1], Err(Error::FailedPrecondition(_))),
        "{finished:?}"
    );

    let events = read_all(store, start, 1000).await;
    for name in &names {
        let phases: Vec<(i64, Phase)> = events
            .iter()
            .filter(|(_, e)| &e.id.name == name)
            .map(|(_, e)| (e.version, e.phase))
            .collect();
        assert_eq!(
            phases,
            [
                (1, Phase::Queued),
                (2, Phase::Initializing),
                (3, Phase::Running),
                (4, Phase::Succeeded)
            ],
            "{name}"
        );
    }
    let finished = store.get_action(&id("c07")).await.expect("c07");
    let expected = crate::domain::output_uri(ActionKind::Task, "", "s3://b/r1/", "c07", 1);
    assert_eq!(finished.state.output_uri, expected);
}
