//! Command line, config file and environment, merged and validated into
//! [`Settings`]. Flags override the file; every flag can also come from an
//! `ETCD_SYNCER_*` variable. Anything wrong here is a [`ConfigError`], which
//! `main` turns into exit code 2.
//!
//! - [`args`]: the clap structs of every subcommand.
//! - [`table`]: every global setting declared once (flag, variable, file
//!   key, default, rule, place, reload); flags, file keys, merge, reload
//!   plan and reference derive from it.
//! - [`file`]: the config file's sections (sides, jobs).
//! - [`settings`]: the validated result and its defaults.
//! - [`validation`]: flags + file into settings, and the checks between settings.

pub mod args;
pub mod error;
pub mod file;
pub mod reload;
pub mod settings;
pub mod table;
pub mod validation;
pub mod zk;

pub use crate::model::Side;
pub use crate::telemetry::LogFormat;

pub use args::{
    CheckArgs, Cli, Command, DestArgs, FailbackArgs, MirrorArgs, OutputFormat, PromoteArgs,
    PromoteAuthArgs, ResetArgs, SourceArgs, StatusArgs, TelemetryArgs, Zk2EtcdArgs,
};
pub use file::{FileCluster, FileJob};
pub use settings::{
    default_instance_id, AuthPasswords, AuthSyncSettings, CheckSettings, ClusterSettings,
    Compression, Credentials, EphemeralMode, ExactGap, JobSettings, LeaseMode, LeaseSettings,
    Settings, TlsFiles, Tuning, TxnLimits, WriteRateLimit, ZkJob, DEFAULT_CHECK_INTERVAL,
    DEFAULT_LOCK_TTL, DEFAULT_MAX_PRUNE_RATIO, DEFAULT_MAX_TXN_BYTES, DEFAULT_MAX_TXN_OPS,
    DEFAULT_META_PREFIX, DEFAULT_METRICS_ADDR, DEFAULT_REBALANCE_INTERVAL, MAX_CHECK_INTERVAL,
    MAX_LEASE_GRACE, MAX_LIVENESS_TIMEOUT, MAX_LOCK_TTL, MAX_PIPELINE_SPACING,
    MAX_PROGRESS_INTERVAL, MAX_REBALANCE_INTERVAL, MAX_REQUEST_TIMEOUT, MAX_WAIT_TIMEOUT,
    MAX_WATCH_IDLE_TIMEOUT, MIN_LEASE_GRACE,
};
pub use table::{load_file, FileConfig};
pub use validation::{
    check_exclude_prefixes, check_tls_files, load_auth_passwords, loop_error, parse_auth_passwords,
    read_password_file, ConfigError,
};
