//! Reading a job's meta keys (checkpoint, markers, requests) in one range,
//! so they are one consistent snapshot.

use crate::etcd::api::RangeRequest;
use crate::etcd::client::{ClientError, Cluster, FailureKind};
use crate::model::keys::MetaKeys;
use crate::model::schema::JobMeta;

/// # Cancel-Safety
/// Cancel-safe: a single read.
pub async fn read_job_meta(dest: &Cluster, keys: &MetaKeys) -> Result<JobMeta, ClientError> {
    let response = dest
        .range(
            "read job meta",
            RangeRequest {
                key: keys.job_root().as_bytes().to_vec(),
                range_end: keys.state_range_end(),
                ..RangeRequest::default()
            },
        )
        .await?;
    let entries = response
        .kvs
        .iter()
        .map(|kv| (kv.key.as_slice(), kv.value.as_slice()));
    Ok(JobMeta::from_entries(
        keys,
        entries,
        response.header.revision,
        response.header.cluster_id,
    ))
}

/// Whether the destination can still be read at `revision` (it is not
/// compacted away).
pub async fn readable_at(dest: &Cluster, probe: &str, revision: i64) -> Result<bool, ClientError> {
    match dest
        .range(
            "probe the destination's history",
            RangeRequest::key(probe).count_only().at_revision(revision),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == FailureKind::Compacted => Ok(false),
        Err(error) => Err(error),
    }
}

/// The index of the oldest of `dest_revisions` (ascending) still readable,
/// `None` when none is. Readability only grows with the revision, so a
/// binary search takes about log2(len) reads.
pub async fn oldest_readable_index(
    dest: &Cluster,
    probe: &str,
    dest_revisions: &[i64],
) -> Result<Option<usize>, ClientError> {
    let (mut low, mut high) = (0usize, dest_revisions.len());
    while low < high {
        let mid = (low + high) / 2;
        if readable_at(dest, probe, dest_revisions[mid]).await? {
            high = mid;
        } else {
            low = mid + 1;
        }
    }
    Ok((low < dest_revisions.len()).then_some(low))
}

/// Seconds from an RFC 3339 time to now; `None` when unreadable or ahead.
pub fn age_seconds(at: &str) -> Option<f64> {
    humantime::parse_rfc3339_weak(at)
        .ok()
        .and_then(|at| std::time::SystemTime::now().duration_since(at).ok())
        .map(|age| age.as_secs_f64())
}
