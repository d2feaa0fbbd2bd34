//! How a command is applied, written once for every backend.
//!
//! A backend implements [`CommandTx`]: a transaction's few statements
//! (read a row, insert a run, write a transition with its event…). The
//! control flow and every rule live here and in `domain`, so the stores
//! cannot drift apart.
//!
//! A repeated Enqueue is compared with what is stored outside the
//! transaction: the transaction only reads the stored content
//! ([`Applied::Exists`]), and [`resolve`] decides once it has ended, so no
//! message is decoded while the transaction holds its locks. The Action
//! spec is the edge's canonical encoding (prost, maps ordered), so equal
//! content is nearly always equal bytes; a RunSpec is stored as received.
//! Either is compared by content (`schema::same_content`) when the bytes
//! differ.

use async_trait::async_trait;

use crate::domain::{
    decide_abort, decide_enqueue_existing, decide_enqueue_parent, decide_finish, decide_signal,
    decide_update, enqueue_queue, output_uri, second_root, AbortAction, ActionId, ActionKind,
    Command, Current, EnqueueAction, Error, FinishAction, Phase, RunSettings, SignalAction,
    Transition, UpdateStatus,
};
use crate::schema;

/// An existing action's stored content.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub spec: Vec<u8>,
    pub run_spec: Vec<u8>,
    /// The action is its run's root.
    pub is_root: bool,
}

/// A parent's phase and its run's queue; `None` when there is no such
/// action.
pub(crate) type FoundParent = Option<(Phase, Option<String>)>;

/// An action as it is inserted: its Enqueue, and the queue it resolved to.
pub(crate) struct NewAction<'a> {
    pub action: &'a EnqueueAction,
    pub queue: Option<&'a str>,
}

/// The root of an existing run, found when a new root was to create it.
pub(crate) type RunRoot = Option<String>;

/// What a command did inside the transaction.
#[derive(Debug)]
pub(crate) enum Applied {
    /// This many events were appended (0: accepted, nothing to change).
    Events(usize),
    /// The Enqueued action exists: the comparison decides after the
    /// transaction.
    Exists(Box<Stored>),
}

/// The statements of one transaction, as each backend writes them. Every
/// method that writes an action also appends its event, in the same
/// transaction.
#[async_trait]
pub(crate) trait CommandTx: Send {
    /// The stored content of an action, if it exists.
    async fn stored(&mut self, id: &ActionId) -> Result<Option<Stored>, Error>;

    /// Inserts the run of root action `id`. When the run exists nothing
    /// is written, and the name of its root is returned.
    async fn insert_run(
        &mut self,
        id: &ActionId,
        run: &RunSettings,
    ) -> Result<Option<String>, Error>;

    /// The parent's phase and its run's queue, `None` when there is no
    /// such action. The parent cannot become terminal until the
    /// transaction ends (Postgres: FOR SHARE; SQLite: the write lock), so an
    /// Abort of it sees the new child.
    async fn lock_parent(&mut self, id: &ActionId, parent: &str) -> Result<FoundParent, Error>;

    /// Inserts the action with its first event; `false` when it exists.
    async fn insert_action(&mut self, new: NewAction<'_>) -> Result<bool, Error>;

    /// What the rules need of an action's row, locked until the
    /// transaction ends; `None` when there is no such action.
    async fn lock_current(&mut self, id: &ActionId) -> Result<Option<Current>, Error>;

    /// Writes an accepted Update.
    async fn write_update(&mut self, update: &UpdateStatus, next: Transition) -> Result<(), Error>;

    /// Aborts every live action of the subtree under `abort.id` (itself
    /// included); returns how many.
    async fn abort_subtree(&mut self, abort: &AbortAction) -> Result<usize, Error>;

    /// Resolves a condition with the signal's value.
    async fn write_signal(&mut self, signal: &SignalAction) -> Result<(), Error>;

    /// Queues the next attempt after a retrying Finish.
    async fn write_retry(&mut self, finish: &FinishAction) -> Result<(), Error>;

    /// Ends the attempt in `finish.phase` with its outputs at `output_uri`.
    async fn write_finish(&mut self, finish: &FinishAction, output_uri: &str) -> Result<(), Error>;

    /// Reads, and locks, what the commands of a batch will ask for, in a
    /// few statements for the whole batch; later calls for them are
    /// answered from what was read. A backend without it reads each when
    /// asked.
    async fn prefetch(&mut self, _commands: &[Command]) -> Result<(), Error> {
        Ok(())
    }

    /// Whether each command of a batch runs within a savepoint. Without
    /// savepoints a statement that fails fails the transaction, and the
    /// batch is applied again one command per transaction; a rule's
    /// refusal needs no savepoint, since every command decides before it
    /// writes.
    /// Applies what the backend held back of the batch's writes, before
    /// the batch ends. A backend that writes each command at once has
    /// nothing to do.
    async fn flush(&mut self) -> Result<(), Error> {
        Ok(())
    }

    fn savepoints(&self) -> bool {
        true
    }

    /// Starts a command's savepoint (releasing the previous one's); only
    /// called when [`CommandTx::savepoints`] says so.
    async fn savepoint(&mut self, _first: bool) -> Result<(), Error> {
        Err(Error::Internal("this store takes no savepoints".to_owned()))
    }

    /// Undoes the command since its savepoint.
    async fn rollback_to_savepoint(&mut self) -> Result<(), Error> {
        Err(Error::Internal("this store takes no savepoints".to_owned()))
    }
}

/// Applies one command.
pub(crate) async fn apply(tx: &mut impl CommandTx, command: &Command) -> Result<Applied, Error> {
    match command {
        Command::Enqueue(c) => enqueue(tx, c).await,
        Command::Update(c) => {
            let current = current(tx, &c.id).await?;
            Ok(Applied::Events(match decide_update(&c.id, &current, c)? {
                Some(next) => {
                    tx.write_update(c, next).await?;
                    1
                }
                None => 0,
            }))
        }
        Command::Abort(c) => {
            decide_abort(&c.id, &current(tx, &c.id).await?)?;
            Ok(Applied::Events(tx.abort_subtree(c).await?))
        }
        Command::Signal(c) => {
            if !decide_signal(&c.id, &current(tx, &c.id).await?, c)? {
                return Ok(Applied::Events(0));
            }
            tx.write_signal(c).await?;
            Ok(Applied::Events(1))
        }
        Command::Finish(c) => finish(tx, c).await,
    }
}

async fn current(tx: &mut impl CommandTx, id: &ActionId) -> Result<Current, Error> {
    tx.lock_current(id)
        .await?
        .ok_or_else(|| Error::ActionNotFound(id.clone()))
}

async fn enqueue(tx: &mut impl CommandTx, action: &EnqueueAction) -> Result<Applied, Error> {
    if let Some(stored) = tx.stored(&action.id).await? {
        return Ok(Applied::Exists(Box::new(stored)));
    }
    let id = &action.id;
    let run_queue = match &action.parent {
        None => {
            let run = action.run.clone().unwrap_or_default();
            if let Some(root) = tx.insert_run(id, &run).await? {
                // A concurrent identical Enqueue may have won the race.
                if let Some(stored) = tx.stored(id).await? {
                    return Ok(Applied::Exists(Box::new(stored)));
                }
                return Err(second_root(&id.run, &root));
            }
            run.queue
        }
        Some(parent) => {
            let found = tx.lock_parent(id, parent).await?;
            decide_enqueue_parent(id, parent, found.as_ref().map(|(phase, _)| *phase))?;
            found.and_then(|(_, queue)| queue)
        }
    };
    let queue = enqueue_queue(
        action.kind,
        action.task_queue.as_deref(),
        run_queue.as_deref(),
    );
    let new = NewAction {
        action,
        queue: queue.as_deref(),
    };
    if tx.insert_action(new).await? {
        return Ok(Applied::Events(1));
    }
    // Lost a race with a concurrent Enqueue of the same id.
    match tx.stored(id).await? {
        Some(stored) => Ok(Applied::Exists(Box::new(stored))),
        None => Err(Error::Internal(format!(
            "action {id} neither inserted nor found"
        ))),
    }
}

async fn finish(tx: &mut impl CommandTx, finish: &FinishAction) -> Result<Applied, Error> {
    let id = &finish.id;
    let current = current(tx, id).await?;
    if !decide_finish(id, &current, finish)? {
        return Ok(Applied::Events(0));
    }
    if finish.retry {
        // The next attempt is queued, as after a lost lease; the error
        // stays for watchers until that attempt reports.
        tx.write_retry(finish).await?;
    } else {
        let output_uri = output_uri(
            ActionKind::Task,
            finish.output_uri.as_deref().unwrap_or_default(),
            &current.run_output_base,
            &id.name,
            finish.attempt,
        );
        tx.write_finish(finish, &output_uri).await?;
    }
    Ok(Applied::Events(1))
}

/// Applies a batch in the caller's transaction. A lone command runs as is
/// (its failure fails the transaction). In a larger batch a command a rule
/// refuses reports its error while the others stay: every command decides
/// before it writes, so a refusal leaves nothing to undo. A statement that
/// fails is undone by the command's savepoint where the backend takes them
/// ([`CommandTx::savepoints`]); otherwise the batch fails with
/// [`Error::Conflict`], to be applied again one command per transaction.
/// `Err` when the transaction as a whole failed (nothing is committed): a
/// conflict, or the store failing.
pub(crate) async fn apply_batch(
    tx: &mut impl CommandTx,
    commands: &[Command],
) -> Result<Vec<Result<Applied, Error>>, Error> {
    if let [command] = commands {
        return match apply(tx, command).await {
            Err(Error::Conflict) => Err(Error::Conflict),
            result => Ok(vec![result]),
        };
    }
    tx.prefetch(commands).await?;
    let savepoints = tx.savepoints();
    let mut results = Vec::with_capacity(commands.len());
    for (index, command) in commands.iter().enumerate() {
        if savepoints {
            tx.savepoint(index == 0).await?;
        }
        let result = apply(tx, command).await;
        match &result {
            Err(Error::Conflict) => return Err(Error::Conflict),
            Err(err) if savepoints || !is_refusal(err) => {
                if !savepoints {
                    return Err(match err {
                        Error::Unavailable(_) => err.clone(),
                        _ => Error::Conflict,
                    });
                }
                tx.rollback_to_savepoint().await?;
            }
            _ => {}
        }
        results.push(result);
    }
    if let Err(err) = tx.flush().await {
        return Err(match err {
            Error::Unavailable(_) => err,
            _ => Error::Conflict,
        });
    }
    Ok(results)
}

/// Whether `err` is a rule's refusal (decided before the command wrote),
/// not a failure of the store.
fn is_refusal(err: &Error) -> bool {
    !matches!(
        err,
        Error::Internal(_) | Error::Unavailable(_) | Error::Conflict | Error::ResourceExhausted(_)
    )
}

/// Whether a batch's transaction is committed: when some command wrote or
/// was accepted. A batch whose every command failed is rolled back.
pub(crate) fn worth_committing(results: &[Result<Applied, Error>]) -> bool {
    results.iter().any(Result::is_ok)
}

/// Ends a batch's transaction (see [`worth_committing`]) and resolves each
/// command's result. `Err` when the commit failed: nothing was committed.
pub(crate) async fn end_batch<DB: sqlx::Database>(
    tx: sqlx::Transaction<'_, DB>,
    commands: &[Command],
    applied: Vec<Result<Applied, Error>>,
    db_error: fn(sqlx::Error) -> Error,
) -> Result<Vec<Result<usize, Error>>, Error> {
    if worth_committing(&applied) {
        tx.commit().await.map_err(db_error)?;
    } else {
        tx.rollback().await.map_err(db_error)?;
    }
    Ok(commands
        .iter()
        .zip(applied)
        .map(|(command, applied)| resolve(command, applied))
        .collect())
}

/// The command's result once its transaction has committed: a repeated
/// Enqueue is compared here, outside the transaction.
pub(crate) fn resolve(command: &Command, applied: Result<Applied, Error>) -> Result<usize, Error> {
    match applied? {
        Applied::Events(events) => Ok(events),
        Applied::Exists(stored) => {
            let Command::Enqueue(action) = command else {
                return Err(Error::Internal(
                    "only an Enqueue compares stored content".to_owned(),
                ));
            };
            compare(action, &stored).map(|()| 0)
        }
    }
}

/// A repeated Enqueue: the same content is an idempotent success.
fn compare(action: &EnqueueAction, stored: &Stored) -> Result<(), Error> {
    let same_run_spec = !stored.is_root || action.parent.is_some() || {
        let given = action.run.as_ref().map_or(&[][..], |r| r.run_spec.as_ref());
        schema::same_content(schema::names::RUN_SPEC, given, &stored.run_spec)
    };
    let same_spec = schema::same_content(schema::names::ACTION, &action.spec, &stored.spec);
    decide_enqueue_existing(&action.id, same_spec, same_run_spec)
}
