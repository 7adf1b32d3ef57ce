//! Every flag, listed once (`FLAGS`): its name, its other spellings, how it takes a value, its
//! default and its help. The parser (`command`), the Go-style spelling rewrite (`normalise`),
//! `--help` and the README's flag table (checked by a test) all come from this one list.

use std::ffi::OsString;

use clap::{Arg, ArgAction, ArgMatches};

use super::{Env, UsageError};

/// How a flag takes its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A Go bool: `-flag`, `-flag=true`, `-flag=false`; the word after it is never its value.
    Bool,
    /// One value, the next word or after `=`, whatever it looks like; the last one given wins.
    Value,
    /// A value that may be given again; every one is kept, in order.
    Repeated,
}

/// One command-line flag.
#[derive(Debug)]
pub(crate) struct Flag {
    /// The long name, taken as `-name` and `--name`.
    pub name: &'static str,
    /// Other names of the same flag (`-h` for `-help`).
    pub aliases: &'static [&'static str],
    pub kind: Kind,
    /// What `--help` calls the value.
    pub value_name: &'static str,
    pub default: Option<&'static str>,
    pub help: &'static str,
}

/// The Go original's flags, plus ours, in `--help`'s order. Single-dash spellings are rewritten
/// only for these names, so that a value such as `-1` or `-x` is never taken for a flag.
pub(crate) const FLAGS: &[Flag] = &[
    Flag {
        name: "sidecar-for",
        aliases: &[],
        kind: Kind::Value,
        value_name: "ID",
        default: None,
        help: "The Consul service ID to proxy",
    },
    Flag {
        name: "sidecar-for-tag",
        aliases: &[],
        kind: Kind::Value,
        value_name: "TAG",
        default: None,
        help: "Proxy the one local service that carries this tag",
    },
    Flag {
        name: "http-addr",
        aliases: &[],
        kind: Kind::Repeated,
        value_name: "ADDR",
        default: None,
        help: "Consul agent address (host:port, http://, https://, unix://) [default: 127.0.0.1:8500, or CONSUL_HTTP_ADDR]; with -service-node-name, the servers: comma-separated or repeated, tried in turn",
    },
    Flag {
        name: "proxy-service-id",
        aliases: &[],
        kind: Kind::Value,
        value_name: "ID",
        default: None,
        help: "The service ID of the proxy itself (instead of -sidecar-for)",
    },
    Flag {
        name: "service-node-name",
        aliases: &[],
        kind: Kind::Value,
        value_name: "NODE",
        default: None,
        help: "Agentless: the catalog node the proxy is registered on; the sidecar then talks to the Consul servers of -http-addr and writes nothing to an agent",
    },
    Flag {
        name: "login-auth-method",
        aliases: &[],
        kind: Kind::Value,
        value_name: "NAME",
        default: None,
        help: "Log in with this ACL auth method instead of -token (needs -login-bearer-token-path)",
    },
    Flag {
        name: "login-bearer-token-path",
        aliases: &[],
        kind: Kind::Value,
        value_name: "PATH",
        default: None,
        help: "File holding the bearer token (a JWT) of the login, read again at every login",
    },
    Flag {
        name: "login-meta",
        aliases: &[],
        kind: Kind::Repeated,
        value_name: "KEY=VALUE",
        default: None,
        help: "Metadata of the login token, as key=value; repeatable",
    },
    Flag {
        name: "login-namespace",
        aliases: &[],
        kind: Kind::Value,
        value_name: "NAMESPACE",
        default: None,
        help: "Namespace of the auth method (Consul Enterprise)",
    },
    Flag {
        name: "login-partition",
        aliases: &[],
        kind: Kind::Value,
        value_name: "PARTITION",
        default: None,
        help: "Admin partition of the auth method (Consul Enterprise)",
    },
    Flag {
        name: "login-datacenter",
        aliases: &[],
        kind: Kind::Value,
        value_name: "DC",
        default: None,
        help: "Datacenter of the auth method",
    },
    Flag {
        name: "token",
        aliases: &[],
        kind: Kind::Value,
        value_name: "TOKEN",
        default: None,
        help: "Consul ACL token [default: CONSUL_HTTP_TOKEN]",
    },
    Flag {
        name: "token-file",
        aliases: &[],
        kind: Kind::Value,
        value_name: "PATH",
        default: None,
        help: "File holding the Consul ACL token [default: CONSUL_HTTP_TOKEN_FILE]",
    },
    Flag {
        name: "haproxy",
        aliases: &[],
        kind: Kind::Value,
        value_name: "PATH",
        default: Some("haproxy"),
        help: "HAProxy binary path",
    },
    Flag {
        name: "dataplane",
        aliases: &[],
        kind: Kind::Value,
        value_name: "PATH",
        default: Some("dataplaneapi"),
        help: "Dataplane API binary path",
    },
    Flag {
        name: "haproxy-cfg-base-path",
        aliases: &[],
        kind: Kind::Value,
        value_name: "DIR",
        default: Some("/tmp"),
        help: "Directory in which each sidecar makes its own working directory",
    },
    Flag {
        name: "log-level",
        aliases: &[],
        kind: Kind::Value,
        value_name: "LEVEL",
        default: Some("INFO"),
        help: "Log level: TRACE, DEBUG, INFO, WARN or ERROR",
    },
    Flag {
        name: "enable-intentions",
        aliases: &[],
        kind: Kind::Bool,
        value_name: "BOOL",
        default: None,
        help: "Enforce Consul intentions on inbound connections",
    },
    Flag {
        name: "stats-addr",
        aliases: &[],
        kind: Kind::Value,
        value_name: "ADDR",
        default: None,
        help: "Listen address of the stats/metrics HTTP server",
    },
    Flag {
        name: "stats-service-register",
        aliases: &[],
        kind: Kind::Bool,
        value_name: "BOOL",
        default: None,
        help: "Register the stats endpoint as a Consul service",
    },
    Flag {
        name: "spoe-threads",
        aliases: &[],
        kind: Kind::Value,
        value_name: "N",
        default: Some("2"),
        help: "Worker threads of the intentions (SPOE) agent",
    },
    Flag {
        name: "grace-period",
        aliases: &[],
        kind: Kind::Value,
        value_name: "DURATION",
        default: Some("30s"),
        help: "How long a stop lets in-flight connections finish (e.g. 30s, 2m, 500ms)",
    },
    Flag {
        name: "haproxy-param",
        aliases: &[],
        kind: Kind::Repeated,
        value_name: "SECTION.KEY=VALUE",
        default: None,
        help: "An HAProxy global or defaults setting, as section.key=value; repeatable",
    },
    Flag {
        name: "balance",
        aliases: &[],
        kind: Kind::Value,
        value_name: "ALGORITHM",
        default: Some("roundrobin"),
        help: "Load-balancing algorithm of upstreams: roundrobin, leastconn, first or random",
    },
    Flag {
        name: "log-format",
        aliases: &[],
        kind: Kind::Value,
        value_name: "FORMAT",
        default: None,
        help: "HAProxy log-format of the access log lines (default: HAProxy's httplog/tcplog)",
    },
    Flag {
        name: "template-dir",
        aliases: &[],
        kind: Kind::Value,
        value_name: "DIR",
        default: None,
        help: "Directory of Tera templates (haproxy.cfg.tera, spoe.conf.tera) replacing the built-in ones; checked with haproxy -c before use",
    },
    Flag {
        name: "upstream-identity-check",
        aliases: &[],
        kind: Kind::Bool,
        value_name: "BOOL",
        default: None,
        help: "Admit an upstream endpoint only once it proved, in an mTLS handshake, that it is the destination [default: true]",
    },
    Flag {
        name: "upstream-identity-recheck",
        aliases: &[],
        kind: Kind::Value,
        value_name: "DURATION",
        default: Some("30s"),
        help: "How often each upstream endpoint's identity is checked again (e.g. 30s, 2m)",
    },
    Flag {
        name: "gateway",
        aliases: &[],
        kind: Kind::Value,
        value_name: "KIND",
        default: None,
        help: "Run as a gateway of this kind instead of a sidecar (mesh)",
    },
    Flag {
        name: "register",
        aliases: &[],
        kind: Kind::Bool,
        value_name: "BOOL",
        default: None,
        help: "With -gateway: register the gateway service at start and deregister it at exit",
    },
    Flag {
        name: "service",
        aliases: &[],
        kind: Kind::Value,
        value_name: "NAME",
        default: None,
        help: "With -gateway: the gateway's service name (also its service ID)",
    },
    Flag {
        name: "address",
        aliases: &[],
        kind: Kind::Value,
        value_name: "IP:PORT",
        default: None,
        help: "With -gateway: the LAN address to listen on (ip:port)",
    },
    Flag {
        name: "wan-address",
        aliases: &[],
        kind: Kind::Value,
        value_name: "IP:PORT",
        default: None,
        help: "With -gateway: the WAN address other clusters dial (ip:port) [default: -address]",
    },
    Flag {
        name: "dry-run",
        aliases: &[],
        kind: Kind::Bool,
        value_name: "BOOL",
        default: None,
        help: "Print the files that would be written for the current Consul state, then exit; private keys and the Dataplane API password are redacted",
    },
    Flag {
        name: "dry-run-show-secrets",
        aliases: &[],
        kind: Kind::Bool,
        value_name: "BOOL",
        default: None,
        help: "With -dry-run, print private keys and the Dataplane API password too",
    },
    Flag {
        name: "version",
        aliases: &[],
        kind: Kind::Bool,
        value_name: "BOOL",
        default: None,
        help: "Print the version and the versions of haproxy and dataplaneapi",
    },
    Flag {
        name: "help",
        aliases: &["h"],
        kind: Kind::Bool,
        value_name: "BOOL",
        default: None,
        help: "Print help",
    },
];

/// The clap parser of `FLAGS`.
pub(crate) fn command() -> clap::Command {
    FLAGS.iter().fold(
        clap::Command::new("haproxy-consul-connect")
            .about("Consul Connect sidecar that runs HAProxy as its data plane")
            .args_override_self(true)
            .disable_version_flag(true)
            .disable_help_flag(true),
        |cmd, f| cmd.arg(arg(f)),
    )
}

fn arg(f: &Flag) -> Arg {
    let arg = Arg::new(f.name)
        .long(f.name)
        .help(f.help)
        .value_name(f.value_name);
    let arg = match f.kind {
        // Go's flag package takes `-flag`, `-flag=true` and `-flag=false`; so do we.
        Kind::Bool => {
            return arg
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("true")
                .action(ArgAction::Set)
        }
        // Go's flag package takes the next argument as the value whatever it looks like.
        Kind::Value => arg.action(ArgAction::Set).allow_hyphen_values(true),
        Kind::Repeated => arg.action(ArgAction::Append).allow_hyphen_values(true),
    };
    match f.default {
        Some(d) => arg.default_value(d),
        None => arg,
    }
}

/// Turns `-name[=v]` into `--name[=v]`, as Go's flag package reads them. A word that follows a
/// value-taking flag is its value and is never rewritten, so `-token -abc` keeps `-abc`.
pub(super) fn normalise(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
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
        let flag = FLAGS.iter().find(|f| f.name == name);
        if let Some(alias) = FLAGS.iter().find(|f| f.aliases.contains(&name)) {
            out.push(OsString::from(format!("--{}", alias.name)));
            continue;
        }
        next_is_value = !has_value && flag.is_some_and(|f| f.kind != Kind::Bool);
        out.push(OsString::from(format!("--{body}")));
    }
    out
}

pub(super) fn parse_bool(flag: &str, v: &str) -> Result<bool, UsageError> {
    // The spellings Go's strconv.ParseBool accepts.
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(UsageError(format!(
            "invalid boolean value {v:?} for -{flag}"
        ))),
    }
}

pub(super) fn flag_bool(m: &ArgMatches, name: &str) -> Result<bool, UsageError> {
    match m.get_one::<String>(name) {
        Some(v) => parse_bool(name, v),
        None => Ok(false),
    }
}

pub(super) fn env_bool(env: &dyn Env, name: &str, default: bool) -> Result<bool, UsageError> {
    match env.var(name) {
        Some(v) => parse_bool(name, &v)
            .map_err(|_| UsageError(format!("invalid boolean value {v:?} in {name}"))),
        None => Ok(default),
    }
}
