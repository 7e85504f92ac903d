//! What the syncer keeps on the destination, under `<meta-prefix><job>/`.
//!
//! Every value is JSON. Fields are only ever added, with `#[serde(default)]`,
//! so a newer syncer reads what an older one wrote and a rollback reads what
//! a newer one wrote (unknown fields are ignored).

use serde::{Deserialize, Serialize};

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

/// What an instance writes in its lock key; shown by `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockValue {
    pub instance: String,
    pub campaigning_since: String,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
