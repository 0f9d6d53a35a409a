//! Lifecycle events of pods and containers (created, started, stopped,
//! deleted), published as containerd's CRI plugin publishes them on
//! `GetContainerEvents` for kubelet's Evented PLEG. Each event carries a
//! snapshot of its pod and the pod's containers taken when it happened, so
//! a reader that lags still sees the state the event announces, not a later
//! one. A sandbox's events name the pod's id as the container id, as
//! containerd's do.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::model::{Container, Pod};

/// Events a reader may lag behind by before it is told it missed some.
const CAPACITY: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Created,
    Started,
    Stopped,
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleEvent {
    /// The container's id, or the pod's for an event of its sandbox.
    pub id: String,
    pub kind: Kind,
    /// Nanoseconds since the epoch.
    pub at: i64,
    /// The pod as it was then (`None` only if it was already gone).
    pub pod: Option<Pod>,
    /// The pod's containers as they were then.
    pub containers: Vec<Container>,
}

/// One sender, any number of readers; publishing with no reader costs
/// nothing (no snapshot is taken).
pub struct Publisher {
    tx: broadcast::Sender<Arc<LifecycleEvent>>,
}

impl Default for Publisher {
    fn default() -> Self {
        Publisher {
            tx: broadcast::channel(CAPACITY).0,
        }
    }
}

impl Publisher {
    /// A reader of every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LifecycleEvent>> {
        self.tx.subscribe()
    }

    /// Publishes `kind` for `id`, with `pod` and its `containers` as they
    /// are now.
    pub fn publish<'a>(
        &self,
        id: &str,
        kind: Kind,
        pod: Option<&Pod>,
        containers: impl Iterator<Item = &'a Container>,
    ) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let event = LifecycleEvent {
            id: id.to_string(),
            kind,
            at: super::model::now_nanos(),
            pod: pod.cloned(),
            containers: containers.cloned().collect(),
        };
        // Err only when every reader went meanwhile: nobody to tell.
        let _ = self.tx.send(Arc::new(event));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_see_events_from_their_subscription_on_in_order() {
        let p = Publisher::default();
        p.publish("early", Kind::Created, None, std::iter::empty());
        let mut rx = p.subscribe();
        p.publish("a", Kind::Created, None, std::iter::empty());
        p.publish("a", Kind::Started, None, std::iter::empty());
        let first = rx.try_recv().unwrap();
        assert_eq!((first.id.as_str(), first.kind), ("a", Kind::Created));
        assert!(first.at > 0);
        assert_eq!(rx.try_recv().unwrap().kind, Kind::Started);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_reader_that_lags_is_told() {
        let p = Publisher::default();
        let mut rx = p.subscribe();
        for _ in 0..CAPACITY + 1 {
            p.publish("a", Kind::Stopped, None, std::iter::empty());
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(1))
        ));
    }
}
