//! Replication of one job (one prefix). The loop is [`job`]; its phases
//! are [`full_sync`] and [`incremental`]; every write goes through
//! [`fenced`] (data through [`writer`] and [`pipeline`], leases through
//! [`leases`]).

pub mod context;
pub mod error;
pub mod exact;
pub mod fenced;
pub mod full_sync;
pub mod history_window;
pub mod incremental;
pub mod job;
pub mod leases;
pub mod meta;
pub mod periodic_check;
pub mod pipeline;
pub mod rate;
pub mod resume;
pub mod watch_state;
pub mod writer;
pub mod zk2etcd;

// The layer's surface for the layers above (files in this one name the
// file an item lives in, so no two files here use each other in a circle).
pub use context::JobContext;
pub use error::{client_error_kind, Action, JobError, Policy, SlowPathReason};
pub use job::{decide, lease_mode_changed, run_job, Decision, NO_SPACE_POLL, PRUNE_GUARD_POLL};
pub use meta::{check_operator_markers, request_reset};
pub use resume::{verify_resume, ResumeEvidence};
