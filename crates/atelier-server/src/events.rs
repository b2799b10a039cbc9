//! The event bus: every state change the manager makes, numbered and delivered to
//! any number of subscribers (the SSE route, and later tasks, notifications and
//! integrations). Sandbox, prebuild and workspace changes come from the store's
//! observer (the one place their rows change); dev-command and build-log events
//! are published where they happen.
//!
//! Publishing never waits: each subscriber reads from a bounded broadcast channel,
//! and one that falls behind is told how many events it missed (`lagged`) instead
//! of slowing the manager. A bounded replay buffer serves `Last-Event-ID`; a client
//! whose last id is older than the buffer gets `resync`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use atelier_core::event::{Event, EventKind};
use atelier_store::{Change, now_ms};
use futures::Stream;
use tokio::sync::{broadcast, watch};

/// Events kept for `Last-Event-ID` replay.
pub const REPLAY_EVENTS: usize = 4096;
/// Events a subscriber may fall behind before it gets `lagged`.
pub const LIVE_EVENTS: usize = 1024;

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The next event.
    Event(Arc<Event>),
    /// Events the client asked to resume after are no longer kept (or its id is
    /// unknown): it must re-read the state it shows.
    Resync,
    /// The subscriber fell behind and this many events were dropped for it.
    Lagged(u64),
}

#[derive(Debug)]
struct Ring {
    next_id: u64,
    kept: VecDeque<Arc<Event>>,
    capacity: usize,
}

/// The manager's event bus; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct EventBus {
    ring: Mutex<Ring>,
    tx: broadcast::Sender<Arc<Event>>,
    closed: watch::Sender<bool>,
}

fn lock(m: &Mutex<Ring>) -> std::sync::MutexGuard<'_, Ring> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EventBus {
    /// A bus that keeps `replay` events for resuming clients and lets a subscriber
    /// fall `live` events behind before it is told it lagged.
    pub fn new(replay: usize, live: usize) -> Arc<EventBus> {
        // Ids continue from the clock so they keep growing across restarts.
        let first = u64::try_from(now_ms()).unwrap_or(0).saturating_mul(1000);
        Arc::new(EventBus {
            ring: Mutex::new(Ring {
                next_id: first.max(1),
                kept: VecDeque::with_capacity(replay.min(REPLAY_EVENTS)),
                capacity: replay.max(1),
            }),
            tx: broadcast::channel(live.max(1)).0,
            closed: watch::channel(false).0,
        })
    }

    /// Numbers, keeps and delivers an event; returns its id. Never waits.
    pub fn publish(&self, kind: EventKind) -> u64 {
        let mut ring = lock(&self.ring);
        let id = ring.next_id;
        ring.next_id += 1;
        let ev = Arc::new(Event {
            id,
            at_ms: now_ms(),
            kind,
        });
        if ring.kept.len() == ring.capacity {
            ring.kept.pop_front();
        }
        ring.kept.push_back(Arc::clone(&ev));
        // Sent under the ring lock, so live order is id order. No receivers is fine.
        let _ = self.tx.send(ev);
        id
    }

    /// The id the next event will get, minus one (0 before the first).
    pub fn last_id(&self) -> u64 {
        lock(&self.ring).next_id - 1
    }

    /// Ends every subscription (the manager is shutting down).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Subscribes: events after `after` (replayed from the buffer when given), then
    /// live ones. The stream ends when the bus closes.
    pub fn subscribe(&self, after: Option<u64>) -> impl Stream<Item = Delivery> + Send + use<> {
        let mut first = Vec::new();
        let rx;
        let replayed_to;
        {
            let ring = lock(&self.ring);
            rx = self.tx.subscribe();
            // Live events numbered up to here were replayed (or predate us).
            replayed_to = ring.next_id - 1;
            let last_seen = replayed_to;
            if let Some(after) = after {
                let oldest = ring.kept.front().map_or(ring.next_id, |e| e.id);
                if after + 1 < oldest || after > last_seen {
                    // Gone from the buffer, or from another manager's clock.
                    first.push(Delivery::Resync);
                } else {
                    first.extend(
                        ring.kept
                            .iter()
                            .filter(|e| e.id > after)
                            .map(|e| Delivery::Event(Arc::clone(e))),
                    );
                }
            }
        }
        let closed = self.closed.subscribe();
        let replay = futures::stream::iter(first);
        let live = futures::stream::unfold((rx, closed), move |(mut rx, mut closed)| async move {
            loop {
                if *closed.borrow() {
                    return None;
                }
                let got = tokio::select! {
                    r = rx.recv() => r,
                    _ = closed.changed() => return None,
                };
                match got {
                    Ok(ev) if ev.id <= replayed_to => continue,
                    Ok(ev) => return Some((Delivery::Event(ev), (rx, closed))),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        return Some((Delivery::Lagged(n), (rx, closed)));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        futures::StreamExt::chain(replay, live)
    }

    /// The observer to give the store: turns committed row changes into events.
    pub fn store_observer(self: &Arc<Self>) -> atelier_store::Observer {
        let bus = Arc::clone(self);
        Arc::new(move |c: Change| {
            bus.publish(from_change(c));
        })
    }
}

fn from_change(c: Change) -> EventKind {
    match c {
        Change::SandboxCreated(r) => EventKind::SandboxCreated {
            sandbox: r.id.to_string(),
            name: r.name,
            image: r.image,
        },
        Change::SandboxState { record, .. }
            if record.state == atelier_core::SandboxState::Deleted =>
        {
            EventKind::SandboxDeleted {
                sandbox: record.id.to_string(),
                name: record.name,
            }
        }
        Change::SandboxState {
            record,
            from,
            reason,
        } => EventKind::SandboxState {
            sandbox: record.id.to_string(),
            name: record.name,
            from,
            to: record.state,
            reason,
            error: record.error,
        },
        Change::Prebuild(p) => EventKind::PrebuildStatus {
            prebuild: p.id,
            workspace: p.workspace,
            status: p.status.shown(p.stale).to_owned(),
            error: p.error,
        },
        Change::PrebuildRemoved { id, workspace } => EventKind::PrebuildStatus {
            prebuild: id,
            workspace,
            status: "removed".into(),
            error: None,
        },
        Change::Task { record, from } => EventKind::TaskChanged {
            task: record.id,
            workspace: record.workspace,
            title: record.title,
            state: record.state,
            from,
            todos_done: record.todos_done,
            todos_total: record.todos_total,
            parked: record.parked,
            error: record.error,
        },
        Change::Attention(a) => EventKind::AttentionChanged {
            item: a.id,
            task: a.task,
            kind: a.kind,
            status: a.status,
            title: a.title,
        },
        Change::Workspace { name, deleted } => EventKind::WorkspaceChanged {
            workspace: name,
            deleted,
        },
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    fn ws(n: &str) -> EventKind {
        EventKind::WorkspaceChanged {
            workspace: n.into(),
            deleted: false,
        }
    }

    fn id_of(d: &Delivery) -> u64 {
        match d {
            Delivery::Event(e) => e.id,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn replays_exactly_what_was_missed_then_goes_live() {
        let bus = EventBus::new(16, 16);
        let a = bus.publish(ws("a"));
        let b = bus.publish(ws("b"));
        let c = bus.publish(ws("c"));
        let mut s = Box::pin(bus.subscribe(Some(a)));
        assert_eq!(id_of(&s.next().await.unwrap_or(Delivery::Resync)), b);
        assert_eq!(id_of(&s.next().await.unwrap_or(Delivery::Resync)), c);
        let d = bus.publish(ws("d"));
        assert_eq!(id_of(&s.next().await.unwrap_or(Delivery::Resync)), d);
        assert!(b == a + 1 && c == b + 1 && d == c + 1);
    }

    #[tokio::test]
    async fn too_old_or_unknown_ids_resync() {
        let bus = EventBus::new(2, 16);
        let a = bus.publish(ws("a"));
        bus.publish(ws("b"));
        bus.publish(ws("c"));
        let mut s = Box::pin(bus.subscribe(Some(a - 1)));
        assert_eq!(s.next().await, Some(Delivery::Resync));
        let mut s = Box::pin(bus.subscribe(Some(u64::MAX - 5)));
        assert_eq!(s.next().await, Some(Delivery::Resync));
        // The oldest kept event's predecessor is still a complete resume.
        let mut s = Box::pin(bus.subscribe(Some(a)));
        assert!(matches!(s.next().await, Some(Delivery::Event(_))));
    }

    #[tokio::test]
    async fn a_subscriber_that_never_reads_lags_without_blocking_publish() {
        let bus = EventBus::new(8, 4);
        let mut s = Box::pin(bus.subscribe(None));
        for i in 0..100 {
            bus.publish(ws(&format!("w{i}")));
        }
        assert_eq!(s.next().await, Some(Delivery::Lagged(96)));
        // Then the newest four arrive, in order.
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(id_of(&s.next().await.unwrap_or(Delivery::Resync)));
        }
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(*ids.last().unwrap_or(&0), bus.last_id());
    }

    #[tokio::test]
    async fn close_ends_streams() {
        let bus = EventBus::new(8, 8);
        let mut s = Box::pin(bus.subscribe(None));
        bus.close();
        assert_eq!(s.next().await, None);
    }
}
