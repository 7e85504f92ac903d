//! What a command can fail with, and the exit code each failure means.

use crate::config::ConfigError;
use crate::etcd::client::ClientError;
use crate::mirror::JobError;
use crate::ops::admin::AdminError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bind(#[from] crate::ops::http::BindError),
    #[error("job {job}: {source}")]
    Job {
        job: String,
        #[source]
        source: JobError,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Check(#[from] crate::check::CheckError),
    #[error(transparent)]
    AuthSync(#[from] crate::ha::auth_sync::AuthSyncError),
    #[error(transparent)]
    Failback(#[from] crate::ops::failback::FailbackError),
    #[error(transparent)]
    Zk(#[from] crate::mirror::zk2etcd::ZkError),
}

impl AppError {
    /// One policy for every command (docs/operations.md, "Exit codes"):
    /// 2 when the command could not do what was asked — the configuration,
    /// the request, or a cluster that does not answer or refuses it; 1 when
    /// it ran and the answer is a failure (a job stopped, a failback found
    /// a writer, `check` found differences).
    pub fn exit_code(&self) -> i32 {
        match self {
            AppError::Config(_) | AppError::Bind(_) => 2,
            AppError::Job { source, .. } => i32::from(source.policy().exit_code),
            AppError::Client(_) => 2,
            AppError::Admin(AdminError::Client(_)) => 2,
            AppError::Admin(AdminError::Page(crate::etcd::pager::PageError::Client(_))) => 2,
            AppError::Admin(
                AdminError::NoJobs { .. }
                | AdminError::UnknownJob { .. }
                | AdminError::OutsideWindow { .. }
                | AdminError::NotReached { .. },
            ) => 2,
            AppError::Check(_) | AppError::Zk(_) => 2,
            AppError::AuthSync(error) if error.label() == "rejected" => 2,
            AppError::Failback(error) if error.is_usage() => 2,
            AppError::Failback(crate::ops::failback::FailbackError::Client(_)) => 2,
            _ => 1,
        }
    }
}
