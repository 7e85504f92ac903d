//! The validated configuration the rest of the crate runs on, and its defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::model::Side;

pub const DEFAULT_META_PREFIX: &str = "/-etcd-syncer-meta-/";
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
pub const DEFAULT_MAX_TXN_BYTES: u64 = 1024 * 1024;
pub const DEFAULT_MAX_PRUNE_RATIO: f64 = 0.5;
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9091";
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(5);
pub const DEFAULT_REBALANCE_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(300);
pub const DEFAULT_CHECK_SAMPLE_SIZE: usize = 10;

// Upper bounds of the duration settings. Anything longer is a typo, and
// unbounded values overflowed timer arithmetic (2^63 s panicked); a value
// above its bound is a configuration error (exit code 2) naming the field.
const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;
/// `--progress-interval`: at most 1h.
pub const MAX_PROGRESS_INTERVAL: Duration = Duration::from_secs(HOUR);
/// `--watch-idle-timeout`: at most 24h.
pub const MAX_WATCH_IDLE_TIMEOUT: Duration = Duration::from_secs(DAY);
/// `--request-timeout` (every command): at most 1h.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(HOUR);
/// `--pipeline-spacing`: at most 1s (the default is 2ms).
pub const MAX_PIPELINE_SPACING: Duration = Duration::from_secs(1);
/// `--lock-ttl`: whole seconds, at least 2s, at most 1h.
pub const MAX_LOCK_TTL: Duration = Duration::from_secs(HOUR);
pub const MAX_LEASE_GRACE: Duration = Duration::from_secs(HOUR);
/// `--lease-grace` at least: a leader's takeover (the lock TTL, 5 s by
/// default) must fit in it, or a failover lets mirrored leases expire and
/// the standby drops live registrations.
pub const MIN_LEASE_GRACE: Duration = Duration::from_secs(5);
/// `--rebalance-interval`: at most 24h.
pub const MAX_REBALANCE_INTERVAL: Duration = Duration::from_secs(DAY);
/// `--check-interval`: at most 7 days (0 disables the check).
pub const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(7 * DAY);
/// `--resync-loop-stable-period`: at most 24h.
pub const MAX_RESYNC_LOOP_STABLE_PERIOD: Duration = Duration::from_secs(DAY);
/// `--liveness-timeout`: at most 24h.
pub const MAX_LIVENESS_TIMEOUT: Duration = Duration::from_secs(DAY);
/// `promote --wait-timeout`: at most 24h.
pub const MAX_WAIT_TIMEOUT: Duration = Duration::from_secs(DAY);
/// `--auth-sync-interval`: the default.
pub const DEFAULT_AUTH_SYNC_INTERVAL: Duration = Duration::from_secs(MINUTE);
/// `--auth-sync-interval`: at least 1s.
pub const MIN_AUTH_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// `--auth-sync-interval`: at most 24h.
pub const MAX_AUTH_SYNC_INTERVAL: Duration = Duration::from_secs(DAY);

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
    /// Ways to reach the cluster, most preferred first (at least one): e.g.
    /// a private line, then the public network. `--src-endpoints` is one
    /// group named [`DEFAULT_GROUP`].
    pub groups: Vec<EndpointGroup>,
    pub tls: Option<TlsFiles>,
    pub credentials: Option<Credentials>,
    /// Where the password was read from, re-read when it changes.
    pub password_file: Option<PathBuf>,
    /// gzip on this side's gRPC link.
    pub compression: Compression,
}

/// `--src-compression` / `--dst-compression`: gzip on a side's gRPC link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
// Plain comments on the variants: doc comments would become clap's
// per-value help and switch every subcommand's `--help` to the long layout.
pub enum Compression {
    // gzip if every member of the endpoint group runs etcd 3.5 or later
    // (etcd 3.4 refuses compressed requests), else off.
    Auto,
    // Always gzip: etcd before 3.5 then refuses every request.
    Gzip,
    // Never compress.
    Off,
}

impl Compression {
    /// The source link is the one that crosses a WAN; the destination is
    /// usually near, where compressing only costs CPU.
    pub fn default_for(side: Side) -> Compression {
        match side {
            Side::Source => Compression::Auto,
            Side::Destination => Compression::Off,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Compression::Auto => "auto",
            Compression::Gzip => "gzip",
            Compression::Off => "off",
        }
    }
}

/// The group name of `--src-endpoints` / `endpoints = [...]`.
pub const DEFAULT_GROUP: &str = "default";

/// One way to reach a cluster: a name for logs and metrics, and its URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointGroup {
    pub name: String,
    pub endpoints: Vec<String>,
}

impl ClusterSettings {
    /// The preferred group's endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.groups[0].endpoints
    }

    /// The same cluster reached through group `index` only.
    pub fn through_group(&self, index: usize) -> ClusterSettings {
        ClusterSettings {
            groups: vec![self.groups[index].clone()],
            ..self.clone()
        }
    }

    /// The files whose change means a reconnect: TLS material and the
    /// password file.
    pub fn watched_files(&self) -> Vec<(String, PathBuf)> {
        let p = self.side.flag_prefix();
        let mut files = Vec::new();
        if let Some(tls) = &self.tls {
            if let Some(ca) = &tls.ca {
                files.push((format!("--{p}-cacert"), ca.clone()));
            }
            if let Some((cert, key)) = &tls.cert_and_key {
                files.push((format!("--{p}-cert"), cert.clone()));
                files.push((format!("--{p}-key"), key.clone()));
            }
        }
        if let Some(path) = &self.password_file {
            files.push((
                format!("{}.password-file", self.side.file_section()),
                path.clone(),
            ));
        }
        files
    }
}

/// When to leave the endpoint group in use, and when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverSettings {
    /// Every group is health-checked this often.
    pub check_interval: Duration,
    /// This many failed checks in a row of the group in use: switch to the
    /// most preferred healthy group.
    pub failover_after: u32,
    /// A more preferred group healthy this long: switch back to it.
    pub failback_after: Duration,
}

pub const DEFAULT_ENDPOINT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_ENDPOINT_FAILOVER_AFTER: u32 = 3;
pub const DEFAULT_ENDPOINT_FAILBACK_AFTER: Duration = Duration::from_secs(60);
/// `--endpoint-check-interval`: at least 100ms, at most 1h.
pub const MIN_ENDPOINT_CHECK_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_ENDPOINT_CHECK_INTERVAL: Duration = Duration::from_secs(HOUR);
/// `--endpoint-failback-after`: at most 24h.
pub const MAX_ENDPOINT_FAILBACK_AFTER: Duration = Duration::from_secs(DAY);
/// TLS and password files are checked for changes this often.
pub const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(10);

impl Default for FailoverSettings {
    fn default() -> Self {
        Self {
            check_interval: DEFAULT_ENDPOINT_CHECK_INTERVAL,
            failover_after: DEFAULT_ENDPOINT_FAILOVER_AFTER,
            failback_after: DEFAULT_ENDPOINT_FAILBACK_AFTER,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobSettings {
    pub name: String,
    pub prefix: String,
    pub dest_prefix: String,
    pub write_rate: WriteRateLimit,
    /// Sub-prefixes of `prefix` left out of the job: keys under them are
    /// never copied, pruned or compared, on either side.
    pub exclude_prefixes: Vec<String>,
}

/// `max-write-ops-per-second` / `max-write-bytes-per-second` of one job:
/// destination writes are slowed to these rates (0 = unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteRateLimit {
    pub ops_per_second: u64,
    pub bytes_per_second: u64,
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
    /// A checkpoint txn records a revision-map sample at most this often
    /// (zero: never), for point-in-time promotion and `status`.
    pub revision_map_interval: Duration,
    /// Samples older than this are deleted by a later checkpoint txn.
    pub revision_map_retention: Duration,
    /// This many full syncs in a row without a stable watch is a resync loop.
    pub resync_loop_full_syncs: u32,
    /// A watch up this long is stable: it ends a resync loop.
    pub resync_loop_stable_period: Duration,
    /// Bytes of destination keys a full sync's copy pass remembers for
    /// deletion; past it the deletions take a second walk of both prefixes.
    pub full_sync_delete_memory: usize,
    /// A resume compares the source prefix at the checkpoint with the
    /// destination key by key when it holds at most this many keys (the
    /// proof that the source's history is the one the destination
    /// reflects); above, it checks the newest event and that nothing newer
    /// exists (see `mirror::verify_resume`).
    pub resume_exact_max_keys: u64,
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
            revision_map_interval: Duration::from_secs(60),
            revision_map_retention: Duration::from_secs(24 * 3600),
            resync_loop_full_syncs: 3,
            resync_loop_stable_period: Duration::from_secs(10 * MINUTE),
            // 8 MiB: about 130,000 deletions of 30-byte keys, far below the
            // 64 MiB the replicator is meant to stay under.
            full_sync_delete_memory: 8 << 20,
            // Two or three pages of each side: a resume costs less than a
            // periodic check of a small prefix.
            resume_exact_max_keys: 10_000,
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
    pub leases: LeaseSettings,
    pub auth: AuthSyncSettings,
    pub failover: FailoverSettings,
    /// `--revision-exact`: one whole-keyspace job replayed revision by revision.
    pub revision_exact: bool,
    pub exact_gap: ExactGap,
}

/// How keys attached to source leases are mirrored.
impl Settings {
    /// Both sides, no jobs, and every other field at its default: the
    /// settings table (`table.rs`) then fills each of its places from the
    /// flag, the file or its own default.
    pub fn skeleton(source: ClusterSettings, destination: ClusterSettings) -> Self {
        Self {
            source,
            destination,
            jobs: Vec::new(),
            meta_prefix: DEFAULT_META_PREFIX.to_string(),
            limits: TxnLimits {
                max_ops: DEFAULT_MAX_TXN_OPS,
                max_bytes: DEFAULT_MAX_TXN_BYTES as usize,
            },
            max_prune_ratio: DEFAULT_MAX_PRUNE_RATIO,
            reset_last_synced_rev: false,
            metrics_addr: DEFAULT_METRICS_ADDR
                .parse()
                .expect("default metrics address parses"),
            instance_id: String::new(),
            lock_ttl: DEFAULT_LOCK_TTL,
            rebalance_interval: DEFAULT_REBALANCE_INTERVAL,
            liveness_timeout: crate::telemetry::health::DEFAULT_LIVENESS_TIMEOUT,
            checks: CheckSettings {
                interval: DEFAULT_CHECK_INTERVAL,
                repair: false,
                sample_size: DEFAULT_CHECK_SAMPLE_SIZE,
            },
            tuning: Tuning::default(),
            leases: LeaseSettings::default(),
            auth: AuthSyncSettings::default(),
            failover: FailoverSettings::default(),
            revision_exact: false,
            exact_gap: ExactGap::CatchUp,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseMode {
    /// On a destination lease that lives as long as the source's.
    #[default]
    Faithful,
    /// Without a lease: mirrored keys never expire on the destination.
    Strip,
}

/// `--exact-gap`: what a revision-exact job does when the source compacted
/// history it has not replayed yet (after an outage longer than the
/// source's compaction interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExactGap {
    /// Write the difference as exactly the missing revisions, compact the
    /// standby there, and replay on: keys changed in the gap keep their
    /// values and leases but not their revisions and versions.
    #[default]
    CatchUp,
    /// Stop in `exact_blocked` until the standby is re-seeded from a new
    /// snapshot.
    Stop,
}

/// How ephemeral znodes are mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EphemeralMode {
    /// On a destination lease per ZooKeeper session, kept alive while the
    /// session's nodes exist: they leave etcd as they leave ZooKeeper, and
    /// expire if every replica of the syncer dies.
    #[default]
    Lease,
    /// As plain keys (deleted when ZooKeeper deletes them, never expiring).
    Plain,
}

/// One zk2etcd job's settings.
#[derive(Debug, Clone)]
pub struct ZkJob {
    pub name: String,
    /// ZooKeeper connect string (`host:port,host:port`).
    pub servers: String,
    /// `user:password` for digest auth, if any.
    pub digest: Option<String>,
    /// TLS to ZooKeeper, if on.
    pub tls: Option<ZkTls>,
    pub prefixes: Vec<crate::model::zk::ZkPrefix>,
    pub ephemeral: EphemeralMode,
    /// TTL of the lease standing for a ZooKeeper session.
    pub ephemeral_ttl: Duration,
    /// The session timeout zk2etcd asks ZooKeeper for.
    pub session_timeout: Duration,
    /// A full diff this often, besides every reconnect.
    pub resync_interval: Duration,
    /// The mass-delete guard: the share of the keys it owns that one diff
    /// may delete.
    pub max_prune_ratio: f64,
}

/// TLS to ZooKeeper: PEM text read from the files at start.
#[derive(Clone, PartialEq, Eq)]
pub struct ZkTls {
    pub ca: String,
    /// Client certificate and key, when ZooKeeper asks for one.
    pub identity: Option<(String, String)>,
}

impl std::fmt::Debug for ZkTls {
    // Never a key in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkTls")
            .field("client_identity", &self.identity.is_some())
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    pub mode: LeaseMode,
    /// Added to every destination lease's TTL.
    pub grace: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            mode: LeaseMode::Faithful,
            grace: Duration::from_secs(30),
        }
    }
}

/// `--sync-auth`: mirroring roles and users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSyncSettings {
    pub enabled: bool,
    pub interval: Duration,
    /// `--auth-passwords-file`, read into `passwords`.
    pub passwords_file: Option<PathBuf>,
    pub passwords: AuthPasswords,
}

impl Default for AuthSyncSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: DEFAULT_AUTH_SYNC_INTERVAL,
            passwords_file: None,
            passwords: AuthPasswords::default(),
        }
    }
}

/// Passwords for users `--sync-auth` creates, from `--auth-passwords-file`.
/// Debug output shows the user names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AuthPasswords(std::collections::BTreeMap<String, String>);

impl AuthPasswords {
    pub fn new(passwords: std::collections::BTreeMap<String, String>) -> Self {
        Self(passwords)
    }

    pub fn get(&self, user: &str) -> Option<&str> {
        self.0.get(user).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for AuthPasswords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// The leader's periodic consistency check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckSettings {
    /// Zero disables the periodic check.
    pub interval: Duration,
    pub repair: bool,
    pub sample_size: usize,
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
