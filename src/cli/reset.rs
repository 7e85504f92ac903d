//! `reset`: request one full sync per job, consumed by the job's next leader.

use crate::cli::error::AppError;
use crate::config::ResetArgs;
use crate::etcd::client::Cluster;
use crate::mirror::{request_reset, JobError};
use crate::model::keys::MetaKeys;
use crate::ops::admin::collect_status;

/// `etcd-syncer reset`: leaves a reset request for each chosen job.
pub async fn run_reset(args: ResetArgs) -> Result<(), AppError> {
    let request_timeout = args.request_timeout;
    let (job_name, all) = (args.job_name.clone(), args.all);
    let (dest_settings, meta_prefix, configured) = args.resolve()?;
    let dest = Cluster::connect(&dest_settings, request_timeout).await?;
    let jobs: Vec<String> = match (job_name, all) {
        (Some(job), _) => vec![job],
        (None, _) if !configured.is_empty() => configured,
        (None, _) => collect_status(&dest, &meta_prefix, None)
            .await?
            .into_iter()
            .map(|s| s.job)
            .collect(),
    };
    let instance = crate::config::default_instance_id();
    for job in jobs {
        match request_reset(&dest, &MetaKeys::new(&meta_prefix, &job), &instance).await {
            Ok(()) => println!("job {job}: reset requested; the leader drops the checkpoint and runs one full sync"),
            Err(JobError::Promoted) => println!("job {job}: promoted, not reset"),
            Err(JobError::Client(error)) => return Err(error.into()),
            Err(other) => return Err(AppError::Job { job, source: other }),
        }
    }
    Ok(())
}
