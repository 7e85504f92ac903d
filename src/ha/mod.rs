//! High availability: every instance campaigns for every job; the leader's
//! lock key becomes part of the write fence. The leader of the first job
//! also runs `--sync-auth` ([`auth_sync`], planned by [`auth_plan`]).

pub mod auth_plan;
pub mod auth_sync;
pub mod election;
pub mod replica;
pub mod zk_replica;
