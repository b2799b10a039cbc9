//! Property/fuzz test of the frame decoder and message decoding, run as an ordinary
//! test with a bounded number of cases (no nightly toolchain, no cargo-fuzz).
//!
//! Each case starts from a stream of valid frames of every message kind and mutates
//! it the way a hostile guest (root in its VM, writing anything to the port) could:
//! flipped and inserted bytes, absurd and hostile length fields, torn frames, spliced
//! magics, pure noise, repeats. Properties: nothing panics; the decoder never buffers
//! more than one maximal frame plus one read; the heap used while decoding one case
//! stays below [`PEAK_BOUND`] (measured with a counting allocator); after a sync
//! preamble a valid frame is always decoded again. A second part feeds mutated streams
//! into a real [`AgentClient`] and checks it either still answers or closed the
//! connection with a reason, without a panic in any of its tasks.
//!
//! `ATELIER_FUZZ_CASES` (default 500) and `ATELIER_FUZZ_SEED` (default fixed) tune a
//! run; a failure prints the seed and case to replay.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use atelier_agent_proto::frame::{FRAME_MAGIC, FrameDecoder, HEADER_LEN, SYNC_PREAMBLE_LEN};
use atelier_agent_proto::{
    AgentClient, CAP_TCP_STREAM, DevSpec, DevState, DevStatus, ErrorKind, ExecEvent, ExecRequest,
    GuestMessage, Hello, HostMessage, MAX_FRAME_LEN, Metrics, NetConfig, PROTOCOL_VERSION,
    ProtoError, PtyEvent, PtyRequest, encode_frame,
};
use tokio::io::AsyncWriteExt;

/// Counts live heap bytes and the peak since the last reset (the only way to measure
/// the memory a decode takes; unsafe only to forward to the system allocator).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[allow(unsafe_code)]
// SAFETY: every call is forwarded unchanged to `System`; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Most heap one decoding case may use beyond what was live before it: the decoder's
/// buffer (one maximal frame plus a read, possibly doubled while growing) and one
/// decoded message and its copy.
const PEAK_BOUND: usize = 8 * (MAX_FRAME_LEN + HEADER_LEN);

/// xorshift64*: small, deterministic, good enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn guest_samples() -> Vec<GuestMessage> {
    vec![
        GuestMessage::Hello(Hello {
            version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            boot_id: "b".into(),
            pid: 7,
        }),
        GuestMessage::Pong { id: 1 },
        GuestMessage::Exec {
            id: 2,
            event: ExecEvent::Started { pid: 9 },
        },
        GuestMessage::Exec {
            id: 2,
            event: ExecEvent::Stdout(b"out".to_vec()),
        },
        GuestMessage::Exec {
            id: 2,
            event: ExecEvent::Stderr(vec![0xFF; 40]),
        },
        GuestMessage::Exec {
            id: 2,
            event: ExecEvent::Exit {
                code: Some(1),
                signal: None,
                timed_out: false,
            },
        },
        GuestMessage::Credit {
            id: 2,
            bytes: 65536,
        },
        GuestMessage::FileChunk {
            id: 3,
            data: vec![1; 300],
        },
        GuestMessage::FileEnd { id: 3, size: 300 },
        GuestMessage::WriteDone { id: 4, size: 5 },
        GuestMessage::Metrics {
            id: 5,
            metrics: Metrics {
                cpu: Default::default(),
                cpu_count: 2,
                mem_total_bytes: 1 << 30,
                mem_available_bytes: 1 << 29,
                disk_total_bytes: 1 << 33,
                disk_free_bytes: 1 << 32,
                load_avg: [0.5, 0.25, 0.0],
                uptime_secs: 12.5,
            },
        },
        GuestMessage::Done { id: 6 },
        GuestMessage::Error {
            id: 7,
            kind: ErrorKind::NotFound,
            message: "no such file /x".into(),
        },
        GuestMessage::Pty {
            id: 8,
            event: PtyEvent::Output(b"\x1b[1m".to_vec()),
        },
        GuestMessage::Pty {
            id: 8,
            event: PtyEvent::Exit {
                code: Some(0),
                signal: None,
            },
        },
        GuestMessage::DevList {
            id: 9,
            items: vec![DevStatus {
                name: "web".into(),
                command: "npm run dev".into(),
                port: Some(3000),
                state: DevState::Running,
                pid: Some(3),
                restarts: 1,
                last_exit: None,
                listening: true,
                uptime_secs: 5,
            }],
        },
        GuestMessage::DevLog {
            id: 10,
            data: b"log\n".to_vec(),
        },
        GuestMessage::Capabilities {
            caps: vec![CAP_TCP_STREAM.into(), "x".into()],
        },
        GuestMessage::StreamOpened { id: 11 },
        GuestMessage::StreamData {
            id: 11,
            data: vec![2; 70],
        },
        GuestMessage::StreamEof { id: 11 },
    ]
}

fn host_samples() -> Vec<HostMessage> {
    vec![
        HostMessage::Hello {
            version: PROTOCOL_VERSION,
        },
        HostMessage::Ping { id: 1 },
        HostMessage::Exec {
            id: 2,
            req: ExecRequest::new(["sh", "-c", "echo hi"])
                .env("A", "b")
                .cwd("/tmp")
                .with_stdin(),
        },
        HostMessage::Stdin {
            id: 2,
            data: b"in".to_vec(),
            eof: true,
        },
        HostMessage::Kill { id: 2, signal: 9 },
        HostMessage::Cancel { id: 2 },
        HostMessage::WriteFile {
            id: 3,
            path: "/tmp/f".into(),
            mode: 0o644,
        },
        HostMessage::WriteChunk {
            id: 3,
            data: vec![0; 100],
        },
        HostMessage::Pty {
            id: 4,
            req: PtyRequest::shell(24, 80),
        },
        HostMessage::PtyResize {
            id: 4,
            rows: 1,
            cols: 2,
        },
        HostMessage::DevStart {
            id: 5,
            spec: DevSpec::new("web", "npm run dev"),
        },
        HostMessage::DevLogs {
            id: 6,
            name: "web".into(),
            follow: true,
            tail_bytes: u64::MAX,
        },
        HostMessage::NetConfig {
            id: 7,
            cfg: NetConfig {
                mac: [2, 0, 0, 0, 0, 1],
                address: [10, 0, 0, 2],
                prefix_len: 24,
                gateway: [10, 0, 0, 1],
                dns: vec![[10, 0, 0, 1]],
                hostname: Some("h".into()),
            },
        },
        HostMessage::StreamOpen {
            id: 8,
            ip: std::net::Ipv4Addr::LOCALHOST.into(),
            port: 80,
            connect_timeout_ms: 1000,
        },
    ]
}

/// Encoded frames of randomly chosen samples.
fn valid_stream(rng: &mut Rng, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(6) {
        out.extend_from_slice(&frames[rng.below(frames.len())]);
    }
    out
}

/// A hostile length field value.
fn hostile_len(rng: &mut Rng) -> u32 {
    match rng.below(7) {
        0 => 0,
        1 => MAX_FRAME_LEN as u32,
        2 => MAX_FRAME_LEN as u32 + 1,
        3 => u32::MAX,
        4 => 1 << 31,
        5 => rng.below(64) as u32,
        _ => rng.next() as u32,
    }
}

/// Applies 1..=4 random mutations to `data`.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(9) {
            // Flip bytes.
            0 => {
                for _ in 0..1 + rng.below(8) {
                    if len > 0 {
                        let i = rng.below(len);
                        data[i] ^= 1 << rng.below(8);
                    }
                }
            }
            // Insert noise.
            1 => {
                let at = rng.below(len + 1);
                let n = rng.below(100);
                let noise = rng.bytes(n);
                data.splice(at..at, noise);
            }
            // Delete a range.
            2 if len > 0 => {
                let a = rng.below(len);
                let b = (a + rng.below(64)).min(len);
                data.drain(a..b);
            }
            // Tear: cut the stream short.
            3 => data.truncate(rng.below(len + 1)),
            // A magic with a hostile length, with or without body bytes behind it.
            4 => {
                let at = rng.below(len + 1);
                let mut f = FRAME_MAGIC.to_vec();
                f.extend(hostile_len(rng).to_le_bytes());
                let body = rng.below(32);
                f.extend(rng.bytes(body));
                data.splice(at..at, f);
            }
            // Overwrite the length field of the first frame.
            5 if len >= HEADER_LEN => {
                data[4..8].copy_from_slice(&hostile_len(rng).to_le_bytes());
            }
            // Duplicate a range (repeated frames, repeated Started).
            6 if len > 0 => {
                let a = rng.below(len);
                let b = (a + rng.below(200)).min(len);
                let copy = data[a..b].to_vec();
                for _ in 0..1 + rng.below(4) {
                    data.extend_from_slice(&copy);
                }
            }
            // Pure noise of up to a few KiB.
            7 => {
                let n = rng.below(4096);
                data.extend(rng.bytes(n));
            }
            // Magic bytes sprinkled in.
            _ => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(data.len() + 1);
                    data.splice(at..at, FRAME_MAGIC);
                }
            }
        }
    }
}

/// Feeds `data` in random chunks; checks the buffer bound after every push.
fn decode_all<T: serde::de::DeserializeOwned>(rng: &mut Rng, data: &[u8]) -> FrameDecoder {
    let mut d = FrameDecoder::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = (1 + rng.below(8192)).min(rest.len());
        d.push(&rest[..n]);
        rest = &rest[n..];
        while let Some(r) = d.next_frame::<T>() {
            drop(r);
        }
        assert!(
            d.buffered() <= MAX_FRAME_LEN + HEADER_LEN + 8192,
            "decoder buffers {} bytes",
            d.buffered()
        );
    }
    d
}

/// After any garbage, a sync preamble and a valid frame decode again.
fn resyncs<T: serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
    mut d: FrameDecoder,
    frame: &[u8],
    expected: &T,
) {
    d.push(&vec![0u8; SYNC_PREAMBLE_LEN]);
    d.push(frame);
    let mut last = None;
    while let Some(r) = d.next_frame::<T>() {
        last = Some(r);
    }
    match last {
        Some(Ok(m)) => assert_eq!(&m, expected),
        other => panic!("no resync: last frame {other:?}"),
    }
}

#[test]
fn mutated_frames_never_panic_and_stay_bounded() {
    let cases = env_u64("ATELIER_FUZZ_CASES", 500);
    let seed = env_u64("ATELIER_FUZZ_SEED", 0x5EED_A7E1_1E12_0001);
    let guest: Vec<Vec<u8>> = guest_samples()
        .iter()
        .map(|m| encode_frame(m).expect("encode"))
        .collect();
    let host: Vec<Vec<u8>> = host_samples()
        .iter()
        .map(|m| encode_frame(m).expect("encode"))
        .collect();
    let pong = GuestMessage::Pong { id: 42 };
    let pong_frame = encode_frame(&pong).expect("encode");
    let ping = HostMessage::Ping { id: 43 };
    let ping_frame = encode_frame(&ping).expect("encode");
    let mut max_peak = 0usize;
    for case in 0..cases {
        let mut rng = Rng(seed ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let to_guest = rng.below(2) == 0;
        let mut data = if rng.below(10) == 0 {
            let n = rng.below(64 * 1024);
            rng.bytes(n)
        } else {
            valid_stream(&mut rng, if to_guest { &host } else { &guest })
        };
        mutate(&mut rng, &mut data);
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if to_guest {
                let d = decode_all::<HostMessage>(&mut rng, &data);
                resyncs(d, &ping_frame, &ping);
            } else {
                let d = decode_all::<GuestMessage>(&mut rng, &data);
                resyncs(d, &pong_frame, &pong);
            }
            // Message decoding on its own: the stream as one body, and each piece.
            let _ = postcard::from_bytes::<GuestMessage>(&data);
            let _ = postcard::from_bytes::<HostMessage>(&data);
            for piece in data.chunks(1 + rng.below(512)) {
                let _ = postcard::from_bytes::<GuestMessage>(piece);
            }
        }));
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        if let Err(e) = outcome {
            panic!(
                "case {case} (ATELIER_FUZZ_SEED={seed}, {} bytes) panicked: {e:?}",
                data.len()
            );
        }
        assert!(
            peak <= PEAK_BOUND,
            "case {case} (ATELIER_FUZZ_SEED={seed}) used {peak} bytes of heap (bound {PEAK_BOUND})"
        );
        max_peak = max_peak.max(peak);
    }
    println!("{cases} cases, seed {seed}, peak heap per case {max_peak} bytes");
}

#[test]
fn absurd_lengths_in_message_bodies_allocate_nothing_big() {
    // Bodies announcing huge vectors and strings, with no bytes behind them.
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for variant in 0u8..24 {
        for len in [u32::MAX, 1 << 30, MAX_FRAME_LEN as u32 + 1] {
            let mut b = vec![variant, 1];
            let mut v = len;
            // postcard varint.
            while v >= 0x80 {
                b.push((v as u8) | 0x80);
                v >>= 7;
            }
            b.push(v as u8);
            b.extend([0u8; 16]);
            bodies.push(b);
        }
    }
    for body in &bodies {
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let _ = postcard::from_bytes::<GuestMessage>(body);
        let _ = postcard::from_bytes::<HostMessage>(body);
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        assert!(peak < 1 << 20, "body {body:?} used {peak} bytes");
    }
}

static TASK_PANICKED: AtomicBool = AtomicBool::new(false);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_survives_mutated_streams() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        TASK_PANICKED.store(true, Ordering::SeqCst);
        prev(info);
    }));
    let cases = env_u64("ATELIER_FUZZ_CASES", 500) / 5;
    let seed = env_u64("ATELIER_FUZZ_SEED", 0x5EED_A7E1_1E12_0001);
    let frames: Vec<Vec<u8>> = guest_samples()
        .iter()
        .map(|m| encode_frame(m).expect("encode"))
        .collect();
    let hello = |pid| {
        let mut v = encode_frame(&GuestMessage::Hello(Hello {
            version: PROTOCOL_VERSION,
            agent_version: "t".into(),
            boot_id: "b".into(),
            pid,
        }))
        .expect("encode");
        v.extend(
            encode_frame(&GuestMessage::Capabilities {
                caps: vec![CAP_TCP_STREAM.into()],
            })
            .expect("encode"),
        );
        v
    };
    let (mut answered, mut closed) = (0, 0);
    for case in 0..cases {
        let mut rng = Rng(seed ^ case.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1);
        let (a, b) = tokio::net::UnixStream::pair().expect("pair");
        let client = AgentClient::from_stream(a).with_timeout(Duration::from_secs(5));
        let (mut rd, mut wr) = b.into_split();
        // Drain what the host sends so its writer never blocks.
        let drain = tokio::spawn(async move {
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut rd, &mut sink).await;
        });
        let mut data = hello(1);
        data.extend(valid_stream(&mut rng, &frames));
        mutate(&mut rng, &mut data);
        let _ = wr.write_all(&data).await;
        let _ = wr.write_all(&vec![0u8; SYNC_PREAMBLE_LEN]).await;
        let _ = wr.write_all(&hello(1)).await;
        // The client either still works (a metrics request is answered by the
        // fake's silence with a timeout, a ping never reaches us here) or closed the
        // connection with a reason. Either way it must have decided within the
        // deadline and no task may have panicked.
        // A mutated Hello may announce another version until the final Hello lands:
        // poll (with a deadline) until the client is ready or closed.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match client.wait_ready(Duration::from_secs(2)).await {
                Ok(_) => {
                    assert!(client.is_connected(), "case {case}");
                    answered += 1;
                    break;
                }
                Err(ProtoError::Disconnected { reason }) => {
                    assert!(
                        reason.contains("protocol violation"),
                        "case {case} (ATELIER_FUZZ_SEED={seed}): {reason}"
                    );
                    closed += 1;
                    break;
                }
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "case {case} (ATELIER_FUZZ_SEED={seed}): neither ready nor closed: {e}"
                    );
                    tokio::task::yield_now().await;
                }
            }
        }
        assert!(
            !TASK_PANICKED.load(Ordering::SeqCst),
            "case {case} (ATELIER_FUZZ_SEED={seed}) panicked a task"
        );
        drop(client);
        drop(wr);
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    }
    println!("{cases} client cases: {answered} still ready, {closed} closed");
}
