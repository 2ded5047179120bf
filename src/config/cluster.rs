//! Cluster (netplane) options. Owned by the netplane work; see `super` for the pattern.

use clap::Args;
use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterOpts {}
crate::merge_fields!(ClusterOpts {});

#[derive(Debug, Clone, Default)]
pub struct ClusterConfig {}

impl ClusterOpts {
    pub fn resolve(self) -> Result<Option<ClusterConfig>, ConfigError> {
        Ok(None)
    }
}
