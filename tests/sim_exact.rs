//! Deterministic simulation of `--revision-exact`.
//!
//! Each seed builds a world on paused tokio time: a source
//! [`etcd_syncer::etcd::memory`] store with some history, a destination
//! restored from a snapshot of it (or, when the source's history is whole,
//! an empty store at revision 1), one to three replicas running the real
//! [`etcd_syncer::mirror::exact::run`], and clients writing to the source:
//! puts, deletes, txns of several keys, range deletes bigger than one
//! destination txn, keys on leases that are revoked, kept alive or left to
//! expire, and compaction behind the standby or past it (at the source's
//! head, so a replica that lags or restarts must catch up over the
//! compacted stretch, `--exact-gap catch-up`). Faults drawn from the seed:
//! txns delayed (applied out of order), dropped, or applied with their
//! response lost; a replica partitioned, frozen past its lock TTL, crashed
//! and restarted; and, in some worlds, one of the two things that must end
//! in `parity_lost`: a stray write on the destination, or every replica
//! cut off long enough for a destination lease to expire on its own; or an
//! operator's promotion.
//!
//! After every step, over every destination commit since the last:
//! 1. a commit is a replay (it writes the checkpoint) or foreign (a stray
//!    write, a promotion, a lease expiry); while no foreign commit has
//!    happened, a replay commit lands at exactly the source revision its
//!    checkpoint names, and the destination then equals the source at that
//!    revision, key by key with value, create and mod revision, version and
//!    lease; after a catch-up ([`CaughtUp`]), the keys it explains may
//!    differ in revisions and version only, every key the source did not
//!    change in the stretch is exact, and while a catch-up is unfinished
//!    (the checkpoint short of its end) only the revision is checked;
//! 2. the checkpoint never decreases;
//! 3. after a foreign commit at most one replay commits (the one that
//!    finds it: no txn can compare the store's revision), and none after a
//!    promotion;
//! 4. a destination lease expires on its own only in a world that cut
//!    every replica off for longer than the lease's TTL and grace;
//! 5. the standby is never compacted past the primary (or the end of its
//!    last catch-up), and once the faults stop it is compacted exactly
//!    there.
//!
//! When the faults stop, a world without a foreign commit converges: the
//! destination reaches the source's revision and every revision from the
//! seed's (or the last catch-up's end) on reads the same on both sides. A world with one ends with the
//! job in `parity_lost` (or `promoted`) on every running replica. A replica
//! task that returns, or any task that panics, fails the seed.
//!
//! `SIM_EXACT_SEEDS=N` (default 500), `SIM_EXACT_SEED=S` replays one with
//! its log; the same seed gives the same digest (checked on 20 seeds).

#[cfg(not(tokio_unstable))]
compile_error!("the simulator needs `--cfg tokio_unstable` (set in .cargo/config.toml)");

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use etcd_syncer::config::{
    CheckSettings, ExactGap, JobSettings, LeaseMode, LeaseSettings, Tuning, TxnLimits,
};
use etcd_syncer::etcd::api::{Etcd, EventType, KeyValue, Op, TxnRequest};
use etcd_syncer::etcd::memory::{new_store, Faults, Link, MemoryEtcd, SharedStore};
use etcd_syncer::etcd::Cluster;
use etcd_syncer::mirror::exact::ExactOptions;
use etcd_syncer::mirror::meta::Fence;
use etcd_syncer::mirror::writer::DestWriter;
use etcd_syncer::mirror::JobContext;
use etcd_syncer::model::exact::{compare_states, explained_by, CaughtUp};
use etcd_syncer::model::ids::Ids;
use etcd_syncer::model::keys::{KeyRewrite, MetaKeys};
use etcd_syncer::model::schema::Checkpoint;
use etcd_syncer::model::versions::Quirks;
use etcd_syncer::model::Side;
use etcd_syncer::telemetry::health::Health;
use etcd_syncer::telemetry::metrics::{JobMetrics, Metrics};

const META: &str = "/-etcd-syncer-meta-/";
const JOB: &str = "root";
const LOCK_TTL: Duration = Duration::from_secs(3);
const GRACE: Duration = Duration::from_secs(20);
/// The destination's (and the syncer's) ops per txn: small, so range
/// deletes and lease expiries often exceed one txn.
const MAX_OPS: usize = 8;

/// What ends a world's parity, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Exact,
    StrayWrite,
    LeaseOutage,
    Promotion,
}

struct Replica {
    src_link: Arc<Link>,
    dst_link: Arc<Link>,
    metrics: Option<JobMetrics>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    incarnation: u32,
    restart_at: Option<Instant>,
}

struct World {
    seed: u64,
    rng: StdRng,
    verbose: bool,
    log: Vec<String>,
    source: SharedStore,
    dest: SharedStore,
    client: MemoryEtcd,
    replicas: Vec<Replica>,
    ending: Ending,
    /// Leases the clients keep alive, and those left to expire.
    kept: Vec<i64>,
    /// The first foreign destination commit (revision, by whom).
    foreign: Option<(i64, String)>,
    replays_after_foreign: usize,
    promoted: bool,
    /// Every replica was cut off from the destination long enough for its
    /// leases to run out.
    outage: bool,
    checkpoint: i64,
    /// The revision the destination started at (the snapshot's).
    seeded_at: i64,
    /// The catch-ups the last replay checkpoint records.
    gaps: Vec<CaughtUp>,
    catch_ups: u64,
    /// A replay commit was seen: the checkpoint exists.
    replayed: bool,
    /// The source was compacted past the seed before any replay: without
    /// a checkpoint nothing proves the standby a copy of this source, so
    /// the job must stop (`exact_blocked`) rather than catch up.
    seed_compacted: bool,
    fatal: Arc<Mutex<Vec<String>>>,
    hasher: std::collections::hash_map::DefaultHasher,
    commits: u64,
}

fn meta_free(state: BTreeMap<Vec<u8>, KeyValue>) -> BTreeMap<Vec<u8>, KeyValue> {
    state
        .into_iter()
        .filter(|(key, _)| !key.starts_with(META.as_bytes()))
        .collect()
}

/// After catch-ups: the stores hold the same keys, values and leases;
/// metadata differs only where a catch-up explains it, and every key the
/// source left alone during the last one is exact.
fn exact_but_caught_up(
    source: &BTreeMap<Vec<u8>, KeyValue>,
    dest: &BTreeMap<Vec<u8>, KeyValue>,
    gaps: &[CaughtUp],
) -> Result<(), String> {
    let (source_kvs, dest_kvs): (Vec<KeyValue>, Vec<KeyValue>) = (
        source.values().cloned().collect(),
        dest.values().cloned().collect(),
    );
    let report = compare_states(&source_kvs, &dest_kvs, gaps);
    if !report.is_equal() {
        return Err(format!(
            "the destination differs from the source after a catch-up: {report}"
        ));
    }
    let (last, earlier) = gaps.split_last().expect("a catch-up");
    for (key, kv) in source {
        let other = &dest[key];
        if kv.mod_revision <= last.from && kv != other && !explained_by(earlier, kv, other) {
            return Err(format!(
                "the catch-up over {}..{} rewrote {}, which the source did not change there",
                last.from,
                last.to,
                String::from_utf8_lossy(key)
            ));
        }
    }
    Ok(())
}

impl World {
    fn new(seed: u64, verbose: bool) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let source = new_store(1);
        source.lock().unwrap().max_txn_ops = 64;
        let ending = match rng.gen_range(0..10) {
            0 => Ending::StrayWrite,
            1 => Ending::LeaseOutage,
            2 => Ending::Promotion,
            _ => Ending::Exact,
        };
        let client = MemoryEtcd::new(source.clone(), Link::new("client", seed));
        Self {
            seed,
            rng,
            verbose,
            log: Vec::new(),
            dest: new_store(2),
            source,
            client,
            replicas: Vec::new(),
            ending,
            kept: Vec::new(),
            foreign: None,
            replays_after_foreign: 0,
            promoted: false,
            outage: false,
            checkpoint: 0,
            seeded_at: 0,
            gaps: Vec::new(),
            catch_ups: 0,
            replayed: false,
            seed_compacted: false,
            fatal: Default::default(),
            hasher: Default::default(),
            commits: 0,
        }
    }

    fn note(&mut self, line: String) {
        line.hash(&mut self.hasher);
        if self.verbose {
            eprintln!("[{:?}] {line}", Instant::now());
        }
        self.log.push(line);
        if self.log.len() > 60 {
            self.log.remove(0);
        }
    }

    fn key(&mut self) -> String {
        let dir = ["a", "b", "c"][self.rng.gen_range(0..3)];
        format!("/{dir}/k{:02}", self.rng.gen_range(0..12))
    }

    /// One client write to the source.
    async fn write(&mut self) {
        let choice = self.rng.gen_range(0..100);
        let result = match choice {
            0..=44 => {
                let (key, value) = (self.key(), format!("v{}", self.rng.gen::<u16>()));
                self.client
                    .txn(TxnRequest::new().and_then(vec![Op::put(key, value)]))
                    .await
                    .map(|_| ())
            }
            45..=59 => {
                let key = self.key();
                self.client
                    .txn(TxnRequest::new().and_then(vec![Op::delete(key)]))
                    .await
                    .map(|_| ())
            }
            60..=69 => {
                let mut keys: Vec<String> =
                    (0..self.rng.gen_range(2..6)).map(|_| self.key()).collect();
                keys.sort();
                keys.dedup();
                let ops = keys.into_iter().map(|k| Op::put(k, "multi")).collect();
                self.client
                    .txn(TxnRequest::new().and_then(ops))
                    .await
                    .map(|_| ())
            }
            70..=74 => {
                // Every key of a directory in one revision: often more
                // than one destination txn takes.
                let dir = ["/a/", "/b/", "/c/"][self.rng.gen_range(0..3)];
                let range = etcd_syncer::etcd::api::RangeRequest::prefix(dir.as_bytes());
                self.client
                    .txn(TxnRequest::new().and_then(vec![Op::Delete {
                        key: range.key,
                        range_end: range.range_end,
                    }]))
                    .await
                    .map(|_| ())
            }
            75..=89 => {
                // A key on a new lease: kept alive, or left to expire.
                // Leases a snapshot restores keep their TTL without a
                // grace: long ones, as Kubernetes' (its shortest, the
                // master leases, live 15 s; events an hour).
                let ttl = if self.seeded_at == 0 {
                    self.rng.gen_range(20..40)
                } else {
                    self.rng.gen_range(6..12)
                };
                match self.client.lease_grant(ttl, 0).await {
                    Ok(lease) => {
                        if self.rng.gen_bool(0.6) {
                            self.kept.push(lease);
                        }
                        let keys: Vec<String> = (0..self.rng.gen_range(1..7))
                            .map(|_| format!("/l/{lease:x}/{}", self.rng.gen::<u8>()))
                            .collect();
                        let mut ops: Vec<Op> = keys
                            .into_iter()
                            .map(|k| Op::put_with_lease(k, "leased", lease))
                            .collect();
                        ops.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
                        ops.dedup();
                        self.client
                            .txn(TxnRequest::new().and_then(ops))
                            .await
                            .map(|_| ())
                    }
                    Err(error) => Err(error),
                }
            }
            90..=94 => {
                if self.kept.is_empty() {
                    Ok(())
                } else {
                    let lease = self.kept.remove(self.rng.gen_range(0..self.kept.len()));
                    self.client.lease_revoke(lease).await
                }
            }
            _ => {
                // Compaction behind the standby's checkpoint (a Kubernetes
                // source compacts every five minutes), or at the head,
                // past a standby that lags.
                let head = self.source.lock().unwrap().revision();
                let at = if self.rng.gen_bool(0.3) {
                    head
                } else {
                    self.checkpoint.max(self.seeded_at) - self.rng.gen_range(0..4)
                };
                if at > 1 && at > self.source.lock().unwrap().compact_revision() {
                    self.source.lock().unwrap().compact(at);
                    if at > self.seeded_at && !self.replayed {
                        self.seed_compacted = true;
                    }
                }
                Ok(())
            }
        };
        let head = self.source.lock().unwrap().revision();
        self.note(format!(
            "client write {choice} -> source at {head}: {:?}",
            result.err().map(|e| e.to_string())
        ));
    }

    fn start(&mut self, index: usize) {
        let seed = self.seed;
        let replica = &mut self.replicas[index];
        replica.incarnation += 1;
        let name = format!("r{index}.{}", replica.incarnation);
        let timeout = Duration::from_secs(2);
        let source = Cluster::with_backend(
            Side::Source,
            format!("{name}->source"),
            Arc::new(MemoryEtcd::new(
                self.source.clone(),
                replica.src_link.clone(),
            )),
            timeout,
        );
        let dest = Cluster::with_backend(
            Side::Destination,
            format!("{name}->dest"),
            Arc::new(MemoryEtcd::new(self.dest.clone(), replica.dst_link.clone())),
            timeout,
        );
        let keys = MetaKeys::new(META, JOB);
        let metrics = Metrics::new().job(JOB);
        let ctx = JobContext {
            job: JobSettings {
                name: JOB.into(),
                ..Default::default()
            },
            writer: Arc::new(DestWriter::new(
                dest.clone(),
                keys.clone(),
                Fence::new(&keys, None),
                metrics.clone(),
            )),
            keys,
            rewrite: KeyRewrite::new("", ""),
            meta_prefix: META.as_bytes().to_vec(),
            source,
            dest,
            limits: TxnLimits {
                max_ops: MAX_OPS,
                max_bytes: 64 * 1024,
            },
            tuning: Tuning {
                progress_interval: Duration::from_millis(500),
                watch_idle_timeout: Duration::from_secs(5),
                request_timeout: timeout,
                ..Tuning::default()
            },
            max_prune_ratio: 1.0,
            metrics: metrics.clone(),
            instance_id: name.clone(),
            health: Arc::new(Health::new([JOB], Duration::from_secs(3600))),
            checks: CheckSettings {
                interval: Duration::ZERO,
                repair: false,
                sample_size: 3,
            },
            quirks: Quirks::default(),
            lease_settings: LeaseSettings {
                mode: LeaseMode::Faithful,
                grace: GRACE,
            },
            lag_origin: Default::default(),
            ids: Ids::seeded(
                seed.wrapping_mul(41)
                    .wrapping_add(u64::from(replica.incarnation) * 13 + index as u64),
            ),
        };
        let cancel = CancellationToken::new();
        replica.cancel = cancel.clone();
        replica.metrics = Some(metrics);
        replica.restart_at = None;
        let fatal = self.fatal.clone();
        replica.task = Some(tokio::spawn(async move {
            // It parks on every error; returning at all is a failure.
            let options = ExactOptions {
                lock_ttl: LOCK_TTL,
                gap: ExactGap::CatchUp,
            };
            let result = etcd_syncer::mirror::exact::run(ctx, options, cancel.clone()).await;
            if !cancel.is_cancelled() {
                fatal
                    .lock()
                    .unwrap()
                    .push(format!("{name} returned: {result:?}"));
            }
        }));
        self.note(format!("start r{index}"));
    }

    fn crash(&mut self, index: usize, down_for: Duration) {
        let replica = &mut self.replicas[index];
        replica.cancel.cancel();
        if let Some(task) = replica.task.take() {
            task.abort();
        }
        replica.metrics = None;
        replica.restart_at = Some(Instant::now() + down_for);
        self.note(format!("crash r{index} for {down_for:?}"));
    }

    fn restart_due(&mut self) {
        for index in 0..self.replicas.len() {
            if self.replicas[index]
                .restart_at
                .is_some_and(|at| at <= Instant::now())
            {
                self.start(index);
            }
        }
    }

    /// A link fault on one replica for a while (shorter than the lease grace).
    fn link_fault(&mut self) {
        let index = self.rng.gen_range(0..self.replicas.len());
        let to_dest = self.rng.gen_bool(0.6);
        let kind = self.rng.gen_range(0..4);
        let faults = match kind {
            0 => Faults {
                delay: (Duration::from_millis(1), Duration::from_millis(40)),
                ..Faults::default()
            },
            1 => Faults {
                lose_response: 0.3,
                drop_request: 0.1,
                ..Faults::default()
            },
            2 => Faults {
                partitioned: true,
                ..Faults::default()
            },
            _ => Faults {
                frozen: true,
                ..Faults::default()
            },
        };
        let link = if to_dest {
            self.replicas[index].dst_link.clone()
        } else {
            self.replicas[index].src_link.clone()
        };
        let generation = link.set_faults(faults);
        let lasts = Duration::from_millis(self.rng.gen_range(200..3000));
        tokio::spawn(async move {
            tokio::time::sleep(lasts).await;
            link.set_faults_if(generation, Faults::default());
        });
        self.note(format!(
            "fault {kind} on r{index} {} for {lasts:?}",
            if to_dest { "dest" } else { "source" }
        ));
    }

    async fn random_action(&mut self) {
        match self.rng.gen_range(0..100) {
            0..=69 => self.write().await,
            70..=84 => self.link_fault(),
            85..=89 => {
                let index = self.rng.gen_range(0..self.replicas.len());
                if self.replicas[index].task.is_some() {
                    let down_for = Duration::from_millis(self.rng.gen_range(100..3000));
                    self.crash(index, down_for);
                }
            }
            _ => {}
        }
    }

    /// The world's one parity-ending event, once, midway.
    async fn ending_event(&mut self) {
        match self.ending {
            Ending::Exact => {}
            Ending::StrayWrite => {
                let dest = MemoryEtcd::new(self.dest.clone(), Link::new("stray", self.seed));
                let result = dest
                    .txn(TxnRequest::new().and_then(vec![Op::put("/stray", "x")]))
                    .await;
                self.note(format!(
                    "stray write on the destination: {:?}",
                    result.map(|r| r.header.revision)
                ));
            }
            Ending::LeaseOutage => {
                // Every replica cut off from the destination until leases
                // granted with TTL + grace run out.
                self.outage = true;
                let lasts = Duration::from_secs(12) + GRACE + LOCK_TTL;
                for replica in &self.replicas {
                    let link = replica.dst_link.clone();
                    let generation = link.set_faults(Faults {
                        partitioned: true,
                        ..Faults::default()
                    });
                    tokio::spawn(async move {
                        tokio::time::sleep(lasts).await;
                        link.set_faults_if(generation, Faults::default());
                    });
                }
                self.note(format!(
                    "every replica cut off from the destination for {lasts:?}"
                ));
            }
            Ending::Promotion => {
                let dest = Cluster::with_backend(
                    Side::Destination,
                    "operator",
                    Arc::new(MemoryEtcd::new(
                        self.dest.clone(),
                        Link::new("operator", self.seed),
                    )),
                    Duration::from_secs(2),
                );
                let outcome = etcd_syncer::ops::admin::promote(&dest, META, JOB, "sim").await;
                self.promoted = outcome.is_ok();
                self.note(format!(
                    "promote: {:?}",
                    outcome.map(|o| o.final_checkpoint_revision)
                ));
            }
        }
    }

    /// Invariants 1-4 over the destination's commits since the last check.
    fn check(&mut self) -> Result<(), String> {
        if let Some(fatal) = self.fatal.lock().unwrap().first() {
            return Err(fatal.clone());
        }
        let checkpoint_key = MetaKeys::new(META, JOB).checkpoint().into_bytes();
        let commits = self.dest.lock().unwrap().take_commits();
        for commit in commits {
            self.commits += 1;
            (commit.revision, &commit.by, commit.events.len()).hash(&mut self.hasher);
            let written = commit
                .events
                .iter()
                .find(|e| e.kind == EventType::Put && e.kv.key == checkpoint_key)
                .map(|e| {
                    serde_json::from_slice::<Checkpoint>(&e.kv.value).expect("checkpoint parses")
                });
            let Some((checkpoint, gaps)) =
                written.map(|written| (written.last_synced_rev, written.exact_gaps))
            else {
                // After a promotion the standby's clients keep its leases;
                // after parity is lost nothing does.
                // A job blocked at its seed keeps no lease alive either.
                let blocked_at_seed = self.seed_compacted && !self.replayed;
                if commit.by == "lease-expiry"
                    && !self.outage
                    && !blocked_at_seed
                    && !self.promoted
                    && self.foreign.is_none()
                {
                    return Err(format!(
                        "destination lease {:?} expired on its own at revision {} without an outage",
                        commit.lease_end, commit.revision
                    ));
                }
                if self.foreign.is_none() {
                    self.note(format!(
                        "foreign commit at {} by {}",
                        commit.revision, commit.by
                    ));
                    self.foreign = Some((commit.revision, commit.by.clone()));
                }
                continue;
            };
            if checkpoint < self.checkpoint {
                return Err(format!(
                    "checkpoint went back from {} to {checkpoint}",
                    self.checkpoint
                ));
            }
            self.checkpoint = checkpoint;
            self.replayed = true;
            if gaps.len() > self.gaps.len() || gaps.last() != self.gaps.last() {
                if gaps.last().map(|g| g.from) != self.gaps.last().map(|g| g.from) {
                    self.catch_ups += 1;
                }
                self.note(format!("catch-up recorded: {:?}", gaps.last()));
            }
            self.gaps = gaps;
            if let Some((at, by)) = &self.foreign {
                self.replays_after_foreign += 1;
                let allowed = if self.promoted && by.starts_with("operator") {
                    0
                } else {
                    1
                };
                if self.replays_after_foreign > allowed {
                    return Err(format!(
                        "{} replay commits after the foreign commit at {at} by {by} (allowed {allowed}); the last at {}, of source revision {checkpoint}, by {}",
                        self.replays_after_foreign, commit.revision, commit.by
                    ));
                }
                continue;
            }
            if commit.revision != checkpoint {
                return Err(format!(
                    "a replay of source revision {checkpoint} committed at destination revision {}",
                    commit.revision
                ));
            }
            let dest = meta_free(self.dest.lock().unwrap().state_at(commit.revision));
            let source = self.source.lock().unwrap().state_at(checkpoint);
            if let Some(last) = self.gaps.last().copied() {
                if last.to > checkpoint {
                    // Mid catch-up: part of a difference, by design.
                    continue;
                }
                exact_but_caught_up(&source, &dest, &self.gaps)
                    .map_err(|error| format!("at {checkpoint}: {error}"))?;
                continue;
            }
            if dest != source {
                let differs: Vec<_> = source
                    .iter()
                    .filter(|(k, v)| dest.get(*k) != Some(*v))
                    .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
                    .chain(
                        dest.keys()
                            .filter(|k| !source.contains_key(*k))
                            .map(|k| String::from_utf8_lossy(k).into_owned()),
                    )
                    .take(5)
                    .collect();
                return Err(format!(
                    "the destination at {checkpoint} differs from the source: {differs:?}"
                ));
            }
        }
        let (source_compacted, dest_compacted) = (
            self.source.lock().unwrap().compact_revision(),
            self.dest.lock().unwrap().compact_revision(),
        );
        let caught_up_to = self.gaps.last().map_or(0, |gap| gap.to);
        if dest_compacted > source_compacted.max(caught_up_to) {
            return Err(format!(
                "the standby is compacted at {dest_compacted}, past the primary's {source_compacted} and the last catch-up's end {caught_up_to}"
            ));
        }
        Ok(())
    }

    /// Renews the leases clients keep, and lets both stores expire theirs.
    fn tick_leases(&mut self) {
        let now = Instant::now();
        let mut source = self.source.lock().unwrap();
        self.kept.retain(|lease| source.renew_for_test(*lease, now));
        source.expire_leases(now);
        drop(source);
        self.dest.lock().unwrap().expire_leases(now);
    }

    fn states(&self) -> Vec<&'static str> {
        self.replicas
            .iter()
            .filter_map(|r| r.metrics.as_ref().map(|m| m.state()))
            .collect()
    }
}

struct Outcome {
    digest: u64,
    commits: u64,
    ending: Ending,
    /// Catch-ups over compacted history the replay checkpoints recorded.
    catch_ups: u64,
}

async fn simulate(seed: u64, verbose: bool) -> Result<Outcome, (String, Vec<String>)> {
    let mut world = World::new(seed, verbose);
    // Some history, then the snapshot; or an empty standby when the
    // source's history is whole from revision 1.
    for _ in 0..world.rng.gen_range(0..30) {
        world.write().await;
        world.tick_leases();
    }
    let from_snapshot =
        world.rng.gen_bool(0.7) || world.source.lock().unwrap().compact_revision() > 0;
    if from_snapshot {
        let restored = world.source.lock().unwrap().restore(2, Instant::now());
        *world.dest.lock().unwrap() = restored;
    }
    world.seeded_at = world.dest.lock().unwrap().revision();
    world.checkpoint = world.seeded_at;
    world.dest.lock().unwrap().max_txn_ops = MAX_OPS;
    let count = world.rng.gen_range(1..=3);
    for index in 0..count {
        world.replicas.push(Replica {
            src_link: Link::new(format!("r{index}->source"), seed.wrapping_add(index as u64)),
            dst_link: Link::new(
                format!("r{index}->dest"),
                seed.wrapping_add(100 + index as u64),
            ),
            metrics: None,
            cancel: CancellationToken::new(),
            task: None,
            incarnation: 0,
            restart_at: None,
        });
        world.start(index);
    }
    world.note(format!(
        "{} replicas, seeded {} at {}, ending {:?}",
        count,
        if from_snapshot {
            "from a snapshot"
        } else {
            "empty"
        },
        world.seeded_at,
        world.ending
    ));
    let steps = world.rng.gen_range(40..120);
    let ending_at = world.rng.gen_range(10..steps);
    let failed = |world: &mut World, error: String| Err((error, std::mem::take(&mut world.log)));
    for step in 0..steps {
        tokio::time::sleep(Duration::from_millis(world.rng.gen_range(20..300))).await;
        world.tick_leases();
        world.restart_due();
        if step == ending_at {
            world.ending_event().await;
        } else {
            world.random_action().await;
        }
        if let Err(error) = world.check() {
            return failed(&mut world, error);
        }
    }
    // Faults stop: every replica back, writes go on a little, then stop.
    world.note("faults stop".into());
    for replica in &world.replicas {
        replica.src_link.set_faults(Faults::default());
        replica.dst_link.set_faults(Faults::default());
    }
    for index in 0..world.replicas.len() {
        if world.replicas[index].task.is_none() {
            world.start(index);
        }
    }
    for _ in 0..5 {
        world.write().await;
    }
    let quiet_until = Instant::now() + Duration::from_secs(40);
    while Instant::now() < quiet_until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        world.tick_leases();
        if let Err(error) = world.check() {
            return failed(&mut world, error);
        }
    }
    let states = world.states();
    match (&world.foreign, world.ending) {
        // No replay commit at all (`replayed` is false): the job stopped,
        // blocked, or on what else it found first (a stray write, a
        // promotion).
        (_, _) if world.seed_compacted && !world.replayed => {
            let stopped = ["error", "parity_lost", "promoted"];
            if states
                .iter()
                .any(|s| !stopped.contains(s) && *s != "standby")
                || !states.iter().any(|s| stopped.contains(s))
            {
                let message = format!(
                    "the seed's history was compacted before any replay, yet the states are {states:?}"
                );
                return failed(&mut world, message);
            }
        }
        (None, ending) => {
            let (source_rev, dest_rev) = (
                world.source.lock().unwrap().revision(),
                world.dest.lock().unwrap().revision(),
            );
            if ending == Ending::Promotion && world.promoted {
                return failed(
                    &mut world,
                    "promoted, but no foreign commit was seen".into(),
                );
            }
            if dest_rev != source_rev || world.checkpoint != source_rev {
                let message = format!(
                    "did not converge: source at {source_rev}, destination at {dest_rev}, checkpoint {} (states {states:?})",
                    world.checkpoint
                );
                return failed(&mut world, message);
            }
            // Every revision from the seed's (or the last catch-up's end)
            // on reads the same.
            let caught_up_to = world.gaps.last().map_or(0, |gap| gap.to);
            for revision in world.seeded_at.max(caught_up_to)..=source_rev {
                let dest = meta_free(world.dest.lock().unwrap().state_at(revision));
                let source = world.source.lock().unwrap().state_at(revision);
                let same = if world.gaps.is_empty() {
                    dest == source
                } else {
                    exact_but_caught_up(&source, &dest, &world.gaps).is_ok()
                };
                if !same {
                    return failed(&mut world, format!("revision {revision} reads differently"));
                }
            }
            // 5. The standby keeps the primary's history window.
            let (source_compacted, dest_compacted) = (
                world.source.lock().unwrap().compact_revision(),
                world.dest.lock().unwrap().compact_revision(),
            );
            if dest_compacted != source_compacted.max(caught_up_to) {
                return failed(&mut world, format!(
                    "the standby is compacted at {dest_compacted}, the primary at {source_compacted}, the last catch-up ended at {caught_up_to}"
                ));
            }
            if !states.contains(&"watching") {
                return failed(&mut world, format!("no replica is watching: {states:?}"));
            }
        }
        (Some((_, by)), _) => {
            let expected = if world.promoted && by.starts_with("operator") {
                "promoted"
            } else {
                "parity_lost"
            };
            let by = by.clone();
            if states.iter().any(|s| *s != expected && *s != "standby")
                || !states.contains(&expected)
            {
                return failed(
                    &mut world,
                    format!(
                        "after a foreign commit by {by}, states are {states:?}, not {expected}"
                    ),
                );
            }
        }
    }
    for replica in &world.replicas {
        replica.cancel.cancel();
    }
    Ok(Outcome {
        digest: world.hasher.finish(),
        commits: world.commits,
        ending: world.ending,
        catch_ups: world.catch_ups,
    })
}

fn run_seed(seed: u64, verbose: bool) -> Result<Outcome, (String, Vec<String>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .unhandled_panic(tokio::runtime::UnhandledPanic::ShutdownRuntime)
        .rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()))
        .build()
        .expect("runtime");
    fastrand::seed(seed);
    etcd_syncer::telemetry::clock::set_for_this_thread(Some(|| {
        std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }));
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(simulate(seed, verbose))
    })) {
        Ok(outcome) => outcome,
        Err(panic) => Err((
            format!(
                "panic: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            ),
            Vec::new(),
        )),
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs `count` seeds from `first` on a few threads; the digests by seed,
/// or the first failure with its log.
fn run_seeds(first: u64, count: u64) -> Result<BTreeMap<u64, Outcome>, String> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8) as u64;
    let next = std::sync::atomic::AtomicU64::new(first);
    let results = Mutex::new(BTreeMap::new());
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if seed >= first + count || failure.lock().unwrap().is_some() {
                    return;
                }
                match run_seed(seed, false) {
                    Ok(outcome) => {
                        results.lock().unwrap().insert(seed, outcome);
                    }
                    Err((error, log)) => {
                        let mut report = format!("seed {seed} failed: {error}\nlast actions:\n");
                        for line in log {
                            report.push_str(&format!("  {line}\n"));
                        }
                        report.push_str(&format!(
                            "replay: SIM_EXACT_SEED={seed} cargo test{} --test sim_exact -- --nocapture\n",
                            if cfg!(debug_assertions) { "" } else { " --release" }
                        ));
                        failure.lock().unwrap().get_or_insert(report);
                    }
                }
            });
        }
    });
    match failure.into_inner().unwrap() {
        Some(report) => Err(report),
        None => Ok(results.into_inner().unwrap()),
    }
}

#[test]
fn exact_simulation() {
    if let Some(seed) = env_u64("SIM_EXACT_SEED") {
        if std::env::var_os("SIM_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(std::env::var("SIM_LOG").unwrap_or_default())
                .with_test_writer()
                .try_init();
        }
        match run_seed(seed, true) {
            Ok(outcome) => eprintln!(
                "seed {seed}: ok, {:?}, digest {:016x}",
                outcome.ending, outcome.digest
            ),
            Err((error, _)) => panic!("seed {seed} failed: {error}"),
        }
        return;
    }
    let count = env_u64("SIM_EXACT_SEEDS").unwrap_or(500);
    let first = env_u64("SIM_EXACT_FIRST_SEED").unwrap_or(1);
    let results = run_seeds(first, count).unwrap_or_else(|report| panic!("{report}"));
    let mut endings: BTreeMap<String, usize> = BTreeMap::new();
    for outcome in results.values() {
        *endings.entry(format!("{:?}", outcome.ending)).or_default() += 1;
    }
    let commits: u64 = results.values().map(|o| o.commits).sum();
    let caught_up = results.values().filter(|o| o.catch_ups > 0).count();
    // The catch-up must be exercised, not merely allowed.
    if count >= 100 {
        assert!(
            caught_up * 20 >= count as usize,
            "only {caught_up} of {count} worlds caught up over compacted history"
        );
    }
    let mut digest = std::collections::hash_map::DefaultHasher::new();
    for (seed, outcome) in &results {
        (seed, outcome.digest).hash(&mut digest);
    }
    eprintln!(
        "exact simulation: {count} seeds from {first}, {commits} destination commits, endings {endings:?}, {caught_up} worlds caught up, digest {:016x}",
        digest.finish()
    );
}

#[test]
fn the_same_seeds_give_the_same_exact_worlds() {
    let first = run_seeds(1, 20).unwrap_or_else(|report| panic!("{report}"));
    let second = run_seeds(1, 20).unwrap_or_else(|report| panic!("{report}"));
    let digests =
        |r: &BTreeMap<u64, Outcome>| r.iter().map(|(s, o)| (*s, o.digest)).collect::<Vec<_>>();
    assert_eq!(digests(&first), digests(&second));
}
