//! The connections HAProxy opens to the agent: accepting them on the socket and serving each
//! one start to end (hello, each NOTIFY answered in order by its ACK, disconnect).

use super::*;

pub(super) async fn accept_loop(
    listener: UnixListener,
    ctx: Arc<Ctx>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            // Reap finished tasks so the set does not grow with every connection ever made.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    ctx.stats.connections.fetch_add(1, Ordering::Relaxed);
                    conns.spawn(serve_connection(stream, Arc::clone(&ctx), shutdown.clone()));
                }
                Err(e) => {
                    // Typically EMFILE; pausing keeps a persistent error from spinning a core.
                    log::warn!("SPOE accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        log::debug!("SPOE shutdown: dropping {} connections", conns.len());
        conns.abort_all();
    }
    log::info!("SPOE agent stopped");
}

/// Resolves once shutdown is requested (or the handle is gone). The guard `wait_for` returns
/// is dropped here because it must not live across the awaits that follow in a task.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// How a connection ends, decided while handling a frame.
enum Next {
    Continue,
    /// Flush what is queued, then close.
    Close,
}

/// A protocol failure: answered with AGENT-DISCONNECT(status) and logged at warn.
struct Fail {
    status: StatusCode,
    problem: String,
}

impl From<FrameError> for Fail {
    fn from(e: FrameError) -> Self {
        Fail {
            status: e.status_code(),
            problem: e.to_string(),
        }
    }
}

struct Conn {
    stream: UnixStream,
    ctx: Arc<Ctx>,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// Before HELLO our own limit; after, the negotiated one.
    max_frame: usize,
    ready: bool,
}

async fn serve_connection(stream: UnixStream, ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>) {
    let mut c = Conn {
        stream,
        ctx,
        inbuf: Vec::with_capacity(4096),
        out: Vec::with_capacity(256),
        max_frame: AGENT_MAX_FRAME_SIZE as usize,
        ready: false,
    };
    loop {
        // Answer every frame already buffered (pipelining: several NOTIFYs may arrive in one
        // read), in order, then write the answers in one go.
        let mut next = Next::Continue;
        loop {
            match frame::decode(&c.inbuf, c.max_frame) {
                Ok(None) => break,
                Ok(Some((f, used))) => {
                    c.inbuf.drain(..used);
                    match c.handle(f) {
                        Ok(Next::Continue) => {}
                        Ok(Next::Close) => {
                            next = Next::Close;
                            break;
                        }
                        Err(fail) => return c.fail(fail).await,
                    }
                }
                Err(e) => return c.fail(e.into()).await,
            }
        }
        if let Err(e) = c.flush().await {
            c.ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
            log::warn!("SPOE connection: write failed: {e}");
            return;
        }
        if let Next::Close = next {
            return;
        }

        let wait = if c.ready { IDLE_TIMEOUT } else { HELLO_TIMEOUT };
        c.inbuf.reserve(8192);
        let read = tokio::select! {
            () = stopped(&mut shutdown) => {
                c.say_goodbye(StatusCode::Normal, "agent shutting down").await;
                return;
            }
            r = tokio::time::timeout(wait, c.stream.read_buf(&mut c.inbuf)) => r,
        };
        match read {
            Err(_elapsed) => {
                let what = if c.ready {
                    "idle timeout"
                } else {
                    "no HELLO in time"
                };
                return c
                    .fail(Fail {
                        status: StatusCode::Timeout,
                        problem: what.into(),
                    })
                    .await;
            }
            Ok(Ok(0)) => {
                if !c.inbuf.is_empty() {
                    log::debug!(
                        "SPOE connection closed by HAProxy with {} bytes of a frame unread",
                        c.inbuf.len()
                    );
                }
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                c.ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("SPOE connection: read failed: {e}");
                return;
            }
        }
    }
}

impl Conn {
    fn handle(&mut self, f: Frame) -> Result<Next, Fail> {
        match (self.ready, f) {
            (false, Frame::HaproxyHello(kv)) => {
                let hello = HaproxyHello::from_kv(&kv)?;
                let size = hello.negotiate_frame_size(AGENT_MAX_FRAME_SIZE);
                self.queue(&Frame::agent_hello(size))?;
                if hello.healthcheck {
                    // A health check is not a session: HAProxy closes after our HELLO.
                    self.ctx.stats.health_checks.fetch_add(1, Ordering::Relaxed);
                    return Ok(Next::Close);
                }
                log::debug!(
                    "SPOE connection from engine {}: max-frame-size {size}, capabilities {:?}",
                    hello.engine_id.as_deref().unwrap_or("-"),
                    hello.capabilities
                );
                self.max_frame = size as usize;
                self.ready = true;
                Ok(Next::Continue)
            }
            (true, Frame::Notify(n)) => {
                let started = std::time::Instant::now();
                let ack = if n.messages.iter().any(|m| m.name == REQUEST_MESSAGE) {
                    let decision = self.decide_request(&n);
                    self.ctx.record(&decision, true);
                    let mut actions = vec![frame::Action::SetVar {
                        scope: VarScope::Transaction,
                        name: REQUEST_VAR.into(),
                        value: TypedData::Bool(decision.allow),
                    }];
                    // What the accepted token changes on the request (`objects` numbers the
                    // headers as the table does).
                    let f = &decision.forwarded;
                    if let Some(i) = f.strip {
                        actions.push(frame::Action::SetVar {
                            scope: VarScope::Transaction,
                            name: JWT_STRIP_VAR.into(),
                            value: TypedData::Uint32(u32::try_from(i).unwrap_or(u32::MAX)),
                        });
                    }
                    if let Some((i, payload)) = &f.payload {
                        actions.push(frame::Action::SetVar {
                            scope: VarScope::Transaction,
                            name: JWT_FORWARD_VAR.into(),
                            value: TypedData::Uint32(u32::try_from(*i).unwrap_or(u32::MAX)),
                        });
                        actions.push(frame::Action::SetVar {
                            scope: VarScope::Transaction,
                            name: JWT_PAYLOAD_VAR.into(),
                            value: TypedData::String(payload.clone().into_bytes()),
                        });
                    }
                    // The connection's later requests look up the current table's rules.
                    actions.extend(decision.fast_key.map(fast_key_action));
                    Frame::Ack(frame::Ack {
                        stream_id: n.stream_id,
                        frame_id: n.frame_id,
                        actions,
                    })
                } else {
                    let (decision, generation) = self.decide(&n);
                    self.ctx.record(&decision, false);
                    let xfcc = if decision.allow {
                        client_cert_details(&n)
                    } else {
                        None
                    };
                    self.connection_ack(&n, decision, generation, xfcc)
                };
                self.queue(&ack)?;
                self.ctx.stats.decision_time.record(started.elapsed());
                Ok(Next::Continue)
            }
            (_, Frame::HaproxyDisconnect(kv)) => {
                match Disconnect::from_kv(&kv) {
                    // 0 is a reload or stop, 2 an idle timeout: routine.
                    Ok(d) if d.status_code == 0 || d.status_code == 2 => log::debug!(
                        "SPOE connection: HAProxy disconnected ({} {})",
                        d.status_code,
                        d.message.escape_debug()
                    ),
                    Ok(d) => log::warn!(
                        "SPOE connection: HAProxy disconnected with status {}: {}",
                        d.status_code,
                        d.message.escape_debug()
                    ),
                    Err(e) => log::warn!("SPOE connection: malformed HAPROXY-DISCONNECT: {e}"),
                }
                self.queue(&Frame::agent_disconnect(StatusCode::Normal, "normal"))?;
                Ok(Next::Close)
            }
            (ready, other) => Err(Fail {
                status: StatusCode::Invalid,
                problem: format!(
                    "unexpected {} frame {}",
                    other.frame_type(),
                    if ready { "after HELLO" } else { "before HELLO" }
                ),
            }),
        }
    }

    /// The answer to [`CHECK_MESSAGE`]: `allow`, the generation of the table that decided,
    /// the caller's service ([`APP_VAR`]) on an allowed connection, and for a connection whose
    /// requests are each judged also `l7` and `src`, all session variables.
    fn connection_ack(
        &self,
        n: &Notify,
        d: Decision,
        generation: String,
        xfcc: Option<String>,
    ) -> Frame {
        let mut actions = vec![frame::Action::SetVar {
            scope: VarScope::Session,
            name: self.ctx.var_name.clone(),
            value: TypedData::Bool(d.allow),
        }];
        // A table that can only deny has none: the connection is then asked about again.
        if !generation.is_empty() {
            actions.push(frame::Action::SetVar {
                scope: VarScope::Session,
                name: GENERATION_VAR.into(),
                value: TypedData::String(generation.into_bytes()),
            });
        }
        // Only a name a service can have reaches a header: the certificate is the mesh CA's,
        // but its path is percent-decoded and could hold anything.
        let app = d
            .source
            .as_deref()
            .filter(|_| d.allow)
            .and_then(|src| crate::pki::SpiffeId::parse(src).ok())
            .and_then(|id| crate::value::Name::parse("source service", &id.service).ok());
        if let Some(app) = app {
            actions.push(frame::Action::SetVar {
                scope: VarScope::Session,
                name: APP_VAR.into(),
                value: TypedData::String(app.as_str().as_bytes().to_vec()),
            });
        }
        if let Some(v) = xfcc {
            actions.push(frame::Action::SetVar {
                scope: VarScope::Session,
                name: XFCC_VAR.into(),
                value: TypedData::String(v.into_bytes()),
            });
        }
        if d.allow && d.per_request {
            if let Some(src) = d.source {
                actions.push(frame::Action::SetVar {
                    scope: VarScope::Session,
                    name: L7_VAR.into(),
                    value: TypedData::Bool(true),
                });
                actions.push(frame::Action::SetVar {
                    scope: VarScope::Session,
                    name: SRC_VAR.into(),
                    value: TypedData::String(src.into_bytes()),
                });
                actions.extend(d.fast_key.map(fast_key_action));
            }
        }
        Frame::Ack(frame::Ack {
            stream_id: n.stream_id,
            frame_id: n.frame_id,
            actions,
        })
    }

    /// Decides one request of a connection [`CHECK_MESSAGE`] let in with `l7`. Anything
    /// missing or malformed denies.
    fn decide_request(&self, n: &Notify) -> Decision {
        let arg = |name: &str| n.find_arg(Some(REQUEST_MESSAGE), name);
        let text = |name: &str| match arg(name) {
            Some(TypedData::String(b)) => std::str::from_utf8(b).ok(),
            _ => None,
        };
        let Some(src) = text("src") else {
            return Decision::deny(
                format!("{REQUEST_MESSAGE} has no src string (var(sess.hcc.src))"),
                None,
            );
        };
        let (Some(method), Some(path)) = (text("method"), text("path")) else {
            return Decision::deny(
                format!("{REQUEST_MESSAGE} needs method and path strings"),
                Some(src),
            );
        };
        let fields = match arg("headers") {
            Some(TypedData::Binary(b)) => match frame::decode_hdrs_bin(b) {
                Ok(f) => f,
                Err(e) => return Decision::deny(format!("request headers: {e}"), Some(src)),
            },
            _ => {
                return Decision::deny(
                    format!("{REQUEST_MESSAGE} has no headers (req.hdrs_bin)"),
                    Some(src),
                )
            }
        };
        // HAProxy sends no query (NULL) for a path without `?`; only a JWT location reads it.
        let req = HdrsRequest {
            method,
            path: l7::url_path(path),
            query: text("query"),
            fields,
        };
        self.ctx.table.current().decide_request(src, &req)
    }

    /// The connection's decision, and the generation of the table that made it.
    fn decide(&self, n: &Notify) -> (Decision, String) {
        let table = self.ctx.table.current();
        let decision = match n.find_arg(Some(CHECK_MESSAGE), CERT_ARG) {
            Some(TypedData::Binary(der)) => table.decide(Some(der)),
            // ssl_c_der is NULL when the client sent no certificate.
            Some(TypedData::Null) => table.decide(None),
            Some(other) => Decision::deny(
                format!(
                    "NOTIFY argument {CERT_ARG} is {}, expected BINARY (ssl_c_der)",
                    other.type_name()
                ),
                None,
            ),
            None => Decision::deny(
                format!(
                    "NOTIFY has no {CERT_ARG} argument: spoe-message {CHECK_MESSAGE} \
                     must have args {CERT_ARG}=ssl_c_der"
                ),
                None,
            ),
        };
        (decision, table.generation().to_string())
    }

    fn queue(&mut self, f: &Frame) -> Result<(), Fail> {
        f.encode(self.max_frame, &mut self.out).map_err(|e| Fail {
            status: StatusCode::Resource,
            problem: format!("cannot encode {}: {e}", f.frame_type()),
        })
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(WRITE_TIMEOUT, self.stream.write_all(&self.out)).await {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
        }
        self.out.clear();
        Ok(())
    }

    async fn fail(mut self, fail: Fail) {
        self.ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "SPOE connection: {}; sending AGENT-DISCONNECT status {}",
            fail.problem,
            fail.status.code()
        );
        self.say_goodbye(fail.status, &fail.problem).await;
    }

    /// Best effort: the peer may already be gone, and we close either way. ACKs still queued
    /// for earlier frames of the same read go out first, so those streams get their answer.
    async fn say_goodbye(&mut self, status: StatusCode, message: &str) {
        // The negotiated size is at least 256 and the message is cut well below that.
        let _ = Frame::agent_disconnect(status, message).encode(self.max_frame, &mut self.out);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

/// The client certificate's `X-Forwarded-Client-Cert` fields, when the message asks for them
/// (an http listener sends the rest of the chain as [`CHAIN_ARG`], NULL when there is none or
/// the session was resumed).
fn client_cert_details(n: &Notify) -> Option<String> {
    let chain: &[u8] = match n.find_arg(Some(CHECK_MESSAGE), CHAIN_ARG)? {
        TypedData::Binary(b) => b,
        _ => &[],
    };
    match n.find_arg(Some(CHECK_MESSAGE), CERT_ARG)? {
        TypedData::Binary(der) => xfcc::details(der, chain),
        _ => None,
    }
}

/// Sets [`FAST_KEY_VAR`]: the key an L7 connection's requests are looked up under.
fn fast_key_action(key: String) -> frame::Action {
    frame::Action::SetVar {
        scope: VarScope::Session,
        name: FAST_KEY_VAR.into(),
        value: TypedData::String(key.into_bytes()),
    }
}

/// A request as [`REQUEST_MESSAGE`] carries it: header fields straight from `req.hdrs_bin`.
struct HdrsRequest<'a> {
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    fields: Vec<frame::HeaderField<'a>>,
}

impl l7::Request for HdrsRequest<'_> {
    fn method(&self) -> &str {
        self.method
    }
    fn path(&self) -> &str {
        self.path
    }
    fn header(&self, lower_name: &str) -> Option<String> {
        l7::join_fields(self.fields.iter().copied(), lower_name)
    }
    fn query(&self) -> Option<&str> {
        self.query
    }
}
