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
use crate::etcd::api::{Compare, CompareOp, Op, RangeRequest, TxnRequest};
use crate::etcd::client::{ClientError, Cluster};
use crate::etcd::pager::read_range;
use crate::mirror::error::JobError;
use crate::mirror::fenced::{FencedWriter, TxnOutcome};
use crate::model::keys::{key_successor, prefix_range_end, MetaKeys};
use crate::model::zk::{
    child_below, plan, DestEntry, Owned, OwnedRecord, TreeNode, ZkOp, ZkPlan, ZkPrefix,
};

/// Keys per destination txn (each with its ownership record).
const KEYS_PER_TXN: usize = 50;
/// Bytes of values per destination txn, under etcd's default
/// `--max-request-bytes` (1.5 MiB) with room for a node at ZooKeeper's own
/// limit (just under 1 MiB).
const BYTES_PER_TXN: usize = 1024 * 1024;
/// Nodes read at once during a walk.
const WALK_CONCURRENCY: usize = 64;
/// Watch events taken together when they arrive in a burst.
const EVENTS_PER_BATCH: usize = 1024;
/// Keys read per txn (a get of the key and of its record each: etcd's
/// default `--max-txn-ops` is 128).
const KEYS_PER_READ: usize = 64;
/// Txns of a plan in flight at once (distinct keys, each guarded).
const APPLY_CONCURRENCY: usize = 8;
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
    if let Some(tls) = &job.tls {
        crate::etcd::client::ensure_tls_provider();
        let mut options = zk::TlsOptions::new()
            .with_pem_ca(&tls.ca)
            .map_err(zk_error("read --zk-cacert for", &job.servers))?;
        if let Some((cert, key)) = &tls.identity {
            options = options
                .with_pem_identity(cert, key)
                .map_err(zk_error("read --zk-cert/--zk-key for", &job.servers))?;
        }
        // Every server of the connect string on TLS (unless it says tcp://).
        return connector
            .with_tls(options)
            .secure_connect(&job.servers)
            .await
            .map_err(zk_error("connect with TLS to", &job.servers));
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
    /// One grant at a time: txns in flight together that need the same
    /// new session's lease must get one lease, not one each.
    granting: Arc<tokio::sync::Mutex<()>>,
}

impl SessionLeases {
    /// The lease for `session`, granted on first use.
    async fn lease_for(&self, session: i64) -> Result<i64, ZkError> {
        let cached = || {
            let mut book = self.book.lock().expect("book");
            book.used.insert(session, tokio::time::Instant::now());
            book.leases.get(&session).copied()
        };
        if let Some(lease) = cached() {
            return Ok(lease);
        }
        let _granting = self.granting.lock().await;
        if let Some(lease) = cached() {
            return Ok(lease);
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

    /// The lease went away under a put: forget it, so the next put grants
    /// one (unless another txn already did: then that one stands).
    fn forget(&self, session: i64, lease: i64) {
        let mut book = self.book.lock().expect("book");
        if book.leases.get(&session) == Some(&lease) {
            book.leases.remove(&session);
        }
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

    /// [`Self::adopt_all`] from the records alone, page by page: the
    /// sessions' keys are read to learn their leases, a page at a time.
    async fn adopt_recorded(&self, keys: &MetaKeys) -> Result<(), ZkError> {
        let records = keys.zk_owned_prefix().into_bytes();
        let mut from = Some(records.clone());
        while let Some(start) = from.take() {
            let page = records_page(&self.dest, &records, start, false).await?;
            let sessions: Vec<(Vec<u8>, i64)> = page
                .kvs
                .iter()
                .filter_map(|kv| {
                    let record = serde_json::from_slice::<OwnedRecord>(&kv.value).ok()?;
                    (record.session != 0)
                        .then(|| (kv.key[records.len()..].to_vec(), record.session))
                })
                .collect();
            for batch in sessions.chunks(KEYS_PER_TXN) {
                let ops = batch.iter().map(|(key, _)| Op::get(key.clone())).collect();
                let response = self
                    .dest
                    .txn("read the sessions' keys", TxnRequest::new().and_then(ops))
                    .await?;
                for ((key, session), read) in batch.iter().zip(response.ranges()) {
                    if let Some(kv) = read.kvs.first().filter(|kv| kv.lease != 0) {
                        self.adopt(*session, kv.lease);
                    }
                    self.wrote(key, *session);
                }
            }
            from = next_page_from(&page);
        }
        Ok(())
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
                        self.forget(session, lease);
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
        granting: Default::default(),
    };
    // Registered before the first key, so an etcd mirror job sharing the
    // destination honours the ownership records (model::keys::zk2etcd_registry).
    register(job, &keys, writer).await?;
    // Adopt the sessions' leases before anything slow (connect, the walk):
    // the last leader's renewals stopped when it did.
    leases.adopt_recorded(&keys).await?;
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
        // Events that arrive during the walk: their keys are theirs, and
        // they are applied after it.
        let mut pending = Vec::new();
        let diffed = self.resync(client, events, &mut pending).await?;
        info!(job = %self.job.name, writes = diffed.writes, foreign = diffed.foreign, raced = diffed.raced, stale = diffed.stale, subtrees = diffed.chunks, "Diffed the ZooKeeper tree against the destination.");
        if let Some(next) = self.on_events(client, pending).await? {
            return Ok(next);
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
            // A burst is applied together: what else is ready now, up to
            // EVENTS_PER_BATCH (each key once, read as it is now).
            let mut batch = vec![event];
            let mut ended = false;
            while batch.len() < EVENTS_PER_BATCH {
                match events.next().now_or_never() {
                    Some(Some(event)) => batch.push(event),
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            if let Some(next) = self.on_events(client, batch).await? {
                return Ok(next);
            }
            if ended {
                return Err(ZkError::SessionEnded(client.state()));
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

    /// Applies watch events in order; `Some` when one calls for a resync.
    /// Node events between two session events are applied together: each
    /// key once, its node read now (so the result is ZooKeeper's state
    /// whatever the order of the events).
    async fn on_events(
        &self,
        client: &zk::Client,
        events: Vec<zk::WatchedEvent>,
    ) -> Result<Option<Cycle>, ZkError> {
        use zk::{EventType, SessionState};
        let mut nodes: BTreeMap<Vec<u8>, String> = BTreeMap::new();
        let mut count = 0;
        for event in events {
            match event.event_type {
                EventType::Session => {
                    self.apply_events(client, std::mem::take(&mut nodes), count)
                        .await?;
                    count = 0;
                    match event.session_state {
                        SessionState::SyncConnected => {
                            info!(job = %self.job.name, "Reconnected to ZooKeeper; events may have been lost: walking the tree again.");
                            return Ok(Some(Cycle::Rewatch));
                        }
                        SessionState::Disconnected => {
                            warn!(job = %self.job.name, "Disconnected from ZooKeeper; the client reconnects.");
                        }
                        state if state.is_terminated() => return Err(ZkError::SessionEnded(state)),
                        _ => {}
                    }
                }
                EventType::NodeCreated | EventType::NodeDataChanged | EventType::NodeDeleted => {
                    if let Some(key) = self.key_of(&event.path) {
                        nodes.insert(key, event.path);
                        count += 1;
                    }
                }
                _ => {}
            }
        }
        self.apply_events(client, nodes, count).await?;
        Ok(None)
    }

    /// Reads the nodes of `nodes` (by key) and writes what differs,
    /// [`KEYS_PER_READ`] keys at a time; `events` of them applied.
    async fn apply_events(
        &self,
        client: &zk::Client,
        nodes: BTreeMap<Vec<u8>, String>,
        events: u64,
    ) -> Result<(), ZkError> {
        if nodes.is_empty() {
            return Ok(());
        }
        let nodes: Vec<(Vec<u8>, String)> = nodes.into_iter().collect();
        let mut changed: Vec<(i64, i64)> = Vec::new();
        for part in nodes.chunks(KEYS_PER_READ) {
            // Read even after a delete: the node may be back already, and
            // a delete must not rest on older evidence than that.
            let read: Vec<Result<KeyedRead, ZkError>> = futures::stream::iter(part)
                .map(|(key, path)| async move {
                    Ok((
                        key.clone(),
                        read_node(client, path, self.job.ephemeral).await?,
                    ))
                })
                .buffer_unordered(WALK_CONCURRENCY)
                .collect()
                .await;
            let mut tree = BTreeMap::new();
            for result in read {
                if let (key, Some((node, stat))) = result? {
                    changed.push((stat.mzxid, stat.mtime));
                    tree.insert(key, node);
                }
            }
            let keys: Vec<Vec<u8>> = part.iter().map(|(key, _)| key.clone()).collect();
            let (dest, owned) = self.read_keys(&keys).await?;
            let plan = plan(&tree, &dest, &owned, &BTreeSet::new());
            self.apply(&plan).await?;
        }
        let metrics = self.writer.metrics();
        metrics.events_applied_total.inc_by(events);
        // How far behind ZooKeeper: from the oldest node change of the
        // batch (the server's clock) to its write here. A delete leaves no
        // stat to time it by.
        if let Some(oldest) = changed.iter().map(|(_, mtime)| *mtime).min() {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            metrics
                .lag_seconds
                .set((now_ms - oldest).max(0) as f64 / 1000.0);
        }
        if let Some(newest) = changed.iter().map(|(mzxid, _)| *mzxid).max() {
            if newest > metrics.zk_applied_zxid.get() {
                metrics.zk_applied_zxid.set(newest);
            }
        }
        (self.beat)();
        Ok(())
    }

    /// Compares the tree with the destination and writes the difference,
    /// one subtree at a time (each prefix's node, then each of its
    /// children's subtrees, then the records of keys no subtree has), so
    /// memory holds one subtree, not the tree. Deletes wait to the end:
    /// the mass-delete guard weighs them against every key owned.
    async fn resync(
        &self,
        client: &zk::Client,
        events: &mut Events,
        pending: &mut Vec<zk::WatchedEvent>,
    ) -> Result<Diffed, ZkError> {
        let mut diffed = Diffed::default();
        let mut deletes = Vec::new();
        // Commits count what they add and remove; the reads say the rest.
        let counted_before = self.writer.metrics().zk_keys_owned.get();
        // Per prefix: its root's key and the children walked.
        let mut walked: Vec<(Vec<u8>, BTreeSet<String>)> = Vec::new();
        for prefix in &self.job.prefixes {
            let Some(root_key) = prefix.key_of(&prefix.zk) else {
                continue;
            };
            // The server this session reads from catches up with the
            // ensemble's leader first: every record was written from a
            // read committed before now, so a node older than its record
            // can only be a history that went back.
            client
                .sync(&prefix.zk)
                .await
                .map_err(zk_error("sync", &prefix.zk))?;
            let root = read_node(client, &prefix.zk, self.job.ephemeral).await?;
            let children = children_of(client, &prefix.zk, root.as_ref()).await?;
            let tree = root
                .into_iter()
                .map(|(node, _)| (root_key.clone(), node))
                .collect();
            let read = read_subtree(self.writer.dest(), &self.keys, &root_key, false).await?;
            self.diff_chunk(tree, read, events, pending, &mut diffed, &mut deletes)
                .await?;
            let mut done = BTreeSet::new();
            for child in children {
                let path = if prefix.zk == "/" {
                    format!("/{child}")
                } else {
                    format!("{}/{child}", prefix.zk)
                };
                let Some(key) = prefix.key_of(&path) else {
                    continue;
                };
                let subtree = ZkPrefix {
                    zk: path,
                    dest: key.clone(),
                    excluded: prefix.excluded.clone(),
                };
                let tree = walk(client, std::slice::from_ref(&subtree), self.job.ephemeral).await?;
                let read = read_subtree(self.writer.dest(), &self.keys, &key, true).await?;
                self.diff_chunk(tree, read, events, pending, &mut diffed, &mut deletes)
                    .await?;
                done.insert(child);
                (self.beat)();
            }
            walked.push((root_key, done));
        }
        // Records of keys no subtree read: nodes gone with their parent
        // subtree, or left out since.
        let covered = |key: &[u8]| {
            walked.iter().any(|(root, children)| {
                key == root.as_slice()
                    || child_below(root, key).is_some_and(|child| children.contains(child))
            })
        };
        let owned_prefix = self.keys.zk_owned_prefix().into_bytes();
        let mut from = Some(owned_prefix.clone());
        while let Some(start) = from.take() {
            let page = records_page(self.writer.dest(), &owned_prefix, start, true).await?;
            let left: Vec<Vec<u8>> = page
                .kvs
                .iter()
                .map(|kv| kv.key[owned_prefix.len()..].to_vec())
                .filter(|key| !covered(key))
                .collect();
            for keys in left.chunks(KEYS_PER_TXN) {
                let read = self.read_keys(keys).await?;
                self.diff_chunk(
                    BTreeMap::new(),
                    read,
                    events,
                    pending,
                    &mut diffed,
                    &mut deletes,
                )
                .await?;
            }
            from = next_page_from(&page);
        }
        let metrics = self.writer.metrics();
        if diffed.stale > 0 {
            metrics.error("zk_history_rewound");
            error!(job = %self.job.name, keys = diffed.stale, "ZooKeeper's nodes are older than what zk2etcd mirrored from them (a lower mzxid than the ownership record's, after a sync): was the ensemble restored from an older snapshot? Those keys keep etcd's values (a node older than its record is never written); see docs/operations.md (ZooKeeper to etcd) to take the restored tree as it is.");
        }
        let allowed =
            crate::model::schema::prune_allowance(diffed.owned, self.job.max_prune_ratio, 0);
        if deletes.len() as u64 > allowed {
            // The mass-delete guard: the deletes wait for an operator; puts
            // and events go on, so new registrations still arrive.
            metrics.error("prune_guard");
            error!(job = %self.job.name, deletes = deletes.len(), owned = diffed.owned, max_prune_ratio = self.job.max_prune_ratio, "A diff would delete more of the keys zk2etcd owns than --max-prune-ratio allows: those deletes are skipped (is --zk-servers the right ensemble, or was the tree emptied by mistake?); raise --max-prune-ratio to let them through.");
        } else {
            diffed.writes += deletes.len();
            self.apply(&ZkPlan {
                ops: deletes,
                ..ZkPlan::default()
            })
            .await?;
        }
        let written = metrics.zk_keys_owned.get() - counted_before;
        metrics.zk_keys_owned.set(diffed.owned as i64 + written);
        Ok(diffed)
    }

    /// Diffs one subtree (`tree`, and the destination `read` for its keys):
    /// writes its puts and forgets now, keeps its deletes for the guard.
    /// Events that arrived meanwhile are taken into `pending` first: their
    /// keys are left to them.
    async fn diff_chunk(
        &self,
        tree: BTreeMap<Vec<u8>, TreeNode>,
        (dest, owned): (DestKeys, OwnedKeys),
        events: &mut Events,
        pending: &mut Vec<zk::WatchedEvent>,
        diffed: &mut Diffed,
        deletes: &mut Vec<ZkOp>,
    ) -> Result<(), ZkError> {
        while let Some(Some(event)) = events.next().now_or_never() {
            pending.push(event);
        }
        let raced: BTreeSet<Vec<u8>> = pending
            .iter()
            .filter_map(|e| self.key_of(&e.path))
            .collect();
        self.leases.adopt_all(&dest, &owned);
        let mut plan = plan(&tree, &dest, &owned, &raced);
        diffed.chunks += 1;
        diffed.owned += owned.len() as u64;
        diffed.raced += plan.raced;
        diffed.stale += plan.stale;
        for foreign in plan
            .foreign
            .iter()
            .take(5usize.saturating_sub(diffed.foreign))
        {
            warn!(job = %self.job.name, key = %String::from_utf8_lossy(foreign), "ZooKeeper has this node, but another writer holds the key: left as it is.");
        }
        diffed.foreign += plan.foreign.len();
        let (gone, writes): (Vec<ZkOp>, Vec<ZkOp>) = std::mem::take(&mut plan.ops)
            .into_iter()
            .partition(|op| matches!(op, ZkOp::Delete { .. }));
        deletes.extend(gone);
        diffed.writes += writes.len();
        plan.ops = writes;
        self.apply(&plan).await
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
        // Distinct keys, each guarded on its own: the txns may commit in
        // any order.
        let results: Vec<Result<(), ZkError>> = futures::stream::iter(batches)
            .map(|batch| async move {
                if !self.commit(batch).await? && batch.len() > 1 {
                    for op in batch {
                        if !self.commit(std::slice::from_ref(op)).await? {
                            debug!(job = %self.job.name, key = %String::from_utf8_lossy(op.key()), "A key's guard failed: moved by another writer; left to the next diff.");
                        }
                    }
                }
                Ok(())
            })
            .buffer_unordered(APPLY_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
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
                        leased.push((record.session, lease));
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
                for (session, lease) in leased {
                    self.leases.forget(session, lease);
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

/// What one resync did, for its log line.
#[derive(Debug, Default)]
struct Diffed {
    /// Keys written or deleted.
    writes: usize,
    /// Nodes whose key another writer holds.
    foreign: usize,
    /// Keys left to an event that arrived during the walk.
    raced: usize,
    /// Keys whose record is newer than the node (after a `sync`: the
    /// ensemble's history went back).
    stale: usize,
    /// Keys owned when read.
    owned: u64,
    /// Subtrees diffed one at a time.
    chunks: usize,
}

/// One page of the job's ownership records (`records`, its prefix) from
/// `from` on.
async fn records_page(
    dest: &Cluster,
    records: &[u8],
    from: Vec<u8>,
    keys_only: bool,
) -> Result<crate::etcd::api::RangeResponse, ClientError> {
    dest.range(
        "page through zk2etcd's ownership records",
        RangeRequest {
            key: from,
            range_end: prefix_range_end(records),
            limit: RECORDS_PAGE,
            keys_only,
            ..RangeRequest::default()
        },
    )
    .await
}

/// Where the page after `page` starts (`None`: it was the last).
fn next_page_from(page: &crate::etcd::api::RangeResponse) -> Option<Vec<u8>> {
    page.kvs
        .last()
        .filter(|_| page.more)
        .map(|last| key_successor(&last.key))
}

/// Ownership records per page when a resync looks for keys no subtree had.
const RECORDS_PAGE: i64 = 5_000;

/// The destination keys of one subtree and their ownership records: the
/// key `key` (a subtree's root) and, with `below`, every key under
/// `key` + "/" (not a sibling whose name merely starts the same).
async fn read_subtree(
    dest: &Cluster,
    keys: &MetaKeys,
    key: &[u8],
    below: bool,
) -> Result<(DestKeys, OwnedKeys), ClientError> {
    let mut ranges = vec![(key.to_vec(), key_successor(key))];
    if below {
        let mut under = key.to_vec();
        if under.last() != Some(&b'/') {
            under.push(b'/');
        }
        let end = prefix_range_end(&under);
        ranges.push((under, end));
    }
    let mut entries = BTreeMap::new();
    let mut owned = BTreeMap::new();
    let records = keys.zk_owned_prefix().into_bytes();
    for (from, to) in ranges {
        for kv in read_range(dest, "read a zk2etcd subtree", from.clone(), to.clone(), 0).await? {
            entries.insert(
                kv.key,
                DestEntry {
                    value: kv.value,
                    lease: kv.lease,
                    mod_revision: kv.mod_revision,
                },
            );
        }
        let (record_from, record_to) = (
            [records.as_slice(), &from].concat(),
            [records.as_slice(), &to].concat(),
        );
        for kv in read_range(
            dest,
            "read a zk2etcd subtree's ownership records",
            record_from,
            record_to,
            0,
        )
        .await?
        {
            if let Ok(record) = serde_json::from_slice::<OwnedRecord>(&kv.value) {
                owned.insert(
                    kv.key[records.len()..].to_vec(),
                    Owned {
                        record,
                        revision: kv.mod_revision,
                    },
                );
            }
        }
    }
    Ok((entries, owned))
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

/// A node as [`read_node`] found it.
type NodeRead = (TreeNode, zk::Stat);
/// A node's key, and the node as read (`None`: gone).
type KeyedRead = (Vec<u8>, Option<NodeRead>);

/// Reads one node: its data, `mzxid` and (in lease mode) its ephemeral
/// owner, with its stat (`mtime`, ms since the epoch on the server's
/// clock; `num_children`); `None` if it is gone.
async fn read_node(
    client: &zk::Client,
    path: &str,
    mode: EphemeralMode,
) -> Result<Option<NodeRead>, ZkError> {
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
            stat,
        ))),
        Err(zk::Error::NoNode) => Ok(None),
        Err(source) => Err(ZkError::Zk {
            operation: "read",
            path: path.to_string(),
            source,
        }),
    }
}

/// The children of the node at `path`, as `read` found it: none when it
/// is gone or a leaf (most of a registry: one read, not two), else listed
/// (none if it went meanwhile).
async fn children_of(
    client: &zk::Client,
    path: &str,
    read: Option<&NodeRead>,
) -> Result<Vec<String>, ZkError> {
    if read.is_none_or(|(_, stat)| stat.num_children == 0) {
        return Ok(Vec::new());
    }
    match client.list_children(path).await {
        Ok(children) => Ok(children),
        Err(zk::Error::NoNode) => Ok(Vec::new()),
        Err(source) => Err(ZkError::Zk {
            operation: "list children of",
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
                        let read = read_node(client, &path, mode).await?;
                        let children = children_of(client, &path, read.as_ref()).await?;
                        let node = read.map(|(node, _)| node);
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
