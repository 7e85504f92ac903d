//! The etcd layer: everything that talks to a cluster goes through
//! [`Cluster`], which wraps one [`api::Etcd`] backend.
//!
//! - [`api`]: the narrow trait and its plain request/response types.
//! - [`real`]: the backend over `etcd-client`.
//! - [`memory`]: the in-memory etcd model (for the simulator and tests).
//! - [`client`]: [`Cluster`], deadlines, error classification.
//! - [`compress`]: gzip on the gRPC link, under `etcd-client`'s channel.
//! - [`rpctypes`]: etcd's server errors as types (the one place a status
//!   is told apart by its description, as etcd's own client does).
//! - [`routes`]: endpoint-group failover and reconnects on rotated TLS
//!   and password files, swapping the connection under a [`Cluster`].
//! - [`retry`]: the one backoff and sleep helper every loop uses.
//! - [`pager`]: reading a prefix page by page.
//! - [`meta`]: reading a job's meta keys in one snapshot.
//! - [`auth`]: the auth store (roles, users) behind its own narrow trait, for `--sync-auth`.

pub mod api;
pub mod auth;
pub mod client;
pub mod compress;
pub mod memory;
pub mod meta;
pub mod pager;
pub mod periodic;
pub mod real;
pub mod retry;
pub mod routes;
pub mod rpctypes;

pub use client::{ClientError, Cluster, ClusterHead, FailureKind};
