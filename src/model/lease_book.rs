//! The lease book's decisions, as data (`--leases faithful`).
//!
//! [`LeaseCore`] is one leadership's view of the job's mirrored leases. The
//! shell (`mirror::leases`) feeds it [`Input`]s (writers' requests, the
//! answers of the I/O it asked for, checkpoint progress, clock ticks) through
//! [`LeaseCore::step`] and performs the [`Effect`]s it returns. Nothing here
//! does I/O or reads a clock: property tests drive it directly.
//!
//! What it keeps true by construction:
//! 1. **Recorded before attached.** A writer is only ever given a
//!    destination lease whose record (`source → destination`) the
//!    destination acknowledged, so a new leader knows every lease a key
//!    sits on. A mapping whose record is not committed is never retired,
//!    revoked, renewed or handed out.
//! 2. **No revoke on a stale word.** A key on source lease S that survives
//!    in a source state at revision `at` proves S was alive at `at` (its
//!    revoke would have deleted the key in that state). A destination lease
//!    is revoked only when (a) a linearizable read of the source's head
//!    returned H0, (b) a probe of S sent after it found no S alive
//!    (`LeaseTimeToLive`, which etcd answers on the leader after applying
//!    what it committed), (c) every key ever attached to the lease was
//!    wanted at `at <= H0`, (d) a head read sent after the probe's answer
//!    returned G, and (e) the checkpoint reached G. Whatever incarnation of
//!    S each key belonged to was alive at or before H0 and dead by the probe,
//!    so its keys were deleted at or before G, and those deletes are on the
//!    destination: revoking deletes nothing the source still has, even if
//!    the ID was granted again meanwhile (a replaced or rebuilt source hands
//!    the same IDs out). A lease list (`LeaseLeases`) is answered by
//!    whichever member receives it, from its own lessor, and lags behind
//!    the leader: it is never used.
//! 3. **A put goes where its incarnation lives.** A retiring mapping takes
//!    puts with `at <= H0` only (their incarnation ended by G); a later one
//!    may be a new incarnation of the ID and gets a new mapping.
//! 4. **A full sync sees one book.** Retiring evidence counts in one source
//!    history; a full sync may be on another (a rebuilt source), so when one
//!    starts every retiring lease stops taking keys (a resume, which proves
//!    the history first, lets them take keys again), and when it finishes
//!    they hold none (the sync moved or deleted every key of the prefix) and
//!    are revoked. No mapping retires while a full sync runs: a key it found
//!    on a mapping stays where the mapping's record says.
//! 5. **Nothing renewed blind.** A destination lease is renewed only after
//!    a probe found its source lease alive (retiring ones until the
//!    checkpoint passes their G), so a source that cannot be read lets the
//!    destination's registrations expire after TTL + grace, as the
//!    primary's would.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::model::schema::LeaseRecord;

/// etcd raises shorter TTLs to its minimum anyway (`minLeaseTTL`, a few
/// seconds); a destination lease never gets less.
pub const MIN_DEST_TTL_SECONDS: i64 = 5;
/// etcd refuses a longer TTL (`MaxLeaseTTL`, "too large lease TTL"): a
/// source lease granted near it plus the grace is clamped to it.
pub const MAX_DEST_TTL_SECONDS: i64 = 9_000_000_000;
/// Lease records written per txn: well under etcd's default 128 ops.
pub const RECORDS_PER_TXN: usize = 64;
const MIN_TICK: Duration = Duration::from_millis(500);
const MAX_TICK: Duration = Duration::from_secs(5);

/// The destination TTL for a source lease of `source_ttl` seconds (`None`:
/// already gone), within what etcd accepts.
pub fn dest_ttl(source_ttl: Option<i64>, grace_seconds: i64) -> i64 {
    source_ttl
        .unwrap_or(0)
        .max(0)
        .saturating_add(grace_seconds.max(0))
        .clamp(MIN_DEST_TTL_SECONDS, MAX_DEST_TTL_SECONDS)
}

/// A destination lease is renewed a third of its TTL after the last renewal.
fn renewal_period(dest_ttl: i64) -> Duration {
    Duration::from_secs((dest_ttl.max(1) as u64).div_ceil(3))
}

/// A writer's need: a destination lease for source lease `lease`, whose key
/// survives in the source state at revision `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Want {
    pub lease: i64,
    pub at: i64,
}

/// The source cluster and revision the destination's checkpoint counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct History {
    pub cluster_id: u64,
    pub revision: i64,
}

/// Why a writer's request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure<E> {
    /// An effect it waited for failed with this error.
    Effect(E),
    /// A mapping it waited for was lost (its destination lease vanished).
    Lost,
}

/// What the shell tells the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input<E> {
    /// A writer needs destination leases for `wants`; answered by
    /// [`Effect::Reply`] with the same `request`.
    Resolve {
        request: u64,
        wants: Vec<Want>,
    },
    /// A full sync will need these leases soon: grant and record them
    /// now, with nobody waiting (see [`LeaseCore::prefetch_backlog`]).
    Prefetch {
        wants: Vec<Want>,
    },
    /// Records read from the destination (a new leader, a new attempt).
    Load {
        records: Vec<(i64, LeaseRecord)>,
    },
    /// A [`Effect::Probe`] answered: `Ok(Some(ttl))` alive with its granted
    /// TTL, `Ok(None)` gone.
    Probed {
        lease: i64,
        serial: Option<u64>,
        outcome: Result<Option<i64>, E>,
    },
    /// A [`Effect::Grant`] answered with the destination lease (and the
    /// record's nonce the shell drew).
    Granted {
        lease: i64,
        outcome: Result<(i64, u64), E>,
    },
    Recorded {
        batch: u64,
        outcome: Result<(), E>,
    },
    /// A [`Effect::ReadHead`] answered: a linearizable read's cluster and revision.
    Head {
        batch: u64,
        outcome: Result<History, E>,
    },
    /// `Ok(false)`: the destination lease is gone.
    Renewed {
        serial: u64,
        outcome: Result<bool, E>,
    },
    /// `Ok(())` also when the lease was gone already.
    Revoked {
        serial: u64,
        outcome: Result<(), E>,
    },
    /// Destination leases a writer's txn found gone (read back one by one).
    DestGone {
        dests: Vec<i64>,
    },
    /// The destination reflects the source up to `revision` (of the
    /// checkpoint's history).
    Committed {
        revision: i64,
    },
    /// The job (re)starts from a checkpoint of this history.
    Resumed {
        history: History,
    },
    /// A full sync of `cluster_id`'s current history begins.
    FullSyncStarted {
        cluster_id: u64,
    },
    /// It finished at this history's revision.
    FullSyncDone {
        history: History,
    },
    /// Time passed: renewals, probes and revokes that are due.
    Tick,
    /// The job was promoted (or the leadership ends): forget everything,
    /// fail waiting requests with `error`.
    Clear {
        error: E,
    },
}

/// What the core asks the shell to do. Every answer comes back as an
/// [`Input`] carrying the same identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect<E> {
    /// `LeaseTimeToLive(lease)` on the source. `serial`: the mapping it
    /// judges (none: for a grant).
    Probe {
        lease: i64,
        serial: Option<u64>,
    },
    /// Grant a destination lease of `ttl` seconds, with `lease`'s own ID if
    /// the destination does not have it.
    Grant {
        lease: i64,
        ttl: i64,
    },
    /// Write these records in one fenced txn.
    Record {
        batch: u64,
        records: Vec<(i64, LeaseRecord)>,
    },
    /// A linearizable read of the source's head.
    ReadHead {
        batch: u64,
    },
    Renew {
        serial: u64,
        dest: i64,
    },
    Revoke {
        serial: u64,
        dest: i64,
    },
    /// Delete these records, each only if it still holds this value.
    Forget {
        records: Vec<(i64, LeaseRecord)>,
    },
    Reply {
        request: u64,
        outcome: Result<BTreeMap<i64, i64>, Failure<E>>,
    },
    /// These source leases' destination leases vanished while the
    /// destination still needed them: the attempt must give way to a full sync.
    Lost {
        leases: Vec<i64>,
    },
}

/// A mapping that takes keys: its source lease was last seen alive.
#[derive(Debug, Clone)]
struct Mapping {
    serial: u64,
    record: LeaseRecord,
    /// The destination acknowledged the record.
    recorded: bool,
    /// A record txn holding it is in flight.
    recording: bool,
    /// Its record txn failed: written again when a writer next asks, not
    /// in a loop against an error that may last.
    stalled: bool,
    /// `None`: due now (adopted, or its source lease was gone at the grant).
    renewed: Option<Instant>,
    /// A probe is out: `Some(h0)` if a head read returned H0 before it was sent.
    probing: Option<Option<i64>>,
    renewing: bool,
    /// The newest revision a key was wanted at for it (`None`: adopted from
    /// the records; the checkpoint bounds it once the job resumes).
    max_at: Option<i64>,
    /// A probe sent after head H0 found no source lease of this ID alive;
    /// it retires at the first head read sent after that answer.
    gone: Option<GoneSeen>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GoneSeen {
    /// H0 of the probe (`None`: no head read before it; judges nothing).
    before: Option<i64>,
    /// Head reads sent when the answer came: a later one's G counts.
    heads_sent: u64,
}

/// A mapping whose source lease is gone by G: renewed until its keys'
/// deletes are on the destination, then revoked.
#[derive(Debug, Clone)]
struct Retiring {
    serial: u64,
    source: i64,
    record: LeaseRecord,
    /// Every key it holds was deleted at or before this revision, of the
    /// history it was read in.
    g: i64,
    /// H0: it takes puts wanted at or before this revision.
    before: i64,
    /// It takes puts (`at <= before`) and is revoked once the checkpoint
    /// reaches g. False from the start of a full sync (which may be of
    /// another history) until a resume proves the history is the same.
    attachable: bool,
    /// A full sync finished since it stopped taking keys: it holds none.
    empty: bool,
    renewed: Option<Instant>,
    renewing: bool,
    revoking: bool,
}

impl Retiring {
    /// Revoking it deletes nothing the destination still needs.
    fn drained(&self, committed: Option<History>, full_sync: bool) -> bool {
        self.empty
            || (self.attachable && !full_sync && committed.is_some_and(|c| c.revision >= self.g))
    }
}

/// A grant under way for a source lease with no mapping.
#[derive(Debug, Clone, Default)]
struct PendingGrant {
    /// The probe answered `Some(ttl)`, `None` if gone; the grant is sent.
    source_ttl: Option<Option<i64>>,
}

#[derive(Debug)]
pub struct LeaseCore<E> {
    grace_seconds: i64,
    mappings: BTreeMap<i64, Mapping>,
    retiring: Vec<Retiring>,
    grants: BTreeMap<i64, PendingGrant>,
    /// Writers' requests waiting for grants or records.
    requests: BTreeMap<u64, Vec<Want>>,
    /// Record txns in flight: the (source, serial) pairs each holds.
    record_batches: BTreeMap<u64, Vec<(i64, u64)>>,
    head_in_flight: Option<u64>,
    /// Head reads sent so far.
    heads_sent: u64,
    next_batch: u64,
    next_serial: u64,
    /// `None` until the job has read its checkpoint: nothing is judged gone.
    committed: Option<History>,
    /// A full sync is under way: retiring leases take no keys.
    full_sync: bool,
    /// (source, destination) pairs found dead: a record naming one (its
    /// deletion may have failed) is never adopted again. Pairs, because an
    /// expired destination ID can be granted again for another lease.
    dead: BTreeSet<(i64, i64)>,
    /// Every destination lease a mapping or retiring lease has named since
    /// the last clear (a superset of those named now): a grant answered
    /// with an ID outside it needs no scan for a mapping it replaces.
    dest_ids: BTreeSet<i64>,
    /// Source leases prefetched and not yet recorded; ones given up on
    /// otherwise (lost, retired) are swept out at the next tick.
    prefetched: BTreeSet<i64>,
    /// Prefetched leases granted since the last record txn for them: written
    /// [`RECORDS_PER_TXN`] at a time, or when no grant is left in flight.
    prefetch_granted: Vec<i64>,
    _error: std::marker::PhantomData<E>,
}

impl<E: Clone> LeaseCore<E> {
    pub fn new(grace: Duration) -> Self {
        Self {
            grace_seconds: grace.as_secs() as i64,
            mappings: BTreeMap::new(),
            retiring: Vec::new(),
            grants: BTreeMap::new(),
            requests: BTreeMap::new(),
            record_batches: BTreeMap::new(),
            head_in_flight: None,
            heads_sent: 0,
            next_batch: 1,
            next_serial: 1,
            committed: None,
            full_sync: false,
            dead: BTreeSet::new(),
            dest_ids: BTreeSet::new(),
            prefetched: BTreeSet::new(),
            prefetch_granted: Vec::new(),
            _error: std::marker::PhantomData,
        }
    }

    /// The destination lease a put of `want` is attached to now, if any:
    /// the recorded mapping, else a retiring one that `want`'s incarnation
    /// belongs to (rule 3).
    pub fn target(&self, want: Want) -> Option<i64> {
        if let Some(mapping) = self.mappings.get(&want.lease) {
            return mapping.recorded.then_some(mapping.record.dest_lease);
        }
        if self.full_sync {
            return None;
        }
        self.retiring
            .iter()
            .rev()
            .find(|r| r.source == want.lease && r.attachable && want.at <= r.before)
            .map(|r| r.record.dest_lease)
    }

    /// Recorded mappings that take keys (source → destination).
    pub fn mapping(&self) -> BTreeMap<i64, i64> {
        self.mappings
            .iter()
            .filter(|(_, m)| m.recorded)
            .map(|(source, m)| (*source, m.record.dest_lease))
            .collect()
    }

    /// Mappings that are not retiring (recorded or not).
    pub fn mirrored_count(&self) -> usize {
        self.mappings.len()
    }

    pub fn retiring_count(&self) -> usize {
        self.retiring.len()
    }

    /// Whether any lease needs the keeper's ticks.
    pub fn is_idle(&self) -> bool {
        self.mappings.is_empty() && self.retiring.is_empty()
    }

    /// How long until the next tick: a sixth of the shortest destination
    /// TTL (so a renewal due at a third is sent well before the lease
    /// expires, with room for a failed probe or two), within 0.5 s to 5 s.
    pub fn tick_period(&self) -> Duration {
        let shortest = self
            .mappings
            .values()
            .map(|m| m.record.dest_ttl)
            .chain(self.retiring.iter().map(|r| r.record.dest_ttl))
            .min()
            .unwrap_or(i64::MAX);
        Duration::from_secs((shortest.max(1) as u64).div_ceil(6)).clamp(MIN_TICK, MAX_TICK)
    }

    fn serial(&mut self) -> u64 {
        self.next_serial += 1;
        self.next_serial - 1
    }

    fn batch(&mut self) -> u64 {
        self.next_batch += 1;
        self.next_batch - 1
    }

    /// One transition. `now` is the shell's clock at the input.
    pub fn step(&mut self, now: Instant, input: Input<E>) -> Vec<Effect<E>> {
        let mut effects = Vec::new();
        match input {
            Input::Resolve { request, wants } => self.resolve(request, wants, &mut effects),
            Input::Prefetch { wants } => self.prefetch(wants, &mut effects),
            Input::Load { records } => self.load(records),
            Input::Probed {
                lease,
                serial: None,
                outcome,
            } => self.probed_for_grant(lease, outcome, &mut effects),
            Input::Probed {
                lease,
                serial: Some(serial),
                outcome,
            } => self.probed(now, lease, serial, outcome, &mut effects),
            Input::Granted { lease, outcome } => self.granted(now, lease, outcome, &mut effects),
            Input::Recorded { batch, outcome } => self.recorded(batch, outcome, &mut effects),
            Input::Head { batch, outcome } => self.head(now, batch, outcome, &mut effects),
            Input::Renewed { serial, outcome } => self.renewed(now, serial, outcome, &mut effects),
            Input::Revoked { serial, outcome } => self.revoked(serial, outcome, &mut effects),
            Input::DestGone { dests } => {
                let dests: BTreeSet<i64> = dests.into_iter().collect();
                self.dests_gone(&dests, &mut effects);
            }
            Input::Committed { revision } => {
                if let Some(committed) = self.committed.as_mut() {
                    committed.revision = revision;
                }
            }
            Input::Resumed { history } => {
                self.committed = Some(history);
                self.full_sync = false;
                // Adopted mappings hold keys of states up to the checkpoint.
                for mapping in self.mappings.values_mut() {
                    mapping.max_at.get_or_insert(history.revision);
                }
                // The job proves the source's history is the checkpoint's
                // before it applies any event (else it re-syncs, and says so).
                for retiring in &mut self.retiring {
                    retiring.attachable = !retiring.empty;
                }
            }
            Input::FullSyncStarted { cluster_id } => {
                self.committed = Some(History {
                    cluster_id,
                    revision: 0,
                });
                self.full_sync = true;
                for retiring in &mut self.retiring {
                    retiring.attachable = false;
                }
            }
            Input::FullSyncDone { history } => {
                self.committed = Some(history);
                self.full_sync = false;
                // Every key of the prefix is now where the sync put it, for
                // the source at its revision (which may be of another
                // history than earlier keys' revisions).
                for mapping in self.mappings.values_mut() {
                    mapping.max_at = Some(history.revision);
                }
                for retiring in &mut self.retiring {
                    retiring.attachable = false;
                    retiring.empty = true;
                }
            }
            Input::Tick => self.tick(now, &mut effects),
            Input::Clear { error } => {
                for (request, _) in std::mem::take(&mut self.requests) {
                    effects.push(Effect::Reply {
                        request,
                        outcome: Err(Failure::Effect(error.clone())),
                    });
                }
                self.mappings.clear();
                self.retiring.clear();
                self.grants.clear();
                self.record_batches.clear();
                self.prefetched.clear();
                self.prefetch_granted.clear();
                self.dest_ids.clear();
                self.head_in_flight = None;
                // After a promotion the records are the truth again.
                self.dead.clear();
            }
        }
        self.send_records(&mut effects);
        self.answer_requests(&mut effects);
        effects
    }

    fn resolve(&mut self, request: u64, wants: Vec<Want>, effects: &mut Vec<Effect<E>>) {
        for want in &wants {
            self.start(*want, effects);
        }
        self.requests.insert(request, wants);
    }

    /// Starts what `wants` need, like a request nobody waits for; their
    /// records are written in batches as the grants come back.
    fn prefetch(&mut self, wants: Vec<Want>, effects: &mut Vec<Effect<E>>) {
        for want in wants {
            if want.lease == 0 || self.target(want).is_some() {
                continue;
            }
            self.start(want, effects);
            if self.target(want).is_none() {
                self.prefetched.insert(want.lease);
                // Granted already (its record failed, or is waiting for a
                // request's other grants): recorded with the next batch.
                if self.mappings.get(&want.lease).is_some_and(|m| !m.recorded) {
                    self.prefetch_granted.push(want.lease);
                }
            }
        }
    }

    /// Prefetched leases still being granted or recorded: a full sync's
    /// look-ahead keeps this bounded. Leases leave it when recorded or
    /// when their probe, grant or record fails, and at each tick if they
    /// were given up on otherwise, so it always drains.
    pub fn prefetch_backlog(&self) -> usize {
        self.prefetched.len()
    }

    /// Drops prefetched leases nothing is granting or recording any more.
    fn sweep_prefetched(&mut self) {
        let (grants, mappings) = (&self.grants, &self.mappings);
        // (A stalled record left the backlog when it failed.)
        self.prefetched.retain(|lease| {
            grants.contains_key(lease) || mappings.get(lease).is_some_and(|m| !m.recorded)
        });
    }

    /// Makes `want` attachable: nothing if it is; else its grant or record
    /// goes ahead, or a retiring lease of its ID takes keys again.
    /// Returns whether a retiring lease was mapped again (the only way a
    /// start makes a want attachable at once).
    fn start(&mut self, want: Want, effects: &mut Vec<Effect<E>>) -> bool {
        if want.lease == 0 || self.target(want).is_some() {
            return false;
        }
        if let Some(mapping) = self.mappings.get_mut(&want.lease) {
            // Its record is under way (or written again if it failed).
            mapping.stalled = false;
            return false;
        }
        if self.grants.contains_key(&want.lease) {
            return false;
        }
        // A key of the ID wanted after the retiring lease's H0 (another
        // incarnation of the ID: a replaced or rebuilt source hands IDs out
        // again), or during a full sync: the retiring lease maps the ID
        // again. A second destination lease would need a second record, and
        // the ID has one; this one keeps its record, and it retires again
        // only on a probe that sees past every key it was given.
        let full_sync = self.full_sync;
        let committed = self.committed;
        if let Some(index) = self
            .retiring
            .iter()
            .position(|r| r.source == want.lease && !r.revoking && !r.drained(committed, full_sync))
        {
            let retiring = self.retiring.remove(index);
            self.mappings.insert(
                want.lease,
                Mapping {
                    serial: retiring.serial,
                    record: retiring.record,
                    recorded: true,
                    recording: false,
                    stalled: false,
                    renewed: retiring.renewed,
                    probing: None,
                    renewing: retiring.renewing,
                    max_at: Some(retiring.before.max(want.at)),
                    gone: None,
                },
            );
            return true;
        }
        self.grants.insert(want.lease, PendingGrant::default());
        effects.push(Effect::Probe {
            lease: want.lease,
            serial: None,
        });
        false
    }

    fn load(&mut self, records: Vec<(i64, LeaseRecord)>) {
        for (source, record) in records {
            let retiring = self
                .retiring
                .iter()
                .any(|r| r.source == source && r.record.dest_lease == record.dest_lease);
            if retiring
                || self.mappings.contains_key(&source)
                || self.dead.contains(&(source, record.dest_lease))
            {
                continue;
            }
            self.dest_ids.insert(record.dest_lease);
            let serial = self.serial();
            self.mappings.insert(
                source,
                Mapping {
                    serial,
                    record,
                    recorded: true,
                    recording: false,
                    stalled: false,
                    renewed: None,
                    probing: None,
                    renewing: false,
                    max_at: None,
                    gone: None,
                },
            );
        }
    }

    fn probed_for_grant(
        &mut self,
        lease: i64,
        outcome: Result<Option<i64>, E>,
        effects: &mut Vec<Effect<E>>,
    ) {
        let Some(grant) = self.grants.get_mut(&lease) else {
            return;
        };
        match outcome {
            Ok(source_ttl) => {
                grant.source_ttl = Some(source_ttl);
                effects.push(Effect::Grant {
                    lease,
                    ttl: dest_ttl(source_ttl, self.grace_seconds),
                });
            }
            Err(error) => {
                self.grants.remove(&lease);
                self.prefetched.remove(&lease);
                self.fail_waiting(lease, Failure::Effect(error), effects);
            }
        }
    }

    fn granted(
        &mut self,
        now: Instant,
        lease: i64,
        outcome: Result<(i64, u64), E>,
        effects: &mut Vec<Effect<E>>,
    ) {
        let Some(grant) = self.grants.remove(&lease) else {
            return;
        };
        let (dest, nonce) = match outcome {
            Ok(granted) => granted,
            Err(error) => {
                self.prefetched.remove(&lease);
                return self.fail_waiting(lease, Failure::Effect(error), effects);
            }
        };
        let source_ttl = grant.source_ttl.flatten();
        // The destination handed out an ID another mapping names: that
        // lease had expired (records adopted before a renewal got to
        // them). Its keys are gone.
        if self.dest_ids.contains(&dest) {
            let dead: BTreeSet<i64> = [dest].into();
            self.dests_gone(&dead, effects);
        }
        self.dest_ids.insert(dest);
        self.dead.remove(&(lease, dest));
        if self.prefetched.contains(&lease) {
            self.prefetch_granted.push(lease);
        }
        let serial = self.serial();
        self.mappings.insert(
            lease,
            Mapping {
                serial,
                record: LeaseRecord {
                    dest_lease: dest,
                    source_ttl: source_ttl.unwrap_or(0),
                    dest_ttl: dest_ttl(source_ttl, self.grace_seconds),
                    grant: nonce,
                },
                recorded: false,
                recording: false,
                stalled: false,
                // Gone at the grant: probe it again at the next tick, so
                // the evidence that retires it is newer than the mapping.
                renewed: source_ttl.map(|_| now),
                probing: None,
                renewing: false,
                max_at: Some(0),
                gone: None,
            },
        );
    }

    /// Writes the records of granted mappings nobody is recording yet, for
    /// the requests whose every lease is granted: one txn for a writer's
    /// new leases (not one per grant), and no writer held up by another's.
    fn send_records(&mut self, effects: &mut Vec<Effect<E>>) {
        let granted = |w: &Want| {
            w.lease == 0 || self.mappings.contains_key(&w.lease) || self.target(*w).is_some()
        };
        let wanted: BTreeSet<i64> = self
            .requests
            .values()
            .filter(|wants| wants.iter().all(granted))
            .flatten()
            .map(|w| w.lease)
            .collect();
        // Prefetched grants, a txn's worth at a time (or the last few once
        // no grant is left in flight).
        let mut wanted = wanted;
        if self.prefetch_granted.len() >= RECORDS_PER_TXN
            || (!self.prefetch_granted.is_empty() && self.grants.is_empty())
        {
            wanted.extend(std::mem::take(&mut self.prefetch_granted));
        }
        // The wanted leases' mappings, in the same (source) order as a walk
        // of every mapping, without one (this runs after every input).
        let pending: Vec<(i64, u64, LeaseRecord)> = wanted
            .iter()
            .filter_map(|source| {
                self.mappings
                    .get(source)
                    .filter(|m| !m.recorded && !m.recording && !m.stalled)
                    .map(|m| (*source, m.serial, m.record))
            })
            .collect();
        for chunk in pending.chunks(RECORDS_PER_TXN) {
            let batch = self.batch();
            for (source, _, _) in chunk {
                if let Some(m) = self.mappings.get_mut(source) {
                    m.recording = true;
                }
            }
            self.record_batches.insert(
                batch,
                chunk.iter().map(|(s, serial, _)| (*s, *serial)).collect(),
            );
            effects.push(Effect::Record {
                batch,
                records: chunk.iter().map(|(s, _, r)| (*s, *r)).collect(),
            });
        }
    }

    fn recorded(&mut self, batch: u64, outcome: Result<(), E>, effects: &mut Vec<Effect<E>>) {
        let Some(members) = self.record_batches.remove(&batch) else {
            return;
        };
        for (source, serial) in members {
            // Recorded, or stalled until a writer asks: out of the backlog.
            self.prefetched.remove(&source);
            let Some(mapping) = self
                .mappings
                .get_mut(&source)
                .filter(|m| m.serial == serial)
            else {
                continue;
            };
            mapping.recording = false;
            match &outcome {
                Ok(()) => mapping.recorded = true,
                // Left unrecorded: the next request writes it again. Its
                // destination lease holds no key and expires on its own
                // if nobody does.
                Err(error) => {
                    mapping.stalled = true;
                    self.fail_waiting(source, Failure::Effect(error.clone()), effects)
                }
            }
        }
    }

    /// Answers every request whose leases all have targets now.
    fn answer_requests(&mut self, effects: &mut Vec<Effect<E>>) {
        // One pass over every waiting want per round (this runs after every
        // input, with thousands of wants waiting during a leased full sync).
        loop {
            let mut ready = Vec::new();
            // A request waiting on a lease nothing is granting or recording
            // any more (its mapping was lost or retired meanwhile) starts it
            // again.
            let mut stranded = Vec::new();
            for (request, wants) in &self.requests {
                let mut all = true;
                for want in wants.iter().filter(|w| w.lease != 0) {
                    if self.target(*want).is_none() {
                        all = false;
                        if !self.mappings.contains_key(&want.lease)
                            && !self.grants.contains_key(&want.lease)
                        {
                            stranded.push(*want);
                        }
                    }
                }
                if all {
                    ready.push(*request);
                }
            }
            for request in ready {
                let wants = self.requests.remove(&request).unwrap_or_default();
                let outcome = wants
                    .iter()
                    .filter(|w| w.lease != 0)
                    .filter_map(|w| self.target(*w).map(|dest| (w.lease, dest)))
                    .collect();
                // Keys go to the mapping now at these revisions: it may
                // retire only on a head read at or after the newest (rule 2).
                for want in wants.iter().filter(|w| w.lease != 0) {
                    if let Some(mapping) = self.mappings.get_mut(&want.lease) {
                        mapping.max_at = mapping.max_at.map(|m| m.max(want.at));
                    }
                }
                effects.push(Effect::Reply {
                    request,
                    outcome: Ok(outcome),
                });
            }
            let mut revived = false;
            for want in stranded {
                revived |= self.start(want, effects);
            }
            // A mapping revived for a waiting request may answer it now;
            // nothing else a start does makes a want attachable.
            if !revived {
                return;
            }
        }
    }

    /// Fails every request that waits on `lease`.
    fn fail_waiting(&mut self, lease: i64, failure: Failure<E>, effects: &mut Vec<Effect<E>>) {
        let failed: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, wants)| {
                wants
                    .iter()
                    .any(|w| w.lease == lease && self.target(*w).is_none())
            })
            .map(|(request, _)| *request)
            .collect();
        for request in failed {
            self.requests.remove(&request);
            effects.push(Effect::Reply {
                request,
                outcome: Err(failure.clone()),
            });
        }
    }

    fn probed(
        &mut self,
        now: Instant,
        lease: i64,
        serial: u64,
        outcome: Result<Option<i64>, E>,
        effects: &mut Vec<Effect<E>>,
    ) {
        let heads_sent = self.heads_sent;
        let full_sync = self.full_sync;
        let Some(mapping) = self.mappings.get_mut(&lease).filter(|m| m.serial == serial) else {
            // Answers about a mapping that is no longer there judge nothing.
            return;
        };
        let before = mapping.probing.take().flatten();
        match outcome {
            Ok(Some(_)) => mapping.gone = None,
            // During a full sync nothing retires (rule 4): the next probe
            // after it judges again.
            Ok(None) if !full_sync => {
                mapping.gone = Some(GoneSeen { before, heads_sent });
            }
            Ok(None) => {}
            // Not renewed this round; the next tick probes again.
            Err(_) => return,
        }
        // Alive, or gone with keys that stay until their deletes arrive:
        // renewed either way.
        if !mapping.renewing && renewal_due(mapping.renewed, mapping.record.dest_ttl, now) {
            mapping.renewing = true;
            effects.push(Effect::Renew {
                serial,
                dest: mapping.record.dest_lease,
            });
        }
        if mapping.gone.is_some() {
            self.read_head(effects);
        }
    }

    /// Sends a head read unless one is in flight (the next is sent when it
    /// returns, if still needed). Its answer is G for gone answers that
    /// came before it, and H0 for the probes sent after it.
    fn read_head(&mut self, effects: &mut Vec<Effect<E>>) {
        if self.head_in_flight.is_some() {
            return;
        }
        let batch = self.batch();
        self.heads_sent += 1;
        self.head_in_flight = Some(batch);
        effects.push(Effect::ReadHead { batch });
    }

    /// Mappings due for a probe now.
    fn due(&self, now: Instant) -> impl Iterator<Item = (&i64, &Mapping)> {
        self.mappings.iter().filter(move |(_, m)| {
            m.recorded
                && m.probing.is_none()
                && !m.renewing
                && m.gone.is_none()
                && renewal_due(m.renewed, m.record.dest_ttl, now)
        })
    }

    fn head(
        &mut self,
        now: Instant,
        batch: u64,
        outcome: Result<History, E>,
        effects: &mut Vec<Effect<E>>,
    ) {
        if self.head_in_flight != Some(batch) {
            return;
        }
        self.head_in_flight = None;
        let sent_as = self.heads_sent;
        // The read must count in the checkpoint's history: the same
        // cluster, not behind the checkpoint (a source replaced or rebuilt
        // under the job says nothing about the history the destination
        // reflects; the job's resume check finds it and re-syncs). And no
        // mapping retires during a full sync (rule 4).
        let head = match (&outcome, self.committed) {
            (Ok(head), Some(committed))
                if head.cluster_id == committed.cluster_id
                    && head.revision >= committed.revision =>
            {
                Some(head.revision)
            }
            _ => None,
        };
        let judged: Vec<i64> = self
            .mappings
            .iter()
            .filter(|(_, m)| m.gone.is_some_and(|g| g.heads_sent < sent_as))
            .map(|(source, _)| *source)
            .collect();
        for source in judged {
            let mapping = self.mappings.get_mut(&source).expect("listed");
            let gone = mapping.gone.take().expect("listed");
            let retire = match (head, gone.before, mapping.max_at) {
                (Some(g), Some(before), Some(max_at)) if !self.full_sync && max_at <= before => {
                    Some((g, before))
                }
                // Judged again at its next probe.
                _ => None,
            };
            let Some((g, before)) = retire else {
                continue;
            };
            let mapping = self.mappings.remove(&source).expect("listed");
            self.retiring.push(Retiring {
                serial: mapping.serial,
                source,
                record: mapping.record,
                g,
                before,
                attachable: true,
                empty: false,
                renewed: mapping.renewed,
                renewing: mapping.renewing,
                revoking: false,
            });
        }
        // This head is H0 for the probes that go out now.
        let due: Vec<(i64, u64)> = self
            .due(now)
            .map(|(source, m)| (*source, m.serial))
            .collect();
        for (source, serial) in due {
            if let Some(mapping) = self.mappings.get_mut(&source) {
                mapping.probing = Some(head);
            }
            effects.push(Effect::Probe {
                lease: source,
                serial: Some(serial),
            });
        }
        if self.mappings.values().any(|m| m.gone.is_some()) {
            self.read_head(effects);
        }
    }

    fn renewed(
        &mut self,
        now: Instant,
        serial: u64,
        outcome: Result<bool, E>,
        effects: &mut Vec<Effect<E>>,
    ) {
        if let Some(mapping) = self.mappings.values_mut().find(|m| m.serial == serial) {
            mapping.renewing = false;
            match outcome {
                Ok(true) => mapping.renewed = Some(now),
                Ok(false) => {
                    let dest: BTreeSet<i64> = [mapping.record.dest_lease].into();
                    self.dests_gone(&dest, effects);
                }
                Err(_) => {}
            }
            return;
        }
        let Some(index) = self.retiring.iter().position(|r| r.serial == serial) else {
            return;
        };
        self.retiring[index].renewing = false;
        match outcome {
            Ok(true) => self.retiring[index].renewed = Some(now),
            Ok(false) => {
                let dest: BTreeSet<i64> = [self.retiring[index].record.dest_lease].into();
                self.dests_gone(&dest, effects);
            }
            Err(_) => {}
        }
    }

    fn revoked(&mut self, serial: u64, outcome: Result<(), E>, effects: &mut Vec<Effect<E>>) {
        let Some(index) = self.retiring.iter().position(|r| r.serial == serial) else {
            return;
        };
        match outcome {
            Ok(()) => {
                let retired = self.retiring.remove(index);
                // Its record goes next; a load before that must not adopt it.
                self.dead
                    .insert((retired.source, retired.record.dest_lease));
                self.forget(vec![(retired.source, retired.record)], effects);
            }
            // Tried again at the next tick.
            Err(_) => self.retiring[index].revoking = false,
        }
    }

    /// Destination leases found gone: a live mapping on one lost keys the
    /// source still has; so did a retiring one whose keys' deletes are not
    /// on the destination yet. Either sends the job to a full sync.
    fn dests_gone(&mut self, dests: &BTreeSet<i64>, effects: &mut Vec<Effect<E>>) {
        let mut lost = Vec::new();
        let mut forget = Vec::new();
        let gone_mappings: Vec<i64> = self
            .mappings
            .iter()
            .filter(|(_, m)| dests.contains(&m.record.dest_lease))
            .map(|(source, _)| *source)
            .collect();
        for source in gone_mappings {
            let mapping = self.mappings.remove(&source).expect("listed");
            self.dead.insert((source, mapping.record.dest_lease));
            if mapping.recorded {
                lost.push(source);
                forget.push((source, mapping.record));
            }
            self.fail_waiting(source, Failure::Lost, effects);
        }
        let mut kept = Vec::with_capacity(self.retiring.len());
        for retiring in std::mem::take(&mut self.retiring) {
            if !dests.contains(&retiring.record.dest_lease) {
                kept.push(retiring);
                continue;
            }
            self.dead
                .insert((retiring.source, retiring.record.dest_lease));
            // During a full sync the sync puts back whatever it held.
            if !retiring.drained(self.committed, self.full_sync) && !self.full_sync {
                lost.push(retiring.source);
            }
            forget.push((retiring.source, retiring.record));
        }
        self.retiring = kept;
        self.forget(forget, effects);
        if !lost.is_empty() {
            effects.push(Effect::Lost { leases: lost });
        }
    }

    fn forget(&mut self, records: Vec<(i64, LeaseRecord)>, effects: &mut Vec<Effect<E>>) {
        // A source lease mapped again since: the record is the new mapping's.
        let records: Vec<(i64, LeaseRecord)> = records
            .into_iter()
            .filter(|(source, _)| !self.mappings.get(source).is_some_and(|m| m.recorded))
            .collect();
        if !records.is_empty() {
            effects.push(Effect::Forget { records });
        }
    }

    fn tick(&mut self, now: Instant, effects: &mut Vec<Effect<E>>) {
        self.sweep_prefetched();
        let mut probes_due = false;
        for mapping in self.mappings.values_mut() {
            let due = renewal_due(mapping.renewed, mapping.record.dest_ttl, now);
            if !mapping.recorded || !due || mapping.probing.is_some() || mapping.renewing {
                continue;
            }
            if mapping.gone.is_some() {
                // Known gone, waiting for the head read that retires it:
                // its keys stay until their deletes arrive.
                mapping.renewing = true;
                effects.push(Effect::Renew {
                    serial: mapping.serial,
                    dest: mapping.record.dest_lease,
                });
            } else {
                probes_due = true;
            }
        }
        let full_sync = self.full_sync;
        let committed = self.committed;
        for retiring in &mut self.retiring {
            if retiring.revoking {
                continue;
            }
            if retiring.drained(committed, full_sync) {
                retiring.revoking = true;
                effects.push(Effect::Revoke {
                    serial: retiring.serial,
                    dest: retiring.record.dest_lease,
                });
            } else if !retiring.renewing
                && renewal_due(retiring.renewed, retiring.record.dest_ttl, now)
            {
                retiring.renewing = true;
                effects.push(Effect::Renew {
                    serial: retiring.serial,
                    dest: retiring.record.dest_lease,
                });
            }
        }
        // Probes go out once a head read returns (their H0); gone answers
        // wait for one sent after them.
        if probes_due || self.mappings.values().any(|m| m.gone.is_some()) {
            self.read_head(effects);
        }
    }
}

fn renewal_due(renewed: Option<Instant>, dest_ttl: i64, now: Instant) -> bool {
    renewed.is_none_or(|last| now.saturating_duration_since(last) >= renewal_period(dest_ttl))
}

#[cfg(test)]
mod tests;
