//! TCP streams: the host asks the agent to connect to a port inside the guest
//! (`StreamOpen`) and the agent relays bytes both ways over the control channel.
//!
//! Both directions are credit-controlled with [`STREAM_WINDOW`]: the agent reads from
//! the socket only as much as the host granted, and returns credit for host data only
//! once it is written to the socket, so neither side buffers more than the window. A
//! host that sends more than its credit has the stream closed with an error.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use atelier_agent_proto::{ErrorKind, GuestMessage, STREAM_CHUNK_LEN, STREAM_WINDOW};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, Semaphore, mpsc};

use crate::serve::{Agent, Stream};

/// What the host sent for the socket.
pub enum TcpMsg {
    /// Bytes to write.
    Data(Vec<u8>),
    /// Shut the socket's write side down after the data before.
    Eof,
}

/// Control state of one TCP stream.
pub struct TcpCtl {
    /// Host data for the socket, in order (bounded by the host's credit, see `inbound`).
    pub to_socket: mpsc::UnboundedSender<TcpMsg>,
    /// Host data queued and not yet written (the host may not exceed the window).
    pub inbound: Arc<AtomicU64>,
    /// Credits the host granted for socket data.
    pub credit: Arc<Semaphore>,
    /// Notified when the host gives up on the stream.
    pub cancel: Arc<Notify>,
}

type Failure = (ErrorKind, String);

/// Registers stream `id` and connects it in a task.
pub fn start(agent: Arc<Agent>, id: u64, ip: IpAddr, port: u16, connect_timeout_ms: u32) {
    let (tx, rx) = mpsc::unbounded_channel();
    let ctl = TcpCtl {
        to_socket: tx,
        inbound: Arc::new(AtomicU64::new(0)),
        credit: Arc::new(Semaphore::new(STREAM_WINDOW as usize)),
        cancel: Arc::new(Notify::new()),
    };
    let (inbound, credit, cancel) = (ctl.inbound.clone(), ctl.credit.clone(), ctl.cancel.clone());
    agent.streams().insert(id, Stream::Tcp(ctl));
    tokio::spawn(async move {
        let addr = SocketAddr::new(ip, port);
        let result = tokio::select! {
            r = relay(&agent, id, addr, connect_timeout_ms, rx, inbound, credit) => r,
            // Cancelled: the host has forgotten the stream, nothing to answer.
            _ = cancel.notified() => Ok(()),
        };
        // Still registered: not cancelled, so the host waits for the outcome.
        let registered = matches!(agent.streams().remove(&id), Some(Stream::Tcp(_)));
        if let Err((kind, message)) = result
            && registered
        {
            agent.send_error(id, kind, message).await;
        }
    });
}

/// Queues host data for stream `id`; a host exceeding its credit has the stream closed.
pub async fn data(agent: &Agent, id: u64, msg: TcpMsg) {
    let len = match &msg {
        TcpMsg::Data(d) => d.len() as u64,
        TcpMsg::Eof => 0,
    };
    let overrun = match agent.streams().get(&id) {
        Some(Stream::Tcp(ctl)) => {
            let queued = ctl.inbound.fetch_add(len, Ordering::AcqRel) + len;
            if queued <= u64::from(STREAM_WINDOW) {
                let _ = ctl.to_socket.send(msg);
                false
            } else {
                true
            }
        }
        _ => false,
    };
    let removed = if overrun {
        agent.streams().remove(&id)
    } else {
        None
    };
    if let Some(Stream::Tcp(ctl)) = removed {
        cancel(ctl);
        agent
            .send_error(
                id,
                ErrorKind::Invalid,
                format!("stream {id}: the host exceeded the flow-control window; stream closed"),
            )
            .await;
    }
}

/// Closes stream `id` on the host's request.
pub fn cancel(ctl: TcpCtl) {
    ctl.credit.close();
    ctl.cancel.notify_one();
}

async fn relay(
    agent: &Arc<Agent>,
    id: u64,
    addr: SocketAddr,
    connect_timeout_ms: u32,
    rx: mpsc::UnboundedReceiver<TcpMsg>,
    inbound: Arc<AtomicU64>,
    credit: Arc<Semaphore>,
) -> Result<(), Failure> {
    let limit = Duration::from_millis(u64::from(connect_timeout_ms));
    let sock = match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
        Ok(Ok(sock)) => sock,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err((
                ErrorKind::ConnectionRefused,
                format!("connecting to {addr}: nothing listens there ({e})"),
            ));
        }
        Ok(Err(e)) => {
            return Err((
                ErrorKind::from_io(e.kind()),
                format!("connecting to {addr}: {e}"),
            ));
        }
        Err(_) => {
            return Err((
                ErrorKind::TimedOut,
                format!("connecting to {addr}: no answer within {connect_timeout_ms} ms"),
            ));
        }
    };
    let _ = sock.set_nodelay(true);
    agent.send(GuestMessage::StreamOpened { id }).await;
    let (rd, wr) = sock.into_split();
    // Either direction failing ends both (the socket closes when both halves drop).
    tokio::try_join!(
        socket_to_host(agent, id, addr, rd, credit),
        host_to_socket(agent, id, addr, wr, rx, inbound),
    )?;
    Ok(())
}

/// Sends what the service writes, never reading more than the host granted.
async fn socket_to_host(
    agent: &Agent,
    id: u64,
    addr: SocketAddr,
    mut rd: OwnedReadHalf,
    credit: Arc<Semaphore>,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; STREAM_CHUNK_LEN];
    loop {
        // At least one byte of credit, then whatever else is granted (up to a chunk).
        let Ok(permit) = credit.acquire().await else {
            return Ok(()); // closed: cancelled
        };
        permit.forget();
        let mut granted = 1;
        let extra = (STREAM_CHUNK_LEN - 1).min(credit.available_permits());
        // extra < STREAM_CHUNK_LEN, fits u32.
        if extra > 0
            && let Ok(permit) = credit.try_acquire_many(extra as u32)
        {
            permit.forget();
            granted += extra;
        }
        let n = rd.read(&mut buf[..granted]).await.map_err(|e| {
            (
                ErrorKind::from_io(e.kind()),
                format!("reading from {addr}: {e}"),
            )
        })?;
        if n < granted {
            credit.add_permits(granted - n);
        }
        if n == 0 {
            agent.send(GuestMessage::StreamEof { id }).await;
            return Ok(());
        }
        agent
            .send(GuestMessage::StreamData {
                id,
                data: buf[..n].to_vec(),
            })
            .await;
    }
}

/// Writes host data to the socket and returns credit for it once written.
async fn host_to_socket(
    agent: &Agent,
    id: u64,
    addr: SocketAddr,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<TcpMsg>,
    inbound: Arc<AtomicU64>,
) -> Result<(), Failure> {
    while let Some(msg) = rx.recv().await {
        match msg {
            TcpMsg::Data(data) => {
                wr.write_all(&data).await.map_err(|e| {
                    (
                        ErrorKind::from_io(e.kind()),
                        format!("writing to {addr}: {e}"),
                    )
                })?;
                inbound.fetch_sub(data.len() as u64, Ordering::AcqRel);
                // data.len() <= STREAM_WINDOW, fits u32.
                agent
                    .send(GuestMessage::Credit {
                        id,
                        bytes: data.len() as u32,
                    })
                    .await;
            }
            TcpMsg::Eof => {
                wr.shutdown().await.map_err(|e| {
                    (
                        ErrorKind::from_io(e.kind()),
                        format!("shutting down {addr}: {e}"),
                    )
                })?;
                // Keep the write half (dropping it is harmless, the read side stays open).
                return Ok(());
            }
        }
    }
    // The host forgot the stream (cancelled).
    Ok(())
}
