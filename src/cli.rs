//! Command line and environment → `Options`. A drop-in for the Go original's flags: every long
//! flag works as `-name value`, `-name=value`, `--name value` and `--name=value`, and Consul's own
//! environment variables fill in what the flags leave out, as in the consul CLI.
//!
//! Nothing here touches the network or the file system beyond reading a token file.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Arg, ArgAction, ArgMatches};

use crate::config::{
    haproxy_log_level, ConsulSettings, Endpoint, HaproxyParam, Knobs, Listen, Login, MeshGateway,
    Secret, Target, TlsFiles, BALANCE_ALGORITHMS,
};
use crate::value::Name;

/// Exit code for bad usage or bad configuration (BSD sysexits EX_USAGE).
pub use crate::error::EXIT_USAGE;

/// The long flags the Go original had, plus ours. Single-dash spellings are accepted only for
/// these names so that a value such as `-1` or `-x` is never rewritten.
const LONG_FLAGS: &[&str] = &[
    "dataplane",
    "enable-intentions",
    "haproxy",
    "haproxy-cfg-base-path",
    "http-addr",
    "log-level",
    "sidecar-for",
    "sidecar-for-tag",
    "stats-addr",
    "stats-service-register",
    "token",
    "token-file",
    "version",
    "help",
    "dry-run",
    "dry-run-show-secrets",
    "spoe-threads",
    "grace-period",
    "haproxy-param",
    "balance",
    "log-format",
    "template-dir",
    "upstream-identity-check",
    "upstream-identity-recheck",
    "service-node-name",
    "proxy-service-id",
    "login-auth-method",
    "login-bearer-token-path",
    "login-meta",
    "login-namespace",
    "login-partition",
    "login-datacenter",
    "gateway",
    "register",
    "service",
    "address",
    "wan-address",
];

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
pub fn parse_haproxy_param(v: &str) -> Result<HaproxyParam, String> {
    let (name, value) = v
        .split_once('=')
        .ok_or_else(|| format!("{v:?} is not section.key=value"))?;
    let (section, key) = name
        .split_once('.')
        .ok_or_else(|| format!("{v:?} names no section (global.… or defaults.…)"))?;
    if section != "global" && section != "defaults" {
        return Err(format!("{v:?}: section must be global or defaults"));
    }
    let key_ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ' '));
    if !key_ok {
        return Err(format!("{v:?}: {key:?} is not an HAProxy keyword"));
    }
    // One line each: a line break would smuggle in configuration of its own.
    if value.contains(['\n', '\r', '#']) {
        return Err(format!("{v:?}: the value may not hold a line break or '#'"));
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
        return Err(format!("{v:?}: {key} is managed by the sidecar"));
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

fn command() -> clap::Command {
    let bool_flag = |name: &'static str, help: &'static str| {
        // Go's flag package takes `-flag`, `-flag=true` and `-flag=false`; so do we.
        Arg::new(name)
            .long(name)
            .help(help)
            .num_args(0..=1)
            .require_equals(true)
            .default_missing_value("true")
            .value_name("BOOL")
            .action(ArgAction::Set)
    };
    let value = |name: &'static str, help: &'static str| {
        // Go's flag package takes the next argument as the value whatever it looks like.
        Arg::new(name)
            .long(name)
            .help(help)
            .action(ArgAction::Set)
            .allow_hyphen_values(true)
            .value_name("VALUE")
    };
    clap::Command::new("haproxy-consul-connect")
        .about("Consul Connect sidecar that runs HAProxy as its data plane")
        .args_override_self(true)
        .disable_version_flag(true)
        .disable_help_flag(true)
        .arg(value("sidecar-for", "The Consul service ID to proxy").value_name("ID"))
        .arg(
            value(
                "sidecar-for-tag",
                "Proxy the one local service that carries this tag",
            )
            .value_name("TAG"),
        )
        .arg(value("http-addr", "Consul agent address (host:port, http://, https://, unix://) [default: 127.0.0.1:8500, or CONSUL_HTTP_ADDR]; with -service-node-name, the servers: comma-separated or repeated, tried in turn").value_name("ADDR").action(ArgAction::Append))
        .arg(value("proxy-service-id", "The service ID of the proxy itself (instead of -sidecar-for)").value_name("ID"))
        .arg(value("service-node-name", "Agentless: the catalog node the proxy is registered on; the sidecar then talks to the Consul servers of -http-addr and writes nothing to an agent").value_name("NODE"))
        .arg(value("login-auth-method", "Log in with this ACL auth method instead of -token (needs -login-bearer-token-path)").value_name("NAME"))
        .arg(value("login-bearer-token-path", "File holding the bearer token (a JWT) of the login, read again at every login").value_name("PATH"))
        .arg(Arg::new("login-meta").long("login-meta").help("Metadata of the login token, as key=value; repeatable").action(ArgAction::Append).allow_hyphen_values(true).value_name("KEY=VALUE"))
        .arg(value("login-namespace", "Namespace of the auth method (Consul Enterprise)").value_name("NAMESPACE"))
        .arg(value("login-partition", "Admin partition of the auth method (Consul Enterprise)").value_name("PARTITION"))
        .arg(value("login-datacenter", "Datacenter of the auth method").value_name("DC"))
        .arg(value("token", "Consul ACL token [default: CONSUL_HTTP_TOKEN]").value_name("TOKEN"))
        .arg(value("token-file", "File holding the Consul ACL token [default: CONSUL_HTTP_TOKEN_FILE]").value_name("PATH"))
        .arg(value("haproxy", "HAProxy binary path").default_value("haproxy").value_name("PATH"))
        .arg(value("dataplane", "Dataplane API binary path").default_value("dataplaneapi").value_name("PATH"))
        .arg(value("haproxy-cfg-base-path", "Directory in which each sidecar makes its own working directory").default_value("/tmp").value_name("DIR"))
        .arg(value("log-level", "Log level: TRACE, DEBUG, INFO, WARN or ERROR").default_value("INFO").value_name("LEVEL"))
        .arg(bool_flag("enable-intentions", "Enforce Consul intentions on inbound connections"))
        .arg(value("stats-addr", "Listen address of the stats/metrics HTTP server").value_name("ADDR"))
        .arg(bool_flag("stats-service-register", "Register the stats endpoint as a Consul service"))
        .arg(value("spoe-threads", "Worker threads of the intentions (SPOE) agent").default_value("2").value_name("N"))
        .arg(value("grace-period", "How long a stop lets in-flight connections finish (e.g. 30s, 2m, 500ms)").default_value("30s").value_name("DURATION"))
        .arg(Arg::new("haproxy-param").long("haproxy-param").help("An HAProxy global or defaults setting, as section.key=value; repeatable").action(ArgAction::Append).allow_hyphen_values(true).value_name("SECTION.KEY=VALUE"))
        .arg(value("balance", "Load-balancing algorithm of upstreams: roundrobin, leastconn, first or random").default_value("roundrobin").value_name("ALGORITHM"))
        .arg(value("log-format", "HAProxy log-format of the access log lines (default: HAProxy's httplog/tcplog)").value_name("FORMAT"))
        .arg(value("template-dir", "Directory of Tera templates (haproxy.cfg.tera, spoe.conf.tera) replacing the built-in ones; checked with haproxy -c before use").value_name("DIR"))
        .arg(bool_flag("upstream-identity-check", "Admit an upstream endpoint only once it proved, in an mTLS handshake, that it is the destination [default: true]"))
        .arg(value("upstream-identity-recheck", "How often each upstream endpoint's identity is checked again (e.g. 30s, 2m)").default_value("30s").value_name("DURATION"))
        .arg(value("gateway", "Run as a gateway of this kind instead of a sidecar (mesh)").value_name("KIND"))
        .arg(bool_flag("register", "With -gateway: register the gateway service at start and deregister it at exit"))
        .arg(value("service", "With -gateway: the gateway's service name (also its service ID)").value_name("NAME"))
        .arg(value("address", "With -gateway: the LAN address to listen on (ip:port)").value_name("IP:PORT"))
        .arg(value("wan-address", "With -gateway: the WAN address other clusters dial (ip:port) [default: -address]").value_name("IP:PORT"))
        .arg(bool_flag("dry-run", "Print the files that would be written for the current Consul state, then exit; private keys and the Dataplane API password are redacted"))
        .arg(bool_flag("dry-run-show-secrets", "With -dry-run, print private keys and the Dataplane API password too"))
        .arg(bool_flag("version", "Print the version and the versions of haproxy and dataplaneapi"))
        .arg(bool_flag("help", "Print help"))
}

/// Flags that take no separate value argument (Go bools), so the word after them is a flag.
const BOOL_FLAGS: &[&str] = &[
    "enable-intentions",
    "register",
    "upstream-identity-check",
    "stats-service-register",
    "dry-run",
    "dry-run-show-secrets",
    "version",
    "help",
];

/// Turns `-name[=v]` into `--name[=v]`, as Go's flag package reads them. A word that follows a
/// value-taking flag is its value and is never rewritten, so `-token -abc` keeps `-abc`.
fn normalise(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut rest_are_values = false;
    let mut next_is_value = false;
    for (i, arg) in args.into_iter().enumerate() {
        if i == 0 || rest_are_values || next_is_value {
            next_is_value = false;
            out.push(arg);
            continue;
        }
        if arg == "--" {
            rest_are_values = true;
            out.push(arg);
            continue;
        }
        let Some(s) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        let body = s.strip_prefix("--").or_else(|| s.strip_prefix('-'));
        let Some(body) = body.filter(|b| b.starts_with(|c: char| c.is_ascii_alphabetic())) else {
            out.push(arg);
            continue;
        };
        let (name, has_value) = match body.split_once('=') {
            Some((n, _)) => (n, true),
            None => (body, false),
        };
        if name == "h" {
            out.push(OsString::from("--help"));
            continue;
        }
        next_is_value = !has_value && LONG_FLAGS.contains(&name) && !BOOL_FLAGS.contains(&name);
        out.push(OsString::from(format!("--{body}")));
    }
    out
}

fn parse_bool(flag: &str, v: &str) -> Result<bool, UsageError> {
    // The spellings Go's strconv.ParseBool accepts.
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(UsageError(format!(
            "invalid boolean value {v:?} for -{flag}"
        ))),
    }
}

fn flag_bool(m: &ArgMatches, name: &str) -> Result<bool, UsageError> {
    match m.get_one::<String>(name) {
        Some(v) => parse_bool(name, v),
        None => Ok(false),
    }
}

fn env_bool(env: &dyn Env, name: &str, default: bool) -> Result<bool, UsageError> {
    match env.var(name) {
        Some(v) => parse_bool(name, &v)
            .map_err(|_| UsageError(format!("invalid boolean value {v:?} in {name}"))),
        None => Ok(default),
    }
}

/// Go-style durations as operators write them: `30s`, `2m`, `500ms`, `1h`; a bare number is
/// seconds. At least 1 s and at most 1 h: a drain needs time, but a stuck one must end.
pub fn parse_duration(v: &str) -> Result<std::time::Duration, String> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{v:?} is not a duration like 30s"))?;
    let d = match unit {
        "" | "s" => std::time::Duration::from_secs(n),
        "ms" => std::time::Duration::from_millis(n),
        "m" => std::time::Duration::from_secs(n.saturating_mul(60)),
        "h" => std::time::Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("{v:?} has an unknown unit (use ms, s, m or h)")),
    };
    if d < std::time::Duration::from_secs(1) || d > std::time::Duration::from_secs(3600) {
        return Err(format!("{v:?} is outside 1s to 1h"));
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
    if stats_service_register && consul.catalog_node.is_some() {
        // Its check is an HTTP check, which no agent would run on a node that has none.
        return Err(UsageError(
            "-stats-service-register needs a local agent; it does not go with -service-node-name"
                .into(),
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

/// `-gateway mesh` and its flags, typed: `None` without `-gateway`.
fn mesh_gateway(m: &ArgMatches) -> Result<Option<MeshGateway>, UsageError> {
    let Some(kind) = m.get_one::<String>("gateway") else {
        return Ok(None);
    };
    if kind != "mesh" {
        return Err(UsageError(format!(
            "invalid value {kind:?} for -gateway (this program runs mesh gateways only)"
        )));
    }
    let service = match m.get_one::<String>("service") {
        Some(s) => Name::parse("-service", s.trim()).map_err(|e| UsageError(e.to_string()))?,
        None => return Err(UsageError("-gateway mesh needs -service NAME".into())),
    };
    let listen = |flag: &'static str| -> Result<Option<Listen>, UsageError> {
        match m.get_one::<String>(flag) {
            None => Ok(None),
            Some(v) => match v.trim().parse::<SocketAddr>() {
                Ok(a) if a.port() != 0 => Ok(Some(Listen {
                    ip: a.ip(),
                    port: a.port(),
                })),
                _ => Err(UsageError(format!(
                    "invalid value {v:?} for -{flag} (expected ip:port)"
                ))),
            },
        }
    };
    let lan = listen("address")?
        .ok_or_else(|| UsageError("-gateway mesh needs -address IP:PORT".into()))?;
    let wan = listen("wan-address")?.filter(|w| *w != lan);
    Ok(Some(MeshGateway {
        service,
        register: flag_bool(m, "register")?,
        lan,
        wan,
    }))
}

/// Exactly one of `-sidecar-for`, `-sidecar-for-tag` and `-proxy-service-id`, or else the mesh
/// gateway `-gateway mesh` describes.
fn target(m: &ArgMatches, gateway: Option<MeshGateway>) -> Result<Target, UsageError> {
    let given: Vec<(&str, &String)> = ["sidecar-for", "sidecar-for-tag", "proxy-service-id"]
        .into_iter()
        .filter_map(|f| m.get_one::<String>(f).map(|v| (f, v)))
        .collect();
    let (flag, v) = match given.as_slice() {
        [one] => *one,
        [] => {
            return match gateway {
                Some(g) => Ok(Target::MeshGateway(g)),
                None => Err(UsageError(
                    "please specify -sidecar-for ID, -sidecar-for-tag TAG, -proxy-service-id ID or -gateway mesh"
                        .into(),
                )),
            }
        }
        many => {
            return Err(UsageError(format!(
                "{} exclude each other; give one",
                many.iter()
                    .map(|(f, _)| format!("-{f}"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            )))
        }
    };
    let v = v.trim().to_string();
    if v.is_empty() {
        return Err(UsageError(format!("-{flag} needs a value")));
    }
    Ok(match flag {
        "sidecar-for" => Target::ServiceId(v),
        "sidecar-for-tag" => Target::Tag(v),
        _ => Target::ProxyId(v),
    })
}

/// A Consul name given as a flag's value.
fn name_flag(m: &ArgMatches, flag: &'static str) -> Result<Option<Name>, UsageError> {
    m.get_one::<String>(flag)
        .map(|v| {
            Name::parse(flag, v.trim())
                .map_err(|e| UsageError(format!("invalid value for -{flag}: {e}")))
        })
        .transpose()
}

/// `-http-addr` (each value comma-separated, the flag repeatable) or `CONSUL_HTTP_ADDR`, in
/// order, duplicates dropped.
fn endpoints(m: &ArgMatches, env: &dyn Env) -> Result<Vec<Endpoint>, UsageError> {
    let (given, source): (Vec<String>, &str) = match m.get_many::<String>("http-addr") {
        Some(v) => (v.cloned().collect(), "-http-addr"),
        None => match env.var("CONSUL_HTTP_ADDR") {
            Some(a) => (vec![a], "CONSUL_HTTP_ADDR"),
            None => (vec!["127.0.0.1:8500".to_string()], "the default -http-addr"),
        },
    };
    // As in the consul CLI, CONSUL_HTTP_SSL=true upgrades a scheme-less address to https.
    let ssl = env_bool(env, "CONSUL_HTTP_SSL", false)?;
    let mut out: Vec<Endpoint> = Vec::new();
    for addr in given.iter().flat_map(|a| a.split(',')) {
        let addr = addr.trim();
        if addr.is_empty() {
            return Err(UsageError(format!(
                "{source}: an empty address in the list"
            )));
        }
        let mut endpoint =
            Endpoint::parse(addr).map_err(|e| UsageError(format!("{source}: {e}")))?;
        if ssl && !addr.contains("://") {
            if let Endpoint::Http { authority } = endpoint {
                endpoint = Endpoint::Https { authority };
            }
        }
        if !out.contains(&endpoint) {
            out.push(endpoint);
        }
    }
    Ok(out)
}

/// `-login-*`: all or nothing of the method and the bearer file; the rest needs them.
fn login(m: &ArgMatches) -> Result<Option<Login>, UsageError> {
    let method = name_flag(m, "login-auth-method")?;
    let path = m
        .get_one::<String>("login-bearer-token-path")
        .filter(|p| !p.trim().is_empty());
    let mut meta = std::collections::BTreeMap::new();
    for kv in m.get_many::<String>("login-meta").into_iter().flatten() {
        let (k, v) = kv
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| {
                UsageError(format!(
                    "invalid value {kv:?} for -login-meta (expected key=value)"
                ))
            })?;
        if kv.chars().any(char::is_control) {
            return Err(UsageError(format!(
                "invalid value {kv:?} for -login-meta: a control character"
            )));
        }
        meta.insert(k.trim().to_string(), v.to_string());
    }
    let namespace = name_flag(m, "login-namespace")?;
    let partition = name_flag(m, "login-partition")?;
    let datacenter = name_flag(m, "login-datacenter")?;
    match (method, path) {
        (Some(auth_method), Some(path)) => Ok(Some(Login {
            auth_method,
            bearer_token_path: PathBuf::from(path.trim()),
            meta,
            namespace,
            partition,
            datacenter,
        })),
        (Some(_), None) => Err(UsageError(
            "-login-auth-method needs -login-bearer-token-path".into(),
        )),
        (None, Some(_)) => Err(UsageError(
            "-login-bearer-token-path needs -login-auth-method".into(),
        )),
        (None, None) => {
            let stray = [
                "login-meta",
                "login-namespace",
                "login-partition",
                "login-datacenter",
            ]
            .into_iter()
            .find(|f| m.contains_id(f));
            match stray {
                Some(f) => Err(UsageError(format!("-{f} needs -login-auth-method"))),
                None => Ok(None),
            }
        }
    }
}

fn consul_settings(m: &ArgMatches, env: &dyn Env) -> Result<ConsulSettings, UsageError> {
    let endpoints = endpoints(m, env)?;
    let catalog_node = name_flag(m, "service-node-name")?;
    let login = login(m)?;
    if login.is_some() && (m.contains_id("token") || m.contains_id("token-file")) {
        return Err(UsageError(
            "-login-auth-method and -token/-token-file exclude each other; give one".into(),
        ));
    }
    if endpoints.len() > 1 && catalog_node.is_none() {
        return Err(UsageError(
            "several -http-addr name Consul servers, which only -service-node-name (agentless) uses; a local agent is one address".into(),
        ));
    }

    let token = if login.is_some() {
        // The login's token replaces any from the environment.
        None
    } else if let Some(t) = m.get_one::<String>("token").filter(|t| !t.is_empty()) {
        Some(Secret::new(t.trim()))
    } else if let Some(f) = m.get_one::<String>("token-file").filter(|t| !t.is_empty()) {
        Some(read_token(env, f, "-token-file")?)
    } else if let Some(t) = env.var("CONSUL_HTTP_TOKEN") {
        Some(Secret::new(t.trim()))
    } else if let Some(f) = env.var("CONSUL_HTTP_TOKEN_FILE") {
        Some(read_token(env, &f, "CONSUL_HTTP_TOKEN_FILE")?)
    } else {
        None
    };

    let tls = TlsFiles {
        ca_cert: env.var("CONSUL_CACERT").map(PathBuf::from),
        client_cert: env.var("CONSUL_CLIENT_CERT").map(PathBuf::from),
        client_key: env.var("CONSUL_CLIENT_KEY").map(PathBuf::from),
        verify: env_bool(env, "CONSUL_HTTP_SSL_VERIFY", true)?,
    };
    if tls.client_cert.is_some() != tls.client_key.is_some() {
        return Err(UsageError(
            "CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY must be set together".into(),
        ));
    }
    Ok(ConsulSettings {
        endpoints,
        token,
        tls,
        catalog_node,
        login,
    })
}

fn read_token(env: &dyn Env, path: &str, source: &str) -> Result<Secret, UsageError> {
    let raw = env
        .read_file(path)
        .map_err(|e| UsageError(format!("{source}: cannot read token file {path}: {e}")))?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(UsageError(format!("{source}: token file {path} is empty")));
    }
    Ok(Secret::new(token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct MapEnv {
        vars: HashMap<&'static str, &'static str>,
        files: HashMap<&'static str, &'static str>,
    }
    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.vars.get(name).map(|s| s.to_string())
        }
        fn read_file(&self, path: &str) -> std::io::Result<String> {
            self.files
                .get(path)
                .map(|s| s.to_string())
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "not found"))
        }
    }

    fn run(args: &[&str], env: &MapEnv) -> Result<Options, UsageError> {
        let argv = std::iter::once("haproxy-consul-connect")
            .chain(args.iter().copied())
            .map(OsString::from);
        match parse(argv, env)? {
            Command::Run(o) | Command::DryRun { opts: o, .. } => Ok(*o),
            other => panic!("expected a run command, got {other:?}"),
        }
    }

    #[test]
    fn dry_run_secrets_need_dry_run() {
        let argv = |a: &[&str]| {
            std::iter::once("haproxy-consul-connect")
                .chain(a.iter().copied())
                .map(OsString::from)
                .collect::<Vec<_>>()
        };
        let env = MapEnv::default();
        match parse(argv(&["-sidecar-for", "x", "-dry-run"]), &env).unwrap() {
            Command::DryRun { show_secrets, .. } => assert!(!show_secrets),
            other => panic!("{other:?}"),
        }
        match parse(
            argv(&["-sidecar-for", "x", "-dry-run", "-dry-run-show-secrets"]),
            &env,
        )
        .unwrap()
        {
            Command::DryRun { show_secrets, .. } => assert!(show_secrets),
            other => panic!("{other:?}"),
        }
        let e = parse(argv(&["-sidecar-for", "x", "-dry-run-show-secrets"]), &env).unwrap_err();
        assert!(e.0.contains("only goes with -dry-run"), "{}", e.0);
    }

    #[test]
    fn defaults_match_the_go_original() {
        let o = run(&["-sidecar-for", "web"], &MapEnv::default()).unwrap();
        assert_eq!(o.target, Target::ServiceId("web".into()));
        assert_eq!(o.haproxy_bin, PathBuf::from("haproxy"));
        assert_eq!(o.dataplane_bin, PathBuf::from("dataplaneapi"));
        assert_eq!(o.base_path, PathBuf::from("/tmp"));
        assert_eq!(o.log_level, log::LevelFilter::Info);
        assert_eq!(
            o.consul.endpoints[0],
            Endpoint::Http {
                authority: "127.0.0.1:8500".into()
            }
        );
        assert!(!o.enable_intentions);
        assert!(o.stats_addr.is_none());
        assert!(o.consul.token.is_none());
    }

    #[test]
    fn every_spelling_of_a_flag_works() {
        for args in [
            &["-sidecar-for", "web"][..],
            &["--sidecar-for", "web"],
            &["-sidecar-for=web"],
            &["--sidecar-for=web"],
        ] {
            let o = run(args, &MapEnv::default()).unwrap();
            assert_eq!(o.target, Target::ServiceId("web".into()), "{args:?}");
        }
        let o = run(
            &[
                "-sidecar-for-tag",
                "edge",
                "-enable-intentions",
                "-log-level=debug",
            ],
            &MapEnv::default(),
        )
        .unwrap();
        assert_eq!(o.target, Target::Tag("edge".into()));
        assert!(o.enable_intentions);
        assert_eq!(o.log_level, log::LevelFilter::Debug);
        let o = run(
            &["-sidecar-for", "web", "-enable-intentions=false"],
            &MapEnv::default(),
        )
        .unwrap();
        assert!(!o.enable_intentions);
    }

    #[test]
    fn a_value_that_looks_like_a_flag_is_left_alone() {
        let o = run(
            &["-sidecar-for", "web", "-token", "-abc"],
            &MapEnv::default(),
        );
        // `-abc` is not one of our flags, so it stays a value.
        assert_eq!(o.unwrap().consul.token.unwrap().expose(), "-abc");
    }

    #[test]
    fn environment_fills_in_and_flags_win() {
        let env = MapEnv {
            vars: HashMap::from([
                ("CONSUL_HTTP_ADDR", "https://10.0.0.1:8501"),
                ("CONSUL_HTTP_TOKEN", "from-env"),
                ("CONSUL_CACERT", "/ca.pem"),
                ("CONSUL_HTTP_SSL_VERIFY", "false"),
            ]),
            ..Default::default()
        };
        let o = run(&["-sidecar-for", "web"], &env).unwrap();
        assert_eq!(
            o.consul.endpoints[0],
            Endpoint::Https {
                authority: "10.0.0.1:8501".into()
            }
        );
        assert_eq!(o.consul.token.as_ref().unwrap().expose(), "from-env");
        assert_eq!(o.consul.tls.ca_cert, Some(PathBuf::from("/ca.pem")));
        assert!(!o.consul.tls.verify);

        let o = run(
            &[
                "-sidecar-for",
                "web",
                "-http-addr",
                "unix:///run/c.sock",
                "-token",
                "flag",
            ],
            &env,
        )
        .unwrap();
        assert_eq!(
            o.consul.endpoints[0],
            Endpoint::Unix {
                path: "/run/c.sock".into()
            }
        );
        assert_eq!(o.consul.token.unwrap().expose(), "flag");
    }

    #[test]
    fn token_file_from_env_is_read_and_trimmed() {
        let env = MapEnv {
            vars: HashMap::from([("CONSUL_HTTP_TOKEN_FILE", "/t")]),
            files: HashMap::from([("/t", "  secret-token\n")]),
        };
        let o = run(&["-sidecar-for", "web"], &env).unwrap();
        assert_eq!(o.consul.token.unwrap().expose(), "secret-token");
        let env = MapEnv {
            vars: HashMap::from([("CONSUL_HTTP_TOKEN_FILE", "/missing")]),
            ..Default::default()
        };
        let err = run(&["-sidecar-for", "web"], &env).unwrap_err();
        assert!(err.0.contains("CONSUL_HTTP_TOKEN_FILE"), "{err}");
    }

    #[test]
    fn bad_usage_is_one_line_naming_the_problem() {
        let env = MapEnv::default();
        let cases: &[(&[&str], &str)] = &[
            (&[], "-sidecar-for"),
            (&["-sidecar-for", "a", "-sidecar-for-tag", "b"], "exclude"),
            (&["-sidecar-for", "a", "-bogus"], "--bogus"),
            (&["-sidecar-for", "a", "-log-level", "loud"], "-log-level"),
            (&["-sidecar-for", "a", "-stats-addr", "nope"], "-stats-addr"),
            (
                &["-sidecar-for", "a", "-http-addr", "ftp://x"],
                "-http-addr",
            ),
            (
                &["-sidecar-for", "a", "-enable-intentions=maybe"],
                "enable-intentions",
            ),
            (
                &["-sidecar-for", "a", "-stats-service-register"],
                "-stats-addr",
            ),
            (
                &["-sidecar-for", "a", "-spoe-threads", "0"],
                "-spoe-threads",
            ),
        ];
        for (args, needle) in cases {
            let err = run(args, &env).unwrap_err();
            assert!(!err.0.contains('\n'), "{args:?}: {err}");
            assert!(err.0.contains(needle), "{args:?}: {err} lacks {needle}");
        }
    }

    #[test]
    fn version_and_help_need_no_target() {
        let argv = ["x", "-version"].map(OsString::from);
        assert!(matches!(
            parse(argv, &MapEnv::default()),
            Ok(Command::Version { .. })
        ));
        let argv = ["x", "--help"].map(OsString::from);
        match parse(argv, &MapEnv::default()) {
            Ok(Command::Help(text)) => assert!(text.contains("-sidecar-for")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn grace_periods_read_like_go_durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("10ms").is_err());
        assert!(parse_duration("2h").is_err());
        let o = run(&["-sidecar-for", "a"], &MapEnv::default()).unwrap();
        assert_eq!(o.knobs.grace_period, Duration::from_secs(30));
    }

    #[test]
    fn haproxy_params_repeat_and_the_last_one_wins() {
        let o = run(
            &[
                "-sidecar-for",
                "a",
                "-haproxy-param",
                "global.maxconn=1000",
                "-haproxy-param",
                "defaults.timeout client=30s",
                "-haproxy-param",
                "global.maxconn=2000",
                "-balance",
                "LeastConn",
            ],
            &MapEnv::default(),
        )
        .unwrap();
        assert_eq!(o.knobs.haproxy_params.len(), 2);
        assert_eq!(o.knobs.haproxy_params[1].value, "2000");
        assert_eq!(o.knobs.haproxy_params[0].key, "timeout client");
        assert_eq!(o.knobs.balance, "leastconn");
    }

    #[test]
    fn agentless_flags_read_as_consul_dataplane_names_them() {
        let env = MapEnv {
            files: HashMap::from([("/t", "static")]),
            ..Default::default()
        };
        let o = run(
            &[
                "-proxy-service-id",
                "web-1-sidecar-proxy",
                "-service-node-name",
                "pod-node",
                "-http-addr",
                "10.0.0.1:8500,10.0.0.2:8500",
                "-http-addr=https://10.0.0.3:8501",
                "-http-addr",
                "10.0.0.1:8500",
                "-login-auth-method",
                "k8s",
                "-login-bearer-token-path",
                "/var/run/token",
                "-login-meta",
                "pod=web-0",
                "-login-meta=ns=a=b",
                "-login-datacenter",
                "dc2",
            ],
            &env,
        )
        .unwrap();
        assert_eq!(o.target, Target::ProxyId("web-1-sidecar-proxy".into()));
        assert_eq!(o.consul.catalog_node.as_ref().unwrap().as_str(), "pod-node");
        let addrs: Vec<String> = o.consul.endpoints.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "http://10.0.0.1:8500",
                "http://10.0.0.2:8500",
                "https://10.0.0.3:8501"
            ]
        );
        let login = o.consul.login.unwrap();
        assert_eq!(login.auth_method.as_str(), "k8s");
        assert_eq!(login.bearer_token_path, PathBuf::from("/var/run/token"));
        assert_eq!(login.meta.get("pod").map(String::as_str), Some("web-0"));
        assert_eq!(login.meta.get("ns").map(String::as_str), Some("a=b"));
        assert_eq!(login.datacenter.unwrap().as_str(), "dc2");
        assert!(login.namespace.is_none() && login.partition.is_none());
        assert!(o.consul.token.is_none());
    }

    #[test]
    fn agentless_misuse_is_a_usage_error() {
        let env = MapEnv::default();
        let login = "-sidecar-for a -login-auth-method m -login-bearer-token-path /t";
        // Each case's words, split at spaces, and what its message must name.
        let cases: &[(String, &str)] = &[
            ("-sidecar-for a -proxy-service-id b".into(), "exclude"),
            ("-proxy-service-id=".into(), "-proxy-service-id"),
            ("-sidecar-for a -service-node-name bad;node".into(), "-service-node-name"),
            ("-sidecar-for a -http-addr a:1,b:2".into(), "-service-node-name"),
            ("-sidecar-for a -http-addr a:1,,b:2".into(), "empty address"),
            (
                "-sidecar-for a -service-node-name n -stats-addr 127.0.0.1:1 -stats-service-register".into(),
                "-stats-service-register",
            ),
            ("-sidecar-for a -login-auth-method m".into(), "-login-bearer-token-path"),
            ("-sidecar-for a -login-bearer-token-path /t".into(), "-login-auth-method"),
            ("-sidecar-for a -login-meta k=v".into(), "-login-auth-method"),
            (format!("{login} -login-meta novalue"), "-login-meta"),
            (format!("{login} -token x"), "exclude"),
            (login.replace(" m ", " m;x "), "-login-auth-method"),
        ];
        for (args, needle) in cases {
            let args: Vec<&str> = args.split(' ').collect();
            let err = run(&args, &env).unwrap_err();
            assert!(!err.0.contains('\n'), "{args:?}: {err}");
            assert!(err.0.contains(needle), "{args:?}: {err} lacks {needle}");
        }
        // Several servers are fine once the sidecar is agentless.
        let args = [
            "-sidecar-for",
            "a",
            "-http-addr",
            "a:1,b:2",
            "-service-node-name",
            "n",
        ];
        assert_eq!(run(&args, &env).unwrap().consul.endpoints.len(), 2);
    }

    #[test]
    fn a_mesh_gateway_is_typed_from_consuls_flags() {
        let env = MapEnv::default();
        let o = run(
            &[
                "-gateway",
                "mesh",
                "-register",
                "-service",
                "gw",
                "-address",
                "127.0.0.1:8443",
                "-wan-address",
                "10.0.0.1:9443",
            ],
            &env,
        )
        .unwrap();
        let Target::MeshGateway(g) = o.target else {
            panic!("{:?}", o.target)
        };
        assert_eq!((g.service.as_str(), g.register), ("gw", true));
        assert_eq!(g.lan.to_string(), "127.0.0.1:8443");
        assert_eq!(
            g.wan.map(|w| w.to_string()).as_deref(),
            Some("10.0.0.1:9443")
        );
        // The same WAN address as the LAN one is one listener.
        let o = run(
            &[
                "-gateway=mesh",
                "-service=gw",
                "-address=127.0.0.1:1",
                "-wan-address=127.0.0.1:1",
            ],
            &env,
        )
        .unwrap();
        assert!(matches!(
            o.target,
            Target::MeshGateway(MeshGateway {
                wan: None,
                register: false,
                ..
            })
        ));
        let gw = "-gateway mesh -service gw -address";
        for (args, says) in [
            (
                "-gateway ingress -service gw -address 127.0.0.1:1".to_string(),
                "-gateway",
            ),
            ("-gateway mesh -address 127.0.0.1:1".into(), "-service"),
            ("-gateway mesh -service gw".into(), "-address"),
            (
                "-gateway mesh -service g%w -address 127.0.0.1:1".into(),
                "-service",
            ),
            (format!("{gw} host:1"), "-address"),
            (format!("{gw} 127.0.0.1:0"), "-address"),
            (format!("{gw} 127.0.0.1:1 -wan-address x"), "-wan-address"),
            (format!("{gw} 127.0.0.1:1 -sidecar-for web"), "-gateway"),
            ("-sidecar-for web -address 127.0.0.1:1".into(), "-address"),
        ] {
            let args: Vec<&str> = args.split(' ').collect();
            let args = args.as_slice();
            let e = run(args, &env).unwrap_err();
            assert!(e.0.contains(says), "{args:?}: {e}");
        }
    }

    #[test]
    fn log_levels_are_case_insensitive() {
        assert_eq!(parse_log_level("TRACE"), Ok(log::LevelFilter::Trace));
        assert_eq!(parse_log_level("Warn"), Ok(log::LevelFilter::Warn));
        assert_eq!(parse_log_level("error"), Ok(log::LevelFilter::Error));
        assert!(parse_log_level("verbose").is_err());
    }
}
