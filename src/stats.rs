//! The stats endpoint on `-stats-addr`: `/health` (the process answers) and `/ready` (HAProxy
//! serves the full configuration: 200 in phase Ready only, 503 while starting or draining).
//! One small thread; it reads the phase others publish and owns no state anyone needs.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Context, Result};

/// The lifecycle phase as the endpoint reports it; written only by the supervisor.
#[derive(Clone, Default)]
pub struct PhaseCell(Arc<AtomicU8>);

pub const STARTING: u8 = 0;
pub const WAITING_FOR_CONSUL: u8 = 1;
pub const READY: u8 = 2;
pub const DRAINING: u8 = 3;
pub const STOPPED: u8 = 4;

impl PhaseCell {
    pub fn set(&self, phase: u8) {
        self.0.store(phase, Ordering::SeqCst);
    }
    pub fn get(&self) -> u8 {
        self.0.load(Ordering::SeqCst)
    }
}

fn phase_name(p: u8) -> &'static str {
    match p {
        STARTING => "starting",
        WAITING_FOR_CONSUL => "waiting for consul",
        READY => "ready",
        DRAINING => "draining",
        _ => "stopped",
    }
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
        "/ready" if p == READY => ("200 OK", "ready\n".to_string()),
        "/ready" => (
            "503 Service Unavailable",
            format!("not ready: {}\n", phase_name(p)),
        ),
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
        phase.set(READY);
        assert!(get(addr, "/ready").starts_with("HTTP/1.1 200"));
        phase.set(DRAINING);
        let r = get(addr, "/ready");
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("draining"),
            "{r}"
        );
        assert!(get(addr, "/nope").starts_with("HTTP/1.1 404"));
        assert!(get(addr, "/metrics").ends_with("hcc_ready 1\n"));
    }
}
