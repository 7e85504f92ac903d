//! `check --source zookeeper://…`: a ZooKeeper tree against a zk2etcd job's
//! destination prefix, exactly (values, and leases where the nodes are
//! ephemeral); keys another writer holds are counted apart.

use crate::etcd::client::Cluster;
use crate::mirror::zk2etcd::{connect, read_destination, walk, ZkError};
use crate::model::keys::MetaKeys;
use crate::model::zk::{compare_tree, TreeReport};

/// Walks the tree of `job.prefixes` and reads the destination and the
/// job's ownership records, then compares them.
pub async fn check_tree(
    job: &crate::config::ZkJob,
    dest: &Cluster,
    keys: &MetaKeys,
) -> Result<TreeReport, ZkError> {
    let client = connect(job).await?;
    let tree = walk(&client, &job.prefixes, job.ephemeral).await?;
    let (entries, owned) = read_destination(dest, keys, &job.prefixes).await?;
    Ok(compare_tree(&tree, &entries, &owned))
}
