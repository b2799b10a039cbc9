//! Cached, batched firewall updates for DNS-learned destinations.
//!
//! Every allowed DNS answer of an allow-list guest must open the firewall for its
//! addresses before the answer is released. Running `nft` once per answer lets a guest
//! that loops DNS queries make the manager spawn a process per query. The
//! [`AllowBatcher`] instead remembers which (guest, destination) pairs are open and
//! until when (an answer for an open pair needs no update at all), and a single task
//! applies what is new: every request that arrives while one update runs goes into the
//! next one, so at most one `nft` process runs at a time, however many guests query.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::Firewall;

/// Shortest time a firewall entry for a DNS answer stays open: resolvers and clients
/// cache answers, so a cached address must still connect.
pub const MIN_FIREWALL_TIMEOUT: Duration = Duration::from_secs(600);

/// A cached pair is used (no update) only while it stays open at least this long.
const CACHE_MARGIN: Duration = Duration::from_secs(60);

/// Requests waiting for the update task; senders wait when it is full.
const REQUEST_QUEUE: usize = 1024;

/// Most requests merged into one update.
const MAX_BATCH: usize = 512;

/// Most (guest, destination) pairs remembered; expired ones are pruned beyond this,
/// and if that is not enough the cache starts over (costing only repeated updates).
pub const MAX_CACHED_PAIRS: usize = 65_536;

/// One firewall entry: guest, destination, how long it stays open.
pub type AllowEntry = (Ipv4Addr, Ipv4Addr, Duration);

/// Applies a batch of entries (one `nft` run for the real [`Firewall`]).
pub trait AllowSink: Send + Sync + 'static {
    /// Opens the firewall for every entry; an `Err` is a message for the log.
    fn apply(&self, entries: Vec<AllowEntry>) -> BoxFuture<'static, Result<(), String>>;
}

impl AllowSink for Firewall {
    fn apply(&self, entries: Vec<AllowEntry>) -> BoxFuture<'static, Result<(), String>> {
        let fw = self.clone();
        Box::pin(async move { fw.allow_many(&entries).await.map_err(|e| e.to_string()) })
    }
}

/// The lifetime of the firewall entry for a DNS answer with this TTL.
pub fn firewall_timeout(ttl: Duration) -> Duration {
    ttl.max(MIN_FIREWALL_TIMEOUT)
}

struct Request {
    entries: Vec<AllowEntry>,
    done: oneshot::Sender<Result<(), String>>,
}

#[derive(Default)]
struct Cache {
    /// Until when each (guest, destination) pair is open.
    open: HashMap<(Ipv4Addr, Ipv4Addr), Instant>,
}

impl Cache {
    /// The entries not already open for long enough.
    fn missing(&self, entries: &[AllowEntry], now: Instant) -> Vec<AllowEntry> {
        entries
            .iter()
            .filter(|(g, d, _)| {
                self.open
                    .get(&(*g, *d))
                    .is_none_or(|until| *until < now + CACHE_MARGIN)
            })
            .copied()
            .collect()
    }

    fn insert(&mut self, entries: &[AllowEntry], now: Instant) {
        if self.open.len() + entries.len() > MAX_CACHED_PAIRS {
            self.open.retain(|_, until| *until > now);
            if self.open.len() + entries.len() > MAX_CACHED_PAIRS {
                self.open.clear();
            }
        }
        for (g, d, ttl) in entries {
            let until = now + firewall_timeout(*ttl);
            let slot = self.open.entry((*g, *d)).or_insert(until);
            *slot = (*slot).max(until);
        }
    }
}

/// Cached, batched firewall updates; see the module docs. Dropping it stops its task.
pub struct AllowBatcher {
    tx: mpsc::Sender<Request>,
    cache: Arc<StdMutex<Cache>>,
    updates: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for AllowBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllowBatcher")
            .field("updates", &self.updates())
            .finish_non_exhaustive()
    }
}

fn lock(cache: &StdMutex<Cache>) -> std::sync::MutexGuard<'_, Cache> {
    cache.lock().unwrap_or_else(|e| e.into_inner())
}

impl AllowBatcher {
    /// Starts the update task on the current tokio runtime.
    pub fn spawn(sink: Arc<dyn AllowSink>) -> AllowBatcher {
        let (tx, rx) = mpsc::channel(REQUEST_QUEUE);
        let cache = Arc::new(StdMutex::new(Cache::default()));
        let updates = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(sink, rx, cache.clone(), updates.clone()));
        AllowBatcher {
            tx,
            cache,
            updates,
            task,
        }
    }

    /// Opens the firewall for `client` to each destination for (at least) its time to
    /// live; returns once the entries are in place (at once when they already were).
    pub async fn allow(
        &self,
        client: Ipv4Addr,
        dests: &[(Ipv4Addr, Duration)],
    ) -> Result<(), String> {
        let entries: Vec<AllowEntry> = dests.iter().map(|(d, t)| (client, *d, *t)).collect();
        let missing = lock(&self.cache).missing(&entries, Instant::now());
        if missing.is_empty() {
            return Ok(());
        }
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Request {
                entries: missing,
                done,
            })
            .await
            .map_err(|_| "the firewall update task stopped".to_owned())?;
        rx.await
            .map_err(|_| "the firewall update task stopped".to_owned())?
    }

    /// Forgets what is cached for `client` (its firewall entries were removed, so the
    /// next holder of the address starts clean).
    pub fn forget(&self, client: Ipv4Addr) {
        lock(&self.cache).open.retain(|(g, _), _| *g != client);
    }

    /// Firewall updates applied so far (one `nft` run each).
    pub fn updates(&self) -> u64 {
        self.updates.load(Ordering::Relaxed)
    }
}

impl Drop for AllowBatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(
    sink: Arc<dyn AllowSink>,
    mut rx: mpsc::Receiver<Request>,
    cache: Arc<StdMutex<Cache>>,
    updates: Arc<AtomicU64>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut entries: Vec<AllowEntry> = Vec::new();
        for r in &batch {
            for e in &r.entries {
                match entries.iter_mut().find(|x| x.0 == e.0 && x.1 == e.1) {
                    Some(x) => x.2 = x.2.max(e.2),
                    None => entries.push(*e),
                }
            }
        }
        // An earlier batch may have opened some of them meanwhile.
        let missing = lock(&cache).missing(&entries, Instant::now());
        let result = if missing.is_empty() {
            Ok(())
        } else {
            updates.fetch_add(1, Ordering::Relaxed);
            let r = sink.apply(missing.clone()).await;
            if r.is_ok() {
                lock(&cache).insert(&missing, Instant::now());
            }
            r
        };
        for r in batch {
            let _ = r.done.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records every batch; optionally slow, so requests pile up behind one update.
    #[derive(Default)]
    struct Recorder {
        batches: Mutex<Vec<Vec<AllowEntry>>>,
        delay: Duration,
        fail: bool,
    }

    impl AllowSink for Recorder {
        fn apply(&self, entries: Vec<AllowEntry>) -> BoxFuture<'static, Result<(), String>> {
            self.batches.lock().unwrap().push(entries);
            let (delay, fail) = (self.delay, self.fail);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                if fail {
                    Err("simulated nft failure".into())
                } else {
                    Ok(())
                }
            })
        }
    }

    const G: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
    const T: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn repeated_answers_are_cached_and_concurrent_ones_batched() {
        let sink = Arc::new(Recorder {
            delay: Duration::from_millis(200),
            ..Default::default()
        });
        let b = Arc::new(AllowBatcher::spawn(sink.clone()));
        // 200 concurrent answers for 20 destinations: a few updates, not 200.
        let mut tasks = Vec::new();
        for i in 0..200u8 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                b.allow(G, &[(Ipv4Addr::new(1, 1, 1, i % 20), T)]).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let batches = sink.batches.lock().unwrap().len();
        assert!(batches <= 3, "{batches} updates for 200 answers");
        let entries: usize = sink.batches.lock().unwrap().iter().map(Vec::len).sum();
        assert_eq!(entries, 20, "every pair applied once");
        // Cached: no further update.
        for i in 0..20u8 {
            b.allow(G, &[(Ipv4Addr::new(1, 1, 1, i), T)]).await.unwrap();
        }
        assert_eq!(sink.batches.lock().unwrap().len(), batches);
        assert_eq!(b.updates(), batches as u64);
        // After forget, the pair is applied again.
        b.forget(G);
        b.allow(G, &[(Ipv4Addr::new(1, 1, 1, 0), T)]).await.unwrap();
        assert_eq!(sink.batches.lock().unwrap().len(), batches + 1);
    }

    #[tokio::test]
    async fn failures_are_reported_and_not_cached() {
        let sink = Arc::new(Recorder {
            fail: true,
            ..Default::default()
        });
        let b = AllowBatcher::spawn(sink.clone());
        let d = [(Ipv4Addr::new(1, 2, 3, 4), T)];
        assert!(b.allow(G, &d).await.is_err());
        assert!(b.allow(G, &d).await.is_err());
        assert_eq!(sink.batches.lock().unwrap().len(), 2);
    }

    #[test]
    fn cache_is_bounded() {
        let mut c = Cache::default();
        let now = Instant::now();
        let many: Vec<AllowEntry> = (0..MAX_CACHED_PAIRS as u32 + 10)
            .map(|i| (G, Ipv4Addr::from(i), T))
            .collect();
        c.insert(&many[..MAX_CACHED_PAIRS], now);
        c.insert(&many[MAX_CACHED_PAIRS..], now);
        assert!(c.open.len() <= MAX_CACHED_PAIRS);
        assert_eq!(firewall_timeout(T), MIN_FIREWALL_TIMEOUT);
    }
}
