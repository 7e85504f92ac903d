//! What a command can fail with, and the exit code each failure means.

use crate::config::ConfigError;
use crate::etcd::client::{ClientError, FailureKind};
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
}

impl AppError {
    /// Exit code 2 for anything an operator fixes in the configuration.
    pub fn exit_code(&self) -> i32 {
        match self {
            AppError::Config(_) | AppError::Bind(_) => 2,
            AppError::Job { source, .. } => i32::from(source.policy().exit_code),
            AppError::Client(error) if error.kind() == FailureKind::Rejected => 2,
            AppError::Admin(
                AdminError::NoJobs { .. }
                | AdminError::UnknownJob { .. }
                | AdminError::OutsideWindow { .. },
            ) => 2,
            AppError::AuthSync(error) if error.label() == "rejected" => 2,
            AppError::Failback(error) if error.is_usage() => 2,
            AppError::Failback(crate::ops::failback::FailbackError::Client(error))
                if error.kind() == FailureKind::Rejected =>
            {
                2
            }
            _ => 1,
        }
    }
}
