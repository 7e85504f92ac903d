//! The core replicator against real etcd: full sync, resume, compaction,
//! reset, prefix rewrite, meta exclusion, the mass-delete guard, TLS, auth,
//! large revisions and config errors.

use std::time::Duration;

use anyhow::{Context, Result};
use e2e::*;
use etcd_client::{DeleteOptions, GetOptions, Txn, TxnOp};

const CONVERGE: Duration = Duration::from_secs(60);

/// The first syncer ("first") on `keys` keys of `value_size` bytes, the
/// destination converged.
async fn first_run(keys: usize, value_size: usize) -> Result<Mirror> {
    let mirror = Mirror::start(MirrorOptions {
        name: "first".into(),
        ..MirrorOptions::loaded(keys, value_size)
    })
    .await?;
    mirror.converge().await?;
    Ok(mirror)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_copies_prunes_and_keeps_outside_keys() -> Result<()> {
    let clusters = Clusters::start(MirrorOptions {
        load: Some(Preload::keys(500, 100)),
        ..MirrorOptions::default()
    })
    .await?;
    let mut dst = clusters.dest.client().await?;
    // Stale and wrong keys under the prefix, and a key outside it.
    dst.put("/app/stale-1", "x", None).await?;
    dst.put("/app/key-000007", "wrong", None).await?;
    dst.put("/other/keep", "y", None).await?;

    let mirror = clusters.mirror().await?;
    let (source, dest, syncer) = (&mirror.source, &mirror.dest, &mirror.syncer);
    let mut src = source.client().await?;
    mirror.converge().await?;
    assert_eq!(mirror.paths().await?.0, 1.0);
    assert_eq!(
        syncer
            .metric(
                "etcd_syncer_full_sync_keys_total",
                &[("job", "app"), ("op", "put")]
            )
            .await?,
        500.0,
        "499 missing keys and one wrong value"
    );
    assert_eq!(
        syncer
            .metric(
                "etcd_syncer_full_sync_keys_total",
                &[("job", "app"), ("op", "delete")]
            )
            .await?,
        1.0
    );
    assert_eq!(
        dst.get("/other/keep", None).await?.kvs().len(),
        1,
        "keys outside the prefix are untouched"
    );
    let pinned = checkpoint_rev(dest, "app")
        .await?
        .context("checkpoint written")?;
    assert!(pinned >= source.revision().await? - 1);

    // Incremental: puts, a multi-key txn, a delete and a range delete.
    src.put("/app/new", "n", None).await?;
    src.txn(Txn::new().and_then(vec![
        TxnOp::put("/app/t1", "1", None),
        TxnOp::put("/app/t2", "2", None),
        TxnOp::delete("/app/key-000001", None),
    ]))
    .await?;
    src.delete("/app/key-0001", Some(DeleteOptions::new().with_prefix()))
        .await?;
    src.put("/elsewhere", "not mirrored", None).await?;
    mirror.converge().await?;
    assert_eq!(dst.get("/elsewhere", None).await?.kvs().len(), 0);
    eventually(CONVERGE, "checkpoint to reach the source head", || async {
        Ok(checkpoint_rev(dest, "app").await? >= Some(source.revision().await? - 1))
    })
    .await?;
    mirror.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_on_the_fast_path_without_copying() -> Result<()> {
    let mut mirror = first_run(300, 50).await?;
    let mut src = mirror.source.client().await?;
    // Changes while it is down are picked up from the watch history.
    mirror.stop().await?;
    src.put("/app/while-down", "1", None).await?;
    src.delete("/app/key-000003", None).await?;
    mirror.start_again("second", &[]).await?;
    mirror.converge().await?;
    assert_eq!(mirror.paths().await?, (0.0, 1.0), "(full syncs, resumes)");
    assert_eq!(
        mirror
            .job_metric("etcd_syncer_full_sync_keys_total")
            .await?,
        0.0,
        "nothing re-copied"
    );
    assert_eq!(
        mirror
            .job_metric("etcd_syncer_events_applied_total")
            .await?,
        2.0
    );
    mirror.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_during_downtime_forces_one_full_sync() -> Result<()> {
    let mut mirror = first_run(200, 50).await?;
    mirror.stop().await?;
    let mut src = mirror.source.client().await?;
    // Deletes and changes that the watch history will no longer hold.
    for i in 100..140 {
        src.delete(format!("/app/key-{i:06}"), None).await?;
    }
    put_many(&mut src, "/app/", 60, 50, "v2").await?;
    mirror.source.compact().await?;

    mirror.start_again("second", &[]).await?;
    mirror.converge().await?;
    assert_eq!(mirror.paths().await?.0, 1.0);
    assert_eq!(
        mirror
            .syncer
            .metric(
                "etcd_syncer_full_sync_keys_total",
                &[("job", "app"), ("op", "delete")]
            )
            .await?,
        40.0,
        "src miss keys are removed automatically"
    );
    assert!(mirror.errors("compacted").await? >= 1.0);
    mirror.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_last_synced_rev_repairs_a_diverged_destination() -> Result<()> {
    let mut mirror = first_run(100, 50).await?;
    mirror.stop().await?;
    let mut dst = mirror.dest.client().await?;
    dst.delete("/app/key-000010", None).await?;
    dst.put("/app/stray", "s", None).await?;
    dst.put("/app/key-000011", "tampered", None).await?;
    // A plain restart trusts the checkpoint: the divergence stays.
    mirror
        .start_again("second", &["--reset-last-synced-rev"])
        .await?;
    mirror.converge().await?;
    assert_eq!(mirror.paths().await?.0, 1.0);
    assert_eq!(
        dst.get(format!("{META_PREFIX}app/reset-request"), None)
            .await?
            .kvs()
            .len(),
        0,
        "the reset request is consumed"
    );
    mirror.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dest_prefix_rewrite_and_no_dest_prefix() -> Result<()> {
    let mirror = Mirror::start(MirrorOptions {
        name: "rewrite".into(),
        extra_args: args(&["--dest-prefix", "/copy/"]),
        ..MirrorOptions::loaded(50, 20)
    })
    .await?;
    mirror
        .source
        .client()
        .await?
        .put("/app/live", "1", None)
        .await?;
    // From /app/ to /copy/.
    mirror.converge().await?;
    let Mirror { source, syncer, .. } = mirror;
    syncer.finish().await?;

    // A fresh destination: stripping mirrors onto its whole keyspace.
    let dest = EtcdCluster::start_dest().await?;
    let mut strip = mirror_args(&source, &dest, "/app/");
    strip.extend(args(&["--no-dest-prefix", "--job-name", "stripped"]));
    let syncer = Syncer::start("strip", &strip).await?;
    wait_job_state(&syncer, "stripped", "watching").await?;
    let dst = dest.client().await?;
    eventually(CONVERGE, "stripped keys", || {
        let mut dst = dst.clone();
        async move {
            Ok(dst.get("live", None).await?.kvs().len() == 1
                && dst.get("key-000049", None).await?.kvs().len() == 1)
        }
    })
    .await?;
    syncer.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_prefix_is_never_copied_nor_pruned() -> Result<()> {
    let clusters = Clusters::start(MirrorOptions {
        prefix: "/".into(),
        ..MirrorOptions::default()
    })
    .await?;
    let mut src = clusters.source.client().await?;
    // The source is itself some other mirror's destination.
    src.put(format!("{META_PREFIX}upstream/checkpoint"), "theirs", None)
        .await?;
    src.put("/app/a", "1", None).await?;
    // Job "root".
    let mirror = clusters.mirror().await?;
    src.put(
        format!("{META_PREFIX}upstream/checkpoint"),
        "theirs-2",
        None,
    )
    .await?;
    src.put("/app/b", "2", None).await?;
    mirror.converge().await?;
    let mut dst = mirror.dest.client().await?;
    let meta = dst
        .get(META_PREFIX, Some(GetOptions::new().with_prefix()))
        .await?;
    let keys: Vec<String> = meta
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap_or("?").to_string())
        .collect();
    assert!(
        keys.iter().all(|k| !k.contains("upstream")),
        "source meta leaked: {keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.ends_with("root/checkpoint")),
        "own checkpoint kept: {keys:?}"
    );
    mirror.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mass_delete_guard_holds_until_overridden() -> Result<()> {
    let mut mirror = first_run(100, 20).await?;
    mirror.stop().await?;

    // The source prefix comes back empty and its history is gone.
    let mut src = mirror.source.client().await?;
    src.delete("/app/", Some(DeleteOptions::new().with_prefix()))
        .await?;
    src.put("/unrelated", "moves the revision past the delete", None)
        .await?;
    mirror.source.compact().await?;
    let mut guarded = Syncer::start("guarded", &mirror.args).await?;
    guarded.allow_error("mass-delete guard");
    eventually(CONVERGE, "prune guard to trip", || async {
        Ok(guarded
            .metric(
                "etcd_syncer_errors_total",
                &[("job", "app"), ("kind", "prune_guard")],
            )
            .await?
            >= 1.0)
    })
    .await?;
    assert_eq!(
        guarded
            .metric(
                "etcd_syncer_job_state",
                &[("job", "app"), ("state", "prune_guard")]
            )
            .await?,
        1.0
    );
    let mut dst = mirror.dest.client().await?;
    assert_eq!(
        read_prefix(&mut dst, "/app/").await?.len(),
        100,
        "nothing deleted"
    );
    assert!(
        guarded.log_text().contains("--max-prune-ratio"),
        "the error names the override flag"
    );
    guarded.finish().await?;

    mirror
        .start_again("overridden", &["--max-prune-ratio", "1"])
        .await?;
    mirror.converge().await?;
    assert_eq!(read_prefix(&mut dst, "/app/").await?.len(), 0);
    mirror.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_larger_than_one_txn_are_split_and_counted() -> Result<()> {
    let mirror = Mirror::start(MirrorOptions {
        source: EtcdOptions {
            max_txn_ops: Some(1000),
            ..EtcdOptions::default()
        },
        ..MirrorOptions::default()
    })
    .await?;
    let mut src = mirror.source.client().await?;
    let ops: Vec<TxnOp> = (0..300)
        .map(|i| TxnOp::put(format!("/app/big-{i:04}"), "x", None))
        .collect();
    src.txn(Txn::new().and_then(ops)).await?;
    // A value bigger than the default 1 MiB txn budget goes out on its own.
    src.put("/app/huge", vec![b'h'; 1_200_000], None).await?;
    mirror.converge().await?;
    assert_eq!(
        mirror
            .job_metric("etcd_syncer_split_revisions_total")
            .await?,
        1.0
    );
    mirror.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_on_both_sides() -> Result<()> {
    let tls = EtcdOptions {
        tls: Some(TlsMaterial::generate()?),
        ..EtcdOptions::default()
    };
    let mirror = Mirror::start(MirrorOptions {
        source: tls.clone(),
        dest: tls,
        ..MirrorOptions::loaded(100, 20)
    })
    .await?;
    mirror
        .source
        .client()
        .await?
        .put("/app/live", "1", None)
        .await?;
    mirror.converge().await?;
    // The source's default, auto, puts gzip under TLS on etcd 3.5.
    let mut version = mirror
        .source
        .version()
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    if (version.next().unwrap_or(0), version.next().unwrap_or(0)) >= (3, 5) {
        anyhow::ensure!(
            mirror
                .syncer
                .count_log_messages("source: gzip compression on (every member is etcd >= 3.5)")
                == 1,
            "gzip on over TLS"
        );
    }
    mirror.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_password_auth_and_a_wrong_password() -> Result<()> {
    let mut clusters = Clusters::start(MirrorOptions::default()).await?;
    clusters
        .source
        .enable_auth("syncer", "s3cret", "/app/")
        .await?;
    clusters
        .dest
        .enable_auth("syncer", "d3cret", "/app/")
        .await?;
    let mut src = clusters.source.client().await?;
    put_many(&mut src, "/app/", 50, 20, "v1").await?;
    let credentials = |src_password: &str| {
        args(&[
            "--src-user",
            "syncer",
            "--src-password",
            src_password,
            "--dst-user",
            "syncer",
            "--dst-password",
            "d3cret",
        ])
    };

    let mut wrong = clusters.args()?;
    wrong.extend(credentials("nope"));
    let mut rejected = Syncer::start("wrong-password", &wrong).await?;
    rejected.allow_error("Authentication failed");
    eventually(CONVERGE, "auth errors to be counted", || async {
        Ok(rejected
            .metric(
                "etcd_syncer_errors_total",
                &[("job", "app"), ("kind", "auth")],
            )
            .await?
            >= 2.0)
    })
    .await?;
    assert!(rejected.try_wait()?.is_none(), "stays up, retrying");
    assert_eq!(rejected.get("/readyz").await?.0, 503);
    assert!(
        rejected.log_text().contains("--src-user/--src-password"),
        "the error names the fix"
    );
    rejected.finish().await?;

    clusters.options.extra_args = credentials("s3cret");
    let mirror = clusters.mirror().await?;
    src.put("/app/live", "1", None).await?;
    mirror.converge().await?;
    eventually(CONVERGE, "ready", || async {
        Ok(mirror.syncer.get("/readyz").await?.0 == 200)
    })
    .await?;
    mirror.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_exit_2_naming_the_field() -> Result<()> {
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            args(&[
                "mirror-plus",
                "--dst-endpoints",
                "http://127.0.0.1:1",
                "--prefix",
                "/a/",
            ]),
            "--src-endpoints",
        ),
        (
            args(&[
                "mirror-plus",
                "--src-endpoints",
                "http://127.0.0.1:1",
                "--dst-endpoints",
                "http://127.0.0.1:2",
                "--prefix",
                "/a/",
                "--max-txn-ops",
                "0",
            ]),
            "--max-txn-ops",
        ),
        (
            args(&[
                "mirror-plus",
                "--src-endpoints",
                "http://127.0.0.1:1",
                "--dst-endpoints",
                "http://127.0.0.1:1",
                "--prefix",
                "/a/",
            ]),
            "same cluster",
        ),
        (
            args(&[
                "mirror-plus",
                "--src-endpoints",
                "https://127.0.0.1:1",
                "--src-cacert",
                "/nonexistent/ca.pem",
                "--dst-endpoints",
                "http://127.0.0.1:2",
                "--prefix",
                "/a/",
            ]),
            "--src-cacert",
        ),
        (
            args(&[
                "mirror-plus",
                "--src-endpoints",
                "http://127.0.0.1:1",
                "--dst-endpoints",
                "http://127.0.0.1:2",
                "--prefix",
                "/a/",
                "--dest-prefix",
                "/-etcd-syncer-meta-/x/",
            ]),
            "meta prefix",
        ),
    ];
    for (argv, field) in cases {
        let mut syncer = Syncer::spawn("config", &argv, &[])?;
        let status = syncer.wait_exit(Duration::from_secs(20)).await?;
        assert_eq!(status.code(), Some(2), "{argv:?} must exit 2");
        assert!(
            syncer.log_text().contains(field),
            "{argv:?}: error should name {field}:\n{}",
            syncer.log_text()
        );
    }
    // An unknown config field.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("syncer.toml");
    std::fs::write(
        &path,
        "[source]\nendpoints = [\"http://127.0.0.1:1\"]\nendpoitns = []\n",
    )?;
    let mut syncer = Syncer::spawn(
        "config",
        &args(&["mirror-plus", "--config", path.to_str().unwrap()]),
        &[],
    )?;
    assert_eq!(
        syncer.wait_exit(Duration::from_secs(20)).await?.code(),
        Some(2)
    );
    assert!(syncer.log_text().contains("endpoitns"));
    // The environment works like flags.
    let mut syncer = Syncer::spawn(
        "config",
        &args(&["mirror-plus"]),
        &[
            ("ETCD_SYNCER_SRC_ENDPOINTS", "http://127.0.0.1:1"),
            ("ETCD_SYNCER_DST_ENDPOINTS", "http://127.0.0.1:2"),
            ("ETCD_SYNCER_PREFIX", "/a/"),
            ("ETCD_SYNCER_MAX_PRUNE_RATIO", "7"),
        ],
    )?;
    assert_eq!(
        syncer.wait_exit(Duration::from_secs(20)).await?.code(),
        Some(2)
    );
    assert!(syncer.log_text().contains("--max-prune-ratio"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_destination_is_retried_and_not_ready() -> Result<()> {
    let mut clusters = Clusters::start(MirrorOptions {
        wait_watching: false,
        ..MirrorOptions::loaded(20, 20)
    })
    .await?;
    clusters.dest.kill();
    let mut mirror = clusters.mirror().await?;
    eventually(CONVERGE, "dest_unavailable errors", || async {
        Ok(mirror.errors("dest_unavailable").await? >= 1.0)
    })
    .await?;
    assert_eq!(mirror.syncer.get("/readyz").await?.0, 503);
    assert_eq!(
        mirror.syncer.get("/healthz").await?.0,
        200,
        "alive while retrying"
    );
    mirror.dest.restart().await?;
    mirror.wait_state("watching").await?;
    mirror.converge().await?;
    eventually(CONVERGE, "ready", || async {
        Ok(mirror.syncer.get("/readyz").await?.0 == 200)
    })
    .await?;
    mirror.finish().await
}

/// A value the destination refuses (larger than its request limit) stops
/// the job; every retry fails the same way. `etcd_syncer_lag_seconds` must
/// keep growing through the retries (it used to restart from zero with
/// each one, so the lag alert never fired), and the job reports an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_grows_while_the_destination_refuses_every_write() -> Result<()> {
    let mirror = Mirror::start(MirrorOptions {
        dest: EtcdOptions {
            extra_args: args(&["--max-request-bytes", "65536"]),
            ..EtcdOptions::default()
        },
        allow_errors: args(&["Replication failed; operator action needed."]),
        ..MirrorOptions::loaded(10, 10)
    })
    .await?;
    mirror
        .source
        .client()
        .await?
        .put("/app/huge", "x".repeat(200 * 1024), None)
        .await?;
    eventually(CONVERGE, "the job to fail on the refused value", || async {
        Ok(mirror
            .syncer
            .metric(
                "etcd_syncer_job_state",
                &[("job", "app"), ("state", "error")],
            )
            .await?
            == 1.0)
    })
    .await?;
    // Several retries later the lag still measures from the refused write.
    eventually(CONVERGE, "the lag to pass 15 s", || async {
        Ok(mirror.job_metric("etcd_syncer_lag_seconds").await? > 15.0)
    })
    .await?;
    mirror.finish().await
}
