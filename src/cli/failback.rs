//! `failback`: copy the promoted standby back to the old primary (see
//! [`crate::ops::failback`]).

use tokio_util::sync::CancellationToken;

use crate::cli::error::AppError;
use crate::config::{FailbackArgs, LeaseMode, OutputFormat};
use crate::etcd::client::Cluster;
use crate::ops::failback::{
    check_lost_writes_file, failback, FailbackJob, FailbackOptions, FailbackReport, Method,
};

/// `etcd-syncer failback`.
pub async fn run_failback(args: FailbackArgs, cancel: CancellationToken) -> Result<(), AppError> {
    let settings = args.job.into_settings()?;
    // Before connecting, let alone fencing anything.
    if let (Some(path), false) = (&args.lost_writes_file, args.dry_run) {
        check_lost_writes_file(path, false)?;
    }
    let old_primary = Cluster::connect(&settings.source, settings.tuning.request_timeout).await?;
    let standby = Cluster::connect(&settings.destination, settings.tuning.request_timeout).await?;
    let mut reports = Vec::new();
    for (index, job) in settings.jobs.iter().enumerate() {
        let failback_job = FailbackJob {
            name: job.name.clone(),
            prefix: job.prefix.clone(),
            dest_prefix: job.dest_prefix.clone(),
            meta_prefix: settings.meta_prefix.clone(),
            exclude_prefixes: job.exclude_prefixes.clone(),
            page_size: settings.tuning.page_size,
            max_txn_ops: settings.limits.max_ops,
            max_txn_bytes: settings.limits.max_bytes,
            leases_faithful: settings.leases.mode == LeaseMode::Faithful,
        };
        let options = FailbackOptions {
            dry_run: args.dry_run,
            lost_writes_file: args.lost_writes_file.clone(),
            append_lost_writes: index > 0,
            instance: settings.instance_id.clone(),
        };
        let report = failback(&old_primary, &standby, &failback_job, &options, &cancel).await?;
        if args.output == OutputFormat::Text {
            print!("{}", render(&report));
        }
        reports.push(report);
    }
    if args.output == OutputFormat::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).unwrap_or_default()
        );
    }
    if args.dry_run {
        for report in &reports {
            for lost in &report.lost {
                println!("{}", serde_json::to_string(lost).unwrap_or_default());
            }
        }
    }
    Ok(())
}

fn render(report: &FailbackReport) -> String {
    let known = |n: Option<usize>| n.map_or_else(|| "unknown".to_string(), |n| n.to_string());
    let method = match &report.method {
        Method::History => "from both histories".to_string(),
        Method::Diff { reason } => format!("by the full diff ({reason})"),
    };
    let mut out = format!(
        "job {}: {}dirty keys found {method}: old primary changed {} after revision {}, standby changed {} since promotion; {} compared\n",
        report.job,
        if report.dry_run { "dry run, nothing changed: " } else { "" },
        known(report.old_primary_changed),
        report.checkpoint,
        known(report.standby_changed),
        report.candidates,
    );
    out.push_str(&format!(
        "job {}: {} puts and {} deletes {} the old primary; {} lost writes{}{}\n",
        report.job,
        report.puts,
        report.deletes,
        if report.dry_run {
            "would go to"
        } else {
            "written to"
        },
        report.lost_writes,
        if report.possible_lost_writes > 0 {
            format!(
                " and {} possible ones the compacted histories cannot confirm",
                report.possible_lost_writes
            )
        } else {
            String::new()
        },
        report
            .lost_writes_file
            .as_ref()
            .map_or_else(String::new, |p| format!(" saved to {}", p.display())),
    ));
    if report.written_without_lease > 0 {
        out.push_str(&format!(
            "job {}: {} keys were on a lease on the standby and are written without one\n",
            report.job, report.written_without_lease
        ));
    }
    out.push_str(&format!(
        "job {}: read {} bytes from the old primary and {} from the standby",
        report.job, report.bytes_read_old_primary, report.bytes_read_standby
    ));
    match report.final_old_primary_revision {
        Some(revision) => out.push_str(&format!(
            "; the old primary holds the standby's state at revision {} (checkpoint written at its revision {revision}): reverse replication resumes from there\n",
            report.standby_revision
        )),
        None => out.push('\n'),
    }
    out
}
