//! Source leases as a test's "instances": granted in bulk, keys attached to
//! them, and one task renewing all of them over keepalive streams (one
//! stream per lease, all renewed in one pass per period), so a test can stop
//! renewing some and watch their keys expire.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{Client, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

/// Grants `count` leases of `ttl` seconds, up to 64 grants in flight.
pub async fn grant_leases(client: &Client, count: usize, ttl: i64) -> Result<Vec<i64>> {
    use futures::{StreamExt, TryStreamExt};
    futures::stream::iter(0..count)
        .map(|_| {
            let mut client = client.clone();
            async move { Ok::<i64, anyhow::Error>(client.lease_grant(ttl, None).await?.id()) }
        })
        .buffered(64)
        .try_collect()
        .await
}

/// Puts `(key, value, lease)` triples in txns of up to 100 puts.
pub async fn put_leased(client: &mut Client, entries: &[(String, String, i64)]) -> Result<()> {
    for chunk in entries.chunks(100) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|(key, value, lease)| {
                let options = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
                TxnOp::put(key.as_str(), value.as_str(), options)
            })
            .collect();
        client.txn(Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

/// Every key under `prefix`, with the lease it is attached to (0: none)
/// and its create revision: key → (value, lease, create revision).
pub async fn leased_keys(
    client: &mut Client,
    prefix: &str,
) -> Result<HashMap<String, (Vec<u8>, i64, i64)>> {
    let mut kv = client
        .kv_client()
        .max_decoding_message_size(256 * 1024 * 1024);
    let response = kv
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    Ok(response
        .kvs()
        .iter()
        .filter(|kv| !kv.key().starts_with(crate::META_PREFIX.as_bytes()))
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                (kv.value().to_vec(), kv.lease(), kv.create_revision()),
            )
        })
        .collect())
}

/// The granted TTL of `lease`, or `None` when it does not exist.
pub async fn granted_ttl(client: &mut Client, lease: i64) -> Result<Option<i64>> {
    let response = client.lease_time_to_live(lease, None).await?;
    Ok((response.ttl() > 0 || response.granted_ttl() > 0).then(|| response.granted_ttl()))
}

/// One task keeping a set of leases alive.
pub struct LeaseRenewer {
    alive: Arc<Mutex<BTreeSet<i64>>>,
    renewals: Arc<AtomicU64>,
    cancel: CancellationToken,
}

impl LeaseRenewer {
    /// Renews every lease in `leases` once per `period` (a third of the TTL
    /// or less) until stopped or dropped.
    pub fn start(client: Client, leases: &[i64], period: Duration) -> Self {
        let alive = Arc::new(Mutex::new(leases.iter().copied().collect::<BTreeSet<_>>()));
        let renewals = Arc::new(AtomicU64::new(0));
        let cancel = CancellationToken::new();
        tokio::spawn(renew_loop(
            client,
            alive.clone(),
            renewals.clone(),
            period,
            cancel.clone(),
        ));
        Self {
            alive,
            renewals,
            cancel,
        }
    }

    /// Renews `leases` too from the next pass on.
    pub fn add(&self, leases: &[i64]) {
        self.alive
            .lock()
            .expect("lease set")
            .extend(leases.iter().copied());
    }

    /// Stops renewing `leases` (their keys expire after the TTL).
    pub fn release(&self, leases: &[i64]) {
        let mut alive = self.alive.lock().expect("lease set");
        for lease in leases {
            alive.remove(lease);
        }
    }

    /// Stops renewing anything.
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Keepalive requests answered so far.
    pub fn renewals(&self) -> u64 {
        self.renewals.load(Ordering::Relaxed)
    }
}

impl Drop for LeaseRenewer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

type KeepAlive = (LeaseKeeper, LeaseKeepAliveStream);

async fn renew_loop(
    client: Client,
    alive: Arc<Mutex<BTreeSet<i64>>>,
    renewals: Arc<AtomicU64>,
    period: Duration,
    cancel: CancellationToken,
) {
    use futures::StreamExt;
    let mut streams: HashMap<i64, KeepAlive> = HashMap::new();
    loop {
        let wanted: BTreeSet<i64> = alive.lock().expect("lease set").clone();
        // Dropping a stream stops its lease's renewals.
        streams.retain(|lease, _| wanted.contains(lease));
        let missing: Vec<i64> = wanted
            .iter()
            .filter(|lease| !streams.contains_key(lease))
            .copied()
            .collect();
        // Opening a stream sends its first keepalive and reads the answer:
        // that is this pass's renewal of the lease.
        let opened: Vec<(i64, Result<KeepAlive, etcd_client::Error>)> =
            futures::stream::iter(missing)
                .map(|lease| {
                    let mut client = client.clone();
                    async move { (lease, client.lease_keep_alive(lease).await) }
                })
                .buffer_unordered(64)
                .collect()
                .await;
        let fresh: BTreeSet<i64> = opened
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(lease, _)| *lease)
            .collect();
        for (lease, stream) in opened {
            if let Ok(stream) = stream {
                renewals.fetch_add(1, Ordering::Relaxed);
                streams.insert(lease, stream);
            }
        }
        // Every request first, then every answer: one pass, not one round trip per lease.
        let mut broken = BTreeSet::new();
        for (lease, (keeper, _)) in streams.iter_mut() {
            if !fresh.contains(lease) && keeper.keep_alive().await.is_err() {
                broken.insert(*lease);
            }
        }
        for (lease, (_, stream)) in streams.iter_mut() {
            if fresh.contains(lease) || broken.contains(lease) {
                continue;
            }
            match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                Ok(Ok(Some(_))) => {
                    renewals.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    broken.insert(*lease);
                }
            }
        }
        for lease in broken {
            streams.remove(&lease);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// The destination lease recorded for `source_lease` by job `job`.
pub async fn lease_record(
    dest: &mut Client,
    job: &str,
    source_lease: i64,
) -> Result<Option<serde_json::Value>> {
    let key = format!("{}{job}/leases/{:016x}", crate::META_PREFIX, source_lease);
    let response = dest.get(key, None).await?;
    match response.kvs().first() {
        Some(kv) => Ok(Some(
            serde_json::from_slice(kv.value()).context("lease record JSON")?,
        )),
        None => Ok(None),
    }
}

/// How many lease records job `job` has on the destination.
pub async fn lease_record_count(dest: &mut Client, job: &str) -> Result<usize> {
    let response = dest
        .get(
            format!("{}{job}/leases/", crate::META_PREFIX),
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?;
    Ok(response.count() as usize)
}
