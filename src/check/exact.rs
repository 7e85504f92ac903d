//! The revision-exact check: is the standby the primary's store, revision
//! for revision?
//!
//! At the checkpoint revision C both stores are read whole (but the meta
//! prefix) and compared key by key with value, create and mod revision,
//! version and lease; the standby's own revision must be C (parity); and
//! history is compared at sampled revisions between the later of the two
//! compactions and C.

use serde::Serialize;

use crate::etcd::client::{ClientError, Cluster};
use crate::etcd::pager::read_range;
use crate::model::exact::{compare_states, CaughtUp, StateReport};
use crate::model::kv::KeyValue;

/// Every key of a store at `revision` but the meta prefix, with its
/// metadata, in key order.
pub async fn read_store(
    cluster: &Cluster,
    revision: i64,
    meta_prefix: &[u8],
) -> Result<Vec<KeyValue>, ClientError> {
    let mut keys = read_range(
        cluster,
        "read the whole keyspace",
        vec![0],
        vec![0],
        revision,
    )
    .await?;
    keys.retain(|kv| !kv.key.starts_with(meta_prefix));
    Ok(keys)
}

/// What `check` found for a revision-exact job.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ExactCheckReport {
    pub checkpoint: i64,
    /// The destination's revision when the check began.
    pub dest_revision: i64,
    /// The destination revision the checkpoint was written at.
    pub checkpoint_written_at: i64,
    /// Checkpoint, its own revision and the destination's all agree.
    pub parity: bool,
    /// The promoted marker exists: the standby's own revisions follow C.
    pub promoted: bool,
    pub keys: u64,
    pub missing: u64,
    pub extra: u64,
    pub values: u64,
    pub metadata: u64,
    /// Metadata differences a catch-up over compacted history explains.
    pub inexact: u64,
    pub examples: Vec<String>,
    /// Revisions compared besides C, and those that differed.
    pub history_sampled: Vec<i64>,
    pub history_differs: Vec<i64>,
}

impl ExactCheckReport {
    pub fn is_consistent(&self) -> bool {
        (self.parity || self.promoted)
            && self.missing + self.extra + self.values + self.metadata == 0
            && self.history_differs.is_empty()
    }

    fn add(&mut self, report: &StateReport) {
        self.missing += report.missing;
        self.extra += report.extra;
        self.values += report.values;
        self.metadata += report.metadata;
        self.inexact += report.inexact;
        self.examples.extend(
            report
                .examples
                .iter()
                .take(5usize.saturating_sub(self.examples.len()))
                .cloned(),
        );
    }
}

/// Compares the two stores at the checkpoint revision `at` (written at
/// destination revision `written_at`; the destination at `dest_revision`
/// when it was read), then at `samples` revisions spread over the history both
/// still hold.
pub async fn check_exact(
    source: &Cluster,
    dest: &Cluster,
    meta_prefix: &[u8],
    (at, written_at, dest_revision): (i64, i64, i64),
    gaps: &[CaughtUp],
    promoted: bool,
    samples: usize,
) -> Result<ExactCheckReport, ClientError> {
    let mut report = ExactCheckReport {
        checkpoint: at,
        dest_revision,
        checkpoint_written_at: written_at,
        parity: crate::model::exact::parity_at_resume(at, written_at, dest_revision).is_ok(),
        promoted,
        ..ExactCheckReport::default()
    };
    let source_keys = read_store(source, at, meta_prefix).await?;
    let dest_keys = read_store(dest, at, meta_prefix).await?;
    report.keys = source_keys.len().max(dest_keys.len()) as u64;
    report.add(&compare_states(&source_keys, &dest_keys, gaps));
    // The history both hold: from the later compaction on.
    let low = source
        .compaction_in(1, at)
        .await?
        .max(dest.compaction_in(1, at).await?)
        .unwrap_or(1)
        .max(1);
    for revision in sample_revisions(low, at, samples) {
        let state = compare_states(
            &read_store(source, revision, meta_prefix).await?,
            &read_store(dest, revision, meta_prefix).await?,
            gaps,
        );
        report.history_sampled.push(revision);
        if !state.is_equal() {
            report.history_differs.push(revision);
            report.add(&state);
        }
    }
    Ok(report)
}

/// `count` revisions spread evenly over `[low, high)`, both ends' sides
/// included, without repeats.
pub fn sample_revisions(low: i64, high: i64, count: usize) -> Vec<i64> {
    if count == 0 || high <= low {
        return Vec::new();
    }
    let span = high - low;
    let mut picked: Vec<i64> = (0..count as i64)
        .map(|i| low + i * span / count as i64)
        .collect();
    picked.dedup();
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_spread_over_the_window_without_repeats() {
        assert_eq!(sample_revisions(10, 20, 5), [10, 12, 14, 16, 18]);
        assert_eq!(sample_revisions(10, 12, 5), [10, 11]);
        assert!(sample_revisions(10, 10, 5).is_empty());
        assert!(sample_revisions(1, 100, 0).is_empty());
        let many = sample_revisions(1, 1_000_000, 100);
        assert_eq!(many.len(), 100);
        assert!(many.iter().all(|r| (1..1_000_000).contains(r)));
    }
}
