//! The in-memory etcd model: the semantics the replicator relies on, small
//! enough to read, so the simulator can run thousands of fault schedules on
//! paused time.
//!
//! Each rule copies etcd (v3.4/3.5 `server/mvcc`, `etcdserver/apply.go`):
//! - The store revision starts at 1 and moves by one per txn that changes
//!   state: every put (even of the same value), and a delete that removed a
//!   key. A txn whose compares fail, or that only reads, does not move it.
//!   Every change of a txn carries that one revision (`mvcc/kvstore_txn.go`).
//! - A key's `create_revision`, `mod_revision` and `version` follow the
//!   `mvccpb.KeyValue` rules: a delete ends the key's generation, so a later
//!   put starts at version 1 with a new create revision.
//! - Compares: a missing key has version, create and mod revision 0, and a
//!   value compare on it is false (`apply.go: applyCompare`).
//! - Limits: more than `max_txn_ops` ops in any branch is "too many
//!   operations in txn request"; a request over `max_request_bytes` is
//!   "request is too large"; a branch that writes one key twice is
//!   "duplicate key given in txn request". All `InvalidArgument`.
//! - Range at a revision below the compaction revision is
//!   `ErrCompacted` ("required revision has been compacted", `OutOfRange`);
//!   above the current revision is `ErrFutureRev`.
//! - Watch: events of one revision are delivered together, in op order;
//!   with `fragment` a revision with many events is split into responses
//!   marked `fragment` except the last. A watch whose start revision is below
//!   the compaction revision is created and then canceled with
//!   `compact_revision` set (`mvcc/watchable_store.go`). A progress request
//!   is answered with an empty response whose header revision is the store
//!   revision, after every event at or below it (the behaviour etcd has from
//!   3.4.25 / 3.5.8 on).
//! - Leases: a client may choose the ID (`LeaseGrant` with `ID`); a lease that
//!   expires or is revoked deletes all its keys in one revision; a put with
//!   a lease that does not exist fails with "requested lease not found";
//!   a keepalive of a missing lease answers TTL 0.
//!
//! A [`MemoryEtcd`] is one client's view of a [`Store`] through a [`Link`]
//! that can inject faults: delay (so txns sent back to back can be applied
//! out of order), a request dropped before it is applied, a response lost
//! after it was applied, a partition, and a freeze that holds requests until
//! it thaws (a paused process, or a link proxy holding traffic). A txn once
//! sent is applied by its own task, so it can land after the caller gave up
//! on it, as a real request on the wire can.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::etcd::api::{
    Compare, CompareOp, CompareTarget, Etcd, EtcdResult, Event, EventType, Header, KeyValue,
    LeaseKeeper, LeaseTtl, Op, OpResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
    WatchRequest, WatchResponse, WatchStream,
};
use crate::etcd::rpctypes::{self, ServerError};

/// etcd's defaults: `--max-txn-ops` 128, `--max-request-bytes` 1.5 MiB.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;

fn status(code: Code, message: &str) -> etcd_client::Error {
    etcd_client::Error::GRpcStatus(Status::new(code, message))
}

/// etcd's own error, as its server sends it.
fn server_error(error: ServerError) -> etcd_client::Error {
    etcd_client::Error::GRpcStatus(rpctypes::status_of(error))
}

fn unavailable() -> etcd_client::Error {
    status(Code::Unavailable, "transport is closing (simulated)")
}

#[derive(Debug, Clone)]
struct Version {
    mod_revision: i64,
    /// `None` for a delete (a tombstone).
    kv: Option<KeyValue>,
}

#[derive(Debug, Clone)]
struct Lease {
    ttl: i64,
    expires_at: Instant,
    keys: BTreeSet<Vec<u8>>,
}

struct Watcher {
    id: u64,
    key: Vec<u8>,
    range_end: Vec<u8>,
    fragment: bool,
    tx: mpsc::UnboundedSender<WatchResponse>,
}

/// One committed change of the store, for the simulator's invariants.
#[derive(Debug, Clone)]
pub struct CommitRecord {
    pub revision: i64,
    /// The link (client) that made it; `"lease-expiry"` for an expiry.
    pub by: String,
    pub events: Vec<Event>,
    /// The lease whose end (a revoke, or its expiry) deleted these keys:
    /// etcd cannot fence a revoke in a txn, so the simulator judges those
    /// deletions by what they delete.
    pub lease_end: Option<i64>,
}

/// One etcd cluster's state.
pub struct Store {
    cluster_id: u64,
    revision: i64,
    compact_revision: i64,
    keys: BTreeMap<Vec<u8>, Vec<Version>>,
    leases: BTreeMap<i64, Lease>,
    next_lease_id: i64,
    /// Lease requests served, by kind ("grant", "list", "ttl", "renew",
    /// "revoke"): what the replicator's lease bookkeeping costs.
    pub lease_requests: BTreeMap<&'static str, u64>,
    watchers: Vec<Watcher>,
    next_watcher_id: u64,
    /// Events per revision, for watches that start in the past.
    log: BTreeMap<i64, Vec<Event>>,
    pub max_txn_ops: usize,
    pub max_request_bytes: usize,
    /// Events per watch response when fragmenting.
    pub fragment_events: usize,
    /// Reproduce etcd-io/etcd#18089 (etcd before 3.4.36 / 3.5.18): a watch
    /// that starts exactly at the compaction revision does not get a DELETE
    /// made at that revision.
    pub loses_delete_at_compaction: bool,
    /// What `server_version` answers; `None` refuses it (no root, auth on).
    pub version: Option<String>,
    commits: Vec<CommitRecord>,
    /// Range requests served (paging, heads, txn reads excluded), so tests
    /// can tell a re-scan from a poll.
    pub reads: u64,
    /// Keys every range request walked: etcd visits every key from a
    /// request's start to its range end to count them, whatever the limit,
    /// so this is what paging costs the server.
    pub walked: u64,
    /// When each lease was granted and ended, and the revision at each
    /// instant a commit happened: what a lagging member's lessor and store
    /// showed a while ago (see [`Faults::lagging`]).
    lease_times: BTreeMap<i64, (Instant, Option<Instant>)>,
    revision_times: Vec<(Instant, i64)>,
}

impl Store {
    pub fn new(cluster_id: u64) -> Self {
        Self {
            cluster_id,
            revision: 1,
            compact_revision: 0,
            keys: BTreeMap::new(),
            leases: BTreeMap::new(),
            next_lease_id: 0x1000,
            lease_requests: BTreeMap::new(),
            watchers: Vec::new(),
            next_watcher_id: 1,
            log: BTreeMap::new(),
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            fragment_events: 4,
            loses_delete_at_compaction: false,
            version: Some("3.5.1".into()),
            commits: Vec::new(),
            reads: 0,
            walked: 0,
            lease_times: BTreeMap::new(),
            revision_times: Vec::new(),
        }
    }

    /// A new cluster `cluster_id` restored from a snapshot of this one (as
    /// `etcdctl snapshot restore` does): the same keys with their history
    /// back to the compaction, the same revision and leases, each lease
    /// alive for its TTL from `now` (etcd refreshes them when a leader is
    /// elected); no watchers, no commit records.
    pub fn restore(&self, cluster_id: u64, now: Instant) -> Self {
        let mut restored = Self::new(cluster_id);
        restored.revision = self.revision;
        restored.compact_revision = self.compact_revision;
        restored.keys = self.keys.clone();
        restored.log = self.log.clone();
        restored.next_lease_id = self.next_lease_id;
        restored.leases = self
            .leases
            .iter()
            .map(|(id, lease)| {
                let mut lease = lease.clone();
                lease.expires_at = now + Duration::from_secs(lease.ttl.max(1) as u64);
                (*id, lease)
            })
            .collect();
        for id in restored.leases.keys() {
            restored.lease_times.insert(*id, (now, None));
        }
        restored.max_txn_ops = self.max_txn_ops;
        restored.max_request_bytes = self.max_request_bytes;
        restored.fragment_events = self.fragment_events;
        restored.version = self.version.clone();
        restored
    }

    /// The leases a member lagging `lag` behind lists now, with the
    /// revision it has applied: what the store held `lag` ago. etcd answers
    /// `LeaseLeases` from whichever member receives it, from its own lessor.
    fn lease_list_lagging(&self, now: Instant, lag: Duration) -> (Header, Vec<i64>) {
        let Some(then) = now.checked_sub(lag) else {
            return (self.header(), Vec::new());
        };
        let revision = self
            .revision_times
            .iter()
            .rev()
            .find(|(at, _)| *at <= then)
            .map_or(1, |(_, revision)| *revision);
        let ids = self
            .lease_times
            .iter()
            .filter(|(_, (granted, ended))| *granted <= then && ended.is_none_or(|e| e > then))
            .map(|(id, _)| *id)
            .collect();
        (
            Header {
                cluster_id: self.cluster_id,
                revision,
            },
            ids,
        )
    }

    fn header(&self) -> Header {
        Header {
            cluster_id: self.cluster_id,
            revision: self.revision,
        }
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    pub fn compact_revision(&self) -> i64 {
        self.compact_revision
    }

    /// Every key at `revision`, compaction ignored: the simulator's oracle.
    pub fn state_at(&self, revision: i64) -> BTreeMap<Vec<u8>, KeyValue> {
        self.keys
            .iter()
            .filter_map(|(key, versions)| {
                live_at(versions, revision).map(|kv| (key.clone(), kv.clone()))
            })
            .collect()
    }

    pub fn current(&self) -> BTreeMap<Vec<u8>, KeyValue> {
        self.state_at(self.revision)
    }

    /// Changes since the last call, oldest first.
    pub fn take_commits(&mut self) -> Vec<CommitRecord> {
        std::mem::take(&mut self.commits)
    }

    /// Compacts history at `revision` (ranges below it fail from now on).
    pub fn compact(&mut self, revision: i64) {
        let revision = revision.min(self.revision);
        if revision <= self.compact_revision {
            return;
        }
        self.compact_revision = revision;
        self.log = self.log.split_off(&revision);
    }

    /// Renews lease `id` as a client's keepalive would (tests).
    pub fn renew_for_test(&mut self, id: i64, now: Instant) -> bool {
        self.keep_alive(id, now) > 0
    }

    /// The granted TTL of lease `id`, if it is alive at `Instant::now()` (tests).
    pub fn lease_ttl_for_test(&mut self, id: i64) -> Option<i64> {
        self.expire_leases(Instant::now());
        self.leases.get(&id).map(|lease| lease.ttl)
    }

    pub fn lease_ids(&self) -> Vec<i64> {
        self.leases.keys().copied().collect()
    }

    fn range(&self, request: &RangeRequest) -> EtcdResult<RangeResponse> {
        self.range_up_to(request, self.revision)
    }

    /// A range whose newest readable revision is `head` (inside a txn, the
    /// txn's own revision, so its reads see its earlier writes).
    fn range_up_to(&self, request: &RangeRequest, head: i64) -> EtcdResult<RangeResponse> {
        let revision = if request.revision > 0 {
            request.revision
        } else {
            head
        };
        if revision < self.compact_revision {
            return Err(server_error(ServerError::Compacted));
        }
        if revision > head {
            return Err(server_error(ServerError::FutureRevision));
        }
        let mut kvs: Vec<KeyValue> = self
            .keys_in(&request.key, &request.range_end)
            .filter_map(|(_, versions)| live_at(versions, revision).cloned())
            .collect();
        // etcd counts the range before its revision filters prune `kvs`
        // (etcdserver's applier sets `Count` from the unfiltered range).
        let count = kvs.len() as i64;
        kvs.retain(|kv| {
            (request.max_create_revision == 0 || kv.create_revision <= request.max_create_revision)
                && (request.min_mod_revision == 0 || kv.mod_revision >= request.min_mod_revision)
        });
        if request.newest_created_first {
            kvs.sort_by_key(|kv| std::cmp::Reverse(kv.create_revision));
        }
        let limit = if request.limit > 0 {
            request.limit as usize
        } else {
            usize::MAX
        };
        let more = kvs.len() > limit;
        kvs.truncate(limit);
        if request.count_only {
            kvs.clear();
        } else if request.keys_only {
            for kv in &mut kvs {
                kv.value.clear();
            }
        }
        Ok(RangeResponse {
            header: self.header(),
            kvs,
            more,
            count,
        })
    }

    fn keys_in<'a>(
        &'a self,
        key: &'a [u8],
        range_end: &'a [u8],
    ) -> impl Iterator<Item = (&'a Vec<u8>, &'a Vec<Version>)> + 'a {
        self.keys
            .range(key.to_vec()..)
            .take_while(move |(k, _)| in_range(k, key, range_end))
    }

    fn live(&self, key: &[u8]) -> Option<&KeyValue> {
        self.keys.get(key).and_then(|v| live_at(v, self.revision))
    }

    fn compare(&self, compare: &Compare) -> bool {
        if !compare.range_end.is_empty() {
            // etcd: every live key of the range holds it; none, and the
            // condition is judged on a missing key.
            let live: Vec<&KeyValue> = self
                .keys_in(&compare.key, &compare.range_end)
                .filter_map(|(_, versions)| live_at(versions, self.revision))
                .collect();
            if live.is_empty() {
                return self.compare_one(compare, None);
            }
            return live
                .into_iter()
                .all(|kv| self.compare_one(compare, Some(kv)));
        }
        self.compare_one(compare, self.live(&compare.key))
    }

    fn compare_one(&self, compare: &Compare, kv: Option<&KeyValue>) -> bool {
        let ordering = match (&compare.target, kv) {
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(value), Some(kv)) => kv.value.as_slice().cmp(value.as_slice()),
            (CompareTarget::Version(v), kv) => kv.map_or(0, |kv| kv.version).cmp(v),
            (CompareTarget::CreateRevision(r), kv) => kv.map_or(0, |kv| kv.create_revision).cmp(r),
            (CompareTarget::ModRevision(r), kv) => kv.map_or(0, |kv| kv.mod_revision).cmp(r),
        };
        match compare.op {
            CompareOp::Equal => ordering.is_eq(),
            CompareOp::NotEqual => ordering.is_ne(),
            CompareOp::Greater => ordering.is_gt(),
            CompareOp::Less => ordering.is_lt(),
        }
    }

    fn check_limits(&self, request: &TxnRequest) -> EtcdResult<()> {
        if request.compare.len() > self.max_txn_ops
            || request.success.len() > self.max_txn_ops
            || request.failure.len() > self.max_txn_ops
        {
            return Err(server_error(ServerError::TooManyOps));
        }
        let bytes: usize = request
            .success
            .iter()
            .chain(&request.failure)
            .map(Op::encoded_len)
            .sum::<usize>()
            + request
                .compare
                .iter()
                .map(|c| {
                    c.key.len()
                        + match &c.target {
                            CompareTarget::Value(v) => v.len(),
                            _ => 8,
                        }
                })
                .sum::<usize>();
        if bytes > self.max_request_bytes {
            return Err(server_error(ServerError::RequestTooLarge));
        }
        for branch in [&request.success, &request.failure] {
            let mut written = BTreeSet::new();
            for op in branch.iter() {
                let key = match op {
                    Op::Put { key, .. } => key,
                    Op::Delete { key, range_end } if range_end.is_empty() => key,
                    _ => continue,
                };
                if !written.insert(key.clone()) {
                    return Err(status(
                        Code::InvalidArgument,
                        "etcdserver: duplicate key given in txn request",
                    ));
                }
            }
        }
        Ok(())
    }

    fn txn(&mut self, request: &TxnRequest, by: &str) -> EtcdResult<TxnResponse> {
        self.check_limits(request)?;
        let succeeded = request.compare.iter().all(|c| self.compare(c));
        let ops = if succeeded {
            &request.success
        } else {
            &request.failure
        };
        for op in ops {
            if let Op::Put { lease, .. } = op {
                if *lease != 0 && !self.leases.contains_key(lease) {
                    return Err(server_error(ServerError::LeaseNotFound));
                }
            }
        }
        let next = self.revision + 1;
        let mut events = Vec::new();
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Range(range) => {
                    // A read at a revision is served at that revision; a
                    // read of the latest sees the txn's earlier writes.
                    let head = if events.is_empty() {
                        self.revision
                    } else {
                        next
                    };
                    let mut view = self.range_up_to(range, head)?;
                    view.header.revision = next;
                    responses.push(OpResponse::Range(view));
                }
                Op::Put { key, value, lease } => {
                    let previous = self.live(key).cloned();
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: previous.as_ref().map_or(next, |p| p.create_revision),
                        mod_revision: next,
                        version: previous.as_ref().map_or(1, |p| p.version + 1),
                        lease: *lease,
                    };
                    if let Some(previous) = &previous {
                        if previous.lease != 0 && previous.lease != *lease {
                            if let Some(old) = self.leases.get_mut(&previous.lease) {
                                old.keys.remove(key);
                            }
                        }
                    }
                    if *lease != 0 {
                        if let Some(new) = self.leases.get_mut(lease) {
                            new.keys.insert(key.clone());
                        }
                    }
                    self.keys.entry(key.clone()).or_default().push(Version {
                        mod_revision: next,
                        kv: Some(kv.clone()),
                    });
                    events.push(Event {
                        kind: EventType::Put,
                        kv,
                    });
                    responses.push(OpResponse::Put);
                }
                Op::Delete { key, range_end } => {
                    let doomed: Vec<Vec<u8>> = if range_end.is_empty() {
                        self.live(key)
                            .map(|kv| kv.key.clone())
                            .into_iter()
                            .collect()
                    } else {
                        self.keys_in(key, range_end)
                            .filter(|(_, v)| live_at(v, self.revision).is_some())
                            .map(|(k, _)| k.clone())
                            .collect()
                    };
                    for key in &doomed {
                        events.push(self.delete_key(key, next));
                    }
                    responses.push(OpResponse::Delete {
                        deleted: doomed.len() as i64,
                    });
                }
            }
        }
        if !events.is_empty() {
            self.commit(next, events, by, None);
        }
        Ok(TxnResponse {
            header: self.header(),
            succeeded,
            responses,
        })
    }

    fn delete_key(&mut self, key: &[u8], revision: i64) -> Event {
        let previous = self.live(key).cloned().unwrap_or_default();
        if previous.lease != 0 {
            if let Some(lease) = self.leases.get_mut(&previous.lease) {
                lease.keys.remove(key);
            }
        }
        self.keys.entry(key.to_vec()).or_default().push(Version {
            mod_revision: revision,
            kv: None,
        });
        Event {
            kind: EventType::Delete,
            kv: KeyValue {
                key: key.to_vec(),
                mod_revision: revision,
                ..KeyValue::default()
            },
        }
    }

    fn commit(&mut self, revision: i64, events: Vec<Event>, by: &str, lease_end: Option<i64>) {
        self.revision_times.push((Instant::now(), revision));
        self.revision = revision;
        self.log.insert(revision, events.clone());
        for watcher in &self.watchers {
            send_events(
                watcher,
                revision,
                &events,
                self.cluster_id,
                self.fragment_events,
            );
        }
        self.commits.push(CommitRecord {
            revision,
            by: by.to_string(),
            events,
            lease_end,
        });
    }

    fn watch(&mut self, request: &WatchRequest) -> (u64, mpsc::UnboundedReceiver<WatchResponse>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_watcher_id;
        self.next_watcher_id += 1;
        let created = WatchResponse {
            header: self.header(),
            created: true,
            ..WatchResponse::default()
        };
        let _ = tx.send(created);
        let watcher = Watcher {
            id,
            key: request.key.clone(),
            range_end: request.range_end.clone(),
            fragment: request.fragment,
            tx,
        };
        let start = request.start_revision;
        if start > 0 && start < self.compact_revision {
            let _ = watcher.tx.send(WatchResponse {
                header: self.header(),
                canceled: true,
                compact_revision: self.compact_revision,
                cancel_reason: "mvcc: required revision has been compacted".into(),
                ..WatchResponse::default()
            });
            return (id, rx);
        }
        if start > 0 {
            for (revision, events) in self.log.range(start..) {
                let lost_delete = self.loses_delete_at_compaction
                    && start == self.compact_revision
                    && *revision == self.compact_revision;
                let kept: Vec<Event>;
                let events = if lost_delete {
                    kept = events
                        .iter()
                        .filter(|e| e.kind != EventType::Delete)
                        .cloned()
                        .collect();
                    &kept
                } else {
                    events
                };
                send_events(
                    &watcher,
                    *revision,
                    events,
                    self.cluster_id,
                    self.fragment_events,
                );
            }
        }
        self.watchers.push(watcher);
        (id, rx)
    }

    fn progress(&self, watcher_id: u64) {
        if let Some(watcher) = self.watchers.iter().find(|w| w.id == watcher_id) {
            let _ = watcher.tx.send(WatchResponse {
                header: self.header(),
                ..WatchResponse::default()
            });
        }
    }

    fn grant(&mut self, ttl: i64, id: i64, now: Instant) -> EtcdResult<i64> {
        // etcd picks IDs that are never handed out twice.
        let id = if id == 0 {
            while self.leases.contains_key(&self.next_lease_id) {
                self.next_lease_id += 1;
            }
            self.next_lease_id += 1;
            self.next_lease_id - 1
        } else {
            id
        };
        if self.leases.contains_key(&id) {
            return Err(server_error(ServerError::LeaseExists));
        }
        self.leases.insert(
            id,
            Lease {
                ttl,
                expires_at: now + Duration::from_secs(ttl.max(1) as u64),
                keys: BTreeSet::new(),
            },
        );
        self.lease_times.insert(id, (now, None));
        Ok(id)
    }

    fn keep_alive(&mut self, id: i64, now: Instant) -> i64 {
        match self.leases.get_mut(&id) {
            Some(lease) => {
                lease.expires_at = now + Duration::from_secs(lease.ttl.max(1) as u64);
                lease.ttl
            }
            None => 0,
        }
    }

    fn revoke(&mut self, id: i64, by: &str) -> EtcdResult<()> {
        let Some(lease) = self.leases.remove(&id) else {
            return Err(server_error(ServerError::LeaseNotFound));
        };
        if let Some((_, ended)) = self.lease_times.get_mut(&id) {
            *ended = Some(Instant::now());
        }
        if lease.keys.is_empty() {
            return Ok(());
        }
        let next = self.revision + 1;
        let events: Vec<Event> = lease
            .keys
            .iter()
            .map(|key| self.delete_key(key, next))
            .collect();
        self.commit(next, events, by, Some(id));
        Ok(())
    }

    /// Revokes every lease whose TTL ran out by `now`.
    pub fn expire_leases(&mut self, now: Instant) {
        let due: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let _ = self.revoke(id, "lease-expiry");
        }
    }
}

fn live_at(versions: &[Version], revision: i64) -> Option<&KeyValue> {
    versions
        .iter()
        .rev()
        .find(|v| v.mod_revision <= revision)
        .and_then(|v| v.kv.as_ref())
}

/// `[key, range_end)` as etcd reads it: an empty end is the key alone, `"\0"` is everything from key on.
fn in_range(candidate: &[u8], key: &[u8], range_end: &[u8]) -> bool {
    if range_end.is_empty() {
        return candidate == key;
    }
    candidate >= key && (range_end == [0] || candidate < range_end)
}

fn send_events(
    watcher: &Watcher,
    revision: i64,
    events: &[Event],
    cluster_id: u64,
    fragment_events: usize,
) {
    let mine: Vec<Event> = events
        .iter()
        .filter(|e| in_range(&e.kv.key, &watcher.key, &watcher.range_end))
        .cloned()
        .collect();
    if mine.is_empty() {
        return;
    }
    let header = Header {
        cluster_id,
        revision,
    };
    // etcd fragments by bytes; a count makes fragments common in tests.
    let chunk = if watcher.fragment {
        fragment_events.max(1)
    } else {
        usize::MAX
    };
    let pieces: Vec<&[Event]> = mine.chunks(chunk.min(mine.len())).collect();
    let last = pieces.len() - 1;
    for (i, piece) in pieces.into_iter().enumerate() {
        let _ = watcher.tx.send(WatchResponse {
            header,
            fragment: i < last,
            events: piece.to_vec(),
            ..WatchResponse::default()
        });
    }
}

/// Faults on one client's connection to one store.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Each request waits a random time in this range before it is applied,
    /// and again before its response returns.
    pub delay: (Duration, Duration),
    /// Probability that a request is lost before it is applied (it never answers).
    pub drop_request: f64,
    /// Probability that a response is lost after the request was applied.
    pub lose_response: f64,
    /// Requests never answer; open watches fail.
    pub partitioned: bool,
    /// Requests wait until the freeze ends, then go on.
    pub frozen: bool,
    /// The member this client talks to lags this far behind the leader:
    /// its `LeaseLeases` lists the leases of that long ago (leader-answered
    /// requests such as `LeaseTimeToLive` are current).
    pub lagging: Duration,
}

/// One client's connection: its faults and a seeded random source.
pub struct Link {
    name: String,
    faults: Mutex<Faults>,
    rng: Mutex<StdRng>,
    /// Bumped when the connection breaks; streams of an older epoch fail.
    epoch: watch::Sender<u64>,
    /// Bumped when the faults change, to wake held requests; each
    /// [`Link::set_faults`] returns the value it set.
    changed: watch::Sender<u64>,
}

impl Link {
    pub fn new(name: impl Into<String>, seed: u64) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            faults: Mutex::new(Faults::default()),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            epoch: watch::channel(0).0,
            changed: watch::channel(0).0,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }

    /// Replaces the faults. Starting a partition breaks open streams.
    /// Returns the faults' generation, for [`Link::set_faults_if`].
    pub fn set_faults(&self, faults: Faults) -> u64 {
        let mut current = lock(&self.faults);
        let breaks = faults.partitioned && !current.partitioned;
        *current = faults;
        drop(current);
        if breaks {
            self.break_streams();
        }
        let mut generation = 0;
        self.changed.send_modify(|v| {
            *v += 1;
            generation = *v;
        });
        generation
    }

    /// Replaces the faults only if nothing replaced them since the
    /// [`Link::set_faults`] that returned `generation`: a timer undoes only
    /// the fault it set. Returns whether it did.
    pub fn set_faults_if(&self, generation: u64, faults: Faults) -> bool {
        if *self.changed.borrow() != generation {
            return false;
        }
        self.set_faults(faults);
        true
    }

    /// Closes every open watch and keepalive stream (a reset connection).
    pub fn break_streams(&self) {
        self.epoch.send_modify(|v| *v += 1);
    }

    fn chance(&self, probability: f64) -> bool {
        probability > 0.0 && lock(&self.rng).gen_bool(probability.min(1.0))
    }

    fn delay(&self) -> Duration {
        let (low, high) = lock(&self.faults).delay;
        if high <= low {
            return low;
        }
        let span = (high - low).as_micros() as u64;
        low + Duration::from_micros(lock(&self.rng).gen_range(0..=span))
    }

    /// Waits out a freeze; never returns while partitioned.
    async fn pass(&self) {
        let mut changed = self.changed.subscribe();
        loop {
            let faults = self.faults();
            if !faults.frozen && !faults.partitioned {
                return;
            }
            if changed.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Before a request reaches the store.
    async fn send(&self) {
        tokio::time::sleep(self.delay()).await;
        self.pass().await;
        if self.chance(self.faults().drop_request) {
            std::future::pending::<()>().await;
        }
    }

    /// After the store answered.
    async fn answer<T>(&self, result: EtcdResult<T>) -> EtcdResult<T> {
        tokio::time::sleep(self.delay()).await;
        self.pass().await;
        if self.chance(self.faults().lose_response) {
            return Err(unavailable());
        }
        result
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a test failure already; keep going.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A shared store.
pub type SharedStore = Arc<Mutex<Store>>;

pub fn new_store(cluster_id: u64) -> SharedStore {
    Arc::new(Mutex::new(Store::new(cluster_id)))
}

/// One client of a store, through a link. Implements [`Etcd`].
#[derive(Clone)]
pub struct MemoryEtcd {
    store: SharedStore,
    link: Arc<Link>,
}

impl MemoryEtcd {
    pub fn new(store: SharedStore, link: Arc<Link>) -> Self {
        Self { store, link }
    }

    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let mut store = lock(&self.store);
        store.expire_leases(Instant::now());
        f(&mut store)
    }
}

impl Etcd for MemoryEtcd {
    fn range(&self, request: RangeRequest) -> BoxFuture<'_, EtcdResult<RangeResponse>> {
        async move {
            self.link.send().await;
            let result = self.with_store(|store| {
                store.reads += 1;
                let response = store.range(&request);
                if let Ok(response) = &response {
                    store.walked += response.count.max(0) as u64;
                }
                response
            });
            self.link.answer(result).await
        }
        .boxed()
    }

    fn txn(&self, request: TxnRequest) -> BoxFuture<'_, EtcdResult<TxnResponse>> {
        // Once sent, the txn is on the wire: it may apply even if the caller
        // stops waiting.
        let (answer, answered) = oneshot::channel();
        let client = self.clone();
        tokio::spawn(async move {
            client.link.send().await;
            let by = client.link.name().to_string();
            let result = client.with_store(|store| store.txn(&request, &by));
            let _ = answer.send(client.link.answer(result).await);
        });
        async move {
            match answered.await {
                Ok(result) => result,
                Err(_) => std::future::pending().await,
            }
        }
        .boxed()
    }

    fn watch(&self, request: WatchRequest) -> BoxFuture<'_, EtcdResult<Box<dyn WatchStream>>> {
        async move {
            self.link.send().await;
            let epoch = *self.link.epoch.borrow();
            let (id, rx) = self.with_store(|store| store.watch(&request));
            let stream = MemoryWatch {
                client: self.clone(),
                id,
                rx,
                held: None,
                epoch,
                broken: self.link.epoch.subscribe(),
            };
            self.link
                .answer(Ok(Box::new(stream) as Box<dyn WatchStream>))
                .await
        }
        .boxed()
    }

    fn lease_grant(&self, ttl: i64, id: i64) -> BoxFuture<'_, EtcdResult<i64>> {
        async move {
            self.link.send().await;
            let result = self.with_store(|store| {
                *store.lease_requests.entry("grant").or_default() += 1;
                store.grant(ttl, id, Instant::now())
            });
            self.link.answer(result).await
        }
        .boxed()
    }

    fn lease_keep_alive(&self, id: i64) -> BoxFuture<'_, EtcdResult<Box<dyn LeaseKeeper>>> {
        async move {
            self.link.send().await;
            let keeper = MemoryKeeper {
                client: self.clone(),
                id,
                epoch: *self.link.epoch.borrow(),
            };
            self.link
                .answer(Ok(Box::new(keeper) as Box<dyn LeaseKeeper>))
                .await
        }
        .boxed()
    }

    fn server_version(&self) -> BoxFuture<'_, EtcdResult<String>> {
        async move {
            self.link.send().await;
            let version = self.with_store(|store| store.version.clone());
            let result = version.ok_or_else(|| server_error(ServerError::PermissionDenied));
            self.link.answer(result).await
        }
        .boxed()
    }

    fn compact(&self, revision: i64) -> BoxFuture<'_, EtcdResult<()>> {
        async move {
            self.link.send().await;
            let result = self.with_store(|store| {
                if revision <= store.compact_revision() {
                    return Err(server_error(ServerError::Compacted));
                }
                if revision > store.revision() {
                    return Err(server_error(ServerError::FutureRevision));
                }
                store.compact(revision);
                Ok(())
            });
            self.link.answer(result).await
        }
        .boxed()
    }

    fn lease_revoke(&self, id: i64) -> BoxFuture<'_, EtcdResult<()>> {
        async move {
            self.link.send().await;
            let by = self.link.name().to_string();
            let result = self.with_store(|store| {
                *store.lease_requests.entry("revoke").or_default() += 1;
                store.revoke(id, &by)
            });
            self.link.answer(result).await
        }
        .boxed()
    }

    fn lease_list(&self) -> BoxFuture<'_, EtcdResult<(Header, Vec<i64>)>> {
        async move {
            self.link.send().await;
            let lag = self.link.faults().lagging;
            let result = self.with_store(|store| {
                *store.lease_requests.entry("list").or_default() += 1;
                Ok(if lag.is_zero() {
                    (store.header(), store.lease_ids())
                } else {
                    store.lease_list_lagging(Instant::now(), lag)
                })
            });
            self.link.answer(result).await
        }
        .boxed()
    }

    fn lease_time_to_live(&self, id: i64) -> BoxFuture<'_, EtcdResult<Option<LeaseTtl>>> {
        async move {
            self.link.send().await;
            let now = Instant::now();
            let result = self.with_store(|store| {
                *store.lease_requests.entry("ttl").or_default() += 1;
                Ok(store.leases.get(&id).map(|lease| LeaseTtl {
                    granted: lease.ttl,
                    remaining: lease.expires_at.saturating_duration_since(now).as_secs() as i64,
                }))
            });
            self.link.answer(result).await
        }
        .boxed()
    }

    fn lease_renew(&self, id: i64) -> BoxFuture<'_, EtcdResult<bool>> {
        async move {
            self.link.send().await;
            let result = self.with_store(|store| {
                *store.lease_requests.entry("renew").or_default() += 1;
                Ok(store.keep_alive(id, Instant::now()) > 0)
            });
            self.link.answer(result).await
        }
        .boxed()
    }
}

struct MemoryWatch {
    client: MemoryEtcd,
    id: u64,
    rx: mpsc::UnboundedReceiver<WatchResponse>,
    /// Taken off the channel but held by a frozen link: kept here so that
    /// dropping `message()` mid-wait loses nothing (cancel safety).
    held: Option<Option<WatchResponse>>,
    epoch: u64,
    broken: watch::Receiver<u64>,
}

impl MemoryWatch {
    fn is_broken(&self) -> bool {
        *self.broken.borrow() != self.epoch
    }
}

impl Drop for MemoryWatch {
    fn drop(&mut self) {
        let id = self.id;
        lock(&self.client.store).watchers.retain(|w| w.id != id);
    }
}

impl WatchStream for MemoryWatch {
    fn message(&mut self) -> BoxFuture<'_, EtcdResult<Option<WatchResponse>>> {
        async move {
            loop {
                if self.is_broken() {
                    return Err(unavailable());
                }
                if self.held.is_some() {
                    // Held while the link is frozen, like bytes in a proxy.
                    tokio::select! {
                        changed = self.broken.changed() => {
                            if changed.is_err() {
                                return Err(unavailable());
                            }
                            continue;
                        }
                        () = self.client.link.pass() => {}
                    }
                    if self.is_broken() {
                        return Err(unavailable());
                    }
                    return Ok(self.held.take().expect("checked"));
                }
                tokio::select! {
                    changed = self.broken.changed() => {
                        if changed.is_err() {
                            return Err(unavailable());
                        }
                    }
                    message = self.rx.recv() => self.held = Some(message),
                }
            }
        }
        .boxed()
    }

    fn request_progress(&mut self) -> BoxFuture<'_, EtcdResult<()>> {
        async move {
            if self.is_broken() {
                return Err(unavailable());
            }
            let id = self.id;
            self.client.with_store(|store| store.progress(id));
            Ok(())
        }
        .boxed()
    }
}

struct MemoryKeeper {
    client: MemoryEtcd,
    id: i64,
    epoch: u64,
}

impl LeaseKeeper for MemoryKeeper {
    fn keep_alive(&mut self) -> BoxFuture<'_, EtcdResult<i64>> {
        async move {
            if *self.client.link.epoch.borrow() != self.epoch {
                return Err(unavailable());
            }
            self.client.link.send().await;
            let id = self.id;
            let ttl = self
                .client
                .with_store(|store| store.keep_alive(id, Instant::now()));
            self.client.link.answer(Ok(ttl)).await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(store: &SharedStore) -> MemoryEtcd {
        MemoryEtcd::new(store.clone(), Link::new("test", 1))
    }

    fn put(key: &str, value: &str) -> TxnRequest {
        TxnRequest::new().and_then(vec![Op::put(key, value)])
    }

    #[tokio::test(start_paused = true)]
    async fn revisions_move_only_when_state_changes() {
        let store = new_store(7);
        let etcd = client(&store);
        let r = etcd.txn(put("/a", "1")).await.unwrap();
        assert_eq!(r.header.revision, 2);
        // Same value again: still a new revision, version 2.
        let r = etcd.txn(put("/a", "1")).await.unwrap();
        assert_eq!(r.header.revision, 3);
        // Deleting a missing key and a failed compare change nothing.
        let r = etcd
            .txn(TxnRequest::new().and_then(vec![Op::delete("/zzz")]))
            .await
            .unwrap();
        assert_eq!(r.header.revision, 3);
        let failed = TxnRequest::new()
            .when(vec![Compare::version("/a", CompareOp::Equal, 0)])
            .and_then(vec![Op::put("/b", "x")]);
        let r = etcd.txn(failed).await.unwrap();
        assert!(!r.succeeded);
        assert_eq!(r.header.revision, 3);
        let got = etcd.range(RangeRequest::key("/a")).await.unwrap();
        assert_eq!(got.kvs[0].version, 2);
        assert_eq!(got.kvs[0].create_revision, 2);
        assert_eq!(got.kvs[0].mod_revision, 3);
    }

    /// A compare over a range holds when every live key of it holds it;
    /// an empty range is judged as a missing key (etcd's `applyCompare`).
    #[tokio::test(start_paused = true)]
    async fn range_compares_hold_for_every_key() {
        let store = new_store(7);
        let etcd = client(&store);
        etcd.txn(put("/p/a", "1")).await.unwrap();
        etcd.txn(put("/p/b", "2")).await.unwrap();
        let before = store.lock().unwrap().revision();
        etcd.txn(put("/q/c", "3")).await.unwrap();
        let unchanged = |from: &str, to: &str| {
            TxnRequest::new().when(vec![Compare::mod_revision(
                from,
                CompareOp::Less,
                before + 1,
            )
            .over_range(to)])
        };
        assert!(etcd.txn(unchanged("/p/", "/p0")).await.unwrap().succeeded);
        assert!(
            !etcd.txn(unchanged("/", "/r")).await.unwrap().succeeded,
            "/q/c is newer"
        );
        assert!(
            etcd.txn(unchanged("/x/", "/x0")).await.unwrap().succeeded,
            "empty range"
        );
        etcd.txn(put("/p/b", "changed")).await.unwrap();
        assert!(!etcd.txn(unchanged("/p/", "/p0")).await.unwrap().succeeded);
    }

    #[tokio::test(start_paused = true)]
    async fn compares_on_a_missing_key_follow_etcd() {
        let store = new_store(7);
        let etcd = client(&store);
        let on_missing = |target: CompareTarget| {
            TxnRequest::new().when(vec![Compare {
                key: b"/none".to_vec(),
                op: CompareOp::Equal,
                target,
                range_end: Vec::new(),
            }])
        };
        assert!(
            etcd.txn(on_missing(CompareTarget::Version(0)))
                .await
                .unwrap()
                .succeeded
        );
        assert!(
            etcd.txn(on_missing(CompareTarget::CreateRevision(0)))
                .await
                .unwrap()
                .succeeded
        );
        assert!(
            !etcd
                .txn(on_missing(CompareTarget::Value(Vec::new())))
                .await
                .unwrap()
                .succeeded
        );
    }

    #[tokio::test(start_paused = true)]
    async fn limits_and_duplicates_are_rejected() {
        let store = new_store(7);
        store.lock().unwrap().max_txn_ops = 2;
        let etcd = client(&store);
        let many =
            TxnRequest::new().and_then(vec![Op::put("a", ""), Op::put("b", ""), Op::put("c", "")]);
        let error = etcd.txn(many).await.unwrap_err().to_string();
        assert!(error.contains("too many operations"), "{error}");
        let dup = TxnRequest::new().and_then(vec![Op::put("a", "1"), Op::delete("a")]);
        let error = etcd.txn(dup).await.unwrap_err().to_string();
        assert!(error.contains("duplicate key"), "{error}");
        store.lock().unwrap().max_request_bytes = 10;
        let big = TxnRequest::new().and_then(vec![Op::put("a", "0123456789abcdef")]);
        let error = etcd.txn(big).await.unwrap_err().to_string();
        assert!(error.contains("too large"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn compaction_and_history() {
        let store = new_store(7);
        let etcd = client(&store);
        etcd.txn(put("/a", "1")).await.unwrap(); // 2
        etcd.txn(put("/a", "2")).await.unwrap(); // 3
        store.lock().unwrap().compact(3);
        let old = etcd.range(RangeRequest::key("/a").at_revision(2)).await;
        let error = old.unwrap_err();
        assert_eq!(
            crate::etcd::client::classify(&error),
            crate::etcd::FailureKind::Compacted
        );
        let at3 = etcd
            .range(RangeRequest::key("/a").at_revision(3))
            .await
            .unwrap();
        assert_eq!(at3.kvs[0].value, b"2");
        // The oracle still knows.
        assert_eq!(
            store.lock().unwrap().state_at(2)[b"/a".as_slice()].value,
            b"1"
        );
        // A watch from before the compaction is canceled with its revision.
        let mut watch = etcd
            .watch(WatchRequest {
                key: b"/a".to_vec(),
                start_revision: 2,
                ..WatchRequest::default()
            })
            .await
            .unwrap();
        assert!(watch.message().await.unwrap().unwrap().created);
        let canceled = watch.message().await.unwrap().unwrap();
        assert!(canceled.canceled);
        assert_eq!(canceled.compact_revision, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn watch_replays_whole_revisions_fragments_and_progress() {
        let store = new_store(7);
        let etcd = client(&store);
        let many: Vec<Op> = (0..10).map(|i| Op::put(format!("/p/{i}"), "v")).collect();
        etcd.txn(TxnRequest::new().and_then(many)).await.unwrap(); // 2
        etcd.txn(put("/q", "outside")).await.unwrap(); // 3
        let mut watch = etcd
            .watch(WatchRequest {
                key: b"/p/".to_vec(),
                range_end: b"/p0".to_vec(),
                start_revision: 1,
                fragment: true,
                progress_notify: true,
            })
            .await
            .unwrap();
        assert!(watch.message().await.unwrap().unwrap().created);
        let mut events = 0;
        loop {
            let response = watch.message().await.unwrap().unwrap();
            assert_eq!(response.header.revision, 2);
            events += response.events.len();
            if !response.fragment {
                break;
            }
        }
        assert_eq!(events, 10);
        watch.request_progress().await.unwrap();
        let progress = watch.message().await.unwrap().unwrap();
        assert!(progress.events.is_empty());
        assert_eq!(progress.header.revision, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_compaction_revision_bug_can_be_reproduced() {
        let store = new_store(7);
        store.lock().unwrap().loses_delete_at_compaction = true;
        let etcd = client(&store);
        etcd.txn(put("/a", "1")).await.unwrap(); // 2
        etcd.txn(TxnRequest::new().and_then(vec![Op::delete("/a")]))
            .await
            .unwrap(); // 3
        store.lock().unwrap().compact(3);
        let mut watch = etcd
            .watch(WatchRequest {
                key: b"/a".to_vec(),
                start_revision: 3,
                ..WatchRequest::default()
            })
            .await
            .unwrap();
        assert!(watch.message().await.unwrap().unwrap().created);
        watch.request_progress().await.unwrap();
        let next = watch.message().await.unwrap().unwrap();
        assert!(
            next.events.is_empty(),
            "the delete at 3 is lost, as in etcd#18089"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn leases_expire_in_one_revision() {
        let store = new_store(7);
        let etcd = client(&store);
        let id = etcd.lease_grant(5, 0x42).await.unwrap();
        assert_eq!(id, 0x42);
        assert!(etcd.lease_grant(5, 0x42).await.is_err(), "IDs are unique");
        let put_leased = TxnRequest::new().and_then(vec![
            Op::put_with_lease("/a", "1", id),
            Op::put_with_lease("/b", "1", id),
        ]);
        etcd.txn(put_leased).await.unwrap();
        let missing = TxnRequest::new().and_then(vec![Op::put_with_lease("/c", "1", 0x99)]);
        assert!(etcd.txn(missing).await.is_err());
        let mut keeper = etcd.lease_keep_alive(id).await.unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(keeper.keep_alive().await.unwrap(), 5);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(
            etcd.range(RangeRequest::prefix(b"/")).await.unwrap().count,
            2
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let revision_before = store.lock().unwrap().revision();
        let after = etcd.range(RangeRequest::prefix(b"/")).await.unwrap();
        assert_eq!(after.count, 0);
        assert_eq!(
            after.header.revision,
            revision_before + 1,
            "one revision for both keys"
        );
        assert_eq!(keeper.keep_alive().await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sent_txn_lands_even_when_its_caller_gives_up() {
        let store = new_store(7);
        let link = Link::new("frozen", 1);
        let etcd = MemoryEtcd::new(store.clone(), link.clone());
        link.set_faults(Faults {
            frozen: true,
            ..Faults::default()
        });
        let attempt =
            tokio::time::timeout(Duration::from_secs(1), etcd.txn(put("/late", "x"))).await;
        assert!(attempt.is_err(), "held while frozen");
        assert_eq!(store.lock().unwrap().revision(), 1);
        link.set_faults(Faults::default());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            store.lock().unwrap().revision(),
            2,
            "applied after the thaw"
        );
    }
}
