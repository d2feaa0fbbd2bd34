//! Subscribers of WatchForUpdates and their coalescing buffers.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use crate::domain::{Event, RunId, WatchKey};

/// What a subscription follows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// An action and its direct children (WatchForUpdates).
    Action(WatchKey),
    /// Every action of a run (the read API's WatchRun).
    Run(RunId),
}

/// Subscribers by what they follow. Two maps, so publishing looks both up
/// by borrowed keys without building a topic per event.
#[derive(Default)]
struct Subscribers {
    actions: HashMap<WatchKey, Vec<Arc<Subscriber>>>,
    runs: HashMap<RunId, Vec<Arc<Subscriber>>>,
}

impl Subscribers {
    fn is_empty(&self) -> bool {
        self.actions.is_empty() && self.runs.is_empty()
    }

    fn all(&self) -> impl Iterator<Item = &Arc<Subscriber>> {
        self.actions.values().chain(self.runs.values()).flatten()
    }
}

#[derive(Default)]
pub struct Registry {
    subscribers: RwLock<Subscribers>,
}

impl Registry {
    /// Registers a subscriber for `key`: the action and its children.
    /// Subscribe before reading the snapshot, so no change committed after
    /// the snapshot is missed.
    pub fn subscribe(self: &Arc<Self>, key: WatchKey) -> Subscription {
        self.subscribe_to(Topic::Action(key))
    }

    /// Registers a subscriber for every action of `run`.
    pub fn subscribe_run(self: &Arc<Self>, run: RunId) -> Subscription {
        self.subscribe_to(Topic::Run(run))
    }

    fn subscribe_to(self: &Arc<Self>, topic: Topic) -> Subscription {
        let subscriber = Arc::new(Subscriber::default());
        {
            let mut subscribers = self
                .subscribers
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let list = match &topic {
                Topic::Action(key) => subscribers.actions.entry(key.clone()).or_default(),
                Topic::Run(run) => subscribers.runs.entry(run.clone()).or_default(),
            };
            list.push(subscriber.clone());
        }
        Subscription {
            topic,
            subscriber,
            registry: self.clone(),
        }
    }

    /// Hands an event to everyone watching the action's parent (it is one
    /// of their children), the action itself, or its run.
    pub fn publish(&self, event: &Arc<Event>) {
        let subscribers = self
            .subscribers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if subscribers.is_empty() {
            return;
        }
        if let Some(watchers) = subscribers.actions.get(&event.id) {
            for subscriber in watchers {
                subscriber.offer(event);
            }
        }
        if let Some(watchers) = subscribers.runs.get(&event.id.run) {
            for subscriber in watchers {
                subscriber.offer(event);
            }
        }
        if let Some(parent) = &event.parent {
            if let Some(watchers) = subscribers.actions.get(&event.id.sibling(parent.clone())) {
                for subscriber in watchers {
                    subscriber.offer(event);
                }
            }
        }
    }

    /// Ends every open subscription once its buffered events are read.
    pub fn close_all(&self, reason: &str) {
        let subscribers = self
            .subscribers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for subscriber in subscribers.all() {
            subscriber.close(reason);
        }
    }

    /// Number of open subscriptions.
    pub fn len(&self) -> usize {
        self.subscribers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .all()
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remove(&self, topic: &Topic, subscriber: &Arc<Subscriber>) {
        fn retain<K: std::hash::Hash + Eq>(
            map: &mut HashMap<K, Vec<Arc<Subscriber>>>,
            key: &K,
            subscriber: &Arc<Subscriber>,
        ) {
            if let Some(list) = map.get_mut(key) {
                list.retain(|s| !Arc::ptr_eq(s, subscriber));
                if list.is_empty() {
                    map.remove(key);
                }
            }
        }
        let mut subscribers = self
            .subscribers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match topic {
            Topic::Action(key) => retain(&mut subscribers.actions, key, subscriber),
            Topic::Run(run) => retain(&mut subscribers.runs, run, subscriber),
        }
    }
}

/// The coalescing buffer of one stream: the latest pending state per
/// action, in the order actions first became pending.
#[derive(Default)]
struct Buffer {
    latest: HashMap<String, Arc<Event>>,
    order: VecDeque<String>,
    closed: Option<String>,
}

#[derive(Default)]
pub struct Subscriber {
    buffer: Mutex<Buffer>,
    ready: Notify,
}

impl Subscriber {
    /// Never blocks: a newer state replaces a pending older one.
    fn offer(&self, event: &Arc<Event>) {
        {
            let mut buffer = self
                .buffer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if buffer.closed.is_some() {
                return;
            }
            let buffer = &mut *buffer;
            match buffer.latest.entry(event.id.name.clone()) {
                Entry::Occupied(mut pending) => {
                    if event.version <= pending.get().version {
                        return;
                    }
                    pending.insert(event.clone());
                }
                Entry::Vacant(slot) => {
                    buffer.order.push_back(event.id.name.clone());
                    slot.insert(event.clone());
                }
            }
        }
        self.ready.notify_one();
    }

    fn close(&self, reason: &str) {
        {
            let mut buffer = self
                .buffer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if buffer.closed.is_none() {
                buffer.closed = Some(reason.to_owned());
            }
        }
        self.ready.notify_one();
    }

    /// Takes everything pending, waiting until something is. `Err` carries
    /// the reason the subscription was closed, once nothing is pending.
    async fn next_batch(&self) -> Result<Vec<Arc<Event>>, String> {
        loop {
            {
                let mut buffer = self
                    .buffer
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if !buffer.order.is_empty() {
                    let buffer = &mut *buffer;
                    let mut batch = Vec::with_capacity(buffer.order.len());
                    for name in buffer.order.drain(..) {
                        if let Some(event) = buffer.latest.remove(&name) {
                            batch.push(event);
                        }
                    }
                    return Ok(batch);
                }
                if let Some(reason) = &buffer.closed {
                    return Err(reason.clone());
                }
            }
            // `notify_one` stores a permit when nobody waits, so a wake-up
            // between the check above and this await is not lost.
            self.ready.notified().await;
        }
    }
}

/// A registered subscriber; unregisters itself when dropped (the stream
/// ended or the client went away).
pub struct Subscription {
    topic: Topic,
    subscriber: Arc<Subscriber>,
    registry: Arc<Registry>,
}

impl Subscription {
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// Waits for the next changes; see [`Subscriber::next_batch`].
    pub async fn next_batch(&self) -> Result<Vec<Arc<Event>>, String> {
        self.subscriber.next_batch().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.registry.remove(&self.topic, &self.subscriber);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ActionId, ActionState, Phase};

    fn event(name: &str, parent: Option<&str>, version: i64) -> Arc<Event> {
        Arc::new(ActionState {
            id: ActionId::in_test_run(name),
            parent: parent.map(str::to_owned),
            version,
            phase: Phase::Running,
            attempt: 1,
            output_uri: String::new(),
            error: None,
            value: None,
            queue: None,
            lease_holder: None,
            address: None,
        })
    }

    #[tokio::test]
    async fn coalesces_to_the_latest_version_per_action() {
        let registry = Arc::new(Registry::default());
        let sub = registry.subscribe(event("a0", None, 1).id.clone());
        for v in 1..=100 {
            registry.publish(&event("a1", Some("a0"), v));
            registry.publish(&event("a2", Some("a0"), v));
        }
        registry.publish(&event("a1", Some("a0"), 50));
        registry.publish(&event("a0", None, 7));
        registry.publish(&event("x1", Some("other"), 1));
        let batch = sub.next_batch().await.unwrap();
        let got: Vec<(String, i64)> = batch
            .iter()
            .map(|e| (e.id.name.clone(), e.version))
            .collect();
        assert_eq!(
            got,
            vec![("a1".into(), 100), ("a2".into(), 100), ("a0".into(), 7)]
        );
    }

    #[tokio::test]
    async fn run_subscribers_see_every_action_of_their_run_only() {
        let registry = Arc::new(Registry::default());
        let run = event("a0", None, 1).id.run.clone();
        let sub = registry.subscribe_run(run.clone());
        registry.publish(&event("a0", None, 2));
        registry.publish(&event("a1", Some("a0"), 1));
        registry.publish(&event("a2", Some("a1"), 1));
        let mut other = (*event("b0", None, 1)).clone();
        other.id.run.name = "elsewhere".into();
        registry.publish(&Arc::new(other));
        let names: Vec<String> = sub
            .next_batch()
            .await
            .unwrap()
            .iter()
            .map(|e| e.id.name.clone())
            .collect();
        assert_eq!(names, ["a0", "a1", "a2"]);
        assert_eq!(sub.topic(), &Topic::Run(run));
        drop(sub);
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn close_delivers_pending_first_and_drop_unregisters() {
        let registry = Arc::new(Registry::default());
        let sub = registry.subscribe(event("a0", None, 1).id.clone());
        registry.publish(&event("a1", Some("a0"), 3));
        registry.close_all("bye");
        assert_eq!(sub.next_batch().await.unwrap().len(), 1);
        assert_eq!(sub.next_batch().await.unwrap_err(), "bye");
        assert_eq!(registry.len(), 1);
        drop(sub);
        assert!(registry.is_empty());
    }
}
