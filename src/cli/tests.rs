//! Unit tests of `cli`: every spelling, the environment, misuse, and the flag table.

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
    assert_eq!(parse_duration("30s").ok(), Some(Duration::from_secs(30)));
    assert_eq!(parse_duration("2m").ok(), Some(Duration::from_secs(120)));
    assert_eq!(
        parse_duration("1500ms").ok(),
        Some(Duration::from_millis(1500))
    );
    assert_eq!(parse_duration("45").ok(), Some(Duration::from_secs(45)));
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
        (
            "-sidecar-for a -service-node-name bad;node".into(),
            "-service-node-name",
        ),
        (
            "-sidecar-for a -http-addr a:1,b:2".into(),
            "-service-node-name",
        ),
        ("-sidecar-for a -http-addr a:1,,b:2".into(), "empty address"),
        (
            "-sidecar-for a -service-node-name n -stats-service-register".into(),
            "-stats-addr",
        ),
        (
            "-sidecar-for a -login-auth-method m".into(),
            "-login-bearer-token-path",
        ),
        (
            "-sidecar-for a -login-bearer-token-path /t".into(),
            "-login-auth-method",
        ),
        (
            "-sidecar-for a -login-meta k=v".into(),
            "-login-auth-method",
        ),
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
    // The stats endpoint is registered in the catalog then (`consul::catalog_service`).
    let args = [
        "-sidecar-for",
        "a",
        "-service-node-name",
        "n",
        "-stats-addr",
        "127.0.0.1:1",
        "-stats-service-register",
    ];
    assert!(run(&args, &env).unwrap().stats_service_register);
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

/// The README's flag table lists every flag of `flags::FLAGS` (but `-help`), and no other.
#[test]
fn the_readme_lists_every_flag() {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("\n### Flags\n")
        .nth(1)
        .and_then(|s| s.split("\n#").next())
        .expect("README has a Flags section");
    let mut listed = std::collections::BTreeSet::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let first = row.split('|').nth(1).unwrap_or_default();
        for quoted in first.split('`').skip(1).step_by(2) {
            let word = quoted.split([' ', '=']).next().unwrap_or_default();
            listed.insert(word.trim_start_matches('-').to_string());
        }
    }
    let flags: std::collections::BTreeSet<String> = flags::FLAGS
        .iter()
        .filter(|f| f.name != "help")
        .map(|f| f.name.to_string())
        .collect();
    assert_eq!(listed, flags);
}
