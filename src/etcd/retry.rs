//! Retrying, written once: a [`Policy`] (capped, jittered exponential
//! backoff, as data), and a sleep that keeps the liveness heartbeat going
//! and ends early on cancellation. Every retrying loop (connect, campaign,
//! job, reset request, auth sync, page reads) takes its delays from a
//! `Policy` here, and sleeps with [`sleep_alive`] or backon's `Retryable`,
//! so none of them can starve `/healthz` or outlive a shutdown. What an
//! error means (retry, resync, stop) is `mirror::error`'s business, not
//! the policy's.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How a loop backs off: the first delay, the cap, and how many retries
/// before the error is the caller's (`None`: as many as it takes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub min_delay: Duration,
    pub max_delay: Duration,
    pub max_retries: Option<usize>,
}

impl Policy {
    /// A job's loop: capped at 10 s, so after a long outage replication
    /// resumes within seconds of the link coming back, while a dead
    /// cluster still sees only a few requests a minute from each job.
    pub const JOB: Policy = Policy::forever(Duration::from_secs(10));
    /// Connecting, campaigning, operator requests: capped at 30 s.
    pub const CONNECT: Policy = Policy::forever(Duration::from_secs(30));
    /// One page of a paged read: a few quick retries inside the read, then
    /// the error goes to the job's own loop.
    pub const PAGE_READ: Policy = Policy {
        min_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(5),
        max_retries: Some(6),
    };

    /// From 250 ms to `max_delay`, without a retry limit.
    pub const fn forever(max_delay: Duration) -> Policy {
        Policy {
            min_delay: Duration::from_millis(250),
            max_delay,
            max_retries: None,
        }
    }

    /// The policy for backon's `Retryable`.
    pub fn builder(&self) -> backon::ExponentialBuilder {
        let builder = backon::ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay);
        match self.max_retries {
            Some(times) => builder.with_max_times(times),
            None => builder.without_max_times(),
        }
    }

    /// The delays, for a loop that sleeps with [`sleep_alive`] itself.
    pub fn backoff(&self) -> impl Iterator<Item = Duration> {
        use backon::BackoffBuilder;
        self.builder().build()
    }
}

/// How often a sleeping loop still tells `/healthz` it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// Sleeps `delay`, calling `heartbeat` at least every [`HEARTBEAT_EVERY`].
/// Returns false when cancelled first.
///
/// # Cancel-Safety
/// Cancel-safe: it only sleeps.
pub async fn sleep_alive(
    delay: Duration,
    heartbeat: &(dyn Fn() + Send + Sync),
    cancel: &CancellationToken,
) -> bool {
    let deadline = tokio::time::Instant::now() + delay;
    let mut beat = tokio::time::interval(HEARTBEAT_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep_until(deadline) => return true,
            _ = beat.tick() => heartbeat(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn sleeping_keeps_the_heartbeat_and_stops_on_cancel() {
        let beats = AtomicUsize::new(0);
        let beat = || {
            beats.fetch_add(1, Ordering::SeqCst);
        };
        let cancel = CancellationToken::new();
        assert!(sleep_alive(Duration::from_secs(10), &beat, &cancel).await);
        // One at the start, then one a second.
        assert!(beats.load(Ordering::SeqCst) >= 10, "{beats:?}");
        cancel.cancel();
        assert!(!sleep_alive(Duration::from_secs(3600), &beat, &cancel).await);
    }

    #[test]
    fn backoff_is_capped() {
        let cap = Duration::from_secs(10);
        assert!(Policy::forever(cap)
            .backoff()
            .take(50)
            .all(|d| d <= cap * 2));
        assert!(
            Policy::forever(cap).backoff().take(50).count() == 50,
            "never runs out"
        );
        assert_eq!(Policy::PAGE_READ.backoff().count(), 6, "gives up");
    }
}
