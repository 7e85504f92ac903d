//! The config file's sections that are not single settings: each side's
//! connection and the list of jobs. The file itself, with one key per
//! setting, is `table.rs`'s `FileConfig`.

use std::path::PathBuf;

use bytesize::ByteSize;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileCluster {
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Several ways to reach the cluster, most preferred first (instead of
    /// `endpoints`): `[[source.endpoint-groups]]` with a name and endpoints.
    #[serde(default)]
    pub endpoint_groups: Vec<FileEndpointGroup>,
    pub cacert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// Read the password from a file (a mounted Secret), trailing newline trimmed.
    pub password_file: Option<PathBuf>,
    pub compression: Option<super::settings::Compression>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileEndpointGroup {
    pub name: String,
    pub endpoints: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileJob {
    pub name: Option<String>,
    pub prefix: String,
    pub dest_prefix: Option<String>,
    #[serde(default)]
    pub no_dest_prefix: bool,
    pub max_write_ops_per_second: Option<u64>,
    pub max_write_bytes_per_second: Option<ByteSize>,
    #[serde(default)]
    pub exclude_prefixes: Vec<String>,
}
