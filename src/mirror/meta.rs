//! The job's state on the destination: the checkpoint, the full-sync marker,
//! the promoted marker and a pending reset request, and the compares that
//! guard every write.

use crate::etcd::api::{Compare, CompareOp};

pub use crate::etcd::meta::read_job_meta;
use crate::model::keys::MetaKeys;
pub use crate::model::schema::{Checkpoint, FullSyncMarker, JobMeta};

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
