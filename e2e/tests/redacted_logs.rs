//! `--redact-keys` against real etcd: the periodic check's ERROR line and
//! the `check` command's report name differing keys only by their hash.

use std::time::Duration;

use anyhow::Result;
use e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redacting_run_logs_no_key_text() -> Result<()> {
    let clusters = Clusters::start(MirrorOptions {
        extra_args: e2e::args(&["--check-interval", "1s", "--redact-keys"]),
        allow_errors: e2e::args(&["Consistency check found differences."]),
        ..MirrorOptions::default()
    })
    .await?;
    let mut src = clusters.source.client().await?;
    src.put("/app/acme-secret-1", "value-one", None).await?;
    src.put("/app/acme-secret-2", "value-two", None).await?;
    let mirror = clusters.mirror().await?;
    let (source, dest, syncer) = (&mirror.source, &mirror.dest, &mirror.syncer);
    mirror.converge().await?;
    // Differences the check reports (no repair): a destination-only key
    // and a changed value.
    let mut dst = dest.client().await?;
    dst.put("/app/zz-dest-only-secret", "local", None).await?;
    dst.put("/app/acme-secret-1", "tampered-secret-value", None)
        .await?;
    eventually(
        Duration::from_secs(60),
        "a check to find both differences",
        || async {
            Ok(mirror.job_metric("etcd_syncer_src_miss_keys").await? == 1.0
                && mirror.job_metric("etcd_syncer_mismatch_keys").await? == 1.0)
        },
    )
    .await?;
    // The check's ERROR line is what this test reads: wait for the next
    // check's line (it finds both differences too), which comes through
    // the stderr pipe after the metrics.
    const FOUND: &str = "Consistency check found differences.";
    let logged = syncer.count_log_messages(FOUND);
    eventually(
        Duration::from_secs(60),
        "the next check's line logged",
        || async { Ok(syncer.count_log_messages(FOUND) > logged) },
    )
    .await?;
    let logs = syncer.log_text();
    for secret in [
        "acme-secret",
        "dest-only-secret",
        "tampered-secret-value",
        "value-one",
    ] {
        assert!(!logs.contains(secret), "the log shows {secret:?}:\n{logs}");
    }
    assert!(
        logs.contains("<key:"),
        "the samples are shown as hashes:\n{logs}"
    );

    let (code, output) = run_cli(&check_args(
        source,
        dest,
        &["--prefix", "/app/", "--redact-keys"],
    ))
    .await?;
    assert_eq!(code, 1, "differences found:\n{output}");
    assert!(
        !output.contains("secret"),
        "the check shows a key:\n{output}"
    );
    assert!(output.contains("<key:"), "{output}");
    mirror.finish().await
}
