//! Prometheus metrics. Every per-job series carries a `job` label; names
//! follow the Prometheus conventions (`_total` counters, base units).
//! `docs/metrics.md` documents each one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

// tokio's clock, so paused-time tests and the simulator govern it.
use tokio::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    is_leader: IntGaugeVec,
    last_synced_revision: IntGaugeVec,
    source_revision: IntGaugeVec,
    lag_revisions: IntGaugeVec,
    lag_seconds: prometheus::GaugeVec,
    fast_path_total: IntCounterVec,
    slow_path_total: IntCounterVec,
    resync_loops_total: IntCounterVec,
    full_sync_in_progress: IntGaugeVec,
    full_sync_keys_total: IntCounterVec,
    events_applied_total: IntCounterVec,
    txns_total: IntCounterVec,
    txn_ops: HistogramVec,
    txn_duration_seconds: HistogramVec,
    split_revisions_total: IntCounterVec,
    txn_reorders_total: IntCounterVec,
    exact_catch_ups_total: IntCounterVec,
    errors_total: IntCounterVec,
    leader_changes_total: IntCounterVec,
    job_state: IntGaugeVec,
    src_miss_keys: IntGaugeVec,
    dst_miss_keys: IntGaugeVec,
    mismatch_keys: IntGaugeVec,
    check_exact: IntGaugeVec,
    check_last_success_timestamp_seconds: prometheus::GaugeVec,
    check_duration_seconds: prometheus::GaugeVec,
    check_read_bytes_total: IntCounterVec,
    history_window_seconds: prometheus::GaugeVec,
    repaired_keys_total: IntCounterVec,
    lease_mismatch_keys: IntGaugeVec,
    leases_mirrored: IntGaugeVec,
    zk_keys_owned: IntGaugeVec,
    zk_sessions: IntGaugeVec,
    zk_resyncs_total: IntCounterVec,
    zk_applied_zxid: IntGaugeVec,
    lease_backed_keys: IntGaugeVec,
    lease_keepalives_total: IntCounterVec,
    lease_keepalive_failures_total: IntCounterVec,
    routes: std::sync::Arc<std::sync::Mutex<Option<RouteMetrics>>>,
    config_reloads_total: IntCounterVec,
}

fn must<T>(result: prometheus::Result<T>) -> T {
    // Registration only fails on a duplicate or malformed name: a bug, caught by the tests.
    result.expect("metric definitions are valid and unique")
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let int_gauge = |name: &str, help: &str| {
            let gauge = must(IntGaugeVec::new(Opts::new(name, help), &["job"]));
            must(registry.register(Box::new(gauge.clone())));
            gauge
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let counter = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(counter.clone())));
            counter
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let histogram = must(HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets),
                &["job"],
            ));
            must(registry.register(Box::new(histogram.clone())));
            histogram
        };
        let float_gauge = |name: &str, help: &str| {
            let gauge = must(prometheus::GaugeVec::new(Opts::new(name, help), &["job"]));
            must(registry.register(Box::new(gauge.clone())));
            gauge
        };
        let lag_seconds = float_gauge(
            "etcd_syncer_lag_seconds",
            "Seconds since the destination last reflected the source's head revision (0 when caught up)",
        );

        let metrics = Self {
            is_leader: int_gauge("etcd_syncer_is_leader", "1 while this instance leads the job"),
            last_synced_revision: int_gauge(
                "etcd_syncer_last_synced_revision",
                "Source revision the destination reflects, as committed in the checkpoint",
            ),
            source_revision: int_gauge("etcd_syncer_source_revision", "Latest source revision seen"),
            lag_revisions: int_gauge(
                "etcd_syncer_lag_revisions",
                "Source revision minus last synced revision",
            ),
            lag_seconds,
            fast_path_total: counter(
                "etcd_syncer_fast_path_total",
                "Starts that resumed watching from the checkpoint",
                &["job"],
            ),
            slow_path_total: counter("etcd_syncer_slow_path_total", "Full syncs started", &["job"]),
            resync_loops_total: counter(
                "etcd_syncer_resync_loops_total",
                "Times the job entered a resync loop (full syncs again and again without a stable watch)",
                &["job"],
            ),
            full_sync_in_progress: int_gauge("etcd_syncer_full_sync_in_progress", "1 while a full sync runs"),
            full_sync_keys_total: counter(
                "etcd_syncer_full_sync_keys_total",
                "Keys handled by full syncs, by what was done (put, delete, unchanged)",
                &["job", "op"],
            ),
            events_applied_total: counter(
                "etcd_syncer_events_applied_total",
                "Source watch events applied to the destination",
                &["job"],
            ),
            txns_total: counter("etcd_syncer_txns_total", "Destination txns committed", &["job"]),
            txn_ops: histogram(
                "etcd_syncer_txn_ops",
                "Ops per committed destination txn",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0],
            ),
            txn_duration_seconds: histogram(
                "etcd_syncer_txn_duration_seconds",
                "Round trip of destination txns",
                prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets"),
            ),
            split_revisions_total: counter(
                "etcd_syncer_split_revisions_total",
                "Source revisions too large for one txn, applied across several",
                &["job"],
            ),
            txn_reorders_total: counter(
                "etcd_syncer_txn_reorders_total",
                "Pipelined txns etcd evaluated before their predecessor, re-sent unchanged",
                &["job"],
            ),
            exact_catch_ups_total: counter(
                "etcd_syncer_exact_catch_ups_total",
                "Revision-exact catch-ups over source history compacted before it was replayed",
                &["job"],
            ),
            errors_total: counter(
                "etcd_syncer_errors_total",
                "Errors by kind (source_unavailable, dest_unavailable, fenced, compacted, prune_guard, auth, ...)",
                &["job", "kind"],
            ),
            leader_changes_total: counter(
                "etcd_syncer_leader_changes_total",
                "Times this instance gained or lost leadership of the job",
                &["job"],
            ),
            src_miss_keys: int_gauge(
                "etcd_syncer_src_miss_keys",
                "Keys on the destination but not the source, at the last check",
            ),
            dst_miss_keys: int_gauge(
                "etcd_syncer_dst_miss_keys",
                "Keys on the source but missing on the destination, at the last check",
            ),
            mismatch_keys: int_gauge(
                "etcd_syncer_mismatch_keys",
                "Keys whose values differ, at the last check",
            ),
            check_exact: int_gauge(
                "etcd_syncer_check_exact",
                "1 if the last check compared at the checkpoint revision, 0 if it fell back to an approximate comparison",
            ),
            check_last_success_timestamp_seconds: float_gauge(
                "etcd_syncer_check_last_success_timestamp_seconds",
                "Unix time of the last completed consistency check",
            ),
            history_window_seconds: float_gauge(
                "etcd_syncer_history_window_seconds",
                "How far back a point-in-time promotion can go: age of the oldest revision-map sample whose destination revision is not compacted",
            ),
            check_duration_seconds: float_gauge(
                "etcd_syncer_check_duration_seconds",
                "Duration of the last completed consistency check",
            ),
            check_read_bytes_total: counter(
                "etcd_syncer_check_read_bytes_total",
                "Bytes of keys and values the periodic consistency checks read, by side (source, destination)",
                &["job", "side"],
            ),
            repaired_keys_total: counter(
                "etcd_syncer_repaired_keys_total",
                "Keys rewritten by --check-repair, by what the check found (dst_miss, src_miss, mismatch)",
                &["job", "kind"],
            ),
            lease_mismatch_keys: int_gauge(
                "etcd_syncer_lease_mismatch_keys",
                "Keys with equal values but a different lease attachment, at the last check",
            ),
            zk_keys_owned: int_gauge(
                "etcd_syncer_zk_keys_owned",
                "zk2etcd: destination keys this job owns (it wrote them, nobody since)",
            ),
            zk_sessions: int_gauge(
                "etcd_syncer_zk_sessions",
                "zk2etcd: ZooKeeper sessions whose ephemeral nodes are mirrored on a destination lease",
            ),
            zk_resyncs_total: counter(
                "etcd_syncer_zk_resyncs_total",
                "zk2etcd: walks of the ZooKeeper tree diffed against the destination (start, reconnects, --resync-interval)",
                &["job"],
            ),
            zk_applied_zxid: int_gauge(
                "etcd_syncer_zk_applied_zxid",
                "zk2etcd: the newest node change (mzxid) written to the destination; compare with ZooKeeper's Zxid (srvr)",
            ),
            leases_mirrored: int_gauge(
                "etcd_syncer_leases_mirrored",
                "Source leases this leader mirrors with a destination lease",
            ),
            lease_backed_keys: int_gauge(
                "etcd_syncer_lease_backed_keys",
                "Mirrored keys attached to a lease, as this leader last saw them",
            ),
            lease_keepalives_total: counter(
                "etcd_syncer_lease_keepalives_total",
                "Keepalives sent for mirrored destination leases",
                &["job"],
            ),
            lease_keepalive_failures_total: counter(
                "etcd_syncer_lease_keepalive_failures_total",
                "Keepalives of mirrored destination leases that failed or found the lease gone",
                &["job"],
            ),
            job_state: must(IntGaugeVec::new(
                Opts::new(
                    "etcd_syncer_job_state",
                    "1 for the state the job is in (starting, full_sync, watching, error, prune_guard, no_space, resync_loop, promoted, standby)",
                ),
                &["job", "state"],
            )),
            config_reloads_total: counter(
                "etcd_syncer_config_reloads_total",
                "Configuration reloads (SIGHUP or the config file changed), by result: ok, or error (the running configuration stays)",
                &["result"],
            ),
            registry,
            routes: Default::default(),
        };
        for result in ["ok", "error"] {
            metrics.config_reloads_total.with_label_values(&[result]);
        }
        must(
            metrics
                .registry
                .register(Box::new(metrics.job_state.clone())),
        );
        #[cfg(target_os = "linux")]
        must(metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )));
        metrics
    }

    pub fn job(&self, job: &str) -> JobMetrics {
        let labels = [job];
        let metrics = JobMetrics {
            job: job.to_string(),
            is_leader: self.is_leader.with_label_values(&labels),
            last_synced_revision: self.last_synced_revision.with_label_values(&labels),
            source_revision: self.source_revision.with_label_values(&labels),
            lag_revisions: self.lag_revisions.with_label_values(&labels),
            lag_seconds: self.lag_seconds.with_label_values(&labels),
            fast_path_total: self.fast_path_total.with_label_values(&labels),
            slow_path_total: self.slow_path_total.with_label_values(&labels),
            resync_loops_total: self.resync_loops_total.with_label_values(&labels),
            resync_loop: Default::default(),
            forced_full_syncs: Default::default(),
            watching_since: Default::default(),
            full_sync_in_progress: self.full_sync_in_progress.with_label_values(&labels),
            full_sync_put: self.full_sync_keys_total.with_label_values(&[job, "put"]),
            full_sync_delete: self
                .full_sync_keys_total
                .with_label_values(&[job, "delete"]),
            full_sync_unchanged: self
                .full_sync_keys_total
                .with_label_values(&[job, "unchanged"]),
            events_applied_total: self.events_applied_total.with_label_values(&labels),
            txns_total: self.txns_total.with_label_values(&labels),
            txn_ops: self.txn_ops.with_label_values(&labels),
            txn_duration_seconds: self.txn_duration_seconds.with_label_values(&labels),
            split_revisions_total: self.split_revisions_total.with_label_values(&labels),
            txn_reorders_total: self.txn_reorders_total.with_label_values(&labels),
            exact_catch_ups_total: self.exact_catch_ups_total.with_label_values(&labels),
            errors_total: self.errors_total.clone(),
            leader_changes_total: self.leader_changes_total.with_label_values(&labels),
            job_state: self.job_state.clone(),
            src_miss_keys: self.src_miss_keys.with_label_values(&labels),
            dst_miss_keys: self.dst_miss_keys.with_label_values(&labels),
            mismatch_keys: self.mismatch_keys.with_label_values(&labels),
            check_exact: self.check_exact.with_label_values(&labels),
            check_last_success_timestamp_seconds: self
                .check_last_success_timestamp_seconds
                .with_label_values(&labels),
            check_duration_seconds: self.check_duration_seconds.with_label_values(&labels),
            check_source_read_bytes_total: self
                .check_read_bytes_total
                .with_label_values(&[job, "source"]),
            check_dest_read_bytes_total: self
                .check_read_bytes_total
                .with_label_values(&[job, "destination"]),
            history_window_seconds: self.history_window_seconds.with_label_values(&labels),
            repaired_keys_total: self.repaired_keys_total.clone(),
            lease_mismatch_keys: self.lease_mismatch_keys.with_label_values(&labels),
            leases_mirrored: self.leases_mirrored.with_label_values(&labels),
            zk_keys_owned: self.zk_keys_owned.with_label_values(&labels),
            zk_sessions: self.zk_sessions.with_label_values(&labels),
            zk_resyncs_total: self.zk_resyncs_total.with_label_values(&labels),
            zk_applied_zxid: self.zk_applied_zxid.with_label_values(&labels),
            lease_backed_keys: self.lease_backed_keys.with_label_values(&labels),
            lease_keepalives_total: self.lease_keepalives_total.with_label_values(&labels),
            lease_keepalive_failures_total: self
                .lease_keepalive_failures_total
                .with_label_values(&labels),
        };
        // Every series exists from the start, so dashboards and alerts see 0, not "no data".
        for kind in ["dst_miss", "src_miss", "mismatch"] {
            metrics.repaired_keys_total.with_label_values(&[job, kind]);
        }
        for op in ["put", "delete", "unchanged"] {
            self.full_sync_keys_total.with_label_values(&[job, op]);
        }
        for kind in PRECREATED_ERROR_KINDS {
            self.errors_total.with_label_values(&[job, kind]);
        }
        metrics.set_state(JobState::Starting);
        metrics
    }

    /// Removes every series of `job` (stopped by a reload), so no alert
    /// keeps judging a job that no longer runs here.
    pub fn forget_job(&self, job: &str) {
        let labels = [job];
        macro_rules! forget {
            ($($vec:ident),* $(,)?) => {
                $( let _ = self.$vec.remove_label_values(&labels); )*
            };
        }
        forget!(
            is_leader,
            last_synced_revision,
            source_revision,
            lag_revisions,
            lag_seconds,
            fast_path_total,
            slow_path_total,
            resync_loops_total,
            full_sync_in_progress,
            events_applied_total,
            txns_total,
            txn_ops,
            txn_duration_seconds,
            split_revisions_total,
            txn_reorders_total,
            exact_catch_ups_total,
            leader_changes_total,
            src_miss_keys,
            dst_miss_keys,
            mismatch_keys,
            check_exact,
            check_last_success_timestamp_seconds,
            check_duration_seconds,
            history_window_seconds,
            lease_mismatch_keys,
            leases_mirrored,
            zk_keys_owned,
            zk_sessions,
            zk_resyncs_total,
            zk_applied_zxid,
            lease_backed_keys,
            lease_keepalives_total,
            lease_keepalive_failures_total,
        );
        for op in ["put", "delete", "unchanged"] {
            let _ = self.full_sync_keys_total.remove_label_values(&[job, op]);
        }
        for kind in ["dst_miss", "src_miss", "mismatch"] {
            let _ = self.repaired_keys_total.remove_label_values(&[job, kind]);
        }
        for side in ["source", "destination"] {
            let _ = self
                .check_read_bytes_total
                .remove_label_values(&[job, side]);
        }
        for state in JobState::ALL {
            let _ = self.job_state.remove_label_values(&[job, state.label()]);
        }
        // Error kinds are open-ended: remove the ones the job has.
        for family in self.registry.gather() {
            if family.name() != "etcd_syncer_errors_total" {
                continue;
            }
            for metric in family.get_metric() {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_string())
                };
                if label("job").as_deref() == Some(job) {
                    if let Some(kind) = label("kind") {
                        let _ = self.errors_total.remove_label_values(&[job, &kind]);
                    }
                }
            }
        }
    }

    /// `etcd_syncer_config_reloads_total{result}`: `ok` or `error`.
    pub fn config_reloaded(&self, result: &str) {
        self.config_reloads_total.with_label_values(&[result]).inc();
    }

    /// The text exposition format served on `/metrics`.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "failed to encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Error kinds whose series exist from the start at 0, so `rate()` and
/// alerts work before the first failure. Rarer kinds appear when they happen.
pub const PRECREATED_ERROR_KINDS: [&str; 7] = [
    "source_unavailable",
    "dest_unavailable",
    "auth",
    "compacted",
    "fenced",
    "lease_lost",
    "prune_guard",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Starting,
    Standby,
    FullSync,
    Watching,
    Error,
    PruneGuard,
    /// The destination is out of space (NOSPACE alarm): parked, retrying slowly.
    NoSpace,
    /// Full syncs again and again without a stable watch in between.
    ResyncLoop,
    Promoted,
    /// `--revision-exact`: the destination's revisions are no longer the
    /// source's; writes stopped until it is re-seeded.
    ParityLost,
}

impl JobState {
    pub const ALL: [JobState; 10] = [
        JobState::Starting,
        JobState::Standby,
        JobState::FullSync,
        JobState::Watching,
        JobState::Error,
        JobState::PruneGuard,
        JobState::NoSpace,
        JobState::ResyncLoop,
        JobState::Promoted,
        JobState::ParityLost,
    ];

    pub fn label(self) -> &'static str {
        match self {
            JobState::Starting => "starting",
            JobState::Standby => "standby",
            JobState::FullSync => "full_sync",
            JobState::Watching => "watching",
            JobState::Error => "error",
            JobState::PruneGuard => "prune_guard",
            JobState::NoSpace => "no_space",
            JobState::ResyncLoop => "resync_loop",
            JobState::Promoted => "promoted",
            JobState::ParityLost => "parity_lost",
        }
    }
}

/// The series of one job, labelled once.
#[derive(Clone)]
pub struct JobMetrics {
    job: String,
    pub is_leader: IntGauge,
    pub last_synced_revision: IntGauge,
    pub source_revision: IntGauge,
    pub lag_revisions: IntGauge,
    pub lag_seconds: prometheus::Gauge,
    pub fast_path_total: IntCounter,
    pub slow_path_total: IntCounter,
    pub resync_loops_total: IntCounter,
    /// In a resync loop: a running job shows state `resync_loop`.
    resync_loop: Arc<AtomicBool>,
    /// Full syncs the source forced (compaction, a replaced or rebuilt
    /// source, an interrupted full sync): what a resync loop counts.
    forced_full_syncs: Arc<AtomicU64>,
    /// Since when the job has been in state `watching`.
    watching_since: Arc<Mutex<Option<Instant>>>,
    pub full_sync_in_progress: IntGauge,
    pub full_sync_put: IntCounter,
    pub full_sync_delete: IntCounter,
    pub full_sync_unchanged: IntCounter,
    pub events_applied_total: IntCounter,
    pub txns_total: IntCounter,
    pub txn_ops: Histogram,
    pub txn_duration_seconds: Histogram,
    pub split_revisions_total: IntCounter,
    pub txn_reorders_total: IntCounter,
    pub exact_catch_ups_total: IntCounter,
    errors_total: IntCounterVec,
    pub leader_changes_total: IntCounter,
    job_state: IntGaugeVec,
    pub src_miss_keys: IntGauge,
    pub dst_miss_keys: IntGauge,
    pub mismatch_keys: IntGauge,
    pub check_exact: IntGauge,
    pub check_last_success_timestamp_seconds: prometheus::Gauge,
    pub check_duration_seconds: prometheus::Gauge,
    /// What the periodic checks cost across each link.
    pub check_source_read_bytes_total: IntCounter,
    pub check_dest_read_bytes_total: IntCounter,
    pub history_window_seconds: prometheus::Gauge,
    repaired_keys_total: IntCounterVec,
    pub lease_mismatch_keys: IntGauge,
    pub leases_mirrored: IntGauge,
    pub zk_keys_owned: IntGauge,
    pub zk_sessions: IntGauge,
    pub zk_resyncs_total: IntCounter,
    pub zk_applied_zxid: IntGauge,
    pub lease_backed_keys: IntGauge,
    pub lease_keepalives_total: IntCounter,
    pub lease_keepalive_failures_total: IntCounter,
}

impl JobMetrics {
    pub fn job_name(&self) -> &str {
        &self.job
    }

    pub fn repaired(&self, kind: &str, keys: u64) {
        self.repaired_keys_total
            .with_label_values(&[self.job.as_str(), kind])
            .inc_by(keys);
    }

    /// The current state label, for `/status`.
    pub fn state(&self) -> &'static str {
        JobState::ALL
            .into_iter()
            .find(|s| {
                self.job_state
                    .with_label_values(&[self.job.as_str(), s.label()])
                    .get()
                    == 1
            })
            .map_or("unknown", JobState::label)
    }

    pub fn error(&self, kind: &str) {
        self.errors_total
            .with_label_values(&[self.job.as_str(), kind])
            .inc();
    }

    pub fn set_state(&self, state: JobState) {
        {
            let mut since = self
                .watching_since
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match state {
                JobState::Watching => {
                    since.get_or_insert_with(Instant::now);
                }
                _ => *since = None,
            }
        }
        // A job caught in a resync loop keeps running (full sync, watch),
        // but shows the loop until a watch stays up for the stable period.
        let state = match state {
            JobState::Starting | JobState::FullSync | JobState::Watching
                if self.resync_loop.load(Ordering::SeqCst) =>
            {
                JobState::ResyncLoop
            }
            other => other,
        };
        for candidate in JobState::ALL {
            self.job_state
                .with_label_values(&[self.job.as_str(), candidate.label()])
                .set(i64::from(candidate == state));
        }
    }

    /// How long the job has been watching without interruption (`None`
    /// when not watching).
    pub fn watching_for(&self) -> Option<std::time::Duration> {
        self.watching_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .map(|since| since.elapsed())
    }

    /// Enters or leaves the resync loop; the shown state follows at once
    /// (a watching job keeps its watch start).
    pub fn set_resync_loop(&self, looping: bool) {
        self.resync_loop.store(looping, Ordering::SeqCst);
        let shown = self.state();
        if matches!(shown, "watching" | "resync_loop") && self.watching_for().is_some() {
            self.set_state(JobState::Watching);
        }
    }

    pub fn in_resync_loop(&self) -> bool {
        self.resync_loop.load(Ordering::SeqCst)
    }

    /// Counts a full sync the source forced.
    pub fn count_forced_full_sync(&self) {
        self.forced_full_syncs.fetch_add(1, Ordering::SeqCst);
    }

    pub fn forced_full_syncs(&self) -> u64 {
        self.forced_full_syncs.load(Ordering::SeqCst)
    }

    /// Records a committed checkpoint and the source head it is measured against.
    pub fn set_progress(&self, last_synced_revision: i64, source_revision: i64) {
        self.last_synced_revision.set(last_synced_revision);
        if source_revision > self.source_revision.get() {
            self.source_revision.set(source_revision);
        }
        self.lag_revisions
            .set((self.source_revision.get() - last_synced_revision).max(0));
    }
}

/// The `--sync-auth` series: cluster-wide, so no `job` label.
#[derive(Clone)]
pub struct AuthMetrics {
    sync_total: IntCounterVec,
    /// Source users that cannot be created on the destination (no password for them).
    pub users_unsynced: IntGauge,
    pub last_sync_timestamp_seconds: prometheus::Gauge,
}

/// `etcd_syncer_auth_sync_total{result}` values that exist from the start.
pub const AUTH_SYNC_RESULTS: [&str; 5] = [
    "ok",
    "source_unavailable",
    "dest_unavailable",
    "auth",
    "rejected",
];

impl AuthMetrics {
    /// Counts one auth sync pass by its result (`ok` or an error label).
    pub fn pass(&self, result: &str) {
        self.sync_total.with_label_values(&[result]).inc();
    }
}

impl Metrics {
    /// The auth sync series, registered on this registry. Call it once per
    /// registry; a second call returns series that are not exported.
    pub fn auth(&self) -> AuthMetrics {
        let metrics = AuthMetrics {
            sync_total: must(IntCounterVec::new(
                Opts::new(
                    "etcd_syncer_auth_sync_total",
                    "Auth sync passes (--sync-auth) by result: ok, or the error kind",
                ),
                &["result"],
            )),
            users_unsynced: must(IntGauge::new(
                "etcd_syncer_auth_users_unsynced",
                "Source users --sync-auth cannot create on the destination: no password in --auth-passwords-file and no --no-password support (etcd < 3.5)",
            )),
            last_sync_timestamp_seconds: must(prometheus::Gauge::new(
                "etcd_syncer_auth_last_sync_timestamp_seconds",
                "Unix time of the last completed auth sync pass",
            )),
        };
        for result in AUTH_SYNC_RESULTS {
            metrics.sync_total.with_label_values(&[result]);
        }
        let collectors: [Box<dyn prometheus::core::Collector>; 3] = [
            Box::new(metrics.sync_total.clone()),
            Box::new(metrics.users_unsynced.clone()),
            Box::new(metrics.last_sync_timestamp_seconds.clone()),
        ];
        for collector in collectors {
            if let Err(error) = self.registry.register(collector) {
                tracing::debug!(%error, "Auth sync metrics already registered.");
            }
        }
        metrics
    }
}

/// Connection metrics of both sides: the endpoint group in use, each
/// group's health, switches, reconnects, and certificate expiry.
#[derive(Clone)]
pub struct RouteMetrics {
    /// 1 for the endpoint group in use (`priority` 0 is the preferred one).
    pub group_active: IntGaugeVec,
    /// 1 when the group answered its last health check.
    pub group_healthy: IntGaugeVec,
    pub group_switches_total: IntCounterVec,
    pub reconnects_total: IntCounterVec,
    /// Changed TLS or password files not switched to (the old connection stays).
    pub file_changes_refused_total: IntCounterVec,
    pub tls_cert_expiry_timestamp_seconds: prometheus::GaugeVec,
}

impl Metrics {
    /// The connection metrics (registered once; later calls share them).
    pub fn routes(&self) -> RouteMetrics {
        let mut guard = self
            .routes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(metrics) = guard.as_ref() {
            return metrics.clone();
        }
        let metrics = RouteMetrics {
            group_active: must(IntGaugeVec::new(
                Opts::new(
                    "etcd_syncer_endpoint_group_active",
                    "1 for the endpoint group each side uses now; priority 0 is the most preferred",
                ),
                &["side", "group", "priority"],
            )),
            group_healthy: must(IntGaugeVec::new(
                Opts::new(
                    "etcd_syncer_endpoint_group_healthy",
                    "1 when the endpoint group answered its last health check",
                ),
                &["side", "group"],
            )),
            group_switches_total: must(IntCounterVec::new(
                Opts::new(
                    "etcd_syncer_endpoint_group_switches_total",
                    "Switches of the endpoint group in use, by reason (failover, failback)",
                ),
                &["side", "reason"],
            )),
            reconnects_total: must(IntCounterVec::new(
                Opts::new(
                    "etcd_syncer_reconnects_total",
                    "Connections rebuilt without a restart, by reason (files_changed: TLS or password files rotated)",
                ),
                &["side", "reason"],
            )),
            file_changes_refused_total: must(IntCounterVec::new(
                Opts::new(
                    "etcd_syncer_file_changes_refused_total",
                    "Changed TLS or password files not switched to, by reason (invalid: do not load, expired, key not the certificate's; no_answer: the cluster does not answer with them); the old connection stays",
                ),
                &["side", "reason"],
            )),
            tls_cert_expiry_timestamp_seconds: must(prometheus::GaugeVec::new(
                Opts::new(
                    "etcd_syncer_tls_cert_expiry_timestamp_seconds",
                    "Unix time the earliest certificate in the file expires (notAfter), re-read when the file changes",
                ),
                &["side", "file"],
            )),
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 6] = [
            Box::new(metrics.group_active.clone()),
            Box::new(metrics.group_healthy.clone()),
            Box::new(metrics.group_switches_total.clone()),
            Box::new(metrics.reconnects_total.clone()),
            Box::new(metrics.file_changes_refused_total.clone()),
            Box::new(metrics.tls_cert_expiry_timestamp_seconds.clone()),
        ];
        for collector in collectors {
            must(self.registry.register(collector));
        }
        *guard = Some(metrics.clone());
        metrics
    }
}

#[cfg(test)]
mod auth_metrics_tests {
    use super::*;

    #[test]
    fn auth_series_exist_from_the_start() {
        let metrics = Metrics::new();
        let auth = metrics.auth();
        auth.pass("ok");
        auth.users_unsynced.set(2);
        let text = metrics.render();
        assert!(
            text.contains("etcd_syncer_auth_sync_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("etcd_syncer_auth_sync_total{result=\"dest_unavailable\"} 0"));
        assert!(text.contains("etcd_syncer_auth_users_unsynced 2"));
        assert!(text.contains("etcd_syncer_auth_last_sync_timestamp_seconds 0"));
        // A second call does not panic.
        let _ = metrics.auth();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_job_series() {
        let metrics = Metrics::new();
        let job = metrics.job("services");
        job.fast_path_total.inc();
        job.error("source_unavailable");
        job.set_progress(10, 15);
        let text = metrics.render();
        assert!(
            text.contains("etcd_syncer_fast_path_total{job=\"services\"} 1"),
            "{text}"
        );
        assert!(text
            .contains("etcd_syncer_errors_total{job=\"services\",kind=\"source_unavailable\"} 1"));
        assert!(text.contains("etcd_syncer_lag_revisions{job=\"services\"} 5"));
        assert!(text.contains("etcd_syncer_job_state{job=\"services\",state=\"starting\"} 1"));
    }
}
