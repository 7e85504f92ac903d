//! `promote`: turn the standby into a primary (or, with `--undo`, back).

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::check::{check, CheckOptions, CheckReport, CheckTarget, LeaseCheck};
use crate::cli::error::AppError;
use crate::config::{OutputFormat, PromoteArgs};
use crate::etcd::client::Cluster;
use crate::model::keys::{KeyRewrite, MetaKeys};
use crate::ops::admin::{collect_status, detach_leases, promote, undo_promote, wait_for_sync};
use crate::ops::point_in_time::{promote_at, PointTarget};

/// Keys per page when a point-in-time promotion reads the prefix.
const RESTORE_PAGE: usize = 1000;

/// `etcd-syncer promote`.
pub async fn run_promote(args: PromoteArgs) -> Result<(), AppError> {
    args.validate()?;
    let dest_settings = args.dest.flags().into_settings()?;
    let source_settings = args.source.flags().into_optional_settings()?;
    let dest = Cluster::connect(&dest_settings, args.request_timeout).await?;
    let source = match &source_settings {
        Some(settings) => Some(Cluster::connect(settings, args.request_timeout).await?),
        None => None,
    };
    let jobs: Vec<String> = match &args.job_name {
        Some(job) => collect_status(&dest, &args.meta_prefix, Some(job))
            .await?
            .into_iter()
            .map(|s| s.job)
            .collect(),
        None => collect_status(&dest, &args.meta_prefix, None)
            .await?
            .into_iter()
            .map(|s| s.job)
            .collect(),
    };
    crate::cli::auth::sync_auth_before_promote(
        &args.auth,
        args.undo,
        &args.meta_prefix,
        source_settings.as_ref(),
        &dest_settings,
        &dest,
        args.request_timeout,
    )
    .await?;
    let by = crate::config::default_instance_id();
    let target = match (args.at_source_revision, args.at_time) {
        (Some(revision), _) => Some(PointTarget::SourceRevision(revision)),
        (None, Some(at)) => Some(PointTarget::Time(
            at,
            humantime::format_rfc3339(at).to_string(),
        )),
        (None, None) => None,
    };
    let mut outcomes = Vec::new();
    for job in &jobs {
        let outcome = if args.undo {
            undo_promote(&dest, &args.meta_prefix, job).await?
        } else {
            if let (true, Some(source)) = (args.wait_for_sync, &source) {
                let reached =
                    wait_for_sync(&dest, source, &args.meta_prefix, job, args.wait_timeout).await?;
                info!(%job, checkpoint = reached, "Destination caught up with the source.");
            }
            let mut outcome = match &target {
                Some(target) => {
                    promote_at(
                        &dest,
                        &args.meta_prefix,
                        job,
                        &by,
                        target,
                        RESTORE_PAGE,
                        &CancellationToken::new(),
                    )
                    .await?
                }
                None => promote(&dest, &args.meta_prefix, job, &by).await?,
            };
            if args.detach_leases {
                outcome.detached = Some(detach_leases(&dest, &args.meta_prefix, job).await?);
            }
            // The check compares with the source at the checkpoint, which a
            // point-in-time promotion went back from.
            if let (Some(source), None) = (&source, &target) {
                outcome.consistency =
                    promoted_consistency(source, &dest, &args.meta_prefix, job).await;
            }
            outcome
        };
        outcomes.push(outcome);
    }
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&outcomes).unwrap_or_default()
        ),
        OutputFormat::Text => {
            for outcome in &outcomes {
                println!(
                    "job {}: {}; final checkpoint revision {}",
                    outcome.job,
                    outcome.action,
                    outcome
                        .final_checkpoint_revision
                        .map_or_else(|| "none".to_string(), |r| r.to_string())
                );
                if let Some(point) = outcome
                    .promotion
                    .as_ref()
                    .and_then(|r| r.point_in_time.as_ref())
                {
                    println!(
                        "job {}: point in time ({}): restored source revision {} read at destination revision {}: {} puts, {} deletes, {} skipped (changed on the promoted cluster since read), {} restored without their lease (it no longer exists)",
                        outcome.job,
                        point.requested,
                        point.source_revision,
                        point.read_dest_revision,
                        point.puts,
                        point.deletes,
                        point.skipped,
                        point.leases_dropped
                    );
                }
                if let Some(detached) = &outcome.detached {
                    println!(
                        "job {}: detached {} keys from their mirrored leases; {} skipped (changed on the promoted cluster since read); {} lease records removed",
                        outcome.job, detached.detached, detached.skipped, detached.records_deleted
                    );
                }
            }
        }
    }
    Ok(())
}

/// The exact check right after promotion: what the new primary holds
/// compared with the old one at the final checkpoint. Best effort: the
/// source may be gone, which is why one promotes.
async fn promoted_consistency(
    source: &Cluster,
    dest: &Cluster,
    meta_prefix: &str,
    job: &str,
) -> Option<CheckReport> {
    let status = collect_status(dest, meta_prefix, Some(job))
        .await
        .ok()?
        .pop()?;
    let prefix = status.source_prefix?;
    let dest_prefix = status.dest_prefix.unwrap_or_else(|| prefix.clone());
    let target = CheckTarget {
        job: job.to_string(),
        rewrite: KeyRewrite::new(prefix.as_bytes(), dest_prefix.as_bytes()),
        keys: MetaKeys::new(meta_prefix, job),
        meta_prefix: meta_prefix.as_bytes().to_vec(),
        // After a promotion the leases are the promoted cluster's own.
        leases: LeaseCheck::Ignore,
    };
    match check(
        source,
        dest,
        &target,
        CheckOptions::default(),
        &CancellationToken::new(),
    )
    .await
    {
        Ok(report) => Some(report),
        Err(error) => {
            warn!(%job, %error, "No consistency summary after promotion.");
            None
        }
    }
}
