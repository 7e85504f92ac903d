//! One job's replica on this instance: queue for the job's lock, run the job
//! while leading, step down when the lease is lost, a write is fenced, the
//! process shuts down, or this instance leads more than its share.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::etcd::Cluster;
use crate::ha::election::{
    campaign, queued_instances, release, ElectionError, Leadership, Session, SessionManager,
};
use crate::mirror::meta::Fence;
use crate::mirror::{run_job, Action, JobContext, JobError};
use crate::model::keys::MetaKeys;
use crate::telemetry::metrics::JobState;

/// What every replica of this instance shares.
pub struct Instance {
    pub sessions: Arc<SessionManager>,
    /// Jobs this instance leads right now.
    pub leading: AtomicUsize,
    /// Jobs of this instance stepping down to rebalance now: together they
    /// take it down to its share, never below it.
    pub rebalancing: AtomicUsize,
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
        // Won while already at its share, with another instance queued
        // behind: hand the job on before running it, so jobs released by
        // an instance over its share (or unled at a simultaneous start)
        // reach the instances under theirs in one round, not one per
        // rebalance interval. Only with someone behind, so a job is never
        // left without a candidate.
        if hands_on(&template.dest, &template.keys, &instance).await {
            debug!(job = %name, "Won the job lock at this instance's share; handing it on.");
            if let Err(error) = release(&template.dest, &leadership).await {
                warn!(job = %name, %error, "Could not release the job lock; it goes with the lease.");
            }
            if !template.pause(instance.lock_ttl, &cancel).await {
                return Ok(());
            }
            continue;
        }
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
        // The first look at the share comes one lock TTL after the win
        // (jobs won before other instances queued, at a simultaneous start,
        // go back then), the next ones every rebalance interval.
        let mut rebalance_tick = tokio::time::interval_at(
            tokio::time::Instant::now() + instance.lock_ttl.min(instance.rebalance_interval),
            instance.rebalance_interval,
        );
        let mut stepping_down: Option<StepDown> = None;
        // Held while this job steps down to rebalance: it counts against
        // the instance's lead until the job stops leading.
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
        // No longer led: it counts against the lead through `leading` now.
        drop(ticket.take());
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

/// Whether a lock just won goes on to the next queued instance: this
/// instance leads its share already and another instance is queued. A
/// failed read keeps the job (the rebalance round corrects it later).
async fn hands_on(dest: &Cluster, keys: &MetaKeys, instance: &Instance) -> bool {
    match queued_instances(dest, keys).await {
        Ok(queued) => over_share_at_win(instance.leading.load(Ordering::SeqCst), queued, instance),
        Err(_) => false,
    }
}

/// The rule of [`hands_on`]: `queued` counts this instance.
fn over_share_at_win(leading: usize, queued: usize, instance: &Instance) -> bool {
    queued > 1 && leading >= instance.fair_share(queued)
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

/// The right to step down for rebalancing. An instance over its share
/// hands back every job above it in one round (one job per round took
/// about three hours to spread 500 jobs), but never more: a job stepping
/// down counts against the lead until it stops leading. Released when
/// dropped (then), whichever way the step-down ends.
struct RebalanceTicket {
    instance: Arc<Instance>,
}

impl RebalanceTicket {
    /// A ticket when this instance, less the jobs already stepping down,
    /// leads more than its share of the `instances` queued.
    fn take(instance: &Arc<Instance>, instances: usize) -> Option<Self> {
        let share = instance.fair_share(instances);
        instance
            .rebalancing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |stepping| {
                let leading = instance.leading.load(Ordering::SeqCst);
                (leading.saturating_sub(stepping) > share).then_some(stepping + 1)
            })
            .ok()
            .map(|_| Self {
                instance: instance.clone(),
            })
    }
}

impl Drop for RebalanceTicket {
    fn drop(&mut self) {
        self.instance.rebalancing.fetch_sub(1, Ordering::SeqCst);
    }
}

fn retry_backoff() -> impl Iterator<Item = Duration> {
    crate::etcd::retry::Policy::CONNECT.backoff()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A destination in memory.
    fn memory_dest() -> Cluster {
        let store = crate::etcd::memory::new_store(1);
        let client =
            crate::etcd::memory::MemoryEtcd::new(store, crate::etcd::memory::Link::new("t", 1));
        Cluster::with_backend(
            crate::model::Side::Destination,
            "memory",
            Arc::new(client),
            Duration::from_secs(1),
        )
    }

    fn instance(total_jobs: usize, leading: usize) -> Arc<Instance> {
        Arc::new(Instance {
            sessions: Arc::new(SessionManager::new(memory_dest(), Duration::from_secs(5))),
            leading: AtomicUsize::new(leading),
            rebalancing: AtomicUsize::new(0),
            total_jobs: AtomicUsize::new(total_jobs),
            lock_ttl: Duration::from_secs(5),
            rebalance_interval: Duration::from_secs(30),
        })
    }

    /// B6: a ticket is released on every step-down path, not only after a
    /// clean rebalance (a fenced write used to leave the flag set, so the
    /// instance never rebalanced again).
    #[test]
    fn a_rebalance_ticket_is_released_however_the_step_down_ends() {
        let instance = instance(4, 3);
        let first = RebalanceTicket::take(&instance, 2).expect("over its share of 2");
        assert!(
            RebalanceTicket::take(&instance, 2).is_none(),
            "one over its share: one step-down"
        );
        // The step-down ended with a fenced write: the ticket goes with it.
        drop(first);
        assert_eq!(instance.rebalancing.load(Ordering::SeqCst), 0);
        assert!(RebalanceTicket::take(&instance, 2).is_some());
        // Within its share: no ticket, count untouched.
        let fair = self::instance(4, 2);
        assert!(RebalanceTicket::take(&fair, 2).is_none());
        assert_eq!(fair.rebalancing.load(Ordering::SeqCst), 0);
    }

    /// 500 jobs all led by the first instance up, 3 instances: one round
    /// hands back every job above the share (167), and not one more.
    #[test]
    fn an_instance_far_over_its_share_hands_back_every_extra_job_in_one_round() {
        let instance = instance(500, 495);
        let tickets: Vec<RebalanceTicket> = (0..495)
            .map_while(|_| RebalanceTicket::take(&instance, 3))
            .collect();
        assert_eq!(tickets.len(), 495 - 167);
        // As each job stops leading, its ticket goes with the lead it held.
        instance.leading.store(167, Ordering::SeqCst);
        drop(tickets);
        assert_eq!(instance.rebalancing.load(Ordering::SeqCst), 0);
        assert!(
            RebalanceTicket::take(&instance, 3).is_none(),
            "at its share"
        );
    }

    /// At a simultaneous start the first instance up wins every lock; once
    /// others queue behind, a win at its share goes on to them.
    #[test]
    fn a_lock_won_at_the_share_goes_on_only_with_someone_behind() {
        let instance = instance(500, 0);
        // Alone in the queue: keeps it, whatever it leads (even every job).
        assert!(!over_share_at_win(400, 1, &instance));
        assert!(!over_share_at_win(500, 1, &instance));
        // Three queued, share 167.
        assert!(!over_share_at_win(166, 3, &instance));
        assert!(over_share_at_win(167, 3, &instance));
        // After one of three dies, two queued: share 250.
        assert!(!over_share_at_win(167, 2, &instance));
        assert!(over_share_at_win(250, 2, &instance));
    }

    /// The queue is read from the job's lock keys: a win at the share is
    /// handed on once a second instance is queued, and kept below it.
    #[tokio::test]
    async fn a_win_is_handed_on_from_what_the_lock_queue_holds() {
        use crate::etcd::api::{Op, TxnRequest};
        let dest = memory_dest();
        let keys = MetaKeys::new("/meta/", "job");
        let queue = |lease: u32| {
            TxnRequest::new().and_then(vec![Op::put(
                format!("{}{lease:016x}", keys.lock_prefix()),
                "i",
            )])
        };
        // Two jobs: the share of two queued instances is one.
        let at_share = instance(2, 1);
        dest.txn("queue", queue(1)).await.unwrap();
        assert!(
            !hands_on(&dest, &keys, &at_share).await,
            "alone in the queue"
        );
        dest.txn("queue", queue(2)).await.unwrap();
        assert!(hands_on(&dest, &keys, &at_share).await);
        assert!(
            !hands_on(&dest, &keys, &instance(2, 0)).await,
            "below its share"
        );
    }

    #[test]
    fn fair_share_rounds_up() {
        assert_eq!(fair_share(3, 2), 2);
        assert_eq!(fair_share(3, 3), 1);
        assert_eq!(fair_share(3, 0), 3);
        assert_eq!(fair_share(1, 2), 1);
    }
}
