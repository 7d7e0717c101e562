//! `beacon status [SERVICE]`: a terminal table of services, endpoints and
//! their verdicts from a running beacon's admin API (`/v1/services`,
//! `/v1/events`, `/metrics`). Colored only when stdout is a terminal;
//! `--output json` passes the API's JSON through. Exit 1 when a listed
//! service has no serving endpoint, so scripts can use it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use super::http::{ClientError, Exit, http_get};

/// How `beacon status` prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// What one `beacon status` run asks for.
#[derive(Clone, Debug)]
pub struct Request {
    /// `name` or `name.namespace`.
    pub service: Option<String>,
    pub admin: SocketAddr,
    pub output: Output,
    pub watch: Option<Duration>,
}

/// Runs `beacon status`: once, or every `watch` until interrupted.
pub async fn run(req: Request, timeout: Duration) -> Exit {
    let color = std::io::stdout().is_terminal();
    loop {
        let exit = match once(&req, timeout, color).await {
            Ok((text, exit)) => {
                if req.watch.is_some() && color {
                    print!("\x1b[H\x1b[2J");
                }
                print!("{text}");
                exit
            }
            Err(e) => {
                eprintln!("beacon: status from {}: {e}", req.admin);
                Exit::Failed
            }
        };
        match req.watch {
            Some(every) => tokio::time::sleep(every).await,
            None => return exit,
        }
    }
}

/// `/v1/services?…` for `service` (`name` or `name.namespace`).
pub fn services_path(service: Option<&str>) -> String {
    let Some(s) = service else {
        return "/v1/services".into();
    };
    match s.split_once('.') {
        Some((name, ns)) => format!("/v1/services?name={}&namespace={}", enc(name), enc(ns)),
        None => format!("/v1/services?name={}", enc(s)),
    }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn get_json(admin: SocketAddr, path: &str, timeout: Duration) -> Result<Value, ClientError> {
    let (status, body) = http_get(admin, &admin.to_string(), path, timeout).await?;
    if status != 200 {
        return Err(ClientError::Status(status));
    }
    serde_json::from_str(&body).map_err(|e| ClientError::Io {
        what: format!("GET {path}"),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

async fn once(
    req: &Request,
    timeout: Duration,
    color: bool,
) -> Result<(String, Exit), ClientError> {
    let services = get_json(req.admin, &services_path(req.service.as_deref()), timeout).await?;
    let list = services["services"].as_array().cloned().unwrap_or_default();
    let dark = list.iter().any(|s| s["serving"].as_u64() == Some(0));
    let missing = req.service.is_some() && list.is_empty();
    let exit = if dark || missing {
        Exit::Failed
    } else {
        Exit::Ok
    };
    if req.output == Output::Json {
        return Ok((format!("{services}\n"), exit));
    }
    let (_, metrics) = http_get(req.admin, &req.admin.to_string(), "/metrics", timeout).await?;
    let mut text = table(&list, &active_connections(&metrics), color);
    if missing {
        let _ = writeln!(text, "no service {}", req.service.as_deref().unwrap_or(""));
    }
    if let [one] = list.as_slice() {
        let key = format!("{}.{}", str_of(&one["name"]), str_of(&one["namespace"]));
        let events = get_json(
            req.admin,
            &format!("/v1/events?service={}&limit=10", enc(&key)),
            timeout,
        )
        .await?;
        text += &events_text(&events);
    }
    Ok((text, exit))
}

/// `beacon_proxy_active_connections{service="…"}` by service.
pub fn active_connections(metrics: &str) -> HashMap<String, f64> {
    let prefix = "beacon_proxy_active_connections{service=\"";
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(prefix)?;
            let (service, value) = rest.split_once("\"} ")?;
            Some((service.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

struct Row {
    service: String,
    endpoint: String,
    verdict: &'static str,
    reason: String,
    conns: String,
}

fn rows(services: &[Value], active: &HashMap<String, f64>) -> Vec<Row> {
    let mut out = Vec::new();
    for s in services {
        let key = format!("{}.{}", str_of(&s["name"]), str_of(&s["namespace"]));
        let conns = active.get(&key).copied().unwrap_or(0.0).to_string();
        let eps = s["endpoints"].as_array().cloned().unwrap_or_default();
        let panic = s["panic"].as_bool() == Some(true);
        if eps.is_empty() {
            out.push(Row {
                service: key.clone(),
                endpoint: "-".into(),
                verdict: "none",
                reason: "no endpoints".into(),
                conns: conns.clone(),
            });
        }
        for (i, e) in eps.iter().enumerate() {
            let verdict = match (e["healthy"].as_bool(), e["health"]["ejected"].is_string()) {
                (_, true) => "ejected",
                (Some(true), _) => "healthy",
                _ if panic => "panic",
                _ => "unhealthy",
            };
            let endpoint = match e["port"].as_u64() {
                Some(p) => format!("{}:{p}", str_of(&e["ip"])),
                None => str_of(&e["ip"]).to_string(),
            };
            out.push(Row {
                service: if i == 0 { key.clone() } else { String::new() },
                endpoint,
                verdict,
                reason: str_of(&e["reason"]).to_string(),
                conns: if i == 0 { conns.clone() } else { String::new() },
            });
        }
    }
    out
}

/// The table: one row per endpoint, the service and its open connections
/// on its first row.
pub fn table(services: &[Value], active: &HashMap<String, f64>, color: bool) -> String {
    let rows = rows(services, active);
    let head = ["SERVICE", "ENDPOINT", "VERDICT", "REASON", "CONNECTIONS"];
    let width = |f: fn(&Row) -> &str, h: &str| {
        rows.iter()
            .map(|r| f(r).len())
            .chain([h.len()])
            .max()
            .unwrap_or(0)
    };
    let w = [
        width(|r| &r.service, head[0]),
        width(|r| &r.endpoint, head[1]),
        width(|r| r.verdict, head[2]),
        width(|r| &r.reason, head[3]),
    ];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:w0$}  {:w1$}  {:w2$}  {:w3$}  {}",
        head[0],
        head[1],
        head[2],
        head[3],
        head[4],
        w0 = w[0],
        w1 = w[1],
        w2 = w[2],
        w3 = w[3]
    );
    for r in &rows {
        let verdict = format!("{:w$}", r.verdict, w = w[2]);
        let verdict = match (color, r.verdict) {
            (false, _) => verdict,
            (true, "healthy") => format!("\x1b[32m{verdict}\x1b[0m"),
            (true, "panic") => format!("\x1b[33m{verdict}\x1b[0m"),
            (true, _) => format!("\x1b[31m{verdict}\x1b[0m"),
        };
        let line = format!(
            "{:w0$}  {:w1$}  {verdict}  {:w3$}  {}",
            r.service,
            r.endpoint,
            r.reason,
            r.conns,
            w0 = w[0],
            w1 = w[1],
            w3 = w[3]
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// The latest events of one service, oldest first.
pub fn events_text(events: &Value) -> String {
    let list = events["events"].as_array().cloned().unwrap_or_default();
    let mut out = String::from("\nRECENT EVENTS\n");
    if list.is_empty() {
        out += "  (none)\n";
    }
    for e in &list {
        let _ = writeln!(
            out,
            "  {}  v{}  {:<16} {:<15} {}",
            str_of(&e["time"]),
            e["version"],
            str_of(&e["kind"]),
            str_of(&e["endpoint"]),
            str_of(&e["reason"])
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_has_one_row_per_endpoint_and_no_color_when_asked() {
        let services = vec![
            json!({"name": "web", "namespace": "default", "panic": false, "serving": 1, "endpoints": [
                {"ip": "10.0.0.1", "port": 9001, "healthy": true, "reason": "probe passing", "health": {"ejected": null}},
                {"ip": "10.0.0.2", "healthy": false, "reason": "probe failed: refused", "health": {"ejected": null}},
                {"ip": "10.0.0.3", "healthy": false, "reason": "ejected: 5 connect failures", "health": {"ejected": "ejected: 5 connect failures"}}
            ]}),
            json!({"name": "db", "namespace": "shop", "serving": 0, "endpoints": []}),
        ];
        let metrics =
            "# TYPE x gauge\nbeacon_proxy_active_connections{service=\"web.default\"} 3\n";
        let active = active_connections(metrics);
        assert_eq!(active["web.default"], 3.0);
        let t = table(&services, &active, false);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("SERVICE"), "{t}");
        assert!(
            lines[1].starts_with("web.default  10.0.0.1:9001  healthy"),
            "{t}"
        );
        assert!(lines[1].ends_with("probe passing                3"), "{t}");
        assert!(
            lines[2].contains("10.0.0.2") && lines[2].contains("unhealthy  probe failed: refused"),
            "{t}"
        );
        assert!(lines[3].contains("ejected"), "{t}");
        assert!(
            lines[4].starts_with("db.shop") && lines[4].contains("none"),
            "{t}"
        );
        assert!(!t.contains('\x1b'));
        assert!(table(&services, &active, true).contains("\x1b[31munhealthy"));
    }

    #[test]
    fn service_paths() {
        assert_eq!(services_path(None), "/v1/services");
        assert_eq!(services_path(Some("web")), "/v1/services?name=web");
        assert_eq!(
            services_path(Some("web.shop")),
            "/v1/services?name=web&namespace=shop"
        );
        assert_eq!(services_path(Some("a b&")), "/v1/services?name=a%20b%26");
    }
}
