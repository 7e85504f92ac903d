//! What operators use: the `status`, `promote` and `reset` actions on a
//! destination, and the HTTP endpoints (`/metrics`, `/healthz`, `/readyz`, `/status`).

pub mod admin;
pub mod http;
pub mod point_in_time;
