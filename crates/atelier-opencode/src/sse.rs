//! A bounded Server-Sent Events parser (the WHATWG event-stream format).
//!
//! Bytes go in as they arrive (any split, `\n`, `\r\n` or `\r` line ends); complete
//! events come out. A line or an event's data longer than the limit is an error, so a
//! peer that never ends a line cannot make the parser grow without bound.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field (empty when absent: the spec's "message").
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The last `id:` field seen, if any.
    pub id: Option<String>,
}

/// Why parsing stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line or an event was longer than the limit.
    #[error("event stream line or event longer than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// A line was not UTF-8.
    #[error("event stream line is not utf-8")]
    NotUtf8,
}

/// Incremental parser; feed it with [`SseParser::push`].
#[derive(Debug)]
pub struct SseParser {
    limit: usize,
    line: Vec<u8>,
    /// The previous chunk ended in `\r`: a leading `\n` belongs to that line end.
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
    id: Option<String>,
}

impl SseParser {
    /// A parser refusing lines and events longer than `limit` bytes.
    pub fn new(limit: usize) -> SseParser {
        SseParser {
            limit,
            line: Vec::new(),
            after_cr: false,
            event: String::new(),
            data: String::new(),
            has_data: false,
            id: None,
        }
    }

    /// Feeds `chunk`; returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut out = Vec::new();
        let mut rest = chunk;
        if self.after_cr {
            self.after_cr = false;
            if let [b'\n', tail @ ..] = rest {
                rest = tail;
            }
        }
        while !rest.is_empty() {
            match rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
                None => {
                    self.grow_line(rest)?;
                    break;
                }
                Some(i) => {
                    self.grow_line(&rest[..i])?;
                    let cr = rest[i] == b'\r';
                    rest = &rest[i + 1..];
                    if cr {
                        match rest.first() {
                            Some(b'\n') => rest = &rest[1..],
                            None => self.after_cr = true,
                            Some(_) => {}
                        }
                    }
                    let line = std::mem::take(&mut self.line);
                    if let Some(ev) = self.line_done(&line)? {
                        out.push(ev);
                    }
                }
            }
        }
        Ok(out)
    }

    fn grow_line(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if self.line.len() + bytes.len() > self.limit {
            return Err(SseError::TooLarge { limit: self.limit });
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn line_done(&mut self, line: &[u8]) -> Result<Option<SseEvent>, SseError> {
        if line.is_empty() {
            return Ok(self.dispatch());
        }
        if line[0] == b':' {
            return Ok(None); // a comment (keepalive)
        }
        let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                let extra = value.len() + usize::from(self.has_data);
                if self.data.len() + extra > self.limit {
                    return Err(SseError::TooLarge { limit: self.limit });
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => value.clone_into(&mut self.event),
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {} // `retry` and unknown fields are ignored
        }
        Ok(None)
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = std::mem::take(&mut self.event);
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(SseEvent {
            event,
            data: std::mem::take(&mut self.data),
            id: self.id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut SseParser, chunks: &[&[u8]]) -> Vec<SseEvent> {
        chunks
            .iter()
            .flat_map(|c| p.push(c).expect("parse"))
            .collect()
    }

    fn data(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn one_event_per_blank_line() {
        let mut p = SseParser::new(1024);
        let evs = all(&mut p, &[b"data: {\"a\":1}\n\ndata: two\n\n"]);
        assert_eq!(data(&evs), ["{\"a\":1}", "two"]);
    }

    #[test]
    fn events_split_across_chunks_at_every_byte() {
        let text = b"event: x\ndata: hello\r\n\r\ndata: world\n\n";
        for cut in 0..text.len() {
            let mut p = SseParser::new(1024);
            let evs = all(&mut p, &[&text[..cut], &text[cut..]]);
            assert_eq!(data(&evs), ["hello", "world"], "cut at {cut}");
            assert_eq!(evs[0].event, "x");
            assert_eq!(evs[1].event, "");
        }
    }

    #[test]
    fn crlf_and_bare_cr_line_ends() {
        let mut p = SseParser::new(1024);
        let evs = all(&mut p, &[b"data: a\r\n\r\ndata: b\r\rdata: c\r", b"\n\r\n"]);
        assert_eq!(data(&evs), ["a", "b", "c"]);
    }

    #[test]
    fn comments_and_unknown_fields_are_ignored() {
        let mut p = SseParser::new(1024);
        let evs = all(
            &mut p,
            &[b": keepalive\n\nretry: 10\nfoo: bar\ndata: x\nid: 7\n\n"],
        );
        assert_eq!(data(&evs), ["x"]);
        assert_eq!(evs[0].id.as_deref(), Some("7"));
    }

    #[test]
    fn multi_line_data_joins_with_newlines() {
        let mut p = SseParser::new(1024);
        let evs = all(&mut p, &[b"data: one\ndata:two\ndata\n\n"]);
        assert_eq!(data(&evs), ["one\ntwo\n"]);
    }

    #[test]
    fn a_blank_line_without_data_dispatches_nothing() {
        let mut p = SseParser::new(1024);
        assert!(all(&mut p, &[b"event: x\n\n\n\n"]).is_empty());
    }

    #[test]
    fn an_endless_line_is_an_error_not_growth() {
        let mut p = SseParser::new(64);
        assert!(p.push(&[b'a'; 40]).is_ok());
        assert_eq!(p.push(&[b'a'; 40]), Err(SseError::TooLarge { limit: 64 }));
    }

    #[test]
    fn many_data_lines_over_the_limit_are_an_error() {
        let mut p = SseParser::new(64);
        let line = format!("data: {}\n", "x".repeat(30));
        assert!(p.push(line.as_bytes()).is_ok());
        assert!(p.push(line.as_bytes()).is_ok());
        assert_eq!(
            p.push(line.as_bytes()),
            Err(SseError::TooLarge { limit: 64 })
        );
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let mut p = SseParser::new(64);
        assert_eq!(p.push(b"data: \xff\n"), Err(SseError::NotUtf8));
    }
}
