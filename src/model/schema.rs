//! What the syncer keeps on the destination, under `<meta-prefix><job>/`.
//!
//! Every value is JSON. Fields are only ever added, with `#[serde(default)]`,
//! so a newer syncer reads what an older one wrote and a rollback reads what
//! a newer one wrote (unknown fields are ignored).

use serde::{Deserialize, Serialize};

/// What the destination reflects. Written in the same txn as the data it
/// describes, so it can never run ahead of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Every source revision up to this one is applied.
    pub last_synced_rev: i64,
    /// The source this checkpoint belongs to: a replaced or restored source
    /// has another id, and its revisions mean nothing here.
    pub source_cluster_id: u64,
    /// RFC 3339, when this checkpoint was written.
    pub updated_at: String,
    /// The instance that wrote it.
    pub instance: String,
    /// The job's source prefix, so `status` and `promote` can read the
    /// source head with a role limited to that prefix.
    #[serde(default)]
    pub source_prefix: String,
    /// Where the source prefix is mirrored to (`None` in checkpoints written
    /// before this field existed: the same prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_prefix: Option<String>,
    /// Set while a revision too large for one txn is half applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_revision: Option<i64>,
    /// Distinct for every write, so comparing the stored value identifies
    /// exactly which txn committed last.
    pub write_id: u64,
    /// The last source event the destination reflects, so a resume can tell
    /// the history it continues from the one the destination came from (a
    /// source rebuilt with the same cluster id has another history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<EventStamp>,
    /// Whether the destination's keys sit on mirrored leases (`--leases
    /// faithful`). False in checkpoints written before leases were
    /// mirrored, like `strip`: a change of mode takes one full sync.
    #[serde(default)]
    pub leases_mirrored: bool,
    /// The source prefixes left out (`exclude-prefixes`) when it was
    /// written (`None` before this field existed: not known). One no longer
    /// excluded was never copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excluded: Option<Vec<String>>,
    /// Written by a `--revision-exact` replay: the destination's revision
    /// is the source's, so the checkpoint's own `mod_revision` equals
    /// `last_synced_rev` while parity holds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revision_exact: bool,
    /// Revision-exact only: the stretches a catch-up wrote after the source
    /// compacted history not yet replayed (see
    /// [`crate::model::exact::CaughtUp`]); the keys changed in them are
    /// metadata-inexact.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exact_gaps: Vec<crate::model::exact::CaughtUp>,
}

/// One source event, small enough to ride in every checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventStamp {
    /// The source key, hex-encoded (keys are bytes).
    pub key_hex: String,
    pub mod_revision: i64,
    /// FNV-1a 64 of the value; `None` for a delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_hash: Option<u64>,
    /// No mirrored key changed after it up to the checkpoint that carries
    /// it: the newest mirrored event. False in stamps written before this
    /// field existed (a full sync then stamped the first key instead).
    #[serde(default)]
    pub newest: bool,
}

impl EventStamp {
    pub fn put(key: &[u8], value: &[u8], mod_revision: i64) -> Self {
        Self {
            key_hex: hex(key),
            mod_revision,
            value_hash: Some(fnv1a(value)),
            newest: true,
        }
    }

    pub fn delete(key: &[u8], mod_revision: i64) -> Self {
        Self {
            key_hex: hex(key),
            mod_revision,
            value_hash: None,
            newest: true,
        }
    }

    pub fn key(&self) -> Option<Vec<u8>> {
        unhex(&self.key_hex)
    }

    /// Whether the source shows this event at the checkpoint revision: for
    /// a put, the key with this mod revision and value; for a delete, no key.
    pub fn matches(&self, at_checkpoint: Option<(i64, &[u8])>) -> bool {
        match (self.value_hash, at_checkpoint) {
            (Some(hash), Some((mod_revision, value))) => {
                mod_revision == self.mod_revision && fnv1a(value) == hash
            }
            (None, None) => true,
            _ => false,
        }
    }
}

/// FNV-1a, 64 bits: stable across builds and platforms (std's hasher is not).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a checkpoint always serializes")
    }

    /// How the job's prefixes differ from the ones this checkpoint was
    /// written for. A checkpoint that does not record its source prefix
    /// (written before the field existed) is taken to be the job's; one
    /// without a destination prefix mirrored to the same prefix.
    pub fn prefix_change(&self, source_prefix: &[u8], dest_prefix: &[u8]) -> PrefixChange {
        let was_source = Some(self.source_prefix.clone()).filter(|p| !p.is_empty());
        let was_dest = self.dest_prefix.clone().or_else(|| was_source.clone());
        let changed = |was: Option<String>, now: &[u8]| {
            let now = String::from_utf8_lossy(now).into_owned();
            was.filter(|w| *w != now).map(|w| (w, now))
        };
        PrefixChange {
            source: changed(was_source, source_prefix),
            dest: changed(was_dest, dest_prefix),
        }
    }
}

impl Checkpoint {
    /// The prefixes this checkpoint's copy left out that the job copies now
    /// (`excluded_now`: the job's excluded source prefixes; one that still
    /// falls inside an excluded prefix, a widened exclude, is still left
    /// out): their keys were never copied. Empty when the checkpoint does
    /// not say.
    pub fn excludes_removed(&self, excluded_now: &[String]) -> Vec<String> {
        self.excluded
            .iter()
            .flatten()
            .filter(|was| !excluded_now.iter().any(|now| was.starts_with(now.as_str())))
            .cloned()
            .collect()
    }
}

/// Prefixes a checkpoint was written for, (then, now), where they differ
/// from the job's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixChange {
    pub source: Option<(String, String)>,
    pub dest: Option<(String, String)>,
}

impl PrefixChange {
    pub fn is_none(&self) -> bool {
        self.source.is_none() && self.dest.is_none()
    }
}

/// Present while a full sync is under way; its exact value fences that full
/// sync's writes, and its presence at start means one was interrupted.
///
/// It also carries the mass-delete guard across attempts: the destination's
/// key count and revision before the first attempt wrote anything, and a
/// decision to block. A retry, a restart or another leader inherits both,
/// so puts made by an earlier attempt can never dilute the ratio, and the
/// deletions earlier attempts made are read off the destination itself (keys
/// created at or before the baseline revision that are gone).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FullSyncMarker {
    pub id: u64,
    pub pinned_rev: i64,
    pub source_cluster_id: u64,
    pub started_at: String,
    pub instance: String,
    pub reason: String,
    /// Destination keys (meta keys excluded) when the first attempt began.
    /// `None` only until that count is recorded, before any data write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_dest_keys: Option<u64>,
    /// The destination revision of that count: keys created after it were
    /// written by this full sync (or appeared during it) and are not guarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_revision: Option<i64>,
    /// Set when the guard refused: later attempts wait for an operator
    /// (a higher `--max-prune-ratio`, or a `reset`) instead of re-scanning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune_blocked: Option<PruneBlock>,
    /// The job's prefixes (source, destination) when the first attempt
    /// began: the baseline counts that destination prefix, and a retry for
    /// other prefixes starts a baseline of its own. `None` in markers
    /// written before this field existed: the job's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefixes: Option<(String, String)>,
}

/// What the mass-delete guard refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneBlock {
    pub would_delete: u64,
    pub baseline_dest_keys: u64,
    pub max_prune_ratio: f64,
    pub at: String,
}

impl PruneBlock {
    /// The refusal stands until an operator overrides it: a higher
    /// `--max-prune-ratio` than the one refused, or an explicit reset.
    pub fn overridden_by(&self, max_prune_ratio: f64, reset_requested: bool) -> bool {
        reset_requested || max_prune_ratio > self.max_prune_ratio
    }
}

/// How many of the keys the destination held before the full sync it may
/// still delete: the ratio applies to the destination as it was before the
/// first attempt, minus what earlier attempts already deleted.
pub fn prune_allowance(baseline_dest_keys: u64, max_prune_ratio: f64, already_deleted: u64) -> u64 {
    let ratio = max_prune_ratio.clamp(0.0, 1.0);
    let allowed = (ratio * baseline_dest_keys as f64).floor() as u64;
    allowed.saturating_sub(already_deleted)
}

impl FullSyncMarker {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a marker always serializes")
    }

    /// How the job's prefixes differ from the ones this full sync was
    /// copying (none known: a marker written before the field existed).
    pub fn prefix_change(&self, source_prefix: &[u8], dest_prefix: &[u8]) -> PrefixChange {
        let changed = |was: &str, now: &[u8]| {
            let now = String::from_utf8_lossy(now).into_owned();
            (was != now).then(|| (was.to_string(), now))
        };
        match &self.prefixes {
            Some((was_source, was_dest)) => PrefixChange {
                source: changed(was_source, source_prefix),
                dest: changed(was_dest, dest_prefix),
            },
            None => PrefixChange::default(),
        }
    }
}

/// Which destination lease mirrors one source lease, under
/// `<meta-prefix><job>/leases/<source lease, 16 hex digits>`. Written (fenced)
/// before the first key is attached to the destination lease, so a new
/// leader always knows every destination lease it must keep alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The destination lease: the source's ID when it was free there.
    pub dest_lease: i64,
    /// The source lease's granted TTL, in seconds.
    pub source_ttl: i64,
    /// The destination lease's TTL: the source's plus `--lease-grace`.
    pub dest_ttl: i64,
    /// Tells one grant's record from another's with the same IDs (a
    /// retired record is deleted only if it is still the one retired).
    #[serde(default)]
    pub grant: u64,
}

impl LeaseRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a lease record always serializes")
    }
}

/// The promoted marker's value (`<meta-prefix><job>/promoted`): what the
/// standby held when it was promoted, so `failback` knows where the two
/// histories part and `status` can show it. Markers written before these
/// fields existed hold only `promoted_at` and `by`; the rest then default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotionRecord {
    pub promoted_at: String,
    pub by: String,
    /// The source revision the promoted prefix reflects: the checkpoint,
    /// or the revision a point-in-time promotion went back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_revision: Option<i64>,
    /// The destination revision at which the prefix equalled the source at
    /// `source_revision` (the checkpoint txn's revision). Whatever changed
    /// on the destination after it is the standby's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_dest_revision: Option<i64>,
    /// The destination revision of the marker txn itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_revision: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_cluster_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_prefix: Option<String>,
    /// Set by `promote --at-source-revision` / `--at-time`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point_in_time: Option<PointInTime>,
    /// Set while `failback` fences this cluster (the old primary): no
    /// replicator writes to the job here until failback hands over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback: Option<FailbackFence>,
}

/// What a point-in-time promotion restored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointInTime {
    /// What the operator asked for (a source revision, or a time mapped to one).
    pub requested: String,
    /// The source revision whose state the prefix now holds: the newest
    /// checkpoint at or before the request.
    pub source_revision: i64,
    /// The destination revision that state was read at.
    pub read_dest_revision: i64,
    pub puts: u64,
    pub deletes: u64,
    /// Keys a client changed on the promoted cluster meanwhile (its write wins).
    pub skipped: u64,
    /// Keys restored without the lease they had then (it no longer exists).
    #[serde(default)]
    pub leases_dropped: u64,
}

/// A `failback` run fencing the old primary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailbackFence {
    pub id: u64,
    pub started_at: String,
    pub by: String,
    /// The promoted standby whose state is being copied back.
    pub standby_cluster_id: u64,
}

impl PromotionRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a promotion record always serializes")
    }

    /// Reads a marker; `None` for a marker too old or too damaged to say
    /// anything but that the job is promoted.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// One sample of the revision map (`<meta-prefix><job>/revision-map/<source
/// revision>`), written in a checkpoint txn. Its key names the source
/// revision and its mod revision is the destination revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionSample {
    /// RFC 3339, when the checkpoint txn was built.
    pub at: String,
}

impl RevisionSample {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a revision sample always serializes")
    }
}

/// A destination prefix the job mirrored to before `--dest-prefix` changed
/// (`<meta-prefix><job>/left-behind`, a JSON list): its copies stay where
/// they are, for the operator to delete once nothing reads them, and
/// `status` names them until then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeftBehind {
    pub dest_prefix: String,
    /// The source prefix those copies came from.
    pub source_prefix: String,
    /// RFC 3339: the last checkpoint written under that prefix (for a
    /// partial copy, when the interrupted full sync began).
    pub last_synced_at: String,
    /// The source revision that checkpoint held (for a partial copy, the
    /// one the interrupted full sync was pinned at).
    pub last_synced_rev: i64,
    /// Written by a full sync that was interrupted: some of its puts, none
    /// of its deletions; a snapshot of the source at no revision.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

impl LeftBehind {
    /// The list with `entry` added (once per prefix: the newest record wins).
    pub fn append(list: &[LeftBehind], entry: LeftBehind) -> Vec<u8> {
        let mut list: Vec<LeftBehind> = list
            .iter()
            .filter(|l| l.dest_prefix != entry.dest_prefix)
            .cloned()
            .collect();
        list.push(entry);
        serde_json::to_vec(&list).expect("a list of prefixes always serializes")
    }

    pub fn decode(bytes: &[u8]) -> Vec<LeftBehind> {
        serde_json::from_slice(bytes).unwrap_or_default()
    }
}

/// Everything under `<meta-prefix><job>/`, read in one range so it is one snapshot.
#[derive(Debug, Clone, Default)]
pub struct JobMeta {
    pub checkpoint_raw: Option<Vec<u8>>,
    pub checkpoint: Option<Checkpoint>,
    pub full_sync_raw: Option<Vec<u8>>,
    pub full_sync: Option<FullSyncMarker>,
    pub promoted: Option<Vec<u8>>,
    pub reset_request: Option<Vec<u8>>,
    /// The destination revision the snapshot was read at.
    pub dest_revision: i64,
    /// The destination's cluster id, to recognise a source that is the same cluster.
    pub dest_cluster_id: u64,
    /// Mirrored leases: source lease → its record. Unreadable records are
    /// skipped (their destination lease then expires on its own).
    pub leases: std::collections::BTreeMap<i64, LeaseRecord>,
    /// Destination prefixes the job left copies under.
    pub left_behind: Vec<LeftBehind>,
}

/// What an instance writes in its lock key; shown by `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockValue {
    pub instance: String,
    pub campaigning_since: String,
}

impl JobMeta {
    /// Builds the snapshot from the keys under the job's meta root, read at
    /// `dest_revision`. An unreadable checkpoint is kept raw (so the next txn
    /// can still guard on it) and reported as absent.
    pub fn from_entries<'a>(
        keys: &crate::model::keys::MetaKeys,
        entries: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
        dest_revision: i64,
        dest_cluster_id: u64,
    ) -> Self {
        let mut meta = JobMeta {
            dest_revision,
            dest_cluster_id,
            ..JobMeta::default()
        };
        let (checkpoint_key, full_sync_key, promoted_key, reset_key, left_behind_key) = (
            keys.checkpoint(),
            keys.full_sync(),
            keys.promoted(),
            keys.reset_request(),
            keys.left_behind(),
        );
        for (key, value) in entries {
            if key == checkpoint_key.as_bytes() {
                meta.checkpoint_raw = Some(value.to_vec());
                meta.checkpoint = match serde_json::from_slice(value) {
                    Ok(checkpoint) => Some(checkpoint),
                    Err(error) => {
                        tracing::warn!(key = %checkpoint_key, %error, "Checkpoint is unreadable; a full sync will rebuild it.");
                        None
                    }
                };
            } else if key == full_sync_key.as_bytes() {
                meta.full_sync_raw = Some(value.to_vec());
                meta.full_sync = serde_json::from_slice(value).ok();
            } else if key == promoted_key.as_bytes() {
                meta.promoted = Some(value.to_vec());
            } else if key == reset_key.as_bytes() {
                meta.reset_request = Some(value.to_vec());
            } else if key == left_behind_key.as_bytes() {
                meta.left_behind = LeftBehind::decode(value);
            } else if let Some(source_lease) = keys.lease_of_record(key) {
                match serde_json::from_slice::<LeaseRecord>(value) {
                    Ok(record) => {
                        meta.leases.insert(source_lease, record);
                    }
                    Err(error) => {
                        tracing::warn!(key = %String::from_utf8_lossy(key), %error, "Lease record is unreadable; its destination lease will expire on its own.");
                    }
                }
            }
        }
        meta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prune_allowance_examples() {
        assert_eq!(prune_allowance(1307, 0.5, 0), 653);
        assert_eq!(prune_allowance(1307, 1.0, 0), 1307);
        assert_eq!(prune_allowance(1307, 0.5, 600), 53);
        assert_eq!(prune_allowance(1307, 0.5, 653), 0);
        assert_eq!(prune_allowance(1307, 0.5, 700), 0);
        assert_eq!(prune_allowance(0, 1.0, 0), 0);
        assert_eq!(prune_allowance(10, 0.0, 0), 0);
        assert_eq!(prune_allowance(10, 0.25, 0), 2);
    }

    proptest! {
        /// However the deletions are split across attempts (each one asks
        /// for what it finds, crashes and retries included), the total never
        /// exceeds the ratio of the baseline.
        #[test]
        fn deletions_across_attempts_never_exceed_the_ratio(baseline in 0u64..10_000, ratio in 0.0f64..=1.0,
                                                            asks in proptest::collection::vec((0u64..5_000, 0.0f64..=1.0), 0..8)) {
            let mut deleted = 0u64;
            for (ask, done) in asks {
                if ask <= prune_allowance(baseline, ratio, deleted) {
                    // An attempt may crash part-way: only some deletions land.
                    deleted += (ask as f64 * done).floor() as u64;
                }
            }
            prop_assert!(deleted as f64 <= ratio * baseline as f64);
        }
    }

    proptest! {
        #[test]
        fn event_stamps_round_trip_and_match_only_their_event(key in proptest::collection::vec(any::<u8>(), 0..40),
                                                               value in proptest::collection::vec(any::<u8>(), 0..40),
                                                               other in proptest::collection::vec(any::<u8>(), 0..40),
                                                               revision in 1i64..1_000_000) {
            let put = EventStamp::put(&key, &value, revision);
            prop_assert_eq!(put.key(), Some(key.clone()));
            let json = serde_json::to_string(&put).unwrap();
            prop_assert_eq!(serde_json::from_str::<EventStamp>(&json).unwrap(), put.clone());
            prop_assert!(put.matches(Some((revision, &value))));
            prop_assert!(!put.matches(Some((revision + 1, &value))));
            prop_assert!(!put.matches(None));
            if other != value {
                prop_assert!(!put.matches(Some((revision, &other))));
            }
            let delete = EventStamp::delete(&key, revision);
            prop_assert!(delete.matches(None));
            prop_assert!(!delete.matches(Some((revision, &value))));
        }
    }

    #[test]
    fn fnv1a_is_the_published_function() {
        // Test vectors from the FNV reference.
        assert_eq!(fnv1a(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x85944171f73967e8);
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn only_an_operator_overrides_a_refusal() {
        let block = PruneBlock {
            would_delete: 10,
            baseline_dest_keys: 10,
            max_prune_ratio: 0.5,
            at: "t".into(),
        };
        assert!(
            !block.overridden_by(0.5, false),
            "a retry with the same ratio"
        );
        assert!(!block.overridden_by(0.25, false));
        assert!(block.overridden_by(0.75, false), "a higher ratio");
        assert!(block.overridden_by(0.5, true), "a reset");
    }

    #[test]
    fn job_meta_keeps_the_snapshot_revision_and_cluster() {
        let keys = crate::model::keys::MetaKeys::new("/m/", "job");
        let checkpoint = keys.checkpoint();
        let entries = [(checkpoint.as_bytes(), b"garbage".as_slice())];
        let meta = JobMeta::from_entries(&keys, entries, 42, 7);
        assert_eq!((meta.dest_revision, meta.dest_cluster_id), (42, 7));
        assert!(meta.checkpoint.is_none(), "unreadable");
        assert_eq!(meta.checkpoint_raw.as_deref(), Some(b"garbage".as_slice()));
    }

    #[test]
    fn promotion_records_from_older_versions_still_parse() {
        let old = br#"{"promoted_at":"2026-01-01T00:00:00Z","by":"ops"}"#;
        let record = PromotionRecord::decode(old).expect("old marker");
        assert_eq!(record.by, "ops");
        assert_eq!(record.source_revision, None);
        assert!(record.failback.is_none());
        let full = PromotionRecord {
            source_revision: Some(7),
            base_dest_revision: Some(9),
            failback: Some(FailbackFence::default()),
            ..record
        };
        assert_eq!(PromotionRecord::decode(&full.encode()), Some(full));
        assert_eq!(
            PromotionRecord::decode(b"{}"),
            None,
            "promoted_at is required"
        );
    }

    #[test]
    fn markers_from_older_versions_still_parse() {
        let old = br#"{"id":1,"pinned_rev":5,"source_cluster_id":2,"started_at":"t","instance":"i","reason":"r"}"#;
        let marker: FullSyncMarker = serde_json::from_slice(old).unwrap();
        assert_eq!(marker.baseline_dest_keys, None);
        assert!(marker.prune_blocked.is_none());
    }
}
