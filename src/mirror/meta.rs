//! The job's state on the destination: the checkpoint, the full-sync marker,
//! the promoted marker and a pending reset request, and the compares that
//! guard every write.

use crate::etcd::api::{Compare, CompareOp, Op, RangeRequest, TxnRequest};
use crate::etcd::client::Cluster;
use crate::mirror::error::JobError;
use crate::telemetry::clock::now_rfc3339;

pub use crate::etcd::meta::read_job_meta;
use crate::model::keys::MetaKeys;
use crate::model::schema::EventStamp;
pub use crate::model::schema::{Checkpoint, FullSyncMarker, JobMeta};

/// What every checkpoint one writer puts says about its job: the prefixes,
/// the ranges left out, whether keys sit on mirrored leases, and who wrote
/// it. Every [`Checkpoint`] is built here, so a new field is added once.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointOf {
    pub instance: String,
    pub source_prefix: String,
    pub dest_prefix: String,
    /// The source prefixes left out.
    pub excluded: Vec<String>,
    pub leases_mirrored: bool,
}

impl CheckpointOf {
    /// Every source revision up to `revision` of cluster `source_cluster_id`
    /// applied (but `partial_revision`, half applied), written now.
    pub fn at(
        &self,
        (revision, source_cluster_id): (i64, u64),
        write_id: u64,
        last_event: Option<EventStamp>,
        partial_revision: Option<i64>,
    ) -> Checkpoint {
        Checkpoint {
            last_synced_rev: revision,
            source_cluster_id,
            updated_at: now_rfc3339(),
            instance: self.instance.clone(),
            source_prefix: self.source_prefix.clone(),
            dest_prefix: Some(self.dest_prefix.clone()),
            partial_revision,
            write_id,
            last_event,
            leases_mirrored: self.leases_mirrored,
            excluded: Some(self.excluded.clone()),
            revision_exact: false,
            exact_gaps: Vec::new(),
        }
    }
}

/// What a key must hold for a txn to apply: the value we last saw or wrote,
/// or nothing at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyGuard {
    Absent,
    Holds(Vec<u8>),
}

impl KeyGuard {
    pub fn compare(&self, key: &str) -> Compare {
        match self {
            // etcd fails every value compare on a missing key, so absence is version 0.
            KeyGuard::Absent => Compare::version(key.as_bytes(), CompareOp::Equal, 0),
            KeyGuard::Holds(value) => {
                Compare::value(key.as_bytes(), CompareOp::Equal, value.clone())
            }
        }
    }

    pub fn of(value: Option<&[u8]>) -> Self {
        match value {
            Some(value) => KeyGuard::Holds(value.to_vec()),
            None => KeyGuard::Absent,
        }
    }
}

/// Conditions every destination txn of a job carries: no promoted marker,
/// and, under HA, this instance still holding the job's lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    promoted_key: String,
    lock: Option<LockFence>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockFence {
    pub key: String,
    pub create_revision: i64,
}

impl Fence {
    pub fn new(keys: &MetaKeys, lock: Option<LockFence>) -> Self {
        Self {
            promoted_key: keys.promoted(),
            lock,
        }
    }

    pub fn compares(&self) -> Vec<Compare> {
        let mut compares = vec![Compare::version(
            self.promoted_key.as_bytes(),
            CompareOp::Equal,
            0,
        )];
        if let Some(lock) = &self.lock {
            compares.push(Compare::create_revision(
                lock.key.as_bytes(),
                CompareOp::Equal,
                lock.create_revision,
            ));
        }
        compares
    }

    pub fn promoted_key(&self) -> &str {
        &self.promoted_key
    }

    pub fn lock(&self) -> Option<&LockFence> {
        self.lock.as_ref()
    }
}

impl JobMeta {
    pub fn checkpoint_guard(&self) -> KeyGuard {
        KeyGuard::of(self.checkpoint_raw.as_deref())
    }

    pub fn full_sync_guard(&self) -> KeyGuard {
        KeyGuard::of(self.full_sync_raw.as_deref())
    }
}

/// Leaves a reset request under the job's meta prefix. Whichever instance
/// leads the job next consumes it in the txn that starts the full sync (a
/// leader already replicating notices it within a progress interval), so
/// the reset happens exactly once, whichever instance was given the flag.
pub async fn request_reset(
    dest: &Cluster,
    keys: &MetaKeys,
    instance: &str,
) -> Result<(), JobError> {
    let value =
        serde_json::json!({ "requested_at": now_rfc3339(), "instance": instance }).to_string();
    let txn = TxnRequest::new()
        .when(Fence::new(keys, None).compares())
        .and_then(vec![Op::put(keys.reset_request(), value)]);
    let response = dest.txn("request reset", txn).await?;
    if response.succeeded {
        Ok(())
    } else {
        Err(JobError::Promoted)
    }
}

/// Reads the markers an operator may set while the job runs.
///
/// # Cancel-Safety
/// Cancel-safe: a single read.
pub async fn check_operator_markers(dest: &Cluster, keys: &MetaKeys) -> Result<(), JobError> {
    let txn = TxnRequest::new().and_then(vec![
        Op::Range(RangeRequest::key(keys.promoted()).count_only()),
        Op::Range(RangeRequest::key(keys.reset_request()).count_only()),
    ]);
    let response = dest.txn("read operator markers", txn).await?;
    let present: Vec<bool> = response.ranges().map(|r| r.count > 0).collect();
    match present.as_slice() {
        [true, _] => Err(JobError::Promoted),
        [_, true] => Err(JobError::ResetRequested),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trips_and_tolerates_missing_optional_fields() {
        let checkpoint = Checkpoint {
            last_synced_rev: 42,
            source_cluster_id: u64::MAX,
            updated_at: crate::telemetry::clock::now_rfc3339(),
            instance: "pod-0".into(),
            source_prefix: "/app/".into(),
            dest_prefix: Some("/copy/".into()),
            partial_revision: None,
            write_id: 7,
            last_event: Some(crate::model::schema::EventStamp::put(b"/app/k", b"v", 41)),
            leases_mirrored: true,
            excluded: None,
            revision_exact: true,
            exact_gaps: vec![crate::model::exact::CaughtUp { from: 3, to: 9 }],
        };
        let decoded: Checkpoint = serde_json::from_slice(&checkpoint.encode()).unwrap();
        assert_eq!(decoded, checkpoint);
        assert!(!String::from_utf8(checkpoint.encode())
            .unwrap()
            .contains("partial_revision"));
    }

    #[test]
    fn fence_always_excludes_promotion() {
        let keys = MetaKeys::new("/m/", "job");
        assert_eq!(Fence::new(&keys, None).compares().len(), 1);
        let fenced = Fence::new(
            &keys,
            Some(LockFence {
                key: "/m/job/lock/1".into(),
                create_revision: 9,
            }),
        );
        assert_eq!(fenced.compares().len(), 2);
    }
}
