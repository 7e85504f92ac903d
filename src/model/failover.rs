//! Which endpoint group of a cluster to use: pure, fed one health check
//! round at a time, so its rules are property-tested without a network.
//!
//! - Fail over: the group in use failed `failover_after` checks in a row,
//!   and a group answers: the most preferred one that answered this round.
//! - Fail back: a more preferred group than the one in use has answered
//!   every check for `failback_after`: the most preferred such group.
//! - Otherwise stay: a group that answers is never left for one that does
//!   not, and one bad check does not move the job.

use std::time::Duration;

/// Why the group in use changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchReason {
    /// The group in use stopped answering.
    Failover,
    /// A more preferred group is healthy again.
    Failback,
}

impl SwitchReason {
    pub fn label(self) -> &'static str {
        match self {
            SwitchReason::Failover => "failover",
            SwitchReason::Failback => "failback",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    pub from: usize,
    pub to: usize,
    pub reason: SwitchReason,
}

#[derive(Debug, Clone)]
pub struct GroupSelector {
    active: usize,
    failover_after: u32,
    failback_after: Duration,
    /// Per group: failed checks in a row.
    failures: Vec<u32>,
    /// Per group: since when (the caller's clock) every check answered.
    healthy_since: Vec<Option<Duration>>,
}

impl GroupSelector {
    /// `groups` groups (at least one), starting on `active`.
    pub fn new(
        groups: usize,
        active: usize,
        failover_after: u32,
        failback_after: Duration,
    ) -> Self {
        assert!(groups > 0 && active < groups, "a group to use");
        Self {
            active,
            failover_after: failover_after.max(1),
            failback_after,
            failures: vec![0; groups],
            healthy_since: vec![None; groups],
        }
    }

    pub fn active(&self) -> usize {
        self.active
    }

    /// Failed checks in a row of group `index`.
    pub fn failures(&self, index: usize) -> u32 {
        self.failures[index]
    }

    /// One round of checks at `now` (any monotonic clock): `healthy[i]` is
    /// whether group `i` answered. Returns the switch to make, if any (the
    /// selector has made it already).
    pub fn observe(&mut self, now: Duration, healthy: &[bool]) -> Option<Switch> {
        assert_eq!(healthy.len(), self.failures.len(), "one result per group");
        for (i, ok) in healthy.iter().enumerate() {
            if *ok {
                self.failures[i] = 0;
                self.healthy_since[i].get_or_insert(now);
            } else {
                self.failures[i] = self.failures[i].saturating_add(1);
                self.healthy_since[i] = None;
            }
        }
        let from = self.active;
        let to = if self.failures[from] >= self.failover_after {
            healthy
                .iter()
                .position(|ok| *ok)
                .map(|to| (to, SwitchReason::Failover))
        } else {
            (0..from)
                .find(|&i| {
                    self.healthy_since[i]
                        .is_some_and(|since| now.saturating_sub(since) >= self.failback_after)
                })
                .map(|to| (to, SwitchReason::Failback))
        };
        let (to, reason) = to?;
        self.active = to;
        Some(Switch { from, to, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TICK: Duration = Duration::from_secs(5);

    #[test]
    fn fails_over_after_n_failures_and_back_after_the_period() {
        let mut s = GroupSelector::new(2, 0, 3, Duration::from_secs(20));
        let t = |i: u32| TICK * i;
        assert_eq!(s.observe(t(0), &[false, true]), None, "one failure");
        assert_eq!(s.observe(t(1), &[false, true]), None, "two");
        assert_eq!(
            s.observe(t(2), &[false, true]),
            Some(Switch {
                from: 0,
                to: 1,
                reason: SwitchReason::Failover
            })
        );
        // The preferred group answers again from t(3): back after 20 s.
        for i in 3..7 {
            assert_eq!(s.observe(t(i), &[true, true]), None, "tick {i}");
        }
        assert_eq!(
            s.observe(t(7), &[true, true]),
            Some(Switch {
                from: 1,
                to: 0,
                reason: SwitchReason::Failback
            })
        );
    }

    #[test]
    fn a_flapping_preferred_group_is_not_returned_to() {
        let mut s = GroupSelector::new(2, 1, 3, Duration::from_secs(10));
        for i in 0..20u32 {
            let preferred_ok = i % 2 == 0;
            assert_eq!(s.observe(TICK * i, &[preferred_ok, true]), None, "tick {i}");
        }
    }

    #[test]
    fn nowhere_to_go_stays() {
        let mut s = GroupSelector::new(3, 0, 1, Duration::ZERO);
        assert_eq!(s.observe(TICK, &[false, false, false]), None);
        assert_eq!(s.observe(TICK * 2, &[false, false, false]), None);
        assert_eq!(s.active(), 0);
        assert_eq!(s.failures(0), 2, "counted in a row");
        assert_eq!(s.failures(1), 2);
    }

    #[test]
    fn failover_goes_to_the_most_preferred_healthy_group() {
        let mut s = GroupSelector::new(3, 1, 1, Duration::from_secs(3600));
        assert_eq!(
            s.observe(TICK, &[true, false, true]),
            Some(Switch {
                from: 1,
                to: 0,
                reason: SwitchReason::Failover
            })
        );
    }

    proptest! {
        /// Over any sequence of check rounds: a switch never lands on a
        /// group that failed that round; a failover only follows
        /// `failover_after` failures in a row of the group left; a failback
        /// only goes to a more preferred group that answered every check
        /// for the whole period; and a group in use that answers is never
        /// left except for a more preferred one.
        #[test]
        fn switches_follow_the_rules(
            groups in 1usize..4,
            failover_after in 1u32..4,
            failback_ticks in 0u32..5,
            rounds in proptest::collection::vec(proptest::collection::vec(any::<bool>(), 3), 0..60),
        ) {
            let failback_after = TICK * failback_ticks;
            let mut s = GroupSelector::new(groups, groups - 1, failover_after, failback_after);
            let mut fails_in_a_row = vec![0u32; groups];
            let mut ok_since: Vec<Option<u32>> = vec![None; groups];
            for (tick, round) in rounds.iter().enumerate() {
                let tick = tick as u32;
                let healthy = &round[..groups];
                for (i, ok) in healthy.iter().enumerate() {
                    if *ok {
                        fails_in_a_row[i] = 0;
                        ok_since[i].get_or_insert(tick);
                    } else {
                        fails_in_a_row[i] += 1;
                        ok_since[i] = None;
                    }
                }
                let before = s.active();
                let switch = s.observe(TICK * tick, healthy);
                prop_assert_eq!(s.active(), switch.map_or(before, |sw| sw.to));
                if let Some(Switch { from, to, reason }) = switch {
                    prop_assert_eq!(from, before);
                    prop_assert_ne!(from, to);
                    prop_assert!(healthy[to], "switched to a group that failed");
                    match reason {
                        SwitchReason::Failover => {
                            prop_assert!(fails_in_a_row[from] >= failover_after);
                            prop_assert_eq!(Some(to), healthy.iter().position(|ok| *ok));
                        }
                        SwitchReason::Failback => {
                            prop_assert!(to < from);
                            prop_assert!(fails_in_a_row[from] < failover_after);
                            let since = ok_since[to].expect("answered");
                            prop_assert!(TICK * (tick - since) >= failback_after);
                        }
                    }
                } else {
                    // Staying although the group failed enough: nowhere to go.
                    if fails_in_a_row[before] >= failover_after {
                        prop_assert!(healthy.iter().all(|ok| !ok));
                    }
                }
            }
        }
    }
}
