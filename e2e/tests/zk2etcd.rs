//! zk2etcd drills against a real ZooKeeper 3.8 (e2e/src/zk.rs) and real
//! etcd: a dubbo-shaped registry (200 providers as ephemeral nodes of 20
//! sessions, persistent configuration), full sync, churn, a session closed,
//! keys of another writer under the same prefix, odd input; then two
//! replicas with the leader killed -9 under churn, a ZooKeeper restart, and
//! every replica gone (the providers' keys expire); an etcd mirror job on
//! the same prefix at the same time, and a provider paused until its
//! session expires; an ensemble restored from an older snapshot. After
//! each, the tree and the etcd prefix are compared exactly.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use e2e::zk::ZkServer;
use e2e::*;
use etcd_client::GetOptions;
use zookeeper_client as zk;

const WAIT: Duration = Duration::from_secs(60);
const SERVICES: usize = 20;
const PROVIDERS_PER_SESSION: usize = 10;
/// Left out with --exclude-prefix.
const EXCLUDED: &str = "/dubbo/internal";

fn persistent() -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all())
}

fn ephemeral() -> zk::CreateOptions<'static> {
    zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all())
}

/// A provider's node name: a dubbo URL, url-encoded as dubbo does.
fn provider(service: usize, host: usize) -> String {
    format!("dubbo%3A%2F%2F10.0.{service}.{host}%3A20880%2Forg.demo.Service{service}%3Fanyhost%3Dtrue%26side%3Dprovider")
}

/// The registry's persistent skeleton and configuration.
async fn build_registry(client: &zk::Client) -> Result<()> {
    client.create("/dubbo", b"", &persistent()).await?;
    for service in 0..SERVICES {
        let root = format!("/dubbo/org.demo.Service{service}");
        client.create(&root, b"", &persistent()).await?;
        for kind in ["providers", "consumers", "configurators", "routers"] {
            client
                .create(&format!("{root}/{kind}"), b"", &persistent())
                .await?;
        }
        client
            .create(
                &format!("{root}/configurators/override%3A%2F%2F0.0.0.0%2Ftimeout%3D{service}"),
                format!("timeout={service}").as_bytes(),
                &persistent(),
            )
            .await?;
    }
    Ok(())
}

/// Every node under `root` but [`EXCLUDED`] (data and whether ephemeral), by path.
async fn zk_tree(client: &zk::Client, root: &str) -> Result<BTreeMap<String, (Vec<u8>, bool)>> {
    let mut tree = BTreeMap::new();
    let mut level = vec![root.to_string()];
    while let Some(path) = level.pop() {
        let (data, stat) = match client.get_data(&path).await {
            Ok(read) => read,
            Err(zk::Error::NoNode) => continue,
            Err(error) => return Err(error.into()),
        };
        if path == EXCLUDED || path.starts_with(&format!("{EXCLUDED}/")) {
            continue;
        }
        tree.insert(path.clone(), (data, stat.ephemeral_owner != 0));
        match client.list_children(&path).await {
            Ok(children) => level.extend(children.into_iter().map(|c| format!("{path}/{c}"))),
            Err(zk::Error::NoNode) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(tree)
}

/// Every key under `prefix` (value and whether on a lease), by key.
async fn etcd_prefix(
    dest: &EtcdCluster,
    prefix: &str,
) -> Result<BTreeMap<String, (Vec<u8>, bool)>> {
    let mut client = dest.client().await?;
    let response = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    Ok(response
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                (kv.value().to_vec(), kv.lease() != 0),
            )
        })
        .collect())
}

/// The tree and the prefix hold the same, but for `foreign` keys (another
/// writer's), which must hold exactly what that writer put.
async fn wait_mirrored(
    zk_client: &zk::Client,
    dest: &EtcdCluster,
    foreign: &BTreeMap<String, Vec<u8>>,
    what: &str,
) -> Result<()> {
    let last = std::sync::Mutex::new(String::new());
    let result = eventually(WAIT, what, || async {
        let mut tree = zk_tree(zk_client, "/dubbo").await?;
        let mut keys = etcd_prefix(dest, "/dubbo").await?;
        for (key, value) in foreign {
            let held = keys.remove(key).map(|(v, _)| v);
            tree.remove(key);
            if held.as_ref() != Some(value) {
                *last.lock().unwrap() = format!("foreign key {key} holds {held:?}");
                return Ok(false);
            }
        }
        if tree != keys {
            let missing: Vec<_> = tree
                .keys()
                .filter(|k| !keys.contains_key(*k))
                .take(3)
                .collect();
            let extra: Vec<_> = keys
                .keys()
                .filter(|k| !tree.contains_key(*k))
                .take(3)
                .collect();
            let differ: Vec<_> = tree
                .iter()
                .filter(|(k, v)| keys.get(*k).is_some_and(|w| w != *v))
                .map(|(k, _)| k)
                .take(3)
                .collect();
            *last.lock().unwrap() = format!(
                "{} nodes, {} keys; missing {missing:?}, extra {extra:?}, differ {differ:?}",
                tree.len(),
                keys.len()
            );
            return Ok(false);
        }
        Ok(true)
    })
    .await;
    result.with_context(|| last.lock().unwrap().clone())
}

fn zk2etcd_args(zk: &ZkServer, dest: &EtcdCluster, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "zk2etcd",
        "--zk-servers",
        &zk.connect_string(),
        "--dst-endpoints",
        &dest.endpoints_arg(),
        "--zk-prefix",
        "/dubbo",
        "--exclude-prefix",
        EXCLUDED,
        "--lock-ttl",
        "3s",
        "--ephemeral-ttl",
        "10s",
        // Longer than any wait here: changes must arrive as events.
        "--resync-interval",
        "5m",
        // Never a fixed port: other servers run on these machines.
        "--metrics-addr",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `check --source zookeeper://…/dubbo`: its exit code and output.
async fn check_zk(zk: &ZkServer, dest: &EtcdCluster) -> Result<(i32, String)> {
    run_cli(&args(&[
        "check",
        "--source",
        &format!("zookeeper://{}/dubbo", zk.connect_string()),
        "--exclude-prefix",
        EXCLUDED,
        "--dst-endpoints",
        &dest.endpoints_arg(),
    ]))
    .await
}

/// `check` says the tree and the prefix are equal.
async fn expect_consistent(zk: &ZkServer, dest: &EtcdCluster, foreign: usize) -> Result<()> {
    let (code, output) = check_zk(zk, dest).await?;
    eprint!("e2e: check --source zookeeper://: {output}");
    ensure!(
        code == 0
            && output.contains("consistent")
            && output.contains(&format!("{foreign} keys held by another writer")),
        "check exited {code}: {output}"
    );
    Ok(())
}

async fn wait_log(syncer: &Syncer, text: &str) -> Result<()> {
    eventually(WAIT, text, || async {
        Ok(syncer.log_text().contains(text))
    })
    .await
}

/// 20 provider sessions with 10 ephemeral nodes each (on 10 services).
async fn start_providers(server: &ZkServer) -> Result<Vec<zk::Client>> {
    let mut sessions = Vec::new();
    for host in 0..SERVICES {
        let session = server
            .client_with_session_timeout(Duration::from_secs(10))
            .await?;
        for offset in 0..PROVIDERS_PER_SESSION {
            let service = (host + offset) % SERVICES;
            session
                .create(
                    &format!(
                        "/dubbo/org.demo.Service{service}/providers/{}",
                        provider(service, host)
                    ),
                    b"",
                    &ephemeral(),
                )
                .await?;
        }
        sessions.push(session);
    }
    Ok(sessions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dubbo_registry_is_mirrored_with_its_sessions() -> Result<()> {
    let server = ZkServer::start().await?;
    let dest = EtcdCluster::start_dest().await?;
    let admin = server.client().await?;
    build_registry(&admin).await?;
    let sessions = start_providers(&server).await?;
    // Odd input, mirrored exactly: binary data, a deep path, a large node.
    admin
        .create("/dubbo/bin", &[0xff, 0x00, 0xfe], &persistent())
        .await?;
    let mut deep = String::from("/dubbo/deep");
    admin.create(&deep, b"", &persistent()).await?;
    for level in 0..30 {
        deep.push_str(&format!("/l{level}"));
        admin.create(&deep, b"d", &persistent()).await?;
    }
    // ZooKeeper's own limit is just under 1 MiB (jute.maxbuffer).
    admin
        .create("/dubbo/big", &vec![b'x'; 1_000_000], &persistent())
        .await?;
    admin
        .create("/dubbo/big2", &vec![b'y'; 1_000_000], &persistent())
        .await?;
    admin
        .create("/dubbo/internal", b"left out", &persistent())
        .await?;
    // Another writer's keys under the same prefix, one of them a path
    // ZooKeeper also has: neither is ever changed or deleted by zk2etcd.
    let mut etcd = dest.client().await?;
    etcd.put(
        "/dubbo/org.demo.Service0/routers/owned-by-mirror",
        "mirror",
        None,
    )
    .await?;
    etcd.put(
        "/dubbo/org.demo.Service1/configurators",
        "mirror's value",
        None,
    )
    .await?;
    let foreign: BTreeMap<String, Vec<u8>> = [
        (
            "/dubbo/org.demo.Service0/routers/owned-by-mirror".to_string(),
            b"mirror".to_vec(),
        ),
        (
            "/dubbo/org.demo.Service1/configurators".to_string(),
            b"mirror's value".to_vec(),
        ),
    ]
    .into();

    // Nothing mirrored yet: check finds every node missing.
    let (code, output) = check_zk(&server, &dest).await?;
    ensure!(
        code == 1 && output.contains("INCONSISTENT") && output.contains("missing:"),
        "check before the sync exited {code}: {output}"
    );

    let syncer = Syncer::start("zk2etcd", &zk2etcd_args(&server, &dest, &[])).await?;
    wait_log(&syncer, "Diffed the ZooKeeper tree").await?;
    wait_mirrored(&admin, &dest, &foreign, "the full sync").await?;
    expect_consistent(&server, &dest, 2).await?;
    let metric = |name: &'static str| syncer.metric(name, &[("job", "zk2etcd")]);
    ensure!(metric("etcd_syncer_is_leader").await? == 1.0, "it leads");
    ensure!(
        metric("etcd_syncer_zk_resyncs_total").await? >= 1.0,
        "a resync counted"
    );
    // Every node but the excluded one and the other writer's path.
    let owned = metric("etcd_syncer_zk_keys_owned").await?;
    let nodes = zk_tree(&admin, "/dubbo").await?.len() - 1;
    ensure!(
        owned == nodes as f64,
        "{owned} keys owned, {nodes} mirrored nodes"
    );
    eventually(WAIT, "the sessions gauge", || async {
        Ok(metric("etcd_syncer_zk_sessions").await? == SERVICES as f64)
    })
    .await?;
    let keys = etcd_prefix(&dest, "/dubbo").await?;
    let leased = keys.values().filter(|(_, on_lease)| *on_lease).count();
    ensure!(
        leased == SERVICES * PROVIDERS_PER_SESSION,
        "the 200 providers are on leases, nothing else: {leased}"
    );
    ensure!(
        !keys.contains_key("/dubbo/internal"),
        "the excluded subtree is left out"
    );
    ensure!(
        keys["/dubbo/bin"].0 == vec![0xff, 0x00, 0xfe],
        "binary data as it is"
    );

    // Live churn: providers come and go, configuration changes.
    for round in 0..5 {
        let host = 100 + round;
        sessions[round]
            .create(
                &format!(
                    "/dubbo/org.demo.Service{round}/providers/{}",
                    provider(round, host)
                ),
                b"",
                &ephemeral(),
            )
            .await?;
        sessions[round + 1]
            .delete(
                &format!(
                    "/dubbo/org.demo.Service{}/providers/{}",
                    (round + 1) % SERVICES,
                    provider((round + 1) % SERVICES, round + 1)
                ),
                None,
            )
            .await?;
        admin
            .set_data(
                &format!("/dubbo/org.demo.Service{round}/configurators/override%3A%2F%2F0.0.0.0%2Ftimeout%3D{round}"),
                format!("timeout={}", round * 100).as_bytes(),
                None,
            )
            .await?;
    }
    admin.delete(&deep, None).await?;
    wait_mirrored(&admin, &dest, &foreign, "the churn").await?;
    expect_consistent(&server, &dest, 2).await?;

    // A provider's session closes: its nodes leave ZooKeeper, then etcd.
    let mut sessions = sessions;
    let closed = sessions.remove(7);
    drop(closed);
    wait_mirrored(
        &admin,
        &dest,
        &foreign,
        "the closed session's providers gone",
    )
    .await?;
    expect_consistent(&server, &dest, 2).await?;
    ensure!(
        etcd_prefix(&dest, "/dubbo")
            .await?
            .values()
            .filter(|(_, l)| *l)
            .count()
            == (SERVICES - 1) * PROVIDERS_PER_SESSION,
        "19 sessions' providers remain on leases"
    );
    // For the runbook (docs/operations.md, "ZooKeeper to etcd").
    eprintln!("e2e: zk2etcd log:");
    for line in syncer
        .log_text()
        .lines()
        .filter(|l| l.contains("ZooKeeper") || l.contains("zk2etcd"))
    {
        eprintln!("  {line}");
    }
    let keys = etcd_prefix(&dest, "/dubbo/org.demo.Service3/").await?;
    eprintln!("e2e: keys under /dubbo/org.demo.Service3/:");
    for (key, (value, leased)) in keys {
        eprintln!(
            "  {key} = {:?} {}",
            String::from_utf8_lossy(&value),
            if leased { "(on a session's lease)" } else { "" }
        );
    }
    drop(syncer);
    drop(sessions);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_replica_takes_over_and_zookeeper_restarts() -> Result<()> {
    let mut server = ZkServer::start().await?;
    let dest = EtcdCluster::start_dest().await?;
    let admin = server
        .client_with_session_timeout(Duration::from_secs(30))
        .await?;
    build_registry(&admin).await?;
    let providers = start_providers(&server).await?;
    let none = BTreeMap::new();
    let mut first = Syncer::spawn(
        "zk2etcd-a",
        &zk2etcd_args(&server, &dest, &["--instance-id", "a"]),
        &[],
    )?;
    wait_log(&first, "Diffed the ZooKeeper tree").await?;
    let second = Syncer::spawn(
        "zk2etcd-b",
        &zk2etcd_args(&server, &dest, &["--instance-id", "b"]),
        &[],
    )?;
    wait_mirrored(&admin, &dest, &none, "the full sync").await?;
    expect_consistent(&server, &dest, 0).await?;

    // Kill -9 the leader under churn; the standby takes over before the
    // providers' leases run out: sampled all along, none goes missing.
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (sampling, endpoints) = (sampling.clone(), dest.endpoints_arg());
        tokio::spawn(async move {
            let mut client = etcd_client::Client::connect([endpoints], None).await?;
            let mut fewest = usize::MAX;
            while !sampling.is_cancelled() {
                let response = client
                    .get("/dubbo", Some(GetOptions::new().with_prefix()))
                    .await?;
                fewest = fewest.min(response.kvs().iter().filter(|kv| kv.lease() != 0).count());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(fewest)
        })
    };
    for i in 0..20 {
        admin
            .create(
                &format!("/dubbo/org.demo.Service0/consumers/c{i}"),
                b"",
                &persistent(),
            )
            .await?;
        if i == 5 {
            first.kill9()?;
        }
    }
    wait_log(&second, "Leading the zk2etcd job.").await?;
    wait_mirrored(&admin, &dest, &none, "the takeover").await?;
    expect_consistent(&server, &dest, 0).await?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    sampling.cancel();
    let fewest = sampler.await??;
    ensure!(
        fewest == SERVICES * PROVIDERS_PER_SESSION,
        "during the takeover only {fewest} providers were on etcd"
    );

    // ZooKeeper restarts: the clients reconnect, changes made after it
    // reach etcd (the watch is added again and the tree walked again).
    server.restart().await?;
    wait_log(&second, "Reconnected to ZooKeeper").await?;
    admin
        .create("/dubbo/after-restart", b"1", &persistent())
        .await?;
    admin
        .delete("/dubbo/org.demo.Service0/consumers/c0", None)
        .await?;
    wait_mirrored(&admin, &dest, &none, "after the ZooKeeper restart").await?;
    expect_consistent(&server, &dest, 0).await?;

    // Every replica gone: the providers' keys expire with their leases
    // (--ephemeral-ttl 10s); the persistent ones stay.
    drop(second);
    eventually(WAIT, "the providers' keys to expire", || async {
        let keys = etcd_prefix(&dest, "/dubbo").await?;
        Ok(keys.keys().all(|k| !k.contains("/providers/")))
    })
    .await?;
    ensure!(
        etcd_prefix(&dest, "/dubbo")
            .await?
            .contains_key("/dubbo/after-restart"),
        "persistent keys stay"
    );
    drop(providers);
    Ok(())
}

/// The field report's layout: zk2etcd and an etcd mirror job write under
/// the same etcd prefix at once, and a provider's process pauses until
/// its session expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn beside_an_etcd_mirror_with_a_paused_provider() -> Result<()> {
    let server = ZkServer::start().await?;
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let admin = server.client().await?;
    build_registry(&admin).await?;
    let providers = start_providers(&server).await?;
    // A provider whose link to ZooKeeper will freeze, as a paused process's
    // would: it stops pinging, and the server expires its session.
    let link = e2e::proxy::LinkProxy::start(server.connect_string().parse()?).await?;
    let paused = tokio::time::timeout(
        Duration::from_secs(10),
        zk::Client::connector()
            .with_session_timeout(Duration::from_secs(4))
            .connect(&link.addr().to_string()),
    )
    .await
    .context("connect through the link")??;
    for path in ["/dubbo/org.demo.Paused", "/dubbo/org.demo.Paused/providers"] {
        admin.create(path, b"", &persistent()).await?;
    }
    for i in 0..5 {
        paused
            .create(
                &format!("/dubbo/org.demo.Paused/providers/p{i}"),
                b"",
                &ephemeral(),
            )
            .await?;
    }
    // Services already on etcd, under the same prefix on the mirror's
    // source, half of them on a lease; and one path ZooKeeper has too.
    let mut src = source.client().await?;
    let lease = src.lease_grant(120, None).await?.id();
    for service in 0..5 {
        for host in 0..10 {
            let on_lease =
                (host % 2 == 0).then(|| etcd_client::PutOptions::new().with_lease(lease));
            src.put(
                format!("/dubbo/org.etcd.Native{service}/providers/h{host}"),
                format!("etcd {service} {host}"),
                on_lease,
            )
            .await?;
        }
    }
    const SHARED: &str = "/dubbo/org.demo.Service1/configurators";
    src.put(SHARED, "etcd's value", None).await?;

    // zk2etcd first: the shared path is ZooKeeper's on etcd.
    let zk2etcd = Syncer::start("zk2etcd", &zk2etcd_args(&server, &dest, &[])).await?;
    wait_log(&zk2etcd, "Diffed the ZooKeeper tree").await?;
    wait_mirrored(&admin, &dest, &BTreeMap::new(), "zk2etcd's full sync").await?;

    // The mirror job's full sync over the same prefix while both sources
    // change: it must neither prune nor overwrite a key zk2etcd holds.
    let churn = {
        let (zk_client, mut etcd) = (server.client().await?, source.client().await?);
        tokio::spawn(async move {
            for i in 0..40 {
                zk_client
                    .create(
                        &format!("/dubbo/org.demo.Service2/consumers/c{i}"),
                        b"",
                        &persistent(),
                    )
                    .await?;
                if i % 4 == 3 {
                    zk_client
                        .delete(
                            &format!("/dubbo/org.demo.Service2/consumers/c{}", i - 2),
                            None,
                        )
                        .await?;
                }
                etcd.put(
                    format!("/dubbo/org.etcd.Native9/consumers/c{i}"),
                    "etcd",
                    None,
                )
                .await?;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            anyhow::Ok(())
        })
    };
    let mirror = Syncer::start("mirror", &mirror_args(&source, &dest, "/dubbo/")).await?;
    churn.await??;
    wait_log(&mirror, "Full sync finished.")
        .await
        .with_context(|| mirror.log_text())?;
    for line in mirror
        .log_text()
        .lines()
        .filter(|l| l.contains("Full sync finished."))
    {
        eprintln!("e2e: the mirror job: {line}");
    }
    ensure!(
        !mirror.log_text().contains("\"held_by_zk2etcd\":0"),
        "the mirror's full sync met zk2etcd's keys: {}",
        mirror.log_text()
    );
    // Every etcd key the mirror's source has (read_prefix gives them below
    // the prefix) but the shared path, as the source has it; every other
    // key is ZooKeeper's.
    let mirrored = |etcd: BTreeMap<Vec<u8>, Vec<u8>>| -> BTreeMap<String, Vec<u8>> {
        etcd.into_iter()
            .map(|(k, v)| (format!("/dubbo/{}", String::from_utf8_lossy(&k)), v))
            .filter(|(k, _)| k != SHARED)
            .collect()
    };
    let foreign = mirrored(read_prefix(&mut src, "/dubbo/").await?);
    wait_mirrored(&admin, &dest, &foreign, "both writers' keys").await?;
    expect_consistent(&server, &dest, foreign.len()).await?;
    let (code, output) = run_cli(&check_args(&source, &dest, &["--prefix", "/dubbo/"])).await?;
    eprint!("e2e: the mirror job's check: {output}");
    ensure!(
        code == 0 && output.contains("destination keys held by zk2etcd"),
        "the mirror's check exited {code}: {output}"
    );

    // The provider pauses: its session expires on the server, its nodes
    // leave ZooKeeper, then etcd. The mirror's keys stay.
    let expired = etcd_prefix(&dest, "/dubbo/org.demo.Paused/providers/").await?;
    ensure!(
        expired.len() == 5,
        "the paused provider's keys: {expired:?}"
    );
    link.hold();
    eventually(
        WAIT,
        "the paused session's nodes to leave ZooKeeper",
        || async {
            Ok(admin
                .list_children("/dubbo/org.demo.Paused/providers")
                .await?
                .is_empty())
        },
    )
    .await?;
    wait_mirrored(
        &admin,
        &dest,
        &foreign,
        "the expired session's providers gone",
    )
    .await?;
    ensure!(
        etcd_prefix(&dest, "/dubbo/org.demo.Paused/providers/")
            .await?
            .is_empty(),
        "the expired session's keys left etcd"
    );

    // status lists both jobs; zk2etcd's with the keys it owns.
    let (code, status) =
        run_cli(&args(&["status", "--dst-endpoints", &dest.endpoints_arg()])).await?;
    eprint!("e2e: status:\n{status}");
    ensure!(
        code == 0
            && status.contains("job zk2etcd: zk2etcd into /dubbo: ")
            && status.lines().any(|l| l.starts_with("dubbo ")),
        "status exited {code}: {status}"
    );
    let applied = zk2etcd
        .metric("etcd_syncer_zk_applied_zxid", &[("job", "zk2etcd")])
        .await?;
    ensure!(applied > 0.0, "the applied zxid is reported: {applied}");

    // Both go on: a source delete and a ZooKeeper delete, each by its writer.
    src.delete("/dubbo/org.etcd.Native0/providers/h1", None)
        .await?;
    admin
        .delete("/dubbo/org.demo.Service2/consumers/c0", None)
        .await?;
    let foreign = mirrored(read_prefix(&mut src, "/dubbo/").await?);
    wait_mirrored(&admin, &dest, &foreign, "a delete on each side").await?;
    expect_consistent(&server, &dest, foreign.len()).await?;
    drop((mirror, zk2etcd, paused, providers, link));
    Ok(())
}

/// Copies a directory tree (a stopped ZooKeeper's data directory).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The reviewer's case: the ensemble is restored from an older snapshot.
/// A node older than what zk2etcd mirrored from it is not written back over
/// the newer value; the diff says so (ERROR, errors_total); new nodes still
/// arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_ensemble_restored_from_an_older_snapshot_is_named() -> Result<()> {
    let mut server = ZkServer::start().await?;
    let dest = EtcdCluster::start_dest().await?;
    {
        let admin = server.client().await?;
        admin.create("/dubbo", b"", &persistent()).await?;
        admin.create("/dubbo/config", b"1", &persistent()).await?;
    }
    // The snapshot: the data directory of the stopped server.
    server.stop();
    let backup = tempfile::tempdir()?;
    copy_dir(server.data_dir(), backup.path())?;
    server.restart().await?;
    let admin = server.client().await?;
    admin.set_data("/dubbo/config", b"2", None).await?;
    let syncer = Syncer::start("zk2etcd", &zk2etcd_args(&server, &dest, &[])).await?;
    let none = BTreeMap::new();
    wait_mirrored(&admin, &dest, &none, "the newer value").await?;
    drop(syncer);
    drop(admin);

    // Restored: the node is back at "1", with an older mzxid.
    server.stop();
    std::fs::remove_dir_all(server.data_dir())?;
    copy_dir(backup.path(), server.data_dir())?;
    server.restart().await?;
    let admin = server.client().await?;
    ensure!(admin.get_data("/dubbo/config").await?.0 == b"1", "restored");
    let mut syncer = Syncer::start("zk2etcd-restored", &zk2etcd_args(&server, &dest, &[])).await?;
    syncer.allow_error("ZooKeeper's nodes are older");
    wait_log(
        &syncer,
        "ZooKeeper's nodes are older than what zk2etcd mirrored",
    )
    .await?;
    ensure!(
        syncer
            .metric(
                "etcd_syncer_errors_total",
                &[("job", "zk2etcd"), ("kind", "zk_history_rewound")]
            )
            .await?
            >= 1.0,
        "errors_total counts it"
    );
    let keys = etcd_prefix(&dest, "/dubbo").await?;
    ensure!(
        keys["/dubbo/config"].0 == b"2",
        "the newer value is not undone: {keys:?}"
    );
    // New nodes still arrive.
    admin.create("/dubbo/new", b"n", &persistent()).await?;
    eventually(WAIT, "a node created after the restore", || async {
        Ok(etcd_prefix(&dest, "/dubbo")
            .await?
            .get("/dubbo/new")
            .is_some_and(|(v, _)| v == b"n"))
    })
    .await?;
    syncer.finish().await?;
    Ok(())
}

/// TLS to ZooKeeper's secureClientPort, with a client certificate: the
/// registry is mirrored and checked over it; an unreadable CA file is a
/// config error naming the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_tls_with_a_client_certificate() -> Result<()> {
    let material = e2e::tls::TlsMaterial::generate()?;
    let server = ZkServer::start_tls(&material, true).await?;
    let secure = server.secure_connect_string().context("a TLS port")?;
    let dest = EtcdCluster::start_dest().await?;
    let admin = server.client().await?;
    build_registry(&admin).await?;
    let tls_args = [
        "--zk-cacert".to_string(),
        material.ca_cert.display().to_string(),
        "--zk-cert".to_string(),
        material.client_cert.display().to_string(),
        "--zk-key".to_string(),
        material.client_key.display().to_string(),
    ];
    let mut zk_args = zk2etcd_args(&server, &dest, &[]);
    zk_args = replace_flag(zk_args, "--zk-servers", &secure)?;
    zk_args.extend(tls_args.iter().cloned());
    let syncer = Syncer::start("zk2etcd-tls", &zk_args).await?;
    wait_mirrored(&admin, &dest, &BTreeMap::new(), "the full sync over TLS")
        .await
        .with_context(|| format!("{}\n{}", syncer.log_text(), server.log_tail()))?;
    ensure!(
        syncer.log_text().contains(&secure),
        "it connected to the TLS port: {}",
        syncer.log_text()
    );
    let mut check = args(&[
        "check",
        "--source",
        &format!("zookeeper://{secure}/dubbo"),
        "--exclude-prefix",
        EXCLUDED,
        "--dst-endpoints",
        &dest.endpoints_arg(),
    ]);
    check.extend(tls_args.iter().cloned());
    let (code, output) = run_cli(&check).await?;
    ensure!(
        code == 0 && output.contains("consistent"),
        "check over TLS exited {code}: {output}"
    );
    let mut bad = check.clone();
    let at = bad
        .iter()
        .position(|a| a == "--zk-cacert")
        .context("flag")?
        + 1;
    bad[at] = "/nonexistent/ca.pem".into();
    let (code, output) = run_cli(&bad).await?;
    ensure!(
        code == 2 && output.contains("--zk-cacert") && output.contains("/nonexistent/ca.pem"),
        "an unreadable CA exited {code}: {output}"
    );
    drop(syncer);
    Ok(())
}
