//! Lease-faithful mirroring against real etcd: a service registry whose
//! instances expire on the standby when they expire on the primary, a
//! takeover that loses no lease, an outage longer than TTL + grace, and
//! promotion with and without `--detach-leases`.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use e2e::leases::{
    grant_leases, granted_ttl, lease_record, lease_record_count, leased_keys, put_leased,
    LeaseRenewer,
};
use e2e::*;
use nix::sys::signal::Signal;

const WAIT: Duration = Duration::from_secs(90);
const JOB: &str = "svc";
const PREFIX: &str = "/svc/";
const PLAIN_KEYS: [&str; 2] = ["/svc/config", "/svc/version"];

/// A source with `count` instances, each its own lease of `ttl` seconds
/// with one key `/svc/inst-NNN`, plus two plain keys; every lease renewed
/// by one task. Returns the instance leases in instance order.
async fn registry(
    source: &EtcdCluster,
    count: usize,
    ttl: i64,
) -> Result<(Vec<i64>, LeaseRenewer)> {
    let client = source.client().await?;
    let leases = grant_leases(&client, count, ttl).await?;
    let renewer = LeaseRenewer::start(
        source.client().await?,
        &leases,
        Duration::from_secs((ttl as u64 / 3).max(1)),
    );
    let mut entries: Vec<(String, String, i64)> = leases
        .iter()
        .enumerate()
        .map(|(i, lease)| {
            (
                instance_key(i),
                format!("10.0.{}.{}:8080", i / 250, i % 250),
                *lease,
            )
        })
        .collect();
    entries.extend(
        PLAIN_KEYS
            .iter()
            .map(|key| (key.to_string(), "plain".to_string(), 0)),
    );
    put_leased(&mut source.client().await?, &entries).await?;
    Ok((leases, renewer))
}

/// A mirrored registry: source, destination, the syncer, the instance
/// leases, their renewer and the instance keys.
type Registry = (
    EtcdCluster,
    EtcdCluster,
    Syncer,
    Vec<i64>,
    LeaseRenewer,
    Vec<String>,
);

/// [`registry`] with `count` instances on `ttl`-second leases, mirrored
/// with `--lease-grace 5s` by a syncer named `name`, until the job is
/// watching (its first full sync checkpointed: a test that stops the syncer
/// next must not interrupt that full sync) and the destination holds every
/// instance key on a mirrored lease.
async fn mirrored_registry(name: &str, count: usize, ttl: i64) -> Result<Registry> {
    let clusters = Clusters::start(MirrorOptions {
        name: name.into(),
        prefix: PREFIX.into(),
        extra_args: e2e::args(&["--lease-grace", "5s"]),
        timeout: WAIT,
        ..MirrorOptions::default()
    })
    .await?;
    let (leases, renewer) = registry(&clusters.source, count, ttl).await?;
    let mirror = clusters.mirror().await?;
    let all: Vec<String> = (0..count).map(instance_key).collect();
    wait_mirrored(&mirror.dest, &all).await?;
    let Mirror {
        source,
        dest,
        syncer,
        ..
    } = mirror;
    Ok((source, dest, syncer, leases, renewer, all))
}

fn instance_key(i: usize) -> String {
    format!("/svc/inst-{i:03}")
}

fn syncer_args(source: &EtcdCluster, dest: &EtcdCluster, grace: &str) -> Vec<String> {
    let mut args = mirror_args(source, dest, PREFIX);
    args.extend(e2e::args(&["--lease-grace", grace]));
    args
}

fn check_args(source: &EtcdCluster, dest: &EtcdCluster) -> Vec<String> {
    e2e::args(&[
        "check",
        "--src-endpoints",
        &source.endpoints_arg(),
        "--dst-endpoints",
        &dest.endpoints_arg(),
        "--job-name",
        JOB,
    ])
}

fn promote_args(dest: &EtcdCluster, extra: &[&str]) -> Vec<String> {
    let mut args = e2e::args(&[
        "promote",
        "--dst-endpoints",
        &dest.endpoints_arg(),
        "--job-name",
        JOB,
    ]);
    args.extend(e2e::args(extra));
    args
}

/// Waits until the destination holds exactly `expected` instance keys, each
/// on a lease, and the plain keys without one.
async fn wait_mirrored(dest: &EtcdCluster, expected: &[String]) -> Result<()> {
    let client = dest.client().await?;
    let last = std::sync::Mutex::new(String::new());
    let outcome = eventually(WAIT, "the destination to mirror the registry", || {
        let mut client = client.clone();
        let last = &last;
        async move {
            let keys = leased_keys(&mut client, PREFIX).await?;
            let instances: Vec<&String> = keys.keys().filter(|k| k.contains("/inst-")).collect();
            let leased = keys
                .iter()
                .filter(|(k, v)| k.contains("/inst-") && v.1 != 0)
                .count();
            let plain_ok = PLAIN_KEYS
                .iter()
                .all(|p| keys.get(*p).is_some_and(|v| v.1 == 0));
            *last.lock().expect("last") = format!(
                "{} instance keys ({} leased, {} expected), plain keys ok: {plain_ok}",
                instances.len(),
                leased,
                expected.len()
            );
            Ok(instances.len() == expected.len()
                && expected.iter().all(|k| keys.contains_key(k))
                && leased == expected.len()
                && plain_ok)
        }
    })
    .await;
    outcome.with_context(|| last.lock().expect("last").clone())
}

async fn check_consistent(source: &EtcdCluster, dest: &EtcdCluster) -> Result<()> {
    // The checker compares at the checkpoint; wait out any in-flight change.
    let last = std::sync::Mutex::new(String::new());
    let outcome = eventually(WAIT, "check to exit 0", || {
        let last = &last;
        async move {
            let (code, output) = run_cli(&check_args(source, dest)).await?;
            *last.lock().expect("last") = output;
            Ok(code == 0)
        }
    })
    .await;
    outcome.with_context(|| last.lock().expect("last").clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_expires_on_the_standby_as_on_the_primary() -> Result<()> {
    let (source, dest, syncer, leases, renewer, _all) =
        mirrored_registry("syncer", 200, 10).await?;
    converge(&source, PREFIX, &dest, PREFIX, WAIT).await?;

    // Each destination lease: the recorded one, granted the source's TTL + grace.
    let mut dst = dest.client().await?;
    let dest_keys = leased_keys(&mut dst, PREFIX).await?;
    for (i, source_lease) in leases.iter().enumerate() {
        let record = lease_record(&mut dst, JOB, *source_lease)
            .await?
            .with_context(|| format!("no record for source lease {source_lease:x}"))?;
        let dest_lease = record["dest_lease"].as_i64().context("dest_lease")?;
        let (_, attached, _) = dest_keys.get(&instance_key(i)).context("instance key")?;
        ensure!(
            *attached == dest_lease,
            "{} is on {attached:x}, its record says {dest_lease:x}",
            instance_key(i)
        );
        ensure!(
            record["source_ttl"] == 10 && record["dest_ttl"] == 15,
            "record {record}"
        );
        let ttl = granted_ttl(&mut dst, dest_lease).await?;
        ensure!(
            ttl == Some(15),
            "destination lease {dest_lease:x} granted {ttl:?}, expected 10 s + 5 s grace"
        );
    }
    eventually(WAIT, "200 mirrored leases in the metrics", || async {
        Ok(syncer
            .metric("etcd_syncer_leases_mirrored", &[("job", JOB)])
            .await?
            == 200.0
            && syncer
                .metric("etcd_syncer_lease_backed_keys", &[("job", JOB)])
                .await?
                == 200.0)
    })
    .await?;

    // Twenty instances die: their keys go on both sides, the rest stay.
    renewer.release(&leases[..20]);
    let survivors: Vec<String> = (20..200).map(instance_key).collect();
    eventually(
        WAIT,
        "the dead instances to vanish on the source",
        || async {
            Ok(leased_keys(&mut source.client().await?, PREFIX)
                .await?
                .keys()
                .filter(|k| k.contains("/inst-"))
                .count()
                == 180)
        },
    )
    .await?;
    wait_mirrored(&dest, &survivors).await?;
    // Longer than TTL + grace: the live ones are renewed, not just lucky.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let dest_keys = leased_keys(&mut dst, PREFIX).await?;
    for key in &survivors {
        ensure!(
            dest_keys.get(key).is_some_and(|v| v.1 != 0),
            "{key} vanished from the destination while its source lease lives"
        );
    }
    ensure!(
        dest_keys.keys().filter(|k| k.contains("/inst-")).count() == 180,
        "dead instances are gone"
    );
    eventually(WAIT, "the dead leases retired", || async {
        Ok(syncer
            .metric("etcd_syncer_leases_mirrored", &[("job", JOB)])
            .await?
            == 180.0
            && lease_record_count(&mut dest.client().await?, JOB).await? == 180)
    })
    .await?;
    ensure!(
        syncer
            .metric(
                "etcd_syncer_lease_keepalive_failures_total",
                &[("job", JOB)]
            )
            .await?
            == 0.0,
        "no keepalive failed"
    );
    ensure!(
        syncer
            .metric("etcd_syncer_slow_path_total", &[("job", JOB)])
            .await?
            == 1.0,
        "one full sync (the first), no lease was lost"
    );
    check_consistent(&source, &dest).await?;
    drop(renewer);
    syncer.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_after_kill_9_loses_no_lease() -> Result<()> {
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let (_leases, renewer) = registry(&source, 50, 6).await?;
    let replica = |id: &str| {
        let mut args = syncer_args(&source, &dest, "5s");
        args.extend(e2e::args(&[
            "--instance-id",
            id,
            "--lock-ttl",
            "4s",
            "--rebalance-interval",
            "60s",
        ]));
        args
    };
    let mut a = Syncer::start("a", &replica("replica-a")).await?;
    wait_job_state(&a, JOB, "watching").await?;
    let b = Syncer::start("b", &replica("replica-b")).await?;
    eventually(WAIT, "both queued", || async {
        Ok(lock_holders(&dest, JOB).await? == 2)
    })
    .await?;
    let all: Vec<String> = (0..50).map(instance_key).collect();
    wait_mirrored(&dest, &all).await?;
    let mut dst = dest.client().await?;
    let before = leased_keys(&mut dst, PREFIX).await?;

    a.signal(Signal::SIGKILL)?;
    wait_job_state(&b, JOB, "watching").await?;
    // Longer than a destination lease's TTL (6 s + 5 s grace) after the kill.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let after = leased_keys(&mut dst, PREFIX).await?;
    for (key, (value, lease, created)) in &before {
        let (now_value, now_lease, now_created) = after
            .get(key)
            .with_context(|| format!("{key} vanished from the destination during the takeover"))?;
        ensure!(
            now_value == value && now_lease == lease,
            "{key}: lease {lease:x} before, {now_lease:x} after"
        );
        ensure!(
            now_created == created,
            "{key} was deleted and written again (created at {created}, now {now_created})"
        );
    }
    ensure!(
        b.metric(
            "etcd_syncer_lease_keepalive_failures_total",
            &[("job", JOB)]
        )
        .await?
            == 0.0
            && b.metric("etcd_syncer_slow_path_total", &[("job", JOB)])
                .await?
                == 0.0,
        "the new leader lost no lease and resumed without a full sync"
    );
    ensure!(
        b.metric("etcd_syncer_leases_mirrored", &[("job", JOB)])
            .await?
            == 50.0
    );
    check_consistent(&source, &dest).await?;
    a.kill9()?;
    drop(renewer);
    b.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_ttl_and_grace_is_repaired_on_restart() -> Result<()> {
    let (source, dest, syncer, leases, renewer, _all) = mirrored_registry("first", 40, 6).await?;
    syncer.finish().await?;

    // Nothing renews the destination leases: past 6 s + 5 s they expire.
    // Meanwhile five instances die on the source.
    renewer.release(&leases[..5]);
    let mut dst = dest.client().await?;
    eventually(WAIT, "the destination's leased keys to expire", || async {
        let keys = leased_keys(&mut dest.client().await?, PREFIX).await?;
        Ok(!keys.keys().any(|k| k.contains("/inst-")))
    })
    .await?;
    let keys = leased_keys(&mut dst, PREFIX).await?;
    ensure!(
        PLAIN_KEYS.iter().all(|k| keys.contains_key(*k)),
        "plain keys never expire"
    );

    let syncer = Syncer::start("second", &syncer_args(&source, &dest, "5s")).await?;
    let survivors: Vec<String> = (5..40).map(instance_key).collect();
    converge(&source, PREFIX, &dest, PREFIX, WAIT).await?;
    wait_mirrored(&dest, &survivors).await?;
    check_consistent(&source, &dest).await?;
    ensure!(
        syncer
            .metric(
                "etcd_syncer_errors_total",
                &[("job", JOB), ("kind", "dest_lease_expired")]
            )
            .await?
            >= 1.0,
        "the lost leases are counted"
    );
    drop(renewer);
    syncer.finish().await
}

/// The primary region is gone: its replicator and its instances' keepalives
/// with it. `promote` alone lets mirrored registrations expire as they would
/// have on the primary; plain keys stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_promote_mirrored_leased_keys_expire() -> Result<()> {
    let (_source, dest, syncer, _leases, renewer, _all) =
        mirrored_registry("syncer", 30, 6).await?;
    syncer.finish().await?;
    renewer.stop();

    let (code, output) = run_cli(&promote_args(&dest, &[])).await?;
    ensure!(
        code == 0 && output.contains("job svc: promoted"),
        "{output}"
    );
    eventually(WAIT, "mirrored leased keys to expire", || async {
        let keys = leased_keys(&mut dest.client().await?, PREFIX).await?;
        Ok(!keys.keys().any(|k| k.contains("/inst-")))
    })
    .await?;
    let keys = leased_keys(&mut dest.client().await?, PREFIX).await?;
    ensure!(
        keys.len() == PLAIN_KEYS.len() && PLAIN_KEYS.iter().all(|k| keys.contains_key(*k)),
        "only the plain keys stay: {:?}",
        keys.keys().collect::<Vec<_>>()
    );
    Ok(())
}

/// The same with `--detach-leases`: every mirrored key stays, on no lease,
/// past TTL + grace; a key the promoted cluster's own client put on its own
/// lease keeps that lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_with_detach_leases_keeps_mirrored_keys() -> Result<()> {
    let (_source, dest, syncer, _leases, renewer, all) = mirrored_registry("syncer", 30, 6).await?;
    syncer.finish().await?;
    renewer.stop();

    // A local client on the standby (outside the mirrored prefix's leases).
    let mut dst = dest.client().await?;
    let own = dst.lease_grant(60, None).await?.id();
    put_leased(&mut dst, &[("/svc/local".into(), "mine".into(), own)]).await?;

    let (code, output) = run_cli(&promote_args(&dest, &["--detach-leases"])).await?;
    ensure!(
        code == 0 && output.contains("job svc: promoted"),
        "{output}"
    );
    ensure!(
        output.contains("detached 30 keys from their mirrored leases; 0 skipped"),
        "{output}"
    );
    ensure!(
        lease_record_count(&mut dst, JOB).await? == 0,
        "lease records removed"
    );
    // Past the destination leases' TTL (6 s + 5 s).
    tokio::time::sleep(Duration::from_secs(14)).await;
    let keys: HashMap<String, (Vec<u8>, i64, i64)> = leased_keys(&mut dst, PREFIX).await?;
    for key in all.iter().chain(
        PLAIN_KEYS
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .iter(),
    ) {
        let (_, lease, _) = keys
            .get(key)
            .with_context(|| format!("{key} vanished after promote --detach-leases"))?;
        ensure!(*lease == 0, "{key} is still on lease {lease:x}");
    }
    ensure!(
        keys.get("/svc/local").is_some_and(|v| v.1 == own),
        "the local client's key keeps its own lease"
    );

    // Running it again is harmless: nothing left to detach.
    let (code, output) = run_cli(&promote_args(&dest, &["--detach-leases"])).await?;
    ensure!(
        code == 0 && output.contains("already promoted") && output.contains("detached 0 keys"),
        "{output}"
    );
    Ok(())
}

/// A promotion while the replicator runs (the source still healthy): the
/// replicator stops renewing at once, so mirrored leased keys expire on the
/// promoted cluster; `promote --undo` then finds the leases lost and
/// restores everything with one full sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_stops_renewals_and_undo_restores_the_leased_keys() -> Result<()> {
    let (source, dest, mut syncer, _leases, renewer, all) =
        mirrored_registry("syncer", 30, 6).await?;

    let (code, output) = run_cli(&promote_args(&dest, &[])).await?;
    ensure!(
        code == 0 && output.contains("job svc: promoted"),
        "{output}"
    );
    wait_job_state(&syncer, JOB, "promoted").await?;
    eventually(
        WAIT,
        "mirrored leased keys to expire after promotion",
        || async {
            let keys = leased_keys(&mut dest.client().await?, PREFIX).await?;
            Ok(!keys.keys().any(|k| k.contains("/inst-")))
        },
    )
    .await?;
    ensure!(
        syncer
            .metric("etcd_syncer_leases_mirrored", &[("job", JOB)])
            .await?
            == 0.0,
        "a promoted job mirrors no lease"
    );

    let (code, output) = run_cli(&promote_args(&dest, &["--undo"])).await?;
    ensure!(code == 0 && output.contains("promotion undone"), "{output}");
    converge(&source, PREFIX, &dest, PREFIX, WAIT).await?;
    wait_mirrored(&dest, &all).await?;
    check_consistent(&source, &dest).await?;
    drop(renewer);
    syncer.allow_error("never");
    syncer.finish().await
}

/// `--detach-leases` while the replicator runs, then failback: the detach
/// marks the checkpoint as not on mirrored leases, so after the undo the
/// replicator's full sync puts the keys back on mirrored leases by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_after_detach_mirrors_the_leases_again() -> Result<()> {
    let (source, dest, mut syncer, _leases, renewer, all) =
        mirrored_registry("syncer", 30, 6).await?;

    let (code, output) = run_cli(&promote_args(&dest, &["--detach-leases"])).await?;
    ensure!(
        code == 0 && output.contains("detached 30 keys from their mirrored leases"),
        "{output}"
    );
    wait_job_state(&syncer, JOB, "promoted").await?;
    let keys = leased_keys(&mut dest.client().await?, PREFIX).await?;
    ensure!(
        all.iter().all(|k| keys.get(k).is_some_and(|v| v.1 == 0)),
        "every mirrored key detached"
    );

    let (code, output) = run_cli(&promote_args(&dest, &["--undo"])).await?;
    ensure!(code == 0 && output.contains("promotion undone"), "{output}");
    wait_mirrored(&dest, &all).await?;
    converge(&source, PREFIX, &dest, PREFIX, WAIT).await?;
    check_consistent(&source, &dest).await?;
    drop(renewer);
    syncer.allow_error("never");
    syncer.finish().await
}

/// Keys changing lease on the source, dropping their lease, a lease ID the
/// destination already uses, and a lease with keys outside the prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_changes_collisions_and_revokes_are_mirrored() -> Result<()> {
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let mut src = source.client().await?;
    let mut dst = dest.client().await?;
    let ids = grant_leases(&src, 4, 30).await?;
    let (a, b, c, d) = (ids[0], ids[1], ids[2], ids[3]);
    let renewer = LeaseRenewer::start(source.client().await?, &ids, Duration::from_secs(5));
    // The destination's own client already holds lease ID c.
    dst.lease_grant(120, Some(etcd_client::LeaseGrantOptions::new().with_id(c)))
        .await?;
    put_leased(
        &mut src,
        &[
            ("/svc/move".into(), "1".into(), a),
            ("/svc/unlease".into(), "1".into(), a),
            ("/svc/collide".into(), "1".into(), c),
            ("/svc/in".into(), "1".into(), d),
            ("/outside/x".into(), "1".into(), d),
        ],
    )
    .await?;
    let syncer = Syncer::start("syncer", &syncer_args(&source, &dest, "5s")).await?;
    wait_job_state(&syncer, JOB, "watching").await?;
    converge(&source, PREFIX, &dest, PREFIX, WAIT).await?;
    // Then, while watching: a key moves to another lease, one loses its lease.
    put_leased(
        &mut src,
        &[
            ("/svc/move".into(), "2".into(), b),
            ("/svc/unlease".into(), "2".into(), 0),
        ],
    )
    .await?;
    converge(&source, PREFIX, &dest, PREFIX, WAIT).await?;
    let records = dst.clone();
    let record = |lease| {
        let mut dst = records.clone();
        async move {
            lease_record(&mut dst, JOB, lease)
                .await?
                .and_then(|r| r["dest_lease"].as_i64())
                .context("no record")
        }
    };
    let keys = leased_keys(&mut dst, PREFIX).await?;
    let lease_of = |key: &str| keys.get(key).map(|v| v.1).unwrap_or(-1);
    ensure!(
        lease_of("/svc/move") == record(b).await?,
        "moved with its key"
    );
    ensure!(lease_of("/svc/unlease") == 0, "a key that lost its lease");
    let mapped = record(c).await?;
    ensure!(
        mapped != c && lease_of("/svc/collide") == mapped,
        "a taken ID is mapped to a fresh lease: {mapped:x} for {c:x}"
    );
    ensure!(
        granted_ttl(&mut dst, c).await? == Some(120),
        "the destination's own lease is left alone"
    );
    check_consistent(&source, &dest).await?;

    // Revoking a source lease removes its keys on both sides, and only those.
    renewer.release(&[d]);
    src.lease_revoke(d).await?;
    converge(&source, PREFIX, &dest, PREFIX, WAIT).await?;
    ensure!(
        !leased_keys(&mut dst, PREFIX).await?.contains_key("/svc/in"),
        "the revoked lease's key is gone"
    );
    eventually(WAIT, "the revoked lease retired", || async {
        Ok(lease_record_count(&mut dest.client().await?, JOB).await? <= 3)
    })
    .await?;
    check_consistent(&source, &dest).await?;
    drop(renewer);
    syncer.finish().await
}

/// A job switched from `--leases strip` to `faithful`: the checkpoint says
/// its keys carry no lease, so it takes the slow path and attaches them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_from_strip_to_faithful() -> Result<()> {
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let (_leases, renewer) = registry(&source, 10, 30).await?;
    let mut strip = syncer_args(&source, &dest, "5s");
    strip.extend(e2e::args(&["--leases", "strip"]));
    let syncer = Syncer::start("strip", &strip).await?;
    wait_job_state(&syncer, JOB, "watching").await?;
    converge(&source, PREFIX, &dest, PREFIX, WAIT).await?;
    syncer.finish().await?;
    let syncer = Syncer::start("faithful", &syncer_args(&source, &dest, "5s")).await?;
    wait_job_state(&syncer, JOB, "watching").await?;
    ensure!(
        syncer
            .metric("etcd_syncer_slow_path_total", &[("job", JOB)])
            .await?
            == 1.0,
        "the change of --leases took one full sync"
    );
    let all: Vec<String> = (0..10).map(instance_key).collect();
    wait_mirrored(&dest, &all).await?;
    check_consistent(&source, &dest).await?;
    drop(renewer);
    syncer.finish().await
}

/// A job switched from `--leases faithful` to `strip` stops renewing the
/// destination leases it created: the checkpoint says its keys sit on them,
/// so it takes the slow path and rewrites them without a lease before the
/// leases run out (found by this test: the keys used to vanish).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_from_faithful_to_strip_keeps_the_keys() -> Result<()> {
    let (source, dest, syncer, _leases, renewer, all) =
        mirrored_registry("faithful", 10, 6).await?;
    syncer.finish().await?;
    let mut strip = syncer_args(&source, &dest, "5s");
    strip.extend(e2e::args(&["--leases", "strip"]));
    let syncer = Syncer::start("strip", &strip).await?;
    wait_job_state(&syncer, JOB, "watching").await?;
    // Past the old destination leases' TTL (6 s + 5 s).
    tokio::time::sleep(Duration::from_secs(20)).await;
    let keys = leased_keys(&mut dest.client().await?, PREFIX).await?;
    ensure!(
        all.iter().all(|k| keys.get(k).is_some_and(|v| v.1 == 0)),
        "every instance key is still on the destination, without a lease: {} of 10 present",
        keys.keys().filter(|k| k.contains("/inst-")).count()
    );
    let mut check = check_args(&source, &dest);
    check.extend(e2e::args(&["--leases", "strip"]));
    let (code, output) = run_cli(&check).await?;
    ensure!(code == 0, "{output}");
    drop(renewer);
    syncer.finish().await
}
