//! Each fence of a leader's destination txn, alone. Every txn carries three
//! compares: `version(promoted) == 0`, `create_revision(own lock) == its
//! create revision`, and the checkpoint's exact previous bytes (the chain).
//! In most failovers the chain already rejects a stale writer, because the
//! new leader moved the checkpoint first. These tests build the cases where
//! the chain would let the stale txn through, so only the fence under test
//! can stop it:
//!
//! - the leader's txn is parked in the link proxy and the process frozen
//!   (SIGSTOP, so its client can neither cancel the request nor time it
//!   out); the parked bytes reach etcd intact once the proxy lets go;
//! - nobody moves the checkpoint before the parked txn reaches etcd;
//! - the test waits until etcd has answered a Txn after the release (its own
//!   `grpc_server_handled_total`), then asserts the destination did not move.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use e2e::proxy::LinkProxy;
use e2e::*;
use etcd_client::{EventType, GetOptions, WatchOptions};
use nix::sys::signal::Signal;

const WAIT: Duration = Duration::from_secs(120);
const STALE_KEY: &str = "/app/stale";
/// Large enough that the parked request is recognisable by its size alone.
const STALE_VALUE_BYTES: usize = 16 * 1024;

fn stale_value() -> String {
    format!("stale:{}", "x".repeat(STALE_VALUE_BYTES))
}

/// The checkpoint key's current (mod revision, raw value).
async fn checkpoint_now(dest: &EtcdCluster) -> Result<(i64, Vec<u8>)> {
    let mut client = dest.client().await?;
    let response = client
        .get(format!("{META_PREFIX}app/checkpoint"), None)
        .await?;
    let kv = response.kvs().first().context("no checkpoint")?;
    Ok((kv.mod_revision(), kv.value().to_vec()))
}

/// Every lock key of the job: (key, create revision).
async fn locks(dest: &EtcdCluster) -> Result<Vec<(String, i64)>> {
    let mut client = dest.client().await?;
    let response = client
        .get(
            format!("{META_PREFIX}app/lock/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    Ok(response
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.create_revision(),
            )
        })
        .collect())
}

/// Holds `proxy`, makes the source change so the leader sends one txn with
/// a recognisably large value, waits until that whole txn sits in the proxy,
/// then freezes the leader so nothing on its side can cancel it.
async fn park_a_txn_and_freeze(
    source: &EtcdCluster,
    dest: &EtcdCluster,
    proxy: &LinkProxy,
    leader: &Syncer,
) -> Result<()> {
    // The txn carries the data, the previous checkpoint bytes (the chain
    // compare) and a new checkpoint of about the same size.
    let (_, previous_checkpoint) = checkpoint_now(dest).await?;
    let parked_at_least = (STALE_VALUE_BYTES + 2 * previous_checkpoint.len()) as u64;
    proxy.hold();
    source
        .client()
        .await?
        .put(STALE_KEY, stale_value(), None)
        .await?;
    eventually(
        WAIT,
        "the leader's txn to be parked in the proxy",
        || async { Ok(proxy.pending_to_server() >= parked_at_least) },
    )
    .await?;
    // Read before the freeze: a frozen process answers no scrape.
    ensure!(
        leader
            .metric(
                "etcd_syncer_errors_total",
                &[("job", "app"), ("kind", "lease_lost")]
            )
            .await?
            == 0.0,
        "the leader gave up its lease before it was frozen; its parked txn may be cancelled"
    );
    leader.signal(Signal::SIGSTOP)?;
    println!(
        "parked {} bytes towards the destination, leader frozen",
        proxy.pending_to_server()
    );
    Ok(())
}

/// Lets the parked bytes through and waits until etcd has answered a Txn
/// it did not answer before: the parked one.
async fn release_and_wait_for_answer(dest: &EtcdCluster, proxy: &LinkProxy) -> Result<()> {
    let answered_before = dest.txns_handled().await?;
    proxy.restore();
    eventually(WAIT, "etcd to answer the parked txn", || async {
        Ok(proxy.pending_to_server() == 0 && dest.txns_handled().await? > answered_before)
    })
    .await
}

/// Every put of `key` in the destination's history (mod revisions); `key`
/// must exist now, so the replay is complete once it reaches its current version.
async fn put_revisions(dest: &EtcdCluster, key: &str) -> Result<Vec<i64>> {
    let mut client = dest.client().await?;
    let current = client.get(key, None).await?;
    let last = current.kvs().first().context("key absent")?.mod_revision();
    let mut stream = client
        .watch(key, Some(WatchOptions::new().with_start_revision(1)))
        .await?;
    let mut revisions = Vec::new();
    while revisions.last() != Some(&last) {
        let response = stream.message().await?.context("watch closed")?;
        for event in response.events() {
            if event.event_type() == EventType::Put {
                revisions.push(event.kv().context("kv")?.mod_revision());
            }
        }
    }
    Ok(revisions)
}

/// Replica A on `options`, its destination link through a proxy, the
/// destination converged.
async fn proxied_replica_a(options: MirrorOptions) -> Result<Mirror> {
    let mirror = Mirror::start(MirrorOptions {
        proxy: Some(ProxySide::Dest),
        timeout: WAIT,
        ..options
    })
    .await?;
    mirror.converge().await?;
    Ok(mirror)
}

/// A deposed leader's parked txn meets a destination where the chain still
/// matches (the new leader has not written yet) and nobody promoted: only
/// the lock fence can reject it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_fence_alone_rejects_a_deposed_leaders_txn() -> Result<()> {
    let mirror = proxied_replica_a(MirrorOptions {
        name: "a".into(),
        extra_args: e2e::args(&["--instance-id", "replica-a", "--lock-ttl", "4s"]),
        ..MirrorOptions::loaded(50, 50)
    })
    .await?;
    let (source, dest, a) = (&mirror.source, &mirror.dest, &mirror.syncer);
    let dest_link_a = mirror.proxy.as_ref().context("proxy")?;

    park_a_txn_and_freeze(source, dest, dest_link_a, a).await?;
    // Frozen, A sends no keepalive: its lease expires and its lock goes.
    eventually(WAIT, "A's lease to expire", || async {
        Ok(lock_holders(dest, "app").await? == 0)
    })
    .await?;

    // B leads but cannot write anything yet: its source link refuses every
    // connection, so it cannot resolve where to resume from.
    let (source_link_b, source_via_b) = LinkProxy::in_front_of(&source.endpoints()[0]).await?;
    source_link_b.reset();
    let mut args_b = mirror_args(source, dest, "/app/");
    args_b.extend(e2e::args(&[
        "--instance-id",
        "replica-b",
        "--lock-ttl",
        "4s",
    ]));
    let args_b = replace_flag(args_b, "--src-endpoints", &source_via_b)?;
    let b = Syncer::start("b", &args_b).await?;
    eventually(WAIT, "B to lead", || async {
        Ok(b.metric("etcd_syncer_is_leader", &[("job", "app")]).await? == 1.0)
    })
    .await?;
    let held_locks = locks(dest).await?;
    ensure!(held_locks.len() == 1, "only B's lock: {held_locks:?}");
    let b_lock_revision = held_locks[0].1;

    // The premise: the checkpoint is still the one A last wrote, so A's
    // parked txn passes the chain compare, and nobody promoted.
    let (checkpoint_revision, checkpoint) = checkpoint_now(dest).await?;
    let checkpoint: serde_json::Value = serde_json::from_slice(&checkpoint)?;
    ensure!(
        checkpoint["instance"] == "replica-a" && checkpoint_revision < b_lock_revision,
        "the checkpoint moved before A's txn was released: {checkpoint} at {checkpoint_revision}"
    );
    let head_before = dest.revision().await?;

    release_and_wait_for_answer(dest, dest_link_a).await?;
    ensure!(
        dest.revision().await? == head_before,
        "A's parked txn was applied after B took the lock (destination moved from revision {head_before} to {})",
        dest.revision().await?
    );
    ensure!(
        dest.client()
            .await?
            .get(STALE_KEY, None)
            .await?
            .kvs()
            .is_empty(),
        "A's data reached the destination after B took the lock"
    );
    a.signal(Signal::SIGCONT)?;

    // B catches up, including the change A could not write.
    source_link_b.restore();
    mirror.converge().await?;

    // The whole history: nothing A wrote is newer than B's lock, and the
    // stale key was only ever written in a txn of B's.
    let history = monotonic_checkpoint_history(dest, "app").await?;
    let late_from_a: Vec<_> = history
        .iter()
        .filter(|(revision, value)| *revision > b_lock_revision && value["instance"] == "replica-a")
        .collect();
    ensure!(
        late_from_a.is_empty(),
        "checkpoints written by A after B's lock (revision {b_lock_revision}): {late_from_a:?}"
    );
    for revision in put_revisions(dest, STALE_KEY).await? {
        let writer = history
            .iter()
            .find(|(r, _)| *r == revision)
            .map(|(_, value)| value["instance"].clone());
        ensure!(
            revision > b_lock_revision && writer == Some("replica-b".into()),
            "{STALE_KEY} written at revision {revision} by {writer:?}; B's lock is at {b_lock_revision}"
        );
    }
    println!("B's lock at revision {b_lock_revision}; A's parked txn was rejected");

    b.finish().await?;
    mirror.finish().await
}

/// A replicator's parked txn meets a destination where its lease and lock
/// are intact and the chain still matches, but the job was promoted
/// meanwhile: only the promoted fence can reject it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_fence_alone_rejects_a_held_txn() -> Result<()> {
    let mirror = proxied_replica_a(MirrorOptions {
        // A lease that outlives the whole freeze, so the lock fence still passes.
        extra_args: e2e::args(&[
            "--instance-id",
            "replica-a",
            "--lock-ttl",
            "120s",
            "--rebalance-interval",
            "120s",
        ]),
        ..MirrorOptions::loaded(50, 50)
    })
    .await?;
    let (source, dest, syncer) = (&mirror.source, &mirror.dest, &mirror.syncer);
    let dest_link = mirror.proxy.as_ref().context("proxy")?;

    park_a_txn_and_freeze(source, dest, dest_link, syncer).await?;
    let locks_before = locks(dest).await?;
    let (checkpoint_revision, _) = checkpoint_now(dest).await?;

    // Promote directly against the destination, not through the held link.
    let (code, output) = run_cli(&e2e::args(&[
        "promote",
        "--dst-endpoints",
        &dest.endpoints_arg(),
        "--job-name",
        "app",
    ]))
    .await?;
    ensure!(code == 0, "promote failed: {output}");
    let mut client = dest.client().await?;
    let marker = client
        .get(format!("{META_PREFIX}app/promoted"), None)
        .await?;
    // `promote` is two txns: the marker, then its record (the checkpoint
    // it read). Nothing may land after the record.
    let promoted_revision = marker
        .kvs()
        .first()
        .context("promoted marker")?
        .mod_revision();

    // The premise: the lock and the checkpoint are as the replicator knows
    // them, so its parked txn passes the lock and chain compares.
    ensure!(
        locks(dest).await? == locks_before && locks_before.len() == 1,
        "the replicator's lock changed while it was frozen: {locks_before:?}"
    );
    ensure!(
        checkpoint_now(dest).await?.0 == checkpoint_revision,
        "the checkpoint moved while the replicator was frozen"
    );
    ensure!(dest.revision().await? == promoted_revision);

    release_and_wait_for_answer(dest, dest_link).await?;
    ensure!(
        dest.revision().await? == promoted_revision,
        "the destination was written after the promoted marker (revision {promoted_revision} -> {})",
        dest.revision().await?
    );
    ensure!(
        client.get(STALE_KEY, None).await?.kvs().is_empty(),
        "the parked txn's data reached the promoted destination"
    );

    // Thawed, the replicator notices the promotion and stops replicating.
    syncer.signal(Signal::SIGCONT)?;
    mirror.wait_state("promoted").await?;
    ensure!(
        dest.revision().await? == promoted_revision,
        "the destination was written after the promoted marker"
    );
    println!("promoted at revision {promoted_revision}; the parked txn was rejected");
    mirror.finish().await
}
