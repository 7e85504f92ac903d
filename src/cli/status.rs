//! `status`: each job's leader, checkpoint and lag, from the destination's meta keys.

use crate::cli::error::AppError;
use crate::config::{OutputFormat, StatusArgs};
use crate::etcd::client::Cluster;
use crate::ops::admin::{add_history_window, add_source_lag, collect_status, render_text};

/// `etcd-syncer status`.
pub async fn run_status(args: StatusArgs) -> Result<(), AppError> {
    args.validate()?;
    let dest_settings = args.dest.flags().into_settings()?;
    let source_settings = args.source.flags().into_optional_settings()?;
    let dest = Cluster::connect(&dest_settings, args.request_timeout).await?;
    let mut statuses = collect_status(&dest, &args.meta_prefix, args.job_name.as_deref()).await?;
    add_history_window(&dest, &args.meta_prefix, &mut statuses).await?;
    if let Some(source_settings) = source_settings {
        let source = Cluster::connect(&source_settings, args.request_timeout).await?;
        add_source_lag(&source, &mut statuses).await?;
    }
    match args.output {
        OutputFormat::Text => print!("{}", render_text(&statuses)),
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&statuses).unwrap_or_default()
        ),
    }
    Ok(())
}
