//! Deterministic simulation of the whole data path.
//!
//! Each seed builds a world on paused tokio time: a source and a destination
//! [`etcd_syncer::etcd::memory`] store, one to three replicas running the
//! real `run_replica` (election, fences, full sync, watch, pipelined txns,
//! periodic check with repair), and a schedule of faults drawn from the seed:
//! txns delayed (so they are applied out of order), dropped, or applied with
//! their response lost; either side partitioned or slow; a replica frozen
//! past its lock TTL; a replica crashed (all memory lost) and restarted;
//! compaction at random points; promote and undo; reset requests; tampering
//! on the destination; the source prefix emptied and refilled; the source
//! replaced by a new cluster.
//!
//! After every step the invariants are checked against every destination
//! commit since the last step:
//! 1. the checkpoint never decreases (for one source cluster);
//! 2. every committed destination state whose checkpoint is c equals the
//!    source prefix at revision c;
//! 3. no write commits from an instance that does not hold the job lock at
//!    that moment, and none while the job is promoted;
//! 4. no full sync deletes more than `--max-prune-ratio` of the destination
//!    keys it started from (across all its retries);
//! 5. once faults stop, the destination converges to exact equality within
//!    a bounded simulated time;
//! 6. no replica ever writes a key under an `exclude-prefixes` range, and
//!    the destination's own keys there survive unchanged;
//! 7. a revision-map sample is written only in the txn that writes the
//!    checkpoint of the same whole source revision.
//!
//! Invariants 2 and 5 compare modulo the excluded ranges (drawn from the
//! seed with their own generator, so the rest of each seed's world is the
//! same as without them).
//!
//! `SIM_SEEDS=N` runs N seeds (default 1000), `SIM_SEED=S` replays one with
//! its action log, `SIM_FIRST_SEED` moves the range. A failure prints the
//! command that replays it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use etcd_syncer::config::{
    CheckSettings, JobSettings, LeaseMode, LeaseSettings, Tuning, TxnLimits,
};
use etcd_syncer::etcd::api::{Etcd, EventType, Op, TxnRequest};
use etcd_syncer::etcd::memory::{
    new_store, CommitRecord, Faults, Link, MemoryEtcd, SharedStore, Store,
};
use etcd_syncer::etcd::Cluster;
use etcd_syncer::ha::election::SessionManager;
use etcd_syncer::ha::replica::{run_replica, Instance};
use etcd_syncer::mirror::meta::Fence;
use etcd_syncer::mirror::writer::DestWriter;
use etcd_syncer::mirror::JobContext;
use etcd_syncer::model::keys::{KeyRewrite, MetaKeys};
use etcd_syncer::model::schema::{Checkpoint, FullSyncMarker, LeaseRecord, LockValue};
use etcd_syncer::model::versions::{Quirks, Version};
use etcd_syncer::model::Side;
use etcd_syncer::telemetry::health::Health;
use etcd_syncer::telemetry::metrics::Metrics;

const META: &str = "/-etcd-syncer-meta-/";
const JOB: &str = "app";
const SOURCE_PREFIX: &str = "/app/";
const KEY_SPACE: usize = 16;
const LIVENESS_BOUND: Duration = Duration::from_secs(180);

/// Suffix → (value, lease): on the source its lease, on the destination
/// the lease it is attached to there.
type Prefix = BTreeMap<Vec<u8>, (Vec<u8>, i64)>;

/// What one seed chose.
#[derive(Debug, Clone)]
struct Profile {
    replicas: usize,
    dest_prefix: String,
    max_ops: usize,
    /// `--max-txn-bytes`, and the destination's request limit.
    max_bytes: usize,
    value_len: usize,
    page_size: usize,
    max_inflight: usize,
    max_prune_ratio: f64,
    check_interval: Duration,
    repair: bool,
    lock_ttl: Duration,
    fault_phase: Duration,
    /// Keys on the destination before the mirror starts (not the source's).
    preexisting: usize,
    /// The source's version as the syncer sees it (the model behaves as a
    /// fixed server for progress, so every setting must hold).
    quirks: Quirks,
    leases: LeaseMode,
    lease_grace: Duration,
    revision_map_interval: Duration,
    revision_map_retention: Duration,
    /// `exclude-prefixes`, as source prefixes.
    excluded: Vec<String>,
    /// Derived from the page size, not drawn, so every seed's schedule stays
    /// as it was: odd page sizes remember about three deletions, so the
    /// full sync overflows into the second walk; even ones remember all.
    full_sync_delete_memory: usize,
}

impl Profile {
    fn draw(rng: &mut StdRng) -> Self {
        let dest_prefix = match rng.gen_range(0..4) {
            0 => String::new(),
            1 => "/mirror/".to_string(),
            _ => SOURCE_PREFIX.to_string(),
        };
        let mut profile = Self {
            replicas: rng.gen_range(1..=3),
            dest_prefix,
            max_ops: rng.gen_range(3..=8),
            max_bytes: if rng.gen_bool(0.3) {
                rng.gen_range(5_500..9_000)
            } else {
                1 << 20
            },
            value_len: if rng.gen_bool(0.3) {
                rng.gen_range(100..900)
            } else {
                0
            },
            page_size: rng.gen_range(2..=8),
            full_sync_delete_memory: 8 << 20,
            max_inflight: rng.gen_range(1..=4),
            max_prune_ratio: [0.25, 0.5, 0.9, 1.0][rng.gen_range(0..4)],
            check_interval: if rng.gen_bool(0.6) {
                Duration::from_millis(rng.gen_range(1500..5000))
            } else {
                Duration::ZERO
            },
            repair: rng.gen_bool(0.7),
            lock_ttl: Duration::from_secs(rng.gen_range(2..=4)),
            fault_phase: Duration::from_secs(rng.gen_range(10..40)),
            preexisting: if rng.gen_bool(0.3) {
                rng.gen_range(1..6)
            } else {
                0
            },
            quirks: Quirks::of(Version::parse(
                ["unknown", "3.4.23", "3.5.1", "3.5.18"][rng.gen_range(0..4)],
            )),
            leases: if rng.gen_bool(0.8) {
                LeaseMode::Faithful
            } else {
                LeaseMode::Strip
            },
            lease_grace: Duration::from_secs(rng.gen_range(1..=8)),
            revision_map_interval: Duration::from_millis(rng.gen_range(0..5_000)),
            revision_map_retention: Duration::from_secs(rng.gen_range(5..60)),
            excluded: Vec::new(),
        };
        if profile.page_size % 2 == 1 {
            profile.full_sync_delete_memory = 3 * 48;
        }
        profile
    }
}

struct Replica {
    name: String,
    incarnation: usize,
    src_link: Arc<Link>,
    dst_link: Arc<Link>,
    task: Option<JoinHandle<()>>,
    cancel: CancellationToken,
    /// When a crashed replica comes back.
    restart_at: Option<Instant>,
    max_prune_ratio: f64,
}

#[derive(Default)]
struct Episode {
    /// Mirror keys the destination held when the full sync began.
    before: BTreeSet<Vec<u8>>,
    baseline: u64,
    deleted: u64,
    ratio: f64,
}

struct World {
    seed: u64,
    rng: StdRng,
    profile: Profile,
    source: SharedStore,
    dest: SharedStore,
    writer: MemoryEtcd,
    operator: Cluster,
    replicas: Vec<Replica>,
    keys: MetaKeys,
    rewrite: KeyRewrite,
    /// Per source cluster id: the prefix at every revision that changed it.
    /// A cluster id rebuilt from scratch has several histories: one each.
    source_history: BTreeMap<u64, Vec<BTreeMap<i64, Arc<Prefix>>>>,
    source_now: Prefix,
    dest_now: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The lease of each destination key attached to one.
    dest_leases: BTreeMap<Vec<u8>, i64>,
    /// Source leases the "clients" hold: (ID, still kept alive).
    source_leases: Vec<(i64, bool)>,
    /// Lock keys: holder instance and create revision.
    dest_lock_create: BTreeMap<Vec<u8>, (String, i64)>,
    last_checkpoint: BTreeMap<u64, i64>,
    tampered: BTreeSet<Vec<u8>>,
    /// Destination-local keys under an excluded prefix, with their values:
    /// no replica may touch them.
    local_keys: BTreeMap<Vec<u8>, Vec<u8>>,
    episode: Option<Episode>,
    promoted_until: Option<Instant>,
    log: Vec<String>,
    faults: BTreeMap<&'static str, u64>,
    commits_checked: u64,
    checkpoints_checked: u64,
    samples_checked: u64,
    verbose: bool,
}

/// `exclude-prefixes` for `seed`, from a generator of their own: in 40% of
/// the worlds one or two ranges of the source's key space (`k1` covers
/// `k10`-`k19`, `k07` one key).
fn draw_excluded(seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6578_636c_7564_6521);
    if !rng.gen_bool(0.4) {
        return Vec::new();
    }
    let choices = ["k1", "k07", "k0", "k12"];
    let count = rng.gen_range(1..=2);
    (0..count)
        .map(|_| {
            format!(
                "{SOURCE_PREFIX}{}",
                choices[rng.gen_range(0..choices.len())]
            )
        })
        .collect()
}

fn err<T>(message: String) -> Result<T, String> {
    Err(message)
}

impl World {
    fn new(seed: u64, verbose: bool) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut profile = Profile::draw(&mut rng);
        profile.excluded = draw_excluded(seed);
        let source_id = rng.gen::<u64>() | 1;
        let source = new_store(source_id);
        let dest = new_store(rng.gen::<u64>() | 1);
        for store in [&source, &dest] {
            store.lock().unwrap().max_txn_ops = profile.max_ops.max(4) + 4;
        }
        // The destination enforces the byte limit the syncer is configured with.
        dest.lock().unwrap().max_request_bytes = profile.max_bytes;
        // The source runs an etcd with etcd-io/etcd#18089, as 3.4.23 and 3.5.1 do.
        source.lock().unwrap().loses_delete_at_compaction = true;
        let writer = MemoryEtcd::new(source.clone(), Link::new("writer", seed ^ 1));
        let operator = Cluster::with_backend(
            Side::Destination,
            "operator",
            Arc::new(MemoryEtcd::new(
                dest.clone(),
                Link::new("operator", seed ^ 2),
            )),
            Duration::from_secs(5),
        );
        let rewrite = KeyRewrite::new(SOURCE_PREFIX.as_bytes(), profile.dest_prefix.as_bytes())
            .excluding(&profile.excluded);
        let mut source_history = BTreeMap::new();
        source_history.insert(
            source_id,
            vec![BTreeMap::from([(1, Arc::new(Prefix::new()))])],
        );
        let mut world = Self {
            seed,
            rng,
            profile,
            source,
            dest,
            writer,
            operator,
            replicas: Vec::new(),
            keys: MetaKeys::new(META, JOB),
            rewrite,
            source_history,
            source_now: Prefix::new(),
            dest_now: BTreeMap::new(),
            dest_leases: BTreeMap::new(),
            source_leases: Vec::new(),
            dest_lock_create: BTreeMap::new(),
            last_checkpoint: BTreeMap::new(),
            tampered: BTreeSet::new(),
            local_keys: BTreeMap::new(),
            episode: None,
            promoted_until: None,
            log: Vec::new(),
            faults: BTreeMap::new(),
            commits_checked: 0,
            checkpoints_checked: 0,
            samples_checked: 0,
            verbose,
        };
        for i in 0..world.profile.replicas {
            let name = format!("r{i}");
            let replica = Replica {
                src_link: Link::new(format!("{name}.0-src"), seed.wrapping_add(10 + i as u64)),
                dst_link: Link::new(format!("{name}.0"), seed.wrapping_add(20 + i as u64)),
                name,
                incarnation: 0,
                task: None,
                cancel: CancellationToken::new(),
                restart_at: None,
                max_prune_ratio: world.profile.max_prune_ratio,
            };
            world.replicas.push(replica);
        }
        world
    }

    fn note(&mut self, what: String) {
        if self.verbose {
            eprintln!("[{:>8.3}s] {what}", self.now_secs());
        }
        self.log.push(format!("{:.3}s {what}", self.now_secs()));
        if self.log.len() > 60 {
            self.log.remove(0);
        }
    }

    fn now_secs(&self) -> f64 {
        START.with(|s| s.get().map_or(0.0, |s| s.elapsed().as_secs_f64()))
    }

    fn fault(&mut self, kind: &'static str) {
        *self.faults.entry(kind).or_default() += 1;
    }

    fn start(&mut self, index: usize) {
        let profile = self.profile.clone();
        let replica = &mut self.replicas[index];
        replica.incarnation += 1;
        let instance_id = format!("{}.{}", replica.name, replica.incarnation);
        // A new process: new connections, same network conditions.
        let src_faults = replica.src_link.faults();
        let dst_faults = replica.dst_link.faults();
        replica.src_link = Link::new(
            format!("{instance_id}-src"),
            self.seed
                .wrapping_mul(31)
                .wrapping_add(replica.incarnation as u64 * 7 + index as u64),
        );
        replica.dst_link = Link::new(
            instance_id.clone(),
            self.seed
                .wrapping_mul(37)
                .wrapping_add(replica.incarnation as u64 * 11 + index as u64),
        );
        replica.src_link.set_faults(src_faults);
        replica.dst_link.set_faults(dst_faults);
        let timeout = Duration::from_secs(2);
        let source = Cluster::with_backend(
            Side::Source,
            format!("{instance_id}->source"),
            Arc::new(MemoryEtcd::new(
                self.source.clone(),
                replica.src_link.clone(),
            )),
            timeout,
        );
        let dest = Cluster::with_backend(
            Side::Destination,
            format!("{instance_id}->dest"),
            Arc::new(MemoryEtcd::new(self.dest.clone(), replica.dst_link.clone())),
            timeout,
        );
        let metrics = Metrics::new().job(JOB);
        let keys = self.keys.clone();
        let template = JobContext {
            job: JobSettings {
                name: JOB.into(),
                prefix: SOURCE_PREFIX.into(),
                dest_prefix: profile.dest_prefix.clone(),
                exclude_prefixes: profile.excluded.clone(),
                ..Default::default()
            },
            writer: Arc::new(DestWriter::new(
                dest.clone(),
                keys.clone(),
                Fence::new(&keys, None),
                metrics.clone(),
            )),
            keys,
            rewrite: self.rewrite.clone(),
            meta_prefix: META.as_bytes().to_vec(),
            source,
            dest: dest.clone(),
            limits: TxnLimits {
                max_ops: profile.max_ops,
                max_bytes: profile.max_bytes,
            },
            tuning: Tuning {
                page_size: profile.page_size,
                max_inflight_txns: profile.max_inflight,
                progress_interval: Duration::from_millis(500),
                watch_idle_timeout: Duration::from_secs(5),
                request_timeout: timeout,
                idle_checkpoint_interval: Duration::from_secs(1),
                progress_log_interval: Duration::from_secs(3600),
                pipeline_send_spacing: Duration::from_millis(2),
                revision_map_interval: profile.revision_map_interval,
                revision_map_retention: profile.revision_map_retention,
                resync_loop_full_syncs: 3,
                resync_loop_stable_period: Duration::from_secs(600),
                full_sync_delete_memory: profile.full_sync_delete_memory,
            },
            max_prune_ratio: replica.max_prune_ratio,
            metrics,
            instance_id: instance_id.clone(),
            health: Arc::new(Health::new([JOB], Duration::from_secs(3600))),
            checks: CheckSettings {
                interval: profile.check_interval,
                repair: profile.repair,
                sample_size: 3,
            },
            quirks: profile.quirks,
            lease_settings: LeaseSettings {
                mode: profile.leases,
                grace: profile.lease_grace,
            },
            lag_origin: Default::default(),
        };
        let instance = Arc::new(Instance {
            sessions: Arc::new(SessionManager::new(dest, profile.lock_ttl)),
            leading: AtomicUsize::new(0),
            rebalancing: AtomicBool::new(false),
            total_jobs: 1.into(),
            lock_ttl: profile.lock_ttl,
            rebalance_interval: Duration::from_secs(30),
        });
        let cancel = CancellationToken::new();
        replica.cancel = cancel.clone();
        replica.restart_at = None;
        replica.task = Some(tokio::spawn(async move {
            let _ = run_replica(template, instance, cancel).await;
        }));
        let ratio = replica.max_prune_ratio;
        self.note(format!("start {instance_id} (max-prune-ratio {ratio})"));
    }

    fn crash(&mut self, index: usize, down_for: Duration) {
        if let Some(task) = self.replicas[index].task.take() {
            task.abort();
        }
        self.replicas[index].restart_at = Some(Instant::now() + down_for);
        let name = format!(
            "{}.{}",
            self.replicas[index].name, self.replicas[index].incarnation
        );
        self.note(format!("crash {name}, back in {down_for:?}"));
    }

    async fn write_source(&mut self) {
        let ops_count = if self.rng.gen_bool(0.1) {
            self.rng.gen_range(5..=12)
        } else {
            self.rng.gen_range(1..=3)
        };
        let mut keys = BTreeSet::new();
        let mut ops = Vec::new();
        for _ in 0..ops_count {
            let key = if self.rng.gen_bool(0.1) {
                format!("/other/{}", self.rng.gen_range(0..4))
            } else {
                format!("{SOURCE_PREFIX}k{:02}", self.rng.gen_range(0..KEY_SPACE))
            };
            if !keys.insert(key.clone()) {
                continue;
            }
            if self.rng.gen_bool(0.25) {
                ops.push(Op::delete(key));
            } else {
                let mut value = format!("v{}", self.rng.gen_range(0..1000));
                value.push_str(&"x".repeat(self.profile.value_len));
                // A registration: attached to a lease some client holds.
                let lease = if !self.source_leases.is_empty() && self.rng.gen_bool(0.35) {
                    self.source_leases[self.rng.gen_range(0..self.source_leases.len())].0
                } else {
                    0
                };
                ops.push(Op::put_with_lease(key, value, lease));
            }
        }
        let _ = self.writer.txn(TxnRequest::new().and_then(ops)).await;
    }

    /// The source's clients: grant leases, keep some alive, let others
    /// expire or revoke them. Expiry deletes their keys in one revision.
    async fn lease_clients(&mut self) {
        for (id, keep) in self.source_leases.clone() {
            if keep {
                let _ = self.writer.lease_renew(id).await;
            }
        }
        let alive: Vec<i64> = self.source.lock().unwrap().lease_ids();
        self.source_leases.retain(|(id, _)| alive.contains(id));
        let roll = self.rng.gen_range(0..100);
        if roll < 6 && self.source_leases.len() < 6 {
            let ttl = self.rng.gen_range(2..=6);
            if let Ok(id) = self.writer.lease_grant(ttl, 0).await {
                self.source_leases.push((id, true));
                self.note(format!("source client grants lease {id:x} (ttl {ttl}s)"));
            }
        } else if (6..9).contains(&roll) && !self.source_leases.is_empty() {
            let index = self.rng.gen_range(0..self.source_leases.len());
            self.source_leases[index].1 = false;
            self.fault("source_lease_abandoned");
            let id = self.source_leases[index].0;
            self.note(format!("source client stops renewing lease {id:x}"));
        } else if roll == 9 && !self.source_leases.is_empty() {
            let index = self.rng.gen_range(0..self.source_leases.len());
            let (id, _) = self.source_leases.remove(index);
            let _ = self.writer.lease_revoke(id).await;
            self.fault("source_lease_revoked");
            self.note(format!("source client revokes lease {id:x}"));
        }
    }

    async fn random_action(&mut self) {
        self.lease_clients().await;
        let roll = self.rng.gen_range(0..100);
        match roll {
            0..=54 => self.write_source().await,
            55..=59 => {
                let (current, compacted) = {
                    let store = self.source.lock().unwrap();
                    (store.revision(), store.compact_revision())
                };
                if current > compacted + 1 {
                    let at = self.rng.gen_range(compacted + 1..=current);
                    self.source.lock().unwrap().compact(at);
                    self.fault("compaction");
                    self.note(format!("compact source at {at}"));
                }
            }
            60..=71 => {
                let index = self.rng.gen_range(0..self.replicas.len());
                let dest_side = self.rng.gen_bool(0.6);
                let faults = self.draw_faults();
                let kind = if faults.partitioned {
                    "partition"
                } else if faults.frozen {
                    "freeze"
                } else if faults.drop_request > 0.0 || faults.lose_response > 0.0 {
                    "lossy_link"
                } else if faults.delay.1 > Duration::ZERO {
                    "slow_link"
                } else {
                    "heal_link"
                };
                self.fault(kind);
                let replica = &self.replicas[index];
                let link = if dest_side {
                    replica.dst_link.clone()
                } else {
                    replica.src_link.clone()
                };
                link.set_faults(faults.clone());
                self.note(format!("{kind} {} {:?}", link.name(), faults));
            }
            72..=75 => {
                let index = self.rng.gen_range(0..self.replicas.len());
                if self.replicas[index].task.is_some() {
                    let down = Duration::from_millis(self.rng.gen_range(0..4000));
                    self.fault("crash");
                    self.crash(index, down);
                }
            }
            76..=78 => {
                // A paused process: both links hold everything, past the lock TTL.
                let index = self.rng.gen_range(0..self.replicas.len());
                let ttl = self.profile.lock_ttl;
                let frozen = Faults {
                    frozen: true,
                    ..Faults::default()
                };
                self.replicas[index].src_link.set_faults(frozen.clone());
                self.replicas[index].dst_link.set_faults(frozen);
                let name = self.replicas[index].dst_link.name().to_string();
                self.fault("freeze_past_ttl");
                self.note(format!("freeze {name} for {:?}", ttl * 2));
                let (src, dst) = (
                    self.replicas[index].src_link.clone(),
                    self.replicas[index].dst_link.clone(),
                );
                tokio::spawn(async move {
                    tokio::time::sleep(ttl * 2).await;
                    src.set_faults(Faults::default());
                    dst.set_faults(Faults::default());
                });
            }
            79..=80 => {
                if self.promoted_until.is_none() {
                    let by = "sim-operator";
                    if etcd_syncer::ops::admin::promote(&self.operator, META, JOB, by)
                        .await
                        .is_ok()
                    {
                        let until =
                            Instant::now() + Duration::from_millis(self.rng.gen_range(500..6000));
                        self.promoted_until = Some(until);
                        self.fault("promote");
                        self.note("promote".into());
                    }
                }
            }
            81..=82 => {
                let result =
                    etcd_syncer::mirror::request_reset(&self.operator, &self.keys, "sim-operator")
                        .await;
                if result.is_ok() {
                    self.fault("reset_request");
                    self.note("reset requested".into());
                }
            }
            // Without a periodic check and repair nothing would ever undo it.
            83..=86 if self.profile.repair && !self.profile.check_interval.is_zero() => {
                self.tamper().await
            }
            87 => self.mass_rewrite().await,
            88 if self.rng.gen_bool(0.25) => self.replace_source(),
            89 if self.rng.gen_bool(0.25) => self.rebuild_source_same_id().await,
            90..=91 => self.compact_after_checkpoint().await,
            _ => self.write_source().await,
        }
    }

    fn draw_faults(&mut self) -> Faults {
        match self.rng.gen_range(0..6) {
            0 => Faults::default(),
            1 => Faults {
                delay: (
                    Duration::ZERO,
                    Duration::from_millis(self.rng.gen_range(1..80)),
                ),
                ..Faults::default()
            },
            2 => Faults {
                delay: (
                    Duration::ZERO,
                    Duration::from_millis(self.rng.gen_range(1..20)),
                ),
                drop_request: self.rng.gen_range(0.0..0.1),
                lose_response: self.rng.gen_range(0.0..0.1),
                ..Faults::default()
            },
            3 => Faults {
                partitioned: true,
                ..Faults::default()
            },
            4 => Faults {
                frozen: true,
                ..Faults::default()
            },
            _ => Faults {
                delay: (
                    Duration::from_millis(1),
                    Duration::from_millis(self.rng.gen_range(2..300)),
                ),
                ..Faults::default()
            },
        }
    }

    async fn tamper(&mut self) {
        let marker_present = self.dest_now.contains_key(self.keys.full_sync().as_bytes());
        if marker_present {
            return;
        }
        let suffix = format!("k{:02}", self.rng.gen_range(0..KEY_SPACE + 4));
        let key = self.rewrite.suffix_to_dest(suffix.as_bytes());
        let op = if self.rng.gen_bool(0.3) {
            Op::delete(key.clone())
        } else {
            Op::put(
                key.clone(),
                format!("tampered{}", self.rng.gen_range(0..100)),
            )
        };
        if self
            .operator
            .txn("tamper", TxnRequest::new().and_then(vec![op]))
            .await
            .is_ok()
        {
            self.tampered.insert(key.clone());
            self.fault("tamper");
            self.note(format!("tamper {}", String::from_utf8_lossy(&key)));
        }
    }

    /// The prefix emptied and refilled with other keys, then compacted: a
    /// full sync must delete a lot, and the mass-delete guard must hold.
    async fn mass_rewrite(&mut self) {
        let mut ops = vec![Op::Delete {
            key: SOURCE_PREFIX.as_bytes().to_vec(),
            range_end: etcd_syncer::model::keys::prefix_range_end(SOURCE_PREFIX.as_bytes()),
        }];
        for i in 0..self.rng.gen_range(2..8) {
            ops.push(Op::put(format!("{SOURCE_PREFIX}new{i:02}"), "refilled"));
        }
        let _ = self.writer.txn(TxnRequest::new().and_then(ops)).await;
        let head = self.source.lock().unwrap().revision();
        self.source.lock().unwrap().compact(head);
        self.fault("mass_rewrite");
        self.note(format!(
            "source prefix emptied, refilled and compacted at {head}"
        ));
    }

    fn replace_source(&mut self) {
        self.drain_source();
        let new_id = self.rng.gen::<u64>() | 1;
        let old = {
            let mut store = self.source.lock().unwrap();
            let mut fresh = Store::new(new_id);
            fresh.max_txn_ops = store.max_txn_ops;
            std::mem::replace(&mut *store, fresh)
        };
        drop(old);
        for replica in &self.replicas {
            replica.src_link.break_streams();
        }
        self.source_now.clear();
        self.source_history
            .entry(new_id)
            .or_default()
            .push(BTreeMap::from([(1, Arc::new(Prefix::new()))]));
        self.fault("source_replaced");
        self.note(format!("source replaced by cluster {new_id:x}"));
    }

    /// The source rebuilt from scratch with the same identity (cluster id):
    /// it takes new writes until its revision passes the old checkpoint.
    async fn rebuild_source_same_id(&mut self) {
        self.drain_source();
        let (id, old_revision) = {
            let mut store = self.source.lock().unwrap();
            let (id, revision) = (store.cluster_id(), store.revision());
            let mut fresh = Store::new(id);
            fresh.max_txn_ops = store.max_txn_ops;
            fresh.loses_delete_at_compaction = store.loses_delete_at_compaction;
            drop(std::mem::replace(&mut *store, fresh));
            (id, revision)
        };
        for replica in &self.replicas {
            replica.src_link.break_streams();
        }
        // A new history: its checkpoints start again from the bottom.
        self.last_checkpoint.remove(&id);
        self.source_now.clear();
        self.source_history
            .entry(id)
            .or_default()
            .push(BTreeMap::from([(1, Arc::new(Prefix::new()))]));
        for i in 0..old_revision + 2 {
            let key = if i % 3 == 0 {
                format!("{SOURCE_PREFIX}k{:02}", self.rng.gen_range(0..KEY_SPACE))
            } else {
                format!("/other/{i}")
            };
            let _ = self
                .writer
                .txn(TxnRequest::new().and_then(vec![Op::put(key, format!("rebuilt{i}"))]))
                .await;
        }
        self.fault("source_rebuilt_same_id");
        self.note(format!(
            "source rebuilt with the same cluster id {id:x}, revision passed {old_revision}"
        ));
    }

    /// Compacts the source exactly one revision past the destination's
    /// checkpoint and breaks the replicas' watches, so a resume watches from
    /// the compaction revision (where etcd-io/etcd#18089 loses a DELETE).
    async fn compact_after_checkpoint(&mut self) {
        let Some(checkpoint) = self
            .dest_now
            .get(self.keys.checkpoint().as_bytes())
            .and_then(|v| serde_json::from_slice::<Checkpoint>(v).ok())
        else {
            return;
        };
        let at = checkpoint.last_synced_rev + 1;
        {
            let mut store = self.source.lock().unwrap();
            if store.cluster_id() != checkpoint.source_cluster_id || at > store.revision() {
                return;
            }
            store.compact(at);
        }
        for replica in &self.replicas {
            replica.src_link.break_streams();
        }
        self.fault("compaction_at_checkpoint_plus_one");
        self.note(format!(
            "compact source at {at}, checkpoint + 1, and reset the watches"
        ));
    }

    /// The source prefix at `revision` in each history the cluster id had.
    fn source_at(&self, cluster_id: u64, revision: i64) -> Vec<&Prefix> {
        self.source_history
            .get(&cluster_id)
            .into_iter()
            .flatten()
            .filter_map(|history| history.range(..=revision).next_back())
            .map(|(_, prefix)| prefix.as_ref())
            .collect()
    }

    fn drain_source(&mut self) {
        let (cluster_id, commits) = {
            let mut store = self.source.lock().unwrap();
            (store.cluster_id(), store.take_commits())
        };
        for commit in commits {
            if self.verbose {
                let summary: Vec<String> = commit
                    .events
                    .iter()
                    .map(|e| match e.kind {
                        EventType::Put => format!(
                            "put {}={}",
                            String::from_utf8_lossy(&e.kv.key),
                            String::from_utf8_lossy(&e.kv.value)
                        ),
                        EventType::Delete => format!("del {}", String::from_utf8_lossy(&e.kv.key)),
                    })
                    .collect();
                eprintln!("    source rev {}: {}", commit.revision, summary.join(", "));
            }
            let mut changed = false;
            for event in &commit.events {
                let Some(suffix) = event.kv.key.strip_prefix(SOURCE_PREFIX.as_bytes()) else {
                    continue;
                };
                changed = true;
                match event.kind {
                    EventType::Put => {
                        self.source_now
                            .insert(suffix.to_vec(), (event.kv.value.clone(), event.kv.lease));
                    }
                    EventType::Delete => {
                        self.source_now.remove(suffix);
                    }
                }
            }
            if changed {
                let histories = self.source_history.entry(cluster_id).or_default();
                if histories.is_empty() {
                    histories.push(BTreeMap::new());
                }
                histories
                    .last_mut()
                    .expect("one history")
                    .insert(commit.revision, Arc::new(self.source_now.clone()));
            }
        }
    }

    fn dest_prefix_state(&self) -> Prefix {
        let dest_prefix = self.profile.dest_prefix.as_bytes();
        self.dest_now
            .iter()
            .filter(|(k, _)| k.starts_with(dest_prefix) && !k.starts_with(META.as_bytes()))
            .filter(|(k, _)| !self.rewrite.is_excluded_suffix(&k[dest_prefix.len()..]))
            .map(|(k, v)| {
                let lease = self.dest_leases.get(k).copied().unwrap_or(0);
                (k[dest_prefix.len()..].to_vec(), (v.clone(), lease))
            })
            .collect()
    }

    /// The destination state `source` should be mirrored as: each source
    /// lease replaced by the destination lease its record names (`-1`, which
    /// no key has, when there is no record), or by none with `--leases strip`.
    fn expected_dest(&self, source: &Prefix) -> Prefix {
        let records = self.lease_records();
        source
            .iter()
            .filter(|(suffix, _)| !self.rewrite.is_excluded_suffix(suffix))
            .map(|(suffix, (value, lease))| {
                let dest_lease = match (self.profile.leases, *lease) {
                    (LeaseMode::Strip, _) | (_, 0) => 0,
                    (LeaseMode::Faithful, lease) => records.get(&lease).copied().unwrap_or(-1),
                };
                (suffix.clone(), (value.clone(), dest_lease))
            })
            .collect()
    }

    /// Source lease → destination lease, from the records on the destination.
    fn lease_records(&self) -> BTreeMap<i64, i64> {
        let prefix = self.keys.lease_records();
        self.dest_now
            .range(prefix.as_bytes().to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix.as_bytes()))
            .filter_map(|(k, v)| {
                let source = self.keys.lease_of_record(k)?;
                let record: LeaseRecord = serde_json::from_slice(v).ok()?;
                Some((source, record.dest_lease))
            })
            .collect()
    }

    fn in_mirror(&self, key: &[u8]) -> bool {
        key.starts_with(self.profile.dest_prefix.as_bytes()) && !key.starts_with(META.as_bytes())
    }

    /// Checks invariants 1 to 4 on every destination commit since the last call.
    fn check(&mut self) -> Result<(), String> {
        self.drain_source();
        let commits = self.dest.lock().unwrap().take_commits();
        // The lock holder as of before each commit: replay lock keys too.
        let mut locks: BTreeMap<Vec<u8>, (String, i64)> = self.lock_table();
        for commit in commits {
            self.check_commit(&commit, &mut locks)?;
        }
        Ok(())
    }

    fn lock_table(&self) -> BTreeMap<Vec<u8>, (String, i64)> {
        // Rebuilt from the replayed destination state (lock values carry the instance).
        let lock_prefix = self.keys.lock_prefix();
        self.dest_lock_create
            .iter()
            .filter(|(k, _)| k.starts_with(lock_prefix.as_bytes()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn check_commit(
        &mut self,
        commit: &CommitRecord,
        locks: &mut BTreeMap<Vec<u8>, (String, i64)>,
    ) -> Result<(), String> {
        self.commits_checked += 1;
        if self.verbose {
            let summary: Vec<String> = commit
                .events
                .iter()
                .map(|e| {
                    let key = String::from_utf8_lossy(&e.kv.key).into_owned();
                    match e.kind {
                        EventType::Put if key.ends_with("/checkpoint") => format!(
                            "checkpoint={:?}",
                            serde_json::from_slice::<Checkpoint>(&e.kv.value)
                                .map(|c| c.last_synced_rev)
                                .ok()
                        ),
                        EventType::Put => {
                            format!("put {key}={}", String::from_utf8_lossy(&e.kv.value))
                        }
                        EventType::Delete => format!("del {key}"),
                    }
                })
                .collect();
            eprintln!(
                "    dest rev {} by {}: {}",
                commit.revision,
                commit.by,
                summary.join(", ")
            );
        }
        let checkpoint_key = self.keys.checkpoint().into_bytes();
        let marker_key = self.keys.full_sync().into_bytes();
        let promoted_key = self.keys.promoted().into_bytes();
        let lock_prefix = self.keys.lock_prefix().into_bytes();
        let by_replica = commit.by.starts_with('r');
        let touches_mirror = commit.events.iter().any(|e| {
            self.in_mirror(&e.kv.key) || e.kv.key == checkpoint_key || e.kv.key == marker_key
        });
        // Invariant 6: excluded keys are not the job's.
        let excluded_key = |key: &[u8]| {
            self.rewrite
                .dest_suffix(key)
                .is_some_and(|s| self.rewrite.is_excluded_suffix(s))
                && !key.starts_with(META.as_bytes())
        };
        for event in &commit.events {
            if !excluded_key(&event.kv.key) {
                continue;
            }
            if by_replica {
                return err(format!(
                    "invariant 6 (excluded prefix): {} wrote {:?} at destination revision {}, under an excluded prefix",
                    commit.by,
                    String::from_utf8_lossy(&event.kv.key),
                    commit.revision
                ));
            }
            // The world changed it (tampering): no longer the local original.
            self.local_keys.remove(&event.kv.key);
        }
        // Invariant 3: only the lock holder writes, and nobody while promoted.
        if by_replica && touches_mirror {
            if self.dest_now.contains_key(&promoted_key) {
                return err(format!(
                    "invariant 3 (promoted fence): {} wrote at destination revision {} while the job was promoted",
                    commit.by, commit.revision
                ));
            }
            let holder = locks
                .values()
                .min_by_key(|(_, create)| *create)
                .map(|(instance, _)| instance.clone());
            if holder.as_deref() != Some(commit.by.as_str()) {
                return err(format!(
                    "invariant 3 (lock fence): {} wrote at destination revision {} but the lock holder was {:?}",
                    commit.by, commit.revision, holder
                ));
            }
        }
        // Invariant 4, before applying: a marker appearing opens an episode.
        let marker_before = self.dest_now.contains_key(&marker_key);
        let mirror_before: BTreeSet<Vec<u8>> = if marker_before {
            BTreeSet::new()
        } else {
            self.dest_now
                .keys()
                .filter(|k| self.in_mirror(k))
                .cloned()
                .collect()
        };
        let mut deleted_in_mirror = Vec::new();
        for event in &commit.events {
            let key = &event.kv.key;
            if key.starts_with(&lock_prefix) {
                match event.kind {
                    EventType::Put => {
                        let instance = serde_json::from_slice::<LockValue>(&event.kv.value)
                            .map(|v| v.instance)
                            .unwrap_or_default();
                        locks.insert(key.clone(), (instance.clone(), event.kv.create_revision));
                        self.dest_lock_create
                            .insert(key.clone(), (instance, event.kv.create_revision));
                    }
                    EventType::Delete => {
                        locks.remove(key);
                        self.dest_lock_create.remove(key);
                    }
                }
            }
            match event.kind {
                EventType::Put => {
                    self.dest_now.insert(key.clone(), event.kv.value.clone());
                    if event.kv.lease != 0 {
                        self.dest_leases.insert(key.clone(), event.kv.lease);
                    } else {
                        self.dest_leases.remove(key);
                    }
                }
                EventType::Delete => {
                    self.dest_leases.remove(key);
                    if self.dest_now.remove(key).is_some() && self.in_mirror(key) {
                        deleted_in_mirror.push(key.clone());
                    }
                }
            }
            if by_replica {
                self.tampered.remove(key);
            }
        }
        if commit.by == "lease-expiry" && commit.events.iter().any(|e| self.in_mirror(&e.kv.key)) {
            // A mirrored lease ran out on the destination: no replica renewed
            // it for TTL + grace (a long outage or a promotion). Those keys
            // are the destination's loss until a full sync restores them.
            self.fault("dest_lease_expired");
            for event in &commit.events {
                if self.in_mirror(&event.kv.key) {
                    self.tampered.insert(event.kv.key.clone());
                }
            }
        }
        if commit.by == "operator" {
            // Tampering, or writes on a promoted standby: not the mirror's.
            for event in &commit.events {
                if self.in_mirror(&event.kv.key) {
                    self.tampered.insert(event.kv.key.clone());
                }
            }
        }
        let marker_after = self.dest_now.contains_key(&marker_key);
        if !marker_before && marker_after {
            let ratio = self
                .replicas
                .iter()
                .map(|r| r.max_prune_ratio)
                .fold(0.0, f64::max);
            self.episode = Some(Episode {
                baseline: mirror_before.len() as u64,
                before: mirror_before,
                deleted: 0,
                ratio,
            });
        }
        if let Some(episode) = self.episode.as_mut() {
            if by_replica {
                for key in &deleted_in_mirror {
                    // Keys the full sync itself wrote are not the destination's to guard.
                    if episode.before.remove(key) {
                        episode.deleted += 1;
                    }
                }
            }
            let allowed = (episode.ratio * episode.baseline as f64).floor() as u64;
            if episode.deleted > allowed {
                return err(format!(
                    "invariant 4 (prune guard): full syncs deleted {} of {} destination keys, more than --max-prune-ratio {} allows",
                    episode.deleted, episode.baseline, episode.ratio
                ));
            }
        }
        if marker_before && !marker_after {
            self.episode = None;
        }
        // Invariant 1: the checkpoint never decreases for one source.
        let checkpoint = self
            .dest_now
            .get(&checkpoint_key)
            .and_then(|v| serde_json::from_slice::<Checkpoint>(v).ok());
        if let Some(checkpoint) = &checkpoint {
            if commit.events.iter().any(|e| e.kv.key == checkpoint_key) {
                let last = self
                    .last_checkpoint
                    .entry(checkpoint.source_cluster_id)
                    .or_insert(0);
                if checkpoint.last_synced_rev < *last {
                    return err(format!(
                        "invariant 1 (checkpoint monotonic): checkpoint moved back from {} to {} at destination revision {} (by {})",
                        last, checkpoint.last_synced_rev, commit.revision, commit.by
                    ));
                }
                *last = checkpoint.last_synced_rev;
            }
        }
        // Invariant 7: a revision-map sample is written only by the txn
        // that writes the checkpoint of the same, whole source revision, so
        // its mod revision maps that source revision to this destination state.
        let map_prefix = self.keys.revision_map().into_bytes();
        for event in &commit.events {
            if event.kind != EventType::Put || !event.kv.key.starts_with(&map_prefix) {
                continue;
            }
            self.samples_checked += 1;
            let sampled = self.keys.revision_of_sample(&event.kv.key);
            let claimed = checkpoint
                .as_ref()
                .filter(|c| c.partial_revision.is_none())
                .map(|c| c.last_synced_rev);
            if !commit.events.iter().any(|e| e.kv.key == checkpoint_key) || sampled != claimed {
                return err(format!(
                    "invariant 7 (revision map): the sample for source revision {:?} was written at destination revision {} (by {}) with checkpoint {:?}",
                    sampled, commit.revision, commit.by, claimed
                ));
            }
        }
        // Invariant 2: a checkpointed state is the source at that revision.
        // Checked where the syncer claims it: every commit that writes the
        // checkpoint (a source rebuilt with the same id has another history
        // at the old revisions, which the destination never claimed).
        let writes_checkpoint = commit.events.iter().any(|e| e.kv.key == checkpoint_key);
        if let Some(checkpoint) = checkpoint.filter(|_| writes_checkpoint) {
            if marker_after || checkpoint.partial_revision.is_some() {
                return Ok(());
            }
            let candidates =
                self.source_at(checkpoint.source_cluster_id, checkpoint.last_synced_rev);
            if candidates.is_empty() {
                return Ok(());
            }
            let actual = self.dest_prefix_state();
            let tampered: BTreeSet<Vec<u8>> = self
                .tampered
                .iter()
                .filter_map(|k| self.rewrite.dest_suffix(k).map(<[u8]>::to_vec))
                .collect();
            let candidates: Vec<Prefix> = candidates
                .into_iter()
                .map(|source| self.expected_dest(source))
                .collect();
            let differs = |expected: &Prefix| -> Option<String> {
                let suffixes: BTreeSet<&Vec<u8>> = expected.keys().chain(actual.keys()).collect();
                suffixes
                    .into_iter()
                    .filter(|suffix| !tampered.contains(*suffix))
                    .find(|suffix| expected.get(*suffix) != actual.get(*suffix))
                    .map(|suffix| {
                        format!(
                            "key {:?} is {:?} on the destination and {:?} on the source",
                            String::from_utf8_lossy(suffix),
                            actual
                                .get(suffix)
                                .map(|(v, l)| (String::from_utf8_lossy(v).into_owned(), l)),
                            expected
                                .get(suffix)
                                .map(|(v, l)| (String::from_utf8_lossy(v).into_owned(), l)),
                        )
                    })
            };
            // A source rebuilt with the same id: any of its histories will do
            // (a txn built before the rebuild may land after it).
            let mismatches: Vec<String> = candidates.iter().filter_map(differs).collect();
            if mismatches.len() == candidates.len() {
                return err(format!(
                    "invariant 2 (checkpointed state): at destination revision {} (by {}) the checkpoint says source revision {} but {}",
                    commit.revision,
                    commit.by,
                    checkpoint.last_synced_rev,
                    mismatches.last().expect("at least one"),
                ));
            }
            self.checkpoints_checked += 1;
        }
        Ok(())
    }

    /// The replica whose prune guard is blocking, if the marker says so.
    fn prune_blocked(&self) -> bool {
        self.dest_now
            .get(self.keys.full_sync().as_bytes())
            .and_then(|v| serde_json::from_slice::<FullSyncMarker>(v).ok())
            .is_some_and(|m| m.prune_blocked.is_some())
    }

    fn converged(&self) -> bool {
        let source = self.source.lock().unwrap().current();
        let source: Prefix = source
            .into_iter()
            .filter_map(|(k, kv)| {
                k.strip_prefix(SOURCE_PREFIX.as_bytes())
                    .map(|s| (s.to_vec(), (kv.value, kv.lease)))
            })
            .collect();
        let expected = self.expected_dest(&source);
        let checkpoint_ok = self
            .dest_now
            .contains_key(self.keys.checkpoint().as_bytes())
            && !self.dest_now.contains_key(self.keys.full_sync().as_bytes());
        checkpoint_ok && self.dest_prefix_state() == expected
    }

    async fn restart_due(&mut self) {
        for index in 0..self.replicas.len() {
            if self.replicas[index]
                .restart_at
                .is_some_and(|at| at <= Instant::now())
            {
                self.start(index);
            }
        }
        if self.promoted_until.is_some_and(|at| at <= Instant::now())
            && etcd_syncer::ops::admin::undo_promote(&self.operator, META, JOB)
                .await
                .is_ok()
        {
            self.promoted_until = None;
            self.note("promote --undo".into());
        }
    }

    async fn seed_destination(&mut self) {
        // The destination's own keys under each excluded prefix.
        let mut local_keys = BTreeMap::new();
        for (i, prefix) in self.profile.excluded.iter().enumerate() {
            let source_key = format!("{prefix}-local{i}");
            let key = self.rewrite.to_dest(source_key.as_bytes()).expect("inside");
            local_keys.insert(key, format!("destination-local {i}").into_bytes());
        }
        if self.profile.preexisting == 0 && local_keys.is_empty() {
            return;
        }
        let ops: Vec<Op> = (0..self.profile.preexisting)
            .map(|i| {
                Op::put(
                    self.rewrite.suffix_to_dest(format!("old{i}").as_bytes()),
                    "before the mirror",
                )
            })
            .chain(
                local_keys
                    .iter()
                    .map(|(k, v)| Op::put(k.clone(), v.clone())),
            )
            .collect();
        self.operator
            .txn("preexisting", TxnRequest::new().and_then(ops))
            .await
            .expect("seeding the destination");
        // Not tampering: the first full sync owns these.
        self.check().expect("no invariant on seeding");
        self.tampered.clear();
        self.local_keys = local_keys;
    }
}

thread_local! {
    static START: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

struct Outcome {
    simulated: Duration,
    faults: BTreeMap<&'static str, u64>,
    commits: u64,
    checkpoints: u64,
    samples: u64,
}

async fn simulate(seed: u64, verbose: bool) -> Result<Outcome, (String, Vec<String>)> {
    START.with(|s| s.set(Some(Instant::now())));
    let mut world = World::new(seed, verbose);
    let started = Instant::now();
    world.note(format!("profile {:?}", world.profile));
    world.seed_destination().await;
    for index in 0..world.replicas.len() {
        world.start(index);
    }
    let fault_end = Instant::now() + world.profile.fault_phase;
    while Instant::now() < fault_end {
        let step = Duration::from_millis(world.rng.gen_range(20..400));
        tokio::time::sleep(step).await;
        if let Err(error) = world.check() {
            return Err((error, world.log));
        }
        world.restart_due().await;
        world.random_action().await;
    }
    // Faults stop: heal every link, undo a promotion, bring every replica
    // back; an operator overrides a prune guard that tripped.
    world.note("faults stop".into());
    for replica in &world.replicas {
        replica.src_link.set_faults(Faults::default());
        replica.dst_link.set_faults(Faults::default());
    }
    if world.promoted_until.is_some() {
        world.promoted_until = Some(Instant::now());
    }
    world.restart_due().await;
    for index in 0..world.replicas.len() {
        if world.replicas[index].task.is_none() {
            world.start(index);
        }
    }
    let heal_started = Instant::now();
    let mut overridden = false;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Err(error) = world.check() {
            return Err((error, world.log));
        }
        world.restart_due().await;
        if world.converged() {
            break;
        }
        if !overridden && world.prune_blocked() {
            overridden = true;
            world.note("operator raises --max-prune-ratio to 1 and restarts".into());
            if let Some(episode) = world.episode.as_mut() {
                episode.ratio = 1.0;
            }
            for index in 0..world.replicas.len() {
                world.replicas[index].max_prune_ratio = 1.0;
                if let Some(task) = world.replicas[index].task.take() {
                    world.replicas[index].cancel.cancel();
                    let _ = task.await;
                }
                world.start(index);
            }
        }
        if heal_started.elapsed() > LIVENESS_BOUND {
            let source = world.source.lock().unwrap().current().len();
            let message = format!(
                "invariant 5 (liveness): not converged {LIVENESS_BOUND:?} after faults stopped (source keys {source}, destination mirror {:?}, checkpoint {:?}, marker {:?})",
                world.dest_prefix_state().len(),
                world.dest_now.get(world.keys.checkpoint().as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned()),
                world.dest_now.get(world.keys.full_sync().as_bytes()).map(|v| String::from_utf8_lossy(v).into_owned()),
            );
            return Err((message, world.log));
        }
    }
    world.note("converged".into());
    for replica in &mut world.replicas {
        replica.cancel.cancel();
        if let Some(task) = replica.task.take() {
            let _ = task.await;
        }
    }
    if let Err(error) = world.check() {
        return Err((error, world.log));
    }
    for (key, value) in &world.local_keys {
        if world.dest_now.get(key) != Some(value) {
            let message = format!(
                "invariant 6 (excluded prefix): the destination's own key {:?} is {:?} at the end, not {:?}",
                String::from_utf8_lossy(key),
                world.dest_now.get(key).map(|v| String::from_utf8_lossy(v).into_owned()),
                String::from_utf8_lossy(value),
            );
            return Err((message, world.log));
        }
    }
    Ok(Outcome {
        simulated: started.elapsed(),
        faults: world.faults,
        commits: world.commits_checked,
        checkpoints: world.checkpoints_checked,
        samples: world.samples_checked,
    })
}

fn run_seed(seed: u64, verbose: bool) -> Result<Outcome, (String, Vec<String>)> {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_time().start_paused(true);
    #[cfg(tokio_unstable)]
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
    let runtime = builder.build().expect("runtime");
    fastrand::seed(seed);
    runtime.block_on(simulate(seed, verbose))
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn simulation() {
    if let Some(seed) = env_u64("SIM_SEED") {
        if std::env::var_os("SIM_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(std::env::var("SIM_LOG").unwrap_or_default())
                .with_writer(std::io::stderr)
                .try_init();
        }
        match run_seed(seed, true) {
            Ok(outcome) => eprintln!(
                "seed {seed}: ok, {:.0} simulated s, {} commits checked, faults {:?}",
                outcome.simulated.as_secs_f64(),
                outcome.commits,
                outcome.faults
            ),
            Err((error, _)) => panic!("seed {seed}: {error}"),
        }
        return;
    }
    let seeds = env_u64("SIM_SEEDS").unwrap_or(1000);
    let first = env_u64("SIM_FIRST_SEED").unwrap_or(1);
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8) as u64;
    let next = Arc::new(std::sync::atomic::AtomicU64::new(first));
    let totals = Arc::new(Mutex::new((
        Duration::ZERO,
        BTreeMap::<&'static str, u64>::new(),
        0u64,
        0u64,
        0u64,
        0u64,
    )));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (next, totals, failures) = (next.clone(), totals.clone(), failures.clone());
            scope.spawn(move || loop {
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if seed >= first + seeds || failures.lock().unwrap().len() >= 3 {
                    return;
                }
                match run_seed(seed, false) {
                    Ok(outcome) => {
                        let mut totals = totals.lock().unwrap();
                        totals.0 += outcome.simulated;
                        for (kind, n) in outcome.faults {
                            *totals.1.entry(kind).or_default() += n;
                        }
                        totals.2 += outcome.commits;
                        totals.3 += outcome.checkpoints;
                        totals.4 += 1;
                        totals.5 += outcome.samples;
                    }
                    Err((error, log)) => failures.lock().unwrap().push((seed, error, log)),
                }
            });
        }
    });
    let totals = totals.lock().unwrap();
    eprintln!(
        "simulation: {} seeds passed in {:.1} s: {:.1} simulated hours, {} destination commits, {} checkpointed states and {} revision-map samples checked; faults injected: {:?}",
        totals.4,
        started.elapsed().as_secs_f64(),
        totals.0.as_secs_f64() / 3600.0,
        totals.2,
        totals.3,
        totals.5,
        totals.1
    );
    let failures = failures.lock().unwrap();
    if let Some((seed, error, log)) = failures.first() {
        let mut report = format!("seed {seed} failed: {error}\nlast actions:\n");
        for line in log {
            report.push_str("  ");
            report.push_str(line);
            report.push('\n');
        }
        report.push_str(&format!(
            "replay: make sim SEED={seed}   (or SIM_SEED={seed} cargo test --test sim -- --nocapture)\n"
        ));
        for (seed, error, _) in failures.iter().skip(1) {
            report.push_str(&format!("also seed {seed}: {error}\n"));
        }
        panic!("{report}");
    }
}
