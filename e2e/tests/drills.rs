//! The field report's disaster drills, automated. Each ends with the oracle
//! reporting exact equality unless it says otherwise. Drills covered
//! elsewhere: auth (replicator.rs), kill -9 and split brain (ha.rs), long
//! outage with compaction, reset and the mass-delete guard (replicator.rs).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use e2e::load::Load;
use e2e::*;
use etcd_client::GetOptions;
use nix::sys::signal::Signal;

const WAIT: Duration = Duration::from_secs(120);

fn moderate_load(prefix: &str) -> Load {
    let mut load = Load::new(prefix, 4, 200);
    load.rate_per_writer = Some(50.0);
    load.keys_per_txn = 3;
    load.delete_every = Some(7);
    load.range_delete_every = Some(13);
    load
}

async fn drill_under_load(options: MirrorOptions) -> Result<()> {
    let mirror = Mirror::start(MirrorOptions {
        load: Some(Preload::keys(2_000, 100)),
        ..options
    })
    .await?;
    let report = moderate_load("/app/")
        .run(&[mirror.source.client().await?])
        .await?;
    mirror.converge().await?;
    println!(
        "{}: {} source revisions mirrored under load",
        mirror.options.name, report.operations
    );
    mirror.finish().await
}

/// Drill 1a: plain http, a three-member source cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_http_with_a_three_member_source() -> Result<()> {
    drill_under_load(MirrorOptions {
        name: "http".into(),
        source: EtcdOptions {
            members: 3,
            ..EtcdOptions::default()
        },
        ..MirrorOptions::default()
    })
    .await
}

/// Drill 1b: mutual TLS on both clusters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_https_with_mutual_tls() -> Result<()> {
    let tls = EtcdOptions {
        tls: Some(TlsMaterial::generate()?),
        ..EtcdOptions::default()
    };
    drill_under_load(MirrorOptions {
        name: "https".into(),
        source: tls.clone(),
        dest: tls,
        ..MirrorOptions::default()
    })
    .await
}

/// Drill 3: SIGTERM of the leader during a full sync; the standby finishes it.
///
/// The leader's destination link freezes by itself a fixed volume into the
/// full sync, so the SIGTERM lands mid full sync however fast the machine
/// is; the link is let go once the leader has taken the signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_sigterm_during_a_full_sync() -> Result<()> {
    const KEYS: usize = 20_000;
    let clusters = Clusters::start(MirrorOptions {
        proxy: Some(ProxySide::Dest),
        ..MirrorOptions::loaded(KEYS, 50)
    })
    .await?;
    let (source, dest) = (&clusters.source, &clusters.dest);
    let proxy = clusters.proxy.as_ref().context("proxy")?;
    // The full sync sends over 1.3 MB of puts; a quarter MiB in, it is
    // certainly under way and certainly not done.
    proxy.hold_after_forwarding(256 * 1024);
    let replica = |id: &str, through_proxy: bool| -> Result<Vec<String>> {
        let mut args = if through_proxy {
            clusters.args()?
        } else {
            mirror_args(source, dest, "/app/")
        };
        // A TTL that outlasts the freeze: the leader still leads when the
        // SIGTERM arrives, and hands over by revoking its lease.
        args.extend(e2e::args(&["--instance-id", id, "--lock-ttl", "10s"]));
        if through_proxy {
            args.extend(e2e::args(&["--page-size", "200"]));
        }
        Ok(args)
    };
    let mut a = Syncer::start("a", &replica("replica-a", true)?).await?;
    wait_frozen_mid_full_sync(proxy, &a, "app").await?;
    let marker = dest
        .client()
        .await?
        .get(format!("{META_PREFIX}app/full-sync"), None)
        .await?;
    ensure!(
        marker.count() == 1,
        "the full-sync marker is on the destination"
    );

    let b = Syncer::start("b", &replica("replica-b", false)?).await?;
    eventually(WAIT, "standby queued", || async {
        Ok(lock_holders(dest, "app").await? == 2)
    })
    .await?;
    let stopped = Instant::now();
    a.signal(Signal::SIGTERM)?;
    eventually(WAIT, "the leader to take the SIGTERM", || async {
        Ok(a.count_log_messages("Shutting down.") == 1)
    })
    .await?;
    proxy.restore();
    eventually(WAIT, "standby leads", || async {
        Ok(b.metric("etcd_syncer_is_leader", &[("job", "app")]).await? == 1.0)
    })
    .await?;
    println!(
        "failover after SIGTERM during a full sync: {:.2} s",
        stopped.elapsed().as_secs_f64()
    );
    ensure!(
        a.wait_exit(WAIT).await?.success(),
        "SIGTERM exits 0 mid full sync"
    );
    wait_job_state(&b, "app", "watching").await?;
    converge(source, "/app/", dest, "/app/", WAIT).await?;
    ensure!(
        b.metric("etcd_syncer_slow_path_total", &[("job", "app")])
            .await?
            == 1.0,
        "the standby redoes the interrupted full sync"
    );
    ensure!(
        b.log_text().contains("was interrupted"),
        "the reason is logged"
    );
    let history = monotonic_checkpoint_history(dest, "app").await?;
    ensure!(
        history
            .last()
            .is_some_and(|(_, checkpoint)| checkpoint["instance"] == "replica-b"),
        "the standby wrote the final checkpoint: {:?}",
        history.last()
    );
    a.finish().await?;
    b.finish().await
}

/// Drill 4: the source link is cut (connections reset) for 10 s under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_short_outage_resumes_on_the_fast_path() -> Result<()> {
    let mirror = Mirror::start(MirrorOptions {
        proxy: Some(ProxySide::Source),
        ..MirrorOptions::loaded(500, 100)
    })
    .await?;
    let proxy = mirror.proxy.as_ref().context("proxy")?;

    let clients = vec![mirror.source.client().await?];
    let load = tokio::spawn(async move {
        let mut load = moderate_load("/app/");
        load.ops_per_writer = 600;
        load.run(&clients).await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.reset();
    let cut = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    proxy.restore();
    load.await??;
    mirror.converge().await?;
    println!(
        "short outage: converged {:.1} s after the cut ended",
        cut.elapsed().as_secs_f64() - 10.0
    );
    ensure!(mirror.errors("source_unavailable").await? >= 1.0);
    let (slow, fast) = mirror.paths().await?;
    ensure!(slow == 1.0, "only the initial full sync");
    ensure!(fast >= 1.0, "resumed from the checkpoint");
    mirror.finish().await
}

/// Drill 7: a half-open line (bytes held, no reset) for 2 minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_severed_line_while_streaming() -> Result<()> {
    let mirror = Mirror::start(MirrorOptions {
        proxy: Some(ProxySide::Source),
        ..MirrorOptions::loaded(200, 100)
    })
    .await?;
    let proxy = mirror.proxy.as_ref().context("proxy")?;

    proxy.hold();
    let held = Instant::now();
    let mut load = moderate_load("/app/");
    load.ops_per_writer = 100;
    load.run(&[mirror.source.client().await?]).await?;
    eventually(WAIT, "the stall to be noticed", || async {
        Ok(
            mirror.errors("watch_stalled").await? + mirror.errors("source_unavailable").await?
                >= 1.0,
        )
    })
    .await?;
    println!(
        "half-open link noticed after {:.1} s",
        held.elapsed().as_secs_f64()
    );
    let remaining = Duration::from_secs(120).saturating_sub(held.elapsed());
    tokio::time::sleep(remaining).await;
    proxy.restore();
    let restored = Instant::now();
    mirror.converge().await?;
    println!(
        "converged {:.1} s after the line came back",
        restored.elapsed().as_secs_f64()
    );
    ensure!(mirror.paths().await?.0 == 1.0, "no extra full sync");
    mirror.finish().await
}

/// Drill 8: 30 ms RTT and 1 MiB/s to the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_weak_network() -> Result<()> {
    let clusters = Clusters::start(MirrorOptions {
        proxy: Some(ProxySide::Dest),
        ..MirrorOptions::loaded(20_000, 100)
    })
    .await?;
    let proxy = clusters.proxy.as_ref().context("proxy")?;
    proxy.set_delay(Duration::from_millis(15));
    proxy.set_bandwidth(1024 * 1024);
    let started = Instant::now();
    let mirror = clusters.mirror().await?;
    println!(
        "weak network: full sync of 20,000 keys in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let load_started = Instant::now();
    let report = moderate_load("/app/")
        .run(&[mirror.source.client().await?])
        .await?;
    mirror.converge().await?;
    println!(
        "weak network: {} revisions in {:.1} s, destination caught up {:.2} s after the load ended",
        report.operations,
        report.elapsed.as_secs_f64(),
        (load_started.elapsed() - report.elapsed).as_secs_f64()
    );
    mirror.finish().await
}

/// Drill 10: the syncer is pointed at a fresh source cluster (a new cluster
/// id): it must not watch from a meaningless revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_source_replaced() -> Result<()> {
    let mut mirror = Mirror::start(MirrorOptions {
        name: "first".into(),
        load: Some(Preload {
            tag: "old".into(),
            ..Preload::keys(300, 50)
        }),
        ..MirrorOptions::default()
    })
    .await?;
    mirror.converge().await?;
    // Many revisions on the old source, so the new one starts far behind the checkpoint.
    let mut client = mirror.source.client().await?;
    for i in 0..50 {
        client
            .put(format!("/app/key-{i:06}"), format!("old-{i}"), None)
            .await?;
    }
    mirror.converge().await?;
    mirror.stop().await?;

    let new_source = EtcdCluster::start_source().await?;
    ensure!(new_source.cluster_id().await? != mirror.source.cluster_id().await?);
    put_many(&mut new_source.client().await?, "/app/", 280, 50, "new").await?;
    let args = mirror_args(&new_source, &mirror.dest, "/app/");
    mirror.start_again_with("second", &args).await?;
    converge(&new_source, "/app/", &mirror.dest, "/app/", WAIT).await?;
    ensure!(mirror.paths().await?.0 == 1.0);
    ensure!(
        mirror
            .syncer
            .log_text()
            .contains("the source cluster changed"),
        "the reason is logged"
    );
    mirror.finish().await
}

/// Drill 11: the destination runs out of quota, then gets more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_destination_quota_exceeded() -> Result<()> {
    let mut mirror = Mirror::start(MirrorOptions {
        dest: EtcdOptions {
            quota_backend_bytes: Some(4 * 1024 * 1024),
            ..EtcdOptions::default()
        },
        allow_errors: e2e::args(&["database space exceeded", "backend quota is full"]),
        ..MirrorOptions::loaded(10, 100)
    })
    .await?;
    let (source, dest) = (&mirror.source, &mirror.dest);

    let mut src = source.client().await?;
    let big = vec![b'q'; 200_000];
    for i in 0..40 {
        src.put(format!("/app/big-{i:03}"), big.clone(), None)
            .await?;
    }
    eventually(WAIT, "quota errors", || async {
        Ok(mirror.errors("dest_quota_exceeded").await? >= 1.0)
    })
    .await?;
    // Once the NOSPACE alarm reads back as raised (alarm requests go
    // through raft too), etcd's capped applier rejects every later txn that
    // puts anything, checkpoint included. So the checkpoint is read on the
    // destination itself: the syncer's own metric may still be catching up
    // with a txn that committed just before the alarm.
    eventually(WAIT, "the NOSPACE alarm", || async {
        let mut client = dest.client().await?;
        let alarms = client
            .alarm(
                etcd_client::AlarmAction::Get,
                etcd_client::AlarmType::None,
                None,
            )
            .await?;
        Ok(!alarms.alarms().is_empty())
    })
    .await?;
    let checkpoint_key = format!("{META_PREFIX}app/checkpoint");
    let read_checkpoint = || async {
        let mut client = dest.client().await?;
        let response = client.get(checkpoint_key.as_str(), None).await?;
        let kv = response.kvs().first().context("checkpoint")?;
        let value: serde_json::Value = serde_json::from_slice(kv.value())?;
        anyhow::Ok((
            kv.mod_revision(),
            value["last_synced_rev"]
                .as_i64()
                .context("last_synced_rev")?,
        ))
    };
    // A write after the alarm can never reach the destination (the big
    // puts before it may all have landed, in txns applied before the
    // backend's size caught up with them).
    src.put("/app/after-the-alarm", "x", None).await?;
    mirror.wait_state("no_space").await?;
    let (stuck_mod_revision, stuck_at) = read_checkpoint().await?;
    // A negative check: nothing can flake here, only a bug can show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        read_checkpoint().await? == (stuck_mod_revision, stuck_at),
        "the checkpoint does not advance while writes fail"
    );
    ensure!(
        stuck_at < source.revision().await?,
        "the checkpoint stays behind the source"
    );

    mirror.dest.raise_quota(256 * 1024 * 1024).await?;
    mirror.converge().await?;
    mirror.wait_state("watching").await?;
    println!(
        "quota drill: stuck at revision {stuck_at} until the quota was raised, then converged"
    );
    mirror.finish().await
}

/// Drill 13: A → B and B → C, mirroring the whole keyspace, each with its
/// own meta keys. C equals A and no meta key of the first hop leaks into C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_cascade() -> Result<()> {
    let a = EtcdCluster::start_source().await?;
    let b = EtcdCluster::start().await?;
    let c = EtcdCluster::start_dest().await?;
    put_many(&mut a.client().await?, "/svc/", 300, 50, "v1").await?;
    let mut first = mirror_args(&a, &b, "/");
    first.extend(e2e::args(&["--job-name", "a-to-b"]));
    let mut second = mirror_args(&b, &c, "/");
    second.extend(e2e::args(&["--job-name", "b-to-c"]));
    let hop1 = Syncer::start("a-to-b", &first).await?;
    let hop2 = Syncer::start("b-to-c", &second).await?;
    wait_job_state(&hop1, "a-to-b", "watching").await?;
    wait_job_state(&hop2, "b-to-c", "watching").await?;
    moderate_load("/svc/").run(&[a.client().await?]).await?;
    converge(&a, "/", &c, "/", WAIT).await?;
    let mut client = c.client().await?;
    let meta = client
        .get(
            META_PREFIX,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await?;
    let keys: Vec<String> = meta
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    ensure!(
        keys.iter()
            .all(|k| k.starts_with(&format!("{META_PREFIX}b-to-c/"))),
        "meta keys leaked into C: {keys:?}"
    );
    ensure!(keys.iter().any(|k| k.ends_with("b-to-c/checkpoint")));
    hop1.finish().await?;
    hop2.finish().await
}
