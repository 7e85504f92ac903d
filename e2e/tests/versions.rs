//! The etcd version pitfalls of docs/architecture.md ("etcd versions and
//! their watch pitfalls"), each built for real against whichever etcd the
//! environment picks (`E2E_ETCD_BIN`): a delete at the compaction revision
//! (etcd-io/etcd#18089), plain and by lease expiry; a source rebuilt with the
//! same cluster id; a revision bigger than one watch message; auth tokens
//! that expire or go stale under the syncer.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use e2e::*;
use etcd_client::{
    Client, CompactionOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};

const WAIT: Duration = Duration::from_secs(120);

/// Waits until the (idle) checkpoint names the source's head revision, and
/// returns it. Nothing may write to the source meanwhile.
async fn wait_checkpoint_at_head(
    source: &EtcdCluster,
    dest: &EtcdCluster,
    job: &str,
) -> Result<i64> {
    let head = std::sync::atomic::AtomicI64::new(0);
    eventually(WAIT, "the checkpoint to reach the source head", || async {
        let now = source.revision().await?;
        head.store(now, std::sync::atomic::Ordering::SeqCst);
        Ok(checkpoint_rev(dest, job).await? == Some(now))
    })
    .await?;
    Ok(head.into_inner())
}

/// A first syncer ("first") on `/app/`, with `keys` keys of 50 bytes.
fn first_options(keys: usize) -> MirrorOptions {
    MirrorOptions {
        name: "first".into(),
        load: (keys > 0).then(|| Preload::keys(keys, 50)),
        ..MirrorOptions::default()
    }
}

/// The first syncer ("first") on the clusters, the destination converged
/// and the idle checkpoint at the source head; then stopped. Returns the
/// checkpoint's revision.
async fn first_run_to_head(mirror: &mut Mirror) -> Result<i64> {
    mirror.converge().await?;
    wait_checkpoint_at_head(&mirror.source, &mirror.dest, &mirror.job).await?;
    mirror.stop().await?;
    checkpoint_rev(&mirror.dest, &mirror.job)
        .await?
        .context("checkpoint")
}

/// A restarted syncer's one full sync came from `kind` errors (e.g.
/// `compacted`: the resume found the checkpoint's history gone, which is
/// the slow path's reason), after one resume from the checkpoint.
async fn ensure_forced_full_sync(mirror: &Mirror, kind: &str) -> Result<()> {
    let (slow, fast) = mirror.paths().await?;
    let errors = mirror.errors(kind).await?;
    ensure!(
        slow == 1.0 && fast == 1.0 && errors >= 1.0,
        "expected one resume, then one full sync forced by {kind} errors: {slow} full syncs, {fast} resumes, {errors} {kind} errors\n{}",
        mirror.syncer.log_text()
    );
    Ok(())
}

async fn key_count(cluster: &EtcdCluster, key: &str) -> Result<i64> {
    let mut client = cluster.client().await?;
    Ok(client
        .get(key, Some(GetOptions::new().with_count_only()))
        .await?
        .count())
}

/// Compacts the source at exactly `revision` (physically, so the history
/// below it is really gone).
async fn compact_at(source: &EtcdCluster, revision: i64) -> Result<()> {
    source
        .client()
        .await?
        .compact(revision, Some(CompactionOptions::new().with_physical()))
        .await?;
    Ok(())
}

/// The restarted syncer converges, took the slow path because of the
/// compaction, and logged no ERROR.
async fn restart_and_expect_compaction_slow_path(mirror: &mut Mirror, gone: &str) -> Result<()> {
    mirror.start_again("second", &[]).await?;
    mirror.converge().await?;
    ensure!(
        key_count(&mirror.dest, gone).await? == 0,
        "{gone} is still on the destination"
    );
    ensure_forced_full_sync(mirror, "compacted").await?;
    mirror.stop().await
}

/// etcd-io/etcd#18089: the checkpoint is at D-1, the delete is at D and the
/// source is compacted at exactly D. A watch from D is accepted but (before
/// 3.4.36 / 3.5.18) never delivers the delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_at_the_compaction_revision_is_not_lost() -> Result<()> {
    let started = Instant::now();
    let mut mirror = Mirror::start(first_options(20)).await?;
    let checkpoint = first_run_to_head(&mut mirror).await?;
    let source = &mirror.source;
    let mut src = source.client().await?;

    let victim = "/app/key-000007";
    let deleted = src.delete(victim, None).await?;
    ensure!(deleted.deleted() == 1);
    let delete_rev = deleted.header().context("header")?.revision();
    ensure!(
        delete_rev == checkpoint + 1,
        "the delete ({delete_rev}) is the first revision after the checkpoint ({checkpoint})"
    );
    compact_at(source, delete_rev).await?;

    restart_and_expect_compaction_slow_path(&mut mirror, victim).await?;
    println!(
        "etcd {}: delete at the compaction revision {delete_rev}: {:.1} s",
        mirror.source.version(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// As above, but the delete is a lease expiring while the syncer is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leased_key_expiring_at_the_compaction_revision_is_not_lost() -> Result<()> {
    let started = Instant::now();
    let clusters = Clusters::start(first_options(20)).await?;
    let mut src = clusters.source.client().await?;
    // A 2 s lease kept alive while the syncer mirrors it, left to expire
    // once the syncer is down.
    let lease = src.lease_grant(2, None).await?.id();
    let (mut keeper, mut responses) = src.lease_keep_alive(lease).await?;
    let keep_alive = tokio::spawn(async move {
        loop {
            keeper.keep_alive().await?;
            responses.message().await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    });
    let leased = "/app/leased";
    src.put(
        leased,
        "short-lived",
        Some(PutOptions::new().with_lease(lease)),
    )
    .await?;

    let mut mirror = clusters.mirror().await?;
    mirror.converge().await?;
    ensure!(key_count(&mirror.dest, leased).await? == 1);
    let checkpoint = first_run_to_head(&mut mirror).await?;
    let source = &mirror.source;

    keep_alive.abort();
    let _ = keep_alive.await;
    eventually(WAIT, "the lease to expire", || async {
        Ok(key_count(source, leased).await? == 0)
    })
    .await?;
    // Nothing else writes: the revision after the expiry is its DELETE.
    let expiry_rev = source.revision().await?;
    ensure!(
        expiry_rev == checkpoint + 1,
        "the expiry ({expiry_rev}) is the first revision after the checkpoint ({checkpoint})"
    );
    let before = src
        .get(
            leased,
            Some(GetOptions::new().with_revision(expiry_rev - 1)),
        )
        .await?;
    ensure!(
        before.count() == 1,
        "the key existed just before {expiry_rev}"
    );
    compact_at(source, expiry_rev).await?;

    restart_and_expect_compaction_slow_path(&mut mirror, leased).await?;
    println!(
        "etcd {}: lease expiry at the compaction revision {expiry_rev}: {:.1} s",
        mirror.source.version(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The source is wiped and bootstrapped again with the same member name,
/// peer URL and cluster token (so the same cluster id), then written past
/// the old checkpoint revision: the checkpoint names this cluster and a
/// revision it has, yet the history is another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_rebuilt_with_the_same_identity_is_detected() -> Result<()> {
    let started = Instant::now();
    let clusters = Clusters::start(MirrorOptions {
        load: Some(Preload {
            tag: "old".into(),
            ..Preload::keys(20, 50)
        }),
        ..first_options(0)
    })
    .await?;
    let mut src = clusters.source.client().await?;
    for i in 0..60 {
        src.put(format!("/app/key-{:06}", i % 20), format!("old-{i}"), None)
            .await?;
    }
    let mut mirror = clusters.mirror().await?;
    let checkpoint = first_run_to_head(&mut mirror).await?;
    let source = &mut mirror.source;
    let old_cluster_id = source.cluster_id().await?;
    let old_endpoints = source.endpoints();

    drop(src);
    source.rebuild_empty().await?;
    ensure!(source.endpoints() == old_endpoints, "same client port");
    let new_cluster_id = source.cluster_id().await?;
    ensure!(
        new_cluster_id == old_cluster_id,
        "the rebuilt source has the same cluster id ({new_cluster_id:x} vs {old_cluster_id:x})"
    );
    let mut src = source.client().await?;
    ensure!(
        source.revision().await? < checkpoint,
        "the rebuilt source starts over"
    );
    for i in 0..30 {
        src.put(format!("/app/new-{i:03}"), format!("new-{i}"), None)
            .await?;
    }
    let mut filler = 0;
    while source.revision().await? <= checkpoint + 10 {
        src.put("/elsewhere/filler", format!("{filler}"), None)
            .await?;
        filler += 1;
    }
    let head = source.revision().await?;
    println!(
        "cluster id {new_cluster_id:x} before and after the rebuild; old checkpoint {checkpoint}, new head {head}"
    );

    // Every key the destination has is one the new source lacks: the
    // mass-delete guard would (rightly) park the job without this.
    mirror
        .start_again("second", &["--max-prune-ratio", "1"])
        .await?;
    mirror.converge().await?;
    let on_dest = read_prefix(&mut mirror.dest.client().await?, "/app/").await?;
    ensure!(
        on_dest.len() == 30 && on_dest.keys().all(|k| k.starts_with(b"new-")),
        "only the new source's keys: {:?}",
        on_dest
            .keys()
            .map(|k| String::from_utf8_lossy(k))
            .collect::<Vec<_>>()
    );
    // The resume found another history behind the same cluster id.
    ensure_forced_full_sync(&mirror, "history_differs").await?;
    let version = mirror.source.version().to_string();
    mirror.finish().await?;
    println!(
        "etcd {version}: rebuilt source detected: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One revision deletes 60 keys of 100 KiB each. The syncer watches without
/// previous values, so a delete event carries the key only: the keys are
/// what is big. That revision's watch response (about 6 MiB) is far over
/// etcd's --max-request-bytes (1.5 MiB), so etcd sends it in fragments, and
/// its 60 deletes are more than one destination txn may carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_larger_than_a_watch_message_is_reassembled() -> Result<()> {
    const KEYS: usize = 60;
    const KEY_BYTES: usize = 100 * 1024;
    let started = Instant::now();
    let clusters = Clusters::start(MirrorOptions {
        prefix: "/big/".into(),
        ..MirrorOptions::default()
    })
    .await?;
    let mut src = clusters.source.client().await?;
    src.put("/big/small", "seed", None).await?;
    let mirror = clusters.mirror().await?;
    let split = || mirror.job_metric("etcd_syncer_split_revisions_total");

    let big_key = |i: usize| {
        let mut key = format!("/big/{i:03}-");
        key.extend(std::iter::repeat_n('k', KEY_BYTES));
        key
    };
    // Ten keys (about 1 MiB) per txn: each fits etcd's request limit.
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(10) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|&i| TxnOp::put(big_key(i), format!("value-{i}"), None))
            .collect();
        src.txn(Txn::new().and_then(ops)).await?;
    }
    mirror.converge().await?;
    let split_before = split().await?;

    let deleted = src
        .delete("/big/", Some(DeleteOptions::new().with_prefix()))
        .await?;
    ensure!(deleted.deleted() == KEYS as i64 + 1);
    let delete_rev = deleted.header().context("header")?.revision();
    mirror.converge().await?;
    ensure!(read_prefix(&mut mirror.dest.client().await?, "/big/")
        .await?
        .is_empty());

    // The premise, seen by a watcher of our own: etcd really fragments
    // this revision.
    let fragments = watch_fragments(&mut src, "/big/", delete_rev).await?;
    ensure!(
        fragments > 1,
        "revision {delete_rev} came in {fragments} watch response(s), not fragmented"
    );

    let split_after = split().await?;
    println!(
        "revision {delete_rev}: {fragments} watch fragments; etcd_syncer_split_revisions_total {split_before} -> {split_after}"
    );
    ensure!(
        split_after > split_before,
        "the delete revision was split across txns by the syncer's txn limits"
    );
    let version = mirror.source.version().to_string();
    mirror.finish().await?;
    println!(
        "etcd {version}: fragmented revision reassembled: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// How many watch responses a fragmenting watch gets for `revision` alone.
async fn watch_fragments(client: &mut Client, prefix: &str, revision: i64) -> Result<usize> {
    let mut stream = client
        .watch(
            prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision)
                    .with_fragment(),
            ),
        )
        .await?;
    let mut responses = 0;
    loop {
        let message = tokio::time::timeout(WAIT, stream.message())
            .await
            .context("watch response")??
            .context("watch closed")?;
        if message.events().is_empty() {
            continue;
        }
        ensure!(message
            .events()
            .iter()
            .all(|e| e.kv().is_some_and(|kv| kv.mod_revision() == revision)));
        responses += 1;
        if !message.0.fragment {
            return Ok(responses);
        }
    }
}

/// Requests the source refused for a stale token: etcd 3.4 answers
/// InvalidArgument "revision of auth store is old", etcd 3.5.1 passes the
/// raw "auth: revision in header is old" as Unknown (nothing else in this
/// test earns either code).
async fn stale_token_refusals(source: &EtcdCluster) -> Result<f64> {
    let metrics = source.server_metrics().await?;
    Ok(["InvalidArgument", "Unknown"]
        .iter()
        .map(|code| {
            metric_value(
                &metrics,
                "grpc_server_handled_total",
                &[("grpc_code", code)],
            )
        })
        .sum())
}

fn auth_args(source_password: &str, dest_password: &str) -> Vec<String> {
    args(&[
        "--src-user",
        "syncer",
        "--src-password",
        source_password,
        "--dst-user",
        "syncer",
        "--dst-password",
        dest_password,
    ])
}

/// Simple tokens that live 3 s: they expire whenever the syncer leaves a
/// side alone longer than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_renewed() -> Result<()> {
    let started = Instant::now();
    let tokens = EtcdOptions {
        extra_args: args(&["--auth-token", "simple", "--auth-token-ttl", "3"]),
        ..EtcdOptions::default()
    };
    let mut clusters = Clusters::start(MirrorOptions {
        source: tokens.clone(),
        dest: tokens,
        extra_args: auth_args("s3cret", "d3cret"),
        ..MirrorOptions::default()
    })
    .await?;
    clusters
        .source
        .enable_auth("syncer", "s3cret", "/app/")
        .await?;
    clusters
        .dest
        .enable_auth("syncer", "d3cret", "/app/")
        .await?;
    put_many(&mut clusters.source.client().await?, "/app/", 50, 20, "v1").await?;
    let mirror = clusters.mirror().await?;
    let (source, syncer) = (&mirror.source, &mirror.syncer);

    // 15 s of writes: bursts, and pauses longer than the token TTL so both
    // sides' tokens expire in between.
    // The test's own client does not renew its token: a new one per burst.
    let writing = Instant::now();
    let mut i = 0;
    while writing.elapsed() < Duration::from_secs(15) {
        let mut src = source.client().await?;
        let burst = Instant::now();
        while burst.elapsed() < Duration::from_secs(2) {
            src.put(format!("/app/live-{:03}", i % 200), format!("{i}"), None)
                .await?;
            i += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(4500)).await;
    }
    mirror.converge().await?;
    // And once more after everything was idle past the TTL.
    tokio::time::sleep(Duration::from_secs(5)).await;
    source.client().await?.put("/app/last", "1", None).await?;
    mirror.converge().await?;

    let auth_errors = syncer
        .metric(
            "etcd_syncer_errors_total",
            &[("job", "app"), ("kind", "auth")],
        )
        .await?;
    ensure!(
        auth_errors == 0.0,
        "{auth_errors} auth errors counted:\n{}",
        syncer.log_text()
    );
    ensure!(
        syncer
            .metric("etcd_syncer_slow_path_total", &[("job", "app")])
            .await?
            == 1.0,
        "only the initial full sync"
    );
    println!("{i} writes over 15 s with 3 s tokens");
    let version = source.version().to_string();
    mirror.finish().await?;
    println!(
        "etcd {version}: tokens renewed: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `--auth-token` flags for JWT tokens signed with a fresh ES256 key pair
/// written under `dir`.
fn jwt_token_args(dir: &std::path::Path) -> Result<Vec<String>> {
    let key = rcgen::KeyPair::generate()?;
    let private = dir.join("jwt-key.pem");
    let public = dir.join("jwt-pub.pem");
    std::fs::write(&private, key.serialize_pem())?;
    std::fs::write(&public, key.public_key_pem())?;
    Ok(vec![
        "--auth-token".to_string(),
        format!(
            "jwt,pub-key={},priv-key={},sign-method=ES256",
            public.display(),
            private.display()
        ),
    ])
}

/// The auth store changes mid full sync, so every request with the token
/// the syncer holds is refused ("revision of auth store is old").
///
/// The source issues JWT tokens: a JWT carries the auth revision it was
/// issued at, so after the change every request with it is refused. A
/// simple token is checked against the current auth revision each time it
/// is looked up, and goes stale only in the narrow race of a write
/// proposed before the change and applied after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_change_during_a_full_sync_is_survived() -> Result<()> {
    const KEYS: usize = 20_000;
    let started = Instant::now();
    let keys = tempfile::tempdir()?;
    let mut clusters = Clusters::start(MirrorOptions {
        source: EtcdOptions {
            extra_args: jwt_token_args(keys.path())?,
            ..EtcdOptions::default()
        },
        proxy: Some(ProxySide::Dest),
        extra_args: e2e::args(&[
            "--src-user",
            "syncer",
            "--src-password",
            "s3cret",
            "--page-size",
            "200",
        ]),
        wait_watching: false,
        ..MirrorOptions::default()
    })
    .await?;
    clusters
        .source
        .enable_auth("syncer", "s3cret", "/app/")
        .await?;
    put_many(
        &mut clusters.source.client().await?,
        "/app/",
        KEYS,
        50,
        "v1",
    )
    .await?;
    // Over 1.3 MB of puts: a quarter MiB in, the full sync is under way and
    // far from done.
    clusters
        .proxy
        .as_ref()
        .context("proxy")?
        .hold_after_forwarding(256 * 1024);
    let mirror = clusters.mirror().await?;
    let (source, syncer) = (&mirror.source, &mirror.syncer);
    let proxy = mirror.proxy.as_ref().context("proxy")?;
    wait_frozen_mid_full_sync(proxy, syncer, "app").await?;

    // Three auth-store changes; tokens issued before them are now stale.
    // A fresh client (token) for each: each change makes the last stale.
    let refused_before = stale_token_refusals(source).await?;
    source
        .client()
        .await?
        .user_add("someone-else", "pw", None)
        .await?;
    source.client().await?.role_add("another-role").await?;
    source
        .client()
        .await?
        .user_grant_role("someone-else", "another-role")
        .await?;
    proxy.restore();

    mirror
        .wait_state("watching")
        .await
        .with_context(|| syncer.log_text())?;
    mirror.converge().await?;
    let auth_errors = syncer
        .metric(
            "etcd_syncer_errors_total",
            &[("job", "app"), ("kind", "auth")],
        )
        .await?;
    ensure!(
        auth_errors == 0.0,
        "{auth_errors} auth errors counted:\n{}",
        syncer.log_text()
    );
    ensure!(
        syncer
            .metric("etcd_syncer_slow_path_total", &[("job", "app")])
            .await?
            == 1.0,
        "the full sync completed once, not started over:\n{}",
        syncer.log_text()
    );
    // The premise, seen from the source: the syncer's stale token was
    // really refused (etcd answers InvalidArgument, "revision of auth store
    // is old"), and retried with a fresh one.
    let refused = stale_token_refusals(source).await? - refused_before;
    ensure!(
        refused >= 1.0,
        "the source never refused a stale token: the auth change missed the full sync"
    );
    let stale = syncer
        .logs()
        .iter()
        .filter(|l| l.contains("auth store is old"))
        .count();
    println!("auth store changed mid full sync; the source refused {refused} request(s) with the stale token; {stale} syncer log lines mention it");
    let version = source.version().to_string();
    mirror.finish().await?;
    println!(
        "etcd {version}: auth change during a full sync: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
