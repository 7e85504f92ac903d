//! `--revision-exact` on real etcd: a standby seeded from a snapshot of the
//! primary replays every revision as one txn, so a client that uses etcd as
//! kube-apiserver's storage does carries on against the promoted standby
//! with the revisions, metadata, watch positions and lease IDs it had.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use e2e::*;
use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};

const WAIT: Duration = Duration::from_secs(120);
const JOB: &str = "root";

/// One key as an MVCC store holds it.
type Stored = BTreeMap<Vec<u8>, (Vec<u8>, i64, i64, i64, i64)>;

/// Every key (but the syncer's meta prefix) at `revision` (0: latest),
/// with value, create and mod revision, version and lease.
async fn store_at(client: &mut Client, revision: i64) -> Result<Stored> {
    let mut options = GetOptions::new().with_from_key();
    if revision > 0 {
        options = options.with_revision(revision);
    }
    let response = client.get(vec![0u8], Some(options)).await?;
    Ok(response
        .kvs()
        .iter()
        .filter(|kv| !kv.key().starts_with(b"/-etcd-syncer-meta-/"))
        .map(|kv| (kv.key().to_vec(), metadata(kv)))
        .collect())
}

/// A key's value with its create and mod revision, version and lease.
fn metadata(kv: &etcd_client::KeyValue) -> (Vec<u8>, i64, i64, i64, i64) {
    (
        kv.value().to_vec(),
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease(),
    )
}

/// The flags of a revision-exact job between the two clusters.
fn exact_args(source: &EtcdCluster, dest: &EtcdCluster) -> Vec<String> {
    let mut argv = mirror_args(source, dest, "");
    let at = argv.iter().position(|a| a == "--prefix").expect("--prefix");
    argv.drain(at..at + 2);
    argv.extend(["--revision-exact".into(), "--lock-ttl".into(), "3s".into()]);
    argv
}

/// A primary with some history, and a standby restored from its snapshot.
async fn primary_and_standby() -> Result<(EtcdCluster, EtcdCluster, tempfile::TempDir)> {
    let source = EtcdCluster::start_source().await?;
    let mut client = source.client().await?;
    for i in 0..20 {
        client
            .put(
                format!("/registry/pods/default/p{i}"),
                format!("v{i}"),
                None,
            )
            .await?;
    }
    client.delete("/registry/pods/default/p0", None).await?;
    let dir = tempfile::tempdir()?;
    let snapshot = dir.path().join("primary.db");
    source.snapshot_save(&snapshot)?;
    let dest = EtcdCluster::start_with(EtcdOptions {
        role: Role::Dest,
        restore_from: Some(snapshot),
        ..EtcdOptions::default()
    })
    .await?;
    ensure!(
        dest.revision().await? == source.revision().await?,
        "a restored standby starts at the snapshot's revision"
    );
    Ok((source, dest, dir))
}

/// Waits until the standby is at the primary's revision.
async fn wait_parity(source: &EtcdCluster, dest: &EtcdCluster) -> Result<i64> {
    let head = std::sync::atomic::AtomicI64::new(0);
    eventually(
        WAIT,
        "the standby to reach the primary's revision",
        || async {
            let now = source.revision().await?;
            head.store(now, std::sync::atomic::Ordering::SeqCst);
            Ok(checkpoint_rev(dest, JOB).await? == Some(now) && dest.revision().await? == now)
        },
    )
    .await?;
    Ok(head.into_inner())
}

/// What kube-apiserver's storage layer does: create only if absent,
/// update and delete guarded on the `mod_revision` it read.
async fn create(client: &mut Client, key: &str, value: &str, lease: i64) -> Result<i64> {
    let put = PutOptions::new().with_lease(lease);
    let response = client
        .txn(
            Txn::new()
                .when(vec![Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then(vec![TxnOp::put(key, value, Some(put))]),
        )
        .await?;
    ensure!(response.succeeded(), "create {key}: it exists");
    Ok(response.header().context("header")?.revision())
}

async fn guarded_update(
    client: &mut Client,
    key: &str,
    value: &str,
    mod_revision: i64,
) -> Result<bool> {
    let response = client
        .txn(
            Txn::new()
                .when(vec![Compare::mod_revision(
                    key,
                    CompareOp::Equal,
                    mod_revision,
                )])
                .and_then(vec![TxnOp::put(key, value, None)]),
        )
        .await?;
    Ok(response.succeeded())
}

async fn mod_revision(client: &mut Client, key: &str) -> Result<i64> {
    let response = client.get(key, None).await?;
    Ok(response.kvs().first().context("key")?.mod_revision())
}

/// One watch event with everything a client sees of it.
type SeenEvent = (
    bool,
    Vec<u8>,
    (Vec<u8>, i64, i64, i64, i64),
    Option<(Vec<u8>, i64)>,
);

/// Watches `prefix` from `from` with `prev_kv` until the stream reaches `until`.
async fn history(
    client: &mut Client,
    prefix: &str,
    from: i64,
    until: i64,
) -> Result<Vec<SeenEvent>> {
    let mut stream = client
        .watch(
            prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(from)
                    .with_prev_key()
                    .with_progress_notify(),
            ),
        )
        .await?;
    let mut seen = Vec::new();
    let read = async {
        while let Some(response) = stream.message().await? {
            ensure!(
                !response.canceled(),
                "watch canceled: {}",
                response.cancel_reason()
            );
            for event in response.events() {
                let kv = event.kv().context("kv")?;
                seen.push((
                    event.event_type() == EventType::Put,
                    kv.key().to_vec(),
                    metadata(kv),
                    event
                        .prev_kv()
                        .map(|p| (p.value().to_vec(), p.mod_revision())),
                ));
                if kv.mod_revision() >= until {
                    return Ok(());
                }
            }
        }
        anyhow::bail!("watch ended")
    };
    tokio::time::timeout(WAIT, read)
        .await
        .context("history watch timed out")??;
    Ok(seen)
}

/// The Kubernetes storage contract, end to end: the client works on the
/// primary, the primary dies, the standby is promoted, and the client
/// carries on against it with the revisions it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubernetes_storage_contract_survives_promotion() -> Result<()> {
    let (mut source, dest, _snapshot) = primary_and_standby().await?;
    let mut syncer = Syncer::start("exact", &exact_args(&source, &dest)).await?;
    wait_job_state(&syncer, JOB, "watching").await?;

    let mut client = source.client().await?;
    // A lease kept alive by its holder, and one left to expire (its keys
    // go in one revision).
    let held = client.lease_grant(30, None).await?.id();
    let (mut keeper, _responses) = client.lease_keep_alive(held).await?;
    let short = client.lease_grant(2, None).await?.id();
    create(&mut client, "/registry/masterleases/10.0.0.1", "ip", held).await?;
    for i in 0..5 {
        create(
            &mut client,
            &format!("/registry/events/short-{i}"),
            "e",
            short,
        )
        .await?;
    }
    for i in 0..30 {
        create(
            &mut client,
            &format!("/registry/configmaps/default/c{i}"),
            "v0",
            0,
        )
        .await?;
    }
    for i in 0..30 {
        let key = format!("/registry/configmaps/default/c{i}");
        let at = mod_revision(&mut client, &key).await?;
        ensure!(
            guarded_update(&mut client, &key, "v1", at).await?,
            "update {key}"
        );
    }
    // kube-apiserver's compaction: a txn on compact_rev_key, then Compact.
    let compact_at = source.revision().await?;
    client
        .txn(
            Txn::new()
                .when(vec![Compare::version(
                    "compact_rev_key",
                    CompareOp::Equal,
                    0,
                )])
                .and_then(vec![TxnOp::put(
                    "compact_rev_key",
                    compact_at.to_string(),
                    None,
                )]),
        )
        .await?;
    client.compact(compact_at, None).await?;
    // Several keys in one revision, then a range delete bigger than one
    // destination txn (etcd's default --max-txn-ops is 128).
    client
        .txn(
            Txn::new().and_then(
                (0..5)
                    .map(|i| TxnOp::put(format!("/registry/leases/l{i}"), "holder", None))
                    .collect::<Vec<_>>(),
            ),
        )
        .await?;
    for chunk in 0..3 {
        client
            .txn(
                Txn::new().and_then(
                    (0..100)
                        .map(|i| {
                            TxnOp::put(
                                format!("/registry/events/bulk-{:03}", chunk * 100 + i),
                                "e",
                                None,
                            )
                        })
                        .collect::<Vec<_>>(),
                ),
            )
            .await?;
    }
    client
        .delete(
            "/registry/events/bulk-",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await?;
    // The short lease expires on the primary.
    eventually(WAIT, "the short lease to expire on the primary", || async {
        let mut client = source.client().await?;
        let left = client
            .get(
                "/registry/events/short-",
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?;
        Ok(left.count() == 0)
    })
    .await?;
    keeper.keep_alive().await?;
    let last = wait_parity(&source, &dest).await?;

    // The standby keeps the primary's history window: compacted where the
    // primary is (so a watch from before it fails on both alike).
    eventually(
        WAIT,
        "the standby to be compacted where the primary is",
        || async {
            let mut standby = dest.client().await?;
            let below = standby
                .get(
                    "compact_rev_key",
                    Some(GetOptions::new().with_revision(compact_at - 1)),
                )
                .await;
            Ok(below.is_err())
        },
    )
    .await?;
    // Every revision the two keep is the same store.
    let mut primary = source.client().await?;
    let mut standby = dest.client().await?;
    ensure!(
        store_at(&mut primary, 0).await? == store_at(&mut standby, 0).await?,
        "the standby's keys and metadata equal the primary's at its head"
    );
    let readable = (compact_at..=last).collect::<Vec<_>>();
    for i in 0..100 {
        let at = readable[i * readable.len() / 100];
        ensure!(
            store_at(&mut primary, at).await? == store_at(&mut standby, at).await?,
            "revision {at} reads the same on both"
        );
    }
    // `check` compares both stores at the checkpoint with their metadata,
    // and the history at sampled revisions.
    let (code, output) = run_cli(&check_args(
        &source,
        &dest,
        &["--job-name", JOB, "--history-samples", "20"],
    ))
    .await?;
    ensure!(code == 0, "check exited {code}: {output}");
    ensure!(
        output.contains("parity: holds")
            && output.contains("revisions sampled, 0 differ")
            && output.ends_with("consistent\n"),
        "check output: {output}"
    );
    // The client's watch history on the primary...
    // (From the revision after the compaction: etcd before 3.5.18 misses
    // deletes made at the compaction revision, etcd-io/etcd#18089.)
    let on_primary = history(&mut primary, "/registry/", compact_at + 1, last).await?;
    let watched_until = last;
    let guarded_key = "/registry/configmaps/default/c7";
    let guarded_at = mod_revision(&mut primary, guarded_key).await?;

    // The primary dies; the standby is promoted.
    source.kill();
    cli_ok(&[
        "promote",
        "--dst-endpoints",
        &dest.endpoints_arg(),
        "--job-name",
        JOB,
    ])
    .await?;
    // ... equals the standby's, read from the same revision.
    let on_standby = history(&mut standby, "/registry/", compact_at + 1, watched_until).await?;
    if let Some(at) = (0..on_primary.len().max(on_standby.len()))
        .find(|i| on_primary.get(*i) != on_standby.get(*i))
    {
        anyhow::bail!(
            "the watch history differs between primary and standby at event {at} of {}/{}: {:?} vs {:?}",
            on_primary.len(),
            on_standby.len(),
            on_primary.get(at),
            on_standby.get(at)
        );
    }
    ensure!(
        on_primary
            .iter()
            .any(|e| !e.0 && e.1.starts_with(b"/registry/events/short-")),
        "the lease expiry's deletes are in the history"
    );
    ensure!(
        on_primary
            .iter()
            .filter(|e| !e.0 && e.1.starts_with(b"/registry/events/bulk-"))
            .count()
            == 300,
        "the range delete bigger than one txn is in the history"
    );
    // A watch resumed from the client's last revision carries on with the
    // standby's own writes.
    let mut resumed = standby
        .watch(
            "/registry/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(watched_until + 1),
            ),
        )
        .await?;
    // A guarded update with the mod_revision read on the primary applies.
    ensure!(
        guarded_update(&mut standby, guarded_key, "after-failover", guarded_at).await?,
        "a guarded update with the primary's mod_revision applies on the standby"
    );
    let first_event = async {
        loop {
            let message = resumed.message().await?.context("resumed watch ended")?;
            ensure!(
                !message.canceled(),
                "the resumed watch was canceled: {}",
                message.cancel_reason()
            );
            if let Some(event) = message.events().first() {
                return Ok::<_, anyhow::Error>(event.kv().context("kv")?.clone());
            }
        }
    };
    let kv = tokio::time::timeout(WAIT, first_event)
        .await
        .context("resumed watch")??;
    ensure!(
        kv.key() == guarded_key.as_bytes(),
        "the resumed watch sees the update"
    );
    // The lease holder keeps its lease alive under its ID.
    let (mut standby_keeper, mut answers) = standby.lease_keep_alive(held).await?;
    standby_keeper.keep_alive().await?;
    let answer = answers.message().await?.context("keepalive answer")?;
    ensure!(answer.ttl() > 0, "the lease {held:x} lives on the standby");
    ensure!(
        syncer
            .metric(
                "etcd_syncer_errors_total",
                &[("job", JOB), ("kind", "parity_lost")]
            )
            .await?
            == 0.0,
        "no parity loss"
    );
    syncer.allow_error("The standby is promoted");
    syncer.finish().await
}

/// A write of the standby's own (here, straight to it) moves its revision:
/// the next replay txn lands one revision late, the job says `parity_lost`
/// and writes nothing more, and a restart finds it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stray_write_on_the_standby_is_parity_lost() -> Result<()> {
    let (source, dest, _snapshot) = primary_and_standby().await?;
    let mut syncer = Syncer::start("exact", &exact_args(&source, &dest)).await?;
    syncer.allow_error("parity lost");
    wait_job_state(&syncer, JOB, "watching").await?;
    let mut client = source.client().await?;
    client.put("/registry/a", "1", None).await?;
    wait_parity(&source, &dest).await?;

    dest.client()
        .await?
        .put("/registry/stray", "x", None)
        .await?;
    client.put("/registry/b", "1", None).await?;
    wait_job_state(&syncer, JOB, "parity_lost").await?;
    ensure!(
        syncer
            .metric(
                "etcd_syncer_errors_total",
                &[("job", JOB), ("kind", "parity_lost")]
            )
            .await?
            >= 1.0,
        "parity_lost counted"
    );
    client.put("/registry/c", "1", None).await?;
    let (code, output) = run_cli(&check_args(&source, &dest, &["--job-name", JOB])).await?;
    ensure!(
        code == 1 && output.contains("parity: LOST"),
        "check exited {code}: {output}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut standby = dest.client().await?;
    ensure!(
        standby.get("/registry/c", None).await?.kvs().is_empty(),
        "nothing written after parity is lost"
    );

    syncer.stop().await?;
    let mut again = Syncer::start("exact-again", &exact_args(&source, &dest)).await?;
    again.allow_error("parity lost");
    wait_job_state(&again, JOB, "parity_lost").await?;
    again.finish().await?;
    syncer.finish().await
}

/// A standby whose data differs from the primary at its revision is
/// refused before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seed_that_differs_is_refused() -> Result<()> {
    let (source, dest, _snapshot) = primary_and_standby().await?;
    // Same revision on both, different data.
    source
        .client()
        .await?
        .put("/registry/x", "primary", None)
        .await?;
    dest.client()
        .await?
        .put("/registry/x", "standby", None)
        .await?;
    let before = dest.revision().await?;
    let mut syncer = Syncer::start("exact", &exact_args(&source, &dest)).await?;
    syncer.allow_error("parity lost");
    wait_job_state(&syncer, JOB, "parity_lost").await?;
    ensure!(
        dest.revision().await? == before,
        "the refused standby was not written"
    );
    ensure!(
        syncer.log_text().contains("value differs: /registry/x"),
        "the refusal names the key"
    );
    syncer.finish().await
}

/// A primary whose history is intact from revision 1 seeds an empty
/// standby by replay alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_standby_is_seeded_by_replay_from_revision_one() -> Result<()> {
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let mut client = source.client().await?;
    let lease = client.lease_grant(60, None).await?.id();
    for i in 0..50 {
        client.put(format!("/k/{i}"), "v", None).await?;
    }
    client
        .put("/k/leased", "v", Some(PutOptions::new().with_lease(lease)))
        .await?;
    client.delete("/k/1", None).await?;
    let syncer = Syncer::start("exact", &exact_args(&source, &dest)).await?;
    let last = wait_parity(&source, &dest).await?;
    let mut primary = source.client().await?;
    let mut standby = dest.client().await?;
    for at in [2, 10, 30, last] {
        ensure!(
            store_at(&mut primary, at).await? == store_at(&mut standby, at).await?,
            "revision {at} reads the same on both"
        );
    }
    syncer.finish().await
}

/// Two replicas: the leader is killed -9 under writes; the other takes the
/// lease-only lock over once its lease expires (the lock TTL, plus a
/// quarter-TTL poll) and replays on, with no revision of the standby's own
/// in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_takes_over_when_the_leader_is_killed() -> Result<()> {
    let (source, dest, _snapshot) = primary_and_standby().await?;
    let mut first = Syncer::start("exact-a", &exact_args(&source, &dest)).await?;
    wait_job_state(&first, JOB, "watching").await?;
    let second = Syncer::start("exact-b", &exact_args(&source, &dest)).await?;
    wait_job_state(&second, JOB, "standby").await?;
    let mut client = source.client().await?;
    for i in 0..50 {
        client
            .put(format!("/registry/before/{i}"), "v", None)
            .await?;
    }
    wait_parity(&source, &dest).await?;
    first.kill9()?;
    let killed = std::time::Instant::now();
    for i in 0..50 {
        client
            .put(format!("/registry/after/{i}"), "v", None)
            .await?;
    }
    wait_job_state(&second, JOB, "watching").await?;
    // --lock-ttl 3s: the lease outlives the leader by at most 3 s, and the
    // standby tries every 750 ms. Reported, not asserted (machines are noisy).
    eprintln!("takeover after kill -9: {:?}", killed.elapsed());
    wait_parity(&source, &dest).await?;
    let mut primary = source.client().await?;
    let mut standby = dest.client().await?;
    ensure!(
        store_at(&mut primary, 0).await? == store_at(&mut standby, 0).await?,
        "equal after the takeover"
    );
    second.finish().await
}

/// Every replica away for longer than a lease's TTL plus the grace: the
/// standby's copy of the lease expires on its own and deletes its key (a
/// revision of the standby's own). A restarted syncer finds the standby's
/// revision past its checkpoint's and stops: parity lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_that_expires_on_the_standby_is_parity_lost() -> Result<()> {
    let (source, dest, _snapshot) = primary_and_standby().await?;
    let mut args = exact_args(&source, &dest);
    args.extend(["--lease-grace".into(), "5s".into()]);
    let mut syncer = Syncer::start("exact", &args).await?;
    wait_job_state(&syncer, JOB, "watching").await?;
    let mut client = source.client().await?;
    let lease = client.lease_grant(3, None).await?.id();
    let renewer =
        e2e::leases::LeaseRenewer::start(source.client().await?, &[lease], Duration::from_secs(1));
    client
        .put(
            "/registry/masterleases/10.0.0.2",
            "ip",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    wait_parity(&source, &dest).await?;
    syncer.kill9()?;
    // 3 s TTL + 5 s grace, and some.
    let before = dest.revision().await?;
    eventually(
        WAIT,
        "the standby's copy of the lease to expire",
        || async { Ok(dest.revision().await? > before) },
    )
    .await?;
    let mut again = Syncer::start("exact-again", &args).await?;
    again.allow_error("parity lost");
    wait_job_state(&again, JOB, "parity_lost").await?;
    ensure!(
        again.log_text().contains("written by something else"),
        "the log says why"
    );
    renewer.stop();
    again.finish().await
}

/// A syncer outage longer than the source's compaction interval (a
/// Kubernetes source compacts every 5 minutes): the standby catches up over
/// the compacted stretch in exactly its revisions, is compacted at its end,
/// and replays on; keys the source left alone stay exact, the keys changed
/// in the stretch keep value and lease. With `--exact-gap stop` it waits
/// for a re-seed instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_past_the_source_compaction_is_caught_up() -> Result<()> {
    let (source, dest, _snapshot) = primary_and_standby().await?;
    let args = exact_args(&source, &dest);
    let mut syncer = Syncer::start("exact", &args).await?;
    wait_job_state(&syncer, JOB, "watching").await?;
    let mut client = source.client().await?;
    let lease = client.lease_grant(120, None).await?.id();
    client.put("/registry/a", "1", None).await?;
    client
        .put(
            "/registry/leased",
            "1",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    let from = wait_parity(&source, &dest).await?;
    syncer.kill9()?;

    // The outage: changes, then a compaction at the head.
    for value in ["2", "3", "4"] {
        client.put("/registry/a", value, None).await?;
    }
    client.put("/registry/new", "1", None).await?;
    client
        .put(
            "/registry/leased",
            "2",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    client.delete("/registry/pods/default/p1", None).await?;
    // The same value again: a new revision, nothing to write.
    client.put("/registry/pods/default/p2", "v2", None).await?;
    let to = source.compact().await?;

    let mut again = Syncer::start("exact-again", &args).await?;
    let caught_up = wait_parity(&source, &dest).await?;
    ensure!(
        caught_up == to,
        "caught up to the source's head {to}, at {caught_up}"
    );
    ensure!(
        again.log_text().contains("Caught up"),
        "the log says it caught up"
    );
    ensure!(
        again
            .metric("etcd_syncer_exact_catch_ups_total", &[("job", JOB)])
            .await?
            == 1.0,
        "one catch-up counted"
    );
    let (primary, standby) = (
        store_at(&mut client, 0).await?,
        store_at(&mut dest.client().await?, 0).await?,
    );
    ensure!(
        primary.keys().eq(standby.keys()),
        "the same keys: {:?} against {:?}",
        primary.keys().collect::<Vec<_>>(),
        standby.keys().collect::<Vec<_>>()
    );
    for (key, (value, create, modified, version, lease_id)) in &primary {
        let other = &standby[key];
        ensure!(
            (&other.0, other.4) == (value, *lease_id),
            "value and lease of {} equal",
            String::from_utf8_lossy(key)
        );
        if *modified <= from {
            ensure!(
                *other == (value.clone(), *create, *modified, *version, *lease_id),
                "{} was not changed in the stretch: exact",
                String::from_utf8_lossy(key)
            );
        }
    }
    let a = &standby[b"/registry/a".as_slice()];
    ensure!(
        a.2 > from && a.2 <= to && a.3 == 2,
        "/registry/a was caught up once inside ({from}, {to}]: {a:?}"
    );
    // The stretch is not the source's history: compacted on the standby.
    let mut standby_client = dest.client().await?;
    let read = standby_client
        .get(
            "/registry/a",
            Some(GetOptions::new().with_revision(from + 1)),
        )
        .await;
    ensure!(
        read.as_ref()
            .err()
            .is_some_and(|e| e.to_string().contains("compacted")),
        "a read inside the caught-up stretch is refused as compacted: {read:?}"
    );

    // Replay goes on, exact.
    client.put("/registry/after", "1", None).await?;
    client.put("/registry/a", "5", None).await?;
    wait_parity(&source, &dest).await?;
    let (primary, standby) = (
        store_at(&mut client, 0).await?,
        store_at(&mut standby_client, 0).await?,
    );
    ensure!(
        primary[b"/registry/after".as_slice()] == standby[b"/registry/after".as_slice()],
        "a key written after the catch-up is exact"
    );
    ensure!(
        primary[b"/registry/a".as_slice()].2 == standby[b"/registry/a".as_slice()].2,
        "a caught-up key's mod revision is exact again once it changes"
    );
    let status = cli_ok(&["status", "--dst-endpoints", &dest.endpoints_arg()]).await?;
    ensure!(
        status.contains(&format!(
            "caught up over compacted history {}..{to}",
            from + 1
        )),
        "status names the stretch: {status}"
    );
    let (code, output) = run_cli(&check_args(&source, &dest, &["--job-name", JOB])).await?;
    // For the runbook (docs/operations.md, "Revision-exact standby").
    eprintln!("e2e: catch-up log:");
    for line in again.log_text().lines().filter(|l| l.contains("atch")) {
        eprintln!("  {line}");
    }
    eprintln!("e2e: status after a catch-up:\n{status}\ne2e: check after a catch-up:\n{output}");
    ensure!(
        code == 0 && output.contains("metadata-inexact") && output.contains("consistent"),
        "check exited {code}: {output}"
    );
    again.kill9()?;

    // The same outage with --exact-gap stop: blocked, nothing written.
    client.put("/registry/a", "6", None).await?;
    client.put("/registry/a", "7", None).await?;
    source.compact().await?;
    let before = dest.revision().await?;
    let mut strict = args.clone();
    strict.extend(["--exact-gap".into(), "stop".into()]);
    let mut stopped = Syncer::start("exact-strict", &strict).await?;
    stopped.allow_error("re-seed");
    eventually(WAIT, "the strict job to stop", || async {
        Ok(stopped
            .log_text()
            .contains("re-seed the standby from a new snapshot"))
    })
    .await?;
    ensure!(
        dest.revision().await? == before,
        "nothing written by a job told to stop"
    );
    stopped.finish().await?;
    again.finish().await?;
    syncer.finish().await
}
