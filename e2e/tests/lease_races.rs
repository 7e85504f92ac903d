//! The lease book against real etcd where 7cd13c5 lost live registrations
//! on the standby: a source member that lags (its lease list is older than
//! the leader's), a member that stops answering (SIGSTOP), a source lease
//! with etcd's longest TTL, and registrations that churn through a WAN link
//! while the leading replica is killed.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use e2e::leases::{grant_leases, leased_keys, put_leased, LeaseRenewer};
use e2e::proxy::LinkProxy;
use e2e::*;
use etcd_client::Client;
use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng};

const WAIT: Duration = Duration::from_secs(90);
const JOB: &str = "svc";
const PREFIX: &str = "/svc/";

async fn three_member_source() -> Result<EtcdCluster> {
    EtcdCluster::start_with(EtcdOptions {
        members: 3,
        role: Role::Source,
        ..EtcdOptions::default()
    })
    .await
}

fn syncer_args(source_endpoints: &str, dest: &EtcdCluster, extra: &[&str]) -> Vec<String> {
    syncer_args_to(source_endpoints, &dest.endpoints_arg(), extra)
}

fn syncer_args_to(source_endpoints: &str, dest_endpoints: &str, extra: &[&str]) -> Vec<String> {
    let mut args = e2e::args(&[
        "mirror-plus",
        "--src-endpoints",
        source_endpoints,
        "--dst-endpoints",
        dest_endpoints,
        "--prefix",
        PREFIX,
        "--progress-interval",
        "1s",
        "--watch-idle-timeout",
        "10s",
    ]);
    args.extend(e2e::args(extra));
    args
}

/// `check` until it exits 0 (it compares at the checkpoint, leases by the
/// job's records).
async fn check_consistent(source: &EtcdCluster, dest: &EtcdCluster) -> Result<()> {
    let last = Mutex::new(String::new());
    let outcome = eventually(WAIT, "check to exit 0", || {
        let last = &last;
        async move {
            let (code, output) = run_cli(&check_args(source, dest, &["--job-name", JOB])).await?;
            *last.lock().expect("last") = output;
            Ok(code == 0)
        }
    })
    .await;
    outcome.with_context(|| last.lock().expect("last").clone())
}

/// The destination keys under the prefix that sit on a lease.
async fn leased_count(dest: &mut Client) -> Result<usize> {
    Ok(leased_keys(dest, PREFIX)
        .await?
        .values()
        .filter(|(_, lease, _)| *lease != 0)
        .count())
}

/// L2: a source member behind a 400 ms link answers `LeaseLeases` from its
/// own lessor, so its list lacks leases the leader granted meanwhile. With
/// the standby across a WAN too (its commits trail the source), new
/// registrations are mapped before that list arrives and committed after
/// it; 7cd13c5 judged them gone and revoked their destination leases once
/// the checkpoint passed the list's revision, deleting live keys. No source
/// lease is ever revoked here, so none may be on the standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_member_s_lease_list_revokes_nothing() -> Result<()> {
    let source = three_member_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let (slow, slow_endpoint) = LinkProxy::in_front_of(&source.member_endpoint(2)).await?;
    slow.set_delay(Duration::from_millis(400));
    let (wan, dest_endpoint) = LinkProxy::in_front_of(&dest.member_endpoint(0)).await?;
    wan.set_delay(Duration::from_millis(100));
    let endpoints = format!(
        "{},{},{slow_endpoint}",
        source.member_endpoint(0),
        source.member_endpoint(1)
    );
    let mut syncer =
        Syncer::start("syncer", &syncer_args_to(&endpoints, &dest_endpoint, &[])).await?;
    wait_job_state(&syncer, JOB, "watching").await?;

    // Registrations every 60-140 ms for 40 s (few enough that each goes out
    // at once), on TTL-600 leases nobody revokes.
    let mut client = source.client().await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let started = Instant::now();
    let mut registered = 0usize;
    while started.elapsed() < Duration::from_secs(40) {
        let lease = client.lease_grant(600, None).await?.id();
        put_leased(
            &mut client,
            &[(format!("{PREFIX}inst-{registered:05}"), "up".into(), lease)],
        )
        .await?;
        registered += 1;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(60..140))).await;
    }
    let mut dst = dest.client().await?;
    eventually(WAIT, "every registration on the standby", || {
        let mut dst = dst.clone();
        async move { Ok(leased_count(&mut dst).await? == registered) }
    })
    .await?;
    // Past a keeper tick or two more: still every one.
    tokio::time::sleep(Duration::from_secs(6)).await;
    ensure!(
        leased_count(&mut dst).await? == registered,
        "a live registration vanished from the standby"
    );
    ensure!(
        syncer.count_log_messages("Retired mirrored leases.") == 0,
        "no destination lease may be retired: no source lease ended"
    );
    ensure!(
        syncer
            .metric("etcd_syncer_leases_mirrored", &[("job", JOB)])
            .await?
            == registered as f64
    );
    check_consistent(&source, &dest).await?;
    syncer.allow_error("Page read failed");
    syncer.finish().await
}

/// L6: a follower of the source SIGSTOPped for 45 s (quorum intact, the
/// registrations' lease kept alive through the leader). Requests sent its
/// way hang until the request timeout; 7cd13c5's keeper waited on one list
/// for it, renewed nothing, and the standby's leases (TTL 5 + 5 s grace)
/// expired with their 20 live keys. Probes and renewals are hedged now: the
/// keys stay the whole time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_drops_no_registration() -> Result<()> {
    let source = three_member_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let leader = source.leader_index().await?;
    let frozen = (leader + 1) % 3;
    // The registrations' client talks to the leader alone.
    let mut owner = Client::connect([source.member_endpoint(leader)], None).await?;
    let lease = grant_leases(&owner, 1, 5).await?[0];
    let renewer = LeaseRenewer::start(owner.clone(), &[lease], Duration::from_secs(1));
    let entries: Vec<(String, String, i64)> = (0..20)
        .map(|i| (format!("{PREFIX}inst-{i:02}"), "up".into(), lease))
        .collect();
    put_leased(&mut owner, &entries).await?;
    let mut syncer = Syncer::start(
        "syncer",
        &syncer_args(&source.endpoints_arg(), &dest, &["--lease-grace", "5s"]),
    )
    .await?;
    let mut dst = dest.client().await?;
    eventually(WAIT, "20 registrations on the standby", || {
        let mut dst = dst.clone();
        async move { Ok(leased_count(&mut dst).await? == 20) }
    })
    .await?;

    source.signal_member(frozen, Signal::SIGSTOP)?;
    let thawed = scopeguard(|| {
        let _ = source.signal_member(frozen, Signal::SIGCONT);
    });
    let started = Instant::now();
    let mut fewest = 20;
    while started.elapsed() < Duration::from_secs(45) {
        fewest = fewest.min(leased_count(&mut dst).await?);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(thawed);
    ensure!(
        fewest == 20,
        "the standby dropped live registrations while a source member was frozen: {fewest} of 20 left"
    );
    ensure!(
        syncer
            .metric(
                "etcd_syncer_errors_total",
                &[("job", JOB), ("kind", "dest_lease_expired")]
            )
            .await?
            == 0.0,
        "no destination lease expired"
    );
    check_consistent(&source, &dest).await?;
    drop(renewer);
    // The frozen member's requests time out while it is stopped.
    syncer.allow_error("timed out");
    syncer.allow_error("Page read failed");
    syncer.finish().await
}

/// L7: a source lease granted with etcd's longest TTL (9,000,000,000 s):
/// its destination lease is clamped to what etcd accepts (7cd13c5 asked for
/// that plus the grace, got "too large lease TTL", took it for compaction
/// and re-synced in a loop; keys written later never arrived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_with_etcd_s_longest_ttl_is_mirrored() -> Result<()> {
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let mut client = source.client().await?;
    let lease = client.lease_grant(9_000_000_000, None).await?.id();
    put_leased(
        &mut client,
        &[(format!("{PREFIX}forever"), "up".into(), lease)],
    )
    .await?;
    let syncer = Syncer::start("syncer", &syncer_args(&source.endpoints_arg(), &dest, &[])).await?;
    wait_job_state(&syncer, JOB, "watching").await?;
    put_leased(
        &mut client,
        &[(format!("{PREFIX}later"), "plain".into(), 0)],
    )
    .await?;
    converge(&source, PREFIX, &dest, PREFIX, WAIT).await?;
    let keys = leased_keys(&mut dest.client().await?, PREFIX).await?;
    let dest_lease = keys
        .get(&format!("{PREFIX}forever"))
        .context("the leased key")?
        .1;
    ensure!(dest_lease != 0, "on a destination lease");
    let ttl = e2e::leases::granted_ttl(&mut dest.client().await?, dest_lease)
        .await?
        .context("the destination lease lives")?;
    ensure!(ttl == 9_000_000_000, "clamped to etcd's maximum: {ttl}");
    ensure!(
        syncer
            .metric("etcd_syncer_slow_path_total", &[("job", JOB)])
            .await?
            == 1.0,
        "one full sync, no resync loop"
    );
    check_consistent(&source, &dest).await?;
    syncer.finish().await
}

/// Behaviour 7: 200 registrations on their own leases churn (new
/// instances register, old ones revoke or let their lease expire) for 60 s
/// through a 30 ms link to the source, under two replicas, one of which
/// (the leader) is killed half-way. A watcher on the destination checks
/// that no destination lease ever ends while the source lease of the same
/// ID lives; afterwards every source key is on the destination on a live
/// lease and `check` agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_churn_through_a_failover_without_a_false_revoke() -> Result<()> {
    let source = EtcdCluster::start_source().await?;
    let dest = EtcdCluster::start_dest().await?;
    let (wan, wan_endpoint) = LinkProxy::in_front_of(&source.member_endpoint(0)).await?;
    wan.set_delay(Duration::from_millis(15));
    let client = source.client().await?;
    let instances = 200usize;
    let leases = grant_leases(&client, instances, 6).await?;
    let renewer = LeaseRenewer::start(source.client().await?, &leases, Duration::from_secs(1));
    let entries: Vec<(String, String, i64)> = leases
        .iter()
        .enumerate()
        .map(|(i, lease)| (format!("{PREFIX}inst-{i:04}"), "up".into(), *lease))
        .collect();
    put_leased(&mut source.client().await?, &entries).await?;

    let replica = |id: &str| {
        syncer_args(
            &wan_endpoint,
            &dest,
            &[
                "--instance-id",
                id,
                "--lock-ttl",
                "4s",
                "--rebalance-interval",
                "60s",
            ],
        )
    };
    let mut a = Syncer::start("a", &replica("replica-a")).await?;
    wait_job_state(&a, JOB, "watching").await?;
    let b = Syncer::start("b", &replica("replica-b")).await?;

    // The watcher: a destination lease that ends while the source lease of
    // the same ID (the book's preferred mapping) lives is a false revoke.
    let false_revokes = Arc::new(Mutex::new(Vec::<i64>::new()));
    let checked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (mut src, mut dst) = (source.client().await?, dest.client().await?);
        let (false_revokes, checked, stop) = (false_revokes.clone(), checked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen: BTreeSet<i64> = BTreeSet::new();
            while !stop.load(Ordering::SeqCst) {
                if let Ok(now) = dst.leases().await {
                    let now: BTreeSet<i64> = now.leases().iter().map(|l| l.id()).collect();
                    for ended in seen.difference(&now) {
                        if let Ok(ttl) = src.lease_time_to_live(*ended, None).await {
                            checked.fetch_add(1, Ordering::Relaxed);
                            if ttl.ttl() > 0 {
                                false_revokes.lock().expect("list").push(*ended);
                            }
                        }
                    }
                    seen = now;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // Churn: every 150 ms an instance leaves (revoke, or its lease left to
    // expire) and a new one registers; the leader is killed at 30 s.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut live: Vec<(usize, i64)> = leases.iter().copied().enumerate().collect();
    let mut next = instances;
    let mut writer = source.client().await?;
    let started = Instant::now();
    let mut killed = false;
    let mut churned = 0u64;
    while started.elapsed() < Duration::from_secs(60) {
        if !killed && started.elapsed() > Duration::from_secs(30) {
            a.kill9()?;
            killed = true;
        }
        let index = rng.gen_range(0..live.len());
        let (_, gone) = live.swap_remove(index);
        renewer.release(&[gone]);
        if rng.gen_bool(0.6) {
            writer.lease_revoke(gone).await?;
        }
        let fresh = writer.lease_grant(6, None).await?.id();
        renewer.add(&[fresh]);
        put_leased(
            &mut writer,
            &[(format!("{PREFIX}inst-{next:04}"), "up".into(), fresh)],
        )
        .await?;
        live.push((next, fresh));
        next += 1;
        churned += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Leases left to expire are gone within their TTL.
    tokio::time::sleep(Duration::from_secs(8)).await;
    check_consistent(&source, &dest).await?;
    let keys = leased_keys(&mut dest.client().await?, PREFIX).await?;
    let source_keys = leased_keys(&mut source.client().await?, PREFIX).await?;
    ensure!(
        keys.len() == source_keys.len() && source_keys.keys().all(|k| keys.contains_key(k)),
        "every source key on the standby: {} there, {} on the source",
        keys.len(),
        source_keys.len()
    );
    let mut dst = dest.client().await?;
    let mut on_dead = Vec::new();
    let mut by_lease: HashMap<i64, usize> = HashMap::new();
    for (key, (_, lease, _)) in &keys {
        ensure!(*lease != 0, "{key} is on no lease");
        *by_lease.entry(*lease).or_default() += 1;
    }
    for lease in by_lease.keys() {
        if e2e::leases::granted_ttl(&mut dst, *lease).await?.is_none() {
            on_dead.push(*lease);
        }
    }
    ensure!(
        on_dead.is_empty(),
        "keys on dead destination leases: {on_dead:?}"
    );
    stop.store(true, Ordering::SeqCst);
    watcher.await?;
    let false_revokes = false_revokes.lock().expect("list").clone();
    ensure!(
        checked.load(Ordering::Relaxed) >= churned / 2,
        "the watcher saw destination leases end ({} checked for {churned} departures)",
        checked.load(Ordering::Relaxed)
    );
    ensure!(
        false_revokes.is_empty(),
        "destination leases ended while their source leases lived: {false_revokes:x?}"
    );
    drop(renewer);
    a.kill9()?;
    b.finish().await
}

/// Runs `f` when dropped (so a frozen member is thawed whatever fails).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
