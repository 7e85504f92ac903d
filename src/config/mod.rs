//! Command line, config file and environment, merged and validated into
//! [`Settings`]. Flags override the file; every flag can also come from an
//! `ETCD_SYNCER_*` variable. Anything wrong here is a [`ConfigError`], which
//! `main` turns into exit code 2.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

pub use crate::model::Side;
pub use crate::telemetry::LogFormat;
use crate::model::keys::{is_valid_job_name, job_name_from_prefix, prefixes_overlap};

pub const DEFAULT_META_PREFIX: &str = "/-etcd-syncer-meta-/";
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
pub const DEFAULT_MAX_TXN_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_MAX_PRUNE_RATIO: f64 = 0.5;
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9091";
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(5);
pub const DEFAULT_REBALANCE_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(300);

#[derive(Debug, Parser)]
#[command(
    name = "etcd-syncer",
    version,
    about = "Mirror etcd key prefixes from a primary cluster to a hot standby"
)]
pub struct Cli {
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replicate prefixes: full sync at a pinned revision, then watch, with a
    /// checkpoint on the destination so restarts resume where they stopped.
    MirrorPlus(Box<MirrorArgs>),
    /// Print each job's leader, checkpoint, full-sync state and (with
    /// --src-endpoints) lag, from the destination's meta keys.
    Status(Box<StatusArgs>),
    /// Turn the standby into a primary: from the marker on, no replicator
    /// writes to the job's destination prefix. `--undo` removes it (failback).
    Promote(Box<PromoteArgs>),
    /// Compare source and destination exactly at the checkpoint revision.
    /// Exit code 0 consistent, 1 differences, 2 error.
    Check(Box<CheckArgs>),
    /// Request one full sync per job (what --reset-last-synced-rev does),
    /// consumed by whichever replica leads the job next. For one-off repairs,
    /// e.g. from a Kubernetes Job, without restarting the replicas.
    Reset(Box<ResetArgs>),
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    /// Take the destination and the jobs from this config file (flags override it).
    #[arg(long, env = "ETCD_SYNCER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub dest: DestArgs,
    /// The job to reset.
    #[arg(long, conflicts_with = "all", required_unless_present = "all")]
    pub job_name: Option<String>,
    /// Every job of the config file, or every job found under the meta prefix.
    #[arg(long)]
    pub all: bool,
    #[arg(long, env = "ETCD_SYNCER_META_PREFIX")]
    pub meta_prefix: Option<String>,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s", env = "ETCD_SYNCER_REQUEST_TIMEOUT")]
    pub request_timeout: Duration,
}

impl ResetArgs {
    /// The destination, the meta prefix and the configured job names
    /// (empty without a config file).
    pub fn resolve(self) -> Result<(ClusterSettings, String, Vec<String>), ConfigError> {
        let file = match &self.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let destination = cluster_settings(
            Side::Destination,
            self.dest.flags(),
            file.destination.unwrap_or_default(),
        )?;
        let meta_prefix = self
            .meta_prefix
            .or(file.meta_prefix)
            .unwrap_or_else(|| DEFAULT_META_PREFIX.to_string());
        let jobs = file
            .jobs
            .into_iter()
            .map(|job| {
                job.name
                    .unwrap_or_else(|| job_name_from_prefix(&job.prefix))
            })
            .collect();
        Ok((destination, meta_prefix, jobs))
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub dest: DestArgs,
    /// Source prefix of the job (default: read from the job's checkpoint).
    #[arg(long, env = "ETCD_SYNCER_PREFIX")]
    pub prefix: Option<String>,
    /// Destination prefix (default: the same as --prefix).
    #[arg(long, requires = "prefix", conflicts_with = "no_dest_prefix")]
    pub dest_prefix: Option<String>,
    /// The job mirrors to the root of the destination.
    #[arg(long, requires = "prefix")]
    pub no_dest_prefix: bool,
    /// The job whose checkpoint pins the comparison (default: derived from --prefix).
    #[arg(long, env = "ETCD_SYNCER_JOB_NAME", required_unless_present = "prefix")]
    pub job_name: Option<String>,
    #[arg(long, env = "ETCD_SYNCER_META_PREFIX", default_value = DEFAULT_META_PREFIX)]
    pub meta_prefix: String,
    /// Sample keys printed for each kind of difference.
    #[arg(long, default_value = "10")]
    pub sample_size: usize,
    #[arg(long, default_value = "2000")]
    pub page_size: usize,
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s", env = "ETCD_SYNCER_REQUEST_TIMEOUT")]
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub dest: DestArgs,
    #[command(flatten)]
    pub source: SourceArgs,
    /// Only this job.
    #[arg(long, env = "ETCD_SYNCER_JOB_NAME")]
    pub job_name: Option<String>,
    #[arg(long, env = "ETCD_SYNCER_META_PREFIX", default_value = DEFAULT_META_PREFIX)]
    pub meta_prefix: String,
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s", env = "ETCD_SYNCER_REQUEST_TIMEOUT")]
    pub request_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    #[command(flatten)]
    pub dest: DestArgs,
    #[command(flatten)]
    pub source: SourceArgs,
    /// The job to promote.
    #[arg(
        long,
        env = "ETCD_SYNCER_JOB_NAME",
        conflicts_with = "all",
        required_unless_present = "all"
    )]
    pub job_name: Option<String>,
    /// Every job found under the meta prefix.
    #[arg(long)]
    pub all: bool,
    /// Planned switchover: first wait until the checkpoint reaches the
    /// source's current revision (needs --src-endpoints).
    #[arg(long, requires = "src_endpoints")]
    pub wait_for_sync: bool,
    /// How long --wait-for-sync waits before giving up (nothing is promoted then).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
    pub wait_timeout: Duration,
    /// Remove the promoted marker so replication resumes (failback).
    #[arg(long, conflicts_with = "wait_for_sync")]
    pub undo: bool,
    #[arg(long, env = "ETCD_SYNCER_META_PREFIX", default_value = DEFAULT_META_PREFIX)]
    pub meta_prefix: String,
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s", env = "ETCD_SYNCER_REQUEST_TIMEOUT")]
    pub request_timeout: Duration,
}


#[derive(Debug, Args)]
pub struct TelemetryArgs {
    /// Log line format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "ETCD_SYNCER_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `etcd_syncer=debug`; RUST_LOG wins when set.
    #[arg(
        long,
        global = true,
        default_value = "info",
        env = "ETCD_SYNCER_LOG_LEVEL"
    )]
    pub log_level: String,
}

/// Everything `mirror-plus` takes. The connection flags of each side are
/// written out twice ([`SourceArgs`], [`DestArgs`]) because clap cannot
/// prefix a flattened group.
#[derive(Debug, Args, Default, Clone)]
pub struct MirrorArgs {
    /// TOML file with the same settings and a list of jobs; flags override it.
    #[arg(long, env = "ETCD_SYNCER_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub dest: DestArgs,

    /// Source key prefix to mirror (one job); replaces the file's job list.
    #[arg(long, env = "ETCD_SYNCER_PREFIX")]
    pub prefix: Option<String>,
    /// Destination prefix the source prefix is rewritten to (default: the same prefix).
    #[arg(
        long,
        env = "ETCD_SYNCER_DEST_PREFIX",
        conflicts_with = "no_dest_prefix"
    )]
    pub dest_prefix: Option<String>,
    /// Mirror to the root of the destination: strip the source prefix.
    #[arg(long, env = "ETCD_SYNCER_NO_DEST_PREFIX")]
    pub no_dest_prefix: bool,
    /// Job name (default: derived from the prefix); names the meta keys and metric labels.
    #[arg(long, env = "ETCD_SYNCER_JOB_NAME")]
    pub job_name: Option<String>,
    /// Destination prefix for the syncer's own keys (checkpoint, locks).
    #[arg(long, env = "ETCD_SYNCER_META_PREFIX")]
    pub meta_prefix: Option<String>,

    /// Most ops in one destination txn, checkpoint included (etcd's --max-txn-ops, 128 by default).
    #[arg(long, env = "ETCD_SYNCER_MAX_TXN_OPS")]
    pub max_txn_ops: Option<usize>,
    /// Most bytes in one destination txn (etcd's request limit is 1.5MiB).
    #[arg(long, env = "ETCD_SYNCER_MAX_TXN_BYTES")]
    pub max_txn_bytes: Option<ByteSize>,
    /// A full sync that would delete more than this share of the job's destination keys deletes nothing.
    #[arg(long, env = "ETCD_SYNCER_MAX_PRUNE_RATIO")]
    pub max_prune_ratio: Option<f64>,
    /// Request one full sync per job (repair runs): whichever replica leads a
    /// job next drops its checkpoint, once, whatever instance got the flag.
    #[arg(long, env = "ETCD_SYNCER_RESET_LAST_SYNCED_REV")]
    pub reset_last_synced_rev: bool,

    /// Check the configuration (flags, file, TLS and password files) and exit
    /// without connecting: 0 if valid, 2 with the offending field if not.
    #[arg(long)]
    pub validate_config: bool,

    /// Address of the /metrics, /healthz and /readyz endpoints (port 0 picks a free port).
    #[arg(long, env = "ETCD_SYNCER_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Identity shown in logs and status (default: POD_NAME, else hostname-pid).
    #[arg(long, env = "ETCD_SYNCER_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Keys per range page during a full sync.
    #[arg(long, env = "ETCD_SYNCER_PAGE_SIZE")]
    pub page_size: Option<usize>,
    /// Destination txns in flight at once (ordered and chained, see docs/architecture.md).
    #[arg(long, env = "ETCD_SYNCER_MAX_INFLIGHT_TXNS")]
    pub max_inflight_txns: Option<usize>,
    /// How often an idle watch asks the source for progress.
    #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_PROGRESS_INTERVAL")]
    pub progress_interval: Option<Duration>,
    /// A watch that delivers nothing, not even progress, for this long is re-created.
    #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_WATCH_IDLE_TIMEOUT")]
    pub watch_idle_timeout: Option<Duration>,
    /// Per-request deadline towards either cluster.
    #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_REQUEST_TIMEOUT")]
    pub request_timeout: Option<Duration>,
    /// TTL of the lease behind each job lock: how long a dead leader keeps its jobs.
    #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_LOCK_TTL")]
    pub lock_ttl: Option<Duration>,
    /// How often a leader checks whether it leads more than its share of jobs.
    #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_REBALANCE_INTERVAL")]
    pub rebalance_interval: Option<Duration>,
    /// Gap between consecutive pipelined txns, so etcd applies them in the order sent.
    #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_PIPELINE_SPACING")]
    pub pipeline_spacing: Option<Duration>,
    /// How often the leader of each job runs an exact consistency check (0 disables it).
    #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_CHECK_INTERVAL")]
    pub check_interval: Option<Duration>,
    /// Rewrite the keys an exact check finds different, through the normal fenced write path.
    #[arg(long, env = "ETCD_SYNCER_CHECK_REPAIR")]
    pub check_repair: bool,
    /// Sample keys of each kind of difference shown in check logs.
    #[arg(long, env = "ETCD_SYNCER_CHECK_SAMPLE_SIZE")]
    pub check_sample_size: Option<usize>,
    /// /healthz fails when a job's loop (leading or standby) has not woken for this long.
    #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_LIVENESS_TIMEOUT")]
    pub liveness_timeout: Option<Duration>,
}

/// How to reach the source cluster.
#[derive(Debug, Args, Default, Clone)]
pub struct SourceArgs {
    /// Source cluster endpoints, comma separated (http://host:port or https://host:port).
    #[arg(long, value_delimiter = ',', env = "ETCD_SYNCER_SRC_ENDPOINTS")]
    pub src_endpoints: Option<Vec<String>>,
    /// CA bundle that signed the source cluster's server certificates.
    #[arg(long, env = "ETCD_SYNCER_SRC_CACERT")]
    pub src_cacert: Option<PathBuf>,
    /// Client certificate for mutual TLS with the source.
    #[arg(long, env = "ETCD_SYNCER_SRC_CERT")]
    pub src_cert: Option<PathBuf>,
    /// Private key of --src-cert.
    #[arg(long, env = "ETCD_SYNCER_SRC_KEY")]
    pub src_key: Option<PathBuf>,
    /// User name for the source's auth.
    #[arg(long, env = "ETCD_SYNCER_SRC_USER")]
    pub src_user: Option<String>,
    /// Password of --src-user.
    #[arg(long, env = "ETCD_SYNCER_SRC_PASSWORD", hide_env_values = true)]
    pub src_password: Option<String>,
}

/// How to reach the destination cluster.
#[derive(Debug, Args, Default, Clone)]
pub struct DestArgs {
    /// Destination cluster endpoints, comma separated.
    #[arg(long, value_delimiter = ',', env = "ETCD_SYNCER_DST_ENDPOINTS")]
    pub dst_endpoints: Option<Vec<String>>,
    /// CA bundle that signed the destination cluster's server certificates.
    #[arg(long, env = "ETCD_SYNCER_DST_CACERT")]
    pub dst_cacert: Option<PathBuf>,
    /// Client certificate for mutual TLS with the destination.
    #[arg(long, env = "ETCD_SYNCER_DST_CERT")]
    pub dst_cert: Option<PathBuf>,
    /// Private key of --dst-cert.
    #[arg(long, env = "ETCD_SYNCER_DST_KEY")]
    pub dst_key: Option<PathBuf>,
    /// User name for the destination's auth.
    #[arg(long, env = "ETCD_SYNCER_DST_USER")]
    pub dst_user: Option<String>,
    /// Password of --dst-user.
    #[arg(long, env = "ETCD_SYNCER_DST_PASSWORD", hide_env_values = true)]
    pub dst_password: Option<String>,
}

impl SourceArgs {
    fn flags(self) -> ClusterFlags {
        ClusterFlags {
            endpoints: self.src_endpoints,
            cacert: self.src_cacert,
            cert: self.src_cert,
            key: self.src_key,
            user: self.src_user,
            password: self.src_password,
        }
    }

    /// Settings for commands where the source is optional (`status`, `promote`).
    pub fn into_optional_settings(self) -> Result<Option<ClusterSettings>, ConfigError> {
        if self.src_endpoints.is_none() {
            return Ok(None);
        }
        cluster_settings(Side::Source, self.flags(), FileCluster::default()).map(Some)
    }

    pub fn into_settings(self) -> Result<ClusterSettings, ConfigError> {
        cluster_settings(Side::Source, self.flags(), FileCluster::default())
    }
}

impl DestArgs {
    fn flags(self) -> ClusterFlags {
        ClusterFlags {
            endpoints: self.dst_endpoints,
            cacert: self.dst_cacert,
            cert: self.dst_cert,
            key: self.dst_key,
            user: self.dst_user,
            password: self.dst_password,
        }
    }

    pub fn into_settings(self) -> Result<ClusterSettings, ConfigError> {
        cluster_settings(Side::Destination, self.flags(), FileCluster::default())
    }
}

/// The config file. Unknown fields are rejected so a typo cannot silently
/// fall back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub source: Option<FileCluster>,
    pub destination: Option<FileCluster>,
    pub meta_prefix: Option<String>,
    pub max_txn_ops: Option<usize>,
    pub max_txn_bytes: Option<ByteSize>,
    pub max_prune_ratio: Option<f64>,
    pub metrics_addr: Option<SocketAddr>,
    pub instance_id: Option<String>,
    pub page_size: Option<usize>,
    pub max_inflight_txns: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub progress_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub watch_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub pipeline_spacing: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub check_interval: Option<Duration>,
    pub check_repair: Option<bool>,
    pub check_sample_size: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub liveness_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub lock_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub rebalance_interval: Option<Duration>,
    #[serde(default)]
    pub jobs: Vec<FileJob>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileCluster {
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// Read the password from a file (a mounted Secret), trailing newline trimmed.
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileJob {
    pub name: Option<String>,
    pub prefix: String,
    pub dest_prefix: Option<String>,
    #[serde(default)]
    pub no_dest_prefix: bool,
}

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

/// Which cluster a setting belongs to; also names its flags in errors.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert_and_key: Option<(PathBuf, PathBuf)>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub side: Side,
    pub endpoints: Vec<String>,
    pub tls: Option<TlsFiles>,
    pub credentials: Option<Credentials>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSettings {
    pub name: String,
    pub prefix: String,
    pub dest_prefix: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TxnLimits {
    /// Ops per txn including the checkpoint put.
    pub max_ops: usize,
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    pub page_size: usize,
    pub max_inflight_txns: usize,
    pub progress_interval: Duration,
    pub watch_idle_timeout: Duration,
    pub request_timeout: Duration,
    /// The idle checkpoint advances at most this often.
    pub idle_checkpoint_interval: Duration,
    /// How often a full sync logs progress.
    pub progress_log_interval: Duration,
    /// Gap between consecutive pipelined txns (see `mirror::writer::Pipeline::send_slot`).
    pub pipeline_send_spacing: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            page_size: 2000,
            max_inflight_txns: 8,
            progress_interval: Duration::from_secs(5),
            watch_idle_timeout: Duration::from_secs(20),
            request_timeout: Duration::from_secs(30),
            idle_checkpoint_interval: Duration::from_secs(5),
            progress_log_interval: Duration::from_secs(5),
            pipeline_send_spacing: Duration::from_millis(2),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub source: ClusterSettings,
    pub destination: ClusterSettings,
    pub jobs: Vec<JobSettings>,
    pub meta_prefix: String,
    pub limits: TxnLimits,
    pub max_prune_ratio: f64,
    pub reset_last_synced_rev: bool,
    pub metrics_addr: SocketAddr,
    pub instance_id: String,
    pub lock_ttl: Duration,
    pub rebalance_interval: Duration,
    pub liveness_timeout: Duration,
    pub checks: CheckSettings,
    pub tuning: Tuning,
}

/// The leader's periodic consistency check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckSettings {
    /// Zero disables the periodic check.
    pub interval: Duration,
    pub repair: bool,
    pub sample_size: usize,
}

impl MirrorArgs {
    /// Reads the config file named by `--config` (if any), then merges and validates.
    pub fn into_settings(self) -> Result<Settings, ConfigError> {
        let file = match &self.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        self.merge(file)
    }

    pub fn merge(self, file: FileConfig) -> Result<Settings, ConfigError> {
        let source = cluster_settings(
            Side::Source,
            self.source.flags(),
            file.source.unwrap_or_default(),
        )?;
        let destination = cluster_settings(
            Side::Destination,
            self.dest.flags(),
            file.destination.unwrap_or_default(),
        )?;

        let meta_prefix = self
            .meta_prefix
            .or(file.meta_prefix)
            .unwrap_or_else(|| DEFAULT_META_PREFIX.to_string());
        if meta_prefix.is_empty() {
            return Err(invalid(
                "--meta-prefix",
                "",
                "must not be empty; the default is /-etcd-syncer-meta-/",
            ));
        }

        let jobs = match self.prefix {
            Some(prefix) => {
                let dest_prefix = if self.no_dest_prefix {
                    Some(String::new())
                } else {
                    self.dest_prefix
                };
                vec![job_settings(self.job_name, prefix, dest_prefix)?]
            }
            None => {
                if self.dest_prefix.is_some() || self.no_dest_prefix || self.job_name.is_some() {
                    return Err(ConfigError::Conflict {
                        fields: "--dest-prefix/--no-dest-prefix/--job-name and [[jobs]]".into(),
                        reason: "these flags describe a single job and need --prefix; set them per job in the config file instead".into(),
                    });
                }
                file.jobs
                    .into_iter()
                    .map(|job| {
                        let dest_prefix = if job.no_dest_prefix {
                            Some(String::new())
                        } else {
                            job.dest_prefix
                        };
                        job_settings(job.name, job.prefix, dest_prefix)
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        if jobs.is_empty() {
            return Err(ConfigError::Missing {
                field: "--prefix",
                fix: "give --prefix for one job, or a [[jobs]] list with a prefix each in --config",
            });
        }
        validate_jobs(&jobs, &meta_prefix, &source, &destination)?;

        let max_ops = self
            .max_txn_ops
            .or(file.max_txn_ops)
            .unwrap_or(DEFAULT_MAX_TXN_OPS);
        if !(2..=100_000).contains(&max_ops) {
            return Err(invalid(
                "--max-txn-ops",
                &max_ops.to_string(),
                "must be between 2 and 100000 and not above the destination's --max-txn-ops (128 by default)",
            ));
        }
        let max_bytes = self
            .max_txn_bytes
            .or(file.max_txn_bytes)
            .map(|b| b.as_u64())
            .unwrap_or(DEFAULT_MAX_TXN_BYTES);
        if !(16 * 1024..=64 * 1024 * 1024).contains(&max_bytes) {
            return Err(invalid(
                "--max-txn-bytes",
                &ByteSize(max_bytes).to_string(),
                "must be between 16KiB and 64MiB and below the destination's --max-request-bytes (1.5MiB by default)",
            ));
        }
        let max_prune_ratio = self
            .max_prune_ratio
            .or(file.max_prune_ratio)
            .unwrap_or(DEFAULT_MAX_PRUNE_RATIO);
        if !(0.0..=1.0).contains(&max_prune_ratio) || max_prune_ratio.is_nan() {
            return Err(invalid(
                "--max-prune-ratio",
                &max_prune_ratio.to_string(),
                "must be between 0 and 1 (1 allows a full sync to delete every destination key)",
            ));
        }

        let defaults = Tuning::default();
        let tuning = Tuning {
            page_size: self
                .page_size
                .or(file.page_size)
                .unwrap_or(defaults.page_size),
            max_inflight_txns: self
                .max_inflight_txns
                .or(file.max_inflight_txns)
                .unwrap_or(defaults.max_inflight_txns),
            progress_interval: self
                .progress_interval
                .or(file.progress_interval)
                .unwrap_or(defaults.progress_interval),
            watch_idle_timeout: self
                .watch_idle_timeout
                .or(file.watch_idle_timeout)
                .unwrap_or(defaults.watch_idle_timeout),
            request_timeout: self
                .request_timeout
                .or(file.request_timeout)
                .unwrap_or(defaults.request_timeout),
            pipeline_send_spacing: self
                .pipeline_spacing
                .or(file.pipeline_spacing)
                .unwrap_or(defaults.pipeline_send_spacing),
            ..defaults
        };
        if !(1..=100_000).contains(&tuning.page_size) {
            return Err(invalid(
                "--page-size",
                &tuning.page_size.to_string(),
                "must be between 1 and 100000",
            ));
        }
        if !(1..=64).contains(&tuning.max_inflight_txns) {
            return Err(invalid(
                "--max-inflight-txns",
                &tuning.max_inflight_txns.to_string(),
                "must be between 1 and 64",
            ));
        }
        for (field, value) in [
            ("--progress-interval", tuning.progress_interval),
            ("--watch-idle-timeout", tuning.watch_idle_timeout),
            ("--request-timeout", tuning.request_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(field, "0s", "must be longer than zero, e.g. 5s"));
            }
        }
        if tuning.watch_idle_timeout <= tuning.progress_interval {
            return Err(ConfigError::Conflict {
                fields: "--watch-idle-timeout and --progress-interval".into(),
                reason: format!(
                    "the idle timeout ({}) must be longer than the progress interval ({}), or every idle watch looks stalled",
                    humantime::format_duration(tuning.watch_idle_timeout),
                    humantime::format_duration(tuning.progress_interval)
                ),
            });
        }

        let lock_ttl = self.lock_ttl.or(file.lock_ttl).unwrap_or(DEFAULT_LOCK_TTL);
        if lock_ttl < Duration::from_secs(2) || lock_ttl.subsec_nanos() != 0 {
            return Err(invalid(
                "--lock-ttl",
                &humantime::format_duration(lock_ttl).to_string(),
                "must be whole seconds, at least 2s (etcd leases have second granularity); the default is 5s",
            ));
        }
        let rebalance_interval = self
            .rebalance_interval
            .or(file.rebalance_interval)
            .unwrap_or(DEFAULT_REBALANCE_INTERVAL);
        if rebalance_interval < lock_ttl {
            return Err(ConfigError::Conflict {
                fields: "--rebalance-interval and --lock-ttl".into(),
                reason: "rebalancing more often than the lock TTL would hand jobs back and forth; use at least the TTL".into(),
            });
        }
        let checks = CheckSettings {
            interval: self
                .check_interval
                .or(file.check_interval)
                .unwrap_or(DEFAULT_CHECK_INTERVAL),
            repair: self.check_repair || file.check_repair.unwrap_or(false),
            sample_size: self
                .check_sample_size
                .or(file.check_sample_size)
                .unwrap_or(10),
        };
        if checks.sample_size > 1000 {
            return Err(invalid(
                "--check-sample-size",
                &checks.sample_size.to_string(),
                "must be at most 1000",
            ));
        }
        if checks.repair && checks.interval.is_zero() {
            return Err(ConfigError::Conflict {
                fields: "--check-repair and --check-interval 0".into(),
                reason: "repairs come from the periodic check, which is disabled; set a --check-interval".into(),
            });
        }
        let liveness_timeout = self
            .liveness_timeout
            .or(file.liveness_timeout)
            .unwrap_or(crate::telemetry::health::DEFAULT_LIVENESS_TIMEOUT);
        if liveness_timeout < Duration::from_secs(5)
            || liveness_timeout <= tuning.progress_interval * 2
        {
            return Err(invalid(
                "--liveness-timeout",
                &humantime::format_duration(liveness_timeout).to_string(),
                "must be at least 5s and more than twice --progress-interval, or healthy job loops look wedged between their wake-ups",
            ));
        }
        let metrics_addr = match self.metrics_addr.or(file.metrics_addr) {
            Some(addr) => addr,
            None => DEFAULT_METRICS_ADDR
                .parse()
                .expect("default metrics address parses"),
        };
        let instance_id = self
            .instance_id
            .or(file.instance_id)
            .unwrap_or_else(default_instance_id);

        Ok(Settings {
            source,
            destination,
            jobs,
            meta_prefix,
            limits: TxnLimits {
                max_ops,
                max_bytes: max_bytes as usize,
            },
            max_prune_ratio,
            reset_last_synced_rev: self.reset_last_synced_rev,
            metrics_addr,
            instance_id,
            lock_ttl,
            rebalance_interval,
            liveness_timeout,
            checks,
            tuning,
        })
    }
}

/// `POD_NAME` in Kubernetes, else `hostname-pid`.
pub fn default_instance_id() -> String {
    if let Ok(pod) = std::env::var("POD_NAME") {
        if !pod.is_empty() {
            return pod;
        }
    }
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".to_string());
    format!("{host}-{}", std::process::id())
}

pub fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        field: "--config".into(),
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn invalid(field: &str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

struct ClusterFlags {
    endpoints: Option<Vec<String>>,
    cacert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    user: Option<String>,
    password: Option<String>,
}

fn cluster_settings(
    side: Side,
    flags: ClusterFlags,
    file: FileCluster,
) -> Result<ClusterSettings, ConfigError> {
    let flag = |name: &str| format!("--{}-{}", side.flag_prefix(), name);
    let endpoints: Vec<String> = flags
        .endpoints
        .unwrap_or(file.endpoints)
        .into_iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Err(ConfigError::Missing {
            field: match side {
                Side::Source => "--src-endpoints",
                Side::Destination => "--dst-endpoints",
            },
            fix: "list the cluster's client URLs, e.g. http://10.0.0.1:2379,http://10.0.0.2:2379 (or endpoints = [...] in the config file)",
        });
    }

    let cacert = flags.cacert.or(file.cacert);
    let cert = flags.cert.or(file.cert);
    let key = flags.key.or(file.key);
    let cert_and_key = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::Missing {
                field: match side {
                    Side::Source => "--src-key",
                    Side::Destination => "--dst-key",
                },
                fix: "a client certificate needs its private key; give both or neither",
            })
        }
        (None, Some(_)) => {
            return Err(ConfigError::Missing {
                field: match side {
                    Side::Source => "--src-cert",
                    Side::Destination => "--dst-cert",
                },
                fix: "a private key needs its client certificate; give both or neither",
            })
        }
    };
    let tls = (cacert.is_some() || cert_and_key.is_some()).then_some(TlsFiles {
        ca: cacert,
        cert_and_key,
    });

    for endpoint in &endpoints {
        let (scheme, rest) = match endpoint.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, endpoint.as_str()),
        };
        let authority_ok = rest.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.trim_end_matches('/').parse::<u16>().is_ok()
        });
        if !authority_ok {
            return Err(invalid(
                &flag("endpoints"),
                endpoint,
                "expected http://host:port or https://host:port",
            ));
        }
        match (scheme, &tls) {
            (Some("http"), Some(_)) => {
                return Err(invalid(
                    &flag("endpoints"),
                    endpoint,
                    &format!(
                        "TLS files are set for the {side} but this endpoint is plain http; use https:// or drop --{p}-cacert/--{p}-cert/--{p}-key",
                        p = side.flag_prefix()
                    ),
                ))
            }
            (Some("https"), None) => {
                return Err(invalid(
                    &flag("endpoints"),
                    endpoint,
                    &format!(
                        "an https endpoint needs the CA that signed the server: set --{}-cacert",
                        side.flag_prefix()
                    ),
                ))
            }
            (Some("http") | Some("https") | None, _) => {}
            (Some(other), _) => {
                return Err(invalid(
                    &flag("endpoints"),
                    endpoint,
                    &format!("unknown scheme {other:?}; use http:// or https://"),
                ))
            }
        }
    }
    if let Some(tls) = &tls {
        if let Some(ca) = &tls.ca {
            check_pem(&flag("cacert"), ca, PemKind::Certificate)?;
        }
        if let Some((cert, key)) = &tls.cert_and_key {
            check_pem(&flag("cert"), cert, PemKind::Certificate)?;
            check_pem(&flag("key"), key, PemKind::PrivateKey)?;
        }
    }

    let password = match (flags.password.or(file.password), file.password_file) {
        (Some(password), _) => Some(password),
        (None, Some(path)) => Some(
            std::fs::read_to_string(&path)
                .map_err(|source| ConfigError::ReadFile {
                    field: format!("{}.password-file", side.file_section()),
                    path: path.clone(),
                    source,
                })?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        ),
        (None, None) => None,
    };
    let credentials = match (flags.user.or(file.user), password) {
        (Some(user), Some(password)) if !user.is_empty() => Some(Credentials { user, password }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(ConfigError::Missing {
                field: match side {
                    Side::Source => "--src-password",
                    Side::Destination => "--dst-password",
                },
                fix: "a user needs a password (flag, ETCD_SYNCER_*_PASSWORD, or password-file in the config file)",
            })
        }
        (_, Some(_)) => {
            return Err(ConfigError::Missing {
                field: match side {
                    Side::Source => "--src-user",
                    Side::Destination => "--dst-user",
                },
                fix: "a password was given without a user name",
            })
        }
    };

    Ok(ClusterSettings {
        side,
        endpoints,
        tls,
        credentials,
    })
}

#[derive(Clone, Copy)]
enum PemKind {
    Certificate,
    PrivateKey,
}

/// Catches the common mistakes (wrong path, key and cert swapped, DER file)
/// at start instead of as an opaque handshake failure later.
fn check_pem(field: &str, path: &Path, kind: PemKind) -> Result<(), ConfigError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let bytes = std::fs::read(path).map_err(|source| ConfigError::ReadFile {
        field: field.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    let ok = match kind {
        PemKind::Certificate => CertificateDer::pem_slice_iter(&bytes)
            .next()
            .is_some_and(|c| c.is_ok()),
        PemKind::PrivateKey => PrivateKeyDer::from_pem_slice(&bytes).is_ok(),
    };
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            &path.display().to_string(),
            match kind {
                PemKind::Certificate => "the file holds no PEM certificate (-----BEGIN CERTIFICATE-----); check the path and that cert and key are not swapped",
                PemKind::PrivateKey => "the file holds no PEM private key (-----BEGIN PRIVATE KEY----- or RSA/EC PRIVATE KEY); check the path and that cert and key are not swapped",
            },
        ))
    }
}

fn job_settings(
    name: Option<String>,
    prefix: String,
    dest_prefix: Option<String>,
) -> Result<JobSettings, ConfigError> {
    let name = name.unwrap_or_else(|| job_name_from_prefix(&prefix));
    if !is_valid_job_name(&name) {
        return Err(invalid(
            "--job-name",
            &name,
            "use 1-128 characters of letters, digits, '-', '_' or '.'",
        ));
    }
    let dest_prefix = dest_prefix.unwrap_or_else(|| prefix.clone());
    Ok(JobSettings {
        name,
        prefix,
        dest_prefix,
    })
}

fn validate_jobs(
    jobs: &[JobSettings],
    meta_prefix: &str,
    source: &ClusterSettings,
    destination: &ClusterSettings,
) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    for job in jobs {
        if !names.insert(job.name.as_str()) {
            return Err(ConfigError::Conflict {
                fields: format!("jobs named {:?}", job.name),
                reason: "job names must be unique; set a distinct name per job".into(),
            });
        }
        // Data written under the meta prefix would be mistaken for (or clobber)
        // checkpoints and locks. The reverse, the meta prefix inside a job's
        // range (e.g. mirroring "/"), is fine: meta keys are always excluded.
        if job.dest_prefix.starts_with(meta_prefix) {
            return Err(ConfigError::Conflict {
                fields: format!("--dest-prefix {:?} and --meta-prefix {:?}", job.dest_prefix, meta_prefix),
                reason: "the destination prefix lies inside the meta prefix; choose a destination prefix outside it or another --meta-prefix".into(),
            });
        }
        if job.prefix.starts_with(meta_prefix) {
            return Err(ConfigError::Conflict {
                fields: format!("--prefix {:?} and --meta-prefix {:?}", job.prefix, meta_prefix),
                reason: "the meta prefix is never copied, so this job would mirror nothing; choose a prefix outside it".into(),
            });
        }
    }
    for (i, a) in jobs.iter().enumerate() {
        for b in &jobs[i + 1..] {
            if prefixes_overlap(a.prefix.as_bytes(), b.prefix.as_bytes()) {
                return Err(ConfigError::Conflict {
                    fields: format!(
                        "job {:?} prefix {:?} and job {:?} prefix {:?}",
                        a.name, a.prefix, b.name, b.prefix
                    ),
                    reason:
                        "job prefixes overlap, so keys would be copied twice; make them disjoint"
                            .into(),
                });
            }
            if prefixes_overlap(a.dest_prefix.as_bytes(), b.dest_prefix.as_bytes()) {
                return Err(ConfigError::Conflict {
                    fields: format!(
                        "job {:?} dest prefix {:?} and job {:?} dest prefix {:?}",
                        a.name, a.dest_prefix, b.name, b.dest_prefix
                    ),
                    reason: "destination prefixes overlap, so one job's full sync would delete the other's keys; make them disjoint".into(),
                });
            }
        }
    }
    if same_endpoints(source, destination) {
        for job in jobs {
            if prefixes_overlap(job.prefix.as_bytes(), job.dest_prefix.as_bytes()) {
                return Err(loop_error(job));
            }
        }
    }
    Ok(())
}

pub fn loop_error(job: &JobSettings) -> ConfigError {
    ConfigError::Conflict {
        fields: format!("job {:?}: --prefix {:?} and --dest-prefix {:?}", job.name, job.prefix, job.dest_prefix),
        reason: "source and destination are the same cluster and the prefixes overlap, which would copy the mirror into itself; use disjoint prefixes or another destination".into(),
    }
}

fn normalize_endpoint(endpoint: &str) -> String {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    rest.trim_end_matches('/').replace("localhost", "127.0.0.1")
}

fn same_endpoints(a: &ClusterSettings, b: &ClusterSettings) -> bool {
    let a: HashSet<String> = a.endpoints.iter().map(|e| normalize_endpoint(e)).collect();
    b.endpoints
        .iter()
        .any(|e| a.contains(&normalize_endpoint(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Settings, ConfigError> {
        let mut argv = vec!["etcd-syncer", "mirror-plus"];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).expect("flags parse");
        let Command::MirrorPlus(args) = cli.command else {
            panic!("parsed as another command")
        };
        args.into_settings()
    }

    const BASE: [&str; 6] = [
        "--src-endpoints",
        "http://127.0.0.1:1",
        "--dst-endpoints",
        "http://127.0.0.1:2",
        "--prefix",
        "/app/",
    ];

    fn with_base(extra: &[&str]) -> Result<Settings, ConfigError> {
        let mut all = BASE.to_vec();
        all.extend_from_slice(extra);
        args(&all)
    }

    #[test]
    fn defaults() {
        let settings = with_base(&[]).unwrap();
        assert_eq!(settings.jobs[0].name, "app");
        assert_eq!(settings.jobs[0].dest_prefix, "/app/");
        assert_eq!(settings.limits.max_ops, 128);
        assert_eq!(settings.limits.max_bytes, 1024 * 1024);
        assert_eq!(settings.meta_prefix, DEFAULT_META_PREFIX);
        assert_eq!(settings.max_prune_ratio, 0.5);
    }

    #[test]
    fn dest_prefix_rewrites() {
        assert_eq!(
            with_base(&["--dest-prefix", "/copy/"]).unwrap().jobs[0].dest_prefix,
            "/copy/"
        );
        assert_eq!(
            with_base(&["--no-dest-prefix"]).unwrap().jobs[0].dest_prefix,
            ""
        );
    }

    #[test]
    fn sizes_parse_in_human_units() {
        let settings = with_base(&["--max-txn-bytes", "512KiB"]).unwrap();
        assert_eq!(settings.limits.max_bytes, 512 * 1024);
    }

    fn error_text(result: Result<Settings, ConfigError>) -> String {
        result.expect_err("must be rejected").to_string()
    }

    #[test]
    fn errors_name_the_field() {
        assert!(
            error_text(args(&["--dst-endpoints", "http://h:1", "--prefix", "/a/"]))
                .contains("--src-endpoints")
        );
        assert!(error_text(with_base(&["--max-txn-ops", "0"])).contains("--max-txn-ops"));
        assert!(error_text(with_base(&["--max-prune-ratio", "1.5"])).contains("--max-prune-ratio"));
        assert!(error_text(with_base(&["--job-name", "a/b"])).contains("--job-name"));
        assert!(
            error_text(with_base(&["--dest-prefix", "/-etcd-syncer-meta-/x/"]))
                .contains("meta prefix")
        );
        assert!(error_text(with_base(&["--src-cert", "/nonexistent"])).contains("--src-key"));
        assert!(error_text(with_base(&["--src-user", "root"])).contains("--src-password"));
        assert!(error_text(with_base(&["--dst-cacert", "/nonexistent.pem"]))
            .contains("--dst-endpoints"));
    }

    #[test]
    fn https_needs_a_ca_and_the_ca_must_be_pem() {
        let text = error_text(args(&[
            "--src-endpoints",
            "https://127.0.0.1:1",
            "--dst-endpoints",
            "http://127.0.0.1:2",
            "--prefix",
            "/a/",
        ]));
        assert!(text.contains("--src-cacert"), "{text}");
        let dir = tempfile::tempdir().unwrap();
        let bogus = dir.path().join("ca.pem");
        std::fs::write(&bogus, "not a certificate").unwrap();
        let text = error_text(args(&[
            "--src-endpoints",
            "https://127.0.0.1:1",
            "--src-cacert",
            bogus.to_str().unwrap(),
            "--dst-endpoints",
            "http://127.0.0.1:2",
            "--prefix",
            "/a/",
        ]));
        assert!(
            text.contains("--src-cacert") && text.contains("PEM"),
            "{text}"
        );
    }

    #[test]
    fn loops_are_rejected() {
        let text = error_text(args(&[
            "--src-endpoints",
            "http://localhost:5",
            "--dst-endpoints",
            "http://127.0.0.1:5",
            "--prefix",
            "/a/",
        ]));
        assert!(text.contains("same cluster"), "{text}");
        // Same cluster with disjoint prefixes is a legitimate copy.
        args(&[
            "--src-endpoints",
            "http://127.0.0.1:5",
            "--dst-endpoints",
            "http://127.0.0.1:5",
            "--prefix",
            "/a/",
            "--dest-prefix",
            "/b/",
        ])
        .unwrap();
    }

    fn file(text: &str) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("syncer.toml");
        std::fs::write(&path, text).unwrap();
        args(&["--config", path.to_str().unwrap()])
    }

    #[test]
    fn file_with_jobs() {
        let settings = file(
            r#"
            max-txn-ops = 64
            progress-interval = "2s"
            [source]
            endpoints = ["http://127.0.0.1:1"]
            [destination]
            endpoints = ["http://127.0.0.1:2"]
            [[jobs]]
            prefix = "/a/"
            [[jobs]]
            name = "bee"
            prefix = "/b/"
            dest-prefix = "/bb/"
            "#,
        )
        .unwrap();
        assert_eq!(settings.jobs.len(), 2);
        assert_eq!(settings.jobs[1].name, "bee");
        assert_eq!(settings.limits.max_ops, 64);
        assert_eq!(settings.tuning.progress_interval, Duration::from_secs(2));
    }

    #[test]
    fn file_errors() {
        let unknown = error_text(file(
            "[source]\nendpoints = [\"http://h:1\"]\nendpoint = 1\n",
        ));
        assert!(
            unknown.contains("unknown field") && unknown.contains("endpoint"),
            "{unknown}"
        );
        let overlap = error_text(file(
            "[source]\nendpoints=[\"http://h:1\"]\n[destination]\nendpoints=[\"http://h:2\"]\n[[jobs]]\nprefix=\"/a/\"\n[[jobs]]\nprefix=\"/a/b/\"\n",
        ));
        assert!(overlap.contains("prefixes overlap"), "{overlap}");
        let dest_overlap = error_text(file(
            "[source]\nendpoints=[\"http://h:1\"]\n[destination]\nendpoints=[\"http://h:2\"]\n[[jobs]]\nprefix=\"/a/\"\ndest-prefix=\"/x/\"\n[[jobs]]\nprefix=\"/b/\"\ndest-prefix=\"/x/y/\"\n",
        ));
        assert!(
            dest_overlap.contains("destination prefixes overlap"),
            "{dest_overlap}"
        );
        let bad_duration = error_text(file("progress-interval = \"soon\"\n"));
        assert!(bad_duration.contains("progress-interval"), "{bad_duration}");
    }

    /// docs/config-reference.toml documents every key: it must parse, and set them all.
    #[test]
    fn the_reference_config_sets_every_key() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/config-reference.toml");
        let file = load_file(&path).expect("docs/config-reference.toml parses");
        let FileConfig {
            source,
            destination,
            meta_prefix,
            max_txn_ops,
            max_txn_bytes,
            max_prune_ratio,
            metrics_addr,
            instance_id,
            page_size,
            max_inflight_txns,
            progress_interval,
            watch_idle_timeout,
            request_timeout,
            pipeline_spacing,
            check_interval,
            check_repair,
            check_sample_size,
            liveness_timeout,
            lock_ttl,
            rebalance_interval,
            jobs,
        } = file;
        assert!(
            meta_prefix.is_some()
                && max_txn_ops.is_some()
                && max_txn_bytes.is_some()
                && max_prune_ratio.is_some()
        );
        assert!(
            metrics_addr.is_some()
                && instance_id.is_some()
                && page_size.is_some()
                && max_inflight_txns.is_some()
        );
        assert!(
            progress_interval.is_some()
                && watch_idle_timeout.is_some()
                && request_timeout.is_some()
        );
        assert!(pipeline_spacing.is_some() && check_interval.is_some() && check_repair.is_some());
        assert!(check_sample_size.is_some() && lock_ttl.is_some() && rebalance_interval.is_some());
        assert!(liveness_timeout.is_some());
        for side in [source.expect("source"), destination.expect("destination")] {
            let FileCluster {
                endpoints,
                cacert,
                cert,
                key,
                user,
                password,
                password_file,
            } = side;
            assert!(!endpoints.is_empty() && cacert.is_some() && cert.is_some() && key.is_some());
            assert!(user.is_some() && password.is_some() && password_file.is_some());
        }
        let FileJob {
            name,
            prefix,
            dest_prefix,
            no_dest_prefix: _,
        } = &jobs[0];
        assert!(name.is_some() && !prefix.is_empty() && dest_prefix.is_some());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("syncer.toml");
        std::fs::write(
            &path,
            "max-txn-ops = 64\n[source]\nendpoints=[\"http://h:1\"]\n[destination]\nendpoints=[\"http://h:2\"]\n[[jobs]]\nprefix=\"/a/\"\n",
        )
        .unwrap();
        let settings = args(&[
            "--config",
            path.to_str().unwrap(),
            "--max-txn-ops",
            "32",
            "--prefix",
            "/z/",
        ])
        .unwrap();
        assert_eq!(settings.limits.max_ops, 32);
        assert_eq!(settings.jobs.len(), 1);
        assert_eq!(settings.jobs[0].prefix, "/z/");
    }
}
