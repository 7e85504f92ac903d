//! etcd-syncer: mirror etcd key prefixes from a primary cluster to a hot
//! standby, with an atomic checkpoint, fenced writes and exact checks.
//!
//! One module per responsibility:
//! - [`config`]: command line, config file, validation (exit code 2).
//! - [`client`]: connections, TLS, auth, error classification.
//! - [`keys`]: prefix ranges, the dest-prefix rewrite, meta key layout.
//! - [`batch`]: coalescing revisions into txns (pure).
//! - [`diff`]: merging two sorted key streams (pure).
//! - [`mirror`]: full sync, watch, apply, checkpoint: the job state machine.
//! - [`election`], [`replica`]: one lock per job, fenced writes, takeover.
//! - [`check`]: the exact point-in-time consistency check; [`pager`] feeds it and the full sync.
//! - [`metrics`], [`http`], [`health`], [`telemetry`]: operations.
//! - [`admin`]: the `status` and `promote` commands.
//! - [`app`]: wiring for each command.

pub mod admin;
pub mod app;
pub mod batch;
pub mod check;
pub mod client;
pub mod config;
pub mod diff;
pub mod election;
pub mod health;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod mirror;
pub mod pager;
pub mod replica;
pub mod telemetry;
