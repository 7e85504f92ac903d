//! gzip on the gRPC link to a cluster, under `etcd-client`, which has no
//! compression option of its own.
//!
//! [`GzipChannel`] builds the balanced tonic channel `etcd-client` inserts its
//! endpoints into (TLS and keepalives stay its own) and wraps it in [`Gzip`]:
//! while compression is on, every request message is sent gzip-compressed
//! with `grpc-encoding: gzip`, and any response the server compressed is
//! inflated before tonic, which was never told about gzip, decodes it. etcd
//! 3.5 accepts gzip and then answers in gzip; etcd 3.4 refuses it
//! (`Unimplemented`), which is why `auto` asks every member's version first.
//!
//! The framing is [`Transcoder`], a pure state machine fed body chunks in any
//! split: a gRPC message is a 1-byte compressed flag, a 4-byte big-endian
//! length and the payload, and body frames cut across and join messages.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use etcd_client::{BalancedChannelBuilder, Channel};
use http_body::{Body, Frame};
use tonic::body::Body as TonicBody;
use tonic::Status;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service};

use crate::model::Side;

/// The 1-byte flag and the 4-byte length before every gRPC message.
const HEADER_BYTES: usize = 5;
const GZIP: &str = "gzip";

/// A message shorter than this is sent plain (flag 0, which gRPC allows
/// under `grpc-encoding: gzip`): gzip's own framing is about 20 bytes, so
/// compressing a short request only makes it longer.
pub const MIN_COMPRESSED_BYTES: usize = 256;

/// The RPCs whose answers are bulk (pages of keys and values, a lease
/// listing), the only ones that ask the server to compress. A server
/// compresses every answer of an RPC that asked, and watch and keepalive
/// streams answer in small messages one at a time, where gzip's framing
/// costs more than it saves: with gzip on every RPC, `make bench` measured
/// a watch's incremental traffic at 112% of uncompressed.
const BULK_RPCS: [&str; 3] = [
    "/etcdserverpb.KV/Range",
    "/etcdserverpb.KV/Txn",
    "/etcdserverpb.Lease/LeaseLeases",
];

/// Whether the RPC at `path` asks for gzip (see [`BULK_RPCS`]).
pub fn compresses(path: &str) -> bool {
    BULK_RPCS.contains(&path)
}

/// Why a gRPC body could not be re-framed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("the gRPC body ended inside a message ({0} bytes of it)")]
    Truncated(usize),
    #[error("a gzip-compressed gRPC message does not inflate: {0}")]
    Corrupt(String),
    #[error("a gzip-compressed gRPC message inflates past {0} bytes")]
    TooLarge(usize),
    #[error("a compressed gRPC message is larger than a frame can say ({0} bytes)")]
    Oversized(usize),
}

impl From<CodecError> for Status {
    fn from(error: CodecError) -> Status {
        match error {
            // As tonic itself answers a message over its decoding limit.
            CodecError::TooLarge(_) => Status::resource_exhausted(error.to_string()),
            _ => Status::internal(error.to_string()),
        }
    }
}

/// One gRPC message as framed on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub compressed: bool,
    pub payload: Bytes,
}

impl Message {
    /// Appends the message, framed, to `out`.
    pub fn write_to(&self, out: &mut BytesMut) -> Result<(), CodecError> {
        let length = u32::try_from(self.payload.len())
            .map_err(|_| CodecError::Oversized(self.payload.len()))?;
        out.reserve(HEADER_BYTES + self.payload.len());
        out.put_u8(u8::from(self.compressed));
        out.put_u32(length);
        out.put_slice(&self.payload);
        Ok(())
    }
}

/// Splits a byte stream into gRPC messages, whatever the chunking.
#[derive(Debug, Default)]
pub struct Deframer {
    buffer: BytesMut,
}

impl Deframer {
    pub fn push(&mut self, chunk: impl Buf) {
        self.buffer.put(chunk);
    }

    /// The next whole message, if the bytes so far hold one.
    pub fn next_message(&mut self) -> Option<Message> {
        let header = self.buffer.get(..HEADER_BYTES)?;
        // Any non-zero flag is "compressed", as grpc-go reads it.
        let compressed = header[0] != 0;
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if self.buffer.len() < HEADER_BYTES + length {
            return None;
        }
        self.buffer.advance(HEADER_BYTES);
        let payload = self.buffer.split_to(length).freeze();
        Some(Message {
            compressed,
            payload,
        })
    }

    /// The stream ended: anything left is a message cut short.
    pub fn finish(&self) -> Result<(), CodecError> {
        match self.buffer.len() {
            0 => Ok(()),
            left => Err(CodecError::Truncated(left)),
        }
    }
}

pub fn gzip(payload: &[u8]) -> Result<Vec<u8>, CodecError> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(payload.len() / 2 + 64),
        flate2::Compression::fast(),
    );
    encoder
        .write_all(payload)
        .and_then(|()| encoder.finish())
        .map_err(|e| CodecError::Corrupt(e.to_string()))
}

/// Inflates one message, refusing to grow past `limit` bytes (a small
/// message can inflate to gigabytes).
pub fn gunzip(payload: &[u8], limit: usize) -> Result<Vec<u8>, CodecError> {
    use std::io::Read;
    // flate2 reads no bytes as no data; for gRPC it is not a gzip stream.
    if payload.is_empty() {
        return Err(CodecError::Corrupt("an empty gzip stream".to_string()));
    }
    let mut out = Vec::with_capacity(payload.len().saturating_mul(4).min(limit));
    let mut decoder = flate2::read::GzDecoder::new(payload)
        .take(u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1));
    decoder
        .read_to_end(&mut out)
        .map_err(|e| CodecError::Corrupt(e.to_string()))?;
    if out.len() > limit {
        return Err(CodecError::TooLarge(limit));
    }
    Ok(out)
}

/// Which way a [`Transcoder`] turns messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Plain messages of [`MIN_COMPRESSED_BYTES`] or more leave
    /// gzip-compressed, shorter ones plain (requests).
    Compress,
    /// gzip-compressed messages leave plain (responses); `limit` bounds one
    /// inflated message.
    Decompress { limit: usize },
}

/// Re-frames a body's messages one way, fed chunks as they come.
#[derive(Debug)]
pub struct Transcoder {
    deframer: Deframer,
    direction: Direction,
}

impl Transcoder {
    pub fn new(direction: Direction) -> Self {
        Self {
            deframer: Deframer::default(),
            direction,
        }
    }

    /// Feeds a chunk; returns every message it completed, transcoded and
    /// framed (empty if it completed none).
    pub fn feed(&mut self, chunk: impl Buf) -> Result<Bytes, CodecError> {
        self.deframer.push(chunk);
        let mut out = BytesMut::new();
        while let Some(message) = self.deframer.next_message() {
            let message = match (self.direction, message.compressed) {
                (Direction::Compress, false) if message.payload.len() >= MIN_COMPRESSED_BYTES => {
                    Message {
                        compressed: true,
                        payload: gzip(&message.payload)?.into(),
                    }
                }
                (Direction::Decompress { limit }, true) => Message {
                    compressed: false,
                    payload: gunzip(&message.payload, limit)?.into(),
                },
                // Already as wanted.
                _ => message,
            };
            message.write_to(&mut out)?;
        }
        Ok(out.freeze())
    }

    pub fn finish(&self) -> Result<(), CodecError> {
        self.deframer.finish()
    }
}

/// A body with its messages transcoded; trailers and errors pass through,
/// and a framing error ends it with that error.
pub struct Transcoded<B> {
    inner: B,
    codec: Transcoder,
    done: bool,
}

impl<B> Transcoded<B> {
    pub fn new(inner: B, direction: Direction) -> Self {
        Self {
            inner,
            codec: Transcoder::new(direction),
            done: false,
        }
    }
}

impl<B> Body for Transcoded<B>
where
    B: Body<Data = Bytes, Error = Status> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(status)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
                None => {
                    this.done = true;
                    return Poll::Ready(this.codec.finish().err().map(|e| Err(e.into())));
                }
            };
            let result = match frame.into_data() {
                Ok(data) => match this.codec.feed(data) {
                    // Wait for the rest of the message.
                    Ok(out) if out.is_empty() => continue,
                    Ok(out) => Ok(Frame::data(out)),
                    Err(e) => Err(e),
                },
                // Trailers come after the last message.
                Err(trailers) => this.codec.finish().map(|()| trailers),
            };
            if result.is_err() {
                this.done = true;
            }
            return Poll::Ready(Some(result.map_err(Status::from)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// The tower service: the channel below, with gzip while `on` holds.
#[derive(Clone)]
pub struct Gzip<S> {
    inner: S,
    on: Arc<AtomicBool>,
}

type Request = http::Request<TonicBody>;
type Response = http::Response<TonicBody>;

impl<S> Service<Request> for Gzip<S>
where
    S: Service<Request, Response = Response>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let request = if self.on.load(Ordering::Relaxed) && compresses(request.uri().path()) {
            compress_request(request)
        } else {
            request
        };
        let response = self.inner.call(request);
        Box::pin(async move { Ok(decompress_response(response.await.map_err(Into::into)?)) })
    }
}

fn compress_request(request: Request) -> Request {
    let (mut parts, body) = request.into_parts();
    parts
        .headers
        .insert("grpc-encoding", http::HeaderValue::from_static(GZIP));
    parts
        .headers
        .insert("grpc-accept-encoding", http::HeaderValue::from_static(GZIP));
    let body = TonicBody::new(Transcoded::new(body, Direction::Compress));
    Request::from_parts(parts, body)
}

/// A response the server compressed, inflated; any other as it came.
fn decompress_response(response: Response) -> Response {
    let gzipped = response
        .headers()
        .get("grpc-encoding")
        .is_some_and(|encoding| encoding.as_bytes() == GZIP.as_bytes());
    if !gzipped {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    parts.headers.remove("grpc-encoding");
    let limit = crate::etcd::real::MAX_MESSAGE_BYTES;
    let body = TonicBody::new(Transcoded::new(body, Direction::Decompress { limit }));
    Response::from_parts(parts, body)
}

/// `etcd-client`'s `EndpointUpdater`, which it does not export.
type EndpointUpdater = tokio::sync::mpsc::Sender<
    tonic::transport::channel::Change<http::Uri, tonic::transport::Endpoint>,
>;

/// Builds `etcd-client`'s balanced channel under [`Gzip`]; `on` can change
/// after the connect (`auto` decides once the members have answered).
pub struct GzipChannel {
    pub on: Arc<AtomicBool>,
}

impl BalancedChannelBuilder for GzipChannel {
    type Error = tonic::transport::Error;

    fn balanced_channel(
        self,
        buffer_size: usize,
    ) -> Result<(Channel, EndpointUpdater), Self::Error> {
        let (channel, updater) = tonic::transport::Channel::balance_channel(buffer_size);
        let service = Gzip {
            inner: channel,
            on: self.on,
        };
        Ok((Channel::Custom(BoxCloneSyncService::new(service)), updater))
    }
}

/// What a side's connect chose, and why (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub on: bool,
    pub why: String,
}

/// The last connect's decision per side: for the hint on a refused
/// request, and to log a decision once rather than at every member's
/// connect and reconnect.
static DECISIONS: std::sync::Mutex<[Option<Decision>; 2]> = std::sync::Mutex::new([None, None]);

fn index(side: Side) -> usize {
    match side {
        Side::Source => 0,
        Side::Destination => 1,
    }
}

fn decisions() -> std::sync::MutexGuard<'static, [Option<Decision>; 2]> {
    DECISIONS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Records the side's decision; returns the one it replaces.
pub fn record(side: Side, decision: Decision) -> Option<Decision> {
    decisions()[index(side)].replace(decision)
}

/// The side's last decision, if it connected.
pub fn decision(side: Side) -> Option<Decision> {
    decisions()[index(side)].clone()
}

/// Whether the side's requests go gzip-compressed.
pub fn in_use(side: Side) -> bool {
    decision(side).is_some_and(|d| d.on)
}

/// An etcd version as numbers: "3.5.1" is (3, 5, 1); a suffix after `-` or
/// `+` is ignored, a missing part is 0. None if it is not a version.
pub fn parse_version(text: &str) -> Option<(u64, u64, u64)> {
    let core = text.trim().split(['-', '+']).next()?;
    let mut parts = core.split('.').map(str::parse::<u64>);
    let major = parts.next()?.ok()?;
    let minor = parts.next().unwrap_or(Ok(0)).ok()?;
    let patch = parts.next().unwrap_or(Ok(0)).ok()?;
    parts.next().is_none().then_some((major, minor, patch))
}

/// The first etcd release that accepts gzip-compressed requests.
pub const FIRST_GZIP_VERSION: (u64, u64, u64) = (3, 5, 0);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn framed(messages: &[Message]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for message in messages {
            message.write_to(&mut out).expect("frame");
        }
        out.to_vec()
    }

    /// Feeds `bytes` cut at `cuts` (positions, any order) and collects what
    /// comes out.
    fn run(codec: &mut Transcoder, bytes: &[u8], cuts: &[usize]) -> Result<Vec<u8>, CodecError> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.push(0);
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let mut out = Vec::new();
        for pair in cuts.windows(2) {
            out.extend_from_slice(&codec.feed(&bytes[pair[0]..pair[1]])?);
        }
        codec.finish()?;
        Ok(out)
    }

    fn messages_of(bytes: &[u8]) -> Vec<Message> {
        let mut deframer = Deframer::default();
        deframer.push(bytes);
        let messages = std::iter::from_fn(|| deframer.next_message()).collect();
        deframer.finish().expect("whole messages");
        messages
    }

    fn payloads() -> impl Strategy<Value = Vec<Vec<u8>>> {
        prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..300),
                // Compressible, like etcd's keys and JSON values.
                (0..2000usize).prop_map(|n| b"{\"key\":\"value\"}".repeat(n / 15 + 1)),
            ],
            0..8,
        )
    }

    proptest! {
        #[test]
        fn compress_then_decompress_gives_the_same_messages(
            payloads in payloads(),
            cuts_in in prop::collection::vec(any::<usize>(), 0..12),
            cuts_out in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let plain: Vec<Message> = payloads
                .into_iter()
                .map(|p| Message { compressed: false, payload: p.into() })
                .collect();
            let sent = run(&mut Transcoder::new(Direction::Compress), &framed(&plain), &cuts_in)
                .expect("compress");
            let on_wire = messages_of(&sent);
            prop_assert_eq!(on_wire.len(), plain.len());
            for (wire, message) in on_wire.iter().zip(&plain) {
                prop_assert_eq!(wire.compressed, message.payload.len() >= MIN_COMPRESSED_BYTES);
            }
            let limit = 1 << 20;
            let back = run(&mut Transcoder::new(Direction::Decompress { limit }), &sent, &cuts_out)
                .expect("decompress");
            prop_assert_eq!(messages_of(&back), plain);
        }

        #[test]
        fn a_body_cut_inside_a_message_is_an_error(
            payloads in payloads().prop_filter("a message", |p| !p.is_empty()),
            cut in any::<usize>(),
        ) {
            let plain: Vec<Message> = payloads
                .into_iter()
                .map(|p| Message { compressed: false, payload: p.into() })
                .collect();
            let bytes = framed(&plain);
            let end = cut % bytes.len();
            let on_a_boundary = {
                let mut at = 0;
                let mut ends = vec![0];
                for m in &plain {
                    at += HEADER_BYTES + m.payload.len();
                    ends.push(at);
                }
                ends.contains(&end)
            };
            let result = run(&mut Transcoder::new(Direction::Compress), &bytes[..end], &[]);
            prop_assert_eq!(result.is_err(), !on_a_boundary);
        }

        #[test]
        fn a_damaged_gzip_message_is_an_error_not_a_panic(
            payload in prop::collection::vec(any::<u8>(), 0..500),
            keep in any::<usize>(),
            flips in prop::collection::vec((any::<usize>(), 1..=255u8), 0..4),
        ) {
            let mut compressed = gzip(&payload).expect("gzip");
            compressed.truncate(keep % (compressed.len() + 1));
            let cut = compressed.len();
            for (at, mask) in &flips {
                if cut > 0 {
                    compressed[at % cut] ^= mask;
                }
            }
            let message = Message { compressed: true, payload: compressed.into() };
            let mut codec = Transcoder::new(Direction::Decompress { limit: 1 << 20 });
            // Whatever a damaged stream inflates to, it never panics; cut
            // short it never inflates to the original (gzip has a length
            // and a CRC in its trailer).
            let result = run(&mut codec, &framed(&[message]), &[]);
            if flips.is_empty() && cut < gzip(&payload).expect("gzip").len() {
                prop_assert!(result.is_err());
            }
        }
    }

    #[test]
    fn a_message_inflating_past_the_limit_is_refused() {
        let big = vec![b'a'; 10_000];
        let message = Message {
            compressed: true,
            payload: gzip(&big).expect("gzip").into(),
        };
        let mut codec = Transcoder::new(Direction::Decompress { limit: 9_999 });
        assert_eq!(
            codec.feed(framed(std::slice::from_ref(&message)).as_slice()),
            Err(CodecError::TooLarge(9_999))
        );
        // Exactly at the limit is allowed, as tonic allows it.
        let mut codec = Transcoder::new(Direction::Decompress { limit: 10_000 });
        let back = codec
            .feed(framed(&[message]).as_slice())
            .expect("at the limit");
        assert_eq!(messages_of(&back)[0].payload.len(), 10_000);
        // Refused as tonic refuses an oversized message; anything else is internal.
        assert_eq!(
            Status::from(CodecError::TooLarge(1)).code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            Status::from(CodecError::Truncated(1)).code(),
            tonic::Code::Internal
        );
    }

    #[test]
    fn plain_messages_pass_a_decompressor_untouched() {
        let message = Message {
            compressed: false,
            payload: Bytes::from_static(b"plain"),
        };
        let bytes = framed(std::slice::from_ref(&message));
        let mut codec = Transcoder::new(Direction::Decompress { limit: 100 });
        assert_eq!(codec.feed(bytes.as_slice()).expect("feed"), bytes);
    }

    /// Only the bulk reads ask for gzip: a watch or a keepalive stream
    /// answers in small messages, each one longer once compressed.
    #[test]
    fn only_bulk_rpcs_ask_for_gzip() {
        assert!(compresses("/etcdserverpb.KV/Range"));
        assert!(compresses("/etcdserverpb.KV/Txn"));
        assert!(compresses("/etcdserverpb.Lease/LeaseLeases"));
        assert!(!compresses("/etcdserverpb.Watch/Watch"));
        assert!(!compresses("/etcdserverpb.Lease/LeaseKeepAlive"));
        assert!(!compresses("/etcdserverpb.Lease/LeaseTimeToLive"));
        assert!(!compresses("/etcdserverpb.Maintenance/Status"));
    }

    #[test]
    fn versions_compare_as_numbers() {
        assert_eq!(parse_version("3.5.1"), Some((3, 5, 1)));
        assert_eq!(parse_version("3.4.23"), Some((3, 4, 23)));
        assert_eq!(parse_version("3.10.0-rc.1"), Some((3, 10, 0)));
        assert_eq!(parse_version("3.5"), Some((3, 5, 0)));
        assert_eq!(parse_version("not a version"), None);
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("3.5.1.2"), None);
        assert!(parse_version("3.10.0").expect("v") >= FIRST_GZIP_VERSION);
        assert!(parse_version("3.4.23").expect("v") < FIRST_GZIP_VERSION);
    }

    /// A body split anywhere, with trailers, comes out transcoded with the
    /// trailers after it; an error from below reaches the reader.
    #[tokio::test]
    async fn a_body_keeps_its_trailers_and_its_errors() {
        use http_body_util::BodyExt;
        let payload = b"{\"a\":1}".repeat(50);
        let message = Message {
            compressed: false,
            payload: payload.clone().into(),
        };
        let bytes = Bytes::from(framed(&[message]));
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames: Vec<Result<Frame<Bytes>, Status>> = vec![
            Ok(Frame::data(bytes.slice(..3))),
            Ok(Frame::data(bytes.slice(3..))),
            Ok(Frame::trailers(trailers.clone())),
        ];
        let inner = TonicBody::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )));
        let body = Transcoded::new(inner, Direction::Compress);
        // Not ended before it is read: h2 would send the request without it.
        assert!(!body.is_end_stream());
        let collected = body.collect().await.expect("body");
        assert_eq!(collected.trailers(), Some(&trailers));
        let on_wire = messages_of(&collected.to_bytes());
        assert_eq!(on_wire.len(), 1);
        assert_eq!(
            gunzip(&on_wire[0].payload, 1 << 20).expect("inflate"),
            payload
        );

        let frames: Vec<Result<Frame<Bytes>, Status>> = vec![
            Ok(Frame::data(bytes.slice(..3))),
            Err(Status::unavailable("reset")),
        ];
        let inner = TonicBody::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )));
        let error = Transcoded::new(inner, Direction::Compress)
            .collect()
            .await
            .expect_err("the error reaches the reader");
        assert_eq!(error.code(), tonic::Code::Unavailable);
    }
}
