//! gzip on the source link (`--src-compression`): fewer bytes cross the
//! line with it than without, the copy stays exact, and `auto` turns it on
//! only against etcd 3.5 (3.4 refuses gzip-compressed requests).

use anyhow::{ensure, Result};
use e2e::etcd::{etcd_binary, etcd_version};
use e2e::*;
use etcd_client::{Client, Txn, TxnOp};

const KEYS: usize = 2_000;
const LIVE_KEYS: usize = 500;

/// A JSON-like value of about 200 bytes, different for every key: what
/// service registries and config stores keep in etcd.
fn value(i: usize) -> String {
    let mut text = format!(
        "{{\"id\":{i},\"name\":\"service-{i:06}\",\"region\":\"eu-west-{}\",\"status\":\"ready\",\
         \"port\":{},\"labels\":{{\"team\":\"payments\",\"tier\":\"backend\"}},\"weight\":{}}}",
        i % 3,
        8000 + i % 1000,
        i % 17
    );
    // Pads inside the JSON, so it stays JSON.
    while text.len() < 200 {
        text.insert_str(text.len() - 1, ",\"x\":0");
    }
    text
}

async fn put_json(client: &mut Client, from: usize, to: usize) -> Result<()> {
    for start in (from..to).step_by(100) {
        let ops: Vec<TxnOp> = (start..(start + 100).min(to))
            .map(|i| TxnOp::put(format!("/app/key-{i:06}"), value(i), None))
            .collect();
        client.txn(Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

fn at_least_3_5(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (3, 5)
}

/// The syncer's "<side>: gzip compression on|off (why)" line, if it logged one.
fn compression_log(syncer: &Syncer, side: &str) -> Option<String> {
    let prefix = format!("{side}: gzip compression ");
    syncer.logs().into_iter().find_map(|line| {
        let value: serde_json::Value = serde_json::from_str(&line).ok()?;
        let message = value.get("message")?.as_str()?;
        message.starts_with(&prefix).then(|| message.to_string())
    })
}

/// A mirror with `--src-compression <compression>` through a proxy on the
/// source link: a full sync of [`KEYS`] keys, then [`LIVE_KEYS`] more
/// through the watch, the destination exact. Returns the bytes the source
/// sent through the proxy, and the compression log line.
async fn mirror_through_proxy(compression: &str) -> Result<(u64, String)> {
    let clusters = Clusters::start(MirrorOptions {
        name: format!("compression-{compression}"),
        proxy: Some(ProxySide::Source),
        extra_args: args(&["--src-compression", compression]),
        ..MirrorOptions::default()
    })
    .await?;
    let mut source = clusters.source.client().await?;
    put_json(&mut source, 0, KEYS).await?;
    let mirror = clusters.mirror().await?;
    put_json(&mut source, KEYS, KEYS + LIVE_KEYS).await?;
    mirror.converge().await?;
    // The product's own checker agrees (it reads the source with its
    // default compression, auto).
    let (code, checked) = run_cli(&check_args(
        &mirror.source,
        &mirror.dest,
        &["--prefix", "/app/"],
    ))
    .await?;
    ensure!(code == 0, "check exited {code}: {checked}");
    let received = mirror
        .proxy
        .as_ref()
        .map(|proxy| proxy.forwarded_to_client())
        .unwrap_or_default();
    let log = compression_log(&mirror.syncer, "source").unwrap_or_default();
    eprintln!("--src-compression {compression}: {received} bytes from the source; {log}");
    mirror.finish().await?;
    Ok((received, log))
}

/// The measurement: the same mirror with gzip on and off. etcd 3.4 refuses
/// gzip, so there it only checks `auto` chose off (the test below).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_on_the_source_link_sends_fewer_bytes() -> Result<()> {
    let version = etcd_version(&etcd_binary(Role::Source))?;
    if !at_least_3_5(&version) {
        eprintln!("skipped: the source runs etcd {version}, which refuses gzip");
        return Ok(());
    }
    let (plain, plain_log) = mirror_through_proxy("off").await?;
    let (gzipped, gzip_log) = mirror_through_proxy("gzip").await?;
    ensure!(
        plain_log.contains("gzip compression off"),
        "off: {plain_log:?}"
    );
    ensure!(
        gzip_log.contains("gzip compression on"),
        "gzip: {gzip_log:?}"
    );
    let ratio = gzipped as f64 / plain as f64;
    eprintln!("bytes from the source: {gzipped} with gzip, {plain} without (ratio {ratio:.2})");
    ensure!(
        ratio < 0.7,
        "gzip should cut the bytes from the source: {gzipped} with gzip, {plain} without"
    );
    Ok(())
}

/// `auto` (the source's default) asks the server's version: on with 3.5,
/// off with 3.4, whose members refuse gzip; the mirror works either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_follows_the_server_version() -> Result<()> {
    let version = etcd_version(&etcd_binary(Role::Source))?;
    let (_, log) = mirror_through_proxy("auto").await?;
    if at_least_3_5(&version) {
        ensure!(
            log == "source: gzip compression on (every member is etcd >= 3.5)",
            "{version}: {log:?}"
        );
    } else {
        ensure!(
            log.starts_with("source: gzip compression off (member ")
                && log.ends_with(&format!("runs {version})")),
            "{version}: {log:?}"
        );
    }
    Ok(())
}

/// Forcing gzip on etcd 3.4: the refusal's error names the flag to turn
/// it off, and nothing is mirrored wrongly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_gzip_on_etcd_3_4_names_the_flag() -> Result<()> {
    let version = etcd_version(&etcd_binary(Role::Source))?;
    if at_least_3_5(&version) {
        eprintln!("skipped: the source runs etcd {version}, which accepts gzip");
        return Ok(());
    }
    let hint = "etcd < 3.5 does not accept gzip: set --src-compression off";
    let clusters = Clusters::start(MirrorOptions {
        extra_args: args(&["--src-compression", "gzip"]),
        load: Some(Preload::keys(10, 20)),
        wait_watching: false,
        allow_errors: vec![hint.to_string()],
        ..MirrorOptions::default()
    })
    .await?;
    let mirror = clusters.mirror().await?;
    eventually(
        mirror.options.timeout,
        "the refusal, with its hint",
        || async { Ok(mirror.syncer.log_text().contains(hint)) },
    )
    .await?;
    ensure!(count_prefix(&mirror.dest, "/app/").await? == 0);
    mirror.finish().await
}

/// `auto` on a group of three asks each member on its own connection
/// (the balanced channel would pick one): all 3.5, gzip on; the mirror,
/// whose hedged reads connect each member again, stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_asks_every_member_of_the_group() -> Result<()> {
    let version = etcd_version(&etcd_binary(Role::Source))?;
    let mirror = Mirror::start(MirrorOptions {
        source: EtcdOptions {
            members: 3,
            ..EtcdOptions::default()
        },
        ..MirrorOptions::loaded(200, 100)
    })
    .await?;
    mirror
        .source
        .client()
        .await?
        .put("/app/live", value(1), None)
        .await?;
    mirror.converge().await?;
    let log = compression_log(&mirror.syncer, "source").unwrap_or_default();
    if at_least_3_5(&version) {
        ensure!(
            log == "source: gzip compression on (every member is etcd >= 3.5)",
            "{log:?}"
        );
    } else {
        ensure!(
            log.starts_with("source: gzip compression off (member "),
            "{log:?}"
        );
    }
    mirror.finish().await
}
