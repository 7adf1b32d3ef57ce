//! A minimal HTTP/1.1 client, std only, so the tests do not depend on the HTTP stack under test.

use super::*;

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// Header value by case-insensitive name (Consul sends `X-Consul-Contenthash`).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on a fresh connection (`Connection: close`). `timeout` bounds the whole
/// exchange, so a stalled peer fails the request instead of hanging the test.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<HttpResponse, String> {
    http_request_with(addr, method, path, &[], body, timeout)
}

/// `http_request` with extra request header lines `(name, value)`.
pub fn http_request_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<HttpResponse, String> {
    let deadline = Instant::now() + timeout;
    let err = |what: &str, e: &dyn std::fmt::Display| {
        format!("{method} http://{addr}{path}: {what}: {e}")
    };
    let targets: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| err("resolve", &e))?
        .collect();
    let target = targets
        .first()
        .ok_or_else(|| err("resolve", &"no address"))?;
    let mut stream = TcpStream::connect_timeout(target, timeout).map_err(|e| err("connect", &e))?;
    stream
        .set_write_timeout(Some(remaining(deadline)))
        .map_err(|e| err("set timeout", &e))?;
    let body = body.unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: hcc-test\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).map_err(|e| err("send", &e))?;

    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = remaining(deadline);
        if left.is_zero() {
            return Err(err("receive", &format!("timed out after {timeout:?}")));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| err("set timeout", &e))?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(err("receive", &format!("timed out after {timeout:?}")))
            }
            Err(e) => return Err(err("receive", &e)),
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(done) = parse_response(&buf, n == 0, method == "HEAD") {
            return done.map_err(|e| err("response", &e));
        }
        if n == 0 {
            return Err(err(
                "receive",
                &format!("connection closed after {} bytes", buf.len()),
            ));
        }
    }
}

/// GET `path` from `addr` ("127.0.0.1:PORT"): status and body, or why it failed.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    http_request(addr, "GET", path, None, timeout).map(|r| (r.status, r.body))
}

pub fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `None` while more bytes are needed; parsing as they arrive means a server that keeps the
/// connection open despite `Connection: close` still works.
fn parse_response(buf: &[u8], eof: bool, head_only: bool) -> Option<Result<HttpResponse, String>> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end - 4]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = match status_line.split_whitespace().nth(1).map(str::parse::<u16>) {
        Some(Ok(s)) => s,
        _ => return Some(Err(format!("bad status line {status_line:?}"))),
    };
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let rest = &buf[head_end..];
    let body = if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        match decode_chunked(rest)? {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        }
    } else if let Some(len) = get("content-length") {
        let Ok(len) = len.parse::<usize>() else {
            return Some(Err(format!("bad Content-Length {len:?}")));
        };
        if rest.len() < len {
            return None;
        }
        rest[..len].to_vec()
    } else if eof {
        rest.to_vec()
    } else {
        return None;
    };
    Some(Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }))
}

fn decode_chunked(mut rest: &[u8]) -> Option<Result<Vec<u8>, String>> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n")?;
        let line = String::from_utf8_lossy(&rest[..line_end]);
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            return Some(Err(format!("bad chunk size {line:?}")));
        };
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers, if any, end with an empty line; none of them matter here.
            find(rest, b"\r\n")?;
            return Some(Ok(body));
        }
        if rest.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}
