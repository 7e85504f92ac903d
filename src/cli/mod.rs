//! One file per command; each `run_*` returns an [`AppError`], whose
//! [`AppError::exit_code`] `main` exits with.
//!
//! - [`mirror`]: `mirror-plus` (and `--validate-config`).
//! - [`status`], [`promote`], [`check`], [`reset`], [`failback`]: the operator commands.
//! - [`auth`]: `promote --sync-auth`'s auth pass.

pub mod auth;
pub mod check;
pub mod error;
pub mod failback;
pub mod mirror;
pub mod promote;
pub mod reset;
pub mod status;
pub mod zk2etcd;

pub use check::run_check;
pub use failback::run_failback;
pub use mirror::{run_mirror, validate_config};
pub use promote::run_promote;
pub use reset::run_reset;
pub use status::run_status;
pub use zk2etcd::run_zk2etcd;

pub use error::AppError;
