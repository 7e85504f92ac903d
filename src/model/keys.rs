//! Key-space helpers: prefix ranges, the source→destination rewrite, and the
//! layout of a job's meta keys on the destination.

/// The exclusive end of the range that holds every key starting with `prefix`,
/// as etcd computes it (`clientv3.GetPrefixRangeEnd`). An empty prefix, or one
/// made only of 0xff bytes, has no upper bound and maps to `"\0"` (all keys).
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The first key of the range holding every key with `prefix`. etcd
/// rejects an empty key, so the whole keyspace starts at `"\0"`.
pub fn prefix_range_start(prefix: &[u8]) -> Vec<u8> {
    if prefix.is_empty() {
        vec![0]
    } else {
        prefix.to_vec()
    }
}

/// The smallest key strictly greater than `key`: where the next page starts.
pub fn key_successor(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

/// Two prefixes overlap when one of them is a prefix of the other: some key
/// would then belong to both ranges.
pub fn prefixes_overlap(a: &[u8], b: &[u8]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Maps keys between the source prefix and the destination prefix. Keys
/// under an excluded sub-prefix (`exclude-prefixes`) belong to neither side
/// of the job: never copied, compared or pruned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRewrite {
    source_prefix: Vec<u8>,
    dest_prefix: Vec<u8>,
    /// Excluded sub-prefixes, as suffixes below the job prefix.
    excluded: Vec<Vec<u8>>,
}

impl KeyRewrite {
    pub fn new(source_prefix: impl Into<Vec<u8>>, dest_prefix: impl Into<Vec<u8>>) -> Self {
        Self {
            source_prefix: source_prefix.into(),
            dest_prefix: dest_prefix.into(),
            excluded: Vec::new(),
        }
    }

    /// The same rewrite, leaving out every key under one of `prefixes`
    /// (source keys; each must start with the source prefix, which the
    /// config validation guarantees; any other is ignored).
    ///
    /// Kept disjoint (duplicates and prefixes inside another dropped), so
    /// counting keys per excluded range never counts a key twice.
    pub fn excluding<P: AsRef<[u8]>>(mut self, prefixes: impl IntoIterator<Item = P>) -> Self {
        let mut excluded: Vec<Vec<u8>> = prefixes
            .into_iter()
            .filter_map(|p| {
                p.as_ref()
                    .strip_prefix(self.source_prefix.as_slice())
                    .map(<[u8]>::to_vec)
            })
            .collect();
        // Sorted, a prefix comes right before everything under it.
        excluded.sort();
        excluded.dedup_by(|later, kept| later.starts_with(kept.as_slice()));
        self.excluded = excluded;
        self
    }

    /// Whether a key with this suffix below the job prefix (on either side)
    /// is excluded from the job.
    pub fn is_excluded_suffix(&self, suffix: &[u8]) -> bool {
        self.excluded.iter().any(|e| suffix.starts_with(e))
    }

    /// Whether a source key is excluded (a key outside the prefix is not).
    pub fn is_excluded_source(&self, source_key: &[u8]) -> bool {
        self.source_suffix(source_key)
            .is_some_and(|s| self.is_excluded_suffix(s))
    }

    /// The excluded ranges as source prefixes.
    pub fn excluded_source_prefixes(&self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.excluded.iter().map(|e| self.suffix_to_source(e))
    }

    /// The excluded ranges as source prefixes, as text (what a checkpoint
    /// records).
    pub fn excluded_source_strings(&self) -> Vec<String> {
        self.excluded_source_prefixes()
            .map(|p| String::from_utf8_lossy(&p).into_owned())
            .collect()
    }

    /// The excluded ranges as destination prefixes.
    pub fn excluded_dest_prefixes(&self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.excluded.iter().map(|e| self.suffix_to_dest(e))
    }

    pub fn source_prefix(&self) -> &[u8] {
        &self.source_prefix
    }

    pub fn dest_prefix(&self) -> &[u8] {
        &self.dest_prefix
    }

    /// The part of a source key below the job prefix, or `None` for a key
    /// outside it (a watch on the prefix never yields one).
    pub fn source_suffix<'k>(&self, source_key: &'k [u8]) -> Option<&'k [u8]> {
        source_key.strip_prefix(self.source_prefix.as_slice())
    }

    pub fn dest_suffix<'k>(&self, dest_key: &'k [u8]) -> Option<&'k [u8]> {
        dest_key.strip_prefix(self.dest_prefix.as_slice())
    }

    pub fn to_dest(&self, source_key: &[u8]) -> Option<Vec<u8>> {
        let suffix = self.source_suffix(source_key)?;
        let mut key = Vec::with_capacity(self.dest_prefix.len() + suffix.len());
        key.extend_from_slice(&self.dest_prefix);
        key.extend_from_slice(suffix);
        Some(key)
    }

    pub fn suffix_to_dest(&self, suffix: &[u8]) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.dest_prefix.len() + suffix.len());
        key.extend_from_slice(&self.dest_prefix);
        key.extend_from_slice(suffix);
        key
    }

    pub fn suffix_to_source(&self, suffix: &[u8]) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.source_prefix.len() + suffix.len());
        key.extend_from_slice(&self.source_prefix);
        key.extend_from_slice(suffix);
        key
    }
}

/// Where zk2etcd jobs register (`<meta-prefix>+zk2etcd/<job>`), written by
/// each leader before its first key: an etcd mirror job on the same
/// destination reads it to find whose ownership records to honour, so
/// neither writer prunes or overwrites the other's keys. `+` is not a job
/// name character, so no job root is inside it.
pub fn zk2etcd_registry(meta_prefix: &str) -> String {
    format!("{meta_prefix}+zk2etcd/")
}

/// Where one job keeps its state on the destination: `<meta-prefix><job>/…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaKeys {
    meta_prefix: String,
    job_root: String,
}

impl MetaKeys {
    pub fn new(meta_prefix: &str, job_name: &str) -> Self {
        Self {
            meta_prefix: meta_prefix.to_string(),
            job_root: format!("{meta_prefix}{job_name}/"),
        }
    }

    /// The prefix under which every meta key of this job sits.
    pub fn job_root(&self) -> &str {
        &self.job_root
    }

    /// The last synced source revision, written in the same txn as the data.
    pub fn checkpoint(&self) -> String {
        format!("{}checkpoint", self.job_root)
    }

    /// Present while a full sync is under way; it fences that full sync's writes.
    pub fn full_sync(&self) -> String {
        format!("{}full-sync", self.job_root)
    }

    /// Election prefix: one key per campaigning instance, bound to its lease.
    pub fn lock_prefix(&self) -> String {
        format!("{}lock/", self.job_root)
    }

    /// Written by `promote`: while present, no replicator may write to this job.
    pub fn promoted(&self) -> String {
        format!("{}promoted", self.job_root)
    }

    /// A pending `--reset-last-synced-rev` request, consumed by the next leader.
    pub fn reset_request(&self) -> String {
        format!("{}reset-request", self.job_root)
    }

    /// Destination prefixes the job mirrored to before `--dest-prefix`
    /// changed (see [`crate::model::schema::LeftBehind`]).
    pub fn left_behind(&self) -> String {
        format!("{}left-behind", self.job_root)
    }

    /// One record per mirrored source lease: which destination lease
    /// stands for it (see [`crate::model::schema::LeaseRecord`]).
    pub fn lease_records(&self) -> String {
        format!("{}leases/", self.job_root)
    }

    /// zk2etcd's ownership records: `<job root>zk-owned/<etcd key>`, one
    /// per key it wrote (see [`crate::model::zk`]). Sorts after every other
    /// item of the job root, so status reads never page through them.
    pub fn zk_owned_prefix(&self) -> String {
        format!("{}zk-owned/", self.job_root)
    }

    /// The ownership record of destination key `key`.
    pub fn zk_owned(&self, key: &[u8]) -> Vec<u8> {
        let mut record = self.zk_owned_prefix().into_bytes();
        record.extend_from_slice(key);
        record
    }

    /// This job's entry in the zk2etcd registry ([`zk2etcd_registry`]).
    pub fn zk2etcd_registration(&self) -> String {
        let job = &self.job_root[self.meta_prefix.len()..self.job_root.len() - 1];
        format!("{}{job}", zk2etcd_registry(&self.meta_prefix))
    }

    /// The record of source lease `source_lease` (16 hex digits, so the
    /// records sort by ID).
    pub fn lease_record(&self, source_lease: i64) -> String {
        format!("{}{:016x}", self.lease_records(), source_lease)
    }

    /// Samples of the revision map: `<source revision, 20 digits>`, each
    /// written in a checkpoint txn, so the sample key's mod revision is the
    /// destination revision at which the prefix equals the source at that
    /// source revision. It sorts after every other item of the job root
    /// ("revision-map/" > "reset-request"), so [`Self::state_range_end`]
    /// leaves the samples out of the job's state reads.
    pub fn revision_map(&self) -> String {
        format!("{}revision-map/", self.job_root)
    }

    /// The sample for source revision `source_revision` (zero-padded, so
    /// samples sort by revision).
    pub fn revision_sample(&self, source_revision: i64) -> String {
        format!("{}{:020}", self.revision_map(), source_revision.max(0))
    }

    /// The source revision a sample key names, if `key` is one.
    pub fn revision_of_sample(&self, key: &[u8]) -> Option<i64> {
        let digits = key.strip_prefix(self.revision_map().as_bytes())?;
        let digits = std::str::from_utf8(digits).ok()?;
        (digits.len() == 20).then(|| digits.parse().ok()).flatten()
    }

    /// The end of the range that holds the job's state (checkpoint,
    /// markers, locks, lease records) but not the revision map, which can
    /// hold a thousand samples and is only read by operator commands.
    pub fn state_range_end(&self) -> Vec<u8> {
        self.revision_map().into_bytes()
    }

    /// The source lease a record key names, if `key` is one.
    pub fn lease_of_record(&self, key: &[u8]) -> Option<i64> {
        let hex = key.strip_prefix(self.lease_records().as_bytes())?;
        let hex = std::str::from_utf8(hex).ok()?;
        if hex.len() != 16 {
            return None;
        }
        u64::from_str_radix(hex, 16).ok().map(|id| id as i64)
    }
}

/// A job name derived from its prefix: `/registry/services/` → `registry-services`.
pub fn job_name_from_prefix(prefix: &str) -> String {
    let mut name = String::with_capacity(prefix.len());
    for ch in prefix.chars() {
        if ch.is_ascii_alphanumeric() || ch == '.' || ch == '_' {
            name.push(ch);
        } else if !name.is_empty() && !name.ends_with('-') {
            name.push('-');
        }
    }
    while name.ends_with('-') {
        name.pop();
    }
    if name.is_empty() {
        "root".to_string()
    } else {
        name
    }
}

/// Job names become path segments of meta keys and metric labels.
pub fn is_valid_job_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn range_end_matches_etcd() {
        assert_eq!(prefix_range_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b""), vec![0]);
        assert_eq!(prefix_range_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn rewrite_maps_between_prefixes() {
        let rewrite = KeyRewrite::new("/src/", "/dst/");
        assert_eq!(rewrite.to_dest(b"/src/a/b"), Some(b"/dst/a/b".to_vec()));
        assert_eq!(rewrite.to_dest(b"/other"), None);
        let strip = KeyRewrite::new("/src/", "");
        assert_eq!(strip.to_dest(b"/src/x"), Some(b"x".to_vec()));
    }

    #[test]
    fn job_names_from_prefixes() {
        assert_eq!(
            job_name_from_prefix("/registry/services/"),
            "registry-services"
        );
        assert_eq!(job_name_from_prefix("/"), "root");
        assert_eq!(job_name_from_prefix(""), "root");
        assert!(is_valid_job_name(&job_name_from_prefix("/a b/c:d/")));
        assert!(!is_valid_job_name("a/b"));
    }

    #[test]
    fn the_revision_map_sorts_after_every_state_key() {
        let keys = MetaKeys::new("/m/", "job");
        let end = keys.state_range_end();
        for state in [
            keys.checkpoint(),
            keys.full_sync(),
            keys.lock_prefix() + "ffff",
            keys.promoted(),
            keys.reset_request(),
            keys.lease_record(i64::MAX),
        ] {
            assert!(state.as_bytes() < end.as_slice(), "{state}");
        }
        let sample = keys.revision_sample(42);
        assert!(sample.as_bytes() >= end.as_slice());
        assert_eq!(keys.revision_of_sample(sample.as_bytes()), Some(42));
        assert!(keys.revision_sample(9) < keys.revision_sample(10));
        assert_eq!(keys.revision_of_sample(keys.checkpoint().as_bytes()), None);
    }

    /// The registry is beside every job root, never inside one (`+` is not
    /// a job name character), and names the job.
    #[test]
    fn the_zk2etcd_registry_is_outside_every_job_root() {
        let keys = MetaKeys::new("/m/", "zk.jobs-1");
        assert_eq!(keys.zk2etcd_registration(), "/m/+zk2etcd/zk.jobs-1");
        assert!(!is_valid_job_name("+zk2etcd"));
        assert!(keys
            .zk2etcd_registration()
            .starts_with(&zk2etcd_registry("/m/")));
        assert!(!keys.zk2etcd_registration().starts_with(keys.job_root()));
    }

    #[test]
    fn overlap() {
        assert!(prefixes_overlap(b"/a/", b"/a/b/"));
        assert!(prefixes_overlap(b"", b"/x"));
        assert!(!prefixes_overlap(b"/a/", b"/b/"));
    }

    proptest! {
        #[test]
        fn every_prefixed_key_is_inside_the_range(prefix in proptest::collection::vec(any::<u8>(), 0..6),
                                                   tail in proptest::collection::vec(any::<u8>(), 0..6)) {
            let end = prefix_range_end(&prefix);
            let mut key = prefix.clone();
            key.extend_from_slice(&tail);
            prop_assert!(key >= prefix);
            prop_assert!(end == vec![0] || key < end);
        }

        /// A key is excluded exactly when it lies under one of the
        /// excluded prefixes, the same on both sides of the rewrite, and a
        /// key outside the job prefix never is.
        #[test]
        fn exclusion_is_by_prefix_on_both_sides(
            excluded in proptest::collection::vec(proptest::collection::vec(0u8..3, 0..3), 0..3),
            suffix in proptest::collection::vec(0u8..3, 0..4),
            outside in proptest::collection::vec(0u8..3, 0..4),
        ) {
            let prefixes: Vec<Vec<u8>> = excluded
                .iter()
                .map(|e| [b"/s/".as_slice(), e].concat())
                .collect();
            let rewrite = KeyRewrite::new("/s/", "/dd/").excluding(&prefixes);
            let source_key = rewrite.suffix_to_source(&suffix);
            let expected = prefixes.iter().any(|p| source_key.starts_with(p));
            prop_assert_eq!(rewrite.is_excluded_source(&source_key), expected);
            prop_assert_eq!(rewrite.is_excluded_suffix(&suffix), expected);
            let dest_key = rewrite.to_dest(&source_key).unwrap();
            let dest_expected = rewrite
                .excluded_dest_prefixes()
                .any(|p| dest_key.starts_with(&p));
            prop_assert_eq!(dest_expected, expected);
            // The ranges are disjoint: no key is counted twice.
            let ranges: Vec<Vec<u8>> = rewrite.excluded_source_prefixes().collect();
            for (i, a) in ranges.iter().enumerate() {
                for b in &ranges[i + 1..] {
                    prop_assert!(!prefixes_overlap(a, b), "{:?} and {:?}", a, b);
                }
            }
            let elsewhere = [b"/t/".as_slice(), &outside].concat();
            prop_assert!(!rewrite.is_excluded_source(&elsewhere));
        }

        #[test]
        fn rewrite_preserves_order(a in proptest::collection::vec(any::<u8>(), 0..8),
                                   b in proptest::collection::vec(any::<u8>(), 0..8)) {
            let rewrite = KeyRewrite::new("/s/", "/dd/");
            let ka = rewrite.suffix_to_source(&a);
            let kb = rewrite.suffix_to_source(&b);
            let da = rewrite.to_dest(&ka).unwrap();
            let db = rewrite.to_dest(&kb).unwrap();
            prop_assert_eq!(ka.cmp(&kb), da.cmp(&db));
        }
    }
}
