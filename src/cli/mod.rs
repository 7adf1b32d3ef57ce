//! Command line and environment → `Options`. A drop-in for the Go original's flags: every long
//! flag works as `-name value`, `-name=value`, `--name value` and `--name=value`, and Consul's own
//! environment variables fill in what the flags leave out, as in the consul CLI.
//!
//! Nothing here touches the network or the file system beyond reading a token file.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::ArgMatches;

use crate::config::{
    haproxy_log_level, ConsulSettings, Endpoint, HaproxyParam, Knobs, Listen, Login, MeshGateway,
    Secret, Target, TlsFiles, BALANCE_ALGORITHMS,
};
use crate::error::Error;
use crate::value::Name;

/// Exit code for bad usage or bad configuration (BSD sysexits EX_USAGE).
pub use crate::error::EXIT_USAGE;

#[derive(Clone, Debug)]
pub struct Options {
    pub target: Target,
    pub consul: ConsulSettings,
    pub haproxy_bin: PathBuf,
    pub dataplane_bin: PathBuf,
    pub base_path: PathBuf,
    pub log_level: log::LevelFilter,
    pub enable_intentions: bool,
    pub stats_addr: Option<SocketAddr>,
    pub stats_service_register: bool,
    pub spoe_threads: usize,
    pub knobs: Knobs,
    /// Tera templates replacing the built-in ones.
    pub template_dir: Option<PathBuf>,
    /// How often each upstream endpoint's identity is checked again; `None`: not checked.
    pub identity_recheck: Option<std::time::Duration>,
}

/// `section.key=value`, as `-haproxy-param global.maxconn=20000`.
pub fn parse_haproxy_param(v: &str) -> crate::error::Result<HaproxyParam> {
    let (name, value) = v
        .split_once('=')
        .ok_or_else(|| Error::msg(format!("{v:?} is not section.key=value")))?;
    let (section, key) = name
        .split_once('.')
        .ok_or_else(|| Error::msg(format!("{v:?} names no section (global.… or defaults.…)")))?;
    if section != "global" && section != "defaults" {
        return Err(Error::msg(format!(
            "{v:?}: section must be global or defaults"
        )));
    }
    let key_ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ' '));
    if !key_ok {
        return Err(Error::msg(format!(
            "{v:?}: {key:?} is not an HAProxy keyword"
        )));
    }
    // One line each: a line break would smuggle in configuration of its own.
    if value.contains(['\n', '\r', '#']) {
        return Err(Error::msg(format!(
            "{v:?}: the value may not hold a line break or '#'"
        )));
    }
    // Keys the sidecar manages itself cannot be overridden, or it would lose control.
    const OWNED: &[&str] = &[
        "master-worker",
        "stats",
        "hard-stop-after",
        "mode",
        "userlist",
    ];
    if OWNED.contains(&key.split(' ').next().unwrap_or(key)) {
        return Err(Error::msg(format!(
            "{v:?}: {key} is managed by the sidecar"
        )));
    }
    Ok(HaproxyParam {
        section: section.into(),
        key: key.into(),
        value: value.trim().into(),
    })
}

#[derive(Debug)]
pub enum Command {
    Run(Box<Options>),
    /// `show_secrets`: print keys and passwords instead of redacting them.
    DryRun {
        opts: Box<Options>,
        show_secrets: bool,
    },
    Version {
        haproxy_bin: PathBuf,
        dataplane_bin: PathBuf,
    },
    Help(String),
}

/// A usage or configuration error: one line that names the flag or value at fault.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Reads the environment the way the consul CLI does; tests pass a map instead.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
    fn read_file(&self, path: &str) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// Go-style durations as operators write them: `30s`, `2m`, `500ms`, `1h`; a bare number is
/// seconds. At least 1 s and at most 1 h: a drain needs time, but a stuck one must end.
pub fn parse_duration(v: &str) -> crate::error::Result<std::time::Duration> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| Error::msg(format!("{v:?} is not a duration like 30s")))?;
    let d = match unit {
        "" | "s" => std::time::Duration::from_secs(n),
        "ms" => std::time::Duration::from_millis(n),
        "m" => std::time::Duration::from_secs(n.saturating_mul(60)),
        "h" => std::time::Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(Error::msg(format!(
                "{v:?} has an unknown unit (use ms, s, m or h)"
            )))
        }
    };
    if d < std::time::Duration::from_secs(1) || d > std::time::Duration::from_secs(3600) {
        return Err(Error::msg(format!("{v:?} is outside 1s to 1h")));
    }
    Ok(d)
}

pub fn parse_log_level(v: &str) -> Result<log::LevelFilter, UsageError> {
    match v.to_ascii_lowercase().as_str() {
        "trace" => Ok(log::LevelFilter::Trace),
        "debug" => Ok(log::LevelFilter::Debug),
        "info" => Ok(log::LevelFilter::Info),
        "warn" | "warning" => Ok(log::LevelFilter::Warn),
        // logrus also had fatal and panic; both only ever printed errors.
        "error" | "fatal" | "panic" => Ok(log::LevelFilter::Error),
        _ => Err(UsageError(format!(
            "invalid value {v:?} for -log-level (expected TRACE, DEBUG, INFO, WARN or ERROR)"
        ))),
    }
}

fn one_line(err: clap::Error) -> UsageError {
    // clap's message spans several lines (usage, tips); the first one names the problem.
    let rendered = err.render().to_string();
    let first = rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid usage")
        .trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    UsageError(format!("{first} (see --help)"))
}

pub fn parse(
    args: impl IntoIterator<Item = OsString>,
    env: &dyn Env,
) -> Result<Command, UsageError> {
    let m = command()
        .try_get_matches_from(normalise(args))
        .map_err(one_line)?;
    if flag_bool(&m, "help")? {
        return Ok(Command::Help(command().render_long_help().to_string()));
    }
    let path = |name: &str| PathBuf::from(m.get_one::<String>(name).cloned().unwrap_or_default());
    let haproxy_bin = path("haproxy");
    let dataplane_bin = path("dataplane");
    if flag_bool(&m, "version")? {
        return Ok(Command::Version {
            haproxy_bin,
            dataplane_bin,
        });
    }

    let gateway = mesh_gateway(&m)?;
    let gateway_flags = ["gateway", "register", "service", "address", "wan-address"];
    let target = target(&m, gateway)?;
    if !matches!(target, Target::MeshGateway(_)) {
        if m.contains_id("gateway") {
            return Err(UsageError(
                "-gateway excludes -sidecar-for, -sidecar-for-tag and -proxy-service-id; give one"
                    .into(),
            ));
        }
        for flag in &gateway_flags[1..] {
            if m.contains_id(flag) {
                return Err(UsageError(format!("-{flag} only goes with -gateway")));
            }
        }
    }

    let consul = consul_settings(&m, env)?;
    let log_level = parse_log_level(m.get_one::<String>("log-level").map_or("INFO", |s| s))?;
    let stats_addr = match m.get_one::<String>("stats-addr") {
        Some(a) if !a.is_empty() => Some(a.parse::<SocketAddr>().map_err(|_| {
            UsageError(format!(
                "invalid value {a:?} for -stats-addr (expected ip:port)"
            ))
        })?),
        _ => None,
    };
    let stats_service_register = flag_bool(&m, "stats-service-register")?;
    if stats_service_register && stats_addr.is_none() {
        return Err(UsageError(
            "-stats-service-register needs -stats-addr".into(),
        ));
    }
    let spoe_threads = m
        .get_one::<String>("spoe-threads")
        .map_or(Ok(2), |v| v.parse::<usize>())
        .ok()
        .filter(|n| (1..=64).contains(n))
        .ok_or_else(|| UsageError("invalid value for -spoe-threads (expected 1 to 64)".into()))?;
    let grace_period = m
        .get_one::<String>("grace-period")
        .map_or(Ok(std::time::Duration::from_secs(30)), |v| {
            parse_duration(v)
        })
        .map_err(|e| UsageError(format!("invalid value for -grace-period: {e}")))?;
    let identity_recheck = m
        .get_one::<String>("upstream-identity-recheck")
        .map_or(Ok(std::time::Duration::from_secs(30)), |v| {
            parse_duration(v)
        })
        .map_err(|e| UsageError(format!("invalid value for -upstream-identity-recheck: {e}")))?;
    // On unless turned off: a drop-in that silently trusted any mesh member would be worse.
    let identity_check = match m.get_one::<String>("upstream-identity-check") {
        Some(v) => parse_bool("upstream-identity-check", v)?,
        None => true,
    };
    let mut haproxy_params: Vec<HaproxyParam> = Vec::new();
    for v in m.get_many::<String>("haproxy-param").into_iter().flatten() {
        let p = parse_haproxy_param(v)
            .map_err(|e| UsageError(format!("invalid value for -haproxy-param: {e}")))?;
        haproxy_params.retain(|q| !(q.section == p.section && q.key == p.key));
        haproxy_params.push(p);
    }
    let balance = m
        .get_one::<String>("balance")
        .map_or("roundrobin", |s| s.as_str())
        .to_ascii_lowercase();
    if !BALANCE_ALGORITHMS.contains(&balance.as_str()) {
        return Err(UsageError(format!(
            "invalid value {balance:?} for -balance (expected {})",
            BALANCE_ALGORITHMS.join(", ")
        )));
    }
    let log_format = match m.get_one::<String>("log-format") {
        Some(f) if f.contains(['\n', '\r']) => {
            return Err(UsageError(
                "invalid value for -log-format: a line break".into(),
            ))
        }
        // Quoted once here, so the template and the Dataplane API write the same argument.
        Some(f) if !f.trim().is_empty() => Some(format!(
            "\"{}\"",
            f.trim().replace('\\', "\\\\").replace('"', "\\\"")
        )),
        _ => None,
    };
    let base_path = path("haproxy-cfg-base-path");
    if base_path.as_os_str().is_empty() {
        return Err(UsageError(
            "-haproxy-cfg-base-path must not be empty".into(),
        ));
    }
    for (flag, p) in [("haproxy", &haproxy_bin), ("dataplane", &dataplane_bin)] {
        if p.as_os_str().is_empty() {
            return Err(UsageError(format!("-{flag} must not be empty")));
        }
    }

    let options = Options {
        target,
        consul,
        haproxy_bin,
        dataplane_bin,
        base_path,
        log_level,
        enable_intentions: flag_bool(&m, "enable-intentions")?,
        stats_addr,
        stats_service_register,
        spoe_threads,
        knobs: Knobs {
            grace_period,
            haproxy_params,
            balance,
            log_format,
            haproxy_log_level: haproxy_log_level(log_level),
        },
        template_dir: m
            .get_one::<String>("template-dir")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from),
        identity_recheck: identity_check.then_some(identity_recheck),
    };
    let show_secrets = flag_bool(&m, "dry-run-show-secrets")?;
    if show_secrets && !flag_bool(&m, "dry-run")? {
        return Err(UsageError(
            "-dry-run-show-secrets only goes with -dry-run".into(),
        ));
    }
    if flag_bool(&m, "dry-run")? {
        Ok(Command::DryRun {
            opts: Box::new(options),
            show_secrets,
        })
    } else {
        Ok(Command::Run(Box::new(options)))
    }
}

mod flags;
mod target;

use flags::{command, env_bool, flag_bool, normalise, parse_bool};
use target::*;

#[cfg(test)]
mod tests;
