//! Operator paths beyond the drills (issue 24): what an operator does to a
//! running mirror (changes a prefix, misconfigures a fallback group,
//! reloads a destination, rotates to a bad certificate, promotes to a
//! point, fails back with a bad file) and what the standby must hold after.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use e2e::*;

const WAIT: Duration = Duration::from_secs(120);

fn config_text(source: &EtcdCluster, dest: &EtcdCluster, extra: &str, jobs: &str) -> String {
    format!(
        "{extra}\n[source]\nendpoints = [{:?}]\n\n[destination]\nendpoints = [{:?}]\n\n{jobs}",
        source.endpoints()[0],
        dest.endpoints()[0]
    )
}

fn job(name: &str, prefix: &str, dest_prefix: &str) -> String {
    format!("[[jobs]]\nname = \"{name}\"\nprefix = \"{prefix}\"\ndest-prefix = \"{dest_prefix}\"\n")
}

/// Puts `<prefix>k01..k<count>` with values `<tag>-NN`.
async fn put_tagged(source: &EtcdCluster, prefix: &str, count: usize, tag: &str) -> Result<()> {
    let mut client = source.client().await?;
    for i in 1..=count {
        client
            .put(format!("{prefix}k{i:02}"), format!("{tag}-{i:02}"), None)
            .await?;
    }
    Ok(())
}

/// The first of `messages` the syncer logs (in log order), waiting for one.
async fn first_of(syncer: &Syncer, messages: &[&str]) -> Result<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for line in syncer.logs() {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let message = value.get("message").and_then(|m| m.as_str()).unwrap_or("");
            if messages.contains(&message) {
                return Ok(line);
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("none of {messages:?} logged:\n{}", syncer.log_text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const RESUMED: &str = "Resuming from the checkpoint.";
const SLOW_PATH: &str = "Taking the slow path.";

/// O1: the job's `--prefix` changes across a restart, then its
/// `--dest-prefix` on a SIGHUP. Each time the checkpoint describes another
/// prefix's copy: a full sync whose reason names the change (never the
/// fast path, never "a rebuilt source"), and the copies a changed
/// destination prefix leaves are named in the log and by `status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_prefix_takes_a_full_sync_that_names_it() -> Result<()> {
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    put_tagged(&source, "/app/a/", 20, "a").await?;
    put_tagged(&source, "/app/b/", 20, "b").await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    let write_config = |prefix: &str, dest_prefix: &str| {
        std::fs::write(
            &config,
            config_text(&source, &dest, "", &job("app", prefix, dest_prefix)),
        )
    };
    let args = e2e::args(&[
        "mirror-plus",
        "--config",
        config.to_str().unwrap(),
        "--progress-interval",
        "1s",
    ]);
    write_config("/app/a/", "/copy/")?;
    let first = Syncer::start("o1-first", &args).await?;
    wait_job_state(&first, "app", "watching").await?;
    converge(&source, "/app/a/", &dest, "/copy/", WAIT).await?;
    first.finish().await?;

    // A restart with another --prefix.
    write_config("/app/b/", "/copy/")?;
    let second = Syncer::start("o1-second", &args).await?;
    let line = first_of(&second, &[RESUMED, SLOW_PATH]).await?;
    ensure!(
        line.contains(SLOW_PATH) && line.contains("--prefix /app/a/ -> /app/b/"),
        "a changed prefix must take the slow path naming it, got: {line}"
    );
    ensure!(
        !line.contains("rebuilt"),
        "the reason blames a rebuilt source: {line}"
    );
    converge(&source, "/app/b/", &dest, "/copy/", WAIT).await?;

    // A reload with another --dest-prefix.
    let logged_before = second.logs().len();
    write_config("/app/b/", "/copy2/")?;
    second.signal(nix::sys::signal::Signal::SIGHUP)?;
    eventually(
        WAIT,
        "the job restarted on the new destination prefix",
        || async {
            Ok(second.logs()[logged_before..]
                .iter()
                .any(|l| l.contains(SLOW_PATH) && l.contains("--dest-prefix /copy/ -> /copy2/")))
        },
    )
    .await?;
    converge(&source, "/app/b/", &dest, "/copy2/", WAIT).await?;
    ensure!(
        second.logs()[logged_before..].iter().any(
            |l| l.contains("--dest-prefix changed: the copies under the old prefix stay there")
        ),
        "the copies left under /copy/ are named in the log"
    );
    let (code, out) = run_cli(&e2e::args(&[
        "status",
        "--dst-endpoints",
        &dest.endpoints_arg(),
    ]))
    .await?;
    ensure!(code == 0, "status: {out}");
    ensure!(
        out.contains("left behind: /copy/ holds 20 keys mirrored from /app/b/"),
        "status names the copies left behind:\n{out}"
    );
    second.finish().await
}

/// O2: the source's preferred group is a private line to cluster A; the
/// fallback group was misconfigured to point at cluster B. With the line
/// cut at start, the fallback is matched against the checkpoint's cluster
/// and never used: nothing of B reaches the standby, and once the line is
/// back the job resumes from its checkpoint (no full sync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_group_on_another_cluster_is_never_used_at_start() -> Result<()> {
    let clusters = Clusters::start(MirrorOptions {
        name: "o2-first".into(),
        proxy: Some(ProxySide::Source),
        extra_args: e2e::args(&[
            "--endpoint-check-interval",
            "300ms",
            "--endpoint-failover-after",
            "2",
        ]),
        allow_errors: e2e::args(&["another cluster"]),
        ..MirrorOptions::default()
    })
    .await?;
    let other = EtcdCluster::start_source().await?;
    ensure!(clusters.source.cluster_id().await? != other.cluster_id().await?);
    put_tagged(&clusters.source, "/app/", 20, "a").await?;
    put_tagged(&other, "/app/", 30, "b").await?;
    // The proxied source endpoint is the private line; the fallback is B.
    let private_url = clusters.proxied.clone().context("proxied")?;
    let args = with_endpoint_groups(
        clusters.args()?,
        "src",
        &[("private", &private_url), ("public", &other.endpoints()[0])],
    );
    let mut mirror = clusters.mirror_with(args.clone()).await?;
    mirror.converge().await?;
    mirror.stop().await?;

    let private = mirror.proxy.as_ref().context("proxy")?;
    private.reset();
    let mut second = Syncer::start("o2-second", &args).await?;
    second.allow_error("another cluster");
    second.allow_error("source_unavailable");
    let (source, dest) = (&mirror.source, &mirror.dest);
    // The series must be there (an absent one reads as 0): the fallback
    // answers, so only its cluster id can make it unhealthy.
    eventually(
        WAIT,
        "the fallback group refused as another cluster",
        || async {
            Ok(second.scrape().await?.lines().any(|line| {
                line.starts_with("etcd_syncer_endpoint_group_healthy{")
                    && line.contains("side=\"source\"")
                    && line.contains("group=\"public\"")
                    && line.ends_with("} 0")
            }))
        },
    )
    .await?;
    // Well past the failover threshold: still nothing of B copied.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let diff = compare(source, "/app/", dest, "/app/").await?;
    ensure!(
        diff.is_equal(),
        "the standby changed while the line was cut: {diff:?}"
    );
    ensure!(
        second
            .metric("etcd_syncer_slow_path_total", &[("job", "app")])
            .await?
            == 0.0,
        "no full sync from the other cluster"
    );

    private.restore();
    put_tagged(source, "/app/new/", 5, "a2").await?;
    mirror.converge().await?;
    ensure!(
        second
            .metric("etcd_syncer_slow_path_total", &[("job", "app")])
            .await?
            == 0.0
    );
    ensure!(
        second
            .metric("etcd_syncer_fast_path_total", &[("job", "app")])
            .await?
            >= 1.0
    );
    second.finish().await
}

/// O7: `meta-prefix` changes on a reload. The job restarts under the new
/// prefix and its lock under the old one goes with the old job (not
/// looked for under the new prefix): `status` on the old prefix no
/// longer says "replicating", and the standby stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meta_prefix_reload_releases_the_old_lock() -> Result<()> {
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    put_tagged(&source, "/app/", 20, "a").await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    let write_config = |meta: &str| {
        std::fs::write(
            &config,
            config_text(
                &source,
                &dest,
                &format!("meta-prefix = \"{meta}\""),
                &job("app", "/app/", "/app/"),
            ),
        )
    };
    write_config("/-m1-/")?;
    let args = e2e::args(&[
        "mirror-plus",
        "--config",
        config.to_str().unwrap(),
        "--progress-interval",
        "1s",
    ]);
    let syncer = Syncer::start("o7", &args).await?;
    wait_job_state(&syncer, "app", "watching").await?;
    converge(&source, "/app/", &dest, "/app/", WAIT).await?;
    ensure!(count_prefix(&dest, "/-m1-/app/lock/").await? == 1);

    write_config("/-m2-/")?;
    syncer.signal(nix::sys::signal::Signal::SIGHUP)?;
    eventually(
        WAIT,
        "the job leading under the new meta prefix",
        || async {
            Ok(count_prefix(&dest, "/-m2-/app/lock/").await? == 1
                && count_prefix(&dest, "/-m2-/app/checkpoint").await? == 1)
        },
    )
    .await?;
    eventually(
        Duration::from_secs(30),
        "the lock under the old meta prefix released",
        || async { Ok(count_prefix(&dest, "/-m1-/app/lock/").await? == 0) },
    )
    .await?;
    let (code, out) = run_cli(&e2e::args(&[
        "status",
        "--dst-endpoints",
        &dest.endpoints_arg(),
        "--meta-prefix",
        "/-m1-/",
    ]))
    .await?;
    ensure!(
        code == 0 && !out.contains("replicating") && out.contains("no leader"),
        "status on the old prefix:\n{out}"
    );
    put_tagged(&source, "/app/more/", 5, "b").await?;
    converge(&source, "/app/", &dest, "/app/", WAIT).await?;
    syncer.finish().await
}

/// O4: a reload points `[destination]` at another live cluster. The jobs'
/// sessions, locks, leases and checkpoints live on the destination in use:
/// the reload is refused (ERROR naming both cluster ids, counted), nothing
/// is written to the other cluster, and replication goes on where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_another_destination_cluster_is_refused() -> Result<()> {
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let other = EtcdCluster::start_dest().await?;
    put_tagged(&source, "/app/", 20, "a").await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        config_text(&source, &dest, "", &job("app", "/app/", "/app/")),
    )?;
    let args = e2e::args(&[
        "mirror-plus",
        "--config",
        config.to_str().unwrap(),
        "--progress-interval",
        "1s",
    ]);
    let mut syncer = Syncer::start("o4", &args).await?;
    syncer.allow_error("Configuration reload refused");
    wait_job_state(&syncer, "app", "watching").await?;
    converge(&source, "/app/", &dest, "/app/", WAIT).await?;

    std::fs::write(
        &config,
        config_text(&source, &other, "", &job("app", "/app/", "/app/")),
    )?;
    syncer.signal(nix::sys::signal::Signal::SIGHUP)?;
    eventually(WAIT, "the reload refused", || async {
        Ok(syncer
            .metric("etcd_syncer_config_reloads_total", &[("result", "error")])
            .await?
            >= 1.0)
    })
    .await?;
    eventually(WAIT, "the refusal logged", || async {
        Ok(syncer.logs().iter().any(|l| {
            l.contains("Configuration reload refused: [destination] must stay the same cluster")
                && l.contains("another cluster")
        }))
    })
    .await?;
    put_tagged(&source, "/app/more/", 10, "b").await?;
    converge(&source, "/app/", &dest, "/app/", WAIT).await?;
    ensure!(
        count_prefix(&other, "/").await? == 0,
        "the other cluster was written to"
    );
    ensure!(
        syncer
            .metric("etcd_syncer_slow_path_total", &[("job", "app")])
            .await?
            == 1.0
    );
    syncer.finish().await
}

/// A loopback address nothing listens on (bound, then released).
fn dead_endpoint() -> Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    drop(listener);
    Ok(format!("http://127.0.0.1:{port}"))
}

/// O9: what an operator trips on. `check` with an unknown job names the
/// jobs there are; every command exits 2 when a cluster does not answer
/// (one exit-code policy: `check`'s 1 means differences).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_jobs_are_named_and_unreachable_clusters_exit_2_everywhere() -> Result<()> {
    let clusters = Clusters::start(MirrorOptions {
        name: "o9".into(),
        ..MirrorOptions::default()
    })
    .await?;
    put_tagged(&clusters.source, "/app/", 10, "a").await?;
    let Mirror {
        source,
        dest,
        syncer,
        ..
    } = clusters.mirror().await?;
    syncer.finish().await?;

    let (code, output) = run_cli(&check_args(
        &source,
        &dest,
        &["--prefix", "/app/", "--job-name", "nope"],
    ))
    .await?;
    ensure!(code == 2, "exit {code}: {output}");
    ensure!(
        output.contains("no job named \"nope\"") && output.contains("known jobs: app"),
        "the known jobs are named: {output}"
    );
    ensure!(!output.contains("first full sync not finished"), "{output}");

    let dead = dead_endpoint()?;
    let timeout = ["--request-timeout", "2s"];
    let commands: [Vec<&str>; 3] = [
        vec!["status", "--dst-endpoints", &dead],
        vec!["promote", "--dst-endpoints", &dead, "--job-name", "app"],
        vec![
            "check",
            "--src-endpoints",
            &dead,
            "--dst-endpoints",
            &dead,
            "--prefix",
            "/app/",
        ],
    ];
    for command in commands {
        let mut argv = e2e::args(&command);
        argv.extend(e2e::args(&timeout));
        let (code, output) = run_cli(&argv).await?;
        ensure!(
            code == 2,
            "{} exited {code} on an unreachable cluster: {output}",
            command[0]
        );
    }
    Ok(())
}

/// O9: one member of a three-member source dies (SIGKILL). `/readyz` asks
/// each cluster with a hedged read, so it stays ready instead of flapping
/// with every request the balancer still sends to that member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_source_member_does_not_flap_readiness() -> Result<()> {
    let clusters = Clusters::start(MirrorOptions {
        name: "o9-ready".into(),
        source: EtcdOptions {
            members: 3,
            ..EtcdOptions::default()
        },
        allow_errors: e2e::args(&["source_unavailable"]),
        ..MirrorOptions::default()
    })
    .await?;
    put_tagged(&clusters.source, "/app/", 10, "a").await?;
    let mirror = clusters.mirror().await?;
    let (source, syncer) = (&mirror.source, &mirror.syncer);
    let leader = source.leader_index().await?;
    let dead = (leader + 1) % 3;
    source.signal_member(dead, nix::sys::signal::Signal::SIGKILL)?;
    let mut not_ready = Vec::new();
    for second in 0..40 {
        let (status, body) = syncer.get("/readyz").await?;
        if status != 200 {
            not_ready.push(format!("{second}s: {status} {body}"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    ensure!(
        not_ready.is_empty(),
        "/readyz flapped with one member dead:\n{}",
        not_ready.join("\n")
    );
    mirror.finish().await
}

/// An exclude removed across a restart: the copy the checkpoint describes
/// never held the keys under it. The destination also holds as many keys
/// of its own as were left out, so a resume that only compared counts
/// would take the fast path and the keys would never arrive; the job
/// takes a full sync that names the prefix, and the standby ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_exclude_takes_a_full_sync_that_names_it() -> Result<()> {
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    put_tagged(&source, "/app/", 10, "a").await?;
    put_tagged(&source, "/app/private/", 10, "p").await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    let write_config = |extra: &str| {
        std::fs::write(
            &config,
            config_text(&source, &dest, "", &(job("app", "/app/", "/app/") + extra)),
        )
    };
    let args = e2e::args(&["mirror-plus", "--config", config.to_str().unwrap()]);
    write_config("exclude-prefixes = [\"/app/private/\"]\n")?;
    let first = Syncer::start("exclude-first", &args).await?;
    wait_job_state(&first, "app", "watching").await?;
    first.finish().await?;
    ensure!(count_prefix(&dest, "/app/private/").await? == 0);
    let mut dst = dest.client().await?;
    for i in 1..=10 {
        dst.put(format!("/app/local/k{i:02}"), "local", None)
            .await?;
    }

    write_config("")?;
    let second = Syncer::start("exclude-second", &args).await?;
    let line = first_of(&second, &[RESUMED, SLOW_PATH]).await?;
    ensure!(
        line.contains(SLOW_PATH) && line.contains("no longer leaves out /app/private/"),
        "a removed exclude must take the slow path naming it, got: {line}"
    );
    converge(&source, "/app/", &dest, "/app/", WAIT).await?;
    second.finish().await
}
