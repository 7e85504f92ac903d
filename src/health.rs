//! Liveness and readiness state behind `/healthz` and `/readyz`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Side;

/// A job whose loop has not woken for this long is considered wedged: every
/// phase wakes at least once per progress interval or backoff step (≤ 30s).
pub const WEDGED_AFTER: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub struct Health {
    heartbeats: Mutex<HashMap<String, Instant>>,
    source_reachable: AtomicBool,
    dest_reachable: AtomicBool,
}

impl Health {
    pub fn new<'a>(jobs: impl IntoIterator<Item = &'a str>) -> Self {
        let now = Instant::now();
        Self {
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

    /// Jobs whose loop has not woken within [`WEDGED_AFTER`].
    pub fn wedged_jobs(&self) -> Vec<String> {
        let Ok(heartbeats) = self.heartbeats.lock() else {
            return vec!["<health state poisoned>".to_string()];
        };
        let mut wedged: Vec<String> = heartbeats
            .iter()
            .filter(|(_, seen)| seen.elapsed() > WEDGED_AFTER)
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
        let health = Health::new(["a"]);
        assert!(!health.reachable(Side::Source));
        health.set_reachable(Side::Source, true);
        assert!(health.reachable(Side::Source));
        assert!(!health.reachable(Side::Destination));
        assert!(health.wedged_jobs().is_empty());
    }
}
