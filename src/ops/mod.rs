//! What operators use: the `status`, `promote` and `reset` actions on a
//! destination, `failback` (the promoted standby copied back to the old
//! primary), the HTTP endpoints (`/metrics`, `/healthz`, `/readyz`, `/status`),
//! and the [`supervisor`] of a running `mirror-plus`'s jobs (live reloads).

pub mod admin;
pub mod failback;
pub mod http;
pub mod point_in_time;
pub mod supervisor;
pub mod zk_check;
