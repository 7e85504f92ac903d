//! Real etcd servers for tests: one or three members on free loopback ports,
//! verified to be our own children, cleaned up however the test ends.
//!
//! Which etcd runs is chosen by the environment, so one suite covers several
//! versions: `E2E_ETCD_BIN` (default `etcd` on PATH), and for mixed pairs
//! `E2E_SOURCE_ETCD_BIN` / `E2E_DEST_ETCD_BIN`, which override it for
//! clusters started as a mirror's source or destination ([`Role`]).
//! `E2E_ETCDCTL_BIN` (default `etcdctl`) is the client for tools that shell out.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use etcd_client::{Client, ConnectOptions, GetOptions};

use crate::tls::TlsMaterial;

/// The part a cluster plays in a test; picks its server binary (see the module doc).
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Neither side in particular: `E2E_ETCD_BIN`.
    #[default]
    Any,
    /// A mirror's source: `E2E_SOURCE_ETCD_BIN`, else `E2E_ETCD_BIN`.
    Source,
    /// A mirror's destination: `E2E_DEST_ETCD_BIN`, else `E2E_ETCD_BIN`.
    Dest,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The etcd server binary for a cluster playing `role`.
pub fn etcd_binary(role: Role) -> String {
    let per_role = match role {
        Role::Any => None,
        Role::Source => env_nonempty("E2E_SOURCE_ETCD_BIN"),
        Role::Dest => env_nonempty("E2E_DEST_ETCD_BIN"),
    };
    per_role
        .or_else(|| env_nonempty("E2E_ETCD_BIN"))
        .unwrap_or_else(|| "etcd".to_string())
}

/// The etcdctl binary: `E2E_ETCDCTL_BIN`, default `etcdctl` on PATH.
pub fn etcdctl_binary() -> String {
    env_nonempty("E2E_ETCDCTL_BIN").unwrap_or_else(|| "etcdctl".to_string())
}

/// A server binary's version, e.g. `3.5.1`, from `<binary> --version`
/// (run once per binary and process).
pub fn etcd_version(binary: &str) -> Result<String> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(version) = cache.lock().unwrap().get(binary) {
        return Ok(version.clone());
    }
    let output = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {binary} --version (is etcd installed? see E2E_ETCD_BIN)"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("etcd Version:"))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("{binary} --version printed no version: {text:?}"))?;
    cache
        .lock()
        .unwrap()
        .insert(binary.to_string(), version.clone());
    Ok(version)
}

#[derive(Default, Clone)]
pub struct EtcdOptions {
    pub members: usize,
    /// Source or destination of a mirror: picks the etcd binary.
    pub role: Role,
    /// Serve clients over mutual TLS with this material.
    pub tls: Option<TlsMaterial>,
    /// `--quota-backend-bytes`.
    pub quota_backend_bytes: Option<u64>,
    /// `--auto-compaction-retention` in revision mode.
    pub auto_compaction_revisions: Option<u64>,
    /// `--max-txn-ops` (etcd's default is 128).
    pub max_txn_ops: Option<usize>,
    /// Any other server flags, passed as given (e.g. `--auth-token-ttl 3`).
    pub extra_args: Vec<String>,
    /// This etcd binary, whatever the role and the environment name (a
    /// bench comparing one version's feature inside another's run).
    pub binary: Option<String>,
    /// Start from this snapshot (`etcdctl snapshot save`), restored with
    /// `etcdctl snapshot restore` into each member's data directory.
    pub restore_from: Option<PathBuf>,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    data_dir: PathBuf,
    log_path: PathBuf,
}

pub struct EtcdCluster {
    members: Vec<Member>,
    options: EtcdOptions,
    binary: String,
    version: String,
    token: String,
    _dir: tempfile::TempDir,
    credentials: Option<(String, String)>,
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn random_token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl EtcdCluster {
    pub async fn start() -> Result<Self> {
        Self::start_with(EtcdOptions::default()).await
    }

    /// A one-member cluster that plays a mirror's source.
    pub async fn start_source() -> Result<Self> {
        Self::start_with(EtcdOptions {
            role: Role::Source,
            ..EtcdOptions::default()
        })
        .await
    }

    /// A one-member cluster that plays a mirror's destination.
    pub async fn start_dest() -> Result<Self> {
        Self::start_with(EtcdOptions {
            role: Role::Dest,
            ..EtcdOptions::default()
        })
        .await
    }

    pub async fn start_with(mut options: EtcdOptions) -> Result<Self> {
        options.members = options.members.max(1);
        // A free port can be taken between our probe and etcd's bind; try again.
        let mut last_error = None;
        for _ in 0..5 {
            match Self::try_start(options.clone()).await {
                Ok(cluster) => return Ok(cluster),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    async fn try_start(options: EtcdOptions) -> Result<Self> {
        let binary = options
            .binary
            .clone()
            .unwrap_or_else(|| etcd_binary(options.role));
        let version = etcd_version(&binary)?;
        let dir = tempfile::Builder::new()
            .prefix("etcd-syncer-e2e-")
            .tempdir()?;
        let token = random_token();
        let mut members = Vec::new();
        for i in 0..options.members {
            let name = format!("e2e-{token}-{i}");
            members.push(Member {
                data_dir: dir.path().join(&name),
                log_path: dir.path().join(format!("{name}.log")),
                name,
                client_port: free_port()?,
                peer_port: free_port()?,
                child: None,
            });
        }
        let mut cluster = Self {
            members,
            options,
            binary,
            version,
            token,
            _dir: dir,
            credentials: None,
        };
        if let Some(snapshot) = cluster.options.restore_from.clone() {
            cluster.restore(&snapshot)?;
        }
        for i in 0..cluster.members.len() {
            cluster.spawn_member(i, "new")?;
        }
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    fn scheme(&self) -> &'static str {
        if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Restores `snapshot` into every member's data directory, as an
    /// operator seeds a standby: same keys, revisions and leases.
    fn restore(&self, snapshot: &Path) -> Result<()> {
        let initial_cluster = self.initial_cluster();
        for member in &self.members {
            let output = Command::new(etcdctl_binary())
                .env("ETCDCTL_API", "3")
                .arg("snapshot")
                .arg("restore")
                .arg(snapshot)
                .arg("--name")
                .arg(&member.name)
                .arg("--data-dir")
                .arg(&member.data_dir)
                .arg("--initial-cluster")
                .arg(&initial_cluster)
                .arg("--initial-cluster-token")
                .arg(&self.token)
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://127.0.0.1:{}", member.peer_port))
                .output()
                .context("run etcdctl snapshot restore")?;
            if !output.status.success() {
                bail!(
                    "etcdctl snapshot restore failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
        Ok(())
    }

    /// `etcdctl snapshot save` of the first member into `path`.
    pub fn snapshot_save(&self, path: &Path) -> Result<()> {
        let mut command = Command::new(etcdctl_binary());
        command
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.member_endpoint(0))
            .arg("snapshot")
            .arg("save")
            .arg(path);
        if let Some(tls) = &self.options.tls {
            command
                .arg("--cacert")
                .arg(&tls.ca_cert)
                .arg("--cert")
                .arg(&tls.client_cert)
                .arg("--key")
                .arg(&tls.client_key);
        }
        let output = command.output().context("run etcdctl snapshot save")?;
        if !output.status.success() {
            bail!(
                "etcdctl snapshot save failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn_member(&mut self, index: usize, state: &str) -> Result<()> {
        let initial_cluster = self.initial_cluster();
        let scheme = self.scheme();
        let member = &self.members[index];
        let client_url = format!("{scheme}://127.0.0.1:{}", member.client_port);
        let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log_path)?;
        let mut command = Command::new(&self.binary);
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&member.data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(&initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg(state)
            // zap on both: 3.4's default (capnslog) is gone in 3.5.
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("warn")
            // tmpfs-like speed is irrelevant to correctness; keep fsync honest but cheap.
            .arg("--snapshot-count")
            .arg("100000")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(tls) = &self.options.tls {
            command
                .arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca_cert)
                .arg("--client-cert-auth");
        }
        if let Some(quota) = self.options.quota_backend_bytes {
            command.arg("--quota-backend-bytes").arg(quota.to_string());
        }
        if let Some(revisions) = self.options.auto_compaction_revisions {
            command
                .arg("--auto-compaction-mode")
                .arg("revision")
                .arg("--auto-compaction-retention")
                .arg(revisions.to_string());
        }
        if let Some(ops) = self.options.max_txn_ops {
            command.arg("--max-txn-ops").arg(ops.to_string());
        }
        command.args(&self.options.extra_args);
        kill_with_parent(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("spawn {} (is etcd-server installed?)", self.binary))?;
        // Once per started server, so a failure's output says which etcd ran.
        eprintln!(
            "e2e: etcd {} ({:?}) member {} on 127.0.0.1:{} from {}",
            self.version, self.options.role, member.name, member.client_port, self.binary
        );
        self.members[index].child = Some(child);
        Ok(())
    }

    /// Waits until every member answers, and checks that what answers is
    /// the member we started: its name carries our random token.
    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut exited = None;
            for member in &mut self.members {
                if let Some(child) = member.child.as_mut() {
                    if let Some(status) = child.try_wait()? {
                        exited = Some((member.name.clone(), status, member.log_path.clone()));
                    }
                }
            }
            if let Some((name, status, log)) = exited {
                bail!("etcd member {name} exited with {status}: {}", tail(&log));
            }
            match self.verify_members().await {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() > deadline => {
                    return Err(error.context(format!("etcd did not become ready in {timeout:?}")))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn verify_members(&self) -> Result<()> {
        for member in &self.members {
            if member.child.is_none() {
                continue;
            }
            let endpoint = format!("{}://127.0.0.1:{}", self.scheme(), member.client_port);
            let mut client = self.connect_to(std::slice::from_ref(&endpoint)).await?;
            let status = tokio::time::timeout(Duration::from_secs(2), client.status()).await??;
            let members =
                tokio::time::timeout(Duration::from_secs(2), client.member_list()).await??;
            let me = members
                .members()
                .iter()
                .find(|m| m.id() == status.header().map_or(0, |h| h.member_id()))
                .context("answering member not in member list")?;
            if me.name() != member.name {
                bail!(
                    "port {} is answered by etcd member {:?}, not by our child {:?}: refusing to use someone else's server",
                    member.client_port,
                    me.name(),
                    member.name
                );
            }
            if status.leader() == 0 {
                bail!("no leader yet");
            }
        }
        Ok(())
    }

    /// The server version these members run, e.g. `3.5.1`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The etcd binary these members run.
    pub fn binary(&self) -> &str {
        &self.binary
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client_port))
            .collect()
    }

    pub fn endpoints_arg(&self) -> String {
        self.endpoints().join(",")
    }

    /// The client endpoint of member `index`.
    pub fn member_endpoint(&self, index: usize) -> String {
        format!(
            "{}://127.0.0.1:{}",
            self.scheme(),
            self.members[index].client_port
        )
    }

    /// Which member leads now (by index), as the members themselves say.
    pub async fn leader_index(&self) -> Result<usize> {
        let mut client = self
            .connect_to(std::slice::from_ref(&self.member_endpoint(0)))
            .await?;
        let status = tokio::time::timeout(Duration::from_secs(2), client.status()).await??;
        let leader = status.leader();
        let members = tokio::time::timeout(Duration::from_secs(2), client.member_list()).await??;
        let name = members
            .members()
            .iter()
            .find(|m| m.id() == leader)
            .map(|m| m.name().to_string())
            .context("no leader in the member list")?;
        self.members
            .iter()
            .position(|m| m.name == name)
            .context("the leader is not one of our members")
    }

    /// Sends `signal` to member `index` (SIGSTOP freezes it: its port still
    /// accepts connections, nothing answers; SIGCONT thaws it).
    pub fn signal_member(&self, index: usize, signal: nix::sys::signal::Signal) -> Result<()> {
        let child = self.members[index]
            .child
            .as_ref()
            .context("member not running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)?;
        Ok(())
    }

    pub fn tls(&self) -> Option<&TlsMaterial> {
        self.options.tls.as_ref()
    }

    /// Use these credentials for [`Self::client`] from now on (after auth is enabled).
    pub fn set_credentials(&mut self, user: &str, password: &str) {
        self.credentials = Some((user.to_string(), password.to_string()));
    }

    async fn connect_to(&self, endpoints: &[String]) -> Result<Client> {
        let mut options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        if let Some(tls) = &self.options.tls {
            options = options.with_tls(tls.client_tls_options()?);
        }
        if let Some((user, password)) = &self.credentials {
            options = options.with_user(user, password);
        }
        let client = tokio::time::timeout(
            Duration::from_secs(5),
            Client::connect(endpoints, Some(options)),
        )
        .await??;
        Ok(client)
    }

    pub async fn client(&self) -> Result<Client> {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client_port))
            .collect();
        self.connect_to(&endpoints).await
    }

    /// The first member's own Prometheus metrics (plain-http clusters only),
    /// e.g. `grpc_server_handled_total{grpc_method="Txn"}` to know that a
    /// request released from a proxy has been answered.
    pub async fn server_metrics(&self) -> Result<String> {
        if self.options.tls.is_some() {
            bail!("server_metrics reads plain http only");
        }
        let url = format!("http://127.0.0.1:{}/metrics", self.members[0].client_port);
        let response = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(5))
            .send()
            .await?;
        Ok(response.error_for_status()?.text().await?)
    }

    /// How many Txn requests the first member has answered, whatever the code.
    pub async fn txns_handled(&self) -> Result<f64> {
        Ok(crate::metric_value(
            &self.server_metrics().await?,
            "grpc_server_handled_total",
            &[("grpc_method", "Txn")],
        ))
    }

    pub async fn revision(&self) -> Result<i64> {
        let mut client = self.client().await?;
        let response = client
            .get("\0", Some(GetOptions::new().with_count_only()))
            .await?;
        Ok(response.header().context("header")?.revision())
    }

    pub async fn cluster_id(&self) -> Result<u64> {
        let mut client = self.client().await?;
        let response = client
            .get("\0", Some(GetOptions::new().with_count_only()))
            .await?;
        Ok(response.header().context("header")?.cluster_id())
    }

    /// Compacts the history up to the current revision.
    pub async fn compact(&self) -> Result<i64> {
        let revision = self.revision().await?;
        let mut client = self.client().await?;
        client
            .compact(
                revision,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await?;
        Ok(revision)
    }

    /// SIGKILLs every member (data stays for [`Self::restart`]).
    pub fn kill(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Starts the killed members again on the same ports and data.
    pub async fn restart(&mut self) -> Result<()> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn_member(i, "existing")?;
            }
        }
        self.wait_ready(Duration::from_secs(30)).await
    }

    /// The cluster rebuilt with the same identity: every member is killed,
    /// its data directory wiped, and the same members (names, ports, cluster
    /// token) bootstrapped again. etcd derives member and cluster ids from
    /// exactly those, so the new cluster has the old cluster id and an empty
    /// history. Auth is off again, so the fixture's credentials are dropped.
    pub async fn rebuild_empty(&mut self) -> Result<()> {
        self.kill();
        for member in &self.members {
            if member.data_dir.exists() {
                std::fs::remove_dir_all(&member.data_dir)
                    .with_context(|| format!("wipe {}", member.data_dir.display()))?;
            }
        }
        self.credentials = None;
        for i in 0..self.members.len() {
            self.spawn_member(i, "new")?;
        }
        self.wait_ready(Duration::from_secs(30)).await
    }

    /// Restarts with a bigger quota and disarms the NOSPACE alarm.
    pub async fn raise_quota(&mut self, quota: u64) -> Result<()> {
        self.kill();
        self.options.quota_backend_bytes = Some(quota);
        self.restart().await?;
        let mut client = self.client().await?;
        let alarms = client
            .alarm(
                etcd_client::AlarmAction::Get,
                etcd_client::AlarmType::None,
                None,
            )
            .await?;
        // Like `etcdctl alarm disarm`: each alarm is disarmed for the member that raised it.
        for alarm in alarms.alarms() {
            let mut options = etcd_client::AlarmOptions::new();
            options.with_member(alarm.member_id());
            client
                .alarm(
                    etcd_client::AlarmAction::Deactivate,
                    alarm.alarm(),
                    Some(options),
                )
                .await?;
        }
        Ok(())
    }

    /// Turns auth on: a `root` user (password `rootpw`, used by this fixture
    /// from then on) and `user` with a role limited to `prefix` and the
    /// syncer's meta prefix.
    pub async fn enable_auth(&mut self, user: &str, password: &str, prefix: &str) -> Result<()> {
        use etcd_client::Permission;
        let mut client = self.client().await?;
        client.user_add("root", "rootpw", None).await?;
        client.user_grant_role("root", "root").await?;
        client.role_add("mirror").await?;
        client
            .role_grant_permission("mirror", Permission::read_write(prefix).with_prefix())
            .await?;
        client
            .role_grant_permission(
                "mirror",
                Permission::read_write(crate::META_PREFIX).with_prefix(),
            )
            .await?;
        client.user_add(user, password, None).await?;
        client.user_grant_role(user, "mirror").await?;
        client.auth_enable().await?;
        self.set_credentials("root", "rootpw");
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        self.members
            .iter()
            .map(|m| tail(&m.log_path))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Children die with the test process even when it is killed, so a crashed
/// run never leaves servers behind on the machine.
pub(crate) fn kill_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}
