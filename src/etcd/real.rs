//! [`Etcd`] over `etcd-client`: a thin translation of our request and
//! response types to and from the gRPC ones.

use futures::future::BoxFuture;
use futures::FutureExt;

use etcd_client::{
    Client, DeleteOptions, GetOptions, KvClient, LeaseGrantOptions, PutOptions, SortOrder,
    SortTarget, TxnOpResponse, WatchClient, WatchOptions,
};

use crate::etcd::api::{
    Compare, CompareOp, CompareTarget, Etcd, EtcdResult, Event, EventType, Header, KeyValue,
    LeaseKeeper, LeaseTtl, Op, OpResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
    WatchRequest, WatchResponse, WatchStream,
};
use crate::etcd::rpctypes::{self, ServerError};

/// Large enough for a page of big values or a fragmented watch response;
/// etcd itself caps a request at 1.5 MiB by default.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

pub struct RealEtcd {
    client: Client,
    kv: KvClient,
    watch: WatchClient,
}

impl RealEtcd {
    pub fn new(client: Client) -> Self {
        let kv = client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let watch = client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        Self { client, kv, watch }
    }
}

fn header(header: Option<&etcd_client::ResponseHeader>) -> Header {
    Header {
        cluster_id: header.map_or(0, |h| h.cluster_id()),
        revision: header.map_or(0, |h| h.revision()),
    }
}

/// Takes the key and value out of etcd-client's pair instead of copying
/// them: a full sync moves every byte of both prefixes through here.
fn key_value(kv: etcd_client::KeyValue) -> KeyValue {
    let (create_revision, mod_revision, version, lease) = (
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease(),
    );
    let (key, value) = kv.into_key_value();
    KeyValue {
        key,
        value,
        create_revision,
        mod_revision,
        version,
        lease,
    }
}

fn get_options(request: &RangeRequest) -> GetOptions {
    let mut options = GetOptions::new();
    if !request.range_end.is_empty() {
        options = options.with_range(request.range_end.clone());
    }
    if request.revision > 0 {
        options = options.with_revision(request.revision);
    }
    if request.limit > 0 {
        options = options.with_limit(request.limit);
    }
    if request.count_only {
        options = options.with_count_only();
    }
    if request.keys_only {
        options = options.with_keys_only();
    }
    if request.max_create_revision > 0 {
        options = options.with_max_create_revision(request.max_create_revision);
    }
    if request.min_mod_revision > 0 {
        options = options.with_min_mod_revision(request.min_mod_revision);
    }
    if request.newest_created_first {
        options = options.with_sort(SortTarget::Create, SortOrder::Descend);
    }
    options
}

fn range_response(mut response: etcd_client::GetResponse) -> RangeResponse {
    RangeResponse {
        header: header(response.header()),
        more: response.more(),
        count: response.count(),
        kvs: response.take_kvs().into_iter().map(key_value).collect(),
    }
}

fn compare(compare: Compare) -> etcd_client::Compare {
    let op = match compare.op {
        CompareOp::Equal => etcd_client::CompareOp::Equal,
        CompareOp::NotEqual => etcd_client::CompareOp::NotEqual,
        CompareOp::Greater => etcd_client::CompareOp::Greater,
        CompareOp::Less => etcd_client::CompareOp::Less,
    };
    let single = match compare.target {
        CompareTarget::Version(v) => etcd_client::Compare::version(compare.key, op, v),
        CompareTarget::CreateRevision(r) => {
            etcd_client::Compare::create_revision(compare.key, op, r)
        }
        CompareTarget::ModRevision(r) => etcd_client::Compare::mod_revision(compare.key, op, r),
        CompareTarget::Value(v) => etcd_client::Compare::value(compare.key, op, v),
    };
    if compare.range_end.is_empty() {
        single
    } else {
        single.with_range(compare.range_end)
    }
}

fn txn_op(op: Op) -> etcd_client::TxnOp {
    match op {
        Op::Range(request) => {
            let options = get_options(&request);
            etcd_client::TxnOp::get(request.key, Some(options))
        }
        Op::Put { key, value, lease } => {
            let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            etcd_client::TxnOp::put(key, value, options)
        }
        Op::Delete { key, range_end } => {
            let options =
                (!range_end.is_empty()).then(|| DeleteOptions::new().with_range(range_end));
            etcd_client::TxnOp::delete(key, options)
        }
    }
}

/// etcd refuses a token minted before an auth-store change, or an expired
/// one; etcd-client re-authenticates only on some of these. Either way:
/// authenticate again, retry once.
pub(crate) fn auth_is_stale(error: &etcd_client::Error) -> bool {
    matches!(
        rpctypes::server_error(error),
        Some(ServerError::AuthOldRevision | ServerError::InvalidAuthToken)
    )
}

impl RealEtcd {
    /// Runs `call`; on a stale token, re-authenticates and runs it once more.
    async fn with_fresh_token<T, F, Fut>(&self, call: F) -> EtcdResult<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = EtcdResult<T>>,
    {
        match call().await {
            Err(error) if auth_is_stale(&error) => {
                tracing::debug!(%error, "Auth token refused; authenticating again.");
                self.client.refresh_token().await?;
                call().await
            }
            result => result,
        }
    }

    async fn range_once(&self, request: RangeRequest) -> EtcdResult<RangeResponse> {
        let mut kv = self.kv.clone();
        let options = get_options(&request);
        let response = kv.get(request.key, Some(options)).await?;
        Ok(range_response(response))
    }

    async fn txn_once(&self, request: TxnRequest) -> EtcdResult<TxnResponse> {
        let mut kv = self.kv.clone();
        let txn = etcd_client::Txn::new()
            .when(request.compare.into_iter().map(compare).collect::<Vec<_>>())
            .and_then(request.success.into_iter().map(txn_op).collect::<Vec<_>>())
            .or_else(request.failure.into_iter().map(txn_op).collect::<Vec<_>>());
        let response = kv.txn(txn).await?;
        let responses = response
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Get(get) => OpResponse::Range(range_response(get)),
                TxnOpResponse::Put(_) => OpResponse::Put,
                TxnOpResponse::Delete(delete) => OpResponse::Delete {
                    deleted: delete.deleted(),
                },
                // We never nest txns.
                TxnOpResponse::Txn(_) => OpResponse::Put,
            })
            .collect();
        Ok(TxnResponse {
            header: header(response.header()),
            succeeded: response.succeeded(),
            responses,
        })
    }
}

impl Etcd for RealEtcd {
    fn range(&self, request: RangeRequest) -> BoxFuture<'_, EtcdResult<RangeResponse>> {
        async move {
            self.with_fresh_token(|| self.range_once(request.clone()))
                .await
        }
        .boxed()
    }

    fn txn(&self, request: TxnRequest) -> BoxFuture<'_, EtcdResult<TxnResponse>> {
        async move {
            self.with_fresh_token(|| self.txn_once(request.clone()))
                .await
        }
        .boxed()
    }

    fn server_version(&self) -> BoxFuture<'_, EtcdResult<String>> {
        let mut maintenance = self.client.maintenance_client();
        async move { Ok(maintenance.status().await?.version().to_string()) }.boxed()
    }

    fn watch(&self, request: WatchRequest) -> BoxFuture<'_, EtcdResult<Box<dyn WatchStream>>> {
        let mut watch = self.watch.clone();
        async move {
            let mut options = WatchOptions::new();
            if !request.range_end.is_empty() {
                options = options.with_range(request.range_end);
            }
            if request.start_revision > 0 {
                options = options.with_start_revision(request.start_revision);
            }
            if request.progress_notify {
                options = options.with_progress_notify();
            }
            if request.fragment {
                options = options.with_fragment();
            }
            let stream = watch.watch(request.key, Some(options)).await?;
            Ok(Box::new(RealWatch { stream }) as Box<dyn WatchStream>)
        }
        .boxed()
    }

    fn lease_grant(&self, ttl: i64, id: i64) -> BoxFuture<'_, EtcdResult<i64>> {
        let mut lease = self.client.lease_client();
        async move {
            let options = (id != 0).then(|| LeaseGrantOptions::new().with_id(id));
            Ok(lease.grant(ttl, options).await?.id())
        }
        .boxed()
    }

    fn lease_keep_alive(&self, id: i64) -> BoxFuture<'_, EtcdResult<Box<dyn LeaseKeeper>>> {
        let mut lease = self.client.lease_client();
        async move {
            let (keeper, stream) = lease.keep_alive(id).await.map_err(keepalive_error)?;
            Ok(Box::new(RealKeeper { keeper, stream }) as Box<dyn LeaseKeeper>)
        }
        .boxed()
    }

    fn lease_revoke(&self, id: i64) -> BoxFuture<'_, EtcdResult<()>> {
        let mut lease = self.client.lease_client();
        async move {
            lease.revoke(id).await?;
            Ok(())
        }
        .boxed()
    }

    fn compact(&self, revision: i64) -> BoxFuture<'_, EtcdResult<()>> {
        let mut kv = self.client.kv_client();
        async move {
            kv.compact(revision, None).await?;
            Ok(())
        }
        .boxed()
    }

    fn lease_list(&self) -> BoxFuture<'_, EtcdResult<(Header, Vec<i64>)>> {
        let mut lease = self.client.lease_client();
        async move {
            let response = lease.leases().await?;
            let ids = response.leases().iter().map(|status| status.id()).collect();
            Ok((header(response.header()), ids))
        }
        .boxed()
    }

    fn lease_time_to_live(&self, id: i64) -> BoxFuture<'_, EtcdResult<Option<LeaseTtl>>> {
        let mut lease = self.client.lease_client();
        async move {
            let response = lease.time_to_live(id, None).await?;
            // etcd answers TTL -1 for a lease it does not have.
            Ok((response.ttl() >= 0).then(|| LeaseTtl {
                granted: response.granted_ttl(),
                remaining: response.ttl(),
            }))
        }
        .boxed()
    }

    fn lease_renew(&self, id: i64) -> BoxFuture<'_, EtcdResult<bool>> {
        let mut lease = self.client.lease_client();
        async move {
            // `keep_alive` sends the first request and waits for its answer;
            // dropping the keeper closes the stream.
            match lease.keep_alive(id).await {
                Ok(_keeper_and_stream) => Ok(true),
                Err(error) => match keepalive_error(error) {
                    error if rpctypes::server_error(&error) == Some(ServerError::LeaseNotFound) => {
                        Ok(false)
                    }
                    error => Err(error),
                },
            }
        }
        .boxed()
    }
}

/// etcd-client reports a keepalive's "no such lease" (the first answer has
/// TTL 0) as its own `LeaseKeepAliveError`; this makes it etcd's
/// `ErrGRPCLeaseNotFound`, as every other lease request gets it. (Its other
/// use, a failed send into the fresh request channel, cannot happen: the
/// receiver lives until the stream starts.)
fn keepalive_error(error: etcd_client::Error) -> etcd_client::Error {
    match error {
        etcd_client::Error::LeaseKeepAliveError(_) => {
            etcd_client::Error::GRpcStatus(rpctypes::status_of(ServerError::LeaseNotFound))
        }
        other => other,
    }
}

struct RealWatch {
    stream: etcd_client::WatchStream,
}

impl WatchStream for RealWatch {
    fn message(&mut self) -> BoxFuture<'_, EtcdResult<Option<WatchResponse>>> {
        async move {
            let Some(response) = self.stream.message().await? else {
                return Ok(None);
            };
            let events = response
                .events()
                .iter()
                .filter_map(|event| {
                    // etcd-client lends watch events only: one copy, as before.
                    let kv = key_value(event.kv()?.clone());
                    let kind = match event.event_type() {
                        etcd_client::EventType::Put => EventType::Put,
                        etcd_client::EventType::Delete => EventType::Delete,
                    };
                    Some(Event { kind, kv })
                })
                .collect();
            Ok(Some(WatchResponse {
                header: header(response.header()),
                created: response.created(),
                canceled: response.canceled(),
                compact_revision: response.compact_revision(),
                cancel_reason: response.cancel_reason().to_string(),
                fragment: response.0.fragment,
                events,
            }))
        }
        .boxed()
    }

    fn request_progress(&mut self) -> BoxFuture<'_, EtcdResult<()>> {
        async move { self.stream.request_progress().await }.boxed()
    }
}

struct RealKeeper {
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
}

impl LeaseKeeper for RealKeeper {
    fn keep_alive(&mut self) -> BoxFuture<'_, EtcdResult<i64>> {
        async move {
            self.keeper.keep_alive().await?;
            match self.stream.message().await? {
                Some(response) => Ok(response.ttl()),
                None => Err(etcd_client::Error::WatchError(
                    "lease keepalive stream closed".into(),
                )),
            }
        }
        .boxed()
    }
}
