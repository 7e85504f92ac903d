//! The leader's periodic consistency check. It lives in the Watching phase
//! only: it starts when the watch starts and stops with it, so it never runs
//! during a full sync or on a promoted job, and its results (the repairs)
//! cannot outlive the phase that asked for them.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::check::{check, CheckError, CheckOptions, CheckReport, CheckTarget};
use crate::etcd::periodic::{First, Rounds};
use crate::mirror::context::JobContext;

pub fn target_of(ctx: &JobContext) -> CheckTarget {
    CheckTarget {
        job: ctx.job.name.clone(),
        rewrite: ctx.rewrite.clone(),
        keys: ctx.keys.clone(),
        meta_prefix: ctx.meta_prefix.clone(),
        leases: match ctx.lease_settings.mode {
            crate::config::LeaseMode::Faithful => crate::check::LeaseCheck::Mirrored,
            crate::config::LeaseMode::Strip => crate::check::LeaseCheck::Unleased,
        },
    }
}

/// Every `--check-interval`: results to the gauges and the log; with
/// `--check-repair`, exact reports with differences to the returned channel
/// (one at a time: a report waiting to be repaired is not joined by another).
///
/// # Cancel-Safety
/// Cancel-safe: a check interrupted half-way records nothing.
pub fn spawn(ctx: JobContext, cancel: CancellationToken) -> mpsc::Receiver<CheckReport> {
    let (reports, receiver) = mpsc::channel(1);
    if ctx.checks.interval.is_zero() {
        return receiver;
    }
    tokio::spawn(async move {
        let target = target_of(&ctx);
        let options = CheckOptions {
            page_size: ctx.tuning.page_size,
            sample_limit: ctx.checks.sample_size,
            ..CheckOptions::default()
        };
        let mut rounds = Rounds::new(ctx.checks.interval, First::AfterOnePeriod, &cancel);
        while rounds.next().await {
            let Some(checked) = rounds
                .run(check(&ctx.source, &ctx.dest, &target, options, &cancel))
                .await
            else {
                return;
            };
            let report = match checked {
                Ok(report) => report,
                Err(CheckError::Cancelled) => return,
                Err(
                    error @ (CheckError::FullSyncInProgress { .. }
                    | CheckError::NoCheckpoint { .. }
                    | CheckError::PartialRevision { .. }),
                ) => {
                    tracing::info!(job = %ctx.job.name, %error, "Consistency check skipped.");
                    continue;
                }
                Err(error) => {
                    ctx.metrics.error("check_failed");
                    tracing::warn!(job = %ctx.job.name, %error, "Consistency check failed; trying again next interval.");
                    continue;
                }
            };
            if cancel.is_cancelled() {
                return;
            }
            record(&ctx, &report);
            if ctx.checks.repair && report.exact && !report.is_consistent() {
                // Full means a repair is already pending; the next check sees what is left.
                let _ = reports.try_send(report);
            }
        }
    });
    receiver
}

fn record(ctx: &JobContext, report: &CheckReport) {
    let metrics = &ctx.metrics;
    metrics.dst_miss_keys.set(report.dst_miss as i64);
    metrics.src_miss_keys.set(report.src_miss as i64);
    metrics.mismatch_keys.set(report.mismatch as i64);
    metrics
        .lease_mismatch_keys
        .set(report.lease_mismatch as i64);
    metrics.check_exact.set(i64::from(report.exact));
    metrics.check_duration_seconds.set(report.duration_seconds);
    metrics
        .check_source_read_bytes_total
        .inc_by(report.source_bytes_read);
    metrics
        .check_dest_read_bytes_total
        .inc_by(report.dest_bytes_read);
    let now = crate::telemetry::clock::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    metrics.check_last_success_timestamp_seconds.set(now);
    if report.is_consistent() {
        tracing::info!(
            job = %report.job,
            source_revision = report.source_revision,
            keys = report.source_keys,
            exact = report.exact,
            duration_seconds = report.duration_seconds,
            // What each run costs across the link, every --check-interval.
            source_bytes_read = report.source_bytes_read,
            dest_bytes_read = report.dest_bytes_read,
            "Consistency check passed."
        );
    } else {
        tracing::error!(
            job = %report.job,
            source_revision = report.source_revision,
            exact = report.exact,
            dst_miss = report.dst_miss,
            src_miss = report.src_miss,
            mismatch = report.mismatch,
            lease_mismatch = report.lease_mismatch,
            sample_dst_miss = ?report.samples.dst_miss,
            sample_src_miss = ?report.samples.src_miss,
            sample_mismatch = ?report.samples.mismatch,
            sample_lease_mismatch = ?report.samples.lease_mismatch,
            repair = ctx.checks.repair,
            "Consistency check found differences."
        );
    }
}
