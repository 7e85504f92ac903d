//! `zk2etcd`'s flags into a [`ZkJob`], refusing what cannot work (exit 2).

use super::args::{Zk2EtcdArgs, ZkTlsArgs};
use super::error::{invalid, ConfigError};
use super::settings::{ZkJob, ZkTls};
use crate::model::zk::ZkPrefix;

/// A ZooKeeper path as ZooKeeper takes it: absolute, no trailing slash (but
/// the root), no empty component.
fn check_path(field: &str, path: &str) -> Result<(), ConfigError> {
    let fix = "give an absolute ZooKeeper path without a trailing slash, e.g. /dubbo";
    if !path.starts_with('/') || (path.len() > 1 && (path.ends_with('/') || path.contains("//"))) {
        return Err(invalid(field, path, fix));
    }
    Ok(())
}

/// `path` is in the subtree below `root` (not `root` itself).
fn strictly_under(path: &str, root: &str) -> bool {
    root == "/" || path.starts_with(&format!("{root}/"))
}

/// One ZooKeeper prefix: mapped to `dest` (default: the same path), with
/// the excluded subtrees that lie below it.
pub fn zk_prefix(zk: &str, dest: Option<&str>, excludes: &[String]) -> ZkPrefix {
    ZkPrefix {
        zk: zk.to_string(),
        dest: dest.unwrap_or(zk).as_bytes().to_vec(),
        excluded: excludes
            .iter()
            .filter(|ex| strictly_under(ex, zk))
            .cloned()
            .collect(),
    }
}

/// `zookeeper://host:port[,host:port]/path` into the servers and the path.
impl ZkTlsArgs {
    /// The PEM files, read and checked (`None`: no `--zk-cacert`, no TLS).
    pub fn read(&self) -> Result<Option<ZkTls>, ConfigError> {
        let Some(ca) = &self.zk_cacert else {
            if self.zk_cert.is_some() {
                return Err(invalid(
                    "--zk-cert",
                    &self
                        .zk_cert
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    "a client certificate needs --zk-cacert too (TLS is on with a CA)",
                ));
            }
            return Ok(None);
        };
        let pem = |field: &str, path: &std::path::Path, kind: &str| {
            let text = std::fs::read_to_string(path).map_err(|error| {
                invalid(
                    field,
                    &path.display().to_string(),
                    &format!("cannot be read ({error}); give a readable PEM file"),
                )
            })?;
            let is_pem = text.contains(&format!("-----BEGIN {kind}"))
                || (kind == "KEY" && text.contains("PRIVATE KEY-----"));
            if !is_pem {
                return Err(invalid(
                    field,
                    &path.display().to_string(),
                    &format!("is not a PEM {} file", kind.to_lowercase()),
                ));
            }
            Ok(text)
        };
        let identity = match (&self.zk_cert, &self.zk_key) {
            (Some(cert), Some(key)) => Some((
                pem("--zk-cert", cert, "CERTIFICATE")?,
                pem("--zk-key", key, "KEY")?,
            )),
            _ => None,
        };
        Ok(Some(ZkTls {
            ca: pem("--zk-cacert", ca, "CERTIFICATE")?,
            identity,
        }))
    }
}

/// A ZooKeeper digest credential (`user:password`), checked.
pub fn digest(field: &str, digest: Option<&str>) -> Result<Option<String>, ConfigError> {
    match digest {
        Some(digest) if !digest.contains(':') => {
            Err(invalid(field, "(hidden)", "give user:password"))
        }
        digest => Ok(digest.map(str::to_string)),
    }
}

pub fn parse_zk_source(field: &str, url: &str) -> Result<(String, String), ConfigError> {
    let fix =
        "give zookeeper://host:port[,host:port]/path, e.g. zookeeper://zk1:2181,zk2:2181/dubbo";
    let rest = url
        .strip_prefix("zookeeper://")
        .ok_or_else(|| invalid(field, url, fix))?;
    let (servers, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    if servers.is_empty() || servers.split(',').any(|s| !s.contains(':')) {
        return Err(invalid(field, url, fix));
    }
    check_path(field, path)?;
    Ok((servers.to_string(), path.to_string()))
}

impl Zk2EtcdArgs {
    pub fn to_job(&self) -> Result<ZkJob, ConfigError> {
        if self.zk_servers.trim().is_empty() {
            return Err(invalid(
                "--zk-servers",
                &self.zk_servers,
                "give host:port[,host:port]",
            ));
        }
        if self.zk_servers.contains('/') {
            return Err(invalid(
                "--zk-servers",
                &self.zk_servers,
                "a chroot is not supported: put the path in --zk-prefix",
            ));
        }
        for prefix in &self.zk_prefixes {
            check_path("--zk-prefix", prefix)?;
        }
        for (i, a) in self.zk_prefixes.iter().enumerate() {
            for b in &self.zk_prefixes[i + 1..] {
                let nested =
                    |x: &str, y: &str| x == "/" || y == x || y.starts_with(&format!("{x}/"));
                if nested(a, b) || nested(b, a) {
                    return Err(ConfigError::Conflict {
                        fields: "--zk-prefix".into(),
                        reason: format!("{a} and {b} overlap: give each subtree once"),
                    });
                }
            }
        }
        for exclude in &self.exclude_prefixes {
            check_path("--exclude-prefix", exclude)?;
            let under = self.zk_prefixes.iter().any(|p| strictly_under(exclude, p));
            if !under {
                return Err(invalid(
                    "--exclude-prefix",
                    exclude,
                    "must be a subtree below one of the --zk-prefix paths",
                ));
            }
        }
        if self.dest_prefix.is_some() && self.zk_prefixes.len() != 1 {
            return Err(ConfigError::Conflict {
                fields: "--dest-prefix, --zk-prefix".into(),
                reason: "--dest-prefix maps one --zk-prefix; with several, each keeps its path"
                    .into(),
            });
        }
        if let Some(dest) = &self.dest_prefix {
            if dest.is_empty() || dest.starts_with(&self.meta_prefix) {
                return Err(invalid(
                    "--dest-prefix",
                    dest,
                    "must be a non-empty etcd prefix outside --meta-prefix",
                ));
            }
        }
        if self.ephemeral_ttl < std::time::Duration::from_secs(2)
            || self.ephemeral_ttl.subsec_nanos() != 0
        {
            return Err(invalid(
                "--ephemeral-ttl",
                &humantime::format_duration(self.ephemeral_ttl).to_string(),
                "must be whole seconds, at least 2s (etcd leases have second granularity)",
            ));
        }
        if self.lock_ttl < std::time::Duration::from_secs(2) {
            return Err(invalid(
                "--lock-ttl",
                &humantime::format_duration(self.lock_ttl).to_string(),
                "must be at least 2s",
            ));
        }
        if !(0.0..=1.0).contains(&self.max_prune_ratio) {
            return Err(invalid(
                "--max-prune-ratio",
                &self.max_prune_ratio.to_string(),
                "must be between 0 and 1",
            ));
        }
        if self.resync_interval < std::time::Duration::from_secs(1) {
            return Err(invalid(
                "--resync-interval",
                &humantime::format_duration(self.resync_interval).to_string(),
                "must be at least 1s",
            ));
        }
        let digest = digest("--zk-digest", self.zk_digest.as_deref())?;
        let tls = self.zk_tls.read()?;
        let prefixes = self
            .zk_prefixes
            .iter()
            .map(|zk| zk_prefix(zk, self.dest_prefix.as_deref(), &self.exclude_prefixes))
            .collect();
        Ok(ZkJob {
            name: self.job_name.clone(),
            servers: self.zk_servers.clone(),
            digest,
            tls,
            prefixes,
            ephemeral: self.ephemeral,
            ephemeral_ttl: self.ephemeral_ttl,
            session_timeout: self.zk_session_timeout,
            resync_interval: self.resync_interval,
            max_prune_ratio: self.max_prune_ratio,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<ZkJob, String> {
        let mut argv = vec!["etcd-syncer", "zk2etcd", "--dst-endpoints", "127.0.0.1:1"];
        argv.extend(args);
        let cli = crate::config::Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        match cli.command {
            crate::config::Command::Zk2etcd(args) => args.to_job().map_err(|e| e.to_string()),
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_zookeeper_source_url_names_servers_and_path() {
        assert_eq!(
            parse_zk_source("--source", "zookeeper://a:1,b:2/dubbo").unwrap(),
            ("a:1,b:2".to_string(), "/dubbo".to_string())
        );
        assert_eq!(
            parse_zk_source("--source", "zookeeper://a:1").unwrap().1,
            "/"
        );
        for bad in [
            "http://a:1/x",
            "zookeeper:///x",
            "zookeeper://a/x",
            "zookeeper://a:1/x/",
        ] {
            let error = parse_zk_source("--source", bad).unwrap_err().to_string();
            assert!(error.contains("--source"), "{bad}: {error}");
        }
    }

    #[test]
    fn flags_become_a_job_or_an_error_naming_the_field() {
        let job = parse(&[
            "--zk-servers",
            "127.0.0.1:2181",
            "--zk-prefix",
            "/dubbo",
            "--exclude-prefix",
            "/dubbo/x",
        ])
        .unwrap();
        assert_eq!(job.prefixes[0].dest, b"/dubbo".to_vec());
        assert_eq!(job.prefixes[0].excluded, vec!["/dubbo/x".to_string()]);
        let job = parse(&[
            "--zk-servers",
            "h:1",
            "--zk-prefix",
            "/dubbo",
            "--dest-prefix",
            "/registry/dubbo",
        ])
        .unwrap();
        assert_eq!(job.prefixes[0].dest, b"/registry/dubbo".to_vec());
        for (args, field) in [
            (
                vec!["--zk-servers", "h:1", "--zk-prefix", "dubbo"],
                "--zk-prefix",
            ),
            (
                vec!["--zk-servers", "h:1", "--zk-prefix", "/dubbo/"],
                "--zk-prefix",
            ),
            (
                vec!["--zk-servers", "h:1/chroot", "--zk-prefix", "/a"],
                "--zk-servers",
            ),
            (
                vec!["--zk-servers", "h:1", "--zk-prefix", "/a,/a/b"],
                "overlap",
            ),
            (
                vec![
                    "--zk-servers",
                    "h:1",
                    "--zk-prefix",
                    "/a,/b",
                    "--dest-prefix",
                    "/c",
                ],
                "--dest-prefix",
            ),
            (
                vec![
                    "--zk-servers",
                    "h:1",
                    "--zk-prefix",
                    "/a",
                    "--exclude-prefix",
                    "/b/c",
                ],
                "--exclude-prefix",
            ),
            (
                vec![
                    "--zk-servers",
                    "h:1",
                    "--zk-prefix",
                    "/a",
                    "--ephemeral-ttl",
                    "1s",
                ],
                "--ephemeral-ttl",
            ),
            (
                vec![
                    "--zk-servers",
                    "h:1",
                    "--zk-prefix",
                    "/a",
                    "--max-prune-ratio",
                    "2",
                ],
                "--max-prune-ratio",
            ),
            (
                vec![
                    "--zk-servers",
                    "h:1",
                    "--zk-prefix",
                    "/a",
                    "--zk-digest",
                    "nocolon",
                ],
                "--zk-digest",
            ),
        ] {
            let error = parse(&args).unwrap_err();
            assert!(error.contains(field), "{args:?}: {error}");
        }
    }
}
