//! Point-in-time promotion against real etcd: a mass delete on the primary
//! reaches the standby, and `promote --at-source-revision` (or `--at-time`)
//! brings every deleted key back from the standby's own history; once the
//! standby compacted that history the request is refused and nothing is
//! written.

use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context, Result};
use e2e::*;
use etcd_client::{DeleteOptions, GetOptions};

const CONVERGE: Duration = Duration::from_secs(60);
const KEYS: usize = 1000;
const DELETED: usize = 500;

/// A mirrored pair after a mass delete: (source, dest, syncer, the source
/// revision before the delete, a time between the two).
async fn mirrored_mass_delete() -> Result<(EtcdCluster, EtcdCluster, Syncer, i64, SystemTime)> {
    let clusters = Clusters::start(MirrorOptions {
        timeout: CONVERGE,
        ..MirrorOptions::loaded(KEYS, 50)
    })
    .await?;
    let mut src = clusters.source.client().await?;
    // Leased keys too: their lease still lives on the standby.
    let lease = src.lease_grant(600, None).await?.id();
    src.put(
        "/app/leased",
        "l",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await?;
    let mirror = clusters.mirror().await?;
    mirror.converge().await?;
    let Mirror {
        source,
        dest,
        syncer,
        ..
    } = mirror;
    let before = source.revision().await?;
    eventually(
        CONVERGE,
        "checkpoint at the revision before the delete",
        || async { Ok(checkpoint_rev(&dest, "app").await? >= Some(before)) },
    )
    .await?;
    let between = SystemTime::now();
    // Checkpoint times have millisecond resolution: the delete's is later.
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The mistake: half the keys deleted, in several source revisions.
    for chunk in 0..DELETED / 100 {
        src.delete(
            format!("/app/key-000{chunk}"),
            Some(DeleteOptions::new().with_prefix()),
        )
        .await?;
    }
    src.put("/app/after-the-delete", "new", None).await?;
    converge(&source, "/app/", &dest, "/app/", CONVERGE).await?;
    let mut dst = dest.client().await?;
    let left = dst
        .get(
            "/app/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?
        .count();
    ensure!(
        left == (KEYS - DELETED + 2) as i64,
        "the delete reached the standby: {left} keys"
    );
    Ok((source, dest, syncer, before, between))
}

fn promote_args(dest: &EtcdCluster, point: &[&str]) -> Vec<String> {
    let mut argv = args(&[
        "promote",
        "--dst-endpoints",
        &dest.endpoints_arg(),
        "--job-name",
        "app",
    ]);
    argv.extend(args(point));
    argv
}

/// Promotes to `point` and checks the standby now holds exactly what the
/// primary held at `before`, keys and values, and what the summary says.
async fn restores_exactly(
    point: impl Fn(i64, SystemTime) -> Vec<String>,
    check_json: bool,
) -> Result<()> {
    let (source, dest, _syncer, before, between) = mirrored_mass_delete().await?;
    let point = point(before, between);
    let point: Vec<&str> = point.iter().map(String::as_str).collect();
    // What an operator looks at first: how far back the standby reaches.
    let (code, status) =
        run_cli(&args(&["status", "--dst-endpoints", &dest.endpoints_arg()])).await?;
    println!("{status}");
    ensure!(
        code == 0 && status.contains("point in time reachable back to source revision"),
        "status shows the window ({code}): {status}"
    );
    let mut argv = promote_args(&dest, &point);
    if check_json {
        argv.extend(args(&["--output", "json"]));
    }
    let (code, output) = run_cli(&argv).await?;
    println!("{}", output);
    ensure!(code == 0, "promote failed ({code}): {output}");
    let mut src = source.client().await?;
    let mut dst = dest.client().await?;
    let then = read_prefix_at(&mut src, "/app/", before).await?;
    let now = read_prefix(&mut dst, "/app/").await?;
    ensure!(then.len() == KEYS + 1, "{} keys at the source", then.len());
    ensure!(
        now == then,
        "the standby differs from the primary at revision {before}: {} keys vs {}",
        now.len(),
        then.len()
    );
    let leased = dst.get("/app/leased", None).await?;
    let kv = leased.kvs().first().context("leased key")?;
    ensure!(kv.lease() != 0, "the leased key keeps its (live) lease");
    if check_json {
        let outcomes: serde_json::Value = serde_json::from_str(
            output
                .find('[')
                .map(|at| &output[at..])
                .context("JSON output")?,
        )?;
        let point = &outcomes[0]["promotion"]["point_in_time"];
        ensure!(point["source_revision"] == before, "{point}");
        ensure!(
            point["puts"] == DELETED as u64 && point["deletes"] == 1 && point["skipped"] == 0,
            "{point}"
        );
    } else {
        ensure!(
            output.contains(&format!(
                "restored source revision {before} read at destination revision"
            )) && output.contains(&format!("{DELETED} puts, 1 deletes, 0 skipped")),
            "{output}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_at_a_source_revision_restores_the_keys_a_mass_delete_removed() -> Result<()> {
    restores_exactly(
        |before, _| args(&["--at-source-revision", &before.to_string()]),
        false,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_at_a_time_restores_the_keys_a_mass_delete_removed() -> Result<()> {
    restores_exactly(
        |_, between| {
            args(&[
                "--at-time",
                &humantime::format_rfc3339_millis(between).to_string(),
            ])
        },
        true,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_the_standby_compacted_away_is_refused_and_nothing_is_written() -> Result<()> {
    let (_source, dest, _syncer, before, _) = mirrored_mass_delete().await?;
    dest.compact().await?;
    let (code, output) = run_cli(&promote_args(
        &dest,
        &["--at-source-revision", &before.to_string()],
    ))
    .await?;
    println!("{}", output);
    ensure!(code == 2, "refused with exit code 2 ({code}): {output}");
    ensure!(
        output.contains(&format!(
            "source revision {before} is outside the destination's history window"
        )) && output.contains("--auto-compaction-retention"),
        "{output}"
    );
    let mut dst = dest.client().await?;
    ensure!(
        dst.get(format!("{META_PREFIX}app/promoted"), None)
            .await?
            .kvs()
            .is_empty(),
        "the job is not promoted"
    );
    Ok(())
}

/// O6: 100 keys mirrored at source revision R; the replicator stopped;
/// 800 more keys and a compaction on the source; the restart runs a full
/// sync of ~115 small txns. The states inside that full sync match no
/// source revision, yet the one before it is still in the standby's
/// history: `promote --at-source-revision R` restores it. A revision the
/// standby never reached is refused (exit 2) and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_before_a_full_sync_is_reachable_and_a_future_one_is_refused() -> Result<()> {
    let clusters = Clusters::start(MirrorOptions {
        name: "o6-first".into(),
        extra_args: args(&["--max-txn-ops", "8"]),
        timeout: CONVERGE,
        ..MirrorOptions::default()
    })
    .await?;
    let mut src = clusters.source.client().await?;
    for i in 0..100 {
        src.put(format!("/app/first-{i:03}"), format!("v{i}"), None)
            .await?;
    }
    let mut mirror = clusters.mirror().await?;
    let at_r = mirror.source.revision().await?;
    eventually(CONVERGE, "checkpoint at R", || async {
        Ok(checkpoint_rev(&mirror.dest, "app").await? >= Some(at_r))
    })
    .await?;
    let expected = read_prefix(&mut mirror.dest.client().await?, "/app/").await?;
    ensure!(expected.len() == 100);
    mirror.stop().await?;

    for i in 0..800 {
        src.put(format!("/app/later-{i:03}"), "x", None).await?;
    }
    mirror.source.compact().await?;
    mirror.start_again("o6-second", &[]).await?;
    mirror.converge().await?;
    ensure!(
        mirror.paths().await?.0 == 1.0,
        "the restart ran a full sync"
    );
    let Mirror {
        source: _source,
        dest,
        syncer,
        ..
    } = mirror;
    drop(syncer);

    let marker = format!("{META_PREFIX}app/promoted");
    let (code, output) = run_cli(&promote_args(&dest, &["--at-source-revision", "999999"])).await?;
    ensure!(
        code == 2 && output.contains("has reached source revision"),
        "exit {code}: {output}"
    );
    ensure!(
        dest.client()
            .await?
            .get(marker.as_str(), None)
            .await?
            .count()
            == 0,
        "a refused promotion wrote the marker"
    );

    let (code, output) = run_cli(&promote_args(
        &dest,
        &["--at-source-revision", &at_r.to_string()],
    ))
    .await?;
    ensure!(code == 0, "exit {code}: {output}");
    let restored = read_prefix(&mut dest.client().await?, "/app/").await?;
    ensure!(
        restored == expected,
        "the standby holds {} keys, not the 100 of revision {at_r}",
        restored.len()
    );
    Ok(())
}
