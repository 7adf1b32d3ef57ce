//! The serving stretch of a run: the event loop while HAProxy runs (`serve`), one handler per
//! event (`on_*`), and the timers after every event (restarts due, the drain's deadline, a
//! debounced burst of Consul changes handed to the applier).

use super::*;

impl Supervisor {
    /// The event loop while HAProxy runs; returns the run's exit code.
    pub(super) fn serve(&mut self, srv: &mut Serving) -> i32 {
        loop {
            let flow = match self.rx.recv_timeout(srv.timeout()) {
                Ok(Event::Consul(update)) => self.on_consul(srv, *update),
                Ok(Event::Signal(Sig::Reconcile)) => self.on_reconcile(srv),
                Ok(Event::Signal(Sig::Stop)) => self.on_stop(srv),
                Ok(Event::Signal(Sig::ChildExited)) => self.on_child_exited(srv),
                Ok(Event::Applied(outcome)) => self.on_applied(srv, outcome),
                Ok(Event::Admission(verdicts)) => self.on_admission(srv, verdicts),
                Err(RecvTimeoutError::Timeout) => Flow::Continue,
                Err(RecvTimeoutError::Disconnected) => Flow::Finish,
            };
            let flow = match flow {
                Flow::Continue => self.on_timers(srv),
                other => other,
            };
            match flow {
                Flow::Continue => {}
                Flow::Exit(code) => return code,
                Flow::Finish => break,
            }
        }
        srv.children.drain_orphans(
            srv.drain_deadline.unwrap_or_else(Instant::now) + Duration::from_secs(1),
        );
        // The agent goes last: HAProxy asked it until its last connection was done.
        self.intentions = Intentions::Warned(String::new());
        self.life.set(Phase::Stopped, "all children stopped");
        0
    }

    fn on_consul(&mut self, srv: &mut Serving, update: Update) -> Flow {
        if self.absorb(update) && self.life.phase != Phase::Draining {
            let now = Instant::now();
            srv.dirty = Some((srv.dirty.map_or(now, |(first, _)| first), now));
        }
        Flow::Continue
    }

    /// New identity verdicts: applied like a Consul change (debounced with them).
    fn on_admission(&mut self, srv: &mut Serving, verdicts: Verdicts) -> Flow {
        if self.snapshot.admit(verdicts) && self.life.phase != Phase::Draining {
            let now = Instant::now();
            srv.dirty = Some((srv.dirty.map_or(now, |(first, _)| first), now));
        }
        Flow::Continue
    }

    /// SIGHUP: every file rendered anew from the current snapshot and replaced whole.
    fn on_reconcile(&mut self, srv: &mut Serving) -> Flow {
        if self.life.phase == Phase::Draining {
            return Flow::Continue;
        }
        log::info!("SIGHUP: full reconcile with the current Consul state");
        match self.build(Some(&srv.last_submitted)) {
            Ok(d) => {
                if let Some(a) = &srv.applier {
                    a.reconcile(d.clone());
                }
                self.want_checked(&d);
                self.registry.publish(&d);
                srv.last_submitted = d;
            }
            Err(e) => log::error!("SIGHUP: cannot build the configuration: {e}"),
        }
        Flow::Continue
    }

    /// SIGTERM/SIGINT: the first starts the drain, a second stops everything at once.
    fn on_stop(&mut self, srv: &mut Serving) -> Flow {
        if self.life.phase == Phase::Draining {
            log::warn!("second stop signal: stopping HAProxy now");
            srv.children.terminate();
            return Flow::Continue;
        }
        self.life
            .set(Phase::Draining, "stop signal: finishing in-flight work");
        if let Some(service) = srv.stats_service.take() {
            srv.stats_service = service.drain(&self.consul);
        }
        // Peers stop being sent here while the connections in flight finish.
        drop(self.registered.take());
        if let Some(a) = srv.applier.take() {
            a.stop();
        }
        srv.children.soft_stop();
        srv.drain_deadline = Some(Instant::now() + self.opts.knobs.grace_period);
        Flow::Continue
    }

    fn on_child_exited(&mut self, srv: &mut Serving) -> Flow {
        let draining = self.life.phase == Phase::Draining;
        for exit in process::reap() {
            match srv.children.ended(&exit, draining) {
                Ended::Expected => {}
                Ended::Restarting(name) => self.registry.restart(name),
                Ended::GiveUp(name, code) => {
                    self.life
                        .set(Phase::Stopped, &format!("{name} keeps dying"));
                    return Flow::Exit(code);
                }
            }
        }
        if draining && srv.children.is_empty() {
            return Flow::Finish;
        }
        Flow::Continue
    }

    fn on_applied(&mut self, srv: &mut Serving, outcome: Outcome) -> Flow {
        match outcome {
            Outcome::Applied {
                ops,
                reloaded,
                took,
                live,
            } => {
                srv.live = live;
                self.registry.applied(true, took);
                log::info!(
                    "{ops} change(s) applied in {} ms{}",
                    took.as_millis(),
                    if reloaded { " (HAProxy reloaded)" } else { "" }
                );
            }
            Outcome::Failed(e) => {
                self.registry.applied(false, Duration::ZERO);
                log::error!("{e}; HAProxy keeps its last good configuration, retrying");
            }
        }
        Flow::Continue
    }

    /// After every event: restarts that are due, the end of the drain's grace, and a debounced
    /// burst of Consul changes handed to the applier.
    fn on_timers(&mut self, srv: &mut Serving) -> Flow {
        if self.life.phase != Phase::Draining {
            if let Err((name, code)) = srv.children.restart_due() {
                self.life
                    .set(Phase::Stopped, &format!("{name} could not be restarted"));
                return Flow::Exit(code);
            }
        }
        if let Some(deadline) = srv.drain_deadline {
            if Instant::now() >= deadline && !srv.children.is_empty() {
                log::warn!(
                    "drain grace of {:?} is over; stopping what is left",
                    self.opts.knobs.grace_period
                );
                srv.children.stop_all();
                return Flow::Finish;
            }
        }
        if let Some((first, last)) = srv.dirty {
            let now = Instant::now();
            if now >= last + DEBOUNCE || now >= first + DEBOUNCE_MAX {
                srv.dirty = None;
                self.submit(srv);
            }
        }
        self.ready_if_serving(srv);
        Flow::Continue
    }

    /// Ready means serving: every listener bound (HAProxy runs the file that has them), the
    /// instances of every upstream read from Consul, and every upstream Consul lists healthy
    /// instances for with at least one of them live in HAProxy. Once Ready, the phase stays
    /// (an upstream losing its instances later is the destination's problem, not this sidecar's).
    pub(super) fn ready_if_serving(&mut self, srv: &mut Serving) {
        if self.life.phase != Phase::WaitingForConsul
            || srv.dirty.is_some()
            || !self.snapshot.endpoints_known()
            || !srv.last_submitted.served_by(&srv.live)
        {
            return;
        }
        let d = &srv.last_submitted;
        let instances: usize = srv.live.values().sum();
        let why = match (&d.public, &d.gateway) {
            (Some(p), _) => format!(
                "HAProxy serves {} on {}:{} with {} upstream listener(s), {instances} upstream instance(s) live",
                d.service,
                p.bind_address,
                p.bind_port,
                d.upstreams.len()
            ),
            (None, Some(g)) => format!(
                "HAProxy serves the mesh gateway {} with {} route(s), {instances} instance(s) live",
                d.service,
                g.routes.len()
            ),
            (None, None) => format!("HAProxy serves {}", d.service),
        };
        self.life.set(Phase::Ready, &why);
        if let Some(o) = &d.transparent {
            redirect::check_in_background(o.port);
        }
    }

    /// Builds the desired state from the snapshot and hands it to the applier if it changed.
    fn submit(&mut self, srv: &mut Serving) {
        match self.build(Some(&srv.last_submitted)) {
            Ok(d) if d != srv.last_submitted => {
                if let Some(a) = &srv.applier {
                    a.submit(d.clone());
                }
                self.want_checked(&d);
                self.registry.publish(&d);
                srv.last_submitted = d;
            }
            Ok(_) => log::debug!("Consul changed nothing HAProxy serves"),
            // Logged once per distinct reason (`build` forgets it when a state builds again).
            Err(e) if self.build_error_new => log::error!(
                "ignoring a Consul state HAProxy cannot be given ({e}); the last good configuration keeps serving"
            ),
            Err(_) => {}
        }
    }
}

impl Serving {
    /// Waits, at most a few seconds, for the applier's thread to end: it was told to stop when
    /// the drain began and its children are gone, so a step it was in fails fast; a write it
    /// was finishing must not land while the working directory is being removed.
    pub(super) fn wait_for_applier(&mut self) {
        if let Some(a) = self.applier.take() {
            a.stop();
        }
        let Some(thread) = self.applier_thread.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            log::warn!(
                "the applier is still busy after 5 s; removing the working directory anyway"
            );
        }
    }

    /// How long the loop may wait for an event before a timer is due.
    pub(super) fn timeout(&self) -> Duration {
        let now = Instant::now();
        let mut timeout = match (self.dirty, self.drain_deadline) {
            (Some((first, last)), _) => {
                ((last + DEBOUNCE).min(first + DEBOUNCE_MAX)).saturating_duration_since(now)
            }
            (None, Some(d)) => d.saturating_duration_since(now),
            (None, None) => Duration::from_secs(3600),
        };
        if let Some(due) = self.children.next_restart() {
            timeout = timeout.min(due.saturating_duration_since(now));
        }
        timeout
    }
}
