//! A load driver for the source: several writers issuing single puts,
//! multi-key txns, deletes and range deletes, optionally rate limited,
//! stopping after a known number of operations.

use std::time::{Duration, Instant};

use anyhow::Result;
use etcd_client::{Client, DeleteOptions, Txn, TxnOp};
use tokio::task::JoinSet;

#[derive(Debug, Clone)]
pub struct Load {
    pub prefix: String,
    pub writers: usize,
    /// Operations (source revisions) each writer issues.
    pub ops_per_writer: usize,
    /// Keys written per txn; 1 is a plain put.
    pub keys_per_txn: usize,
    pub value_size: usize,
    /// Every n-th operation of a writer deletes the key it wrote n ops before.
    pub delete_every: Option<usize>,
    /// Every n-th operation range-deletes a small group of the writer's keys.
    pub range_delete_every: Option<usize>,
    /// Operations per second per writer; `None` is as fast as possible.
    pub rate_per_writer: Option<f64>,
    /// Distinguishes runs that reuse key names, so values always change.
    pub tag: String,
}

impl Load {
    pub fn new(prefix: &str, writers: usize, ops_per_writer: usize) -> Self {
        Self {
            prefix: prefix.to_string(),
            writers,
            ops_per_writer,
            keys_per_txn: 1,
            value_size: 64,
            delete_every: None,
            range_delete_every: None,
            rate_per_writer: None,
            tag: "load".to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LoadReport {
    pub operations: usize,
    pub keys_written: usize,
    pub elapsed: Duration,
    /// The source revision after the last operation of every writer.
    pub last_revision: i64,
}

impl Load {
    /// Runs every writer to completion.
    pub async fn run(&self, clients: &[Client]) -> Result<LoadReport> {
        let started = Instant::now();
        let mut writers = JoinSet::new();
        for writer in 0..self.writers {
            let mut client = clients[writer % clients.len()].clone();
            let load = self.clone();
            writers.spawn(async move { load.write(writer, &mut client).await });
        }
        let mut report = LoadReport {
            operations: 0,
            keys_written: 0,
            elapsed: Duration::ZERO,
            last_revision: 0,
        };
        while let Some(result) = writers.join_next().await {
            let (operations, keys, revision) = result??;
            report.operations += operations;
            report.keys_written += keys;
            report.last_revision = report.last_revision.max(revision);
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }

    async fn write(&self, writer: usize, client: &mut Client) -> Result<(usize, usize, i64)> {
        let value: Vec<u8> = format!("{}:{writer}:", self.tag)
            .into_bytes()
            .into_iter()
            .chain(std::iter::repeat(b'x'))
            .take(self.value_size.max(8))
            .collect();
        let key = |i: usize, k: usize| format!("{}w{writer:02}/{i:07}-{k:02}", self.prefix);
        let interval = self
            .rate_per_writer
            .map(|rate| Duration::from_secs_f64(1.0 / rate));
        let started = Instant::now();
        let mut keys = 0;
        let mut revision = 0;
        for i in 0..self.ops_per_writer {
            if let Some(interval) = interval {
                let due = started + interval * i as u32;
                tokio::time::sleep_until(due.into()).await;
            }
            let header =
                if let Some(every) = self.range_delete_every.filter(|e| i > 0 && i % e == 0) {
                    // Deletes the group of keys written by op i-every (all its k's).
                    let group = format!("{}w{writer:02}/{:07}-", self.prefix, i - every);
                    client
                        .delete(group, Some(DeleteOptions::new().with_prefix()))
                        .await?
                        .header()
                        .cloned()
                } else if let Some(every) = self.delete_every.filter(|e| i >= *e && i % e == 1) {
                    client
                        .delete(key(i - every, 0), None)
                        .await?
                        .header()
                        .cloned()
                } else if self.keys_per_txn <= 1 {
                    keys += 1;
                    client
                        .put(key(i, 0), value.clone(), None)
                        .await?
                        .header()
                        .cloned()
                } else {
                    let ops: Vec<TxnOp> = (0..self.keys_per_txn)
                        .map(|k| TxnOp::put(key(i, k), value.clone(), None))
                        .collect();
                    keys += self.keys_per_txn;
                    client
                        .txn(Txn::new().and_then(ops))
                        .await?
                        .header()
                        .cloned()
                };
            revision = revision.max(header.map_or(0, |h| h.revision()));
        }
        Ok((self.ops_per_writer, keys, revision))
    }
}
