//! DNS forwarder for guests: the only resolver a sandbox can reach, and the place where
//! egress allow-lists are enforced.
//!
//! The manager runs one [`DnsForwarder`] on the bridge address (e.g. `10.88.0.1:53`,
//! UDP and TCP). For each query it asks [`EgressHooks::policy_for`] which sandbox the
//! guest address belongs to and what that sandbox may reach:
//!
//! - not a sandbox, or [`EgressPolicy::DenyAll`]: `REFUSED`;
//! - [`EgressPolicy::AllowAll`]: the query is forwarded unchanged and the upstream
//!   answer returned unchanged (only the message id is swapped on the way);
//! - [`EgressPolicy::AllowList`]: names outside the list are `REFUSED`; for listed
//!   names the A records of the upstream answer are handed to [`EgressHooks::allow`],
//!   which opens the firewall for them, *before* the answer is released, so the guest
//!   cannot connect before the rule exists. AAAA queries get an empty answer because
//!   guests are IPv4-only and an empty answer makes them fall back at once.
//!
//! Everything the guest sends is untrusted: sizes are bounded, unparsable packets are
//! dropped, in-flight work is capped, and packets are never logged.
//!
//! Limits per guest (see `docs/security.md`): each guest address has its own quota of
//! queries in flight ([`MAX_IN_FLIGHT_PER_GUEST`]) and a query rate
//! ([`GUEST_QUERY_BURST`], [`GUEST_QUERY_RATE`]); over quota, UDP queries are dropped
//! and TCP connections closed, so one looping guest cannot take the forwarder (or the
//! firewall updates behind it) from the others. An allow-listed name whose answer lies
//! in a blocked range ([`DnsForwarder::with_blocked_answers`]: private ranges,
//! 169.254.0.0/16 and its metadata address, loopback, the host's own addresses) has
//! those addresses removed from the answer and the firewall is not opened for them.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use atelier_core::EgressPolicy;
use futures::future::BoxFuture;
use hickory_proto::op::{Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use ipnet::Ipv4Net;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tracing::{debug, warn};

/// How long one upstream gets to answer (per transport) before the next is tried.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest UDP query accepted from a guest; larger datagrams are dropped. Also the most
/// we send back over UDP, whatever the guest's EDNS buffer claims.
pub const MAX_UDP_MESSAGE: usize = 4096;
/// Queries being worked on at once (UDP and TCP together); beyond this new UDP
/// queries are dropped and TCP connections closed, so a flooding guest cannot make the
/// manager allocate without bound. Clients retry.
pub const MAX_IN_FLIGHT: usize = 256;
/// Open TCP connections at once.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// Queries answered on one TCP connection before it is closed.
pub const MAX_QUERIES_PER_TCP_CONNECTION: usize = 16;
/// How long a TCP connection may sit without delivering a whole query (or accepting a
/// whole answer) before it is closed.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest lifetime handed to [`EgressHooks::allow`]: very short DNS TTLs would make
/// the firewall entry expire between the answer and the guest's connect.
pub const MIN_ALLOW_TTL: Duration = Duration::from_secs(30);
/// Longest lifetime handed to [`EgressHooks::allow`]; answers are rewritten so the
/// guest does not cache an address longer than the firewall keeps it open.
pub const MAX_ALLOW_TTL: Duration = Duration::from_secs(3600);
/// How long [`EgressHooks::allow`] may take before the query is answered `SERVFAIL`,
/// so a stuck firewall update cannot pin a query slot forever.
pub const ALLOW_HOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// Queries of one guest address being worked on at once.
pub const MAX_IN_FLIGHT_PER_GUEST: usize = 16;
/// Queries one guest address may send in a burst ...
pub const GUEST_QUERY_BURST: u32 = 200;
/// ... and per second after that.
pub const GUEST_QUERY_RATE: u32 = 50;
/// Guest addresses whose quota state is kept; idle ones are pruned beyond this.
const MAX_TRACKED_GUESTS: usize = 4096;

/// Smallest DNS message: the 12-byte header.
const HEADER_LEN: usize = 12;
/// Largest DNS message over TCP (the 2-byte length prefix).
const MAX_TCP_MESSAGE: usize = u16::MAX as usize;
/// Plain DNS UDP payload limit when the client sent no EDNS (RFC 1035).
const CLASSIC_UDP_LIMIT: usize = 512;
/// Tries at picking an ephemeral port free for both UDP and TCP.
const BIND_ATTEMPTS: usize = 32;

/// What the forwarder needs from the sandbox manager.
pub trait EgressHooks: Send + Sync + 'static {
    /// Policy of the sandbox owning this guest address; `None` means the address is
    /// not a sandbox and the query is refused.
    fn policy_for(&self, client: Ipv4Addr) -> Option<EgressPolicy>;

    /// Called for allow-list sandboxes before an answer is sent, with the A records
    /// the upstream returned for an allowed name (address and TTL clamped to
    /// [`MIN_ALLOW_TTL`]..=[`MAX_ALLOW_TTL`]). The manager adds them to the sandbox's
    /// firewall set; the answer is released only after this resolves `Ok`, so the guest
    /// cannot race its connect against the firewall update. An `Err` (a message for
    /// the log) turns the answer into `SERVFAIL`.
    fn allow(
        &self,
        client: Ipv4Addr,
        addrs: Vec<(Ipv4Addr, Duration)>,
    ) -> BoxFuture<'static, Result<(), String>>;
}

/// The guests' DNS forwarder, bound but not yet serving; see the module docs.
pub struct DnsForwarder {
    udp: UdpSocket,
    tcp: TcpListener,
    local_addr: SocketAddr,
    upstreams: Vec<SocketAddr>,
    hooks: Arc<dyn EgressHooks>,
    upstream_timeout: Duration,
    blocked_answers: Vec<Ipv4Net>,
    quota: QuotaConfig,
}

impl DnsForwarder {
    /// Binds UDP and TCP on `listen` (port 0 picks one port free for both) and checks
    /// there is at least one upstream.
    pub async fn bind(
        listen: SocketAddr,
        upstreams: Vec<SocketAddr>,
        hooks: Arc<dyn EgressHooks>,
    ) -> io::Result<Self> {
        if upstreams.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "DNS forwarder has no upstream servers; add a nameserver line to \
                 /etc/resolv.conf or configure upstreams explicitly",
            ));
        }
        let (udp, tcp) = bind_udp_and_tcp(listen).await?;
        let local_addr = udp.local_addr()?;
        Ok(Self {
            udp,
            tcp,
            local_addr,
            upstreams,
            hooks,
            upstream_timeout: UPSTREAM_TIMEOUT,
            blocked_answers: Vec::new(),
            quota: QuotaConfig::default(),
        })
    }

    /// Addresses in these ranges are removed from the answers for allow-list guests
    /// and never handed to [`EgressHooks::allow`]: an allow-listed name pointing at a
    /// private range, the metadata address 169.254.169.254 or the host itself stays
    /// blocked. The manager passes its blocked ranges and its own addresses, or
    /// nothing when the operator opted in to such answers.
    pub fn with_blocked_answers(mut self, ranges: Vec<Ipv4Net>) -> Self {
        self.blocked_answers = ranges;
        self
    }

    /// Replaces the per-guest quota ([`MAX_IN_FLIGHT_PER_GUEST`],
    /// [`GUEST_QUERY_BURST`], [`GUEST_QUERY_RATE`]); for tests and tuning.
    pub fn with_guest_quota(mut self, in_flight: usize, burst: u32, per_sec: u32) -> Self {
        self.quota = QuotaConfig {
            in_flight,
            burst,
            per_sec,
        };
        self
    }

    /// Replaces [`UPSTREAM_TIMEOUT`] (per upstream and transport); for tests and slow
    /// links.
    pub fn with_upstream_timeout(mut self, timeout: Duration) -> Self {
        self.upstream_timeout = timeout;
        self
    }

    /// The address actually bound (UDP and TCP share it).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes; queries still in flight are then abandoned
    /// (clients retry).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let inner = Arc::new(Inner {
            upstreams: self.upstreams,
            hooks: self.hooks,
            upstream_timeout: self.upstream_timeout,
            blocked_answers: self.blocked_answers,
            quotas: Arc::new(Quotas::new(self.quota)),
        });
        let udp = Arc::new(self.udp);
        let tcp = self.tcp;
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
        // Owning the tasks here means dropping `run` (shutdown or abort) stops them all.
        let mut tasks = JoinSet::new();
        let mut buf = vec![0u8; MAX_UDP_MESSAGE + 1];
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                received = udp.recv_from(&mut buf) => match received {
                    Ok((len, from)) => {
                        if len > MAX_UDP_MESSAGE {
                            debug!(%from, "dropping oversized DNS datagram");
                            continue;
                        }
                        let Some(guest) = inner.quotas.admit(from.ip()) else {
                            debug!(%from, "dropping DNS query: guest over its quota");
                            continue;
                        };
                        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                            debug!(%from, "dropping DNS query: too many in flight");
                            continue;
                        };
                        let packet = buf[..len].to_vec();
                        let (inner, udp) = (inner.clone(), udp.clone());
                        tasks.spawn(async move {
                            let _permit = permit;
                            let _guest = guest;
                            if let Some(reply) = inner.handle(&packet, from, Transport::Udp).await
                                && let Err(e) = udp.send_to(&reply, from).await
                            {
                                debug!(%from, error = %e, "sending DNS answer failed");
                            }
                        });
                    }
                    Err(e) => {
                        debug!(error = %e, "DNS UDP receive failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                accepted = tcp.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(permit) = connections.clone().try_acquire_owned() else {
                            debug!(%peer, "closing DNS TCP connection: too many open");
                            continue;
                        };
                        let (inner, in_flight) = (inner.clone(), in_flight.clone());
                        tasks.spawn(async move {
                            let _permit = permit;
                            inner.serve_tcp(stream, peer, &in_flight).await;
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "DNS TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
    }

    /// Runs the forwarder on the current tokio runtime; it stops when the handle is
    /// dropped.
    pub fn spawn(self) -> DnsForwarderHandle {
        let local_addr = self.local_addr;
        let task = tokio::spawn(self.run(futures::future::pending()));
        DnsForwarderHandle { local_addr, task }
    }
}

/// A running [`DnsForwarder`]; dropping it stops the forwarder.
pub struct DnsForwarderHandle {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl DnsForwarderHandle {
    /// The address the forwarder listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for DnsForwarderHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads the `nameserver` lines of a resolv.conf (port 53, duplicates, unspecified and
/// link-local scoped addresses skipped), in file order, which is the order they are
/// tried in.
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        let addr = SocketAddr::new(ip, 53);
        if !ip.is_unspecified() && !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

/// Binds UDP and TCP on the same address; with port 0, retries until one ephemeral
/// port is free for both (also used by the test kit's static DNS server).
pub async fn bind_udp_and_tcp(listen: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let context = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("binding DNS {what} on {listen}: {e}"))
    };
    let attempts = if listen.port() == 0 { BIND_ATTEMPTS } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(listen)
            .await
            .map_err(|e| context("UDP", e))?;
        let addr = udp.local_addr().map_err(|e| context("UDP", e))?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(context("TCP", e)),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other(format!("binding DNS on {listen} failed"))))
}

/// How a query arrived, which bounds the answer size.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// State shared by every query task.
struct Inner {
    upstreams: Vec<SocketAddr>,
    hooks: Arc<dyn EgressHooks>,
    upstream_timeout: Duration,
    blocked_answers: Vec<Ipv4Net>,
    quotas: Arc<Quotas>,
}

/// The per-guest quota.
#[derive(Debug, Clone, Copy)]
struct QuotaConfig {
    in_flight: usize,
    burst: u32,
    per_sec: u32,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            in_flight: MAX_IN_FLIGHT_PER_GUEST,
            burst: GUEST_QUERY_BURST,
            per_sec: GUEST_QUERY_RATE,
        }
    }
}

/// Quota state of one guest address.
#[derive(Debug)]
struct GuestQuota {
    in_flight: usize,
    /// Query tokens, in thousandths (refilled continuously).
    tokens_milli: u64,
    last: Instant,
}

/// Per-guest quotas: queries in flight and a token-bucket rate.
struct Quotas {
    cfg: QuotaConfig,
    guests: StdMutex<HashMap<IpAddr, GuestQuota>>,
}

/// A query admitted under its guest's quota; gives the in-flight slot back on drop.
struct QuotaSlot<'a> {
    quotas: &'a Quotas,
    ip: IpAddr,
}

impl Quotas {
    fn new(cfg: QuotaConfig) -> Self {
        Self {
            cfg,
            guests: StdMutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, GuestQuota>> {
        self.guests.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one query of `ip`'s quota; `None` when it is spent (too many in flight
    /// or too fast).
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<OwnedQuotaSlot> {
        self.take(ip).then(|| OwnedQuotaSlot {
            quotas: Arc::clone(self),
            ip,
        })
    }

    fn take(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let full = u64::from(self.cfg.burst) * 1000;
        let mut guests = self.lock();
        if guests.len() >= MAX_TRACKED_GUESTS && !guests.contains_key(&ip) {
            // Forget idle guests whose bucket has refilled: they are indistinguishable
            // from new ones.
            let per_sec = u64::from(self.cfg.per_sec.max(1));
            guests.retain(|_, g| {
                let idle_ms = now.saturating_duration_since(g.last).as_millis() as u64;
                g.in_flight > 0 || g.tokens_milli + idle_ms.saturating_mul(per_sec) < full
            });
        }
        let g = guests.entry(ip).or_insert(GuestQuota {
            in_flight: 0,
            tokens_milli: full,
            last: now,
        });
        let elapsed_ms = now.saturating_duration_since(g.last).as_millis() as u64;
        g.tokens_milli =
            (g.tokens_milli + elapsed_ms.saturating_mul(u64::from(self.cfg.per_sec))).min(full);
        g.last = now;
        if g.in_flight >= self.cfg.in_flight || g.tokens_milli < 1000 {
            return false;
        }
        g.tokens_milli -= 1000;
        g.in_flight += 1;
        true
    }

    fn release(&self, ip: IpAddr) {
        if let Some(g) = self.lock().get_mut(&ip) {
            g.in_flight = g.in_flight.saturating_sub(1);
        }
    }
}

/// [`QuotaSlot`] for a spawned task.
struct OwnedQuotaSlot {
    quotas: Arc<Quotas>,
    ip: IpAddr,
}

impl Drop for OwnedQuotaSlot {
    fn drop(&mut self) {
        self.quotas.release(self.ip);
    }
}

impl Drop for QuotaSlot<'_> {
    fn drop(&mut self) {
        self.quotas.release(self.ip);
    }
}

/// Why one upstream gave no usable answer (logged at debug, never shown to guests).
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("answer does not match the query (id or question)")]
    Mismatch,
    #[error("answer is not a valid DNS message")]
    Malformed,
}

/// An upstream answer: parsed for inspection, and its exact bytes for relaying.
struct Answer {
    message: Message,
    wire: Vec<u8>,
}

impl Inner {
    /// Answers one guest packet; `None` means drop it silently (not a DNS query at all,
    /// or no answer could be encoded).
    async fn handle(
        &self,
        packet: &[u8],
        from: SocketAddr,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        if packet.len() < HEADER_LEN {
            return None;
        }
        let header = Header::read(&mut BinDecoder::new(packet)).ok()?;
        // Never answer answers: that is how reflection loops start.
        if header.message_type() != MessageType::Query {
            return None;
        }
        let Ok(query) = Message::from_vec(packet) else {
            return header_error(&header, ResponseCode::FormErr);
        };
        if query.op_code() != OpCode::Query {
            return reply_with(&query, ResponseCode::NotImp);
        }
        let client = match from.ip() {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(ip) => ip.to_ipv4_mapped(),
        };
        let Some(policy) = client.and_then(|ip| self.hooks.policy_for(ip)) else {
            debug!(%from, "refusing DNS query: client is not a sandbox");
            return reply_with(&query, ResponseCode::Refused);
        };
        // `policy_for` returned Some, so `client` is Some.
        let client = client?;
        let reply = match &policy {
            EgressPolicy::DenyAll => {
                debug!(%client, "refusing DNS query: egress is deny-all");
                return reply_with(&query, ResponseCode::Refused);
            }
            EgressPolicy::AllowAll => self.forward(packet, &query).await,
            EgressPolicy::AllowList(_) => {
                let [question] = query.queries() else {
                    return reply_with(&query, ResponseCode::FormErr);
                };
                let name = question.name().to_ascii();
                if !policy.allows(&name) {
                    debug!(%client, %name, "refusing DNS query: name not in the allow-list");
                    return reply_with(&query, ResponseCode::Refused);
                }
                if question.query_type() == RecordType::AAAA {
                    return reply_with(&query, ResponseCode::NoError);
                }
                match self.forward(packet, &query).await {
                    Some(answer) => self.release(client, &name, answer).await,
                    None => None,
                }
            }
        };
        let Some(reply) = reply else {
            return reply_with(&query, ResponseCode::ServFail);
        };
        match transport {
            Transport::Tcp => Some(reply.wire),
            Transport::Udp => fit_udp(&query, reply),
        }
    }

    /// Opens the firewall for the A records of an allowed answer, then returns the
    /// answer (TTLs capped at [`MAX_ALLOW_TTL`]); `None` if the hook failed.
    async fn release(&self, client: Ipv4Addr, name: &str, mut answer: Answer) -> Option<Answer> {
        let mut rewrite = false;
        if strip_blocked(&mut answer.message, &self.blocked_answers) {
            debug!(%client, %name, "removed answers in blocked ranges");
            rewrite = true;
        }
        let addrs = allowed_addresses(&answer.message);
        if addrs.is_empty() {
            if rewrite {
                let id = answer.message.id();
                answer.wire = answer.message.to_vec().ok()?;
                set_id(&mut answer.wire, id);
            }
            return Some(answer);
        }
        match timeout(ALLOW_HOOK_TIMEOUT, self.hooks.allow(client, addrs)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(%client, %name, error = %e, "egress allow hook failed; answering SERVFAIL");
                return None;
            }
            Err(_) => {
                warn!(%client, %name, "egress allow hook timed out; answering SERVFAIL");
                return None;
            }
        }
        if cap_a_ttls(&mut answer.message) || rewrite {
            let id = answer.message.id();
            answer.wire = answer.message.to_vec().ok()?;
            set_id(&mut answer.wire, id);
        }
        Some(answer)
    }

    /// Sends the guest's query to the upstreams in order and returns the first good
    /// answer with the guest's id restored. `SERVFAIL`/`REFUSED` answers make it try
    /// the next upstream but are returned if nothing better comes.
    async fn forward(&self, packet: &[u8], query: &Message) -> Option<Answer> {
        let mut fallback = None;
        for &upstream in &self.upstreams {
            match self.exchange(upstream, packet, query).await {
                Ok(answer) => {
                    if matches!(
                        answer.message.response_code(),
                        ResponseCode::ServFail | ResponseCode::Refused
                    ) {
                        debug!(%upstream, code = %answer.message.response_code(), "upstream failed the query");
                        fallback = Some(answer);
                        continue;
                    }
                    return Some(answer);
                }
                Err(e) => debug!(%upstream, error = %e, "upstream DNS exchange failed"),
            }
        }
        fallback
    }

    /// One upstream: UDP with a fresh random id, then TCP if the UDP answer was
    /// truncated.
    async fn exchange(
        &self,
        upstream: SocketAddr,
        packet: &[u8],
        query: &Message,
    ) -> Result<Answer, UpstreamError> {
        let upstream_id: u16 = rand::random();
        let mut wire = packet.to_vec();
        set_id(&mut wire, upstream_id);
        let questions = query.queries();
        let mut answer = with_timeout(
            self.upstream_timeout,
            exchange_udp(upstream, &wire, upstream_id, questions),
        )
        .await?;
        if answer.message.truncated() {
            answer = with_timeout(
                self.upstream_timeout,
                exchange_tcp(upstream, &wire, upstream_id, questions),
            )
            .await?;
        }
        answer.message.set_id(query.id());
        set_id(&mut answer.wire, query.id());
        Ok(answer)
    }

    /// Serves one TCP connection: length-prefixed queries, answered in order.
    async fn serve_tcp(&self, mut stream: TcpStream, peer: SocketAddr, in_flight: &Arc<Semaphore>) {
        for _ in 0..MAX_QUERIES_PER_TCP_CONNECTION {
            let Ok(Ok(packet)) = timeout(TCP_IDLE_TIMEOUT, read_framed(&mut stream)).await else {
                return;
            };
            if !self.quotas.take(peer.ip()) {
                debug!(%peer, "closing DNS TCP connection: guest over its quota");
                return;
            }
            let slot = QuotaSlot {
                quotas: &self.quotas,
                ip: peer.ip(),
            };
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                debug!(%peer, "closing DNS TCP connection: too many queries in flight");
                return;
            };
            let reply = self.handle(&packet, peer, Transport::Tcp).await;
            drop(permit);
            drop(slot);
            let Some(reply) = reply else {
                return;
            };
            match timeout(TCP_IDLE_TIMEOUT, write_framed(&mut stream, &reply)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    }
}

/// Runs an upstream exchange under a deadline.
async fn with_timeout(
    limit: Duration,
    exchange: impl Future<Output = Result<Answer, UpstreamError>>,
) -> Result<Answer, UpstreamError> {
    timeout(limit, exchange)
        .await
        .unwrap_or(Err(UpstreamError::Timeout(limit)))
}

/// UDP exchange on a fresh connected socket: the kernel then only delivers datagrams
/// from the upstream's address, and the random source port plus id make spoofed
/// answers hard to land; datagrams that do not match are ignored until the deadline.
async fn exchange_udp(
    upstream: SocketAddr,
    wire: &[u8],
    id: u16,
    questions: &[Query],
) -> Result<Answer, UpstreamError> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(wire).await?;
    // The guest's EDNS size may exceed ours; accept anything that fits in UDP.
    let mut buf = vec![0u8; MAX_TCP_MESSAGE];
    loop {
        let len = socket.recv(&mut buf).await?;
        if let Ok(answer) = check_answer(&buf[..len], id, questions) {
            return Ok(answer);
        }
    }
}

/// TCP exchange, used when the UDP answer was truncated.
async fn exchange_tcp(
    upstream: SocketAddr,
    wire: &[u8],
    id: u16,
    questions: &[Query],
) -> Result<Answer, UpstreamError> {
    let mut stream = TcpStream::connect(upstream).await?;
    write_framed(&mut stream, wire).await?;
    let reply = read_framed(&mut stream).await?;
    check_answer(&reply, id, questions)
}

/// Parses an upstream datagram and checks it answers our query: same id, a response,
/// same questions.
fn check_answer(wire: &[u8], id: u16, questions: &[Query]) -> Result<Answer, UpstreamError> {
    let message = Message::from_vec(wire).map_err(|_| UpstreamError::Malformed)?;
    if message.id() != id
        || message.message_type() != MessageType::Response
        || message.queries() != questions
    {
        return Err(UpstreamError::Mismatch);
    }
    Ok(Answer {
        message,
        wire: wire.to_vec(),
    })
}

/// Reads one length-prefixed DNS message (RFC 1035 4.2.2).
async fn read_framed(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = usize::from(stream.read_u16().await?);
    if len < HEADER_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("DNS message of {len} bytes is shorter than a header"),
        ));
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Writes one length-prefixed DNS message in a single write.
async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("DNS message of {} bytes is too long for TCP", message.len()),
        )
    })?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await?;
    stream.flush().await
}

/// Overwrites the id in a wire-format message (its first two bytes).
fn set_id(wire: &mut [u8], id: u16) {
    if let Some(head) = wire.get_mut(..2) {
        head.copy_from_slice(&id.to_be_bytes());
    }
}

/// The A records of an answer section with their TTLs clamped to
/// [`MIN_ALLOW_TTL`]..=[`MAX_ALLOW_TTL`]. All of them, not only those owned by the
/// question name: a CNAME chain ends in A records for another name.
fn allowed_addresses(answer: &Message) -> Vec<(Ipv4Addr, Duration)> {
    answer
        .answers()
        .iter()
        .filter_map(|record| match record.data() {
            RData::A(a) => Some((a.0, clamp_ttl(record.ttl()))),
            _ => None,
        })
        .collect()
}

/// Removes A records whose address lies in one of `blocked`; true when any was.
fn strip_blocked(message: &mut Message, blocked: &[Ipv4Net]) -> bool {
    if blocked.is_empty() {
        return false;
    }
    let is_blocked = |r: &hickory_proto::rr::Record| match r.data() {
        RData::A(a) => blocked.iter().any(|n| n.contains(&a.0)),
        _ => false,
    };
    if !message.answers().iter().any(is_blocked) {
        return false;
    }
    let kept: Vec<_> = message
        .take_answers()
        .into_iter()
        .filter(|r| !is_blocked(r))
        .collect();
    message.insert_answers(kept);
    true
}

/// A DNS TTL as the lifetime of a firewall entry.
fn clamp_ttl(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(ttl)).clamp(MIN_ALLOW_TTL, MAX_ALLOW_TTL)
}

/// Lowers A-record TTLs above [`MAX_ALLOW_TTL`]; returns whether anything changed.
fn cap_a_ttls(message: &mut Message) -> bool {
    let max = u32::try_from(MAX_ALLOW_TTL.as_secs()).unwrap_or(u32::MAX);
    let mut changed = false;
    for record in message.answers_mut() {
        if record.record_type() == RecordType::A && record.ttl() > max {
            record.set_ttl(max);
            changed = true;
        }
    }
    changed
}

/// Makes an answer fit the guest's UDP buffer (its EDNS size, at least 512, at most
/// [`MAX_UDP_MESSAGE`]); too large answers become an empty truncated answer so the
/// guest retries over TCP.
fn fit_udp(query: &Message, answer: Answer) -> Option<Vec<u8>> {
    let limit = usize::from(query.max_payload()).clamp(CLASSIC_UDP_LIMIT, MAX_UDP_MESSAGE);
    if answer.wire.len() <= limit {
        return Some(answer.wire);
    }
    let mut truncated = answer.message.truncate();
    // Our own buffer size, not the upstream's, is what the guest should see.
    truncated.extensions_mut().take();
    truncated.to_vec().ok()
}

/// A reply to `query` carrying only its questions and `code`.
fn reply_with(query: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut reply = Message::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_checking_disabled(query.checking_disabled())
        .set_response_code(code)
        .add_queries(query.queries().iter().cloned());
    reply.to_vec().ok()
}

/// A reply built from the header alone, for queries whose body does not parse.
fn header_error(header: &Header, code: ResponseCode) -> Option<Vec<u8>> {
    let mut reply = Message::error_msg(header.id(), header.op_code(), code);
    reply.set_recursion_desired(header.recursion_desired());
    reply.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let text = "\
# generated
search example.com
nameserver 127.0.0.53
nameserver 10.0.0.1 # comment
nameserver   2001:db8::1
nameserver 127.0.0.53
nameserver fe80::1%eth0
nameserver 0.0.0.0
nameserver
nameserver not-an-ip
;nameserver 9.9.9.9
options edns0
";
        assert_eq!(
            upstreams_from_resolv_conf(text),
            vec![
                "127.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "10.0.0.1:53".parse().unwrap(),
                "[2001:db8::1]:53".parse().unwrap(),
            ]
        );
        assert!(upstreams_from_resolv_conf("").is_empty());
    }

    #[test]
    fn ttls_are_clamped() {
        assert_eq!(clamp_ttl(0), MIN_ALLOW_TTL);
        assert_eq!(clamp_ttl(300), Duration::from_secs(300));
        assert_eq!(clamp_ttl(u32::MAX), MAX_ALLOW_TTL);
    }

    #[test]
    fn set_id_ignores_short_buffers() {
        let mut short = [1u8];
        set_id(&mut short, 0xabcd);
        assert_eq!(short, [1]);
        let mut wire = [0u8; 12];
        set_id(&mut wire, 0xabcd);
        assert_eq!(&wire[..2], &[0xab, 0xcd]);
    }

    #[test]
    fn long_a_ttls_are_capped_and_others_kept() {
        use hickory_proto::rr::rdata::{A, CNAME};
        use hickory_proto::rr::{Name, Record};
        let name = Name::from_ascii("github.com.").unwrap();
        let mut m = Message::new();
        m.add_answer(Record::from_rdata(
            name.clone(),
            86_400,
            RData::CNAME(CNAME(name.clone())),
        ))
        .add_answer(Record::from_rdata(
            name.clone(),
            86_400,
            RData::A(A(Ipv4Addr::LOCALHOST)),
        ))
        .add_answer(Record::from_rdata(
            name,
            5,
            RData::A(A(Ipv4Addr::LOCALHOST)),
        ));
        assert_eq!(
            allowed_addresses(&m),
            vec![
                (Ipv4Addr::LOCALHOST, MAX_ALLOW_TTL),
                (Ipv4Addr::LOCALHOST, MIN_ALLOW_TTL)
            ]
        );
        assert!(cap_a_ttls(&mut m));
        let ttls: Vec<u32> = m.answers().iter().map(|r| r.ttl()).collect();
        assert_eq!(ttls, vec![86_400, 3600, 5]);
        assert!(!cap_a_ttls(&mut m));
    }
}
