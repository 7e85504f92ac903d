//! Connections to the source and destination clusters: endpoints, TLS, auth,
//! keepalive, message size limits, and the classification of etcd errors that
//! every retry decision and the `errors_total{kind}` metric rely on.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::config::{ClusterSettings, Compression};
use crate::etcd::api::{
    Etcd, Header, LeaseKeeper, LeaseTtl, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
    WatchRequest, WatchStream,
};
use crate::etcd::compress::{self, GzipChannel};
use crate::etcd::real::RealEtcd;
use crate::etcd::rpctypes::{self, ServerError};
use crate::model::Side;

/// HTTP/2 pings detect a dead or half-open connection. etcd's default
/// `--grpc-keepalive-min-time` is 5s, so pinging faster gets us disconnected.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What kind of failure an etcd error is; decides retries and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Connection refused, reset, timed out, no leader: retry.
    Unavailable,
    /// Wrong user or password, or missing permission: retry slowly, an operator must act.
    Auth,
    /// The requested revision is gone from the MVCC history.
    Compacted,
    /// The destination is out of space (`mvcc: database space exceeded`).
    QuotaExceeded,
    /// The request was rejected as malformed or too large: retrying will not help.
    Rejected,
}

impl FailureKind {
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Unavailable => "unavailable",
            FailureKind::Auth => "auth",
            FailureKind::Compacted => "compacted",
            FailureKind::QuotaExceeded => "quota_exceeded",
            FailureKind::Rejected => "rejected",
        }
    }
}

pub fn classify(error: &etcd_client::Error) -> FailureKind {
    use etcd_client::Error as E;
    use tonic::Code;
    match error {
        E::GRpcStatus(status) => match rpctypes::identify(status) {
            Some(ServerError::Compacted) => FailureKind::Compacted,
            Some(ServerError::NoSpace) => FailureKind::QuotaExceeded,
            Some(
                ServerError::AuthFailed
                | ServerError::UserEmpty
                | ServerError::PermissionDenied
                | ServerError::InvalidAuthToken,
            ) => FailureKind::Auth,
            _ => match status.code() {
                Code::Unauthenticated | Code::PermissionDenied => FailureKind::Auth,
                Code::OutOfRange => FailureKind::Compacted,
                Code::ResourceExhausted => FailureKind::QuotaExceeded,
                Code::InvalidArgument | Code::FailedPrecondition | Code::Unimplemented => {
                    FailureKind::Rejected
                }
                _ => FailureKind::Unavailable,
            },
        },
        E::InvalidArgs(_) | E::InvalidUri(_) | E::Utf8Error(_) | E::InvalidMetadataValue(_) => {
            FailureKind::Rejected
        }
        _ => FailureKind::Unavailable,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{side} cluster ({endpoints}): {operation} failed: {source}{hint}", hint = hint(*side, source))]
    Request {
        side: Side,
        endpoints: String,
        operation: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("{side} cluster ({endpoints}): {operation} timed out after {timeout:?}")]
    Timeout {
        side: Side,
        endpoints: String,
        operation: &'static str,
        timeout: Duration,
    },
    #[error("cannot read {field} {path}: {source}")]
    TlsFile {
        field: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

fn hint(side: Side, source: &etcd_client::Error) -> String {
    let p = side.flag_prefix();
    // etcd 3.4 answers a gzip-compressed request Unimplemented.
    if let etcd_client::Error::GRpcStatus(status) = source {
        if status.code() == tonic::Code::Unimplemented && compress::in_use(side) {
            return format!(" (etcd < 3.5 does not accept gzip: set --{p}-compression off)");
        }
    }
    match classify(source) {
        FailureKind::Auth => format!(" (check --{p}-user/--{p}-password and that the user's role grants the prefix)"),
        FailureKind::Unavailable => format!(" (check --{p}-endpoints, the network path, and TLS settings)"),
        FailureKind::QuotaExceeded => " (the cluster's backend quota is full: compact and defragment it, or raise --quota-backend-bytes)".to_string(),
        FailureKind::Compacted | FailureKind::Rejected => String::new(),
    }
}

impl ClientError {
    pub fn kind(&self) -> FailureKind {
        match self {
            ClientError::Request { source, .. } => classify(source),
            ClientError::Timeout { .. } => FailureKind::Unavailable,
            ClientError::TlsFile { .. } => FailureKind::Rejected,
        }
    }

    pub fn side(&self) -> Option<Side> {
        match self {
            ClientError::Request { side, .. } | ClientError::Timeout { side, .. } => Some(*side),
            ClientError::TlsFile { .. } => None,
        }
    }

    /// The etcd server error this is, if it is one.
    pub fn server_error(&self) -> Option<ServerError> {
        match self {
            ClientError::Request { source, .. } => rpctypes::server_error(source),
            _ => None,
        }
    }

    /// A lease grant with a chosen ID that the cluster already has
    /// (`ErrGRPCLeaseExist`).
    pub fn is_lease_exists(&self) -> bool {
        self.server_error() == Some(ServerError::LeaseExists)
    }

    /// A lease the request names is not on the cluster
    /// (`ErrGRPCLeaseNotFound`).
    pub fn is_lease_not_found(&self) -> bool {
        self.server_error() == Some(ServerError::LeaseNotFound)
    }

    pub fn is_retryable(&self) -> bool {
        !matches!(self.kind(), FailureKind::Rejected | FailureKind::Compacted)
    }
}

/// One cluster as the replicator sees it: an [`Etcd`] backend (the real
/// client or the in-memory model), the side it plays, and a deadline for
/// every unary request. Every error names the side, the endpoints and the
/// operation.
///
/// The backend can be replaced while the process runs (another endpoint
/// group, rotated certificates): every clone sees the new one at its next
/// request, and watches opened on the old one end (`Ok(None)`, a closed
/// stream, which every caller re-opens), so nothing stays on a path that
/// was left.
#[derive(Clone)]
pub struct Cluster {
    side: Side,
    route: Arc<Route>,
    request_timeout: Duration,
}

/// The connection in use, shared by every clone of a [`Cluster`].
struct Route {
    current: std::sync::RwLock<Connection>,
    /// Bumped at every switch; open watches end when it moves.
    generation: tokio::sync::watch::Sender<u64>,
    /// Requests go through a fallback endpoint group (not the preferred).
    on_fallback: std::sync::atomic::AtomicBool,
    /// The cluster id the jobs' checkpoints name (0: none known yet): the
    /// cluster a group must answer as before it is switched to, while the
    /// group in use has not answered (a preferred group down at start).
    expected_cluster_id: std::sync::atomic::AtomicU64,
    /// Which member a hedged request asks first (rotates, to spread them).
    next_member: std::sync::atomic::AtomicUsize,
}

#[derive(Clone)]
struct Connection {
    endpoints: Arc<str>,
    backend: Arc<dyn Etcd>,
    /// The group's members one by one, for hedged requests (empty: the
    /// in-memory model, or a group of one endpoint).
    members: Arc<[Member]>,
}

/// One member of a group on its own channel, connected at its first use
/// (with auth a connect is a request, and a member that does not answer
/// must only hold the copy that asked it).
struct Member {
    settings: ClusterSettings,
    backend: tokio::sync::OnceCell<Arc<dyn Etcd>>,
}

impl Connection {
    /// A real client of `settings`' first group, with its members.
    fn of_group(settings: &ClusterSettings, backend: Arc<dyn Etcd>) -> Self {
        Connection {
            endpoints: settings.endpoints().join(",").into(),
            backend,
            members: Member::of(settings),
        }
    }
}

impl Member {
    /// The members of `settings`' first group, when it has more than one.
    fn of(settings: &ClusterSettings) -> Arc<[Member]> {
        let endpoints = settings.endpoints();
        if endpoints.len() < 2 {
            return Arc::from(Vec::new());
        }
        endpoints
            .iter()
            .map(|endpoint| {
                let mut settings = settings.through_group(0);
                settings.groups[0].endpoints = vec![endpoint.clone()];
                Member {
                    settings,
                    backend: tokio::sync::OnceCell::new(),
                }
            })
            .collect()
    }

    async fn backend(&self, timeout: Duration) -> Result<Arc<dyn Etcd>, ClientError> {
        self.backend
            .get_or_try_init(|| async {
                let client = connect_client(&self.settings, timeout, "connect to a member").await?;
                Ok(Arc::new(crate::etcd::real::RealEtcd::new(client)) as Arc<dyn Etcd>)
            })
            .await
            .cloned()
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("side", &self.side)
            .field("endpoints", &self.connection().endpoints)
            .finish_non_exhaustive()
    }
}

/// A watch opened before the connection was switched ends as if the server
/// had closed it.
struct SwitchableWatch {
    inner: Box<dyn WatchStream>,
    generation: tokio::sync::watch::Receiver<u64>,
    switched: bool,
}

impl WatchStream for SwitchableWatch {
    /// # Cancel-Safety
    /// Cancel-safe: both arms are (the inner stream keeps an unread message
    /// queued; `changed` only marks the generation seen once it returns).
    fn message(
        &mut self,
    ) -> futures::future::BoxFuture<
        '_,
        crate::etcd::api::EtcdResult<Option<crate::etcd::api::WatchResponse>>,
    > {
        Box::pin(async move {
            if self.switched {
                return Ok(None);
            }
            tokio::select! {
                biased;
                changed = self.generation.changed() => {
                    // A dropped sender (the cluster is gone) ends it too.
                    let _ = changed;
                    self.switched = true;
                    Ok(None)
                }
                message = self.inner.message() => message,
            }
        })
    }

    fn request_progress(
        &mut self,
    ) -> futures::future::BoxFuture<'_, crate::etcd::api::EtcdResult<()>> {
        self.inner.request_progress()
    }
}

/// Picks ring as rustls's process-wide crypto provider, once: with
/// zookeeper-client's TLS, aws-lc-rs is compiled in too, and rustls then
/// refuses to choose by itself (a panic at the first handshake).
pub fn ensure_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: one was installed already (by whoever embeds us): keep it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// An `etcd-client` connection to one side: keepalives, token refresh, TLS
/// files read with errors naming their flag, gzip as `--{p}-compression`
/// says (for `auto`, after asking every member's version), and the connect
/// bounded by `request_timeout`. `operation` names the attempt in errors.
pub async fn connect_client(
    settings: &ClusterSettings,
    request_timeout: Duration,
    operation: &'static str,
) -> Result<Client, ClientError> {
    ensure_tls_provider();
    let endpoints = settings.endpoints().join(",");
    let options = connect_options(settings)?;
    // `auto` connects with gzip off and turns it on once every member has
    // said it runs etcd >= 3.5.
    let gzip = Arc::new(AtomicBool::new(settings.compression == Compression::Gzip));
    let connect = async {
        match settings.compression {
            Compression::Off => {
                Client::connect(settings.endpoints().to_vec(), Some(options.clone())).await
            }
            Compression::Auto | Compression::Gzip => {
                Client::connect_with_balanced_channel(
                    settings.endpoints().to_vec(),
                    Some(options.clone()),
                    GzipChannel { on: gzip.clone() },
                )
                .await
            }
        }
    };
    let client = match tokio::time::timeout(request_timeout, connect).await {
        Ok(Ok(client)) => client,
        Ok(Err(source)) => {
            return Err(ClientError::Request {
                side: settings.side,
                endpoints,
                operation,
                source,
            })
        }
        Err(_) => {
            return Err(ClientError::Timeout {
                side: settings.side,
                endpoints,
                operation,
                timeout: request_timeout,
            })
        }
    };
    let p = settings.side.flag_prefix();
    let (on, why) = match settings.compression {
        Compression::Off => (false, format!("--{p}-compression off")),
        Compression::Gzip => (true, format!("--{p}-compression gzip")),
        Compression::Auto => {
            match every_member_takes_gzip(settings, &client, &options, request_timeout).await {
                Ok(()) => (true, "every member is etcd >= 3.5".to_string()),
                Err(why) => (false, why),
            }
        }
    };
    gzip.store(on, Ordering::Relaxed);
    let on_off = if on { "on" } else { "off" };
    let previous = compress::record(
        settings.side,
        compress::Decision {
            on,
            why: why.clone(),
        },
    );
    // The first decision is logged by whoever reports the connection (the
    // mirror, with the versions); a later connect that decides otherwise
    // (an upgrade, another group) is news.
    if previous.is_some_and(|p| p.on != on) {
        tracing::info!(side = %settings.side, compression = on_off, "{}: gzip compression {on_off} ({why})", settings.side);
    } else {
        tracing::debug!(side = %settings.side, compression = on_off, "{}: gzip compression {on_off} ({why})", settings.side);
    }
    Ok(client)
}

/// Keepalives, token refresh, and TLS files read with errors naming their flag.
fn connect_options(settings: &ClusterSettings) -> Result<ConnectOptions, ClientError> {
    let mut options = ConnectOptions::new()
        .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        // Pings without an open stream trip etcd's too_many_pings policy.
        .with_keep_alive_while_idle(false)
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_tcp_keepalive(Duration::from_secs(30));
    if let Some(credentials) = &settings.credentials {
        options = options
            .with_user(credentials.user.clone(), credentials.password.clone())
            // etcd's simple tokens expire (5 min by default); a mirror runs for months.
            .with_auto_token_refresh(true);
    }
    if let Some(tls_files) = &settings.tls {
        let p = settings.side.flag_prefix();
        let mut tls = TlsOptions::new();
        if let Some(ca) = &tls_files.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read_tls_file(
                &format!("--{p}-cacert"),
                ca,
            )?));
        }
        if let Some((cert, key)) = &tls_files.cert_and_key {
            tls = tls.identity(Identity::from_pem(
                read_tls_file(&format!("--{p}-cert"), cert)?,
                read_tls_file(&format!("--{p}-key"), key)?,
            ));
        }
        options = options.with_tls(tls);
    }
    Ok(options)
}

/// `auto`: Ok if every endpoint of the group answers a Status with etcd >=
/// 3.5 (3.4 refuses gzip-compressed requests); else why not. A group of
/// one asks through `client` itself (its gzip still off); a larger one asks
/// each endpoint on a connection of its own, all at once, since the
/// balanced channel picks the member. An endpoint that does not answer
/// counts as no: it may be a 3.4 that comes back.
async fn every_member_takes_gzip(
    settings: &ClusterSettings,
    client: &Client,
    options: &ConnectOptions,
    timeout: Duration,
) -> Result<(), String> {
    let ask = |endpoint: String| async move {
        let status = async {
            let mut client = match settings.endpoints() {
                [_] => client.clone(),
                _ => Client::connect(vec![endpoint.clone()], Some(options.clone())).await?,
            };
            client.status().await
        };
        let version = match tokio::time::timeout(timeout, status).await {
            Ok(Ok(status)) => status.version().to_string(),
            Ok(Err(error)) => {
                return Err(format!(
                    "member {endpoint} did not answer the version probe: {error}"
                ))
            }
            Err(_) => {
                return Err(format!(
                    "member {endpoint} did not answer the version probe within {timeout:?}"
                ))
            }
        };
        match compress::parse_version(&version) {
            Some(v) if v >= compress::FIRST_GZIP_VERSION => Ok(()),
            Some(_) => Err(format!("member {endpoint} runs {version}")),
            None => Err(format!("member {endpoint} reports version {version:?}")),
        }
    };
    let answers = futures::future::join_all(settings.endpoints().iter().cloned().map(ask)).await;
    answers.into_iter().collect()
}

/// Runs `request` under `timeout`; an error or the deadline names the side,
/// the endpoints and the operation. Shared by every client of a cluster.
pub(crate) async fn within_deadline<T>(
    side: Side,
    endpoints: &str,
    timeout: Duration,
    operation: &'static str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(ClientError::Request {
            side,
            endpoints: endpoints.to_string(),
            operation,
            source,
        }),
        Err(_) => Err(ClientError::Timeout {
            side,
            endpoints: endpoints.to_string(),
            operation,
            timeout,
        }),
    }
}

impl Cluster {
    /// Builds the client, through the first endpoint group that connects.
    /// With auth this authenticates, so wrong credentials and unreachable
    /// endpoints fail here; without auth the channel is lazy and they show
    /// on the first request.
    pub async fn connect(
        settings: &ClusterSettings,
        request_timeout: Duration,
    ) -> Result<Self, ClientError> {
        connect_preferred(settings, request_timeout)
            .await
            .map(|(cluster, _)| cluster)
    }

    /// A cluster over any backend: the in-memory model in the simulator.
    pub fn with_backend(
        side: Side,
        endpoints: impl Into<String>,
        backend: Arc<dyn Etcd>,
        request_timeout: Duration,
    ) -> Self {
        let endpoints: String = endpoints.into();
        Self::over(
            side,
            Connection {
                endpoints: endpoints.into(),
                backend,
                members: Arc::from(Vec::new()),
            },
            request_timeout,
        )
    }

    fn over(side: Side, connection: Connection, request_timeout: Duration) -> Self {
        Self {
            side,
            route: Arc::new(Route {
                current: std::sync::RwLock::new(connection),
                generation: tokio::sync::watch::Sender::new(0),
                on_fallback: std::sync::atomic::AtomicBool::new(false),
                expected_cluster_id: std::sync::atomic::AtomicU64::new(0),
                next_member: std::sync::atomic::AtomicUsize::new(0),
            }),
            request_timeout,
        }
    }

    /// A cluster over `backend`, a real client of `settings`' first group,
    /// whose hedged requests go to its members one by one.
    pub fn with_group(
        settings: &ClusterSettings,
        backend: Arc<dyn Etcd>,
        request_timeout: Duration,
    ) -> Self {
        Self::over(
            settings.side,
            Connection::of_group(settings, backend),
            request_timeout,
        )
    }

    /// Whether requests go through a fallback endpoint group.
    pub fn on_fallback(&self) -> bool {
        self.route
            .on_fallback
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records whether the group in use is a fallback (set by whoever
    /// switches groups).
    pub fn set_on_fallback(&self, fallback: bool) {
        self.route
            .on_fallback
            .store(fallback, std::sync::atomic::Ordering::SeqCst);
    }

    /// The cluster id a job's checkpoint names: the cluster this side is
    /// known to be (the jobs of a process share their source).
    pub fn learn_cluster_id(&self, cluster_id: u64) {
        if cluster_id != 0 {
            self.route
                .expected_cluster_id
                .store(cluster_id, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The cluster id learnt from a checkpoint, if any.
    pub fn expected_cluster_id(&self) -> Option<u64> {
        Some(
            self.route
                .expected_cluster_id
                .load(std::sync::atomic::Ordering::SeqCst),
        )
        .filter(|id| *id != 0)
    }

    pub fn side(&self) -> Side {
        self.side
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    fn connection(&self) -> Connection {
        self.route
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The endpoints requests go to now.
    pub fn endpoints(&self) -> String {
        self.connection().endpoints.to_string()
    }

    /// From now on every clone sends its requests to `backend`, and the
    /// watches open now end (their callers re-open them here).
    pub fn switch_to(&self, endpoints: impl Into<String>, backend: Arc<dyn Etcd>) {
        let endpoints: String = endpoints.into();
        self.switch(Connection {
            endpoints: endpoints.into(),
            backend,
            members: Arc::from(Vec::new()),
        });
    }

    /// [`Self::switch_to`] a real client of `settings`' first group (its
    /// members answer hedged requests one by one).
    pub fn switch_to_group(&self, settings: &ClusterSettings, backend: Arc<dyn Etcd>) {
        self.switch(Connection::of_group(settings, backend));
    }

    /// [`Self::switch_to`] wherever `other` sends its requests now.
    pub fn switch_like(&self, other: &Cluster) {
        self.switch(other.connection());
    }

    fn switch(&self, connection: Connection) {
        *self
            .route
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = connection;
        self.route.generation.send_modify(|g| *g += 1);
    }

    /// How many times the connection was switched.
    pub fn switches(&self) -> u64 {
        *self.route.generation.borrow()
    }

    /// Runs one unary request under the request deadline, naming the cluster
    /// and the operation in any error.
    ///
    /// # Cancel-Safety
    /// Dropping it abandons the request; a txn already sent may still apply,
    /// which every guarded write tolerates.
    pub async fn call<T, F>(&self, operation: &'static str, request: F) -> Result<T, ClientError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        within_deadline(
            self.side,
            &self.connection().endpoints,
            self.request_timeout,
            operation,
            request,
        )
        .await
    }

    fn backend(&self) -> Arc<dyn Etcd> {
        self.connection().backend
    }

    /// The backend requests go to now (for the endpoint-group routes).
    pub(crate) fn current_backend(&self) -> Arc<dyn Etcd> {
        self.backend()
    }

    pub async fn range(
        &self,
        operation: &'static str,
        request: RangeRequest,
    ) -> Result<RangeResponse, ClientError> {
        self.call(operation, self.backend().range(request)).await
    }

    pub async fn txn(
        &self,
        operation: &'static str,
        request: TxnRequest,
    ) -> Result<TxnResponse, ClientError> {
        self.call(operation, self.backend().txn(request)).await
    }

    /// Opens a watch (the open is under the deadline; the stream is not).
    pub async fn watch(
        &self,
        operation: &'static str,
        request: WatchRequest,
    ) -> Result<Box<dyn WatchStream>, ClientError> {
        let mut generation = self.route.generation.subscribe();
        generation.borrow_and_update();
        let inner = self.call(operation, self.backend().watch(request)).await?;
        Ok(Box::new(SwitchableWatch {
            inner,
            // Switched while it opened: it ends at once, and is re-opened.
            switched: generation.has_changed().unwrap_or(true),
            generation,
        }))
    }

    pub async fn lease_grant(&self, ttl_seconds: i64, id: i64) -> Result<i64, ClientError> {
        self.call("grant lease", self.backend().lease_grant(ttl_seconds, id))
            .await
    }

    pub async fn lease_keep_alive(&self, id: i64) -> Result<Box<dyn LeaseKeeper>, ClientError> {
        self.call("open lease keepalive", self.backend().lease_keep_alive(id))
            .await
    }

    pub async fn compact(&self, revision: i64) -> Result<(), ClientError> {
        self.call("compact history", self.backend().compact(revision))
            .await
    }

    /// Whether history at `revision` is still readable (a one-key read
    /// there: etcd checks the compaction before it looks at any key).
    pub async fn readable_at(&self, revision: i64) -> Result<bool, ClientError> {
        let probe = RangeRequest::key(vec![0])
            .at_revision(revision)
            .count_only();
        match self.range("probe the compaction", probe).await {
            Ok(_) => Ok(true),
            Err(error) if error.kind() == FailureKind::Compacted => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The compaction revision if it lies in `(known, upper]`: the
    /// smallest revision there still readable, found by a binary search of
    /// one-key reads. `None` when history at `known` is still readable
    /// (nothing newer compacted), or when even `upper` is compacted.
    pub async fn compaction_in(&self, known: i64, upper: i64) -> Result<Option<i64>, ClientError> {
        if upper <= known || self.readable_at(known).await? || !self.readable_at(upper).await? {
            return Ok(None);
        }
        // Unreadable at `low`, readable at `high`.
        let (mut low, mut high) = (known, upper);
        while high - low > 1 {
            let middle = low + (high - low) / 2;
            if self.readable_at(middle).await? {
                high = middle;
            } else {
                low = middle;
            }
        }
        Ok(Some(high))
    }

    pub async fn lease_revoke(&self, id: i64) -> Result<(), ClientError> {
        self.call("revoke lease", self.backend().lease_revoke(id))
            .await
    }

    pub async fn lease_list(&self) -> Result<(Header, Vec<i64>), ClientError> {
        self.call("list leases", self.backend().lease_list()).await
    }

    pub async fn lease_time_to_live(&self, id: i64) -> Result<Option<LeaseTtl>, ClientError> {
        self.call("read lease TTL", self.backend().lease_time_to_live(id))
            .await
    }

    /// True when renewed, false when the lease is gone.
    pub async fn lease_renew(&self, id: i64) -> Result<bool, ClientError> {
        self.call("renew lease", self.backend().lease_renew(id))
            .await
    }

    /// [`Self::lease_time_to_live`], hedged (see [`Self::hedged`]).
    pub async fn lease_time_to_live_hedged(
        &self,
        id: i64,
    ) -> Result<Option<LeaseTtl>, ClientError> {
        self.hedged("read lease TTL", |backend| async move {
            backend.lease_time_to_live(id).await
        })
        .await
    }

    /// [`Self::lease_renew`], hedged (see [`Self::hedged`]): a keepalive is idempotent.
    pub async fn lease_renew_hedged(&self, id: i64) -> Result<bool, ClientError> {
        self.hedged("renew lease", |backend| async move {
            backend.lease_renew(id).await
        })
        .await
    }

    /// [`Self::head`], hedged (see [`Self::hedged`]): what a health probe
    /// and the lease keeper ask, so one dead member (every other request
    /// sent its way fails) neither makes the cluster look down nor holds a
    /// renewal past the lease's TTL.
    pub async fn head_hedged(&self, prefix: &[u8]) -> Result<ClusterHead, ClientError> {
        let request = head_request(prefix);
        let response = self
            .hedged("read current revision", |backend| {
                let request = request.clone();
                async move { backend.range(request).await }
            })
            .await?;
        Ok(ClusterHead {
            cluster_id: response.header.cluster_id,
            revision: response.header.revision,
        })
    }

    /// Runs an idempotent request [`hedged`]: copy `n` goes to the group's
    /// member `start + n` (a rotating start), each under the request
    /// deadline, so a member that stops answering holds one copy and the
    /// next copy reaches another member for certain. Without members (the
    /// in-memory model, one endpoint) every copy goes to the group.
    ///
    /// # Cancel-Safety
    /// Cancel-safe: dropping it drops every copy (the request is idempotent).
    async fn hedged<T, F, Fut>(&self, operation: &'static str, request: F) -> Result<T, ClientError>
    where
        F: Fn(Arc<dyn Etcd>) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let connection = self.connection();
        let start = self
            .route
            .next_member
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let copies = HEDGED_COPIES.max(connection.members.len().min(HEDGED_COPIES_MAX));
        hedged(HEDGE_AFTER, copies, |copy| {
            let connection = connection.clone();
            let request = &request;
            async move {
                let members = &connection.members;
                if members.is_empty() {
                    return self
                        .call(operation, request(connection.backend.clone()))
                        .await;
                }
                let member = &members[(start + copy) % members.len()];
                let endpoint = member.settings.endpoints().join(",");
                // The connect and the request share one deadline.
                let deadline = tokio::time::Instant::now() + self.request_timeout;
                let copy = async {
                    match member.backend(self.request_timeout).await {
                        Ok(backend) => {
                            within_deadline(
                                self.side,
                                &endpoint,
                                self.request_timeout,
                                operation,
                                request(backend),
                            )
                            .await
                        }
                        // A member that does not connect (down, or files
                        // changed on disk that the group's connection does
                        // not use yet) sends this copy through the group.
                        Err(_) => {
                            self.call(operation, request(connection.backend.clone()))
                                .await
                        }
                    }
                };
                match tokio::time::timeout_at(deadline, copy).await {
                    Ok(answer) => answer,
                    Err(_) => Err(ClientError::Timeout {
                        side: self.side,
                        endpoints: endpoint,
                        operation,
                        timeout: self.request_timeout,
                    }),
                }
            }
        })
        .await
    }

    /// The server's version, or `None` when it will not say (etcd 3.4.42 /
    /// 3.5.28 and later want root for it when auth is on).
    pub async fn server_version(&self) -> Option<crate::model::versions::Version> {
        match self
            .call("read server version", self.backend().server_version())
            .await
        {
            Ok(text) => crate::model::versions::Version::parse(&text),
            Err(error) => {
                tracing::debug!(side = %self.side, %error, "Server version not readable.");
                None
            }
        }
    }

    /// The cluster's id and current revision, read from the header of a
    /// count-only read of the one key `probe_prefix` (a role limited to the
    /// prefix may read it). Not of the whole prefix: etcd counts a range by
    /// walking every key in it, a million index entries for a job that size.
    pub async fn head(&self, probe_prefix: &[u8]) -> Result<ClusterHead, ClientError> {
        let response = self
            .range("read current revision", head_request(probe_prefix))
            .await?;
        Ok(ClusterHead {
            cluster_id: response.header.cluster_id,
            revision: response.header.revision,
        })
    }
}

/// A count-only read of `probe_prefix`'s first possible key ("\0" for the
/// whole keyspace): its header is the cluster's id and revision.
fn head_request(probe_prefix: &[u8]) -> RangeRequest {
    RangeRequest::key(crate::model::keys::prefix_range_start(probe_prefix)).count_only()
}

/// A hedged request's next copy goes out after this long without an answer:
/// well above a WAN round trip, well below the request timeout.
pub const HEDGE_AFTER: std::time::Duration = std::time::Duration::from_millis(500);
/// Copies of a hedged request at least.
pub const HEDGED_COPIES: usize = 3;
/// Copies of a hedged request at most (one per member of a large group).
pub const HEDGED_COPIES_MAX: usize = 5;

/// Runs an idempotent request, sending another copy whenever `after`
/// passes without an answer (up to `copies`), or at once after a retryable
/// error; the first success wins. `request(n)` sends copy `n` (from 0).
///
/// Why: `etcd-client` spreads requests over a cluster's members, and a
/// member that stops answering (a SIGSTOPped or wedged process still
/// accepts connections) holds every request sent its way until the request
/// timeout. Lease keepalives cannot wait that long; a second copy most
/// likely reaches a member that answers.
///
/// # Cancel-Safety
/// Cancel-safe: dropping it drops every copy (the request is idempotent).
pub async fn hedged<T, F, Fut>(
    after: std::time::Duration,
    copies: usize,
    request: F,
) -> Result<T, ClientError>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut pending = FuturesUnordered::new();
    pending.push(request(0));
    let mut sent = 1;
    let mut next_copy = tokio::time::Instant::now() + after;
    loop {
        tokio::select! {
            answer = pending.next() => match answer {
                Some(Ok(value)) => return Ok(value),
                Some(Err(error)) if !error.is_retryable() || (sent >= copies && pending.is_empty()) => return Err(error),
                Some(Err(_)) => {
                    if pending.is_empty() {
                        pending.push(request(sent));
                        sent += 1;
                        next_copy = tokio::time::Instant::now() + after;
                    }
                }
                None => unreachable!("a copy is always pending here"),
            },
            _ = tokio::time::sleep_until(next_copy), if sent < copies => {
                pending.push(request(sent));
                sent += 1;
                next_copy = tokio::time::Instant::now() + after;
            }
        }
    }
}

/// Connects through the first group that connects, in order of
/// preference. Without auth the channel is lazy, so this is the first
/// group, and the health checks move off it if it does not answer.
/// Returns the cluster and the index of the group it uses.
pub async fn connect_preferred(
    settings: &ClusterSettings,
    request_timeout: Duration,
) -> Result<(Cluster, usize), ClientError> {
    let mut first_error = None;
    for (index, group) in settings.groups.iter().enumerate() {
        let through = settings.through_group(index);
        match connect_client(&through, request_timeout, "connect").await {
            Ok(client) => {
                if index > 0 {
                    tracing::warn!(side = %settings.side, group = %group.name, "Connected through a fallback endpoint group: the preferred ones did not connect.");
                }
                let cluster =
                    Cluster::with_group(&through, Arc::new(RealEtcd::new(client)), request_timeout);
                cluster.set_on_fallback(index > 0);
                return Ok((cluster, index));
            }
            Err(error) => {
                if settings.groups.len() > 1 {
                    tracing::warn!(side = %settings.side, group = %group.name, %error, "Endpoint group does not connect; trying the next.");
                }
                first_error.get_or_insert(error);
            }
        }
    }
    Err(first_error.expect("at least one endpoint group"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterHead {
    pub cluster_id: u64,
    pub revision: i64,
}

fn read_tls_file(field: &str, path: &std::path::Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::TlsFile {
        field: field.to_string(),
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After `switch_to`, every clone's requests reach the new backend, and
    /// a watch opened before the switch ends (as a closed stream) instead
    /// of staying on the path that was left; one opened after it lives.
    /// A copy that never answers holds nothing: the next copy (told its
    /// index, so it goes to another member) answers; the copies are
    /// numbered 0, 1, 2 and no more go out than asked.
    #[tokio::test(start_paused = true)]
    async fn a_hedged_request_is_answered_past_a_silent_copy() {
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let answer = hedged(Duration::from_millis(500), 3, |copy| {
            asked.lock().unwrap().push(copy);
            async move {
                if copy == 0 {
                    std::future::pending::<()>().await;
                }
                Ok::<_, ClientError>(copy)
            }
        })
        .await
        .unwrap();
        assert_eq!(answer, 1, "the second copy answers");
        assert_eq!(*asked.lock().unwrap(), vec![0, 1]);
        asked.lock().unwrap().clear();
        let never = tokio::time::timeout(
            Duration::from_secs(60),
            hedged(Duration::from_millis(500), 3, |copy| {
                asked.lock().unwrap().push(copy);
                std::future::pending::<Result<(), ClientError>>()
            }),
        )
        .await;
        assert!(never.is_err(), "no copy answered");
        assert_eq!(
            *asked.lock().unwrap(),
            vec![0, 1, 2],
            "three copies, no more"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_switch_moves_requests_and_ends_old_watches() {
        use crate::etcd::memory::{new_store, Link, MemoryEtcd};
        let (a, b) = (new_store(7), new_store(7));
        let cluster = Cluster::with_backend(
            Side::Source,
            "a",
            Arc::new(MemoryEtcd::new(a.clone(), Link::new("a", 1))),
            Duration::from_secs(5),
        );
        let clone = cluster.clone();
        let watch_all = || WatchRequest {
            key: b"/".to_vec(),
            range_end: b"0".to_vec(),
            ..WatchRequest::default()
        };
        let mut old_watch = cluster.watch("watch", watch_all()).await.unwrap();
        cluster.switch_to("b", Arc::new(MemoryEtcd::new(b.clone(), Link::new("b", 2))));
        assert_eq!(clone.endpoints(), "b");
        assert_eq!(cluster.switches(), 1);
        assert!(
            matches!(old_watch.message().await, Ok(None)),
            "ended by the switch"
        );
        assert!(
            matches!(old_watch.message().await, Ok(None)),
            "and stays ended"
        );
        let mut new_watch = clone.watch("watch", watch_all()).await.unwrap();
        let a_before = a.lock().unwrap().revision();
        clone
            .txn(
                "put",
                TxnRequest::new().and_then(vec![crate::etcd::api::Op::put("/k", "v")]),
            )
            .await
            .unwrap();
        assert_eq!(
            b.lock().unwrap().revision(),
            a_before + 1,
            "written through the new backend"
        );
        assert_eq!(
            a.lock().unwrap().revision(),
            a_before,
            "not through the old one"
        );
        // The first message may be the watch's creation.
        let mut events = 0;
        for _ in 0..3 {
            events += new_watch
                .message()
                .await
                .unwrap()
                .expect("open")
                .events
                .len();
            if events > 0 {
                break;
            }
        }
        assert_eq!(events, 1, "the new watch sees the write");
    }

    #[test]
    fn classification() {
        let status =
            |code, msg: &str| etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg));
        assert_eq!(
            classify(&status(
                tonic::Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted"
            )),
            FailureKind::Compacted
        );
        assert_eq!(
            classify(&status(
                tonic::Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password"
            )),
            FailureKind::Auth
        );
        assert_eq!(
            classify(&status(
                tonic::Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded"
            )),
            FailureKind::QuotaExceeded
        );
        assert_eq!(
            classify(&status(tonic::Code::Unavailable, "connection refused")),
            FailureKind::Unavailable
        );
        assert_eq!(
            classify(&status(
                tonic::Code::InvalidArgument,
                "etcdserver: too many operations in txn request"
            )),
            FailureKind::Rejected
        );
    }
}
