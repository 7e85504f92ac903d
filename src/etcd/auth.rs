//! etcd's auth store (roles, their permissions, users and their role grants)
//! behind a narrow trait over plain data, for `--sync-auth`. [`RealAuth`]
//! implements it over `etcd-client`; tests use their own model.
//!
//! Auth RPCs are admin-only in etcd 3.4 and 3.5: listing roles and users,
//! and every change, need a user with the `root` role. etcd never returns
//! password hashes, so a snapshot holds names, permissions and grants only.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, PermissionType, RoleRevokePermissionOptions, UserAddOptions};
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::config::ClusterSettings;
use crate::etcd::client::{connect_client, within_deadline, ClientError};
use crate::etcd::real::auth_is_stale;
use crate::model::Side;

/// What a permission allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PermType {
    Read,
    Write,
    ReadWrite,
}

impl PermType {
    /// Both permissions at once (etcd keeps one type per key range).
    pub fn union(self, other: PermType) -> PermType {
        if self == other {
            self
        } else {
            PermType::ReadWrite
        }
    }

    fn from_etcd(value: i32) -> Option<PermType> {
        match PermissionType::try_from(value).ok()? {
            PermissionType::Read => Some(PermType::Read),
            PermissionType::Write => Some(PermType::Write),
            PermissionType::Readwrite => Some(PermType::ReadWrite),
        }
    }

    fn to_etcd(self) -> PermissionType {
        match self {
            PermType::Read => PermissionType::Read,
            PermType::Write => PermissionType::Write,
            PermType::ReadWrite => PermissionType::Readwrite,
        }
    }
}

/// The key range a permission covers, as etcd stores it: an empty
/// `range_end` is the single key `key`; `range_end == "\0"` is every key
/// from `key` on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyRange {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
}

impl KeyRange {
    pub fn new(key: impl Into<Vec<u8>>, range_end: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            range_end: range_end.into(),
        }
    }
}

impl std::fmt::Display for KeyRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |b: &[u8]| crate::model::redact::key(b).to_string();
        if self.range_end.is_empty() {
            write!(f, "[{}]", show(&self.key))
        } else {
            write!(f, "[{}, {})", show(&self.key), show(&self.range_end))
        }
    }
}

/// A role's permissions. etcd keeps one permission per key range: granting
/// the same range again replaces its type.
pub type Permissions = BTreeMap<KeyRange, PermType>;

/// Roles and users of one cluster, as names, permissions and grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthSnapshot {
    pub roles: BTreeMap<String, Permissions>,
    /// Each user's granted roles.
    pub users: BTreeMap<String, BTreeSet<String>>,
}

/// How a new destination user authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum NewUserPassword {
    /// From `--auth-passwords-file`.
    Password(String),
    /// etcd 3.5+: a user that can only authenticate with a client
    /// certificate whose common name is the user name.
    NoPassword,
}

impl std::fmt::Debug for NewUserPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NewUserPassword::Password(_) => f.write_str("Password(..)"),
            NewUserPassword::NoPassword => f.write_str("NoPassword"),
        }
    }
}

/// One change to a cluster's auth store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthChange {
    RoleAdd {
        role: String,
    },
    RoleDelete {
        role: String,
    },
    /// Adds the permission, or changes the type of the range's permission.
    RoleGrantPermission {
        role: String,
        range: KeyRange,
        perm: PermType,
    },
    RoleRevokePermission {
        role: String,
        range: KeyRange,
    },
    UserAdd {
        user: String,
        password: NewUserPassword,
    },
    UserDelete {
        user: String,
    },
    UserGrantRole {
        user: String,
        role: String,
    },
    UserRevokeRole {
        user: String,
        role: String,
    },
}

impl std::fmt::Display for AuthChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthChange::RoleAdd { role } => write!(f, "add role {role}"),
            AuthChange::RoleDelete { role } => write!(f, "delete role {role}"),
            AuthChange::RoleGrantPermission { role, range, perm } => {
                write!(f, "grant {perm:?} on {range} to role {role}")
            }
            AuthChange::RoleRevokePermission { role, range } => {
                write!(f, "revoke {range} from role {role}")
            }
            AuthChange::UserAdd { user, password } => match password {
                NewUserPassword::Password(_) => write!(f, "add user {user} (password from file)"),
                NewUserPassword::NoPassword => write!(f, "add user {user} (no password)"),
            },
            AuthChange::UserDelete { user } => write!(f, "delete user {user}"),
            AuthChange::UserGrantRole { user, role } => {
                write!(f, "grant role {role} to user {user}")
            }
            AuthChange::UserRevokeRole { user, role } => {
                write!(f, "revoke role {role} from user {user}")
            }
        }
    }
}

pub type AuthResult<T> = Result<T, ClientError>;

/// The auth RPCs `--sync-auth` uses, over plain data. Every error names the
/// cluster and the operation.
pub trait EtcdAuth: Send + Sync {
    fn side(&self) -> Side;
    fn role_list(&self) -> BoxFuture<'_, AuthResult<Vec<String>>>;
    fn role_get(&self, role: &str) -> BoxFuture<'_, AuthResult<Permissions>>;
    fn user_list(&self) -> BoxFuture<'_, AuthResult<Vec<String>>>;
    /// The user's granted roles.
    fn user_get(&self, user: &str) -> BoxFuture<'_, AuthResult<BTreeSet<String>>>;
    fn role_add(&self, role: &str) -> BoxFuture<'_, AuthResult<()>>;
    fn role_delete(&self, role: &str) -> BoxFuture<'_, AuthResult<()>>;
    fn role_grant_permission(
        &self,
        role: &str,
        range: &KeyRange,
        perm: PermType,
    ) -> BoxFuture<'_, AuthResult<()>>;
    fn role_revoke_permission(&self, role: &str, range: &KeyRange)
        -> BoxFuture<'_, AuthResult<()>>;
    fn user_add(&self, user: &str, password: &NewUserPassword) -> BoxFuture<'_, AuthResult<()>>;
    fn user_delete(&self, user: &str) -> BoxFuture<'_, AuthResult<()>>;
    fn user_grant_role(&self, user: &str, role: &str) -> BoxFuture<'_, AuthResult<()>>;
    fn user_revoke_role(&self, user: &str, role: &str) -> BoxFuture<'_, AuthResult<()>>;
}

/// Every role with its permissions and every user with its roles.
pub async fn read_snapshot(auth: &dyn EtcdAuth) -> AuthResult<AuthSnapshot> {
    let mut snapshot = AuthSnapshot::default();
    for role in auth.role_list().await? {
        let permissions = auth.role_get(&role).await?;
        snapshot.roles.insert(role, permissions);
    }
    for user in auth.user_list().await? {
        let roles = auth.user_get(&user).await?;
        snapshot.users.insert(user, roles);
    }
    Ok(snapshot)
}

/// Applies one change.
pub async fn apply_change(auth: &dyn EtcdAuth, change: &AuthChange) -> AuthResult<()> {
    match change {
        AuthChange::RoleAdd { role } => auth.role_add(role).await,
        AuthChange::RoleDelete { role } => auth.role_delete(role).await,
        AuthChange::RoleGrantPermission { role, range, perm } => {
            auth.role_grant_permission(role, range, *perm).await
        }
        AuthChange::RoleRevokePermission { role, range } => {
            auth.role_revoke_permission(role, range).await
        }
        AuthChange::UserAdd { user, password } => auth.user_add(user, password).await,
        AuthChange::UserDelete { user } => auth.user_delete(user).await,
        AuthChange::UserGrantRole { user, role } => auth.user_grant_role(user, role).await,
        AuthChange::UserRevokeRole { user, role } => auth.user_revoke_role(user, role).await,
    }
}

/// [`EtcdAuth`] over `etcd-client`, on a connection of its own.
#[derive(Clone)]
pub struct RealAuth {
    client: Client,
    side: Side,
    endpoints: String,
    request_timeout: Duration,
}

impl std::fmt::Debug for RealAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealAuth")
            .field("side", &self.side)
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl RealAuth {
    /// Connects (and, with a user, authenticates) like [`crate::etcd::Cluster::connect`].
    pub async fn connect(
        settings: &ClusterSettings,
        request_timeout: Duration,
    ) -> Result<Self, ClientError> {
        let client = connect_client(settings, request_timeout, "connect for auth sync").await?;
        let endpoints = settings.endpoints().join(",");
        Ok(Self {
            client,
            side: settings.side,
            endpoints,
            request_timeout,
        })
    }

    /// Runs one request under the deadline; a token made stale by an
    /// auth-store change (our own changes cause them) is refreshed and the
    /// request retried once.
    async fn call<T, F, Fut>(&self, operation: &'static str, request: F) -> AuthResult<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let attempt = async {
            match request(self.client.clone()).await {
                Err(error) if auth_is_stale(&error) => {
                    tracing::debug!(%error, "Auth token refused; authenticating again.");
                    self.client.refresh_token().await?;
                    request(self.client.clone()).await
                }
                result => result,
            }
        };
        within_deadline(
            self.side,
            &self.endpoints,
            self.request_timeout,
            operation,
            attempt,
        )
        .await
    }
}

impl EtcdAuth for RealAuth {
    fn side(&self) -> Side {
        self.side
    }

    fn role_list(&self) -> BoxFuture<'_, AuthResult<Vec<String>>> {
        self.call("list auth roles", |mut c| async move {
            Ok(c.role_list().await?.roles().to_vec())
        })
        .boxed()
    }

    fn role_get(&self, role: &str) -> BoxFuture<'_, AuthResult<Permissions>> {
        let role = role.to_string();
        async move {
            let response = self
                .call("read auth role", |mut c| {
                    let role = role.clone();
                    async move { c.role_get(role).await }
                })
                .await?;
            let mut permissions = Permissions::new();
            for perm in &response.0.perm {
                // A permission type this client does not know is left out:
                // the plan then neither copies nor revokes it.
                let Some(kind) = PermType::from_etcd(perm.perm_type) else {
                    tracing::warn!(%role, perm_type = perm.perm_type, "Unknown permission type; ignored.");
                    continue;
                };
                let range = KeyRange::new(perm.key.clone(), perm.range_end.clone());
                let merged = permissions
                    .get(&range)
                    .map_or(kind, |existing| existing.union(kind));
                permissions.insert(range, merged);
            }
            Ok(permissions)
        }
        .boxed()
    }

    fn user_list(&self) -> BoxFuture<'_, AuthResult<Vec<String>>> {
        self.call("list auth users", |mut c| async move {
            Ok(c.user_list().await?.users().to_vec())
        })
        .boxed()
    }

    fn user_get(&self, user: &str) -> BoxFuture<'_, AuthResult<BTreeSet<String>>> {
        let user = user.to_string();
        async move {
            let response = self
                .call("read auth user", |mut c| {
                    let user = user.clone();
                    async move { c.user_get(user).await }
                })
                .await?;
            Ok(response.roles().iter().cloned().collect())
        }
        .boxed()
    }

    fn role_add(&self, role: &str) -> BoxFuture<'_, AuthResult<()>> {
        let role = role.to_string();
        self.call("add auth role", move |mut c| {
            let role = role.clone();
            async move { c.role_add(role).await.map(drop) }
        })
        .boxed()
    }

    fn role_delete(&self, role: &str) -> BoxFuture<'_, AuthResult<()>> {
        let role = role.to_string();
        self.call("delete auth role", move |mut c| {
            let role = role.clone();
            async move { c.role_delete(role).await.map(drop) }
        })
        .boxed()
    }

    fn role_grant_permission(
        &self,
        role: &str,
        range: &KeyRange,
        perm: PermType,
    ) -> BoxFuture<'_, AuthResult<()>> {
        let role = role.to_string();
        let range = range.clone();
        self.call("grant role permission", move |mut c| {
            let role = role.clone();
            let mut permission = etcd_client::Permission::new(perm.to_etcd(), range.key.clone());
            if !range.range_end.is_empty() {
                permission = permission.with_range_end(range.range_end.clone());
            }
            async move { c.role_grant_permission(role, permission).await.map(drop) }
        })
        .boxed()
    }

    fn role_revoke_permission(
        &self,
        role: &str,
        range: &KeyRange,
    ) -> BoxFuture<'_, AuthResult<()>> {
        let role = role.to_string();
        let range = range.clone();
        self.call("revoke role permission", move |mut c| {
            let role = role.clone();
            let key = range.key.clone();
            let options = (!range.range_end.is_empty()).then(|| {
                RoleRevokePermissionOptions::new().with_range_end(range.range_end.clone())
            });
            async move { c.role_revoke_permission(role, key, options).await.map(drop) }
        })
        .boxed()
    }

    fn user_add(&self, user: &str, password: &NewUserPassword) -> BoxFuture<'_, AuthResult<()>> {
        let user = user.to_string();
        let password = password.clone();
        self.call("add auth user", move |mut c| {
            let user = user.clone();
            let (password, options) = match &password {
                NewUserPassword::Password(p) => (p.clone(), None),
                NewUserPassword::NoPassword => {
                    (String::new(), Some(UserAddOptions::new().with_no_pwd()))
                }
            };
            async move { c.user_add(user, password, options).await.map(drop) }
        })
        .boxed()
    }

    fn user_delete(&self, user: &str) -> BoxFuture<'_, AuthResult<()>> {
        let user = user.to_string();
        self.call("delete auth user", move |mut c| {
            let user = user.clone();
            async move { c.user_delete(user).await.map(drop) }
        })
        .boxed()
    }

    fn user_grant_role(&self, user: &str, role: &str) -> BoxFuture<'_, AuthResult<()>> {
        let (user, role) = (user.to_string(), role.to_string());
        self.call("grant role to user", move |mut c| {
            let (user, role) = (user.clone(), role.clone());
            async move { c.user_grant_role(user, role).await.map(drop) }
        })
        .boxed()
    }

    fn user_revoke_role(&self, user: &str, role: &str) -> BoxFuture<'_, AuthResult<()>> {
        let (user, role) = (user.to_string(), role.to_string());
        self.call("revoke role from user", move |mut c| {
            let (user, role) = (user.clone(), role.clone());
            async move { c.user_revoke_role(user, role).await.map(drop) }
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_types_round_trip() {
        for kind in [PermType::Read, PermType::Write, PermType::ReadWrite] {
            assert_eq!(PermType::from_etcd(kind.to_etcd() as i32), Some(kind));
        }
        assert_eq!(PermType::from_etcd(7), None);
        assert_eq!(PermType::Read.union(PermType::Write), PermType::ReadWrite);
        assert_eq!(PermType::Read.union(PermType::Read), PermType::Read);
    }

    #[test]
    fn passwords_never_show_in_debug_output() {
        let change = AuthChange::UserAdd {
            user: "app".into(),
            password: NewUserPassword::Password("hunter2".into()),
        };
        assert!(!format!("{change:?}").contains("hunter2"));
        assert!(!change.to_string().contains("hunter2"));
    }
}
