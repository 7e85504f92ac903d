//! Liveness and readiness state behind `/healthz` and `/readyz`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

// tokio's clock, so the simulator's paused time governs every deadline.
use tokio::time::Instant;

use crate::model::Side;

/// A job whose loop has not woken for this long is considered wedged: every
/// phase (standby included) wakes at least every few seconds, and a backoff
/// step lasts at most 20 s.
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub struct Health {
    liveness_timeout: Duration,
    heartbeats: Mutex<HashMap<String, Instant>>,
    source_reachable: AtomicBool,
    dest_reachable: AtomicBool,
}

impl Health {
    pub fn new<'a>(jobs: impl IntoIterator<Item = &'a str>, liveness_timeout: Duration) -> Self {
        let now = Instant::now();
        Self {
            liveness_timeout,
            heartbeats: Mutex::new(jobs.into_iter().map(|j| (j.to_string(), now)).collect()),
            source_reachable: AtomicBool::new(false),
            dest_reachable: AtomicBool::new(false),
        }
    }

    pub fn heartbeat(&self, job: &str) {
        if let Ok(mut heartbeats) = self.heartbeats.lock() {
            heartbeats.insert(job.to_string(), Instant::now());
        }
    }

    /// Stops watching `job` (removed by a reload).
    pub fn remove(&self, job: &str) {
        if let Ok(mut heartbeats) = self.heartbeats.lock() {
            heartbeats.remove(job);
        }
    }

    /// Every job at once: for loops that run before any job does (connecting).
    pub fn heartbeat_all(&self) {
        if let Ok(mut heartbeats) = self.heartbeats.lock() {
            let now = Instant::now();
            for seen in heartbeats.values_mut() {
                *seen = now;
            }
        }
    }

    pub fn set_reachable(&self, side: Side, reachable: bool) {
        match side {
            Side::Source => self.source_reachable.store(reachable, Ordering::Relaxed),
            Side::Destination => self.dest_reachable.store(reachable, Ordering::Relaxed),
        }
    }

    pub fn reachable(&self, side: Side) -> bool {
        match side {
            Side::Source => self.source_reachable.load(Ordering::Relaxed),
            Side::Destination => self.dest_reachable.load(Ordering::Relaxed),
        }
    }

    /// Jobs whose loop has not woken within the liveness timeout.
    pub fn wedged_jobs(&self) -> Vec<String> {
        let Ok(heartbeats) = self.heartbeats.lock() else {
            return vec!["<health state poisoned>".to_string()];
        };
        let mut wedged: Vec<String> = heartbeats
            .iter()
            .filter(|(_, seen)| seen.elapsed() > self.liveness_timeout)
            .map(|(job, _)| job.clone())
            .collect();
        wedged.sort();
        wedged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_both_sides() {
        let health = Health::new(["a"], DEFAULT_LIVENESS_TIMEOUT);
        assert!(!health.reachable(Side::Source));
        health.set_reachable(Side::Source, true);
        assert!(health.reachable(Side::Source));
        assert!(!health.reachable(Side::Destination));
        assert!(health.wedged_jobs().is_empty());
        let strict = Health::new(["a"], Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(strict.wedged_jobs(), vec!["a".to_string()]);
        strict.heartbeat("a");
        assert!(Health::new(["b"], Duration::from_secs(60))
            .wedged_jobs()
            .is_empty());
    }
}
