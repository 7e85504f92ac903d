//! etcd's server errors as types: the one place a gRPC status from etcd is
//! told apart by more than its code.
//!
//! etcd reuses codes (InvalidArgument means a bad password, an empty user
//! name, too many txn ops or a stale auth revision alike), and its own Go
//! client tells them apart by the status's whole description:
//! `rpctypes.Error` looks it up in `errStringToError`
//! (etcd `api/v3rpc/rpctypes/error.go`). This module does the same, with
//! the same descriptions, matched whole and together with their code. Every
//! decision elsewhere matches on [`ServerError`] or on the gRPC code, never
//! on text.

use tonic::Code;

/// The etcd server errors the syncer acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerError {
    /// `ErrGRPCCompacted`.
    Compacted,
    /// `ErrGRPCFutureRev`.
    FutureRevision,
    /// `ErrGRPCNoSpace`: the cluster's quota alarm is raised.
    NoSpace,
    /// `ErrGRPCAuthFailed`: wrong user or password.
    AuthFailed,
    /// `ErrGRPCUserEmpty`.
    UserEmpty,
    /// `ErrGRPCPermissionDenied`.
    PermissionDenied,
    /// `ErrGRPCInvalidAuthToken`: expired or unknown token.
    InvalidAuthToken,
    /// A token minted before an auth-store change: `ErrGRPCAuthOldRevision`
    /// on 3.4; on 3.5 the auth store's own `ErrAuthOldRevision` reaches the
    /// client unconverted, with code Unknown.
    AuthOldRevision,
    /// `ErrGRPCLeaseNotFound`.
    LeaseNotFound,
    /// `ErrGRPCLeaseExist`.
    LeaseExists,
    /// `ErrGRPCTooManyOps`.
    TooManyOps,
    /// `ErrGRPCRequestTooLarge`.
    RequestTooLarge,
}

/// etcd's (code, description) pairs for [`ServerError`], as its server sends them.
const KNOWN: &[(Code, &str, ServerError)] = &[
    (
        Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted",
        ServerError::Compacted,
    ),
    (
        Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
        ServerError::FutureRevision,
    ),
    (
        Code::ResourceExhausted,
        "etcdserver: mvcc: database space exceeded",
        ServerError::NoSpace,
    ),
    (
        Code::InvalidArgument,
        "etcdserver: authentication failed, invalid user ID or password",
        ServerError::AuthFailed,
    ),
    (
        Code::InvalidArgument,
        "etcdserver: user name is empty",
        ServerError::UserEmpty,
    ),
    (
        Code::PermissionDenied,
        "etcdserver: permission denied",
        ServerError::PermissionDenied,
    ),
    (
        Code::Unauthenticated,
        "etcdserver: invalid auth token",
        ServerError::InvalidAuthToken,
    ),
    (
        Code::InvalidArgument,
        "etcdserver: revision of auth store is old",
        ServerError::AuthOldRevision,
    ),
    (
        Code::Unknown,
        "auth: revision in header is old",
        ServerError::AuthOldRevision,
    ),
    (
        Code::NotFound,
        "etcdserver: requested lease not found",
        ServerError::LeaseNotFound,
    ),
    (
        Code::FailedPrecondition,
        "etcdserver: lease already exists",
        ServerError::LeaseExists,
    ),
    (
        Code::InvalidArgument,
        "etcdserver: too many operations in txn request",
        ServerError::TooManyOps,
    ),
    (
        Code::InvalidArgument,
        "etcdserver: request is too large",
        ServerError::RequestTooLarge,
    ),
];

/// Which etcd server error a status is, if it is one of [`KNOWN`].
pub fn identify(status: &tonic::Status) -> Option<ServerError> {
    KNOWN
        .iter()
        .find(|(code, description, _)| status.code() == *code && status.message() == *description)
        .map(|(_, _, error)| *error)
}

/// The status etcd sends for `error` (its first form, for one with two):
/// what the in-memory model answers, and what an error etcd-client reports
/// in its own words becomes at the wire adapter.
pub fn status_of(error: ServerError) -> tonic::Status {
    let (code, description, _) = KNOWN
        .iter()
        .find(|(_, _, known)| *known == error)
        .expect("every ServerError has a row");
    tonic::Status::new(*code, *description)
}

/// [`identify`] for any client error.
pub fn server_error(error: &etcd_client::Error) -> Option<ServerError> {
    match error {
        etcd_client::Error::GRpcStatus(status) => identify(status),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_counts_only_whole_and_with_its_code() {
        let status = |code, text: &str| tonic::Status::new(code, text);
        assert_eq!(
            identify(&status(
                Code::InvalidArgument,
                "etcdserver: revision of auth store is old"
            )),
            Some(ServerError::AuthOldRevision)
        );
        assert_eq!(
            identify(&status(Code::Unknown, "auth: revision in header is old")),
            Some(ServerError::AuthOldRevision)
        );
        // Another code, or more text around it, is not etcd's error.
        assert_eq!(
            identify(&status(
                Code::Unavailable,
                "etcdserver: revision of auth store is old"
            )),
            None
        );
        assert_eq!(
            identify(&status(
                Code::InvalidArgument,
                "proxy: etcdserver: user name is empty"
            )),
            None
        );
        for (code, description, error) in KNOWN {
            assert_eq!(identify(&status(*code, description)), Some(*error));
            assert_eq!(identify(&status_of(*error)), Some(*error));
        }
    }
}
