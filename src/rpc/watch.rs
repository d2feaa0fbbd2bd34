//! The streaming path shared by WatchForUpdates and WatchRun: a snapshot,
//! a sentinel, then live changes, never an older state of an action after
//! a newer one.

use std::collections::HashMap;
use std::pin::Pin;

use futures_util::Stream;
use tonic::Status;

use crate::domain::{ActionState, Event};
use crate::pipeline::Subscription;

pub type MessageStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

/// Streams `snapshot` (each entry with the state it was read at), then
/// `sentinel`, then every change `subscription` receives that is newer
/// than what was already sent for its action. The subscription must have
/// been taken before the snapshot was read, so nothing in between is lost.
///
/// The stream never ends with OK while the daemon runs: when the
/// subscription closes (shutdown, or the feed failing) it ends with
/// UNAVAILABLE, on which clients reconnect and get a fresh snapshot.
pub fn snapshot_then_live<M, T>(
    snapshot: Vec<T>,
    state: fn(&T) -> &ActionState,
    message: fn(T) -> M,
    sentinel: M,
    subscription: Subscription,
    live: fn(&Event) -> M,
) -> MessageStream<M>
where
    M: Send + 'static,
    T: Send + 'static,
{
    Box::pin(async_stream::stream! {
        // The last version sent per action: nothing older is sent after.
        let mut sent: HashMap<String, i64> = HashMap::with_capacity(snapshot.len());
        for entry in snapshot {
            let state = state(&entry);
            sent.insert(state.id.name.clone(), state.version);
            yield Ok(message(entry));
        }
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
    })
}
