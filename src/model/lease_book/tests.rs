//! The lease core driven directly: scenarios for each rule, then a
//! property test against a model of both clusters.

use super::*;
use proptest::prelude::*;

type Core = LeaseCore<String>;

const CLUSTER: u64 = 7;

fn history(revision: i64) -> History {
    History {
        cluster_id: CLUSTER,
        revision,
    }
}

fn t0() -> Instant {
    Instant::now()
}

fn record(dest: i64) -> LeaseRecord {
    LeaseRecord {
        dest_lease: dest,
        source_ttl: 10,
        dest_ttl: 15,
        grant: 1,
    }
}

/// A lease probed alive, granted `dest` and recorded: the effects of the
/// record's commit (the replies it lets out).
fn grant_recorded(core: &mut Core, now: Instant, lease: i64, dest: i64) -> Vec<Effect<String>> {
    core.step(
        now,
        Input::Probed {
            lease,
            serial: None,
            outcome: Ok(Some(10)),
        },
    );
    let effects = core.step(
        now,
        Input::Granted {
            lease,
            outcome: Ok((dest, 1)),
        },
    );
    let batch = record_txn(&effects, &[(lease, record(dest))]);
    core.step(
        now,
        Input::Recorded {
            batch,
            outcome: Ok(()),
        },
    )
}

/// Drives one lease from a writer's request to a reply: probe, grant,
/// record. Returns the effects of the last step (the reply).
fn map_one(core: &mut Core, now: Instant, lease: i64, dest: i64, at: i64) -> Vec<Effect<String>> {
    let request = 1_000 + lease as u64;
    let effects = core.step(
        now,
        Input::Resolve {
            request,
            wants: vec![Want { lease, at }],
        },
    );
    assert_eq!(
        effects,
        vec![Effect::Probe {
            lease,
            serial: None
        }]
    );
    let effects = core.step(
        now,
        Input::Probed {
            lease,
            serial: None,
            outcome: Ok(Some(10)),
        },
    );
    assert_eq!(effects, vec![Effect::Grant { lease, ttl: 15 }]);
    let effects = core.step(
        now,
        Input::Granted {
            lease,
            outcome: Ok((dest, 1)),
        },
    );
    let batch = match effects.as_slice() {
        [Effect::Record { batch, records }] => {
            assert_eq!(records, &vec![(lease, record(dest))]);
            *batch
        }
        other => panic!("expected one record txn, got {other:?}"),
    };
    core.step(
        now,
        Input::Recorded {
            batch,
            outcome: Ok(()),
        },
    )
}

fn probes(effects: &[Effect<String>]) -> Vec<(i64, u64)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Probe {
                lease,
                serial: Some(serial),
            } => Some((*lease, *serial)),
            _ => None,
        })
        .collect()
}

fn revokes(effects: &[Effect<String>]) -> Vec<i64> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Revoke { dest, .. } => Some(*dest),
            _ => None,
        })
        .collect()
}

fn head_batch(effects: &[Effect<String>]) -> Option<u64> {
    effects.iter().find_map(|e| match e {
        Effect::ReadHead { batch } => Some(*batch),
        _ => None,
    })
}

#[test]
fn the_destination_ttl_is_within_what_etcd_accepts() {
    assert_eq!(dest_ttl(Some(10), 30), 40);
    assert_eq!(dest_ttl(None, 0), MIN_DEST_TTL_SECONDS);
    assert_eq!(dest_ttl(Some(2), 1), MIN_DEST_TTL_SECONDS);
    // L7: `lease grant 9000000000` on the source, plus the grace.
    assert_eq!(dest_ttl(Some(9_000_000_000), 30), MAX_DEST_TTL_SECONDS);
    assert_eq!(dest_ttl(Some(i64::MAX), i64::MAX), MAX_DEST_TTL_SECONDS);
    assert_eq!(
        dest_ttl(Some(MAX_DEST_TTL_SECONDS - 30), 30),
        MAX_DEST_TTL_SECONDS
    );
    assert_eq!(
        dest_ttl(Some(MAX_DEST_TTL_SECONDS - 31), 30),
        MAX_DEST_TTL_SECONDS - 1
    );
}

/// A writer gets its lease only once the record is on the destination.
#[test]
fn a_writer_is_answered_only_after_the_record_commits() {
    let now = t0();
    let mut core = Core::new(Duration::from_secs(5));
    core.step(
        now,
        Input::Resumed {
            history: history(10),
        },
    );
    let reply = map_one(&mut core, now, 42, 42, 11);
    assert_eq!(
        reply,
        vec![Effect::Reply {
            request: 1_042,
            outcome: Ok([(42, 42)].into()),
        }]
    );
    // A second writer for the same lease is answered at once.
    let effects = core.step(
        now,
        Input::Resolve {
            request: 2,
            wants: vec![Want { lease: 42, at: 12 }, Want { lease: 0, at: 12 }],
        },
    );
    assert_eq!(
        effects,
        vec![Effect::Reply {
            request: 2,
            outcome: Ok([(42, 42)].into()),
        }]
    );
}

/// L1: a granted mapping whose record is not committed yet is neither
/// handed out, nor probed, renewed, retired or revoked by the keeper's
/// ticks, whatever they see meanwhile; a failed record txn fails the
/// writer and is written again by the next request.
#[test]
fn an_unrecorded_mapping_is_never_used_retired_or_revoked() {
    let now = t0();
    let mut core = Core::new(Duration::from_secs(5));
    core.step(
        now,
        Input::Resumed {
            history: history(10),
        },
    );
    core.step(
        now,
        Input::Resolve {
            request: 1,
            wants: vec![Want { lease: 5, at: 11 }],
        },
    );
    core.step(
        now,
        Input::Probed {
            lease: 5,
            serial: None,
            outcome: Ok(Some(10)),
        },
    );
    let effects = core.step(
        now,
        Input::Granted {
            lease: 5,
            outcome: Ok((500, 9)),
        },
    );
    let batch = head_record_batch(&effects);
    assert_eq!(core.target(Want { lease: 5, at: 11 }), None);
    assert!(core.mapping().is_empty());
    for second in 1..60 {
        let effects = core.step(now + Duration::from_secs(second), Input::Tick);
        assert!(effects.is_empty(), "the keeper left it alone: {effects:?}");
    }
    // The record txn fails: the writer fails, nothing is handed out.
    let effects = core.step(
        now,
        Input::Recorded {
            batch,
            outcome: Err("fenced".into()),
        },
    );
    assert_eq!(
        effects,
        vec![Effect::Reply {
            request: 1,
            outcome: Err(Failure::Effect("fenced".into())),
        }]
    );
    // The next request writes the record again and is answered once it lands.
    let effects = core.step(
        now,
        Input::Resolve {
            request: 2,
            wants: vec![Want { lease: 5, at: 12 }],
        },
    );
    let batch = head_record_batch(&effects);
    let effects = core.step(
        now,
        Input::Recorded {
            batch,
            outcome: Ok(()),
        },
    );
    assert_eq!(
        effects,
        vec![Effect::Reply {
            request: 2,
            outcome: Ok([(5, 500)].into()),
        }]
    );
}

fn head_record_batch(effects: &[Effect<String>]) -> u64 {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Record { batch, .. } => Some(*batch),
            _ => None,
        })
        .expect("a record txn")
}

/// A keeper round at `now`: the tick's head read, answered at `head`, and
/// the probes it lets out.
fn round(core: &mut Core, now: Instant, head: i64) -> Vec<(i64, u64)> {
    let effects = core.step(now, Input::Tick);
    let Some(batch) = head_batch(&effects) else {
        return probes(&effects);
    };
    probes(&core.step(
        now,
        Input::Head {
            batch,
            outcome: Ok(history(head)),
        },
    ))
}

/// Retires lease 42 (mapped to 420, keys wanted at 11): a round at H0 =
/// `before`, a gone answer, and the head read after it at G = `g`.
fn retire_42(core: &mut Core, now: Instant, before: i64, g: i64) -> u64 {
    let [(42, serial)] = round(core, now, before)[..] else {
        panic!("one probe")
    };
    let effects = core.step(
        now,
        Input::Probed {
            lease: 42,
            serial: Some(serial),
            outcome: Ok(None),
        },
    );
    let batch = head_batch(&effects).expect("a head read after the gone answer");
    core.step(
        now,
        Input::Head {
            batch,
            outcome: Ok(history(g)),
        },
    );
    serial
}

/// L2: only a probe sent after a head read (H0) that found the source
/// lease gone, followed by another head read (G), retires a lease; it is
/// revoked once the checkpoint reaches G. A probe that fails, or finds the
/// lease alive, revokes nothing; a probe goes out only after a head read.
#[test]
fn a_lease_is_revoked_only_after_a_gone_probe_a_later_head_and_the_checkpoint() {
    let now = t0();
    let mut core = Core::new(Duration::from_secs(5));
    core.step(
        now,
        Input::Resumed {
            history: history(10),
        },
    );
    map_one(&mut core, now, 42, 420, 11);
    // Due after a third of the TTL (15 s).
    assert!(core
        .step(now + Duration::from_secs(4), Input::Tick)
        .is_empty());
    let later = now + Duration::from_secs(5);
    let effects = core.step(later, Input::Tick);
    assert!(
        probes(&effects).is_empty(),
        "a head read first: {effects:?}"
    );
    let batch = head_batch(&effects).expect("a head read");
    let effects = core.step(
        later,
        Input::Head {
            batch,
            outcome: Ok(history(20)),
        },
    );
    let [(42, serial)] = probes(&effects)[..] else {
        panic!("one probe: {effects:?}")
    };
    // Failed: nothing happens; alive: renewed.
    assert!(core
        .step(
            later,
            Input::Probed {
                lease: 42,
                serial: Some(serial),
                outcome: Err("timeout".into()),
            },
        )
        .is_empty());
    assert_eq!(round(&mut core, later, 20), vec![(42, serial)]);
    let effects = core.step(
        later,
        Input::Probed {
            lease: 42,
            serial: Some(serial),
            outcome: Ok(Some(10)),
        },
    );
    assert_eq!(effects, vec![Effect::Renew { serial, dest: 420 }]);
    core.step(
        later,
        Input::Renewed {
            serial,
            outcome: Ok(true),
        },
    );
    // Gone: renewed while the head read that follows the answer is out.
    let later = later + Duration::from_secs(5);
    retire_42(&mut core, later, 25, 30);
    assert!(core.mapping().is_empty(), "retiring");
    // Old puts (at <= H0) still go to it; later ones may be a new
    // incarnation of the ID.
    assert_eq!(core.target(Want { lease: 42, at: 25 }), Some(420));
    assert_eq!(core.target(Want { lease: 42, at: 26 }), None);
    core.step(later, Input::Committed { revision: 29 });
    assert!(revokes(&core.step(later, Input::Tick)).is_empty());
    core.step(later, Input::Committed { revision: 30 });
    let effects = core.step(later, Input::Tick);
    assert_eq!(revokes(&effects), vec![420]);
    let effects = core.step(
        later,
        Input::Revoked {
            serial,
            outcome: Ok(()),
        },
    );
    assert_eq!(
        effects,
        vec![Effect::Forget {
            records: vec![(42, record(420))]
        }]
    );
    assert!(core.is_idle());
}

/// The head read that judges a gone answer is one sent after it (G
/// follows the answer): a head read already out when the answer came
/// judges nothing; the next one, sent when it returns, does.
#[test]
fn a_head_read_sent_before_the_gone_answer_judges_nothing() {
    let now = t0();
    let mut core = Core::new(Duration::from_secs(5));
    core.step(
        now,
        Input::Resumed {
            history: history(10),
        },
    );
    map_one(&mut core, now, 42, 420, 11);
    // Due two seconds after 42: its round's head read is the early one.
    map_one(&mut core, now + Duration::from_secs(2), 43, 430, 12);
    let later = now + Duration::from_secs(5);
    let [(42, serial)] = round(&mut core, later, 25)[..] else {
        panic!("one probe")
    };
    let effects = core.step(later + Duration::from_secs(2), Input::Tick);
    let early = head_batch(&effects).expect("43's round sends a head read");
    let effects = core.step(
        later,
        Input::Probed {
            lease: 42,
            serial: Some(serial),
            outcome: Ok(None),
        },
    );
    assert_eq!(head_batch(&effects), None, "one head read at a time");
    let effects = core.step(
        later,
        Input::Head {
            batch: early,
            outcome: Ok(history(26)),
        },
    );
    assert_eq!(
        core.target(Want { lease: 42, at: 27 }),
        Some(420),
        "not judged on a head read sent before the answer"
    );
    let batch = head_batch(&effects).expect("the next head read, after the answer");
    core.step(
        later,
        Input::Head {
            batch,
            outcome: Ok(history(30)),
        },
    );
    assert_eq!(core.target(Want { lease: 42, at: 27 }), None, "retiring");
    core.step(later, Input::Committed { revision: 29 });
    assert!(
        revokes(&core.step(later, Input::Tick)).is_empty(),
        "G is 30, not the early read's 26"
    );
    core.step(later, Input::Committed { revision: 30 });
    assert_eq!(revokes(&core.step(later, Input::Tick)), vec![420]);
}

/// One renewal per lease in flight: a tick while a lease's renewal (or
/// probe) is out sends nothing more for it (keepalive traffic stays at one
/// renewal per lease per third of its TTL).
#[test]
fn a_lease_with_a_renewal_in_flight_is_not_renewed_again() {
    let now = t0();
    let mut core = Core::new(Duration::from_secs(5));
    core.step(
        now,
        Input::Resumed {
            history: history(10),
        },
    );
    map_one(&mut core, now, 42, 420, 11);
    let later = now + Duration::from_secs(5);
    let [(42, serial)] = round(&mut core, later, 25)[..] else {
        panic!("one probe")
    };
    assert!(
        core.step(later, Input::Tick).is_empty(),
        "probe out: nothing more"
    );
    let renewals = |effects: &[Effect<String>]| {
        effects
            .iter()
            .filter(|e| matches!(e, Effect::Renew { .. }))
            .count()
    };
    // Found gone: renewed at once while the head read that judges it is out.
    let effects = core.step(
        later,
        Input::Probed {
            lease: 42,
            serial: Some(serial),
            outcome: Ok(None),
        },
    );
    assert_eq!(renewals(&effects), 1);
    let due = later + Duration::from_secs(5);
    assert_eq!(
        renewals(&core.step(due, Input::Tick)),
        0,
        "its renewal is still out"
    );
}

/// Seed 10917: a replaced source hands the same lease IDs out. A key
/// wanted on the ID after the probe's head read may belong to a new
/// incarnation the probe did not see: the lease does not retire on that
/// probe (it is judged again at the next), and a gone answer without a
/// head read before it judges nothing either.
#[test]
fn a_key_wanted_after_the_probe_s_head_keeps_the_lease() {
    let now = t0();
    let mut core = Core::new(Duration::from_secs(5));
    core.step(
        now,
        Input::Resumed {
            history: history(10),
        },
    );
    map_one(&mut core, now, 42, 420, 11);
    let later = now + Duration::from_secs(5);
    let [(42, serial)] = round(&mut core, later, 20)[..] else {
        panic!("one probe")
    };
    // A writer attaches a key at 22 (after H0 = 20) before the answer.
    core.step(
        later,
        Input::Resolve {
            request: 9,
            wants: vec![Want { lease: 42, at: 22 }],
        },
    );
    let effects = core.step(
        later,
        Input::Probed {
            lease: 42,
            serial: Some(serial),
            outcome: Ok(None),
        },
    );
    assert!(effects.contains(&Effect::Renew { serial, dest: 420 }));
    core.step(
        later,
        Input::Renewed {
            serial,
            outcome: Ok(true),
        },
    );
    let batch = head_batch(&effects).unwrap();
    core.step(
        later,
        Input::Head {
            batch,
            outcome: Ok(history(30)),
        },
    );
    assert_eq!(core.mapping(), [(42, 420)].into(), "not retired");
    // The head read failed before the next probe: its gone answer has no
    // H0 and judges nothing.
    let later = later + Duration::from_secs(5);
    let effects = core.step(later, Input::Tick);
    let batch = head_batch(&effects).unwrap();
    let effects = core.step(
        later,
        Input::Head {
            batch,
            outcome: Err("unavailable".into()),
        },
    );
    let [(42, serial)] = probes(&effects)[..] else {
        panic!("probed all the same (for its renewal)")
    };
    let effects = core.step(
        later,
        Input::Probed {
            lease: 42,
            serial: Some(serial),
            outcome: Ok(None),
        },
    );
    core.step(
        later,
        Input::Renewed {
            serial,
            outcome: Ok(true),
        },
    );
    let batch = head_batch(&effects).unwrap();
    core.step(
        later,
        Input::Head {
            batch,
            outcome: Ok(history(31)),
        },
    );
    assert_eq!(core.mapping(), [(42, 420)].into(), "still not retired");
    // A probe after a head at or past every key's revision retires it.
    retire_42(&mut core, later + Duration::from_secs(5), 31, 32);
    assert!(core.mapping().is_empty());
}

/// A head read that answers from another history (another cluster, or a
/// revision below the checkpoint: rebuilt) retires nothing.
#[test]
fn a_head_from_another_history_retires_nothing() {
    let now = t0();
    for head in [
        History {
            cluster_id: 8,
            revision: 50,
        },
        history(5),
    ] {
        let mut core = Core::new(Duration::from_secs(5));
        core.step(
            now,
            Input::Resumed {
                history: history(10),
            },
        );
        map_one(&mut core, now, 42, 420, 11);
        let later = now + Duration::from_secs(5);
        let [(_, serial)] = round(&mut core, later, 20)[..] else {
            panic!("one probe")
        };
        let effects = core.step(
            later,
            Input::Probed {
                lease: 42,
                serial: Some(serial),
                outcome: Ok(None),
            },
        );
        let batch = head_batch(&effects).unwrap();
        core.step(
            later,
            Input::Head {
                batch,
                outcome: Ok(head),
            },
        );
        assert_eq!(core.mapping(), [(42, 420)].into(), "{head:?}");
    }
}

/// L3: a retiring lease found expired on the destination before the
/// checkpoint reached its G lost keys the source still has at the
/// checkpoint: the job must re-sync. After G it is only forgotten.
#[test]
fn a_retiring_lease_that_expired_early_is_lost() {
    let now = t0();
    for (committed, lost) in [(20, true), (30, false)] {
        let mut core = Core::new(Duration::from_secs(5));
        core.step(
            now,
            Input::Resumed {
                history: history(10),
            },
        );
        map_one(&mut core, now, 42, 420, 11);
        retire_42(&mut core, now + Duration::from_secs(5), 25, 30);
        core.step(
            now,
            Input::Committed {
                revision: committed,
            },
        );
        let effects = core.step(now, Input::DestGone { dests: vec![420] });
        assert_eq!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::Lost { leases } if leases == &vec![42])),
            lost,
            "committed {committed}: {effects:?}"
        );
        assert!(effects.iter().any(|e| matches!(e, Effect::Forget { .. })));
    }
}

/// L3: once a full sync starts, retiring leases take no key; once it
/// finishes, those it stopped are revoked at once (they hold nothing), and
/// a key on their source lease gets a new mapping.
#[test]
fn a_full_sync_ends_retiring_evidence() {
    let now = t0();
    let mut core = Core::new(Duration::from_secs(5));
    core.step(
        now,
        Input::Resumed {
            history: history(10),
        },
    );
    map_one(&mut core, now, 42, 420, 11);
    let later = now + Duration::from_secs(5);
    retire_42(&mut core, later, 25, 30);
    assert_eq!(core.target(Want { lease: 42, at: 25 }), Some(420));
    core.step(
        later,
        Input::FullSyncStarted {
            cluster_id: CLUSTER,
        },
    );
    assert_eq!(core.target(Want { lease: 42, at: 25 }), None);
    // Nothing is revoked during the sync, whatever the head says.
    let effects = core.step(later + Duration::from_secs(1), Input::Tick);
    assert!(revokes(&effects).is_empty(), "{effects:?}");
    core.step(
        later,
        Input::FullSyncDone {
            history: history(25),
        },
    );
    let effects = core.step(later + Duration::from_secs(2), Input::Tick);
    assert_eq!(revokes(&effects), vec![420]);
    assert_eq!(core.target(Want { lease: 42, at: 26 }), None);
}

/// A destination ID handed out again (it had expired) loses the mapping
/// that named it, and a record naming a dead pair is never adopted again.
#[test]
fn a_destination_id_granted_again_loses_the_old_mapping() {
    let now = t0();
    let mut core = Core::new(Duration::from_secs(5));
    core.step(
        now,
        Input::Resumed {
            history: history(10),
        },
    );
    core.step(
        now,
        Input::Load {
            records: vec![(7, record(500))],
        },
    );
    assert_eq!(core.mapping(), [(7, 500)].into());
    core.step(
        now,
        Input::Resolve {
            request: 1,
            wants: vec![Want { lease: 8, at: 11 }],
        },
    );
    core.step(
        now,
        Input::Probed {
            lease: 8,
            serial: None,
            outcome: Ok(Some(10)),
        },
    );
    let effects = core.step(
        now,
        Input::Granted {
            lease: 8,
            outcome: Ok((500, 3)),
        },
    );
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::Lost { leases } if leases == &vec![7])));
    core.step(
        now,
        Input::Load {
            records: vec![(7, record(500))],
        },
    );
    assert!(
        core.target(Want { lease: 7, at: 11 }).is_none(),
        "not adopted again"
    );
}

/// Lease 42 mapped to 420 (keys wanted at 11) and retired at H0 = 25, G =
/// 30, with the checkpoint at 10. Returns the core and the time it retired.
fn retiring_42() -> (Core, Instant) {
    let now = t0();
    let mut core = Core::new(Duration::from_secs(5));
    core.step(
        now,
        Input::Resumed {
            history: history(10),
        },
    );
    map_one(&mut core, now, 42, 420, 11);
    let later = now + Duration::from_secs(5);
    retire_42(&mut core, later, 25, 30);
    (core, later)
}

/// The record txn of the effects, checked to hold exactly `records`.
fn record_txn(effects: &[Effect<String>], expected: &[(i64, LeaseRecord)]) -> u64 {
    match effects {
        [Effect::Record { batch, records }] => {
            assert_eq!(records.as_slice(), expected);
            *batch
        }
        other => panic!("expected one record txn, got {other:?}"),
    }
}

/// The keeper's idle check: a mapped or a retiring lease still needs ticks.
#[test]
fn the_core_is_idle_only_without_mapped_or_retiring_leases() {
    let now = t0();
    let mut core = Core::new(Duration::from_secs(5));
    assert!(core.is_idle());
    core.step(
        now,
        Input::Resumed {
            history: history(10),
        },
    );
    map_one(&mut core, now, 42, 420, 11);
    assert!(!core.is_idle(), "a mapped lease needs renewals");
    let later = now + Duration::from_secs(5);
    let serial = retire_42(&mut core, later, 25, 30);
    assert!(core.mapping().is_empty());
    assert!(!core.is_idle(), "a retiring lease needs its revoke");
    core.step(later, Input::Committed { revision: 30 });
    assert_eq!(revokes(&core.step(later, Input::Tick)), vec![420]);
    core.step(
        later,
        Input::Revoked {
            serial,
            outcome: Ok(()),
        },
    );
    assert!(core.is_idle());
}

/// A writer's new leases go out in one record txn once all are granted,
/// and a key without a lease (ID 0) in the same request holds none back.
#[test]
fn a_request_with_a_key_without_lease_is_recorded_in_one_txn() {
    let now = t0();
    let mut core = Core::new(Duration::from_secs(5));
    core.step(
        now,
        Input::Resumed {
            history: history(10),
        },
    );
    let effects = core.step(
        now,
        Input::Resolve {
            request: 1,
            wants: vec![
                Want { lease: 5, at: 11 },
                Want { lease: 6, at: 11 },
                Want { lease: 0, at: 11 },
            ],
        },
    );
    assert_eq!(
        effects,
        vec![
            Effect::Probe {
                lease: 5,
                serial: None
            },
            Effect::Probe {
                lease: 6,
                serial: None
            },
        ]
    );
    for (lease, dest) in [(5, 500), (6, 600)] {
        let effects = core.step(
            now,
            Input::Probed {
                lease,
                serial: None,
                outcome: Ok(Some(10)),
            },
        );
        assert_eq!(effects, vec![Effect::Grant { lease, ttl: 15 }]);
        let effects = core.step(
            now,
            Input::Granted {
                lease,
                outcome: Ok((dest, 1)),
            },
        );
        if lease == 5 {
            assert!(effects.is_empty(), "waits for lease 6: {effects:?}");
        } else {
            let batch = record_txn(&effects, &[(5, record(500)), (6, record(600))]);
            let effects = core.step(
                now,
                Input::Recorded {
                    batch,
                    outcome: Ok(()),
                },
            );
            assert_eq!(
                effects,
                vec![Effect::Reply {
                    request: 1,
                    outcome: Ok([(5, 500), (6, 600)].into()),
                }]
            );
        }
    }
}

/// A failed grant fails only the writers waiting on that lease, not one
/// waiting on another lease's grant.
#[test]
fn a_failed_grant_fails_only_the_writers_waiting_on_it() {
    let now = t0();
    let mut core = Core::new(Duration::from_secs(5));
    core.step(
        now,
        Input::Resumed {
            history: history(10),
        },
    );
    for (request, lease) in [(1, 5), (2, 6)] {
        core.step(
            now,
            Input::Resolve {
                request,
                wants: vec![Want { lease, at: 11 }],
            },
        );
    }
    let effects = core.step(
        now,
        Input::Probed {
            lease: 5,
            serial: None,
            outcome: Err("unavailable".into()),
        },
    );
    assert_eq!(
        effects,
        vec![Effect::Reply {
            request: 1,
            outcome: Err(Failure::Effect("unavailable".into())),
        }]
    );
    let effects = grant_recorded(&mut core, now, 6, 600);
    assert_eq!(
        effects,
        vec![Effect::Reply {
            request: 2,
            outcome: Ok([(6, 600)].into()),
        }]
    );
}

/// A writer waits on a new lease and on one that retires meanwhile (its
/// keys older than the probe's H0: it could still take them); a full sync
/// then starts, so the retiring lease takes no key. When the new lease's
/// record commits, the retiring one is mapped again for the writer and the
/// writer is answered at once (nothing else would wake it).
#[test]
fn a_writer_waiting_on_a_retired_lease_is_answered_when_it_is_mapped_again() {
    let now = t0();
    let mut core = Core::new(Duration::from_secs(5));
    core.step(
        now,
        Input::Resumed {
            history: history(10),
        },
    );
    map_one(&mut core, now, 42, 420, 11);
    let later = now + Duration::from_secs(5);
    let [(42, serial)] = round(&mut core, later, 20)[..] else {
        panic!("one probe")
    };
    core.step(
        later,
        Input::Resolve {
            request: 9,
            wants: vec![Want { lease: 42, at: 15 }, Want { lease: 43, at: 15 }],
        },
    );
    let effects = core.step(
        later,
        Input::Probed {
            lease: 42,
            serial: Some(serial),
            outcome: Ok(None),
        },
    );
    let batch = head_batch(&effects).expect("a head read after the gone answer");
    core.step(
        later,
        Input::Head {
            batch,
            outcome: Ok(history(30)),
        },
    );
    assert_eq!(core.retiring_count(), 1, "42 retired");
    core.step(
        later,
        Input::FullSyncStarted {
            cluster_id: CLUSTER,
        },
    );
    let effects = grant_recorded(&mut core, later, 43, 430);
    assert!(
        effects.contains(&Effect::Reply {
            request: 9,
            outcome: Ok([(42, 420), (43, 430)].into()),
        }),
        "the writer is not answered: {effects:?}"
    );
    assert_eq!(core.retiring_count(), 0, "42 mapped again");
}

/// A lease that retires while a writer waits on another lease (the
/// writer's key on it is newer than the probe's H0, and not counted yet)
/// is mapped again for it: the writer is recorded and answered, not stuck.
#[test]
fn a_lease_retired_under_a_waiting_writer_is_mapped_again() {
    let now = t0();
    let mut core = Core::new(Duration::from_secs(5));
    core.step(
        now,
        Input::Resumed {
            history: history(10),
        },
    );
    map_one(&mut core, now, 42, 420, 11);
    let later = now + Duration::from_secs(5);
    let [(42, serial)] = round(&mut core, later, 20)[..] else {
        panic!("one probe")
    };
    let effects = core.step(
        later,
        Input::Resolve {
            request: 9,
            wants: vec![Want { lease: 42, at: 22 }, Want { lease: 43, at: 22 }],
        },
    );
    assert_eq!(
        effects,
        vec![Effect::Probe {
            lease: 43,
            serial: None
        }]
    );
    let effects = core.step(
        later,
        Input::Probed {
            lease: 42,
            serial: Some(serial),
            outcome: Ok(None),
        },
    );
    let batch = head_batch(&effects).expect("a head read after the gone answer");
    // The head read retires 42 (every key it was given is older than H0).
    core.step(
        later,
        Input::Head {
            batch,
            outcome: Ok(history(30)),
        },
    );
    let effects = grant_recorded(&mut core, later, 43, 430);
    assert_eq!(
        effects,
        vec![Effect::Reply {
            request: 9,
            outcome: Ok([(42, 420), (43, 430)].into()),
        }]
    );
}

/// L3: a resume lets the retiring leases a full sync stopped take keys and
/// be revoked again, but not those a finished full sync emptied.
#[test]
fn a_resume_restores_retiring_leases_a_full_sync_only_started() {
    // Started, then the job resumes: 42 is revoked once the checkpoint is at G.
    let (mut core, later) = retiring_42();
    core.step(
        later,
        Input::FullSyncStarted {
            cluster_id: CLUSTER,
        },
    );
    core.step(
        later,
        Input::Resumed {
            history: history(30),
        },
    );
    let effects = core.step(later + Duration::from_secs(1), Input::Tick);
    assert_eq!(revokes(&effects), vec![420], "{effects:?}");
    // Finished, then the job resumes: 42 holds no key and takes none.
    let (mut core, later) = retiring_42();
    core.step(
        later,
        Input::FullSyncStarted {
            cluster_id: CLUSTER,
        },
    );
    core.step(
        later,
        Input::FullSyncDone {
            history: history(26),
        },
    );
    core.step(
        later,
        Input::Resumed {
            history: history(26),
        },
    );
    let effects = core.step(
        later,
        Input::Resolve {
            request: 7,
            wants: vec![Want { lease: 42, at: 25 }],
        },
    );
    assert_eq!(
        effects,
        vec![Effect::Probe {
            lease: 42,
            serial: None
        }],
        "a new grant, not the emptied lease"
    );
}

/// A retiring lease's own record read again (a new attempt) is not
/// adopted: the lease is still revoked, its record forgotten, and a later
/// key on its ID gets a new grant.
#[test]
fn a_retiring_lease_s_record_read_again_is_not_adopted() {
    let (mut core, later) = retiring_42();
    core.step(
        later,
        Input::Load {
            records: vec![(42, record(420))],
        },
    );
    core.step(later, Input::Committed { revision: 30 });
    let effects = core.step(later, Input::Tick);
    assert_eq!(effects.len(), 1, "only the revoke: {effects:?}");
    let serial = match effects[0] {
        Effect::Revoke { serial, dest: 420 } => serial,
        ref other => panic!("expected the revoke of 420, got {other:?}"),
    };
    let effects = core.step(
        later,
        Input::Revoked {
            serial,
            outcome: Ok(()),
        },
    );
    assert_eq!(
        effects,
        vec![Effect::Forget {
            records: vec![(42, record(420))]
        }]
    );
    let effects = core.step(
        later,
        Input::Resolve {
            request: 7,
            wants: vec![Want { lease: 42, at: 31 }],
        },
    );
    assert_eq!(
        effects,
        vec![Effect::Probe {
            lease: 42,
            serial: None
        }]
    );
}

/// A record that maps a retiring lease's source ID to another destination
/// lease is adopted: keys may sit on that lease.
#[test]
fn a_record_of_a_retiring_source_id_on_another_lease_is_adopted() {
    let (mut core, later) = retiring_42();
    core.step(
        later,
        Input::Load {
            records: vec![(42, record(421))],
        },
    );
    let effects = core.step(
        later,
        Input::Resolve {
            request: 7,
            wants: vec![Want { lease: 42, at: 26 }],
        },
    );
    assert_eq!(
        effects,
        vec![Effect::Reply {
            request: 7,
            outcome: Ok([(42, 421)].into()),
        }]
    );
}

/// L3: a gone answer during a full sync judges nothing (no mapping retires
/// while one runs): no head read follows it, and the lease is probed again
/// once the sync is done.
#[test]
fn a_gone_answer_during_a_full_sync_judges_nothing() {
    let now = t0();
    let mut core = Core::new(Duration::from_secs(5));
    core.step(
        now,
        Input::Resumed {
            history: history(10),
        },
    );
    map_one(&mut core, now, 42, 420, 11);
    let later = now + Duration::from_secs(5);
    let [(42, serial)] = round(&mut core, later, 20)[..] else {
        panic!("one probe")
    };
    core.step(
        later,
        Input::FullSyncStarted {
            cluster_id: CLUSTER,
        },
    );
    let effects = core.step(
        later,
        Input::Probed {
            lease: 42,
            serial: Some(serial),
            outcome: Ok(None),
        },
    );
    assert_eq!(
        effects,
        vec![Effect::Renew { serial, dest: 420 }],
        "renewed, and no head read to retire it on"
    );
    core.step(
        later,
        Input::Renewed {
            serial,
            outcome: Ok(true),
        },
    );
    core.step(
        later,
        Input::FullSyncDone {
            history: history(15),
        },
    );
    let later = later + Duration::from_secs(5);
    assert_eq!(round(&mut core, later, 30), vec![(42, serial)]);
    assert_eq!(core.mapping(), [(42, 420)].into());
}

// ---------------------------------------------------------------------
// The property test: a model of the source (leases with incarnations,
// revisions, the deletes a lease's end makes), the destination (leases,
// committed records, which keys sit on which lease) and a writer and
// pipeline, answering the core's effects in any order, with failures.

#[derive(Debug, Clone)]
enum Action {
    /// A client grants a source lease: a new ID, or (when `reuse` and one
    /// ended) an ID handed out before, as a replaced or rebuilt source, or
    /// a client choosing IDs, does.
    Grant(bool),
    /// A client puts a key on the source lease `pick` picks; the writer
    /// asks for its destination lease at the new revision.
    Put(usize),
    /// A source lease ends (revoked or expired): its keys are deleted.
    End(usize),
    /// Answer the `pick`th effect waiting, failing it if `fail`.
    Answer(usize, bool),
    /// The checkpoint moves up to the revision `pick` picks.
    Commit(usize),
    /// Time passes (milliseconds), then the keeper's tick.
    Tick(u64),
    /// A full sync starts (or, in one, finishes).
    FullSync,
    /// A new attempt reads the records again.
    Load,
    /// A full sync's look-ahead prefetches the lease of the `pick`th
    /// source key alive at its pinned revision.
    Prefetch(usize),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        2 => proptest::bool::weighted(0.3).prop_map(Action::Grant),
        4 => any::<usize>().prop_map(Action::Put),
        2 => any::<usize>().prop_map(Action::End),
        10 => (any::<usize>(), proptest::bool::weighted(0.15)).prop_map(|(p, f)| Action::Answer(p, f)),
        3 => any::<usize>().prop_map(Action::Commit),
        4 => (1u64..4000).prop_map(Action::Tick),
        1 => Just(Action::FullSync),
        1 => Just(Action::Load),
        3 => any::<usize>().prop_map(Action::Prefetch),
    ]
}

#[derive(Debug)]
struct SourceLease {
    id: i64,
    ttl: i64,
    ended_at: Option<i64>,
}

#[derive(Debug)]
struct DestLease {
    ttl: i64,
    expires: Instant,
}

/// A key on the destination: the source lease it mirrors and that lease's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    source: usize,
    put_at: i64,
}

struct World {
    core: Core,
    now: Instant,
    revision: i64,
    source: Vec<SourceLease>,
    dest: BTreeMap<i64, DestLease>,
    next_dest: i64,
    /// Committed records on the destination.
    records: BTreeMap<i64, LeaseRecord>,
    /// Destination keys: which destination lease each sits on.
    keys: BTreeMap<Key, i64>,
    checkpoint: i64,
    /// Writers' requests: their key.
    requests: BTreeMap<u64, Key>,
    next_request: u64,
    waiting: Vec<Effect<String>>,
    /// A full sync under way: its pinned revision, requests outstanding,
    /// and the keys it placed.
    full_sync: Option<(i64, BTreeSet<u64>, BTreeMap<Key, i64>)>,
    /// Every key the source ever had (one per put).
    puts: Vec<Key>,
    /// Record nonces: unique, as the shell's random ones are.
    nonce: u64,
    /// The effects answered, for a failure's message.
    trace: Vec<String>,
    lost: u64,
}

impl World {
    fn new() -> Self {
        let now = Instant::now();
        let mut core = Core::new(Duration::from_secs(3));
        core.step(
            now,
            Input::Resumed {
                history: history(1),
            },
        );
        Self {
            core,
            now,
            revision: 1,
            source: Vec::new(),
            dest: BTreeMap::new(),
            next_dest: 1_000,
            records: BTreeMap::new(),
            keys: BTreeMap::new(),
            checkpoint: 1,
            requests: BTreeMap::new(),
            next_request: 1,
            waiting: Vec::new(),
            full_sync: None,
            puts: Vec::new(),
            nonce: 0,
            trace: Vec::new(),
            lost: 0,
        }
    }

    fn alive_at(&self, index: usize, revision: i64) -> bool {
        self.source[index].ended_at.is_none_or(|end| end > revision)
    }

    fn dest_alive(&self, dest: i64) -> bool {
        self.dest.get(&dest).is_some_and(|d| d.expires > self.now)
    }

    /// Outside a full sync, every destination key sits on a lease some
    /// committed record names: a new leader knows to keep it alive.
    fn check_keys_recorded(&self) -> Result<(), TestCaseError> {
        if self.full_sync.is_some() {
            return Ok(());
        }
        let recorded: BTreeSet<i64> = self.records.values().map(|r| r.dest_lease).collect();
        for (key, dest) in &self.keys {
            prop_assert!(
                recorded.contains(dest) || !self.dest_alive(*dest),
                "{:?} sits on {} which no record names (records {:?})",
                key,
                dest,
                self.records
            );
        }
        Ok(())
    }

    fn step(&mut self, input: Input<String>) -> Result<(), TestCaseError> {
        let effects = self.core.step(self.now, input);
        for effect in effects {
            self.check(&effect)?;
            match effect {
                Effect::Reply { request, outcome } => self.reply(request, outcome)?,
                Effect::Lost { .. } => {
                    self.lost += 1;
                    // The attempt gives way to a full sync.
                    self.abort_full_sync();
                    self.start_full_sync()?;
                }
                other => self.waiting.push(other),
            }
        }
        Ok(())
    }

    /// The safety rules, checked on every effect as the core emits it.
    fn check(&self, effect: &Effect<String>) -> Result<(), TestCaseError> {
        match effect {
            Effect::Reply {
                outcome: Ok(map), ..
            } => {
                for (source, dest) in map {
                    prop_assert_eq!(
                        self.records.get(source).map(|r| r.dest_lease),
                        Some(*dest),
                        "a writer got {} -> {} before its record committed (core {:?}, log {:?})",
                        source,
                        dest,
                        self.core,
                        self.trace
                    );
                }
            }
            Effect::Revoke { dest, .. } => {
                let on_it: Vec<&Key> = self
                    .keys
                    .iter()
                    .filter(|(_, d)| **d == *dest)
                    .map(|(k, _)| k)
                    .collect();
                prop_assert!(
                    on_it.is_empty(),
                    "revoking {} would delete keys the source still holds at checkpoint {}: {:?}",
                    dest,
                    self.checkpoint,
                    on_it
                );
            }
            Effect::Forget { records } => {
                for (source, record) in records {
                    let deletes = self.records.get(source) == Some(record);
                    let holds = self.keys.values().any(|d| *d == record.dest_lease);
                    prop_assert!(
                        !deletes || !holds || !self.dest_alive(record.dest_lease),
                        "forgetting the record of {} -> {} while it holds keys",
                        source,
                        record.dest_lease
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn reply(
        &mut self,
        request: u64,
        outcome: Result<BTreeMap<i64, i64>, Failure<String>>,
    ) -> Result<(), TestCaseError> {
        let Some(key) = self.requests.remove(&request) else {
            return Ok(());
        };
        let in_full_sync = self
            .full_sync
            .as_mut()
            .is_some_and(|(_, outstanding, _)| outstanding.remove(&request));
        let Ok(map) = outcome else {
            // The txn fails; the job retries from the checkpoint (a full
            // sync starts over, a watch reads the put again).
            if in_full_sync {
                self.abort_full_sync();
                return self.start_full_sync();
            }
            return self.want(key, false);
        };
        let id = self.source[key.source].id;
        prop_assert_eq!(map.len(), 1, "one lease asked for");
        let dest = *map
            .get(&id)
            .ok_or_else(|| TestCaseError::fail("lease missing from the reply"))?;
        if !self.dest_alive(dest) {
            // etcd refuses a put on a lease it does not have; the job
            // reads which ones are gone and takes the slow path.
            self.abort_full_sync();
            self.step(Input::DestGone { dests: vec![dest] })?;
            return self.start_full_sync();
        }
        if in_full_sync {
            if let Some((_, _, placed)) = self.full_sync.as_mut() {
                placed.insert(key, dest);
            }
            return self.finish_full_sync();
        }
        self.keys.insert(key, dest);
        Ok(())
    }

    fn want(&mut self, key: Key, full_sync: bool) -> Result<(), TestCaseError> {
        let request = self.next_request;
        self.next_request += 1;
        self.requests.insert(request, key);
        if full_sync {
            if let Some((_, outstanding, _)) = self.full_sync.as_mut() {
                outstanding.insert(request);
            }
        }
        let at = if full_sync {
            self.full_sync.as_ref().map_or(key.put_at, |(r, _, _)| *r)
        } else {
            key.put_at
        };
        self.step(Input::Resolve {
            request,
            wants: vec![Want {
                lease: self.source[key.source].id,
                at,
            }],
        })
    }

    /// An attempt ends: the txns it waits for no longer matter (their
    /// guards fail once another attempt starts).
    fn abort_full_sync(&mut self) {
        if let Some((_, outstanding, _)) = self.full_sync.take() {
            for request in outstanding {
                self.requests.remove(&request);
            }
        }
    }

    /// Keys on destination leases that ran out are gone.
    fn expire(&mut self) {
        let now = self.now;
        let dest = &self.dest;
        self.keys
            .retain(|_, d| dest.get(d).is_some_and(|lease| lease.expires > now));
    }

    /// The full sync copies the source at R: each key on a lease alive at R
    /// stays where the core's target says, or asks for one.
    fn start_full_sync(&mut self) -> Result<(), TestCaseError> {
        if self.full_sync.is_some() {
            return Ok(());
        }
        // A new attempt: the incremental txns still waiting are abandoned.
        self.requests.clear();
        let pinned = self.revision;
        self.step(Input::FullSyncStarted {
            cluster_id: CLUSTER,
        })?;
        self.full_sync = Some((pinned, BTreeSet::new(), BTreeMap::new()));
        let keys: Vec<Key> = self
            .all_source_keys()
            .into_iter()
            .filter(|k| self.alive_at(k.source, pinned))
            .collect();
        for key in keys {
            let want = Want {
                lease: self.source[key.source].id,
                at: pinned,
            };
            match self.core.target(want) {
                Some(dest) if self.keys.get(&key) == Some(&dest) => {
                    if let Some((_, _, placed)) = self.full_sync.as_mut() {
                        placed.insert(key, dest);
                    }
                }
                _ => self.want(key, true)?,
            }
            if self.full_sync.is_none() {
                return Ok(());
            }
        }
        self.finish_full_sync()
    }

    fn finish_full_sync(&mut self) -> Result<(), TestCaseError> {
        let done = self
            .full_sync
            .as_ref()
            .is_some_and(|(_, outstanding, _)| outstanding.is_empty());
        if !done {
            return Ok(());
        }
        let (pinned, _, placed) = self.full_sync.take().expect("checked");
        // The destination now is the source at R: every other key was
        // moved or deleted.
        self.keys = placed;
        self.checkpoint = pinned;
        self.step(Input::FullSyncDone {
            history: history(pinned),
        })
    }

    /// Every key the source ever had (one per put), with its lease.
    fn all_source_keys(&self) -> Vec<Key> {
        self.puts.clone()
    }

    fn apply(&mut self, action: Action) -> Result<(), TestCaseError> {
        self.expire();
        self.check_keys_recorded()?;
        match action {
            Action::Grant(reuse) => {
                let alive: BTreeSet<i64> = self
                    .source
                    .iter()
                    .filter(|l| l.ended_at.is_none())
                    .map(|l| l.id)
                    .collect();
                let ended = self
                    .source
                    .iter()
                    .map(|l| l.id)
                    .find(|id| !alive.contains(id));
                let id = match ended {
                    Some(id) if reuse => id,
                    _ => self.source.len() as i64 + 1,
                };
                self.source.push(SourceLease {
                    id,
                    ttl: 2 + id % 5,
                    ended_at: None,
                });
            }
            Action::Put(pick) => {
                let alive: Vec<usize> = (0..self.source.len())
                    .filter(|i| self.source[*i].ended_at.is_none())
                    .collect();
                if alive.is_empty() || self.full_sync.is_some() {
                    return Ok(());
                }
                self.revision += 1;
                let key = Key {
                    source: alive[pick % alive.len()],
                    put_at: self.revision,
                };
                self.puts.push(key);
                self.want(key, false)?;
            }
            Action::End(pick) => {
                let alive: Vec<usize> = (0..self.source.len())
                    .filter(|i| self.source[*i].ended_at.is_none())
                    .collect();
                if alive.is_empty() {
                    return Ok(());
                }
                self.revision += 1;
                self.source[alive[pick % alive.len()]].ended_at = Some(self.revision);
            }
            Action::Answer(pick, fail) => {
                if self.waiting.is_empty() {
                    return Ok(());
                }
                let effect = self.waiting.remove(pick % self.waiting.len());
                self.trace.push(format!("{effect:?} fail={fail}"));
                let input = self.answer(effect, fail);
                if let Some(input) = input {
                    self.step(input)?;
                }
            }
            Action::Commit(pick) => {
                if self.full_sync.is_some() {
                    return Ok(());
                }
                // The pipeline cannot pass a put whose txn waits.
                let blocked = self.requests.values().map(|k| k.put_at).min();
                let limit = blocked.map_or(self.revision, |b| b - 1);
                if limit <= self.checkpoint {
                    return Ok(());
                }
                let span = (limit - self.checkpoint) as usize;
                let to = self.checkpoint + 1 + (pick % span) as i64;
                self.checkpoint = to;
                // The deletes of lease ends up to the checkpoint are applied.
                let ended: Vec<Key> = self
                    .keys
                    .keys()
                    .filter(|k| self.source[k.source].ended_at.is_some_and(|e| e <= to))
                    .copied()
                    .collect();
                for key in ended {
                    self.keys.remove(&key);
                }
                self.step(Input::Committed { revision: to })?;
            }
            Action::Tick(ms) => {
                self.now += Duration::from_millis(ms);
                self.expire();
                self.step(Input::Tick)?;
            }
            Action::FullSync => self.start_full_sync()?,
            Action::Prefetch(pick) => {
                let Some(pinned) = self.full_sync.as_ref().map(|(r, _, _)| *r) else {
                    return Ok(());
                };
                let alive: Vec<usize> = (0..self.source.len())
                    .filter(|i| self.alive_at(*i, pinned))
                    .collect();
                if alive.is_empty() {
                    return Ok(());
                }
                let lease = self.source[alive[pick % alive.len()]].id;
                self.step(Input::Prefetch {
                    wants: vec![Want { lease, at: pinned }],
                })?;
            }
            Action::Load => {
                let records = self.records.iter().map(|(s, r)| (*s, *r)).collect();
                self.step(Input::Load { records })?;
            }
        }
        Ok(())
    }

    /// What the clusters answer to `effect` now (`None`: a lost answer).
    fn answer(&mut self, effect: Effect<String>, fail: bool) -> Option<Input<String>> {
        fn error<T>() -> Result<T, String> {
            Err("unavailable".to_string())
        }
        Some(match effect {
            Effect::Probe { lease, serial } => {
                // Answered by the leader: whichever incarnation of the ID lives.
                let alive = self
                    .source
                    .iter()
                    .find(|l| l.id == lease && l.ended_at.is_none())
                    .map(|l| l.ttl);
                Input::Probed {
                    lease,
                    serial,
                    outcome: if fail { error() } else { Ok(alive) },
                }
            }
            Effect::Grant { lease, ttl } => {
                if fail {
                    return Some(Input::Granted {
                        lease,
                        outcome: error(),
                    });
                }
                // The source's own ID when free; expired IDs may be
                // handed out again.
                let dest = if !self.dest_alive(lease) && lease % 2 == 0 {
                    lease
                } else {
                    self.next_dest += 1;
                    self.next_dest
                };
                self.dest.insert(
                    dest,
                    DestLease {
                        ttl,
                        expires: self.now + Duration::from_secs(ttl as u64),
                    },
                );
                self.keys.retain(|_, d| *d != dest);
                self.nonce += 1;
                Input::Granted {
                    lease,
                    outcome: Ok((dest, self.nonce)),
                }
            }
            Effect::Record { batch, records } => {
                if !fail {
                    self.records.extend(records);
                }
                Input::Recorded {
                    batch,
                    outcome: if fail { error() } else { Ok(()) },
                }
            }
            Effect::ReadHead { batch } => Input::Head {
                batch,
                outcome: if fail {
                    error()
                } else {
                    Ok(history(self.revision))
                },
            },
            Effect::Renew { serial, dest } => {
                if fail {
                    return Some(Input::Renewed {
                        serial,
                        outcome: error(),
                    });
                }
                let now = self.now;
                let alive = self.dest_alive(dest);
                if let Some(lease) = self.dest.get_mut(&dest).filter(|_| alive) {
                    lease.expires = now + Duration::from_secs(lease.ttl as u64);
                }
                Input::Renewed {
                    serial,
                    outcome: Ok(alive),
                }
            }
            Effect::Revoke { serial, dest } => {
                if fail {
                    return Some(Input::Revoked {
                        serial,
                        outcome: error(),
                    });
                }
                self.dest.remove(&dest);
                self.keys.retain(|_, d| *d != dest);
                Input::Revoked {
                    serial,
                    outcome: Ok(()),
                }
            }
            Effect::Forget { records } => {
                if !fail {
                    for (source, record) in records {
                        if self.records.get(&source) == Some(&record) {
                            self.records.remove(&source);
                        }
                    }
                }
                return None;
            }
            Effect::Reply { .. } | Effect::Lost { .. } => return None,
        })
    }
}

proptest! {
    // PROPTEST_CASES raises it for a longer search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400),
        ..ProptestConfig::default()
    })]

    /// Whatever the order of answers, failures and clock: writers get only
    /// recorded leases, nothing is revoked while it holds a key the source
    /// still has at the checkpoint, and no record of a lease holding keys
    /// is deleted while that lease lives.
    #[test]
    fn the_lease_rules_hold_in_any_order(actions in proptest::collection::vec(action(), 1..250)) {
        let mut world = World::new();
        for action in actions {
            world.apply(action)?;
        }
        // Let it settle: every answer given, time for renewals and revokes.
        for round in 0..200 {
            if world.waiting.is_empty() {
                world.apply(Action::Tick(700))?;
                if world.waiting.is_empty() && round > 20 {
                    break;
                }
            } else {
                world.apply(Action::Answer(round, false))?;
            }
        }
    }
}

// ---------------------------------------------------------------------
// A full sync's look-ahead (`Input::Prefetch`).

fn probed(core: &mut Core, lease: i64) -> Vec<Effect<String>> {
    core.step(
        t0(),
        Input::Probed {
            lease,
            serial: None,
            outcome: Ok(Some(10)),
        },
    )
}

fn granted(core: &mut Core, lease: i64, dest: i64) -> Vec<Effect<String>> {
    core.step(
        t0(),
        Input::Granted {
            lease,
            outcome: Ok((dest, 1)),
        },
    )
}

fn full_syncing() -> Core {
    let mut core = Core::new(Duration::from_secs(5));
    core.step(
        t0(),
        Input::FullSyncStarted {
            cluster_id: CLUSTER,
        },
    );
    core
}

#[test]
fn a_prefetched_lease_is_granted_and_recorded_before_a_writer_asks() {
    let mut core = full_syncing();
    let wants = vec![Want { lease: 1, at: 9 }, Want { lease: 2, at: 9 }];
    let effects = core.step(
        t0(),
        Input::Prefetch {
            wants: wants.clone(),
        },
    );
    assert_eq!(
        effects,
        vec![
            Effect::Probe {
                lease: 1,
                serial: None
            },
            Effect::Probe {
                lease: 2,
                serial: None
            }
        ]
    );
    assert_eq!(core.prefetch_backlog(), 2);
    probed(&mut core, 1);
    probed(&mut core, 2);
    // One grant back, one in flight: no record txn for one lease yet.
    assert_eq!(granted(&mut core, 1, 101), vec![]);
    assert_eq!(core.target(wants[0]), None, "granted is not recorded");
    // The last grant back: both records in one txn.
    let effects = granted(&mut core, 2, 102);
    let batch = record_txn(&effects, &[(1, record(101)), (2, record(102))]);
    assert_eq!(core.prefetch_backlog(), 2, "still recording");
    // Nobody waits: nothing to reply.
    assert_eq!(
        core.step(
            t0(),
            Input::Recorded {
                batch,
                outcome: Ok(())
            }
        ),
        vec![]
    );
    assert_eq!(core.prefetch_backlog(), 0);
    assert_eq!(core.target(wants[0]), Some(101));
    // A writer's txn now needs no I/O: its reply is the only effect.
    let effects = core.step(t0(), Input::Resolve { request: 5, wants });
    assert_eq!(
        effects,
        vec![Effect::Reply {
            request: 5,
            outcome: Ok([(1, 101), (2, 102)].into())
        }]
    );
}

#[test]
fn prefetched_records_go_out_a_txn_s_worth_at_a_time() {
    let mut core = full_syncing();
    let count = RECORDS_PER_TXN as i64 + 1;
    let wants = (1..=count).map(|lease| Want { lease, at: 9 }).collect();
    core.step(t0(), Input::Prefetch { wants });
    for lease in 1..=count {
        probed(&mut core, lease);
    }
    let mut txns = Vec::new();
    for lease in 1..=count {
        for effect in granted(&mut core, lease, 100 + lease) {
            if let Effect::Record { records, .. } = effect {
                txns.push((lease, records.len()));
            }
        }
    }
    // The first RECORDS_PER_TXN grants fill a txn while one grant is still
    // out; the last one goes alone once no grant is left.
    assert_eq!(
        txns,
        vec![(RECORDS_PER_TXN as i64, RECORDS_PER_TXN), (count, 1)]
    );
}

#[test]
fn the_prefetch_backlog_drains_when_a_grant_or_record_fails() {
    let mut core = full_syncing();
    let wants = vec![Want { lease: 1, at: 9 }, Want { lease: 2, at: 9 }];
    core.step(
        t0(),
        Input::Prefetch {
            wants: wants.clone(),
        },
    );
    // A failed probe: no grant, nobody to fail, not in the backlog.
    assert_eq!(
        core.step(
            t0(),
            Input::Probed {
                lease: 1,
                serial: None,
                outcome: Err("unavailable".into())
            }
        ),
        vec![]
    );
    assert_eq!(core.prefetch_backlog(), 1);
    probed(&mut core, 2);
    let batch = record_txn(&granted(&mut core, 2, 102), &[(2, record(102))]);
    core.step(
        t0(),
        Input::Recorded {
            batch,
            outcome: Err("unavailable".into()),
        },
    );
    assert_eq!(
        core.prefetch_backlog(),
        0,
        "a stalled record leaves the backlog"
    );
    assert_eq!(core.target(wants[1]), None, "never attachable unrecorded");
    // A writer that needs it writes the record again.
    let effects = core.step(
        t0(),
        Input::Resolve {
            request: 5,
            wants: vec![wants[1]],
        },
    );
    record_txn(&effects, &[(2, record(102))]);
}

#[test]
fn a_prefetch_writes_a_stalled_record_again() {
    let mut core = full_syncing();
    let want = Want { lease: 2, at: 9 };
    core.step(t0(), Input::Prefetch { wants: vec![want] });
    probed(&mut core, 2);
    let batch = record_txn(&granted(&mut core, 2, 102), &[(2, record(102))]);
    core.step(
        t0(),
        Input::Recorded {
            batch,
            outcome: Err("unavailable".into()),
        },
    );
    // The next look-ahead that meets the lease writes its record again (no
    // grant is left in flight, so at once), and counts it until it commits.
    let effects = core.step(
        t0(),
        Input::Prefetch {
            wants: vec![want, Want { lease: 0, at: 9 }],
        },
    );
    let batch = record_txn(&effects, &[(2, record(102))]);
    assert_eq!(
        core.prefetch_backlog(),
        1,
        "lease 0 is no lease: never counted"
    );
    core.step(
        t0(),
        Input::Recorded {
            batch,
            outcome: Ok(()),
        },
    );
    assert_eq!(core.prefetch_backlog(), 0);
    assert_eq!(core.target(want), Some(102));
}

#[test]
fn a_tick_sweeps_prefetched_leases_nothing_grants_or_records_any_more() {
    let mut core = full_syncing();
    let wants = (1..=3).map(|lease| Want { lease, at: 9 }).collect();
    core.step(t0(), Input::Prefetch { wants });
    // 1: granted, its record waiting for the other grants; 2: probe out;
    // 3: granted, then its destination lease found gone (mapping dropped).
    probed(&mut core, 1);
    assert_eq!(granted(&mut core, 1, 101), vec![]);
    probed(&mut core, 3);
    granted(&mut core, 3, 103);
    core.step(t0(), Input::DestGone { dests: vec![103] });
    assert_eq!(core.prefetch_backlog(), 3, "counted until a tick looks");
    core.step(t0(), Input::Tick);
    assert_eq!(core.prefetch_backlog(), 2, "1 and 2 are still under way");
}

#[test]
fn a_cleared_core_has_no_prefetch_backlog() {
    let mut core = full_syncing();
    core.step(
        t0(),
        Input::Prefetch {
            wants: vec![Want { lease: 1, at: 9 }],
        },
    );
    assert_eq!(core.prefetch_backlog(), 1);
    core.step(
        t0(),
        Input::Clear {
            error: "promoted".into(),
        },
    );
    assert_eq!(core.prefetch_backlog(), 0);
    // A lease already attachable is not prefetched again.
    let mut core = full_syncing();
    map_one(&mut core, t0(), 3, 103, 9);
    assert_eq!(
        core.step(
            t0(),
            Input::Prefetch {
                wants: vec![Want { lease: 3, at: 9 }]
            }
        ),
        vec![]
    );
    assert_eq!(core.prefetch_backlog(), 0);
}
