//! Merging flags and the config file into [`Settings`], and every check on
//! the way. Anything wrong is a [`ConfigError`], exit code 2.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use super::args::{CheckArgs, ClusterFlags, MirrorArgs, PromoteArgs, ResetArgs, StatusArgs};
pub use super::error::ConfigError;
use super::error::{invalid, missing, origin};
use super::file::FileCluster;
use super::settings::*;
use super::table::{load_file, rules, FileConfig, FromFlag};
use crate::model::keys::{is_valid_job_name, job_name_from_prefix, prefixes_overlap};
use crate::model::Side;

impl ResetArgs {
    /// The destination, the meta prefix and the configured job names
    /// (empty without a config file).
    pub fn resolve(self) -> Result<(ClusterSettings, String, Vec<String>), ConfigError> {
        check_request_timeout(self.request_timeout)?;
        let file = match &self.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let destination =
            cluster_settings(self.dest.flags(), file.destination.unwrap_or_default())?;
        let meta_prefix = self
            .meta_prefix
            .or(file.meta_prefix)
            .unwrap_or_else(|| DEFAULT_META_PREFIX.to_string());
        let jobs = file
            .jobs
            .into_iter()
            .map(|job| {
                job.name
                    .unwrap_or_else(|| job_name_from_prefix(&job.prefix))
            })
            .collect();
        Ok((destination, meta_prefix, jobs))
    }
}

impl StatusArgs {
    /// The checks clap cannot do: duration bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_request_timeout(self.request_timeout)
    }
}

impl PromoteArgs {
    /// The checks clap cannot do: duration bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_request_timeout(self.request_timeout)?;
        check_at_most("--wait-timeout", self.wait_timeout, MAX_WAIT_TIMEOUT)
    }
}

impl CheckArgs {
    /// The checks clap cannot do: duration bounds, and what --dest-prefix
    /// goes with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.dest_prefix.is_some() && self.prefix.is_none() && self.zk_source.is_none() {
            return Err(ConfigError::Conflict {
                fields: "--dest-prefix".into(),
                reason: "it goes with --prefix (or --source zookeeper://); with --job-name alone the checkpoint names it".into(),
            });
        }
        check_request_timeout(self.request_timeout)
    }
}

/// `--request-timeout` of the operator commands: above zero, at most 1h.
fn check_request_timeout(value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(invalid(
            "--request-timeout",
            "0s",
            "must be longer than zero, e.g. 10s",
        ));
    }
    check_at_most("--request-timeout", value, MAX_REQUEST_TIMEOUT)
}

/// The settings of one side's connection flags, for the commands that read
/// no config file.
impl ClusterFlags {
    /// Settings for commands where this side is optional (`status`,
    /// `promote`): `None` without endpoints.
    pub fn into_optional_settings(self) -> Result<Option<ClusterSettings>, ConfigError> {
        if self.endpoints.is_none() && self.endpoint_groups.is_empty() {
            return Ok(None);
        }
        self.into_settings().map(Some)
    }

    pub fn into_settings(self) -> Result<ClusterSettings, ConfigError> {
        cluster_settings(self, FileCluster::default())
    }
}

impl MirrorArgs {
    /// Reads the config file named by `--config` (if any), then merges and validates.
    pub fn into_settings(self) -> Result<Settings, ConfigError> {
        let file = match &self.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        self.merge(file)
    }

    pub fn merge(self, mut file: FileConfig) -> Result<Settings, ConfigError> {
        let source = cluster_settings(self.source.flags(), file.source.take().unwrap_or_default())?;
        let destination = cluster_settings(
            self.dest.flags(),
            file.destination.take().unwrap_or_default(),
        )?;
        let mut settings = Settings::skeleton(source, destination);
        let mut from_flag = FromFlag::default();
        self.meta.apply(&mut file, &mut settings, &mut from_flag)?;
        self.limits
            .apply(&mut file, &mut settings, &mut from_flag)?;
        self.run.apply(&mut file, &mut settings, &mut from_flag)?;
        settings.reset_last_synced_rev = self.reset_last_synced_rev;

        // Revision-exact mirrors the whole keyspace as one job: no --prefix
        // needed (and any other is refused below).
        let prefix = self
            .prefix
            .or_else(|| (settings.revision_exact && file.jobs.is_empty()).then(String::new));
        let jobs = match prefix {
            Some(prefix) => {
                let dest_prefix = if self.no_dest_prefix {
                    Some(String::new())
                } else {
                    self.dest_prefix
                };
                let write_rate = WriteRateLimit {
                    ops_per_second: self.max_write_ops_per_second.unwrap_or(0),
                    bytes_per_second: self.max_write_bytes_per_second.map_or(0, |b| b.as_u64()),
                };
                let excludes = (self.exclude_prefixes, "--exclude-prefix".to_string());
                vec![job_settings(
                    self.job_name,
                    prefix,
                    dest_prefix,
                    write_rate,
                    excludes,
                )?]
            }
            None => {
                if self.dest_prefix.is_some()
                    || self.no_dest_prefix
                    || self.job_name.is_some()
                    || self.max_write_ops_per_second.is_some()
                    || self.max_write_bytes_per_second.is_some()
                    || !self.exclude_prefixes.is_empty()
                {
                    return Err(ConfigError::Conflict {
                        fields: "--dest-prefix/--no-dest-prefix/--job-name/--exclude-prefix/--max-write-*-per-second and [[jobs]]".into(),
                        reason: "these flags describe a single job and need --prefix; set them per job in the config file instead".into(),
                    });
                }
                file.jobs
                    .into_iter()
                    .enumerate()
                    .map(|(index, job)| {
                        let dest_prefix = if job.no_dest_prefix {
                            Some(String::new())
                        } else {
                            job.dest_prefix
                        };
                        let write_rate = WriteRateLimit {
                            ops_per_second: job.max_write_ops_per_second.unwrap_or(0),
                            bytes_per_second: job
                                .max_write_bytes_per_second
                                .map_or(0, |b| b.as_u64()),
                        };
                        let excludes = (
                            job.exclude_prefixes,
                            format!("jobs[{index}].exclude-prefixes (config file)"),
                        );
                        job_settings(job.name, job.prefix, dest_prefix, write_rate, excludes)
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        if jobs.is_empty() {
            return Err(missing(
                "--prefix",
                "give --prefix for one job, or a [[jobs]] list with a prefix each in --config",
            ));
        }
        validate_jobs(
            &jobs,
            &settings.meta_prefix,
            &settings.source,
            &settings.destination,
        )?;
        settings.jobs = jobs;
        between_settings(&mut settings, from_flag)?;
        exact_settings(&settings)?;
        Ok(settings)
    }
}

/// `--revision-exact` keeps every revision of the source, so nothing that
/// leaves keys out, moves them, or writes outside a replay txn goes with it.
fn exact_settings(settings: &Settings) -> Result<(), ConfigError> {
    if !settings.revision_exact {
        return Ok(());
    }
    let conflict = |fields: &str, reason: &str| {
        Err(ConfigError::Conflict {
            fields: format!("--revision-exact and {fields}"),
            reason: format!("{reason}; revision-exact mirrors the whole keyspace unchanged, one txn per source revision"),
        })
    };
    let [job] = settings.jobs.as_slice() else {
        return conflict(
            "several [[jobs]]",
            "one job replays every revision; drop the [[jobs]] list",
        );
    };
    if !job.prefix.is_empty() {
        return conflict(
            &format!("--prefix {:?}", job.prefix),
            "drop --prefix (or the job's prefix)",
        );
    }
    if !job.dest_prefix.is_empty() {
        return conflict(
            &format!("--dest-prefix {:?}", job.dest_prefix),
            "keys keep their names; drop --dest-prefix",
        );
    }
    if !job.exclude_prefixes.is_empty() {
        return conflict(
            "--exclude-prefix",
            "a key left out would leave its revisions out too; drop the excludes",
        );
    }
    if settings.leases.mode == LeaseMode::Strip {
        return conflict(
            "--leases strip",
            "keys keep their source lease IDs; use --leases faithful (the default)",
        );
    }
    if settings.reset_last_synced_rev {
        return conflict(
            "--reset-last-synced-rev",
            "there is no full sync to start again from; re-seed the standby from a snapshot instead (docs/operations.md)",
        );
    }
    if settings.checks.repair {
        return conflict(
            "--check-repair",
            "a repair would be a write of the destination's own",
        );
    }
    Ok(())
}

/// The rules that tie two settings together, once the table has filled
/// each (its own rules hold by then), and the passwords file read.
fn between_settings(settings: &mut Settings, from_flag: FromFlag) -> Result<(), ConfigError> {
    let tuning = &settings.tuning;
    if tuning.watch_idle_timeout <= tuning.progress_interval {
        return Err(ConfigError::Conflict {
            fields: "--watch-idle-timeout and --progress-interval".into(),
            reason: format!(
                "the idle timeout ({}) must be longer than the progress interval ({}), or every idle watch looks stalled",
                humantime::format_duration(tuning.watch_idle_timeout),
                humantime::format_duration(tuning.progress_interval)
            ),
        });
    }
    if settings.rebalance_interval < settings.lock_ttl {
        return Err(ConfigError::Conflict {
            fields: "--rebalance-interval and --lock-ttl".into(),
            reason: "rebalancing more often than the lock TTL would hand jobs back and forth; use at least the TTL".into(),
        });
    }
    if settings.checks.repair && settings.checks.interval.is_zero() {
        return Err(ConfigError::Conflict {
            fields: "--check-repair and --check-interval 0".into(),
            reason:
                "repairs come from the periodic check, which is disabled; set a --check-interval"
                    .into(),
        });
    }
    let liveness_timeout = settings.liveness_timeout;
    if liveness_timeout < Duration::from_secs(5)
        || liveness_timeout <= tuning.progress_interval.saturating_mul(2)
    {
        return Err(invalid(
            &origin("liveness-timeout", from_flag.liveness_timeout),
            &humantime::format_duration(liveness_timeout).to_string(),
            "must be at least 5s and more than twice --progress-interval, or healthy job loops look wedged between their wake-ups",
        ));
    }
    let auth = &mut settings.auth;
    if let Some(path) = &auth.passwords_file {
        if !auth.enabled {
            return Err(ConfigError::Conflict {
                fields: "--auth-passwords-file without --sync-auth".into(),
                reason: "the passwords are only used to create mirrored users; add --sync-auth (sync-auth = true in the config file) or drop the file".into(),
            });
        }
        auth.passwords = load_passwords_from(
            &origin("auth-passwords-file", from_flag.auth_passwords_file),
            path,
        )?;
    }
    Ok(())
}

/// `NAME=URL[,URL...]` of `--src-endpoint-group`.
fn parse_group_flag(field: &str, text: &str) -> Result<(String, Vec<String>), ConfigError> {
    match text.split_once('=') {
        Some((name, urls)) if !name.trim().is_empty() => Ok((
            name.trim().to_string(),
            urls.split(',').map(str::to_string).collect(),
        )),
        _ => Err(invalid(
            field,
            text,
            "write NAME=URL[,URL...], e.g. private=https://10.0.0.1:2379,https://10.0.0.2:2379 (repeat the flag for each group, most preferred first)",
        )),
    }
}

/// The endpoint groups of one side: `--*-endpoints` (one group), else
/// `--*-endpoint-group` (repeated), else the file's `endpoints` or
/// `[[*.endpoint-groups]]`. Returns the groups and the field each came
/// from (for errors).
fn endpoint_groups(
    side: Side,
    flags: &ClusterFlags,
    file: &FileCluster,
) -> Result<Vec<(EndpointGroup, String)>, ConfigError> {
    let p = side.flag_prefix();
    let section = side.file_section();
    if flags.endpoints.is_some() && !flags.endpoint_groups.is_empty() {
        return Err(ConfigError::Conflict {
            fields: format!("--{p}-endpoints and --{p}-endpoint-group"),
            reason: format!("give one group with --{p}-endpoints, or several with --{p}-endpoint-group, not both"),
        });
    }
    if !file.endpoints.is_empty() && !file.endpoint_groups.is_empty() {
        return Err(ConfigError::Conflict {
            fields: format!("{section}.endpoints and {section}.endpoint-groups (config file)"),
            reason: "list the endpoints once: in endpoints (one group), or in [[endpoint-groups]] entries".into(),
        });
    }
    let raw: Vec<(String, Vec<String>, String)> = if let Some(endpoints) = &flags.endpoints {
        vec![(
            DEFAULT_GROUP.to_string(),
            endpoints.clone(),
            format!("--{p}-endpoints"),
        )]
    } else if !flags.endpoint_groups.is_empty() {
        let field = format!("--{p}-endpoint-group");
        flags
            .endpoint_groups
            .iter()
            .map(|text| {
                parse_group_flag(&field, text).map(|(name, urls)| (name, urls, field.clone()))
            })
            .collect::<Result<_, _>>()?
    } else if !file.endpoint_groups.is_empty() {
        file.endpoint_groups
            .iter()
            .enumerate()
            .map(|(i, group)| {
                (
                    group.name.clone(),
                    group.endpoints.clone(),
                    format!("{section}.endpoint-groups[{i}].endpoints (config file)"),
                )
            })
            .collect()
    } else {
        vec![(
            DEFAULT_GROUP.to_string(),
            file.endpoints.clone(),
            format!("{section}.endpoints (config file)"),
        )]
    };
    let mut groups: Vec<(EndpointGroup, String)> = Vec::new();
    for (name, urls, field) in raw {
        let endpoints: Vec<String> = urls
            .into_iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if groups.iter().any(|(g, _)| g.name == name) {
            return Err(invalid(
                &field,
                &name,
                "two endpoint groups have this name; give each group its own name (it labels metrics and logs)",
            ));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                &field,
                &name,
                "a group name is letters, digits, '-' and '_' (it labels metrics)",
            ));
        }
        if endpoints.is_empty() {
            let only_default = name == DEFAULT_GROUP
                && flags.endpoint_groups.is_empty()
                && file.endpoint_groups.is_empty();
            if only_default {
                return Err(missing(
                    format!("--{p}-endpoints"),
                    "list the cluster's client URLs, e.g. http://10.0.0.1:2379,http://10.0.0.2:2379 (or endpoints = [...] in the config file)",
                ));
            }
            return Err(invalid(
                &field,
                &name,
                "this endpoint group lists no endpoints",
            ));
        }
        groups.push((EndpointGroup { name, endpoints }, field));
    }
    Ok(groups)
}

/// Reads and checks `--auth-passwords-file` (for `promote --sync-auth`).
pub fn load_auth_passwords(path: &Path) -> Result<AuthPasswords, ConfigError> {
    load_passwords_from("--auth-passwords-file", path)
}

fn load_passwords_from(field: &str, path: &Path) -> Result<AuthPasswords, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        field: field.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    parse_auth_passwords(&text)
        .map_err(|reason| invalid(field, &path.display().to_string(), &reason))
}

/// The passwords file: TOML, one `user = "password"` line per user. The
/// error says what is wrong and how to write it; it never quotes a password.
pub fn parse_auth_passwords(text: &str) -> Result<AuthPasswords, String> {
    const FORMAT: &str = "write one line per user, e.g. app = \"s3cret\" (quote user names with other characters than letters, digits, '-' and '_': \"app.v2\" = \"s3cret\")";
    let table: toml::Table = toml::from_str(text).map_err(|error| {
        // toml's message quotes the offending line, which may hold a password.
        let line = error
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        match line {
            Some(line) => format!("not valid TOML at line {line}; {FORMAT}"),
            None => format!("not valid TOML; {FORMAT}"),
        }
    })?;
    let mut passwords = std::collections::BTreeMap::new();
    for (user, value) in table {
        let Some(password) = value.as_str() else {
            return Err(format!(
                "the value for user {user:?} is a {}, not a quoted string; {FORMAT}",
                value.type_str()
            ));
        };
        if user.is_empty() {
            return Err(format!("a line has an empty user name; {FORMAT}"));
        }
        if password.is_empty() {
            return Err(format!(
                "user {user:?} has an empty password; remove the line (on etcd 3.5+ the user is then created without a password, else it is reported and not created)"
            ));
        }
        passwords.insert(user, password.to_string());
    }
    Ok(AuthPasswords::new(passwords))
}

/// Rejects a duration above its documented bound (see `settings::MAX_*`).
pub(super) fn check_at_most(
    field: &str,
    value: Duration,
    max: Duration,
) -> Result<(), ConfigError> {
    rules::at_most(value, max).map_err(|reason| {
        invalid(
            field,
            &humantime::format_duration(value).to_string(),
            &reason,
        )
    })
}

pub(super) fn cluster_settings(
    flags: ClusterFlags,
    file: FileCluster,
) -> Result<ClusterSettings, ConfigError> {
    let side = flags.side;
    let groups = endpoint_groups(side, &flags, &file)?;

    let cacert = flags.cacert.or(file.cacert);
    let cert = flags.cert.or(file.cert);
    let key = flags.key.or(file.key);
    let p = side.flag_prefix();
    let cert_and_key = both_or_neither(
        (cert, key),
        (format!("--{p}-cert"), format!("--{p}-key")),
        (
            "a private key needs its client certificate; give both or neither",
            "a client certificate needs its private key; give both or neither",
        ),
    )?;
    let tls = (cacert.is_some() || cert_and_key.is_some()).then_some(TlsFiles {
        ca: cacert,
        cert_and_key,
    });

    // Name the place the operator has to edit: the flag, or the file key.
    for (endpoints_field, endpoint) in groups
        .iter()
        .flat_map(|(group, field)| group.endpoints.iter().map(move |e| (field, e)))
    {
        let endpoints_field = endpoints_field.as_str();
        let scheme = check_endpoint(endpoints_field, endpoint)?;
        match (scheme, &tls) {
            (Some(Scheme::Http), Some(_)) => {
                return Err(invalid(
                    endpoints_field,
                    endpoint,
                    &format!(
                        "TLS files are set for the {side} but this endpoint is plain http; use https:// or drop --{p}-cacert/--{p}-cert/--{p}-key",
                        p = side.flag_prefix()
                    ),
                ))
            }
            (Some(Scheme::Https), None) => {
                return Err(invalid(
                    endpoints_field,
                    endpoint,
                    &format!(
                        "an https endpoint needs the CA that signed the server: set --{}-cacert",
                        side.flag_prefix()
                    ),
                ))
            }
            _ => {}
        }
    }
    if let Some(tls) = &tls {
        check_tls_files(side, tls)?;
    }

    let (password, password_file) = match (flags.password.or(file.password), file.password_file) {
        (Some(password), _) => (Some(password), None),
        (None, Some(path)) => (Some(read_password_file(side, &path)?), Some(path)),
        (None, None) => (None, None),
    };
    let user = flags
        .user
        .or(file.user)
        .filter(|user| !user.is_empty() || password.is_none());
    let credentials = both_or_neither(
        (user, password),
        (format!("--{p}-user"), format!("--{p}-password")),
        (
            "a password was given without a user name",
            "a user needs a password (flag, ETCD_SYNCER_*_PASSWORD, or password-file in the config file)",
        ),
    )?
    .map(|(user, password)| Credentials { user, password });

    Ok(ClusterSettings {
        side,
        groups: groups.into_iter().map(|(group, _)| group).collect(),
        tls,
        credentials,
        password_file,
        compression: flags
            .compression
            .or(file.compression)
            .unwrap_or(Compression::default_for(side)),
    })
}

/// Two settings that only work together (a certificate and its key, a user
/// and its password): both, or neither; else the missing one is named.
fn both_or_neither<A, B>(
    (a, b): (Option<A>, Option<B>),
    (a_field, b_field): (String, String),
    (fix_a, fix_b): (&'static str, &'static str),
) -> Result<Option<(A, B)>, ConfigError> {
    match (a, b) {
        (Some(a), Some(b)) => Ok(Some((a, b))),
        (None, None) => Ok(None),
        (None, Some(_)) => Err(missing(a_field, fix_a)),
        (Some(_), None) => Err(missing(b_field, fix_b)),
    }
}

/// A `password-file` (a mounted Secret), trailing newline trimmed; read at
/// start and again whenever it changes.
pub fn read_password_file(side: Side, path: &std::path::Path) -> Result<String, ConfigError> {
    Ok(std::fs::read_to_string(path)
        .map_err(|source| ConfigError::ReadFile {
            field: format!("{}.password-file", side.file_section()),
            path: path.to_path_buf(),
            source,
        })?
        .trim_end_matches(['\n', '\r'])
        .to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

/// An endpoint must be a URI the gRPC channel can dial: `http://` or
/// `https://`, a host, a non-zero port, and nothing after them but an
/// optional `/`. Without a scheme (`host:port`) the client picks one from
/// the TLS settings, so that form is checked as if it had one and `None` is
/// returned for the scheme. Catching e.g. `http://[::1` here turns an endless
/// connect retry into exit code 2.
fn check_endpoint(field: &str, endpoint: &str) -> Result<Option<Scheme>, ConfigError> {
    const FIX: &str = "expected http://host:port or https://host:port, e.g. http://10.0.0.1:2379 or https://[fd00::1]:2379";
    let (scheme, uri) = match endpoint.split_once("://") {
        Some(("http", _)) => (Some(Scheme::Http), endpoint.to_string()),
        Some(("https", _)) => (Some(Scheme::Https), endpoint.to_string()),
        Some((other, _)) => {
            return Err(invalid(
                field,
                endpoint,
                &format!("unknown scheme {other:?}; use http:// or https://"),
            ))
        }
        None => (None, format!("http://{endpoint}")),
    };
    let uri: tonic::transport::Uri = uri.parse().map_err(|error| {
        invalid(
            field,
            endpoint,
            &format!("not a valid URI ({error}); {FIX}"),
        )
    })?;
    let Some(authority) = uri.authority() else {
        return Err(invalid(field, endpoint, &format!("no host; {FIX}")));
    };
    if authority.host().is_empty() || authority.host() == "[]" {
        return Err(invalid(field, endpoint, &format!("no host; {FIX}")));
    }
    if authority.as_str().contains('@') {
        return Err(invalid(
            field,
            endpoint,
            "user info in the URL is not used; give the user with --src-user/--dst-user (or user in the config file)",
        ));
    }
    match uri.port_u16() {
        Some(0) => {
            return Err(invalid(
                field,
                endpoint,
                &format!("port 0 cannot be dialled; {FIX}"),
            ))
        }
        Some(_) => {}
        None if uri.port().is_some() => {
            return Err(invalid(
                field,
                endpoint,
                &format!("the port must be between 1 and 65535; {FIX}"),
            ))
        }
        None => {
            return Err(invalid(
                field,
                endpoint,
                &format!("no port (etcd clients usually use 2379); {FIX}"),
            ))
        }
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid(
            field,
            endpoint,
            &format!("a path or query is not allowed; {FIX}"),
        ));
    }
    Ok(scheme)
}

#[derive(Clone, Copy)]
enum PemKind {
    Certificate,
    PrivateKey,
}

/// Catches the common mistakes (wrong path, key and cert swapped, DER file)
/// at start instead of as an opaque handshake failure later.
/// The TLS files hold what their flags say (a certificate, a private
/// key): checked at start and again when they change on disk.
pub fn check_tls_files(side: Side, tls: &TlsFiles) -> Result<(), ConfigError> {
    let flag = |name: &str| format!("--{}-{}", side.flag_prefix(), name);
    if let Some(ca) = &tls.ca {
        check_pem(&flag("cacert"), ca, PemKind::Certificate)?;
    }
    if let Some((cert, key)) = &tls.cert_and_key {
        check_pem(&flag("cert"), cert, PemKind::Certificate)?;
        check_pem(&flag("key"), key, PemKind::PrivateKey)?;
        check_client_certificate(&flag("cert"), cert, &flag("key"), key)?;
    }
    Ok(())
}

/// The client certificate is valid now and `key` is its private key: a
/// handshake with anything else fails as a bare "transport error".
fn check_client_certificate(
    cert_field: &str,
    cert: &Path,
    key_field: &str,
    key: &Path,
) -> Result<(), ConfigError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let read = |field: &str, path: &Path| {
        std::fs::read(path).map_err(|source| ConfigError::ReadFile {
            field: field.to_string(),
            path: path.to_path_buf(),
            source,
        })
    };
    let shown = cert.display().to_string();
    let cert_der = CertificateDer::pem_slice_iter(&read(cert_field, cert)?)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| invalid(cert_field, &shown, "the file holds no PEM certificate"))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der).map_err(|_| {
        invalid(
            cert_field,
            &shown,
            "the first certificate in the file is not valid X.509 DER; re-issue it",
        )
    })?;
    let now = crate::telemetry::clock::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let validity = parsed.validity();
    if validity.not_after.timestamp() < now {
        return Err(invalid(
            cert_field,
            &shown,
            &format!(
                "the certificate expired at {} (notAfter); point {cert_field} and {key_field} at a renewed pair",
                validity.not_after
            ),
        ));
    }
    if validity.not_before.timestamp() > now {
        return Err(invalid(
            cert_field,
            &shown,
            &format!(
                "the certificate is not valid until {} (notBefore); check this machine's clock or the issuer's",
                validity.not_before
            ),
        ));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key_field, key)?).map_err(|_| {
        invalid(
            key_field,
            &key.display().to_string(),
            "the file holds no PEM private key",
        )
    })?;
    let public = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .ok()
        .and_then(|signing| signing.public_key().map(|spki| spki.as_ref().to_vec()));
    match public {
        Some(public) if public == parsed.tbs_certificate.subject_pki.raw => Ok(()),
        Some(_) => Err(invalid(
            key_field,
            &key.display().to_string(),
            &format!("the key does not match the certificate in {cert_field} ({shown}); give the key the certificate was issued for"),
        )),
        None => Err(invalid(
            key_field,
            &key.display().to_string(),
            "the key's type is not supported (RSA, ECDSA P-256/P-384 or Ed25519 are)",
        )),
    }
}

fn check_pem(field: &str, path: &Path, kind: PemKind) -> Result<(), ConfigError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let bytes = std::fs::read(path).map_err(|source| ConfigError::ReadFile {
        field: field.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    let ok = match kind {
        PemKind::Certificate => CertificateDer::pem_slice_iter(&bytes)
            .next()
            .is_some_and(|c| c.is_ok()),
        PemKind::PrivateKey => PrivateKeyDer::from_pem_slice(&bytes).is_ok(),
    };
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            &path.display().to_string(),
            match kind {
                PemKind::Certificate => "the file holds no PEM certificate (-----BEGIN CERTIFICATE-----); check the path and that cert and key are not swapped",
                PemKind::PrivateKey => "the file holds no PEM private key (-----BEGIN PRIVATE KEY----- or RSA/EC PRIVATE KEY); check the path and that cert and key are not swapped",
            },
        ))
    }
}

fn job_settings(
    name: Option<String>,
    prefix: String,
    dest_prefix: Option<String>,
    write_rate: WriteRateLimit,
    (exclude_prefixes, exclude_field): (Vec<String>, String),
) -> Result<JobSettings, ConfigError> {
    let name = name.unwrap_or_else(|| job_name_from_prefix(&prefix));
    if !is_valid_job_name(&name) {
        return Err(invalid(
            "--job-name",
            &name,
            "use 1-128 characters of letters, digits, '-', '_' or '.'",
        ));
    }
    check_exclude_prefixes(&exclude_field, &prefix, &exclude_prefixes)?;
    let dest_prefix = dest_prefix.unwrap_or_else(|| prefix.clone());
    Ok(JobSettings {
        name,
        prefix,
        dest_prefix,
        write_rate,
        exclude_prefixes,
    })
}

/// `exclude-prefixes` of a job (mirror-plus, check): each inside `prefix`.
/// One outside would silently exclude nothing, one equal to it mirror nothing.
pub fn check_exclude_prefixes(
    field: &str,
    prefix: &str,
    excludes: &[String],
) -> Result<(), ConfigError> {
    match excludes
        .iter()
        .find(|e| !e.starts_with(prefix) || e.len() == prefix.len())
    {
        Some(outside) => Err(invalid(
            field,
            outside,
            &format!(
                "must lie inside the job's prefix {prefix:?} and be longer than it, e.g. {:?}",
                format!("{prefix}local/")
            ),
        )),
        None => Ok(()),
    }
}

fn validate_jobs(
    jobs: &[JobSettings],
    meta_prefix: &str,
    source: &ClusterSettings,
    destination: &ClusterSettings,
) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    for job in jobs {
        if !names.insert(job.name.as_str()) {
            return Err(ConfigError::Conflict {
                fields: format!("jobs named {:?}", job.name),
                reason: "job names must be unique; set a distinct name per job".into(),
            });
        }
        // Data written under the meta prefix would be mistaken for (or clobber)
        // checkpoints and locks. The reverse, the meta prefix inside a job's
        // range (e.g. mirroring "/"), is fine: meta keys are always excluded.
        if job.dest_prefix.starts_with(meta_prefix) {
            return Err(ConfigError::Conflict {
                fields: format!("--dest-prefix {:?} and --meta-prefix {:?}", job.dest_prefix, meta_prefix),
                reason: "the destination prefix lies inside the meta prefix; choose a destination prefix outside it or another --meta-prefix".into(),
            });
        }
        if job.prefix.starts_with(meta_prefix) {
            return Err(ConfigError::Conflict {
                fields: format!("--prefix {:?} and --meta-prefix {:?}", job.prefix, meta_prefix),
                reason: "the meta prefix is never copied, so this job would mirror nothing; choose a prefix outside it".into(),
            });
        }
    }
    for (i, a) in jobs.iter().enumerate() {
        for b in &jobs[i + 1..] {
            if prefixes_overlap(a.prefix.as_bytes(), b.prefix.as_bytes()) {
                return Err(ConfigError::Conflict {
                    fields: format!(
                        "job {:?} prefix {:?} and job {:?} prefix {:?}",
                        a.name, a.prefix, b.name, b.prefix
                    ),
                    reason:
                        "job prefixes overlap, so keys would be copied twice; make them disjoint"
                            .into(),
                });
            }
            if prefixes_overlap(a.dest_prefix.as_bytes(), b.dest_prefix.as_bytes()) {
                return Err(ConfigError::Conflict {
                    fields: format!(
                        "job {:?} dest prefix {:?} and job {:?} dest prefix {:?}",
                        a.name, a.dest_prefix, b.name, b.dest_prefix
                    ),
                    reason: "destination prefixes overlap, so one job's full sync would delete the other's keys; make them disjoint".into(),
                });
            }
        }
    }
    if same_endpoints(source, destination) {
        for job in jobs {
            if prefixes_overlap(job.prefix.as_bytes(), job.dest_prefix.as_bytes()) {
                return Err(loop_error(job));
            }
        }
    }
    Ok(())
}

pub fn loop_error(job: &JobSettings) -> ConfigError {
    ConfigError::Conflict {
        fields: format!("job {:?}: --prefix {:?} and --dest-prefix {:?}", job.name, job.prefix, job.dest_prefix),
        reason: "source and destination are the same cluster and the prefixes overlap, which would copy the mirror into itself; use disjoint prefixes or another destination".into(),
    }
}

fn normalize_endpoint(endpoint: &str) -> String {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    rest.trim_end_matches('/').replace("localhost", "127.0.0.1")
}

/// Any endpoint of any group in common.
fn same_endpoints(a: &ClusterSettings, b: &ClusterSettings) -> bool {
    let all = |c: &ClusterSettings| -> HashSet<String> {
        c.groups
            .iter()
            .flat_map(|g| g.endpoints.iter().map(|e| normalize_endpoint(e)))
            .collect()
    };
    !all(a).is_disjoint(&all(b))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::args::{Cli, Command};

    fn args(extra: &[&str]) -> Result<Settings, ConfigError> {
        let mut argv = vec!["etcd-syncer", "mirror-plus"];
        argv.extend_from_slice(extra);
        let cli = Cli::try_parse_from(argv).expect("flags parse");
        let Command::MirrorPlus(args) = cli.command else {
            panic!("parsed as another command")
        };
        args.into_settings()
    }

    const BASE: [&str; 6] = [
        "--src-endpoints",
        "http://127.0.0.1:1",
        "--dst-endpoints",
        "http://127.0.0.1:2",
        "--prefix",
        "/app/",
    ];

    fn with_base(extra: &[&str]) -> Result<Settings, ConfigError> {
        let mut all = BASE.to_vec();
        all.extend_from_slice(extra);
        args(&all)
    }

    #[test]
    fn defaults() {
        let settings = with_base(&[]).unwrap();
        assert_eq!(settings.jobs[0].name, "app");
        assert_eq!(settings.jobs[0].dest_prefix, "/app/");
        assert_eq!(settings.limits.max_ops, 128);
        assert_eq!(settings.limits.max_bytes, 1024 * 1024);
        assert_eq!(settings.meta_prefix, DEFAULT_META_PREFIX);
        assert_eq!(settings.max_prune_ratio, 0.5);
    }

    #[test]
    fn dest_prefix_rewrites() {
        assert_eq!(
            with_base(&["--dest-prefix", "/copy/"]).unwrap().jobs[0].dest_prefix,
            "/copy/"
        );
        assert_eq!(
            with_base(&["--no-dest-prefix"]).unwrap().jobs[0].dest_prefix,
            ""
        );
    }

    #[test]
    fn sizes_parse_in_human_units() {
        let settings = with_base(&["--max-txn-bytes", "512KiB"]).unwrap();
        assert_eq!(settings.limits.max_bytes, 512 * 1024);
    }

    fn error_text(result: Result<Settings, ConfigError>) -> String {
        result.expect_err("must be rejected").to_string()
    }

    /// `--revision-exact` is one whole-keyspace job; everything that
    /// leaves keys out, renames them or writes on its own is refused,
    /// naming the field.
    #[test]
    fn revision_exact_is_one_unchanged_whole_keyspace_job() {
        let base = [
            "--src-endpoints",
            "http://s:1",
            "--dst-endpoints",
            "http://d:1",
            "--revision-exact",
        ];
        let exact = |extra: &[&str]| {
            let mut argv = base.to_vec();
            argv.extend_from_slice(extra);
            args(&argv)
        };
        let settings = exact(&[]).expect("no --prefix needed");
        assert!(settings.revision_exact);
        assert_eq!(settings.jobs.len(), 1);
        assert_eq!(
            (
                settings.jobs[0].prefix.as_str(),
                settings.jobs[0].dest_prefix.as_str()
            ),
            ("", "")
        );
        assert!(exact(&["--prefix", ""]).is_ok());
        for (extra, field) in [
            (&["--prefix", "/a/"][..], "--prefix"),
            (&["--dest-prefix", "/x/"][..], "--dest-prefix"),
            (
                &["--prefix", "", "--exclude-prefix", "/b/"][..],
                "--exclude-prefix",
            ),
            (&["--leases", "strip"][..], "--leases strip"),
            (&["--reset-last-synced-rev"][..], "--reset-last-synced-rev"),
            (
                &["--check-repair", "--check-interval", "1m"][..],
                "--check-repair",
            ),
        ] {
            let text = error_text(exact(extra));
            assert!(
                text.contains("--revision-exact") && text.contains(field),
                "{extra:?}: {text}"
            );
        }
        // Several [[jobs]] in the file, with the flag in the file too.
        let cli = Cli::try_parse_from(["etcd-syncer", "mirror-plus"]).expect("flags parse");
        let Command::MirrorPlus(flags) = cli.command else {
            panic!("parsed as another command")
        };
        let file = r#"
            revision-exact = true
            [source]
            endpoints = ["http://s:1"]
            [destination]
            endpoints = ["http://d:1"]
            [[jobs]]
            prefix = "/a/"
            [[jobs]]
            prefix = "/b/"
        "#;
        let text = error_text(flags.merge(toml::from_str(file).expect("toml")));
        assert!(text.contains("several [[jobs]]"), "{text}");
        // Without the flag, none of it applies.
        assert!(!with_base(&[]).unwrap().revision_exact);
    }

    #[test]
    fn errors_name_the_field() {
        assert!(
            error_text(args(&["--dst-endpoints", "http://h:1", "--prefix", "/a/"]))
                .contains("--src-endpoints")
        );
        assert!(error_text(with_base(&["--max-txn-ops", "0"])).contains("--max-txn-ops"));
        assert!(error_text(with_base(&["--max-prune-ratio", "1.5"])).contains("--max-prune-ratio"));
        assert!(error_text(with_base(&["--job-name", "a/b"])).contains("--job-name"));
        assert!(
            error_text(with_base(&["--dest-prefix", "/-etcd-syncer-meta-/x/"]))
                .contains("meta prefix")
        );
        assert!(error_text(with_base(&["--src-cert", "/nonexistent"])).contains("--src-key"));
        assert!(error_text(with_base(&["--src-user", "root"])).contains("--src-password"));
        assert!(error_text(with_base(&["--dst-cacert", "/nonexistent.pem"]))
            .contains("--dst-endpoints"));
    }

    #[test]
    fn https_needs_a_ca_and_the_ca_must_be_pem() {
        let text = error_text(args(&[
            "--src-endpoints",
            "https://127.0.0.1:1",
            "--dst-endpoints",
            "http://127.0.0.1:2",
            "--prefix",
            "/a/",
        ]));
        assert!(text.contains("--src-cacert"), "{text}");
        let dir = tempfile::tempdir().unwrap();
        let bogus = dir.path().join("ca.pem");
        std::fs::write(&bogus, "not a certificate").unwrap();
        let text = error_text(args(&[
            "--src-endpoints",
            "https://127.0.0.1:1",
            "--src-cacert",
            bogus.to_str().unwrap(),
            "--dst-endpoints",
            "http://127.0.0.1:2",
            "--prefix",
            "/a/",
        ]));
        assert!(
            text.contains("--src-cacert") && text.contains("PEM"),
            "{text}"
        );
    }

    #[test]
    fn loops_are_rejected() {
        let text = error_text(args(&[
            "--src-endpoints",
            "http://localhost:5",
            "--dst-endpoints",
            "http://127.0.0.1:5",
            "--prefix",
            "/a/",
        ]));
        assert!(text.contains("same cluster"), "{text}");
        // Same cluster with disjoint prefixes is a legitimate copy.
        args(&[
            "--src-endpoints",
            "http://127.0.0.1:5",
            "--dst-endpoints",
            "http://127.0.0.1:5",
            "--prefix",
            "/a/",
            "--dest-prefix",
            "/b/",
        ])
        .unwrap();
    }

    /// A config file with both clusters' endpoints, then `rest`.
    fn file_with_endpoints(rest: &str) -> Result<Settings, ConfigError> {
        file(&format!(
            "[source]\nendpoints = [\"http://127.0.0.1:1\"]\n[destination]\nendpoints = [\"http://127.0.0.1:2\"]\n{rest}"
        ))
    }

    fn file(text: &str) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("syncer.toml");
        std::fs::write(&path, text).unwrap();
        args(&["--config", path.to_str().unwrap()])
    }

    #[test]
    fn file_with_jobs() {
        let settings = file(
            r#"
            max-txn-ops = 64
            progress-interval = "2s"
            [source]
            endpoints = ["http://127.0.0.1:1"]
            [destination]
            endpoints = ["http://127.0.0.1:2"]
            [[jobs]]
            prefix = "/a/"
            [[jobs]]
            name = "bee"
            prefix = "/b/"
            dest-prefix = "/bb/"
            "#,
        )
        .unwrap();
        assert_eq!(settings.jobs.len(), 2);
        assert_eq!(settings.jobs[1].name, "bee");
        assert_eq!(settings.limits.max_ops, 64);
        assert_eq!(settings.tuning.progress_interval, Duration::from_secs(2));
    }

    #[test]
    fn exclude_prefixes_lie_inside_the_job_prefix() {
        let settings = with_base(&["--exclude-prefix", "/app/a/,/app/b/"]).unwrap();
        assert_eq!(settings.jobs[0].exclude_prefixes, ["/app/a/", "/app/b/"]);
        for outside in ["/other/", "/app/"] {
            let text = error_text(with_base(&["--exclude-prefix", outside]));
            assert!(
                text.contains("--exclude-prefix") && text.contains("inside the job's prefix"),
                "{text}"
            );
        }
        let text = error_text(file_with_endpoints(
            r#"
            [[jobs]]
            prefix = "/a/"
            exclude-prefixes = ["/a/x/"]
            [[jobs]]
            prefix = "/b/"
            exclude-prefixes = ["/a/y/"]
            "#,
        ));
        assert!(
            text.contains("jobs[1].exclude-prefixes (config file)"),
            "{text}"
        );
    }

    #[test]
    fn write_rate_limits_per_job() {
        assert_eq!(
            with_base(&[]).unwrap().jobs[0].write_rate,
            WriteRateLimit::default()
        );
        let limited = with_base(&[
            "--max-write-ops-per-second",
            "500",
            "--max-write-bytes-per-second",
            "2MiB",
        ])
        .unwrap();
        assert_eq!(
            limited.jobs[0].write_rate,
            WriteRateLimit {
                ops_per_second: 500,
                bytes_per_second: 2 * 1024 * 1024,
            }
        );
        let settings = file_with_endpoints(
            r#"
            [[jobs]]
            prefix = "/a/"
            max-write-ops-per-second = 100
            [[jobs]]
            prefix = "/b/"
            max-write-bytes-per-second = "1KiB"
            "#,
        )
        .unwrap();
        assert_eq!(settings.jobs[0].write_rate.ops_per_second, 100);
        assert_eq!(settings.jobs[0].write_rate.bytes_per_second, 0);
        assert_eq!(settings.jobs[1].write_rate.bytes_per_second, 1024);
        // The single-job flags need --prefix, like --dest-prefix.
        let text = error_text(args(&[
            "--src-endpoints",
            "http://127.0.0.1:1",
            "--dst-endpoints",
            "http://127.0.0.1:2",
            "--max-write-ops-per-second",
            "5",
        ]));
        assert!(text.contains("--max-write-*-per-second"), "{text}");
    }

    #[test]
    fn file_errors() {
        let unknown = error_text(file(
            "[source]\nendpoints = [\"http://h:1\"]\nendpoint = 1\n",
        ));
        assert!(
            unknown.contains("unknown field") && unknown.contains("endpoint"),
            "{unknown}"
        );
        let overlap = error_text(file(
            "[source]\nendpoints=[\"http://h:1\"]\n[destination]\nendpoints=[\"http://h:2\"]\n[[jobs]]\nprefix=\"/a/\"\n[[jobs]]\nprefix=\"/a/b/\"\n",
        ));
        assert!(overlap.contains("prefixes overlap"), "{overlap}");
        let dest_overlap = error_text(file(
            "[source]\nendpoints=[\"http://h:1\"]\n[destination]\nendpoints=[\"http://h:2\"]\n[[jobs]]\nprefix=\"/a/\"\ndest-prefix=\"/x/\"\n[[jobs]]\nprefix=\"/b/\"\ndest-prefix=\"/x/y/\"\n",
        ));
        assert!(
            dest_overlap.contains("destination prefixes overlap"),
            "{dest_overlap}"
        );
        let bad_duration = error_text(file("progress-interval = \"soon\"\n"));
        assert!(bad_duration.contains("progress-interval"), "{bad_duration}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("syncer.toml");
        std::fs::write(
            &path,
            "max-txn-ops = 64\n[source]\nendpoints=[\"http://h:1\"]\n[destination]\nendpoints=[\"http://h:2\"]\n[[jobs]]\nprefix=\"/a/\"\n",
        )
        .unwrap();
        let settings = args(&[
            "--config",
            path.to_str().unwrap(),
            "--max-txn-ops",
            "32",
            "--prefix",
            "/z/",
        ])
        .unwrap();
        assert_eq!(settings.limits.max_ops, 32);
        assert_eq!(settings.jobs.len(), 1);
        assert_eq!(settings.jobs[0].prefix, "/z/");
    }

    #[test]
    fn huge_durations_are_config_errors_not_panics() {
        // 2^63 s: used to overflow `progress_interval * 2` and exit 101.
        let text = error_text(with_base(&[
            "--progress-interval",
            "9223372036854775808s",
            "--watch-idle-timeout",
            "18446744073709551615s",
        ]));
        assert!(
            text.contains("--progress-interval") && text.contains("at most 1h"),
            "{text}"
        );
        let text = error_text(with_base(&["--progress-interval", "9223372036854775807s"]));
        assert!(text.contains("--progress-interval"), "{text}");
        for (flag, value) in [
            ("--watch-idle-timeout", "25h"),
            ("--request-timeout", "2h"),
            ("--pipeline-spacing", "2s"),
            ("--lock-ttl", "2h"),
            ("--rebalance-interval", "25h"),
            ("--check-interval", "8days"),
            ("--liveness-timeout", "25h"),
        ] {
            let text = error_text(with_base(&[flag, value]));
            assert!(
                text.contains(flag) && text.contains("at most"),
                "{flag}: {text}"
            );
        }
        // The bounds themselves are accepted.
        with_base(&[
            "--progress-interval",
            "1h",
            "--watch-idle-timeout",
            "24h",
            "--liveness-timeout",
            "24h",
            "--request-timeout",
            "1h",
            "--pipeline-spacing",
            "1s",
            "--lock-ttl",
            "1h",
            "--rebalance-interval",
            "24h",
            "--check-interval",
            "7days",
        ])
        .unwrap();
    }

    #[test]
    fn lock_ttl_is_whole_seconds_in_range() {
        for bad in ["1s", "1500ms", "3601s"] {
            let text = error_text(with_base(&["--lock-ttl", bad]));
            assert!(text.contains("--lock-ttl"), "{bad}: {text}");
        }
        let settings = with_base(&["--lock-ttl", "2s", "--rebalance-interval", "2s"]).unwrap();
        assert_eq!(settings.lock_ttl, Duration::from_secs(2));
    }

    /// L8: a grace below 5 s is refused (a failover at the default lock
    /// TTL let mirrored leases expire and the standby dropped live keys);
    /// 5 s and 1 h are the bounds, and the file's key is named too.
    #[test]
    fn lease_grace_is_whole_seconds_from_5s_to_1h() {
        for bad in ["0s", "4s", "5500ms", "3601s"] {
            let text = error_text(with_base(&["--lease-grace", bad]));
            assert!(
                text.contains("--lease-grace") && text.contains("from 5s to 1h"),
                "{bad}: {text}"
            );
        }
        for good in ["5s", "1h"] {
            let settings = with_base(&["--lease-grace", good]).unwrap();
            assert_eq!(
                settings.leases.grace,
                humantime::parse_duration(good).unwrap()
            );
        }
        let text = error_text(file(
            "lease-grace = \"1s\"\n[source]\nendpoints=[\"http://h:1\"]\n[destination]\nendpoints=[\"http://h:2\"]\n[[jobs]]\nprefix=\"/a/\"\n",
        ));
        assert!(text.contains("lease-grace (config file)"), "{text}");
    }

    #[test]
    fn file_durations_are_bounded_and_name_the_key() {
        let text = error_text(file(
            "progress-interval = \"100years\"\n[source]\nendpoints=[\"http://h:1\"]\n[destination]\nendpoints=[\"http://h:2\"]\n[[jobs]]\nprefix=\"/a/\"\n",
        ));
        assert!(text.contains("progress-interval (config file)"), "{text}");
    }

    #[test]
    fn subcommand_durations_are_bounded() {
        let parse = |argv: &[&str]| Cli::try_parse_from(argv).expect("flags parse").command;
        let Command::Status(status) = parse(&[
            "etcd-syncer",
            "status",
            "--dst-endpoints",
            "http://h:1",
            "--request-timeout",
            "9223372036854775808s",
        ]) else {
            panic!("not status")
        };
        assert!(status
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--request-timeout"));
        let Command::Promote(promote) = parse(&[
            "etcd-syncer",
            "promote",
            "--dst-endpoints",
            "http://h:1",
            "--job-name",
            "a",
            "--wait-timeout",
            "48h",
        ]) else {
            panic!("not promote")
        };
        assert!(promote
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--wait-timeout"));
        let Command::Check(check) = parse(&[
            "etcd-syncer",
            "check",
            "--src-endpoints",
            "http://h:1",
            "--dst-endpoints",
            "http://h:2",
            "--prefix",
            "/a/",
            "--request-timeout",
            "0s",
        ]) else {
            panic!("not check")
        };
        assert!(check
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--request-timeout"));
        let Command::Reset(reset) = parse(&[
            "etcd-syncer",
            "reset",
            "--dst-endpoints",
            "http://h:1",
            "--job-name",
            "a",
            "--request-timeout",
            "2h",
        ]) else {
            panic!("not reset")
        };
        assert!(reset
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("--request-timeout"));
    }

    #[test]
    fn endpoints_must_be_dialable_uris() {
        for bad in [
            "http://[::1",
            "http://h",
            "http://h:0",
            "http://h:65536",
            "http://:1",
            "http://h:1/path",
            "http://h:1?x=1",
            "http://user@h:1",
            "ftp://h:1",
            "h",
            "[::1",
        ] {
            let text = error_text(args(&[
                "--src-endpoints",
                bad,
                "--dst-endpoints",
                "http://127.0.0.1:2",
                "--prefix",
                "/a/",
            ]));
            assert!(text.contains("--src-endpoints"), "{bad}: {text}");
            let text = error_text(args(&[
                "--src-endpoints",
                "http://127.0.0.1:1",
                "--dst-endpoints",
                bad,
                "--prefix",
                "/a/",
            ]));
            assert!(text.contains("--dst-endpoints"), "{bad}: {text}");
        }
        for good in [
            "http://127.0.0.1:4001",
            "http://[::1]:4001",
            "http://etcd-0.etcd:4001/",
            "127.0.0.1:4001",
        ] {
            args(&[
                "--src-endpoints",
                good,
                "--dst-endpoints",
                "http://127.0.0.1:2",
                "--prefix",
                "/a/",
            ])
            .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        let text = error_text(file(
            "[source]\nendpoints=[\"http://[::1\"]\n[destination]\nendpoints=[\"http://h:2\"]\n[[jobs]]\nprefix=\"/a/\"\n",
        ));
        assert!(text.contains("source.endpoints (config file)"), "{text}");
    }

    mod never_panics {
        use proptest::prelude::*;

        use super::*;

        const DURATION_FLAGS: [&str; 8] = [
            "--progress-interval",
            "--watch-idle-timeout",
            "--request-timeout",
            "--pipeline-spacing",
            "--lock-ttl",
            "--rebalance-interval",
            "--check-interval",
            "--liveness-timeout",
        ];

        fn duration_text() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[0-9]{1,22}(ns|us|ms|s|m|h|d|w|M|y)?",
                "([0-9]{1,20}(ns|ms|s|m|h|d|y) ?){1,4}",
                any::<u64>().prop_map(|n| format!("{n}s")),
                any::<u64>().prop_map(|n| format!("{n}ns")),
            ]
        }

        fn endpoint_text() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "(https?|ftp|)(://)?\\[?[a-z0-9:.\\[\\]@%-]{0,20}\\]?(:[0-9]{0,6})?(/[a-z?=]{0,5})?",
                (any::<u32>(), "(http|https)").prop_map(|(port, s)| format!("{s}://h:{port}")),
            ]
        }

        /// Clap may reject the text; whatever it accepts must come back from
        /// validation as Ok or a ConfigError, never a panic.
        fn validate(extra: &[String]) {
            let mut argv = vec!["etcd-syncer".to_string(), "mirror-plus".to_string()];
            argv.extend(extra.iter().cloned());
            if let Ok(cli) = Cli::try_parse_from(&argv) {
                let Command::MirrorPlus(args) = cli.command else {
                    panic!("parsed as another command")
                };
                let _ = args.into_settings();
            }
        }

        proptest! {
            #[test]
            fn arbitrary_durations(
                flag in 0..DURATION_FLAGS.len(),
                value in duration_text(),
                second in duration_text(),
            ) {
                let mut extra: Vec<String> = BASE.iter().map(|s| s.to_string()).collect();
                extra.push(format!("{}={value}", DURATION_FLAGS[flag]));
                let next = DURATION_FLAGS[(flag + 1) % DURATION_FLAGS.len()];
                extra.push(format!("{next}={second}"));
                validate(&extra);
            }

            #[test]
            fn arbitrary_duration_values(
                values in proptest::collection::vec((any::<u64>(), prop_oneof![Just(0u32), 0u32..1_000_000_000]), 8),
            ) {
                // Straight into the merge, past humantime's own limits.
                let d = |i: usize| Some(Duration::new(values[i].0, values[i].1));
                let cluster = |endpoint: &str| FileCluster {
                    endpoints: vec![endpoint.to_string()],
                    ..FileCluster::default()
                };
                let args = MirrorArgs {
                    prefix: Some("/a/".into()),
                    ..MirrorArgs::default()
                };
                let file = FileConfig {
                    source: Some(cluster("http://127.0.0.1:1")),
                    destination: Some(cluster("http://127.0.0.1:2")),
                    progress_interval: d(0),
                    watch_idle_timeout: d(1),
                    request_timeout: d(2),
                    pipeline_spacing: d(3),
                    lock_ttl: d(4),
                    rebalance_interval: d(5),
                    check_interval: d(6),
                    liveness_timeout: d(7),
                    ..FileConfig::default()
                };
                let _ = args.merge(file);
            }

            #[test]
            fn arbitrary_endpoints(src in endpoint_text(), dst in endpoint_text()) {
                validate(&[
                    format!("--src-endpoints={src}"),
                    format!("--dst-endpoints={dst}"),
                    "--prefix=/a/".to_string(),
                ]);
            }
        }
    }
    fn with_file(text: &str, extra: &[&str]) -> Result<Settings, ConfigError> {
        let cli = Cli::try_parse_from(
            ["etcd-syncer", "mirror-plus", "--prefix", "/app/"]
                .iter()
                .chain(extra),
        )
        .expect("flags parse");
        let Command::MirrorPlus(args) = cli.command else {
            panic!("parsed as another command")
        };
        args.merge(toml::from_str(text).expect("toml"))
    }

    /// The source crosses the WAN (auto), the destination is near (off);
    /// a flag wins over the file; a bad value names the flag and the
    /// allowed values (clap's usage error, exit 2), or the file key.
    #[test]
    fn compression_per_side() {
        let endpoints = [
            "--src-endpoints",
            "http://127.0.0.1:1",
            "--dst-endpoints",
            "http://127.0.0.1:2",
        ];
        let settings = with_file("", &endpoints).unwrap();
        assert_eq!(settings.source.compression, Compression::Auto);
        assert_eq!(settings.destination.compression, Compression::Off);

        let flags = [
            &endpoints[..],
            &["--src-compression", "off", "--dst-compression", "gzip"],
        ]
        .concat();
        let settings = with_file("", &flags).unwrap();
        assert_eq!(settings.source.compression, Compression::Off);
        assert_eq!(settings.destination.compression, Compression::Gzip);

        let file = "[source]\nendpoints = [\"http://127.0.0.1:1\"]\ncompression = \"gzip\"\n\
                    [destination]\nendpoints = [\"http://127.0.0.1:2\"]\ncompression = \"auto\"\n";
        let settings = with_file(file, &[]).unwrap();
        assert_eq!(settings.source.compression, Compression::Gzip);
        assert_eq!(settings.destination.compression, Compression::Auto);
        let settings = with_file(file, &["--src-compression", "off"]).unwrap();
        assert_eq!(settings.source.compression, Compression::Off);

        let error =
            Cli::try_parse_from(["etcd-syncer", "mirror-plus", "--src-compression", "zstd"])
                .expect_err("not a compression");
        assert_eq!(error.exit_code(), 2);
        let text = error.to_string();
        assert!(text.contains("--src-compression"), "{text}");
        assert!(text.contains("auto, gzip, off"), "{text}");

        let error = toml::from_str::<FileConfig>("[source]\ncompression = \"zstd\"\n")
            .expect_err("not a compression")
            .to_string();
        assert!(error.contains("compression"), "{error}");
        assert!(
            error.contains("`auto`, `gzip`, `off`") || error.contains("auto"),
            "{error}"
        );
    }

    #[test]
    fn endpoint_groups_from_flags_and_file() {
        let settings = args(&[
            "--src-endpoint-group",
            "private=http://10.0.0.1:2379,http://10.0.0.2:2379",
            "--src-endpoint-group",
            "public=http://1.2.3.4:2379",
            "--dst-endpoints",
            "http://127.0.0.1:2",
            "--prefix",
            "/app/",
        ])
        .unwrap();
        let names: Vec<&str> = settings
            .source
            .groups
            .iter()
            .map(|g| g.name.as_str())
            .collect();
        assert_eq!(names, ["private", "public"]);
        assert_eq!(
            settings.source.endpoints(),
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(settings.destination.groups[0].name, DEFAULT_GROUP);
        assert_eq!(settings.failover, FailoverSettings::default());

        let file = r#"
            endpoint-failover-after = 2
            endpoint-failback-after = "10s"
            endpoint-check-interval = "1s"
            [source]
            endpoints = ["http://127.0.0.1:1"]
            [[destination.endpoint-groups]]
            name = "line"
            endpoints = ["http://127.0.0.1:2"]
            [[destination.endpoint-groups]]
            name = "internet"
            endpoints = ["http://127.0.0.1:3"]
        "#;
        let settings = with_file(file, &[]).unwrap();
        assert_eq!(settings.destination.groups.len(), 2);
        assert_eq!(
            settings.destination.groups[1].endpoints,
            ["http://127.0.0.1:3"]
        );
        assert_eq!(
            settings.failover,
            FailoverSettings {
                check_interval: Duration::from_secs(1),
                failover_after: 2,
                failback_after: Duration::from_secs(10),
            }
        );
        // A flag replaces the file's groups.
        let settings = with_file(file, &["--dst-endpoints", "http://127.0.0.1:9"]).unwrap();
        assert_eq!(settings.destination.groups.len(), 1);
    }

    #[test]
    fn endpoint_group_errors_name_the_field_and_the_fix() {
        let cases: [(&[&str], &str); 5] = [
            (&["--src-endpoint-group", "nourls"], "write NAME=URL"),
            (
                &[
                    "--src-endpoint-group",
                    "a=http://h:1",
                    "--src-endpoint-group",
                    "a=http://h:2",
                ],
                "its own name",
            ),
            (
                &["--src-endpoint-group", "a b=http://h:1"],
                "letters, digits",
            ),
            (&["--src-endpoint-group", "a="], "lists no endpoints"),
            (
                &[
                    "--src-endpoint-group",
                    "a=http://h:1",
                    "--src-endpoints",
                    "http://h:2",
                ],
                "not both",
            ),
        ];
        for (flags, fragment) in cases {
            let mut all = flags.to_vec();
            all.extend(["--dst-endpoints", "http://127.0.0.1:2", "--prefix", "/app/"]);
            let text = error_text(args(&all));
            assert!(
                text.contains("--src-endpoint") && text.contains(fragment),
                "{flags:?}: {text}"
            );
        }
        let text = error_text(with_file(
            "[source]\nendpoints = [\"http://h:1\"]\n[[source.endpoint-groups]]\nname = \"a\"\nendpoints = [\"http://h:2\"]\n",
            &["--dst-endpoints", "http://127.0.0.1:2"],
        ));
        assert!(
            text.contains("source.endpoints and source.endpoint-groups"),
            "{text}"
        );
        let text = error_text(with_file(
            "[[source.endpoint-groups]]\nname = \"a\"\nendpoints = [\"ftp://h:2\"]\n",
            &["--dst-endpoints", "http://127.0.0.1:2"],
        ));
        assert!(
            text.contains("source.endpoint-groups[0].endpoints (config file)"),
            "{text}"
        );
        for (flag, value, fragment) in [
            ("--endpoint-failover-after", "0", "at least 1"),
            ("--endpoint-check-interval", "10ms", "at least 100ms"),
            ("--endpoint-failback-after", "2d", "at most"),
        ] {
            let text = error_text(with_base(&[flag, value]));
            assert!(text.contains(flag) && text.contains(fragment), "{text}");
        }
    }

    #[test]
    fn the_same_cluster_check_sees_every_group() {
        let text = error_text(args(&[
            "--src-endpoint-group",
            "a=http://127.0.0.1:1",
            "--src-endpoint-group",
            "b=http://127.0.0.1:2",
            "--dst-endpoints",
            "http://127.0.0.1:2",
            "--prefix",
            "/app/",
        ]));
        assert!(text.contains("same cluster"), "{text}");
    }
}

#[cfg(test)]
mod auth_tests {
    use super::*;
    use clap::Parser;

    /// `mirror-plus` with both sides, `--prefix /app/` and `extra`.
    fn mirror_args(extra: &[&str]) -> MirrorArgs {
        let mut argv = vec![
            "etcd-syncer",
            "mirror-plus",
            "--src-endpoints",
            "http://127.0.0.1:1",
            "--dst-endpoints",
            "http://127.0.0.1:2",
            "--prefix",
            "/app/",
        ];
        argv.extend_from_slice(extra);
        let cli = crate::config::args::Cli::try_parse_from(argv).expect("flags parse");
        match cli.command {
            crate::config::args::Command::MirrorPlus(args) => *args,
            _ => unreachable!("mirror-plus"),
        }
    }

    fn mirror(extra: &[&str]) -> Result<Settings, ConfigError> {
        mirror_args(extra).into_settings()
    }

    fn passwords_file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), text).expect("write");
        file
    }

    #[test]
    fn the_passwords_file_is_toml_user_lines() {
        let parsed = parse_auth_passwords("app = \"s3cret\"\n\"app.v2\" = \"x y\"\n").unwrap();
        assert_eq!(parsed.get("app"), Some("s3cret"));
        assert_eq!(parsed.get("app.v2"), Some("x y"));
        assert_eq!(parsed.get("other"), None);
        assert_eq!(parsed.len(), 2);
        assert!(parse_auth_passwords("").unwrap().is_empty());
        // Debug shows names only.
        assert!(!format!("{parsed:?}").contains("s3cret"));
    }

    #[test]
    fn passwords_file_errors_say_how_to_fix_it_and_never_quote_a_password() {
        let missing_quotes = parse_auth_passwords("app = hunter2\n").unwrap_err();
        assert!(missing_quotes.contains("line 1"), "{missing_quotes}");
        assert!(
            missing_quotes.contains("app = \"s3cret\""),
            "{missing_quotes}"
        );
        assert!(!missing_quotes.contains("hunter2"), "{missing_quotes}");
        let number = parse_auth_passwords("app = 12345\n").unwrap_err();
        assert!(number.contains("not a quoted string"), "{number}");
        assert!(!number.contains("12345"));
        let empty = parse_auth_passwords("app = \"\"\n").unwrap_err();
        assert!(empty.contains("empty password"), "{empty}");
        let table = parse_auth_passwords("[app]\npassword = \"x\"\n").unwrap_err();
        assert!(table.contains("not a quoted string"), "{table}");
    }

    #[test]
    fn sync_auth_settings_and_their_errors() {
        let off = mirror(&[]).unwrap();
        assert!(!off.auth.enabled);
        assert_eq!(off.auth.interval, DEFAULT_AUTH_SYNC_INTERVAL);

        let file = passwords_file("app = \"s3cret\"\n");
        let path = file.path().to_str().unwrap();
        let on = mirror(&[
            "--sync-auth",
            "--auth-sync-interval",
            "2s",
            "--auth-passwords-file",
            path,
        ])
        .unwrap();
        assert!(on.auth.enabled);
        assert_eq!(on.auth.interval, Duration::from_secs(2));
        assert_eq!(on.auth.passwords.get("app"), Some("s3cret"));

        let bad = passwords_file("app = hunter2\n");
        let error = mirror(&[
            "--sync-auth",
            "--auth-passwords-file",
            bad.path().to_str().unwrap(),
        ])
        .unwrap_err()
        .to_string();
        assert!(error.contains("--auth-passwords-file"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");

        let error = mirror(&["--auth-passwords-file", path])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--sync-auth"), "{error}");
        let error = mirror(&["--sync-auth", "--auth-passwords-file", "/nonexistent"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--auth-passwords-file"), "{error}");

        for (interval, fragment) in [("0s", "at least 1s"), ("30d", "at most")] {
            let error = mirror(&["--sync-auth", "--auth-sync-interval", interval])
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("--auth-sync-interval") && error.contains(fragment),
                "{error}"
            );
        }
    }

    #[test]
    fn sync_auth_from_the_config_file_names_its_keys() {
        let file = passwords_file("app = \"s3cret\"\n");
        let config: FileConfig = toml::from_str(&format!(
            "sync-auth = true\nauth-sync-interval = \"5m\"\nauth-passwords-file = {:?}\n",
            file.path().to_str().unwrap()
        ))
        .unwrap();
        let settings = mirror_args(&[]).merge(config).unwrap().auth;
        assert!(settings.enabled);
        assert_eq!(settings.interval, Duration::from_secs(300));
        assert_eq!(settings.passwords.get("app"), Some("s3cret"));
        let config: FileConfig =
            toml::from_str("sync-auth = true\nauth-sync-interval = \"0s\"\n").unwrap();
        let error = mirror_args(&[]).merge(config).unwrap_err().to_string();
        assert!(
            error.contains("auth-sync-interval (config file)"),
            "{error}"
        );
    }
}

#[cfg(test)]
mod certificate_tests {
    use super::*;
    use std::path::PathBuf;

    /// A key pair and a certificate for it, valid over `[not_before, not_after]`.
    fn issue(dir: &Path, name: &str, years: (i32, i32)) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.not_before = rcgen::date_time_ymd(years.0, 1, 1);
        params.not_after = rcgen::date_time_ymd(years.1, 1, 1);
        let cert = params.self_signed(&key).expect("cert");
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    fn check(cert: &Path, key: &Path) -> Result<(), String> {
        let tls = TlsFiles {
            ca: None,
            cert_and_key: Some((cert.to_path_buf(), key.to_path_buf())),
        };
        check_tls_files(Side::Source, &tls).map_err(|e| e.to_string())
    }

    /// O5: an expired (or not yet valid) client certificate, or a key that
    /// is not the certificate's, is a configuration error naming the field
    /// and the reason, not a "transport error" at the first request.
    #[test]
    fn client_certificates_must_be_valid_now_and_match_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let (good, good_key) = issue(dir.path(), "good", (2020, 2100));
        let (expired, expired_key) = issue(dir.path(), "expired", (2020, 2021));
        let (future, future_key) = issue(dir.path(), "future", (2090, 2100));
        let (_, other_key) = issue(dir.path(), "other", (2020, 2100));
        assert_eq!(check(&good, &good_key), Ok(()));
        let error = check(&expired, &expired_key).unwrap_err();
        assert!(
            error.contains("--src-cert") && error.contains("expired at"),
            "{error}"
        );
        let error = check(&future, &future_key).unwrap_err();
        assert!(
            error.contains("--src-cert") && error.contains("not valid until"),
            "{error}"
        );
        let error = check(&good, &other_key).unwrap_err();
        assert!(
            error.contains("--src-key") && error.contains("does not match"),
            "{error}"
        );
    }
}
