//! Keeping a [`Cluster`] on a working path without a restart.
//!
//! - **Endpoint groups.** Every group of a side (e.g. a private line, then
//!   the public network) is health-checked each `--endpoint-check-interval`
//!   over a connection of its own; [`GroupSelector`] decides when to leave
//!   the group in use and when to come back. A switch replaces the
//!   cluster's connection: requests go the new way at once, and open
//!   watches end, so each job resumes from its checkpoint over it (the fast
//!   path: no full sync).
//! - **One cluster.** A group that answers with another cluster id than
//!   the group in use is never switched to: it is another cluster, and
//!   mirroring from (or to) it would be a different job.
//! - **Rotated files.** TLS material and the password file are compared
//!   with what was loaded every [`FILE_CHECK_INTERVAL`]; a change rebuilds
//!   the connection with the new files (a mounted Secret rotates in place).
//!   Files that do not load (half written, a key that does not match) keep
//!   the old connection, with a WARN, until they do.
//! - **Expiry.** `etcd_syncer_tls_cert_expiry_timestamp_seconds{side,file}`
//!   is the earliest `notAfter` of each certificate file, re-read with it.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::settings::{FailoverSettings, FILE_CHECK_INTERVAL};
use crate::config::ClusterSettings;
use crate::etcd::api::Etcd;
pub use crate::etcd::client::connect_preferred;
use crate::etcd::client::{connect_client, Cluster, FailureKind};
use crate::etcd::real::RealEtcd;
use crate::model::failover::{GroupSelector, SwitchReason};
use crate::telemetry::metrics::RouteMetrics;

/// One endpoint group and its own connection (for health checks, and for
/// requests once it is switched to).
struct Slot {
    name: String,
    settings: ClusterSettings,
    backend: Option<Arc<dyn Etcd>>,
    cluster_id: Option<u64>,
}

/// What a file held when it was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint(Vec<Option<u64>>);

fn fingerprint(files: &[(String, PathBuf)]) -> Fingerprint {
    Fingerprint(
        files
            .iter()
            .map(|(_, path)| file_fingerprint(path))
            .collect(),
    )
}

/// A hash of the file's content (`None` when it does not read): what a
/// watcher compares to tell a changed file (a rotated Secret, an updated
/// ConfigMap) from one merely rewritten.
pub fn file_fingerprint(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some(hasher.finish())
}

/// The earliest `notAfter` (Unix seconds) of the certificates in a PEM file.
pub fn earliest_expiry(pem: &[u8]) -> Option<i64> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .filter(|pem| pem.label == "CERTIFICATE")
        .filter_map(|pem| {
            pem.parse_x509()
                .ok()
                .map(|cert| cert.validity().not_after.timestamp())
        })
        .min()
}

pub struct Routes {
    cluster: Cluster,
    settings: ClusterSettings,
    failover: FailoverSettings,
    /// Where health checks read (a count-only range; a prefix the
    /// configured role may read).
    probe_prefix: Vec<u8>,
    metrics: RouteMetrics,
}

impl Routes {
    /// `cluster` was connected by [`connect_preferred`] through group
    /// `active` of `settings`.
    pub fn new(
        cluster: Cluster,
        settings: ClusterSettings,
        failover: FailoverSettings,
        probe_prefix: Vec<u8>,
        metrics: RouteMetrics,
    ) -> Self {
        Self {
            cluster,
            settings,
            failover,
            probe_prefix,
            metrics,
        }
    }

    fn side(&self) -> String {
        self.settings.side.to_string()
    }

    fn set_active(&self, active: usize) {
        let side = self.side();
        for (i, group) in self.settings.groups.iter().enumerate() {
            self.metrics
                .group_active
                .with_label_values(&[side.as_str(), group.name.as_str(), &i.to_string()])
                .set(i64::from(i == active));
        }
    }

    fn record_expiry(&self) {
        let side = self.side();
        for (field, path) in self.settings.watched_files() {
            if field.ends_with("-key") || field.ends_with("password-file") {
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .as_deref()
                .and_then(earliest_expiry)
            {
                Some(not_after) => self
                    .metrics
                    .tls_cert_expiry_timestamp_seconds
                    .with_label_values(&[side.as_str(), &path.display().to_string()])
                    .set(not_after as f64),
                None => {
                    warn!(side = %side, %field, path = %path.display(), "No certificate expiry readable from the file.")
                }
            }
        }
    }

    /// Health-checks the groups and watches the files until cancelled.
    /// Returns at once when there is nothing to watch (one group, no files).
    ///
    /// # Cancel-Safety
    /// Stops at the next await; a switch is one assignment, never half made.
    pub async fn run(mut self, active: usize, cancel: CancellationToken) {
        let files = self.settings.watched_files();
        self.cluster.set_on_fallback(active > 0);
        self.set_active(active);
        self.record_expiry();
        let groups = self.settings.groups.len();
        if groups == 1 && files.is_empty() {
            return;
        }
        let mut slots: Vec<Slot> = (0..groups)
            .map(|i| Slot {
                name: self.settings.groups[i].name.clone(),
                settings: self.settings.through_group(i),
                backend: (i == active).then(|| self.cluster.current_backend()),
                cluster_id: None,
            })
            .collect();
        let mut selector = GroupSelector::new(
            groups,
            active,
            self.failover.failover_after,
            self.failover.failback_after,
        );
        let mut loaded = fingerprint(&files);
        let started = Instant::now();
        let mut checks = tokio::time::interval(self.failover.check_interval);
        checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut file_checks = tokio::time::interval(FILE_CHECK_INTERVAL);
        file_checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        file_checks.tick().await;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = checks.tick(), if groups > 1 => {
                    let healthy = self.check_groups(&mut slots, selector.active()).await;
                    // Replaced meanwhile (a reload): switching now would
                    // undo the new task's connection.
                    if cancel.is_cancelled() {
                        return;
                    }
                    if let Some(switch) = selector.observe(started.elapsed(), &healthy) {
                        let to = &slots[switch.to];
                        let backend = to.backend.clone().expect("a group that answered is connected");
                        self.cluster.switch_to_group(&to.settings, backend);
                        self.cluster.set_on_fallback(switch.to > 0);
                        self.set_active(switch.to);
                        self.metrics
                            .group_switches_total
                            .with_label_values(&[self.side().as_str(), switch.reason.label()])
                            .inc();
                        let from = &slots[switch.from].name;
                        match switch.reason {
                            SwitchReason::Failover => warn!(
                                side = %self.settings.side,
                                from = %from,
                                to = %to.name,
                                failed_checks = self.failover.failover_after,
                                "Endpoint group stopped answering; switched to the next healthy one. Jobs resume from their checkpoints."
                            ),
                            SwitchReason::Failback => info!(
                                side = %self.settings.side,
                                from = %from,
                                to = %to.name,
                                "A preferred endpoint group is healthy again; switched back to it."
                            ),
                        }
                    }
                }
                _ = file_checks.tick(), if !files.is_empty() => {
                    let now = fingerprint(&files);
                    if now != loaded && self.reload_files(&mut slots, selector.active(), &cancel).await {
                        loaded = now;
                    }
                }
            }
        }
    }

    /// One health check of every group, concurrently: true for each that
    /// answered as the same cluster as the group in use.
    async fn check_groups(&self, slots: &mut [Slot], active: usize) -> Vec<bool> {
        let timeout = self
            .failover
            .check_interval
            .max(Duration::from_secs(1))
            .min(self.cluster.request_timeout());
        let probes = slots.iter().map(|slot| {
            let settings = slot.settings.clone();
            let backend = slot.backend.clone();
            let probe_prefix = self.probe_prefix.clone();
            async move {
                let backend = match backend {
                    Some(backend) => backend,
                    None => match connect_client(&settings, timeout, "connect").await {
                        Ok(client) => Arc::new(RealEtcd::new(client)) as Arc<dyn Etcd>,
                        Err(_) => return (None, false, None),
                    },
                };
                let probe = Cluster::with_backend(
                    settings.side,
                    settings.endpoints().join(","),
                    backend.clone(),
                    timeout,
                );
                match probe.head(&probe_prefix).await {
                    Ok(head) => (Some(backend), true, Some(head.cluster_id)),
                    // It answered: the role is what is wrong, on every group alike.
                    Err(error) if error.kind() == FailureKind::Auth => (Some(backend), true, None),
                    Err(_) => (Some(backend), false, None),
                }
            }
        });
        let results = futures::future::join_all(probes).await;
        let side = self.side();
        for (slot, (backend, _, cluster_id)) in slots.iter_mut().zip(&results) {
            if backend.is_some() {
                slot.backend = backend.clone();
            }
            if let Some(id) = cluster_id {
                slot.cluster_id = Some(*id).filter(|id| *id != 0);
            }
        }
        // Until the group in use answers (a preferred group down at start),
        // the cluster the checkpoints name is the one to match.
        let active_id = slots[active]
            .cluster_id
            .or_else(|| self.cluster.expected_cluster_id());
        let mut healthy = Vec::with_capacity(slots.len());
        for (slot, (_, answered, _)) in slots.iter().zip(&results) {
            let other_cluster =
                matches!((active_id, slot.cluster_id), (Some(a), Some(b)) if a != b);
            if other_cluster && *answered {
                error!(
                    side = %self.settings.side,
                    group = %slot.name,
                    cluster_id = slot.cluster_id.unwrap_or(0),
                    in_use_cluster_id = active_id.unwrap_or(0),
                    "Endpoint group answers as another cluster than the group in use (or than the checkpoints name); it is never switched to. Fix its endpoints."
                );
            }
            let ok = *answered && !other_cluster;
            self.metrics
                .group_healthy
                .with_label_values(&[side.as_str(), slot.name.as_str()])
                .set(i64::from(ok));
            healthy.push(ok);
        }
        healthy
    }

    fn refused(&self, reason: &str) {
        self.metrics
            .file_changes_refused_total
            .with_label_values(&[self.side().as_str(), reason])
            .inc();
    }

    /// The TLS or password files changed: rebuilds the connection of the
    /// group in use with them, and drops the others' (rebuilt at their next
    /// check). False (and the old connection kept, with a WARN and
    /// `etcd_syncer_file_changes_refused_total`) when they do not load or
    /// the cluster does not answer with them: files that cannot work are
    /// never switched to.
    async fn reload_files(
        &mut self,
        slots: &mut [Slot],
        active: usize,
        cancel: &CancellationToken,
    ) -> bool {
        let mut settings = self.settings.clone();
        if let (Some(path), Some(credentials)) = (
            settings.password_file.clone(),
            settings.credentials.as_mut(),
        ) {
            match crate::config::read_password_file(settings.side, &path) {
                Ok(password) => credentials.password = password,
                Err(error) => {
                    warn!(side = %settings.side, %error, "The password file changed but does not read; keeping the current connection.");
                    self.refused("invalid");
                    return false;
                }
            }
        }
        if let Err(reason) = check_files_load(&settings) {
            warn!(side = %settings.side, %reason, "TLS files changed but cannot be used (see reason); keeping the current connection until they can.");
            self.refused("invalid");
            return false;
        }
        let through = settings.through_group(active);
        let timeout = self.cluster.request_timeout();
        let client = match connect_client(&through, timeout, "reconnect").await {
            Ok(client) => client,
            Err(error) => {
                warn!(side = %settings.side, %error, "Reconnecting with the changed files failed; keeping the current connection, retrying at the next check.");
                self.refused("no_answer");
                return false;
            }
        };
        let backend: Arc<dyn Etcd> = Arc::new(RealEtcd::new(client));
        // Without a user the channel connects lazily: one read proves the
        // handshake works before anything depends on it. An answer that
        // refuses the role still proves the files.
        let probe = Cluster::with_backend(
            settings.side,
            through.endpoints().join(","),
            backend.clone(),
            timeout,
        );
        if let Err(error) = probe.head_hedged(&self.probe_prefix).await {
            if error.kind() != FailureKind::Auth {
                warn!(side = %settings.side, %error, "The cluster does not answer with the changed files; keeping the current connection, retrying at the next check.");
                self.refused("no_answer");
                return false;
            }
        }
        for (i, slot) in slots.iter_mut().enumerate() {
            slot.settings = settings.through_group(i);
            slot.backend = (i == active).then(|| backend.clone());
        }
        // Replaced meanwhile (a reload): switching now would undo the new
        // task's connection.
        if cancel.is_cancelled() {
            return false;
        }
        self.cluster.switch_to_group(&through, backend);
        self.settings = settings;
        self.metrics
            .reconnects_total
            .with_label_values(&[self.side().as_str(), "files_changed"])
            .inc();
        self.record_expiry();
        info!(side = %self.settings.side, group = %slots[active].name, "TLS or password files changed; reconnected with them (open watches re-open over the new connection).");
        true
    }
}

/// The files hold what their flags say (the checks at start), and each
/// certificate file parses as X.509 (what the expiry metric reads): told
/// before the working connection is left.
fn check_files_load(settings: &ClusterSettings) -> Result<(), String> {
    let Some(tls) = &settings.tls else {
        return Ok(());
    };
    crate::config::check_tls_files(settings.side, tls).map_err(|error| error.to_string())?;
    let certificates = tls
        .ca
        .iter()
        .chain(tls.cert_and_key.iter().map(|(cert, _)| cert));
    for path in certificates {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if earliest_expiry(&bytes).is_none() {
            return Err(format!("{}: no X.509 certificate in it", path.display()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate (notAfter 2036-11-21T03:06:10Z).
    const CERT: &str = include_str!("../../tests/data/expiry-2036.pem");

    #[test]
    fn expiry_is_the_earliest_not_after() {
        assert_eq!(earliest_expiry(CERT.as_bytes()), Some(2_110_849_570));
        assert_eq!(earliest_expiry(b"not a pem"), None);
        assert_eq!(
            earliest_expiry(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            None,
            "garbage inside a PEM block is no certificate, and no panic"
        );
    }

    #[test]
    fn fingerprints_change_with_content_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "one").unwrap();
        let files = vec![("--src-cacert".to_string(), path.clone())];
        let first = fingerprint(&files);
        std::fs::write(&path, "one").unwrap();
        assert_eq!(fingerprint(&files), first, "rewritten, same bytes");
        std::fs::write(&path, "two").unwrap();
        assert_ne!(fingerprint(&files), first);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(fingerprint(&files), Fingerprint(vec![None]));
    }
}
