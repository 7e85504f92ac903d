//! Data writes to the destination: a txn of mutations with every leased key
//! on its mirrored lease ([`DestWriter`]), and the full sync's unordered
//! writes ([`UnorderedWrites`]: disjoint keys and no checkpoint, so they run
//! in parallel, each fenced on the exact full-sync marker). Incremental
//! txns are chained through the checkpoint in [`crate::mirror::pipeline`].

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::etcd::api::{Compare, Op};
use crate::etcd::client::Cluster;
use crate::mirror::error::JobError;
use crate::mirror::fenced::FencedWriter;
use crate::mirror::leases::LeaseBook;
use crate::mirror::meta::{Fence, KeyGuard};
use crate::mirror::rate::WriteRate;
use crate::model::batch::Mutation;
use crate::model::keys::MetaKeys;
use crate::model::lease_book::Want;
use crate::telemetry::metrics::JobMetrics;

pub use crate::mirror::fenced::{GuardFailure, TxnOutcome};

/// Sends one job's fenced txns, attaching leased keys to their mirrored
/// destination leases.
pub struct DestWriter {
    fenced: Arc<FencedWriter>,
    /// `None` with `--leases strip`: keys are written without a lease.
    leases: Option<Arc<LeaseBook>>,
}

impl DestWriter {
    pub fn new(dest: Cluster, keys: MetaKeys, fence: Fence, metrics: JobMetrics) -> Self {
        Self {
            fenced: Arc::new(FencedWriter::new(dest, keys, fence, metrics)),
            leases: None,
        }
    }

    /// A writer over `fenced` (shared with the lease book that writes its
    /// records through it), attaching leased keys through `leases`.
    pub fn over(fenced: Arc<FencedWriter>, leases: Option<Arc<LeaseBook>>) -> Self {
        Self { fenced, leases }
    }

    /// The fenced txns every write of this writer goes through.
    pub fn fenced(&self) -> &Arc<FencedWriter> {
        &self.fenced
    }

    /// The write-rate limit, shared by every leadership of the job.
    pub fn rate(&self) -> Option<&Arc<WriteRate>> {
        self.fenced.rate()
    }

    pub fn leases(&self) -> Option<&Arc<LeaseBook>> {
        self.leases.as_ref()
    }

    /// One txn of mutations that reflect the source at revision `at`, then
    /// `tail`: every leased key is attached to the destination lease that
    /// mirrors its source lease (granted and recorded first if new).
    pub async fn commit_mutations(
        &self,
        operation: &'static str,
        guards: Vec<Compare>,
        mutations: Vec<Mutation>,
        tail: Vec<Op>,
        at: i64,
    ) -> Result<TxnOutcome, JobError> {
        let leases = match &self.leases {
            Some(book) => {
                // One want per lease, not per key: the book's work per
                // answer it gets grows with the wants waiting.
                let wanted: BTreeSet<Want> = mutations
                    .iter()
                    .filter_map(|m| match m {
                        Mutation::Put { lease, .. } if *lease != 0 => {
                            Some(Want { lease: *lease, at })
                        }
                        _ => None,
                    })
                    .collect();
                book.resolve(wanted.into_iter().collect()).await?
            }
            None => HashMap::new(),
        };
        let mut ops: Vec<Op> = mutations
            .into_iter()
            .map(|mutation| mutation_op(mutation, &leases))
            .collect();
        ops.extend(tail);
        match self.commit(operation, guards, ops).await {
            // A destination lease expired since it was mapped (no renewal
            // had found it gone yet): drop the dead ones, so the full sync
            // this error leads to grants them again.
            Err(JobError::Client(error)) if !leases.is_empty() && error.is_lease_not_found() => {
                let book = self
                    .leases
                    .as_ref()
                    .expect("leases resolved through the book");
                let lost = book.evict_dead(leases.values().copied()).await;
                tracing::debug!(%error, ?leases, lost, "A destination lease was gone when a txn used it.");
                Err(JobError::DestLeaseLost {
                    leases: lost.max(1),
                })
            }
            outcome => outcome,
        }
    }

    pub fn keys(&self) -> &MetaKeys {
        self.fenced.keys()
    }

    pub fn metrics(&self) -> &JobMetrics {
        self.fenced.metrics()
    }

    /// One txn: the fence and `guards` must hold for `ops` to apply.
    pub async fn commit(
        &self,
        operation: &'static str,
        guards: Vec<Compare>,
        ops: Vec<Op>,
    ) -> Result<TxnOutcome, JobError> {
        self.fenced.commit(operation, guards, ops).await
    }

    /// The error a failed guard stands for.
    pub fn explain(&self, failure: &GuardFailure, what: &'static str) -> JobError {
        self.fenced.explain(failure, what)
    }
}

/// The op for `mutation`, its source lease replaced by the destination
/// lease in `leases` (no lease when it has none there).
pub fn mutation_op(mutation: Mutation, leases: &HashMap<i64, i64>) -> Op {
    match mutation {
        Mutation::Put { key, value, lease } => {
            Op::put_with_lease(key, value, leases.get(&lease).copied().unwrap_or(0))
        }
        Mutation::Delete { key } => Op::delete(key),
    }
}

/// Full-sync writes: disjoint keys, no ordering, bounded concurrency.
pub struct UnorderedWrites {
    writer: Arc<DestWriter>,
    /// The source revision every write reflects (the full sync's pin).
    pinned_rev: i64,
    marker_key: String,
    marker_guard: KeyGuard,
    max_inflight: usize,
    tasks: JoinSet<(Result<TxnOutcome, JobError>, Duration)>,
    trace: WriteTrace,
}

/// What the full-sync writes cost, for the full sync's trace: their sum of
/// txn latencies over the pass's wall time is the mean number in flight.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriteTrace {
    pub txns: u64,
    /// Sum of every committed txn's latency (wall clock).
    pub txn_time: Duration,
    /// Time `submit` and `finish` waited for a txn to complete.
    pub slot_wait: Duration,
}

impl UnorderedWrites {
    pub fn new(
        writer: Arc<DestWriter>,
        pinned_rev: i64,
        marker_guard: KeyGuard,
        max_inflight: usize,
    ) -> Self {
        let marker_key = writer.keys().full_sync();
        Self {
            writer,
            pinned_rev,
            marker_key,
            marker_guard,
            max_inflight: max_inflight.max(1),
            tasks: JoinSet::new(),
            trace: WriteTrace::default(),
        }
    }

    /// Sends one txn, first waiting for room if `max_inflight` are out.
    pub async fn submit(&mut self, mutations: Vec<Mutation>) -> Result<(), JobError> {
        while self.tasks.len() >= self.max_inflight {
            self.reap_one().await?;
        }
        let guards = vec![self.marker_guard.compare(&self.marker_key)];
        let writer = self.writer.clone();
        let at = self.pinned_rev;
        self.tasks.spawn(async move {
            // A measurement only (wall clock, also under the simulator's paused time).
            let started = std::time::Instant::now();
            let outcome = writer
                .commit_mutations("full sync write", guards, mutations, vec![], at)
                .await;
            (outcome, started.elapsed())
        });
        Ok(())
    }

    /// Waits until every txn sent has committed (or one failed).
    pub async fn finish(&mut self) -> Result<(), JobError> {
        while !self.tasks.is_empty() {
            self.reap_one().await?;
        }
        Ok(())
    }

    pub fn trace(&self) -> WriteTrace {
        self.trace
    }

    async fn reap_one(&mut self) -> Result<(), JobError> {
        let waited = std::time::Instant::now();
        let joined = self.tasks.join_next().await;
        self.trace.slot_wait += waited.elapsed();
        match joined {
            None => Ok(()),
            Some(Err(join_error)) => Err(JobError::Internal(format!(
                "full sync write task failed: {join_error}"
            ))),
            Some(Ok((outcome, latency))) => match outcome? {
                TxnOutcome::Committed(_) => {
                    self.trace.txns += 1;
                    self.trace.txn_time += latency;
                    Ok(())
                }
                TxnOutcome::GuardFailed(failure) => {
                    Err(self.writer.explain(&failure, "full-sync marker"))
                }
            },
        }
    }
}
