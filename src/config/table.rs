//! The settings table: every setting `mirror-plus` runs with as a whole
//! (not per job, not per side) is declared once, in [`settings_table!`]
//! below: its flag (with its `ETCD_SYNCER_*` variable and help text), its
//! type, its default, the rule its value must keep, the place in
//! [`Settings`] it fills and what a live reload does when it changes. From
//! that one declaration come the clap flags ([`MetaFlags`], [`LimitFlags`],
//! [`RunFlags`]), the config file's keys ([`FileConfig`], the flag's name in
//! kebab case), the merge (flag, else file, else default; then the rule,
//! naming the flag or the file key that broke it), the reload plan
//! ([`changed`], [`keep_fixed`]) and the reference in
//! `docs/configuration.md` ([`reference`]).
//!
//! What the table does not hold, and why: the job's own settings (`--prefix`
//! and its companions, or a `[[jobs]]` entry) and each side's connection
//! (`--src-*`/`--dst-*`, or `[source]`/`[destination]`) are lists and
//! sections with their own shape; `--config`, `--validate-config` and
//! `--reset-last-synced-rev` are requests to this run, not settings. Rules
//! between two settings (the idle timeout above the progress interval, ...)
//! are in `validation.rs`, after the table has filled [`Settings`].
//!
//! The flags sit in three groups only because `--help` lists flags in the
//! order they are declared, and the job's flags come between them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Deserializer};

use super::error::{invalid, origin, ConfigError};
use super::file::{FileCluster, FileJob};
use super::settings::*;

/// What a live reload does when a setting's value changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Every job restarts with it, resuming from its checkpoint.
    Jobs,
    /// Both sides reconnect with it, under the running jobs.
    Reconnect,
    /// A running process cannot take it: reported, and the running value stays.
    Process,
}

/// One row of the table, for the reload plan and the reference.
#[derive(Debug)]
pub struct Spec {
    /// The field's name; the flag and the file key are it in kebab case.
    pub name: &'static str,
    pub reload: Reload,
    /// The default as the reference shows it.
    pub default: fn() -> String,
}

impl Spec {
    pub fn key(&self) -> String {
        self.name.replace('_', "-")
    }

    pub fn flag(&self) -> String {
        format!("--{}", self.key())
    }
}

/// A flag's value, if the flag was given: `None` for an absent `Option`
/// flag, and for a switch (`bool`) that is off, so the file can still turn
/// it on.
pub trait Given<T> {
    fn given(self) -> Option<T>;
}

impl<T> Given<T> for Option<T> {
    fn given(self) -> Option<T> {
        self
    }
}

impl Given<bool> for bool {
    fn given(self) -> Option<bool> {
        self.then_some(true)
    }
}

/// Settings whose value is itself optional (no default).
macro_rules! given_optional {
    ($($t:ty),*) => {$(
        impl Given<Option<$t>> for Option<$t> {
            fn given(self) -> Option<Option<$t>> {
                self.map(Some)
            }
        }
    )*};
}
given_optional!(PathBuf, String);

/// How a value is written in the config file: durations as humantime
/// text (`30s`), the rest as their serde form.
pub trait FromFile: Sized {
    fn from_file<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
}

macro_rules! from_file_by_serde {
    ($($t:ty),*) => {$(
        impl FromFile for $t {
            fn from_file<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                <$t>::deserialize(d)
            }
        }
    )*};
}
from_file_by_serde!(
    usize,
    u32,
    f64,
    bool,
    String,
    ByteSize,
    SocketAddr,
    LeaseMode,
    ExactGap,
    Option<PathBuf>,
    Option<String>
);

impl FromFile for Duration {
    fn from_file<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        humantime_serde::deserialize(d)
    }
}

/// serde's `deserialize_with` for every table key of [`FileConfig`].
pub fn from_file<'de, D: Deserializer<'de>, T: FromFile>(d: D) -> Result<Option<T>, D::Error> {
    T::from_file(d).map(Some)
}

/// A value as errors and the reference show it.
pub trait Shown {
    fn shown(&self) -> String;
}

macro_rules! shown_by_display {
    ($($t:ty),*) => {$(
        impl Shown for $t {
            fn shown(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
shown_by_display!(usize, u32, f64, bool, String, ByteSize, SocketAddr);

impl Shown for Duration {
    fn shown(&self) -> String {
        humantime::format_duration(*self).to_string()
    }
}

macro_rules! shown_by_value_enum {
    ($($t:ty),*) => {$(
        impl Shown for $t {
            fn shown(&self) -> String {
                use clap::ValueEnum;
                self.to_possible_value()
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default()
            }
        }
    )*};
}
shown_by_value_enum!(LeaseMode, ExactGap);

impl Shown for Option<PathBuf> {
    fn shown(&self) -> String {
        self.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }
}

impl Shown for Option<String> {
    fn shown(&self) -> String {
        self.clone().unwrap_or_default()
    }
}

/// The rules a value keeps, as the reason an error gives.
pub mod rules {
    use std::time::Duration;

    pub type Rule<T> = fn(&T) -> Result<(), String>;

    pub fn any<T>(_: &T) -> Result<(), String> {
        Ok(())
    }

    /// At most `max`, with a shorter value to try.
    pub fn at_most(value: Duration, max: Duration) -> Result<(), String> {
        if value <= max {
            return Ok(());
        }
        Err(format!(
            "must be at most {}; use a shorter duration such as {}",
            humantime::format_duration(max),
            humantime::format_duration(max / 2),
        ))
    }

    /// Longer than zero and at most `max` (the bound is checked first, as
    /// nothing may do arithmetic on an absurd duration).
    pub fn positive_at_most(value: Duration, max: Duration, zero: &str) -> Result<(), String> {
        at_most(value, max)?;
        if value.is_zero() {
            return Err(zero.to_string());
        }
        Ok(())
    }

    /// Inside `[min, max]`, else `reason`.
    pub fn between<T: PartialOrd>(value: T, min: T, max: T, reason: &str) -> Result<(), String> {
        if min <= value && value <= max {
            Ok(())
        } else {
            Err(reason.to_string())
        }
    }

    /// Whole seconds inside `[min, max]` (etcd leases have second granularity).
    pub fn whole_seconds(
        value: Duration,
        min: Duration,
        max: Duration,
        reason: &str,
    ) -> Result<(), String> {
        between(value, min, max, reason)?;
        if value.subsec_nanos() != 0 {
            return Err(reason.to_string());
        }
        Ok(())
    }
}

/// `limits.max_bytes` is a byte count.
fn bytes(value: ByteSize) -> usize {
    value.as_u64() as usize
}

/// `--instance-id`, else `POD_NAME`, else hostname-pid.
fn instance_or_default(value: Option<String>) -> String {
    value.unwrap_or_else(default_instance_id)
}

/// Applies a declared conversion (`via`) on the way into [`Settings`].
macro_rules! convert {
    (; $value:expr) => {
        $value
    };
    ($conv:path; $value:expr) => {
        $conv($value)
    };
}

/// Declares the table: groups of flags (`group Name ("doc") { entries }`),
/// then the file (`file Name ("doc") { the keys that are not settings }`).
/// Each entry:
///
/// ```text
/// /// Help text (what `--help` prints, word for word).
/// #[arg(long, env = "ETCD_SYNCER_NAME", ...)]   // the clap attribute
/// name: FlagType => Type = default,
///     into place.in.settings [via conversion],
///     reload Jobs | Reconnect | Process,
///     check rule;
/// ```
///
/// `FlagType` is `Option<Type>` (or `bool` for a switch), spelled out
/// because clap reads it to know the flag's shape.
macro_rules! settings_table {
    (
        $(
            group $group:ident ($gdoc:literal) {
                $(
                    $(#[doc = $doc:literal])*
                    #[arg($($clap:tt)*)]
                    $name:ident: $flag:ty => $ty:ty = $default:expr,
                        into $($path:ident).+ $(via $conv:path)?,
                        reload $reload:ident,
                        check $check:expr;
                )*
            }
        )*
        file $file:ident ($fdoc:literal) { $($extra:tt)* }
    ) => {
        $(
            #[doc = $gdoc]
            #[derive(Debug, Default, Clone, clap::Args)]
            pub struct $group {
                $(
                    $(#[doc = $doc])*
                    #[arg($($clap)*)]
                    pub $name: $flag,
                )*
            }

            impl $group {
                /// Fills this group's places in `settings`: the flag, else
                /// the file's key, else the default, once its rule holds.
                pub(super) fn apply(
                    self,
                    file: &mut $file,
                    settings: &mut Settings,
                    from_flag: &mut FromFlag,
                ) -> Result<(), ConfigError> {
                    $(
                        let flag: Option<$ty> = Given::<$ty>::given(self.$name);
                        from_flag.$name = flag.is_some();
                        let value: $ty = match flag.or(file.$name.take()) {
                            Some(value) => value,
                            None => $default,
                        };
                        let rule: rules::Rule<$ty> = $check;
                        rule(&value).map_err(|reason| {
                            invalid(
                                &origin(&stringify!($name).replace('_', "-"), from_flag.$name),
                                &Shown::shown(&value),
                                &reason,
                            )
                        })?;
                        settings.$($path).+ = convert!($($conv)?; value);
                    )*
                    Ok(())
                }
            }
        )*

        /// Whether each setting came from its flag (else from the file or
        /// its default), to name it in errors found later.
        #[derive(Debug, Default, Clone, Copy)]
        pub struct FromFlag {
            $($(pub $name: bool,)*)*
        }

        #[doc = $fdoc]
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        pub struct $file {
            $($extra)*
            $($(
                #[serde(default, deserialize_with = "from_file")]
                pub $name: Option<$ty>,
            )*)*
        }

        /// Every row, in `--help` order.
        pub const SETTINGS: &[Spec] = &[
            $($(
                Spec {
                    name: stringify!($name),
                    reload: Reload::$reload,
                    default: || {
                        let value: $ty = $default;
                        Shown::shown(&value)
                    },
                },
            )*)*
        ];

        /// The rows whose place in the settings differs.
        pub fn changed(old: &Settings, new: &Settings) -> Vec<&'static Spec> {
            let mut changed = Vec::new();
            let mut row = SETTINGS.iter();
            $($(
                let spec = row.next().expect("one row per setting");
                if old.$($path).+ != new.$($path).+ {
                    changed.push(spec);
                }
            )*)*
            changed
        }

        /// `new` with every [`Reload::Process`] setting put back to its
        /// running value.
        pub fn keep_fixed(old: &Settings, new: &mut Settings) {
            $($(
                if Reload::$reload == Reload::Process {
                    new.$($path).+ = old.$($path).+.clone();
                }
            )*)*
        }
    };
}

settings_table! {
    group MetaFlags ("`--meta-prefix` (before the job's flags in `--help`).") {
        /// Destination prefix for the syncer's own keys (checkpoint, locks).
        #[arg(long, env = "ETCD_SYNCER_META_PREFIX")]
        meta_prefix: Option<String> => String = DEFAULT_META_PREFIX.to_string(),
            into meta_prefix,
            reload Jobs,
            check |v| if v.is_empty() {
                Err("must not be empty; the default is /-etcd-syncer-meta-/".into())
            } else {
                Ok(())
            };
    }

    group LimitFlags ("Destination txn limits and the prune guard.") {
        /// Most ops in one destination txn, checkpoint included (etcd's --max-txn-ops, 128 by default).
        #[arg(long, env = "ETCD_SYNCER_MAX_TXN_OPS")]
        max_txn_ops: Option<usize> => usize = DEFAULT_MAX_TXN_OPS,
            into limits.max_ops,
            reload Jobs,
            check |v| rules::between(*v, 2, 100_000, "must be between 2 and 100000 and not above the destination's --max-txn-ops (128 by default)");
        /// Most bytes in one destination txn (etcd's request limit is 1.5MiB).
        #[arg(long, env = "ETCD_SYNCER_MAX_TXN_BYTES")]
        max_txn_bytes: Option<ByteSize> => ByteSize = ByteSize(DEFAULT_MAX_TXN_BYTES),
            into limits.max_bytes via bytes,
            reload Jobs,
            check |v| rules::between(v.as_u64(), 16 * 1024, 64 * 1024 * 1024, "must be between 16KiB and 64MiB and below the destination's --max-request-bytes (1.5MiB by default)");
        /// A full sync that would delete more than this share of the job's destination keys deletes nothing.
        #[arg(long, env = "ETCD_SYNCER_MAX_PRUNE_RATIO")]
        max_prune_ratio: Option<f64> => f64 = DEFAULT_MAX_PRUNE_RATIO,
            into max_prune_ratio,
            reload Jobs,
            check |v| rules::between(*v, 0.0, 1.0, "must be between 0 and 1 (1 allows a full sync to delete every destination key)");
    }

    group RunFlags ("How the process serves, tunes, checks, leases, auth and failover.") {
        /// Address of the /metrics, /healthz and /readyz endpoints (port 0 picks a free port).
        #[arg(long, env = "ETCD_SYNCER_METRICS_ADDR")]
        metrics_addr: Option<SocketAddr> => SocketAddr = DEFAULT_METRICS_ADDR.parse().expect("default metrics address parses"),
            into metrics_addr,
            reload Process,
            check rules::any;
        /// Identity shown in logs and status (default: POD_NAME, else hostname-pid).
        #[arg(long, env = "ETCD_SYNCER_INSTANCE_ID")]
        instance_id: Option<String> => Option<String> = None,
            into instance_id via instance_or_default,
            reload Process,
            check rules::any;

        /// Keys per range page during a full sync.
        #[arg(long, env = "ETCD_SYNCER_PAGE_SIZE")]
        page_size: Option<usize> => usize = Tuning::default().page_size,
            into tuning.page_size,
            reload Jobs,
            check |v| rules::between(*v, 1, 100_000, "must be between 1 and 100000");
        /// Destination txns in flight at once (ordered and chained, see docs/architecture.md).
        #[arg(long, env = "ETCD_SYNCER_MAX_INFLIGHT_TXNS")]
        max_inflight_txns: Option<usize> => usize = Tuning::default().max_inflight_txns,
            into tuning.max_inflight_txns,
            reload Jobs,
            check |v| rules::between(*v, 1, 64, "must be between 1 and 64");
        /// How often an idle watch asks the source for progress.
        #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_PROGRESS_INTERVAL")]
        progress_interval: Option<Duration> => Duration = Tuning::default().progress_interval,
            into tuning.progress_interval,
            reload Jobs,
            check |v| rules::positive_at_most(*v, MAX_PROGRESS_INTERVAL, "must be longer than zero, e.g. 5s");
        /// A watch that delivers nothing, not even progress, for this long is re-created.
        #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_WATCH_IDLE_TIMEOUT")]
        watch_idle_timeout: Option<Duration> => Duration = Tuning::default().watch_idle_timeout,
            into tuning.watch_idle_timeout,
            reload Jobs,
            check |v| rules::positive_at_most(*v, MAX_WATCH_IDLE_TIMEOUT, "must be longer than zero, e.g. 5s");
        /// Per-request deadline towards either cluster.
        #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_REQUEST_TIMEOUT")]
        request_timeout: Option<Duration> => Duration = Tuning::default().request_timeout,
            into tuning.request_timeout,
            reload Jobs,
            check |v| rules::positive_at_most(*v, MAX_REQUEST_TIMEOUT, "must be longer than zero, e.g. 5s");
        /// TTL of the lease behind each job lock: how long a dead leader keeps its jobs.
        #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_LOCK_TTL")]
        lock_ttl: Option<Duration> => Duration = DEFAULT_LOCK_TTL,
            into lock_ttl,
            reload Process,
            check |v| rules::at_most(*v, MAX_LOCK_TTL).and_then(|()| rules::whole_seconds(
                *v,
                Duration::from_secs(2),
                MAX_LOCK_TTL,
                "must be whole seconds, at least 2s and at most 1h (etcd leases have second granularity); the default is 5s",
            ));
        /// How often a leader checks whether it leads more than its share of jobs.
        #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_REBALANCE_INTERVAL")]
        rebalance_interval: Option<Duration> => Duration = DEFAULT_REBALANCE_INTERVAL,
            into rebalance_interval,
            reload Process,
            check |v| rules::at_most(*v, MAX_REBALANCE_INTERVAL);
        /// Gap between consecutive pipelined txns, so etcd applies them in the order sent.
        #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_PIPELINE_SPACING")]
        pipeline_spacing: Option<Duration> => Duration = Tuning::default().pipeline_send_spacing,
            into tuning.pipeline_send_spacing,
            reload Jobs,
            check |v| rules::at_most(*v, MAX_PIPELINE_SPACING);
        /// This many full syncs in a row, without a watch staying up for
        /// --resync-loop-stable-period in between, put the job in state
        /// resync_loop (default 3).
        #[arg(long, env = "ETCD_SYNCER_RESYNC_LOOP_FULL_SYNCS")]
        resync_loop_full_syncs: Option<u32> => u32 = Tuning::default().resync_loop_full_syncs,
            into tuning.resync_loop_full_syncs,
            reload Jobs,
            check |v| rules::between(*v, 1, 100, "must be between 1 and 100; the default is 3");
        /// How long a watch must stay up to count as stable and end a resync loop (default 10m).
        #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_RESYNC_LOOP_STABLE_PERIOD")]
        resync_loop_stable_period: Option<Duration> => Duration = Tuning::default().resync_loop_stable_period,
            into tuning.resync_loop_stable_period,
            reload Jobs,
            check |v| rules::positive_at_most(*v, MAX_RESYNC_LOOP_STABLE_PERIOD, "must be longer than zero; the default is 10m");
        /// How often the leader of each job runs an exact consistency check (0 disables it).
        #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_CHECK_INTERVAL")]
        check_interval: Option<Duration> => Duration = DEFAULT_CHECK_INTERVAL,
            into checks.interval,
            reload Jobs,
            check |v| rules::at_most(*v, MAX_CHECK_INTERVAL);
        /// Rewrite the keys an exact check finds different, through the normal fenced write path.
        #[arg(long, env = "ETCD_SYNCER_CHECK_REPAIR")]
        check_repair: bool => bool = false,
            into checks.repair,
            reload Jobs,
            check rules::any;
        /// Sample keys of each kind of difference shown in check logs.
        #[arg(long, env = "ETCD_SYNCER_CHECK_SAMPLE_SIZE")]
        check_sample_size: Option<usize> => usize = DEFAULT_CHECK_SAMPLE_SIZE,
            into checks.sample_size,
            reload Jobs,
            check |v| rules::between(*v, 0, 1000, "must be at most 1000");
        /// /healthz fails when a job's loop (leading or standby) has not woken for this long.
        #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_LIVENESS_TIMEOUT")]
        liveness_timeout: Option<Duration> => Duration = crate::telemetry::health::DEFAULT_LIVENESS_TIMEOUT,
            into liveness_timeout,
            reload Process,
            check |v| rules::at_most(*v, MAX_LIVENESS_TIMEOUT);
        /// `faithful` (default): a key on a source lease is written on a
        /// destination lease kept alive while the source lease lives; `strip`:
        /// every key is written without a lease (mirrored keys never expire).
        #[arg(long, value_enum, env = "ETCD_SYNCER_LEASES")]
        leases: Option<LeaseMode> => LeaseMode = LeaseMode::default(),
            into leases.mode,
            reload Jobs,
            check rules::any;
        /// Added to each mirrored lease's TTL on the destination, so live keys
        /// survive a replicator outage shorter than this (whole seconds, 5s to 1h,
        /// default 30s).
        #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_LEASE_GRACE")]
        lease_grace: Option<Duration> => Duration = LeaseSettings::default().grace,
            into leases.grace,
            reload Jobs,
            check |v| rules::whole_seconds(*v, MIN_LEASE_GRACE, MAX_LEASE_GRACE, "must be whole seconds from 5s to 1h (etcd leases have second granularity; a leader's takeover must fit in the grace or a failover drops live registrations); the default is 30s");

        /// Keep the destination revision-exact: the whole keyspace (but the
        /// meta prefix), one destination txn per source revision, so revisions,
        /// create/mod revisions, versions and lease IDs are the source's. The
        /// destination starts as a snapshot restore of the source (see
        /// docs/operations.md, "Revision-exact standby").
        #[arg(long, env = "ETCD_SYNCER_REVISION_EXACT")]
        revision_exact: bool => bool = false,
            into revision_exact,
            reload Process,
            check rules::any;
        /// With --revision-exact, when the source compacted history not yet
        /// replayed (an outage longer than its compaction interval): catch-up
        /// writes the difference as exactly the missing revisions and compacts
        /// the standby there (keys changed in the gap keep value and lease, not
        /// revisions and version); stop waits for a re-seed (default catch-up).
        #[arg(long, value_enum, env = "ETCD_SYNCER_EXACT_GAP")]
        exact_gap: Option<ExactGap> => ExactGap = ExactGap::CatchUp,
            into exact_gap,
            reload Process,
            check rules::any;

        /// Mirror auth roles (with their permissions, dest-prefix rewritten) and
        /// users (with their role grants) to the destination, cluster-wide; run
        /// by the leader of the first job. Needs the root role on both sides.
        #[arg(long, env = "ETCD_SYNCER_SYNC_AUTH")]
        sync_auth: bool => bool = false,
            into auth.enabled,
            reload Process,
            check rules::any;
        /// How often --sync-auth compares and mirrors roles and users (default 1m).
        #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_AUTH_SYNC_INTERVAL")]
        auth_sync_interval: Option<Duration> => Duration = DEFAULT_AUTH_SYNC_INTERVAL,
            into auth.interval,
            reload Process,
            check |v| rules::at_most(*v, MAX_AUTH_SYNC_INTERVAL).and_then(|()| rules::between(*v, MIN_AUTH_SYNC_INTERVAL, MAX_AUTH_SYNC_INTERVAL, "must be at least 1s; the default is 1m"));
        /// TOML file of `user = "password"` lines: passwords for users --sync-auth
        /// creates on the destination (etcd never reveals password hashes).
        #[arg(long, env = "ETCD_SYNCER_AUTH_PASSWORDS_FILE")]
        auth_passwords_file: Option<PathBuf> => Option<PathBuf> = None,
            into auth.passwords_file,
            reload Process,
            check rules::any;
        /// How often every endpoint group of each side is health-checked
        /// (default 5s).
        #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_ENDPOINT_CHECK_INTERVAL")]
        endpoint_check_interval: Option<Duration> => Duration = DEFAULT_ENDPOINT_CHECK_INTERVAL,
            into failover.check_interval,
            reload Reconnect,
            check |v| rules::between(*v, MIN_ENDPOINT_CHECK_INTERVAL, Duration::MAX, "must be at least 100ms; the default is 5s").and_then(|()| rules::at_most(*v, MAX_ENDPOINT_CHECK_INTERVAL));
        /// Failed health checks in a row of the endpoint group in use before
        /// switching to the most preferred healthy group (default 3).
        #[arg(long, env = "ETCD_SYNCER_ENDPOINT_FAILOVER_AFTER")]
        endpoint_failover_after: Option<u32> => u32 = DEFAULT_ENDPOINT_FAILOVER_AFTER,
            into failover.failover_after,
            reload Reconnect,
            check |v| rules::between(*v, 1, u32::MAX, "must be at least 1 failed check; the default is 3");
        /// How long a more preferred endpoint group must stay healthy before
        /// switching back to it (default 1m).
        #[arg(long, value_parser = humantime::parse_duration, env = "ETCD_SYNCER_ENDPOINT_FAILBACK_AFTER")]
        endpoint_failback_after: Option<Duration> => Duration = DEFAULT_ENDPOINT_FAILBACK_AFTER,
            into failover.failback_after,
            reload Reconnect,
            check |v| rules::at_most(*v, MAX_ENDPOINT_FAILBACK_AFTER);
    }

    file FileConfig ("The config file `mirror-plus --config` reads: the table's keys, both \
        sides and a list of jobs. Unknown keys are rejected so a typo cannot silently fall \
        back to a default.") {
        pub source: Option<FileCluster>,
        pub destination: Option<FileCluster>,
        #[serde(default)]
        pub jobs: Vec<FileJob>,
    }
}

/// Reads the config file named by `--config`.
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

/// The table as the configuration reference shows it: flag, variable,
/// file key, default and what a live reload does. `command` is
/// `mirror-plus`'s clap command, where the variables are declared.
pub fn reference(command: &clap::Command) -> String {
    let mut out = String::from(
        "| flag | environment | file key | default | on reload |\n|---|---|---|---|---|\n",
    );
    for spec in SETTINGS {
        let env = command
            .get_arguments()
            .find(|a| a.get_id().as_str() == spec.name)
            .and_then(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        let default = match (spec.default)() {
            shown if shown.is_empty() => "none".to_string(),
            shown => format!("`{shown}`"),
        };
        let reload = match spec.reload {
            Reload::Jobs => "every job restarts",
            Reload::Reconnect => "both sides reconnect",
            Reload::Process => "needs a process restart",
        };
        out.push_str(&format!(
            "| `{}` | `{env}` | `{}` | {default} | {reload} |\n",
            spec.flag(),
            spec.key(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/config-reference.toml documents every key of the table: it
    /// parses, and sets each one.
    #[test]
    fn the_reference_config_sets_every_key() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/config-reference.toml");
        load_file(&path).expect("docs/config-reference.toml parses");
        let text = std::fs::read_to_string(&path).expect("read");
        let table: toml::Table = toml::from_str(&text).expect("toml");
        for spec in SETTINGS {
            assert!(
                table.contains_key(&spec.key()),
                "docs/config-reference.toml does not set {}",
                spec.key()
            );
        }
        for side in ["source", "destination"] {
            let section = table[side].as_table().expect("a section per side");
            for key in [
                "cacert",
                "cert",
                "key",
                "user",
                "password",
                "password-file",
                "compression",
            ] {
                assert!(section.contains_key(key), "{side}.{key} is not shown");
            }
        }
        // One side shows `endpoints`, the other several `[[endpoint-groups]]`.
        assert!(table["source"].get("endpoints").is_some());
        assert!(table["destination"]["endpoint-groups"]
            .as_array()
            .is_some_and(|groups| groups.len() > 1));
        let job = &table["jobs"].as_array().expect("jobs")[0];
        for key in [
            "name",
            "prefix",
            "dest-prefix",
            "max-write-ops-per-second",
            "max-write-bytes-per-second",
            "exclude-prefixes",
        ] {
            assert!(job.get(key).is_some(), "jobs[0].{key} is not shown");
        }
    }

    /// The reference in docs/configuration.md is the table's.
    #[test]
    fn the_configuration_reference_lists_the_table() {
        use clap::CommandFactory;
        let command = crate::config::Cli::command();
        let mirror = command.find_subcommand("mirror-plus").expect("mirror-plus");
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
        let doc = std::fs::read_to_string(path).expect("read docs/configuration.md");
        let table = reference(mirror);
        assert!(
            doc.contains(&table),
            "docs/configuration.md does not hold the settings table; run `make docs`:\n{table}"
        );
        assert_eq!(table.lines().count(), SETTINGS.len() + 2);
        assert!(table.contains("| `--lock-ttl` | `ETCD_SYNCER_LOCK_TTL` | `lock-ttl` | `5s` | needs a process restart |"));
    }

    /// Every row's default passes its own rule, and the defaults fill the
    /// same settings a run without flags or file gets.
    #[test]
    fn flags_win_over_the_file_which_wins_over_the_default() {
        let file: FileConfig =
            toml::from_str("page-size = 500\nlock-ttl = \"7s\"\ncheck-repair = true\n")
                .expect("toml");
        let side = |side| ClusterSettings {
            side,
            groups: Vec::new(),
            tls: None,
            credentials: None,
            password_file: None,
            compression: Compression::default_for(side),
        };
        let mut settings = Settings::skeleton(
            side(crate::model::Side::Source),
            side(crate::model::Side::Destination),
        );
        let mut from_flag = FromFlag::default();
        let mut file = file;
        RunFlags {
            page_size: Some(900),
            ..RunFlags::default()
        }
        .apply(&mut file, &mut settings, &mut from_flag)
        .expect("valid");
        assert_eq!(settings.tuning.page_size, 900);
        assert!(from_flag.page_size);
        assert_eq!(settings.lock_ttl, Duration::from_secs(7));
        assert!(!from_flag.lock_ttl);
        assert!(settings.checks.repair);
        assert_eq!(
            settings.tuning.max_inflight_txns,
            Tuning::default().max_inflight_txns
        );
    }
}
