//! Lease-faithful mirroring: a key on source lease L is written on a
//! destination lease that lives exactly as long as L does (plus a grace).
//!
//! - **Mapping.** L is mirrored by destination lease L itself when the
//!   destination does not have that ID (etcd's `LeaseGrant` takes a chosen
//!   ID), else by a fresh one. The mapping is recorded under the job's meta
//!   prefix ([`LeaseRecord`]) in a fenced txn *before* any key is attached to
//!   the destination lease, so a new leader knows every lease to keep alive.
//! - **TTL.** The destination lease gets the source's granted TTL plus
//!   `--lease-grace`: live keys survive a replicator outage shorter than
//!   the grace.
//! - **Keepalive.** The [`LeaseBook::keep`] task lists the source's leases
//!   (one `LeaseLeases` per tick, never one call per key) and renews each
//!   destination lease whose source lease lives, a third of its TTL after
//!   the last renewal. A source lease that is gone keeps its destination
//!   lease alive until the checkpoint passes the revision by which it was
//!   seen gone: by then its keys' DELETE events are applied, so revoking it
//!   deletes nothing and the destination never drops a key on its own.
//! - **Loss.** A destination lease found gone while its source lease lives
//!   means the destination dropped keys the source still has (an outage
//!   longer than TTL + grace): its record is deleted and the job is sent
//!   to a full sync, which re-grants it and restores the keys.
//! - **Promotion.** The book lives only while the job replicates: after
//!   `promote` nothing renews, and mirrored keys expire after TTL + grace,
//!   as they would have on the primary.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

// tokio's clock, so the simulator's paused time governs every deadline.
use tokio::time::Instant;

use futures::{StreamExt, TryStreamExt};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::etcd::api::{Compare, CompareOp, Op};
use crate::etcd::client::Cluster;
use crate::mirror::writer::{DestWriter, TxnOutcome};
use crate::mirror::JobError;
use crate::model::keys::MetaKeys;
use crate::model::schema::LeaseRecord;
use crate::telemetry::metrics::JobMetrics;

/// etcd raises shorter TTLs to its minimum anyway (`minLeaseTTL`, a few
/// seconds); a destination lease never gets less.
const MIN_DEST_TTL_SECONDS: i64 = 5;
/// Lease records written per txn: well under etcd's default 128 ops.
const RECORDS_PER_TXN: usize = 64;
/// Grants, TTL reads and keepalives in flight at once.
const CONCURRENT_LEASE_CALLS: usize = 32;
const MIN_TICK: Duration = Duration::from_millis(500);
const MAX_TICK: Duration = Duration::from_secs(5);

/// One mirrored source lease.
#[derive(Debug, Clone, Copy)]
struct Mirrored {
    record: LeaseRecord,
    /// The record is on the destination (written by this leader, or read).
    recorded: bool,
    /// `None`: renew at the next tick (a lease loaded from the records).
    last_renewed: Option<Instant>,
}

/// A mirrored lease whose source lease is gone: renewed until the
/// destination reflects its keys' deletes, then revoked.
#[derive(Debug, Clone, Copy)]
struct Retiring {
    source_lease: i64,
    mirrored: Mirrored,
    /// The source revision by which the source lease was seen gone.
    /// `None` after a full sync: the source may have another history now
    /// (rebuilt or replaced), so the next list observes it again.
    gone_at: Option<i64>,
}

/// One keepalive to send.
#[derive(Debug, Clone, Copy)]
struct Renewal {
    source_lease: i64,
    dest_lease: i64,
    retiring: bool,
}

/// The lease list read under `header` and the checkpoint count in one
/// source history: the same cluster, and not behind the checkpoint (a
/// revision never goes down within a history).
fn same_history(state: &BookState, header: crate::etcd::api::Header) -> bool {
    header.cluster_id == state.committed_cluster && header.revision >= state.committed_revision
}

impl Retiring {
    fn done(&self, committed: i64) -> bool {
        self.gone_at.is_some_and(|gone_at| committed >= gone_at)
    }
}

impl Mirrored {
    fn renewal_due(&self, now: Instant) -> bool {
        let period = Duration::from_secs((self.record.dest_ttl.max(1) as u64).div_ceil(3));
        self.last_renewed
            .is_none_or(|last| now.saturating_duration_since(last) >= period)
    }
}

#[derive(Default)]
struct BookState {
    leases: BTreeMap<i64, Mirrored>,
    /// Source leases seen gone. Kept apart from `leases`: a source rebuilt
    /// from a backup may hand the same ID out again, and that is a new
    /// lease needing a destination lease of its own.
    retiring: Vec<Retiring>,
    /// One grant at a time per source lease, shared by concurrent writers.
    granting: HashMap<i64, Arc<OnceCell<()>>>,
    /// The source revision the destination's checkpoint holds.
    committed_revision: i64,
    /// The source cluster whose history `committed_revision` counts in
    /// (0: not known yet, e.g. before the first checkpoint was read).
    committed_cluster: u64,
    /// Source leases whose destination lease was found gone.
    lost: BTreeSet<i64>,
    /// (source lease, destination lease) pairs found dead: a record naming
    /// one (its deletion may have failed) is never adopted again. Pairs,
    /// because an expired destination ID can be granted again for another.
    dead: BTreeSet<(i64, i64)>,
    /// The attempt to interrupt when a lease is lost.
    attempt: Option<CancellationToken>,
    /// Leased keys (hash of the key below the job prefix → source lease),
    /// for `etcd_syncer_lease_backed_keys`.
    leased_keys: HashMap<u64, i64>,
}

/// The leader's view of the job's mirrored leases, shared by the writer
/// (which resolves leases before each txn) and the keepalive task.
pub struct LeaseBook {
    /// Stops the running keepalive task.
    keeper: Mutex<Option<CancellationToken>>,
    job: String,
    keys: MetaKeys,
    source: Cluster,
    dest: Cluster,
    grace_seconds: i64,
    metrics: JobMetrics,
    state: Mutex<BookState>,
}

impl std::fmt::Debug for LeaseBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseBook")
            .field("job", &self.job)
            .finish_non_exhaustive()
    }
}

fn key_hash(suffix: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    suffix.hash(&mut hasher);
    hasher.finish()
}

impl BookState {
    /// The destination lease keys on `source_lease` go to: its mapping,
    /// else its retiring destination lease.
    fn mapped(&self, source_lease: i64) -> Option<i64> {
        self.leases
            .get(&source_lease)
            .map(|m| m.record.dest_lease)
            .or_else(|| {
                self.retiring
                    .iter()
                    .rev()
                    .find(|r| r.source_lease == source_lease)
                    .map(|r| r.mirrored.record.dest_lease)
            })
    }

    fn is_retiring(&self, source_lease: i64) -> bool {
        self.retiring.iter().any(|r| r.source_lease == source_lease)
    }
}

impl LeaseBook {
    pub fn new(
        job: &str,
        keys: MetaKeys,
        source: Cluster,
        dest: Cluster,
        grace: Duration,
        metrics: JobMetrics,
    ) -> Self {
        Self {
            keeper: Mutex::new(None),
            job: job.to_string(),
            keys,
            source,
            dest,
            grace_seconds: grace.as_secs() as i64,
            metrics,
            state: Mutex::new(BookState::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, BookState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adopts the records read from the destination (a new leader, or a
    /// new attempt); leases already known keep their renewal state.
    pub fn load(&self, records: &BTreeMap<i64, LeaseRecord>) {
        let mut state = self.state();
        for (source_lease, record) in records {
            let retiring = state.retiring.iter().any(|r| {
                r.source_lease == *source_lease && r.mirrored.record.dest_lease == record.dest_lease
            });
            if retiring
                || state.lost.contains(source_lease)
                || state.dead.contains(&(*source_lease, record.dest_lease))
            {
                continue;
            }
            state.leases.entry(*source_lease).or_insert(Mirrored {
                record: *record,
                recorded: true,
                last_renewed: None,
            });
        }
        self.metrics.leases_mirrored.set(state.leases.len() as i64);
    }

    /// Starts the keepalive task under `parent` unless it runs already.
    pub fn ensure_keeper(self: &Arc<Self>, writer: Arc<DestWriter>, parent: &CancellationToken) {
        let mut keeper = self.keeper.lock().unwrap_or_else(|p| p.into_inner());
        if keeper.as_ref().is_some_and(|token| !token.is_cancelled()) {
            return;
        }
        let token = parent.child_token();
        *keeper = Some(token.clone());
        tokio::spawn(self.clone().keep(writer, token));
    }

    pub fn stop_keeper(&self) {
        if let Some(token) = self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take() {
            token.cancel();
        }
    }

    /// Forgets everything (the job was promoted: nothing is renewed, and
    /// `promote --undo` starts again from the records).
    pub fn clear(&self) {
        let mut state = self.state();
        state.leases.clear();
        state.retiring.clear();
        state.granting.clear();
        // After the promotion the records are the truth again.
        state.dead.clear();
        state.lost.clear();
        self.metrics.leases_mirrored.set(0);
    }

    /// The destination lease mirroring `source_lease`, if it has one.
    pub fn dest_lease_of(&self, source_lease: i64) -> Option<i64> {
        self.state().mapped(source_lease)
    }

    /// Every mapping known now (for a consistency check's lease rule).
    pub fn mapping(&self) -> HashMap<i64, i64> {
        self.state()
            .leases
            .iter()
            .map(|(source, m)| (*source, m.record.dest_lease))
            .collect()
    }

    pub fn mirrored_count(&self) -> usize {
        self.state().leases.len()
    }

    /// The destination now reflects the source up to `revision` (of the
    /// source's current history: it may go down when the source changes).
    pub fn committed(&self, revision: i64) {
        self.state().committed_revision = revision;
    }

    /// The job (re)starts from a checkpoint of `cluster_id`'s history at
    /// `revision`. Until then, and while the source answers with another
    /// cluster id or a revision below it (replaced or rebuilt, which the
    /// job's resume check is about to find), no lease is judged gone.
    pub fn resumed(&self, cluster_id: u64, revision: i64) {
        let mut state = self.state();
        state.committed_cluster = cluster_id;
        state.committed_revision = revision;
    }

    /// A full sync finished at `revision` of `cluster_id`: revisions of the
    /// source's earlier history (if it was rebuilt or replaced) mean
    /// nothing now.
    pub fn full_sync_done(&self, cluster_id: u64, revision: i64) {
        let mut state = self.state();
        state.committed_cluster = cluster_id;
        state.committed_revision = revision;
        for retiring in &mut state.retiring {
            retiring.gone_at = None;
        }
    }

    /// Interrupt `attempt` when a destination lease is found lost.
    pub fn watch_attempt(&self, attempt: CancellationToken) {
        let mut state = self.state();
        if !state.lost.is_empty() {
            attempt.cancel();
        }
        state.attempt = Some(attempt);
    }

    /// Source leases whose destination lease was lost since the last call.
    pub fn take_lost(&self) -> Vec<i64> {
        std::mem::take(&mut self.state().lost).into_iter().collect()
    }

    /// A key below the job prefix is now on `lease` (0: none), or deleted (`None`).
    pub fn observe_key(&self, suffix: &[u8], lease: Option<i64>) {
        let mut state = self.state();
        match lease {
            Some(lease) if lease != 0 => {
                state.leased_keys.insert(key_hash(suffix), lease);
            }
            _ => {
                state.leased_keys.remove(&key_hash(suffix));
            }
        }
        self.metrics
            .lease_backed_keys
            .set(state.leased_keys.len() as i64);
    }

    /// A full sync starts: it observes every source key again.
    pub fn forget_keys(&self) {
        let mut state = self.state();
        state.leased_keys.clear();
        self.metrics.lease_backed_keys.set(0);
    }

    /// Destination leases for `source_leases`: granted where missing, and
    /// recorded (fenced, through `writer`) before the caller attaches keys.
    ///
    /// # Cancel-Safety
    /// Cancel-safe: a grant whose record is never written leaves a
    /// destination lease without keys, which expires on its own.
    pub async fn resolve(
        &self,
        writer: &DestWriter,
        source_leases: impl IntoIterator<Item = i64>,
    ) -> Result<HashMap<i64, i64>, JobError> {
        let wanted: BTreeSet<i64> = source_leases.into_iter().filter(|l| *l != 0).collect();
        if wanted.is_empty() {
            return Ok(HashMap::new());
        }
        let unknown: Vec<(i64, Arc<OnceCell<()>>)> = {
            let mut state = self.state();
            let state = &mut *state;
            wanted
                .iter()
                .filter(|lease| !state.leases.contains_key(lease))
                .map(|lease| (*lease, state.granting.entry(*lease).or_default().clone()))
                .collect()
        };
        futures::stream::iter(unknown)
            .map(|(lease, cell)| async move {
                cell.get_or_try_init(|| self.grant(lease)).await?;
                self.state().granting.remove(&lease);
                Ok::<(), JobError>(())
            })
            .buffer_unordered(CONCURRENT_LEASE_CALLS)
            .try_collect::<Vec<()>>()
            .await?;

        let unrecorded: Vec<(i64, LeaseRecord)> = {
            let state = self.state();
            wanted
                .iter()
                .filter_map(|lease| state.leases.get(lease).map(|m| (*lease, *m)))
                .filter(|(_, m)| !m.recorded)
                .map(|(lease, m)| (lease, m.record))
                .collect()
        };
        for chunk in unrecorded.chunks(RECORDS_PER_TXN) {
            let ops = chunk
                .iter()
                .map(|(lease, record)| Op::put(self.keys.lease_record(*lease), record.encode()))
                .collect();
            match writer.commit("record mirrored leases", vec![], ops).await? {
                TxnOutcome::Committed(_) => {
                    let mut state = self.state();
                    for (lease, _) in chunk {
                        if let Some(mirrored) = state.leases.get_mut(lease) {
                            mirrored.recorded = true;
                        }
                    }
                }
                TxnOutcome::GuardFailed(failure) => {
                    return Err(writer.explain(&failure, "lease records"));
                }
            }
        }

        let state = self.state();
        wanted
            .into_iter()
            .map(|lease| match state.mapped(lease) {
                Some(dest_lease) => Ok((lease, dest_lease)),
                // Lost between the grant and now: the job is being sent to
                // a full sync; this txn must not attach keys to nothing.
                None => {
                    debug!(job = %self.job, source_lease = lease, "Mirrored lease vanished while resolving.");
                    Err(JobError::DestLeaseLost { leases: 1 })
                }
            })
            .collect()
    }

    /// Grants the destination lease for `source_lease`.
    async fn grant(&self, source_lease: i64) -> Result<(), JobError> {
        let source_ttl = self.source.lease_time_to_live(source_lease).await?;
        if source_ttl.is_none() && self.state().is_retiring(source_lease) {
            // A key put before the lease went: it joins the other keys of
            // that lease on their retiring destination lease, and goes with
            // them when the source's deletes arrive.
            return Ok(());
        }
        // Gone already (and never mapped): its keys' DELETE events follow;
        // the keepalive task keeps this lease until they are applied. Alive
        // while retiring: the source handed the ID out again (a source
        // rebuilt from a backup), a new lease that needs its own.
        let source_ttl = source_ttl.map_or(0, |ttl| ttl.granted);
        let dest_ttl = (source_ttl + self.grace_seconds).max(MIN_DEST_TTL_SECONDS);
        let dest_lease = match self.dest.lease_grant(dest_ttl, source_lease).await {
            Ok(id) => id,
            Err(error) if error.is_lease_exists() => self.dest.lease_grant(dest_ttl, 0).await?,
            Err(error) => return Err(error.into()),
        };
        debug!(job = %self.job, source_lease, dest_lease, dest_ttl, "Mirroring a source lease.");
        let mut state = self.state();
        // A pair that died and was granted again (the same free ID) is live.
        state.dead.remove(&(source_lease, dest_lease));
        // The destination handed out an ID another mapping names: that
        // lease had expired (records adopted before the keepalive task got
        // to them). Its keys are gone; a live one is lost.
        let stale: Vec<(i64, LeaseRecord)> = state
            .leases
            .iter()
            .filter(|(source, m)| **source != source_lease && m.record.dest_lease == dest_lease)
            .map(|(source, m)| (*source, m.record))
            .collect();
        for (source, _) in &stale {
            state.leases.remove(source);
            state.dead.insert((*source, dest_lease));
            state.lost.insert(*source);
        }
        let stale_retiring: Vec<i64> = state
            .retiring
            .iter()
            .filter(|r| r.mirrored.record.dest_lease == dest_lease)
            .map(|r| r.source_lease)
            .collect();
        for source in stale_retiring {
            state.dead.insert((source, dest_lease));
        }
        state
            .retiring
            .retain(|r| r.mirrored.record.dest_lease != dest_lease);
        if !stale.is_empty() {
            if let Some(attempt) = &state.attempt {
                attempt.cancel();
            }
        }
        state.leases.insert(
            source_lease,
            Mirrored {
                record: LeaseRecord {
                    dest_lease,
                    source_ttl,
                    dest_ttl,
                    grant: rand::random(),
                },
                recorded: false,
                last_renewed: Some(Instant::now()),
            },
        );
        self.metrics.leases_mirrored.set(state.leases.len() as i64);
        Ok(())
    }

    /// Forgets the mappings whose destination lease is gone (of
    /// `dest_leases`), as lost, with their records; returns how many.
    pub async fn evict_dead(
        &self,
        writer: &DestWriter,
        dest_leases: impl IntoIterator<Item = i64>,
    ) -> usize {
        let mut dead = Vec::new();
        for dest_lease in dest_leases.into_iter().collect::<BTreeSet<i64>>() {
            if let Ok(None) = self.dest.lease_time_to_live(dest_lease).await {
                dead.push(dest_lease);
            }
        }
        let lost = self.mark_dead(&dead);
        self.forget_records(writer, &lost).await;
        lost.len()
    }

    /// Drops every use of the `dead` destination leases; returns the live
    /// mappings that were lost with them.
    fn mark_dead(&self, dead: &[i64]) -> Vec<(i64, LeaseRecord)> {
        let mut state = self.state();
        // Retiring ones only stop being used: their keys are on their way out.
        let dead_retiring: Vec<(i64, i64)> = state
            .retiring
            .iter()
            .filter(|r| dead.contains(&r.mirrored.record.dest_lease))
            .map(|r| (r.source_lease, r.mirrored.record.dest_lease))
            .collect();
        state.dead.extend(dead_retiring);
        state
            .retiring
            .retain(|r| !dead.contains(&r.mirrored.record.dest_lease));
        let lost: Vec<(i64, LeaseRecord)> = state
            .leases
            .iter()
            .filter(|(_, m)| dead.contains(&m.record.dest_lease))
            .map(|(source, m)| (*source, m.record))
            .collect();
        for (source, record) in &lost {
            state.leases.remove(source);
            state.dead.insert((*source, record.dest_lease));
        }
        state.lost.extend(lost.iter().map(|(source, _)| *source));
        self.metrics.leases_mirrored.set(state.leases.len() as i64);
        lost
    }

    fn tick_period(&self) -> Duration {
        let shortest = self
            .state()
            .leases
            .values()
            .map(|m| m.record.dest_ttl)
            .min()
            .unwrap_or(i64::MAX);
        Duration::from_secs((shortest.max(1) as u64).div_ceil(6)).clamp(MIN_TICK, MAX_TICK)
    }

    /// Keeps the destination leases alive while their source leases live,
    /// and revokes them once the source's have gone and the checkpoint
    /// passed that point. Runs until `cancel`.
    ///
    /// # Cancel-Safety
    /// Stops at the next await; a keepalive or revoke in flight either
    /// happened or not, and the next leader starts from the records.
    pub async fn keep(self: Arc<Self>, writer: Arc<DestWriter>, cancel: CancellationToken) {
        let mut first = true;
        loop {
            if !first {
                let period = self.tick_period();
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                }
            }
            first = false;
            // Biased: once stopped (promoted, deposed), no renewal goes out,
            // even one due at the same instant.
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = self.tick(&writer) => {}
            }
        }
    }

    async fn tick(&self, writer: &DestWriter) {
        {
            let state = self.state();
            if state.leases.is_empty() && state.retiring.is_empty() {
                return;
            }
        }
        let (header, live) = match self.source.lease_list().await {
            Ok((header, live)) => (header, live.into_iter().collect::<BTreeSet<i64>>()),
            Err(error) => {
                // Nothing is renewed blind: the grace covers a short outage.
                self.metrics.error(crate::mirror::client_error_kind(&error));
                warn!(job = %self.job, %error, "Cannot list the source's leases; keepalives wait.");
                return;
            }
        };
        let now = Instant::now();
        let (renew, retire) = {
            let mut state = self.state();
            let state = &mut *state;
            // Unknown until the job has read its checkpoint: renew what
            // lives, judge nothing gone.
            let history_known = state.committed_cluster != 0;
            if history_known && !same_history(state, header) {
                // A source lease missing from another history says nothing
                // about this one: revoking on its word would delete keys
                // the destination still mirrors (and, after a promotion,
                // keys the replicator may no longer touch).
                warn!(
                    job = %self.job,
                    source_cluster_id = header.cluster_id,
                    source_revision = header.revision,
                    checkpoint_cluster_id = state.committed_cluster,
                    checkpoint_revision = state.committed_revision,
                    "The source's lease list comes from another history than the checkpoint (replaced or rebuilt?); keepalives wait for the job to re-sync."
                );
                return;
            }
            let gone: Vec<i64> = state
                .leases
                .keys()
                .filter(|lease| history_known && !live.contains(lease))
                .copied()
                .collect();
            for source_lease in gone {
                if let Some(mirrored) = state.leases.remove(&source_lease) {
                    state.retiring.push(Retiring {
                        source_lease,
                        mirrored,
                        gone_at: Some(header.revision),
                    });
                }
            }
            if history_known {
                for retiring in &mut state.retiring {
                    retiring.gone_at.get_or_insert(header.revision);
                }
            }
            let committed = state.committed_revision;
            let renew: Vec<Renewal> = state
                .leases
                .iter()
                .filter(|(source, m)| live.contains(source) && m.renewal_due(now))
                .map(|(source, m)| Renewal {
                    source_lease: *source,
                    dest_lease: m.record.dest_lease,
                    retiring: false,
                })
                .chain(
                    state
                        .retiring
                        .iter()
                        .filter(|r| !r.done(committed) && r.mirrored.renewal_due(now))
                        .map(|r| Renewal {
                            source_lease: r.source_lease,
                            dest_lease: r.mirrored.record.dest_lease,
                            retiring: true,
                        }),
                )
                .collect();
            let (retire, keep): (Vec<Retiring>, Vec<Retiring>) =
                state.retiring.drain(..).partition(|r| r.done(committed));
            state.retiring = keep;
            (renew, retire)
        };

        let renewed: Vec<(Renewal, Result<bool, _>)> = futures::stream::iter(renew)
            .map(|target| async move { (target, self.dest.lease_renew(target.dest_lease).await) })
            .buffer_unordered(CONCURRENT_LEASE_CALLS)
            .collect()
            .await;
        let mut lost = Vec::new();
        {
            let mut state = self.state();
            for (
                Renewal {
                    source_lease,
                    dest_lease,
                    retiring,
                },
                outcome,
            ) in renewed
            {
                self.metrics.lease_keepalives_total.inc();
                match outcome {
                    Ok(true) if retiring => {
                        for r in state
                            .retiring
                            .iter_mut()
                            .filter(|r| r.mirrored.record.dest_lease == dest_lease)
                        {
                            r.mirrored.last_renewed = Some(now);
                        }
                    }
                    Ok(true) => {
                        if let Some(mirrored) = state.leases.get_mut(&source_lease) {
                            mirrored.last_renewed = Some(now);
                        }
                    }
                    // Its source lease is gone too: the keys it still holds
                    // are being deleted on the source; nothing to restore.
                    Ok(false) if retiring => {
                        self.metrics.lease_keepalive_failures_total.inc();
                        state
                            .retiring
                            .retain(|r| r.mirrored.record.dest_lease != dest_lease);
                    }
                    Ok(false) => {
                        self.metrics.lease_keepalive_failures_total.inc();
                        state.dead.insert((source_lease, dest_lease));
                        if let Some(mirrored) = state.leases.remove(&source_lease) {
                            lost.push((source_lease, mirrored.record));
                        }
                    }
                    Err(error) => {
                        self.metrics.lease_keepalive_failures_total.inc();
                        debug!(job = %self.job, source_lease, %error, "Lease keepalive failed; retrying next tick.");
                    }
                }
            }
            self.metrics.leases_mirrored.set(state.leases.len() as i64);
        }

        let mut forget = Vec::new();
        for retiring in retire {
            let in_use = self
                .state()
                .leases
                .values()
                .any(|m| m.record.dest_lease == retiring.mirrored.record.dest_lease);
            if in_use {
                // Expired and granted again for another source lease.
                forget.push((retiring.source_lease, retiring.mirrored.record));
                continue;
            }
            match self
                .dest
                .lease_revoke(retiring.mirrored.record.dest_lease)
                .await
            {
                Ok(()) => {}
                Err(error) if error.to_string().contains("lease not found") => {}
                Err(error) => {
                    debug!(job = %self.job, dest_lease = retiring.mirrored.record.dest_lease, %error, "Revoking a retired lease failed; retrying next tick.");
                    self.state().retiring.push(retiring);
                    continue;
                }
            }
            forget.push((retiring.source_lease, retiring.mirrored.record));
        }
        forget.extend(lost.iter().copied());
        self.forget_records(writer, &forget).await;

        if !lost.is_empty() {
            warn!(
                job = %self.job,
                leases = lost.len(),
                "Destination leases expired while their source leases live (an outage longer than TTL + --lease-grace?); a full sync restores their keys."
            );
            let mut state = self.state();
            state.lost.extend(lost.iter().map(|(source, _)| *source));
            if let Some(attempt) = &state.attempt {
                attempt.cancel();
            }
        }
    }

    /// Deletes the records of `records` (fenced), each only if it still
    /// holds what was retired (the same source ID may have a new mapping
    /// by now). A failure leaves them for the next leader, who finds the
    /// leases gone and retries.
    async fn forget_records(&self, writer: &DestWriter, records: &[(i64, LeaseRecord)]) {
        for (source_lease, record) in records {
            if self.state().leases.contains_key(source_lease) {
                // Mapped again since: the record is the new mapping's.
                continue;
            }
            let key = self.keys.lease_record(*source_lease);
            let guard = vec![Compare::value(
                key.clone(),
                CompareOp::Equal,
                record.encode(),
            )];
            match writer
                .commit("forget mirrored lease", guard, vec![Op::delete(key)])
                .await
            {
                Ok(_) => {}
                Err(error) => {
                    debug!(job = %self.job, %error, "Forgetting a lease record failed; the next leader retries.");
                    return;
                }
            }
        }
        if !records.is_empty() {
            info!(job = %self.job, leases = records.len(), "Retired mirrored leases.");
        }
    }
}
