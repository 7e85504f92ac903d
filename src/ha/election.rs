//! Leader election per job, on the destination.
//!
//! Each instance holds one lease (a [`Session`]) and, for every job, one key
//! under `<meta-prefix><job>/lock/` attached to it. The key with the lowest
//! create revision leads; the others wait for the key just ahead of theirs
//! to disappear. The leader's key and its create revision become the write
//! fence: once the lease expires the key is gone, so no txn of a deposed
//! leader can apply, however late it arrives.

use std::sync::Arc;
use std::time::Duration;

// tokio's clock, so the simulator's paused time governs every deadline.
use tokio::time::Instant;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::etcd::api::{Compare, CompareOp, EventType, Op, RangeRequest, TxnRequest, WatchRequest};
use crate::etcd::client::{ClientError, Cluster};
use crate::mirror::meta::LockFence;
use crate::model::keys::MetaKeys;
use crate::model::schema::LockValue;
use crate::telemetry::clock::now_rfc3339;

#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("destination lease {lease:x} expired or was revoked")]
    LeaseLost { lease: i64 },
    #[error("lease keepalive failed: {0}")]
    KeepAlive(String),
    #[error("cancelled")]
    Cancelled,
}

impl ElectionError {
    /// The `errors_total{kind}` label.
    pub fn kind(&self) -> &'static str {
        match self {
            ElectionError::Client(error) => crate::mirror::client_error_kind(error),
            ElectionError::LeaseLost { .. } | ElectionError::KeepAlive(_) => "lease_lost",
            ElectionError::Cancelled => "cancelled",
        }
    }
}

/// One lease shared by every job of this instance.
pub struct Session {
    dest: Cluster,
    lease_id: i64,
    lost: CancellationToken,
    keeper: tokio::task::JoinHandle<()>,
}

impl Session {
    /// Grants a lease of `ttl` and keeps it alive in the background. The
    /// session counts as lost as soon as no keepalive has succeeded for a
    /// whole TTL, even before the destination says so: by then the lease may
    /// have expired and someone else may lead.
    pub async fn start(dest: &Cluster, ttl: Duration) -> Result<Self, ElectionError> {
        let ttl_seconds = ttl.as_secs().max(1) as i64;
        let lease_id = dest.lease_grant(ttl_seconds, 0).await?;
        let lost = CancellationToken::new();
        let keeper = tokio::spawn(keep_alive(dest.clone(), lease_id, ttl, lost.clone()));
        debug!(lease = format!("{lease_id:x}"), ?ttl, "Lease granted.");
        Ok(Self {
            dest: dest.clone(),
            lease_id,
            lost,
            keeper,
        })
    }

    pub fn lease_id(&self) -> i64 {
        self.lease_id
    }

    /// Fires when the lease is, or may be, gone.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// Revokes the lease so every lock of this instance is released at once
    /// (a rolling restart hands over without waiting out the TTL).
    pub async fn resign(&self) {
        self.keeper.abort();
        self.lost.cancel();
        let lease_id = self.lease_id;
        match self.dest.lease_revoke(lease_id).await {
            Ok(_) => info!(lease = format!("{lease_id:x}"), "Released every job lock."),
            Err(error) => {
                warn!(%error, "Could not revoke the lease; the locks expire with its TTL.")
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

async fn keep_alive(dest: Cluster, lease_id: i64, ttl: Duration, lost: CancellationToken) {
    let interval = (ttl / 3).max(Duration::from_millis(300));
    let mut last_ok = Instant::now();
    'reconnect: loop {
        if last_ok.elapsed() >= ttl {
            break;
        }
        let opened = tokio::time::timeout(interval, dest.lease_keep_alive(lease_id)).await;
        let mut keeper = match opened {
            Ok(Ok(keeper)) => keeper,
            Ok(Err(error)) => {
                // By its type (`ErrGRPCLeaseNotFound`), not its text.
                if error.is_lease_not_found() {
                    break;
                }
                debug!(%error, "Lease keepalive stream failed; retrying.");
                tokio::time::sleep(interval / 3).await;
                continue;
            }
            Err(_) => continue,
        };
        loop {
            match tokio::time::timeout(interval, keeper.keep_alive()).await {
                Ok(Ok(ttl_left)) if ttl_left > 0 => last_ok = Instant::now(),
                // The lease is gone on the server.
                Ok(Ok(_)) => break 'reconnect,
                _ => {
                    if last_ok.elapsed() >= ttl {
                        break 'reconnect;
                    }
                    continue 'reconnect;
                }
            }
            tokio::time::sleep(interval).await;
            if last_ok.elapsed() >= ttl {
                break 'reconnect;
            }
        }
    }
    warn!(
        lease = format!("{lease_id:x}"),
        "Destination lease lost: no keepalive succeeded within its TTL."
    );
    lost.cancel();
}

/// The lock key this instance holds for a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    pub key: String,
    pub create_revision: i64,
}

impl Leadership {
    pub fn fence(&self) -> LockFence {
        LockFence {
            key: self.key.clone(),
            create_revision: self.create_revision,
        }
    }
}

/// Queues for the job's lock and returns once this instance leads it.
///
/// # Cancel-Safety
/// Cancel-safe: the lock key stays queued (it goes with the lease, or with
/// [`release`]); campaigning again finds and reuses it.
pub async fn campaign(
    dest: &Cluster,
    session: &Session,
    keys: &MetaKeys,
    instance: &str,
    cancel: &CancellationToken,
) -> Result<Leadership, ElectionError> {
    let key = lock_key(keys, session.lease_id());
    let value = serde_json::to_vec(&LockValue {
        instance: instance.to_string(),
        campaigning_since: now_rfc3339(),
    })
    .expect("lock value serializes");
    let txn = TxnRequest::new()
        .when(vec![Compare::create_revision(
            key.as_bytes(),
            CompareOp::Equal,
            0,
        )])
        .and_then(vec![Op::put_with_lease(
            key.as_bytes(),
            value,
            session.lease_id(),
        )])
        .or_else(vec![Op::get(key.as_bytes())]);
    let response = dest.txn("queue for job lock", txn).await?;
    let create_revision = if response.succeeded {
        response.header.revision
    } else {
        response
            .ranges()
            .find_map(|get| get.kvs.first().map(|kv| kv.create_revision))
            .unwrap_or(0)
    };
    let lock_prefix = keys.lock_prefix();
    loop {
        if session.lost().is_cancelled() {
            return Err(ElectionError::LeaseLost {
                lease: session.lease_id(),
            });
        }
        let request = RangeRequest {
            max_create_revision: create_revision - 1,
            newest_created_first: true,
            ..RangeRequest::prefix(lock_prefix.as_bytes())
        }
        .with_limit(1)
        .keys_only();
        let ahead = dest.range("find the lock holder ahead", request).await?;
        let Some(predecessor) = ahead.kvs.first() else {
            return Ok(Leadership {
                key,
                create_revision,
            });
        };
        let predecessor = predecessor.key.clone();
        let from = ahead.header.revision + 1;
        wait_for_delete(dest, predecessor, from, session, cancel).await?;
    }
}

async fn wait_for_delete(
    dest: &Cluster,
    key: Vec<u8>,
    from_revision: i64,
    session: &Session,
    cancel: &CancellationToken,
) -> Result<(), ElectionError> {
    let request = WatchRequest {
        key,
        start_revision: from_revision,
        ..WatchRequest::default()
    };
    let mut stream = dest.watch("watch the lock holder ahead", request).await?;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Err(ElectionError::Cancelled),
            _ = session.lost().cancelled() => return Err(ElectionError::LeaseLost { lease: session.lease_id() }),
            message = stream.message() => match message {
                Ok(Some(response)) => {
                    if response.canceled || response.events.iter().any(|e| e.kind == EventType::Delete) {
                        return Ok(());
                    }
                }
                // A broken watch: look again at who is ahead.
                Ok(None) | Err(_) => return Ok(()),
            },
        }
    }
}

/// Leaves the queue of one job for good (a reload removed it): this
/// instance's lock key for the job goes, whether it led or waited.
pub async fn leave(
    dest: &Cluster,
    keys: &MetaKeys,
    session: &Session,
) -> Result<(), ElectionError> {
    let key = lock_key(keys, session.lease_id());
    dest.txn(
        "leave job lock queue",
        TxnRequest::new().and_then(vec![Op::delete(key.as_bytes())]),
    )
    .await?;
    Ok(())
}

/// Leaves the queue for one job (for rebalancing), keeping the lease.
pub async fn release(dest: &Cluster, leadership: &Leadership) -> Result<(), ElectionError> {
    let txn = TxnRequest::new()
        .when(vec![Compare::create_revision(
            leadership.key.as_bytes(),
            CompareOp::Equal,
            leadership.create_revision,
        )])
        .and_then(vec![Op::delete(leadership.key.as_bytes())]);
    dest.txn("release job lock", txn).await?;
    Ok(())
}

pub fn lock_key(keys: &MetaKeys, lease_id: i64) -> String {
    format!("{}{lease_id:016x}", keys.lock_prefix())
}

/// How many instances queue for a job's lock right now.
pub async fn queued_instances(dest: &Cluster, keys: &MetaKeys) -> Result<usize, ElectionError> {
    let prefix = keys.lock_prefix();
    let response = dest
        .range(
            "count lock holders",
            RangeRequest::prefix(prefix.as_bytes()).count_only(),
        )
        .await?;
    Ok(response.count.max(0) as usize)
}

/// Hands out a live session, starting a new one after a loss.
pub struct SessionManager {
    dest: Cluster,
    ttl: Duration,
    current: Mutex<Option<Arc<Session>>>,
}

impl SessionManager {
    pub fn new(dest: Cluster, ttl: Duration) -> Self {
        Self {
            dest,
            ttl,
            current: Mutex::new(None),
        }
    }

    pub async fn session(&self) -> Result<Arc<Session>, ElectionError> {
        let mut current = self.current.lock().await;
        if let Some(session) = current.as_ref() {
            if !session.lost().is_cancelled() {
                return Ok(session.clone());
            }
        }
        let session = Arc::new(Session::start(&self.dest, self.ttl).await?);
        *current = Some(session.clone());
        Ok(session)
    }

    /// The live session, if one was started (without starting one).
    pub async fn existing(&self) -> Option<Arc<Session>> {
        self.current
            .lock()
            .await
            .as_ref()
            .filter(|session| !session.lost().is_cancelled())
            .cloned()
    }

    /// Revokes the current lease, if any: every lock is released at once.
    pub async fn resign(&self) {
        if let Some(session) = self.current.lock().await.take() {
            session.resign().await;
        }
    }
}
