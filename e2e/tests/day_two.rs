//! Day-two operations without a restart: endpoint-group failover and
//! fail-back, and rotated TLS files. Each ends with exact equality and no
//! full sync beyond the first.

use std::time::Duration;

use anyhow::{ensure, Result};
use e2e::load::Load;
use e2e::proxy::LinkProxy;
use e2e::tls::TlsMaterial;
use e2e::*;

const WAIT: Duration = Duration::from_secs(120);

fn moderate_load(prefix: &str) -> Load {
    let mut load = Load::new(prefix, 4, 300);
    load.rate_per_writer = Some(50.0);
    load.keys_per_txn = 3;
    load.delete_every = Some(7);
    load
}

async fn active_group(syncer: &Syncer, group: &str, priority: &str) -> Result<bool> {
    Ok(syncer
        .metric(
            "etcd_syncer_endpoint_group_active",
            &[("side", "source"), ("group", group), ("priority", priority)],
        )
        .await?
        == 1.0)
}

/// The private line (preferred group) is cut under load: the syncer moves
/// to the public group after 3 failed checks, keeps mirroring, and comes
/// back once the line has been healthy for the fail-back period. No full
/// sync, exact equality.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_groups_fail_over_and_back_without_a_full_sync() -> Result<()> {
    let clusters = Clusters::start(MirrorOptions {
        name: "groups".into(),
        extra_args: e2e::args(&[
            "--endpoint-check-interval",
            "500ms",
            "--endpoint-failover-after",
            "3",
            "--endpoint-failback-after",
            "3s",
        ]),
        allow_errors: e2e::args(&["source_unavailable"]),
        ..MirrorOptions::loaded(500, 100)
    })
    .await?;
    let (private, private_url) = LinkProxy::in_front_of(&clusters.source.endpoints()[0]).await?;
    let (_public, public_url) = LinkProxy::in_front_of(&clusters.source.endpoints()[0]).await?;
    let args = with_endpoint_groups(
        clusters.args()?,
        "src",
        &[("private", &private_url), ("public", &public_url)],
    );
    let mirror = clusters.mirror_with(args).await?;
    let syncer = &mirror.syncer;
    ensure!(active_group(syncer, "private", "0").await?);

    let clients = vec![mirror.source.client().await?];
    let load = tokio::spawn(async move { moderate_load("/app/").run(&clients).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    private.reset();
    eventually(WAIT, "the public group in use", || async {
        active_group(syncer, "public", "1").await
    })
    .await?;
    let healthy_private = syncer
        .metric(
            "etcd_syncer_endpoint_group_healthy",
            &[("side", "source"), ("group", "private")],
        )
        .await?;
    ensure!(healthy_private == 0.0, "the cut line is reported unhealthy");
    // Mirroring goes on over the public group while the line is down.
    let applied = syncer
        .metric("etcd_syncer_events_applied_total", &[("job", "app")])
        .await?;
    eventually(WAIT, "events applied over the public group", || async {
        Ok(syncer
            .metric("etcd_syncer_events_applied_total", &[("job", "app")])
            .await?
            > applied)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    private.restore();
    eventually(WAIT, "back on the private line", || async {
        active_group(syncer, "private", "0").await
    })
    .await?;
    load.await??;
    mirror.converge().await?;

    let switches = |reason: &'static str| async move {
        syncer
            .metric(
                "etcd_syncer_endpoint_group_switches_total",
                &[("side", "source"), ("reason", reason)],
            )
            .await
    };
    // One switch each way (the failover's WARN line is not read: this
    // counter is what an alert reads).
    ensure!(switches("failover").await? == 1.0);
    ensure!(switches("failback").await? == 1.0);
    ensure_resumed_without_full_sync(syncer, "app").await?;
    mirror.finish().await
}

/// The destination's client certificate is replaced on disk (a rotated
/// Secret): the syncer reconnects with it within the file check interval,
/// reports the new expiry, and keeps mirroring from its checkpoint.
/// Files that do not load are not switched to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_client_certificates_are_used_without_a_restart() -> Result<()> {
    let tls = TlsMaterial::generate()?;
    let mirror = Mirror::start(MirrorOptions {
        name: "rotation".into(),
        dest: EtcdOptions {
            tls: Some(tls.clone()),
            ..EtcdOptions::default()
        },
        ..MirrorOptions::loaded(300, 100)
    })
    .await?;
    let (source, syncer) = (&mirror.source, &mirror.syncer);
    let file = tls.client_cert.display().to_string();
    let expiry = || async {
        syncer
            .metric(
                "etcd_syncer_tls_cert_expiry_timestamp_seconds",
                &[("side", "destination"), ("file", file.as_str())],
            )
            .await
    };
    let first = expiry().await?;
    ensure!(first > 1.0e9, "the first certificate's expiry: {first}");
    let refused = || async {
        syncer
            .metric(
                "etcd_syncer_file_changes_refused_total",
                &[("side", "destination"), ("reason", "invalid")],
            )
            .await
    };

    // Half-written files: kept out, the old connection stays.
    let refused_before = refused().await?;
    std::fs::write(&tls.client_cert, "-----BEGIN CERTIFICATE-----\n")?;
    eventually(WAIT, "the half-written files refused", || async {
        Ok(refused().await? > refused_before)
    })
    .await?;
    ensure!(
        expiry().await? == first,
        "still on the first certificate after the half-written files"
    );
    // (The test's own destination client reads the same files: the
    // syncer's progress is read off its metrics until they are whole.)
    let applied = syncer
        .metric("etcd_syncer_events_applied_total", &[("job", "app")])
        .await?;
    put_many(&mut source.client().await?, "/app/", 50, 100, "v2").await?;
    eventually(WAIT, "writes applied over the kept connection", || async {
        Ok(syncer
            .metric("etcd_syncer_events_applied_total", &[("job", "app")])
            .await?
            >= applied + 50.0)
    })
    .await?;

    // O5: a rotation to a pair that expired already: refused like files
    // that do not load (WARN naming "expired", counted), and replication
    // goes on over the connection in use.
    let refused_before = refused().await?;
    tls.rotate_client(2021)?;
    eventually(WAIT, "the expired pair refused", || async {
        Ok(refused().await? > refused_before
            && syncer
                .logs()
                .iter()
                .any(|l| l.contains("cannot be used") && l.contains("expired at")))
    })
    .await?;
    let applied = syncer
        .metric("etcd_syncer_events_applied_total", &[("job", "app")])
        .await?;
    put_many(&mut source.client().await?, "/app/", 50, 100, "v2b").await?;
    eventually(
        WAIT,
        "writes applied while the expired pair sits there",
        || async {
            Ok(syncer
                .metric("etcd_syncer_events_applied_total", &[("job", "app")])
                .await?
                >= applied + 50.0)
        },
    )
    .await?;
    ensure!(
        syncer
            .metric(
                "etcd_syncer_reconnects_total",
                &[("side", "destination"), ("reason", "files_changed")]
            )
            .await?
            == 0.0,
        "never reconnected with the expired pair"
    );

    // The rotated pair: valid until 2031-01-01T00:00:00Z.
    tls.rotate_client(2031)?;
    eventually(WAIT, "the new certificate's expiry", || async {
        Ok(expiry().await? == 1_924_992_000.0)
    })
    .await?;
    ensure!(
        syncer
            .metric(
                "etcd_syncer_reconnects_total",
                &[("side", "destination"), ("reason", "files_changed")]
            )
            .await?
            == 1.0
    );
    put_many(&mut source.client().await?, "/app/", 50, 100, "v3").await?;
    mirror.converge().await?;
    // The destination's connection changed under the leader's writes: its
    // source watch went on, so there was not even a resume.
    ensure!(
        syncer
            .metric("etcd_syncer_slow_path_total", &[("job", "app")])
            .await?
            == 1.0,
        "only the initial full sync"
    );
    mirror.finish().await
}

/// O5: starting with a client certificate that expired is a configuration
/// error naming the flag and "expired" (exit 2), as `--validate-config`
/// says before; a key that is not the certificate's is refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_or_mismatched_client_certificate_is_refused_at_start() -> Result<()> {
    let tls = TlsMaterial::generate()?;
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_with(EtcdOptions {
        role: Role::Dest,
        tls: Some(tls.clone()),
        ..EtcdOptions::default()
    })
    .await?;
    tls.rotate_client(2021)?;
    let args = mirror_args(&source, &dest, "/app/");
    let mut syncer = Syncer::spawn("expired", &args, &[])?;
    let status = syncer.wait_exit(Duration::from_secs(30)).await?;
    let text = syncer.log_text();
    ensure!(status.code() == Some(2), "exit {status}: {text}");
    ensure!(
        text.contains("--dst-cert") && text.contains("expired at"),
        "{text}"
    );

    let mut validate = args.clone();
    validate.push("--validate-config".into());
    let key = tls.client_key.display().to_string();
    tls.rotate_client(2031)?;
    let (code, output) = run_cli(&validate).await?;
    ensure!(code == 0, "a good pair validates: {output}");
    // The key of another pair beside this certificate.
    let other = TlsMaterial::generate()?;
    std::fs::copy(&other.client_key, &key)?;
    let (code, output) = run_cli(&validate).await?;
    ensure!(
        code == 2 && output.contains("--dst-key") && output.contains("does not match"),
        "exit {code}: {output}"
    );
    Ok(())
}

fn config_text(source: &EtcdCluster, dest: &EtcdCluster, jobs: &str) -> String {
    format!(
        "[source]\nendpoints = [{:?}]\n\n[destination]\nendpoints = [{:?}]\n\n{jobs}",
        source.endpoints()[0],
        dest.endpoints()[0]
    )
}

fn job(name: &str, extra: &str) -> String {
    format!("[[jobs]]\nname = \"{name}\"\nprefix = \"/{name}/\"\n{extra}\n")
}

/// SIGHUP and a changed config file reload the configuration in place:
/// a job added starts, a job removed stops (its lock key goes, its
/// checkpoint stays, its metrics go), a changed job resumes from its
/// checkpoint; an invalid file is refused and the running jobs go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_removes_and_changes_jobs_without_a_restart() -> Result<()> {
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    for prefix in ["/a/", "/b/", "/c/", "/d/"] {
        put_many(&mut source.client().await?, prefix, 100, 50, "v1").await?;
    }
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        config_text(&source, &dest, &(job("a", "") + &job("b", ""))),
    )?;
    let args = e2e::args(&[
        "mirror-plus",
        "--config",
        config.to_str().unwrap(),
        "--progress-interval",
        "1s",
        "--watch-idle-timeout",
        "10s",
    ]);
    let mut syncer = Syncer::start("reload", &args).await?;
    syncer.allow_error("Configuration reload refused");
    wait_job_state(&syncer, "a", "watching").await?;
    wait_job_state(&syncer, "b", "watching").await?;

    ensure!(
        count_prefix(&dest, "/-etcd-syncer-meta-/b/lock/").await? == 1,
        "b's lock key is there while it runs"
    );
    // a changes (a write-rate limit), b goes, c comes: on SIGHUP.
    std::fs::write(
        &config,
        config_text(
            &source,
            &dest,
            &(job("a", "max-write-ops-per-second = 5000") + &job("c", "")),
        ),
    )?;
    syncer.signal(nix::sys::signal::Signal::SIGHUP)?;
    wait_job_state(&syncer, "c", "watching").await?;
    converge(&source, "/c/", &dest, "/c/", WAIT).await?;
    eventually(WAIT, "job b's series removed", || async {
        Ok(!syncer.scrape().await?.contains("job=\"b\""))
    })
    .await?;
    ensure!(
        count_prefix(&dest, "/-etcd-syncer-meta-/b/lock/").await? == 0,
        "b's lock key deleted"
    );
    ensure!(
        count_prefix(&dest, "/-etcd-syncer-meta-/b/checkpoint").await? == 1,
        "b's checkpoint kept"
    );
    wait_job_state(&syncer, "a", "watching").await?;
    ensure_resumed_without_full_sync(&syncer, "a").await?;
    put_many(&mut source.client().await?, "/a/", 20, 50, "v2").await?;
    converge(&source, "/a/", &dest, "/a/", WAIT).await?;

    // An invalid file: refused, counted, the jobs go on.
    std::fs::write(&config, "jobs = 5\n")?;
    syncer.signal(nix::sys::signal::Signal::SIGHUP)?;
    eventually(WAIT, "the refused reload counted", || async {
        Ok(syncer
            .metric("etcd_syncer_config_reloads_total", &[("result", "error")])
            .await?
            >= 1.0)
    })
    .await?;
    ensure!(
        syncer
            .metric("etcd_syncer_config_reloads_total", &[("result", "error")])
            .await?
            == 1.0,
        "one refused reload"
    );
    put_many(&mut source.client().await?, "/c/", 20, 50, "v2").await?;
    converge(&source, "/c/", &dest, "/c/", WAIT).await?;

    // The file changes again (a ConfigMap update): no signal needed.
    std::fs::write(
        &config,
        config_text(
            &source,
            &dest,
            &(job("a", "max-write-ops-per-second = 5000") + &job("c", "") + &job("d", "")),
        ),
    )?;
    wait_job_state(&syncer, "d", "watching").await?;
    converge(&source, "/d/", &dest, "/d/", WAIT).await?;
    // Starting d left the running c as it was (not back to "starting").
    ensure!(
        syncer
            .metric(
                "etcd_syncer_job_state",
                &[("job", "c"), ("state", "watching")]
            )
            .await?
            == 1.0
    );
    ensure!(
        syncer
            .metric("etcd_syncer_config_reloads_total", &[("result", "ok")])
            .await?
            == 2.0
    );

    // So far only a resumed from its checkpoint (its restart with the new
    // settings); c and d run on from their first full sync.
    for (name, resumes) in [("a", 1.0), ("c", 0.0), ("d", 0.0)] {
        let fast = syncer
            .metric("etcd_syncer_fast_path_total", &[("job", name)])
            .await?;
        ensure!(
            fast == resumes,
            "job {name}: {resumes} resumes from its checkpoint expected, {fast} counted"
        );
    }

    // The source's endpoint changes (to a proxy in front of it): the source
    // is reconnected under the running jobs, none restarts.
    let (proxy, proxied) = LinkProxy::in_front_of(&source.endpoints()[0]).await?;
    let jobs = job("a", "max-write-ops-per-second = 5000") + &job("c", "") + &job("d", "");
    std::fs::write(
        &config,
        config_text(&source, &dest, &jobs).replacen(&source.endpoints()[0], &proxied, 1),
    )?;
    syncer.signal(nix::sys::signal::Signal::SIGHUP)?;
    eventually(WAIT, "requests through the new endpoint", || async {
        Ok(proxy.forwarded_to_server() > 0)
    })
    .await?;
    put_many(&mut source.client().await?, "/d/", 20, 50, "v3").await?;
    converge(&source, "/d/", &dest, "/d/", WAIT).await?;
    // No metric tells a job restarted by a reload from one whose watch the
    // reconnect interrupted (both resume from the checkpoint), so this
    // reads the log.
    ensure!(
        syncer.count_log_messages(
            "Job restarted with its new settings; it resumes from its checkpoint."
        ) == 1,
        "only a's restart, earlier"
    );
    for name in ["a", "c", "d"] {
        ensure!(
            syncer
                .metric("etcd_syncer_slow_path_total", &[("job", name)])
                .await?
                == 1.0,
            "job {name}: no full sync beyond its first"
        );
    }
    syncer.finish().await
}
