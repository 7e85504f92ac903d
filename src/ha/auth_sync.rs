//! `--sync-auth`: keeps the destination's roles and users equal to the
//! source's (see [`super::auth_plan`] for the rules). Auth is cluster-wide,
//! so one loop per process works, and only while this instance leads the
//! first configured job: exactly one replica syncs at a time. `promote
//! --sync-auth` runs one pass with [`sync_once`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{AuthPasswords, ClusterSettings};
use crate::etcd::api::{Op, RangeRequest, TxnRequest};
use crate::etcd::auth::{apply_change, read_snapshot, EtcdAuth, RealAuth};
use crate::etcd::client::{ClientError, Cluster};
use crate::etcd::periodic::{First, Rounds};
use crate::ha::auth_plan::{plan, MirroredNames, PlanRules, Straddling};
use crate::model::keys::KeyRewrite;
use crate::model::versions::Version;
use crate::model::Side;
use crate::telemetry::metrics::AuthMetrics;

/// The first release that can add a user without a password (`--no-password`).
pub const NO_PASSWORD_USERS_SINCE: Version = Version::new(3, 5, 0);

/// The record of names the syncer created, under the meta prefix. It has no
/// `/` after the meta prefix, so it is never taken for a job's meta keys.
pub fn record_key(meta_prefix: &str) -> String {
    format!("{meta_prefix}auth-mirrored")
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSyncError {
    #[error("auth sync: cannot connect: {0}")]
    Connect(#[source] ClientError),
    #[error("auth sync: reading the {side}'s roles and users failed: {source}")]
    Read {
        side: Side,
        #[source]
        source: ClientError,
    },
    #[error("auth sync: {change} on the destination failed: {source}")]
    Apply {
        change: String,
        #[source]
        source: ClientError,
    },
    #[error(
        "auth sync: the record of mirrored names ({key}) could not be read or written: {source}"
    )]
    Record {
        key: String,
        #[source]
        source: ClientError,
    },
    #[error("auth sync: cancelled")]
    Cancelled,
}

impl AuthSyncError {
    /// The `etcd_syncer_auth_sync_total{result}` label.
    pub fn label(&self) -> &'static str {
        match self {
            AuthSyncError::Connect(source)
            | AuthSyncError::Read { source, .. }
            | AuthSyncError::Apply { source, .. }
            | AuthSyncError::Record { source, .. } => crate::mirror::client_error_kind(source),
            AuthSyncError::Cancelled => "cancelled",
        }
    }
}

/// Everything one pass needs.
#[derive(Clone)]
pub struct AuthSync {
    pub source: Arc<dyn EtcdAuth>,
    pub dest: Arc<dyn EtcdAuth>,
    /// The destination's KV (the record) and its version.
    pub dest_kv: Cluster,
    pub meta_prefix: String,
    pub rewrites: Vec<KeyRewrite>,
    /// `--dst-user`: never changed.
    pub syncer_user: Option<String>,
    pub passwords: AuthPasswords,
    pub instance_id: String,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    pub changes: usize,
    pub unsynced_users: Vec<String>,
    pub straddling: Vec<Straddling>,
}

#[derive(Serialize)]
struct RecordValue<'a> {
    roles: &'a BTreeSet<String>,
    users: &'a BTreeSet<String>,
    updated_at: String,
    instance: &'a str,
}

impl AuthSync {
    async fn read_record(&self) -> Result<MirroredNames, AuthSyncError> {
        let key = record_key(&self.meta_prefix);
        let response = self
            .dest_kv
            .range("read auth sync record", RangeRequest::key(key.as_bytes()))
            .await
            .map_err(|source| AuthSyncError::Record {
                key: key.clone(),
                source,
            })?;
        let Some(kv) = response.kvs.first() else {
            return Ok(MirroredNames::default());
        };
        match serde_json::from_slice(&kv.value) {
            Ok(names) => Ok(names),
            Err(error) => {
                // Forgetting what we created only means never deleting it.
                warn!(%key, %error, "The record of mirrored roles and users is not readable; deleting nothing it named. It is rewritten from now on.");
                Ok(MirroredNames::default())
            }
        }
    }

    async fn write_record(&self, names: &MirroredNames) -> Result<(), AuthSyncError> {
        let key = record_key(&self.meta_prefix);
        let value = serde_json::to_vec(&RecordValue {
            roles: &names.roles,
            users: &names.users,
            updated_at: crate::telemetry::clock::now_rfc3339(),
            instance: &self.instance_id,
        })
        .unwrap_or_default();
        self.dest_kv
            .txn(
                "write auth sync record",
                TxnRequest::new().and_then(vec![Op::put(key.as_bytes(), value)]),
            )
            .await
            .map(drop)
            .map_err(|source| AuthSyncError::Record { key, source })
    }
}

/// One pass: read both auth stores and the record, plan, record what will
/// be created, apply in order, record the result.
///
/// # Cancel-Safety
/// Dropping it stops between two changes; the next pass finishes the job
/// (every creation is recorded before it is made).
pub async fn sync_once(sync: &AuthSync) -> Result<PassReport, AuthSyncError> {
    let source = read_snapshot(sync.source.as_ref())
        .await
        .map_err(|source| AuthSyncError::Read {
            side: Side::Source,
            source,
        })?;
    let dest = read_snapshot(sync.dest.as_ref())
        .await
        .map_err(|source| AuthSyncError::Read {
            side: Side::Destination,
            source,
        })?;
    let recorded = sync.read_record().await?;
    let version = sync.dest_kv.server_version().await;
    let no_password_users = version.is_some_and(|v| v >= NO_PASSWORD_USERS_SINCE);
    let planned = plan(
        &source,
        &dest,
        PlanRules {
            rewrites: &sync.rewrites,
            syncer_user: sync.syncer_user.as_deref(),
            passwords: &sync.passwords,
            no_password_users,
            mirrored: &recorded,
        },
    );
    let before = planned.mirrored_before(&recorded);
    if before != recorded {
        sync.write_record(&before).await?;
    }
    for change in &planned.changes {
        info!(%change, "Auth sync: changing the destination.");
        apply_change(sync.dest.as_ref(), change)
            .await
            .map_err(|source| AuthSyncError::Apply {
                change: change.to_string(),
                source,
            })?;
    }
    if planned.mirrored != before {
        sync.write_record(&planned.mirrored).await?;
    }
    Ok(PassReport {
        changes: planned.changes.len(),
        unsynced_users: planned.unsynced_users,
        straddling: planned.straddling,
    })
}

/// Logs what a pass could not do. `previous` suppresses repeating the same
/// warning every interval (it is logged again at DEBUG).
pub fn report_pass(report: &PassReport, previous: Option<&PassReport>) {
    let repeated = previous.is_some_and(|p| {
        p.unsynced_users == report.unsynced_users && p.straddling == report.straddling
    });
    for user in &report.unsynced_users {
        if repeated {
            debug!(%user, "Auth sync: user still not created on the destination.");
        } else {
            warn!(%user, "Auth sync: user not created on the destination: no password for it in --auth-passwords-file, and the destination's etcd (before 3.5, or version unknown) cannot add users without one. Add a line for it to the passwords file.");
        }
    }
    for straddling in &report.straddling {
        if repeated {
            debug!(role = %straddling.role, range = %straddling.range, "Auth sync: permission copied unchanged.");
        } else {
            warn!(role = %straddling.role, range = %straddling.range, "Auth sync: permission range straddles a job prefix boundary; copied unchanged, not rewritten to the dest prefix.");
        }
    }
}

/// What the loop connects to and how.
pub struct AuthSyncLoop {
    pub source: ClusterSettings,
    pub destination: ClusterSettings,
    pub request_timeout: Duration,
    pub interval: Duration,
    pub dest_kv: Cluster,
    pub meta_prefix: String,
    pub rewrites: Vec<KeyRewrite>,
    pub passwords: AuthPasswords,
    pub instance_id: String,
    pub metrics: AuthMetrics,
}

impl AuthSyncLoop {
    async fn connect(&self) -> Result<AuthSync, AuthSyncError> {
        let source = RealAuth::connect(&self.source, self.request_timeout)
            .await
            .map_err(AuthSyncError::Connect)?;
        let dest = RealAuth::connect(&self.destination, self.request_timeout)
            .await
            .map_err(AuthSyncError::Connect)?;
        Ok(AuthSync {
            source: Arc::new(source),
            dest: Arc::new(dest),
            dest_kv: self.dest_kv.clone(),
            meta_prefix: self.meta_prefix.clone(),
            rewrites: self.rewrites.clone(),
            syncer_user: self
                .destination
                .credentials
                .as_ref()
                .map(|c| c.user.clone()),
            passwords: self.passwords.clone(),
            instance_id: self.instance_id.clone(),
        })
    }
}

/// Runs a pass every `interval` while `leads()` says this instance leads
/// the first job; retries a failed pass with backoff. Ends on cancel.
pub async fn run_auth_sync(
    config: AuthSyncLoop,
    leads: Arc<dyn Fn() -> bool + Send + Sync>,
    cancel: CancellationToken,
) {
    let mut rounds = Rounds::new(config.interval, First::Now, &cancel);
    let mut backoff = crate::etcd::retry::Policy::forever(config.interval).backoff();
    let mut connected: Option<AuthSync> = None;
    let mut previous: Option<PassReport> = None;
    let mut was_leading = false;
    while rounds.next().await {
        let leading = leads();
        if leading != was_leading {
            if leading {
                info!(interval = ?config.interval, "Auth sync: this instance leads the first job; mirroring roles and users.");
            } else {
                info!("Auth sync: no longer leading the first job; stopped.");
                connected = None;
                previous = None;
                // The new leader reports from now on.
                config.metrics.users_unsynced.set(0);
            }
            was_leading = leading;
        }
        if !leading {
            continue;
        }
        // One pass, retried with backoff until it succeeds or leadership goes.
        loop {
            let attempt = async {
                if connected.is_none() {
                    connected = Some(config.connect().await?);
                }
                let sync = connected.as_ref().ok_or(AuthSyncError::Cancelled)?;
                sync_once(sync).await
            };
            let Some(result) = rounds.run(attempt).await else {
                return;
            };
            match result {
                Ok(report) => {
                    config.metrics.pass("ok");
                    config
                        .metrics
                        .users_unsynced
                        .set(report.unsynced_users.len() as i64);
                    config.metrics.last_sync_timestamp_seconds.set(
                        crate::telemetry::clock::now()
                            .duration_since(UNIX_EPOCH)
                            .map_or(0.0, |d| d.as_secs_f64()),
                    );
                    if report.changes > 0 {
                        info!(changes = report.changes, "Auth sync: destination updated.");
                    }
                    report_pass(&report, previous.as_ref());
                    previous = Some(report);
                    backoff = crate::etcd::retry::Policy::forever(config.interval).backoff();
                    break;
                }
                Err(error) => {
                    config.metrics.pass(error.label());
                    if matches!(error, AuthSyncError::Connect(_)) {
                        connected = None;
                    }
                    let delay = backoff.next().unwrap_or(config.interval);
                    warn!(%error, retry_in = ?delay, "Auth sync pass failed; retrying.");
                    if !crate::etcd::retry::sleep_alive(delay, &|| {}, &cancel).await {
                        return;
                    }
                    if !leads() {
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use futures::future::BoxFuture;
    use futures::FutureExt;

    use super::*;
    use crate::etcd::auth::{
        AuthChange, AuthResult, AuthSnapshot, KeyRange, NewUserPassword, PermType, Permissions,
    };
    use crate::ha::auth_plan::apply_to_snapshot;

    /// An auth store in memory; changes go through the plan's own model of
    /// etcd, and a change can be made to fail once.
    struct FakeAuth {
        side: Side,
        store: Mutex<AuthSnapshot>,
        added: Mutex<Vec<(String, NewUserPassword)>>,
        fail_on: Mutex<Option<String>>,
    }

    impl FakeAuth {
        fn new(side: Side, snapshot: AuthSnapshot) -> Arc<Self> {
            Arc::new(Self {
                side,
                store: Mutex::new(snapshot),
                added: Mutex::new(Vec::new()),
                fail_on: Mutex::new(None),
            })
        }

        fn change(&self, change: AuthChange) -> BoxFuture<'_, AuthResult<()>> {
            let failing = self.fail_on.lock().unwrap().take();
            if let Some(fragment) = failing {
                if change.to_string().contains(&fragment) {
                    let error = ClientError::Request {
                        side: self.side,
                        endpoints: "fake".into(),
                        operation: "change auth",
                        source: etcd_client::Error::GRpcStatus(tonic::Status::unavailable("down")),
                    };
                    return async move { Err(error) }.boxed();
                }
                *self.fail_on.lock().unwrap() = Some(fragment);
            }
            if let AuthChange::UserAdd { user, password } = &change {
                self.added
                    .lock()
                    .unwrap()
                    .push((user.clone(), password.clone()));
            }
            apply_to_snapshot(&mut self.store.lock().unwrap(), &[change]);
            async { Ok(()) }.boxed()
        }
    }

    impl EtcdAuth for FakeAuth {
        fn side(&self) -> Side {
            self.side
        }
        fn role_list(&self) -> BoxFuture<'_, AuthResult<Vec<String>>> {
            let roles = self.store.lock().unwrap().roles.keys().cloned().collect();
            async move { Ok(roles) }.boxed()
        }
        fn role_get(&self, role: &str) -> BoxFuture<'_, AuthResult<Permissions>> {
            let permissions = self.store.lock().unwrap().roles[role].clone();
            async move { Ok(permissions) }.boxed()
        }
        fn user_list(&self) -> BoxFuture<'_, AuthResult<Vec<String>>> {
            let users = self.store.lock().unwrap().users.keys().cloned().collect();
            async move { Ok(users) }.boxed()
        }
        fn user_get(&self, user: &str) -> BoxFuture<'_, AuthResult<BTreeSet<String>>> {
            let roles = self.store.lock().unwrap().users[user].clone();
            async move { Ok(roles) }.boxed()
        }
        fn role_add(&self, role: &str) -> BoxFuture<'_, AuthResult<()>> {
            self.change(AuthChange::RoleAdd { role: role.into() })
        }
        fn role_delete(&self, role: &str) -> BoxFuture<'_, AuthResult<()>> {
            self.change(AuthChange::RoleDelete { role: role.into() })
        }
        fn role_grant_permission(
            &self,
            role: &str,
            range: &KeyRange,
            perm: PermType,
        ) -> BoxFuture<'_, AuthResult<()>> {
            self.change(AuthChange::RoleGrantPermission {
                role: role.into(),
                range: range.clone(),
                perm,
            })
        }
        fn role_revoke_permission(
            &self,
            role: &str,
            range: &KeyRange,
        ) -> BoxFuture<'_, AuthResult<()>> {
            self.change(AuthChange::RoleRevokePermission {
                role: role.into(),
                range: range.clone(),
            })
        }
        fn user_add(
            &self,
            user: &str,
            password: &NewUserPassword,
        ) -> BoxFuture<'_, AuthResult<()>> {
            self.change(AuthChange::UserAdd {
                user: user.into(),
                password: password.clone(),
            })
        }
        fn user_delete(&self, user: &str) -> BoxFuture<'_, AuthResult<()>> {
            self.change(AuthChange::UserDelete { user: user.into() })
        }
        fn user_grant_role(&self, user: &str, role: &str) -> BoxFuture<'_, AuthResult<()>> {
            self.change(AuthChange::UserGrantRole {
                user: user.into(),
                role: role.into(),
            })
        }
        fn user_revoke_role(&self, user: &str, role: &str) -> BoxFuture<'_, AuthResult<()>> {
            self.change(AuthChange::UserRevokeRole {
                user: user.into(),
                role: role.into(),
            })
        }
    }

    fn memory_dest() -> Cluster {
        let store = crate::etcd::memory::new_store(1);
        let client =
            crate::etcd::memory::MemoryEtcd::new(store, crate::etcd::memory::Link::new("t", 1));
        Cluster::with_backend(
            Side::Destination,
            "memory",
            Arc::new(client),
            Duration::from_secs(5),
        )
    }

    fn perms(ranges: &[(&str, &str)]) -> Permissions {
        ranges
            .iter()
            .map(|(k, e)| (KeyRange::new(k.as_bytes(), e.as_bytes()), PermType::Read))
            .collect()
    }

    #[tokio::test]
    async fn a_pass_mirrors_records_and_deletes_only_what_it_created() {
        let source = FakeAuth::new(
            Side::Source,
            AuthSnapshot {
                roles: BTreeMap::from([("app".into(), perms(&[("/src/", "/src0")]))]),
                users: BTreeMap::from([("alice".into(), BTreeSet::from(["app".into()]))]),
            },
        );
        let dest = FakeAuth::new(
            Side::Destination,
            AuthSnapshot {
                roles: BTreeMap::from([("local".into(), perms(&[("/x", "")]))]),
                users: BTreeMap::from([
                    ("syncer".into(), BTreeSet::from(["root".into()])),
                    ("bob".into(), BTreeSet::new()),
                ]),
            },
        );
        let sync = AuthSync {
            source: source.clone(),
            dest: dest.clone(),
            dest_kv: memory_dest(),
            meta_prefix: "/meta/".into(),
            rewrites: vec![KeyRewrite::new("/src/", "/dst/")],
            syncer_user: Some("syncer".into()),
            passwords: AuthPasswords::new(BTreeMap::from([("alice".into(), "pw".into())])),
            instance_id: "test".into(),
        };

        // The record write fails half-way through: the creation is recorded anyway.
        *dest.fail_on.lock().unwrap() = Some("grant role app to user alice".into());
        let error = sync_once(&sync).await.unwrap_err();
        assert!(matches!(error, AuthSyncError::Apply { .. }), "{error}");
        assert_eq!(error.label(), "dest_unavailable");
        let recorded = sync.read_record().await.unwrap();
        assert!(recorded.users.contains("alice") && recorded.roles.contains("app"));

        let report = sync_once(&sync).await.unwrap();
        assert_eq!(report.changes, 1, "only the failed grant was left");
        let after = dest.store.lock().unwrap().clone();
        assert_eq!(after.roles["app"], perms(&[("/dst/", "/dst0")]));
        assert_eq!(after.users["alice"], BTreeSet::from(["app".to_string()]));
        assert_eq!(
            dest.added.lock().unwrap().as_slice(),
            [("alice".to_string(), NewUserPassword::Password("pw".into()))]
        );
        assert_eq!(sync_once(&sync).await.unwrap().changes, 0, "idempotent");

        // Gone from the source: ours go, the destination's own stay.
        source.store.lock().unwrap().users.clear();
        source.store.lock().unwrap().roles.clear();
        sync_once(&sync).await.unwrap();
        let after = dest.store.lock().unwrap().clone();
        assert!(!after.users.contains_key("alice") && !after.roles.contains_key("app"));
        assert!(after.users.contains_key("bob") && after.roles.contains_key("local"));
        assert!(after.users.contains_key("syncer"));
        assert_eq!(sync.read_record().await.unwrap(), MirroredNames::default());
    }

    #[tokio::test]
    async fn users_without_a_password_are_reported_when_the_version_is_unknown() {
        let source = FakeAuth::new(
            Side::Source,
            AuthSnapshot {
                roles: BTreeMap::new(),
                users: BTreeMap::from([("carol".into(), BTreeSet::new())]),
            },
        );
        let dest = FakeAuth::new(Side::Destination, AuthSnapshot::default());
        let sync = AuthSync {
            source,
            dest: dest.clone(),
            dest_kv: memory_dest(),
            meta_prefix: "/meta/".into(),
            rewrites: Vec::new(),
            syncer_user: None,
            passwords: AuthPasswords::default(),
            instance_id: "test".into(),
        };
        let version = sync.dest_kv.server_version().await;
        let report = sync_once(&sync).await.unwrap();
        if version.is_some_and(|v| v >= NO_PASSWORD_USERS_SINCE) {
            assert!(report.unsynced_users.is_empty());
        } else {
            assert_eq!(report.unsynced_users, vec!["carol".to_string()]);
            assert!(dest.store.lock().unwrap().users.is_empty());
        }
    }

    #[test]
    fn the_record_key_is_not_a_job_root() {
        let key = record_key("/-etcd-syncer-meta-/");
        let rest = key.strip_prefix("/-etcd-syncer-meta-/").unwrap();
        assert!(!rest.contains('/'), "status would list it as a job");
    }
}
