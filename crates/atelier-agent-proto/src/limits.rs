//! Limits on what a (hostile) agent can make the host do: flood budgets, the log
//! limiter and truncation of guest-supplied text.
//!
//! The guest is root in its VM and can write anything to the control port. Memory is
//! bounded by the queues of [`crate::client`]; these budgets bound the rest: a burst of
//! rejected frames, skipped garbage or Hellos beyond its budget closes the connection,
//! and warnings about what the guest sent are logged at a bounded rate.

use std::time::Instant;

/// A token bucket: up to `burst` units at once, refilled at `per_sec` units a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Units available after a quiet period (the most taken at once).
    pub burst: u64,
    /// Units added back each second.
    pub per_sec: u64,
}

/// Rejected frames (oversize length, malformed body). A restarting agent causes one
/// or two (its torn frame); a flood of them closes the connection.
pub const DECODE_ERROR_BUDGET: Budget = Budget {
    burst: 64,
    per_sec: 2,
};

/// Bytes skipped while looking for a frame start. A restarting agent writes one sync
/// preamble (about 1 MiB of zeros); a sustained flood of garbage closes the connection.
pub const GARBAGE_BUDGET: Budget = Budget {
    burst: 8 << 20,
    per_sec: 256 << 10,
};

/// Hellos (each one from a new process means an agent restart, which fails every
/// outstanding request). More than this in a burst is a flood.
pub const HELLO_BUDGET: Budget = Budget {
    burst: 32,
    per_sec: 1,
};

/// Warnings about what the guest sent, per connection.
pub const LOG_BUDGET: Budget = Budget {
    burst: 20,
    per_sec: 1,
};

/// Longest guest-supplied text put into a log line, in characters.
pub const LOG_TEXT_MAX: usize = 200;

/// The state of one [`Budget`].
#[derive(Debug, Clone)]
pub struct Bucket {
    budget: Budget,
    tokens: u64,
    last: Instant,
}

impl Bucket {
    /// A full bucket of `budget` at time `now`.
    pub fn new(budget: Budget, now: Instant) -> Self {
        Self {
            budget,
            tokens: budget.burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let add = (elapsed.as_millis() as u64).saturating_mul(self.budget.per_sec) / 1000;
        if add > 0 {
            self.tokens = self.tokens.saturating_add(add).min(self.budget.burst);
            self.last = now;
        }
    }

    /// Takes `n` units; false (and the bucket emptied) when fewer are left.
    pub fn take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            self.tokens = 0;
            false
        }
    }
}

/// Rate-limits log lines: admits a line while its budget lasts and counts the ones it
/// drops, so the next admitted line can say how many were suppressed.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    bucket: Bucket,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter with budget `budget`.
    pub fn new(budget: Budget, now: Instant) -> Self {
        Self {
            bucket: Bucket::new(budget, now),
            suppressed: 0,
        }
    }

    /// `Some(lines suppressed since the last admitted one)` when a line may be logged.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self.bucket.take(1, now) {
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// The budgets of one agent connection.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) decode_errors: Bucket,
    pub(crate) garbage: Bucket,
    pub(crate) hellos: Bucket,
    pub(crate) log: LogLimiter,
}

impl Limits {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            decode_errors: Bucket::new(DECODE_ERROR_BUDGET, now),
            garbage: Bucket::new(GARBAGE_BUDGET, now),
            hellos: Bucket::new(HELLO_BUDGET, now),
            log: LogLimiter::new(LOG_BUDGET, now),
        }
    }
}

/// `text` cut to at most `max` characters, control characters escaped, with a marker
/// saying how much was cut.
pub fn truncate_text(text: &str, max: usize) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    for (count, c) in chars.by_ref().enumerate() {
        if count == max {
            let rest = 1 + chars.count();
            out.push_str(&format!("... ({rest} more characters)"));
            return out;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::new(
            Budget {
                burst: 3,
                per_sec: 1,
            },
            t0,
        );
        assert!(b.take(1, t0) && b.take(1, t0) && b.take(1, t0));
        assert!(!b.take(1, t0));
        assert!(!b.take(1, t0 + Duration::from_millis(500)));
        assert!(b.take(1, t0 + Duration::from_millis(1600)));
        assert!(b.take(3, t0 + Duration::from_secs(100)));
    }

    #[test]
    fn log_limiter_counts_suppressed() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(
            Budget {
                burst: 1,
                per_sec: 1,
            },
            t0,
        );
        assert_eq!(l.admit(t0), Some(0));
        assert_eq!(l.admit(t0), None);
        assert_eq!(l.admit(t0), None);
        assert_eq!(l.admit(t0 + Duration::from_secs(2)), Some(2));
    }

    #[test]
    fn truncate_cuts_and_escapes() {
        assert_eq!(truncate_text("abc", 5), "abc");
        assert_eq!(truncate_text("a\nb", 5), "a\\nb");
        assert_eq!(truncate_text("abcdef", 3), "abc... (3 more characters)");
        let long = "é".repeat(10_000);
        assert!(truncate_text(&long, LOG_TEXT_MAX).chars().count() < LOG_TEXT_MAX + 40);
    }
}
