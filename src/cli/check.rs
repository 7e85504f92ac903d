//! `check`: compare source and destination exactly at the checkpoint revision.

use tokio_util::sync::CancellationToken;

use crate::check::{check, CheckOptions, CheckReport, CheckTarget, LeaseCheck};
use crate::cli::error::AppError;
use crate::config::{CheckArgs, ConfigError, LeaseMode, OutputFormat};
use crate::etcd::client::Cluster;
use crate::model::keys::{KeyRewrite, MetaKeys};
use crate::ops::admin::collect_status;

/// `etcd-syncer check`: true when the destination is consistent.
pub async fn run_check(args: CheckArgs) -> Result<bool, AppError> {
    args.validate()?;
    if let Some(url) = args.zk_source.clone() {
        return check_zookeeper(args, &url).await;
    }
    let source =
        Cluster::connect(&args.source.flags().into_settings()?, args.request_timeout).await?;
    let dest = Cluster::connect(&args.dest.flags().into_settings()?, args.request_timeout).await?;
    let (job, prefix, dest_prefix) = match (&args.prefix, &args.job_name) {
        (Some(prefix), job) => {
            let job = job
                .clone()
                .unwrap_or_else(|| crate::model::keys::job_name_from_prefix(prefix));
            let dest_prefix = if args.no_dest_prefix {
                String::new()
            } else {
                args.dest_prefix.clone().unwrap_or_else(|| prefix.clone())
            };
            // A job the destination has never heard of is a wrong name (or
            // --meta-prefix), not a first full sync in progress: the error
            // names the jobs there are.
            collect_status(&dest, &args.meta_prefix, Some(&job)).await?;
            (job, prefix.clone(), dest_prefix)
        }
        (None, Some(job)) => {
            let status = collect_status(&dest, &args.meta_prefix, Some(job))
                .await?
                .remove(0);
            if let (Some(exact), Some(at)) = (&status.revision_exact, status.last_synced_revision) {
                let report = crate::check::exact::check_exact(
                    &source,
                    &dest,
                    args.meta_prefix.as_bytes(),
                    (at, exact.checkpoint_written_at, exact.dest_revision),
                    &exact.caught_up,
                    status.promoted,
                    args.history_samples,
                )
                .await?;
                match args.output {
                    OutputFormat::Json => println!(
                        "{}",
                        serde_json::to_string_pretty(&report).unwrap_or_default()
                    ),
                    OutputFormat::Text => print!("{}", render_exact(job, &report)),
                }
                return Ok(report.is_consistent());
            }
            let prefix = status.source_prefix.ok_or(ConfigError::Missing {
                field: "--prefix".into(),
                fix: "the job has no checkpoint that records its prefix yet; give --prefix (and --dest-prefix if it differs)",
            })?;
            let dest_prefix = status.dest_prefix.unwrap_or_else(|| prefix.clone());
            (job.clone(), prefix, dest_prefix)
        }
        (None, None) => unreachable!("clap requires --prefix or --job-name"),
    };
    crate::config::check_exclude_prefixes("--exclude-prefix", &prefix, &args.exclude_prefixes)?;
    let target = CheckTarget {
        keys: MetaKeys::new(&args.meta_prefix, &job),
        job: job.clone(),
        rewrite: KeyRewrite::new(prefix.as_bytes(), dest_prefix.as_bytes())
            .excluding(&args.exclude_prefixes),
        meta_prefix: args.meta_prefix.as_bytes().to_vec(),
        leases: match args.leases.unwrap_or_default() {
            LeaseMode::Faithful => LeaseCheck::Mirrored,
            LeaseMode::Strip => LeaseCheck::Unleased,
        },
    };
    let options = CheckOptions {
        page_size: args.page_size.clamp(1, 100_000),
        sample_limit: args.sample_size,
        ..CheckOptions::default()
    };
    let report = check(&source, &dest, &target, options, &CancellationToken::new()).await?;
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
        OutputFormat::Text => print!("{}", render_check(&report)),
    }
    Ok(report.is_consistent())
}

fn render_exact(job: &str, report: &crate::check::exact::ExactCheckReport) -> String {
    let mut out = format!(
        "job {job}: revision-exact, checkpoint at source revision {}\n",
        report.checkpoint
    );
    out.push_str(&match (report.parity, report.promoted) {
        (true, _) => format!(
            "parity: holds (the destination is at revision {})\n",
            report.dest_revision
        ),
        (false, true) => format!(
            "parity: promoted (the standby's own revisions follow {}; it is at {})\n",
            report.checkpoint, report.dest_revision
        ),
        (false, false) => format!(
            "parity: LOST (checkpoint written at destination revision {}, destination at {})\n",
            report.checkpoint_written_at, report.dest_revision
        ),
    });
    out.push_str(&format!(
        "at {}: {} keys compared with value, create/mod revision, version and lease: {} missing, {} extra, {} with another value, {} with other metadata\n",
        report.checkpoint, report.keys, report.missing, report.extra, report.values, report.metadata
    ));
    if report.inexact > 0 {
        out.push_str(&format!(
            "{} keys metadata-inexact (same value and lease; revisions or version written by a catch-up over compacted history)\n",
            report.inexact
        ));
    }
    out.push_str(&format!(
        "history: {} revisions sampled, {} differ{}\n",
        report.history_sampled.len(),
        report.history_differs.len(),
        if report.history_differs.is_empty() {
            String::new()
        } else {
            format!(" ({:?})", report.history_differs)
        }
    ));
    footer(&mut out, &report.examples, report.is_consistent());
    out
}

/// Sample keys, then the verdict line.
fn footer(out: &mut String, examples: &[String], consistent: bool) {
    for example in examples {
        out.push_str(&format!("  {example}\n"));
    }
    out.push_str(if consistent {
        "consistent\n"
    } else {
        "INCONSISTENT\n"
    });
}

/// A zk2etcd job's tree against its prefix, as `check` prints it.
fn render_zk(prefix: &crate::model::zk::ZkPrefix, report: &crate::model::zk::TreeReport) -> String {
    let mut out = format!(
        "zookeeper {} against etcd {}: {} nodes; {} missing, {} extra, {} differ; {} keys held by another writer\n",
        prefix.zk,
        String::from_utf8_lossy(&prefix.dest),
        report.nodes,
        report.missing,
        report.extra,
        report.differ,
        report.foreign
    );
    footer(&mut out, &report.examples, report.is_consistent());
    out
}

fn render_check(report: &CheckReport) -> String {
    let how = if report.exact {
        "exact, at the checkpoint revision"
    } else {
        "APPROXIMATE: the checkpoint revision is compacted on the source; compared with the current source and re-checked"
    };
    let mut out = format!(
        "job {}: {} at source revision {} (destination revision {}; {how})\n  source keys {}, destination keys {}, {:.2} s\n",
        report.job,
        if report.is_consistent() { "consistent" } else { "DIFFERENT" },
        report.source_revision,
        report.dest_revision,
        report.source_keys,
        report.dest_keys,
        report.duration_seconds
    );
    if report.held > 0 {
        out.push_str(&format!(
            "  {} destination keys held by zk2etcd: not the job's, left out of the comparison\n",
            report.held
        ));
    }
    if !report.is_consistent() {
        out.push_str(&format!(
            "  dst miss (missing on the destination): {}\n  src miss (only on the destination):    {}\n  mismatch (values differ):              {}\n  lease mismatch (same value, lease not mirrored): {}\n",
            report.dst_miss, report.src_miss, report.mismatch, report.lease_mismatch
        ));
        for (label, samples) in [
            ("dst miss", &report.samples.dst_miss),
            ("src miss", &report.samples.src_miss),
            ("mismatch", &report.samples.mismatch),
            ("lease mismatch", &report.samples.lease_mismatch),
        ] {
            if !samples.is_empty() {
                out.push_str(&format!("  sample {label}: {}\n", samples.join(", ")));
            }
        }
    }
    out
}

/// `check --source zookeeper://…`: a zk2etcd job's tree against its prefix.
async fn check_zookeeper(args: CheckArgs, url: &str) -> Result<bool, AppError> {
    let (servers, path) = crate::config::zk::parse_zk_source("--source", url)?;
    let prefix =
        crate::config::zk::zk_prefix(&path, args.dest_prefix.as_deref(), &args.exclude_prefixes);
    let job = crate::config::ZkJob {
        name: args.job_name.clone().unwrap_or_else(|| "zk2etcd".into()),
        servers,
        digest: crate::config::zk::digest("--zk-digest", args.zk_digest.as_deref())?,
        tls: args.zk_tls.read()?,
        prefixes: vec![prefix.clone()],
        ephemeral: crate::config::EphemeralMode::Lease,
        ephemeral_ttl: std::time::Duration::from_secs(40),
        session_timeout: args.request_timeout.max(std::time::Duration::from_secs(4)),
        resync_interval: std::time::Duration::from_secs(300),
        max_prune_ratio: 0.0,
    };
    let dest = Cluster::connect(&args.dest.flags().into_settings()?, args.request_timeout).await?;
    let report =
        crate::ops::zk_check::check_tree(&job, &dest, &MetaKeys::new(&args.meta_prefix, &job.name))
            .await?;
    match args.output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
        OutputFormat::Text => print!("{}", render_zk(&prefix, &report)),
    }
    Ok(report.is_consistent())
}
