//! The Docker Engine client: where the Engine is ([`DockerHost`], from
//! `--docker-host`) and the one place a client is made ([`connect`]).
//! Discovery, the cluster network and cleanup all connect through here.

use std::path::PathBuf;

use anyhow::Context;
use bollard::Docker;

/// The Engine's socket when neither `--docker-host` nor `$DOCKER_HOST` says
/// otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Timeout of one Docker API call, in seconds (bollard's unit).
const API_TIMEOUT_S: u64 = 30;

/// Where to find the Docker Engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerHost {
    /// No Docker Engine: discovery is off.
    None,
    Unix(PathBuf),
    /// `tcp://` or `http://`, kept as an http URL.
    Http(String),
}

impl Default for DockerHost {
    fn default() -> Self {
        DockerHost::Unix(PathBuf::from(DEFAULT_SOCKET))
    }
}

/// A client of the Engine at `host`. Nothing is sent yet; a session
/// negotiates the API version (`Docker::negotiate_version`) before use.
pub fn connect(host: &DockerHost) -> anyhow::Result<Docker> {
    let version = bollard::API_DEFAULT_VERSION;
    match host {
        DockerHost::Unix(path) => {
            let path = path.to_str().context("Docker socket path is not UTF-8")?;
            Docker::connect_with_unix(path, API_TIMEOUT_S, version)
                .context("connecting to the Docker socket")
        }
        DockerHost::Http(url) => Docker::connect_with_http(url, API_TIMEOUT_S, version)
            .context("connecting to the Docker API"),
        DockerHost::None => anyhow::bail!("discovery is off (--docker-host none)"),
    }
}
