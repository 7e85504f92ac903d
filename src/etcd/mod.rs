//! The etcd layer.

pub mod client;
pub mod pager;
