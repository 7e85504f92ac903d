//! The consistency checker (exact counts, no false positives under load,
//! repair, exit codes, approximate fallback) and the HTTP endpoints.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use e2e::load::Load;
use e2e::*;

const WAIT: Duration = Duration::from_secs(90);

async fn check_json(source: &EtcdCluster, dest: &EtcdCluster) -> Result<(i32, serde_json::Value)> {
    let (code, output) = run_cli(&check_args(
        source,
        dest,
        &["--prefix", "/app/", "--output", "json"],
    ))
    .await?;
    let json = serde_json::from_str(&output)
        .with_context(|| format!("not JSON (exit {code}): {output}"))?;
    Ok((code, json))
}

async fn synced_pair(keys: usize, extra: &[&str]) -> Result<(EtcdCluster, EtcdCluster, Syncer)> {
    let mirror = Mirror::start(MirrorOptions {
        extra_args: e2e::args(extra),
        timeout: WAIT,
        ..MirrorOptions::loaded(keys, 40)
    })
    .await?;
    mirror.converge().await?;
    Ok((mirror.source, mirror.dest, mirror.syncer))
}

async fn diverge(dest: &EtcdCluster) -> Result<()> {
    let mut dst = dest.client().await?;
    dst.delete("/app/key-000001", None).await?;
    dst.delete("/app/key-000002", None).await?;
    for stray in ["stray-a", "stray-b", "stray-c"] {
        dst.put(format!("/app/{stray}"), "x", None).await?;
    }
    dst.put("/app/key-000003", "tampered", None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_counts_each_kind_of_divergence_exactly() -> Result<()> {
    let (source, dest, syncer) = synced_pair(200, &[]).await?;
    let (code, report) = check_json(&source, &dest).await?;
    ensure!(
        code == 0 && report["exact"] == true,
        "consistent first: {report}"
    );
    ensure!(report["source_keys"] == 200 && report["dest_keys"] == 200);

    diverge(&dest).await?;
    let (code, report) = check_json(&source, &dest).await?;
    ensure!(code == 1, "differences exit 1: {report}");
    ensure!(
        report["dst_miss"] == 2 && report["src_miss"] == 3 && report["mismatch"] == 1,
        "{report}"
    );
    ensure!(
        report["samples"]["src_miss"]
            .as_array()
            .context("samples")?
            .len()
            == 3
    );
    ensure!(report["samples"]["mismatch"][0] == "key-000003");

    let (code, text) = run_cli(&check_args(&source, &dest, &["--job-name", "app"])).await?;
    ensure!(
        code == 1 && text.contains("DIFFERENT") && text.contains("stray-a"),
        "{text}"
    );
    syncer.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_has_no_false_positives_under_write_load() -> Result<()> {
    let (source, dest, syncer) = synced_pair(100, &[]).await?;
    let mut load = Load::new("/app/", 8, 100);
    load.keys_per_txn = 3;
    load.delete_every = Some(5);
    load.rate_per_writer = Some(60.0);
    let clients = vec![source.client().await?];
    // The load keeps going, round after round, until enough checks ran
    // during it: no race between the load's length and the checks' speed.
    let stop = Arc::new(AtomicBool::new(false));
    let writer_stop = stop.clone();
    let writer = tokio::spawn(async move {
        let mut rounds = 0;
        while !writer_stop.load(Ordering::SeqCst) {
            load.tag = format!("round-{rounds}");
            load.run(&clients).await?;
            rounds += 1;
        }
        anyhow::Ok(rounds)
    });
    let mut checks = 0;
    while checks < 3 {
        ensure!(
            !writer.is_finished(),
            "the load stopped early: {:?}",
            writer.await
        );
        let (code, report) = check_json(&source, &dest).await?;
        ensure!(
            code == 0 && report["exact"] == true,
            "false positive under load: {report}"
        );
        checks += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let rounds = writer.await??;
    println!("{checks} exact checks during {rounds} load rounds, all consistent");
    syncer.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_check_with_repair_fixes_all_three_kinds() -> Result<()> {
    let (source, dest, mut syncer) =
        synced_pair(100, &["--check-interval", "2s", "--check-repair"]).await?;
    syncer.allow_error("Consistency check found differences.");
    eventually(WAIT, "a first clean check", || async {
        Ok(syncer
            .metric(
                "etcd_syncer_check_last_success_timestamp_seconds",
                &[("job", "app")],
            )
            .await?
            > 0.0)
    })
    .await?;
    diverge(&dest).await?;
    eventually(WAIT, "repairs", || async {
        Ok(syncer
            .metric("etcd_syncer_repaired_keys_total", &[("job", "app")])
            .await?
            >= 6.0)
    })
    .await?;
    converge(&source, "/app/", &dest, "/app/", WAIT).await?;
    for (kind, expected) in [("dst_miss", 2.0), ("src_miss", 3.0), ("mismatch", 1.0)] {
        let repaired = syncer
            .metric(
                "etcd_syncer_repaired_keys_total",
                &[("job", "app"), ("kind", kind)],
            )
            .await?;
        ensure!(
            repaired == expected,
            "{kind}: repaired {repaired}, expected {expected}"
        );
    }
    eventually(WAIT, "gauges back to zero", || async {
        let text = syncer.scrape().await?;
        Ok([
            "etcd_syncer_dst_miss_keys",
            "etcd_syncer_src_miss_keys",
            "etcd_syncer_mismatch_keys",
        ]
        .iter()
        .all(|m| metric_value(&text, m, &[("job", "app")]) == 0.0))
    })
    .await?;
    let (code, _) = check_json(&source, &dest).await?;
    ensure!(code == 0);
    syncer.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exit_codes_and_the_approximate_fallback() -> Result<()> {
    let (source, dest, mut syncer) = synced_pair(50, &[]).await?;
    // Unknown job and unreachable cluster are errors: exit 2.
    let (code, text) = run_cli(&check_args(&source, &dest, &["--job-name", "nope"])).await?;
    ensure!(code == 2 && text.contains("nope"), "{text}");
    let (code, text) = run_cli(&e2e::args(&[
        "check",
        "--src-endpoints",
        &source.endpoints_arg(),
        "--dst-endpoints",
        "http://127.0.0.1:1",
        "--prefix",
        "/app/",
        "--request-timeout",
        "2s",
    ]))
    .await?;
    ensure!(code == 2, "unreachable destination exits 2: {text}");

    // History gone past the checkpoint: the check says it is approximate.
    syncer.stop().await?;
    let mut src = source.client().await?;
    src.put("/app/key-000001", "changed", None).await?;
    src.put("/unrelated", "1", None).await?;
    source.compact().await?;
    let (code, report) = check_json(&source, &dest).await?;
    ensure!(report["exact"] == false, "{report}");
    ensure!(
        code == 1 && report["mismatch"] == 1,
        "the real difference survives the re-check: {report}"
    );
    syncer.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_endpoints_after_a_sync() -> Result<()> {
    let (source, dest, syncer) = synced_pair(100, &["--check-interval", "1s"]).await?;
    source.client().await?.put("/app/live", "1", None).await?;
    converge(&source, "/app/", &dest, "/app/", WAIT).await?;
    eventually(WAIT, "a check result", || async {
        Ok(syncer
            .metric(
                "etcd_syncer_check_last_success_timestamp_seconds",
                &[("job", "app")],
            )
            .await?
            > 0.0)
    })
    .await?;
    let text = syncer.scrape().await?;
    for name in [
        "etcd_syncer_is_leader",
        "etcd_syncer_last_synced_revision",
        "etcd_syncer_source_revision",
        "etcd_syncer_lag_revisions",
        "etcd_syncer_lag_seconds",
        "etcd_syncer_fast_path_total",
        "etcd_syncer_slow_path_total",
        "etcd_syncer_full_sync_in_progress",
        "etcd_syncer_full_sync_keys_total",
        "etcd_syncer_events_applied_total",
        "etcd_syncer_txns_total",
        "etcd_syncer_txn_ops_bucket",
        "etcd_syncer_txn_duration_seconds_bucket",
        "etcd_syncer_split_revisions_total",
        "etcd_syncer_src_miss_keys",
        "etcd_syncer_dst_miss_keys",
        "etcd_syncer_mismatch_keys",
        "etcd_syncer_check_last_success_timestamp_seconds",
        "etcd_syncer_check_duration_seconds",
        "etcd_syncer_check_read_bytes_total",
        "etcd_syncer_leader_changes_total",
        "etcd_syncer_repaired_keys_total",
        "process_resident_memory_bytes",
    ] {
        ensure!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing from /metrics"
        );
    }
    let head = source.revision().await? as f64;
    ensure!(metric_value(&text, "etcd_syncer_is_leader", &[("job", "app")]) == 1.0);
    ensure!(metric_value(&text, "etcd_syncer_slow_path_total", &[("job", "app")]) == 1.0);
    ensure!(
        metric_value(
            &text,
            "etcd_syncer_full_sync_keys_total",
            &[("job", "app"), ("op", "put")]
        ) == 100.0
    );
    ensure!(metric_value(&text, "etcd_syncer_events_applied_total", &[("job", "app")]) >= 1.0);
    ensure!(metric_value(&text, "etcd_syncer_txns_total", &[("job", "app")]) >= 2.0);
    let synced = metric_value(&text, "etcd_syncer_last_synced_revision", &[("job", "app")]);
    ensure!(
        synced > 0.0 && synced <= head,
        "last synced {synced}, head {head}"
    );
    ensure!(metric_value(&text, "etcd_syncer_source_revision", &[("job", "app")]) <= head);
    ensure!(metric_value(&text, "etcd_syncer_lag_revisions", &[("job", "app")]) >= 0.0);
    ensure!(metric_value(&text, "etcd_syncer_dst_miss_keys", &[("job", "app")]) == 0.0);
    // Every check reads both prefixes whole.
    let read = |side| {
        metric_value(
            &text,
            "etcd_syncer_check_read_bytes_total",
            &[("job", "app"), ("side", side)],
        )
    };
    ensure!(
        read("source") >= 100.0 && read("destination") >= 100.0,
        "check bytes read: source {}, destination {}",
        read("source"),
        read("destination")
    );

    let (code, body) = syncer.get("/status").await?;
    ensure!(code == 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(
        status[0]["job"] == "app"
            && status[0]["is_leader"] == true
            && status[0]["state"] == "watching",
        "{status}"
    );
    ensure!(
        status[0]["destination"]["leader"].as_str().is_some(),
        "{status}"
    );
    ensure!(status[0]["last_check"]["exact"] == true, "{status}");
    syncer.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_the_source_is_down() -> Result<()> {
    let Mirror {
        mut source,
        dest,
        mut syncer,
        ..
    } = Mirror::start(MirrorOptions {
        wait_watching: false,
        ..MirrorOptions::loaded(20, 20)
    })
    .await?;
    eventually(WAIT, "ready", || async {
        Ok(syncer.get("/readyz").await?.0 == 200)
    })
    .await?;
    source.kill();
    eventually(WAIT, "not ready", || async {
        Ok(syncer.get("/readyz").await?.0 == 503)
    })
    .await?;
    ensure!(syncer.get("/healthz").await?.0 == 200, "still alive");
    source.restart().await?;
    eventually(WAIT, "ready again", || async {
        Ok(syncer.get("/readyz").await?.0 == 200)
    })
    .await?;
    source.client().await?.put("/app/after", "1", None).await?;
    converge(&source, "/app/", &dest, "/app/", WAIT).await?;
    syncer.allow_error("never-expected");
    syncer.finish().await
}
