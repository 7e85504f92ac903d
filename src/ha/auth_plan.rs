//! The pure half of `--sync-auth`: which changes make the destination's
//! roles and users equal to the source's, with the exemptions that keep the
//! syncer (and `root`) working, and permission ranges rewritten through the
//! jobs' dest prefixes. No I/O: `plan` is property-tested below.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::config::AuthPasswords;
use crate::etcd::auth::{AuthChange, AuthSnapshot, KeyRange, NewUserPassword, Permissions};
use crate::model::keys::{key_successor, prefix_range_end, KeyRewrite};

/// etcd's superuser and its role: never created, changed or deleted.
pub const ROOT: &str = "root";

/// Names the syncer created on the destination, kept on the destination
/// (`<meta-prefix>auth-mirrored`). Only these are deleted when the source
/// no longer has them; any other destination-only role or user is left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirroredNames {
    #[serde(default)]
    pub roles: BTreeSet<String>,
    #[serde(default)]
    pub users: BTreeSet<String>,
}

/// What `plan` needs besides the two snapshots.
#[derive(Debug, Clone, Copy)]
pub struct PlanRules<'a> {
    /// Every job's source → destination prefix.
    pub rewrites: &'a [KeyRewrite],
    /// The user the syncer logs in to the destination with (`--dst-user`).
    pub syncer_user: Option<&'a str>,
    pub passwords: &'a AuthPasswords,
    /// The destination is etcd 3.5+ and so can create users without a password.
    pub no_password_users: bool,
    /// What the syncer created before.
    pub mirrored: &'a MirroredNames,
}

/// A permission the rewrite could not map cleanly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Straddling {
    pub role: String,
    pub range: KeyRange,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthPlan {
    /// In order: roles added, permissions granted and revoked, users added,
    /// roles granted and revoked, users deleted, roles deleted.
    pub changes: Vec<AuthChange>,
    /// Source users missing on the destination that cannot be created:
    /// no password in the file and the destination predates no-password users.
    pub unsynced_users: Vec<String>,
    /// Permissions that straddle a job prefix boundary, copied unchanged.
    pub straddling: Vec<Straddling>,
    /// The record once every change applied.
    pub mirrored: MirroredNames,
}

impl AuthPlan {
    /// The record to write before applying: everything this plan creates is
    /// recorded first, so a crash half-way cannot leave an unrecorded
    /// creation behind.
    pub fn mirrored_before(&self, previous: &MirroredNames) -> MirroredNames {
        let mut names = previous.clone();
        for change in &self.changes {
            match change {
                AuthChange::RoleAdd { role } => {
                    names.roles.insert(role.clone());
                }
                AuthChange::UserAdd { user, .. } => {
                    names.users.insert(user.clone());
                }
                _ => {}
            }
        }
        names
    }
}

/// Where a source permission range lands on the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeRewrite {
    /// Inside a job's source prefix: moved to its dest prefix.
    Mapped(KeyRange),
    /// Outside every job prefix: copied unchanged.
    Outside,
    /// Partly inside a job prefix: copied unchanged (and worth a warning).
    Straddles,
}

/// An upper bound of a key range: a key (exclusive), or no bound.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Bound {
    Key(Vec<u8>),
    Unbounded,
}

fn end_bound(range_end: Vec<u8>) -> Bound {
    if range_end == [0] {
        Bound::Unbounded
    } else {
        Bound::Key(range_end)
    }
}

/// The range's exclusive upper bound, `None` for a malformed range (an end
/// at or before the key), which etcd would refuse anyway.
fn upper(range: &KeyRange) -> Option<Bound> {
    if range.range_end.is_empty() {
        return Some(Bound::Key(key_successor(&range.key)));
    }
    let bound = end_bound(range.range_end.clone());
    (bound > Bound::Key(range.key.clone())).then_some(bound)
}

/// Maps one permission range through the jobs' prefixes, like the keys
/// it covers: a range inside a job's source prefix moves to the job's dest
/// prefix; one outside every job prefix stays as it is; one that is partly
/// inside a job prefix stays as it is and is reported.
pub fn rewrite_range(range: &KeyRange, rewrites: &[KeyRewrite]) -> RangeRewrite {
    let Some(upper) = upper(range) else {
        return RangeRewrite::Outside;
    };
    let mut straddles = false;
    for rewrite in rewrites {
        let start = rewrite.source_prefix();
        let end = end_bound(prefix_range_end(start));
        let contained = range.key.as_slice() >= start && upper <= end;
        if contained {
            let mut key = rewrite.to_dest(&range.key).unwrap_or_default();
            if key.is_empty() {
                // The whole destination keyspace starts at "\0" (etcd refuses an empty key).
                key = vec![0];
            }
            let range_end = if range.range_end.is_empty() {
                Vec::new()
            } else if upper == end {
                prefix_range_end(rewrite.dest_prefix())
            } else {
                // Strictly between the prefix and its end: it starts with the prefix.
                rewrite.to_dest(&range.range_end).unwrap_or_default()
            };
            return RangeRewrite::Mapped(KeyRange { key, range_end });
        }
        let disjoint = upper <= Bound::Key(start.to_vec())
            || matches!(&end, Bound::Key(end) if range.key >= *end);
        if !disjoint {
            straddles = true;
        }
    }
    if straddles {
        RangeRewrite::Straddles
    } else {
        RangeRewrite::Outside
    }
}

/// A source role's permissions as the destination should hold them, and
/// the ranges that straddle a job prefix.
pub fn rewrite_permissions(
    permissions: &Permissions,
    rewrites: &[KeyRewrite],
) -> (Permissions, Vec<KeyRange>) {
    let mut out = Permissions::new();
    let mut straddling = Vec::new();
    for (range, perm) in permissions {
        let target = match rewrite_range(range, rewrites) {
            RangeRewrite::Mapped(mapped) => mapped,
            RangeRewrite::Outside => range.clone(),
            RangeRewrite::Straddles => {
                straddling.push(range.clone());
                range.clone()
            }
        };
        // Two source ranges can land on one (a rewritten one on an unchanged
        // one): etcd keeps one type per range, so they merge.
        let merged = out
            .get(&target)
            .map_or(*perm, |existing| existing.union(*perm));
        out.insert(target, merged);
    }
    (out, straddling)
}

/// The changes that make `dest`'s roles and users equal to `source`'s:
///
/// - the `root` user and role, the syncer's own user, and every role either
///   user holds on the destination are never created, changed or deleted;
/// - every other source role exists on the destination with the source's
///   permissions, rewritten through the job prefixes;
/// - every other source user exists with the source's roles; a missing one
///   is created with its password from the file, else without a password
///   (etcd 3.5+), else reported in `unsynced_users` and not created;
/// - a destination-only role or user is deleted only when the syncer
///   created it (`rules.mirrored`).
pub fn plan(source: &AuthSnapshot, dest: &AuthSnapshot, rules: PlanRules<'_>) -> AuthPlan {
    let protected_user =
        |user: &str| user == ROOT || rules.syncer_user.is_some_and(|syncer| syncer == user);
    // Changing a role held by root or the syncer would change them too (a
    // deleted role is revoked from its users).
    let held_by_protected: BTreeSet<&str> = dest
        .users
        .iter()
        .filter(|(user, _)| protected_user(user))
        .flat_map(|(_, roles)| roles.iter().map(String::as_str))
        .collect();
    let protected_role = |role: &str| role == ROOT || held_by_protected.contains(role);

    let mut result = AuthPlan::default();
    let mut role_adds = Vec::new();
    let mut permission_changes = Vec::new();
    let mut user_adds = Vec::new();
    let mut grant_changes = Vec::new();
    let mut user_deletes = Vec::new();
    let mut role_deletes = Vec::new();

    // Roles.
    let mut final_roles: BTreeSet<&str> = dest.roles.keys().map(String::as_str).collect();
    let mut created_roles = BTreeSet::new();
    for (role, permissions) in &source.roles {
        if protected_role(role) {
            continue;
        }
        let (wanted, straddling) = rewrite_permissions(permissions, rules.rewrites);
        result
            .straddling
            .extend(straddling.into_iter().map(|range| Straddling {
                role: role.clone(),
                range,
            }));
        let empty = Permissions::new();
        let current = match dest.roles.get(role) {
            Some(current) => current,
            None => {
                role_adds.push(AuthChange::RoleAdd { role: role.clone() });
                created_roles.insert(role.clone());
                final_roles.insert(role);
                &empty
            }
        };
        for (range, perm) in &wanted {
            if current.get(range) != Some(perm) {
                permission_changes.push(AuthChange::RoleGrantPermission {
                    role: role.clone(),
                    range: range.clone(),
                    perm: *perm,
                });
            }
        }
        for range in current.keys() {
            if !wanted.contains_key(range) {
                permission_changes.push(AuthChange::RoleRevokePermission {
                    role: role.clone(),
                    range: range.clone(),
                });
            }
        }
    }
    for role in dest.roles.keys() {
        if !source.roles.contains_key(role)
            && !protected_role(role)
            && rules.mirrored.roles.contains(role)
        {
            role_deletes.push(AuthChange::RoleDelete { role: role.clone() });
            final_roles.remove(role.as_str());
        }
    }
    // etcd grants `root` whether or not a role entry exists.
    let grantable = |role: &str| role == ROOT || final_roles.contains(role);

    // Users.
    let mut created_users = BTreeSet::new();
    let mut final_users: BTreeSet<&str> = dest.users.keys().map(String::as_str).collect();
    for (user, roles) in &source.users {
        if protected_user(user) {
            continue;
        }
        let wanted: BTreeSet<&str> = roles
            .iter()
            .map(String::as_str)
            .filter(|role| grantable(role))
            .collect();
        let empty = BTreeSet::new();
        let current = match dest.users.get(user) {
            Some(current) => current,
            None => {
                let password = match rules.passwords.get(user) {
                    Some(password) => NewUserPassword::Password(password.to_string()),
                    None if rules.no_password_users => NewUserPassword::NoPassword,
                    None => {
                        result.unsynced_users.push(user.clone());
                        continue;
                    }
                };
                user_adds.push(AuthChange::UserAdd {
                    user: user.clone(),
                    password,
                });
                created_users.insert(user.clone());
                final_users.insert(user);
                &empty
            }
        };
        for role in &wanted {
            if !current.contains(*role) {
                grant_changes.push(AuthChange::UserGrantRole {
                    user: user.clone(),
                    role: role.to_string(),
                });
            }
        }
        for role in current {
            // A role deleted below leaves its users with it; revoking first is the same.
            if !wanted.contains(role.as_str()) {
                grant_changes.push(AuthChange::UserRevokeRole {
                    user: user.clone(),
                    role: role.clone(),
                });
            }
        }
    }
    for user in dest.users.keys() {
        if !source.users.contains_key(user)
            && !protected_user(user)
            && rules.mirrored.users.contains(user)
        {
            user_deletes.push(AuthChange::UserDelete { user: user.clone() });
            final_users.remove(user.as_str());
        }
    }

    result.mirrored = MirroredNames {
        roles: rules
            .mirrored
            .roles
            .iter()
            .filter(|role| final_roles.contains(role.as_str()))
            .cloned()
            .chain(created_roles)
            .collect(),
        users: rules
            .mirrored
            .users
            .iter()
            .filter(|user| final_users.contains(user.as_str()))
            .cloned()
            .chain(created_users)
            .collect(),
    };
    result.changes = [
        role_adds,
        permission_changes,
        user_adds,
        grant_changes,
        user_deletes,
        role_deletes,
    ]
    .concat();
    result
}

/// Applies changes to a snapshot the way etcd applies them to its auth
/// store (a role deleted is revoked from every user). For tests, and for
/// nothing that talks to a cluster.
pub fn apply_to_snapshot(snapshot: &mut AuthSnapshot, changes: &[AuthChange]) {
    for change in changes {
        match change {
            AuthChange::RoleAdd { role } => {
                snapshot.roles.entry(role.clone()).or_default();
            }
            AuthChange::RoleDelete { role } => {
                snapshot.roles.remove(role);
                for roles in snapshot.users.values_mut() {
                    roles.remove(role);
                }
            }
            AuthChange::RoleGrantPermission { role, range, perm } => {
                if let Some(permissions) = snapshot.roles.get_mut(role) {
                    permissions.insert(range.clone(), *perm);
                }
            }
            AuthChange::RoleRevokePermission { role, range } => {
                if let Some(permissions) = snapshot.roles.get_mut(role) {
                    permissions.remove(range);
                }
            }
            AuthChange::UserAdd { user, .. } => {
                snapshot.users.entry(user.clone()).or_default();
            }
            AuthChange::UserDelete { user } => {
                snapshot.users.remove(user);
            }
            AuthChange::UserGrantRole { user, role } => {
                if let Some(roles) = snapshot.users.get_mut(user) {
                    roles.insert(role.clone());
                }
            }
            AuthChange::UserRevokeRole { user, role } => {
                if let Some(roles) = snapshot.users.get_mut(user) {
                    roles.remove(role);
                }
            }
        }
    }
}

/// Every role and user name of a snapshot.
#[cfg(test)]
fn names(snapshot: &AuthSnapshot) -> (BTreeSet<String>, BTreeSet<String>) {
    (
        snapshot.roles.keys().cloned().collect(),
        snapshot.users.keys().cloned().collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::auth::PermType;
    use proptest::prelude::*;

    fn range(key: &str, end: &str) -> KeyRange {
        KeyRange::new(key.as_bytes(), end.as_bytes())
    }

    fn rewrites() -> Vec<KeyRewrite> {
        vec![
            KeyRewrite::new("/src/", "/dst/"),
            KeyRewrite::new("/same/", "/same/"),
            KeyRewrite::new("/strip/", ""),
        ]
    }

    #[test]
    fn permission_ranges_move_with_their_job_prefix() {
        let r = rewrites();
        // A prefix permission on the job prefix, and below it.
        assert_eq!(
            rewrite_range(&range("/src/", "/src0"), &r),
            RangeRewrite::Mapped(range("/dst/", "/dst0"))
        );
        assert_eq!(
            rewrite_range(&range("/src/a/", "/src/a0"), &r),
            RangeRewrite::Mapped(range("/dst/a/", "/dst/a0"))
        );
        // A single key, and an explicit range inside the prefix.
        assert_eq!(
            rewrite_range(&range("/src/k", ""), &r),
            RangeRewrite::Mapped(range("/dst/k", ""))
        );
        assert_eq!(
            rewrite_range(&range("/src/a", "/src/m"), &r),
            RangeRewrite::Mapped(range("/dst/a", "/dst/m"))
        );
        // Same prefix on both sides: unchanged.
        assert_eq!(
            rewrite_range(&range("/same/x", "/same0"), &r),
            RangeRewrite::Mapped(range("/same/x", "/same0"))
        );
        // --no-dest-prefix: the whole prefix becomes the whole keyspace.
        assert_eq!(
            rewrite_range(&range("/strip/", "/strip0"), &r),
            RangeRewrite::Mapped(KeyRange::new(vec![0], vec![0]))
        );
        assert_eq!(
            rewrite_range(&range("/strip/a/", "/strip/a0"), &r),
            RangeRewrite::Mapped(range("a/", "a0"))
        );
    }

    #[test]
    fn ranges_outside_every_prefix_stay_and_straddling_ones_are_reported() {
        let r = rewrites();
        assert_eq!(
            rewrite_range(&range("/other/", "/other0"), &r),
            RangeRewrite::Outside
        );
        assert_eq!(rewrite_range(&range("/src", ""), &r), RangeRewrite::Outside);
        assert_eq!(
            rewrite_range(&range("/sr", "/src/"), &r),
            RangeRewrite::Outside,
            "ends where the prefix starts"
        );
        assert_eq!(
            rewrite_range(&range("/src0", "/src1"), &r),
            RangeRewrite::Outside,
            "starts where the prefix ends"
        );
        // Every key, everything from a key on, a range across the boundary.
        assert_eq!(
            rewrite_range(&KeyRange::new(vec![0], vec![0]), &r),
            RangeRewrite::Straddles
        );
        assert_eq!(
            rewrite_range(&KeyRange::new("/src/x", vec![0]), &r),
            RangeRewrite::Straddles
        );
        assert_eq!(
            rewrite_range(&range("/s", "/src/m"), &r),
            RangeRewrite::Straddles
        );
        // A malformed range is left alone.
        assert_eq!(
            rewrite_range(&range("/src/b", "/src/a"), &r),
            RangeRewrite::Outside
        );
        // A job mirroring the whole keyspace contains everything.
        let all = [KeyRewrite::new("", "/copy/")];
        assert_eq!(
            rewrite_range(&KeyRange::new("/a", vec![0]), &all),
            RangeRewrite::Mapped(range("/copy//a", "/copy0"))
        );
    }

    fn snapshot(roles: &[(&str, &[(&str, &str)])], users: &[(&str, &[&str])]) -> AuthSnapshot {
        AuthSnapshot {
            roles: roles
                .iter()
                .map(|(role, perms)| {
                    (
                        role.to_string(),
                        perms
                            .iter()
                            .map(|(k, e)| (range(k, e), PermType::ReadWrite))
                            .collect(),
                    )
                })
                .collect(),
            users: users
                .iter()
                .map(|(user, roles)| {
                    (
                        user.to_string(),
                        roles.iter().map(|r| r.to_string()).collect(),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn the_syncer_its_roles_and_root_are_never_touched() {
        let source = snapshot(
            &[
                ("mirror", &[("/src/", "/src0")]),
                ("app", &[("/src/", "/src0")]),
            ],
            &[
                ("syncer", &["app"]),
                ("root", &["app"]),
                ("u", &["mirror", "app"]),
            ],
        );
        let dest = snapshot(
            &[("mirror", &[("/-meta-/", "/-meta-0")]), ("root", &[])],
            &[("syncer", &["mirror"]), ("root", &["root"])],
        );
        let passwords = AuthPasswords::default();
        let mirrored = MirroredNames::default();
        let rules = PlanRules {
            rewrites: &rewrites(),
            syncer_user: Some("syncer"),
            passwords: &passwords,
            no_password_users: true,
            mirrored: &mirrored,
        };
        let plan = plan(&source, &dest, rules);
        let mut after = dest.clone();
        apply_to_snapshot(&mut after, &plan.changes);
        assert_eq!(
            after.roles["mirror"], dest.roles["mirror"],
            "syncer's role kept"
        );
        assert_eq!(after.users["syncer"], dest.users["syncer"]);
        assert_eq!(after.users["root"], dest.users["root"]);
        assert_eq!(
            after.roles["app"],
            [(range("/dst/", "/dst0"), PermType::ReadWrite)].into()
        );
        assert_eq!(
            after.users["u"],
            ["mirror".to_string(), "app".to_string()].into()
        );
        assert_eq!(plan.mirrored.roles, ["app".to_string()].into());
        assert_eq!(plan.mirrored.users, ["u".to_string()].into());
    }

    #[test]
    fn users_without_a_password_are_reported_unless_the_destination_allows_none() {
        let source = snapshot(&[], &[("a", &[]), ("b", &[])]);
        let dest = AuthSnapshot::default();
        let passwords =
            AuthPasswords::new([("a".to_string(), "pw".to_string())].into_iter().collect());
        let mirrored = MirroredNames::default();
        let mut rules = PlanRules {
            rewrites: &[],
            syncer_user: None,
            passwords: &passwords,
            no_password_users: false,
            mirrored: &mirrored,
        };
        let old = plan(&source, &dest, rules);
        assert_eq!(old.unsynced_users, vec!["b".to_string()]);
        assert_eq!(
            old.changes,
            vec![AuthChange::UserAdd {
                user: "a".into(),
                password: NewUserPassword::Password("pw".into())
            }]
        );
        rules.no_password_users = true;
        let new = plan(&source, &dest, rules);
        assert!(new.unsynced_users.is_empty());
        assert!(new.changes.contains(&AuthChange::UserAdd {
            user: "b".into(),
            password: NewUserPassword::NoPassword
        }));
    }

    #[test]
    fn the_record_is_written_before_creations() {
        let previous = MirroredNames {
            roles: ["old".to_string()].into(),
            users: BTreeSet::new(),
        };
        let plan = AuthPlan {
            changes: vec![
                AuthChange::RoleAdd { role: "new".into() },
                AuthChange::UserAdd {
                    user: "u".into(),
                    password: NewUserPassword::NoPassword,
                },
            ],
            ..AuthPlan::default()
        };
        let before = plan.mirrored_before(&previous);
        assert_eq!(before.roles, ["old".to_string(), "new".to_string()].into());
        assert_eq!(before.users, ["u".to_string()].into());
    }

    // Small name and key alphabets so snapshots collide often.
    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("root".to_string()),
            Just("syncer".to_string()),
            "[a-e]{1}",
        ]
    }

    fn key() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"/src/".to_vec()),
            Just(b"/strip/".to_vec()),
            "/(src|strip|other|s)/?[a-c]{0,2}".prop_map(String::into_bytes),
        ]
    }

    fn key_range() -> impl Strategy<Value = KeyRange> {
        (key(), 0..4u8, key()).prop_map(|(key, kind, other)| match kind {
            0 => KeyRange::new(key, Vec::new()),
            1 => {
                let end = prefix_range_end(&key);
                KeyRange::new(key, end)
            }
            2 => KeyRange::new(key, vec![0]),
            _ => {
                let (low, high) = if key < other {
                    (key, other)
                } else {
                    (other, key)
                };
                KeyRange::new(low, high)
            }
        })
    }

    fn perm_type() -> impl Strategy<Value = PermType> {
        prop_oneof![
            Just(PermType::Read),
            Just(PermType::Write),
            Just(PermType::ReadWrite)
        ]
    }

    fn auth_snapshot() -> impl Strategy<Value = AuthSnapshot> {
        let permissions = proptest::collection::btree_map(key_range(), perm_type(), 0..4);
        let roles = proptest::collection::btree_map(name(), permissions, 0..5);
        let users = proptest::collection::btree_map(
            name(),
            proptest::collection::btree_set(name(), 0..3),
            0..5,
        );
        (roles, users).prop_map(|(roles, users)| AuthSnapshot { roles, users })
    }

    fn mirrored_names() -> impl Strategy<Value = MirroredNames> {
        (
            proptest::collection::btree_set(name(), 0..4),
            proptest::collection::btree_set(name(), 0..4),
        )
            .prop_map(|(roles, users)| MirroredNames { roles, users })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Applying the plan makes the destination equal to the source,
        /// modulo the exemptions and the prefix rewrite; root and the
        /// syncer stay as they were; a second plan is empty.
        #[test]
        fn the_plan_converges_and_is_idempotent(
            source in auth_snapshot(),
            dest in auth_snapshot(),
            mirrored in mirrored_names(),
            with_passwords in proptest::collection::btree_set(name(), 0..4),
            no_password_users in any::<bool>(),
        ) {
            let rewrites = [
                KeyRewrite::new("/src/", "/dst/"),
                KeyRewrite::new("/strip/", ""),
            ];
            let passwords = AuthPasswords::new(
                with_passwords.iter().map(|u| (u.clone(), format!("pw-{u}"))).collect(),
            );
            let rules = PlanRules {
                rewrites: &rewrites,
                syncer_user: Some("syncer"),
                passwords: &passwords,
                no_password_users,
                mirrored: &mirrored,
            };
            let first = plan(&source, &dest, rules);
            let mut after = dest.clone();
            apply_to_snapshot(&mut after, &first.changes);

            let held: BTreeSet<String> = [ROOT, "syncer"].iter()
                .filter_map(|u| dest.users.get(*u)).flatten().cloned().collect();
            let protected_role = |r: &str| r == ROOT || held.contains(r);
            let protected_user = |u: &str| u == ROOT || u == "syncer";

            // Root, the syncer and the syncer's roles are untouched.
            for user in [ROOT, "syncer"] {
                prop_assert_eq!(after.users.get(user), dest.users.get(user));
            }
            for role in dest.roles.keys().filter(|r| protected_role(r)) {
                prop_assert_eq!(after.roles.get(role), dest.roles.get(role));
            }
            let touches_protected_role = first.changes.iter().any(|c| matches!(c,
                AuthChange::RoleAdd { role } | AuthChange::RoleDelete { role }
                    | AuthChange::RoleGrantPermission { role, .. }
                    | AuthChange::RoleRevokePermission { role, .. } if protected_role(role)));
            prop_assert!(!touches_protected_role);

            // Every other source role, with rewritten permissions.
            for (role, permissions) in &source.roles {
                if protected_role(role) { continue; }
                let (wanted, _) = rewrite_permissions(permissions, &rewrites);
                prop_assert_eq!(after.roles.get(role), Some(&wanted), "role {}", role);
            }
            // Every other source user that can be created, with its roles.
            for (user, roles) in &source.users {
                if protected_user(user) { continue; }
                let creatable = dest.users.contains_key(user)
                    || with_passwords.contains(user) || no_password_users;
                if !creatable {
                    prop_assert!(!after.users.contains_key(user));
                    prop_assert!(first.unsynced_users.contains(user));
                    continue;
                }
                let wanted: BTreeSet<String> = roles.iter()
                    .filter(|r| *r == ROOT || after.roles.contains_key(*r))
                    .cloned().collect();
                prop_assert_eq!(after.users.get(user), Some(&wanted), "user {}", user);
            }
            // Destination-only names go only if the syncer created them.
            let (dest_roles, dest_users) = names(&dest);
            for role in dest_roles.iter().filter(|r| !source.roles.contains_key(*r)) {
                let deleted = !after.roles.contains_key(role);
                prop_assert_eq!(deleted, mirrored.roles.contains(role) && !protected_role(role));
            }
            for user in dest_users.iter().filter(|u| !source.users.contains_key(*u)) {
                let deleted = !after.users.contains_key(user);
                prop_assert_eq!(deleted, mirrored.users.contains(user) && !protected_user(user));
            }
            // The record names only what exists, and everything created.
            for role in &first.mirrored.roles {
                prop_assert!(after.roles.contains_key(role));
            }
            for user in &first.mirrored.users {
                prop_assert!(after.users.contains_key(user));
            }
            let before = first.mirrored_before(&mirrored);
            prop_assert!(first.mirrored.roles.is_subset(&before.roles));
            prop_assert!(first.mirrored.users.is_subset(&before.users));

            // Idempotent: nothing left to do.
            let second = plan(&source, &after, PlanRules { mirrored: &first.mirrored, ..rules });
            prop_assert!(second.changes.is_empty(), "second plan: {:?}", second.changes);
            prop_assert_eq!(&second.mirrored, &first.mirrored);
        }
    }
}
