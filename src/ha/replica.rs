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
use crate::mirror::meta::Fence;
use crate::mirror::{run_job, Action, JobContext, JobError};
use crate::telemetry::metrics::JobState;

/// What every replica of this instance shares.
pub struct Instance {
    pub sessions: Arc<SessionManager>,
    /// Jobs this instance leads right now.
    pub leading: AtomicUsize,
    /// Set while one job steps down to rebalance, so only one does at a time.
    pub rebalancing: AtomicBool,
    /// Jobs configured now (a reload changes it).
    pub total_jobs: AtomicUsize,
    pub lock_ttl: Duration,
    pub rebalance_interval: Duration,
}

impl Instance {
    fn fair_share(&self, instances: usize) -> usize {
        fair_share(self.total_jobs.load(Ordering::SeqCst), instances)
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

        let job_cancel = cancel.child_token();
        let ctx = template.fenced(
            Fence::new(&template.keys, Some(leadership.fence())),
            &job_cancel,
        );
        let job = run_job(ctx, job_cancel.clone());
        tokio::pin!(job);
        let mut rebalance_tick = tokio::time::interval(instance.rebalance_interval);
        rebalance_tick.reset();
        let mut stepping_down: Option<StepDown> = None;
        // Held while this job steps down to rebalance; dropping it (on any
        // path) lets another job of this instance rebalance later.
        let mut ticket: Option<RebalanceTicket> = None;
        // The count of queued instances, read off the select loop so the
        // job is never starved while the destination answers.
        let mut probe: Option<tokio::task::JoinHandle<Result<usize, ElectionError>>> = None;
        let result = loop {
            tokio::select! {
                result = &mut job => break result,
                _ = session.lost().cancelled(), if stepping_down.is_none() => {
                    // The lease may have expired: stop writing now, before
                    // learning that someone else leads.
                    stepping_down = Some(StepDown::LeaseLost);
                    job_cancel.cancel();
                }
                _ = rebalance_tick.tick(), if stepping_down.is_none() && probe.is_none() => {
                    let (dest, keys) = (template.dest.clone(), template.keys.clone());
                    probe = Some(tokio::spawn(async move { queued_instances(&dest, &keys).await }));
                }
                probed = async { probe.as_mut().expect("guarded").await }, if probe.is_some() => {
                    probe = None;
                    if let Ok(Ok(instances)) = probed {
                        if stepping_down.is_none() {
                            ticket = RebalanceTicket::take(&instance, instances);
                            if ticket.is_some() {
                                stepping_down = Some(StepDown::Rebalance);
                                job_cancel.cancel();
                            }
                        }
                    }
                }
            }
        };
        if let Some(probe) = probe {
            probe.abort();
        }
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
                // Let a standby take the lock before queueing again; only
                // then may another job of this instance step down.
                if !template.pause(instance.lock_ttl, &cancel).await {
                    return Ok(());
                }
                drop(ticket);
            }
            StepDown::Failed(error) if error.policy().action == Action::StepDown => {
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

/// The right to step down for rebalancing: one job of an instance at a
/// time. Released when dropped, whichever way the step-down ends.
struct RebalanceTicket {
    instance: Arc<Instance>,
}

impl RebalanceTicket {
    /// A ticket when this instance leads more than its share of the
    /// `instances` queued and no other job of it holds one.
    fn take(instance: &Arc<Instance>, instances: usize) -> Option<Self> {
        let leading = instance.leading.load(Ordering::SeqCst);
        let over_share = leading > instance.fair_share(instances);
        (over_share
            && instance
                .rebalancing
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok())
        .then(|| Self {
            instance: instance.clone(),
        })
    }
}

impl Drop for RebalanceTicket {
    fn drop(&mut self) {
        self.instance.rebalancing.store(false, Ordering::SeqCst);
    }
}

fn retry_backoff() -> impl Iterator<Item = Duration> {
    crate::etcd::retry::Policy::CONNECT.backoff()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(total_jobs: usize, leading: usize) -> Arc<Instance> {
        let store = crate::etcd::memory::new_store(1);
        let client =
            crate::etcd::memory::MemoryEtcd::new(store, crate::etcd::memory::Link::new("t", 1));
        let dest = crate::etcd::Cluster::with_backend(
            crate::model::Side::Destination,
            "memory",
            Arc::new(client),
            Duration::from_secs(1),
        );
        Arc::new(Instance {
            sessions: Arc::new(SessionManager::new(dest, Duration::from_secs(5))),
            leading: AtomicUsize::new(leading),
            rebalancing: AtomicBool::new(false),
            total_jobs: AtomicUsize::new(total_jobs),
            lock_ttl: Duration::from_secs(5),
            rebalance_interval: Duration::from_secs(30),
        })
    }

    /// B6: the rebalancing flag is released on every step-down path, not
    /// only after a clean rebalance (a fenced write used to leave it set, so
    /// the instance never rebalanced again).
    #[test]
    fn a_rebalance_ticket_is_released_however_the_step_down_ends() {
        let instance = instance(4, 4);
        let first = RebalanceTicket::take(&instance, 2).expect("over its share of 2");
        assert!(
            RebalanceTicket::take(&instance, 2).is_none(),
            "one job at a time"
        );
        // The step-down ended with a fenced write: the ticket goes with it.
        drop(first);
        assert!(!instance.rebalancing.load(Ordering::SeqCst));
        assert!(RebalanceTicket::take(&instance, 2).is_some());
        // Within its share: no ticket, flag untouched.
        let fair = self::instance(4, 2);
        assert!(RebalanceTicket::take(&fair, 2).is_none());
        assert!(!fair.rebalancing.load(Ordering::SeqCst));
    }

    #[test]
    fn fair_share_rounds_up() {
        assert_eq!(fair_share(3, 2), 2);
        assert_eq!(fair_share(3, 3), 1);
        assert_eq!(fair_share(3, 0), 3);
        assert_eq!(fair_share(1, 2), 1);
    }
}
