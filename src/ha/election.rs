//! Leader election per job, on the destination.
//!
//! Each instance holds one lease (a [`Session`]) and, for every job, one key
//! under `<meta-prefix><job>/lock/` attached to it. The key with the lowest
//! create revision leads; the others wait for the key just ahead of theirs
//! to disappear. The leader's key and its create revision become the write
//! fence: once the lease expires the key is gone, so no txn of a deposed
//! leader can apply, however late it arrives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::etcd::client::{ClientError, Cluster};
use crate::model::keys::{prefix_range_end, MetaKeys};
use crate::mirror::meta::LockFence;
use crate::model::schema::{now_rfc3339, LockValue};

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
        let mut lease_client = dest.lease_client();
        let granted = dest
            .call("grant lease", async move {
                lease_client.grant(ttl_seconds, None).await
            })
            .await?;
        let lease_id = granted.id();
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
        let mut lease_client = self.dest.lease_client();
        let lease_id = self.lease_id;
        match self
            .dest
            .call("revoke lease", async move {
                lease_client.revoke(lease_id).await
            })
            .await
        {
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
        let mut lease_client = dest.lease_client();
        let opened = tokio::time::timeout(interval, lease_client.keep_alive(lease_id)).await;
        let (mut keeper, mut stream) = match opened {
            Ok(Ok(pair)) => pair,
            Ok(Err(error)) => {
                if error.to_string().contains("lease not found") {
                    break;
                }
                debug!(%error, "Lease keepalive stream failed; retrying.");
                tokio::time::sleep(interval / 3).await;
                continue;
            }
            Err(_) => continue,
        };
        last_ok = Instant::now();
        loop {
            tokio::time::sleep(interval).await;
            if keeper.keep_alive().await.is_err() {
                continue 'reconnect;
            }
            match tokio::time::timeout(interval, stream.message()).await {
                Ok(Ok(Some(response))) if response.ttl() > 0 => last_ok = Instant::now(),
                Ok(Ok(Some(_))) => break 'reconnect,
                _ => {
                    if last_ok.elapsed() >= ttl {
                        break 'reconnect;
                    }
                    continue 'reconnect;
                }
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
    let txn = Txn::new()
        .when(vec![Compare::create_revision(
            key.as_str(),
            CompareOp::Equal,
            0,
        )])
        .and_then(vec![TxnOp::put(
            key.as_str(),
            value,
            Some(PutOptions::new().with_lease(session.lease_id())),
        )])
        .or_else(vec![TxnOp::get(key.as_str(), None)]);
    let mut kv = dest.kv();
    let response = dest
        .call("queue for job lock", async move { kv.txn(txn).await })
        .await?;
    let create_revision = if response.succeeded() {
        response.header().map_or(0, |h| h.revision())
    } else {
        response
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.create_revision()),
                _ => None,
            })
            .unwrap_or(0)
    };
    let lock_prefix = keys.lock_prefix();
    loop {
        if session.lost().is_cancelled() {
            return Err(ElectionError::LeaseLost {
                lease: session.lease_id(),
            });
        }
        let options = GetOptions::new()
            .with_range(prefix_range_end(lock_prefix.as_bytes()))
            .with_max_create_revision(create_revision - 1)
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(1)
            .with_keys_only();
        let ahead = dest
            .get(
                "find the lock holder ahead",
                lock_prefix.as_bytes(),
                Some(options),
            )
            .await?;
        let Some(predecessor) = ahead.kvs().first() else {
            return Ok(Leadership {
                key,
                create_revision,
            });
        };
        let predecessor = predecessor.key().to_vec();
        let from = ahead.header().map_or(0, |h| h.revision()) + 1;
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
    let mut watch_client = dest.watch_client();
    let options = WatchOptions::new().with_start_revision(from_revision);
    let mut stream = dest
        .call("watch the lock holder ahead", async move {
            watch_client.watch(key, Some(options)).await
        })
        .await?;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Err(ElectionError::Cancelled),
            _ = session.lost().cancelled() => return Err(ElectionError::LeaseLost { lease: session.lease_id() }),
            message = stream.message() => match message {
                Ok(Some(response)) => {
                    if response.canceled() || response.events().iter().any(|e| e.event_type() == EventType::Delete) {
                        return Ok(());
                    }
                }
                // A broken watch: look again at who is ahead.
                Ok(None) | Err(_) => return Ok(()),
            },
        }
    }
}

/// Leaves the queue for one job (for rebalancing), keeping the lease.
pub async fn release(dest: &Cluster, leadership: &Leadership) -> Result<(), ElectionError> {
    let txn = Txn::new()
        .when(vec![Compare::create_revision(
            leadership.key.as_str(),
            CompareOp::Equal,
            leadership.create_revision,
        )])
        .and_then(vec![TxnOp::delete(leadership.key.as_str(), None)]);
    let mut kv = dest.kv();
    dest.call("release job lock", async move { kv.txn(txn).await })
        .await?;
    Ok(())
}

pub fn lock_key(keys: &MetaKeys, lease_id: i64) -> String {
    format!("{}{lease_id:016x}", keys.lock_prefix())
}

/// How many instances queue for a job's lock right now.
pub async fn queued_instances(dest: &Cluster, keys: &MetaKeys) -> Result<usize, ElectionError> {
    let prefix = keys.lock_prefix();
    let options = GetOptions::new()
        .with_range(prefix_range_end(prefix.as_bytes()))
        .with_count_only();
    let response = dest
        .get("count lock holders", prefix.as_bytes(), Some(options))
        .await?;
    Ok(response.count().max(0) as usize)
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

    /// Revokes the current lease, if any: every lock is released at once.
    pub async fn resign(&self) {
        if let Some(session) = self.current.lock().await.take() {
            session.resign().await;
        }
    }
}
