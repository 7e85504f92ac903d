//! The job's state on the destination: the checkpoint, the full-sync marker,
//! the promoted marker and a pending reset request, and the compares that
//! guard every write.

use etcd_client::{Compare, CompareOp, GetOptions};
use serde::{Deserialize, Serialize};

use crate::client::Cluster;
use crate::keys::{prefix_range_end, MetaKeys};
use crate::mirror::JobError;

/// What the destination reflects. Written in the same txn as the data it
/// describes, so it can never run ahead of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Every source revision up to this one is applied.
    pub last_synced_rev: i64,
    /// The source this checkpoint belongs to: a replaced or restored source
    /// has another id, and its revisions mean nothing here.
    pub source_cluster_id: u64,
    /// RFC 3339, when this checkpoint was written.
    pub updated_at: String,
    /// The instance that wrote it.
    pub instance: String,
    /// The job's source prefix, so `status` and `promote` can read the
    /// source head with a role limited to that prefix.
    #[serde(default)]
    pub source_prefix: String,
    /// Where the source prefix is mirrored to (`None` in checkpoints written
    /// before this field existed: the same prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_prefix: Option<String>,
    /// Set while a revision too large for one txn is half applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_revision: Option<i64>,
    /// Distinct for every write, so comparing the stored value identifies
    /// exactly which txn committed last.
    pub write_id: u64,
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a checkpoint always serializes")
    }
}

/// Present while a full sync is under way; its exact value fences that full
/// sync's writes, and its presence at start means one was interrupted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullSyncMarker {
    pub id: u64,
    pub pinned_rev: i64,
    pub source_cluster_id: u64,
    pub started_at: String,
    pub instance: String,
    pub reason: String,
}

impl FullSyncMarker {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a marker always serializes")
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

/// Everything under `<meta-prefix><job>/`, read in one range so it is one snapshot.
#[derive(Debug, Clone, Default)]
pub struct JobMeta {
    pub checkpoint_raw: Option<Vec<u8>>,
    pub checkpoint: Option<Checkpoint>,
    pub full_sync_raw: Option<Vec<u8>>,
    pub full_sync: Option<FullSyncMarker>,
    pub promoted: Option<Vec<u8>>,
    pub reset_request: Option<Vec<u8>>,
    /// The destination revision the snapshot was read at.
    pub dest_revision: i64,
    /// The destination's cluster id, to recognise a source that is the same cluster.
    pub dest_cluster_id: u64,
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

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
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
