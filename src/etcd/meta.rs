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

/// The job's checkpoint, if one is there and reads.
pub async fn read_checkpoint(
    dest: &Cluster,
    keys: &MetaKeys,
) -> Result<Option<crate::model::schema::Checkpoint>, ClientError> {
    let response = dest
        .range("read the checkpoint", RangeRequest::key(keys.checkpoint()))
        .await?;
    Ok(response
        .kvs
        .first()
        .and_then(|kv| serde_json::from_slice(&kv.value).ok()))
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
    let first = first_readable(dest, probe, dest_revisions.len(), |i| dest_revisions[i]).await?;
    Ok((first < dest_revisions.len()).then_some(first))
}

/// The first of `count` candidates, in ascending revision order
/// (`revision_of`), that the destination can still read; `count` when none
/// can. Readability only grows with the revision, so a binary search
/// takes about log2(count) reads.
pub async fn first_readable(
    dest: &Cluster,
    probe: &str,
    count: usize,
    revision_of: impl Fn(usize) -> i64,
) -> Result<usize, ClientError> {
    let (mut low, mut high) = (0usize, count);
    while low < high {
        let mid = low + (high - low) / 2;
        if readable_at(dest, probe, revision_of(mid)).await? {
            high = mid;
        } else {
            low = mid + 1;
        }
    }
    Ok(low)
}

/// Seconds from an RFC 3339 time to now; `None` when unreadable or ahead.
pub fn age_seconds(at: &str) -> Option<f64> {
    humantime::parse_rfc3339_weak(at)
        .ok()
        .and_then(|at| crate::telemetry::clock::now().duration_since(at).ok())
        .map(|age| age.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::etcd::api::{Op, TxnRequest};
    use crate::etcd::memory::{new_store, Link, MemoryEtcd};
    use crate::model::Side;

    /// The window's search: the oldest sample revision not compacted, none
    /// when all are, and every one before any compaction.
    #[tokio::test]
    async fn the_oldest_readable_sample_is_the_first_past_the_compaction() {
        let store = new_store(1);
        let dest = Cluster::with_backend(
            Side::Destination,
            "dest",
            Arc::new(MemoryEtcd::new(store.clone(), Link::new("dest", 7))),
            Duration::from_secs(2),
        );
        let mut revisions = Vec::new();
        for i in 0..10 {
            let put = TxnRequest::new().and_then(vec![Op::put(format!("/k{i}"), "v")]);
            revisions.push(
                dest.txn("test put", put)
                    .await
                    .expect("put")
                    .header
                    .revision,
            );
        }
        let samples: Vec<i64> = revisions.iter().copied().step_by(2).collect();
        let oldest = |samples: Vec<i64>| {
            let dest = dest.clone();
            async move {
                oldest_readable_index(&dest, "/k0", &samples)
                    .await
                    .expect("probe")
            }
        };
        assert_eq!(oldest(samples.clone()).await, Some(0));
        store.lock().expect("store").compact(samples[2]);
        assert_eq!(
            oldest(samples.clone()).await,
            Some(2),
            "compacted at a sample"
        );
        store.lock().expect("store").compact(samples[3] - 1);
        assert_eq!(
            oldest(samples.clone()).await,
            Some(3),
            "compacted between samples"
        );
        store.lock().expect("store").compact(revisions[9]);
        assert_eq!(
            oldest(samples.clone()).await,
            None,
            "every sample compacted"
        );
        assert_eq!(oldest(Vec::new()).await, None);
    }
}
