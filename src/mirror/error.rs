//! What can go wrong in a job, and the one decision every loop takes about
//! it ([`JobError::policy`]); why a job takes the slow path ([`SlowPathReason`]).

use std::time::Duration;

use crate::etcd::client::{ClientError, FailureKind};
use crate::model::Side;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("source history is compacted up to revision {compact_revision}, past the checkpoint; a full sync is needed")]
    Compacted { compact_revision: i64 },
    #[error("source watch failed: {source}")]
    Watch { source: etcd_client::Error },
    #[error("source closed the watch stream")]
    WatchClosed,
    #[error("source canceled the watch: {reason}")]
    WatchCanceled { reason: String },
    #[error("source watch delivered nothing for {idle:?}, not even a progress answer")]
    WatchStalled { idle: Duration },
    #[error("write fenced: {reason}")]
    Fenced { reason: &'static str },
    #[error("the job is promoted (a promoted marker exists on the destination); replication stays stopped until `promote --undo`")]
    Promoted,
    #[error("the {what} changed underneath this instance")]
    GuardMoved { what: &'static str },
    #[error("the source's history at revision {pinned_rev} changed: {what}; starting over")]
    SourceChanged { pinned_rev: i64, what: &'static str },
    #[error(
        "mass-delete guard: this full sync would delete {would_delete} of {dest_keys} destination keys, \
         more than --max-prune-ratio {max_prune_ratio} allows; nothing was deleted. If the source really \
         lost these keys, rerun with a higher --max-prune-ratio (1 allows all)"
    )]
    PruneGuard {
        would_delete: u64,
        dest_keys: u64,
        max_prune_ratio: f64,
    },
    #[error("source and destination are the same cluster (id {cluster_id:x}) and the job's prefixes overlap: mirroring would copy the mirror into itself")]
    Loop { cluster_id: u64 },
    #[error("a reset was requested (--reset-last-synced-rev)")]
    ResetRequested,
    #[error(
        "the source is reached through a fallback endpoint group ({endpoints}) that answers as cluster \
         {answered:x}, not the checkpoint's cluster {checkpoint_cluster_id:x}: another cluster, never \
         mirrored from. Waiting for the preferred group; fix the group's endpoints"
    )]
    FallbackIsAnotherCluster {
        endpoints: String,
        answered: u64,
        checkpoint_cluster_id: u64,
    },
    #[error("{0}")]
    HistoryDiffers(SlowPathReason),
    #[error("{leases} mirrored destination lease(s) expired while their source leases live; a full sync restores their keys")]
    DestLeaseLost { leases: usize },
    /// `--revision-exact`: the destination is no longer the source's store
    /// at its checkpoint; nothing more is written until it is re-seeded.
    #[error("parity lost: {0}; re-seed the standby from a snapshot of the source (docs/operations.md, \"Revision-exact standby\")")]
    ParityLost(crate::model::exact::ParityLost),
    /// `--revision-exact` cannot go on without an operator (a revision too
    /// big for one txn, compacted history to resume from, another source):
    /// the destination still equals the source at its checkpoint.
    #[error("revision-exact replay stopped: {0}")]
    ExactBlocked(String),
    #[error("cancelled")]
    Cancelled,
    /// One failure several waiters share (a lease grant or record txn
    /// that several writers' txns waited for): handled as the original.
    #[error(transparent)]
    Shared(std::sync::Arc<JobError>),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::etcd::pager::PageError> for JobError {
    fn from(error: crate::etcd::pager::PageError) -> Self {
        match error {
            crate::etcd::pager::PageError::Client(error) => JobError::Client(error),
            crate::etcd::pager::PageError::Cancelled => JobError::Cancelled,
            // The source was replaced behind its endpoints mid-read: what
            // was read is not the pinned revision's; start over from the
            // cluster that answers now.
            crate::etcd::pager::PageError::OtherCluster { pinned, answered } => {
                JobError::HistoryDiffers(SlowPathReason::SourceReplaced {
                    checkpoint_cluster_id: pinned,
                    source_cluster_id: answered,
                })
            }
            other @ crate::etcd::pager::PageError::StoppedEarly => {
                JobError::Internal(other.to_string())
            }
        }
    }
}

/// What to do about an error: the one decision every loop follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Transient: back off (capped, jittered) and resume from the checkpoint.
    Retry,
    /// An operator must act (credentials, quota, the prune guard, a bug):
    /// keep retrying slowly, log at ERROR.
    NeedsOperator,
    /// The checkpoint's history is gone or a reset was asked for: full sync now.
    Resync,
    /// The job is promoted: write nothing, poll for `promote --undo`.
    Promoted,
    /// Another instance leads: stop writing, campaign again.
    StepDown,
    /// Cannot go on (configuration): stop the process with `exit_code`.
    Exit,
    /// Cancelled: stop quietly.
    Stop,
}

/// How an error is handled, counted, logged and reported at exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub action: Action,
    /// `etcd_syncer_errors_total{kind}`.
    pub label: &'static str,
    pub level: tracing::Level,
    /// The process exit code if this error ends the process.
    pub exit_code: u8,
}

impl Policy {
    const fn new(action: Action, label: &'static str, level: tracing::Level) -> Self {
        let exit_code = match action {
            Action::Exit => 2,
            _ => 1,
        };
        Self {
            action,
            label,
            level,
            exit_code,
        }
    }
}

impl JobError {
    /// The one place that decides, per error, what happens next.
    pub fn policy(&self) -> Policy {
        use tracing::Level;
        match self {
            JobError::Client(error) => client_policy(error),
            JobError::Shared(error) => error.policy(),
            JobError::Compacted { .. } => Policy::new(Action::Resync, "compacted", Level::INFO),
            JobError::Watch { source } => match crate::etcd::client::classify(source) {
                FailureKind::Auth => Policy::new(Action::NeedsOperator, "auth", Level::ERROR),
                FailureKind::Compacted => Policy::new(Action::Resync, "compacted", Level::INFO),
                _ => Policy::new(Action::Retry, "source_unavailable", Level::WARN),
            },
            JobError::WatchClosed | JobError::WatchCanceled { .. } => {
                Policy::new(Action::Retry, "source_unavailable", Level::WARN)
            }
            JobError::WatchStalled { .. } => {
                Policy::new(Action::Retry, "watch_stalled", Level::WARN)
            }
            JobError::Fenced { .. } => Policy::new(Action::StepDown, "fenced", Level::WARN),
            JobError::Promoted => Policy::new(Action::Promoted, "promoted", Level::WARN),
            JobError::GuardMoved { .. } => {
                Policy::new(Action::Retry, "checkpoint_moved", Level::WARN)
            }
            JobError::SourceChanged { .. } => {
                Policy::new(Action::Retry, "source_changed", Level::WARN)
            }
            JobError::PruneGuard { .. } => {
                Policy::new(Action::NeedsOperator, "prune_guard", Level::ERROR)
            }
            JobError::Loop { .. } => Policy::new(Action::Exit, "loop", Level::ERROR),
            JobError::ResetRequested => Policy::new(Action::Resync, "reset", Level::INFO),
            JobError::FallbackIsAnotherCluster { .. } => Policy::new(
                Action::NeedsOperator,
                "source_group_other_cluster",
                Level::ERROR,
            ),
            JobError::HistoryDiffers(_) => {
                Policy::new(Action::Resync, "history_differs", Level::WARN)
            }
            JobError::DestLeaseLost { .. } => {
                Policy::new(Action::Resync, "dest_lease_expired", Level::WARN)
            }
            JobError::ParityLost(_) => {
                Policy::new(Action::NeedsOperator, "parity_lost", Level::ERROR)
            }
            JobError::ExactBlocked(_) => {
                Policy::new(Action::NeedsOperator, "exact_blocked", Level::ERROR)
            }
            JobError::Cancelled => Policy::new(Action::Stop, "cancelled", Level::DEBUG),
            JobError::Internal(_) => Policy::new(Action::NeedsOperator, "internal", Level::ERROR),
        }
    }

    /// The destination refused a write for lack of space (NOSPACE alarm).
    pub fn is_dest_out_of_space(&self) -> bool {
        match self {
            JobError::Client(error) => error.kind() == FailureKind::QuotaExceeded,
            JobError::Shared(error) => error.is_dest_out_of_space(),
            _ => false,
        }
    }

    /// Low-cardinality label for `etcd_syncer_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        self.policy().label
    }
}

fn client_policy(error: &ClientError) -> Policy {
    use tracing::Level;
    let label = client_error_kind(error);
    match error.kind() {
        FailureKind::Unavailable => Policy::new(Action::Retry, label, Level::WARN),
        FailureKind::Compacted => Policy::new(Action::Resync, label, Level::INFO),
        FailureKind::Auth | FailureKind::QuotaExceeded | FailureKind::Rejected => {
            Policy::new(Action::NeedsOperator, label, Level::ERROR)
        }
    }
}

/// The `errors_total{kind}` label of a client error.
pub fn client_error_kind(error: &ClientError) -> &'static str {
    match (error.kind(), error.side()) {
        (FailureKind::Auth, _) => "auth",
        (FailureKind::Compacted, _) => "compacted",
        (FailureKind::QuotaExceeded, _) => "dest_quota_exceeded",
        (FailureKind::Rejected, _) => "rejected",
        (FailureKind::Unavailable, Some(Side::Destination)) => "dest_unavailable",
        (FailureKind::Unavailable, _) => "source_unavailable",
    }
}

/// Why a full sync is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlowPathReason {
    NoCheckpoint,
    UnreadableCheckpoint,
    Reset,
    Interrupted {
        pinned_rev: Option<i64>,
    },
    SourceReplaced {
        checkpoint_cluster_id: u64,
        source_cluster_id: u64,
    },
    SourceBehind {
        checkpoint_rev: i64,
        source_rev: i64,
    },
    Compacted,
    /// The source's history at the checkpoint is not the destination's.
    HistoryDiffers {
        detail: String,
    },
    /// Destination leases expired on their own: the destination lost keys.
    DestLeasesExpired {
        leases: usize,
    },
    /// `--leases` changed since the checkpoint was written.
    LeaseModeChanged {
        leases_mirrored: bool,
    },
    /// `--prefix` or `--dest-prefix` changed since the checkpoint was
    /// written: the destination holds another prefix's copy, or none.
    PrefixChanged {
        /// (the checkpoint's, now), when the source prefix changed.
        source: Option<(String, String)>,
        /// (the checkpoint's, now), when the destination prefix changed.
        dest: Option<(String, String)>,
    },
    /// `exclude-prefixes` no longer leaves these out: the copy the
    /// checkpoint describes never held their keys.
    ExcludeRemoved {
        prefixes: Vec<String>,
    },
}

impl SlowPathReason {
    /// Whether the source's history made this full sync necessary: what a
    /// resync loop is made of (an interrupted full sync too: compaction
    /// retention shorter than a full sync takes restarts it for ever).
    pub fn forced_by_source(&self) -> bool {
        matches!(
            self,
            SlowPathReason::Compacted
                | SlowPathReason::SourceReplaced { .. }
                | SlowPathReason::SourceBehind { .. }
                | SlowPathReason::HistoryDiffers { .. }
                | SlowPathReason::Interrupted { .. }
        )
    }
}

impl std::fmt::Display for SlowPathReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlowPathReason::NoCheckpoint => write!(f, "no checkpoint on the destination"),
            SlowPathReason::UnreadableCheckpoint => write!(f, "the checkpoint is unreadable"),
            SlowPathReason::Reset => write!(f, "--reset-last-synced-rev was requested"),
            SlowPathReason::Interrupted { pinned_rev: Some(rev) } => {
                write!(f, "a full sync at revision {rev} was interrupted")
            }
            SlowPathReason::Interrupted { pinned_rev: None } => write!(f, "a full sync was interrupted"),
            SlowPathReason::SourceReplaced {
                checkpoint_cluster_id,
                source_cluster_id,
            } => write!(
                f,
                "the source cluster changed (checkpoint from cluster {checkpoint_cluster_id:x}, source is {source_cluster_id:x})"
            ),
            SlowPathReason::SourceBehind { checkpoint_rev, source_rev } => write!(
                f,
                "the source revision {source_rev} is behind the checkpoint {checkpoint_rev} (restored from a backup?)"
            ),
            SlowPathReason::Compacted => write!(f, "the source compacted the history at or after the checkpoint (a watch from there could miss a delete: etcd-io/etcd#18089)"),
            SlowPathReason::LeaseModeChanged { leases_mirrored: true } => write!(
                f,
                "--leases faithful: the destination's keys were written without their leases (by --leases strip, or a version that did not mirror leases)"
            ),
            SlowPathReason::LeaseModeChanged { leases_mirrored: false } => write!(
                f,
                "--leases strip: the destination's keys sit on mirrored leases that nothing renews any more"
            ),
            SlowPathReason::DestLeasesExpired { leases } => write!(
                f,
                "{leases} mirrored lease(s) expired on the destination while their source leases live (no replica ran for longer than TTL + --lease-grace?)"
            ),
            SlowPathReason::PrefixChanged { source, dest } => {
                write!(f, "the job's prefixes changed since the destination's copy was made (")?;
                if let Some((was, now)) = source {
                    write!(f, "--prefix {was} -> {now}")?;
                }
                if let Some((was, now)) = dest {
                    let sep = if source.is_some() { "; " } else { "" };
                    write!(f, "{sep}--dest-prefix {was} -> {now}: the copies under {was} stay there")?;
                }
                write!(f, ")")
            }
            SlowPathReason::ExcludeRemoved { prefixes } => write!(
                f,
                "exclude-prefixes no longer leaves out {}: the destination never held their keys",
                prefixes.join(", ")
            ),
            SlowPathReason::HistoryDiffers { detail } => write!(
                f,
                "the source's history differs from what the destination reflects ({detail}); was the source rebuilt or restored with the same cluster id?"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every `kind` label the policies give is documented in docs/metrics.md
    /// (read from this file's `Policy::new` and client-kind arms, so a new
    /// label cannot be added without its row).
    #[test]
    fn every_error_kind_is_documented() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let code = std::fs::read_to_string(root.join("src/mirror/error.rs")).expect("read");
        let doc = std::fs::read_to_string(root.join("docs/metrics.md")).expect("read");
        let code = &code[..code.find("#[cfg(test)]").expect("tests below the code")];
        // The label is the first literal of each `Policy::new(…)` and the
        // literal of each `=> "…"` arm (the client kinds).
        let literal = |text: &str| text.split('"').next().map(str::to_string);
        let mut labels: Vec<String> = code
            .split("Policy::new(")
            .skip(1)
            .filter_map(|call| call.split('"').nth(1).map(str::to_string))
            .collect();
        labels.extend(code.split("=> \"").skip(1).filter_map(literal));
        labels.retain(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        assert!(labels.len() >= 15, "found only {labels:?}");
        for label in labels {
            if label == "cancelled" {
                continue; // a stop, never counted
            }
            let documented = doc.contains(&format!("| `{label}` |"))
                || doc.contains(&format!("`{label}`, `"))
                || doc.contains(&format!(", `{label}` |"));
            assert!(
                documented,
                "errors_total kind `{label}` is not in docs/metrics.md"
            );
        }
    }
}
