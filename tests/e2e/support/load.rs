//! Continuous load on a listener: a new connection per request, failures counted, so a test
//! can show that a change under way fails no request (or that no request reached the wrong
//! app).

use super::*;

/// Requests to `addr`, a new connection each, until stopped (or 120 s).
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    /// 200s whose body is not the expected one (see `Load::expecting`).
    other: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Load {
    /// Any 200 counts as served.
    pub fn start(addr: String) -> Load {
        Load::run(addr, None)
    }

    /// Only a 200 with `body` counts as served; another body is an answer from another app.
    pub fn expecting(addr: String, body: &str) -> Load {
        Load::run(addr, Some(body.to_string()))
    }

    fn run(addr: String, expect: Option<String>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let other = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, o, x, f, e) = (
            stop.clone(),
            ok.clone(),
            other.clone(),
            failed.clone(),
            errors.clone(),
        );
        let thread = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
                match http_get(&addr, "/", Duration::from_secs(5)) {
                    Ok((200, body)) if expect.as_ref().is_none_or(|b| *b == body) => {
                        o.fetch_add(1, Ordering::SeqCst)
                    }
                    Ok((200, _)) => x.fetch_add(1, Ordering::SeqCst),
                    other => {
                        e.lock().unwrap().push(format!("{other:?}"));
                        f.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        });
        Load {
            stop,
            ok,
            other,
            failed,
            errors,
            thread: Some(thread),
        }
    }

    /// How many requests so far another app answered.
    pub fn answered_by_another(&self) -> u64 {
        self.other.load(Ordering::SeqCst)
    }

    /// Stops the load; requests served, requests failed (another app's answer counts as a
    /// failure), and how each failure looked.
    pub fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst) + self.other.load(Ordering::SeqCst),
            self.errors.lock().unwrap().clone(),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
