//! Lease-faithful mirroring (`--leases faithful`): a key on source lease L
//! is written on a destination lease that lives as long as L does (plus
//! `--lease-grace`).
//!
//! The rules are in [`crate::model::lease_book`], a pure state machine
//! ([`LeaseCore`]); this is its shell. One [`LeaseBook`] per leadership:
//! every input (a writer's request, the answer to an effect, checkpoint
//! progress, a tick) goes through [`LeaseCore::step`] under one lock, so no
//! two paths ever decide about a lease with different views of it; the
//! effects it returns are performed by one executor task, at most
//! [`CONCURRENT_LEASE_CALLS`] at a time, and their answers come back as inputs.
//!
//! - **Mapping.** L is mirrored by destination lease L when the destination
//!   does not have that ID (etcd's `LeaseGrant` takes a chosen ID), else by
//!   a fresh one; the mapping is recorded under the job's meta prefix in a
//!   fenced txn before any key is attached to it.
//! - **Keepalive.** A destination lease is renewed a third of its TTL after
//!   the last renewal, once a `LeaseTimeToLive` of its source lease (which
//!   etcd answers on the leader) found it alive, after a read of the
//!   source's head. Heads, probes and renewals are hedged over distinct
//!   members: a member that stops answering holds one copy, not the
//!   answer (a SIGSTOPped follower once held a head read past the
//!   destination lease's TTL).
//! - **End of a lease.** A probe that finds the source lease gone, then a
//!   linearizable read of the source's head (revision G), retire it; it is
//!   revoked once the checkpoint reaches G, when its keys' deletes are on
//!   the destination, so revoking deletes nothing the source still has.
//! - **Loss.** A destination lease found gone while the destination still
//!   needed it (an outage longer than TTL + grace) sends the job to a full
//!   sync, which grants it again and restores the keys.
//! - **Promotion.** The book lives only while the job replicates: after
//!   `promote` nothing renews, and mirrored keys expire after TTL + grace,
//!   as they would have on the primary.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

// tokio's clock, so the simulator's paused time governs every deadline.
use tokio::time::Instant;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::etcd::api::{Compare, CompareOp, Op};
use crate::etcd::client::Cluster;
use crate::mirror::error::JobError;
use crate::mirror::fenced::{FencedWriter, TxnOutcome};
use crate::model::ids::Ids;
use crate::model::lease_book::{Effect, Failure, History, Input, LeaseCore, Want};
use crate::model::schema::LeaseRecord;

/// Probes, grants, renewals and revokes in flight at once.
pub const CONCURRENT_LEASE_CALLS: usize = 64;

type Error = Arc<JobError>;
type Reply = Result<BTreeMap<i64, i64>, Failure<Error>>;

/// What the executor is told.
enum Command {
    Perform(Effect<Error>),
    /// The keeper started: tick now.
    Tick,
}

/// What the book shares with the job loop outside the core.
#[derive(Default)]
struct Shared {
    /// Source leases whose destination lease was found lost.
    lost: BTreeSet<i64>,
    /// The attempt to interrupt when a lease is lost.
    attempt: Option<CancellationToken>,
    /// Leased keys (hash of the key below the job prefix → source lease),
    /// for `etcd_syncer_lease_backed_keys`.
    leased_keys: HashMap<u64, i64>,
}

/// One leadership's mirrored leases.
pub struct LeaseBook {
    job: String,
    /// The one key whose count-only read is the source's head.
    probe_prefix: Vec<u8>,
    source: Cluster,
    fenced: Arc<FencedWriter>,
    ids: Ids,
    core: Mutex<LeaseCore<Error>>,
    /// To the executor task, which lives as long as the job's leadership.
    commands: mpsc::UnboundedSender<Command>,
    /// Set while the keeper runs: the executor ticks, and sends keepalives.
    keeper: Mutex<Option<CancellationToken>>,
    replies: Mutex<BTreeMap<u64, oneshot::Sender<Reply>>>,
    /// The executor has ended: no effect will be performed, no request answered.
    closed: AtomicBool,
    next_request: AtomicU64,
    shared: Mutex<Shared>,
    /// Notified after an input that may shrink the prefetch backlog.
    progress: tokio::sync::Notify,
}

impl std::fmt::Debug for LeaseBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseBook")
            .field("job", &self.job)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn key_hash(suffix: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    suffix.hash(&mut hasher);
    hasher.finish()
}

impl LeaseBook {
    /// A book whose executor runs until `cancel` (the job's token for this
    /// leadership); the keeper's ticks start with [`Self::ensure_keeper`].
    pub fn new(
        job: &str,
        source_prefix: Vec<u8>,
        source: Cluster,
        fenced: Arc<FencedWriter>,
        grace: std::time::Duration,
        ids: Ids,
        cancel: &CancellationToken,
    ) -> Arc<Self> {
        let (commands, receiver) = mpsc::unbounded_channel();
        let book = Arc::new(Self {
            job: job.to_string(),
            probe_prefix: source_prefix,
            source,
            fenced,
            ids,
            core: Mutex::new(LeaseCore::new(grace)),
            commands,
            keeper: Mutex::new(None),
            replies: Mutex::new(BTreeMap::new()),
            closed: AtomicBool::new(false),
            next_request: AtomicU64::new(1),
            shared: Mutex::new(Shared::default()),
            progress: tokio::sync::Notify::new(),
        });
        // The task holds the book only weakly: a book nobody uses any more
        // ends its executor.
        tokio::spawn(run(Arc::downgrade(&book), receiver, cancel.child_token()));
        book
    }

    /// Whether the keeper runs: ticks, probes, renewals and revokes go out.
    fn keeping(&self) -> bool {
        lock(&self.keeper)
            .as_ref()
            .is_some_and(|token| !token.is_cancelled())
    }

    /// Steps the core with `input` and hands out what it decided: replies
    /// and losses here, I/O to the executor.
    fn input(&self, input: Input<Error>) {
        // What can shrink the prefetch backlog (see `prefetch_room`).
        let progress = matches!(
            input,
            Input::Probed { serial: None, .. }
                | Input::Granted { .. }
                | Input::Recorded { .. }
                | Input::Tick
                | Input::Clear { .. }
        );
        let effects = {
            let mut core = lock(&self.core);
            let effects = core.step(Instant::now(), input);
            self.fenced
                .metrics()
                .leases_mirrored
                .set(core.mirrored_count() as i64);
            effects
        };
        if progress {
            self.progress.notify_waiters();
        }
        for effect in effects {
            match effect {
                Effect::Reply { request, outcome } => {
                    if let Some(reply) = lock(&self.replies).remove(&request) {
                        // The writer may have given up (cancelled): fine.
                        let _ = reply.send(outcome);
                    }
                }
                Effect::Lost { leases } => {
                    warn!(
                        job = %self.job,
                        leases = leases.len(),
                        "Destination leases expired while their source leases live, or before their keys' deletes were applied (an outage longer than TTL + --lease-grace?); a full sync restores their keys."
                    );
                    let mut shared = lock(&self.shared);
                    shared.lost.extend(leases);
                    if let Some(attempt) = &shared.attempt {
                        attempt.cancel();
                    }
                }
                other => {
                    // No executor any more (the leadership ended): nothing to do.
                    let _ = self.commands.send(Command::Perform(other));
                }
            }
        }
    }

    /// Adopts the records read from the destination (a new leader, or a
    /// new attempt); leases already known keep their state.
    pub fn load(&self, records: &BTreeMap<i64, LeaseRecord>) {
        self.input(Input::Load {
            records: records.iter().map(|(s, r)| (*s, *r)).collect(),
        });
    }

    /// Starts the keeper (ticks: probes, renewals, revokes) until `parent`
    /// is cancelled, unless it runs already; the first tick is at once, so
    /// a new leader renews the recorded leases well within their grace.
    pub fn ensure_keeper(&self, parent: &CancellationToken) {
        let mut keeper = lock(&self.keeper);
        if keeper.as_ref().is_some_and(|token| !token.is_cancelled()) {
            return;
        }
        *keeper = Some(parent.child_token());
        let _ = self.commands.send(Command::Tick);
    }

    /// Stops the keeper (promoted): no probe, renewal or revoke goes out
    /// once this returns.
    pub fn stop_keeper(&self) {
        if let Some(token) = lock(&self.keeper).take() {
            token.cancel();
        }
    }

    /// Forgets everything (the job was promoted: nothing is renewed, and
    /// `promote --undo` starts again from the records).
    pub fn clear(&self) {
        self.input(Input::Clear {
            error: Arc::new(JobError::Promoted),
        });
        self.fenced.metrics().leases_mirrored.set(0);
    }

    /// The destination lease a key on `want.lease` goes to, for a state of
    /// the source at `want.at` (see [`LeaseCore::target`]).
    pub fn target(&self, want: Want) -> Option<i64> {
        lock(&self.core).target(want)
    }

    /// The destination lease mirroring `source_lease`, if it is mapped (not
    /// retiring) and recorded.
    pub fn dest_lease_of(&self, source_lease: i64) -> Option<i64> {
        self.target(Want {
            lease: source_lease,
            at: i64::MAX,
        })
    }

    /// Every recorded mapping that takes keys.
    pub fn mapping(&self) -> HashMap<i64, i64> {
        lock(&self.core).mapping().into_iter().collect()
    }

    pub fn mirrored_count(&self) -> usize {
        lock(&self.core).mirrored_count()
    }

    pub fn retiring_count(&self) -> usize {
        lock(&self.core).retiring_count()
    }

    /// The destination now reflects the source up to `revision`.
    pub fn committed(&self, revision: i64) {
        self.input(Input::Committed { revision });
    }

    /// The job (re)starts from a checkpoint of `cluster_id`'s history at
    /// `revision`; until then nothing is judged gone.
    pub fn resumed(&self, cluster_id: u64, revision: i64) {
        self.input(Input::Resumed {
            history: History {
                cluster_id,
                revision,
            },
        });
    }

    /// A full sync of `cluster_id`'s history begins (before it pins its
    /// revision): retiring leases stop taking keys.
    pub fn full_sync_started(&self, cluster_id: u64) {
        self.input(Input::FullSyncStarted { cluster_id });
    }

    /// A full sync finished at `revision` of `cluster_id`.
    pub fn full_sync_done(&self, cluster_id: u64, revision: i64) {
        self.input(Input::FullSyncDone {
            history: History {
                cluster_id,
                revision,
            },
        });
    }

    /// Interrupt `attempt` when a destination lease is found lost.
    pub fn watch_attempt(&self, attempt: CancellationToken) {
        let mut shared = lock(&self.shared);
        if !shared.lost.is_empty() {
            attempt.cancel();
        }
        shared.attempt = Some(attempt);
    }

    /// Source leases whose destination lease was lost since the last call.
    pub fn take_lost(&self) -> Vec<i64> {
        std::mem::take(&mut lock(&self.shared).lost)
            .into_iter()
            .collect()
    }

    /// A key below the job prefix is now on `lease` (0: none), or deleted (`None`).
    pub fn observe_key(&self, suffix: &[u8], lease: Option<i64>) {
        let mut shared = lock(&self.shared);
        match lease {
            Some(lease) if lease != 0 => {
                shared.leased_keys.insert(key_hash(suffix), lease);
            }
            _ => {
                shared.leased_keys.remove(&key_hash(suffix));
            }
        }
        self.fenced
            .metrics()
            .lease_backed_keys
            .set(shared.leased_keys.len() as i64);
    }

    /// A full sync starts: it observes every source key again.
    pub fn forget_keys(&self) {
        lock(&self.shared).leased_keys.clear();
        self.fenced.metrics().lease_backed_keys.set(0);
    }

    /// Destination leases for `wants`: granted where missing, and recorded
    /// (fenced) before the caller may attach keys.
    ///
    /// # Cancel-Safety
    /// Cancel-safe: the request stays with the core until answered, and a
    /// grant whose record is never used leaves a lease without keys, which
    /// expires on its own.
    pub async fn resolve(&self, wants: Vec<Want>) -> Result<HashMap<i64, i64>, JobError> {
        if wants.iter().all(|w| w.lease == 0) {
            return Ok(HashMap::new());
        }
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        lock(&self.replies).insert(request, reply);
        self.input(Input::Resolve { request, wants });
        if self.closed.load(Ordering::SeqCst) {
            // Nothing will answer (the leadership ended); the executor
            // dropped every waiting reply when it stopped.
            lock(&self.replies).remove(&request);
        }
        match answer.await {
            Ok(Ok(mapping)) => Ok(mapping.into_iter().collect()),
            Ok(Err(Failure::Lost)) => Err(JobError::DestLeaseLost { leases: 1 }),
            Ok(Err(Failure::Effect(error))) => Err(JobError::Shared(error)),
            // The book was cleared (promoted) or its leadership ended.
            Err(_) => Err(JobError::Cancelled),
        }
    }

    /// Starts the grants and records `wants` will need, without waiting
    /// for them: a full sync's look-ahead reads the source's keys ahead of
    /// the copy, so the copy's txns find their leases granted and recorded
    /// instead of waiting for a probe, a grant and a record each. A failure
    /// is met again (and reported) by the resolve that needs the lease.
    pub fn prefetch(&self, wants: Vec<Want>) {
        self.input(Input::Prefetch { wants });
    }

    /// Prefetched leases not yet recorded (see [`LeaseCore::prefetch_backlog`]).
    pub fn prefetch_backlog(&self) -> usize {
        lock(&self.core).prefetch_backlog()
    }

    /// Waits until at most `limit` prefetched leases are in progress.
    ///
    /// # Cancel-Safety
    /// Cancel-safe: it only waits.
    pub async fn prefetch_room(&self, limit: usize) {
        loop {
            // Registered before the check, so a change between the two wakes it.
            let changed = self.progress.notified();
            if self.prefetch_backlog() <= limit || self.closed.load(Ordering::SeqCst) {
                return;
            }
            changed.await;
        }
    }

    /// Reads back which of `dest_leases` are gone (a txn met one) and
    /// drops their mappings; returns how many were gone.
    pub async fn evict_dead(&self, dest_leases: impl IntoIterator<Item = i64>) -> usize {
        let mut dead = Vec::new();
        for dest_lease in dest_leases.into_iter().collect::<BTreeSet<i64>>() {
            if let Ok(None) = self.fenced.dest().lease_time_to_live(dest_lease).await {
                dead.push(dest_lease);
            }
        }
        let count = dead.len();
        if count > 0 {
            self.input(Input::DestGone { dests: dead });
        }
        count
    }

    /// One effect's I/O, answering with the input it leads to.
    fn perform(&self, effect: Effect<Error>) -> BoxFuture<'static, Option<Input<Error>>> {
        let source = self.source.clone();
        let fenced = self.fenced.clone();
        let job = self.job.clone();
        match effect {
            Effect::Probe { lease, serial } => async move {
                let outcome = source
                    .lease_time_to_live_hedged(lease)
                    .await
                    .map(|ttl| ttl.map(|ttl| ttl.granted))
                    .map_err(|error| Arc::new(JobError::from(error)));
                Some(Input::Probed {
                    lease,
                    serial,
                    outcome,
                })
            }
            .boxed(),
            Effect::Grant { lease, ttl } => {
                let ids = self.ids.clone();
                async move {
                    let dest = fenced.dest();
                    let granted = match dest.lease_grant(ttl, lease).await {
                        Err(error) if error.is_lease_exists() => dest.lease_grant(ttl, 0).await,
                        granted => granted,
                    };
                    if let Ok(dest_lease) = &granted {
                        debug!(job = %job, source_lease = lease, dest_lease, dest_ttl = ttl, "Mirroring a source lease.");
                    }
                    let outcome = granted
                        .map(|dest_lease| (dest_lease, ids.next()))
                        .map_err(|error| Arc::new(JobError::from(error)));
                    Some(Input::Granted { lease, outcome })
                }
                .boxed()
            }
            Effect::Record { batch, records } => async move {
                let ops = records
                    .iter()
                    .map(|(lease, record)| {
                        Op::put(fenced.keys().lease_record(*lease), record.encode())
                    })
                    .collect();
                let outcome = match fenced.commit("record mirrored leases", vec![], ops).await {
                    Ok(TxnOutcome::Committed(_)) => Ok(()),
                    Ok(TxnOutcome::GuardFailed(failure)) => {
                        Err(Arc::new(fenced.explain(&failure, "lease records")))
                    }
                    Err(error) => Err(Arc::new(error)),
                };
                Some(Input::Recorded { batch, outcome })
            }
            .boxed(),
            Effect::ReadHead { batch } => {
                let prefix = self.probe_prefix.clone();
                async move {
                    let outcome = source
                        .head_hedged(&prefix)
                        .await
                        .map(|head| History {
                            cluster_id: head.cluster_id,
                            revision: head.revision,
                        })
                        .map_err(|error| Arc::new(JobError::from(error)));
                    Some(Input::Head { batch, outcome })
                }
                .boxed()
            }
            Effect::Renew { serial, dest } => async move {
                let metrics = fenced.metrics();
                metrics.lease_keepalives_total.inc();
                let outcome = fenced.dest().lease_renew_hedged(dest).await;
                match &outcome {
                    Ok(true) => {}
                    Ok(false) => metrics.lease_keepalive_failures_total.inc(),
                    Err(error) => {
                        metrics.lease_keepalive_failures_total.inc();
                        debug!(job = %job, dest_lease = dest, %error, "Lease keepalive failed; retrying next tick.");
                    }
                }
                Some(Input::Renewed {
                    serial,
                    outcome: outcome.map_err(|error| Arc::new(JobError::from(error))),
                })
            }
            .boxed(),
            Effect::Revoke { serial, dest } => async move {
                let outcome = match fenced.dest().lease_revoke(dest).await {
                    Ok(()) => Ok(()),
                    Err(error) if error.is_lease_not_found() => Ok(()),
                    Err(error) => {
                        debug!(job = %job, dest_lease = dest, %error, "Revoking a retired lease failed; retrying next tick.");
                        Err(Arc::new(JobError::from(error)))
                    }
                };
                Some(Input::Revoked { serial, outcome })
            }
            .boxed(),
            Effect::Forget { records } => async move {
                forget_records(&job, &fenced, &records).await;
                None
            }
            .boxed(),
            // Handed out by `input`, never queued.
            Effect::Reply { .. } | Effect::Lost { .. } => async { None }.boxed(),
        }
    }
}

/// The executor: performs effects (at most [`CONCURRENT_LEASE_CALLS`] at a
/// time), feeds their answers back, and ticks the keeper. Runs until
/// `cancel`, or until the book is dropped.
///
/// # Cancel-Safety
/// Stops at once; an effect in flight either happened or not, and the
/// core (or the next leader, from the records) decides again.
async fn run(
    book: std::sync::Weak<LeaseBook>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    cancel: CancellationToken,
) {
    let mut queue: VecDeque<Effect<Error>> = VecDeque::new();
    let mut inflight: FuturesUnordered<BoxFuture<'static, Option<Input<Error>>>> =
        FuturesUnordered::new();
    let mut next_tick = Instant::now();
    executor_loop(
        &book,
        &mut commands,
        &cancel,
        &mut queue,
        &mut inflight,
        &mut next_tick,
    )
    .await;
    if let Some(book) = book.upgrade() {
        book.closed.store(true, Ordering::SeqCst);
        book.progress.notify_waiters();
        // Writers waiting for an answer get none: they fail (cancelled).
        lock(&book.replies).clear();
    }
}

async fn executor_loop(
    book: &std::sync::Weak<LeaseBook>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    cancel: &CancellationToken,
    queue: &mut VecDeque<Effect<Error>>,
    inflight: &mut FuturesUnordered<BoxFuture<'static, Option<Input<Error>>>>,
    next_tick: &mut Instant,
) {
    loop {
        {
            let Some(book) = book.upgrade() else { return };
            let keeping = book.keeping();
            while inflight.len() < CONCURRENT_LEASE_CALLS {
                match queue.pop_front() {
                    // Once stopped (promoted, deposed), no keepalive,
                    // probe or revoke goes out, even one already queued.
                    Some(
                        Effect::Probe {
                            serial: Some(_), ..
                        }
                        | Effect::Renew { .. }
                        | Effect::Revoke { .. }
                        | Effect::ReadHead { .. },
                    ) if !keeping => {}
                    Some(effect) => inflight.push(book.perform(effect)),
                    None => break,
                }
            }
        }
        let tick = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            command = commands.recv() => match command {
                Some(Command::Perform(effect)) => {
                    queue.push_back(effect);
                    false
                }
                Some(Command::Tick) => true,
                None => return,
            },
            Some(answer) = inflight.next(), if !inflight.is_empty() => {
                if let (Some(input), Some(book)) = (answer, book.upgrade()) {
                    book.input(input);
                }
                false
            }
            _ = tokio::time::sleep_until(*next_tick) => true,
        };
        if tick {
            let Some(book) = book.upgrade() else { return };
            if book.keeping() {
                book.input(Input::Tick);
            }
            *next_tick = Instant::now() + lock(&book.core).tick_period();
        }
    }
}

/// Deletes the records of `records` (fenced), each only if it still holds
/// what was retired (the same source ID may have a new mapping by now). A
/// failure leaves them for the next leader, who finds the leases gone and
/// retries.
async fn forget_records(job: &str, fenced: &FencedWriter, records: &[(i64, LeaseRecord)]) {
    for (source_lease, record) in records {
        let key = fenced.keys().lease_record(*source_lease);
        let guard = vec![Compare::value(
            key.clone(),
            CompareOp::Equal,
            record.encode(),
        )];
        if let Err(error) = fenced
            .commit("forget mirrored lease", guard, vec![Op::delete(key)])
            .await
        {
            debug!(job = %job, %error, "Forgetting a lease record failed; the next leader retries.");
            return;
        }
    }
    if !records.is_empty() {
        info!(job = %job, leases = records.len(), "Retired mirrored leases.");
    }
}
