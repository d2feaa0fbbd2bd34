//! Lease streams waiting for work. Workers wake the streams of a queue when
//! an event says a task action there became QUEUED or finished (freeing
//! capacity or room under a run's concurrency limit), and push a
//! cancellation to the streams of the executor that holds an aborted lease.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tokio::sync::Notify;

use crate::domain::{Event, Phase};

/// Cancellations buffered per stream: bounded by the executor's leases.
#[derive(Default)]
pub struct LeaseWaiter {
    wake: Notify,
    cancelled: Mutex<Vec<Arc<Event>>>,
}

impl LeaseWaiter {
    /// Waits until there may be work (or a cancellation).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Aborted actions leased to this executor, since the last call.
    pub fn take_cancelled(&self) -> Vec<Arc<Event>> {
        std::mem::take(
            &mut *self
                .cancelled
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }
}

#[derive(Default)]
pub struct ExecutorRegistry {
    by_queue: RwLock<HashMap<String, Vec<Arc<LeaseWaiter>>>>,
    by_executor: RwLock<HashMap<String, Vec<Arc<LeaseWaiter>>>>,
}

impl ExecutorRegistry {
    pub fn register(self: &Arc<Self>, queue: &str, executor: &str) -> LeaseRegistration {
        let waiter = Arc::new(LeaseWaiter::default());
        for (map, key) in [(&self.by_queue, queue), (&self.by_executor, executor)] {
            map.write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(key.to_owned())
                .or_default()
                .push(waiter.clone());
        }
        LeaseRegistration {
            registry: self.clone(),
            queue: queue.to_owned(),
            executor: executor.to_owned(),
            waiter,
        }
    }

    pub fn publish(&self, event: &Arc<Event>) {
        let Some(queue) = &event.queue else {
            return;
        };
        if event.phase == Phase::Queued || event.phase.is_terminal() {
            if let Some(waiters) = self
                .by_queue
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(queue)
            {
                for waiter in waiters {
                    waiter.wake.notify_one();
                }
            }
        }
        if event.phase == Phase::Aborted {
            if let Some(holder) = &event.lease_holder {
                if let Some(waiters) = self
                    .by_executor
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(holder)
                {
                    for waiter in waiters {
                        waiter
                            .cancelled
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(event.clone());
                        waiter.wake.notify_one();
                    }
                }
            }
        }
    }

    /// Wakes the streams of `queue`, or of every queue when `None`.
    pub fn wake_queue(&self, queue: Option<&str>) {
        let by_queue = self.by_queue.read().unwrap_or_else(PoisonError::into_inner);
        let waiters: Box<dyn Iterator<Item = &Arc<LeaseWaiter>>> = match queue {
            Some(queue) => Box::new(by_queue.get(queue).into_iter().flatten()),
            None => Box::new(by_queue.values().flatten()),
        };
        for waiter in waiters {
            waiter.wake.notify_one();
        }
    }

    fn remove(&self, queue: &str, executor: &str, waiter: &Arc<LeaseWaiter>) {
        for (map, key) in [(&self.by_queue, queue), (&self.by_executor, executor)] {
            let mut map = map.write().unwrap_or_else(PoisonError::into_inner);
            if let Some(list) = map.get_mut(key) {
                list.retain(|w| !Arc::ptr_eq(w, waiter));
                if list.is_empty() {
                    map.remove(key);
                }
            }
        }
    }
}

/// A registered lease stream; unregisters itself when dropped.
pub struct LeaseRegistration {
    registry: Arc<ExecutorRegistry>,
    queue: String,
    executor: String,
    waiter: Arc<LeaseWaiter>,
}

impl std::ops::Deref for LeaseRegistration {
    type Target = LeaseWaiter;

    fn deref(&self) -> &LeaseWaiter {
        &self.waiter
    }
}

impl Drop for LeaseRegistration {
    fn drop(&mut self) {
        self.registry
            .remove(&self.queue, &self.executor, &self.waiter);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Whether the waiter has a wake-up stored (it is consumed).
    async fn was_woken(waiter: &LeaseWaiter) -> bool {
        tokio::time::timeout(Duration::from_millis(50), waiter.woken())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn wake_queue_wakes_the_streams_of_that_queue_or_of_all() {
        let registry = Arc::new(ExecutorRegistry::default());
        let a = registry.register("a", "e1");
        let b = registry.register("b", "e2");

        registry.wake_queue(Some("a"));
        assert!(was_woken(&a).await);
        assert!(!was_woken(&b).await);

        registry.wake_queue(Some("unknown"));
        assert!(!was_woken(&a).await);
        assert!(!was_woken(&b).await);

        registry.wake_queue(None);
        assert!(was_woken(&a).await);
        assert!(was_woken(&b).await);

        // A dropped stream is no longer woken, and waking its queue is
        // harmless.
        drop(a);
        registry.wake_queue(Some("a"));
        registry.wake_queue(None);
        assert!(was_woken(&b).await);
    }
}
