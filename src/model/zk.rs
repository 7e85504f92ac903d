//! zk2etcd: ZooKeeper nodes mirrored into etcd, the pure rules.
//!
//! A node path under a ZooKeeper prefix maps to a key under an etcd prefix
//! ([`ZkPrefix`]); its data is the value. An ephemeral node (its
//! `ephemeralOwner` session) becomes a key on a destination lease that
//! stands for that session.
//!
//! **Ownership without Redis.** zk2etcd may share its etcd paths with other
//! writers (an etcd mirror job, people). Every key it writes has an
//! ownership record under the job's meta root, written and deleted in the
//! same txn as the key ([`Owned`]), so both carry the same `mod_revision`;
//! zk2etcd overwrites or deletes only keys it holds a record for whose key
//! still carries the record's revision (nobody wrote it since), guarded on
//! both as read.
//! A key another writer holds is left alone, even when the tree has it.
//!
//! [`plan`] decides what one comparison of (part of) the tree with the
//! destination writes: the resync after a watch gap, the periodic diff, and
//! each watch event (a plan over one key, read fresh). Keys changed while
//! a walk ran (`raced`: a watch event arrived for them) are not decided on
//! the walk's evidence; their events are applied after it.

use std::collections::{BTreeMap, BTreeSet};

/// One ZooKeeper prefix and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZkPrefix {
    /// A ZooKeeper path, e.g. `/dubbo` (no trailing slash; `/` for all).
    pub zk: String,
    /// The etcd prefix the node `zk` itself maps to.
    pub dest: Vec<u8>,
    /// Subtrees left out (ZooKeeper paths under `zk`).
    pub excluded: Vec<String>,
}

impl ZkPrefix {
    /// Whether `path` is `zk` or below it, and not excluded.
    pub fn covers(&self, path: &str) -> bool {
        under(path, &self.zk) && !self.excluded.iter().any(|ex| under(path, ex))
    }

    /// The etcd key for a node path (`None` outside the prefix or excluded).
    pub fn key_of(&self, path: &str) -> Option<Vec<u8>> {
        if !self.covers(path) {
            return None;
        }
        let rest = if self.zk == "/" {
            path
        } else {
            &path[self.zk.len()..]
        };
        let mut key = self.dest.clone();
        // One slash between them, whether the etcd prefix ends with one.
        if key.last() == Some(&b'/') && rest.starts_with('/') {
            key.extend_from_slice(&rest.as_bytes()[1..]);
        } else {
            key.extend_from_slice(rest.as_bytes());
        }
        Some(key)
    }
}

/// `path` is `root` or in its subtree.
fn under(path: &str, root: &str) -> bool {
    root == "/"
        || path == root
        || (path.starts_with(root) && path.as_bytes().get(root.len()) == Some(&b'/'))
}

/// A node as a walk or an event read it, keyed by its etcd key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeNode {
    pub data: Vec<u8>,
    /// The zxid of its last change.
    pub mzxid: i64,
    /// The owning session of an ephemeral node (0: persistent, or
    /// `--ephemeral plain`).
    pub session: i64,
}

/// A destination key as read, with the lease it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestEntry {
    pub value: Vec<u8>,
    pub lease: i64,
    /// Equal to its record's when zk2etcd wrote it last.
    pub mod_revision: i64,
}

/// zk2etcd's record that it wrote a key: what it wrote it from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OwnedRecord {
    /// The node's zxid when it was written.
    pub mzxid: i64,
    /// Its ephemeral owner (0: persistent).
    pub session: i64,
}

/// An ownership record as read, with its `mod_revision` (the guard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owned {
    pub record: OwnedRecord,
    pub revision: i64,
}

/// One write of a plan. Each goes with its ownership record in one txn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZkOp {
    /// Put the key and its record: the key is absent and unrecorded (guard:
    /// neither exists), or recorded as ours (guard: the record unchanged,
    /// and the key at the record's revision, or absent when `present` is
    /// false).
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        record: OwnedRecord,
        /// The record's revision as read; `None`: no record (create).
        guard: Option<i64>,
        /// The key existed when read (at the record's revision).
        present: bool,
    },
    /// Delete a key of ours the tree no longer has, with its record
    /// (guard: both at the record's revision).
    Delete { key: Vec<u8>, guard: i64 },
    /// Drop a record whose key is gone already (its lease expired, or
    /// someone deleted it) and that the tree no longer has (guard: the
    /// record unchanged, the key absent).
    Forget { key: Vec<u8>, guard: i64 },
}

impl ZkOp {
    pub fn key(&self) -> &[u8] {
        match self {
            ZkOp::Put { key, .. } | ZkOp::Delete { key, .. } | ZkOp::Forget { key, .. } => key,
        }
    }
}

/// What a comparison decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ZkPlan {
    pub ops: Vec<ZkOp>,
    /// Keys the tree has that another writer holds: left as they are.
    pub foreign: Vec<Vec<u8>>,
    /// Keys skipped because an event arrived for them during the walk.
    pub raced: usize,
    /// Keys skipped because their record is newer than the node the walk
    /// read (`mzxid`): a walk from a server behind the one the record was
    /// read from. After a `sync` it can only mean ZooKeeper's history went
    /// back (an ensemble restored from an older snapshot).
    pub stale: usize,
}

impl ZkPlan {
    pub fn deletes(&self) -> usize {
        self.ops
            .iter()
            .filter(|op| matches!(op, ZkOp::Delete { .. }))
            .count()
    }
}

/// The first path segment of `key` below the subtree root key `root`, if
/// `key` is below it (one slash between them, whether `root` ends with
/// one). A resync diffs one such child's subtree at a time.
pub fn child_below<'k>(root: &[u8], key: &'k [u8]) -> Option<&'k str> {
    let rest = key.strip_prefix(root)?;
    let rest = if root.last() == Some(&b'/') {
        rest
    } else {
        rest.strip_prefix(b"/")?
    };
    let segment = rest.split(|b| *b == b'/').next()?;
    std::str::from_utf8(segment).ok()
}

/// Compares `tree` (the nodes a walk or an event found, by etcd key) with
/// the destination keys and ownership records read for the same keys.
/// Only keys in `scope` are decided: for a resync every key under the
/// prefix, for one event that key. A key in `raced` is left to its event.
pub fn plan(
    tree: &BTreeMap<Vec<u8>, TreeNode>,
    dest: &BTreeMap<Vec<u8>, DestEntry>,
    owned: &BTreeMap<Vec<u8>, Owned>,
    raced: &BTreeSet<Vec<u8>>,
) -> ZkPlan {
    let mut plan = ZkPlan::default();
    let keys: BTreeSet<&Vec<u8>> = tree.keys().chain(owned.keys()).collect();
    for key in keys {
        if raced.contains(key) {
            plan.raced += 1;
            continue;
        }
        // A record whose key another writer wrote since is not ours any more.
        let ours = owned
            .get(key)
            .filter(|o| dest.get(key).is_none_or(|e| e.mod_revision == o.revision));
        if ours.is_none() && owned.contains_key(key) && !tree.contains_key(key) {
            continue;
        }
        match (tree.get(key), dest.get(key), ours) {
            (Some(node), _, Some(owned)) if node.mzxid < owned.record.mzxid => {
                // The record is newer than what the walk read: the walk
                // is stale here (see `ZkPlan::stale`).
                plan.stale += 1;
            }
            (Some(node), Some(entry), Some(owned)) => {
                let record = OwnedRecord {
                    mzxid: node.mzxid,
                    session: node.session,
                };
                let lease_kind_changed = (entry.lease != 0) != (node.session != 0)
                    || owned.record.session != node.session;
                if entry.value != node.data || lease_kind_changed {
                    plan.ops.push(ZkOp::Put {
                        key: key.clone(),
                        value: node.data.clone(),
                        record,
                        guard: Some(owned.revision),
                        present: true,
                    });
                }
            }
            (Some(node), None, owned) => plan.ops.push(ZkOp::Put {
                key: key.clone(),
                value: node.data.clone(),
                record: OwnedRecord {
                    mzxid: node.mzxid,
                    session: node.session,
                },
                guard: owned.map(|o| o.revision),
                present: false,
            }),
            (Some(_), Some(_), None) => plan.foreign.push(key.clone()),
            (None, Some(_), Some(owned)) => plan.ops.push(ZkOp::Delete {
                key: key.clone(),
                guard: owned.revision,
            }),
            (None, None, Some(owned)) => plan.ops.push(ZkOp::Forget {
                key: key.clone(),
                guard: owned.revision,
            }),
            // Keys come from the tree or the records (and a record no
            // longer ours is skipped above).
            (None, _, None) => {}
        }
    }
    plan
}

/// What `check --source zookeeper://` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TreeReport {
    pub nodes: u64,
    /// Nodes without their key.
    pub missing: u64,
    /// Keys zk2etcd owns whose node is gone.
    pub extra: u64,
    /// Keys zk2etcd owns with another value than the node's, or on a lease
    /// where its record says persistent (or the other way round).
    pub differ: u64,
    /// Keys another writer holds (with or without a node): not differences.
    pub foreign: u64,
    pub examples: Vec<String>,
}

impl TreeReport {
    pub fn is_consistent(&self) -> bool {
        self.missing + self.extra + self.differ == 0
    }

    fn note(&mut self, what: &str, key: &[u8]) {
        if self.examples.len() < 10 {
            self.examples
                .push(format!("{what} {}", String::from_utf8_lossy(key)));
        }
    }
}

/// Compares a tree with the destination keys and zk2etcd's records.
pub fn compare_tree(
    tree: &BTreeMap<Vec<u8>, TreeNode>,
    dest: &BTreeMap<Vec<u8>, DestEntry>,
    owned: &BTreeMap<Vec<u8>, Owned>,
) -> TreeReport {
    let mut report = TreeReport {
        nodes: tree.len() as u64,
        ..TreeReport::default()
    };
    // Recorded and still at the record's revision: ours.
    let ours = |key: &Vec<u8>| {
        owned
            .get(key)
            .filter(|o| dest.get(key).is_none_or(|e| e.mod_revision == o.revision))
    };
    for (key, node) in tree {
        match (dest.get(key), ours(key)) {
            (None, _) => {
                report.missing += 1;
                report.note("missing:", key);
            }
            (Some(_), None) => report.foreign += 1,
            (Some(entry), Some(owned)) => {
                if entry.value != node.data || (entry.lease != 0) != (owned.record.session != 0) {
                    report.differ += 1;
                    report.note("differs:", key);
                }
            }
        }
    }
    for key in dest.keys().filter(|k| !tree.contains_key(*k)) {
        if ours(key).is_some() {
            report.extra += 1;
            report.note("extra:", key);
        } else {
            report.foreign += 1;
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn prefix(zk: &str, dest: &str) -> ZkPrefix {
        ZkPrefix {
            zk: zk.into(),
            dest: dest.as_bytes().to_vec(),
            excluded: vec!["/dubbo/internal".into()],
        }
    }

    #[test]
    fn paths_map_to_keys_under_the_prefix_only() {
        let p = prefix("/dubbo", "/registry/dubbo");
        assert_eq!(p.key_of("/dubbo"), Some(b"/registry/dubbo".to_vec()));
        assert_eq!(
            p.key_of("/dubbo/svc/providers/dubbo%3A%2F%2F10.0.0.1"),
            Some(b"/registry/dubbo/svc/providers/dubbo%3A%2F%2F10.0.0.1".to_vec())
        );
        assert_eq!(p.key_of("/dubbox"), None, "a sibling with the same start");
        assert_eq!(p.key_of("/other"), None);
        assert_eq!(p.key_of("/dubbo/internal"), None, "excluded");
        assert_eq!(p.key_of("/dubbo/internal/x"), None, "under an exclusion");
        assert!(p.key_of("/dubbo/internals").is_some(), "only the subtree");
        let all = ZkPrefix {
            zk: "/".into(),
            dest: b"/zk/".to_vec(),
            excluded: vec![],
        };
        assert_eq!(all.key_of("/a/b"), Some(b"/zk/a/b".to_vec()));
        assert_eq!(all.key_of("/"), Some(b"/zk/".to_vec()));
        let slashed = ZkPrefix {
            zk: "/dubbo".into(),
            dest: b"/registry/".to_vec(),
            excluded: vec![],
        };
        assert_eq!(slashed.key_of("/dubbo/a"), Some(b"/registry/a".to_vec()));
        assert_eq!(slashed.key_of("/dubbo"), Some(b"/registry/".to_vec()));
    }

    fn node(data: &str, mzxid: i64, session: i64) -> TreeNode {
        TreeNode {
            data: data.into(),
            mzxid,
            session,
        }
    }

    /// A key another writer put (or one with no record).
    fn entry(value: &str, lease: i64) -> DestEntry {
        mine(value, lease, 0)
    }

    /// A key written with its record at `revision`.
    fn mine(value: &str, lease: i64, revision: i64) -> DestEntry {
        DestEntry {
            value: value.into(),
            lease,
            mod_revision: revision,
        }
    }

    fn owned(mzxid: i64, session: i64, revision: i64) -> Owned {
        Owned {
            record: OwnedRecord { mzxid, session },
            revision,
        }
    }

    fn map<V: Clone>(items: &[(&str, V)]) -> BTreeMap<Vec<u8>, V> {
        items
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
            .collect()
    }

    #[test]
    fn a_plan_touches_only_what_it_owns_or_nobody_holds() {
        let tree = map(&[
            ("/new", node("1", 5, 0)),
            ("/mine", node("2", 6, 0)),
            ("/same", node("3", 4, 0)),
            ("/theirs", node("4", 7, 0)),
            ("/gone-key", node("5", 8, 0)),
        ]);
        let dest = map(&[
            ("/mine", mine("old", 0, 10)),
            ("/same", mine("3", 0, 11)),
            ("/theirs", entry("x", 0)),
            ("/deleted", mine("d", 0, 12)),
            ("/foreign-only", entry("f", 0)),
            // Recorded as ours, but another writer put it since.
            ("/taken", entry("t", 0)),
            ("/taken-gone", entry("t", 0)),
        ]);
        let records = map(&[
            ("/mine", owned(3, 0, 10)),
            ("/same", owned(4, 0, 11)),
            ("/deleted", owned(2, 0, 12)),
            ("/gone-key", owned(1, 0, 13)),
            ("/forgotten", owned(1, 0, 14)),
            ("/taken", owned(1, 0, 15)),
            ("/taken-gone", owned(1, 0, 16)),
        ]);
        let tree = {
            let mut tree = tree;
            tree.insert(b"/taken".to_vec(), node("z", 9, 0));
            tree
        };
        let plan = plan(&tree, &dest, &records, &BTreeSet::new());
        assert_eq!(plan.foreign, vec![b"/taken".to_vec(), b"/theirs".to_vec()]);
        let ops: BTreeMap<Vec<u8>, ZkOp> = plan
            .ops
            .iter()
            .map(|op| (op.key().to_vec(), op.clone()))
            .collect();
        assert_eq!(ops.len(), 5, "{ops:?}");
        assert!(matches!(
            &ops[b"/new".as_slice()],
            ZkOp::Put { guard: None, .. }
        ));
        assert!(
            matches!(&ops[b"/mine".as_slice()], ZkOp::Put { guard: Some(10), value, .. } if value == b"2")
        );
        assert!(matches!(
            &ops[b"/gone-key".as_slice()],
            ZkOp::Put {
                guard: Some(13),
                present: false,
                ..
            }
        ));
        assert!(matches!(
            &ops[b"/deleted".as_slice()],
            ZkOp::Delete { guard: 12, .. }
        ));
        assert!(matches!(
            &ops[b"/forgotten".as_slice()],
            ZkOp::Forget { guard: 14, .. }
        ));
        assert_eq!(plan.deletes(), 1);
        assert_eq!(ZkPlan::default().deletes(), 0);
        let two = ZkPlan {
            ops: vec![
                ZkOp::Delete {
                    key: b"/a".to_vec(),
                    guard: 1,
                },
                ZkOp::Forget {
                    key: b"/b".to_vec(),
                    guard: 2,
                },
                ZkOp::Delete {
                    key: b"/c".to_vec(),
                    guard: 3,
                },
            ],
            ..ZkPlan::default()
        };
        assert_eq!(two.deletes(), 2, "forgetting a record deletes no key");
    }

    #[test]
    fn ephemeral_becomes_leased_and_back() {
        let records = map(&[("/k", owned(1, 0, 10))]);
        // Same data, now ephemeral: rewritten on a lease.
        let plan_of = |tree, dest| plan(&map(tree), &map(dest), &records, &BTreeSet::new());
        let p = plan_of(&[("/k", node("v", 2, 77))], &[("/k", mine("v", 0, 10))]);
        assert!(matches!(&p.ops[0], ZkOp::Put { record, .. } if record.session == 77));
        // Unchanged ephemeral on its lease: nothing.
        let records2 = map(&[("/k", owned(2, 77, 10))]);
        let p = plan(
            &map(&[("/k", node("v", 2, 77))]),
            &map(&[("/k", mine("v", 9, 10))]),
            &records2,
            &BTreeSet::new(),
        );
        assert!(p.ops.is_empty());
        // Another session now owns it: rewritten (onto that session's lease).
        let p = plan(
            &map(&[("/k", node("v", 3, 78))]),
            &map(&[("/k", mine("v", 9, 10))]),
            &records2,
            &BTreeSet::new(),
        );
        assert_eq!(p.ops.len(), 1);
    }

    #[test]
    fn a_stale_walk_or_a_raced_key_decides_nothing() {
        let tree = map(&[("/a", node("old", 5, 0)), ("/b", node("x", 9, 0))]);
        let dest = map(&[("/a", mine("new", 0, 10)), ("/c", mine("c", 0, 11))]);
        let records = map(&[("/a", owned(6, 0, 10)), ("/c", owned(3, 0, 11))]);
        let raced: BTreeSet<Vec<u8>> = [b"/b".to_vec(), b"/c".to_vec()].into();
        let p = plan(&tree, &dest, &records, &raced);
        assert!(p.ops.is_empty(), "{p:?}");
        assert_eq!((p.raced, p.stale), (2, 1));
    }

    /// Keys of a small tree under `/r`: the root, children, grandchildren,
    /// and a sibling of the root (`/rx`) a subtree must not take in.
    fn arb_path() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"/r".to_vec()),
            Just(b"/rx".to_vec()),
            (0u8..3).prop_map(|c| format!("/r/c{c}").into_bytes()),
            (0u8..3, 0u8..2).prop_map(|(c, g)| format!("/r/c{c}/g{g}").into_bytes()),
            (0u8..2).prop_map(|c| format!("/r/c{c}x/g").into_bytes()),
        ]
    }

    fn arb_map<V: std::fmt::Debug + Clone>(
        value: impl Strategy<Value = V>,
    ) -> impl Strategy<Value = BTreeMap<Vec<u8>, V>> {
        proptest::collection::btree_map((0u8..12).prop_map(|k| vec![b'k', k]), value, 0..10)
    }

    #[test]
    fn a_tree_check_counts_each_kind_apart() {
        let tree = map(&[
            ("/ok", node("1", 1, 0)),
            ("/missing", node("2", 1, 0)),
            ("/differs", node("3", 1, 0)),
            ("/leased", node("4", 1, 5)),
            ("/theirs", node("5", 1, 0)),
        ]);
        let dest = map(&[
            ("/ok", mine("1", 0, 1)),
            ("/differs", mine("x", 0, 2)),
            ("/leased", mine("4", 0, 3)),
            ("/theirs", entry("y", 0)),
            ("/extra", mine("e", 0, 4)),
            ("/other", entry("o", 0)),
            // Recorded, but another writer put it since: theirs now.
            ("/taken", entry("t", 0)),
        ]);
        let records = map(&[
            ("/ok", owned(1, 0, 1)),
            ("/differs", owned(1, 0, 2)),
            ("/leased", owned(1, 5, 3)),
            ("/extra", owned(1, 0, 4)),
            ("/taken", owned(1, 0, 5)),
        ]);
        let report = compare_tree(&tree, &dest, &records);
        assert_eq!(
            (
                report.nodes,
                report.missing,
                report.differ,
                report.extra,
                report.foreign
            ),
            (5, 1, 2, 1, 3)
        );
        assert!(!report.is_consistent());
        let same = compare_tree(
            &map(&[("/ok", node("1", 1, 0))]),
            &map(&[("/ok", mine("1", 0, 1))]),
            &map(&[("/ok", owned(1, 0, 1))]),
        );
        assert!(same.is_consistent());
        assert_eq!(same.examples, Vec::<String>::new());
    }

    /// A world for [`a_mirror_with_lost_events_and_resyncs_converges`]:
    /// the tree, the destination (value, lease flag) with its records, and
    /// another writer's keys.
    #[derive(Default)]
    struct World {
        zk: BTreeMap<Vec<u8>, TreeNode>,
        dest: BTreeMap<Vec<u8>, DestEntry>,
        owned: BTreeMap<Vec<u8>, Owned>,
        foreign: BTreeMap<Vec<u8>, Vec<u8>>,
        zxid: i64,
        revision: i64,
        /// Writes that put an older node over a newer one.
        regressions: usize,
    }

    impl World {
        /// Applies a plan as the shell does: each op only if its guard
        /// holds on the destination as it is now.
        fn apply(&mut self, plan: &ZkPlan) {
            for op in &plan.ops {
                let key = op.key().to_vec();
                let record_revision = self.owned.get(&key).map(|o| o.revision);
                let key_revision = self.dest.get(&key).map(|e| e.mod_revision);
                // The shell's compares (zk2etcd.rs, `commit`).
                let holds = match op {
                    ZkOp::Put { guard: None, .. } => {
                        key_revision.is_none() && record_revision.is_none()
                    }
                    ZkOp::Put {
                        guard: Some(g),
                        present,
                        ..
                    } => record_revision == Some(*g) && key_revision == present.then_some(*g),
                    ZkOp::Delete { guard: g, .. } => {
                        record_revision == Some(*g) && key_revision == Some(*g)
                    }
                    ZkOp::Forget { guard: g, .. } => {
                        record_revision == Some(*g) && key_revision.is_none()
                    }
                };
                if !holds {
                    continue;
                }
                self.revision += 1;
                match op {
                    ZkOp::Put { value, record, .. } => {
                        if self
                            .owned
                            .get(&key)
                            .is_some_and(|o| o.record.mzxid > record.mzxid)
                        {
                            self.regressions += 1;
                        }
                        self.dest.insert(
                            key.clone(),
                            DestEntry {
                                value: value.clone(),
                                lease: i64::from(record.session != 0),
                                mod_revision: self.revision,
                            },
                        );
                        self.owned.insert(
                            key,
                            Owned {
                                record: *record,
                                revision: self.revision,
                            },
                        );
                    }
                    ZkOp::Delete { .. } => {
                        self.dest.remove(&key);
                        self.owned.remove(&key);
                    }
                    ZkOp::Forget { .. } => {
                        self.owned.remove(&key);
                    }
                }
            }
        }

        /// One event, applied as the shell does: the node read fresh, the
        /// key and its record read fresh.
        fn on_event(&mut self, key: &[u8]) {
            let tree: BTreeMap<Vec<u8>, TreeNode> = self
                .zk
                .get(key)
                .map(|n| (key.to_vec(), n.clone()))
                .into_iter()
                .collect();
            let dest: BTreeMap<Vec<u8>, DestEntry> = self
                .dest
                .get(key)
                .map(|e| (key.to_vec(), e.clone()))
                .into_iter()
                .collect();
            let owned: BTreeMap<Vec<u8>, Owned> = self
                .owned
                .get(key)
                .map(|o| (key.to_vec(), *o))
                .into_iter()
                .collect();
            let plan = plan(&tree, &dest, &owned, &BTreeSet::new());
            self.apply(&plan);
        }

        fn change(&mut self, key: u8, value: u8, ephemeral: bool) -> Vec<u8> {
            let key = vec![b'k', key];
            self.zxid += 1;
            if value == 0 {
                self.zk.remove(&key);
            } else {
                self.zk.insert(
                    key.clone(),
                    TreeNode {
                        data: vec![value],
                        mzxid: self.zxid,
                        session: i64::from(ephemeral) * 7,
                    },
                );
            }
            key
        }

        /// Every foreign key holds what its writer put.
        fn foreign_intact(&self) -> bool {
            self.foreign
                .iter()
                .all(|(k, v)| self.dest.get(k).map(|e| &e.value) == Some(v))
        }
    }

    proptest! {
        /// The model of the shell's change capture: ZooKeeper changes, some
        /// of whose events are lost (a gap), resyncs whose walk races with
        /// changes (their events are applied after the diff), and another
        /// writer claiming keys under the same prefix. At every step no
        /// key of the other writer is changed or deleted; after the events
        /// and one quiet resync, every key zk2etcd may hold equals the tree.
        #[test]
        fn a_mirror_with_lost_events_and_resyncs_converges(
            steps in proptest::collection::vec((0u8..6, 0u8..10, 0u8..3, any::<bool>()), 1..80),
        ) {
            let mut world = World::default();
            let mut queue: Vec<Vec<u8>> = Vec::new();
            for (action, key, value, flag) in steps {
                match action {
                    // A change; its event is lost when `flag` and value is 2.
                    0 | 1 => {
                        let changed = world.change(key, value, flag);
                        if !(flag && value == 2) {
                            queue.push(changed);
                        }
                    }
                    // Events delivered in order.
                    2 => {
                        for key in std::mem::take(&mut queue) {
                            world.on_event(&key);
                        }
                    }
                    // A resync: walk, a change racing with it (its event
                    // applied before the diff when `flag`), diff, then events.
                    3 => {
                        let walked = world.zk.clone();
                        let racing = world.change(key, value, true);
                        if flag {
                            world.on_event(&racing);
                        } else {
                            queue.push(racing);
                        }
                        let raced: BTreeSet<Vec<u8>> = queue.iter().cloned().collect();
                        let p = plan(&walked, &world.dest, &world.owned, &raced);
                        world.apply(&p);
                        for key in std::mem::take(&mut queue) {
                            world.on_event(&key);
                        }
                    }
                    // Another writer claims a key nobody holds, or (`flag`)
                    // overwrites any key, one of zk2etcd's too.
                    4 => {
                        let claimed = vec![b'k', key];
                        if flag || (!world.dest.contains_key(&claimed) && !world.owned.contains_key(&claimed)) {
                            world.revision += 1;
                            world.dest.insert(claimed.clone(), DestEntry { value: vec![100 + value], lease: 0, mod_revision: world.revision });
                            world.foreign.insert(claimed, vec![100 + value]);
                        }
                    }
                    // The other writer deletes one of its keys.
                    _ => {
                        let dropped = vec![b'k', key];
                        if world.foreign.remove(&dropped).is_some() {
                            world.dest.remove(&dropped);
                        }
                    }
                }
                prop_assert!(world.foreign_intact(), "a foreign key was changed");
                prop_assert_eq!(world.regressions, 0, "an older node was written over a newer one");
            }
            for key in std::mem::take(&mut queue) {
                world.on_event(&key);
            }
            let p = plan(&world.zk, &world.dest, &world.owned, &BTreeSet::new());
            world.apply(&p);
            prop_assert!(world.foreign_intact());
            for (key, node) in &world.zk {
                if !world.foreign.contains_key(key) {
                    prop_assert_eq!(world.dest.get(key).map(|e| &e.value), Some(&node.data));
                    prop_assert_eq!(world.dest[key].lease != 0, node.session != 0);
                }
            }
            for key in world.dest.keys() {
                prop_assert!(world.zk.contains_key(key) || world.foreign.contains_key(key), "a stale key of ours is left");
            }
        }
    }

    #[test]
    fn a_key_s_child_is_its_first_segment_below_the_root() {
        assert_eq!(
            child_below(b"/dubbo", b"/dubbo/svc/providers/p"),
            Some("svc")
        );
        assert_eq!(child_below(b"/dubbo", b"/dubbo/svc"), Some("svc"));
        assert_eq!(child_below(b"/reg/", b"/reg/svc/x"), Some("svc"));
        // A sibling whose name starts the same is not below it.
        assert_eq!(child_below(b"/dubbo", b"/dubbox/svc"), None);
        assert_eq!(child_below(b"/dubbo", b"/dubbo"), None);
        assert_eq!(child_below(b"/dubbo", b"/other"), None);
    }

    proptest! {
        /// A resync one subtree at a time (the root's key, each child's
        /// subtree, then the records no subtree had, as the shell does)
        /// writes exactly what one plan of the whole tree writes.
        #[test]
        fn subtree_by_subtree_plans_the_whole(
            tree in proptest::collection::btree_map(arb_path(), (0u8..3, 1i64..5).prop_map(|(d, z)| TreeNode { data: vec![d], mzxid: z, session: 0 }), 0..12),
            values in proptest::collection::btree_map(arb_path(), 0u8..3, 0..12),
            records in proptest::collection::btree_map(arb_path(), 1i64..5, 0..12),
            raced in proptest::collection::btree_set(arb_path(), 0..3),
        ) {
            let root = b"/r".to_vec();
            // A walk of /r finds nothing beside it.
            let tree: BTreeMap<Vec<u8>, TreeNode> = tree.into_iter()
                .filter(|(k, _)| *k == root || child_below(&root, k).is_some())
                .collect();
            let owned: BTreeMap<Vec<u8>, Owned> = records.iter().enumerate()
                .map(|(i, (k, mzxid))| (k.clone(), Owned { record: OwnedRecord { mzxid: *mzxid, session: 0 }, revision: 100 + i as i64 }))
                .collect();
            let dest: BTreeMap<Vec<u8>, DestEntry> = values.iter()
                .map(|(k, v)| (k.clone(), DestEntry { value: vec![*v], lease: 0, mod_revision: owned.get(k).map_or(1, |o| o.revision) }))
                .collect();
            let whole = plan(&tree, &dest, &owned, &raced);
            // The children the walk finds: the tree's first segments.
            let children: BTreeSet<&str> = tree.keys().filter_map(|k| child_below(&root, k)).collect();
            let part = |keep: &dyn Fn(&[u8]) -> bool| {
                let t: BTreeMap<_, _> = tree.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
                let d: BTreeMap<_, _> = dest.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
                let o: BTreeMap<_, _> = owned.iter().filter(|(k, _)| keep(k)).map(|(k, v)| (k.clone(), *v)).collect();
                plan(&t, &d, &o, &raced)
            };
            let mut ops = part(&|k: &[u8]| k == root.as_slice()).ops;
            for child in &children {
                ops.extend(part(&|k: &[u8]| child_below(&root, k) == Some(*child)).ops);
            }
            // Leftovers: records of keys outside every subtree walked.
            let covered = |k: &[u8]| k == root.as_slice() || child_below(&root, k).is_some_and(|c| children.contains(c));
            let left: BTreeMap<_, _> = owned.iter().filter(|(k, _)| !covered(k)).map(|(k, v)| (k.clone(), *v)).collect();
            let left_dest: BTreeMap<_, _> = dest.iter().filter(|(k, _)| left.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
            ops.extend(plan(&BTreeMap::new(), &left_dest, &left, &raced).ops);
            ops.sort_by(|a, b| a.key().cmp(b.key()));
            prop_assert_eq!(ops, whole.ops);
        }
    }

    proptest! {
        /// The ownership invariant: a plan never changes or deletes a key
        /// it holds no record for; it creates only keys nobody holds; every
        /// write of a recorded key is guarded on the record as read; raced
        /// keys are never touched. And applying the plan leaves every
        /// unraced key of ours equal to the tree.
        #[test]
        fn a_plan_keeps_to_what_it_owns(
            tree in arb_map((0u8..3, 1i64..5, 0i64..2).prop_map(|(d, z, s)| TreeNode { data: vec![d], mzxid: z, session: s })),
            values in arb_map((0u8..3, 0i64..2)),
            records in arb_map((1i64..5, 0i64..2)),
            stolen in proptest::collection::btree_set((0u8..12).prop_map(|k| vec![b'k', k]), 0..4),
            raced in proptest::collection::btree_set((0u8..12).prop_map(|k| vec![b'k', k]), 0..3),
        ) {
            let owned: BTreeMap<Vec<u8>, Owned> = records.iter().enumerate()
                .map(|(i, (k, (mzxid, session)))| (k.clone(), Owned { record: OwnedRecord { mzxid: *mzxid, session: *session }, revision: 100 + i as i64 }))
                .collect();
            // A key is at its record's revision unless another writer took it.
            let dest: BTreeMap<Vec<u8>, DestEntry> = values.iter()
                .map(|(k, (v, l))| {
                    let revision = match owned.get(k) {
                        Some(o) if !stolen.contains(k) => o.revision,
                        _ => 1,
                    };
                    (k.clone(), DestEntry { value: vec![*v], lease: *l, mod_revision: revision })
                })
                .collect();
            let ours = |key: &[u8]| owned.get(key).filter(|o| dest.get(key).is_none_or(|e| e.mod_revision == o.revision));
            let p = plan(&tree, &dest, &owned, &raced);
            for op in &p.ops {
                let key = op.key();
                prop_assert!(!raced.contains(key));
                match op {
                    ZkOp::Put { guard: None, .. } => {
                        prop_assert!(!dest.contains_key(key) && !owned.contains_key(key));
                    }
                    ZkOp::Put { guard: Some(g), present, .. } => {
                        prop_assert_eq!(ours(key).map(|o| o.revision), Some(*g));
                        prop_assert_eq!(*present, dest.contains_key(key));
                    }
                    ZkOp::Delete { guard: g, .. } => {
                        prop_assert_eq!(ours(key).map(|o| o.revision), Some(*g));
                        prop_assert!(dest.contains_key(key));
                    }
                    ZkOp::Forget { guard: g, .. } => {
                        prop_assert_eq!(ours(key).map(|o| o.revision), Some(*g));
                        prop_assert!(!dest.contains_key(key));
                    }
                }
            }
            let mut after = dest.clone();
            for op in &p.ops {
                match op {
                    ZkOp::Put { key, value, record, .. } => { after.insert(key.clone(), DestEntry { value: value.clone(), lease: i64::from(record.session != 0), mod_revision: 0 }); }
                    ZkOp::Delete { key, .. } => { after.remove(key); }
                    ZkOp::Forget { .. } => {}
                }
            }
            for (key, value) in &dest {
                if ours(key).is_none() {
                    prop_assert_eq!(after.get(key), Some(value), "another writer's key is never changed");
                }
            }
            for (key, node) in &tree {
                let stale = ours(key).is_some_and(|o| node.mzxid < o.record.mzxid);
                if raced.contains(key) || stale || (dest.contains_key(key) && ours(key).is_none()) {
                    continue;
                }
                prop_assert_eq!(after.get(key).map(|e| e.value.clone()), Some(node.data.clone()));
                prop_assert_eq!(after[key].lease != 0, node.session != 0);
            }
            for key in owned.keys() {
                if !tree.contains_key(key) && !raced.contains(key) && ours(key).is_some() {
                    prop_assert!(!after.contains_key(key), "a key of ours the tree lost is deleted");
                }
            }
        }
    }
}
