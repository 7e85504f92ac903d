//! `promote --sync-auth`: one auth sync pass before the promoted marker, so
//! the new primary has the source's roles and users.

use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use crate::cli::error::AppError;
use crate::config::{load_auth_passwords, AuthPasswords, ClusterSettings, PromoteAuthArgs};
use crate::etcd::auth::RealAuth;
use crate::etcd::client::Cluster;
use crate::ha::auth_sync::{report_pass, sync_once, AuthSync, AuthSyncError};
use crate::model::keys::KeyRewrite;
use crate::ops::admin::collect_status;

/// Runs the pass when `--sync-auth` is set (and this is not `--undo`).
/// Job prefixes come from every job's checkpoint under the meta prefix.
pub async fn sync_auth_before_promote(
    args: &PromoteAuthArgs,
    undo: bool,
    meta_prefix: &str,
    source: Option<&ClusterSettings>,
    destination: &ClusterSettings,
    dest: &Cluster,
    request_timeout: Duration,
) -> Result<(), AppError> {
    let (true, false, Some(source)) = (args.sync_auth, undo, source) else {
        return Ok(());
    };
    let passwords = match &args.auth_passwords_file {
        Some(path) => load_auth_passwords(path)?,
        None => AuthPasswords::default(),
    };
    let rewrites = collect_status(dest, meta_prefix, None)
        .await?
        .into_iter()
        .filter_map(|status| {
            let prefix = status.source_prefix?;
            let dest_prefix = status.dest_prefix.unwrap_or_else(|| prefix.clone());
            Some(KeyRewrite::new(prefix.as_bytes(), dest_prefix.as_bytes()))
        })
        .collect();
    let sync = AuthSync {
        source: Arc::new(
            RealAuth::connect(source, request_timeout)
                .await
                .map_err(AuthSyncError::Connect)?,
        ),
        dest: Arc::new(
            RealAuth::connect(destination, request_timeout)
                .await
                .map_err(AuthSyncError::Connect)?,
        ),
        dest_kv: dest.clone(),
        meta_prefix: meta_prefix.to_string(),
        rewrites,
        syncer_user: destination.credentials.as_ref().map(|c| c.user.clone()),
        passwords,
        instance_id: crate::config::default_instance_id(),
    };
    let report = sync_once(&sync).await?;
    report_pass(&report, None);
    info!(
        changes = report.changes,
        unsynced_users = report.unsynced_users.len(),
        "Auth synced before promotion."
    );
    Ok(())
}
