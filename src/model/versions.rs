//! etcd release lines and the watch pitfalls the replicator works around in
//! each. Pure: the version comes from the server at connect.
//!
//! | pitfall | affected | what we do |
//! |---|---|---|
//! | progress answer ahead of queued events (etcd-io/etcd#15220) | before 3.4.25, 3.5.8 | an idle checkpoint needs a second, confirming answer |
//! | no progress answer on a new watch of an idle range (etcd-io/etcd#17507) | before 3.4.31, 3.5.13 | a silent watch is probed with a read instead of being recreated |
//! | duplicate events after a resume (etcd-io/etcd#15271, #15248) | all we know of | events at or below the checkpoint are dropped (always) |
//! | DELETE lost by a watch starting at the compaction revision (etcd-io/etcd#18089) | before 3.4.36, 3.5.18 | the checkpoint revision must be readable after the watch starts (always: one count-only read) |

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Parses "3.5.1" (a leading "v" and a "-suffix" are ignored).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim().trim_start_matches('v');
        let text = text.split(['-', '+']).next()?;
        let mut parts = text.split('.').map(|p| p.parse::<u32>().ok());
        Some(Self::new(parts.next()??, parts.next()??, parts.next()??))
    }

    /// Whether this release line has the fix made in `fixed_in` (one entry
    /// per line, e.g. 3.4.25 and 3.5.8). Lines newer than every entry have
    /// it; lines older than every entry do not.
    pub fn has_fix(self, fixed_in: &[Version]) -> bool {
        if let Some(fix) = fixed_in
            .iter()
            .find(|f| f.major == self.major && f.minor == self.minor)
        {
            return self >= *fix;
        }
        fixed_in.iter().all(|fix| self > *fix)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Which workarounds a source needs. The default (an unknown version)
/// turns every one on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quirks {
    /// etcd-io/etcd#15220: a progress answer may overtake queued events.
    pub progress_may_overtake_events: bool,
    /// etcd-io/etcd#17507: a new watch on an idle range may never answer a
    /// progress request.
    pub progress_may_never_come: bool,
    /// etcd-io/etcd#18089: a watch from the compaction revision loses a
    /// DELETE there. (Guarded against whatever the version: the check is one read.)
    pub loses_delete_at_compaction: bool,
}

impl Default for Quirks {
    fn default() -> Self {
        Self {
            progress_may_overtake_events: true,
            progress_may_never_come: true,
            loses_delete_at_compaction: true,
        }
    }
}

impl Quirks {
    pub fn of(version: Option<Version>) -> Self {
        let Some(v) = version else {
            return Self::default();
        };
        Self {
            progress_may_overtake_events: !v
                .has_fix(&[Version::new(3, 4, 25), Version::new(3, 5, 8)]),
            progress_may_never_come: !v.has_fix(&[Version::new(3, 4, 31), Version::new(3, 5, 13)]),
            loses_delete_at_compaction: !v
                .has_fix(&[Version::new(3, 4, 36), Version::new(3, 5, 18)]),
        }
    }

    /// The workarounds on, for the log.
    pub fn describe(&self) -> Vec<&'static str> {
        let mut on = Vec::new();
        if self.progress_may_overtake_events {
            on.push("idle checkpoint waits for a confirming progress answer (etcd-io/etcd#15220)");
        }
        if self.progress_may_never_come {
            on.push("a silent watch is probed, not recreated (etcd-io/etcd#17507)");
        }
        if self.loses_delete_at_compaction {
            on.push("a watch from the compaction revision is refused (etcd-io/etcd#18089)");
        }
        on
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_servers_report() {
        assert_eq!(Version::parse("3.4.23"), Some(Version::new(3, 4, 23)));
        assert_eq!(Version::parse("v3.5.1"), Some(Version::new(3, 5, 1)));
        assert_eq!(Version::parse("3.6.0-rc.1"), Some(Version::new(3, 6, 0)));
        assert_eq!(Version::parse("3.5"), None);
        assert_eq!(Version::parse("x"), None);
    }

    #[test]
    fn workarounds_follow_the_fixed_releases() {
        let q = |s: &str| Quirks::of(Version::parse(s));
        assert!(q("3.4.23").progress_may_overtake_events);
        assert!(!q("3.4.25").progress_may_overtake_events);
        assert!(q("3.5.1").progress_may_overtake_events);
        assert!(!q("3.5.8").progress_may_overtake_events);
        assert!(q("3.5.12").progress_may_never_come);
        assert!(!q("3.5.13").progress_may_never_come);
        assert!(q("3.4.30").progress_may_never_come);
        assert!(!q("3.4.31").progress_may_never_come);
        assert!(q("3.5.17").loses_delete_at_compaction);
        assert!(!q("3.5.18").loses_delete_at_compaction);
        assert!(!q("3.4.36").loses_delete_at_compaction);
        // Older and newer lines than any listed fix.
        assert!(q("3.3.27").progress_may_overtake_events);
        assert!(
            Quirks::of(Version::parse("3.6.0"))
                == Quirks {
                    progress_may_overtake_events: false,
                    progress_may_never_come: false,
                    loses_delete_at_compaction: false
                }
        );
        assert_eq!(Quirks::of(None), Quirks::default());
        assert_eq!(Quirks::default().describe().len(), 3);
    }
}
