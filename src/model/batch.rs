//! Coalescing source revisions into destination txns.
//!
//! Consecutive revisions are merged into one batch, keeping only the last
//! mutation per key because etcd rejects a txn that names a key twice. A
//! batch closes when the next revision would push it past the op or byte
//! limit, so a revision is split across txns only when it alone exceeds the
//! limits. Every batch records the highest source revision it completes, which
//! is what the checkpoint written in the same txn will say.
//!
//! This module is pure: no I/O, so the property tests below can check it
//! against a one-event-at-a-time reference.

use std::collections::{HashMap, VecDeque};

/// Rough per-op framing cost in a `TxnRequest`, so that the byte budget stays
/// under etcd's request limit even for many tiny keys.
pub const OP_OVERHEAD_BYTES: usize = 16;

/// One change to one destination key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// `lease` is the source key's lease (0 for none); the writer attaches
    /// the key to the destination lease that mirrors it.
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    Delete {
        key: Vec<u8>,
    },
}

impl Mutation {
    pub fn key(&self) -> &[u8] {
        match self {
            Mutation::Put { key, .. } | Mutation::Delete { key } => key,
        }
    }

    /// Bytes this mutation adds to a txn request.
    pub fn encoded_len(&self) -> usize {
        match self {
            Mutation::Put { key, value, .. } => key.len() + value.len() + OP_OVERHEAD_BYTES,
            Mutation::Delete { key } => key.len() + OP_OVERHEAD_BYTES,
        }
    }
}

/// Every mutation one source revision made inside the job prefix, with keys
/// already rewritten to destination keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRevision {
    pub revision: i64,
    pub mutations: Vec<Mutation>,
}

/// Data ops and bytes one txn may carry, after the room kept for the fence
/// and the checkpoint has been taken off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_ops: usize,
    pub max_bytes: usize,
}

/// The content of one destination txn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// At most one mutation per key.
    pub mutations: Vec<Mutation>,
    /// Every source revision up to this one is fully applied once this batch
    /// and the ones before it have committed.
    pub through_revision: i64,
    /// `Some(r)` when the batch carries only part of revision `r`, which was
    /// too large for one txn on its own.
    pub partial_revision: Option<i64>,
}

impl Batch {
    pub fn encoded_len(&self) -> usize {
        self.mutations.iter().map(Mutation::encoded_len).sum()
    }
}

/// Merges revisions into batches that respect [`BatchLimits`].
#[derive(Debug)]
pub struct Coalescer {
    limits: BatchLimits,
    open: Vec<Mutation>,
    open_index: HashMap<Vec<u8>, usize>,
    open_bytes: usize,
    /// Highest revision pushed so far; everything up to it is in `open` or `sealed`.
    through_revision: i64,
    sealed: VecDeque<Batch>,
    split_revisions: u64,
}

impl Coalescer {
    /// `base_revision` is the revision the destination already reflects.
    pub fn new(limits: BatchLimits, base_revision: i64) -> Self {
        assert!(limits.max_ops >= 1, "batch limits must allow one op");
        Self {
            limits,
            open: Vec::new(),
            open_index: HashMap::new(),
            open_bytes: 0,
            through_revision: base_revision,
            sealed: VecDeque::new(),
            split_revisions: 0,
        }
    }

    /// The highest source revision accepted so far.
    pub fn through_revision(&self) -> i64 {
        self.through_revision
    }

    /// How many revisions had to be split across txns since creation.
    pub fn split_revisions(&self) -> u64 {
        self.split_revisions
    }

    /// Nothing buffered: every pushed revision has been handed out.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty() && self.sealed.is_empty()
    }

    /// How many full batches wait to go out before anything else.
    pub fn sealed_len(&self) -> usize {
        self.sealed.len()
    }

    pub fn push(&mut self, revision: SourceRevision) {
        debug_assert!(revision.revision > self.through_revision);
        if revision.mutations.is_empty() {
            // Every event of it was left out (excluded or meta keys): the
            // checkpoint still moves past it, or it would stay behind and
            // no idle advance would ever carry it (seed 23957).
            self.advance_to(revision.revision);
            return;
        }
        let mutations = dedup_last_wins(revision.mutations);
        let (grown_ops, grown_bytes) = self.size_if_merged(&mutations);
        if !self.open.is_empty()
            && (grown_ops > self.limits.max_ops || grown_bytes > self.limits.max_bytes)
        {
            self.seal_open();
        }
        let own_bytes: usize = mutations.iter().map(Mutation::encoded_len).sum();
        if mutations.len() <= self.limits.max_ops && own_bytes <= self.limits.max_bytes {
            for mutation in mutations {
                self.add_to_open(mutation);
            }
        } else {
            self.split_into_chunks(revision.revision, mutations);
        }
        self.through_revision = revision.revision;
    }

    /// The next batch to send: a sealed one if any, else whatever is open.
    pub fn next_batch(&mut self) -> Option<Batch> {
        if let Some(batch) = self.sealed.pop_front() {
            return Some(batch);
        }
        if self.open.is_empty() {
            return None;
        }
        self.seal_open();
        self.sealed.pop_front()
    }

    fn size_if_merged(&self, mutations: &[Mutation]) -> (usize, usize) {
        let mut ops = self.open.len();
        let mut bytes = self.open_bytes;
        for mutation in mutations {
            match self.open_index.get(mutation.key()) {
                Some(&at) => {
                    bytes = bytes - self.open[at].encoded_len() + mutation.encoded_len();
                }
                None => {
                    ops += 1;
                    bytes += mutation.encoded_len();
                }
            }
        }
        (ops, bytes)
    }

    fn add_to_open(&mut self, mutation: Mutation) {
        match self.open_index.get(mutation.key()) {
            Some(&at) => {
                self.open_bytes =
                    self.open_bytes - self.open[at].encoded_len() + mutation.encoded_len();
                self.open[at] = mutation;
            }
            None => {
                self.open_bytes += mutation.encoded_len();
                self.open_index
                    .insert(mutation.key().to_vec(), self.open.len());
                self.open.push(mutation);
            }
        }
    }

    fn seal_open(&mut self) {
        self.open_index.clear();
        self.open_bytes = 0;
        self.sealed.push_back(Batch {
            mutations: std::mem::take(&mut self.open),
            through_revision: self.through_revision,
            partial_revision: None,
        });
    }

    /// Splits one oversized revision. Every chunk but the last goes out as a
    /// partial batch; the last stays open, completing the revision, so later
    /// revisions can still join it.
    fn split_into_chunks(&mut self, revision: i64, mutations: Vec<Mutation>) {
        let previous_revision = self.through_revision;
        let mut chunks = chunk(mutations, self.limits);
        let last = chunks.pop().unwrap_or_default();
        // A lone oversized mutation still goes out as one txn: not a split.
        if !chunks.is_empty() {
            self.split_revisions += 1;
        }
        for mutations in chunks {
            self.sealed.push_back(Batch {
                mutations,
                through_revision: previous_revision,
                partial_revision: Some(revision),
            });
        }
        for mutation in last {
            self.add_to_open(mutation);
        }
    }

    /// Moves to `revision` with no mutation in between: an idle source whose
    /// head moved on outside the prefix. Goes out as a batch that only
    /// advances the checkpoint, unless an open batch can carry it.
    pub fn advance_to(&mut self, revision: i64) {
        if revision <= self.through_revision {
            return;
        }
        self.through_revision = revision;
        if self.open.is_empty() {
            self.sealed.push_back(Batch {
                mutations: Vec::new(),
                through_revision: revision,
                partial_revision: None,
            });
        }
    }

    /// Queues a repair found by the consistency checker: mutations that give
    /// keys their source values at [`Self::through_revision`]. Everything
    /// pushed before goes out first, so the repair lands in order and the
    /// checkpoint it carries stays true.
    pub fn push_repair(&mut self, mutations: Vec<Mutation>) {
        if !self.open.is_empty() {
            self.seal_open();
        }
        for mutations in chunk(dedup_last_wins(mutations), self.limits) {
            self.sealed.push_back(Batch {
                mutations,
                through_revision: self.through_revision,
                partial_revision: None,
            });
        }
    }
}

/// Cuts mutations into runs within the limits; a run holds at least one
/// mutation even if that one alone is over the byte budget.
fn chunk(mutations: Vec<Mutation>, limits: BatchLimits) -> Vec<Vec<Mutation>> {
    let mut chunks = Vec::new();
    let mut current: Vec<Mutation> = Vec::new();
    let mut current_bytes = 0usize;
    for mutation in mutations {
        let len = mutation.encoded_len();
        if !current.is_empty()
            && (current.len() + 1 > limits.max_ops || current_bytes + len > limits.max_bytes)
        {
            chunks.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current_bytes += len;
        current.push(mutation);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// etcd never names a key twice in one revision, but a defensive pass keeps
/// the "one op per key" rule true whatever the input.
fn dedup_last_wins(mutations: Vec<Mutation>) -> Vec<Mutation> {
    if mutations.len() < 2 {
        return mutations;
    }
    let mut last_at: HashMap<&[u8], usize> = HashMap::with_capacity(mutations.len());
    for (at, mutation) in mutations.iter().enumerate() {
        last_at.insert(mutation.key(), at);
    }
    if last_at.len() == mutations.len() {
        return mutations;
    }
    let keep: Vec<bool> = mutations
        .iter()
        .enumerate()
        .map(|(at, m)| last_at[m.key()] == at)
        .collect();
    mutations
        .into_iter()
        .zip(keep)
        .filter_map(|(m, keep)| keep.then_some(m))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A revision whose events were all left out still moves the
    /// checkpoint: alone as an empty batch, or carried by an open one.
    #[test]
    fn a_revision_with_nothing_to_apply_still_moves_the_checkpoint() {
        let limits = BatchLimits {
            max_ops: 8,
            max_bytes: 1 << 20,
        };
        let mut alone = Coalescer::new(limits, 9);
        alone.push(SourceRevision {
            revision: 10,
            mutations: Vec::new(),
        });
        let batch = alone.next_batch().expect("an empty batch");
        assert_eq!((batch.through_revision, batch.mutations.len()), (10, 0));
        let mut carried = Coalescer::new(limits, 9);
        carried.push(SourceRevision {
            revision: 10,
            mutations: vec![Mutation::Delete {
                key: b"/a".to_vec(),
            }],
        });
        carried.push(SourceRevision {
            revision: 11,
            mutations: Vec::new(),
        });
        let batch = carried.next_batch().expect("the open batch");
        assert_eq!((batch.through_revision, batch.mutations.len()), (11, 1));
        assert!(carried.next_batch().is_none());
    }
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// Key → (value, lease): the lease is part of what a revision leaves.
    type State = BTreeMap<Vec<u8>, (Vec<u8>, i64)>;

    fn apply(state: &mut State, mutation: &Mutation) {
        match mutation {
            Mutation::Put { key, value, lease } => {
                state.insert(key.clone(), (value.clone(), *lease));
            }
            Mutation::Delete { key } => {
                state.remove(key);
            }
        }
    }

    fn arb_mutation() -> impl Strategy<Value = Mutation> {
        // A small key space makes repeated keys, and so coalescing, common.
        let key = (0u8..12).prop_map(|k| vec![b'k', k]);
        prop_oneof![
            3 => (key.clone(), proptest::collection::vec(any::<u8>(), 0..40), 0i64..3)
                .prop_map(|(key, value, lease)| Mutation::Put { key, value, lease }),
            1 => key.prop_map(|key| Mutation::Delete { key }),
        ]
    }

    fn arb_revisions() -> impl Strategy<Value = Vec<SourceRevision>> {
        proptest::collection::vec(proptest::collection::vec(arb_mutation(), 1..10), 0..40).prop_map(
            |revs| {
                revs.into_iter()
                    .enumerate()
                    .map(|(i, mutations)| SourceRevision {
                        revision: 10 + i as i64 * 2,
                        mutations: dedup_last_wins(mutations),
                    })
                    .collect()
            },
        )
    }

    fn arb_limits() -> impl Strategy<Value = BatchLimits> {
        (1usize..8, 20usize..300)
            .prop_map(|(max_ops, max_bytes)| BatchLimits { max_ops, max_bytes })
    }

    /// Pushes every revision, draining at random points as the applier would.
    fn run(limits: BatchLimits, revisions: &[SourceRevision], drain_every: usize) -> Vec<Batch> {
        let mut coalescer = Coalescer::new(limits, 1);
        let mut batches = Vec::new();
        for (i, revision) in revisions.iter().enumerate() {
            coalescer.push(revision.clone());
            if drain_every > 0 && i % drain_every == 0 {
                while let Some(batch) = coalescer.next_batch() {
                    batches.push(batch);
                }
            }
        }
        while let Some(batch) = coalescer.next_batch() {
            batches.push(batch);
        }
        assert!(coalescer.is_empty());
        batches
    }

    proptest! {
        #[test]
        fn a_batch_never_names_a_key_twice(limits in arb_limits(), revisions in arb_revisions(), drain in 0usize..5) {
            for batch in run(limits, &revisions, drain) {
                let mut keys: Vec<&[u8]> = batch.mutations.iter().map(Mutation::key).collect();
                let before = keys.len();
                keys.sort();
                keys.dedup();
                prop_assert_eq!(before, keys.len());
            }
        }

        #[test]
        fn batch_limits_are_respected(limits in arb_limits(), revisions in arb_revisions(), drain in 0usize..5) {
            for batch in run(limits, &revisions, drain) {
                prop_assert!(!batch.mutations.is_empty());
                prop_assert!(batch.mutations.len() <= limits.max_ops);
                // A single mutation larger than the budget still has to go out alone.
                prop_assert!(batch.encoded_len() <= limits.max_bytes || batch.mutations.len() == 1);
            }
        }

        #[test]
        fn batches_in_order_equal_events_one_by_one(limits in arb_limits(), revisions in arb_revisions(), drain in 0usize..5) {
            let mut sequential = State::new();
            let mut state_at: BTreeMap<i64, State> = BTreeMap::new();
            state_at.insert(1, State::new());
            for revision in &revisions {
                for mutation in &revision.mutations {
                    apply(&mut sequential, mutation);
                }
                state_at.insert(revision.revision, sequential.clone());
            }
            let mut batched = State::new();
            let mut last_through = 1;
            for batch in run(limits, &revisions, drain) {
                for mutation in &batch.mutations {
                    apply(&mut batched, mutation);
                }
                prop_assert!(batch.through_revision >= last_through);
                last_through = batch.through_revision;
                if batch.partial_revision.is_none() {
                    // A whole batch leaves the destination in a state the source really had.
                    prop_assert_eq!(&batched, &state_at[&batch.through_revision]);
                } else {
                    prop_assert!(batch.partial_revision.unwrap() > batch.through_revision);
                }
            }
            prop_assert_eq!(batched, sequential);
            if let Some(last) = revisions.last() {
                prop_assert_eq!(last_through, last.revision);
            }
        }

        #[test]
        fn a_repair_applies_in_order_between_revisions(limits in arb_limits(), revisions in arb_revisions(),
                                                       at in 0usize..40, repair in proptest::collection::vec(arb_mutation(), 1..20)) {
            let at = at.min(revisions.len());
            let mut coalescer = Coalescer::new(limits, 1);
            let mut expected = State::new();
            let mut batches = Vec::new();
            for (i, revision) in revisions.iter().enumerate() {
                if i == at {
                    for mutation in dedup_last_wins(repair.clone()) { apply(&mut expected, &mutation); }
                    coalescer.push_repair(repair.clone());
                }
                for mutation in &revision.mutations { apply(&mut expected, mutation); }
                coalescer.push(revision.clone());
                if i % 3 == 0 { while let Some(b) = coalescer.next_batch() { batches.push(b); } }
            }
            if at == revisions.len() {
                for mutation in dedup_last_wins(repair.clone()) { apply(&mut expected, &mutation); }
                coalescer.push_repair(repair.clone());
            }
            while let Some(b) = coalescer.next_batch() { batches.push(b); }
            let mut applied = State::new();
            let mut last_through = 1;
            for batch in &batches {
                let mut keys: Vec<&[u8]> = batch.mutations.iter().map(Mutation::key).collect();
                let n = keys.len();
                keys.sort();
                keys.dedup();
                prop_assert_eq!(n, keys.len());
                prop_assert!(batch.mutations.len() <= limits.max_ops);
                prop_assert!(batch.through_revision >= last_through);
                last_through = batch.through_revision;
                for mutation in &batch.mutations { apply(&mut applied, mutation); }
            }
            prop_assert_eq!(applied, expected);
        }

        #[test]
        fn a_revision_is_split_only_when_it_alone_exceeds_the_limits(limits in arb_limits(), revisions in arb_revisions()) {
            let oversized = revisions.iter().filter(|r| {
                let bytes: usize = r.mutations.iter().map(Mutation::encoded_len).sum();
                (r.mutations.len() > limits.max_ops || bytes > limits.max_bytes) && r.mutations.len() >= 2
            }).count() as u64;
            let mut coalescer = Coalescer::new(limits, 1);
            for revision in &revisions {
                coalescer.push(revision.clone());
            }
            prop_assert_eq!(coalescer.split_revisions(), oversized);
            let mut partial_seen = std::collections::BTreeSet::new();
            while let Some(batch) = coalescer.next_batch() {
                if let Some(r) = batch.partial_revision { partial_seen.insert(r); }
            }
            prop_assert!(partial_seen.len() as u64 <= oversized);
        }
    }

    #[test]
    fn consecutive_revisions_share_one_batch() {
        let limits = BatchLimits {
            max_ops: 10,
            max_bytes: 10_000,
        };
        let mut coalescer = Coalescer::new(limits, 1);
        for rev in 2..6 {
            coalescer.push(SourceRevision {
                revision: rev,
                mutations: vec![Mutation::Put {
                    key: b"a".to_vec(),
                    value: vec![rev as u8],
                    lease: 0,
                }],
            });
        }
        let batch = coalescer.next_batch().unwrap();
        assert_eq!(
            batch.mutations,
            vec![Mutation::Put {
                key: b"a".to_vec(),
                value: vec![5],
                lease: 0
            }]
        );
        assert_eq!(batch.through_revision, 5);
        assert!(coalescer.next_batch().is_none());
    }
}
