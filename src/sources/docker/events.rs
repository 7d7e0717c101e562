//! Engine events and inspect results, read into the engine-independent
//! [`Container`] and the actions the source takes.

use bollard::models::{
    ContainerInspectResponse, ContainerStateStatusEnum, EventMessage, EventMessageTypeEnum,
    HealthStatusEnum,
};

use super::labels::{Container, HealthStatus, RunState};

/// What an event asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventAction {
    /// Re-inspect this container.
    Inspect(String),
    Ignore,
}

/// Which events matter: container lifecycle and health, network
/// (dis)connects. `exec_*` (every HEALTHCHECK run makes some) do not.
pub fn classify(ev: &EventMessage) -> EventAction {
    let action = ev.action.as_deref().unwrap_or("");
    let actor = ev.actor.as_ref();
    match ev.typ {
        Some(EventMessageTypeEnum::CONTAINER) => {
            let base = action.split(':').next().unwrap_or("").trim();
            let relevant = matches!(
                base,
                "start"
                    | "die"
                    | "stop"
                    | "kill"
                    | "pause"
                    | "unpause"
                    | "health_status"
                    | "rename"
                    | "destroy"
                    | "restart"
                    | "oom"
            );
            match actor.and_then(|a| a.id.clone()) {
                Some(id) if relevant => EventAction::Inspect(id),
                _ => EventAction::Ignore,
            }
        }
        Some(EventMessageTypeEnum::NETWORK) if matches!(action, "connect" | "disconnect") => {
            match actor
                .and_then(|a| a.attributes.as_ref())
                .and_then(|a| a.get("container"))
            {
                Some(id) => EventAction::Inspect(id.clone()),
                None => EventAction::Ignore,
            }
        }
        _ => EventAction::Ignore,
    }
}

/// A `kill` event with a signal that asks the container to stop (what
/// `docker stop` sends first), as opposed to e.g. SIGHUP for a reload.
pub fn stop_signal(ev: &EventMessage) -> bool {
    let signal = ev
        .actor
        .as_ref()
        .and_then(|a| a.attributes.as_ref())
        .and_then(|a| a.get("signal"))
        .map(|s| s.trim().trim_start_matches("SIG").to_ascii_uppercase());
    matches!(
        signal.as_deref(),
        Some("15" | "TERM" | "9" | "KILL" | "2" | "INT" | "3" | "QUIT")
    )
}

/// The engine's view of a container, reduced to [`Container`].
pub fn from_inspect(r: &ContainerInspectResponse) -> Container {
    let state = r.state.as_ref();
    let run = match state.and_then(|s| s.status) {
        Some(ContainerStateStatusEnum::RUNNING) if state.and_then(|s| s.paused) != Some(true) => {
            RunState::Running
        }
        Some(ContainerStateStatusEnum::PAUSED) | Some(ContainerStateStatusEnum::RUNNING) => {
            RunState::Paused
        }
        _ => RunState::Stopped,
    };
    let health = match state.and_then(|s| s.health.as_ref()).and_then(|h| h.status) {
        Some(HealthStatusEnum::STARTING) => HealthStatus::Starting,
        Some(HealthStatusEnum::HEALTHY) => HealthStatus::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => HealthStatus::Unhealthy,
        _ => HealthStatus::None,
    };
    let labels = r
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    let networks = r
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .map(|nets| {
            nets.iter()
                .map(|(name, ep)| {
                    let ip = ep
                        .ip_address
                        .as_deref()
                        .filter(|s| !s.is_empty())
                        .or(ep.global_ipv6_address.as_deref().filter(|s| !s.is_empty()))
                        .and_then(|s| s.parse().ok());
                    (name.clone(), ip)
                })
                .collect()
        })
        .unwrap_or_default();
    Container {
        id: r.id.clone().unwrap_or_default(),
        name: r
            .name
            .as_deref()
            .unwrap_or("")
            .trim_start_matches('/')
            .to_string(),
        labels,
        state: run,
        health,
        networks,
    }
}
