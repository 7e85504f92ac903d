//! `--redact-keys` against real etcd: the periodic check's ERROR line and
//! the `check` command's report name differing keys only by their hash.

use std::time::Duration;

use anyhow::Result;
use e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redacting_run_logs_no_key_text() -> Result<()> {
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let mut src = source.client().await?;
    let mut dst = dest.client().await?;
    src.put("/app/acme-secret-1", "value-one", None).await?;
    src.put("/app/acme-secret-2", "value-two", None).await?;

    let mut args = mirror_args(&source, &dest, "/app/");
    args.extend(e2e::args(&["--check-interval", "1s", "--redact-keys"]));
    let mut syncer = Syncer::start("syncer", &args).await?;
    syncer.allow_error("Consistency check found differences.");
    wait_job_state(&syncer, "app", "watching").await?;
    converge(&source, "/app/", &dest, "/app/", Duration::from_secs(60)).await?;
    // Differences the check reports (no repair): a destination-only key
    // and a changed value.
    dst.put("/app/zz-dest-only-secret", "local", None).await?;
    dst.put("/app/acme-secret-1", "tampered-secret-value", None)
        .await?;
    eventually(
        Duration::from_secs(60),
        "a check to report the differences",
        || async { Ok(syncer.count_log_messages("Consistency check found differences.") > 0) },
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
        &source,
        &dest,
        &["--prefix", "/app/", "--redact-keys"],
    ))
    .await?;
    assert_eq!(code, 1, "differences found:\n{output}");
    assert!(
        !output.contains("secret"),
        "the check shows a key:\n{output}"
    );
    assert!(output.contains("<key:"), "{output}");
    syncer.finish().await
}
