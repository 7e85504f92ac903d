//! The narrow interface between the replicator and etcd.
//!
//! Only what the replicator relies on, as plain data: ranges (at a revision,
//! paged, counted), txns with compares, watches with progress and compaction
//! responses, and leases. [`super::client::RealEtcd`] implements it over
//! `etcd-client`; [`super::memory::MemoryEtcd`] is the in-memory etcd model
//! the simulator runs on. Errors are `etcd_client::Error` in both, so one
//! classification ([`super::client::classify`]) serves the real cluster and
//! the model, and the model returns the same gRPC codes and messages etcd does.

use futures::future::BoxFuture;

pub type EtcdResult<T> = Result<T, etcd_client::Error>;

/// A key as etcd stores it (`mvccpb.KeyValue`); plain data, so the model
/// layer compares it too.
pub use crate::model::kv::KeyValue;

/// The response header fields the replicator reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub cluster_id: u64,
    /// The store revision when the request was served.
    pub revision: i64,
}

/// `RangeRequest`: one key (`range_end` empty), or `[key, range_end)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangeRequest {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    /// 0 reads the latest revision.
    pub revision: i64,
    /// 0 means no limit.
    pub limit: i64,
    pub count_only: bool,
    pub keys_only: bool,
    /// 0 means no filter; otherwise only keys created at or before it.
    pub max_create_revision: i64,
    /// 0 means no filter; otherwise only keys last written at or after it.
    /// Like etcd, filters thin out `kvs` but not `count`.
    pub min_mod_revision: i64,
    /// Sort by create revision, newest first (the election's "who is ahead of me").
    pub newest_created_first: bool,
}

impl RangeRequest {
    pub fn key(key: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            ..Self::default()
        }
    }

    /// Every key starting with `prefix`.
    pub fn prefix(prefix: &[u8]) -> Self {
        Self {
            key: crate::model::keys::prefix_range_start(prefix),
            range_end: crate::model::keys::prefix_range_end(prefix),
            ..Self::default()
        }
    }

    pub fn at_revision(mut self, revision: i64) -> Self {
        self.revision = revision;
        self
    }

    pub fn with_limit(mut self, limit: i64) -> Self {
        self.limit = limit;
        self
    }

    pub fn count_only(mut self) -> Self {
        self.count_only = true;
        self
    }

    pub fn keys_only(mut self) -> Self {
        self.keys_only = true;
        self
    }

    /// Only keys last written at or after `revision`.
    pub fn with_min_mod_revision(mut self, revision: i64) -> Self {
        self.min_mod_revision = revision;
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangeResponse {
    pub header: Header,
    /// Empty when `count_only`.
    pub kvs: Vec<KeyValue>,
    /// More keys remain past `limit`.
    pub more: bool,
    /// Keys in the whole range (ignoring `limit`).
    pub count: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    Version(i64),
    CreateRevision(i64),
    ModRevision(i64),
    Value(Vec<u8>),
}

/// One txn condition on one key, or on every key of a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: Vec<u8>,
    pub op: CompareOp,
    pub target: CompareTarget,
    /// Empty: `key` alone. Else every live key of `[key, range_end)` must
    /// hold the condition (as etcd, an empty range compares a missing key).
    pub range_end: Vec<u8>,
}

impl Compare {
    pub fn version(key: impl Into<Vec<u8>>, op: CompareOp, version: i64) -> Self {
        Self {
            key: key.into(),
            op,
            target: CompareTarget::Version(version),
            range_end: Vec::new(),
        }
    }

    pub fn create_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: i64) -> Self {
        Self {
            key: key.into(),
            op,
            target: CompareTarget::CreateRevision(revision),
            range_end: Vec::new(),
        }
    }

    pub fn mod_revision(key: impl Into<Vec<u8>>, op: CompareOp, revision: i64) -> Self {
        Self {
            key: key.into(),
            op,
            target: CompareTarget::ModRevision(revision),
            range_end: Vec::new(),
        }
    }

    pub fn value(key: impl Into<Vec<u8>>, op: CompareOp, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            op,
            target: CompareTarget::Value(value.into()),
            range_end: Vec::new(),
        }
    }

    /// The same condition on every key of `[key, range_end)`.
    pub fn over_range(mut self, range_end: impl Into<Vec<u8>>) -> Self {
        self.range_end = range_end.into();
        self
    }
}

/// One operation of a txn branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Range(RangeRequest),
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        /// 0 for no lease.
        lease: i64,
    },
    /// One key (`range_end` empty) or `[key, range_end)`.
    Delete {
        key: Vec<u8>,
        range_end: Vec<u8>,
    },
}

impl Op {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }

    pub fn put_with_lease(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, lease: i64) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }
    }

    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Op::Delete {
            key: key.into(),
            range_end: Vec::new(),
        }
    }

    pub fn get(key: impl Into<Vec<u8>>) -> Self {
        Op::Range(RangeRequest::key(key))
    }

    /// Request bytes this op adds, as etcd counts them against
    /// `--max-request-bytes` (keys and values; framing is small).
    pub fn encoded_len(&self) -> usize {
        match self {
            Op::Range(range) => range.key.len() + range.range_end.len(),
            Op::Put { key, value, .. } => key.len() + value.len(),
            Op::Delete { key, range_end } => key.len() + range_end.len(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl TxnRequest {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn when(mut self, compare: Vec<Compare>) -> Self {
        self.compare = compare;
        self
    }

    pub fn and_then(mut self, success: Vec<Op>) -> Self {
        self.success = success;
        self
    }

    pub fn or_else(mut self, failure: Vec<Op>) -> Self {
        self.failure = failure;
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResponse {
    Range(RangeResponse),
    Put,
    Delete { deleted: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnResponse {
    pub header: Header,
    pub succeeded: bool,
    pub responses: Vec<OpResponse>,
}

impl TxnResponse {
    /// The range results, in order (other op kinds skipped).
    pub fn ranges(&self) -> impl Iterator<Item = &RangeResponse> {
        self.responses.iter().filter_map(|r| match r {
            OpResponse::Range(range) => Some(range),
            _ => None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchRequest {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    /// 0 watches from the next revision.
    pub start_revision: i64,
    pub progress_notify: bool,
    pub fragment: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventType,
    /// For a delete: the key, with `mod_revision` the deleting revision.
    pub kv: KeyValue,
}

/// One message on a watch stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchResponse {
    pub header: Header,
    pub created: bool,
    pub canceled: bool,
    /// Set on cancel when the start revision is compacted.
    pub compact_revision: i64,
    pub cancel_reason: String,
    /// More events of the same revision follow in the next message.
    pub fragment: bool,
    pub events: Vec<Event>,
}

/// An open watch.
pub trait WatchStream: Send {
    /// The next message; `Ok(None)` when the server closed the stream.
    ///
    /// # Cancel-Safety
    /// Cancel-safe in both implementations: a message not yet returned stays queued.
    fn message(&mut self) -> BoxFuture<'_, EtcdResult<Option<WatchResponse>>>;

    /// Asks for a progress notification (an empty response whose header
    /// revision says how far the stream has got).
    fn request_progress(&mut self) -> BoxFuture<'_, EtcdResult<()>>;
}

/// Keeps one lease alive.
pub trait LeaseKeeper: Send {
    /// One keepalive round trip; returns the remaining TTL, 0 when the lease is gone.
    fn keep_alive(&mut self) -> BoxFuture<'_, EtcdResult<i64>>;
}

/// A lease as `LeaseTimeToLive` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTtl {
    /// The TTL it was granted with, in seconds.
    pub granted: i64,
    /// Seconds left before it expires.
    pub remaining: i64,
}

/// What the replicator needs of a cluster. The source side uses `range` and
/// `watch`; the destination side `range`, `txn`, `watch` (the election) and
/// the lease calls.
pub trait Etcd: Send + Sync {
    fn range(&self, request: RangeRequest) -> BoxFuture<'_, EtcdResult<RangeResponse>>;
    fn txn(&self, request: TxnRequest) -> BoxFuture<'_, EtcdResult<TxnResponse>>;
    fn watch(&self, request: WatchRequest) -> BoxFuture<'_, EtcdResult<Box<dyn WatchStream>>>;
    /// Grants a lease of `ttl` seconds; `id` 0 lets the server choose.
    /// Returns the granted id.
    fn lease_grant(&self, ttl: i64, id: i64) -> BoxFuture<'_, EtcdResult<i64>>;
    fn lease_keep_alive(&self, id: i64) -> BoxFuture<'_, EtcdResult<Box<dyn LeaseKeeper>>>;
    fn lease_revoke(&self, id: i64) -> BoxFuture<'_, EtcdResult<()>>;
    /// Every live lease (`LeaseLeases`), with the header it was read under.
    fn lease_list(&self) -> BoxFuture<'_, EtcdResult<(Header, Vec<i64>)>>;
    /// `LeaseTimeToLive` without the attached keys (which would need read
    /// permission on each); `None` when the lease does not exist.
    fn lease_time_to_live(&self, id: i64) -> BoxFuture<'_, EtcdResult<Option<LeaseTtl>>>;
    /// One keepalive round trip on a stream of its own: true when renewed,
    /// false when the lease does not exist (etcd answers TTL 0).
    fn lease_renew(&self, id: i64) -> BoxFuture<'_, EtcdResult<bool>>;
    /// Compacts the store's history below `revision` (`Compact`; no
    /// revision moves). A revision already compacted fails as etcd does.
    fn compact(&self, revision: i64) -> BoxFuture<'_, EtcdResult<()>>;
    /// The server's version string (e.g. "3.5.1"). May be refused to a
    /// user without root from etcd 3.4.42 / 3.5.28 on, with auth enabled.
    fn server_version(&self) -> BoxFuture<'_, EtcdResult<String>>;
}
