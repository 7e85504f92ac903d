//! The TOML config file `mirror-plus --config` reads: the same settings as
//! the flags, plus a list of jobs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use super::error::ConfigError;
use super::settings::LeaseMode;

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
    pub resync_loop_full_syncs: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub resync_loop_stable_period: Option<Duration>,
    pub check_repair: Option<bool>,
    pub check_sample_size: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub liveness_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub lock_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub rebalance_interval: Option<Duration>,
    pub leases: Option<LeaseMode>,
    #[serde(default, with = "humantime_serde")]
    pub lease_grace: Option<Duration>,
    pub sync_auth: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub auth_sync_interval: Option<Duration>,
    pub auth_passwords_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub endpoint_check_interval: Option<Duration>,
    pub endpoint_failover_after: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub endpoint_failback_after: Option<Duration>,
    #[serde(default)]
    pub jobs: Vec<FileJob>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileCluster {
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Several ways to reach the cluster, most preferred first (instead of
    /// `endpoints`): `[[source.endpoint-groups]]` with a name and endpoints.
    #[serde(default)]
    pub endpoint_groups: Vec<FileEndpointGroup>,
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// Read the password from a file (a mounted Secret), trailing newline trimmed.
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileEndpointGroup {
    pub name: String,
    pub endpoints: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileJob {
    pub name: Option<String>,
    pub prefix: String,
    pub dest_prefix: Option<String>,
    #[serde(default)]
    pub no_dest_prefix: bool,
    pub max_write_ops_per_second: Option<u64>,
    pub max_write_bytes_per_second: Option<ByteSize>,
    #[serde(default)]
    pub exclude_prefixes: Vec<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

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
            resync_loop_full_syncs,
            resync_loop_stable_period,
            check_repair,
            check_sample_size,
            liveness_timeout,
            lock_ttl,
            rebalance_interval,
            leases,
            lease_grace,
            sync_auth,
            auth_sync_interval,
            auth_passwords_file,
            endpoint_check_interval,
            endpoint_failover_after,
            endpoint_failback_after,
            jobs,
        } = file;
        assert!(
            endpoint_check_interval.is_some()
                && endpoint_failover_after.is_some()
                && endpoint_failback_after.is_some()
        );
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
        assert!(resync_loop_full_syncs.is_some() && resync_loop_stable_period.is_some());
        assert!(check_sample_size.is_some() && lock_ttl.is_some() && rebalance_interval.is_some());
        assert!(liveness_timeout.is_some() && leases.is_some() && lease_grace.is_some());
        assert!(
            sync_auth.is_some() && auth_sync_interval.is_some() && auth_passwords_file.is_some()
        );
        let mut groups_shown = false;
        for side in [source.expect("source"), destination.expect("destination")] {
            let FileCluster {
                endpoints,
                endpoint_groups,
                cacert,
                cert,
                key,
                user,
                password,
                password_file,
            } = side;
            // One side shows `endpoints`, the other `[[endpoint-groups]]`.
            assert!(endpoints.is_empty() != endpoint_groups.is_empty());
            groups_shown |= endpoint_groups.iter().all(|g| !g.endpoints.is_empty())
                && endpoint_groups.len() > 1;
            assert!(cacert.is_some() && cert.is_some() && key.is_some());
            assert!(user.is_some() && password.is_some() && password_file.is_some());
        }
        assert!(groups_shown);
        let FileJob {
            name,
            prefix,
            dest_prefix,
            no_dest_prefix: _,
            max_write_ops_per_second,
            max_write_bytes_per_second,
            exclude_prefixes,
        } = &jobs[0];
        assert!(name.is_some() && !prefix.is_empty() && dest_prefix.is_some());
        assert!(max_write_ops_per_second.is_some() && max_write_bytes_per_second.is_some());
        assert!(!exclude_prefixes.is_empty());
    }
}
