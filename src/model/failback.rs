//! Failback's decisions, as pure functions: which keys can differ between
//! the old primary and the promoted standby, what to write on the old
//! primary to make it equal the standby, and which of the old primary's
//! writes the standby never received (its lost writes).
//!
//! At promotion the standby held the old primary's prefix as of source
//! revision `c` (the checkpoint). A key neither side changed since then is
//! the same on both, so only keys the old primary changed after `c`, or the
//! standby changed after the destination revision of that checkpoint, can
//! differ: the dirty set. Work is proportional to it, not to the prefix.

use std::collections::BTreeMap;

use serde::Serialize;

/// A key as one side holds it: its value, the revision that last wrote it
/// and its lease (0 for none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub create_revision: i64,
    pub lease: i64,
}

/// What one side's history says changed in the prefix since a revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Keys written since, as they are now (suffix below the prefix).
    pub written: BTreeMap<Vec<u8>, Held>,
    /// Keys that existed at the revision and are gone now, with the
    /// revision of their (last) delete.
    pub deleted: BTreeMap<Vec<u8>, i64>,
}

impl Changes {
    pub fn len(&self) -> usize {
        self.written.len() + self.deleted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, suffix: &[u8]) -> bool {
        self.written.contains_key(suffix) || self.deleted.contains_key(suffix)
    }

    /// How many of the keys present at the base revision a history must
    /// show deleted (some may have been created again since): the keys at
    /// the base, minus the keys now that were created at or before it.
    /// A key created at or before the base and present now was never
    /// deleted in between (a delete and a re-create give a new create
    /// revision), so the difference counts exactly the base's keys that
    /// were deleted at least once.
    pub fn base_keys_deleted(keys_at_base: i64, keys_now: i64, created_since: i64) -> i64 {
        keys_at_base - (keys_now - created_since)
    }
}

/// Whether the old primary's write to a key was lost (never reached the standby).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// The key differs only because the standby changed it: nothing lost.
    None,
    /// The old primary changed the key after the checkpoint and the
    /// standby holds something else.
    Certain,
    /// The histories needed to tell are compacted: the old primary may
    /// have deleted the key after the checkpoint, or the standby created
    /// it after promotion.
    Possible,
}

/// What is known about each side's history since the promotion point.
#[derive(Debug, Clone, Copy)]
pub struct Knowledge<'a> {
    /// The old primary's changes after the checkpoint, when its history
    /// from there is still readable.
    pub old_primary: Option<&'a Changes>,
    /// The standby's state of the compared keys at the checkpoint's
    /// destination revision, when its history from there is readable: that
    /// is the old primary's state at the checkpoint.
    pub standby_at_base: Option<&'a BTreeMap<Vec<u8>, Held>>,
    /// The checkpoint: the old primary's revision the standby held.
    pub checkpoint: i64,
    /// False when the old primary is not the cluster the standby mirrored
    /// (rebuilt, restored): its revisions say nothing about the checkpoint.
    pub same_history: bool,
}

impl Knowledge<'_> {
    /// Whether a key on which the sides differ holds a lost write of the
    /// old primary. Exact when the old primary's history is known; from
    /// the key's own mod revision otherwise, which tells a put after the
    /// checkpoint but not a delete.
    pub fn loss(&self, suffix: &[u8], old_primary: Option<&Held>) -> Loss {
        if !self.same_history {
            return Loss::Possible;
        }
        if let Some(changes) = self.old_primary {
            return if changes.contains(suffix) {
                Loss::Certain
            } else {
                Loss::None
            };
        }
        match old_primary {
            Some(held) if held.mod_revision > self.checkpoint => Loss::Certain,
            Some(_) => Loss::None,
            // Absent on the old primary: a delete after the checkpoint if
            // the key was there at the checkpoint, which the standby's own
            // history shows (it held exactly that state at its base).
            None => match self.standby_at_base {
                Some(base) if base.contains_key(suffix) => Loss::Certain,
                Some(_) => Loss::None,
                None => Loss::Possible,
            },
        }
    }
}

/// One key where the sides differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    pub suffix: Vec<u8>,
    pub old_primary: Option<Held>,
    pub standby: Option<Held>,
    pub loss: Loss,
}

/// Compares each candidate key's state on both sides (keys absent from a
/// map are absent on that side) and returns those that differ, in key
/// order. Leases are not compared: a mirrored key sits on another lease
/// than its original by design.
pub fn divergences<'a>(
    candidates: impl IntoIterator<Item = &'a Vec<u8>>,
    old_primary: &BTreeMap<Vec<u8>, Held>,
    standby: &BTreeMap<Vec<u8>, Held>,
    knowledge: &Knowledge<'_>,
) -> Vec<Divergence> {
    let mut out: Vec<Divergence> = candidates
        .into_iter()
        .filter_map(|suffix| {
            let a = old_primary.get(suffix);
            let b = standby.get(suffix);
            let same = match (a, b) {
                (Some(a), Some(b)) => a.value == b.value,
                (None, None) => true,
                _ => false,
            };
            (!same).then(|| Divergence {
                suffix: suffix.clone(),
                old_primary: a.cloned(),
                standby: b.cloned(),
                loss: knowledge.loss(suffix, a),
            })
        })
        .collect();
    out.sort_by(|x, y| x.suffix.cmp(&y.suffix));
    out.dedup_by(|x, y| x.suffix == y.suffix);
    out
}

/// The union of both sides' changed keys: every key that can differ.
pub fn dirty_set(old_primary: Option<&Changes>, standby: Option<&Changes>) -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = [old_primary, standby]
        .into_iter()
        .flatten()
        .flat_map(|c| c.written.keys().chain(c.deleted.keys()).cloned())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// A line of the lost-writes file (JSON lines): what the old primary
/// holds for a key the standby never received, and what the standby holds
/// now. Keys and values are UTF-8 text when they are, base64 otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LostWrite {
    pub job: String,
    pub loss: Loss,
    /// The old primary's key.
    #[serde(flatten)]
    pub key: Bytes<KeyField>,
    pub old_primary: SideState,
    pub standby: SideState,
}

/// What one side holds for a lost write's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SideState {
    Value {
        #[serde(flatten)]
        value: Bytes<ValueField>,
        mod_revision: i64,
        /// Non-zero when the key sits on a lease there.
        #[serde(skip_serializing_if = "is_zero")]
        lease: i64,
    },
    /// Deleted at `mod_revision` (0 when the revision is not known).
    Deleted {
        mod_revision: i64,
    },
    Absent,
}

fn is_zero(value: &i64) -> bool {
    *value == 0
}

impl SideState {
    pub fn of(held: Option<&Held>, deleted_at: Option<i64>) -> Self {
        match (held, deleted_at) {
            (Some(held), _) => SideState::Value {
                value: Bytes::new(&held.value),
                mod_revision: held.mod_revision,
                lease: held.lease,
            },
            (None, Some(revision)) => SideState::Deleted {
                mod_revision: revision,
            },
            (None, None) => SideState::Absent,
        }
    }
}

/// Names a byte field `key`/`value` when it is UTF-8, `key_base64`/`value_base64` otherwise.
pub trait FieldName {
    const TEXT: &'static str;
    const BASE64: &'static str;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyField;
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueField;

impl FieldName for KeyField {
    const TEXT: &'static str = "key";
    const BASE64: &'static str = "key_base64";
}

impl FieldName for ValueField {
    const TEXT: &'static str = "value";
    const BASE64: &'static str = "value_base64";
}

/// Bytes that serialize as one field named by `F`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bytes<F> {
    bytes: Vec<u8>,
    field: std::marker::PhantomData<F>,
}

impl<F> Bytes<F> {
    pub fn new(bytes: &[u8]) -> Self {
        Self {
            bytes: bytes.to_vec(),
            field: std::marker::PhantomData,
        }
    }
}

impl<F: FieldName> Serialize for Bytes<F> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(1))?;
        match std::str::from_utf8(&self.bytes) {
            Ok(text) => map.serialize_entry(F::TEXT, text)?,
            Err(_) => map.serialize_entry(
                F::BASE64,
                &base64::engine::general_purpose::STANDARD.encode(&self.bytes),
            )?,
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type State = BTreeMap<Vec<u8>, Vec<u8>>;

    fn held(value: &[u8], revision: i64) -> Held {
        Held {
            value: value.to_vec(),
            mod_revision: revision,
            create_revision: revision,
            lease: 0,
        }
    }

    /// Applies `ops` (key, Some(value) put / None delete) to `state` from
    /// revision `from` on, recording each side's changes as its history would.
    fn apply(state: &mut State, from: i64, ops: &[(u8, Option<u8>)]) -> Changes {
        let base = state.clone();
        let mut revision = from;
        let mut last_write: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
        let mut last_delete: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
        for (key, value) in ops {
            revision += 1;
            let key = vec![*key];
            match value {
                Some(v) => {
                    state.insert(key.clone(), vec![*v]);
                    last_write.insert(key, revision);
                }
                None => {
                    if state.remove(&key).is_some() {
                        last_delete.insert(key, revision);
                    }
                }
            }
        }
        let mut changes = Changes::default();
        for (key, value) in state.iter() {
            if let Some(&r) = last_write.get(key) {
                changes.written.insert(key.clone(), held(value, r));
            }
        }
        for (key, r) in last_delete {
            if base.contains_key(&key) && !state.contains_key(&key) {
                changes.deleted.insert(key, r);
            }
        }
        changes
    }

    fn as_held(state: &State, changes: &Changes, base_revision: i64) -> BTreeMap<Vec<u8>, Held> {
        state
            .iter()
            .map(|(k, v)| {
                let h = changes
                    .written
                    .get(k)
                    .cloned()
                    .unwrap_or_else(|| held(v, base_revision));
                (k.clone(), h)
            })
            .collect()
    }

    fn arb_state() -> impl Strategy<Value = State> {
        proptest::collection::btree_map(
            (0u8..12).prop_map(|k| vec![k]),
            (0u8..3).prop_map(|v| vec![v]),
            0..12,
        )
    }

    fn arb_ops() -> impl Strategy<Value = Vec<(u8, Option<u8>)>> {
        proptest::collection::vec((0u8..12, proptest::option::of(0u8..3)), 0..12)
    }

    proptest! {
        /// Writing the standby's state of every divergent key in the dirty
        /// set makes the old primary equal the standby, and the certain
        /// losses are exactly the keys the old primary changed whose final
        /// state the standby does not hold.
        #[test]
        fn the_dirty_set_repairs_everything_and_names_every_loss(base in arb_state(), a_ops in arb_ops(), b_ops in arb_ops()) {
            let checkpoint = 100;
            let mut a = base.clone();
            let a_changes = apply(&mut a, checkpoint, &a_ops);
            let mut b = base.clone();
            let b_changes = apply(&mut b, 1000, &b_ops);
            let knowledge = Knowledge { old_primary: Some(&a_changes), standby_at_base: None, checkpoint, same_history: true };
            let dirty = dirty_set(Some(&a_changes), Some(&b_changes));
            let found = divergences(&dirty, &as_held(&a, &a_changes, 50), &as_held(&b, &b_changes, 500), &knowledge);
            let mut repaired = a.clone();
            for d in &found {
                match &d.standby {
                    Some(h) => { repaired.insert(d.suffix.clone(), h.value.clone()); }
                    None => { repaired.remove(&d.suffix); }
                }
            }
            prop_assert_eq!(&repaired, &b);
            let expected_lost: Vec<Vec<u8>> = a.keys().chain(base.keys()).cloned()
                .collect::<std::collections::BTreeSet<_>>().into_iter()
                .filter(|k| (a.get(k) != base.get(k) || a_changes.contains(k)) && a.get(k) != b.get(k))
                .collect();
            let lost: Vec<Vec<u8>> = found.iter().filter(|d| d.loss == Loss::Certain).map(|d| d.suffix.clone()).collect();
            prop_assert_eq!(lost, expected_lost);
            prop_assert!(found.iter().all(|d| d.loss != Loss::Possible));
        }

        /// Without the old primary's history the mod revisions still name
        /// every lost put; the standby's state at its base (the old
        /// primary's at the checkpoint) names every lost delete; without
        /// either a delete is possible, never missed.
        #[test]
        fn without_the_old_primarys_history_no_loss_is_missed(base in arb_state(), a_ops in arb_ops(), b_ops in arb_ops(), standby_known in any::<bool>()) {
            let checkpoint = 100;
            let mut a = base.clone();
            let a_changes = apply(&mut a, checkpoint, &a_ops);
            let mut b = base.clone();
            let b_changes = apply(&mut b, 1000, &b_ops);
            let at_base: BTreeMap<Vec<u8>, Held> = base.iter().map(|(k, v)| (k.clone(), held(v, 50))).collect();
            let knowledge = Knowledge { old_primary: None, standby_at_base: standby_known.then_some(&at_base), checkpoint, same_history: true };
            let all: Vec<Vec<u8>> = a.keys().chain(b.keys()).cloned().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            let found = divergences(&all, &as_held(&a, &a_changes, 50), &as_held(&b, &b_changes, 500), &knowledge);
            let exact = Knowledge { old_primary: Some(&a_changes), standby_at_base: None, checkpoint, same_history: true };
            for d in &found {
                let truth = exact.loss(&d.suffix, d.old_primary.as_ref());
                match truth {
                    Loss::Certain => prop_assert!(d.loss != Loss::None, "{:?} missed", d.suffix),
                    Loss::None => prop_assert!(d.loss != Loss::Certain, "{:?} invented", d.suffix),
                    Loss::Possible => unreachable!(),
                }
                // With the standby's history the answer is exact.
                if standby_known {
                    prop_assert_eq!(d.loss, truth, "{:?}", d.suffix);
                }
            }
        }

        #[test]
        fn base_keys_deleted_counts_deletes_of_the_bases_keys(base in arb_state(), ops in arb_ops()) {
            let mut now = base.clone();
            let changes = apply(&mut now, 100, &ops);
            // Keys present now and created after the base: written since,
            // and either new or deleted and created again.
            let mut deleted_once = std::collections::BTreeSet::new();
            let mut state = base.clone();
            let mut created_since = std::collections::BTreeSet::new();
            for (key, value) in &ops {
                let key = vec![*key];
                match value {
                    Some(_) => { if !state.contains_key(&key) { created_since.insert(key.clone()); } state.insert(key, vec![0]); }
                    None => { if state.remove(&key).is_some() { created_since.remove(&key); if base.contains_key(&key) { deleted_once.insert(key); } } }
                }
            }
            let created_now = created_since.iter().filter(|k| now.contains_key(*k)).count() as i64;
            prop_assert_eq!(
                Changes::base_keys_deleted(base.len() as i64, now.len() as i64, created_now),
                deleted_once.len() as i64
            );
            prop_assert!(changes.deleted.keys().all(|k| deleted_once.contains(k)));
        }
    }

    #[test]
    fn a_rebuilt_old_primary_makes_every_loss_possible() {
        let knowledge = Knowledge {
            old_primary: None,
            standby_at_base: None,
            checkpoint: 10,
            same_history: false,
        };
        assert_eq!(knowledge.loss(b"k", Some(&held(b"v", 5))), Loss::Possible);
    }

    #[test]
    fn lost_writes_serialize_text_or_base64() {
        let line = LostWrite {
            job: "app".into(),
            loss: Loss::Certain,
            key: Bytes::new(b"/app/k"),
            old_primary: SideState::of(Some(&held(b"v1", 7)), None),
            standby: SideState::of(None, None),
        };
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"job":"app","loss":"certain","key":"/app/k","old_primary":{"state":"value","value":"v1","mod_revision":7},"standby":{"state":"absent"}}"#
        );
        let binary = LostWrite {
            key: Bytes::new(&[0xff, 0]),
            old_primary: SideState::of(None, Some(9)),
            ..line
        };
        let text = serde_json::to_string(&binary).unwrap();
        assert!(text.contains(r#""key_base64":"/wA=""#), "{text}");
        assert!(
            text.contains(r#""old_primary":{"state":"deleted","mod_revision":9}"#),
            "{text}"
        );
    }
}
