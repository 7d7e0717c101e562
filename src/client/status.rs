//! `beacon status [SERVICE]`: a terminal table of services, endpoints and
//! their verdicts from a running beacon's admin API (`/v1/services`,
//! `/v1/events`, `/metrics`). Colored only when stdout is a terminal;
//! `--output json` passes the API's JSON through. Exit 1 when a listed
//! service has no serving endpoint, so scripts can use it.

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
    let mut text = table(&list, color);
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

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

struct Row {
    service: String,
    endpoint: String,
    verdict: &'static str,
    reason: String,
    /// The weight the proxy balances with now (`3 of 10` while it ramps).
    weight: String,
    conns: String,
}

fn verdict(e: &Value, panic: bool) -> &'static str {
    match (e["healthy"].as_bool(), e["health"]["ejected"].is_string()) {
        (_, true) => "ejected",
        (Some(true), _) => "healthy",
        _ if panic => "panic",
        _ => "unhealthy",
    }
}

fn weight(e: &Value) -> String {
    let now = e["effective_weight"].as_f64();
    let full = e["weight"].as_f64();
    match (now, full) {
        (Some(n), Some(f)) if n != f => format!("{n} of {f}"),
        (_, Some(f)) => f.to_string(),
        _ => "-".into(),
    }
}

fn rows(services: &[Value]) -> Vec<Row> {
    let mut out = Vec::new();
    for s in services {
        let key = format!("{}.{}", str_of(&s["name"]), str_of(&s["namespace"]));
        let eps = s["endpoints"].as_array().cloned().unwrap_or_default();
        let panic = s["panic"].as_bool() == Some(true);
        if eps.is_empty() {
            out.push(Row {
                service: key.clone(),
                endpoint: "-".into(),
                verdict: "none",
                reason: "no endpoints".into(),
                weight: "-".into(),
                conns: "-".into(),
            });
        }
        for (i, e) in eps.iter().enumerate() {
            let endpoint = match e["port"].as_u64() {
                Some(p) => format!("{}:{p}", str_of(&e["ip"])),
                None => str_of(&e["ip"]).to_string(),
            };
            out.push(Row {
                service: if i == 0 { key.clone() } else { String::new() },
                endpoint,
                verdict: verdict(e, panic),
                reason: str_of(&e["reason"]).to_string(),
                weight: weight(e),
                conns: e["connections"].as_u64().unwrap_or(0).to_string(),
            });
        }
    }
    out
}

const HEAD: [&str; 6] = [
    "SERVICE",
    "ENDPOINT",
    "VERDICT",
    "REASON",
    "WEIGHT",
    "CONNECTIONS",
];

/// The table: one row per endpoint (the service named on its first row),
/// with the endpoint's weight now and its open proxy connections.
pub fn table(services: &[Value], color: bool) -> String {
    let rows = rows(services);
    let cells = |r: &Row| -> [String; 6] {
        [
            r.service.clone(),
            r.endpoint.clone(),
            r.verdict.to_string(),
            r.reason.clone(),
            r.weight.clone(),
            r.conns.clone(),
        ]
    };
    let mut w = HEAD.map(str::len);
    for r in &rows {
        for (w, c) in w.iter_mut().zip(cells(r)) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: [String; 6], verdict: Option<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let padded = format!("{c:w$}  ", w = w[i]);
            let painted = match (i, verdict) {
                (2, Some("healthy")) => format!("\x1b[32m{padded}\x1b[0m"),
                (2, Some("panic")) => format!("\x1b[33m{padded}\x1b[0m"),
                (2, Some(_)) => format!("\x1b[31m{padded}\x1b[0m"),
                _ => padded,
            };
            l += &painted;
        }
        l.trim_end().to_string()
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}", line(HEAD.map(String::from), None));
    for r in &rows {
        let _ = writeln!(out, "{}", line(cells(r), color.then_some(r.verdict)));
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
                {"ip": "10.0.0.1", "port": 9001, "healthy": true, "reason": "probe passing", "health": {"ejected": null},
                 "weight": 10, "effective_weight": 10.0, "connections": 3},
                {"ip": "10.0.0.2", "weight": 5, "effective_weight": 0.0, "healthy": false, "reason": "probe failed: refused", "health": {"ejected": null}},
                {"ip": "10.0.0.3", "healthy": false, "reason": "ejected: 5 connect failures", "health": {"ejected": "ejected: 5 connect failures"}}
            ]}),
            json!({"name": "db", "namespace": "shop", "serving": 0, "endpoints": []}),
        ];
        let t = table(&services, false);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("SERVICE"), "{t}");
        assert!(
            lines[1].starts_with("web.default  10.0.0.1:9001  healthy"),
            "{t}"
        );
        assert!(
            lines[1].ends_with("probe passing                10      3"),
            "{t}"
        );
        assert!(lines[2].ends_with("refused        0 of 5  0"), "{t}");
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
        assert!(table(&services, true).contains("\x1b[31munhealthy"));
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
