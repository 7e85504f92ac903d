//! Reading a prefix page by page, in key order, ahead of the consumer.
//!
//! The full sync and the consistency checker both walk a source and a
//! destination prefix side by side; a pager per side keeps the next page in
//! flight while the merge works on the current one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::Retryable;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::etcd::api::RangeRequest;
use crate::etcd::client::{ClientError, Cluster};
use crate::model::diff::{Difference, Entry, SortedMerge, Step};
use crate::model::keys::{
    key_successor, prefix_range_end, prefix_range_start, zk2etcd_registry, KeyRewrite, MetaKeys,
};
use crate::model::side::Side;

#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("range reader stopped before the end of the prefix")]
    StoppedEarly,
    /// A page came from another cluster than the one the read is pinned
    /// to (replaced behind the same endpoints): its revisions are not the pin's.
    #[error("a page was answered by cluster {answered:x}, not the pinned cluster {pinned:x}")]
    OtherCluster { pinned: u64, answered: u64 },
    #[error("cancelled")]
    Cancelled,
}

/// Keys per page of [`read_range`].
const RANGE_PAGE: i64 = 5_000;

/// Every key of `[key, range_end)` with its metadata, in key order, read
/// page by page at one revision: `revision`, or (0) the first page's.
pub async fn read_range(
    cluster: &Cluster,
    operation: &'static str,
    key: Vec<u8>,
    range_end: Vec<u8>,
    revision: i64,
) -> Result<Vec<crate::model::kv::KeyValue>, ClientError> {
    let mut keys = Vec::new();
    let mut from = key;
    let mut revision = revision;
    loop {
        let page = cluster
            .range(
                operation,
                RangeRequest {
                    key: from.clone(),
                    range_end: range_end.clone(),
                    revision,
                    limit: RANGE_PAGE,
                    ..RangeRequest::default()
                },
            )
            .await?;
        revision = page.header.revision;
        let Some(last) = page.kvs.last() else {
            return Ok(keys);
        };
        from = key_successor(&last.key);
        let more = page.more;
        keys.extend(page.kvs);
        if !more {
            return Ok(keys);
        }
    }
}

/// A page of entries, or `Ok(None)` once the prefix is exhausted.
pub type PageResult = Result<Option<Vec<Entry>>, PageError>;

/// # Cancel-Safety
/// Cancel-safe: a page not yet received stays in the channel.
pub async fn next_page(
    pages: &mut mpsc::Receiver<PageResult>,
    cancel: &CancellationToken,
) -> PageResult {
    // Cancellation first: a pager stopped by the same cancellation closes
    // its channel, which must read as "cancelled", not "stopped early".
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(PageError::Cancelled),
        page = pages.recv() => match page {
            Some(page) => page,
            None if cancel.is_cancelled() => Err(PageError::Cancelled),
            // A pager that stopped without saying "end" must never look like
            // an exhausted prefix: that would turn every later key into a delete.
            None => Err(PageError::StoppedEarly),
        },
    }
}

/// The keys a pager leaves out: the meta prefix, and the job's excluded
/// ranges; and whether it marks the keys another writer holds.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub meta_prefix: Vec<u8>,
    pub rewrite: KeyRewrite,
    /// (A destination read.) Mark each key a zk2etcd job on this
    /// destination holds ([`Entry::held`]): see [`mark_held`].
    pub mark_held: bool,
}

/// What one pager read, for the full sync's trace and the check's report:
/// where time goes (range reads vs waiting for the consumer) and how many
/// bytes crossed the link.
#[derive(Debug, Default)]
pub struct PagerStats {
    pages: AtomicU64,
    keys: AtomicU64,
    /// Keys plus values of every entry read, skipped ones included.
    bytes: AtomicU64,
    /// Time spent in range requests (retries included).
    read_nanos: AtomicU64,
}

/// A snapshot of [`PagerStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PagerTotals {
    pub pages: u64,
    pub keys: u64,
    pub bytes: u64,
    pub read_time: Duration,
}

impl PagerStats {
    pub fn totals(&self) -> PagerTotals {
        PagerTotals {
            pages: self.pages.load(Ordering::Relaxed),
            keys: self.keys.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            read_time: Duration::from_nanos(self.read_nanos.load(Ordering::Relaxed)),
        }
    }
}

/// Reads `prefix` at `revision` (or the latest) page by page in key order,
/// one page ahead of the merge (the channel holds two pages, which bounds
/// memory). Each request ends at a window of about a page
/// ([`window_end`]), so that etcd's count of the range walks a page, not
/// the rest of the prefix. Keys under the meta prefix, and keys the job excludes
/// (`exclude-prefixes`, per `rewrite`, by suffix below `prefix`) are
/// skipped: they are never copied, compared or pruned.
pub fn spawn_pager(
    job: String,
    cluster: Cluster,
    prefix: Vec<u8>,
    revision: Option<i64>,
    page_size: usize,
    skipped: Skipped,
    cancel: CancellationToken,
) -> mpsc::Receiver<PageResult> {
    spawn_pager_with_stats(
        job,
        cluster,
        prefix,
        (revision, None),
        page_size,
        skipped,
        Arc::default(),
        cancel,
    )
}

/// [`spawn_pager`], counting what it reads into `stats`; `pin` is the
/// revision and, when given, the cluster every page must come from.
#[allow(clippy::too_many_arguments)]
pub fn spawn_pager_with_stats(
    job: String,
    cluster: Cluster,
    prefix: Vec<u8>,
    pin: (Option<i64>, Option<u64>),
    page_size: usize,
    skipped: Skipped,
    stats: Arc<PagerStats>,
    cancel: CancellationToken,
) -> mpsc::Receiver<PageResult> {
    pager(
        job, cluster, prefix, pin, page_size, skipped, stats, false, None, cancel,
    )
}

/// [`spawn_pager`] without values (every entry's value is empty), from
/// `from` (a key under `prefix`) on: what a reader of keys and their
/// metadata only needs, at a fraction of the bytes.
#[allow(clippy::too_many_arguments)]
pub fn spawn_keys_pager(
    job: String,
    cluster: Cluster,
    prefix: Vec<u8>,
    from: Vec<u8>,
    revision: i64,
    page_size: usize,
    skipped: Skipped,
    cancel: CancellationToken,
) -> mpsc::Receiver<PageResult> {
    pager(
        job,
        cluster,
        prefix,
        (Some(revision), None),
        page_size,
        skipped,
        Arc::default(),
        true,
        Some(from),
        cancel,
    )
}

#[allow(clippy::too_many_arguments)]
fn pager(
    job: String,
    cluster: Cluster,
    prefix: Vec<u8>,
    pin: (Option<i64>, Option<u64>),
    page_size: usize,
    skipped: Skipped,
    stats: Arc<PagerStats>,
    keys_only: bool,
    from: Option<Vec<u8>>,
    cancel: CancellationToken,
) -> mpsc::Receiver<PageResult> {
    let Skipped {
        meta_prefix,
        rewrite,
        mark_held: marking,
    } = skipped;
    let (revision, pinned_cluster) = pin;
    let (pages, receiver) = mpsc::channel(2);
    tokio::spawn(async move {
        let end = prefix_range_end(&prefix);
        let mut start = from
            .filter(|from| from.starts_with(&prefix))
            .unwrap_or_else(|| prefix_range_start(&prefix));
        // The end of the window being read (`None`: the prefix end), and
        // what it has returned so far; see [`window_end`].
        let mut window: Option<Vec<u8>> = None;
        let mut window_start = start.clone();
        let mut window_keys = 0u64;
        // Keys left to the prefix end, from the last count over it (exact
        // at a pinned revision, a hint otherwise): near the end, one
        // request to the end is cheaper than windows over empty key space.
        let mut remaining: Option<u64> = None;
        let target = window_target(page_size);
        loop {
            let bound = window.clone().unwrap_or_else(|| end.clone());
            let request = RangeRequest {
                key: start.clone(),
                range_end: bound.clone(),
                revision: revision.unwrap_or(0),
                limit: page_size as i64,
                keys_only,
                ..RangeRequest::default()
            };
            let read = || {
                let request = request.clone();
                let cluster = cluster.clone();
                async move { cluster.range("read page", request).await }
            };
            // tokio's clock would stand still in the paused-time simulator;
            // this is only a measurement, so the wall clock is the right one.
            let read_started = std::time::Instant::now();
            let response = tokio::select! {
                _ = cancel.cancelled() => return,
                response = read
                    .retry(crate::etcd::retry::Policy::PAGE_READ.builder())
                    .when(|e: &ClientError| e.is_retryable())
                    .notify(|error, delay| warn!(%job, %error, retry_in = ?delay, "Page read failed; retrying.")) => response,
            };
            let response = match response {
                Ok(response) => response,
                Err(error) => {
                    let _ = pages.send(Err(PageError::from(error))).await;
                    return;
                }
            };
            let answered = response.header.cluster_id;
            if let Some(pinned) =
                pinned_cluster.filter(|p| *p != 0 && answered != 0 && *p != answered)
            {
                let _ = pages
                    .send(Err(PageError::OtherCluster { pinned, answered }))
                    .await;
                return;
            }
            stats
                .read_nanos
                .fetch_add(read_started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            stats.pages.fetch_add(1, Ordering::Relaxed);
            stats
                .keys
                .fetch_add(response.kvs.len() as u64, Ordering::Relaxed);
            stats.bytes.fetch_add(
                response
                    .kvs
                    .iter()
                    .map(|kv| (kv.key.len() + kv.value.len()) as u64)
                    .sum(),
                Ordering::Relaxed,
            );
            let more = response.more;
            let kvs = response.kvs;
            remaining = if window.is_none() {
                Some((response.count.max(0) as u64).saturating_sub(kvs.len() as u64))
            } else {
                remaining.map(|r| r.saturating_sub(kvs.len() as u64))
            };
            // Where the next request starts, and the first and last key of
            // this page (for the density the next window is sized by).
            let span = kvs
                .first()
                .zip(kvs.last())
                .map(|(first, last)| (first.key.clone(), last.key.clone()));
            window_keys += kvs.len() as u64;
            if !kvs.is_empty() {
                let mut entries: Vec<Entry> = kvs
                    .into_iter()
                    .filter(|kv| {
                        !kv.key.starts_with(&meta_prefix)
                            && !rewrite.is_excluded_suffix(&kv.key[prefix.len()..])
                    })
                    .map(|kv| entry_below(prefix.len(), kv))
                    .collect();
                if marking && !entries.is_empty() {
                    let mark = || {
                        let (cluster, entries) = (cluster.clone(), entries.clone());
                        let (meta_prefix, prefix) = (meta_prefix.clone(), prefix.clone());
                        async move {
                            let mut entries = entries;
                            mark_held(&cluster, &meta_prefix, &prefix, revision, &mut entries)
                                .await
                                .map(|()| entries)
                        }
                    };
                    let marked = tokio::select! {
                        _ = cancel.cancelled() => return,
                        marked = mark
                            .retry(crate::etcd::retry::Policy::PAGE_READ.builder())
                            .when(|e: &ClientError| e.is_retryable())
                            .notify(|error, delay| warn!(%job, %error, retry_in = ?delay, "Reading zk2etcd's ownership records failed; retrying.")) => marked,
                    };
                    match marked {
                        Ok(marked) => entries = marked,
                        Err(error) => {
                            let _ = pages.send(Err(PageError::from(error))).await;
                            return;
                        }
                    }
                }
                if pages.send(Ok(Some(entries))).await.is_err() {
                    return;
                }
            }
            if more {
                // The window holds more than a page: what is left of it
                // would cost a walk per page again. The page just read says
                // how dense the keys are here; a new window sized by it
                // (never past the one that overflowed) starts after it.
                let (first, last) = span.expect("a page with more has keys");
                start = key_successor(&last);
                let estimate = window_end(&first, &last, page_size as u64, &start, target, &end);
                window = match (estimate, window.take()) {
                    (Some(estimate), Some(current)) => Some(estimate.min(current)),
                    (estimate, current) => estimate.or(current),
                };
                if remaining.is_some_and(|r| r <= page_size as u64) {
                    window = None;
                }
                window_start = start.clone();
                window_keys = 0;
                continue;
            }
            if window.is_none() {
                // Read to the prefix end: done.
                let _ = pages.send(Ok(None)).await;
                return;
            }
            // The window is read whole; the next one starts at its end and
            // is sized by its density (an empty one says little: grow).
            window = if window_keys == 0 {
                window_end(&window_start, &bound, 1, &bound, 4, &end)
            } else {
                window_end(&window_start, &bound, window_keys, &bound, target, &end)
            };
            if remaining.is_some_and(|r| r <= page_size as u64) {
                window = None;
            }
            start = bound;
            window_start = start.clone();
            window_keys = 0;
        }
    });
    receiver
}

/// Keys a window aims to hold: a little under a page, so most windows are
/// read in one request (a window holding a page and a bit more costs a
/// second, small request: a round trip across a WAN).
fn window_target(page_size: usize) -> u64 {
    (page_size as u64 * 7 / 8).max(1)
}

/// The most a window may grow over the one before it: a few sparse keys
/// must not open a window over a dense stretch that costs many pages.
const MAX_WINDOW_GROWTH: u128 = 8;

/// The end of the next window, which starts at `from`, or `None` to read
/// to `end` (the prefix end).
///
/// Why windows: etcd counts every key from a request's start to its range
/// end, whatever the limit (`count` is in every response; 3.4 also collects
/// all their revisions first). Paging a prefix to its end therefore costs
/// the whole rest of the prefix per page, O(n²/page) for a full read: at a
/// million keys in pages of 2,000, 250 million index visits on the source.
/// A window that holds about a page bounds each request's walk to it.
///
/// The estimate: keys between `lo` and `hi` (`keys` of them) are read as
/// numbers, eight bytes from the first byte where `lo` and `hi` differ;
/// the next window spans what `target` keys took there (at most
/// [`MAX_WINDOW_GROWTH`] times the measured span). It is only an estimate,
/// and correctness never depends on it: every window is read whole (paged
/// until etcd says there is no more), and the next starts exactly where it
/// ended, so the windows tile the prefix. A wrong guess costs only a short
/// page or one more page.
fn window_end(
    lo: &[u8],
    hi: &[u8],
    keys: u64,
    from: &[u8],
    target: u64,
    end: &[u8],
) -> Option<Vec<u8>> {
    let common = lo.iter().zip(hi).take_while(|(a, b)| a == b).count();
    if !from.starts_with(&hi[..common]) {
        return None;
    }
    let number = |key: &[u8]| {
        let mut bytes = [0u8; 8];
        for (slot, byte) in bytes.iter_mut().zip(key.iter().skip(common)) {
            *slot = *byte;
        }
        u64::from_be_bytes(bytes) as u128
    };
    let measured = number(hi).checked_sub(number(lo)).filter(|s| *s > 0)?;
    let step =
        (measured * target as u128 / keys.max(1) as u128).clamp(1, measured * MAX_WINDOW_GROWTH);
    let bound = match u64::try_from(number(from) + step) {
        Ok(position) => {
            let mut bound = from[..common].to_vec();
            bound.extend_from_slice(&position.to_be_bytes());
            bound
        }
        // Past every key that starts like `from`.
        Err(_) => prefix_range_end(&from[..common]),
    };
    // "\0" as an end means the end of the keyspace.
    let before_end = end == [0] || bound.as_slice() < end;
    (bound.as_slice() > from && bound != [0] && before_end).then_some(bound)
}

/// A key read under a prefix `prefix_len` bytes long, as the merge sees it
/// (held or not is [`mark_held`]'s to say).
fn entry_below(prefix_len: usize, kv: crate::etcd::api::KeyValue) -> Entry {
    Entry {
        suffix: kv.key[prefix_len..].to_vec(),
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        lease: kv.lease,
        held: false,
    }
}

/// Marks the keys of `entries` (a destination page of `prefix`, just read)
/// that a zk2etcd job holds: one registered under the meta prefix whose
/// ownership record for the key is at least as new as the key as read (the
/// record is written in the key's txn; a later write by anyone else makes
/// the key newer than it).
///
/// Read after the page, or at its pinned `revision`: a key the page saw was
/// written with its record, and its job registered before its first write,
/// so neither is missed. One small read of the registry, then one range per
/// registered job over the page's span of records.
pub async fn mark_held(
    cluster: &Cluster,
    meta_prefix: &[u8],
    prefix: &[u8],
    revision: Option<i64>,
    entries: &mut [Entry],
) -> Result<(), ClientError> {
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
        return Ok(());
    };
    let meta = String::from_utf8_lossy(meta_prefix);
    let registry = zk2etcd_registry(&meta).into_bytes();
    let revision = revision.unwrap_or(0);
    let jobs = cluster
        .range(
            "read the zk2etcd registry",
            RangeRequest {
                range_end: prefix_range_end(&registry),
                key: registry.clone(),
                revision,
                keys_only: true,
                ..RangeRequest::default()
            },
        )
        .await?;
    if jobs.kvs.is_empty() {
        return Ok(());
    }
    let first = [prefix, &first.suffix].concat();
    let last = key_successor(&[prefix, &last.suffix].concat());
    let mut records: HashMap<Vec<u8>, i64> = HashMap::new();
    for registered in &jobs.kvs {
        let job = String::from_utf8_lossy(&registered.key[registry.len()..]);
        let root = MetaKeys::new(&meta, &job).zk_owned_prefix().into_bytes();
        let response = cluster
            .range(
                "read zk2etcd's ownership records",
                RangeRequest {
                    key: [root.as_slice(), &first].concat(),
                    range_end: [root.as_slice(), &last].concat(),
                    revision,
                    keys_only: true,
                    ..RangeRequest::default()
                },
            )
            .await?;
        for record in response.kvs {
            let newest = records
                .entry(record.key[root.len()..].to_vec())
                .or_default();
            *newest = (*newest).max(record.mod_revision);
        }
    }
    for entry in entries {
        let key = [prefix, &entry.suffix].concat();
        entry.held = records
            .get(&key)
            .is_some_and(|record| *record >= entry.mod_revision);
    }
    Ok(())
}

/// One prefix read page by page for a [`MergedPages`]: where, at which
/// revision (and pinned to which cluster), what to leave out.
pub struct PagedRead {
    pub cluster: Cluster,
    pub prefix: Vec<u8>,
    pub pin: (Option<i64>, Option<u64>),
    pub skipped: Skipped,
    pub stats: Arc<PagerStats>,
}

impl PagedRead {
    pub fn new(cluster: &Cluster, prefix: &[u8], revision: Option<i64>, skipped: Skipped) -> Self {
        PagedRead {
            cluster: cluster.clone(),
            prefix: prefix.to_vec(),
            pin: (revision, None),
            skipped,
            stats: Arc::new(PagerStats::default()),
        }
    }
}

/// What the merge found at the next key.
#[derive(Debug)]
pub enum Merged {
    Same,
    Differ(Difference),
    /// Another writer holds the destination key (this suffix): left alone.
    Held(Vec<u8>),
}

/// A page read that failed, and on which side of the merge.
#[derive(Debug)]
pub struct MergeReadError {
    pub side: Side,
    pub error: PageError,
}

/// The one two-pager merge: a source prefix at one revision and a
/// destination prefix at another, each read one page ahead by its own
/// pager, merged in key order ([`SortedMerge`]). Used by the check, the
/// full sync, failback and point-in-time restore. Dropping it stops both
/// pagers.
pub struct MergedPages {
    source: mpsc::Receiver<PageResult>,
    dest: mpsc::Receiver<PageResult>,
    merge: SortedMerge,
    /// Wall-clock time spent waiting for each side's pages (a measurement:
    /// the simulator's paused clock would stand still).
    pub source_wait: Duration,
    pub dest_wait: Duration,
    _stop_pagers: tokio_util::sync::DropGuard,
}

impl MergedPages {
    pub fn start(
        job: &str,
        source: PagedRead,
        dest: PagedRead,
        page_size: usize,
        merge: SortedMerge,
        cancel: &CancellationToken,
    ) -> Self {
        let pagers = cancel.child_token();
        let spawn = |read: PagedRead| {
            spawn_pager_with_stats(
                job.to_string(),
                read.cluster,
                read.prefix,
                read.pin,
                page_size,
                read.skipped,
                read.stats,
                pagers.clone(),
            )
        };
        MergedPages {
            source: spawn(source),
            dest: spawn(dest),
            merge,
            source_wait: Duration::ZERO,
            dest_wait: Duration::ZERO,
            _stop_pagers: pagers.clone().drop_guard(),
        }
    }

    /// The next key's verdict, `None` once both sides are exhausted.
    /// `on_page` sees each page before the merge takes it, and an empty one
    /// when a side ends.
    ///
    /// # Cancel-Safety
    /// Cancel-safe between calls; a call dropped while it waits for a page
    /// loses that page (a merge is then abandoned, never resumed).
    pub async fn next(
        &mut self,
        cancel: &CancellationToken,
        mut on_page: impl FnMut(Side, &[Entry]),
    ) -> Result<Option<Merged>, MergeReadError> {
        loop {
            match self.merge.step() {
                step @ (Step::NeedSource | Step::NeedDest) => {
                    let side = match step {
                        Step::NeedSource => Side::Source,
                        _ => Side::Destination,
                    };
                    let (pages, wait) = match side {
                        Side::Source => (&mut self.source, &mut self.source_wait),
                        Side::Destination => (&mut self.dest, &mut self.dest_wait),
                    };
                    let waited = std::time::Instant::now();
                    let page = next_page(pages, cancel).await;
                    *wait += waited.elapsed();
                    let page = page.map_err(|error| MergeReadError { side, error })?;
                    on_page(side, page.as_deref().unwrap_or_default());
                    match (side, page) {
                        (Side::Source, Some(page)) => self.merge.push_source(page),
                        (Side::Source, None) => self.merge.source_exhausted(),
                        (Side::Destination, Some(page)) => self.merge.push_dest(page),
                        (Side::Destination, None) => self.merge.dest_exhausted(),
                    }
                }
                Step::Same => return Ok(Some(Merged::Same)),
                Step::Held(suffix) => return Ok(Some(Merged::Held(suffix))),
                Step::Differ(difference) => return Ok(Some(Merged::Differ(difference))),
                Step::Done => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::api::{Etcd, Op, TxnRequest};
    use crate::etcd::memory::{new_store, Link, MemoryEtcd, SharedStore};
    use crate::model::Side;
    use proptest::prelude::*;

    const PREFIX: &[u8] = b"/p/";

    fn store_with(keys: &[Vec<u8>]) -> SharedStore {
        let store = new_store(1);
        let etcd = MemoryEtcd::new(store.clone(), Link::new("test", 1));
        let runtime = runtime();
        let mut keys = keys.to_vec();
        keys.sort();
        keys.dedup();
        runtime.block_on(async {
            for chunk in keys.chunks(64) {
                let ops = chunk
                    .iter()
                    .map(|k| Op::put(k.clone(), b"v".to_vec()))
                    .collect();
                etcd.txn(TxnRequest::new().and_then(ops)).await.unwrap();
            }
        });
        store
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
    }

    /// Every key the pager returns, in order, the keys the store walked,
    /// and the requests it served.
    fn read_all(store: &SharedStore, page_size: usize) -> (Vec<Vec<u8>>, u64, u64) {
        let cluster = Cluster::with_backend(
            Side::Source,
            "memory",
            Arc::new(MemoryEtcd::new(store.clone(), Link::new("test", 2))),
            Duration::from_secs(5),
        );
        let (walked_before, reads_before) = {
            let store = store.lock().unwrap();
            (store.walked, store.reads)
        };
        let keys = runtime().block_on(async {
            let cancel = CancellationToken::new();
            let mut pages = spawn_pager(
                "test".into(),
                cluster,
                PREFIX.to_vec(),
                None,
                page_size,
                Skipped {
                    meta_prefix: b"/-meta-/".to_vec(),
                    rewrite: KeyRewrite::new(PREFIX, PREFIX),
                    mark_held: false,
                },
                cancel.clone(),
            );
            let mut keys = Vec::new();
            while let Some(page) = next_page(&mut pages, &cancel).await.unwrap() {
                assert!(page.len() <= page_size);
                keys.extend(page.into_iter().map(|e| [PREFIX, &e.suffix].concat()));
            }
            keys
        });
        let store = store.lock().unwrap();
        (
            keys,
            store.walked - walked_before,
            store.reads - reads_before,
        )
    }

    fn under_prefix(keys: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut expected: Vec<Vec<u8>> = keys
            .iter()
            .filter(|k| k.starts_with(PREFIX))
            .cloned()
            .collect();
        expected.sort();
        expected.dedup();
        expected
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// The windows tile the prefix: every key under it exactly once, in
        /// order, whatever the key shapes (bytes 0x00 and 0xff, keys that
        /// are prefixes of others, sparse and dense stretches) and the page
        /// size; keys beside the prefix never.
        #[test]
        fn every_key_under_the_prefix_once_in_order(
            suffixes in prop::collection::vec(
                prop::collection::vec(prop_oneof![Just(0u8), Just(0xffu8), Just(b'0'), Just(b'9'), any::<u8>()], 0..10),
                0..300,
            ),
            beside in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..6), 0..20),
            page_size in 1usize..40,
        ) {
            let mut keys: Vec<Vec<u8>> = suffixes.iter().map(|s| [PREFIX, s].concat()).collect();
            keys.extend(beside.iter().map(|k| [b"/p".as_slice(), k].concat()));
            keys.extend(beside.iter().map(|k| [b"/o/".as_slice(), k].concat()));
            let store = store_with(&keys);
            let (read, _, _) = read_all(&store, page_size);
            prop_assert_eq!(read, under_prefix(&keys));
        }
    }

    /// A full read walks each key a few times, not once per page before
    /// it: 20,000 keys in pages of 200 walked 1,010,000 keys unbounded.
    #[test]
    fn a_full_read_walks_each_key_a_bounded_number_of_times() {
        let decimal: Vec<Vec<u8>> = (0..20_000)
            .map(|i| format!("/p/key-{i:07}").into_bytes())
            .collect();
        let mut random = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7);
        let binary: Vec<Vec<u8>> = (0..20_000)
            .map(|_| [PREFIX, &rand::Rng::gen::<[u8; 12]>(&mut random)].concat())
            .collect();
        // Two dense clusters far apart, and a long common part below the prefix.
        let clustered: Vec<Vec<u8>> = (0..10_000)
            .map(|i| format!("/p/registry/services/specs/a/{i:05}").into_bytes())
            .chain((0..10_000).map(|i| format!("/p/registry/services/specs/zz/{i}").into_bytes()))
            .collect();
        for (shape, keys) in [
            ("decimal", decimal),
            ("binary", binary),
            ("clustered", clustered),
        ] {
            let store = store_with(&keys);
            let (read, walked, requests) = read_all(&store, 200);
            assert_eq!(read, under_prefix(&keys), "{shape}");
            let n = read.len() as u64;
            eprintln!("{shape}: walked {walked} for {n} in {requests} requests");
            assert!(walked <= 6 * n, "{shape}: walked {walked} keys for {n}");
        }
    }

    /// A key is held while a registered zk2etcd job's record is at least
    /// as new as the key: a record of an unregistered job, a record the
    /// key was written over since, or no record, and the key is the job's.
    #[test]
    fn keys_a_registered_zk2etcd_job_wrote_last_are_held() {
        let store = new_store(1);
        let etcd = MemoryEtcd::new(store.clone(), Link::new("test", 1));
        let cluster = Cluster::with_backend(
            Side::Destination,
            "memory",
            Arc::new(MemoryEtcd::new(store, Link::new("test", 2))),
            Duration::from_secs(5),
        );
        let zk = MetaKeys::new("/m/", "zk");
        let stranger = MetaKeys::new("/m/", "unregistered");
        let (held, pinned) = runtime().block_on(async {
            let txn = |ops: Vec<Op>| etcd.txn(TxnRequest::new().and_then(ops));
            // A key that sorts before the registry is not a registration.
            txn(vec![Op::put("/a", "x")]).await.unwrap();
            txn(vec![Op::put(zk.zk2etcd_registration(), "{}")])
                .await
                .unwrap();
            for key in ["/p/held", "/p/overwritten", "/p/later"] {
                txn(vec![
                    Op::put(key, "zk"),
                    Op::put(zk.zk_owned(key.as_bytes()), "{}"),
                ])
                .await
                .unwrap();
            }
            txn(vec![Op::put("/p/overwritten", "mirror")])
                .await
                .unwrap();
            txn(vec![Op::put("/p/mine", "mirror")]).await.unwrap();
            txn(vec![
                Op::put("/p/theirs", "x"),
                Op::put(stranger.zk_owned(b"/p/theirs"), "{}"),
            ])
            .await
            .unwrap();
            let mut entries: Vec<Entry> = cluster
                .range("test", RangeRequest::prefix(PREFIX))
                .await
                .unwrap()
                .kvs
                .into_iter()
                .map(|kv| entry_below(PREFIX.len(), kv))
                .collect();
            // zk2etcd writes a key again after the page was read: still its.
            txn(vec![
                Op::put("/p/later", "zk2"),
                Op::put(zk.zk_owned(b"/p/later"), "{}"),
            ])
            .await
            .unwrap();
            let names = |entries: &[Entry]| {
                entries
                    .iter()
                    .filter(|e| e.held)
                    .map(|e| String::from_utf8(e.suffix.clone()).unwrap())
                    .collect::<Vec<_>>()
            };
            let mut latest = entries.clone();
            mark_held(&cluster, b"/m/", PREFIX, None, &mut latest)
                .await
                .unwrap();
            // A check pins its read: records and registry as at that
            // revision, whatever changed since.
            let at = cluster.head(b"").await.unwrap().revision;
            txn(vec![
                Op::delete(zk.zk_owned(b"/p/held")),
                Op::delete(zk.zk2etcd_registration()),
            ])
            .await
            .unwrap();
            mark_held(&cluster, b"/m/", PREFIX, Some(at), &mut entries)
                .await
                .unwrap();
            (names(&latest), names(&entries))
        });
        assert_eq!(held, ["held", "later"]);
        assert_eq!(pinned, ["held", "later"]);
    }

    #[test]
    fn the_window_estimate_is_past_its_start_and_inside_the_prefix() {
        let end = prefix_range_end(PREFIX);
        let bound = window_end(b"/p/a0", b"/p/a9", 10, b"/p/a9\0", 10, &end).unwrap();
        assert!(bound.as_slice() > b"/p/a9\0".as_slice() && bound < end);
        // Keys that are all the same in the bytes measured: no estimate.
        assert_eq!(
            window_end(b"/p/a", b"/p/a\0", 2, b"/p/a\0\0", 10, &end),
            None
        );
        // Past the prefix end: read to it.
        assert_eq!(
            window_end(b"/p/\xfe", b"/p/\xff", 1, b"/p/\xff\0", 100, &end),
            None
        );
    }
}
