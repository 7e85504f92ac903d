//! The resume proof: before a job watches from its checkpoint, the source
//! must still have the history the destination reflects (a source rebuilt
//! or restored with the same cluster id has another one, with the same
//! revision numbers).

use tokio_util::sync::CancellationToken;

use crate::etcd::api::RangeRequest;
use crate::etcd::client::FailureKind;
use crate::mirror::context::JobContext;
use crate::mirror::error::{JobError, SlowPathReason};
use crate::model::keys::zk2etcd_registry;
use crate::model::schema::EventStamp;

/// What the source and the destination say about a checkpoint's revision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResumeEvidence {
    /// Source keys in the prefix at the checkpoint revision (meta keys excluded).
    pub source_keys: i64,
    /// Destination keys in the mirrored prefix now (meta keys excluded).
    pub dest_keys: i64,
    /// The checkpoint's last event key on the source at that revision:
    /// its mod revision and value, or `None` when absent.
    pub last_event_key: Option<(i64, Vec<u8>)>,
    /// When the last event is a delete: whether the key existed on the
    /// source just before it (`None` when that revision is compacted).
    pub existed_before_delete: Option<bool>,
    /// When the last event is a delete: whether the key was absent at the
    /// delete's revision (`None` when not read).
    pub absent_at_delete: Option<bool>,
    /// Mirrored source keys at the checkpoint changed after the last event
    /// (`None` when the stamp is not known to be the newest).
    pub newer_than_last_event: Option<u64>,
    /// Keys that differ between the source at the checkpoint and the
    /// destination, compared one by one (`None`: the prefix is larger than
    /// `--resume-exact-max-keys`' tuning, so not compared).
    pub differing_keys: Option<u64>,
    /// A zk2etcd job is registered on the destination: keys it holds are
    /// under the prefix there, so the counts are no evidence (the key by
    /// key comparison leaves those keys out; the last event still counts).
    pub co_writers: bool,
}

/// Reads the evidence: count-only ranges on both sides; when the prefix is
/// small, the source at the checkpoint revision against the destination,
/// key by key; else the checkpoint's last event and whether any mirrored
/// key changed after it.
pub(crate) async fn read_resume_evidence(
    ctx: &JobContext,
    at: i64,
    last_event: Option<&EventStamp>,
    compare_keys: bool,
    cancel: &CancellationToken,
) -> Result<ResumeEvidence, JobError> {
    let source_prefix = ctx.rewrite.source_prefix();
    let count_at = |prefix: &[u8], revision: i64| {
        RangeRequest::prefix(prefix)
            .count_only()
            .at_revision(revision)
    };
    // A compacted checkpoint revision fails here: the error's policy is a
    // full sync (etcd-io/etcd#18089: a watch from the next revision could
    // be accepted and still miss a DELETE).
    let mut source_keys = ctx
        .source
        .range(
            "count the prefix at the checkpoint",
            count_at(source_prefix, at),
        )
        .await?
        .count;
    if ctx.meta_prefix.starts_with(source_prefix) {
        source_keys -= ctx
            .source
            .range(
                "count meta keys at the checkpoint",
                count_at(&ctx.meta_prefix, at),
            )
            .await?
            .count;
    }
    // Excluded keys are not the job's: on the source they are not copied,
    // on the destination they may be the destination's own.
    for prefix in ctx.rewrite.excluded_source_prefixes() {
        source_keys -= ctx
            .source
            .range(
                "count excluded keys at the checkpoint",
                count_at(&prefix, at),
            )
            .await?
            .count;
    }
    let dest_prefix = ctx.rewrite.dest_prefix();
    let counted = ctx
        .dest
        .range("count the mirrored prefix", count_at(dest_prefix, 0))
        .await?;
    let mut dest_keys = counted.count;
    // Destination-local writers may be busy under an excluded prefix: count
    // it at the same revision.
    let dest_revision = counted.header.revision;
    if ctx.meta_prefix.starts_with(dest_prefix) {
        dest_keys -= ctx
            .dest
            .range("count meta keys", count_at(&ctx.meta_prefix, 0))
            .await?
            .count;
    }
    for prefix in ctx.rewrite.excluded_dest_prefixes() {
        dest_keys -= ctx
            .dest
            .range("count excluded keys", count_at(&prefix, dest_revision))
            .await?
            .count;
    }
    let registry = zk2etcd_registry(&String::from_utf8_lossy(&ctx.meta_prefix)).into_bytes();
    let co_writers = ctx
        .dest
        .range(
            "read the zk2etcd registry",
            RangeRequest::prefix(&registry).count_only(),
        )
        .await?
        .count
        > 0;
    let mut evidence = ResumeEvidence {
        source_keys,
        dest_keys,
        co_writers,
        ..ResumeEvidence::default()
    };
    if source_keys != dest_keys && !co_writers {
        return Ok(evidence);
    }
    if compare_keys
        && u64::try_from(source_keys).is_ok_and(|keys| keys <= ctx.tuning.resume_exact_max_keys)
    {
        let target = crate::check::CheckTarget {
            job: ctx.job.name.clone(),
            rewrite: ctx.rewrite.clone(),
            keys: ctx.keys.clone(),
            meta_prefix: ctx.meta_prefix.clone(),
            // Values decide which history it is; lease attachments are the
            // full sync's and the check's business.
            leases: crate::check::LeaseCheck::Ignore,
        };
        let options = crate::check::CheckOptions {
            page_size: ctx.tuning.page_size,
            ..crate::check::CheckOptions::default()
        };
        let report = crate::check::compare_at(&ctx.source, &ctx.dest, &target, at, options, cancel)
            .await
            .map_err(resume_read_error)?;
        evidence.differing_keys = Some(report.total_differences());
        return Ok(evidence);
    }
    if let Some(key) = last_event.and_then(|e| e.key()) {
        let response = ctx
            .source
            .range(
                "read the last event's key at the checkpoint",
                RangeRequest::key(key).at_revision(at),
            )
            .await?;
        evidence.last_event_key = response
            .kvs
            .into_iter()
            .next()
            .map(|kv| (kv.mod_revision, kv.value));
    }
    // A delete leaves no key to compare: a rebuilt history with the key
    // absent at the checkpoint would pass. The key must have existed just
    // before the deleting revision, and not at it.
    if let Some(event) = last_event.filter(|e| e.value_hash.is_none() && e.mod_revision > 1) {
        if let Some(key) = event.key() {
            let count_at = |revision: i64| {
                RangeRequest::key(key.clone())
                    .count_only()
                    .at_revision(revision)
            };
            let before = ctx
                .source
                .range(
                    "read the last deleted key before its delete",
                    count_at(event.mod_revision - 1),
                )
                .await;
            evidence.existed_before_delete = match before {
                Ok(response) => Some(response.count > 0),
                Err(error) if error.kind() == FailureKind::Compacted => None,
                Err(error) => return Err(error.into()),
            };
            let at_delete = ctx
                .source
                .range(
                    "read the last deleted key at its delete",
                    count_at(event.mod_revision),
                )
                .await;
            evidence.absent_at_delete = match at_delete {
                Ok(response) => Some(response.count == 0),
                Err(error) if error.kind() == FailureKind::Compacted => None,
                Err(error) => return Err(error.into()),
            };
        }
    }
    // The stamp is the newest mirrored change: in the same history nothing
    // mirrored changed after it up to the checkpoint. (etcd reads the
    // whole range to apply the filter; only the keys cross the link.)
    let newest = last_event.map_or(Some(0), |e| e.newest.then_some(e.mod_revision));
    if let Some(newest) = newest {
        let newer = ctx
            .source
            .range(
                "read the keys changed after the last event",
                RangeRequest::prefix(source_prefix)
                    .at_revision(at)
                    .keys_only()
                    .with_min_mod_revision(newest + 1),
            )
            .await?;
        evidence.newer_than_last_event = Some(
            newer
                .kvs
                .iter()
                .filter(|kv| {
                    !kv.key.starts_with(&ctx.meta_prefix)
                        && !ctx.rewrite.is_excluded_source(&kv.key)
                })
                .count() as u64,
        );
    }
    Ok(evidence)
}

/// A failed resume comparison as the job's error (a compacted checkpoint
/// revision keeps its policy: a full sync).
fn resume_read_error(error: crate::check::CheckError) -> JobError {
    match error {
        crate::check::CheckError::Client(error) => JobError::Client(error),
        crate::check::CheckError::Cancelled => JobError::Cancelled,
        other => JobError::Internal(other.to_string()),
    }
}

/// Whether the fast path is still safe, from the evidence; `Some(reason)`
/// sends the job down the slow path (a diff-only full sync).
///
/// The proof: key counts agree, and either the source at the checkpoint
/// equals the destination key by key (small prefixes: exact, whatever
/// happened to the source), or the checkpoint's last event is on the source
/// at its revision (for a delete: the key existed before and not at it)
/// and no mirrored key changed after it. A source rebuilt or restored with
/// the same cluster id has another history; it passes the second proof
/// only if it made the same change to the same key at the same revision.
pub fn verify_resume(
    revision: i64,
    last_event: Option<&EventStamp>,
    evidence: &ResumeEvidence,
) -> Option<SlowPathReason> {
    let differs = |detail: String| Some(SlowPathReason::HistoryDiffers { detail });
    if evidence.source_keys != evidence.dest_keys && !evidence.co_writers {
        return differs(format!(
            "the source prefix held {} keys at revision {revision} but the destination holds {}",
            evidence.source_keys, evidence.dest_keys
        ));
    }
    match evidence.differing_keys {
        Some(0) => return None,
        Some(keys) => {
            return differs(format!(
            "{keys} keys of the source prefix at revision {revision} differ from the destination's"
        ))
        }
        None => {}
    }
    if let Some(newer) = evidence.newer_than_last_event.filter(|n| *n > 0) {
        return differs(format!(
            "{newer} keys of the source prefix changed after the last event the destination applied, at or before revision {revision}"
        ));
    }
    let event = last_event?;
    let found = evidence
        .last_event_key
        .as_ref()
        .map(|(r, v)| (*r, v.as_slice()));
    if event.matches(found)
        && evidence.existed_before_delete != Some(false)
        && evidence.absent_at_delete != Some(false)
    {
        None
    } else {
        differs(format!(
            "the last event the destination applied (revision {}) is not in the source's history",
            event.mod_revision
        ))
    }
}
