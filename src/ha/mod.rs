//! High availability: every instance campaigns for every job; the leader's
//! lock key becomes part of the write fence.

pub mod election;
pub mod replica;
