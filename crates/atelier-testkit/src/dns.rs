//! [`StaticDns`], a tiny authoritative DNS server that integration tests use as "the
//! test's own DNS server" upstream of the forwarder (or of a manager, through
//! `ATELIER_DNS_UPSTREAM`), so no test ever sends a query off the machine.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hickory_proto::op::{Header, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;
use tokio::time::timeout;

use atelier_net::dns::bind_udp_and_tcp;

/// TTL of every record StaticDns serves.
pub const STATIC_TTL: u32 = 300;
/// Longest CNAME chain followed; longer (or looping) chains stop there.
const MAX_CNAME_HOPS: usize = 8;
/// Largest UDP answer StaticDns sends, whatever the client's EDNS size.
const MAX_UDP_ANSWER: usize = 4096;
/// How long a TCP client may take to send a query.
const TCP_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A fixed zone served over UDP and TCP on one address until dropped.
///
/// Answers A queries with the listed addresses, prefixed by the CNAME chain when the
/// name is an alias; a name with records but none of the asked type gets an empty
/// `NOERROR`; unknown names get `NXDOMAIN`. Like a real server it truncates UDP answers
/// larger than the client's buffer (512 bytes without EDNS) so TCP fallback can be
/// tested.
pub struct StaticDns {
    local_addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    _tasks: JoinSet<()>,
}

impl StaticDns {
    /// Binds `bind` (port 0 picks a port free for both UDP and TCP) and starts serving
    /// `records` (name, address; a name may repeat) and `cnames` (alias, target).
    /// Names are case-insensitive; a trailing dot is optional.
    pub async fn spawn(
        bind: SocketAddr,
        records: Vec<(String, Ipv4Addr)>,
        cnames: Vec<(String, String)>,
    ) -> io::Result<StaticDns> {
        let mut zone = Zone::default();
        for (name, addr) in records {
            zone.a.entry(normalize(&name)).or_default().push(addr);
        }
        for (alias, target) in cnames {
            Name::from_ascii(&target).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("CNAME target {target:?} is not a DNS name: {e}"),
                )
            })?;
            zone.cname.insert(normalize(&alias), normalize(&target));
        }
        let (udp, tcp) = bind_udp_and_tcp(bind).await?;
        let local_addr = udp.local_addr()?;
        let zone = Arc::new(zone);
        let queries = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        tasks.spawn(serve_udp(udp, zone.clone(), queries.clone()));
        tasks.spawn(serve_tcp(tcp, zone, queries.clone()));
        Ok(StaticDns {
            local_addr,
            queries,
            _tasks: tasks,
        })
    }

    /// The address served on (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// How many well-formed queries were answered so far, over both transports.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

/// The records served, keyed by lowercase name without trailing dot.
#[derive(Default)]
struct Zone {
    a: HashMap<String, Vec<Ipv4Addr>>,
    cname: HashMap<String, String>,
}

impl Zone {
    fn knows(&self, name: &str) -> bool {
        self.a.contains_key(name) || self.cname.contains_key(name)
    }

    /// The answer to `packet`, or `None` if it is not a parsable query.
    fn answer(&self, packet: &[u8], max_len: usize) -> Option<Vec<u8>> {
        let header = Header::read(&mut BinDecoder::new(packet)).ok()?;
        if header.message_type() != MessageType::Query {
            return None;
        }
        let mut reply = Message::new();
        reply
            .set_id(header.id())
            .set_message_type(MessageType::Response)
            .set_op_code(header.op_code())
            .set_authoritative(true)
            .set_recursion_desired(header.recursion_desired());
        let Ok(query) = Message::from_vec(packet) else {
            reply.set_response_code(ResponseCode::FormErr);
            return reply.to_vec().ok();
        };
        reply.add_queries(query.queries().iter().cloned());
        let [question] = query.queries() else {
            reply.set_response_code(ResponseCode::FormErr);
            return reply.to_vec().ok();
        };
        if query.op_code() != OpCode::Query {
            reply.set_response_code(ResponseCode::NotImp);
            return reply.to_vec().ok();
        }
        let mut owner = question.name().clone();
        let mut name = normalize(&owner.to_ascii());
        if !self.knows(&name) {
            reply.set_response_code(ResponseCode::NXDomain);
            return reply.to_vec().ok();
        }
        let wants = question.query_type();
        for _ in 0..MAX_CNAME_HOPS {
            let Some(target) = self.cname.get(&name) else {
                break;
            };
            let Ok(mut target_name) = Name::from_ascii(target) else {
                break;
            };
            target_name.set_fqdn(true);
            reply.add_answer(Record::from_rdata(
                owner.clone(),
                STATIC_TTL,
                RData::CNAME(CNAME(target_name.clone())),
            ));
            if wants == RecordType::CNAME {
                break;
            }
            owner = target_name;
            name = target.clone();
        }
        if matches!(wants, RecordType::A | RecordType::ANY) {
            for addr in self.a.get(&name).into_iter().flatten() {
                reply.add_answer(Record::from_rdata(
                    owner.clone(),
                    STATIC_TTL,
                    RData::A(A(*addr)),
                ));
            }
        }
        if !self.knows(&name) {
            reply.set_response_code(ResponseCode::NXDomain);
        }
        let wire = reply.to_vec().ok()?;
        if wire.len() <= max_len {
            return Some(wire);
        }
        let mut truncated = reply.truncate();
        truncated.extensions_mut().take();
        truncated.to_vec().ok()
    }
}

/// Lowercase, without one trailing dot.
fn normalize(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    lower.strip_suffix('.').unwrap_or(&lower).to_owned()
}

async fn serve_udp(socket: UdpSocket, zone: Arc<Zone>, queries: Arc<AtomicUsize>) {
    let mut buf = vec![0u8; u16::MAX as usize];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buf).await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let packet = &buf[..len];
        let max_len = Message::from_vec(packet)
            .map(|m| usize::from(m.max_payload()))
            .unwrap_or(512)
            .min(MAX_UDP_ANSWER);
        if let Some(reply) = zone.answer(packet, max_len) {
            queries.fetch_add(1, Ordering::SeqCst);
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, zone: Arc<Zone>, queries: Arc<AtomicUsize>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_tcp_connection(stream, zone.clone(), queries.clone()));
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_tcp_connection(mut stream: TcpStream, zone: Arc<Zone>, queries: Arc<AtomicUsize>) {
    loop {
        let read = async {
            let len = usize::from(stream.read_u16().await?);
            let mut buf = vec![0u8; len];
            stream.read_exact(&mut buf).await?;
            io::Result::Ok(buf)
        };
        let Ok(Ok(packet)) = timeout(TCP_READ_TIMEOUT, read).await else {
            return;
        };
        let Some(reply) = zone.answer(&packet, u16::MAX as usize) else {
            return;
        };
        queries.fetch_add(1, Ordering::SeqCst);
        let Ok(len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}
