//! A real ZooKeeper server for tests: standalone, on a free loopback port,
//! data in a tempdir, verified to be our own child, killed however the test
//! ends (on drop, and by the kernel if the test process dies).
//!
//! The server is ZooKeeper 3.8 from Debian's `zookeeper` package (jars only,
//! no service; `scripts/ensure-deps.sh` installs it), run directly as
//! `java -cp <classpath> org.apache.zookeeper.server.ZooKeeperServerMain
//! <tempdir>/zoo.cfg` with a generated config: `clientPort` on a free port,
//! `clientPortAddress=127.0.0.1`, `dataDir` in the tempdir, the admin server
//! off, and the four-letter words `conf`, `srvr`, `ruok`, `stat`, `mntr`,
//! `cons` and the watch listings `wchs`, `wchc`, `wchp` allowed (the harness
//! uses `conf` and `srvr` to recognise its own server).
//! Logs (slf4j-simple, to stderr) go to `<tempdir>/zookeeper.log`.
//!
//! Environment:
//! * `E2E_ZK_CLASSPATH`: the server's Java classpath, default
//!   `/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar`
//!   (Debian's jar names its dependencies in its manifest). For an Apache
//!   tarball, e.g. `/opt/apache-zookeeper-3.9.3-bin/lib/*`.
//! * `E2E_JAVA`: the java binary, default `java` on PATH.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::etcd::kill_with_parent;

/// Debian's server jar; its manifest names the jars it needs.
/// Netty's jars for a TLS server, as Debian's libnetty-java installs them.
const NETTY_JARS: [&str; 6] = [
    "netty-buffer",
    "netty-codec",
    "netty-common",
    "netty-handler",
    "netty-resolver",
    "netty-transport",
];
const DEBIAN_ZK_JAR: &str = "/usr/share/java/zookeeper.jar";
/// A logging backend for the server's slf4j (Debian's libslf4j-java, a
/// dependency of the package): plain lines on stderr.
const DEBIAN_SLF4J_SIMPLE_JAR: &str = "/usr/share/java/slf4j-simple.jar";
const MAIN_CLASS: &str = "org.apache.zookeeper.server.ZooKeeperServerMain";
/// Long enough for a JVM to start on a loaded two-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The server's classpath: `E2E_ZK_CLASSPATH`, else Debian's jars.
pub fn zk_classpath() -> String {
    env_nonempty("E2E_ZK_CLASSPATH")
        .unwrap_or_else(|| format!("{DEBIAN_ZK_JAR}:{DEBIAN_SLF4J_SIMPLE_JAR}"))
}

/// The java binary: `E2E_JAVA`, else `java` on PATH.
pub fn java_binary() -> String {
    env_nonempty("E2E_JAVA").unwrap_or_else(|| "java".to_string())
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// One standalone ZooKeeper server, our child process.
pub struct ZkServer {
    port: u16,
    /// With TLS: the `secureClientPort` (the plain port stays, for the
    /// four-letter words that prove the server is ours).
    secure_port: Option<u16>,
    child: Option<Child>,
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    /// Pids of every server process started, in order (restarts add one).
    pids: Vec<u32>,
}

impl ZkServer {
    /// Starts a fresh server and waits until it serves and is verified to be ours.
    pub async fn start() -> Result<Self> {
        Self::start_with(None).await
    }

    /// [`Self::start`] with a TLS port too (Netty, PEM keystore from
    /// `tls`'s server certificate and key, trust from its CA; client
    /// certificates wanted when `client_auth`).
    pub async fn start_tls(tls: &crate::tls::TlsMaterial, client_auth: bool) -> Result<Self> {
        Self::start_with(Some((tls, client_auth))).await
    }

    async fn start_with(tls: Option<(&crate::tls::TlsMaterial, bool)>) -> Result<Self> {
        // A free port can be taken between our probe and the server's bind; try again.
        let mut last_error = None;
        for _ in 0..5 {
            match Self::try_start(tls).await {
                Ok(server) => return Ok(server),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    async fn try_start(tls: Option<(&crate::tls::TlsMaterial, bool)>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("etcd-syncer-e2e-zk-")
            .tempdir()?;
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir)?;
        let port = free_port()?;
        let config_path = dir.path().join("zoo.cfg");
        let mut config = config_text(port, &data_dir);
        let mut secure_port = None;
        if let Some((tls, client_auth)) = tls {
            let secure = free_port()?;
            secure_port = Some(secure);
            // ZooKeeper's PEM keystore: the certificate and its key in one file.
            let keystore = dir.path().join("server.pem");
            std::fs::write(
                &keystore,
                std::fs::read_to_string(&tls.server_cert)?
                    + &std::fs::read_to_string(&tls.server_key)?,
            )?;
            config.push_str(&format!(
                "secureClientPort={secure}\n\
                 secureClientPortAddress=127.0.0.1\n\
                 serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n\
                 ssl.keyStore.location={}\n\
                 ssl.keyStore.type=PEM\n\
                 ssl.trustStore.location={}\n\
                 ssl.trustStore.type=PEM\n\
                 ssl.clientAuth={}\n",
                keystore.display(),
                tls.ca_cert.display(),
                if client_auth { "need" } else { "none" }
            ));
        }
        std::fs::write(&config_path, config)?;
        let mut server = Self {
            port,
            secure_port,
            child: None,
            log_path: dir.path().join("zookeeper.log"),
            dir,
            data_dir,
            config_path,
            pids: Vec::new(),
        };
        server.spawn()?;
        server.wait_ready(READY_TIMEOUT).await?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut classpath = zk_classpath();
        if self.secure_port.is_some() {
            // The Netty server (TLS) needs Netty: Debian's zookeeper
            // package depends on libnetty-java.
            for jar in NETTY_JARS {
                classpath.push_str(&format!(":/usr/share/java/{jar}.jar"));
            }
        }
        if env_nonempty("E2E_ZK_CLASSPATH").is_none() && !Path::new(DEBIAN_ZK_JAR).exists() {
            bail!(
                "ZooKeeper is not installed ({DEBIAN_ZK_JAR} missing): run scripts/ensure-deps.sh, or set E2E_ZK_CLASSPATH"
            );
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let java = java_binary();
        let mut command = Command::new(&java);
        command
            .current_dir(self.dir.path())
            .arg("-Xmx256m")
            .arg("-XX:+UseSerialGC")
            .arg("-XX:TieredStopAtLevel=1")
            .arg("-Djava.net.preferIPv4Stack=true")
            .arg("-Dzookeeper.admin.enableServer=false")
            .arg("-Dzookeeper.jmx.log4j.disable=true")
            .arg("-Dorg.slf4j.simpleLogger.defaultLogLevel=info")
            .arg("-Dorg.slf4j.simpleLogger.showDateTime=true")
            .arg("-Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS")
            .arg(format!("-Dzookeeper.log.dir={}", self.dir.path().display()))
            .arg("-cp")
            .arg(&classpath)
            .arg(MAIN_CLASS)
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        kill_with_parent(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("spawn {java} (is a JRE installed? see E2E_JAVA)"))?;
        eprintln!(
            "e2e: zookeeper (pid {}) on 127.0.0.1:{} with data in {}",
            child.id(),
            self.port,
            self.data_dir.display()
        );
        self.pids.push(child.id());
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the server serves requests, and checks that what answers
    /// on our port is the server we started: `conf` must report our port
    /// and our data directory (a path in our private tempdir).
    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "zookeeper on port {} exited with {status}: {}",
                        self.port,
                        self.log_tail()
                    );
                }
            } else {
                bail!("zookeeper is not running");
            }
            match self.verify().await {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() > deadline => {
                    return Err(error.context(format!(
                        "zookeeper did not become ready in {timeout:?}; log: {}",
                        self.log_tail()
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn verify(&self) -> Result<()> {
        let conf = self.four_letter("conf").await?;
        let expected_port = format!("clientPort={}", self.port);
        let expected_dir = format!("dataDir={}", self.data_dir.display());
        if !conf.lines().any(|l| l.trim() == expected_port)
            || !conf.lines().any(|l| l.trim().starts_with(&expected_dir))
        {
            bail!(
                "port {} is answered by a ZooKeeper that is not our child (expected {expected_port} and {expected_dir}): refusing to use someone else's server; conf: {conf:?}",
                self.port
            );
        }
        // `srvr` answers only once the database is loaded and requests are served.
        let srvr = self.four_letter("srvr").await?;
        if !srvr.contains("Mode: standalone") {
            bail!("zookeeper not serving yet: {srvr:?}");
        }
        Ok(())
    }

    /// Sends a four-letter word (`conf`, `srvr`, `ruok`, `stat`, `mntr`,
    /// `cons`, `wchs`, `wchc`, `wchp`) and returns the answer.
    pub async fn four_letter(&self, word: &str) -> Result<String> {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
            stream.write_all(word.as_bytes()).await?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await?;
            anyhow::Ok(answer)
        };
        tokio::time::timeout(Duration::from_secs(2), exchange)
            .await
            .with_context(|| format!("four-letter word {word:?} timed out"))?
            .with_context(|| format!("four-letter word {word:?} on port {}", self.port))
    }

    /// `127.0.0.1:<port>`, a ZooKeeper connect string.
    pub fn connect_string(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:<secureClientPort>` of a [`Self::start_tls`] server.
    pub fn secure_connect_string(&self) -> Option<String> {
        self.secure_port.map(|port| format!("127.0.0.1:{port}"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's `dataDir`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The running server's pid, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Every server process started so far, oldest first.
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A client session on this server (`zookeeper-client`, default session
    /// timeout of 6 s).
    pub async fn client(&self) -> Result<zookeeper_client::Client> {
        self.client_with_session_timeout(Duration::ZERO).await
    }

    /// A client session asking for `session_timeout` (zero: the client's
    /// default). The server clamps it to 2..20 ticks (4 s..40 s here).
    pub async fn client_with_session_timeout(
        &self,
        session_timeout: Duration,
    ) -> Result<zookeeper_client::Client> {
        let mut connector = zookeeper_client::Client::connector();
        if !session_timeout.is_zero() {
            connector = connector.with_session_timeout(session_timeout);
        }
        let client = tokio::time::timeout(
            Duration::from_secs(10),
            connector.connect(&self.connect_string()),
        )
        .await
        .context("connect to zookeeper timed out")??;
        Ok(client)
    }

    /// SIGKILLs the server (data stays for [`Self::restart`]).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Same as [`Self::kill`].
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the server again (killing it first if it runs) on the same
    /// port, config and data directory, and waits until it serves.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready(READY_TIMEOUT).await
    }

    /// SIGSTOP: the port still accepts connections, nothing answers.
    pub fn pause(&self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGSTOP)
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal(nix::sys::signal::Signal::SIGCONT)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let child = self.child.as_ref().context("zookeeper not running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)?;
        Ok(())
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for ZkServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn config_text(port: u16, data_dir: &Path) -> String {
    format!(
        "# Generated by the e2e harness (e2e/src/zk.rs).\n\
         tickTime=2000\n\
         initLimit=10\n\
         syncLimit=5\n\
         dataDir={}\n\
         clientPort={port}\n\
         clientPortAddress=127.0.0.1\n\
         maxClientCnxns=0\n\
         admin.enableServer=false\n\
         4lw.commands.whitelist=conf,srvr,ruok,stat,mntr,cons,wchs,wchc,wchp\n\
         autopurge.purgeInterval=0\n",
        data_dir.display()
    )
}
