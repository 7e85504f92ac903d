//! A merge of two key-sorted streams, fed page by page.
//!
//! Both the full sync and the consistency checker walk the source and the
//! destination side by side. Keys are compared by their suffix below the job
//! prefix, which orders the same on both sides whatever the prefix rewrite.
//! Memory is what the two page buffers hold, never the key count.

use std::collections::VecDeque;

/// One key with its value, named by its suffix below the job prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub suffix: Vec<u8>,
    pub value: Vec<u8>,
    /// The key's create revision on its cluster (0 when unknown). The full
    /// sync's mass-delete guard tells keys that predate it from keys it wrote.
    pub create_revision: i64,
    /// The key's mod revision on its cluster (0 when unknown): a restore
    /// guards its write on it.
    pub mod_revision: i64,
    /// The lease the key is attached to on its own cluster (0 for none).
    pub lease: i64,
    /// A destination key another writer holds (zk2etcd's ownership
    /// record says it wrote the key last): the job neither compares, copies
    /// over nor prunes it.
    pub held: bool,
}

/// How the merge compares lease attachments.
#[derive(Default)]
pub enum LeaseRule {
    /// Not compared.
    #[default]
    Ignore,
    /// Every destination key on no lease (`--leases strip`).
    Unleased,
    /// A source key on lease L belongs on the destination lease the
    /// function maps L to (`None`: not mapped yet, so any attachment
    /// differs); a key on no lease belongs on no lease.
    Mapped(Box<dyn Fn(i64) -> Option<i64> + Send + Sync>),
}

impl LeaseRule {
    pub fn same(&self, source_lease: i64, dest_lease: i64) -> bool {
        match self {
            LeaseRule::Ignore => true,
            LeaseRule::Unleased => dest_lease == 0,
            LeaseRule::Mapped(_) if source_lease == 0 => dest_lease == 0,
            LeaseRule::Mapped(map) => map(source_lease) == Some(dest_lease),
        }
    }
}

impl std::fmt::Debug for LeaseRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseRule::Ignore => f.write_str("Ignore"),
            LeaseRule::Unleased => f.write_str("Unleased"),
            LeaseRule::Mapped(_) => f.write_str("Mapped"),
        }
    }
}

/// What the merge found at one key. `value` and `lease` are the source's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// At the source, not at the destination ("dst miss").
    MissingAtDest {
        suffix: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    /// At the destination only ("src miss").
    ExtraAtDest {
        suffix: Vec<u8>,
        create_revision: i64,
    },
    /// On both sides with different values.
    ValueDiffers {
        suffix: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    /// The same value on a lease attachment the rule says differs.
    LeaseDiffers {
        suffix: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
}

impl Difference {
    /// What makes the destination equal the source here: `Ok((suffix,
    /// value, lease))`, the source's key to put, or `Err((suffix,
    /// create_revision))`, a destination-only key to delete.
    #[allow(clippy::type_complexity)]
    pub fn into_put(self) -> Result<(Vec<u8>, Vec<u8>, i64), (Vec<u8>, i64)> {
        match self {
            Difference::MissingAtDest {
                suffix,
                value,
                lease,
            }
            | Difference::ValueDiffers {
                suffix,
                value,
                lease,
            }
            | Difference::LeaseDiffers {
                suffix,
                value,
                lease,
            } => Ok((suffix, value, lease)),
            Difference::ExtraAtDest {
                suffix,
                create_revision,
            } => Err((suffix, create_revision)),
        }
    }

    pub fn suffix(&self) -> &[u8] {
        match self {
            Difference::MissingAtDest { suffix, .. }
            | Difference::ExtraAtDest { suffix, .. }
            | Difference::ValueDiffers { suffix, .. }
            | Difference::LeaseDiffers { suffix, .. } => suffix,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Differ(Difference),
    /// The key is on both sides with the same value.
    Same,
    /// Another writer holds the destination key (see [`Entry::held`]):
    /// left as it is, whatever the source has there.
    Held(Vec<u8>),
    /// Feed the next source page (or call `source_exhausted`).
    NeedSource,
    /// Feed the next destination page (or call `dest_exhausted`).
    NeedDest,
    Done,
}

#[derive(Debug, Default)]
pub struct SortedMerge {
    source: VecDeque<Entry>,
    dest: VecDeque<Entry>,
    source_done: bool,
    dest_done: bool,
    leases: LeaseRule,
}

impl SortedMerge {
    /// A merge that compares values only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A merge that also compares lease attachments by `leases`.
    pub fn with_leases(leases: LeaseRule) -> Self {
        Self {
            leases,
            ..Self::default()
        }
    }

    pub fn push_source(&mut self, page: Vec<Entry>) {
        self.source.extend(page);
    }

    pub fn push_dest(&mut self, page: Vec<Entry>) {
        self.dest.extend(page);
    }

    pub fn source_exhausted(&mut self) {
        self.source_done = true;
    }

    pub fn dest_exhausted(&mut self) {
        self.dest_done = true;
    }

    pub fn step(&mut self) -> Step {
        use std::cmp::Ordering;
        let order = match (self.source.front(), self.dest.front()) {
            (None, _) if !self.source_done => return Step::NeedSource,
            (_, None) if !self.dest_done => return Step::NeedDest,
            (None, None) => return Step::Done,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(source), Some(dest)) => source.suffix.cmp(&dest.suffix),
        };
        match order {
            // Only at the source.
            Ordering::Less => {
                let Entry {
                    suffix,
                    value,
                    lease,
                    ..
                } = self.source.pop_front().expect("front checked");
                Step::Differ(Difference::MissingAtDest {
                    suffix,
                    value,
                    lease,
                })
            }
            // Only at the destination.
            Ordering::Greater => {
                let Entry {
                    suffix,
                    create_revision,
                    held,
                    ..
                } = self.dest.pop_front().expect("front checked");
                if held {
                    return Step::Held(suffix);
                }
                Step::Differ(Difference::ExtraAtDest {
                    suffix,
                    create_revision,
                })
            }
            Ordering::Equal => {
                let source = self.source.pop_front().expect("front checked");
                let dest = self.dest.pop_front().expect("front checked");
                if dest.held {
                    return Step::Held(dest.suffix);
                }
                let same_lease = self.leases.same(source.lease, dest.lease);
                match (source.value == dest.value, same_lease) {
                    (true, true) => Step::Same,
                    (true, false) => Step::Differ(Difference::LeaseDiffers {
                        suffix: source.suffix,
                        value: source.value,
                        lease: source.lease,
                    }),
                    (false, _) => Step::Differ(Difference::ValueDiffers {
                        suffix: source.suffix,
                        value: source.value,
                        lease: source.lease,
                    }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn pages(map: &BTreeMap<Vec<u8>, Vec<u8>>, page: usize) -> Vec<Vec<Entry>> {
        let entries: Vec<Entry> = map
            .iter()
            .map(|(k, v)| Entry {
                suffix: k.clone(),
                value: v.clone(),
                create_revision: 0,
                mod_revision: 0,
                lease: 0,
                held: false,
            })
            .collect();
        entries.chunks(page.max(1)).map(|c| c.to_vec()).collect()
    }

    fn run(
        source: &BTreeMap<Vec<u8>, Vec<u8>>,
        dest: &BTreeMap<Vec<u8>, Vec<u8>>,
        page: usize,
    ) -> (Vec<Difference>, usize) {
        let (diffs, same, held) = run_held(source, dest, &BTreeSet::new(), page);
        assert!(held.is_empty(), "nothing is held here: {held:?}");
        (diffs, same)
    }

    /// [`run`] with the destination keys of `held` marked held: the
    /// differences, the same count, and the held keys reported, in order.
    fn run_held(
        source: &BTreeMap<Vec<u8>, Vec<u8>>,
        dest: &BTreeMap<Vec<u8>, Vec<u8>>,
        held: &BTreeSet<Vec<u8>>,
        page: usize,
    ) -> (Vec<Difference>, usize, Vec<Vec<u8>>) {
        let mut source_pages = pages(source, page).into_iter();
        let mut dest_pages = pages(dest, page).into_iter().map(|mut p| {
            for entry in &mut p {
                entry.held = held.contains(&entry.suffix);
            }
            p
        });
        let mut merge = SortedMerge::new();
        let (mut diffs, mut same, mut reported) = (Vec::new(), 0, Vec::new());
        loop {
            match merge.step() {
                Step::NeedSource => match source_pages.next() {
                    Some(p) => merge.push_source(p),
                    None => merge.source_exhausted(),
                },
                Step::NeedDest => match dest_pages.next() {
                    Some(p) => merge.push_dest(p),
                    None => merge.dest_exhausted(),
                },
                Step::Differ(d) => diffs.push(d),
                Step::Same => same += 1,
                Step::Held(suffix) => reported.push(suffix),
                Step::Done => return (diffs, same, reported),
            }
        }
    }

    fn arb_map() -> impl Strategy<Value = BTreeMap<Vec<u8>, Vec<u8>>> {
        proptest::collection::btree_map(
            proptest::collection::vec(0u8..4, 0..4),
            proptest::collection::vec(0u8..3, 0..2),
            0..30,
        )
    }

    proptest! {
        #[test]
        fn applying_the_differences_makes_dest_equal_source(source in arb_map(), dest in arb_map(), page in 1usize..7) {
            let (diffs, same) = run(&source, &dest, page);
            let mut patched = dest.clone();
            for diff in &diffs {
                match diff {
                    Difference::MissingAtDest { suffix, value, .. }
                    | Difference::ValueDiffers { suffix, value, .. }
                    | Difference::LeaseDiffers { suffix, value, .. } => {
                        patched.insert(suffix.clone(), value.clone());
                    }
                    Difference::ExtraAtDest { suffix, .. } => { patched.remove(suffix); }
                }
            }
            prop_assert_eq!(&patched, &source);
            let expected_same = source.iter().filter(|(k, v)| dest.get(*k) == Some(*v)).count();
            prop_assert_eq!(same, expected_same);
            // Differences come out in key order, so writes never run ahead of the merge.
            let suffixes: Vec<&[u8]> = diffs.iter().map(Difference::suffix).collect();
            let mut sorted = suffixes.clone();
            sorted.sort();
            prop_assert_eq!(suffixes, sorted);
        }

        /// With leases compared through a mapping, applying the differences
        /// (each put on the mapped lease) leaves every key on the lease its
        /// source lease maps to, and only same-value keys on a wrong lease
        /// are reported as lease differences.
        #[test]
        fn lease_differences_are_exactly_the_misattached_keys(
            source in proptest::collection::btree_map(
                proptest::collection::vec(0u8..4, 0..3),
                (proptest::collection::vec(0u8..2, 0..2), 0i64..3),
                0..20,
            ),
            dest in proptest::collection::btree_map(
                proptest::collection::vec(0u8..4, 0..3),
                (proptest::collection::vec(0u8..2, 0..2), 0i64..4),
                0..20,
            ),
            page in 1usize..5,
        ) {
            // Source lease 1 → 10, 2 → unmapped; the destination has 0..4.
            let map = |lease: i64| (lease == 1).then_some(10);
            let to_entries = |m: &BTreeMap<Vec<u8>, (Vec<u8>, i64)>, dest_side: bool| -> Vec<Vec<Entry>> {
                let entries: Vec<Entry> = m.iter().map(|(k, (v, l))| Entry {
                    suffix: k.clone(),
                    value: v.clone(),
                    create_revision: 0,
                    mod_revision: 0,
                    // Destination lease 1 stands for the mapped one.
                    lease: if dest_side && *l == 1 { 10 } else { *l },
                    held: false,
                }).collect();
                entries.chunks(page).map(|c| c.to_vec()).collect()
            };
            let mut merge = SortedMerge::with_leases(LeaseRule::Mapped(Box::new(map)));
            let mut sources = to_entries(&source, false).into_iter();
            let mut dests = to_entries(&dest, true).into_iter();
            let mut patched: BTreeMap<Vec<u8>, (Vec<u8>, i64)> = dest
                .iter()
                .map(|(k, (v, l))| (k.clone(), (v.clone(), if *l == 1 { 10 } else { *l })))
                .collect();
            let mut lease_diffs = 0;
            loop {
                match merge.step() {
                    Step::NeedSource => match sources.next() {
                        Some(p) => merge.push_source(p),
                        None => merge.source_exhausted(),
                    },
                    Step::NeedDest => match dests.next() {
                        Some(p) => merge.push_dest(p),
                        None => merge.dest_exhausted(),
                    },
                    Step::Differ(Difference::ExtraAtDest { suffix, .. }) => { patched.remove(&suffix); }
                    Step::Differ(difference) => {
                        if matches!(difference, Difference::LeaseDiffers { .. }) {
                            lease_diffs += 1;
                        }
                        let (Difference::MissingAtDest { suffix, value, lease }
                        | Difference::ValueDiffers { suffix, value, lease }
                        | Difference::LeaseDiffers { suffix, value, lease }) = difference
                        else {
                            unreachable!("extra keys matched above")
                        };
                        // The writer grants a lease for an unmapped one: -1 here.
                        let attached = if lease == 0 { 0 } else { map(lease).unwrap_or(-1) };
                        patched.insert(suffix, (value, attached));
                    }
                    Step::Same => {}
                    Step::Held(suffix) => panic!("nothing is held here: {suffix:?}"),
                    Step::Done => break,
                }
            }
            let expected: BTreeMap<Vec<u8>, (Vec<u8>, i64)> = source
                .iter()
                .map(|(k, (v, l))| (k.clone(), (v.clone(), if *l == 0 { 0 } else { map(*l).unwrap_or(-1) })))
                .collect();
            let misattached = source
                .iter()
                .filter(|(k, (v, l))| {
                    dest.get(*k).is_some_and(|(dv, dl)| {
                        let dest_lease = if *dl == 1 { 10 } else { *dl };
                        let wanted = if *l == 0 { Some(0) } else { map(*l) };
                        dv == v && wanted != Some(dest_lease)
                    })
                })
                .count();
            prop_assert_eq!(patched, expected);
            prop_assert_eq!(lease_diffs, misattached);
        }

        /// Keys another writer holds are reported held, never as a
        /// difference: applying the differences makes every other key equal
        /// the source and leaves each held key as it was.
        #[test]
        fn held_keys_are_neither_written_nor_pruned(
            source in arb_map(),
            dest in arb_map(),
            held_mask in proptest::collection::vec(any::<bool>(), 30),
            page in 1usize..7,
        ) {
            let held: BTreeSet<Vec<u8>> = dest
                .keys()
                .zip(&held_mask)
                .filter(|(_, h)| **h)
                .map(|(k, _)| k.clone())
                .collect();
            let (diffs, _, reported) = run_held(&source, &dest, &held, page);
            let mut patched = dest.clone();
            for d in diffs {
                prop_assert!(!held.contains(d.suffix()), "a held key differs: {:?}", d);
                match d.into_put() {
                    Ok((suffix, value, _)) => { patched.insert(suffix, value); }
                    Err((suffix, _)) => { patched.remove(&suffix); }
                }
            }
            // Each held key reported once.
            let reported_once: BTreeSet<Vec<u8>> = reported.iter().cloned().collect();
            prop_assert_eq!(reported_once.len(), reported.len());
            let reported = reported_once;
            prop_assert_eq!(&reported, &held);
            let mut expected = source.clone();
            for key in &held {
                match dest.get(key) {
                    Some(value) => { expected.insert(key.clone(), value.clone()); }
                    None => { expected.remove(key); }
                }
            }
            prop_assert_eq!(patched, expected);
        }

        #[test]
        fn counts_match_a_set_comparison(source in arb_map(), dest in arb_map(), page in 1usize..7) {
            let (diffs, _) = run(&source, &dest, page);
            let missing = diffs.iter().filter(|d| matches!(d, Difference::MissingAtDest { .. })).count();
            let extra = diffs.iter().filter(|d| matches!(d, Difference::ExtraAtDest { .. })).count();
            let differs = diffs.iter().filter(|d| matches!(d, Difference::ValueDiffers { .. })).count();
            prop_assert_eq!(missing, source.keys().filter(|k| !dest.contains_key(*k)).count());
            prop_assert_eq!(extra, dest.keys().filter(|k| !source.contains_key(*k)).count());
            prop_assert_eq!(differs, source.iter().filter(|(k, v)| dest.get(*k).is_some_and(|d| d != *v)).count());
        }
    }
}
