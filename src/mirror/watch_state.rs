//! The watch phase's state as data: what the watch has delivered and not
//! yet sent (the revision being assembled, the coalescer's sealed batches,
//! the last event of each revision), the idle-checkpoint rule, and the keys
//! a pending repair read must leave out. Its methods are the phase's
//! transitions, with no I/O and no timer (time comes in as `now`): the
//! loop in [`crate::mirror::incremental`] reads the watch, sends what
//! [`WatchState::next_batch`] gives it and performs what the answers ask.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

// tokio's clock, so the simulator's paused time governs every deadline.
use tokio::time::Instant;

use crate::etcd::api::{EventType, WatchResponse};
use crate::mirror::error::JobError;
use crate::model::batch::{Batch, BatchLimits, Coalescer, Mutation, SourceRevision};
use crate::model::keys::KeyRewrite;
use crate::model::schema::EventStamp;

/// What of the job the watch phase needs to turn events into mutations.
#[derive(Debug, Clone)]
pub struct WatchView {
    pub rewrite: KeyRewrite,
    /// The source may itself be a mirror's destination: its meta keys stay there.
    pub meta_prefix: Vec<u8>,
    /// Whether keys are reported to the lease book (`--leases faithful`).
    pub leases: bool,
}

/// What one watch response told the shell, besides the state it changed.
#[derive(Debug, Default, PartialEq)]
pub struct Delivered {
    /// The source head the response carried (the lag clock and progress).
    pub head: i64,
    /// Keys seen, as source suffixes, with the lease a put carried (`None`
    /// for a delete), for the lease book.
    pub observed: Vec<(Vec<u8>, Option<i64>)>,
    /// The checkpoint may advance to this revision on a quiet prefix.
    pub idle_advance: Option<i64>,
}

/// The watch phase's clocks: when a quiet prefix may move the checkpoint,
/// and when a silent watch counts as stalled.
#[derive(Debug, Clone, Copy)]
pub struct WatchTiming {
    /// How often an idle checkpoint may be written on a quiet prefix.
    pub idle_checkpoint: Duration,
    /// Servers whose progress answers may overtake events
    /// (etcd-io/etcd#15220): an idle checkpoint needs a confirming answer.
    pub confirm_progress: bool,
    /// A watch that answers nothing, not even progress, for this long is stalled.
    pub idle_timeout: Duration,
    /// Servers that may never answer a progress request on a new watch
    /// (etcd-io/etcd#17507): a silent watch is first probed with a read.
    pub probe_silence: bool,
}

/// What a progress tick asks of the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// Nothing beyond asking the watch for progress.
    Alive,
    /// Read the source once (off the loop) and report with [`WatchState::on_probe`].
    Probe,
    /// Silent past the timeout: the watch must be recreated.
    Stalled { idle: Duration },
}

/// Whether a watch still answers: silent past `idle_timeout` it is
/// stalled, or first probed with a read where the server may never answer
/// progress requests. Also the revision-exact replay's.
#[derive(Debug)]
pub struct Liveness {
    last_answer: Instant,
    idle_timeout: Duration,
    probe_silence: bool,
    probing: bool,
}

impl Liveness {
    pub fn new(idle_timeout: Duration, probe_silence: bool, now: Instant) -> Self {
        Self {
            last_answer: now,
            idle_timeout,
            probe_silence,
            probing: false,
        }
    }

    /// The watch answered (events or progress).
    pub fn answered(&mut self, now: Instant) {
        self.last_answer = now;
    }

    /// What a progress tick asks of the shell.
    pub fn on_tick(&mut self, now: Instant) -> Tick {
        let idle = now.saturating_duration_since(self.last_answer);
        if idle <= self.idle_timeout {
            return Tick::Alive;
        }
        if !self.probe_silence {
            return Tick::Stalled { idle };
        }
        if self.probing {
            return Tick::Alive;
        }
        self.probing = true;
        Tick::Probe
    }

    /// The probe's answer: a source that answers means a quiet watch, not a
    /// dead one (etcd-io/etcd#17507); one that does not means a stall.
    pub fn on_probe(&mut self, source_answered: bool, now: Instant) -> Result<(), JobError> {
        self.probing = false;
        if source_answered {
            self.last_answer = now;
            return Ok(());
        }
        Err(JobError::WatchStalled {
            idle: now.saturating_duration_since(self.last_answer),
        })
    }
}

/// Source values for a repair, read at `at_revision`.
pub struct RepairRead {
    pub at_revision: i64,
    pub mutations: Vec<(Mutation, &'static str)>,
}

pub struct WatchState {
    view: WatchView,
    assembling: Option<SourceRevision>,
    coalescer: Coalescer,
    idle: IdleCheckpoint,
    /// The last mirrored event of each revision pushed but not yet sent.
    stamps: VecDeque<(i64, EventStamp)>,
    /// Keys the watch changed since the pending repair read's revision.
    touched: Option<HashSet<Vec<u8>>>,
    reported_splits: u64,
    liveness: Liveness,
}

impl WatchState {
    /// From the checkpoint at `committed_revision`, with a watch just created at `now`.
    pub fn new(
        view: WatchView,
        limits: BatchLimits,
        committed_revision: i64,
        timing: WatchTiming,
        now: Instant,
    ) -> Self {
        Self {
            view,
            assembling: None,
            coalescer: Coalescer::new(limits, committed_revision),
            idle: IdleCheckpoint::new(timing.idle_checkpoint, timing.confirm_progress, now),
            stamps: VecDeque::new(),
            touched: None,
            reported_splits: 0,
            liveness: Liveness::new(timing.idle_timeout, timing.probe_silence, now),
        }
    }

    /// A progress tick: is the watch still answering?
    pub fn on_tick(&mut self, now: Instant) -> Tick {
        self.liveness.on_tick(now)
    }

    /// The probe's answer (see [`Liveness::on_probe`]).
    pub fn on_probe(&mut self, source_answered: bool, now: Instant) -> Result<(), JobError> {
        self.liveness.on_probe(source_answered, now)
    }

    /// The revision the next batch carries.
    pub fn through_revision(&self) -> i64 {
        self.coalescer.through_revision()
    }

    pub fn has_batches(&self) -> bool {
        !self.coalescer.is_empty()
    }

    /// Whether the watch may be read: a slow destination pushes back on the
    /// stream once `max_backlog` full batches wait, instead of growing memory.
    pub fn reading(&self, max_backlog: usize) -> bool {
        self.coalescer.sealed_len() < max_backlog
    }

    /// The next batch to send, with the last mirrored event it completes.
    pub fn next_batch(&mut self) -> Option<(Batch, Option<EventStamp>)> {
        let batch = self.coalescer.next_batch()?;
        let last_event = last_event_through(&mut self.stamps, &batch);
        Some((batch, last_event))
    }

    /// Source revisions split across txns since the last call (and the
    /// revision reached), to report once each.
    pub fn new_splits(&mut self) -> Option<(u64, i64)> {
        let splits = self.coalescer.split_revisions();
        (splits > self.reported_splits).then(|| {
            let new = splits - self.reported_splits;
            self.reported_splits = splits;
            (new, self.coalescer.through_revision())
        })
    }

    /// One watch response. `sending` says whether txns are still in flight
    /// (a busy pipeline never moves an idle checkpoint).
    pub fn on_response(
        &mut self,
        response: WatchResponse,
        sending: bool,
        now: Instant,
    ) -> Result<Delivered, JobError> {
        self.liveness.answered(now);
        if response.canceled {
            if response.compact_revision > 0 {
                return Err(JobError::Compacted {
                    compact_revision: response.compact_revision,
                });
            }
            return Err(JobError::WatchCanceled {
                reason: response.cancel_reason,
            });
        }
        let mut delivered = Delivered {
            head: response.header.revision,
            ..Delivered::default()
        };
        if response.events.is_empty() {
            if !response.created && delivered.head > 0 {
                let quiet = self.assembling.is_none() && self.coalescer.is_empty() && !sending;
                if let Some(revision) = self.idle.on_progress(
                    delivered.head,
                    quiet,
                    self.coalescer.through_revision(),
                    now,
                ) {
                    // An idle advance is an empty batch: the coalescer stays
                    // the one owner of the revision the next txn carries.
                    self.coalescer.advance_to(revision);
                    delivered.idle_advance = Some(revision);
                }
            }
            return Ok(delivered);
        }
        self.idle.on_events();
        let view = &self.view;
        for event in response.events {
            let revision = event.kv.mod_revision;
            if revision <= self.coalescer.through_revision() {
                // Already applied (a duplicate delivery after a resume):
                // applying it again would move a key back in time.
                continue;
            }
            if self
                .assembling
                .as_ref()
                .is_some_and(|r| r.revision != revision)
            {
                self.coalescer
                    .push(self.assembling.take().expect("checked"));
            }
            let current = self.assembling.get_or_insert_with(|| SourceRevision {
                revision,
                mutations: Vec::new(),
            });
            if event.kv.key.starts_with(&view.meta_prefix) {
                continue;
            }
            if view.rewrite.is_excluded_source(&event.kv.key) {
                // `exclude-prefixes`: neither applied nor recorded as the last event.
                continue;
            }
            let Some(dest_key) = view.rewrite.to_dest(&event.kv.key) else {
                continue;
            };
            if let Some(touched) = self.touched.as_mut() {
                touched.insert(dest_key.clone());
            }
            let stamp = match event.kind {
                EventType::Put => EventStamp::put(&event.kv.key, &event.kv.value, revision),
                EventType::Delete => EventStamp::delete(&event.kv.key, revision),
            };
            match self.stamps.back_mut() {
                Some((at, last)) if *at == revision => *last = stamp,
                _ => self.stamps.push_back((revision, stamp)),
            }
            if view.leases {
                let suffix = event.kv.key[view.rewrite.source_prefix().len()..].to_vec();
                let lease = (event.kind == EventType::Put).then_some(event.kv.lease);
                delivered.observed.push((suffix, lease));
            }
            current.mutations.push(match event.kind {
                EventType::Put => Mutation::Put {
                    key: dest_key,
                    value: event.kv.value,
                    lease: event.kv.lease,
                },
                EventType::Delete => Mutation::Delete { key: dest_key },
            });
        }
        // A revision is only known complete once its response is not a
        // fragment: etcd never splits one revision across unfragmented
        // responses.
        if !response.fragment {
            if let Some(revision) = self.assembling.take() {
                self.coalescer.push(revision);
            }
        }
        Ok(delivered)
    }

    /// Whether a repair read may start now (one at a time).
    pub fn repair_read_pending(&self) -> bool {
        self.touched.is_some()
    }

    /// A repair read starts: it reads at the returned revision, and every
    /// key the watch changes from now on is left out of its repair.
    pub fn start_repair_read(&mut self) -> i64 {
        self.touched = Some(HashSet::new());
        self.coalescer.through_revision()
    }

    /// The repair read came back (`None`: nothing to repair, or it failed).
    /// Queues the mutations behind everything already pushed, but those of
    /// keys the watch changed after the read's revision: that event already
    /// carries its value at the coalescer's revision. Every other key held
    /// the same value from the read's revision to now, so once the batch
    /// commits, the keys hold exactly what the checkpoint it carries says.
    /// Returns the kinds of the repairs queued.
    pub fn finish_repair_read(&mut self, read: Option<RepairRead>) -> Vec<&'static str> {
        let touched = self.touched.take().unwrap_or_default();
        let Some(read) = read else {
            return Vec::new();
        };
        let (mutations, kinds): (Vec<Mutation>, Vec<&'static str>) = read
            .mutations
            .into_iter()
            .filter(|(mutation, _)| !touched.contains(mutation.key()))
            .unzip();
        if !mutations.is_empty() {
            self.coalescer.push_repair(mutations);
        }
        kinds
    }
}

/// The last mirrored event a batch completes: that of the newest revision
/// at or below its revision. A partial batch completes no revision.
fn last_event_through(
    stamps: &mut VecDeque<(i64, EventStamp)>,
    batch: &Batch,
) -> Option<EventStamp> {
    if batch.partial_revision.is_some() {
        return None;
    }
    let mut last = None;
    while stamps
        .front()
        .is_some_and(|(revision, _)| *revision <= batch.through_revision)
    {
        last = stamps.pop_front().map(|(_, stamp)| stamp);
    }
    last
}

/// Decides when a quiet prefix may move its checkpoint to the source head.
///
/// etcd 3.4 before 3.4.24 answers a progress request from a side channel
/// with the store's current revision, which can be ahead of events still
/// queued for this watcher (etcd-io/etcd#15220). So a head revision is only
/// used after a *later* progress answer arrived with no event in between: by
/// then anything queued at the first answer has been delivered.
#[derive(Debug)]
struct IdleCheckpoint {
    interval: Duration,
    /// Whether an answer must be confirmed by a later one (etcd-io/etcd#15220).
    confirm: bool,
    candidate: Option<i64>,
    last_advanced: Instant,
}

impl IdleCheckpoint {
    fn new(interval: Duration, confirm: bool, now: Instant) -> Self {
        Self {
            interval,
            confirm,
            candidate: None,
            last_advanced: now,
        }
    }

    fn on_events(&mut self) {
        self.candidate = None;
    }

    /// Returns the revision to checkpoint now, if any.
    fn on_progress(
        &mut self,
        head: i64,
        quiet: bool,
        tail_revision: i64,
        now: Instant,
    ) -> Option<i64> {
        if !quiet {
            self.candidate = None;
            return None;
        }
        let confirmed = if self.confirm {
            self.candidate.filter(|c| *c > tail_revision && *c <= head)
        } else {
            // A fixed server answers progress only after every queued event.
            Some(head).filter(|h| *h > tail_revision)
        };
        self.candidate = Some(head);
        match confirmed {
            Some(revision)
                if now.saturating_duration_since(self.last_advanced) >= self.interval =>
            {
                self.last_advanced = now;
                Some(revision)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::api::{Event, Header, KeyValue};

    fn view() -> WatchView {
        WatchView {
            rewrite: KeyRewrite::new(b"/app/".to_vec(), b"/copy/".to_vec())
                .excluding(["/app/skip/"]),
            meta_prefix: b"/meta/".to_vec(),
            leases: true,
        }
    }

    fn timing(probe_silence: bool) -> WatchTiming {
        WatchTiming {
            idle_checkpoint: Duration::ZERO,
            confirm_progress: true,
            idle_timeout: Duration::from_secs(20),
            probe_silence,
        }
    }

    fn state(committed: i64) -> WatchState {
        state_at(committed, timing(false), Instant::now())
    }

    /// A state whose watch was created at `start`.
    fn state_at(committed: i64, timing: WatchTiming, start: Instant) -> WatchState {
        let limits = BatchLimits {
            max_ops: 100,
            max_bytes: 1 << 20,
        };
        WatchState::new(view(), limits, committed, timing, start)
    }

    fn put(key: &str, revision: i64, lease: i64) -> Event {
        Event {
            kind: EventType::Put,
            kv: KeyValue {
                key: key.as_bytes().to_vec(),
                value: b"v".to_vec(),
                mod_revision: revision,
                lease,
                ..KeyValue::default()
            },
        }
    }

    fn response(events: Vec<Event>, head: i64, fragment: bool) -> WatchResponse {
        WatchResponse {
            header: Header {
                revision: head,
                ..Header::default()
            },
            events,
            fragment,
            ..WatchResponse::default()
        }
    }

    fn keys(batch: &Batch) -> Vec<String> {
        batch
            .mutations
            .iter()
            .map(|m| String::from_utf8_lossy(m.key()).into_owned())
            .collect()
    }

    #[test]
    fn events_become_one_batch_per_whole_revision_without_meta_excluded_or_replayed_keys() {
        let mut state = state(10);
        let events = vec![
            put("/app/old", 9, 0),
            put("/app/a", 11, 7),
            put("/meta/x", 11, 0),
            put("/app/skip/y", 12, 0),
            put("/app/b", 12, 0),
        ];
        let delivered = state
            .on_response(response(events, 12, true), false, Instant::now())
            .expect("events");
        assert_eq!(
            delivered.observed,
            vec![(b"a".to_vec(), Some(7)), (b"b".to_vec(), Some(0))],
            "the lease book sees mirrored keys only"
        );
        // Revision 12 may continue in the next fragment: only 11 is sealed.
        let (batch, last) = state.next_batch().expect("revision 11");
        assert_eq!(
            (keys(&batch), batch.through_revision),
            (vec!["/copy/a".into()], 11)
        );
        assert_eq!(last.map(|s| s.mod_revision), Some(11));
        assert!(state.next_batch().is_none(), "12 is still being assembled");
        state
            .on_response(response(vec![], 12, false), false, Instant::now())
            .expect("end of fragments");
        state
            .on_response(
                response(vec![put("/app/c", 12, 0)], 12, false),
                false,
                Instant::now(),
            )
            .expect("the rest of 12");
        let (batch, _) = state.next_batch().expect("revision 12");
        assert_eq!(keys(&batch), vec!["/copy/b", "/copy/c"]);
    }

    #[test]
    fn a_compacted_watch_ends_the_phase_with_its_revision() {
        let mut state = state(10);
        let mut canceled = response(vec![], 20, false);
        canceled.canceled = true;
        canceled.compact_revision = 15;
        assert!(matches!(
            state.on_response(canceled, false, Instant::now()),
            Err(JobError::Compacted {
                compact_revision: 15
            })
        ));
    }

    #[test]
    fn a_quiet_prefix_advances_on_a_confirmed_answer_only() {
        let mut state = state(10);
        let now = Instant::now();
        let first = state
            .on_response(response(vec![], 20, false), false, now)
            .unwrap();
        assert_eq!(first.idle_advance, None, "a candidate only");
        let busy = state
            .on_response(response(vec![], 21, false), true, now)
            .unwrap();
        assert_eq!(busy.idle_advance, None, "txns in flight");
        state
            .on_response(response(vec![], 21, false), false, now)
            .unwrap();
        let confirmed = state
            .on_response(response(vec![], 22, false), false, now)
            .unwrap();
        assert_eq!(confirmed.idle_advance, Some(21));
        assert_eq!(state.through_revision(), 21);
        let (batch, last) = state
            .next_batch()
            .expect("an empty batch moves the checkpoint");
        assert!(batch.mutations.is_empty() && last.is_none());
    }

    #[test]
    fn a_repair_leaves_out_keys_the_watch_changed_after_its_read() {
        let mut state = state(10);
        assert!(!state.repair_read_pending());
        assert_eq!(state.start_repair_read(), 10);
        assert!(state.repair_read_pending());
        state
            .on_response(
                response(vec![put("/app/a", 11, 0)], 11, false),
                false,
                Instant::now(),
            )
            .unwrap();
        let read = RepairRead {
            at_revision: 10,
            mutations: vec![
                (
                    Mutation::Delete {
                        key: b"/copy/a".to_vec(),
                    },
                    "src_miss",
                ),
                (
                    Mutation::Delete {
                        key: b"/copy/z".to_vec(),
                    },
                    "src_miss",
                ),
            ],
        };
        assert_eq!(state.finish_repair_read(Some(read)), vec!["src_miss"]);
        assert!(!state.repair_read_pending());
        let (batch, _) = state.next_batch().expect("the event");
        assert_eq!(keys(&batch), vec!["/copy/a"]);
        let (repair, _) = state.next_batch().expect("the repair");
        assert_eq!(keys(&repair), vec!["/copy/z"]);
    }

    #[test]
    fn idle_checkpoint_needs_a_confirming_second_answer() {
        let now = Instant::now();
        let mut idle = IdleCheckpoint::new(Duration::ZERO, true, now);
        assert_eq!(
            idle.on_progress(100, true, 50, now),
            None,
            "first answer is only a candidate"
        );
        assert_eq!(idle.on_progress(120, true, 50, now), Some(100));
        idle.on_events();
        assert_eq!(
            idle.on_progress(130, true, 120, now),
            None,
            "events reset the candidate"
        );
        assert_eq!(
            idle.on_progress(140, false, 120, now),
            None,
            "busy pipeline never advances"
        );
        assert_eq!(idle.on_progress(150, true, 120, now), None);
        assert_eq!(idle.on_progress(150, true, 120, now), Some(150));
        assert_eq!(
            idle.on_progress(150, true, 150, now),
            None,
            "nothing new to advance to"
        );
    }

    #[test]
    fn a_silent_watch_stalls_after_the_idle_timeout_and_any_answer_keeps_it() {
        let start = Instant::now();
        let mut state = state_at(5, timing(false), start);
        let at = |secs| start + Duration::from_secs(secs);
        assert_eq!(state.on_tick(at(20)), Tick::Alive, "up to the timeout");
        // A progress answer at 15 s starts the silence again.
        state
            .on_response(response(vec![], 5, false), false, at(15))
            .unwrap();
        assert_eq!(state.on_tick(at(35)), Tick::Alive);
        assert_eq!(
            state.on_tick(at(36)),
            Tick::Stalled {
                idle: Duration::from_secs(21)
            }
        );
    }

    #[test]
    fn on_servers_that_may_never_answer_progress_a_silent_watch_is_probed_once() {
        let start = Instant::now();
        let mut state = state_at(5, timing(true), start);
        let at = |secs| start + Duration::from_secs(secs);
        assert_eq!(state.on_tick(at(21)), Tick::Probe);
        // One probe at a time.
        assert_eq!(state.on_tick(at(26)), Tick::Alive);
        // The source answers: quiet, not dead; the silence starts again.
        state.on_probe(true, at(27)).unwrap();
        assert_eq!(state.on_tick(at(47)), Tick::Alive);
        assert_eq!(state.on_tick(at(48)), Tick::Probe);
        // It does not: stalled, with the silence since the last answer.
        match state.on_probe(false, at(50)) {
            Err(JobError::WatchStalled { idle }) => assert_eq!(idle, Duration::from_secs(23)),
            other => panic!("expected a stall, got {other:?}"),
        }
    }
}
