//! Reading a job's meta keys (checkpoint, markers, requests) in one range,
//! so they are one consistent snapshot.

use crate::etcd::api::RangeRequest;
use crate::etcd::client::{ClientError, Cluster};
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
