//! Claims and heartbeats, written once for every backend.
//!
//! **Claim order.** Queued task actions of a queue are leased oldest
//! first, in the order (created_at, org, project, domain, run_name, name);
//! each backend has an index in exactly that order.
//!
//! **Concurrency limit.** A run with `max_action_concurrency = n > 0` has
//! at most `n` live leases. The first time a claim meets such a run it
//! locks the run (so concurrent claimers of the run count one after the
//! other) and counts its live leases; then it counts down locally as it
//! leases, and candidates of a full run are passed over (they stay queued,
//! and paging goes on after them).

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::{
    ActionId, Cancellation, ClaimRequest, Error, HeartbeatOutcome, Lease, Phase, RunId,
};

/// A queued task action a claim may lease.
pub(crate) struct Candidate<P> {
    pub id: ActionId,
    /// Where the next page starts after this candidate.
    pub position: P,
    /// Its run's `max_action_concurrency` (0: unlimited).
    pub limit: i32,
}

/// A lease released because its action ended.
pub(crate) struct Released {
    pub id: ActionId,
    pub attempt: u32,
    pub phase: Phase,
    pub abort_reason: Option<String>,
}

/// The statements of a lease transaction that every backend runs as they
/// are (`shared_lease_tx_of_every_backend!`).
#[async_trait]
pub(crate) trait SharedLeaseTx: Send {
    /// A position in the claim order.
    type Position: Send + Sync;

    /// Up to `limit` queued task actions of `queue` after `after`, in the
    /// claim order, locked by this transaction (rows another claimer holds
    /// are skipped).
    async fn candidates(
        &mut self,
        queue: &str,
        after: Option<&Self::Position>,
        limit: usize,
    ) -> Result<Vec<Candidate<Self::Position>>, Error>;

    /// The executor's unfinished leases, and how many of them wait on
    /// unfinished children (counted only when `count_waiting`).
    async fn held(&mut self, executor: &str, count_waiting: bool) -> Result<(i64, i64), Error>;

    /// Releases the executor's leases whose action ended.
    async fn release_ended(&mut self, executor: &str) -> Result<Vec<Released>, Error>;

    /// Locks the run against other claimers and counts its live leases.
    async fn run_leases(&mut self, run: &RunId) -> Result<i64, Error>;
}

/// The statements of a claim or heartbeat transaction.
#[async_trait]
pub(crate) trait LeaseTx: SharedLeaseTx {
    /// Leases `ids` (locked by this transaction) to the executor: each
    /// moves to INITIALIZING under the lease, with an event. The leases
    /// come back in the order of `ids`.
    async fn lease(
        &mut self,
        ids: &[ActionId],
        request: &ClaimRequest,
    ) -> Result<Vec<Lease>, Error>;

    /// Extends the executor's live leases by `ttl`; returns the deadline.
    async fn extend(
        &mut self,
        executor: &str,
        ttl: std::time::Duration,
    ) -> Result<DateTime<Utc>, Error>;
}

/// How many more actions an executor may lease now, from its unfinished
/// leases (`held`) and how many of those wait on unfinished children
/// (`waiting`, counted only when `max_leases` > 0). Waiting parents do not
/// count against the capacity, so their children can run; `max_leases`
/// bounds all leases, and so the executor's processes.
pub(crate) fn free_leases(request: &ClaimRequest, held: i64, waiting: i64) -> i64 {
    let capacity = i64::from(request.capacity);
    if request.max_leases == 0 {
        return capacity - held;
    }
    let by_capacity = capacity - (held - waiting);
    let by_bound = i64::from(request.max_leases) - held;
    by_capacity.min(by_bound).max(0)
}

/// Leases queued task actions of `request.queue` up to the executor's free
/// capacity, oldest first, within each run's concurrency limit.
pub(crate) async fn claim<T: LeaseTx>(
    tx: &mut T,
    request: &ClaimRequest,
) -> Result<Vec<Lease>, Error> {
    let (held, waiting) = tx.held(&request.executor, request.max_leases > 0).await?;
    let free = usize::try_from(free_leases(request, held, waiting)).unwrap_or(0);
    let mut leases = Vec::new();
    if free == 0 {
        return Ok(leases);
    }
    // A candidate is locked as it is read (and the lock written to its
    // row), and every locked row is skipped by the other claimers, so the
    // first page holds only as many as may be leased. Later pages, read
    // only past runs at their concurrency limit, are larger.
    let mut page = free;
    // Limited runs met so far: how many more of their actions may be
    // leased. Only this transaction changes their leases until it commits.
    let mut room: HashMap<RunId, i64> = HashMap::new();
    let mut after: Option<T::Position> = None;
    loop {
        let candidates = tx.candidates(&request.queue, after.as_ref(), page).await?;
        let last_page = candidates.len() < page;
        let mut chosen = Vec::new();
        for candidate in candidates {
            if leases.len() + chosen.len() >= free {
                break;
            }
            after = Some(candidate.position);
            if candidate.limit > 0 {
                let left = match room.get_mut(&candidate.id.run) {
                    Some(left) => left,
                    None => {
                        let leased = tx.run_leases(&candidate.id.run).await?;
                        room.entry(candidate.id.run.clone())
                            .or_insert(i64::from(candidate.limit) - leased)
                    }
                };
                if *left <= 0 {
                    continue;
                }
                *left -= 1;
            }
            chosen.push(candidate.id);
        }
        leases.extend(tx.lease(&chosen, request).await?);
        if last_page || leases.len() >= free {
            return Ok(leases);
        }
        page = (free - leases.len()).saturating_mul(2).saturating_add(16);
    }
}

/// Releases the executor's ended leases (reporting the aborted ones, once)
/// and extends the live ones.
pub(crate) async fn heartbeat(
    tx: &mut impl LeaseTx,
    executor: &str,
    ttl: std::time::Duration,
) -> Result<HeartbeatOutcome, Error> {
    let cancelled = tx
        .release_ended(executor)
        .await?
        .into_iter()
        .filter(|released| released.phase == Phase::Aborted)
        .map(|released| Cancellation {
            id: released.id,
            attempt: released.attempt,
            reason: released.abort_reason.unwrap_or_default(),
        })
        .collect();
    let deadline = tx.extend(executor, ttl).await?;
    Ok(HeartbeatOutcome {
        deadline,
        cancelled,
    })
}

/// Sorts leases into the order of the ids they were made from.
pub(crate) fn in_order_of(ids: &[ActionId], mut leases: Vec<Lease>) -> Result<Vec<Lease>, Error> {
    if leases.len() != ids.len() {
        return Err(Error::Internal(format!(
            "leased {} of {} locked actions",
            leases.len(),
            ids.len()
        )));
    }
    let position: HashMap<&ActionId, usize> =
        ids.iter().enumerate().map(|(i, id)| (id, i)).collect();
    leases.sort_by_key(|lease| position.get(&lease.id).copied().unwrap_or(usize::MAX));
    Ok(leases)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn request(capacity: u32, max_leases: u32) -> ClaimRequest {
        ClaimRequest {
            executor: "e".into(),
            queue: "q".into(),
            capacity,
            max_leases,
            lease_ttl: Duration::from_secs(30),
        }
    }

    #[test]
    fn waiting_parents_free_their_slot_up_to_the_bound() {
        // Without a bound every lease counts.
        assert_eq!(free_leases(&request(2, 0), 2, 0), 0);
        // One of two leases waits on children: one more may run.
        assert_eq!(free_leases(&request(2, 8), 2, 1), 1);
        // Capacity 1, three nested parents waiting: the leaf may run.
        assert_eq!(free_leases(&request(1, 8), 3, 3), 1);
        // ...but never past the bound.
        assert_eq!(free_leases(&request(1, 3), 3, 3), 0);
        assert_eq!(free_leases(&request(4, 8), 0, 0), 4);
    }
}
