//! The stats endpoint on `-stats-addr`: `/health` (the process answers) and `/ready` (HAProxy
//! serves the full configuration: 200 in phase Ready only, 503 while starting or draining).
//! One small thread; it reads the phase others publish and owns no state anyone needs.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::consul::client::{deregister_path, Consul, AGENT_SELF_PATH, REGISTER_PATH};
use crate::error::{Context, Result};
use crate::phase::{Phase, PhaseCell};

/// The stats endpoint registered in Consul as a service (`-stats-service-register`): named after
/// the sidecar's service, tagged for what it is, checked through `/ready` at the address it
/// really listens on. Deregistered when the drain starts.
pub struct StatsService {
    id: String,
}

impl StatsService {
    pub fn register(
        consul: &Consul,
        proxy_id: &str,
        service: &str,
        registration_address: &str,
        stats: SocketAddr,
    ) -> Result<StatsService> {
        let (id, body) = registration(consul, proxy_id, service, registration_address, stats)?;
        let answer = consul.send("PUT", REGISTER_PATH, Some(&body))?;
        if answer.status != 200 {
            return Err(crate::error::Error::msg(format!(
                "registering {id}: status {}: {}",
                answer.status,
                answer.body.trim()
            )));
        }
        log::info!("registered the stats endpoint in Consul as {id}");
        Ok(StatsService { id })
    }

    pub fn deregister(self, consul: &Consul) {
        let id = self.id;
        match consul.send("PUT", &deregister_path(&id), None) {
            Ok(a) if a.status == 200 => log::info!("deregistered {id} from Consul"),
            Ok(a) => log::warn!("deregistering {id}: status {}", a.status),
            Err(e) => log::warn!("deregistering {id}: {e}"),
        }
    }
}

fn registration(
    consul: &Consul,
    proxy_id: &str,
    service: &str,
    registration_address: &str,
    stats: SocketAddr,
) -> Result<(String, String)> {
    // An unspecified listen address is reached at the proxy's own address, else the node's.
    let address = if stats.ip().is_unspecified() {
        if registration_address.is_empty() {
            consul.agent_address()?.ok_or_else(|| {
                crate::error::Error::msg(format!(
                    "the token may not read {AGENT_SELF_PATH}, so the agent did not say its address (Member.Addr)"
                ))
            })?
        } else {
            registration_address.to_string()
        }
    } else {
        stats.ip().to_string()
    };
    let host = if address.contains(':') {
        format!("[{address}]")
    } else {
        address.clone()
    };
    let id = format!("{proxy_id}-stats");
    let body = serde_json::json!({
        "ID": id,
        "Name": format!("{service}-sidecar-stats"),
        "Tags": ["haproxy-consul-connect", "stats", "metrics"],
        "Meta": {"proxy": proxy_id, "metrics_path": "/metrics"},
        "Address": address,
        "Port": stats.port(),
        "Check": {
            "Name": "sidecar ready",
            "HTTP": format!("http://{host}:{}/ready", stats.port()),
            "Interval": "10s",
            "Timeout": "2s",
            "DeregisterCriticalServiceAfter": "10m"
        }
    });
    Ok((id, body.to_string()))
}

/// Produces the /metrics body at scrape time.
pub type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds `addr` (a failure here is a configuration error) and serves it on its own thread.
pub fn serve(addr: SocketAddr, phase: PhaseCell, metrics: Option<MetricsFn>) -> Result<SocketAddr> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("listening on -stats-addr {addr}"))?;
    let bound = listener.local_addr().context("reading the stats address")?;
    std::thread::Builder::new()
        .name("stats".into())
        .stack_size(128 * 1024)
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if let Err(e) = answer(conn, &phase, metrics.as_ref()) {
                    log::debug!("stats request: {e}");
                }
            }
        })
        .context("starting the stats thread")?;
    log::info!("stats endpoint on http://{bound} (/health, /ready, /metrics)");
    Ok(bound)
}

fn answer(conn: TcpStream, phase: &PhaseCell, metrics: Option<&MetricsFn>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Headers are read and dropped: nothing here depends on them.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let p = phase.get();
    let mut content_type = "text/plain";
    let (status, body) = match path {
        "/health" => ("200 OK", "ok\n".to_string()),
        "/metrics" if metrics.is_some() => {
            content_type = "text/plain; version=0.0.4";
            ("200 OK", metrics.map(|m| m()).unwrap_or_default())
        }
        "/ready" if p == Phase::Ready => ("200 OK", "ready\n".to_string()),
        "/ready" => ("503 Service Unavailable", format!("not ready: {p}\n")),
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn ready_follows_the_phase() {
        let phase = PhaseCell::default();
        let metrics: MetricsFn = Arc::new(|| "hcc_ready 1\n".to_string());
        let addr = serve("127.0.0.1:0".parse().unwrap(), phase.clone(), Some(metrics)).unwrap();
        assert!(get(addr, "/health").starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/ready").starts_with("HTTP/1.1 503"));
        phase.set(Phase::Ready);
        assert!(get(addr, "/ready").starts_with("HTTP/1.1 200"));
        phase.set(Phase::Draining);
        let r = get(addr, "/ready");
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("draining"),
            "{r}"
        );
        assert!(get(addr, "/nope").starts_with("HTTP/1.1 404"));
        assert!(get(addr, "/metrics").ends_with("hcc_ready 1\n"));
    }
}
