//! The set-up most scenarios share, in one place: a source and a
//! destination cluster (versions chosen by the environment, see
//! [`crate::etcd`]), keys loaded on the source, optionally a [`LinkProxy`]
//! on one side's link, and the syncer mirroring one prefix, waited for
//! until its job is `watching`.
//!
//! ```ignore
//! let mirror = Mirror::start(MirrorOptions {
//!     load: Some(Preload::keys(500, 100)),
//!     ..MirrorOptions::default()
//! })
//! .await?;
//! mirror.converge().await?;
//! ensure!(mirror.job_metric("etcd_syncer_slow_path_total").await? == 1.0);
//! mirror.finish().await
//! ```
//!
//! [`Clusters`] is the same without the syncer yet, for a test that needs
//! the clusters (or the proxy) before the syncer starts.

use std::time::Duration;

use anyhow::{ensure, Result};

use crate::proxy::LinkProxy;
use crate::{
    converge, eventually, mirror_args, put_many, replace_flag, wait_job_state, EtcdCluster,
    EtcdOptions, Role, Syncer,
};

/// Keys put on the source before the syncer starts, with [`put_many`]:
/// `<prefix>key-NNNNNN`, values of `value_size` bytes tagged `tag`.
#[derive(Clone, Debug)]
pub struct Preload {
    pub keys: usize,
    pub value_size: usize,
    pub tag: String,
}

impl Preload {
    /// `keys` keys of `value_size` bytes, tagged "v1".
    pub fn keys(keys: usize, value_size: usize) -> Self {
        Self {
            keys,
            value_size,
            tag: "v1".into(),
        }
    }
}

/// Which link a [`LinkProxy`] sits on: the syncer reaches that cluster
/// through it (its first endpoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxySide {
    Source,
    Dest,
}

#[derive(Clone)]
pub struct MirrorOptions {
    /// The syncer process's label in logs and errors.
    pub name: String,
    /// `--prefix`.
    pub prefix: String,
    /// Where the source prefix lands (for [`Mirror::converge`]); the prefix
    /// itself unless `--dest-prefix` is among `extra_args`.
    pub dest_prefix: Option<String>,
    /// The job's name; derived like the syncer does (the prefix without
    /// its slashes, `root` for `/`) unless `--job-name` is among `extra_args`.
    pub job: Option<String>,
    /// Flags after [`mirror_args`].
    pub extra_args: Vec<String>,
    /// Keys put on the source first.
    pub load: Option<Preload>,
    /// The source cluster (its role is set to [`Role::Source`]).
    pub source: EtcdOptions,
    /// The destination cluster (its role is set to [`Role::Dest`]).
    pub dest: EtcdOptions,
    /// A proxy on one side's link.
    pub proxy: Option<ProxySide>,
    /// Wait until the job is `watching` before [`Mirror::start`] returns.
    pub wait_watching: bool,
    /// ERROR lines the syncer may log in this test (see [`Syncer::allow_error`]).
    pub allow_errors: Vec<String>,
    /// How long the waits may take (a hang guard, not a speed check).
    pub timeout: Duration,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        Self {
            name: "syncer".into(),
            prefix: "/app/".into(),
            dest_prefix: None,
            job: None,
            extra_args: Vec::new(),
            load: None,
            source: EtcdOptions::default(),
            dest: EtcdOptions::default(),
            proxy: None,
            wait_watching: true,
            allow_errors: Vec::new(),
            timeout: Duration::from_secs(120),
        }
    }
}

impl MirrorOptions {
    /// The defaults with `keys` keys of `value_size` bytes on the source.
    pub fn loaded(keys: usize, value_size: usize) -> Self {
        Self {
            load: Some(Preload::keys(keys, value_size)),
            ..Self::default()
        }
    }

    /// The defaults with these extra flags.
    pub fn with_args(extra: &[&str]) -> Self {
        Self {
            extra_args: crate::args(extra),
            ..Self::default()
        }
    }

    fn flag(&self, flag: &str) -> Option<&str> {
        self.extra_args
            .iter()
            .position(|a| a == flag)
            .and_then(|at| self.extra_args.get(at + 1))
            .map(String::as_str)
    }

    /// The job the syncer runs for this prefix.
    pub fn job_name(&self) -> String {
        if let Some(job) = self
            .job
            .clone()
            .or(self.flag("--job-name").map(String::from))
        {
            return job;
        }
        // The syncer's rule: `/registry/services/` → `registry-services`,
        // `/` → `root`. Written out here, not taken from the product, so a
        // change to the rule shows in the tests.
        let mut name = String::new();
        for ch in self.prefix.chars() {
            if ch.is_ascii_alphanumeric() || ch == '.' || ch == '_' {
                name.push(ch);
            } else if !name.is_empty() && !name.ends_with('-') {
                name.push('-');
            }
        }
        let name = name.trim_end_matches('-');
        if name.is_empty() {
            "root".into()
        } else {
            name.into()
        }
    }

    /// Where the source prefix is mirrored to.
    pub fn dest_prefix(&self) -> String {
        self.dest_prefix
            .clone()
            .or(self.flag("--dest-prefix").map(String::from))
            .unwrap_or_else(|| self.prefix.clone())
    }
}

/// The two clusters (keys loaded, proxy in place), before the syncer starts.
pub struct Clusters {
    pub source: EtcdCluster,
    pub dest: EtcdCluster,
    /// With [`MirrorOptions::proxy`].
    pub proxy: Option<LinkProxy>,
    /// The proxy's endpoint, which the syncer is given for that side.
    pub proxied: Option<String>,
    pub options: MirrorOptions,
}

impl Clusters {
    /// Starts both clusters on free loopback ports, loads the keys, and
    /// puts the proxy on its link.
    pub async fn start(options: MirrorOptions) -> Result<Self> {
        let source = EtcdCluster::start_with(EtcdOptions {
            role: Role::Source,
            ..options.source.clone()
        })
        .await?;
        let dest = EtcdCluster::start_with(EtcdOptions {
            role: Role::Dest,
            ..options.dest.clone()
        })
        .await?;
        if let Some(load) = &options.load {
            put_many(
                &mut source.client().await?,
                &options.prefix,
                load.keys,
                load.value_size,
                &load.tag,
            )
            .await?;
        }
        let (proxy, proxied) = match options.proxy {
            Some(side) => {
                let cluster = if side == ProxySide::Source {
                    &source
                } else {
                    &dest
                };
                let (proxy, url) = LinkProxy::in_front_of(&cluster.endpoints()[0]).await?;
                (Some(proxy), Some(url))
            }
            None => (None, None),
        };
        Ok(Self {
            source,
            dest,
            proxy,
            proxied,
            options,
        })
    }

    /// The syncer's flags: [`mirror_args`], the proxied endpoint, then the
    /// extra flags.
    pub fn args(&self) -> Result<Vec<String>> {
        let mut args = mirror_args(&self.source, &self.dest, &self.options.prefix);
        if let (Some(side), Some(url)) = (self.options.proxy, &self.proxied) {
            let flag = match side {
                ProxySide::Source => "--src-endpoints",
                ProxySide::Dest => "--dst-endpoints",
            };
            args = replace_flag(args, flag, url)?;
        }
        args.extend(self.options.extra_args.iter().cloned());
        Ok(args)
    }

    /// Starts the syncer (and waits for `watching` if the options say so).
    pub async fn mirror(self) -> Result<Mirror> {
        let args = self.args()?;
        self.mirror_with(args).await
    }

    /// [`Clusters::mirror`] with these flags instead of [`Clusters::args`]
    /// (e.g. those with their endpoints replaced by endpoint groups).
    pub async fn mirror_with(self, args: Vec<String>) -> Result<Mirror> {
        let syncer = start_syncer(&self.options, &self.options.name, &args).await?;
        Ok(Mirror {
            job: self.options.job_name(),
            source: self.source,
            dest: self.dest,
            proxy: self.proxy,
            syncer,
            args,
            options: self.options,
        })
    }
}

async fn start_syncer(options: &MirrorOptions, name: &str, args: &[String]) -> Result<Syncer> {
    let mut syncer = Syncer::start(name, args).await?;
    for allowed in &options.allow_errors {
        syncer.allow_error(allowed);
    }
    if options.wait_watching {
        wait_job_state(&syncer, &options.job_name(), "watching").await?;
    }
    Ok(syncer)
}

/// Both clusters and the syncer mirroring one prefix between them.
pub struct Mirror {
    pub source: EtcdCluster,
    pub dest: EtcdCluster,
    pub syncer: Syncer,
    /// With [`MirrorOptions::proxy`].
    pub proxy: Option<LinkProxy>,
    /// The job's name.
    pub job: String,
    /// The flags the syncer runs with.
    pub args: Vec<String>,
    pub options: MirrorOptions,
}

impl Mirror {
    /// [`Clusters::start`], then [`Clusters::mirror`].
    pub async fn start(options: MirrorOptions) -> Result<Self> {
        Clusters::start(options).await?.mirror().await
    }

    /// Waits until the destination prefix equals the source prefix exactly.
    pub async fn converge(&self) -> Result<()> {
        converge(
            &self.source,
            &self.options.prefix,
            &self.dest,
            &self.options.dest_prefix(),
            self.options.timeout,
        )
        .await
    }

    /// The job's sample of `name` (summed over its other labels).
    pub async fn job_metric(&self, name: &str) -> Result<f64> {
        self.syncer.metric(name, &[("job", &self.job)]).await
    }

    /// The job's `etcd_syncer_errors_total` of `kind`.
    pub async fn errors(&self, kind: &str) -> Result<f64> {
        self.syncer
            .metric(
                "etcd_syncer_errors_total",
                &[("job", &self.job), ("kind", kind)],
            )
            .await
    }

    /// Waits until the job is in `state` (e.g. "watching").
    pub async fn wait_state(&self, state: &str) -> Result<()> {
        wait_job_state(&self.syncer, &self.job, state).await
    }

    /// Full syncs and resumes since this syncer started: `(slow, fast)`.
    pub async fn paths(&self) -> Result<(f64, f64)> {
        Ok((
            self.job_metric("etcd_syncer_slow_path_total").await?,
            self.job_metric("etcd_syncer_fast_path_total").await?,
        ))
    }

    /// Stops the syncer: SIGTERM, a clean exit, no unexpected ERROR line.
    /// The clusters stay; [`Mirror::start_again`] starts another syncer.
    pub async fn stop(&mut self) -> Result<()> {
        let status = self.syncer.stop().await?;
        ensure!(status.success(), "SIGTERM exits cleanly, got {status}");
        let unexpected = self.syncer.unexpected_errors();
        ensure!(
            unexpected.is_empty(),
            "the stopped syncer logged unexpected ERROR lines:\n{}",
            unexpected.join("\n")
        );
        Ok(())
    }

    /// Starts another syncer as `name` with the same flags plus `extra`
    /// (after [`Mirror::stop`]), and waits for `watching` if the options
    /// say so.
    pub async fn start_again(&mut self, name: &str, extra: &[&str]) -> Result<()> {
        let mut args = self.args.clone();
        args.extend(crate::args(extra));
        self.start_again_with(name, &args).await
    }

    /// [`Mirror::start_again`] with these flags instead.
    pub async fn start_again_with(&mut self, name: &str, args: &[String]) -> Result<()> {
        self.syncer = start_syncer(&self.options, name, args).await?;
        Ok(())
    }

    /// [`Mirror::stop`], then [`Mirror::start_again`].
    pub async fn restart(&mut self, name: &str, extra: &[&str]) -> Result<()> {
        self.stop().await?;
        self.start_again(name, extra).await
    }

    /// Stops the syncer and fails on any unexpected ERROR line.
    pub async fn finish(self) -> Result<()> {
        self.syncer.finish().await
    }
}

/// Waits until `proxy` holds its link (after [`LinkProxy::hold_after_forwarding`])
/// and checks that `syncer` is in a full sync of `job` then: the freeze
/// landed mid full sync.
pub async fn wait_frozen_mid_full_sync(
    proxy: &LinkProxy,
    syncer: &Syncer,
    job: &str,
) -> Result<()> {
    eventually(
        Duration::from_secs(120),
        "the link to freeze mid full sync",
        || async { Ok(proxy.is_holding()) },
    )
    .await?;
    let in_progress = syncer
        .metric("etcd_syncer_full_sync_in_progress", &[("job", job)])
        .await?;
    ensure!(
        in_progress == 1.0,
        "the syncer is in a full sync when its link freezes"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_follow_the_prefix_or_the_flag() {
        let name = |prefix: &str, extra: &[&str]| {
            MirrorOptions {
                prefix: prefix.into(),
                extra_args: crate::args(extra),
                ..MirrorOptions::default()
            }
            .job_name()
        };
        assert_eq!(name("/app/", &[]), "app");
        assert_eq!(name("/", &[]), "root");
        assert_eq!(name("/registry/services/", &[]), "registry-services");
        assert_eq!(name("/app/", &["--job-name", "other"]), "other");
    }
}
