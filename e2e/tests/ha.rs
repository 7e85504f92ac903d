//! Leader-locked replicas: takeover after kill -9 and SIGTERM, a frozen
//! leader fenced off, leadership spread over instances, promotion and status.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use e2e::load::Load;
use e2e::*;
use nix::sys::signal::Signal;

const WAIT: Duration = Duration::from_secs(90);

fn replica_flags(id: &str) -> Vec<String> {
    e2e::args(&[
        "--instance-id",
        id,
        "--lock-ttl",
        "2s",
        "--rebalance-interval",
        "3s",
    ])
}

fn replica_args(source: &EtcdCluster, dest: &EtcdCluster, id: &str) -> Vec<String> {
    let mut args = mirror_args(source, dest, "/app/");
    args.extend(replica_flags(id));
    args
}

/// Replica A ("replica-a") leading on `keys` keys of 50 bytes, and B
/// ("replica-b") queued behind it as the standby.
async fn leader_and_standby(keys: usize) -> Result<(Mirror, Syncer)> {
    let mirror = Mirror::start(MirrorOptions {
        name: "a".into(),
        extra_args: replica_flags("replica-a"),
        wait_watching: false,
        ..MirrorOptions::loaded(keys, 50)
    })
    .await?;
    wait_leader(&[&mirror.syncer], "app").await?;
    let b = Syncer::start(
        "b",
        &replica_args(&mirror.source, &mirror.dest, "replica-b"),
    )
    .await?;
    eventually(WAIT, "both queued", || async {
        Ok(lock_holders(&mirror.dest, "app").await? == 2)
    })
    .await?;
    Ok((mirror, b))
}

/// One replica ("replica-a") on `keys` keys of 20 bytes, leading, the
/// destination converged.
async fn one_replica(keys: usize) -> Result<Mirror> {
    let mirror = Mirror::start(MirrorOptions {
        extra_args: replica_flags("replica-a"),
        ..MirrorOptions::loaded(keys, 20)
    })
    .await?;
    wait_leader(&[&mirror.syncer], "app").await?;
    mirror.converge().await?;
    Ok(mirror)
}

async fn is_leader(syncer: &Syncer, job: &str) -> Result<bool> {
    Ok(syncer
        .metric("etcd_syncer_is_leader", &[("job", job)])
        .await?
        == 1.0)
}

async fn wait_leader<'a>(candidates: &'a [&'a Syncer], job: &str) -> Result<&'a Syncer> {
    let deadline = Instant::now() + WAIT;
    loop {
        for syncer in candidates {
            if is_leader(syncer, job).await.unwrap_or(false) {
                return Ok(syncer);
            }
        }
        ensure!(Instant::now() < deadline, "no leader for {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn slow_load() -> Load {
    let mut load = Load::new("/app/", 4, 150);
    load.rate_per_writer = Some(40.0);
    load.keys_per_txn = 2;
    load.delete_every = Some(9);
    load
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_under_load_fails_over_on_the_fast_path() -> Result<()> {
    let (mirror, b) = leader_and_standby(200).await?;
    let Mirror {
        source,
        dest,
        syncer: mut a,
        ..
    } = mirror;
    ensure!(!is_leader(&b, "app").await?, "the standby waits");

    let clients = vec![source.client().await?];
    let load = tokio::spawn(async move { slow_load().run(&clients).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.kill9()?;
    let killed = Instant::now();
    wait_leader(&[&b], "app").await?;
    println!(
        "takeover after kill -9: {:.2} s (lock TTL 2 s)",
        killed.elapsed().as_secs_f64()
    );
    load.await??;
    converge(&source, "/app/", &dest, "/app/", WAIT).await?;
    ensure!(
        b.metric("etcd_syncer_fast_path_total", &[("job", "app")])
            .await?
            == 1.0,
        "the new leader resumed from the checkpoint"
    );
    ensure!(
        b.metric("etcd_syncer_slow_path_total", &[("job", "app")])
            .await?
            == 0.0,
        "no full sync on takeover"
    );
    b.finish().await
}

/// The leader's destination link freezes by itself a fixed volume into the
/// full sync, so the kill lands mid full sync however fast the machine is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_during_a_full_sync() -> Result<()> {
    let clusters = Clusters::start(MirrorOptions {
        proxy: Some(ProxySide::Dest),
        ..MirrorOptions::loaded(20_000, 50)
    })
    .await?;
    let (source, dest) = (&clusters.source, &clusters.dest);
    let proxy = clusters.proxy.as_ref().context("proxy")?;
    // Over 1.3 MB of puts in all: a quarter MiB in, the full sync is
    // certainly under way and certainly not done.
    proxy.hold_after_forwarding(256 * 1024);
    // Through the proxy. Its lease outlives the freeze, so it is still the
    // leader when killed.
    let mut args = clusters.args()?;
    args.extend(e2e::args(&[
        "--instance-id",
        "replica-a",
        "--lock-ttl",
        "5s",
        "--rebalance-interval",
        "5s",
        "--page-size",
        "200",
    ]));
    let mut a = Syncer::start("a", &args).await?;
    wait_frozen_mid_full_sync(proxy, &a, "app").await?;
    let b = Syncer::start("b", &replica_args(source, dest, "replica-b")).await?;
    eventually(WAIT, "both queued", || async {
        Ok(lock_holders(dest, "app").await? == 2)
    })
    .await?;
    a.kill9()?;
    wait_leader(&[&b], "app").await?;
    // Whatever the dead leader left in the line arrives late: fenced.
    proxy.restore();
    converge(source, "/app/", dest, "/app/", WAIT).await?;
    ensure!(
        b.metric("etcd_syncer_slow_path_total", &[("job", "app")])
            .await?
            == 1.0,
        "the interrupted full sync is redone"
    );
    ensure!(
        b.log_text().contains("was interrupted"),
        "the reason is logged"
    );
    monotonic_checkpoint_history(dest, "app").await?;
    b.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_fenced_and_never_rolls_back() -> Result<()> {
    let (mirror, b) = leader_and_standby(100).await?;
    let Mirror {
        source,
        dest,
        syncer: mut a,
        ..
    } = mirror;

    let clients = vec![source.client().await?];
    let load = tokio::spawn(async move { slow_load().run(&clients).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.signal(Signal::SIGSTOP)?;
    wait_leader(&[&b], "app").await?;
    // Three lock TTLs frozen while the source keeps changing.
    tokio::time::sleep(Duration::from_secs(6)).await;
    a.signal(Signal::SIGCONT)?;
    a.allow_error("Lost the job lock");
    load.await??;
    converge(&source, "/app/", &dest, "/app/", WAIT).await?;
    eventually(WAIT, "the old leader to step down", || async {
        Ok(a.metric(
            "etcd_syncer_errors_total",
            &[("job", "app"), ("kind", "lease_lost")],
        )
        .await?
            >= 1.0
            || a.metric(
                "etcd_syncer_errors_total",
                &[("job", "app"), ("kind", "fenced")],
            )
            .await?
                >= 1.0)
    })
    .await?;
    ensure!(is_leader(&b, "app").await?, "the new leader keeps the job");
    ensure!(
        !is_leader(&a, "app").await?,
        "the old leader does not come back"
    );

    monotonic_checkpoint_history(&dest, "app").await?;
    // More writes after the thaw still land once, from the leader only.
    source
        .client()
        .await?
        .put("/app/after-thaw", "1", None)
        .await?;
    converge(&source, "/app/", &dest, "/app/", WAIT).await?;
    a.finish().await?;
    b.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_over_without_waiting_for_the_ttl() -> Result<()> {
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    put_many(&mut source.client().await?, "/app/", 50, 50, "v1").await?;
    // A long TTL: waiting it out would be obvious.
    let long_ttl = |id: &str| {
        let mut args = mirror_args(&source, &dest, "/app/");
        args.extend(e2e::args(&[
            "--instance-id",
            id,
            "--lock-ttl",
            "30s",
            "--rebalance-interval",
            "60s",
        ]));
        args
    };
    let mut a = Syncer::start("a", &long_ttl("replica-a")).await?;
    wait_leader(&[&a], "app").await?;
    let b = Syncer::start("b", &long_ttl("replica-b")).await?;
    eventually(WAIT, "both queued", || async {
        Ok(lock_holders(&dest, "app").await? == 2)
    })
    .await?;
    let stopped = Instant::now();
    ensure!(a.stop().await?.success());
    // The lease was revoked on the way out: its lock is gone at once, not after 30 s.
    ensure!(
        lock_holders(&dest, "app").await? == 1,
        "the leader's lock was released on SIGTERM"
    );
    wait_leader(&[&b], "app").await?;
    println!(
        "handover after SIGTERM: {:.2} s (lock TTL 30 s)",
        stopped.elapsed().as_secs_f64()
    );
    source.client().await?.put("/app/after", "1", None).await?;
    converge(&source, "/app/", &dest, "/app/", WAIT).await?;
    a.finish().await?;
    b.finish().await
}

/// A standby waits in the lock queue for as long as the leader lives; its
/// /healthz must stay green meanwhile, or Kubernetes restarts it in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_standby_stays_healthy() -> Result<()> {
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let mut leader_args = replica_args(&source, &dest, "replica-a");
    leader_args.extend(e2e::args(&["--liveness-timeout", "5s"]));
    let a = Syncer::start("a", &leader_args).await?;
    wait_leader(&[&a], "app").await?;
    let mut standby_args = replica_args(&source, &dest, "replica-b");
    standby_args.extend(e2e::args(&["--liveness-timeout", "5s"]));
    let b = Syncer::start("b", &standby_args).await?;
    eventually(WAIT, "both queued", || async {
        Ok(lock_holders(&dest, "app").await? == 2)
    })
    .await?;
    // Twice the liveness timeout with nothing to replicate.
    tokio::time::sleep(Duration::from_secs(10)).await;
    ensure!(!is_leader(&b, "app").await?, "b is still the standby");
    ensure!(b.get("/healthz").await?.0 == 200, "the standby is healthy");
    ensure!(
        a.get("/healthz").await?.0 == 200,
        "the idle leader is healthy"
    );
    a.finish().await?;
    b.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_spreads_over_instances() -> Result<()> {
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let mut src = source.client().await?;
    for job in ["a", "b", "c"] {
        put_many(&mut src, &format!("/{job}/"), 20, 20, "v1").await?;
    }
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("syncer.toml");
    std::fs::write(
        &config,
        format!(
            "lock-ttl = \"2s\"\nrebalance-interval = \"3s\"\n[source]\nendpoints = [\"{}\"]\n[destination]\nendpoints = [\"{}\"]\n\
             [[jobs]]\nprefix = \"/a/\"\n[[jobs]]\nprefix = \"/b/\"\n[[jobs]]\nprefix = \"/c/\"\n",
            source.endpoints_arg(),
            dest.endpoints_arg()
        ),
    )?;
    let config_args = |id: &str| {
        e2e::args(&[
            "mirror-plus",
            "--config",
            config.to_str().unwrap_or_default(),
            "--instance-id",
            id,
        ])
    };
    let first = Syncer::start("first", &config_args("first")).await?;
    eventually(WAIT, "first leads all three", || async {
        Ok(first.metric("etcd_syncer_is_leader", &[]).await? == 3.0)
    })
    .await?;
    let second = Syncer::start("second", &config_args("second")).await?;
    eventually(WAIT, "both instances lead a job", || async {
        let a = first.metric("etcd_syncer_is_leader", &[]).await?;
        let b = second.metric("etcd_syncer_is_leader", &[]).await?;
        Ok(a >= 1.0 && b >= 1.0 && a + b == 3.0)
    })
    .await?;
    for job in ["a", "b", "c"] {
        src.put(format!("/{job}/later"), "1", None).await?;
        converge(
            &source,
            &format!("/{job}/"),
            &dest,
            &format!("/{job}/"),
            WAIT,
        )
        .await?;
    }
    first.finish().await?;
    second.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_stops_replication_and_undo_resumes_it() -> Result<()> {
    let mut mirror = one_replica(50).await?;
    let (source, dest) = (&mirror.source, &mirror.dest);
    let mut src = source.client().await?;

    // Planned switchover: wait for the checkpoint to reach the source head.
    let (code, output) = run_cli(&e2e::args(&[
        "promote",
        "--dst-endpoints",
        &dest.endpoints_arg(),
        "--src-endpoints",
        &source.endpoints_arg(),
        "--job-name",
        "app",
        "--wait-for-sync",
        "--wait-timeout",
        "60s",
    ]))
    .await?;
    ensure!(code == 0, "promote failed: {output}");
    ensure!(
        output.contains("job app: promoted; final checkpoint revision"),
        "{output}"
    );
    eventually(WAIT, "replicator to notice", || async {
        Ok(mirror
            .syncer
            .metric(
                "etcd_syncer_job_state",
                &[("job", "app"), ("state", "promoted")],
            )
            .await?
            == 1.0)
    })
    .await?;
    let dest_revision = dest.revision().await?;
    src.put("/app/after-promotion", "1", None).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut dst = dest.client().await?;
    ensure!(
        dst.get("/app/after-promotion", None)
            .await?
            .kvs()
            .is_empty(),
        "a source write after promotion must not arrive"
    );
    ensure!(
        dest.revision().await? == dest_revision,
        "no replicator wrote anything"
    );
    ensure!(
        mirror.syncer.try_wait()?.is_none(),
        "the replicator stays up, not crash-looping"
    );
    ensure!(
        mirror.errors("promoted").await? == 1.0,
        "the promotion stopped the job once, not in a retry loop"
    );
    let (_, status) = mirror.syncer.get("/status").await?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    ensure!(
        status[0]["job"] == "app"
            && status[0]["state"] == "promoted"
            && status[0]["destination"]["promoted"] == true,
        "/status shows the job promoted: {status}"
    );

    let (code, output) = run_cli(&e2e::args(&[
        "promote",
        "--dst-endpoints",
        &dest.endpoints_arg(),
        "--job-name",
        "app",
        "--undo",
    ]))
    .await?;
    ensure!(code == 0 && output.contains("promotion undone"), "{output}");
    mirror.converge().await?;
    mirror.syncer.allow_error("never");
    mirror.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_in_text_and_json() -> Result<()> {
    let mirror = one_replica(30).await?;
    let (source, dest) = (&mirror.source, &mirror.dest);
    let base = e2e::args(&[
        "status",
        "--dst-endpoints",
        &dest.endpoints_arg(),
        "--src-endpoints",
        &source.endpoints_arg(),
    ]);

    let mut json_args = base.clone();
    json_args.extend(e2e::args(&["--output", "json", "--job-name", "app"]));
    let (code, output) = run_cli(&json_args).await?;
    ensure!(code == 0, "{output}");
    let statuses: serde_json::Value = serde_json::from_str(&output)?;
    let status = &statuses[0];
    ensure!(
        status["job"] == "app" && status["leader"] == "replica-a",
        "{status}"
    );
    ensure!(status["full_sync_in_progress"] == false && status["promoted"] == false);
    ensure!(
        status["last_synced_revision"].as_i64().is_some()
            && status["source_revision"].as_i64().is_some()
    );
    ensure!(status["lag_revisions"].as_i64().context("lag")? >= 0);
    ensure!(
        status["source_cluster_id"].as_str()
            == Some(format!("{:x}", source.cluster_id().await?).as_str())
    );

    let (code, output) = run_cli(&base).await?;
    ensure!(code == 0, "{output}");
    ensure!(
        output.contains("LEADER") && output.contains("replica-a") && output.contains("replicating"),
        "{output}"
    );

    let (code, output) = run_cli(&e2e::args(&[
        "status",
        "--dst-endpoints",
        &dest.endpoints_arg(),
        "--job-name",
        "nope",
    ]))
    .await?;
    ensure!(code == 2 && output.contains("known jobs: app"), "{output}");
    mirror.finish().await
}
