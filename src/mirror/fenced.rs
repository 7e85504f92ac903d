//! One fenced txn on the destination: the job's fence (no promoted marker,
//! this instance still holding the job lock) and the caller's guards must
//! hold for its ops to apply, and a failure says which one did not.
//!
//! Below both the data writer ([`crate::mirror::writer`]) and the lease
//! book ([`crate::mirror::leases`]): the writer asks the book for leases,
//! the book writes its records here, and neither needs the other to write.

use std::sync::Arc;

// tokio's clock, so the simulator's paused time governs every deadline.
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::etcd::api::{Compare, Op, TxnRequest, TxnResponse};
use crate::etcd::client::Cluster;
use crate::mirror::error::JobError;
use crate::mirror::meta::Fence;
use crate::mirror::rate::WriteRate;
use crate::model::keys::MetaKeys;
use crate::telemetry::metrics::JobMetrics;

/// Why a guarded txn did not apply, read in the same txn's failure branch.
#[derive(Debug, Clone)]
pub struct GuardFailure {
    pub promoted: bool,
    pub lock_held: bool,
}

#[derive(Debug)]
pub enum TxnOutcome {
    /// With the success branch's responses.
    Committed(TxnResponse),
    GuardFailed(GuardFailure),
}

/// Sends one job's fenced txns.
pub struct FencedWriter {
    dest: Cluster,
    keys: MetaKeys,
    fence: Fence,
    metrics: JobMetrics,
    /// `None` without a write-rate limit.
    rate: Option<Arc<WriteRate>>,
    /// Ends a wait for the rate limit: the job's token.
    cancel: CancellationToken,
}

impl FencedWriter {
    pub fn new(dest: Cluster, keys: MetaKeys, fence: Fence, metrics: JobMetrics) -> Self {
        Self {
            dest,
            keys,
            fence,
            metrics,
            rate: None,
            cancel: CancellationToken::new(),
        }
    }

    /// The same writer, waiting for `rate` before each txn until `cancel` fires.
    pub fn with_rate(mut self, rate: Option<Arc<WriteRate>>, cancel: CancellationToken) -> Self {
        self.rate = rate;
        self.cancel = cancel;
        self
    }

    /// The write-rate limit, shared by every leadership of the job.
    pub fn rate(&self) -> Option<&Arc<WriteRate>> {
        self.rate.as_ref()
    }

    pub fn keys(&self) -> &MetaKeys {
        &self.keys
    }

    pub fn metrics(&self) -> &JobMetrics {
        &self.metrics
    }

    pub fn dest(&self) -> &Cluster {
        &self.dest
    }

    /// One txn: the fence and `guards` must hold for `ops` to apply.
    pub async fn commit(
        &self,
        operation: &'static str,
        guards: Vec<Compare>,
        ops: Vec<Op>,
    ) -> Result<TxnOutcome, JobError> {
        let op_count = ops.len();
        if let Some(rate) = &self.rate {
            let bytes = ops.iter().map(Op::encoded_len).sum();
            if !rate.acquire(op_count, bytes, &self.cancel).await {
                return Err(JobError::Cancelled);
            }
        }
        let mut compares = self.fence.compares();
        compares.extend(guards);
        let mut failure_reads = vec![Op::get(self.fence.promoted_key())];
        if let Some(lock) = self.fence.lock() {
            failure_reads.push(Op::get(lock.key.as_str()));
        }
        let txn = TxnRequest::new()
            .when(compares)
            .and_then(ops)
            .or_else(failure_reads);
        let started = Instant::now();
        let response = self.dest.txn(operation, txn).await?;
        self.metrics
            .txn_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        if response.succeeded {
            self.metrics.txns_total.inc();
            self.metrics.txn_ops.observe(op_count as f64);
            return Ok(TxnOutcome::Committed(response));
        }
        let reads: Vec<bool> = response.ranges().map(|r| !r.kvs.is_empty()).collect();
        let promoted = reads.first().copied().unwrap_or(false);
        let lock_held = match self.fence.lock() {
            None => true,
            Some(_) => reads.get(1).copied().unwrap_or(false),
        };
        Ok(TxnOutcome::GuardFailed(GuardFailure {
            promoted,
            lock_held,
        }))
    }

    /// The error a failed guard stands for. A moved checkpoint is retryable:
    /// the job re-reads it and resumes from whatever committed.
    pub fn explain(&self, failure: &GuardFailure, what: &'static str) -> JobError {
        if failure.promoted {
            JobError::Promoted
        } else if !failure.lock_held {
            JobError::Fenced {
                reason: "this instance no longer holds the job lock",
            }
        } else {
            JobError::GuardMoved { what }
        }
    }
}
