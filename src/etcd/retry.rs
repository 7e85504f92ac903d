//! The one retry helper: capped, jittered exponential backoff, and a sleep
//! that keeps the liveness heartbeat going and ends early on cancellation.
//! Every retrying loop (connect, campaign, job, reset request) uses these,
//! so none of them can starve `/healthz` or outlive a shutdown.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Capped, jittered exponential backoff without a retry limit, from 250 ms.
pub fn backoff(max_delay: Duration) -> impl Iterator<Item = Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(max_delay)
        .without_max_times()
        .build()
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
        assert!(backoff(cap).take(50).all(|d| d <= cap * 2));
        assert!(backoff(cap).take(50).count() == 50, "never runs out");
    }
}
