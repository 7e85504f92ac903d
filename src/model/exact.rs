//! Revision-exact replay (`--revision-exact`): the pure rules.
//!
//! The destination starts as a copy of the source at some revision (a
//! snapshot restore, or an empty history from revision 1) and from then on
//! receives exactly one txn per source revision, in order. etcd gives a
//! write txn the next revision of its store, so if nothing else writes to
//! the destination, its revision after replaying source revision `r` is `r`,
//! and every key's `create_revision`, `mod_revision`, `version` and lease
//! (leases are granted with the source's IDs) come out as the source's.
//!
//! This module decides, without I/O:
//! - [`Grouper`]: which watch events make up one whole source revision, and
//!   that no revision is missing (the watch covers the whole keyspace, so
//!   every revision has at least one event);
//! - [`plan`]: the ops of the one destination txn that replays a revision,
//!   with deletes folded into range deletes when a revision is bigger than
//!   one txn may be (a range delete or a lease expiry);
//! - [`parity`]: whether a committed txn left the destination at the
//!   source's revision;
//! - [`compare_states`]: whether two keyspaces are equal with all their
//!   metadata (the seed check and the exact `check`);
//! - [`catch_up`]: the destination revisions that bring a standby over a
//!   stretch of history the source compacted before it was replayed.

use std::collections::BTreeSet;

use crate::model::kv::KeyValue;

/// One source event, as the watch delivered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExactEvent {
    /// The revision that made it (a delete's `mod_revision`).
    pub revision: i64,
    pub key: Vec<u8>,
    /// `None` for a delete.
    pub put: Option<PutOf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOf {
    pub value: Vec<u8>,
    /// The source lease, granted on the destination under the same ID.
    pub lease: i64,
}

/// Every event of one source revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    pub revision: i64,
    pub events: Vec<ExactEvent>,
}

impl Revision {
    /// The leases its puts attach keys to (each must exist on the
    /// destination before the txn, or etcd refuses it).
    pub fn leases(&self) -> BTreeSet<i64> {
        self.events
            .iter()
            .filter_map(|e| e.put.as_ref().map(|p| p.lease))
            .filter(|lease| *lease != 0)
            .collect()
    }
}

/// The watch skipped a revision: replaying past it would shift every
/// revision after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the source watch delivered revision {got} after {after}: revisions in between are missing"
)]
pub struct Gap {
    pub after: i64,
    pub got: i64,
}

/// Collects watch events into whole revisions.
///
/// etcd sends every event of a revision in one watch response, unless the
/// response is a fragment (`fragment: true` means more of the same
/// revision follows); so a revision is whole at the end of a response that
/// is not a fragment.
#[derive(Debug, Clone)]
pub struct Grouper {
    /// The last revision handed out (the checkpoint, at the start).
    last: i64,
    open: Vec<ExactEvent>,
}

impl Grouper {
    pub fn new(applied: i64) -> Self {
        Self {
            last: applied,
            open: Vec::new(),
        }
    }

    /// The last whole revision handed out.
    pub fn last(&self) -> i64 {
        self.last
    }

    /// Adds one response's events; returns the revisions it completed,
    /// in order. Events at or below the last revision handed out (a
    /// watch re-opened from an earlier revision) are dropped.
    pub fn push(
        &mut self,
        events: impl IntoIterator<Item = ExactEvent>,
        fragment: bool,
    ) -> Result<Vec<Revision>, Gap> {
        self.open
            .extend(events.into_iter().filter(|e| e.revision > self.last));
        if fragment {
            return Ok(Vec::new());
        }
        let mut done: Vec<Revision> = Vec::new();
        for event in std::mem::take(&mut self.open) {
            match done.last_mut() {
                Some(current) if current.revision == event.revision => current.events.push(event),
                // The next revision, or a gap (an earlier one out of order too).
                _ => {
                    let expected = done.last().map_or(self.last, |r| r.revision) + 1;
                    if event.revision != expected {
                        return Err(Gap {
                            after: expected - 1,
                            got: event.revision,
                        });
                    }
                    done.push(Revision {
                        revision: event.revision,
                        events: vec![event],
                    });
                }
            }
        }
        if let Some(last) = done.last() {
            self.last = last.revision;
        }
        Ok(done)
    }
}

/// One op of a replay txn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOp {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: i64,
    },
    Delete {
        key: Vec<u8>,
    },
    /// `[from, to)`: exactly the deleted keys, nothing else the destination
    /// holds (the caller read the keys between from the source at the
    /// revision before, which the destination equals).
    DeleteRange {
        from: Vec<u8>,
        to: Vec<u8>,
    },
}

/// What one txn may carry, after the fence compares and the checkpoint put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayLimits {
    /// The destination's `--max-txn-ops`, less the checkpoint put.
    pub max_ops: usize,
    /// The destination's `--max-request-bytes`, less room for the rest.
    pub max_bytes: usize,
}

/// A revision that no single destination txn can replay.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TooBig {
    #[error(
        "source revision {revision} changes {ops} keys in a way no range delete can fold \
         ({puts} puts); the destination takes {max_ops} ops per txn: raise the destination \
         etcd's --max-txn-ops to at least {needed} (and the syncer's --max-txn-ops with it)"
    )]
    Ops {
        revision: i64,
        ops: usize,
        puts: usize,
        max_ops: usize,
        needed: usize,
    },
    #[error(
        "source revision {revision} carries {bytes} bytes; the destination takes {max_bytes} \
         per request: raise the destination etcd's --max-request-bytes (and the syncer's \
         --max-request-bytes) above {bytes}"
    )]
    Bytes {
        revision: i64,
        bytes: usize,
        max_bytes: usize,
    },
}

/// Framing per op, as `model::batch` counts it.
const OP_OVERHEAD: usize = crate::model::batch::OP_OVERHEAD_BYTES;

/// The ops that replay `revision` on the destination, skipping keys under
/// `meta_prefix` (the syncer's own, never mirrored).
///
/// `dest_keys_in_span` is called only when the revision has more ops than
/// one txn may carry: it returns every key the destination holds between
/// the smallest and largest deleted key (inclusive), so that runs of
/// deleted keys with no other key between them become one range delete
/// each. Puts cannot be folded.
pub fn plan(
    revision: &Revision,
    meta_prefix: &[u8],
    limits: ReplayLimits,
    dest_keys_in_span: impl FnOnce(&[u8], &[u8]) -> Vec<Vec<u8>>,
) -> Result<Vec<ReplayOp>, TooBig> {
    let mut ops: Vec<ReplayOp> = revision
        .events
        .iter()
        .filter(|e| !e.key.starts_with(meta_prefix))
        .map(|e| match &e.put {
            Some(put) => ReplayOp::Put {
                key: e.key.clone(),
                value: put.value.clone(),
                lease: put.lease,
            },
            None => ReplayOp::Delete { key: e.key.clone() },
        })
        .collect();
    if ops.len() > limits.max_ops {
        ops = fold_deletes(ops, dest_keys_in_span);
    }
    let puts = ops
        .iter()
        .filter(|op| matches!(op, ReplayOp::Put { .. }))
        .count();
    if ops.len() > limits.max_ops {
        return Err(TooBig::Ops {
            revision: revision.revision,
            ops: ops.len(),
            puts,
            max_ops: limits.max_ops,
            needed: ops.len() + 1,
        });
    }
    let bytes: usize = ops.iter().map(op_bytes).sum();
    if bytes > limits.max_bytes {
        return Err(TooBig::Bytes {
            revision: revision.revision,
            bytes,
            max_bytes: limits.max_bytes,
        });
    }
    Ok(ops)
}

fn op_bytes(op: &ReplayOp) -> usize {
    OP_OVERHEAD
        + match op {
            ReplayOp::Put { key, value, .. } => key.len() + value.len(),
            ReplayOp::Delete { key } => key.len(),
            ReplayOp::DeleteRange { from, to } => from.len() + to.len(),
        }
}

/// Replaces the single-key deletes by one range delete per run of deleted
/// keys that the destination holds with nothing in between.
fn fold_deletes(
    ops: Vec<ReplayOp>,
    dest_keys_in_span: impl FnOnce(&[u8], &[u8]) -> Vec<Vec<u8>>,
) -> Vec<ReplayOp> {
    let (deletes, mut kept): (Vec<ReplayOp>, Vec<ReplayOp>) = ops
        .into_iter()
        .partition(|op| matches!(op, ReplayOp::Delete { .. }));
    let deleted: BTreeSet<Vec<u8>> = deletes
        .into_iter()
        .filter_map(|op| match op {
            ReplayOp::Delete { key } => Some(key),
            _ => None,
        })
        .collect();
    let (Some(first), Some(last)) = (deleted.first(), deleted.last()) else {
        return kept;
    };
    let held = dest_keys_in_span(first, last);
    // Walk the destination's keys in order: a run is a maximal sequence of
    // held keys that are all deleted.
    let mut run: Option<(Vec<u8>, Vec<u8>)> = None;
    let mut folded = BTreeSet::new();
    let close = |run: &mut Option<(Vec<u8>, Vec<u8>)>, kept: &mut Vec<ReplayOp>| {
        if let Some((from, last)) = run.take() {
            kept.push(ReplayOp::DeleteRange {
                from,
                to: crate::model::keys::key_successor(&last),
            });
        }
    };
    for key in held {
        if deleted.contains(&key) {
            folded.insert(key.clone());
            match &mut run {
                Some((_, last)) => *last = key,
                None => run = Some((key.clone(), key)),
            }
        } else {
            close(&mut run, &mut kept);
        }
    }
    close(&mut run, &mut kept);
    // A deleted key the read did not return (it cannot be: the destination
    // holds the source's keys) is deleted on its own, which is still exact.
    kept.extend(
        deleted
            .into_iter()
            .filter(|k| !folded.contains(k))
            .map(|key| ReplayOp::Delete { key }),
    );
    kept
}

/// Why the destination is no longer the source's store at a revision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParityLost {
    /// A replay txn committed at another revision than the source's: the
    /// destination took a write from elsewhere (or a destination lease
    /// expired on its own) since the last replay.
    #[error("replaying source revision {source_revision} committed at destination revision {dest_revision}: the destination was written by something else")]
    Shifted {
        source_revision: i64,
        dest_revision: i64,
    },
    /// Found at a resume: the destination's revision is past the
    /// checkpoint's.
    #[error("the destination is at revision {dest_revision} but its checkpoint says {checkpoint}: {moved} revision(s) were written by something else")]
    Moved {
        checkpoint: i64,
        dest_revision: i64,
        moved: i64,
    },
    /// The seed check (or an exact check) found the two stores different.
    #[error("the destination differs from the source at revision {revision}: {report}")]
    Differs { revision: i64, report: StateReport },
}

/// Checks a committed replay txn: the destination's revision must be the
/// source revision it replayed.
pub fn parity(source_revision: i64, dest_revision: i64) -> Result<(), ParityLost> {
    if dest_revision == source_revision {
        Ok(())
    } else {
        Err(ParityLost::Shifted {
            source_revision,
            dest_revision,
        })
    }
}

/// Checks a destination found at a resume: its current revision must be
/// the revision its checkpoint was written at, and that revision the
/// checkpoint's source revision.
pub fn parity_at_resume(
    checkpoint: i64,
    checkpoint_written_at: i64,
    dest_revision: i64,
) -> Result<(), ParityLost> {
    if checkpoint_written_at == checkpoint && dest_revision == checkpoint {
        Ok(())
    } else {
        Err(ParityLost::Moved {
            checkpoint,
            dest_revision,
            moved: dest_revision - checkpoint,
        })
    }
}

/// How two keyspaces differ, with the first few keys of each kind.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StateReport {
    pub compared: u64,
    pub missing: u64,
    pub extra: u64,
    /// Same key, another value.
    pub values: u64,
    /// Same key and value, other revisions, version or lease.
    pub metadata: u64,
    /// Same key, value and lease, other revisions or version, on a key a
    /// catch-up may have written ([`CaughtUp`]): expected, not a failure.
    pub inexact: u64,
    pub examples: Vec<String>,
}

impl StateReport {
    pub fn is_equal(&self) -> bool {
        self.missing + self.extra + self.values + self.metadata == 0
    }

    fn note(&mut self, what: &str, key: &[u8]) {
        if self.examples.len() < 5 {
            self.examples
                .push(format!("{what} {}", String::from_utf8_lossy(key)));
        }
    }
}

impl std::fmt::Display for StateReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} keys compared: {} missing on the destination, {} extra, {} with another value, {} with other metadata",
            self.compared, self.missing, self.extra, self.values, self.metadata
        )?;
        if self.inexact > 0 {
            write!(
                f,
                ", {} metadata-inexact since a catch-up over compacted history",
                self.inexact
            )?;
        }
        if !self.examples.is_empty() {
            write!(f, " (e.g. {})", self.examples.join(", "))?;
        }
        Ok(())
    }
}

/// Compares two keyspaces sorted by key, metadata included. After the
/// catch-ups in `gaps`, a key with the same value and lease whose
/// revisions or version differ is counted `inexact` rather than
/// `metadata` when a catch-up can explain it (see [`explained_by`]).
pub fn compare_states(source: &[KeyValue], dest: &[KeyValue], gaps: &[CaughtUp]) -> StateReport {
    let mut report = StateReport::default();
    let (mut s, mut d) = (0, 0);
    while s < source.len() || d < dest.len() {
        report.compared += 1;
        match (source.get(s), dest.get(d)) {
            (Some(a), Some(b)) if a.key == b.key => {
                if a.value != b.value {
                    report.values += 1;
                    report.note("value differs:", &a.key);
                } else if a != b && a.lease == b.lease && explained_by(gaps, a, b) {
                    report.inexact += 1;
                } else if a != b {
                    report.metadata += 1;
                    report.note("metadata differs:", &a.key);
                }
                s += 1;
                d += 1;
            }
            (Some(a), Some(b)) if a.key < b.key => {
                report.missing += 1;
                report.note("missing:", &a.key);
                s += 1;
            }
            (Some(a), None) => {
                report.missing += 1;
                report.note("missing:", &a.key);
                s += 1;
            }
            (_, Some(b)) => {
                report.extra += 1;
                report.note("extra:", &b.key);
                d += 1;
            }
            (None, None) => unreachable!("the loop condition"),
        }
    }
    report
}

/// A stretch of destination revisions `(from, to]` written by a catch-up:
/// the source had compacted those revisions before they were replayed, so
/// they were written as the difference between the two stores. At `to`
/// the destination equals the source's store by key, value and lease, and
/// every revision from `to` on is the source's again; the keys the
/// catch-up wrote carry its revisions and versions until they change
/// again (`mod_revision`) or are deleted and created again (the rest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaughtUp {
    pub from: i64,
    pub to: i64,
}

impl CaughtUp {
    fn holds(&self, revision: i64) -> bool {
        self.from < revision && revision <= self.to
    }
}

/// How many catch-ups a checkpoint remembers; older ones merge into one
/// wider stretch (which explains more, never less).
pub const MAX_GAPS: usize = 16;

/// Adds a catch-up to those a checkpoint carries.
pub fn record_gap(gaps: &mut Vec<CaughtUp>, gap: CaughtUp) {
    gaps.push(gap);
    if gaps.len() > MAX_GAPS {
        let merged = CaughtUp {
            from: gaps[0].from,
            to: gaps[1].to,
        };
        gaps.splice(0..2, [merged]);
    }
}

/// Whether a catch-up can explain that `source` and `dest` (same key,
/// value and lease) differ in revisions or version: one of their create or
/// mod revisions falls in a caught-up stretch, or only the version differs
/// on a key that lived across one (the catch-up put it once where the
/// source put it several times, and later puts add the same to both).
pub fn explained_by(gaps: &[CaughtUp], source: &KeyValue, dest: &KeyValue) -> bool {
    let revisions = [
        source.create_revision,
        source.mod_revision,
        dest.create_revision,
        dest.mod_revision,
    ];
    gaps.iter().any(|gap| {
        revisions.iter().any(|r| gap.holds(*r))
            || (source.create_revision == dest.create_revision
                && source.mod_revision == dest.mod_revision
                && source.create_revision <= gap.to)
    })
}

/// A catch-up that cannot be written in the revisions it has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatchUpError {
    #[error(
        "catching up from revision {from} to {to} changes {changed} keys, {needed} txns of at most \
         {max_ops} ops, but only {} revisions lie between: raise the destination etcd's \
         --max-txn-ops (and the syncer's --max-txn-ops), or re-seed the standby from a new snapshot",
        to - from
    )]
    TooMany {
        from: i64,
        to: i64,
        changed: usize,
        needed: usize,
        max_ops: usize,
    },
    #[error(
        "catching up writes {key} with {bytes} bytes; the destination takes {max_bytes} per \
         request: raise the destination etcd's --max-request-bytes (and the syncer's) above {bytes}"
    )]
    TooLarge {
        key: String,
        bytes: usize,
        max_bytes: usize,
    },
}

/// The destination revisions `from + 1 ..= to` that take a destination
/// holding the source's store at `from` (`dest`) to the source's store at
/// `to` (`source`), both sorted by key, without the meta prefix: every key
/// whose value or lease differs is put, every key the source no longer has
/// is deleted, packed in key order into as few txns as the limits allow,
/// and the rest of the `to - from` revisions are checkpoint-only. Exactly
/// `to - from` revisions, so the destination's revision is the source's
/// again at `to`.
pub fn catch_up(
    from: i64,
    to: i64,
    source: &[KeyValue],
    dest: &[KeyValue],
    limits: ReplayLimits,
) -> Result<Vec<Revision>, CatchUpError> {
    let mut changes: Vec<(Vec<u8>, Option<PutOf>)> = Vec::new();
    let (mut s, mut d) = (0, 0);
    loop {
        let put = |kv: &KeyValue| {
            Some(PutOf {
                value: kv.value.clone(),
                lease: kv.lease,
            })
        };
        match (source.get(s), dest.get(d)) {
            (None, None) => break,
            (Some(a), Some(b)) if a.key == b.key => {
                if a.value != b.value || a.lease != b.lease {
                    changes.push((a.key.clone(), put(a)));
                }
                s += 1;
                d += 1;
            }
            (Some(a), Some(b)) if a.key < b.key => {
                changes.push((a.key.clone(), put(a)));
                s += 1;
            }
            (Some(a), None) => {
                changes.push((a.key.clone(), put(a)));
                s += 1;
            }
            (_, Some(b)) => {
                changes.push((b.key.clone(), None));
                d += 1;
            }
        }
    }
    let changed = changes.len();
    let mut txns: Vec<Vec<ExactEvent>> = Vec::new();
    let mut bytes = 0;
    for (key, put) in changes {
        let size = OP_OVERHEAD + key.len() + put.as_ref().map_or(0, |p| p.value.len());
        if size > limits.max_bytes {
            return Err(CatchUpError::TooLarge {
                key: String::from_utf8_lossy(&key).into_owned(),
                bytes: size,
                max_bytes: limits.max_bytes,
            });
        }
        let fits = txns
            .last()
            .is_some_and(|txn| txn.len() < limits.max_ops && bytes + size <= limits.max_bytes);
        if !fits {
            txns.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        txns.last_mut().expect("pushed").push(ExactEvent {
            revision: 0,
            key,
            put,
        });
    }
    let free = usize::try_from(to - from).unwrap_or(0);
    if txns.len() > free {
        return Err(CatchUpError::TooMany {
            from,
            to,
            changed,
            needed: txns.len(),
            max_ops: limits.max_ops,
        });
    }
    txns.resize_with(free, Vec::new);
    Ok(txns
        .into_iter()
        .zip(from + 1..)
        .map(|(mut events, revision)| {
            for event in &mut events {
                event.revision = revision;
            }
            Revision { revision, events }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put(revision: i64, key: &str, lease: i64) -> ExactEvent {
        ExactEvent {
            revision,
            key: key.as_bytes().to_vec(),
            put: Some(PutOf {
                value: b"v".to_vec(),
                lease,
            }),
        }
    }

    fn delete(revision: i64, key: &str) -> ExactEvent {
        ExactEvent {
            revision,
            key: key.as_bytes().to_vec(),
            put: None,
        }
    }

    const ROOMY: ReplayLimits = ReplayLimits {
        max_ops: 128,
        max_bytes: 1 << 20,
    };

    #[test]
    fn a_fragment_holds_its_revision_back_until_the_rest_arrives() {
        let mut grouper = Grouper::new(4);
        assert_eq!(grouper.push([put(5, "a", 0)], true), Ok(vec![]));
        let done = grouper
            .push([put(5, "b", 0), put(6, "c", 0)], false)
            .unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].revision, 5);
        assert_eq!(done[0].events.len(), 2);
        assert_eq!(done[1].revision, 6);
        assert_eq!(grouper.last(), 6);
    }

    #[test]
    fn a_missing_revision_is_a_gap_not_a_shift() {
        let mut grouper = Grouper::new(4);
        assert_eq!(
            grouper.push([put(6, "a", 0)], false),
            Err(Gap { after: 4, got: 6 })
        );
        let mut grouper = Grouper::new(4);
        assert_eq!(
            grouper.push([put(5, "a", 0), put(7, "b", 0)], false),
            Err(Gap { after: 5, got: 7 })
        );
        // Out of order inside a response is a gap too.
        let mut grouper = Grouper::new(4);
        assert_eq!(
            grouper.push([put(5, "a", 0), put(6, "b", 0), put(5, "c", 0)], false),
            Err(Gap { after: 6, got: 5 })
        );
    }

    #[test]
    fn events_already_replayed_are_dropped() {
        let mut grouper = Grouper::new(6);
        let done = grouper.push([put(5, "a", 0), put(6, "b", 0), put(7, "c", 0)], false);
        assert_eq!(
            done.unwrap().iter().map(|r| r.revision).collect::<Vec<_>>(),
            [7]
        );
    }

    #[test]
    fn the_meta_prefix_is_never_replayed_but_its_revision_is() {
        let revision = Revision {
            revision: 9,
            events: vec![put(9, "/etcd-syncer/x", 0)],
        };
        let ops = plan(&revision, b"/etcd-syncer/", ROOMY, |_, _| unreachable!()).unwrap();
        assert!(
            ops.is_empty(),
            "a checkpoint-only txn still takes revision 9"
        );
    }

    #[test]
    fn a_big_delete_folds_into_runs_of_what_the_destination_holds() {
        let revision = Revision {
            revision: 3,
            events: ["a1", "a2", "a3", "c1", "c2"]
                .iter()
                .map(|k| delete(3, k))
                .collect(),
        };
        let limits = ReplayLimits {
            max_ops: 2,
            ..ROOMY
        };
        let ops = plan(&revision, b"/meta/", limits, |from, to| {
            assert_eq!((from, to), (&b"a1"[..], &b"c2"[..]));
            ["a1", "a2", "a3", "b", "c1", "c2"]
                .iter()
                .map(|k| k.as_bytes().to_vec())
                .collect()
        })
        .unwrap();
        assert_eq!(
            ops,
            vec![
                ReplayOp::DeleteRange {
                    from: b"a1".to_vec(),
                    to: b"a3\0".to_vec()
                },
                ReplayOp::DeleteRange {
                    from: b"c1".to_vec(),
                    to: b"c2\0".to_vec()
                },
            ]
        );
    }

    #[test]
    fn puts_that_do_not_fit_name_the_setting_to_raise() {
        let revision = Revision {
            revision: 3,
            events: (0..4).map(|i| put(3, &format!("k{i}"), 0)).collect(),
        };
        let limits = ReplayLimits {
            max_ops: 3,
            ..ROOMY
        };
        let error = plan(&revision, b"/meta/", limits, |_, _| Vec::new()).unwrap_err();
        assert!(
            matches!(
                error,
                TooBig::Ops {
                    ops: 4,
                    needed: 5,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(error.to_string().contains("--max-txn-ops"));
        let limits = ReplayLimits {
            max_ops: 10,
            max_bytes: 20,
        };
        let error = plan(&revision, b"/meta/", limits, |_, _| Vec::new()).unwrap_err();
        assert!(error.to_string().contains("--max-request-bytes"));
    }

    #[test]
    fn parity_holds_only_at_the_source_revision() {
        assert_eq!(parity(7, 7), Ok(()));
        assert!(parity(7, 8).is_err());
        assert!(parity(7, 6).is_err());
        assert_eq!(parity_at_resume(7, 7, 7), Ok(()));
        assert!(parity_at_resume(7, 7, 8).is_err());
        assert!(parity_at_resume(7, 6, 7).is_err());
    }

    #[test]
    fn a_revision_needs_the_leases_of_its_puts_only() {
        let revision = Revision {
            revision: 3,
            events: vec![
                put(3, "a", 7),
                put(3, "b", 0),
                put(3, "c", 7),
                put(3, "d", 9),
                delete(3, "e"),
            ],
        };
        assert_eq!(revision.leases().into_iter().collect::<Vec<_>>(), [7, 9]);
    }

    #[test]
    fn limits_hold_exactly_at_their_bounds() {
        // Exactly max_ops ops: no fold (no destination read), no error.
        let deletes = Revision {
            revision: 3,
            events: (0..4).map(|i| delete(3, &format!("k{i}"))).collect(),
        };
        let at_ops = ReplayLimits {
            max_ops: 4,
            max_bytes: 1 << 20,
        };
        assert_eq!(
            plan(&deletes, b"/meta/", at_ops, |_, _| unreachable!(
                "no fold at the limit"
            ))
            .unwrap()
            .len(),
            4
        );
        let puts = Revision {
            revision: 3,
            events: (0..4).map(|i| put(3, &format!("k{i}"), 0)).collect(),
        };
        assert!(plan(&puts, b"/meta/", at_ops, |_, _| Vec::new()).is_ok());
        // Bytes: each put is its key, its value and the framing.
        let bytes = 4 * (OP_OVERHEAD + 2 + 1);
        let exact = ReplayLimits {
            max_ops: 10,
            max_bytes: bytes,
        };
        assert!(plan(&puts, b"/meta/", exact, |_, _| Vec::new()).is_ok());
        let short = ReplayLimits {
            max_ops: 10,
            max_bytes: bytes - 1,
        };
        assert_eq!(
            plan(&puts, b"/meta/", short, |_, _| Vec::new()),
            Err(TooBig::Bytes {
                revision: 3,
                bytes,
                max_bytes: bytes - 1
            })
        );
        // A folded range counts both its ends.
        assert_eq!(
            op_bytes(&ReplayOp::DeleteRange {
                from: b"ab".to_vec(),
                to: b"abc".to_vec()
            }),
            OP_OVERHEAD + 5
        );
        assert_eq!(
            op_bytes(&ReplayOp::Delete {
                key: b"abc".to_vec()
            }),
            OP_OVERHEAD + 3
        );
    }

    #[test]
    fn a_moved_destination_says_by_how_much() {
        assert_eq!(
            parity_at_resume(7, 7, 10),
            Err(ParityLost::Moved {
                checkpoint: 7,
                dest_revision: 10,
                moved: 3
            })
        );
    }

    #[test]
    fn compare_states_counts_every_key_on_either_side() {
        let key = |k: &str| KeyValue {
            key: k.into(),
            value: b"v".to_vec(),
            ..KeyValue::default()
        };
        let report = compare_states(&[key("a"), key("b"), key("c")], &[], &[]);
        assert_eq!((report.compared, report.missing), (3, 3));
        let report = compare_states(&[key("b")], &[key("a"), key("b")], &[]);
        assert_eq!((report.compared, report.missing, report.extra), (2, 0, 1));
        let report = compare_states(&[], &[key("a")], &[]);
        assert_eq!((report.compared, report.extra), (1, 1));
    }

    #[test]
    fn compare_states_tells_values_from_metadata() {
        let key = |k: &str, v: &str, m: i64| KeyValue {
            key: k.into(),
            value: v.into(),
            create_revision: 2,
            mod_revision: m,
            version: 1,
            lease: 0,
        };
        let source = [key("a", "1", 2), key("b", "1", 3), key("c", "1", 4)];
        let dest = [key("b", "2", 3), key("c", "1", 5), key("d", "1", 6)];
        let report = compare_states(&source, &dest, &[]);
        assert_eq!(
            (report.missing, report.extra, report.values, report.metadata),
            (1, 1, 1, 1)
        );
        assert!(compare_states(&source, &source, &[]).is_equal());
    }

    fn kv(
        key: &str,
        value: &str,
        lease: i64,
        create: i64,
        modified: i64,
        version: i64,
    ) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: create,
            mod_revision: modified,
            version,
            lease,
        }
    }

    /// Applies catch-up revisions to a store (key to value and lease).
    fn apply(
        store: &mut std::collections::BTreeMap<Vec<u8>, (Vec<u8>, i64)>,
        revisions: &[Revision],
    ) {
        for revision in revisions {
            for event in &revision.events {
                match &event.put {
                    Some(put) => {
                        store.insert(event.key.clone(), (put.value.clone(), put.lease));
                    }
                    None => {
                        store.remove(&event.key);
                    }
                }
            }
        }
    }

    #[test]
    fn a_catch_up_fills_exactly_the_gap_with_checkpoint_only_revisions() {
        let limits = ReplayLimits {
            max_ops: 2,
            max_bytes: 10_000,
        };
        let dest = [
            kv("a", "1", 0, 2, 2, 1),
            kv("b", "1", 0, 3, 3, 1),
            kv("c", "1", 0, 4, 4, 1),
        ];
        let source = [
            kv("a", "1", 0, 2, 2, 1),
            kv("b", "2", 0, 3, 9, 4),
            kv("d", "1", 7, 8, 8, 1),
        ];
        let revisions = catch_up(4, 10, &source, &dest, limits).unwrap();
        assert_eq!(
            revisions.iter().map(|r| r.revision).collect::<Vec<_>>(),
            vec![5, 6, 7, 8, 9, 10]
        );
        // b put, c deleted, d put on lease 7: two txns of at most two ops.
        assert_eq!(
            revisions.iter().map(|r| r.events.len()).collect::<Vec<_>>(),
            vec![2, 1, 0, 0, 0, 0]
        );
        assert!(revisions[0].events.iter().all(|e| e.revision == 5));
        assert_eq!(revisions[1].events[0].put.as_ref().unwrap().lease, 7);
        assert_eq!(revisions[0].events[1].put, None, "c is deleted");
    }

    #[test]
    fn a_catch_up_too_big_for_its_gap_names_the_setting() {
        let limits = ReplayLimits {
            max_ops: 1,
            max_bytes: 10_000,
        };
        let source = [kv("a", "1", 0, 5, 5, 1), kv("b", "1", 0, 6, 6, 1)];
        let error = catch_up(4, 5, &source, &[], limits).unwrap_err();
        assert_eq!(
            error,
            CatchUpError::TooMany {
                from: 4,
                to: 5,
                changed: 2,
                needed: 2,
                max_ops: 1
            }
        );
        assert!(error.to_string().contains("--max-txn-ops"));
        assert_eq!(catch_up(4, 6, &source, &[], limits).unwrap().len(), 2);
        let tight = ReplayLimits {
            max_ops: 10,
            max_bytes: OP_OVERHEAD + 1,
        };
        let error = catch_up(4, 9, &source, &[], tight).unwrap_err();
        assert!(matches!(error, CatchUpError::TooLarge { bytes, .. } if bytes == OP_OVERHEAD + 2));
        assert!(error.to_string().contains("--max-request-bytes"));
        // Exactly at the limit it fits.
        let exact = ReplayLimits {
            max_ops: 10,
            max_bytes: OP_OVERHEAD + 2,
        };
        assert_eq!(
            catch_up(4, 6, &source, &[], exact).unwrap()[1].events.len(),
            1
        );
        // Bytes add up: three ops of one size fill a txn of three times it.
        let three = [
            kv("a", "1", 0, 5, 5, 1),
            kv("b", "1", 0, 6, 6, 1),
            kv("c", "1", 0, 7, 7, 1),
        ];
        let roomy = ReplayLimits {
            max_ops: 10,
            max_bytes: 3 * (OP_OVERHEAD + 2),
        };
        let packed = catch_up(4, 6, &three, &[], roomy).unwrap();
        assert_eq!(
            packed.iter().map(|r| r.events.len()).collect::<Vec<_>>(),
            vec![3, 0]
        );
        let snug = ReplayLimits {
            max_bytes: 3 * (OP_OVERHEAD + 2) - 1,
            ..roomy
        };
        assert_eq!(
            catch_up(4, 6, &three, &[], snug).unwrap()[0].events.len(),
            2
        );
    }

    #[test]
    fn a_catch_up_excuses_only_what_it_can_explain() {
        let gaps = [CaughtUp { from: 10, to: 20 }];
        // Written by the catch-up: its mod revision lies in the stretch.
        let source = [kv("a", "1", 0, 2, 14, 5)];
        let dest = [kv("a", "1", 0, 2, 11, 2)];
        let report = compare_states(&source, &dest, &gaps);
        assert_eq!((report.inexact, report.metadata), (1, 0));
        assert!(report.is_equal());
        assert!(report.to_string().contains("1 metadata-inexact"));
        // Without a catch-up it is a difference.
        assert_eq!(compare_states(&source, &dest, &[]).metadata, 1);
        // Changed again after it: only the version still differs.
        let report = compare_states(
            &[kv("a", "1", 0, 2, 30, 6)],
            &[kv("a", "1", 0, 2, 30, 3)],
            &gaps,
        );
        assert_eq!(report.inexact, 1);
        // A key created after the stretch has no excuse.
        let report = compare_states(
            &[kv("a", "1", 0, 25, 30, 2)],
            &[kv("a", "1", 0, 25, 30, 1)],
            &gaps,
        );
        assert_eq!(report.metadata, 1);
        // Nor a lease, nor revisions outside every stretch.
        let report = compare_states(
            &[kv("a", "1", 1, 2, 14, 5)],
            &[kv("a", "1", 2, 2, 14, 5)],
            &gaps,
        );
        assert_eq!(report.metadata, 1);
        let report = compare_states(
            &[kv("a", "1", 0, 2, 9, 5)],
            &[kv("a", "1", 0, 2, 21, 5)],
            &gaps,
        );
        assert_eq!(report.metadata, 1);
        // Both ends of the stretch: `from` is the standby's own, `to` caught up.
        let report = compare_states(
            &[kv("a", "1", 0, 3, 10, 5)],
            &[kv("a", "1", 0, 3, 9, 4)],
            &gaps,
        );
        assert_eq!(report.metadata, 1);
        let report = compare_states(
            &[kv("a", "1", 0, 3, 20, 5)],
            &[kv("a", "1", 0, 3, 9, 4)],
            &gaps,
        );
        assert_eq!(report.inexact, 1);
        // Values are never excused.
        let report = compare_states(
            &[kv("a", "1", 0, 2, 14, 5)],
            &[kv("a", "2", 0, 2, 14, 5)],
            &gaps,
        );
        assert_eq!((report.values, report.inexact), (1, 0));
    }

    #[test]
    fn old_gaps_merge_into_one_wider_stretch() {
        let mut gaps = Vec::new();
        for i in 0..MAX_GAPS as i64 {
            record_gap(
                &mut gaps,
                CaughtUp {
                    from: i * 10,
                    to: i * 10 + 5,
                },
            );
        }
        assert_eq!(gaps.len(), MAX_GAPS);
        record_gap(
            &mut gaps,
            CaughtUp {
                from: 1000,
                to: 1005,
            },
        );
        assert_eq!(gaps.len(), MAX_GAPS);
        assert_eq!(gaps[0], CaughtUp { from: 0, to: 15 });
        assert_eq!(gaps[1], CaughtUp { from: 20, to: 25 });
        assert_eq!(
            gaps[MAX_GAPS - 1],
            CaughtUp {
                from: 1000,
                to: 1005
            }
        );
    }

    proptest! {
        /// A catch-up takes the destination to the source's store by
        /// value and lease, in exactly the revisions of the gap, each txn
        /// within the limits, or says why it cannot.
        #[test]
        fn a_catch_up_ends_at_the_source_in_exactly_the_gap(
            before in proptest::collection::btree_map(0u8..40, (0u8..3, 0i64..3), 0..30),
            after in proptest::collection::btree_map(0u8..40, (0u8..3, 0i64..3), 0..30),
            gap in 1i64..20,
            max_ops in 1usize..6,
        ) {
            let store = |m: &std::collections::BTreeMap<u8, (u8, i64)>| -> Vec<KeyValue> {
                m.iter().map(|(k, (v, l))| kv(&format!("k{k:02}"), &v.to_string(), *l, 1, 1, 1)).collect()
            };
            let (dest, source) = (store(&before), store(&after));
            let limits = ReplayLimits { max_ops, max_bytes: 10_000 };
            match catch_up(100, 100 + gap, &source, &dest, limits) {
                Ok(revisions) => {
                    prop_assert_eq!(revisions.len() as i64, gap);
                    let mut got: std::collections::BTreeMap<Vec<u8>, (Vec<u8>, i64)> =
                        dest.iter().map(|kv| (kv.key.clone(), (kv.value.clone(), kv.lease))).collect();
                    apply(&mut got, &revisions);
                    let want: std::collections::BTreeMap<Vec<u8>, (Vec<u8>, i64)> =
                        source.iter().map(|kv| (kv.key.clone(), (kv.value.clone(), kv.lease))).collect();
                    prop_assert_eq!(got, want);
                    for (i, revision) in revisions.iter().enumerate() {
                        prop_assert_eq!(revision.revision, 101 + i as i64);
                        prop_assert!(revision.events.len() <= max_ops);
                        prop_assert!(revision.events.iter().all(|e| e.revision == revision.revision));
                    }
                    // Only keys that differ are written, each once.
                    let written: usize = revisions.iter().map(|r| r.events.len()).sum();
                    let report = compare_states(&source, &dest, &[]);
                    prop_assert_eq!(written as u64, report.missing + report.extra + report.values
                        + source.iter().filter(|a| dest.iter().any(|b| b.key == a.key && b.value == a.value && b.lease != a.lease)).count() as u64);
                }
                Err(CatchUpError::TooMany { needed, .. }) => {
                    prop_assert!(needed as i64 > gap);
                }
                Err(other) => prop_assert!(false, "unexpected {other}"),
            }
        }

        /// Whatever the split into responses and fragments, the grouper
        /// hands out every revision once, whole, in order.
        #[test]
        fn grouping_does_not_depend_on_how_responses_are_cut(
            sizes in proptest::collection::vec(1usize..4, 1..20),
            cuts in proptest::collection::vec(any::<bool>(), 0..80),
        ) {
            let events: Vec<ExactEvent> = sizes.iter().enumerate()
                .flat_map(|(i, n)| (0..*n).map(move |j| put(10 + i as i64, &format!("k{i}.{j}"), 0)))
                .collect();
            // Cut after event i when cuts[i]; a cut inside a revision is a fragment.
            let mut grouper = Grouper::new(9);
            let mut got: Vec<Revision> = Vec::new();
            let mut chunk = Vec::new();
            for (i, event) in events.iter().enumerate() {
                chunk.push(event.clone());
                let last = i + 1 == events.len();
                if last || cuts.get(i).copied().unwrap_or(false) {
                    let fragment = !last && events[i + 1].revision == event.revision;
                    got.extend(grouper.push(std::mem::take(&mut chunk), fragment).unwrap());
                }
            }
            prop_assert_eq!(got.len(), sizes.len());
            for (i, revision) in got.iter().enumerate() {
                prop_assert_eq!(revision.revision, 10 + i as i64);
                prop_assert_eq!(revision.events.len(), sizes[i]);
            }
        }

        /// Folded deletes delete exactly the deleted keys from what the
        /// destination holds.
        #[test]
        fn folded_deletes_delete_exactly_the_deleted_keys(
            held in proptest::collection::btree_set("[a-e]{1,3}", 1..40),
            pick in proptest::collection::vec(any::<bool>(), 40),
        ) {
            let held: Vec<String> = held.into_iter().collect();
            let deleted: Vec<&String> = held.iter().zip(&pick).filter(|(_, p)| **p).map(|(k, _)| k).collect();
            prop_assume!(!deleted.is_empty());
            let ops: Vec<ReplayOp> = deleted.iter().map(|k| ReplayOp::Delete { key: k.as_bytes().to_vec() }).collect();
            let span = |from: &[u8], to: &[u8]| held.iter().map(|k| k.as_bytes().to_vec())
                .filter(|k| k.as_slice() >= from && k.as_slice() <= to).collect();
            let ops = fold_deletes(ops, span);
            let runs = ops.iter().filter(|op| matches!(op, ReplayOp::DeleteRange { .. })).count();
            prop_assert!(runs <= deleted.len());
            let gone: Vec<&String> = held.iter().filter(|k| ops.iter().any(|op| match op {
                ReplayOp::Delete { key } => key == k.as_bytes(),
                ReplayOp::DeleteRange { from, to } => k.as_bytes() >= from.as_slice() && k.as_bytes() < to.as_slice(),
                ReplayOp::Put { .. } => false,
            })).collect();
            prop_assert_eq!(gone, deleted);
        }
    }
}
