//! A configuration that cannot work: which field, and how to fix it
//! (exit code 2).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{field} is required: {fix}")]
    Missing {
        field: &'static str,
        fix: &'static str,
    },
    #[error("{field} = {value:?} is invalid: {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
    #[error("{fields} conflict: {reason}")]
    Conflict { fields: String, reason: String },
    #[error("cannot read {field} file {path}: {source}")]
    ReadFile {
        field: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}
