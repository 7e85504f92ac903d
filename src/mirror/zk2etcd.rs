//! zk2etcd: ZooKeeper prefixes mirrored into etcd while this replica leads
//! (the shell around [`crate::model::zk`]).
//!
//! ```text
//!   connect ─▶ watch (persistent recursive) ─▶ walk ─▶ plan ─▶ apply ─▶ events ─┐
//!      ▲                 ▲                                                      │
//!      │                 └── reconnected (events may be lost), every --resync-interval
//!      └── session expired or closed ◀──────────────────────────────────────────┘
//! ```
//!
//! The watch is added before the walk, so a change the walk misses arrives
//! as an event; keys with an event during the walk are not decided on the
//! walk's evidence, their events are applied after it. ZooKeeper 3.8 sends
//! no zxid with events, so an event is applied by reading the node again
//! (its data, `mzxid` and owner) and the destination key and ownership
//! record fresh: the result is ZooKeeper's state, whatever the order of
//! events. After a reconnect the watches are added again and the tree is
//! walked again: events during a disconnection are lost (ZOOKEEPER-4698),
//! and zookeeper-client 0.11.2 does not re-register persistent watches.
//!
//! Every write goes through the job's [`FencedWriter`] (lock and promoted
//! marker) with its ownership record in the same txn, guarded on that
//! record as read ([`crate::model::zk`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use zookeeper_client as zk;

pub use crate::config::{EphemeralMode, ZkJob};
use crate::etcd::api::{Compare, CompareOp, Op, TxnRequest};
use crate::etcd::client::{ClientError, Cluster};
use crate::etcd::pager::read_range;
use crate::mirror::error::JobError;
use crate::mirror::fenced::{FencedWriter, TxnOutcome};
use crate::model::keys::{prefix_range_end, MetaKeys};
use crate::model::zk::{plan, DestEntry, Owned, OwnedRecord, TreeNode, ZkOp, ZkPlan, ZkPrefix};

/// Keys per destination txn (each with its ownership record).
const KEYS_PER_TXN: usize = 50;
/// Bytes of values per destination txn, under etcd's default
/// `--max-request-bytes` (1.5 MiB) with room for a node at ZooKeeper's own
/// limit (just under 1 MiB).
const BYTES_PER_TXN: usize = 1024 * 1024;
/// Nodes read at once during a walk.
const WALK_CONCURRENCY: usize = 64;
/// Session leases renewed at once.
const RENEW_CONCURRENCY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ZkError {
    #[error(
        "zookeeper {operation} {path}: {source} (check --zk-servers and that ZooKeeper is up)"
    )]
    Zk {
        operation: &'static str,
        path: String,
        source: zk::Error,
    },
    #[error("the zookeeper session ended ({0:?}); connecting a new one")]
    SessionEnded(zk::SessionState),
    #[error(transparent)]
    Job(#[from] JobError),
}

impl From<ClientError> for ZkError {
    fn from(error: ClientError) -> Self {
        ZkError::Job(error.into())
    }
}

fn zk_error<'a>(operation: &'static str, path: &'a str) -> impl FnOnce(zk::Error) -> ZkError + 'a {
    move |source| ZkError::Zk {
        operation,
        path: path.to_string(),
        source,
    }
}

/// Connects a ZooKeeper session for the job.
pub async fn connect(job: &ZkJob) -> Result<zk::Client, ZkError> {
    let mut connector = zk::Client::connector().with_session_timeout(job.session_timeout);
    if let Some(digest) = &job.digest {
        connector = connector.with_auth("digest", digest.as_bytes());
    }
    connector
        .connect(&job.servers)
        .await
        .map_err(zk_error("connect to", &job.servers))
}

/// Destination leases standing for ZooKeeper sessions, and which key is on
/// which session (so a session whose last key went has its lease revoked).
#[derive(Default)]
struct SessionBook {
    leases: HashMap<i64, i64>,
    keys: BTreeMap<Vec<u8>, i64>,
    /// When each session's lease was last handed out for a write: a lease
    /// is revoked only after a whole TTL without keys or writes, so a put
    /// in flight on it never loses it.
    used: HashMap<i64, tokio::time::Instant>,
}

#[derive(Clone)]
struct SessionLeases {
    dest: Cluster,
    ttl: Duration,
    book: Arc<Mutex<SessionBook>>,
    metrics: crate::telemetry::metrics::JobMetrics,
}

impl SessionLeases {
    /// The lease for `session`, granted on first use.
    async fn lease_for(&self, session: i64) -> Result<i64, ZkError> {
        {
            let mut book = self.book.lock().expect("book");
            book.used.insert(session, tokio::time::Instant::now());
            if let Some(lease) = book.leases.get(&session) {
                return Ok(*lease);
            }
        }
        let lease = self
            .dest
            .lease_grant(self.ttl.as_secs().max(2) as i64, 0)
            .await?;
        self.book
            .lock()
            .expect("book")
            .leases
            .insert(session, lease);
        debug!(
            session = format!("{session:x}"),
            lease = format!("{lease:x}"),
            "Granted a lease for a ZooKeeper session."
        );
        Ok(lease)
    }

    /// The lease went away under a put: forget it, so the next put grants one.
    fn forget(&self, session: i64) {
        self.book.lock().expect("book").leases.remove(&session);
    }

    fn adopt(&self, session: i64, lease: i64) {
        self.book
            .lock()
            .expect("book")
            .leases
            .entry(session)
            .or_insert(lease);
    }

    /// Takes over the leases the destination's keys of ours are on.
    fn adopt_all(&self, dest: &DestKeys, owned: &OwnedKeys) {
        for (key, owned) in owned {
            if owned.record.session == 0 {
                continue;
            }
            if let Some(entry) = dest.get(key).filter(|e| e.lease != 0) {
                self.adopt(owned.record.session, entry.lease);
            }
            self.wrote(key, owned.record.session);
        }
    }

    fn wrote(&self, key: &[u8], session: i64) {
        let mut book = self.book.lock().expect("book");
        if session == 0 {
            book.keys.remove(key);
        } else {
            book.keys.insert(key.to_vec(), session);
        }
    }

    fn deleted(&self, key: &[u8]) {
        self.book.lock().expect("book").keys.remove(key);
    }

    /// Renews every third of the TTL the leases of sessions that still have
    /// keys, and revokes the others.
    async fn keep(self, stop: CancellationToken) {
        let mut rounds = tokio::time::interval(self.ttl / 3);
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = rounds.tick() => {}
            }
            type SessionLease = (i64, i64);
            let (live, idle): (Vec<SessionLease>, Vec<SessionLease>) = {
                let mut book = self.book.lock().expect("book");
                let with_keys: BTreeSet<i64> = book.keys.values().copied().collect();
                let recent = |session: &i64| {
                    book.used
                        .get(session)
                        .is_some_and(|at| at.elapsed() < self.ttl)
                };
                let (live, idle): (Vec<SessionLease>, Vec<SessionLease>) = book
                    .leases
                    .iter()
                    .map(|(s, l)| (*s, *l))
                    .partition(|(session, _)| with_keys.contains(session) || recent(session));
                // Forgotten under the lock: a put from now on grants anew.
                for (session, _) in &idle {
                    book.leases.remove(session);
                    book.used.remove(session);
                }
                (live, idle)
            };
            for (_, lease) in idle {
                if let Err(error) = self.dest.lease_revoke(lease).await {
                    debug!(%error, "Could not revoke an idle session lease; it expires on its own.");
                }
            }
            // At once, not one after the other: a round must fit in a
            // third of the TTL however many sessions there are.
            let dest = &self.dest;
            let renewed: Vec<(i64, i64, Result<bool, ClientError>)> =
                futures::stream::iter(live)
                    .map(|(session, lease)| async move {
                        (session, lease, dest.lease_renew(lease).await)
                    })
                    .buffer_unordered(RENEW_CONCURRENCY)
                    .collect()
                    .await;
            self.metrics
                .zk_sessions
                .set(self.book.lock().expect("book").leases.len() as i64);
            for (session, lease, result) in renewed {
                match result {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!(session = format!("{session:x}"), lease = format!("{lease:x}"), "A session's lease expired on the destination; its keys are put again on their next change or diff.");
                        self.forget(session);
                    }
                    Err(error) => {
                        debug!(%error, "Session lease renewal failed; trying next round.")
                    }
                }
            }
        }
    }
}

/// What one leadership shares.
struct Leading<'a> {
    job: &'a ZkJob,
    keys: MetaKeys,
    writer: &'a FencedWriter,
    leases: SessionLeases,
    /// Tells the liveness probe the job is making progress.
    beat: &'a (dyn Fn() + Send + Sync),
}

/// Leads the job until `held` fires (the lock is lost) or `cancel`:
/// connects, and runs resync and event cycles, reconnecting as needed.
pub async fn lead(
    job: &ZkJob,
    keys: MetaKeys,
    writer: &FencedWriter,
    held: &CancellationToken,
    beat: &(dyn Fn() + Send + Sync),
) -> Result<(), ZkError> {
    let leases = SessionLeases {
        dest: writer.dest().clone(),
        ttl: job.ephemeral_ttl,
        book: Default::default(),
        metrics: writer.metrics().clone(),
    };
    // Registered before the first key, so an etcd mirror job sharing the
    // destination honours the ownership records (model::keys::zk2etcd_registry).
    register(job, &keys, writer).await?;
    // Adopt the sessions' leases before anything slow (connect, the walk):
    // the last leader's renewals stopped when it did.
    let (dest_keys, owned) = read_destination(writer.dest(), &keys, &job.prefixes).await?;
    leases.adopt_all(&dest_keys, &owned);
    let keeper_stop = held.child_token();
    let _stop = keeper_stop.clone().drop_guard();
    tokio::spawn(leases.clone().keep(keeper_stop));
    let leading = Leading {
        job,
        keys,
        writer,
        leases,
        beat,
    };
    let client = connect(job).await?;
    info!(job = %job.name, servers = %job.servers, session = format!("{:x}", client.session_id().0), "Connected to ZooKeeper.");
    let mut watching = None;
    loop {
        match leading.cycle(&client, held, &mut watching).await? {
            Cycle::Held => return Ok(()),
            Cycle::Resync => continue,
            Cycle::Rewatch => watching = None,
        }
    }
}

/// Writes the job's registry entry (fenced, like every write): its
/// destination prefixes, for whoever reads the registry.
async fn register(job: &ZkJob, keys: &MetaKeys, writer: &FencedWriter) -> Result<(), ZkError> {
    let prefixes: Vec<String> = job
        .prefixes
        .iter()
        .map(|p| String::from_utf8_lossy(&p.dest).into_owned())
        .collect();
    let value = serde_json::json!({ "dest_prefixes": prefixes }).to_string();
    let put = Op::put(keys.zk2etcd_registration(), value);
    match writer
        .commit("register the zk2etcd job", Vec::new(), vec![put])
        .await?
    {
        TxnOutcome::Committed(_) => Ok(()),
        TxnOutcome::GuardFailed(failure) => {
            Err(writer.explain(&failure, "zk2etcd registration").into())
        }
    }
}

enum Cycle {
    /// The lock is gone (or cancelled): stop.
    Held,
    /// Walk again (the watches stand).
    Resync,
    /// Reconnected: add the watches again, then walk.
    Rewatch,
}

type Events = SelectAll<BoxStream<'static, zk::WatchedEvent>>;

impl Leading<'_> {
    /// One watch, walk, diff and the events after it, until a resync is due.
    ///
    /// `watching` holds the watches between cycles: added again only after
    /// a reconnect (zookeeper-client drops persistent watches then), since
    /// dropping one and adding it again can race with the crate's
    /// RemoveWatches and lose the new one.
    async fn cycle(
        &self,
        client: &zk::Client,
        held: &CancellationToken,
        watching: &mut Option<Events>,
    ) -> Result<Cycle, ZkError> {
        let metrics = self.writer.metrics();
        metrics.set_state(crate::telemetry::metrics::JobState::FullSync);
        metrics.zk_resyncs_total.inc();
        (self.beat)();
        let events = match watching {
            Some(events) => events,
            None => watching.insert(self.watch(client).await?),
        };
        let tree = walk(client, &self.job.prefixes, self.job.ephemeral).await?;
        // Events that arrived during the walk: their keys are theirs.
        let mut pending = Vec::new();
        while let Some(Some(event)) = events.next().now_or_never() {
            pending.push(event);
        }
        let raced: BTreeSet<Vec<u8>> = pending
            .iter()
            .filter_map(|e| self.key_of(&e.path))
            .collect();
        let plan = self.resync(tree, &raced).await?;
        info!(job = %self.job.name, writes = plan.ops.len(), foreign = plan.foreign.len(), raced = plan.raced, "Diffed the ZooKeeper tree against the destination.");
        for event in pending {
            if let Some(next) = self.on_event(client, event).await? {
                return Ok(next);
            }
        }
        metrics.set_state(crate::telemetry::metrics::JobState::Watching);
        // Caught up with the walk.
        metrics.lag_seconds.set(0.0);
        let mut resync = tokio::time::interval(self.job.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        let mut alive = tokio::time::interval(Duration::from_secs(5));
        // No event for a whole tick: nothing known to be behind.
        let mut quiet = false;
        loop {
            // Only picks; the event is applied outside the select.
            let event = tokio::select! {
                biased;
                _ = held.cancelled() => return Ok(Cycle::Held),
                _ = resync.tick() => return Ok(Cycle::Resync),
                _ = alive.tick() => {
                    (self.beat)();
                    if quiet {
                        metrics.lag_seconds.set(0.0);
                    }
                    quiet = true;
                    continue;
                }
                event = events.next() => event,
            };
            quiet = false;
            let Some(event) = event else {
                return Err(ZkError::SessionEnded(client.state()));
            };
            if let Some(next) = self.on_event(client, event).await? {
                return Ok(next);
            }
        }
    }

    /// A persistent recursive watch per prefix, merged.
    async fn watch(&self, client: &zk::Client) -> Result<Events, ZkError> {
        let mut events: Events = SelectAll::new();
        for prefix in &self.job.prefixes {
            let watcher = client
                .watch(&prefix.zk, zk::AddWatchMode::PersistentRecursive)
                .await
                .map_err(zk_error("watch", &prefix.zk))?;
            events.push(
                futures::stream::unfold(watcher, |mut watcher| async move {
                    let event = watcher.changed().await;
                    let terminal = event.event_type == zk::EventType::Session
                        && event.session_state.is_terminated();
                    // After a terminal event the watcher must not be awaited again.
                    (!terminal).then_some((event, watcher))
                })
                .boxed(),
            );
        }
        Ok(events)
    }

    fn key_of(&self, path: &str) -> Option<Vec<u8>> {
        self.job.prefixes.iter().find_map(|p| p.key_of(path))
    }

    /// Applies one watch event; `Some` when it calls for a resync.
    async fn on_event(
        &self,
        client: &zk::Client,
        event: zk::WatchedEvent,
    ) -> Result<Option<Cycle>, ZkError> {
        use zk::{EventType, SessionState};
        match event.event_type {
            EventType::Session => match event.session_state {
                SessionState::SyncConnected => {
                    info!(job = %self.job.name, "Reconnected to ZooKeeper; events may have been lost: walking the tree again.");
                    Ok(Some(Cycle::Rewatch))
                }
                SessionState::Disconnected => {
                    warn!(job = %self.job.name, "Disconnected from ZooKeeper; the client reconnects.");
                    Ok(None)
                }
                state if state.is_terminated() => Err(ZkError::SessionEnded(state)),
                _ => Ok(None),
            },
            EventType::NodeCreated | EventType::NodeDataChanged | EventType::NodeDeleted => {
                let Some(key) = self.key_of(&event.path) else {
                    return Ok(None);
                };
                // Read even after a delete: the node may be back already,
                // and a delete must not rest on older evidence than that.
                let node = read_node(client, &event.path, self.job.ephemeral).await?;
                let changed = node.as_ref().map(|(node, mtime)| (node.mzxid, *mtime));
                let tree: BTreeMap<Vec<u8>, TreeNode> =
                    node.into_iter().map(|(n, _)| (key.clone(), n)).collect();
                let (dest, owned) = self.read_keys(std::slice::from_ref(&key)).await?;
                let plan = plan(&tree, &dest, &owned, &BTreeSet::new());
                self.apply(&plan).await?;
                let metrics = self.writer.metrics();
                metrics.events_applied_total.inc();
                // How far behind ZooKeeper: from the node's change (the
                // server's clock) to its write here. A delete leaves no
                // stat to time it by.
                if let Some((mzxid, mtime)) = changed {
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64);
                    metrics
                        .lag_seconds
                        .set((now_ms - mtime).max(0) as f64 / 1000.0);
                    if mzxid > metrics.zk_applied_zxid.get() {
                        metrics.zk_applied_zxid.set(mzxid);
                    }
                }
                (self.beat)();
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Compares the whole tree with the destination and writes the difference.
    async fn resync(
        &self,
        tree: BTreeMap<Vec<u8>, TreeNode>,
        raced: &BTreeSet<Vec<u8>>,
    ) -> Result<ZkPlan, ZkError> {
        let (dest, owned) =
            read_destination(self.writer.dest(), &self.keys, &self.job.prefixes).await?;
        self.leases.adopt_all(&dest, &owned);
        self.writer.metrics().zk_keys_owned.set(owned.len() as i64);
        let mut plan = plan(&tree, &dest, &owned, raced);
        let allowed =
            crate::model::schema::prune_allowance(owned.len() as u64, self.job.max_prune_ratio, 0);
        let deletes = plan.deletes();
        if deletes as u64 > allowed {
            // The mass-delete guard: the deletes wait for an operator; puts
            // and events go on, so new registrations still arrive.
            plan.ops.retain(|op| !matches!(op, ZkOp::Delete { .. }));
            self.writer.metrics().error("prune_guard");
            error!(job = %self.job.name, deletes, owned = owned.len(), max_prune_ratio = self.job.max_prune_ratio, "A diff would delete more of the keys zk2etcd owns than --max-prune-ratio allows: those deletes are skipped (is --zk-servers the right ensemble, or was the tree emptied by mistake?); raise --max-prune-ratio to let them through.");
        }
        for foreign in plan.foreign.iter().take(5) {
            warn!(job = %self.job.name, key = %String::from_utf8_lossy(foreign), "ZooKeeper has this node, but another writer holds the key: left as it is.");
        }
        self.apply(&plan).await?;
        Ok(plan)
    }

    /// `keys` and their ownership records, read in one txn.
    async fn read_keys(&self, keys: &[Vec<u8>]) -> Result<(DestKeys, OwnedKeys), ZkError> {
        let mut ops = Vec::new();
        for key in keys {
            ops.push(Op::get(key.clone()));
            ops.push(Op::get(self.keys.zk_owned(key)));
        }
        let response = self
            .writer
            .dest()
            .txn(
                "read keys and ownership records",
                TxnRequest::new().and_then(ops),
            )
            .await?;
        let mut dest = BTreeMap::new();
        let mut owned = BTreeMap::new();
        let mut ranges = response.ranges();
        for key in keys {
            if let Some(kv) = ranges.next().and_then(|r| r.kvs.first().cloned()) {
                dest.insert(
                    key.clone(),
                    DestEntry {
                        value: kv.value,
                        lease: kv.lease,
                        mod_revision: kv.mod_revision,
                    },
                );
            }
            if let Some(kv) = ranges.next().and_then(|r| r.kvs.first().cloned()) {
                if let Ok(record) = serde_json::from_slice::<OwnedRecord>(&kv.value) {
                    owned.insert(
                        key.clone(),
                        Owned {
                            record,
                            revision: kv.mod_revision,
                        },
                    );
                }
            }
        }
        Ok((dest, owned))
    }

    /// Writes a plan, [`KEYS_PER_TXN`] keys per fenced txn; a batch whose
    /// guards fail is written key by key, and a key whose guard fails is
    /// left to the next event or diff (another writer moved it).
    async fn apply(&self, plan: &ZkPlan) -> Result<(), ZkError> {
        let mut batches: Vec<&[ZkOp]> = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, op) in plan.ops.iter().enumerate() {
            let size = op.key().len() * 2
                + match op {
                    ZkOp::Put { value, .. } => value.len() + 64,
                    _ => 0,
                };
            if i > start && (i - start >= KEYS_PER_TXN || bytes + size > BYTES_PER_TXN) {
                batches.push(&plan.ops[start..i]);
                (start, bytes) = (i, 0);
            }
            bytes += size;
        }
        if start < plan.ops.len() {
            batches.push(&plan.ops[start..]);
        }
        for batch in batches {
            if !self.commit(batch).await? && batch.len() > 1 {
                for op in batch {
                    if !self.commit(std::slice::from_ref(op)).await? {
                        debug!(job = %self.job.name, key = %String::from_utf8_lossy(op.key()), "A key's guard failed: moved by another writer; left to the next diff.");
                    }
                }
            }
        }
        Ok(())
    }

    /// One fenced txn for `ops`; `false` when a key's guard failed.
    async fn commit(&self, ops: &[ZkOp]) -> Result<bool, ZkError> {
        // A session's lease that expired under us is forgotten by the first
        // try; the second grants a new one.
        for _ in 0..2 {
            if let Some(applied) = self.commit_once(ops).await? {
                return Ok(applied);
            }
        }
        Ok(false)
    }

    /// One try of [`Self::commit`]; `None` when a lease was gone.
    async fn commit_once(&self, ops: &[ZkOp]) -> Result<Option<bool>, ZkError> {
        let mut guards = Vec::new();
        let mut writes = Vec::new();
        let mut leased = Vec::new();
        for op in ops {
            let record_key = self.keys.zk_owned(op.key());
            match op {
                ZkOp::Put {
                    key,
                    value,
                    record,
                    guard,
                    present,
                } => {
                    let lease = if record.session != 0 && self.job.ephemeral == EphemeralMode::Lease
                    {
                        let lease = self.leases.lease_for(record.session).await?;
                        leased.push(record.session);
                        lease
                    } else {
                        0
                    };
                    match guard {
                        None => {
                            guards.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                            guards.push(Compare::create_revision(
                                record_key.clone(),
                                CompareOp::Equal,
                                0,
                            ));
                        }
                        Some(revision) => {
                            guards.push(Compare::mod_revision(
                                record_key.clone(),
                                CompareOp::Equal,
                                *revision,
                            ));
                            // Nobody wrote the key since we did (or it is
                            // still gone): it is ours.
                            guards.push(if *present {
                                Compare::mod_revision(key.clone(), CompareOp::Equal, *revision)
                            } else {
                                Compare::create_revision(key.clone(), CompareOp::Equal, 0)
                            });
                        }
                    }
                    let record = serde_json::to_vec(record).expect("a record serializes");
                    // The record on the key's lease: they go together.
                    writes.push(Op::put_with_lease(key.clone(), value.clone(), lease));
                    writes.push(Op::put_with_lease(record_key, record, lease));
                }
                ZkOp::Delete { key, guard } => {
                    guards.push(Compare::mod_revision(
                        record_key.clone(),
                        CompareOp::Equal,
                        *guard,
                    ));
                    guards.push(Compare::mod_revision(key.clone(), CompareOp::Equal, *guard));
                    writes.push(Op::delete(key.clone()));
                    writes.push(Op::delete(record_key));
                }
                ZkOp::Forget { key, guard } => {
                    guards.push(Compare::mod_revision(
                        record_key.clone(),
                        CompareOp::Equal,
                        *guard,
                    ));
                    guards.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                    writes.push(Op::delete(record_key));
                }
            }
        }
        let outcome = match self
            .writer
            .commit("write zk2etcd keys", guards, writes)
            .await
        {
            Ok(outcome) => outcome,
            Err(JobError::Client(error)) if error.is_lease_not_found() => {
                // A session's lease expired under us: grant anew next time.
                for session in leased {
                    self.leases.forget(session);
                }
                return Ok(None);
            }
            Err(error) => return Err(error.into()),
        };
        match outcome {
            TxnOutcome::Committed(_) => {
                let owned = &self.writer.metrics().zk_keys_owned;
                for op in ops {
                    match op {
                        ZkOp::Put {
                            key, record, guard, ..
                        } => {
                            if guard.is_none() {
                                owned.inc();
                            }
                            self.leases.wrote(key, record.session)
                        }
                        ZkOp::Delete { key, .. } | ZkOp::Forget { key, .. } => {
                            owned.dec();
                            self.leases.deleted(key)
                        }
                    }
                }
                Ok(Some(true))
            }
            TxnOutcome::GuardFailed(failure) if failure.promoted || !failure.lock_held => {
                Err(self.writer.explain(&failure, "zk2etcd keys").into())
            }
            TxnOutcome::GuardFailed(_) => Ok(Some(false)),
        }
    }
}

/// A destination as zk2etcd reads it: its keys with value and lease by key.
pub type DestKeys = BTreeMap<Vec<u8>, DestEntry>;
/// Its ownership records, by the key they are for.
pub type OwnedKeys = BTreeMap<Vec<u8>, Owned>;

/// Every key under the destination prefixes, and every ownership record of
/// the job. (Read one after the other: every write is guarded on the
/// record, so a key or record that moved in between fails its guard.)
pub async fn read_destination(
    dest: &Cluster,
    keys: &MetaKeys,
    prefixes: &[ZkPrefix],
) -> Result<(DestKeys, OwnedKeys), ClientError> {
    let mut entries = BTreeMap::new();
    for prefix in prefixes {
        // The prefix's own node maps to the prefix key itself.
        for kv in read_range(
            dest,
            "read the zk2etcd prefix",
            prefix.dest.clone(),
            prefix_range_end(&prefix.dest),
            0,
        )
        .await?
        {
            entries.insert(
                kv.key.clone(),
                DestEntry {
                    value: kv.value,
                    lease: kv.lease,
                    mod_revision: kv.mod_revision,
                },
            );
        }
    }
    let owned_prefix = keys.zk_owned_prefix().into_bytes();
    let mut owned = BTreeMap::new();
    for kv in read_range(
        dest,
        "read zk2etcd ownership records",
        owned_prefix.clone(),
        prefix_range_end(&owned_prefix),
        0,
    )
    .await?
    {
        let key = kv.key[owned_prefix.len()..].to_vec();
        if let Ok(record) = serde_json::from_slice::<OwnedRecord>(&kv.value) {
            owned.insert(
                key,
                Owned {
                    record,
                    revision: kv.mod_revision,
                },
            );
        }
    }
    Ok((entries, owned))
}

/// Reads one node: its data, `mzxid` and (in lease mode) its ephemeral
/// owner, with its `mtime` (ms since the epoch, the server's clock);
/// `None` if it is gone.
async fn read_node(
    client: &zk::Client,
    path: &str,
    mode: EphemeralMode,
) -> Result<Option<(TreeNode, i64)>, ZkError> {
    match client.get_data(path).await {
        Ok((data, stat)) => Ok(Some((
            TreeNode {
                data,
                mzxid: stat.mzxid,
                session: match mode {
                    EphemeralMode::Lease => stat.ephemeral_owner,
                    EphemeralMode::Plain => 0,
                },
            },
            stat.mtime,
        ))),
        Err(zk::Error::NoNode) => Ok(None),
        Err(source) => Err(ZkError::Zk {
            operation: "read",
            path: path.to_string(),
            source,
        }),
    }
}

/// A path as the walk read it: the node (if still there) and its children.
type WalkedNode = (String, Option<TreeNode>, Vec<String>);

/// Every node under the prefixes (not excluded), by etcd key: breadth
/// first, [`WALK_CONCURRENCY`] nodes at a time. A node deleted while the
/// walk reaches it is simply not there.
pub async fn walk(
    client: &zk::Client,
    prefixes: &[ZkPrefix],
    mode: EphemeralMode,
) -> Result<BTreeMap<Vec<u8>, TreeNode>, ZkError> {
    let mut tree = BTreeMap::new();
    for prefix in prefixes {
        let mut level = vec![prefix.zk.clone()];
        while !level.is_empty() {
            let read: Vec<Result<WalkedNode, ZkError>> =
                futures::stream::iter(level.into_iter().filter(|p| prefix.covers(p)))
                    .map(|path| async move {
                        let node = read_node(client, &path, mode).await?.map(|(node, _)| node);
                        let children = match node {
                            None => Vec::new(),
                            Some(_) => match client.list_children(&path).await {
                                Ok(children) => children,
                                Err(zk::Error::NoNode) => Vec::new(),
                                Err(source) => {
                                    return Err(ZkError::Zk {
                                        operation: "list children of",
                                        path,
                                        source,
                                    })
                                }
                            },
                        };
                        Ok((path, node, children))
                    })
                    .buffer_unordered(WALK_CONCURRENCY)
                    .collect()
                    .await;
            let mut next = Vec::new();
            for result in read {
                let (path, node, children) = result?;
                if let (Some(node), Some(key)) = (node, prefix.key_of(&path)) {
                    tree.insert(key, node);
                }
                let base = if path == "/" { String::new() } else { path };
                next.extend(children.into_iter().map(|child| format!("{base}/{child}")));
            }
            level = next;
        }
    }
    Ok(tree)
}
