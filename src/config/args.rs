//! The command line: clap structs for every subcommand. Each flag can also
//! come from its `ETCD_SYNCER_*` variable. Turning these into settings is
//! [`super::validation`]'s job.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use clap::{Args, Parser, Subcommand, ValueEnum};

use super::settings::{Compression, LeaseMode, DEFAULT_META_PREFIX, DEFAULT_METRICS_ADDR};
use super::table::{LimitFlags, MetaFlags, RunFlags};
use crate::model::Side;
use crate::telemetry::LogFormat;

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
    /// writes to the job's destination prefix. `--undo` removes it.
    Promote(Box<PromoteArgs>),
    /// Compare source and destination exactly at the checkpoint revision.
    /// Exit code 0 consistent, 1 differences, 2 error.
    Check(Box<CheckArgs>),
    /// Copy a promoted standby back to the old primary, writing only the
    /// keys either side changed since the promotion, after saving the old
    /// primary's lost writes; then `mirror-plus` from the standby to the old
    /// primary resumes without a full sync. Takes the job's own flags or
    /// config: the source is the old primary, the destination the standby.
    Failback(Box<FailbackArgs>),
    /// Mirror ZooKeeper prefixes into etcd (the field report's zk2etcd):
    /// node path to key, data to value, ephemeral nodes on a lease per
    /// ZooKeeper session; writes only keys it owns, beside other writers.
    Zk2etcd(Box<Zk2EtcdArgs>),
    /// Request one full sync per job (what --reset-last-synced-rev does),
    /// consumed by whichever replica leads the job next. For one-off repairs,
    /// e.g. from a Kubernetes Job, without restarting the replicas.
    Reset(Box<ResetArgs>),
    /// Print the settings table (flag, variable, file key, default, what a
    /// reload does) as docs/configuration.md shows it.
    #[command(hide = true)]
    SettingsTable,
}

#[derive(Debug, Args)]
pub struct FailbackArgs {
    /// The job's `mirror-plus` settings, unchanged: --src-* is the old
    /// primary, --dst-* the promoted standby.
    #[command(flatten)]
    pub job: MirrorArgs,
    /// New file for the old primary's lost writes (JSON lines: key, what
    /// the old primary holds, what the standby holds), written and synced
    /// before anything is overwritten. An existing file is never replaced.
    #[arg(
        long,
        env = "ETCD_SYNCER_LOST_WRITES_FILE",
        required_unless_present = "dry_run"
    )]
    pub lost_writes_file: Option<PathBuf>,
    /// Print the counts and the lost writes; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

/// TLS to ZooKeeper (its `secureClientPort`): PEM files, as for etcd.
#[derive(Debug, Clone, Default, Args)]
pub struct ZkTlsArgs {
    /// CA bundle (PEM) that signed ZooKeeper's server certificate: turns TLS on.
    #[arg(long, env = "ETCD_SYNCER_ZK_CACERT")]
    pub zk_cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM), when ZooKeeper asks for one (`ssl.clientAuth`).
    #[arg(long, env = "ETCD_SYNCER_ZK_CERT", requires = "zk_key")]
    pub zk_cert: Option<std::path::PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "ETCD_SYNCER_ZK_KEY", requires = "zk_cert")]
    pub zk_key: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct Zk2EtcdArgs {
    #[command(flatten)]
    pub dest: DestArgs,
    /// ZooKeeper servers, `host:port,host:port` (a chroot suffix is not
    /// supported: give the paths in --zk-prefix).
    #[arg(long, env = "ETCD_SYNCER_ZK_SERVERS")]
    pub zk_servers: String,
    /// ZooKeeper paths to mirror (repeat or comma-separate), e.g. `/dubbo`.
    #[arg(
        long = "zk-prefix",
        value_delimiter = ',',
        required = true,
        env = "ETCD_SYNCER_ZK_PREFIXES"
    )]
    pub zk_prefixes: Vec<String>,
    /// The etcd prefix the (single) --zk-prefix maps to (default: the same path).
    #[arg(long, env = "ETCD_SYNCER_DEST_PREFIX")]
    pub dest_prefix: Option<String>,
    /// ZooKeeper subtrees left out (repeat or comma-separate).
    #[arg(
        long = "exclude-prefix",
        value_delimiter = ',',
        env = "ETCD_SYNCER_EXCLUDE_PREFIXES"
    )]
    pub exclude_prefixes: Vec<String>,
    /// Ephemeral znodes: `lease` (one destination lease per ZooKeeper session,
    /// kept alive while its nodes exist) or `plain` keys.
    #[arg(
        long,
        value_enum,
        default_value = "lease",
        env = "ETCD_SYNCER_EPHEMERAL"
    )]
    pub ephemeral: super::settings::EphemeralMode,
    /// TTL of a session's lease: how long its keys outlive every replica of
    /// zk2etcd (the provider's session timeout plus a grace).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "40s", env = "ETCD_SYNCER_EPHEMERAL_TTL")]
    pub ephemeral_ttl: Duration,
    /// The session timeout zk2etcd asks ZooKeeper for.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s", env = "ETCD_SYNCER_ZK_SESSION_TIMEOUT")]
    pub zk_session_timeout: Duration,
    /// `user:password` for ZooKeeper digest auth.
    #[arg(long, env = "ETCD_SYNCER_ZK_DIGEST", hide_env_values = true)]
    pub zk_digest: Option<String>,
    #[command(flatten)]
    pub zk_tls: ZkTlsArgs,
    /// A full diff of the tree against etcd this often (besides every reconnect).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m", env = "ETCD_SYNCER_RESYNC_INTERVAL")]
    pub resync_interval: Duration,
    #[arg(long, env = "ETCD_SYNCER_JOB_NAME", default_value = "zk2etcd")]
    pub job_name: String,
    #[arg(long, env = "ETCD_SYNCER_META_PREFIX", default_value = DEFAULT_META_PREFIX)]
    pub meta_prefix: String,
    /// The job lock's lease TTL: a standby replica takes over within it.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s", env = "ETCD_SYNCER_LOCK_TTL")]
    pub lock_ttl: Duration,
    /// Share of the keys it owns that one diff may delete.
    #[arg(long, default_value = "0.5", env = "ETCD_SYNCER_MAX_PRUNE_RATIO")]
    pub max_prune_ratio: f64,
    /// This replica's name in the lock.
    #[arg(long, env = "ETCD_SYNCER_INSTANCE_ID")]
    pub instance_id: Option<String>,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s", env = "ETCD_SYNCER_REQUEST_TIMEOUT")]
    pub request_timeout: Duration,
    /// Where /metrics, /healthz, /readyz and /status are served (port 0: any).
    #[arg(long, default_value = DEFAULT_METRICS_ADDR, env = "ETCD_SYNCER_METRICS_ADDR")]
    pub metrics_addr: std::net::SocketAddr,
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

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub dest: DestArgs,
    /// Source prefix of the job (default: read from the job's checkpoint).
    #[arg(long, env = "ETCD_SYNCER_PREFIX")]
    pub prefix: Option<String>,
    /// Destination prefix (default: the same as --prefix, or the
    /// ZooKeeper path of --source).
    #[arg(long, conflicts_with = "no_dest_prefix")]
    pub dest_prefix: Option<String>,
    /// Compare a ZooKeeper tree with the destination instead (a zk2etcd
    /// job): `zookeeper://host:port[,host:port]/path`. Keys another writer
    /// holds are counted apart, not as differences.
    #[arg(
        long = "source",
        env = "ETCD_SYNCER_CHECK_SOURCE",
        conflicts_with = "prefix"
    )]
    pub zk_source: Option<String>,
    /// With --source zookeeper://: `user:password` for ZooKeeper digest auth.
    #[arg(
        long,
        env = "ETCD_SYNCER_ZK_DIGEST",
        hide_env_values = true,
        requires = "zk_source"
    )]
    pub zk_digest: Option<String>,
    #[command(flatten)]
    pub zk_tls: ZkTlsArgs,
    /// The job mirrors to the root of the destination.
    #[arg(long, requires = "prefix")]
    pub no_dest_prefix: bool,
    /// The job whose checkpoint pins the comparison (default: derived from
    /// --prefix; with --source zookeeper://, zk2etcd).
    #[arg(long, env = "ETCD_SYNCER_JOB_NAME", required_unless_present_any = ["prefix", "zk_source"])]
    pub job_name: Option<String>,
    #[arg(long, env = "ETCD_SYNCER_META_PREFIX", default_value = DEFAULT_META_PREFIX)]
    pub meta_prefix: String,
    /// A sub-prefix the job excludes (its `exclude-prefixes`; repeat or
    /// comma-separate): keys under it are not compared.
    #[arg(
        long = "exclude-prefix",
        value_delimiter = ',',
        env = "ETCD_SYNCER_EXCLUDE_PREFIXES"
    )]
    pub exclude_prefixes: Vec<String>,
    /// Sample keys printed for each kind of difference.
    #[arg(long, default_value = "10")]
    pub sample_size: usize,
    #[arg(long, default_value = "2000")]
    pub page_size: usize,
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s", env = "ETCD_SYNCER_REQUEST_TIMEOUT")]
    pub request_timeout: Duration,
    /// How the job mirrors leases: with `faithful` (the default) a key on
    /// another lease than its mirror counts as a lease mismatch.
    #[arg(long, value_enum, env = "ETCD_SYNCER_LEASES")]
    pub leases: Option<LeaseMode>,
    /// A revision-exact job: revisions besides the checkpoint's at which the
    /// whole history is compared too (spread over what both still hold).
    #[arg(long, default_value = "10")]
    pub history_samples: usize,
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
    #[command(flatten)]
    pub auth: PromoteAuthArgs,
    /// After promoting, keep the mirrored keys that were on a mirrored
    /// lease: rewrite each as the same value without a lease (a key a client
    /// changed on the promoted cluster meanwhile is left alone), then drop
    /// the job's lease records. Without it nothing renews those leases
    /// after the promotion, and mirrored registrations of instances that
    /// died with the primary vanish after their TTL + --lease-grace, as
    /// they would have on the primary.
    #[arg(long, conflicts_with = "undo")]
    pub detach_leases: bool,
    /// Point-in-time promotion: promote, then restore the job's destination
    /// prefix to its state at this source revision (the newest checkpoint
    /// at or before it), read from the destination's own history, e.g. to
    /// undo a mass delete the standby already replicated. Refused, with
    /// nothing written, when the destination has compacted that history.
    #[arg(
        long,
        requires = "job_name",
        conflicts_with_all = ["undo", "all", "at_time"],
        value_parser = clap::value_parser!(i64).range(1..)
    )]
    pub at_source_revision: Option<i64>,
    /// Point-in-time promotion to the newest checkpoint written at or before
    /// this RFC 3339 time (e.g. 2026-12-04T00:30:00Z).
    #[arg(
        long,
        requires = "job_name",
        conflicts_with_all = ["undo", "all"],
        value_parser = humantime::parse_rfc3339_weak
    )]
    pub at_time: Option<std::time::SystemTime>,
    #[arg(long, env = "ETCD_SYNCER_META_PREFIX", default_value = DEFAULT_META_PREFIX)]
    pub meta_prefix: String,
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s", env = "ETCD_SYNCER_REQUEST_TIMEOUT")]
    pub request_timeout: Duration,
}

/// `promote --sync-auth`: one auth sync pass before the promoted marker.
#[derive(Debug, Args, Default, Clone)]
pub struct PromoteAuthArgs {
    /// Mirror auth roles and users from the source once more before
    /// promoting, as `mirror-plus --sync-auth` does (needs --src-endpoints).
    #[arg(long, requires = "src_endpoints", env = "ETCD_SYNCER_SYNC_AUTH")]
    pub sync_auth: bool,
    /// Passwords for users created on the destination (see mirror-plus).
    #[arg(long, requires = "sync_auth", env = "ETCD_SYNCER_AUTH_PASSWORDS_FILE")]
    pub auth_passwords_file: Option<PathBuf>,
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
    /// Show keys and values in logs, error messages and check samples only
    /// as a stable short hash (`<key:fnv1a-hex>`), for prefixes whose key
    /// names are sensitive.
    #[arg(long, global = true, env = "ETCD_SYNCER_REDACT_KEYS")]
    pub redact_keys: bool,
}

/// Everything `mirror-plus` takes. The connection flags of each side come
/// from one template (`cluster_args!` below), because clap cannot prefix a
/// flattened group.
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
    /// `--meta-prefix`, from the settings table.
    #[command(flatten)]
    pub meta: MetaFlags,
    /// Leave keys under this sub-prefix of --prefix out of the job (repeat
    /// or comma-separate for several): never copied, never pruned on the
    /// destination, never reported by the check.
    #[arg(
        long = "exclude-prefix",
        value_delimiter = ',',
        env = "ETCD_SYNCER_EXCLUDE_PREFIXES"
    )]
    pub exclude_prefixes: Vec<String>,
    /// Most destination ops per second for the job (full sync and watch
    /// alike; they slow down rather than fail). 0 or unset: unlimited.
    #[arg(long, env = "ETCD_SYNCER_MAX_WRITE_OPS_PER_SECOND")]
    pub max_write_ops_per_second: Option<u64>,
    /// Most destination bytes (keys and values) per second for the job, e.g.
    /// 5MiB. 0 or unset: unlimited.
    #[arg(long, env = "ETCD_SYNCER_MAX_WRITE_BYTES_PER_SECOND")]
    pub max_write_bytes_per_second: Option<ByteSize>,

    /// Txn limits and the prune guard, from the settings table.
    #[command(flatten)]
    pub limits: LimitFlags,
    /// Request one full sync per job (repair runs): whichever replica leads a
    /// job next drops its checkpoint, once, whatever instance got the flag.
    #[arg(long, env = "ETCD_SYNCER_RESET_LAST_SYNCED_REV")]
    pub reset_last_synced_rev: bool,

    /// Check the configuration (flags, file, TLS and password files) and exit
    /// without connecting: 0 if valid, 2 with the offending field if not.
    #[arg(long)]
    pub validate_config: bool,

    /// Everything else the process runs with, from the settings table.
    #[command(flatten)]
    pub run: RunFlags,
}

/// Writes the connection flags of one side once: clap cannot prefix a
/// flattened group, so [`SourceArgs`] (`--src-*`, `ETCD_SYNCER_SRC_*`) and
/// [`DestArgs`] (`--dst-*`, `ETCD_SYNCER_DST_*`) are generated from this
/// template. Flag names come from the field names, so those are spelled out.
/// One side's connection flags, whichever side they came from.
pub struct ClusterFlags {
    pub side: Side,
    pub endpoints: Option<Vec<String>>,
    pub endpoint_groups: Vec<String>,
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub compression: Option<Compression>,
}

macro_rules! cluster_args {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            side: $side:expr,
            // Flag prefix as typed: "src" or "dst".
            flag: $flag:literal,
            // Environment variable infix: "SRC" or "DST".
            env: $env:literal,
            // The cluster as help texts name it: "source" or "destination".
            cluster: $cluster:literal,
            endpoints_help: $endpoints_help:expr,
            // The default of --<flag>-compression, as help shows it.
            compression_default: $compression_default:literal,
            fields: [
                $endpoints:ident,
                $groups:ident,
                $cacert:ident,
                $cert:ident,
                $key:ident,
                $user:ident,
                $password:ident,
                $compression:ident $(,)?
            ] $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Args, Default, Clone)]
        pub struct $name {
            #[doc = $endpoints_help]
            #[arg(
                long,
                value_delimiter = ',',
                env = concat!("ETCD_SYNCER_", $env, "_ENDPOINTS"),
                help = $endpoints_help
            )]
            pub $endpoints: Option<Vec<String>>,
            #[doc = concat!("A named endpoint group, NAME=URL[,URL...]; repeat for several, most preferred first (e.g. a private line, then the public network). The first healthy group is used; see --endpoint-failover-after. Instead of --", $flag, "-endpoints.")]
            #[arg(
                long = concat!($flag, "-endpoint-group"),
                value_name = "NAME=URLS",
                value_delimiter = ';',
                env = concat!("ETCD_SYNCER_", $env, "_ENDPOINT_GROUPS"),
                help = concat!("A named endpoint group, NAME=URL[,URL...]; repeat for several, most preferred first (e.g. a private line, then the public network). The first healthy group is used; see --endpoint-failover-after. Instead of --", $flag, "-endpoints")
            )]
            pub $groups: Vec<String>,
            #[doc = concat!("CA bundle that signed the ", $cluster, " cluster's server certificates.")]
            #[arg(
                long,
                env = concat!("ETCD_SYNCER_", $env, "_CACERT"),
                help = concat!("CA bundle that signed the ", $cluster, " cluster's server certificates")
            )]
            pub $cacert: Option<PathBuf>,
            #[doc = concat!("Client certificate for mutual TLS with the ", $cluster, ".")]
            #[arg(
                long,
                env = concat!("ETCD_SYNCER_", $env, "_CERT"),
                help = concat!("Client certificate for mutual TLS with the ", $cluster)
            )]
            pub $cert: Option<PathBuf>,
            #[doc = concat!("Private key of --", $flag, "-cert.")]
            #[arg(
                long,
                env = concat!("ETCD_SYNCER_", $env, "_KEY"),
                help = concat!("Private key of --", $flag, "-cert")
            )]
            pub $key: Option<PathBuf>,
            #[doc = concat!("User name for the ", $cluster, "'s auth.")]
            #[arg(
                long,
                env = concat!("ETCD_SYNCER_", $env, "_USER"),
                help = concat!("User name for the ", $cluster, "'s auth")
            )]
            pub $user: Option<String>,
            #[doc = concat!("Password of --", $flag, "-user.")]
            #[arg(
                long,
                env = concat!("ETCD_SYNCER_", $env, "_PASSWORD"),
                hide_env_values = true,
                help = concat!("Password of --", $flag, "-user")
            )]
            pub $password: Option<String>,
            #[doc = concat!("gzip on the link to the ", $cluster, ": auto (on if every endpoint runs etcd >= 3.5), gzip, or off. Default: ", $compression_default, ".")]
            #[arg(
                long,
                value_enum,
                env = concat!("ETCD_SYNCER_", $env, "_COMPRESSION"),
                help = concat!("gzip on the link to the ", $cluster, ": auto (on if every endpoint runs etcd >= 3.5; etcd 3.4 refuses gzip), gzip, or off [default: ", $compression_default, "]")
            )]
            pub $compression: Option<Compression>,
        }

        impl $name {
            /// The flags as one side's, for `validation.rs` to check.
            pub fn flags(self) -> ClusterFlags {
                ClusterFlags {
                    side: $side,
                    endpoints: self.$endpoints,
                    endpoint_groups: self.$groups,
                    cacert: self.$cacert,
                    cert: self.$cert,
                    key: self.$key,
                    user: self.$user,
                    password: self.$password,
                    compression: self.$compression,
                }
            }
        }
    };
}

cluster_args! {
    /// How to reach the source cluster.
    pub struct SourceArgs {
        side: Side::Source,
        flag: "src",
        env: "SRC",
        cluster: "source",
        endpoints_help: "Source cluster endpoints, comma separated (http://host:port or https://host:port)",
        compression_default: "auto",
        fields: [src_endpoints, src_endpoint_groups, src_cacert, src_cert, src_key, src_user, src_password, src_compression],
    }
}

cluster_args! {
    /// How to reach the destination cluster.
    pub struct DestArgs {
        side: Side::Destination,
        flag: "dst",
        env: "DST",
        cluster: "destination",
        endpoints_help: "Destination cluster endpoints, comma separated",
        compression_default: "off",
        fields: [dst_endpoints, dst_endpoint_groups, dst_cacert, dst_cert, dst_key, dst_user, dst_password, dst_compression],
    }
}
