//! The flags that say what the sidecar serves (`-sidecar-for`, `-gateway mesh`, …) and how it
//! reaches Consul (addresses, TLS, token, login), with Consul's environment variables filling in
//! what the flags leave out.

use super::*;

/// `-gateway mesh` and its flags, typed: `None` without `-gateway`.
pub(super) fn mesh_gateway(m: &ArgMatches) -> Result<Option<MeshGateway>, UsageError> {
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
pub(super) fn target(m: &ArgMatches, gateway: Option<MeshGateway>) -> Result<Target, UsageError> {
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
pub(super) fn name_flag(m: &ArgMatches, flag: &'static str) -> Result<Option<Name>, UsageError> {
    m.get_one::<String>(flag)
        .map(|v| {
            Name::parse(flag, v.trim())
                .map_err(|e| UsageError(format!("invalid value for -{flag}: {e}")))
        })
        .transpose()
}

/// `-http-addr` (each value comma-separated, the flag repeatable) or `CONSUL_HTTP_ADDR`, in
/// order, duplicates dropped.
pub(super) fn endpoints(m: &ArgMatches, env: &dyn Env) -> Result<Vec<Endpoint>, UsageError> {
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
pub(super) fn login(m: &ArgMatches) -> Result<Option<Login>, UsageError> {
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

pub(super) fn consul_settings(m: &ArgMatches, env: &dyn Env) -> Result<ConsulSettings, UsageError> {
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

pub(super) fn read_token(env: &dyn Env, path: &str, source: &str) -> Result<Secret, UsageError> {
    let raw = env
        .read_file(path)
        .map_err(|e| UsageError(format!("{source}: cannot read token file {path}: {e}")))?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(UsageError(format!("{source}: token file {path} is empty")));
    }
    Ok(Secret::new(token))
}
