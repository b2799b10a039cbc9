//! Framing: `MAGIC (4 bytes) | body length (u32 LE) | postcard body`.
//!
//! Decoding is defensive. A length above [`MAX_FRAME_LEN`] is an error and is never
//! allocated; bytes that do not start with the magic are skipped by scanning for it
//! (a peer killed mid-frame leaves a torn frame in the stream); a body that does not
//! decode is counted, skipped whole and reported. Nothing here panics on input.
//!
//! Torn frames: a restarting peer first writes [`SYNC_PREAMBLE_LEN`] zero bytes, more
//! than any frame body, so a reader stuck waiting for the rest of a torn frame is
//! filled up, rejects that frame, skips the zeros and finds the next magic.

use bytes::{Buf, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::MAX_FRAME_LEN;
use crate::error::FrameError;

/// Marks the start of every frame.
pub const FRAME_MAGIC: [u8; 4] = [0xA7, b'A', b'T', b'L'];

/// Magic plus length.
pub const HEADER_LEN: usize = 8;

/// Zero bytes a (re)starting peer writes before its first frame (see module docs).
pub const SYNC_PREAMBLE_LEN: usize = MAX_FRAME_LEN + HEADER_LEN;

/// Encodes `msg` as one complete frame.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_LEN];
    out = postcard::to_extend(msg, out).map_err(FrameError::Encode)?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    out[..4].copy_from_slice(&FRAME_MAGIC);
    // len <= MAX_FRAME_LEN < u32::MAX, checked above.
    out[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Incremental frame decoder: [`push`](Self::push) bytes, then pull frames.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
    skipped_bytes: u64,
    errors: u64,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Drops any partial frame (e.g. after the peer disconnected).
    pub fn reset(&mut self) {
        self.buf.clear();
    }

    /// Bytes skipped while searching for a frame start (including sync preambles).
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped_bytes
    }

    /// Frames rejected so far (oversize or malformed).
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// Discards everything before the next magic; true when the buffer starts with one.
    fn sync(&mut self) -> bool {
        if self.buf.starts_with(&FRAME_MAGIC) {
            return true;
        }
        let found = self
            .buf
            .windows(FRAME_MAGIC.len())
            .position(|w| w == FRAME_MAGIC);
        let drop = match found {
            Some(pos) => pos,
            // Keep a tail that might be the beginning of a magic.
            None => self.buf.len().saturating_sub(FRAME_MAGIC.len() - 1),
        };
        self.skipped_bytes += drop as u64;
        self.buf.advance(drop);
        found.is_some()
    }

    /// The next complete frame, `None` when more bytes are needed. An `Err` reports one
    /// rejected frame; decoding continues with the following bytes on the next call.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Option<Result<T, FrameError>> {
        if !self.sync() || self.buf.len() < HEADER_LEN {
            return None;
        }
        let len = u32::from_le_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]) as usize;
        if len > MAX_FRAME_LEN {
            // Not a real frame start (or a hostile one): skip this magic and rescan.
            self.errors += 1;
            self.buf.advance(1);
            return Some(Err(FrameError::TooLarge {
                len,
                max: MAX_FRAME_LEN,
            }));
        }
        let total = HEADER_LEN + len;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return None;
        }
        let result = decode_body(&self.buf[HEADER_LEN..total]);
        self.buf.advance(total);
        if result.is_err() {
            self.errors += 1;
        }
        Some(result)
    }
}

fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes::<T>(body).map_err(|source| FrameError::Body {
        len: body.len(),
        source,
    })?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes { extra: rest.len() });
    }
    Ok(msg)
}

/// Reads frames from an async byte stream.
pub struct FrameReader<R> {
    reader: R,
    decoder: FrameDecoder,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps `reader`.
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            decoder: FrameDecoder::new(),
            buf: vec![0; 64 * 1024],
        }
    }

    /// The underlying reader (bytes read from it bypass the decoder).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.reader
    }

    /// The decoder's statistics.
    pub fn decoder(&self) -> &FrameDecoder {
        &self.decoder
    }

    /// The next frame: `Ok(None)` at end of stream, `Ok(Some(Err(_)))` for a rejected
    /// frame (keep reading), `Err` when reading the stream failed.
    pub async fn next<T: DeserializeOwned>(
        &mut self,
    ) -> std::io::Result<Option<Result<T, FrameError>>> {
        loop {
            if let Some(frame) = self.decoder.next_frame() {
                return Ok(Some(frame));
            }
            let n = self.reader.read(&mut self.buf).await?;
            if n == 0 {
                return Ok(None);
            }
            self.decoder.push(&self.buf[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{GuestMessage, HostMessage};

    fn ping(id: u64) -> Vec<u8> {
        encode_frame(&HostMessage::Ping { id }).expect("encode")
    }

    fn drain(d: &mut FrameDecoder) -> Vec<Result<HostMessage, FrameError>> {
        std::iter::from_fn(|| d.next_frame::<HostMessage>()).collect()
    }

    #[test]
    fn header_layout() {
        let f = ping(1);
        assert_eq!(&f[..4], &FRAME_MAGIC);
        assert_eq!(
            u32::from_le_bytes([f[4], f[5], f[6], f[7]]) as usize,
            f.len() - 8
        );
        assert_eq!(hex::encode(&f), "a741544c020000000101");
    }

    #[test]
    fn byte_by_byte() {
        let mut d = FrameDecoder::new();
        let mut stream = ping(1);
        stream.extend(ping(2));
        let mut out = Vec::new();
        for b in stream {
            d.push(&[b]);
            out.extend(drain(&mut d));
        }
        let ids: Vec<_> = out
            .into_iter()
            .map(|r| match r.expect("frame") {
                HostMessage::Ping { id } => id,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(ids, vec![1, 2]);
        assert_eq!(d.errors(), 0);
        assert_eq!(d.skipped_bytes(), 0);
    }

    #[test]
    fn garbage_before_frame_is_skipped() {
        let mut d = FrameDecoder::new();
        d.push(b"hello garbage \xA7\xA7AT");
        d.push(&ping(7));
        let out = drain(&mut d);
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].as_ref().expect("frame"),
            &HostMessage::Ping { id: 7 }
        );
        assert!(d.skipped_bytes() >= 18);
    }

    #[test]
    fn oversize_length_is_rejected_without_allocating() {
        let mut d = FrameDecoder::new();
        let mut bad = FRAME_MAGIC.to_vec();
        bad.extend(u32::MAX.to_le_bytes());
        d.push(&bad);
        d.push(&ping(3));
        let out = drain(&mut d);
        assert!(matches!(out[0], Err(FrameError::TooLarge { .. })));
        assert_eq!(
            out[1].as_ref().expect("frame"),
            &HostMessage::Ping { id: 3 }
        );
        assert!(
            d.buf.capacity() < 1 << 16,
            "must not reserve the announced length"
        );
        assert_eq!(d.errors(), 1);
    }

    #[test]
    fn malformed_body_is_counted_and_skipped() {
        let mut d = FrameDecoder::new();
        let mut bad = FRAME_MAGIC.to_vec();
        bad.extend(3u32.to_le_bytes());
        bad.extend([0xFF, 0xFF, 0xFF]); // variant index overflow
        d.push(&bad);
        // Trailing bytes: a valid Ping body plus one extra byte.
        let mut trailing = FRAME_MAGIC.to_vec();
        trailing.extend(3u32.to_le_bytes());
        trailing.extend([1, 5, 0]);
        d.push(&trailing);
        // Empty body.
        d.push(&FRAME_MAGIC);
        d.push(&0u32.to_le_bytes());
        d.push(&ping(9));
        let out = drain(&mut d);
        assert_eq!(out.len(), 4);
        assert!(matches!(out[0], Err(FrameError::Body { .. })));
        assert!(matches!(
            out[1],
            Err(FrameError::TrailingBytes { extra: 1 })
        ));
        assert!(matches!(out[2], Err(FrameError::Body { .. })));
        assert_eq!(
            out[3].as_ref().expect("frame"),
            &HostMessage::Ping { id: 9 }
        );
        assert_eq!(d.errors(), 3);
    }

    #[test]
    fn torn_frame_recovers_after_sync_preamble() {
        // A peer dies after writing half a large frame, restarts, writes the preamble
        // and a new frame: the decoder must find the new frame.
        let big = encode_frame(&GuestMessage::FileChunk {
            id: 1,
            data: vec![0xA7; 300_000],
        })
        .expect("encode");
        let mut d = FrameDecoder::new();
        d.push(&big[..150_000]);
        assert!(d.next_frame::<GuestMessage>().is_none());
        d.push(&vec![0u8; SYNC_PREAMBLE_LEN]);
        d.push(&encode_frame(&GuestMessage::Pong { id: 5 }).expect("encode"));
        let out: Vec<_> = std::iter::from_fn(|| d.next_frame::<GuestMessage>()).collect();
        let last = out.last().expect("some frame");
        assert_eq!(last.as_ref().expect("frame"), &GuestMessage::Pong { id: 5 });
        assert!(d.buffered() < 8);
    }

    #[test]
    fn random_garbage_never_panics() {
        // Deterministic xorshift noise, with magics sprinkled in.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut d = FrameDecoder::new();
        for round in 0..2000 {
            let mut chunk = Vec::with_capacity(64);
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.push(x as u8);
            }
            if round % 3 == 0 {
                chunk[10..14].copy_from_slice(&FRAME_MAGIC);
                chunk[14..18].copy_from_slice(&((x % 40) as u32).to_le_bytes());
            }
            d.push(&chunk);
            while let Some(r) = d.next_frame::<GuestMessage>() {
                let _ = r;
            }
            assert!(d.buffered() <= MAX_FRAME_LEN + HEADER_LEN + 64);
        }
        d.push(&encode_frame(&GuestMessage::Pong { id: 1 }).expect("encode"));
        d.push(&vec![0u8; SYNC_PREAMBLE_LEN]);
        d.push(&encode_frame(&GuestMessage::Pong { id: 2 }).expect("encode"));
        let out: Vec<_> = std::iter::from_fn(|| d.next_frame::<GuestMessage>()).collect();
        assert!(matches!(out.last(), Some(Ok(GuestMessage::Pong { id: 2 }))));
    }

    #[test]
    fn encode_rejects_oversize() {
        let msg = GuestMessage::FileChunk {
            id: 1,
            data: vec![0; MAX_FRAME_LEN + 1],
        };
        assert!(matches!(
            encode_frame(&msg),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn frame_reader_reads_until_eof() {
        let mut bytes = b"junk".to_vec();
        bytes.extend(ping(1));
        bytes.extend(ping(2));
        let mut r = FrameReader::new(&bytes[..]);
        assert!(matches!(
            r.next::<HostMessage>().await,
            Ok(Some(Ok(HostMessage::Ping { id: 1 })))
        ));
        assert!(matches!(
            r.next::<HostMessage>().await,
            Ok(Some(Ok(HostMessage::Ping { id: 2 })))
        ));
        assert!(matches!(r.next::<HostMessage>().await, Ok(None)));
    }
}
