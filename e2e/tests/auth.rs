//! `--sync-auth` against real etcd with auth on both sides: roles (with
//! permissions rewritten through `--dest-prefix`) and users (with their role
//! grants) reach the destination, follow changes, and are synced once more
//! by `promote --sync-auth`, after which a mirrored user logs in to the new
//! primary. Version-aware: etcd 3.5 creates a user missing from the
//! passwords file without a password; 3.4 cannot, so it is reported.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use e2e::*;
use etcd_client::{Client, ConnectOptions, Permission};

const WAIT: Duration = Duration::from_secs(60);

/// A role's permissions as (type, key, range end), sorted.
async fn role_permissions(
    cluster: &EtcdCluster,
    role: &str,
) -> Result<Option<BTreeSet<(i32, String, String)>>> {
    let mut client = cluster.client().await?;
    let roles = client.role_list().await?;
    if !roles.roles().iter().any(|r| r == role) {
        return Ok(None);
    }
    let response = client.role_get(role).await?;
    Ok(Some(
        response
            .permissions()
            .iter()
            .map(|p| {
                (
                    p.get_type(),
                    String::from_utf8_lossy(p.key()).into_owned(),
                    String::from_utf8_lossy(p.range_end()).into_owned(),
                )
            })
            .collect(),
    ))
}

async fn user_roles(cluster: &EtcdCluster, user: &str) -> Result<Option<BTreeSet<String>>> {
    let mut client = cluster.client().await?;
    let users = client.user_list().await?;
    if !users.users().iter().any(|u| u == user) {
        return Ok(None);
    }
    Ok(Some(
        client
            .user_get(user)
            .await?
            .roles()
            .iter()
            .cloned()
            .collect(),
    ))
}

fn read_prefix_perm(key: &str, end: &str) -> (i32, String, String) {
    (
        etcd_client::PermissionType::Read as i32,
        key.to_string(),
        end.to_string(),
    )
}

/// etcd 3.5 and later can add users without a password.
fn has_no_password_users(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (3, 5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_users_are_mirrored_and_promoted() -> Result<()> {
    let mut source = EtcdCluster::start_source().await?;
    let mut dest = EtcdCluster::start_dest().await?;
    source.enable_auth("syncer", "s3cret", "/app/").await?;
    dest.enable_auth("syncer", "d3cret", "/copy/").await?;
    // Auth RPCs are admin-only: the syncer needs root on both sides.
    source
        .client()
        .await?
        .user_grant_role("syncer", "root")
        .await?;
    dest.client()
        .await?
        .user_grant_role("syncer", "root")
        .await?;

    let mut src = source.client().await?;
    src.role_add("app-reader").await?;
    src.role_grant_permission("app-reader", Permission::read("/app/").with_prefix())
        .await?;
    src.user_add("alice", "alice-pw", None).await?;
    src.user_grant_role("alice", "app-reader").await?;
    // Not in the passwords file.
    src.user_add("bob", "bob-pw", None).await?;
    src.user_grant_role("bob", "app-reader").await?;
    src.put("/app/sub/k", "v", None).await?;
    // Destination-only names the syncer did not create stay.
    let mut dst = dest.client().await?;
    dst.role_add("local-role").await?;
    dst.user_add("local-user", "x", None).await?;

    let dir = tempfile::tempdir()?;
    let passwords = dir.path().join("passwords.toml");
    std::fs::write(&passwords, "alice = \"alice-pw\"\n")?;
    let passwords = passwords.to_str().context("utf-8 path")?.to_string();

    let mut argv = mirror_args(&source, &dest, "/app/");
    argv.extend(args(&[
        "--dest-prefix",
        "/copy/",
        "--src-user",
        "syncer",
        "--src-password",
        "s3cret",
        "--dst-user",
        "syncer",
        "--dst-password",
        "d3cret",
        "--sync-auth",
        "--auth-sync-interval",
        "2s",
        "--auth-passwords-file",
        &passwords,
    ]));
    let syncer = Syncer::start("syncer", &argv).await?;
    wait_job_state(&syncer, "app", "watching").await?;

    // The role, its permission rewritten to the dest prefix, and the user.
    eventually(WAIT, "role and user on the destination", || async {
        Ok(role_permissions(&dest, "app-reader").await?
            == Some([read_prefix_perm("/copy/", "/copy0")].into())
            && user_roles(&dest, "alice").await? == Some(["app-reader".to_string()].into()))
    })
    .await?;
    ensure!(
        syncer
            .metric("etcd_syncer_auth_sync_total", &[("result", "ok")])
            .await?
            >= 1.0,
        "passes are counted"
    );
    ensure!(
        syncer
            .metric("etcd_syncer_auth_last_sync_timestamp_seconds", &[])
            .await?
            > 0.0
    );

    // bob has no password in the file.
    if has_no_password_users(dest.version()) {
        eventually(WAIT, "bob created without a password", || async {
            Ok(user_roles(&dest, "bob").await? == Some(["app-reader".to_string()].into()))
        })
        .await?;
        ensure!(
            syncer
                .metric("etcd_syncer_auth_users_unsynced", &[])
                .await?
                == 0.0
        );
    } else {
        eventually(WAIT, "bob reported as unsynced", || async {
            Ok(syncer
                .metric("etcd_syncer_auth_users_unsynced", &[])
                .await?
                == 1.0)
        })
        .await?;
        ensure!(user_roles(&dest, "bob").await?.is_none(), "never created");
        ensure!(
            syncer
                .logs()
                .iter()
                .any(|l| l.contains("WARN") && l.contains("bob") && l.contains("passwords file")),
            "a WARN names the user and the fix"
        );
    }

    // A changed permission follows within an interval.
    src.role_grant_permission("app-reader", Permission::read("/app/sub/").with_prefix())
        .await?;
    src.role_revoke_permission(
        "app-reader",
        "/app/",
        Some(etcd_client::RoleRevokePermissionOptions::new().with_prefix()),
    )
    .await?;
    eventually(
        WAIT,
        "the changed permission on the destination",
        || async {
            Ok(role_permissions(&dest, "app-reader").await?
                == Some([read_prefix_perm("/copy/sub/", "/copy/sub0")].into()))
        },
    )
    .await?;
    // The syncer's own user and role, root, and the destination's own names are untouched.
    ensure!(
        user_roles(&dest, "syncer").await?
            == Some(["mirror".to_string(), "root".to_string()].into())
    );
    ensure!(
        role_permissions(&dest, "mirror").await?
            == Some(
                [
                    (
                        etcd_client::PermissionType::Readwrite as i32,
                        "/copy/".to_string(),
                        "/copy0".to_string()
                    ),
                    (
                        etcd_client::PermissionType::Readwrite as i32,
                        META_PREFIX.to_string(),
                        "/-etcd-syncer-meta-0".to_string()
                    ),
                ]
                .into()
            ),
        "the syncer's role keeps its destination permissions"
    );
    ensure!(role_permissions(&dest, "local-role").await?.is_some());
    ensure!(user_roles(&dest, "local-user").await?.is_some());
    eventually(WAIT, "data mirrored", || async {
        let mut client = dest.client().await?;
        Ok(client.get("/copy/sub/k", None).await?.kvs().len() == 1)
    })
    .await?;
    syncer.finish().await?;

    // With the syncer stopped, the source changes once more: promote's own
    // pass carries it over before the promoted marker.
    src.role_add("extra").await?;
    src.role_grant_permission("extra", Permission::read("/app/extra"))
        .await?;
    src.user_grant_role("alice", "extra").await?;
    let (code, output) = run_cli(&args(&[
        "promote",
        "--dst-endpoints",
        &dest.endpoints_arg(),
        "--dst-user",
        "syncer",
        "--dst-password",
        "d3cret",
        "--src-endpoints",
        &source.endpoints_arg(),
        "--src-user",
        "syncer",
        "--src-password",
        "s3cret",
        "--job-name",
        "app",
        "--sync-auth",
        "--auth-passwords-file",
        &passwords,
    ]))
    .await?;
    ensure!(code == 0, "promote failed: {output}");
    ensure!(
        user_roles(&dest, "alice").await?
            == Some(["app-reader".to_string(), "extra".to_string()].into()),
        "promote synced the new grant: {output}"
    );
    ensure!(
        role_permissions(&dest, "extra").await?
            == Some([read_prefix_perm("/copy/extra", "")].into())
    );
    ensure!(
        dest.client()
            .await?
            .get(format!("{META_PREFIX}app/promoted"), None)
            .await?
            .count()
            == 1
    );

    // The mirrored user logs in to the new primary and reads under the dest prefix.
    let options = ConnectOptions::new()
        .with_user("alice", "alice-pw")
        .with_connect_timeout(Duration::from_secs(2));
    let mut alice = tokio::time::timeout(
        Duration::from_secs(10),
        Client::connect(dest.endpoints(), Some(options)),
    )
    .await??;
    let read = alice.get("/copy/sub/k", None).await?;
    ensure!(
        read.kvs().first().map(|kv| kv.value()) == Some(b"v".as_slice()),
        "alice reads the mirrored key"
    );
    let denied = alice.get("/copy/other", None).await;
    ensure!(denied.is_err(), "alice's role covers /copy/sub/ only");
    Ok(())
}
