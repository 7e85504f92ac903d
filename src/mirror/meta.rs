//! The job's state on the destination: the checkpoint, the full-sync marker,
//! the promoted marker and a pending reset request, and the compares that
//! guard every write.

use etcd_client::{Compare, CompareOp, GetOptions};

use crate::etcd::client::Cluster;
use crate::model::keys::{prefix_range_end, MetaKeys};
use crate::mirror::JobError;
pub use crate::model::schema::{now_rfc3339, Checkpoint, FullSyncMarker, JobMeta};

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
            KeyGuard::Absent => Compare::version(key, CompareOp::Equal, 0),
            KeyGuard::Holds(value) => Compare::value(key, CompareOp::Equal, value.clone()),
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
            self.promoted_key.as_str(),
            CompareOp::Equal,
            0,
        )];
        if let Some(lock) = &self.lock {
            compares.push(Compare::create_revision(
                lock.key.as_str(),
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

pub async fn read_job_meta(dest: &Cluster, keys: &MetaKeys) -> Result<JobMeta, JobError> {
    let root = keys.job_root().as_bytes().to_vec();
    let end = prefix_range_end(&root);
    let response = dest
        .get(
            "read job meta",
            root,
            Some(GetOptions::new().with_range(end)),
        )
        .await?;
    let mut meta = JobMeta {
        dest_revision: response.header().map_or(0, |h| h.revision()),
        dest_cluster_id: response.header().map_or(0, |h| h.cluster_id()),
        ..JobMeta::default()
    };
    let (checkpoint_key, full_sync_key, promoted_key, reset_key) = (
        keys.checkpoint(),
        keys.full_sync(),
        keys.promoted(),
        keys.reset_request(),
    );
    for kv in response.kvs() {
        let key = kv.key();
        if key == checkpoint_key.as_bytes() {
            meta.checkpoint_raw = Some(kv.value().to_vec());
            meta.checkpoint = match serde_json::from_slice(kv.value()) {
                Ok(checkpoint) => Some(checkpoint),
                Err(error) => {
                    tracing::warn!(key = %checkpoint_key, %error, "checkpoint is unreadable; a full sync will rebuild it");
                    None
                }
            };
        } else if key == full_sync_key.as_bytes() {
            meta.full_sync_raw = Some(kv.value().to_vec());
            meta.full_sync = serde_json::from_slice(kv.value()).ok();
        } else if key == promoted_key.as_bytes() {
            meta.promoted = Some(kv.value().to_vec());
        } else if key == reset_key.as_bytes() {
            meta.reset_request = Some(kv.value().to_vec());
        }
    }
    Ok(meta)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trips_and_tolerates_missing_optional_fields() {
        let checkpoint = Checkpoint {
            last_synced_rev: 42,
            source_cluster_id: u64::MAX,
            updated_at: now_rfc3339(),
            instance: "pod-0".into(),
            source_prefix: "/app/".into(),
            dest_prefix: Some("/copy/".into()),
            partial_revision: None,
            write_id: 7,
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
