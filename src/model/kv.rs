//! A key as etcd stores it, as plain data.

/// `mvccpb.KeyValue`: the key, its value, and the metadata a revision-exact
/// copy must keep.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    /// 0 when the key is not attached to a lease.
    pub lease: i64,
}
