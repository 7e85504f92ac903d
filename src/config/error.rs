//! A configuration that cannot work: which field, and how to fix it
//! (exit code 2).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{field} is required: {fix}")]
    Missing { field: String, fix: &'static str },
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

/// A value that breaks its rule: the field the operator has to edit, what it
/// holds, and why it cannot work.
pub(super) fn invalid(field: &str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// How a setting is named in errors: its flag, or its key when the value
/// came from the config file.
pub(super) fn origin(name: &str, from_flag: bool) -> String {
    if from_flag {
        format!("--{name}")
    } else {
        format!("{name} (config file)")
    }
}

/// A setting that needs another one given with it.
pub(super) fn missing(field: impl Into<String>, fix: &'static str) -> ConfigError {
    ConfigError::Missing {
        field: field.into(),
        fix,
    }
}
