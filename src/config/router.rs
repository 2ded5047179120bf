//! Router options. Owned by the router work; see `super` for the pattern.

use clap::Args;
use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Default, Clone, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RouterOpts {}
crate::merge_fields!(RouterOpts {});

#[derive(Debug, Clone, Default)]
pub struct RouterConfig {}

impl RouterOpts {
    pub fn resolve(self) -> Result<RouterConfig, ConfigError> {
        Ok(RouterConfig {})
    }
}
