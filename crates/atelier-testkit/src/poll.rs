//! Polling with a deadline: the only way tests wait for something to happen.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// Time between two checks.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Calls `f` every [`POLL_INTERVAL`] until it returns `Some`, and returns that value.
///
/// Panics with "timed out after {deadline:?} waiting for {what}" when `deadline` passes
/// first, so a failing test names what it was waiting for.
pub fn poll_until<T>(
    deadline: Duration,
    what: impl Display,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// [`poll_until`] for a condition: waits until `f` returns true.
pub fn wait_until(deadline: Duration, what: impl Display, mut f: impl FnMut() -> bool) {
    poll_until(deadline, what, || f().then_some(()))
}

/// The async form of [`poll_until`]: awaits `f()` every [`POLL_INTERVAL`] until it
/// yields `Some`; panics naming `what` when `deadline` passes first.
pub async fn poll_until_async<T, F, Fut>(deadline: Duration, what: impl Display, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_value() {
        let mut n = 0;
        let v = poll_until(Duration::from_secs(5), "the third call", || {
            n += 1;
            (n == 3).then_some(n)
        });
        assert_eq!(v, 3);
    }

    #[test]
    #[should_panic(expected = "waiting for the impossible")]
    fn panics_naming_what_was_awaited() {
        wait_until(Duration::from_millis(120), "the impossible", || false);
    }

    #[tokio::test]
    async fn async_form() {
        let mut n = 0;
        let v = poll_until_async(Duration::from_secs(5), "two calls", || {
            n += 1;
            let n = n;
            async move { (n == 2).then_some("done") }
        })
        .await;
        assert_eq!(v, "done");
    }
}
