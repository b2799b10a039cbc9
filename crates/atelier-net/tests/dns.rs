//! The DNS forwarder end to end on loopback: a StaticDns upstream, the forwarder, and
//! guests simulated by client sockets bound to distinct 127.0.0.0/8 addresses (Linux
//! routes the whole block on `lo`), each mapped to a policy by the test hooks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atelier_core::EgressPolicy;
use atelier_net::dns::{DnsForwarder, DnsForwarderHandle, EgressHooks};
use atelier_testkit::dns::{STATIC_TTL, StaticDns};
use futures::future::BoxFuture;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

/// Guest with `github.com,*.pypi.org,alias.test,big.test`.
const LISTED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// Guest with allow-all.
const OPEN: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Guest with deny-all.
const CLOSED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// Guest with an allow-list whose firewall update fails.
const BROKEN: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
/// Not a sandbox.
const STRANGER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);

const GITHUB: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 1);
const FILES_PYPI: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 2);
const PYPI: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 3);
const CDN_1: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 4);
const CDN_2: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 5);
const UNLISTED: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 6);
/// How long to wait for an answer that should not come.
const SHORT: Duration = Duration::from_millis(500);
/// Addresses of `big.test`: enough to overflow a 512-byte UDP answer.
const BIG_COUNT: u8 = 60;

/// One recorded `allow` call: the client and the addresses with their lifetimes.
type AllowCall = (Ipv4Addr, Vec<(Ipv4Addr, Duration)>);

/// Test hooks: fixed policies per client, and a record of every `allow` call.
#[derive(Default)]
struct Hooks {
    policies: HashMap<Ipv4Addr, EgressPolicy>,
    failing: Vec<Ipv4Addr>,
    allowed: Mutex<Vec<AllowCall>>,
}

impl Hooks {
    fn allowed(&self) -> Vec<AllowCall> {
        self.allowed.lock().unwrap().clone()
    }
}

impl EgressHooks for Hooks {
    fn policy_for(&self, client: Ipv4Addr) -> Option<EgressPolicy> {
        self.policies.get(&client).cloned()
    }

    fn allow(
        &self,
        client: Ipv4Addr,
        addrs: Vec<(Ipv4Addr, Duration)>,
    ) -> BoxFuture<'static, Result<(), String>> {
        let fail = self.failing.contains(&client);
        self.allowed.lock().unwrap().push((client, addrs));
        Box::pin(async move {
            if fail {
                Err("nft: simulated failure".to_owned())
            } else {
                Ok(())
            }
        })
    }
}

struct Setup {
    upstream: StaticDns,
    hooks: Arc<Hooks>,
    forwarder: DnsForwarderHandle,
}

impl Setup {
    fn addr(&self) -> SocketAddr {
        self.forwarder.local_addr()
    }
}

fn hooks() -> Hooks {
    let list: EgressPolicy = "github.com,*.pypi.org,alias.test,big.test".parse().unwrap();
    Hooks {
        policies: HashMap::from([
            (LISTED, list.clone()),
            (OPEN, EgressPolicy::AllowAll),
            (CLOSED, EgressPolicy::DenyAll),
            (BROKEN, list),
        ]),
        failing: vec![BROKEN],
        allowed: Mutex::default(),
    }
}

async fn static_dns() -> StaticDns {
    let mut records = vec![
        ("github.com".to_owned(), GITHUB),
        ("files.pypi.org".to_owned(), FILES_PYPI),
        ("pypi.org".to_owned(), PYPI),
        ("cdn.test".to_owned(), CDN_1),
        ("CDN.test.".to_owned(), CDN_2),
        ("unlisted.test".to_owned(), UNLISTED),
    ];
    for i in 0..BIG_COUNT {
        records.push(("big.test".to_owned(), Ipv4Addr::new(127, 0, 2, i)));
    }
    let cnames = vec![
        ("alias.test".to_owned(), "mid.test".to_owned()),
        ("mid.test".to_owned(), "cdn.test".to_owned()),
    ];
    StaticDns::spawn(local(0), records, cnames).await.unwrap()
}

fn local(port: u16) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, port).into()
}

async fn setup() -> Setup {
    setup_with(|f| f).await
}

/// [`setup`] with the forwarder configured by `configure` before it starts.
async fn setup_with(configure: impl FnOnce(DnsForwarder) -> DnsForwarder) -> Setup {
    let upstream = static_dns().await;
    let hooks = Arc::new(hooks());
    let forwarder = DnsForwarder::bind(local(0), vec![upstream.local_addr()], hooks.clone())
        .await
        .unwrap();
    let forwarder = configure(forwarder).spawn();
    Setup {
        upstream,
        hooks,
        forwarder,
    }
}

fn query(name: &str, kind: RecordType) -> Message {
    // Names on the wire are always fully qualified; build them that way so questions
    // compare equal to the ones echoed back.
    let mut fqdn = Name::from_ascii(name).unwrap();
    fqdn.set_fqdn(true);
    let mut m = Message::new();
    m.set_id(rand::random())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(fqdn, kind));
    m
}

/// Sends raw bytes from `from` over UDP; the answer, or None after `wait`.
async fn udp_raw(
    from: Ipv4Addr,
    server: SocketAddr,
    packet: &[u8],
    wait: Duration,
) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind((from, 0)).await.unwrap();
    socket.send_to(packet, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (len, _) = tokio::time::timeout(wait, socket.recv_from(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(buf[..len].to_vec())
}

async fn udp(from: Ipv4Addr, server: SocketAddr, q: &Message) -> Message {
    let reply = udp_raw(from, server, &q.to_vec().unwrap(), Duration::from_secs(3))
        .await
        .expect("no UDP answer within 3 s");
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.id(), q.id());
    assert_eq!(reply.message_type(), MessageType::Response);
    reply
}

async fn tcp_connect(from: Ipv4Addr, server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    socket.connect(server).await.unwrap()
}

async fn tcp_send(stream: &mut TcpStream, q: &Message) {
    let wire = q.to_vec().unwrap();
    let mut framed = u16::try_from(wire.len()).unwrap().to_be_bytes().to_vec();
    framed.extend_from_slice(&wire);
    stream.write_all(&framed).await.unwrap();
}

async fn tcp_recv(stream: &mut TcpStream) -> Message {
    let read = async {
        let len = usize::from(stream.read_u16().await.unwrap());
        let mut buf = vec![0u8; len];
        stream.read_exact(&mut buf).await.unwrap();
        buf
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("no TCP answer within 5 s");
    Message::from_vec(&buf).unwrap()
}

async fn tcp(from: Ipv4Addr, server: SocketAddr, q: &Message) -> Message {
    let mut stream = tcp_connect(from, server).await;
    tcp_send(&mut stream, q).await;
    let reply = tcp_recv(&mut stream).await;
    assert_eq!(reply.id(), q.id());
    reply
}

fn addresses(m: &Message) -> Vec<Ipv4Addr> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

fn ttl() -> Duration {
    Duration::from_secs(u64::from(STATIC_TTL))
}

#[tokio::test]
async fn allow_all_passes_queries_through() {
    let s = setup().await;
    for name in ["github.com", "unlisted.test", "alias.test"] {
        let r = udp(OPEN, s.addr(), &query(name, RecordType::A)).await;
        assert_eq!(r.response_code(), ResponseCode::NoError, "{name}");
        assert!(!addresses(&r).is_empty(), "{name}");
    }
    let r = udp(OPEN, s.addr(), &query("nowhere.test", RecordType::A)).await;
    assert_eq!(r.response_code(), ResponseCode::NXDomain);
    let r = tcp(OPEN, s.addr(), &query("github.com", RecordType::A)).await;
    assert_eq!(addresses(&r), vec![GITHUB]);
    assert!(
        s.hooks.allowed().is_empty(),
        "allow-all must not touch the firewall"
    );
}

#[tokio::test]
async fn deny_all_and_unknown_clients_are_refused_without_asking_upstream() {
    let s = setup().await;
    for client in [CLOSED, STRANGER] {
        let r = udp(client, s.addr(), &query("github.com", RecordType::A)).await;
        assert_eq!(r.response_code(), ResponseCode::Refused);
        assert!(r.answers().is_empty());
        let r = tcp(client, s.addr(), &query("github.com", RecordType::A)).await;
        assert_eq!(r.response_code(), ResponseCode::Refused);
    }
    assert_eq!(s.upstream.queries(), 0);
}

#[tokio::test]
async fn allow_list_resolves_listed_name_after_opening_the_firewall() {
    let s = setup().await;
    let r = udp(LISTED, s.addr(), &query("GitHub.com.", RecordType::A)).await;
    assert_eq!(r.response_code(), ResponseCode::NoError);
    assert_eq!(addresses(&r), vec![GITHUB]);
    assert_eq!(s.hooks.allowed(), vec![(LISTED, vec![(GITHUB, ttl())])]);
}

#[tokio::test]
async fn allow_list_collects_every_address_of_a_cname_chain() {
    let s = setup().await;
    let r = udp(LISTED, s.addr(), &query("alias.test", RecordType::A)).await;
    assert_eq!(r.response_code(), ResponseCode::NoError);
    let cnames = r
        .answers()
        .iter()
        .filter(|r| r.record_type() == RecordType::CNAME)
        .count();
    assert_eq!(cnames, 2);
    assert_eq!(addresses(&r), vec![CDN_1, CDN_2]);
    assert_eq!(
        s.hooks.allowed(),
        vec![(LISTED, vec![(CDN_1, ttl()), (CDN_2, ttl())])]
    );
}

#[tokio::test]
async fn allow_list_wildcard_covers_subdomains_only() {
    let s = setup().await;
    let r = udp(LISTED, s.addr(), &query("files.pypi.org", RecordType::A)).await;
    assert_eq!(addresses(&r), vec![FILES_PYPI]);
    let r = udp(LISTED, s.addr(), &query("pypi.org", RecordType::A)).await;
    assert_eq!(r.response_code(), ResponseCode::Refused);
    assert_eq!(s.hooks.allowed(), vec![(LISTED, vec![(FILES_PYPI, ttl())])]);
    assert!(
        !s.hooks
            .allowed()
            .iter()
            .any(|(_, a)| a.contains(&(PYPI, ttl())))
    );
}

#[tokio::test]
async fn allow_list_refuses_unlisted_names_without_asking_upstream() {
    let s = setup().await;
    for name in ["unlisted.test", "evilgithub.com", "github.com.evil.test"] {
        let r = udp(LISTED, s.addr(), &query(name, RecordType::A)).await;
        assert_eq!(r.response_code(), ResponseCode::Refused, "{name}");
        assert!(r.answers().is_empty());
    }
    assert_eq!(s.upstream.queries(), 0);
    assert!(s.hooks.allowed().is_empty());
}

#[tokio::test]
async fn allow_list_answers_aaaa_empty_and_forwards_other_types() {
    let s = setup().await;
    let r = udp(LISTED, s.addr(), &query("github.com", RecordType::AAAA)).await;
    assert_eq!(r.response_code(), ResponseCode::NoError);
    assert!(r.answers().is_empty());
    assert_eq!(r.queries(), query("github.com", RecordType::AAAA).queries());
    assert_eq!(s.upstream.queries(), 0, "AAAA must not be forwarded");

    let r = udp(LISTED, s.addr(), &query("github.com", RecordType::TXT)).await;
    assert_eq!(r.response_code(), ResponseCode::NoError);
    assert_eq!(
        s.upstream.queries(),
        1,
        "TXT of an allowed name is forwarded"
    );
    let r = udp(LISTED, s.addr(), &query("unlisted.test", RecordType::TXT)).await;
    assert_eq!(r.response_code(), ResponseCode::Refused);
    assert_eq!(s.upstream.queries(), 1);
}

#[tokio::test]
async fn allow_list_needs_exactly_one_question() {
    let s = setup().await;
    let mut q = query("github.com", RecordType::A);
    q.add_query(Query::query(
        Name::from_ascii("files.pypi.org").unwrap(),
        RecordType::A,
    ));
    let r = udp(LISTED, s.addr(), &q).await;
    assert_eq!(r.response_code(), ResponseCode::FormErr);
    let mut q = query("github.com", RecordType::A);
    q.take_queries();
    let r = udp(LISTED, s.addr(), &q).await;
    assert_eq!(r.response_code(), ResponseCode::FormErr);
    assert_eq!(s.upstream.queries(), 0);
}

#[tokio::test]
async fn failing_firewall_update_turns_the_answer_into_servfail() {
    let s = setup().await;
    let r = udp(BROKEN, s.addr(), &query("github.com", RecordType::A)).await;
    assert_eq!(r.response_code(), ResponseCode::ServFail);
    assert!(r.answers().is_empty(), "no address may leak without a rule");
    let r = tcp(BROKEN, s.addr(), &query("github.com", RecordType::A)).await;
    assert_eq!(r.response_code(), ResponseCode::ServFail);
    assert_eq!(s.hooks.allowed().len(), 2);
}

#[tokio::test]
async fn tcp_serves_several_pipelined_queries_per_connection() {
    let s = setup().await;
    let mut stream = tcp_connect(LISTED, s.addr()).await;
    let q1 = query("github.com", RecordType::A);
    let q2 = query("unlisted.test", RecordType::A);
    let q3 = query("alias.test", RecordType::A);
    tcp_send(&mut stream, &q1).await;
    tcp_send(&mut stream, &q2).await;
    tcp_send(&mut stream, &q3).await;
    let (r1, r2, r3) = (
        tcp_recv(&mut stream).await,
        tcp_recv(&mut stream).await,
        tcp_recv(&mut stream).await,
    );
    assert_eq!((r1.id(), r2.id(), r3.id()), (q1.id(), q2.id(), q3.id()));
    assert_eq!(addresses(&r1), vec![GITHUB]);
    assert_eq!(r2.response_code(), ResponseCode::Refused);
    assert_eq!(addresses(&r3), vec![CDN_1, CDN_2]);
}

#[tokio::test]
async fn large_answers_use_tcp_upstream_and_truncate_towards_the_guest() {
    let s = setup().await;
    let q = query("big.test", RecordType::A);
    // The upstream truncates to 512 bytes; the forwarder retries it over TCP, opens
    // the firewall for all addresses, and tells the UDP guest to retry over TCP.
    let r = udp(LISTED, s.addr(), &q).await;
    assert!(r.truncated());
    assert!(r.answers().is_empty());
    let allowed = s.hooks.allowed();
    assert_eq!(allowed.len(), 1);
    assert_eq!(allowed[0].1.len(), usize::from(BIG_COUNT));

    let r = tcp(LISTED, s.addr(), &q).await;
    assert!(!r.truncated());
    assert_eq!(addresses(&r).len(), usize::from(BIG_COUNT));

    // Allow-all relays the same way.
    let r = udp(OPEN, s.addr(), &q).await;
    assert!(r.truncated());
    let r = tcp(OPEN, s.addr(), &q).await;
    assert_eq!(addresses(&r).len(), usize::from(BIG_COUNT));
}

#[tokio::test]
async fn garbage_does_not_break_the_server() {
    let s = setup().await;
    let good = query("github.com", RecordType::A);
    // Too short for a header, random bytes, oversized, and an answer instead of a
    // query: all dropped.
    let mut oversized = good.to_vec().unwrap();
    oversized.resize(5000, 0);
    let mut answer = good.clone();
    answer.set_message_type(MessageType::Response);
    let noise: Vec<u8> = (0..300).map(|_| rand::random()).collect();
    for packet in [
        vec![],
        vec![0x12],
        vec![0; 11],
        oversized,
        answer.to_vec().unwrap(),
    ] {
        assert_eq!(udp_raw(LISTED, s.addr(), &packet, SHORT).await, None);
    }
    // Random bytes with the query bit clear may parse as a header: then FORMERR or
    // nothing, never a crash.
    let mut noise = noise;
    noise[2] &= 0x7f;
    if let Some(reply) = udp_raw(LISTED, s.addr(), &noise, SHORT).await {
        assert_eq!(&reply[..2], &noise[..2]);
    }
    // A valid header with a body that does not parse: FORMERR with the same id.
    let mut broken = good.to_vec().unwrap();
    broken.truncate(15);
    let reply = udp_raw(LISTED, s.addr(), &broken, SHORT).await.unwrap();
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.id(), good.id());
    assert_eq!(reply.response_code(), ResponseCode::FormErr);

    // TCP: a length prefix promising more than is sent, a zero length, junk.
    for junk in [vec![0x00, 0x40, 1, 2, 3], vec![0, 0], vec![0xff; 700]] {
        let mut stream = tcp_connect(LISTED, s.addr()).await;
        stream.write_all(&junk).await.unwrap();
        drop(stream);
    }
    let mut stream = tcp_connect(LISTED, s.addr()).await;
    stream.write_all(&[0, 12]).await.unwrap();
    stream.write_all(&[0; 12]).await.unwrap();
    let mut buf = [0u8; 2];
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await;
    drop(stream);

    // A burst much larger than the in-flight limit.
    let socket = UdpSocket::bind((OPEN, 0)).await.unwrap();
    let wire = query("github.com", RecordType::A).to_vec().unwrap();
    for _ in 0..1000 {
        socket.send_to(&wire, s.addr()).await.unwrap();
    }
    // Let the burst drain (loopback answers take milliseconds).
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Still answering, over both transports.
    let r = udp(LISTED, s.addr(), &good).await;
    assert_eq!(addresses(&r), vec![GITHUB]);
    let r = tcp(LISTED, s.addr(), &good).await;
    assert_eq!(addresses(&r), vec![GITHUB]);
}

#[tokio::test]
async fn unreachable_upstream_gives_servfail_within_the_timeout() {
    // A port nobody listens on: the kernel answers "port unreachable" at once.
    let closed = {
        let s = UdpSocket::bind(local(0)).await.unwrap();
        s.local_addr().unwrap()
    };
    // A socket that never answers: the forwarder must give up after its timeout.
    let silent = UdpSocket::bind(local(0)).await.unwrap();
    let hooks = Arc::new(hooks());
    for (upstream, min, max) in [
        (closed, Duration::ZERO, Duration::from_secs(1)),
        (
            silent.local_addr().unwrap(),
            Duration::from_millis(1900),
            Duration::from_millis(2900),
        ),
    ] {
        let f = DnsForwarder::bind(local(0), vec![upstream], hooks.clone())
            .await
            .unwrap()
            .spawn();
        for client in [OPEN, LISTED] {
            let start = Instant::now();
            let r = udp(client, f.local_addr(), &query("github.com", RecordType::A)).await;
            let took = start.elapsed();
            assert_eq!(r.response_code(), ResponseCode::ServFail);
            assert!(
                (min..max).contains(&took),
                "{upstream}: SERVFAIL after {took:?}"
            );
        }
    }
    assert!(hooks.allowed().is_empty());
}

#[tokio::test]
async fn next_upstream_is_tried_when_one_fails() {
    let good = static_dns().await;
    let silent = UdpSocket::bind(local(0)).await.unwrap();
    let hooks = Arc::new(hooks());
    let f = DnsForwarder::bind(
        local(0),
        vec![silent.local_addr().unwrap(), good.local_addr()],
        hooks.clone(),
    )
    .await
    .unwrap()
    .with_upstream_timeout(Duration::from_millis(300))
    .spawn();
    let r = udp(LISTED, f.local_addr(), &query("github.com", RecordType::A)).await;
    assert_eq!(addresses(&r), vec![GITHUB]);
    assert_eq!(hooks.allowed(), vec![(LISTED, vec![(GITHUB, ttl())])]);
}

#[tokio::test]
async fn spoofed_upstream_replies_are_ignored() {
    // An upstream that first sends a reply with the wrong id and one for another
    // question, then the real answer.
    let upstream = UdpSocket::bind(local(0)).await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let (len, from) = upstream.recv_from(&mut buf).await.unwrap();
        let q = Message::from_vec(&buf[..len]).unwrap();
        let answer = |id: u16, name: &str, addr: Ipv4Addr| {
            let mut m = Message::new();
            m.set_id(id)
                .set_message_type(MessageType::Response)
                .set_recursion_available(true)
                .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A))
                .add_answer(hickory_proto::rr::Record::from_rdata(
                    Name::from_ascii(name).unwrap(),
                    60,
                    RData::A(hickory_proto::rr::rdata::A(addr)),
                ));
            m.to_vec().unwrap()
        };
        let evil = Ipv4Addr::new(127, 6, 6, 6);
        for reply in [
            answer(q.id().wrapping_add(1), "github.com.", evil),
            answer(q.id(), "evil.test.", evil),
            b"not dns at all".to_vec(),
            answer(q.id(), "github.com.", GITHUB),
        ] {
            upstream.send_to(&reply, from).await.unwrap();
        }
    });
    let hooks = Arc::new(hooks());
    let f = DnsForwarder::bind(local(0), vec![upstream_addr], hooks.clone())
        .await
        .unwrap()
        .spawn();
    let r = udp(LISTED, f.local_addr(), &query("github.com", RecordType::A)).await;
    assert_eq!(addresses(&r), vec![GITHUB]);
    assert_eq!(
        hooks.allowed(),
        vec![(LISTED, vec![(GITHUB, Duration::from_secs(60))])]
    );
    fake.await.unwrap();
}

#[tokio::test]
async fn dropping_the_handle_stops_the_forwarder() {
    let s = setup().await;
    let addr = s.addr();
    let r = udp(OPEN, addr, &query("github.com", RecordType::A)).await;
    assert_eq!(addresses(&r), vec![GITHUB]);
    drop(s.forwarder);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let wire = query("github.com", RecordType::A).to_vec().unwrap();
    assert_eq!(udp_raw(OPEN, addr, &wire, SHORT).await, None);
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn bind_needs_an_upstream() {
    let err = DnsForwarder::bind(local(0), vec![], Arc::new(hooks()))
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}

#[tokio::test]
async fn static_dns_answers_directly() {
    let dns = static_dns().await;
    let r = udp(
        LISTED,
        dns.local_addr(),
        &query("alias.test", RecordType::A),
    )
    .await;
    assert!(r.authoritative());
    assert_eq!(addresses(&r), vec![CDN_1, CDN_2]);
    let r = tcp(LISTED, dns.local_addr(), &query("big.test", RecordType::A)).await;
    assert_eq!(addresses(&r).len(), usize::from(BIG_COUNT));
    let r = udp(LISTED, dns.local_addr(), &query("nope.test", RecordType::A)).await;
    assert_eq!(r.response_code(), ResponseCode::NXDomain);
    let r = udp(
        LISTED,
        dns.local_addr(),
        &query("github.com", RecordType::MX),
    )
    .await;
    assert_eq!(r.response_code(), ResponseCode::NoError);
    assert!(r.answers().is_empty());
    assert_eq!(dns.queries(), 4);
}

#[tokio::test]
async fn allow_listed_names_never_open_blocked_ranges() {
    // github.com points into a blocked range, alias.test's chain half into one.
    let blocked = vec![
        "127.0.1.1/32".parse().unwrap(),
        "127.0.1.5/32".parse().unwrap(),
    ];
    let s = setup_with(|f| f.with_blocked_answers(blocked)).await;
    let r = udp(LISTED, s.addr(), &query("github.com", RecordType::A)).await;
    assert_eq!(r.response_code(), ResponseCode::NoError);
    assert!(addresses(&r).is_empty(), "{:?}", addresses(&r));
    let r = tcp(LISTED, s.addr(), &query("alias.test", RecordType::A)).await;
    assert_eq!(addresses(&r), vec![CDN_1]);
    assert_eq!(s.hooks.allowed(), vec![(LISTED, vec![(CDN_1, ttl())])]);
    // Allow-all guests are not filtered: the firewall's blocked set covers them.
    let r = udp(OPEN, s.addr(), &query("github.com", RecordType::A)).await;
    assert_eq!(addresses(&r), vec![GITHUB]);
}

#[tokio::test]
async fn default_blocked_ranges_cover_metadata_private_and_the_host() {
    let mut cfg = atelier_net::NetConfig::new();
    let host = Ipv4Addr::new(203, 0, 113, 7);
    let ranges = cfg.blocked_answers(&[host]);
    for a in [
        Ipv4Addr::new(169, 254, 169, 254),
        Ipv4Addr::new(10, 1, 2, 3),
        Ipv4Addr::new(192, 168, 1, 1),
        Ipv4Addr::new(172, 16, 0, 1),
        Ipv4Addr::LOCALHOST,
        cfg.gateway(),
        host,
    ] {
        assert!(ranges.iter().any(|r| r.contains(&a)), "{a} not blocked");
    }
    assert!(
        !ranges
            .iter()
            .any(|r| r.contains(&Ipv4Addr::new(1, 1, 1, 1)))
    );
    cfg.allow_blocked_answers = true;
    assert!(cfg.blocked_answers(&[host]).is_empty());
}

#[tokio::test]
async fn a_looping_guest_is_held_to_its_quota_and_others_still_resolve() {
    // Burst of 5, then 1 query a second; 2 in flight.
    let s = setup_with(|f| f.with_guest_quota(2, 5, 1)).await;
    let socket = UdpSocket::bind((OPEN, 0)).await.unwrap();
    let mut sent = Vec::new();
    for _ in 0..40 {
        let q = query("github.com", RecordType::A);
        socket
            .send_to(&q.to_vec().unwrap(), s.addr())
            .await
            .unwrap();
        sent.push(q.id());
    }
    let mut answered = 0;
    let mut buf = vec![0u8; 4096];
    while let Ok(Ok((len, _))) = tokio::time::timeout(SHORT, socket.recv_from(&mut buf)).await {
        let m = Message::from_vec(&buf[..len]).unwrap();
        assert!(sent.contains(&m.id()));
        answered += 1;
    }
    assert!(
        (1..=7).contains(&answered),
        "{answered} of 40 looped queries answered"
    );
    // Another guest has its own quota.
    let r = udp(LISTED, s.addr(), &query("github.com", RecordType::A)).await;
    assert_eq!(addresses(&r), vec![GITHUB]);
    // TCP counts against the same quota: the looping guest's connection is closed.
    let mut stream = tcp_connect(OPEN, s.addr()).await;
    for _ in 0..10 {
        tcp_send(&mut stream, &query("github.com", RecordType::A)).await;
    }
    let mut n = 0;
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_u16()).await;
        match read.expect("the connection is answered or closed in time") {
            Ok(len) => {
                let mut b = vec![0u8; usize::from(len)];
                stream.read_exact(&mut b).await.unwrap();
                n += 1;
            }
            Err(_) => break,
        }
    }
    assert!(n < 10, "all {n} pipelined TCP queries answered over quota");
}
