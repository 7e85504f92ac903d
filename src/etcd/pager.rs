//! Reading a prefix page by page, in key order, ahead of the consumer.
//!
//! The full sync and the consistency checker both walk a source and a
//! destination prefix side by side; a pager per side keeps the next page in
//! flight while the merge works on the current one.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::etcd::api::RangeRequest;
use crate::etcd::client::{ClientError, Cluster};
use crate::model::diff::Entry;
use crate::model::keys::{key_successor, prefix_range_end, prefix_range_start, KeyRewrite};

#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("range reader stopped before the end of the prefix")]
    StoppedEarly,
    #[error("cancelled")]
    Cancelled,
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

/// The keys a pager leaves out: the meta prefix, and the job's excluded ranges.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub meta_prefix: Vec<u8>,
    pub rewrite: KeyRewrite,
}

/// Reads `prefix` at `revision` (or the latest) page by page in key order,
/// one page ahead of the merge (the channel holds two pages, which bounds
/// memory). Keys under the meta prefix, and keys the job excludes
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
    let Skipped {
        meta_prefix,
        rewrite,
    } = skipped;
    let (pages, receiver) = mpsc::channel(2);
    tokio::spawn(async move {
        let end = prefix_range_end(&prefix);
        let mut start = prefix_range_start(&prefix);
        loop {
            let request = RangeRequest {
                key: start.clone(),
                range_end: end.clone(),
                revision: revision.unwrap_or(0),
                limit: page_size as i64,
                ..RangeRequest::default()
            };
            let read = || {
                let request = request.clone();
                let cluster = cluster.clone();
                async move { cluster.range("read page", request).await }
            };
            let response = tokio::select! {
                _ = cancel.cancelled() => return,
                response = read
                    .retry(page_retry())
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
            let more = response.more;
            let kvs = response.kvs;
            let Some(last) = kvs.last() else {
                let _ = pages.send(Ok(None)).await;
                return;
            };
            start = key_successor(&last.key);
            let entries: Vec<Entry> = kvs
                .into_iter()
                .filter(|kv| {
                    !kv.key.starts_with(&meta_prefix)
                        && !rewrite.is_excluded_suffix(&kv.key[prefix.len()..])
                })
                .map(|kv| Entry {
                    suffix: kv.key[prefix.len()..].to_vec(),
                    value: kv.value,
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                    lease: kv.lease,
                })
                .collect();
            if pages.send(Ok(Some(entries))).await.is_err() {
                return;
            }
            if !more {
                let _ = pages.send(Ok(None)).await;
                return;
            }
        }
    });
    receiver
}

fn page_retry() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(6)
}
