//! etcd-syncer: mirror etcd key prefixes from a primary cluster to a hot
//! standby, with an atomic checkpoint, fenced writes and exact checks.
//!
//! Layers, each using only the ones above it in this list:
//! - [`model`]: pure logic and the on-destination schema (batching, diff,
//!   keys, checkpoint and markers). No I/O.
//! - [`telemetry`]: logs, metrics, liveness state.
//! - [`config`]: command line, config file, validation (exit code 2).
//! - [`etcd`]: the narrow [`etcd::Etcd`] trait the replicator talks through,
//!   its real implementation over `etcd-client`, the in-memory etcd model the
//!   simulator runs on, error classification, paging.
//! - [`check`]: the exact point-in-time consistency check.
//! - [`mirror`]: full sync, watch, apply, checkpoint, fences: the job state machine.
//! - [`ha`]: one lock per job, leader election, takeover.
//! - [`ops`]: operator commands (`status`, `promote`, `reset`) and the HTTP endpoints.
//! - [`cli`]: one file per command; `main.rs` only parses and maps exit codes.

pub mod check;
pub mod cli;
pub mod config;
pub mod etcd;
pub mod ha;
pub mod mirror;
pub mod model;
pub mod ops;
pub mod telemetry;
