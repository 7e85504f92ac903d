//! `--max-write-ops-per-second` and `--max-write-bytes-per-second`: a token
//! bucket per job, awaited before each destination txn is sent, so a full
//! sync or a burst of events slows down instead of failing.
//!
//! Hand-written on tokio's clock rather than `governor`: governor reads its
//! own clock (so paused-time tests and the simulator could not drive it) and
//! refuses a request larger than its burst, while one txn may carry up to
//! `--max-txn-bytes`. Here a txn larger than the bucket is let through once
//! the bucket is full and leaves it in debt, so the long-run rate still holds.

use std::sync::Mutex;
use std::time::Duration;

// tokio's clock, so the simulator's paused time governs every deadline.
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::WriteRateLimit;

/// One bucket: `rate` tokens a second, holding at most one second's worth.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    /// Tokens at `at`; negative while in debt.
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Self {
        Self {
            rate: rate as f64,
            tokens: rate as f64,
            at: now,
        }
    }

    /// Takes `cost` tokens; returns how long after `now` the txn may go:
    /// once the bucket is out of debt.
    fn reserve(&mut self, cost: u64, now: Instant) -> Duration {
        // Reservations made ahead of time leave `at` in the future.
        if now > self.at {
            let refill = (now - self.at).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.rate);
            self.at = now;
        }
        let ready = self.at + Duration::from_secs_f64((-self.tokens).max(0.0) / self.rate);
        // The debt is paid from `ready` on: account from there.
        if ready > self.at {
            self.tokens += (ready - self.at).as_secs_f64() * self.rate;
            self.at = ready;
        }
        self.tokens -= cost as f64;
        ready.saturating_duration_since(now)
    }
}

/// The write limit of one job, shared by every txn it sends.
#[derive(Debug)]
pub struct WriteRate {
    ops: Option<Mutex<Bucket>>,
    bytes: Option<Mutex<Bucket>>,
}

impl WriteRate {
    /// `None` when neither limit is set.
    pub fn new(limit: WriteRateLimit) -> Option<Self> {
        let now = Instant::now();
        let bucket = |rate: u64| (rate > 0).then(|| Mutex::new(Bucket::new(rate, now)));
        let rate = Self {
            ops: bucket(limit.ops_per_second),
            bytes: bucket(limit.bytes_per_second),
        };
        (rate.ops.is_some() || rate.bytes.is_some()).then_some(rate)
    }

    /// Reserves one txn of `ops` ops and `bytes` bytes now, in call order,
    /// and returns how long to wait before sending it.
    pub fn reserve(&self, ops: usize, bytes: usize) -> Duration {
        let now = Instant::now();
        let take = |bucket: &Option<Mutex<Bucket>>, cost: usize| {
            bucket.as_ref().map_or(Duration::ZERO, |b| {
                b.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .reserve(cost as u64, now)
            })
        };
        take(&self.ops, ops).max(take(&self.bytes, bytes))
    }

    /// Waits until a txn of `ops` ops and `bytes` bytes may be sent. False
    /// if `cancel` fired first (the txn must not be sent).
    ///
    /// # Cancel-Safety
    /// Cancel-safe: it only sleeps; a dropped wait loses its reservation,
    /// which only slows later txns.
    pub async fn acquire(&self, ops: usize, bytes: usize, cancel: &CancellationToken) -> bool {
        let wait = self.reserve(ops, bytes);
        if wait.is_zero() {
            return !cancel.is_cancelled();
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(ops: u64, bytes: u64) -> WriteRateLimit {
        WriteRateLimit {
            ops_per_second: ops,
            bytes_per_second: bytes,
        }
    }

    #[test]
    fn unset_limits_build_no_bucket() {
        assert!(WriteRate::new(limit(0, 0)).is_none());
        assert!(WriteRate::new(limit(1, 0)).is_some());
        assert!(WriteRate::new(limit(0, 1)).is_some());
    }

    /// Over a long run on paused time, the ops sent stay within one
    /// second's burst (plus one txn) of the rate, and the bytes likewise.
    #[tokio::test(start_paused = true)]
    async fn the_long_run_rate_holds_on_both_limits() {
        let rate = WriteRate::new(limit(100, 10_000)).unwrap();
        let cancel = CancellationToken::new();
        let started = Instant::now();
        let (mut ops, mut bytes) = (0u64, 0u64);
        // Mixed txns: some cost more ops, some more bytes, one above the burst.
        for i in 0..400u64 {
            let (o, b) = match i % 4 {
                0 => (30, 100),
                1 => (1, 4_000),
                2 => (5, 500),
                _ => (1, if i == 203 { 25_000 } else { 50 }),
            };
            assert!(rate.acquire(o, b, &cancel).await);
            ops += o as u64;
            bytes += b as u64;
            let elapsed = started.elapsed().as_secs_f64();
            assert!(
                ops as f64 <= 100.0 + 30.0 + 100.0 * elapsed,
                "{ops} ops after {elapsed}s"
            );
            assert!(
                bytes as f64 <= 10_000.0 + 25_000.0 + 10_000.0 * elapsed,
                "{bytes} bytes after {elapsed}s"
            );
        }
        // And it did wait: 3,700 ops at 100/s need at least 36 s.
        assert!(started.elapsed() >= Duration::from_secs(36));
    }

    /// A txn larger than the whole bucket is not refused: it goes once the
    /// bucket is full, and the next one waits out the debt.
    #[tokio::test(start_paused = true)]
    async fn an_oversized_txn_goes_and_leaves_debt() {
        let rate = WriteRate::new(limit(10, 0)).unwrap();
        assert_eq!(rate.reserve(50, 0), Duration::ZERO);
        assert_eq!(rate.reserve(1, 0), Duration::from_secs(4));
    }

    /// Waiting ends at once, without the txn, when the job is cancelled.
    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_on_cancellation() {
        let rate = WriteRate::new(limit(1, 0)).unwrap();
        let cancel = CancellationToken::new();
        // Two ops from a bucket of one: the next txn waits a second.
        assert!(rate.acquire(2, 0, &cancel).await);
        let started = Instant::now();
        let waiting = rate.acquire(1, 0, &cancel);
        let canceller = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            cancel.cancel();
        };
        let (sent, ()) = tokio::join!(waiting, canceller);
        assert!(!sent);
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }
}
