//! The leader's measure of how far back a point-in-time promotion can go
//! (`etcd_syncer_history_window_seconds`): the age of the oldest
//! revision-map sample whose destination revision is not compacted. It
//! lives in the Watching phase, like the periodic check.

use tokio_util::sync::CancellationToken;

use crate::etcd::api::RangeRequest;
use crate::etcd::client::ClientError;
use crate::etcd::meta::{age_seconds, oldest_readable_index};
use crate::etcd::periodic::{First, Rounds};
use crate::mirror::context::JobContext;
use crate::model::schema::RevisionSample;

/// Every `--revision-map-interval` (new samples arrive no faster); the
/// first one interval into the phase, so a short phase reads nothing.
///
/// # Cancel-Safety
/// Cancel-safe: a measurement interrupted half-way sets nothing.
pub fn spawn(ctx: JobContext, cancel: CancellationToken) {
    let interval = ctx.tuning.revision_map_interval;
    if interval.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let mut rounds = Rounds::new(interval, First::AfterOnePeriod, &cancel);
        while rounds.next().await {
            let Some(measured) = rounds.run(measure(&ctx)).await else {
                return;
            };
            match measured {
                Ok(Some(seconds)) => ctx.metrics.history_window_seconds.set(seconds),
                Ok(None) => {}
                Err(error) => {
                    tracing::debug!(job = %ctx.job.name, %error, "History window not measured; trying again next interval.");
                }
            }
        }
    });
}

async fn measure(ctx: &JobContext) -> Result<Option<f64>, ClientError> {
    let samples = ctx
        .dest
        .range(
            "read the revision map",
            RangeRequest::prefix(ctx.keys.revision_map().as_bytes()),
        )
        .await?
        .kvs;
    // Key order is source-revision order, which is destination-revision order.
    let revisions: Vec<i64> = samples.iter().map(|kv| kv.mod_revision).collect();
    let oldest = oldest_readable_index(&ctx.dest, &ctx.keys.checkpoint(), &revisions).await?;
    Ok(oldest.and_then(|at| {
        let sample = serde_json::from_slice::<RevisionSample>(&samples[at].value).ok()?;
        age_seconds(&sample.at)
    }))
}
