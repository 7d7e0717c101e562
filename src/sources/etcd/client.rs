//! The etcd client as both loops use it: connect options, request timeout.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::config::EtcdConfig;

/// One etcd request at most this long (a watch stream is not a request).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects a client to the configured members.
pub async fn connect(config: &EtcdConfig) -> Result<Client, etcd_client::Error> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if let Some((user, password)) = &config.user {
        options = options.with_user(user.clone(), password.clone());
    }
    tokio::time::timeout(
        CALL_TIMEOUT,
        Client::connect(&config.endpoints, Some(options)),
    )
    .await
    .map_err(|_| etcd_client::Error::InvalidArgs("connect timed out".into()))?
}

/// A request with [`CALL_TIMEOUT`].
pub async fn call<T>(
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| etcd_client::Error::InvalidArgs("request timed out".into()))?
}
