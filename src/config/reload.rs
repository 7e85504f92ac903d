//! What a configuration reload changes: a pure comparison of the running
//! settings with the new ones, so the rules are tested without a process.
//!
//! - A job is keyed by its name. A new name starts; a name gone stops (its
//!   lock released, its checkpoint kept on the destination); a job whose
//!   own settings changed, or any setting every job runs with (txn limits,
//!   tuning, the prune ratio, checks, leases, the meta prefix), restarts,
//!   which resumes from its checkpoint.
//! - A side whose connection settings changed (endpoints, groups, TLS
//!   files, credentials) is reconnected under the running jobs, and the
//!   endpoint-failover settings take effect with it.
//! - What a running process cannot change (the metrics address, the
//!   instance id, the lock TTL and rebalancing, the liveness timeout,
//!   `--sync-auth`) is reported, and the running value stays.

use super::settings::{JobSettings, Settings};
use super::table::{self, Reload};
use crate::model::Side;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReloadPlan {
    pub start: Vec<JobSettings>,
    pub stop: Vec<String>,
    /// Stopped, then started with these settings.
    pub restart: Vec<JobSettings>,
    pub reconnect: Vec<Side>,
    /// Fields whose new value needs a restart of the process.
    pub needs_restart: Vec<String>,
}

impl ReloadPlan {
    pub fn is_empty(&self) -> bool {
        self.start.is_empty()
            && self.stop.is_empty()
            && self.restart.is_empty()
            && self.reconnect.is_empty()
            && self.needs_restart.is_empty()
    }
}

pub fn plan(old: &Settings, new: &Settings) -> ReloadPlan {
    let mut plan = ReloadPlan::default();
    let changed = table::changed(old, new);
    let all_restart = changed.iter().any(|spec| spec.reload == Reload::Jobs);
    let reconnect_both = changed.iter().any(|spec| spec.reload == Reload::Reconnect);
    for job in &new.jobs {
        match old.jobs.iter().find(|j| j.name == job.name) {
            None => plan.start.push(job.clone()),
            Some(running) if running != job || all_restart => plan.restart.push(job.clone()),
            Some(_) => {}
        }
    }
    plan.stop = old
        .jobs
        .iter()
        .filter(|j| !new.jobs.iter().any(|n| n.name == j.name))
        .map(|j| j.name.clone())
        .collect();
    if old.source != new.source || reconnect_both {
        plan.reconnect.push(Side::Source);
    }
    if old.destination != new.destination || reconnect_both {
        plan.reconnect.push(Side::Destination);
    }
    plan.needs_restart = changed
        .iter()
        .filter(|spec| spec.reload == Reload::Process)
        .map(|spec| spec.flag())
        .collect();
    // Not table settings: the passwords behind an unchanged file name, and
    // a request made to this run.
    if old.auth.passwords != new.auth.passwords
        && old.auth.passwords_file == new.auth.passwords_file
    {
        plan.needs_restart.push("--auth-passwords-file".to_string());
    }
    if old.reset_last_synced_rev != new.reset_last_synced_rev {
        plan.needs_restart
            .push("--reset-last-synced-rev".to_string());
    }
    plan
}

/// The new settings with what a running process cannot change put back to
/// the running values (after [`plan`] has reported them).
pub fn keep_fixed(old: &Settings, mut new: Settings) -> Settings {
    table::keep_fixed(old, &mut new);
    new.auth.passwords = old.auth.passwords.clone();
    new.reset_last_synced_rev = old.reset_last_synced_rev;
    new
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MirrorArgs;
    use clap::Parser;

    fn settings(extra: &[&str], jobs: &str) -> Settings {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: MirrorArgs,
        }
        let mut argv = vec![
            "x",
            "--src-endpoints",
            "http://127.0.0.1:1",
            "--dst-endpoints",
            "http://127.0.0.1:2",
        ];
        argv.extend_from_slice(extra);
        let args = Wrapper::try_parse_from(argv).expect("flags").args;
        args.merge(toml::from_str(jobs).expect("toml"))
            .expect("valid")
    }

    const TWO: &str =
        "[[jobs]]\nname = \"a\"\nprefix = \"/a/\"\n[[jobs]]\nname = \"b\"\nprefix = \"/b/\"\n";

    #[test]
    fn unchanged_is_empty() {
        let s = settings(&[], TWO);
        assert!(plan(&s, &s.clone()).is_empty());
    }

    #[test]
    fn jobs_added_removed_and_changed() {
        let old = settings(&[], TWO);
        let new = settings(
            &[],
            "[[jobs]]\nname = \"a\"\nprefix = \"/a/\"\nmax-write-ops-per-second = 10\n[[jobs]]\nname = \"c\"\nprefix = \"/c/\"\n",
        );
        let plan = plan(&old, &new);
        assert_eq!(
            plan.start
                .iter()
                .map(|j| j.name.as_str())
                .collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!(plan.stop, ["b"]);
        assert_eq!(
            plan.restart
                .iter()
                .map(|j| j.name.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(plan.restart[0].write_rate.ops_per_second, 10);
        assert!(plan.reconnect.is_empty() && plan.needs_restart.is_empty());
    }

    #[test]
    fn a_shared_setting_restarts_every_job() {
        let old = settings(&[], TWO);
        let new = settings(&["--page-size", "500"], TWO);
        let plan = plan(&old, &new);
        assert_eq!(plan.restart.len(), 2);
        assert!(plan.start.is_empty() && plan.stop.is_empty());
    }

    #[test]
    fn connections_reconnect_without_restarting_jobs() {
        let old = settings(&[], TWO);
        let new = settings(&["--dst-user", "u", "--dst-password", "p"], TWO);
        let plan = plan(&old, &new);
        assert_eq!(plan.reconnect, [Side::Destination]);
        assert!(plan.restart.is_empty());
        let new = settings(&["--endpoint-failover-after", "5"], TWO);
        assert_eq!(
            super::plan(&old, &new).reconnect,
            [Side::Source, Side::Destination]
        );
    }

    #[test]
    fn fixed_settings_are_reported_and_kept() {
        let old = settings(&[], TWO);
        let new = settings(&["--metrics-addr", "127.0.0.1:1", "--lock-ttl", "9s"], TWO);
        let plan = plan(&old, &new);
        assert_eq!(plan.needs_restart, ["--metrics-addr", "--lock-ttl"]);
        let kept = keep_fixed(&old, new);
        assert_eq!(kept.metrics_addr, old.metrics_addr);
        assert_eq!(kept.lock_ttl, old.lock_ttl);
        assert!(super::plan(&old, &kept).is_empty());
    }
}
