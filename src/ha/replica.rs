//! One job's replica on this instance: queue for the job's lock, run the job
//! while leading, step down when the lease is lost, a write is fenced, the
//! process shuts down, or this instance leads more than its share.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::ha::election::{
    campaign, queued_instances, release, ElectionError, Leadership, Session, SessionManager,
};
use crate::telemetry::metrics::JobState;
use crate::mirror::meta::Fence;
use crate::mirror::{run_job, JobContext, JobError};

/// What every replica of this instance shares.
pub struct Instance {
    pub sessions: Arc<SessionManager>,
    /// Jobs this instance leads right now.
    pub leading: AtomicUsize,
    /// Set while one job steps down to rebalance, so only one does at a time.
    pub rebalancing: AtomicBool,
    pub total_jobs: usize,
    pub lock_ttl: Duration,
    pub rebalance_interval: Duration,
}

impl Instance {
    fn fair_share(&self, instances: usize) -> usize {
        fair_share(self.total_jobs, instances)
    }
}

/// Jobs per instance if leadership were spread evenly.
fn fair_share(total_jobs: usize, instances: usize) -> usize {
    total_jobs.div_ceil(instances.max(1))
}

const STANDBY_HEARTBEAT: Duration = Duration::from_secs(1);

enum StepDown {
    Shutdown,
    LeaseLost,
    Rebalance,
    Failed(JobError),
}

pub async fn run_replica(
    template: JobContext,
    instance: Arc<Instance>,
    cancel: CancellationToken,
) -> Result<(), JobError> {
    let name = template.job.name.clone();
    let metrics = template.metrics.clone();
    let mut backoff = retry_backoff();
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        metrics.set_state(JobState::Standby);
        // A standby may wait for days: keep /healthz green while it does.
        let election = elect(&template, &instance, &cancel);
        tokio::pin!(election);
        let mut heartbeat = tokio::time::interval(STANDBY_HEARTBEAT);
        let elected = loop {
            tokio::select! {
                elected = &mut election => break elected,
                _ = heartbeat.tick() => template.heartbeat(),
            }
        };
        let (session, leadership) = match elected {
            Ok(Some(elected)) => elected,
            Ok(None) => return Ok(()),
            Err(error) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                metrics.error(error.kind());
                warn!(job = %name, %error, retry_in = ?delay, "Campaign for the job lock failed; retrying.");
                if template.pause(delay, &cancel).await {
                    continue;
                }
                return Ok(());
            }
        };
        backoff = retry_backoff();
        info!(job = %name, lock = %leadership.key, lock_revision = leadership.create_revision, "Leadership acquired.");
        metrics.is_leader.set(1);
        metrics.leader_changes_total.inc();
        instance.leading.fetch_add(1, Ordering::SeqCst);

        let ctx = template.fenced(Fence::new(&template.keys, Some(leadership.fence())));
        let job_cancel = cancel.child_token();
        let job = run_job(ctx, job_cancel.clone());
        tokio::pin!(job);
        let mut rebalance_tick = tokio::time::interval(instance.rebalance_interval);
        rebalance_tick.reset();
        let mut stepping_down: Option<StepDown> = None;
        let result = loop {
            tokio::select! {
                result = &mut job => break result,
                _ = session.lost().cancelled(), if stepping_down.is_none() => {
                    // The lease may have expired: stop writing now, before
                    // learning that someone else leads.
                    stepping_down = Some(StepDown::LeaseLost);
                    job_cancel.cancel();
                }
                _ = rebalance_tick.tick(), if stepping_down.is_none() => {
                    if should_step_down(&template, &instance).await {
                        stepping_down = Some(StepDown::Rebalance);
                        job_cancel.cancel();
                    }
                }
            }
        };
        job_cancel.cancel();
        instance.leading.fetch_sub(1, Ordering::SeqCst);
        metrics.is_leader.set(0);
        metrics.leader_changes_total.inc();
        let reason = match (cancel.is_cancelled(), stepping_down, result) {
            (true, _, _) => StepDown::Shutdown,
            (false, _, Err(error)) => StepDown::Failed(error),
            (false, Some(reason), Ok(())) => reason,
            (false, None, Ok(())) => StepDown::Shutdown,
        };
        match reason {
            StepDown::Shutdown => {
                info!(job = %name, "Stepped down for shutdown.");
                return Ok(());
            }
            StepDown::LeaseLost => {
                metrics.error("lease_lost");
                warn!(job = %name, "Lost the job lock: the destination lease expired or could not be renewed; campaigning again.");
            }
            StepDown::Rebalance => {
                info!(job = %name, "Stepping down so leadership spreads across instances.");
                if let Err(error) = release(&template.dest, &leadership).await {
                    warn!(job = %name, %error, "Could not release the job lock; it goes with the lease.");
                }
                // Let a standby take the lock before queueing again.
                if !template.pause(instance.lock_ttl, &cancel).await {
                    return Ok(());
                }
                instance.rebalancing.store(false, Ordering::SeqCst);
            }
            StepDown::Failed(error @ JobError::Fenced { .. }) => {
                warn!(job = %name, %error, "A write was fenced: another instance leads this job now; campaigning again.");
                let _ = release(&template.dest, &leadership).await;
            }
            StepDown::Failed(error) => {
                error!(job = %name, %error, "Job stopped.");
                return Err(error);
            }
        }
    }
}

/// Campaigns, after a pause if this instance already leads its share.
async fn elect(
    template: &JobContext,
    instance: &Instance,
    cancel: &CancellationToken,
) -> Result<Option<(Arc<Session>, Leadership)>, ElectionError> {
    let session = instance.sessions.session().await?;
    let queued = queued_instances(&template.dest, &template.keys).await?;
    // Counting ourselves if we are not queued yet.
    let instances = queued.max(1);
    if instance.leading.load(Ordering::SeqCst) >= instance.fair_share(instances) && instances > 1 {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep(instance.lock_ttl) => {}
        }
    }
    match campaign(
        &template.dest,
        &session,
        &template.keys,
        &template.instance_id,
        cancel,
    )
    .await
    {
        Ok(leadership) => Ok(Some((session, leadership))),
        Err(ElectionError::Cancelled) => Ok(None),
        Err(error) => Err(error),
    }
}

/// True when this instance leads more than its share and no other job of
/// it is already stepping down.
async fn should_step_down(template: &JobContext, instance: &Instance) -> bool {
    let Ok(instances) = queued_instances(&template.dest, &template.keys).await else {
        return false;
    };
    let leading = instance.leading.load(Ordering::SeqCst);
    leading > instance.fair_share(instances)
        && instance
            .rebalancing
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
}

fn retry_backoff() -> impl Iterator<Item = Duration> {
    crate::etcd::client::retry_backoff(Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_share_rounds_up() {
        assert_eq!(fair_share(3, 2), 2);
        assert_eq!(fair_share(3, 3), 1);
        assert_eq!(fair_share(3, 0), 3);
        assert_eq!(fair_share(1, 2), 1);
    }
}
