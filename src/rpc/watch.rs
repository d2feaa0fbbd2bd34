//! The streaming path shared by WatchForUpdates and WatchRun: a snapshot,
//! a sentinel, then live changes, never an older state of an action after
//! a newer one.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use futures_util::Stream;
use tonic::Status;

use crate::domain::{ActionState, Error, Event, Page};
use crate::pipeline::Subscription;

pub type MessageStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

/// How many states one page of a snapshot holds (pages are also bounded
/// in bytes: `domain::PAGE_BUDGET`). A stream holds one page at a time.
pub const SNAPSHOT_PAGE: usize = 256;

/// Streams a snapshot page by page (`first`, then what `fetch` returns for
/// each next position, read only as the client takes the previous page),
/// then `sentinel`, then every change `subscription` receives that is newer
/// than what was already sent for its action. The subscription must have
/// been taken before the first page was read, so nothing in between is
/// lost.
///
/// The stream never ends with OK while the daemon runs: when the
/// subscription closes (shutdown, or the feed failing) it ends with
/// UNAVAILABLE, on which clients reconnect and get a fresh snapshot.
#[allow(clippy::too_many_arguments)]
pub fn snapshot_then_live<M, T, P, F, Fut>(
    first: Page<T, P>,
    mut fetch: F,
    state: fn(&T) -> &ActionState,
    message: fn(T) -> M,
    sentinel: M,
    subscription: Subscription,
    live: fn(&Event) -> M,
) -> MessageStream<M>
where
    M: Send + 'static,
    T: Send + 'static,
    P: Send + 'static,
    F: FnMut(P) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Page<T, P>, Error>> + Send,
{
    Box::pin(async_stream::stream! {
        // The last version sent per action: nothing older is sent after.
        let mut sent: HashMap<String, i64> = HashMap::with_capacity(first.items.len());
        let mut page = first;
        let mut failed = None;
        loop {
            let next = page.next.take();
            for entry in page.items {
                let state = state(&entry);
                sent.insert(state.id.name.clone(), state.version);
                yield Ok(message(entry));
            }
            let Some(after) = next else { break };
            match fetch(after).await {
                Ok(more) => page = more,
                Err(err) => {
                    failed = Some(Status::from(err));
                    break;
                }
            }
        }
        if let Some(status) = failed {
            yield Err(status);
        } else {
            yield Ok(sentinel);
            loop {
                match subscription.next_batch().await {
                    Ok(batch) => {
                        for event in batch {
                            match sent.get_mut(&event.id.name) {
                                Some(last) if *last >= event.version => continue,
                                Some(last) => *last = event.version,
                                None => {
                                    sent.insert(event.id.name.clone(), event.version);
                                }
                            }
                            yield Ok(live(&event));
                        }
                    }
                    Err(reason) => {
                        yield Err(Status::unavailable(reason));
                        break;
                    }
                }
            }
        }
    })
}
