//! A zk2etcd replica: campaigns for the job's lock (the same lock as an
//! etcd mirror job's) and leads [`crate::mirror::zk2etcd`] while it holds
//! it; a standby replica takes over within the lock TTL.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::etcd::client::Cluster;
use crate::ha::election::{campaign, release, ElectionError, Session};
use crate::mirror::fenced::FencedWriter;
use crate::mirror::meta::Fence;
use crate::mirror::zk2etcd::{lead, ZkError, ZkJob};
use crate::model::keys::MetaKeys;
use crate::telemetry::metrics::JobMetrics;

/// One zk2etcd replica's parts.
pub struct ZkReplica {
    pub dest: Cluster,
    pub keys: MetaKeys,
    pub instance: String,
    pub job: ZkJob,
    pub lock_ttl: Duration,
    pub metrics: JobMetrics,
    pub health: std::sync::Arc<crate::telemetry::health::Health>,
}

/// Runs until `cancel`: session, campaign, lead; errors are logged and
/// retried with the job backoff.
pub async fn run_zk_replica(replica: ZkReplica, cancel: CancellationToken) {
    let ZkReplica {
        dest,
        keys,
        instance,
        job,
        lock_ttl,
        metrics,
        health,
    } = replica;
    let beat = {
        let name = job.name.clone();
        move || health.heartbeat(&name)
    };
    let mut backoff = crate::etcd::retry::Policy::JOB.backoff();
    while !cancel.is_cancelled() {
        let session = match Session::start(&dest, lock_ttl).await {
            Ok(session) => session,
            Err(error) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                warn!(job = %job.name, %error, retry_in = ?delay, "Could not start a destination session; retrying.");
                if pause(delay, &cancel).await {
                    continue;
                }
                return;
            }
        };
        loop {
            metrics.set_state(crate::telemetry::metrics::JobState::Standby);
            beat();
            // A standby waits here: it beats while it waits.
            let campaigning = campaign(&dest, &session, &keys, &instance, &cancel);
            tokio::pin!(campaigning);
            let mut alive = tokio::time::interval(Duration::from_secs(5));
            let campaigned = loop {
                tokio::select! {
                    result = &mut campaigning => break result,
                    _ = alive.tick() => beat(),
                }
            };
            let leadership = match campaigned {
                Ok(leadership) => leadership,
                Err(ElectionError::Cancelled) => {
                    session.resign().await;
                    return;
                }
                Err(error) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    warn!(job = %job.name, %error, retry_in = ?delay, "Campaign failed; starting a new session.");
                    session.resign().await;
                    if !pause(delay, &cancel).await {
                        return;
                    }
                    break;
                }
            };
            info!(job = %job.name, instance = %instance, "Leading the zk2etcd job.");
            metrics.is_leader.set(1);
            // Held while the session lives and nobody cancels.
            let held = cancel.child_token();
            let watch = {
                let (held, lost) = (held.clone(), session.lost().clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = lost.cancelled() => held.cancel(),
                        _ = held.cancelled() => {}
                    }
                })
            };
            let writer = FencedWriter::new(
                dest.clone(),
                keys.clone(),
                Fence::new(&keys, Some(leadership.fence())),
                metrics.clone(),
            );
            let result = lead(&job, keys.clone(), &writer, &held, &beat).await;
            held.cancel();
            let _ = watch.await;
            metrics.is_leader.set(0);
            if let Err(error) = release(&dest, &leadership).await {
                warn!(job = %job.name, %error, "Could not release the job lock; it goes with the session.");
            }
            if cancel.is_cancelled() {
                session.resign().await;
                return;
            }
            if let Err(error) = result {
                metrics.error(error_kind(&error));
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                warn!(job = %job.name, %error, retry_in = ?delay, "zk2etcd stopped leading; campaigning again.");
                if !pause(delay, &cancel).await {
                    session.resign().await;
                    return;
                }
            }
            if session.lost().is_cancelled() {
                break;
            }
        }
    }
}

/// The `errors_total{kind}` label of an error.
fn error_kind(error: &ZkError) -> &'static str {
    match error {
        ZkError::Zk { .. } => "zookeeper",
        ZkError::SessionEnded(_) => "zookeeper_session",
        ZkError::Job(error) => error.policy().label,
    }
}

/// Waits `delay`; false when cancelled first.
async fn pause(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}
