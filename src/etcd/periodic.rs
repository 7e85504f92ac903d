//! The one periodic-task skeleton: rounds every period, a round that is
//! late waits rather than bunching up, and cancellation ends both the wait
//! and a round in progress. The periodic check, the history window, the
//! operator-marker poll and the auth sync are each a loop over [`Rounds`].

use std::future::Future;
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// When the first round runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First {
    /// At once (a poll whose answer is wanted from the start).
    Now,
    /// One period in (a measurement a short phase should not pay for).
    AfterOnePeriod,
}

/// Rounds of a periodic task:
/// `while rounds.next().await { let Some(x) = rounds.run(work).await else { return }; … }`.
pub struct Rounds {
    tick: Interval,
    cancel: CancellationToken,
}

impl Rounds {
    pub fn new(period: Duration, first: First, cancel: &CancellationToken) -> Rounds {
        let start = match first {
            First::Now => Instant::now(),
            First::AfterOnePeriod => Instant::now() + period,
        };
        let mut tick = tokio::time::interval_at(start, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Rounds {
            tick,
            cancel: cancel.clone(),
        }
    }

    /// Waits for the next round; false once cancelled.
    ///
    /// # Cancel-Safety
    /// Cancel-safe: it only waits.
    pub async fn next(&mut self) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = self.tick.tick() => true,
        }
    }

    /// One round's work, unless cancelled first (`None`: the task ends;
    /// the work is dropped where it stood).
    pub async fn run<F: Future>(&self, work: F) -> Option<F::Output> {
        tokio::select! {
            _ = self.cancel.cancelled() => None,
            output = work => Some(output),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rounds_come_each_period_and_stop_on_cancel() {
        let cancel = CancellationToken::new();
        let started = Instant::now();
        let mut rounds = Rounds::new(Duration::from_secs(2), First::AfterOnePeriod, &cancel);
        assert!(rounds.next().await);
        assert_eq!(started.elapsed(), Duration::from_secs(2), "one period in");
        // A late round is delayed, not bunched: the next comes a period after it.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(rounds.next().await);
        assert!(rounds.next().await);
        assert_eq!(started.elapsed(), Duration::from_secs(9));
        let mut now = Rounds::new(Duration::from_secs(2), First::Now, &cancel);
        let before = Instant::now();
        assert!(now.next().await);
        assert_eq!(before.elapsed(), Duration::ZERO, "at once");
        cancel.cancel();
        assert!(!rounds.next().await);
        assert_eq!(rounds.run(std::future::pending::<()>()).await, None);
    }
}
