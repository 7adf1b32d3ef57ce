//! Entry point: parse, set up logging, run, map the outcome to an exit code.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use haproxy_consul_connect::cli::{self, Command, EXIT_USAGE};
use haproxy_consul_connect::{dry_run, reload_haproxy, supervisor, RELOAD_SUBCOMMAND};

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == RELOAD_SUBCOMMAND) {
        return reload(args.get(2).map(Path::new));
    }
    let code = match cli::parse(args, &cli::ProcessEnv) {
        Err(e) => {
            eprintln!("haproxy-consul-connect: {e}");
            EXIT_USAGE
        }
        Ok(Command::Help(text)) => {
            println!("{text}");
            0
        }
        Ok(Command::Version {
            haproxy_bin,
            dataplane_bin,
        }) => {
            println!("haproxy-consul-connect {}", env!("CARGO_PKG_VERSION"));
            println!("haproxy: {}", probe_version(&haproxy_bin, "-v"));
            println!(
                "dataplaneapi: {}",
                probe_version(&dataplane_bin, "--version")
            );
            0
        }
        Ok(Command::DryRun { opts, show_secrets }) => {
            init_logging(opts.log_level);
            match dry_run::dry_run(&opts) {
                Ok(files) => {
                    let mut out = std::io::stdout().lock();
                    for f in files {
                        let _ = writeln!(out, "==> {} <==", f.path.display());
                        if show_secrets {
                            let _ = out.write_all(f.contents.as_bytes());
                        } else {
                            let _ = out.write_all(dry_run::redacted(&f).as_bytes());
                        }
                    }
                    0
                }
                Err(f) => {
                    log::error!("{}", f.error);
                    f.code
                }
            }
        }
        Ok(Command::Run(opts)) => {
            init_logging(opts.log_level);
            match supervisor::run(*opts) {
                Ok(code) => code,
                Err(f) => {
                    log::error!("{}", f.error);
                    f.code
                }
            }
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn init_logging(level: log::LevelFilter) {
    // Libraries speak at WARN at most: their debug output is about HTTP plumbing, not the mesh.
    env_logger::Builder::new()
        .filter_level(level.min(log::LevelFilter::Warn))
        .filter_module("haproxy_consul_connect", level)
        .filter_module("haproxy", level)
        .filter_module("dataplaneapi", level)
        .format(|buf, record| {
            // The component is the first module below the crate, or the child's name for lines
            // forwarded from haproxy and dataplaneapi.
            let target = record.target();
            let component = target
                .strip_prefix("haproxy_consul_connect::")
                .map(|t| t.split("::").next().unwrap_or(t))
                .unwrap_or(target);
            writeln!(
                buf,
                "{} {:<5} [{component}] {}",
                buf.timestamp_millis(),
                record.level(),
                record.args()
            )
        })
        .write_style(env_logger::WriteStyle::Never)
        .init();
}

fn probe_version(bin: &Path, flag: &str) -> String {
    match std::process::Command::new(bin).arg(flag).output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim();
            if first.is_empty() {
                format!("{} answered {flag} with nothing", bin.display())
            } else {
                format!("{first} ({})", bin.display())
            }
        }
        Err(e) => format!("not found ({}: {e})", bin.display()),
    }
}

/// Run by the Dataplane API as its reload command: exit 0 only if HAProxy took the new config.
fn reload(master: Option<&Path>) -> ExitCode {
    let Some(master) = master else {
        eprintln!("usage: haproxy-consul-connect {RELOAD_SUBCOMMAND} <master socket>");
        return ExitCode::from(EXIT_USAGE as u8);
    };
    match reload_haproxy(master, Duration::from_secs(20)) {
        Ok(n) => {
            println!("HAProxy reloaded (reload {n})");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("reload failed: {e}");
            ExitCode::FAILURE
        }
    }
}
