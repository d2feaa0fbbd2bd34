//! Group commit: concurrent writes share one transaction.
//!
//! A store hands each [`Command`] to one of a few committer tasks through a
//! bounded queue. A committer takes whatever is queued (up to `max_batch`
//! commands) and applies the batch in one transaction through the store's
//! [`Batch`] function, which answers every command once the transaction
//! has committed (or failed). A lone command is committed at once: nothing
//! waits for company, there are no timers. Under load, commands that arrive
//! while a transaction is in flight queue up and share the next commit, so
//! one commit (one fsync) acknowledges many requests.
//!
//! Commands are routed to committers by run, so the commands of one action
//! are applied by one committer, in arrival order, and two committers never
//! touch the same run (no lock waits or deadlocks between their batches).
//! The committer task owns the transaction: a caller that goes away never
//! leaves it half-done.
//!
//! The queue is hand-written on tokio's channels rather than taken from a
//! crate: it is the store's write path and a few dozen lines, and the
//! batching rules (route by run, drain without waiting) are the store's own.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::{Command, Error};

/// How a store groups its writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// Committer tasks, each with its own transaction at a time.
    pub committers: usize,
    /// Most commands in one transaction.
    pub max_batch: usize,
}

impl Default for GroupCommit {
    fn default() -> Self {
        Self {
            committers: 4,
            max_batch: 64,
        }
    }
}

/// Applies a batch of commands in one transaction and returns one result
/// per command, in order. `Ok` only if the transaction committed.
pub(crate) type Batch =
    Arc<dyn Fn(Vec<Command>) -> BoxFuture<'static, Vec<Result<usize, Error>>> + Send + Sync>;

type Request = (Command, oneshot::Sender<Result<usize, Error>>);

/// How long a write waits for room in a full committer queue before it is
/// shed with RESOURCE_EXHAUSTED (clients retry those with backoff).
pub(crate) const QUEUE_WAIT: Duration = Duration::from_secs(1);

/// The queues of a store's committer tasks. The tasks end when this is
/// dropped or closed (after finishing the batch in hand).
pub(crate) struct Committers {
    queues: Vec<mpsc::Sender<Request>>,
    tasks: TaskTracker,
    stop: CancellationToken,
    queue_wait: Duration,
}

impl Committers {
    /// Spawns the committer tasks on the current tokio runtime.
    pub(crate) fn spawn(settings: GroupCommit, batch: Batch) -> Self {
        Self::spawn_with_wait(settings, batch, QUEUE_WAIT)
    }

    pub(crate) fn spawn_with_wait(
        settings: GroupCommit,
        batch: Batch,
        queue_wait: Duration,
    ) -> Self {
        let max_batch = settings.max_batch.max(1);
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let queues = (0..settings.committers.max(1))
            .map(|_| {
                // Room for a few batches; further writers wait for room, up
                // to `queue_wait`.
                let (sender, receiver) = mpsc::channel(max_batch * 4);
                tasks.spawn(run(receiver, max_batch, batch.clone(), stop.clone()));
                sender
            })
            .collect();
        tasks.close();
        Self {
            queues,
            tasks,
            stop,
            queue_wait,
        }
    }

    /// Stops taking commands and waits until every committer has finished
    /// the batch in hand.
    pub(crate) async fn close(&self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }

    /// Queues the command and waits until its transaction has ended.
    pub(crate) async fn execute(&self, command: Command) -> Result<usize, Error> {
        let mut hasher = std::hash::DefaultHasher::new();
        command.action_id().run.hash(&mut hasher);
        let index = usize::try_from(hasher.finish() % self.queues.len() as u64).unwrap_or(0);
        let (reply, answer) = oneshot::channel();
        match self.queues[index]
            .send_timeout((command, reply), self.queue_wait)
            .await
        {
            Ok(()) => {}
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                tracing::warn!("write shed: the committer queue stayed full");
                return Err(Error::ResourceExhausted(
                    "too many writes queued; retry with backoff".to_owned(),
                ));
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => return Err(closed()),
        }
        answer.await.map_err(|_| closed())?
    }
}

fn closed() -> Error {
    tracing::error!("store committer stopped");
    Error::Unavailable("the store is shutting down".to_owned())
}

async fn run(
    mut receiver: mpsc::Receiver<Request>,
    max_batch: usize,
    batch: Batch,
    stop: CancellationToken,
) {
    let mut requests: Vec<Request> = Vec::with_capacity(max_batch);
    loop {
        let first = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            first = receiver.recv() => match first {
                Some(first) => first,
                None => break,
            },
        };
        requests.push(first);
        while requests.len() < max_batch {
            match receiver.try_recv() {
                Ok(request) => requests.push(request),
                Err(_) => break,
            }
        }
        let (commands, replies): (Vec<Command>, Vec<_>) = requests.drain(..).unzip();
        let size = commands.len();
        let started = std::time::Instant::now();
        let results = batch(commands).await;
        ::metrics::histogram!(crate::metrics::names::COMMIT_DURATION)
            .record(started.elapsed().as_secs_f64());
        ::metrics::histogram!(crate::metrics::names::COMMIT_BATCH_SIZE).record(size as f64);
        tracing::debug!(commands = size, "group commit");
        for (reply, result) in replies.into_iter().zip(results) {
            // The caller may have gone away; its write is done either way.
            let _ = reply.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::Semaphore;

    use super::*;
    use crate::domain::Phase;

    /// With the one committer stuck in a transaction and its queue full, a
    /// further write is shed with RESOURCE_EXHAUSTED after the queue wait
    /// instead of waiting as long as the transaction does; once the
    /// committer moves on, writes are taken again.
    #[tokio::test]
    async fn a_full_write_queue_sheds_with_resource_exhausted() {
        let gate = Arc::new(Semaphore::new(0));
        let batch_gate = gate.clone();
        let batch: Batch = Arc::new(move |commands: Vec<Command>| {
            let gate = batch_gate.clone();
            Box::pin(async move {
                gate.acquire().await.expect("gate open").forget();
                commands.iter().map(|_| Ok(1)).collect()
            })
        });
        let settings = GroupCommit {
            committers: 1,
            max_batch: 1,
        };
        let wait = Duration::from_millis(200);
        let committers = Arc::new(Committers::spawn_with_wait(settings, batch, wait));
        // One command in the stuck transaction, four filling the queue.
        let mut queued = Vec::new();
        for i in 0..5 {
            let committers = committers.clone();
            queued.push(tokio::spawn(async move {
                committers
                    .execute(checks::update("r", &format!("a{i}"), Phase::Running))
                    .await
            }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = std::time::Instant::now();
        let shed = committers
            .execute(checks::update("r", "late", Phase::Running))
            .await;
        assert!(matches!(shed, Err(Error::ResourceExhausted(_))), "{shed:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        gate.add_permits(100);
        for task in queued {
            assert_eq!(task.await.unwrap().unwrap(), 1);
        }
        committers
            .execute(checks::update("r", "after", Phase::Running))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), committers.close())
            .await
            .expect("committers stop when closed");
    }
}

/// Checks shared by both stores' tests.
#[cfg(test)]
pub(crate) mod checks {
    use std::sync::Arc;

    use bytes::Bytes;
    use prost::Message;

    use crate::domain::{
        AbortAction, ActionId, ActionKind, Command, EnqueueAction, Error, Phase, RunId,
        RunSettings, UpdateStatus,
    };
    use crate::proto::flyteidl2::actions;
    use crate::store::Store;

    fn id(run: &str, name: &str) -> ActionId {
        ActionId::new(
            RunId {
                org: String::new(),
                project: "p".to_owned(),
                domain: "d".to_owned(),
                name: run.to_owned(),
            },
            name,
        )
    }

    fn enqueue(run: &str, name: &str, parent: Option<&str>, input_uri: &str) -> Command {
        Command::Enqueue(EnqueueAction {
            by: None,
            id: id(run, name),
            parent: parent.map(str::to_owned),
            kind: ActionKind::Task,
            spec: Bytes::from(
                actions::Action {
                    input_uri: input_uri.to_owned(),
                    run_output_base: format!("s3://b/{run}"),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            run: parent.is_none().then(RunSettings::default),
            task_queue: None,
            phase: Phase::Queued,
            output_uri: String::new(),
            run_output_base: format!("s3://b/{run}"),
            condition_type: None,
            condition_timeout: None,
        })
    }

    pub(crate) fn update(run: &str, name: &str, phase: Phase) -> Command {
        Command::Update(UpdateStatus {
            by: None,
            id: id(run, name),
            attempt: 1,
            phase,
            start_time: None,
            end_time: None,
            address: None,
        })
    }

    /// Applies a batch mixing accepted and refused commands through `batch`
    /// (the store's own batch function): the accepted ones commit, in
    /// order, each refused one reports its own error and writes nothing.
    pub(crate) async fn a_batch_commits_the_valid_commands_and_reports_the_rest<F, Fut>(
        store: &dyn Store,
        batch: F,
    ) where
        F: Fn(Vec<Command>) -> Fut,
        Fut: std::future::Future<Output = Vec<Result<usize, Error>>>,
    {
        let start = store.feed_start().await.expect("feed start");
        let results = batch(vec![
            enqueue("r1", "a0", None, "s3://b/in"),
            enqueue("r1", "c1", Some("a0"), "s3://b/in"),
            enqueue("r1", "c2", Some("missing"), "s3://b/in"),
            update("r1", "c1", Phase::Running),
            // Backwards within the attempt.
            update("r1", "c1", Phase::Queued),
            // Same id, different content.
            enqueue("r1", "c1", Some("a0"), "s3://b/other"),
            // A second root in the same run.
            enqueue("r1", "b0", None, "s3://b/in"),
            Command::Abort(AbortAction {
                by: None,
                id: id("r1", "nobody"),
                reason: "stop".to_owned(),
                aborted_by: None,
                error: Bytes::new(),
            }),
            update("r1", "c1", Phase::Succeeded),
            // The same content again: accepted, nothing to change.
            enqueue("r1", "c1", Some("a0"), "s3://b/in"),
        ])
        .await;
        let outcome: Vec<Result<usize, &'static str>> = results
            .iter()
            .map(|result| match result {
                Ok(events) => Ok(*events),
                Err(Error::ParentNotFound(_)) => Err("parent not found"),
                Err(Error::FailedPrecondition(_)) => Err("failed precondition"),
                Err(Error::AlreadyExists(_)) => Err("already exists"),
                Err(Error::ActionNotFound(_)) => Err("not found"),
                Err(other) => panic!("unexpected error {other:?}"),
            })
            .collect();
        assert_eq!(
            outcome,
            vec![
                Ok(1),
                Ok(1),
                Err("parent not found"),
                Ok(1),
                Err("failed precondition"),
                Err("already exists"),
                Err("already exists"),
                Err("not found"),
                Ok(1),
                Ok(0),
            ]
        );

        let snapshot = store
            .watch_snapshot(&id("r1", "a0"), None, 10_000)
            .await
            .expect("snapshot")
            .items;
        let states: Vec<(&str, i64, Phase)> = snapshot
            .iter()
            .map(|s| (s.id.name.as_str(), s.version, s.phase))
            .collect();
        assert_eq!(
            states,
            vec![("a0", 1, Phase::Queued), ("c1", 3, Phase::Succeeded)]
        );
        // On Postgres the feed reads only below the oldest transaction still
        // running anywhere on the server, so a transaction of another test
        // can hold these events back for a while: read until they are there.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        let feed = loop {
            let feed = store.read_feed(start, 100).await.expect("feed");
            if feed.events.len() >= 4 || tokio::time::Instant::now() >= deadline {
                break feed;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        let events: Vec<(&str, i64, Phase)> = feed
            .events
            .iter()
            .map(|e| (e.id.name.as_str(), e.version, e.phase))
            .collect();
        assert_eq!(
            events,
            vec![
                ("a0", 1, Phase::Queued),
                ("c1", 1, Phase::Queued),
                ("c1", 2, Phase::Running),
                ("c1", 3, Phase::Succeeded),
            ]
        );
    }

    /// Many concurrent enqueues (so that they share transactions) are all
    /// acknowledged and all land, each once.
    pub(crate) async fn concurrent_enqueues_all_land(store: Arc<dyn Store>) {
        const RUNS: usize = 8;
        const CHILDREN: usize = 64;
        for run in 0..RUNS {
            let command = enqueue(&format!("r{run}"), "a0", None, "s3://b/in");
            assert_eq!(store.execute(command).await.expect("root"), 1);
        }
        let mut writes = tokio::task::JoinSet::new();
        for child in 0..CHILDREN {
            for run in 0..RUNS {
                let store = store.clone();
                writes.spawn(async move {
                    let command = enqueue(
                        &format!("r{run}"),
                        &format!("c{child}"),
                        Some("a0"),
                        "s3://i",
                    );
                    store.execute(command).await
                });
            }
        }
        while let Some(result) = writes.join_next().await {
            assert_eq!(result.expect("task").expect("enqueue"), 1);
        }
        for run in 0..RUNS {
            let snapshot = store
                .watch_snapshot(&id(&format!("r{run}"), "a0"), None, 10_000)
                .await
                .expect("snapshot")
                .items;
            assert_eq!(snapshot.len(), CHILDREN + 1);
            assert!(snapshot.iter().all(|s| s.version == 1));
        }
    }
}
