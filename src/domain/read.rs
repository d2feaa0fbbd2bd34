//! What the read API asks of a store and what it gets back: full action
//! records, run summaries, an action's history, and page positions.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{ActionId, ActionKind, ActionState, Error, Phase, RunId};

/// An action as the store holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionRecord {
    pub state: ActionState,
    pub kind: ActionKind,
    /// The `Action` message as enqueued.
    pub spec: Bytes,
    /// Set while a lease is live.
    pub lease_deadline: Option<DateTime<Utc>>,
    pub abort_reason: Option<String>,
    /// The encoded `EnrichedIdentity` of who aborted the action.
    pub aborted_by: Option<Bytes>,
    /// The encoded `EnrichedIdentity` of who signalled the condition.
    pub signalled_by: Option<Bytes>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    /// When a condition times out.
    pub deadline: Option<DateTime<Utc>>,
}

impl ActionRecord {
    /// This record's position in the action listing order.
    pub fn position(&self) -> ActionPosition {
        ActionPosition {
            created_at: self.created_at,
            id: self.state.id.clone(),
        }
    }
}

/// Which actions a listing returns: those matching every filter given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ActionFilter {
    pub run: Option<RunId>,
    /// Direct children of this action of `run`.
    pub parent: Option<String>,
    /// Any of these phases; empty means any phase.
    pub phases: Vec<Phase>,
    /// Task actions of this queue.
    pub queue: Option<String>,
}

/// Where an action listing continues: after this action in the order
/// (created_at, org, project, domain, run, name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionPosition {
    pub created_at: DateTime<Utc>,
    pub id: ActionId,
}

/// Where a watch snapshot continues: after this child in the order
/// (created_at, name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPosition {
    pub created_at: DateTime<Utc>,
    pub name: String,
}

impl SnapshotPosition {
    /// Before every child.
    pub fn start() -> Self {
        Self {
            created_at: super::limits::min_time(),
            name: String::new(),
        }
    }
}

/// Which runs a listing returns; each filter applies when set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFilter {
    pub org: Option<String>,
    pub project: Option<String>,
    pub domain: Option<String>,
}

/// Where a run listing continues: after (older than) this run in the order
/// (created_at, org, project, domain, name), newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPosition {
    pub created_at: DateTime<Utc>,
    pub id: RunId,
}

/// A run with how many of its actions are in each phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub id: RunId,
    pub root_name: String,
    /// The root action's phase.
    pub phase: Phase,
    /// Actions per phase, in phase order; phases with none are left out.
    pub counts: Vec<(Phase, u32)>,
    pub queue: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl RunRecord {
    pub fn position(&self) -> RunPosition {
        RunPosition {
            created_at: self.created_at,
            id: self.id.clone(),
        }
    }
}

/// One accepted change of an action: the state it produced and when.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    pub state: ActionState,
    pub at: DateTime<Utc>,
    /// The authenticated principal that asked for the change; `None` for
    /// changes the daemon made itself or made without authentication.
    pub by: Option<String>,
}

/// A page of a listing: up to `limit` items after `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest<P> {
    pub limit: usize,
    pub after: Option<P>,
}

/// Items of one page, and where the next page starts (`None` on the last).
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T, P> {
    pub items: Vec<T>,
    pub next: Option<P>,
}

impl<T, P> Page<T, P> {
    /// Builds a page from up to `limit + 1` items read in order: an extra
    /// item means there is a next page, which starts after the last item
    /// kept.
    pub fn from_overfetch(mut items: Vec<T>, limit: usize, position: impl Fn(&T) -> P) -> Self {
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(position)
        } else {
            None
        };
        Self { items, next }
    }

    /// Like [`Page::from_overfetch`], and the page also ends once the items
    /// kept reach `budget` bytes as `size` counts them (at least one item is
    /// always kept), with a position to continue from.
    pub fn from_overfetch_within(
        mut items: Vec<T>,
        limit: usize,
        position: impl Fn(&T) -> P,
        size: impl Fn(&T) -> usize,
        budget: usize,
    ) -> Self {
        let mut total = 0usize;
        let mut keep = 0usize;
        for item in items.iter().take(limit) {
            if keep > 0 && total.saturating_add(size(item)) > budget {
                break;
            }
            total = total.saturating_add(size(item));
            keep += 1;
        }
        if keep < limit.min(items.len()) {
            items.truncate(keep);
            let next = items.last().map(position);
            return Self { items, next };
        }
        Self::from_overfetch(items, limit, position)
    }
}

/// The most bytes of action state one page of a listing or of a snapshot
/// holds (as [`ActionState::approximate_size`] counts them); a page that
/// reaches it ends early with a token for the rest.
pub const PAGE_BUDGET: usize = 1024 * 1024;

impl ActionState {
    /// About how many bytes this state takes on the wire: every variable
    /// field, plus a fixed allowance for numbers and framing.
    pub fn approximate_size(&self) -> usize {
        let id = &self.id;
        let opt = |b: &Option<bytes::Bytes>| b.as_ref().map_or(0, bytes::Bytes::len);
        64 + id.run.org.len()
            + id.run.project.len()
            + id.run.domain.len()
            + id.run.name.len()
            + id.name.len()
            + self.parent.as_ref().map_or(0, String::len)
            + self.output_uri.len()
            + opt(&self.error)
            + opt(&self.value)
            + opt(&self.address)
            + self.queue.as_ref().map_or(0, String::len)
            + self.lease_holder.as_ref().map_or(0, String::len)
    }
}

impl ActionRecord {
    /// About how many bytes this record's summary takes on the wire (the
    /// spec excluded: listings do not carry it).
    pub fn approximate_size(&self) -> usize {
        self.state.approximate_size() + 64 + self.abort_reason.as_ref().map_or(0, String::len)
    }
}

/// Page tokens are opaque to clients: URL-safe base64 of a small JSON
/// object naming the last item returned. The fields are short because the
/// token travels in every request of a listing.
#[derive(Serialize, Deserialize)]
struct TokenBody {
    /// Which listing the token belongs to.
    k: String,
    /// created_at, microseconds since the epoch.
    t: i64,
    /// org, project, domain, run name and (actions only) action name.
    id: Vec<String>,
}

const ACTIONS_TOKEN: &str = "actions";
const RUNS_TOKEN: &str = "runs";

fn encode_token(kind: &str, created_at: DateTime<Utc>, id: Vec<String>) -> String {
    let body = TokenBody {
        k: kind.to_owned(),
        t: created_at.timestamp_micros(),
        id,
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&body).expect("a token body serializes"))
}

fn decode_token(
    kind: &str,
    token: &str,
    parts: usize,
) -> Result<(DateTime<Utc>, Vec<String>), Error> {
    let invalid = || Error::invalid("page_token", "is not a token this listing returned");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let body: TokenBody = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    if body.k != kind || body.id.len() != parts {
        return Err(invalid());
    }
    let created_at = DateTime::from_timestamp_micros(body.t).ok_or_else(invalid)?;
    Ok((created_at, body.id))
}

impl ActionPosition {
    pub fn to_token(&self) -> String {
        let run = &self.id.run;
        encode_token(
            ACTIONS_TOKEN,
            self.created_at,
            vec![
                run.org.clone(),
                run.project.clone(),
                run.domain.clone(),
                run.name.clone(),
                self.id.name.clone(),
            ],
        )
    }

    pub fn from_token(token: &str) -> Result<Self, Error> {
        let (created_at, id) = decode_token(ACTIONS_TOKEN, token, 5)?;
        let [org, project, domain, run, name]: [String; 5] =
            id.try_into().expect("decode_token checked the length");
        Ok(Self {
            created_at,
            id: ActionId::new(
                RunId {
                    org,
                    project,
                    domain,
                    name: run,
                },
                name,
            ),
        })
    }
}

impl RunPosition {
    pub fn to_token(&self) -> String {
        encode_token(
            RUNS_TOKEN,
            self.created_at,
            vec![
                self.id.org.clone(),
                self.id.project.clone(),
                self.id.domain.clone(),
                self.id.name.clone(),
            ],
        )
    }

    pub fn from_token(token: &str) -> Result<Self, Error> {
        let (created_at, id) = decode_token(RUNS_TOKEN, token, 4)?;
        let [org, project, domain, name]: [String; 4] =
            id.try_into().expect("decode_token checked the length");
        Ok(Self {
            created_at,
            id: RunId {
                org,
                project,
                domain,
                name,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_foreign_ones_are_refused() {
        let position = ActionPosition {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: ActionId::in_test_run("a0"),
        };
        let token = position.to_token();
        assert_eq!(ActionPosition::from_token(&token).unwrap(), position);
        // A run token is not an action token, and garbage is refused.
        let run = RunPosition {
            created_at: position.created_at,
            id: position.id.run.clone(),
        };
        assert_eq!(RunPosition::from_token(&run.to_token()).unwrap(), run);
        for bad in [run.to_token().as_str(), "", "!!", "e30"] {
            let err = ActionPosition::from_token(bad).unwrap_err();
            assert!(err.to_string().starts_with("page_token:"), "{err}");
        }
    }

    #[test]
    fn overfetch_sets_the_next_position_only_when_more_exist() {
        let page = Page::from_overfetch(vec![1, 2, 3], 2, |n| *n);
        assert_eq!((page.items, page.next), (vec![1, 2], Some(2)));
        let page = Page::from_overfetch(vec![1, 2], 2, |n| *n);
        assert_eq!((page.items, page.next), (vec![1, 2], None));
    }
}
