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
//! - [`metrics`], [`http`], [`health`], [`telemetry`]: operations.
//! - [`app`]: wiring for the `mirror-plus` command.

pub mod app;
pub mod batch;
pub mod client;
pub mod config;
pub mod diff;
pub mod health;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod mirror;
pub mod telemetry;
