//! The pure model layer: no I/O, no clocks, no etcd client.
//!
//! - [`batch`]: coalescing source revisions into destination txns.
//! - [`diff`]: merging two sorted key streams into differences.
//! - [`exact`]: revision-exact replay: whole revisions, one txn each, parity.
//! - [`failback`]: the keys that can differ after a promotion, the lost
//!   writes of the old primary, and what makes it equal the standby.
//! - [`failover`]: which endpoint group of a cluster to use.
//! - [`kv`]: a key with its revisions, version and lease, as etcd stores it.
//! - [`keys`]: prefix ranges, the dest-prefix rewrite, the meta key layout.
//! - [`redact`]: how keys and values appear in logs (`--redact-keys`).
//! - [`schema`]: what the syncer stores on the destination (checkpoint,
//!   markers, lock values), versioned by its JSON fields.
//! - [`side`]: source or destination.
//! - [`versions`]: etcd versions and the watch pitfalls of each.

pub mod batch;
pub mod diff;
pub mod exact;
pub mod failback;
pub mod failover;
pub mod ids;
pub mod keys;
pub mod kv;
pub mod lease_book;
pub mod redact;
pub mod schema;
pub mod side;
pub mod versions;
pub mod zk;

pub use side::Side;
