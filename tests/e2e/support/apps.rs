//! The test application the mesh forwards to.

use super::*;

/// A tiny HTTP/1.1 server on 127.0.0.1 that answers every request with 200 and a fixed body,
/// counting requests and raw bytes received; an optional delay before each answer makes slow
/// upstreams for timeout tests. Keep-alive is honoured. Stops, closing every connection, on
/// drop.
pub struct HttpApp {
    addr: SocketAddr,
    shared: AppShared,
    acceptor: Option<JoinHandle<()>>,
    handlers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

#[derive(Clone)]
struct AppShared {
    body: Arc<Vec<u8>>,
    requests: Arc<AtomicU64>,
    /// Requests per path (query string left out).
    paths: Arc<Mutex<HashMap<String, u64>>>,
    bytes: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
    /// The head of the last request, lower-cased.
    last_head: Arc<Mutex<String>>,
    /// Every request's target as it arrived (case kept, query included), in order.
    targets: Arc<Mutex<Vec<String>>>,
    /// A header line every answer carries, set by `set_response_header`.
    response_header: Arc<Mutex<String>>,
    /// How many of the next answers fail, and with which status (`fail_next`).
    failing: Arc<Mutex<(u32, u16)>>,
}

impl HttpApp {
    /// On a free port.
    pub fn start(body: &str) -> HttpApp {
        HttpApp::start_on(free_port(), body)
    }

    pub fn start_on(port: u16, body: &str) -> HttpApp {
        HttpApp::start_at("127.0.0.1", port, body)
    }

    /// On `ip`: a host's own address in a test namespace (an app outside the mesh).
    pub fn start_at(ip: &str, port: u16, body: &str) -> HttpApp {
        let listener = TcpListener::bind((ip, port))
            .unwrap_or_else(|e| panic!("HttpApp bind {ip}:{port}: {e}"));
        let addr = listener.local_addr().expect("local_addr");
        let shared = AppShared {
            body: Arc::new(body.as_bytes().to_vec()),
            requests: Arc::new(AtomicU64::new(0)),
            paths: Arc::default(),
            bytes: Arc::new(AtomicU64::new(0)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(HashMap::new())),
            last_head: Arc::default(),
            targets: Arc::default(),
            response_header: Arc::default(),
            failing: Arc::default(),
        };
        let handlers: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let acceptor = {
            let shared = shared.clone();
            let handlers = handlers.clone();
            thread::spawn(move || accept_loop(listener, shared, handlers))
        };
        HttpApp {
            addr,
            shared,
            acceptor: Some(acceptor),
            handlers,
        }
    }

    /// Applies to requests that arrive from now on.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.shared.delay_ms.store(ms, Ordering::SeqCst);
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Complete requests received (counted before the delay, so a slow request counts even if
    /// the client gave up).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Waits (up to 60 s) until the app is sent requests: three more than when called.
    pub fn wait_serving(&self, what: &str) {
        let start = self.requests();
        wait_until(Duration::from_secs(60), what, || {
            self.requests() > start + 3
        })
        .unwrap();
    }

    /// Waits (up to 60 s) until the app proves it is no longer sent requests: none for 1.5 s.
    pub fn wait_idle(&self, what: &str) {
        wait_until(Duration::from_secs(60), what, || {
            let before = self.requests();
            thread::sleep(Duration::from_millis(1500));
            self.requests() == before
        })
        .unwrap();
    }

    /// Complete requests received for `path` (any query string).
    pub fn requests_for(&self, path: &str) -> u64 {
        self.shared
            .paths
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// The head (request line and headers) of the last request, lower-cased.
    pub fn last_request_head(&self) -> String {
        self.shared.last_head.lock().unwrap().clone()
    }

    /// Every request's target (the request line's second word) exactly as it arrived, in
    /// order: what a proxy in front really forwarded.
    pub fn request_targets(&self) -> Vec<String> {
        self.shared.targets.lock().unwrap().clone()
    }

    /// Every answer from now on carries the header `name: value`.
    pub fn set_response_header(&self, name: &str, value: &str) {
        *self.shared.response_header.lock().unwrap() = format!("{name}: {value}\r\n");
    }

    /// The next `n` requests are answered with `status` (an injected fault, for retries).
    pub fn fail_next(&self, n: u32, status: u16) {
        *self.shared.failing.lock().unwrap() = (n, status);
    }

    pub fn bytes_received(&self) -> u64 {
        self.shared.bytes.load(Ordering::SeqCst)
    }
}

impl Drop for HttpApp {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // accept() has no timeout; a connection of our own wakes it to see the stop flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for (_, conn) in self.shared.conns.lock().unwrap().drain() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        for handler in self.handlers.lock().unwrap().drain(..) {
            let _ = handler.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    shared: AppShared,
    handlers: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else {
            // E.g. out of file descriptors: back off instead of spinning.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let id = next_id;
        next_id += 1;
        if let Ok(clone) = conn.try_clone() {
            shared.conns.lock().unwrap().insert(id, clone);
        }
        let shared = shared.clone();
        let handler = thread::spawn(move || {
            serve_connection(conn, &shared);
            shared.conns.lock().unwrap().remove(&id);
        });
        let mut handlers = handlers.lock().unwrap();
        // Long benchmark runs open many connections; keep only live handles.
        handlers.retain(|h| !h.is_finished());
        handlers.push(handler);
    }
}

fn serve_connection(mut conn: TcpStream, shared: &AppShared) {
    // Bounds how long an idle keep-alive connection pins a thread.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = conn.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut read_more = |conn: &mut TcpStream, buf: &mut Vec<u8>| -> bool {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                shared.bytes.fetch_add(n as u64, Ordering::SeqCst);
                buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    };
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !read_more(&mut conn, &mut buf) {
                return;
            }
        };
        let raw_head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let target = raw_head
            .lines()
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or_default()
            .to_string();
        let head = raw_head.to_ascii_lowercase();
        let request_line = head.lines().next().unwrap_or_default().to_string();
        let header = |name: &str| {
            head.lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == name)
                .map(|(_, v)| v.trim().to_string())
        };
        let connection = header("connection").unwrap_or_default();
        let mut close = if request_line.ends_with("http/1.0") {
            !connection.contains("keep-alive")
        } else {
            connection.contains("close")
        };
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            // Enough for tests: read to the last chunk, then close instead of parsing trailers.
            while find(&buf[head_end - 2..], b"\r\n0\r\n\r\n").is_none() {
                if !read_more(&mut conn, &mut buf) {
                    return;
                }
            }
            buf.clear();
            close = true;
        } else {
            let len: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < head_end + len {
                if !read_more(&mut conn, &mut buf) {
                    return;
                }
            }
            buf.drain(..head_end + len);
        }
        shared.requests.fetch_add(1, Ordering::SeqCst);
        *shared.last_head.lock().unwrap() = head.clone();
        shared.targets.lock().unwrap().push(target);
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .split('?')
            .next()
            .unwrap_or_default()
            .to_string();
        *shared.paths.lock().unwrap().entry(path).or_default() += 1;

        let delay = Duration::from_millis(shared.delay_ms.load(Ordering::SeqCst));
        let until = Instant::now() + delay;
        // Sliced so dropping the app does not wait out a long delay.
        while Instant::now() < until {
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            thread::sleep(remaining(until).min(Duration::from_millis(10)));
        }

        let status = {
            let mut f = shared.failing.lock().unwrap();
            if f.0 > 0 {
                f.0 -= 1;
                format!("{} Injected", f.1)
            } else {
                "200 OK".to_string()
            }
        };
        let mut response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}{}\r\n",
            shared.body.len(),
            shared.response_header.lock().unwrap(),
            if close { "Connection: close\r\n" } else { "" }
        )
        .into_bytes();
        if !request_line.starts_with("head ") {
            response.extend_from_slice(&shared.body);
        }
        if conn.write_all(&response).is_err() || close {
            let _ = conn.shutdown(Shutdown::Write);
            return;
        }
    }
}
